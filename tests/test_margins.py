"""CosFace / ArcFace / CombinedMargin against insightface's formulas, written out independently."""
import math

import pytest
import torch

from protomem.margins import ArcFace, CombinedMargin, CosFace


def insightface_arcface(cos, m):
    # arcface_torch: where(cos > cos(pi - m), cos(theta + m), cos - sin(pi - m) * m)
    sin = torch.sqrt(1 - cos * cos)
    return torch.where(cos > math.cos(math.pi - m), cos * math.cos(m) - sin * math.sin(m),
                       cos - math.sin(math.pi - m) * m)


def test_cosface():
    cos = torch.rand(100, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(CosFace(30, 0.35).target_cos(cos), cos - 0.35)


@pytest.mark.parametrize("m", [0.2, 0.5, 1.0])
def test_arcface_including_theta_plus_m_above_pi(m):
    cos = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    assert (torch.acos(cos) + m > math.pi).any()
    torch.testing.assert_close(ArcFace(64, m).target_cos(cos), insightface_arcface(cos, m))


def test_combined_margin_m1():
    cos = torch.tensor([0.9, 0.2, -0.3], dtype=torch.float64)
    got = CombinedMargin(64, 1.2, 0.1, 0.05).target_cos(cos)
    want = torch.cos(1.2 * torch.acos(cos) + 0.1) - 0.05
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs", [dict(scale=0), dict(scale=1, m1=0), dict(scale=1, m2=-0.1),
                                    dict(scale=1, m2=4.0), dict(scale=1, m3=-1)])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        CombinedMargin(**kwargs)


def test_params_and_equality():
    assert CosFace(64, 0.4).params() == dict(scale=64.0, m1=1.0, m2=0.0, m3=0.4)
    assert ArcFace(64, 0.5) == CombinedMargin(64, 1.0, 0.5, 0.0)
    assert "ArcFace" in repr(ArcFace())
