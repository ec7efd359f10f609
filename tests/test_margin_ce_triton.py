"""The Triton kernels of the fused margin cross-entropy (protomem/triton/cos_lse.py) against
protomem.reference, on the CPU under TRITON_INTERPRET=1 (on a GPU, on CUDA tensors).

Op level: cos_lse_fwd_triton / cos_lse_bwd_w_triton against cos_lse_fwd_ref / cos_lse_bwd_w_ref.
Whole loss: the Triton kernels stand in for the CPU kernels of the same ops (``triton_ops``), so
margin_cross_entropy runs its CUDA code path (per-row targets, autograd, grad x from the
direction, grad W kernel) and is compared with the float64 reference."""
import re
import warnings

import pytest
import torch
from conftest import HAS_CUDA
from margin_ce_cases import MARGINS, REGIMES, exact, make, max_err, plain, rel_err

from protomem.functional import margin_ce_stats, margin_cross_entropy
from protomem.reference import cos_lse_bwd_w_ref, cos_lse_fwd_ref

pytestmark = pytest.mark.triton
DEV = "cuda" if HAS_CUDA else "cpu"
K = pytest.importorskip("protomem.triton.cos_lse")


def to_dev(case):
    return {k: v.to(DEV) for k, v in case.items()}


@pytest.fixture
def triton_ops():
    """On the CPU, the Triton launchers replace the C++ kernels of cos_lse_fwd / cos_lse_bwd_w for
    the test (restored after); on a GPU they are the CUDA kernels already."""
    if HAS_CUDA:
        yield
        return
    lib = torch.library.Library("protomem", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("cos_lse_fwd", lambda x, W, r, c, s, nx, nw, p: K.cos_lse_fwd_triton(
            x, W, r, c, s, nx, nw, p, splits=3), "CPU")
        lib.impl("cos_lse_bwd_w", K.cos_lse_bwd_w_triton, "CPU")
    yield
    lib._destroy()


def first(kind, block_d, op, w):
    return K._configs(kind, block_d, op.itemsize, w.itemsize)[0]


# ---------------------------------------------------------------------------------------------
# op level


@pytest.mark.parametrize("B,M,D", [(1, 1, 1), (37, 1001, 129), (70, 300, 33), (5, 4099, 16)])
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("regime", REGIMES)
def test_fwd_matches_reference(B, M, D, splits, regime):
    c = to_dev(make(B, M, D, torch.float32, regime, dup=True, ignored=True, empty=M > 1))
    got = K.cos_lse_fwd_triton(c["x"], c["W"], c["row"], c["col"], 30.0, True, True, "highest",
                               splits=splits)
    want = cos_lse_fwd_ref(c["x"].double(), c["W"].double(), c["row"], c["col"], 30.0)
    lse, best, idx, direction, winv = got
    assert max_err(lse, want[0], torch.isfinite(want[0])) <= 2e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(want[0]))
    assert max_err(best, want[1], torch.isfinite(want[1])) <= 1e-6
    assert torch.equal(idx, want[2])
    assert max_err(direction, want[3]) <= 1e-5
    assert max_err(winv, want[4]) <= 1e-6 * float(want[4].abs().max())


def test_fwd_normalisation_flags_and_ties():
    c = to_dev(make(19, 260, 24, torch.float32, "random"))
    c["W"][7] = c["W"][3]  # equal columns: best_index is the smaller one
    c["col"][7] = c["col"][3] + 10**9
    for nx, nw in ((False, True), (True, False), (False, False)):
        x, W = c["x"] * 0.2, c["W"] * 0.2
        got = K.cos_lse_fwd_triton(x, W, c["row"], c["col"], 7.0, nx, nw, "highest", splits=2)
        want = cos_lse_fwd_ref(x.double(), W.double(), c["row"], c["col"], 7.0, nx, nw)
        for g, w in zip(got, want):
            assert max_err(g, w) <= 1e-5 * max(1.0, float(w.double().abs().max()))


