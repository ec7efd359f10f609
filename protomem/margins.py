"""Margins of the normalised softmax: the target logit s*cos(theta) becomes
s*(cos(m1*theta + m2) - m3) (insightface's combined margin). CosFace is (1, 0, m), ArcFace
(1, m, 0). Where m1*theta + m2 > pi the angular term would no longer decrease with theta; there,
as insightface does, the target uses cos(theta) - m2*sin(m2) (then - m3)."""
import math

import torch

# The derivative of the angle, d theta / d cos = -1 / sin(theta), is capped at sin(theta) >= SIN_FLOOR
# (in the kernels too): at theta ~ 0 (an embedding on its own prototype) the exact derivative is
# unbounded while d cos / d x vanishes, and their float product is amplified rounding noise.
SIN_FLOOR = 1e-3


class _Angle(torch.autograd.Function):
    """acos of a cosine (clamped to [-1, 1]) whose derivative is capped at sin(theta) >= SIN_FLOOR."""

    @staticmethod
    def forward(ctx, cos):
        c = cos.clamp(-1.0, 1.0)
        ctx.save_for_backward(c)
        return torch.acos(c)

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        return -grad / torch.sqrt(1 - c * c).clamp_min(SIN_FLOOR)



class CombinedMargin:
    """The insightface combined margin ``s*(cos(m1*theta + m2) - m3)`` on the target logit.

    Args:
        scale: s > 0, the logit scale.
        m1: multiplicative angular margin (>= 1 in practice; > 0).
        m2: additive angular margin in radians (>= 0).
        m3: additive cosine margin (>= 0).
    """

    def __init__(self, scale, m1=1.0, m2=0.0, m3=0.0):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not m1 > 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not (0 <= m2 < math.pi):
            raise ValueError(f"m2 must be in [0, pi), got {m2}")
        if not m3 >= 0:
            raise ValueError(f"m3 must be >= 0, got {m3}")
        self.scale, self.m1, self.m2, self.m3 = float(scale), float(m1), float(m2), float(m3)

    def target_cos(self, cos):
        """Margin-adjusted target cosine (unscaled), elementwise on a float tensor of cosines."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3
        theta = _Angle.apply(cos)
        angular = torch.cos(self.m1 * theta + self.m2)
        fallback = cos - self.m2 * math.sin(self.m2)
        return torch.where(self.m1 * theta + self.m2 <= math.pi, angular, fallback) - self.m3

    def params(self):
        """dict(scale, m1, m2, m3): the keyword arguments of the fused loss."""
        return dict(scale=self.scale, m1=self.m1, m2=self.m2, m3=self.m3)

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3})"

    def __eq__(self, other):
        return isinstance(other, CombinedMargin) and self.params() == other.params()


class CosFace(CombinedMargin):
    """CosFace / AM-softmax: target ``s*(cos(theta) - m)``."""

    def __init__(self, scale=64.0, margin=0.4):
        super().__init__(scale, 1.0, 0.0, margin)


class ArcFace(CombinedMargin):
    """ArcFace: target ``s*cos(theta + m)`` (m in radians)."""

    def __init__(self, scale=64.0, margin=0.5):
        super().__init__(scale, 1.0, margin, 0.0)
