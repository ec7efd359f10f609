"""The fused margin cross-entropy on CPU (the C++ cos_lse kernels + per-row targets in
protomem.functional) against protomem.reference, in both regimes (random embeddings, and
embeddings near their target so the target dominates), forward and every gradient."""
import pytest
import torch
from conftest import HAS_CUDA
from margin_ce_cases import MARGINS, REGIMES, exact, make, max_err, plain, rel_err

from protomem.functional import margin_ce_stats, margin_cross_entropy
from protomem.reference import margin_ce_stats_ref, margin_cross_entropy_ref


def run(case, margin, with_pos, dtype=None, use_index=False, reduction="none", **kw):
    """Fused loss and gradients (x, W[, pos]) of the loss's sum on the case's inputs."""
    leaves = [case["x"], case["W"]] + ([case["pos"]] if with_pos else [])
    leaves = [t.to(dtype or t.dtype).detach().requires_grad_() for t in leaves]
    loss = margin_cross_entropy(leaves[0], leaves[1], case["row"], case["col"],
                                leaves[2] if with_pos else None, **margin.params(),
                                reduction=reduction, backend="fused",
                                target_index=case["target_index"] if use_index else None, **kw)
    return loss.detach(), torch.autograd.grad(loss.sum(), leaves)


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("B,M,D", [(1, 1, 1), (37, 1001, 129), (8, 5000, 16)])
def test_float64_matches_reference(margin, with_pos, regime, B, M, D):
    case = make(B, M, D, torch.float64, regime, ignored=True, empty=M > 1)
    loss, grads = run(case, margin, with_pos)
    want, want_grads = exact(case, margin, with_pos)
    assert max_err(loss, want) <= 1e-9
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) <= 1e-9


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("use_index", [False, True])
def test_float32_matches_reference(margin, regime, use_index):
    """float32 against float64 within twice the error of idiomatic float32 PyTorch (in the
    dominated regime the gradients are a rounding-limited 1 - p_target)."""
    case = make(37, 1001, 129, torch.float32, regime, ignored=True)
    keep = case["row"] >= 0
    loss, grads = run(case, margin, False, use_index=use_index)
    want, want_grads = exact(case, margin, False)
    p_loss, p_grads = plain(case, margin, False, torch.float32)
    assert max_err(loss, want, keep) <= max(2 * max_err(p_loss, want, keep), 1e-6)
    for g, pg, w in zip(grads, p_grads, want_grads):
        assert rel_err(g, w) <= 2 * rel_err(pg, w)


@pytest.mark.parametrize("with_pos", [False, True])
def test_duplicated_labels(with_pos):
    """Several same-label columns: all targets without pos_cos, all masked with it."""
    case = make(13, 301, 24, torch.float64, "dominated", dup=True)
    loss, grads = run(case, MARGINS[1], with_pos)
    want, want_grads = exact(case, MARGINS[1], with_pos)
    assert max_err(loss, want) <= 1e-9
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) <= 1e-9


@pytest.mark.parametrize("normalize_x,normalize_w", [(False, True), (True, False), (False, False)])
def test_without_normalisation(normalize_x, normalize_w):
    case = make(9, 200, 12, torch.float64, "random")
    case["x"] = case["x"] * 0.1
    case["W"] = case["W"] * 0.1
    flags = dict(normalize_x=normalize_x, normalize_w=normalize_w)
    leaves = [case["x"].clone().requires_grad_(), case["W"].clone().requires_grad_()]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = margin_cross_entropy(*leaves, case["row"], case["col"], scale=8.0, m3=0.2, **flags)
    ref = margin_cross_entropy_ref(*ref_leaves, case["row"], case["col"], scale=8.0, m3=0.2, **flags)[0]
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-10)
    loss.backward()
    ref.backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_stats(reduction):
    case = make(21, 300, 16, torch.float32, "dominated", ignored=True)
    margin = MARGINS[0]
    loss, lse, correct = margin_cross_entropy(case["x"], case["W"], case["row"], case["col"],
                                              **margin.params(), reduction=reduction,
                                              return_stats=True)
    rloss, rlse, rcorrect = margin_cross_entropy_ref(case["x"], case["W"], case["row"], case["col"],
                                                     **margin.params(), reduction=reduction)
    torch.testing.assert_close(loss, rloss, atol=1e-4, rtol=1e-5)
    keep = case["row"] >= 0
    torch.testing.assert_close(lse[keep], rlse[keep], atol=1e-4, rtol=1e-5)
    assert torch.equal(correct, rcorrect)
    assert correct.sum() > 10  # the dominated regime: most rows are right