def test_fwd_rows_without_other_columns():
    """All live columns carry the row's label (or there is none): lse = best = -inf, index -1,
    direction 0, no NaN anywhere."""
    W = torch.randn(6, 8, device=DEV)
    col = torch.tensor([4, 4, -1, 4, -1, 4], device=DEV)
    x = torch.randn(3, 8, device=DEV)
    lse, best, idx, direction, _ = K.cos_lse_fwd_triton(x, W, torch.tensor([4, 4, 9], device=DEV),
                                                        col, 16.0, True, True, "highest", splits=2)
    assert torch.isinf(lse[:2]).all() and (lse[:2] < 0).all() and torch.isfinite(lse[2])
    assert torch.isinf(best[:2]).all() and idx[:2].tolist() == [-1, -1]
    assert not torch.isnan(direction).any() and (direction[:2] == 0).all()


@pytest.mark.parametrize("B,M,D", [(37, 1001, 129), (3, 70, 16)])
@pytest.mark.parametrize("normalize_w", [True, False])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bwd_w_matches_reference(B, M, D, normalize_w, wdtype):
    c = to_dev(make(B, M, D, torch.float32, "dominated", dup=True, ignored=True))
    W = c["W"].to(wdtype)
    g = torch.randn(B, device=DEV)
    g[0] = 0
    lse = cos_lse_fwd_ref(c["x"], W, c["row"], c["col"], 20.0, True, normalize_w)[0]
    winv = K.inverse_norms(W, normalize_w)
    got = K.cos_lse_bwd_w_triton(g, c["x"], W, c["row"], c["col"], lse, winv, 20.0, True,
                                 normalize_w, "highest")
    want = cos_lse_bwd_w_ref(g.double(), c["x"].double(), W.double(), c["row"], c["col"],
                             lse.double(), 20.0, True, normalize_w)
    assert got.dtype == wdtype
    assert rel_err(got, want) <= {torch.float32: 5e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[wdtype]


def test_bwd_w_rows_without_other_columns_give_zero_not_nan():
    """Bug (a) of issue 11: a row whose lse is -inf made the old backward NaN for every row of W."""
    W = torch.randn(5, 8, device=DEV)
    col = torch.tensor([2, 2, -1, 3, 3], device=DEV)
    x = torch.randn(2, 8, device=DEV)
    row = torch.tensor([2, 7], device=DEV)
    lse = cos_lse_fwd_ref(x, W, torch.tensor([2, 2], device=DEV), col, 16.0)[0]  # row 0: only 3s
    lse = torch.stack([torch.tensor(float("-inf"), device=DEV), lse[1]])
    got = K.cos_lse_bwd_w_triton(torch.ones(2, device=DEV), x, W, row, col, lse,
                                 K.inverse_norms(W, True), 16.0, True, True, "highest")
    assert torch.isfinite(got).all()
    want = cos_lse_bwd_w_ref(torch.ones(2, device=DEV), x, W, row, col, lse, 16.0)
    assert rel_err(got, want) <= 1e-5


def test_bwd_w_allocates_no_float32_m_by_d_temporary():
    """Bug (e): the old grad-W path wrote an [M, D] float32 H before projecting it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    c = to_dev(make(9, 500, 32, torch.bfloat16, "random"))
    M, D = c["W"].shape
    seen = []

    class Allocs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= M * D:
                    seen.append((str(func), tuple(t.shape)))
            return out

    lse = cos_lse_fwd_ref(c["x"], c["W"], c["row"], c["col"], 16.0)[0]
    with Allocs():
        K.cos_lse_bwd_w_triton(torch.ones(9, device=DEV), c["x"], c["W"], c["row"], c["col"], lse,
                               K.inverse_norms(c["W"], True), 16.0, True, True, "default")
    assert seen == []


def test_autotune_key_includes_the_split_count():
    """Bug (b): tune's comparison of split counts reused the first count's config."""
    tuner = K._tuner("fwd", 128, 2, 2)
    assert "S" in tuner.keys and "KEY_M" in tuner.keys and "OP" in tuner.keys


def test_kernel_offsets_are_int64():
    """Bug (d): every row offset multiplied by a stride (or by D) is taken in int64, so no
    pointer overflows past 2**31 elements (a test that allocates that much cannot run here)."""
    import inspect as pyinspect

    for fn in (K._fwd_kernel, K._column_tile, K._bwd_w_kernel):
        src = pyinspect.getsource(fn.fn)
        products = re.findall(r"([\w\.\(\)]+)(?:\[:, None\]|\[None, :\])? \* (stride_\w+|D)\b", src)
        assert products, fn
        for lhs, _ in products:
            assert lhs.endswith(".to(tl.int64)"), (fn, lhs)


# ---------------------------------------------------------------------------------------------
# the whole loss through the ops


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("regime", REGIMES)
def test_loss_highest_matches_reference(triton_ops, margin, with_pos, regime):
    case = make(37, 1001, 129, torch.float32, regime, ignored=True, dup=with_pos)
    c = to_dev(case)
    leaves = [c["x"].requires_grad_(), c["W"].requires_grad_()] + \
        ([c["pos"].float().requires_grad_()] if with_pos else [])
    loss = margin_cross_entropy(leaves[0], leaves[1], c["row"], c["col"],
                                leaves[2] if with_pos else None, **margin.params(),
                                reduction="none", precision="highest")
    grads = torch.autograd.grad(loss.sum(), leaves)
    want, want_grads = exact(case, margin, with_pos)
    p_loss, p_grads = plain(case, margin, with_pos, torch.float32)
    keep = case["row"] >= 0
    assert max_err(loss.cpu(), want, keep) <= max(2 * max_err(p_loss, want, keep), 1e-5)
    for g, pg, w in zip(grads, p_grads, want_grads):  # float32: 2x plain, or 10 ulp-ish
        assert rel_err(g.cpu(), w) <= max(2 * rel_err(pg, w), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("margin", [MARGINS[0], MARGINS[1]], ids=repr)
@pytest.mark.parametrize("regime", REGIMES)
def test_default_precision_error_at_most_twice_plain_pytorch(triton_ops, dtype, margin, regime):
    """Tensor cores by default: the operands are bfloat16 (float16 for float16 inputs); against
    float64 the error, forward and backward, is at most twice idiomatic PyTorch's in that operand
    dtype, whose own error must be > 0."""
    case = make(37, 1001, 129, dtype, regime)
    op = torch.float16 if dtype == torch.float16 else torch.bfloat16
    c = to_dev(case)
    leaves = [c["x"].requires_grad_(), c["W"].requires_grad_()]
    loss = margin_cross_entropy(*leaves, c["row"], c["col"], **margin.params(), reduction="none")
    grads = torch.autograd.grad(loss.sum(), leaves)
    want, want_grads = exact(case, margin, False)
    p_loss, p_grads = plain(case, margin, False, op)
    assert max_err(p_loss, want) > 0
    assert max_err(loss.cpu(), want) <= 2 * max_err(p_loss, want)
    for g, pg, w in zip(grads, p_grads, want_grads):
        assert 0 < rel_err(pg, w)
        assert rel_err(g.cpu(), w) <= 2 * rel_err(pg, w)


def test_float16_gradient_does_not_underflow(triton_ops):
    """Bug (c): the old kernels cast d loss / d cos (with the 1/B row factor) to float16 before
    the gradient dots, where it underflowed. The gradient must be as accurate as float16 storage
    allows: within 2x the error of rounding the exact gradient to float16."""
    g = torch.Generator().manual_seed(1)
    B, M, D = 16, 4000, 512
    x = torch.randn(B, D, generator=g).half().to(DEV).requires_grad_()
    W = torch.randn(M, D, generator=g).half().to(DEV)
    row, col = torch.arange(B, device=DEV), torch.arange(M, device=DEV) + B  # no row has a target
    lse = margin_ce_stats(x, W, row, col, scale=64.0)[0]
    w = torch.full((B,), 1 / 16384, device=DEV)  # the row factor of a mean over a large batch
    (gx,) = torch.autograd.grad(lse @ w, x)
    xd = x.detach().double().requires_grad_()
    cos = torch.nn.functional.normalize(xd, dim=1) @ torch.nn.functional.normalize(W.double(), dim=1).T
    (want,) = torch.autograd.grad(torch.logsumexp(64 * cos, dim=1) @ w.double(), xd)
    assert rel_err(gx.cpu(), want.cpu()) <= 2 * rel_err(want.half().cpu(), want.cpu())


def test_chosen_configs_are_recorded(triton_ops):
    c = to_dev(make(5, 90, 16, torch.float32, "random"))
    K._CHOSEN.clear()
    margin_cross_entropy(c["x"], c["W"].requires_grad_(), c["row"], c["col"], scale=8.0).backward()
    kinds = {r["kernel"] for r in K.chosen_configs()}
    assert kinds == {"fwd", "bwd_w"}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("D", [1, 129, 300])
def test_norms_and_cast_in_one_read(normalize, D):
    """A float32 W with bfloat16 operands is cast once per step, with its inverse norms: equal to
    torch's round-to-nearest cast and norms; a W already in the operand dtype is not copied, and
    a 16-bit W is never widened."""
    W = torch.randn(77, D, device=DEV) * 3
    copy, rw = K.norms_and_cast(W, normalize, torch.bfloat16)
    assert copy.dtype == torch.bfloat16
    assert ((copy.float() - W).abs() <= W.abs() * 2.0**-7).all()  # one bfloat16 ulp
    if HAS_CUDA:  # round to nearest as torch (the interpreter's cast truncates)
        assert torch.equal(copy, W.to(torch.bfloat16))
    torch.testing.assert_close(rw, K.inverse_norms(W, normalize), rtol=1e-6, atol=0)
    Wb = W.to(torch.bfloat16)
    assert K.norms_and_cast(Wb, normalize, torch.bfloat16)[0] is Wb
    assert K.norms_and_cast(Wb, normalize, torch.float32)[0] is Wb


TRANSPOSED = dict(BLOCK_B=64, BLOCK_M=128, TRANSPOSED=True)


@pytest.mark.parametrize("B,M,D,splits", [(1, 1, 1, 1), (37, 1001, 129, 3), (70, 4099, 33, 7)])
@pytest.mark.parametrize("regime", REGIMES)
def test_fwd_transposed_tiles_match_reference(B, M, D, splits, regime):
    """_fwd_cols (column-major tiles, an autotuner candidate) gives the row kernel's results."""
    import triton

    c = to_dev(make(B, M, D, torch.float32, regime, dup=True, ignored=True, empty=M > 1))
    c["W"][min(3, M - 1)] = c["W"][0]  # equal columns: the smaller index
    cfg = triton.Config(TRANSPOSED, num_warps=8, num_stages=1)
    got = K.cos_lse_fwd_triton(c["x"], c["W"], c["row"], c["col"], 30.0, True, True, "highest",
                               config=cfg, splits=splits)
    want = cos_lse_fwd_ref(c["x"].double(), c["W"].double(), c["row"], c["col"], 30.0)
    assert max_err(got[0], want[0], torch.isfinite(want[0])) <= 2e-5
    assert torch.equal(torch.isinf(got[0]), torch.isinf(want[0]))
    assert max_err(got[1], want[1], torch.isfinite(want[1])) <= 1e-6
    assert torch.equal(got[2], want[2])
    assert max_err(got[3], want[3]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fwd_transposed_tiles_rows_without_other_columns_and_16_bit(dtype):
    import triton

    cfg = triton.Config(TRANSPOSED, num_warps=8, num_stages=1)
    W = torch.randn(6, 8, device=DEV)
    col = torch.tensor([4, 4, -1, 4, -1, 4], device=DEV)
    x = torch.randn(3, 8, device=DEV)
    lse, best, idx, direction, _ = K.cos_lse_fwd_triton(x, W, torch.tensor([4, 4, 9], device=DEV), col,
                                                        16.0, True, True, "highest", config=cfg, splits=2)
    assert torch.isinf(lse[:2]).all() and torch.isfinite(lse[2]) and idx[:2].tolist() == [-1, -1]
    assert not torch.isnan(direction).any() and (direction[:2] == 0).all()
    c = to_dev(make(19, 700, 40, dtype, "dominated"))
    rows = K.cos_lse_fwd_triton(c["x"], c["W"], c["row"], c["col"], 30.0, True, True, "default", splits=2)
    cols = K.cos_lse_fwd_triton(c["x"], c["W"], c["row"], c["col"], 30.0, True, True, "default",
                                config=cfg, splits=2)
    want = cos_lse_fwd_ref(c["x"].double(), c["W"].double(), c["row"], c["col"], 30.0)
    # P is rounded to bfloat16 against another running max: errors of the same size, not equal
    for i in (0, 1, 3):
        err_rows, err_cols = max_err(rows[i], want[i]), max_err(cols[i], want[i])
        assert 0 < err_cols <= 2 * err_rows + 1e-6, (i, err_cols, err_rows)
