"""A counter-based random number generator: random values are a pure function of integer keys.

Every value is ``hash(key words...)`` computed with 32-bit mixing steps held in int64 tensors and
masked to 32 bits after each step, so no intermediate reaches 2**63: the integers are exact on any
device and platform, and any element can be generated on its own without generating the others.
"""
import math

import torch

MASK32 = 0xFFFFFFFF
_INIT = 0x9E3779B9  # the starting state of a key chain (any odd constant would do)
_TWO_PI = 2.0 * math.pi
_INV_2_32 = 2.0 ** -32


# Odd multipliers below 2**31: a product with a 32-bit value stays below 2**63. The first is
# lowbias32's (Wellons' hash prospector); the second is an odd constant from the same search space.
_M1, _M2 = 0x7FEB352D, 0x31848BAB


def mix32(x):
    """A bijective 32-bit xorshift-multiply avalanche hash.

    Args:
        x: int64 tensor (or Python int) with values in [0, 2**32).
    Returns:
        int64 tensor of x's shape (or a Python int), values in [0, 2**32).
    """
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def key(*words):
    """Hashes a sequence of non-negative words: Python ints < 2**63 and broadcastable int64 tensors.

    Each word is hashed as 64 bits (low half, then high half), so a Python int and a tensor
    holding it give the same key. Leading Python ints are hashed in Python, at no tensor cost.

    Returns:
        int64 tensor (the broadcast shape of the tensor words) with values in [0, 2**32), or a
        Python int when every word is one.
    """
    h = _INIT
    for w in words:
        if isinstance(w, torch.Tensor):
            w = w.long()
        elif not 0 <= w < 2**63:
            raise ValueError(f"key words must be in [0, 2**63), got {w}")
        h = mix32(mix32(h ^ (w & MASK32)) ^ ((w >> 32) & MASK32))
    return h


def _bits(keys, width):
    """[..., 1] keys -> [..., width] independent 32-bit hashes (one more mixing step per column).

    Columns are XORed in hashed, not as 0, 1, 2, ..., so neighbouring columns differ in many bits.
    """
    col = mix32(torch.arange(width, dtype=torch.int64, device=keys.device))
    return mix32(keys ^ col)


# The generators below take ``keys`` (int64 tensor [...] from ``key``) and ``width`` (values per
# key) and return [..., width]; value j of a key depends on (key, j) only.


def uniform(keys, width):
    """Uniform floats in (0, 1]: float64 [..., width]."""
    return (_bits(keys.unsqueeze(-1), width).double() + 1.0) * _INV_2_32


def normal(keys, width):
    """Standard normal floats by Box-Muller (a pair of hashes gives a cosine and a sine value):
    float32 [..., width]."""
    h = _bits(keys.unsqueeze(-1), 2 * ((width + 1) // 2)).float()
    u1 = (h[..., 0::2] + 1.0) * _INV_2_32  # in (0, 1], so the log is finite
    theta = h[..., 1::2] * (_TWO_PI * _INV_2_32)
    r = torch.sqrt(-2.0 * torch.log(u1))
    # value 2p is the cosine and 2p+1 the sine of pair p, so value j does not depend on width
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1).flatten(-2)[..., :width]


def uniform8(keys, width):
    """Cheap uniform floats of 8-bit resolution ((k + 0.5) / 256), four per hash, for pixel noise:
    float32 [..., width] in (0, 1)."""
    h = _bits(keys.unsqueeze(-1), (width + 3) // 4)
    octets = torch.stack([(h >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).flatten(-2)
    return (octets[..., :width].float() + 0.5) * (1.0 / 256)
