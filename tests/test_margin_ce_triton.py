"""The Triton margin cross-entropy kernels (CPU: under TRITON_INTERPRET=1, set by conftest) against
the C++ ops, which tests/test_margin_ce.py checks against protomem.reference."""
import pytest
import torch

import protomem  # noqa: F401  (registers the ops)
from protomem.margins import ArcFace, CombinedMargin, CosFace

triton_mc = pytest.importorskip("protomem.triton.margin_ce")
pytestmark = pytest.mark.triton

MARGINS = [CosFace(64, 0.4), ArcFace(64, 0.5), ArcFace(16, 2.0), CombinedMargin(32, 1.0, 0.2, 0.1)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def data(B, M, D, dtype, dup, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype)
    W = torch.randn(M, D, generator=g).to(dtype)
    col = torch.randperm(3 * M, generator=g)[:M]
    col[torch.rand(M, generator=g) < 0.1] = -1  # empty columns
    row = col.clamp_min(0)[torch.randint(M, (B,), generator=g)]
    if dup:
        col[: M // 4] = row[0]
    pos = torch.rand(B, generator=g) * 1.8 - 0.9
    return [t.to(DEVICE) for t in (x, W, row, col, pos)]


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("B,M,D", [(1, 1, 1), (37, 1001, 129)])
def test_matches_cpp(margin, with_pos, B, M, D):
    x, W, row, col, pos = data(B, M, D, torch.float32, with_pos)
    pos = pos if with_pos else None
    args = (margin.scale, margin.m1, margin.m2, margin.m3, True, True)
    got = triton_mc.margin_ce_fwd_triton(x, W, row, col, pos, *args)
    cpu = [t.cpu() if t is not None else None for t in (x, W, row, col, pos)]
    want = torch.ops.protomem.margin_ce_fwd(*cpu, *args)
    keep = torch.isfinite(want[1])
    torch.testing.assert_close(got[0].cpu(), want[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[1].cpu()[keep], want[1][keep], atol=1e-4, rtol=1e-5)
    assert torch.equal(torch.isinf(got[1].cpu()), ~keep)
    for k in (2, 3):  # best target and best other cosine
        torch.testing.assert_close(got[k].cpu(), want[k], atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    ga, gb = torch.randn(B, generator=g), torch.randn(B, generator=g)
    out = triton_mc.margin_ce_bwd_triton(ga.to(DEVICE), gb.to(DEVICE), x, W, row, col, pos,
                                         want[0].to(DEVICE), want[1].to(DEVICE), *args, True)
    ref = torch.ops.protomem.margin_ce_bwd(ga, gb, *cpu[:5], want[0], want[1], *args, True)
    for a, b in zip(out, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.cpu(), b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs(dtype):
    x, W, row, col, _ = data(19, 200, 40, dtype, False)
    args = (30.0, 1.0, 0.3, 0.0, True, True)
    got = triton_mc.margin_ce_fwd_triton(x, W, row, col, None, *args)
    want = torch.ops.protomem.margin_ce_fwd(x.cpu(), W.cpu(), row.cpu(), col.cpu(), None, *args)
    torch.testing.assert_close(got[0].cpu(), want[0], atol=1e-4, rtol=1e-5)


def test_rejects_m1_other_than_one():
    x, W, row, col, _ = data(4, 10, 3, torch.float32, False)
    with pytest.raises(ValueError, match="m1 = 1"):
        triton_mc.margin_ce_fwd_triton(x, W, row, col, None, 10.0, 1.2, 0.0, 0.0, True, True)
