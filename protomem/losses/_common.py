"""What every head shares: input checks, the margin argument, per-step statistics, and the
global mean of per-row losses over the ranks."""
import torch
import torch.nn.functional as F

from .. import distributed
from ..margins import CombinedMargin
from ..memory import _as_labels as as_labels
from ..ops.cos_lse import PRECISIONS

_EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_margin(margin):
    """The margin argument of a head: a ``protomem.margins.CombinedMargin`` (CosFace, ArcFace...)."""
    if not isinstance(margin, CombinedMargin):
        raise TypeError("margin must be a protomem.margins margin (CosFace(s, m), ArcFace(s, m) or "
                        f"CombinedMargin(s, m1, m2, m3)), got {type(margin).__name__}")
    return margin


def check_precision(precision):
    """The precision argument of a head: "default" or "highest" (see margin_cross_entropy)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_embeddings(x, embedding_size, device, name="embeddings"):
    """x must be a float tensor [B, embedding_size], B >= 1, on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _EMBEDDING_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != embedding_size or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, {embedding_size}] with B >= 1 "
                         f"(embedding_size={embedding_size}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the head's state is on {device}; "
                         "move the head with .to(device)")


def check_labels(labels, batch, device):
    """int32/int64 labels [B] or [B, 1] matching a batch of ``batch`` rows -> int64 [B]."""
    labels = as_labels(labels)
    if labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} rows but the embeddings have {batch}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the embeddings are on {device}")
    return labels


def cosine(a, b):
    """Row-wise cosine of a [N, D] and b [N, D] (float32, float64 for float64 inputs)."""
    dt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return (F.normalize(a.to(dt), dim=1, eps=1e-12) * F.normalize(b.to(dt), dim=1, eps=1e-12)).sum(1)


def row_loss(lse, target, ignored):
    """Per-row loss ``lse - target``, 0 (and no gradient) on ignored rows."""
    return torch.where(ignored, torch.zeros_like(lse), lse - torch.where(ignored, lse, target))


def global_mean(local_sum, n_total, extra=()):
    """The mean over the global batch of per-row losses each rank summed over its own rows.

    Args:
        local_sum: 0-d tensor, this rank's sum of per-row losses (differentiable).
        n_total: 0-d tensor, the number of rows counted over all ranks.
        extra: further 0-d tensors to sum over the ranks alongside (statistics).

    Returns:
        (loss, sums): loss has the value of the global mean on every rank and the gradient of
        it with respect to this rank's rows (each rank back-propagates only its own part); sums
        are the rank-summed ``extra`` (no gradient). One all_reduce, no host sync.
    """
    parts = torch.stack([local_sum.detach().to(torch.float64)] + [e.to(torch.float64) for e in extra])
    parts = distributed.all_reduce(parts)
    n = n_total.clamp_min(1).to(local_sum.dtype)
    loss = (parts[0].to(local_sum.dtype) + local_sum - local_sum.detach()) / n
    return loss, parts[1:]


class StepStats:
    """Per-step statistics kept as device tensors (no host sync during the step); ``as_dict``
    converts them to Python numbers (one sync) when someone reads them."""

    def __init__(self):
        self._values = {}

    def set(self, **values):
        """Replaces the statistics with ``values`` (0-d tensors or numbers)."""
        self._values = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()}

    def as_dict(self):
        """dict name -> float/int of the last step (empty before the first step)."""
        out = {}
        for k, v in self._values.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            out[k] = v
        return out
