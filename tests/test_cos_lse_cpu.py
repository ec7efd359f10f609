"""cos_lse_fwd / cos_lse_bwd_w, the C++ CPU kernels, against the plain-PyTorch references
(protomem/reference.py), computed in float64 on the same (rounded) inputs. Each case runs with the
AVX2 kernels and with the baseline ones (PROTOMEM_CPU_VEC=default), and with many small blocks of
columns (PROTOMEM_COS_LSE_BLOCK) so that the online softmax crosses block boundaries, in both
threading modes (PROTOMEM_COS_LSE_SPLIT)."""
import pytest
import torch
from conftest import random_ids

from protomem.reference import cos_lse_bwd_w_ref, cos_lse_fwd_ref

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SCALE = 30.0
# Errors of a float32-accumulated result (float64 for float64 inputs) against float64, measured
# at these sizes (D <= 129, s = 30) with a 5-10x margin: cos and the softmax weights carry
# ~1e-7 relative error, the lse s times the cosines' error.
ATOL = {F32: dict(lse=1e-4, best=2e-6, direction=1e-5, w_inv=1e-6, grad_w=1e-5),
        F64: dict(lse=1e-10, best=1e-12, direction=1e-11, w_inv=1e-12, grad_w=1e-11)}


@pytest.fixture(params=["native", "default"])
def vec(request, monkeypatch):
    """The AVX2 kernels (where the CPU has them) or the baseline ones."""
    if request.param == "default":
        monkeypatch.setenv("PROTOMEM_CPU_VEC", "default")
    return request.param


@pytest.fixture(params=["own", "100", "100-blas", "100-baseline"])
def block(request, monkeypatch):
    """The op's own block size, or blocks of 100 columns: taken by the threads in turn and merged
    at the end, or each spread over all threads (PROTOMEM_COS_LSE_SPLIT=0), or with the baseline
    kernels."""
    if request.param != "own":
        monkeypatch.setenv("PROTOMEM_COS_LSE_BLOCK", "100")
    if request.param.endswith("blas"):
        monkeypatch.setenv("PROTOMEM_COS_LSE_SPLIT", "0")
    if request.param.endswith("baseline"):
        monkeypatch.setenv("PROTOMEM_CPU_VEC", "default")
    return request.param


