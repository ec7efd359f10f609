"""MomentumEncoder: the exponential-moving-average copy of an encoder that DCQ takes keys from."""
import copy

import torch
from torch import nn


def _unwrap(module):
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class MomentumEncoder(nn.Module):
    """An EMA copy of ``module``: ``theta_k = m * theta_k + (1 - m) * theta_q`` on ``update()``.

    The copy has no gradients; ``forward`` runs it under ``torch.no_grad()``. Buffers (BatchNorm
    statistics) are copied from the online encoder on each update. Its state (the EMA weights)
    is in ``state_dict``; the online encoder is not registered as a submodule.

    Args:
        module: the online encoder (a DistributedDataParallel wrapper is unwrapped).
        momentum: m in [0, 1) (the paper: 0.999).
    """

    def __init__(self, module, momentum=0.999):
        super().__init__()
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.encoder = copy.deepcopy(_unwrap(module))
        self.encoder.requires_grad_(False)
        self._online = [_unwrap(module)]  # a list: not a submodule, not in state_dict

    @torch.no_grad()
    def update(self, module=None):
        """One EMA step towards ``module`` (default: the module given at construction)."""
        online = _unwrap(module) if module is not None else self._online[0]
        for ema, p in zip(self.encoder.parameters(), online.parameters()):
            ema.lerp_(p.detach().to(ema.dtype), 1.0 - self.momentum)
        for ema, b in zip(self.encoder.buffers(), online.buffers()):
            ema.copy_(b)

    def forward(self, *args, **kwargs):
        """The EMA encoder's output, without gradient."""
        with torch.no_grad():
            return self.encoder(*args, **kwargs)

    def extra_repr(self):
        return f"momentum={self.momentum}"
