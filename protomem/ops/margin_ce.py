"""margin_ce_fwd / margin_ce_bwd: the fused margin softmax cross-entropy's per-row statistics and
their gradients (fake kernels and autograd registration)."""
import torch


def margin_ce_fwd(x, W, row_labels, col_labels, pos_cos, scale, m1, m2, m3, normalize_x,
                  normalize_w):
    """Per-row statistics of the margin softmax over the columns of W, without the B x M logits.

    Args:
        x: [B, D] float; W: [M, D] float; row_labels: [B] int64; col_labels: [M] int64 (negative =
            empty column, never counted); pos_cos: optional [B] target cosines (then same-label
            columns are masked out); scale, m1, m2, m3: the margin; normalize_x / normalize_w:
            L2-normalise rows first.

    Returns:
        lse [B] (log-sum-exp of all logits, margin applied), target [B] (log-sum-exp of the
        target logits; -inf for a row without one), best_target [B] (the highest target cosine,
        or pos_cos) and best_other [B] (the highest cosine of a live non-target column; -inf if
        none): top-1 without margin is ``best_target >= best_other``, and shards of W combine by
        taking the max of each. float32 (float64 for float64 inputs). lse and target are
        differentiable in x, W and pos_cos.
    """
    return torch.ops.protomem.margin_ce_fwd(x, W, row_labels, col_labels, pos_cos, float(scale),
                                            float(m1), float(m2), float(m3), bool(normalize_x),
                                            bool(normalize_w))


def _stat_dtype(x, W):
    return torch.float64 if torch.float64 in (x.dtype, W.dtype) else torch.float32


@torch.library.register_fake("protomem::margin_ce_fwd")
def _fake_fwd(x, W, row_labels, col_labels, pos_cos, scale, m1, m2, m3, normalize_x, normalize_w):
    B = x.shape[0]
    dt = _stat_dtype(x, W)
    return tuple(x.new_empty(B, dtype=dt) for _ in range(4))


@torch.library.register_fake("protomem::margin_ce_bwd")
def _fake_bwd(grad_lse, grad_target, x, W, row_labels, col_labels, pos_cos, lse, target, scale,
              m1, m2, m3, normalize_x, normalize_w, need_grad_w):
    gw = torch.empty_like(W) if need_grad_w else None
    gp = torch.empty_like(pos_cos) if pos_cos is not None else None
    return torch.empty_like(x), gw, gp


def _setup_context(ctx, inputs, output):
    x, W, row_labels, col_labels, pos_cos, *params = inputs
    lse, target, best_target, best_other = output
    ctx.params = params
    ctx.has_pos = pos_cos is not None
    ctx.save_for_backward(x, W, row_labels, col_labels, pos_cos, lse, target)
    ctx.mark_non_differentiable(best_target, best_other)


def _backward(ctx, grad_lse, grad_target, _grad_best_target, _grad_best_other):
    x, W, row_labels, col_labels, pos_cos, lse, target = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_target = torch.zeros_like(target) if grad_target is None else grad_target
    gx, gw, gp = torch.ops.protomem.margin_ce_bwd(
        grad_lse, grad_target, x, W, row_labels, col_labels, pos_cos, lse, target, *ctx.params,
        ctx.needs_input_grad[1])
    return gx, gw, None, None, gp if ctx.has_pos else None, None, None, None, None, None, None


torch.library.register_autograd("protomem::margin_ce_fwd", _backward, setup_context=_setup_context)


# CUDA: the Triton kernels implement the same two ops (imported lazily, so `import protomem` never
# imports triton and tests can choose TRITON_INTERPRET first).
@torch.library.impl("protomem::margin_ce_fwd", "CUDA")
def _fwd_cuda(x, W, row_labels, col_labels, pos_cos, scale, m1, m2, m3, normalize_x, normalize_w):
    from ..triton.margin_ce import margin_ce_fwd_triton

    stats = margin_ce_fwd_triton(x, W, row_labels, col_labels, pos_cos, scale, m1, m2, m3,
                                 normalize_x, normalize_w)
    dt = _stat_dtype(x, W)
    return tuple(t.to(dt) for t in stats)


@torch.library.impl("protomem::margin_ce_bwd", "CUDA")
def _bwd_cuda(grad_lse, grad_target, x, W, row_labels, col_labels, pos_cos, lse, target, scale,
              m1, m2, m3, normalize_x, normalize_w, need_grad_w):
    from ..triton.margin_ce import margin_ce_bwd_triton

    return margin_ce_bwd_triton(grad_lse, grad_target, x, W, row_labels, col_labels, pos_cos, lse,
                                target, scale, m1, m2, m3, normalize_x, normalize_w, need_grad_w)