@pytest.mark.parametrize("with_pos", [False, True])
def test_stats_match_reference(with_pos):
    case = make(17, 400, 20, torch.float64, "dominated", dup=with_pos)
    pos = case["pos"] if with_pos else None
    got = margin_ce_stats(case["x"], case["W"], case["row"], case["col"], pos, **MARGINS[1].params())
    want = margin_ce_stats_ref(case["x"], case["W"], case["row"], case["col"], pos, **MARGINS[1].params())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("margin", [MARGINS[0], MARGINS[1]], ids=repr)
def test_gradcheck_float64(with_pos, margin):
    case = make(5, 13, 4, torch.float64, "random")
    inputs = [case["x"].requires_grad_(), case["W"].requires_grad_()]
    if with_pos:
        inputs.append(case["pos"].clamp(-0.9, 0.9).requires_grad_())
    margin = type(margin)(8.0, 0.3)

    def f(x, W, *p):
        return margin_cross_entropy(x, W, case["row"], case["col"], p[0] if p else None,
                                    **margin.params(), reduction="none")

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("margin", [MARGINS[0], MARGINS[1]], ids=repr)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("with_pos", [False, True])
def test_low_precision_error_at_most_twice_plain_pytorch(dtype, margin, regime, with_pos):
    """flash-attention's rule, forward and backward: against float64, the fused error is at most
    twice that of idiomatic PyTorch run in the same dtype (which must itself be > 0)."""
    case = make(37, 1001, 129, dtype, regime)
    want, want_grads = exact(case, margin, with_pos)
    loss, grads = run(case, margin, with_pos)
    p_loss, p_grads = plain(case, margin, with_pos, dtype)
    e_plain = max_err(p_loss, want)
    assert e_plain > 0
    assert max_err(loss, want) <= 2 * e_plain
    for g, pg, w in zip(grads, p_grads, want_grads):
        assert rel_err(pg, w) > 0
        assert rel_err(g, w) <= 2 * rel_err(pg, w)


def test_rows_without_target():
    case = make(6, 20, 5, torch.float32)
    row = case["row"].clone()
    row[2] = 10**12
    with pytest.raises(ValueError, match="no target"):
        margin_cross_entropy(case["x"], case["W"], row, case["col"], scale=10.0)
    x = case["x"].clone().requires_grad_()
    loss = margin_cross_entropy(x, case["W"], row, case["col"], scale=10.0, check_targets=False,
                                reduction="none")
    assert torch.isinf(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    loss[[0, 1, 3, 4, 5]].sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rows_with_no_other_column_have_zero_gradient():
    """A row whose every live column is its target: the others' log-sum-exp is -inf; its loss is
    finite and no gradient is NaN (the old Triton backward gave NaN there)."""
    W = torch.randn(4, 8, dtype=torch.float64)
    col = torch.tensor([3, 3, -1, -1])
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    Wg = W.clone().requires_grad_()
    loss = margin_cross_entropy(x, Wg, torch.tensor([3, 3]), col, scale=16.0, m3=0.3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(Wg.grad).all()
    ref = margin_cross_entropy_ref(x.detach(), W, torch.tensor([3, 3]), col, scale=16.0, m3=0.3)[0]
    torch.testing.assert_close(loss.detach(), ref)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(W=torch.randn(20, 6)), ValueError, "W"),
        (dict(row=torch.zeros(6, dtype=torch.int32)), TypeError, "row_labels"),
        (dict(col=torch.zeros(19, dtype=torch.long)), ValueError, "col_labels"),
        (dict(x=torch.ones(6, 5, dtype=torch.long)), TypeError, "x must be float"),
        (dict(precision="fast"), ValueError, "precision"),
    ],
)
def test_bad_input(change, error, match):
    case = make(6, 20, 5, torch.float32)
    args = dict(x=case["x"], W=case["W"], row=case["row"], col=case["col"], precision="default") | change
    with pytest.raises(error, match=match):
        margin_cross_entropy(args["x"], args["W"], args["row"], args["col"], scale=10.0,
                             precision=args["precision"])


