"""cos_lse_fwd / cos_lse_bwd_w: the kernels of the fused margin cross-entropy (fake kernels,
autograd, and the CUDA implementation through Triton).

The forward's ``direction`` makes the gradient of lse with respect to x O(B D) in PyTorch here:
d lse_i / d x_i = s * r_i * (a_i - <a_i, x_hat_i> x_hat_i) with a_i = direction_i, r_i = 1/|x_i|
(normalize_x), or s * a_i (not). The gradient with respect to W needs a pass over W
(``cos_lse_bwd_w``), run only when W requires grad."""
import torch

PRECISIONS = ("default", "highest")


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_args(x, W, row_labels, col_labels, scale, precision):
    """TypeError / ValueError naming the argument, before any kernel runs (both devices)."""
    for name, t in (("x", x), ("W", W)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"W.size(1) must equal x.size(1) ({x.shape[1]}), got shape {tuple(W.shape)}")
    for name, t, n in (("row_labels", row_labels, x.shape[0]), ("col_labels", col_labels, W.shape[0])):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    for name, t in (("W", W), ("row_labels", row_labels), ("col_labels", col_labels)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def cos_lse_fwd(x, W, row_labels, col_labels, scale, normalize_x=True, normalize_w=True,
                precision="default"):
    """The softmax of ``scale * cos(x_i, W_j)`` over each row's other columns (label >= 0 and !=
    the row's label), as per-row values, without the B x M logits.

    Args:
        x: [B, D] float32/bfloat16/float16/float64; W: [M, D] the same dtypes (may differ from x's);
        row_labels: [B] int64; col_labels: [M] int64 (negative = empty column); scale: s > 0;
        normalize_x / normalize_w: L2-normalise rows first; precision: "default" (tensor cores
        with float32 accumulation on CUDA) or "highest" (float32 operands).

    Returns:
        lse [B] (differentiable in x and W), best [B] (highest other cosine), best_index [B] int64
        (its smallest column; -1 if none), direction [B, D] and w_inv_norm [M] (see
        ``protomem.reference.cos_lse_fwd_ref``). Floats float32 (float64 for float64 inputs).
    """
    check_args(x, W, row_labels, col_labels, scale, precision)
    return torch.ops.protomem.cos_lse_fwd(x, W, row_labels, col_labels, float(scale),
                                          bool(normalize_x), bool(normalize_w), precision)


def _stat_dtype(x, W):
    return torch.float64 if torch.float64 in (x.dtype, W.dtype) else torch.float32


@torch.library.register_fake("protomem::cos_lse_fwd")
def _fake_fwd(x, W, row_labels, col_labels, scale, normalize_x, normalize_w, precision):
    B, D = x.shape
    dt = _stat_dtype(x, W)
    return (x.new_empty(B, dtype=dt), x.new_empty(B, dtype=dt), x.new_empty(B, dtype=torch.int64),
            x.new_empty(B, D, dtype=dt), x.new_empty(W.shape[0], dtype=dt))


@torch.library.register_fake("protomem::cos_lse_bwd_w")
def _fake_bwd_w(grad_lse, x, W, row_labels, col_labels, lse, w_inv_norm, scale, normalize_x,
                normalize_w, precision):
    return torch.empty_like(W)


def _setup_context(ctx, inputs, output):
    x, W, row_labels, col_labels, scale, normalize_x, normalize_w, precision = inputs
    lse, best, best_index, direction, w_inv_norm = output
    ctx.params = (scale, normalize_x, normalize_w, precision)
    ctx.save_for_backward(x, W, row_labels, col_labels, lse, direction, w_inv_norm)
    ctx.mark_non_differentiable(best, best_index, direction, w_inv_norm)


def grad_x_from_direction(grad_lse, x, direction, scale, normalize_x):
    """d(sum_i grad_lse_i * lse_i) / dx [B, D] in x's dtype from the forward's direction [B, D]."""
    dt = direction.dtype
    g = grad_lse.to(dt)[:, None] * scale
    if not normalize_x:
        return (g * direction).to(x.dtype)
    xf = x.to(dt)
    r = 1 / xf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    xh = xf * r
    tangent = direction - (direction * xh).sum(dim=1, keepdim=True) * xh
    return (g * r * tangent).to(x.dtype)


def _backward(ctx, grad_lse, _g_best, _g_index, _g_dir, _g_inv):
    x, W, row_labels, col_labels, lse, direction, w_inv_norm = ctx.saved_tensors
    scale, normalize_x, normalize_w, precision = ctx.params
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    grad_x = grad_x_from_direction(grad_lse, x, direction, scale, normalize_x) \
        if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.protomem.cos_lse_bwd_w(grad_lse, x, W, row_labels, col_labels, lse,
                                                  w_inv_norm, scale, normalize_x, normalize_w,
                                                  precision)
    return grad_x, grad_w, None, None, None, None, None, None


torch.library.register_autograd("protomem::cos_lse_fwd", _backward, setup_context=_setup_context)


# CUDA: Triton kernels (imported lazily, so `import protomem` never imports triton and tests can
# set TRITON_INTERPRET first); float64 has no tensor-core path and runs the reference.
@torch.library.impl("protomem::cos_lse_fwd", "CUDA")
def _fwd_cuda(x, W, row_labels, col_labels, scale, normalize_x, normalize_w, precision):
    check_args(x, W, row_labels, col_labels, scale, precision)
    if torch.float64 in (x.dtype, W.dtype):
        from ..reference import cos_lse_fwd_ref

        return cos_lse_fwd_ref(x, W, row_labels, col_labels, scale, normalize_x, normalize_w)
    from ..triton.cos_lse import cos_lse_fwd_triton

    return cos_lse_fwd_triton(x, W, row_labels, col_labels, scale, normalize_x, normalize_w, precision)


@torch.library.impl("protomem::cos_lse_bwd_w", "CUDA")
def _bwd_w_cuda(grad_lse, x, W, row_labels, col_labels, lse, w_inv_norm, scale, normalize_x,
                normalize_w, precision):
    if torch.float64 in (x.dtype, W.dtype):
        from ..reference import cos_lse_bwd_w_ref

        return cos_lse_bwd_w_ref(grad_lse, x, W, row_labels, col_labels, lse, scale, normalize_x,
                                 normalize_w)
    from ..triton.cos_lse import cos_lse_bwd_w_triton

    return cos_lse_bwd_w_triton(grad_lse, x, W, row_labels, col_labels, lse, w_inv_norm, scale,
                                normalize_x, normalize_w, precision)