def make(B, M, D, x_dtype=F32, w_dtype=None, regime="random", seed=0, n_labels=None):
    """x [B, D], W [M, D], row_labels [B], col_labels [M] (about 1 in 8 columns empty, some rows
    sharing a label with columns). regime "near": x_i = W[j_i] + small noise for a column j_i of
    another label, so that row i's softmax is dominated by one column."""
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(g, n_labels or max(M // 2, 1) + B)
    col = ids[torch.randint(0, len(ids), (M,), generator=g)]
    col = torch.where(torch.rand(M, generator=g) < 0.125, -1, col)
    row = ids[torch.randint(0, len(ids), (B,), generator=g)]
    if M:  # half the rows take a column's label (masked there)
        take = torch.rand(B, generator=g) < 0.5
        row = torch.where(take, col[torch.randint(0, M, (B,), generator=g)].clamp_min(0), row)
    W = torch.randn(M, D, generator=g, dtype=F64) * (0.5 + torch.rand(M, 1, generator=g, dtype=F64))
    x = torch.randn(B, D, generator=g, dtype=F64) * 2
    if regime == "near" and M:
        for i in range(B):
            others = ((col >= 0) & (col != row[i])).nonzero().flatten()
            if len(others):
                j = others[torch.randint(0, len(others), (1,), generator=g)]
                x[i] = W[j] * 3 + 0.01 * torch.randn(D, generator=g, dtype=F64)
    return dict(x=x.to(x_dtype), W=W.to(w_dtype or x_dtype), row=row, col=col)


def fwd(case, scale=SCALE, precision="default", **flags):
    flags = {"normalize_x": True, "normalize_w": True, **flags}
    return torch.ops.protomem.cos_lse_fwd(case["x"], case["W"], case["row"], case["col"], scale,
                                          flags["normalize_x"], flags["normalize_w"], precision)


def bwd_w(case, grad, lse, w_inv, scale=SCALE, precision="default", **flags):
    flags = {"normalize_x": True, "normalize_w": True, **flags}
    return torch.ops.protomem.cos_lse_bwd_w(grad, case["x"], case["W"], case["row"], case["col"],
                                            lse, w_inv, scale, flags["normalize_x"],
                                            flags["normalize_w"], precision)


def exact(case, scale=SCALE, **flags):
    """The reference in float64 on the case's inputs: fwd outputs, and a function of grad_lse."""
    x, W = case["x"].double(), case["W"].double()
    out = cos_lse_fwd_ref(x, W, case["row"], case["col"], scale, **flags)
    return out, lambda g: cos_lse_bwd_w_ref(g.double(), x, W, case["row"], case["col"], out[0],
                                            scale, **flags)


def cosines(case, **flags):
    x, W = case["x"].double(), case["W"].double()
    if flags.get("normalize_x", True):
        x = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
    if flags.get("normalize_w", True):
        W = torch.nn.functional.normalize(W, dim=1, eps=1e-12)
    return x @ W.T


def acc_dtype(case):
    return F64 if F64 in (case["x"].dtype, case["W"].dtype) else F32


def assert_fwd_close(case, got, want, scale=SCALE, factor=1, **flags):
    """Every output within (factor times) the tolerance of its accumulation dtype; best_index a
    column whose cosine is the best one up to rounding (exact ties are tested separately)."""
    dt = acc_dtype(case)
    tol = {k: v * factor for k, v in ATOL[dt].items()}
    lse, best, index, direction, w_inv = got
    for t in (lse, best, direction, w_inv):
        assert t.dtype == dt
    assert index.dtype == torch.int64 and direction.shape == case["x"].shape
    assert not any(t.isnan().any() for t in got[:4])
    atol_lse = tol["lse"] * scale / SCALE
    torch.testing.assert_close(lse.double(), want[0], atol=atol_lse, rtol=0)
    torch.testing.assert_close(best.double(), want[1], atol=tol["best"], rtol=0)
    torch.testing.assert_close(direction.double(), want[3], atol=tol["direction"], rtol=0)
    torch.testing.assert_close(w_inv.double(), want[4], atol=0, rtol=tol["w_inv"])
    none = want[2] < 0
    assert torch.equal(index[none], want[2][none])
    if (~none).any():
        cos = cosines(case, **flags)
        rows = (~none).nonzero().flatten()
        picked = cos[rows, index[rows]]
        other = (case["col"][index[rows]] >= 0) & (case["col"][index[rows]] != case["row"][rows])
        assert other.all()
        assert (picked >= want[1][rows] - 2 * tol["best"]).all()


def unprojected_size(case, grad, lse, scale=SCALE, **flags):
    """max_j |w_inv_j * H_j| with H_j = sum_i d(grad . lse)/d cos_ij * x_hat_i (float64): the size
    of grad_W's terms before the tangent projection, which sets its rounding error (the
    projection cancels most of it when rows lie near their column, and all of it when D = 1)."""
    x = case["x"].double()
    if flags.get("normalize_x", True):
        x = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
    w_inv = 1 / case["W"].double().norm(dim=1).clamp_min(1e-12) \
        if flags.get("normalize_w", True) else torch.ones(len(case["W"]), dtype=F64)
    other = (case["col"] >= 0)[None, :] & (case["row"][:, None] != case["col"][None, :])
    lse = lse.double()
    live = torch.isfinite(lse)
    p = torch.exp(scale * cosines(case, **flags) - torch.where(live, lse, 0)[:, None])
    gamma = torch.where(other & live[:, None], grad.double()[:, None] * scale * p, 0)
    return max((w_inv[:, None] * (gamma.T @ x)).abs().max().item() if gamma.numel() else 0, 1e-30)


def assert_grad_close(case, got, want, size, factor=1):
    """grad_W within the accumulation dtype's tolerance relative to the unprojected size, and
    within W's dtype's rounding (bfloat16 / float16 storage)."""
    assert got.dtype == case["W"].dtype and got.shape == case["W"].shape
    assert not got.isnan().any()
    if not got.numel():
        return
    tol = ATOL[acc_dtype(case)]["grad_w"] * factor * size
    if case["W"].dtype in (BF16, F16):
        tol = max(tol, (8e-3 if case["W"].dtype == BF16 else 1e-3) * want.abs().max().item())
    assert (got.double() - want).abs().max().item() <= tol


def check_bwd(case, got_fwd, want_fwd, ref_bwd, scale=SCALE, factor=1, **flags):
    """cos_lse_bwd_w of the op's own forward against the reference's, for a grad_lse with zeros."""
    grad = grad_for(case, got_fwd[0])
    got = bwd_w(case, grad, got_fwd[0], got_fwd[4], scale=scale, **flags)
    size = unprojected_size(case, grad, want_fwd[0], scale=scale, **flags)
    assert_grad_close(case, got, ref_bwd(grad), size, factor)


def grad_for(case, lse):
    """A grad_lse with zeros, on the rows that have other columns."""
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(len(lse), generator=g, dtype=F64)
    grad[::3] = 0
    return grad.to(lse.dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("regime", ["random", "near"])
@pytest.mark.parametrize("B,M,D", [(1, 1, 1), (37, 1001, 129), (256, 4099, 128), (5, 4099, 1),
                                   (1, 1001, 129), (37, 1, 16)])
def test_matches_reference(B, M, D, regime, dtype, block):
    case = make(B, M, D, dtype, regime=regime)
    got = fwd(case)
    want, ref_bwd = exact(case)
    assert_fwd_close(case, got, want)
    check_bwd(case, got, want, ref_bwd)


@pytest.mark.parametrize("x_dtype,w_dtype", [(BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32),
                                             (F16, F64), (F64, BF16), (F32, F64)])
def test_low_precision_and_mixed_dtypes(x_dtype, w_dtype, vec):
    """Inputs are converted exactly to the accumulation dtype: the errors are float32's (float64's)
    and grad_W's rounding to W's dtype."""
    case = make(37, 1001, 129, x_dtype, w_dtype, regime="near")
    got = fwd(case)
    want, ref_bwd = exact(case)
    assert_fwd_close(case, got, want)
    check_bwd(case, got, want, ref_bwd)


@pytest.mark.parametrize("normalize_x,normalize_w", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_without_normalisation(normalize_x, normalize_w, dtype, vec):
    case = make(37, 1001, 16, dtype)
    case["x"], case["W"] = case["x"] * 0.3, case["W"] * 0.3  # raw dot products of order 1
    flags = dict(normalize_x=normalize_x, normalize_w=normalize_w)
    got = fwd(case, scale=4.0, **flags)
    want, ref_bwd = exact(case, scale=4.0, **flags)
    if not normalize_w:
        assert torch.equal(got[4], torch.ones_like(got[4]))
    # the "cosines" are raw dot products up to ~10: ten times the tolerances
    assert_fwd_close(case, got, want, scale=4.0, factor=10, **flags)
    check_bwd(case, got, want, ref_bwd, scale=4.0, factor=10, **flags)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_rows_without_other_columns(dtype, block):
    """Rows whose columns are all empty or of their own label: lse = best = -inf, index -1,
    direction 0, no NaN anywhere, and no contribution to grad_W."""
    case = make(37, 1001, 20, dtype)
    case["col"][::2] = 7                     # half the columns labelled 7, the others empty
    case["col"][1::2] = -1
    case["row"][::3] = 7                     # rows of label 7: nothing else
    got = fwd(case)
    want, ref_bwd = exact(case)
    assert_fwd_close(case, got, want)
    dead = case["row"] == 7
    assert torch.isneginf(got[0][dead]).all() and torch.isneginf(got[1][dead]).all()
    assert (got[2][dead] == -1).all() and (got[3][dead] == 0).all()
    assert torch.isfinite(got[0][~dead]).all()
    grad = torch.ones(37, dtype=dtype)
    grad_w = bwd_w(case, grad, got[0], got[4])
    assert torch.isfinite(grad_w).all()
    assert_grad_close(case, grad_w, ref_bwd(grad), unprojected_size(case, grad, want[0]))
    # all rows dead: a zero gradient
    case["row"][:] = 7
    got = fwd(case)
    assert torch.isneginf(got[0]).all() and (got[3] == 0).all() and (got[2] == -1).all()
    assert torch.equal(bwd_w(case, grad, got[0], got[4]), torch.zeros_like(case["W"]))


@pytest.mark.parametrize("M", [0, 1, 3])
def test_tiny_and_empty_memory(M, vec):
    case = make(5, M, 8, F64)
    got = fwd(case)
    want, ref_bwd = exact(case)
    assert_fwd_close(case, got, want)
    check_bwd(case, got, want, ref_bwd)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ties_give_the_smallest_index(dtype, block):
    """Duplicated columns give exactly equal cosines: best_index is the first, also when the
    copies lie in different blocks."""
    case = make(37, 1001, 24, dtype, regime="near")
    W, col = case["W"], case["col"]
    dup_from = torch.arange(0, 1001, 7)
    dup_to = (dup_from * 5 + 300) % 1001           # copies before and after their source
    W[dup_to] = W[dup_from]
    col[dup_to] = col[dup_from]
    got = fwd(case)
    want, _ = exact(case)
    cos = cosines(case)
    rows = got[2] >= 0
    picked = got[2][rows]
    # no other column of the row with the same (bit-equal in the kernel) cosine comes earlier
    for i, j in zip(rows.nonzero().flatten().tolist(), picked.tolist()):
        same = (W == W[j]).all(dim=1) & (col >= 0) & (col != case["row"][i])
        assert j == same.nonzero().min().item(), (i, j)
    assert torch.equal(got[2][~rows], want[2][~rows])
    assert (cos[rows.nonzero().flatten(), picked] >= want[1][rows] - 2 * ATOL[dtype]["best"]).all()


@pytest.mark.parametrize("dtype", [F32, F64])
def test_duplicated_labels(dtype, block):
    """Few labels, many columns each: many same-label entries per row, shared by rows."""
    case = make(64, 1001, 24, dtype, n_labels=9)
    got = fwd(case)
    want, ref_bwd = exact(case)
    assert_fwd_close(case, got, want)
    check_bwd(case, got, want, ref_bwd)


def test_noncontiguous_inputs(vec):
    base = make(37, 1001, 32, F32)
    case = dict(base, x=torch.stack([base["x"], base["x"]], dim=2)[..., 0],
                W=base["W"].t().contiguous().t(),
                col=torch.stack([base["col"], base["col"]], dim=1)[:, 0])
    assert not any(case[k].is_contiguous() for k in ("x", "W", "col"))
    got, want = fwd(case), fwd(base)
    for a, b in zip(got, want):  # x's norms may be summed in another order
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    grad = grad_for(case, got[0])
    torch.testing.assert_close(bwd_w(case, grad, got[0], got[4]),
                               bwd_w(base, grad, want[0], want[4]), atol=1e-5, rtol=1e-5)


def test_forward_is_deterministic(monkeypatch):
    """Runs of blocks are merged in column order whichever thread ran them: bitwise repeatable."""
    monkeypatch.setenv("PROTOMEM_COS_LSE_BLOCK", "64")
    case = make(256, 4099, 32, F32, regime="near")
    first = fwd(case)
    for _ in range(3):
        for a, b in zip(fwd(case), first):
            assert torch.equal(a, b)


@pytest.mark.parametrize("split", ["1", "0"])
def test_worker_threads_run_with_the_callers_state(monkeypatch, split):
    """The blocks' GEMMs run on ATen's worker threads (an OpenMP build): with inputs that require
    grad they must see the caller's dispatch state, not a worker's default grad mode (which sent
    them to autograd: "functions with out=... arguments don't support automatic
    differentiation"); the results match one thread's to rounding."""
    monkeypatch.setenv("PROTOMEM_COS_LSE_BLOCK", "64")
    monkeypatch.setenv("PROTOMEM_COS_LSE_SPLIT", split)
    case = make(70, 1001, 33, F32, regime="near")
    x, W = case["x"].clone().requires_grad_(), case["W"].clone().requires_grad_()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.protomem.cos_lse_fwd(x, W, case["row"], case["col"], SCALE, True, True, "highest")
        torch.set_num_threads(max(threads, 4))
        many = torch.ops.protomem.cos_lse_fwd(x, W, case["row"], case["col"], SCALE, True, True, "highest")
        many[0].sum().backward()  # cos_lse_bwd_w on the worker threads too
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all() and torch.isfinite(W.grad).all()


def test_precision_highest_is_default_on_cpu():
    case = make(37, 1001, 32, F32)
    for a, b in zip(fwd(case, precision="highest"), fwd(case)):
        assert torch.equal(a, b)


def test_avx2_and_baseline_kernels_agree(monkeypatch):
    case = make(37, 1001, 129, F32, regime="near")
    native = fwd(case)
    monkeypatch.setenv("PROTOMEM_CPU_VEC", "default")
    base = fwd(case)
    for a, b in zip(native, base):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_bwd_w_float64_gradcheck():
    """cos_lse_bwd_w against autograd through the reference's lse, and against central finite
    differences of the op's own forward along random directions."""
    case = make(9, 301, 12, F64, regime="near")
    case["row"][0] = case["col"][case["col"] >= 0][0]
    lse, _, _, _, w_inv = fwd(case)
    grad = grad_for(case, lse)
    got = bwd_w(case, grad, lse, w_inv)
    W = case["W"].clone().requires_grad_()
    ref_lse = cos_lse_fwd_ref(case["x"], W, case["row"], case["col"], SCALE)[0]
    dead = torch.isinf(ref_lse)
    logits_lse = _differentiable_lse(case, W)
    (auto,) = torch.autograd.grad((grad * torch.where(dead, 0, logits_lse)).sum(), W)
    torch.testing.assert_close(got, auto, atol=1e-10, rtol=1e-9)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(case["W"].shape, generator=g, dtype=F64)
        eps = 1e-6
        plus = dict(case, W=case["W"] + eps * v)
        minus = dict(case, W=case["W"] - eps * v)
        keep = ~dead
        fd = ((fwd(plus)[0] - fwd(minus)[0])[keep] * grad[keep]).sum() / (2 * eps)
        assert abs(fd.item() - (got * v).sum().item()) <= 1e-6 * max(1.0, abs(fd.item()))


def _differentiable_lse(case, W):
    """The reference lse as a differentiable function of W (float64)."""
    xh = torch.nn.functional.normalize(case["x"], dim=1, eps=1e-12)
    cos = xh @ torch.nn.functional.normalize(W, dim=1, eps=1e-12).T
    other = (case["col"] >= 0)[None, :] & (case["row"][:, None] != case["col"][None, :])
    return torch.logsumexp(torch.where(other, SCALE * cos, float("-inf")), dim=1)


def test_bad_inputs():
    case = make(5, 11, 4, F32)
    x, W, row, col = case["x"], case["W"], case["row"], case["col"]
    op = torch.ops.protomem.cos_lse_fwd
    ok = (x, W, row, col, SCALE, True, True, "default")

    def call(**repl):
        names = ["x", "W", "row", "col", "scale", "nx", "nw", "precision"]
        args = [repl.get(n, a) for n, a in zip(names, ok)]
        return op(*args)

    with pytest.raises(ValueError, match="x must have 2"):
        call(x=x[0])
    with pytest.raises(ValueError, match="W.size"):
        call(W=W[:, :3])
    with pytest.raises(TypeError, match="x must be float"):
        call(x=x.long())
    with pytest.raises(TypeError, match="W must be float"):
        call(W=W.int())
    with pytest.raises(TypeError, match="row_labels must be int64"):
        call(row=row.int())
    with pytest.raises(TypeError, match="col_labels must be int64"):
        call(col=col.float())
    with pytest.raises(ValueError, match="row_labels.size"):
        call(row=row[:4])
    with pytest.raises(ValueError, match="col_labels must have 1"):
        call(col=col[:, None])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale must be > 0"):
            call(scale=bad)
    with pytest.raises(ValueError, match="precision"):
        call(precision="fast")
    lse, _, _, _, w_inv = op(*ok)
    grad = torch.ones(5)
    bwd = torch.ops.protomem.cos_lse_bwd_w
    args = (grad, x, W, row, col, lse, w_inv, SCALE, True, True, "default")
    assert bwd(*args).shape == W.shape
    for pos, bad, err, msg in [(0, grad[:4], ValueError, "grad_lse.size"),
                               (0, grad.long(), TypeError, "grad_lse must be float"),
                               (5, lse[:, None], ValueError, "lse must have 1"),
                               (6, w_inv[:3], ValueError, "w_inv_norm.size"),
                               (7, -2.0, ValueError, "scale must be > 0"),
                               (10, "tf32", ValueError, "precision")]:
        with pytest.raises(err, match=msg):
            bwd(*args[:pos], bad, *args[pos + 1:])
