"""Argument checks and small helpers shared by the evaluation modules."""
import torch
import torch.nn.functional as F


def _matrix(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, E], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _vector(x, name, n, dtype=None):
    """x as a 1-D tensor of length n (lists and numpy arrays accepted)."""
    x = torch.as_tensor(x)
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 1 or x.numel() != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(x.shape)}")
    if dtype is torch.bool:
        if x.dtype != torch.bool:
            if x.is_floating_point() or x.is_complex() or not ((x == 0) | (x == 1)).all():
                raise ValueError(f"{name} must be boolean (or 0/1 integers), got {x.dtype}")
            x = x.bool()
    elif dtype is torch.int64:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer labels, got {x.dtype}")
        x = x.long()
    return x


def _labels(labels, name, n, device):
    return _vector(labels, name, n, torch.int64).to(device)


def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _fars(fars):
    fars = (fars,) if isinstance(fars, (int, float)) else tuple(fars)
    for far in fars:
        if not (isinstance(far, (int, float)) and 0 < far <= 1):
            raise ValueError(f"every far must be a number in (0, 1], got {far!r}")
    return fars


def _normalized(x):
    """Rows L2-normalised, computed in float32 (float64 stays float64)."""
    return F.normalize(x.double() if x.dtype == torch.float64 else x.float(), dim=1)


def _generator_device(generator):
    return generator.device if generator is not None else "cpu"

