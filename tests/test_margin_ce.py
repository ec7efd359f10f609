"""The fused margin cross-entropy (C++ CPU kernel) against protomem.reference."""
import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA

from protomem.functional import margin_cross_entropy
from protomem.margins import ArcFace, CombinedMargin, CosFace
from protomem.reference import margin_cross_entropy_ref

MARGINS = [CosFace(64, 0.4), ArcFace(64, 0.5), ArcFace(16, 2.0), CombinedMargin(32, 1.1, 0.2, 0.1)]


def data(B, M, D, dtype, seed=0, dup=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype)
    W = torch.randn(M, D, generator=g).to(dtype)
    col = torch.randperm(3 * M, generator=g)[:M]
    row = col[torch.randint(M, (B,), generator=g)]
    if dup:  # duplicated same-label columns (with pos_cos every one of them is masked)
        col[: M // 4] = row[0]
    return x, W, row, col, torch.rand(B, generator=g) * 2 - 1


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,M,D", [(1, 1, 1), (37, 1001, 129), (8, 5000, 16)])
def test_loss_and_gradients_match_reference(margin, with_pos, reduction, B, M, D):
    x, W, row, col, pos = data(B, M, D, torch.float32, dup=with_pos)
    row = row.clone()
    if B > 4:
        row[3] = -1  # ignored row
    pos = pos if with_pos else None
    leaves = [t.clone().requires_grad_() for t in (x, W) + ((pos,) if with_pos else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss, lse, correct = margin_cross_entropy(
        leaves[0], leaves[1], row, col, leaves[2] if with_pos else None, **margin.params(),
        reduction=reduction, return_stats=True, backend="fused")
    rloss, rlse, rcorrect = margin_cross_entropy_ref(
        ref_leaves[0], ref_leaves[1], row, col, ref_leaves[2] if with_pos else None,
        **margin.params(), reduction=reduction)
    torch.testing.assert_close(loss, rloss, atol=1e-4, rtol=1e-5)
    keep = row != -1
    torch.testing.assert_close(lse[keep], rlse[keep], atol=1e-4, rtol=1e-5)
    assert torch.equal(correct, rcorrect)
    g = torch.randn_like(loss)
    torch.autograd.backward(loss, g)
    torch.autograd.backward(rloss, g)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("margin", [CosFace(8, 0.3), ArcFace(8, 0.5)], ids=repr)
def test_gradcheck_float64(with_pos, margin):
    x, W, row, col, pos = data(5, 13, 4, torch.float64, dup=with_pos)
    inputs = [x.requires_grad_(), W.requires_grad_()] + ([pos.double().clamp(-0.9, 0.9).requires_grad_()] if with_pos else [])

    def f(x, W, *p):
        return margin_cross_entropy(x, W, row, col, p[0] if p else None, **margin.params(),
                                    reduction="none", backend="fused")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_at_most_twice_plain_pytorch(dtype):
    margin = CosFace(64, 0.4)
    x, W, row, col, _ = data(37, 1001, 129, dtype)
    exact = margin_cross_entropy_ref(x.float(), W.float(), row, col, **margin.params(), reduction="none")[0]
    fused = margin_cross_entropy(x, W, row, col, **margin.params(), reduction="none", backend="fused")
    # a plain PyTorch run in the low-precision dtype: normalise, matmul and margin in that dtype
    cos = F.normalize(x, dim=1) @ F.normalize(W, dim=1).T
    target = (row[:, None] == col[None, :])
    logits = margin.scale * torch.where(target, cos - torch.tensor(0.4, dtype=dtype), cos)
    plain = F.cross_entropy(logits.float(), target.float().argmax(1), reduction="none")
    err_fused = (fused - exact).abs().max()
    err_plain = (plain - exact).abs().max()
    assert err_fused <= 2 * err_plain + 1e-5, (err_fused, err_plain)


def test_rows_without_target():
    x, W, row, col, _ = data(6, 20, 5, torch.float32)
    row = row.clone()
    row[2] = 10**12
    with pytest.raises(ValueError, match="no target"):
        margin_cross_entropy(x, W, row, col, scale=10.0, backend="fused")
    loss = margin_cross_entropy(x, W, row, col, scale=10.0, backend="fused", check_targets=False, reduction="none")
    assert torch.isinf(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(W=torch.randn(20, 6)), ValueError, "W.size\\(1\\)"),
        (dict(row=torch.zeros(6, dtype=torch.int32)), TypeError, "row_labels must be int64"),
        (dict(col=torch.zeros(19, dtype=torch.long)), ValueError, "col_labels.size"),
        (dict(pos=torch.zeros(5)), ValueError, "pos_cos.size"),
        (dict(x=torch.ones(6, 5, dtype=torch.long)), TypeError, "x must be float"),
    ],
)
def test_bad_input(change, error, match):
    x, W, row, col, _ = data(6, 20, 5, torch.float32)
    args = dict(x=x, W=W, row=row, col=col, pos=None) | change
    with pytest.raises(error, match=match):
        margin_cross_entropy(args["x"], args["W"], args["row"], args["col"], args["pos"], scale=10.0,
                             backend="fused")


def test_opcheck():
    x, W, row, col, pos = data(7, 30, 5, torch.float32)
    args = (x.requires_grad_(), W.requires_grad_(), row, col, pos, 16.0, 1.0, 0.3, 0.0, True, True)
    torch.library.opcheck(torch.ops.protomem.margin_ce_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_cpp():
    """The C++ op under torch.compile (on a GPU the Triton op is compile-tested instead)."""
    x, W, row, col, _ = data(9, 50, 8, torch.float32)

    def f(x, W):
        return margin_cross_entropy(x, W, row, col, scale=16.0, m2=0.3, check_targets=False, backend="fused")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, W1 = x.clone().requires_grad_(), W.clone().requires_grad_()
    x2, W2 = x.clone().requires_grad_(), W.clone().requires_grad_()
    compiled(x1, W1).backward()
    f(x2, W2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(W1.grad, W2.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_torch_compile_fullgraph_triton_op_on_gpu():
    """The Triton-backed CUDA op under torch.compile (inductor), against eager (the interpreter
    cannot compile: fake tensors have no data pointer)."""
    x, W, row, col, _ = data(33, 700, 64, torch.float32)
    x, W, row, col = (t.cuda() for t in (x, W, row, col))

    def f(x, W):
        return margin_cross_entropy(x, W, row, col, scale=16.0, m2=0.3, check_targets=False, backend="fused")

    compiled = torch.compile(f, fullgraph=True)
    x1, W1 = x.clone().requires_grad_(), W.clone().requires_grad_()
    x2, W2 = x.clone().requires_grad_(), W.clone().requires_grad_()
    compiled(x1, W1).backward()
    f(x2, W2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(W1.grad, W2.grad, atol=1e-5, rtol=1e-4)