def test_opcheck():
    case = make(7, 30, 5, torch.float32)
    args = (case["x"].requires_grad_(), case["W"].requires_grad_(), case["row"], case["col"], 16.0,
            True, True, "default")
    torch.library.opcheck(torch.ops.protomem.cos_lse_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_cpp():
    """The C++ op under torch.compile with the per-row target path (on a GPU the Triton op is
    compile-tested instead)."""
    case = make(9, 50, 8, torch.float32)
    row, col, idx = case["row"], case["col"], case["target_index"]

    def f(x, W):
        return margin_cross_entropy(x, W, row, col, scale=16.0, m2=0.3, check_targets=False,
                                    target_index=idx)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, W1 = case["x"].clone().requires_grad_(), case["W"].clone().requires_grad_()
    x2, W2 = case["x"].clone().requires_grad_(), case["W"].clone().requires_grad_()
    compiled(x1, W1).backward()
    f(x2, W2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(W1.grad, W2.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_torch_compile_fullgraph_triton_op_on_gpu():
    """The Triton-backed CUDA op under torch.compile (inductor), against eager (the interpreter
    cannot compile: fake tensors have no data pointer)."""
    case = make(33, 700, 64, torch.float32)
    row, col, idx = (case[k].cuda() for k in ("row", "col", "target_index"))

    def f(x, W):
        return margin_cross_entropy(x, W, row, col, scale=16.0, m2=0.3, check_targets=False,
                                    target_index=idx)

    compiled = torch.compile(f, fullgraph=True)
    x1, W1 = case["x"].cuda().requires_grad_(), case["W"].cuda().requires_grad_()
    x2, W2 = case["x"].cuda().requires_grad_(), case["W"].cuda().requires_grad_()
    compiled(x1, W1).backward()
    f(x2, W2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(W1.grad, W2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_pos", [False, True])
def test_best_other_index_matches_reference(with_pos):
    """The closest other column of each row (hard-example mining), ties to the smaller column."""
    case = make(23, 777, 16, torch.float64, "dominated", dup=True)
    W = case["W"].clone()
    W[5], W[9] = W[2], W[2]  # ties between three columns
    pos = case["pos"] if with_pos else None
    got = margin_ce_stats(case["x"], W, case["row"], case["col"], pos, **MARGINS[0].params(),
                          with_index=True)
    want = margin_ce_stats_ref(case["x"], W, case["row"], case["col"], pos, **MARGINS[0].params(),
                               with_index=True)
    assert torch.equal(got[4], want[4])
    assert (got[4] >= 0).all()
    cos = torch.nn.functional.normalize(case["x"], dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    torch.testing.assert_close(cos[torch.arange(23), got[4]], got[3])


@pytest.mark.parametrize("head", ["pm", "dcq", "pfc", "full"])
def test_every_head_takes_the_precision_option(head):
    import protomem
    from protomem.training.builders import build_head
    from protomem.training.config import OPTIONS

    cfg = {k: v[0] for k, v in OPTIONS.items()} | dict(head=head, embedding_size=8, identities_per_batch=4,
                                                       samples_per_identity=2, precision="highest")
    built = build_head(cfg, 100, torch.device("cpu"))
    assert built.precision == "highest" and "precision='highest'" in repr(built)
    with pytest.raises(ValueError, match="precision"):
        protomem.PrototypeMemoryLoss(8, 16, precision="fast")
