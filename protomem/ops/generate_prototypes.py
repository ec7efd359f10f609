"""generate_prototypes: per-class L2-normalised (weighted) mean of L2-normalised embeddings."""
import torch

_EPS = 1e-12  # F.normalize's eps, as in the kernels


def generate_prototypes(x, labels, weights=None, padded=False):
    """Class prototypes of a batch: ``p_c = normalize(sum_i w_i normalize(x_i) / sum_i w_i)``.

    Args:
        x: [B, D] float32/bfloat16/float16/float64 embeddings (any norm). Differentiable.
        labels: [B] int64 class ids >= 0 (any values; need not be dense).
        weights: optional [B] non-negative float exemplar weights (default 1). A class whose
            weights sum to 0 gets a NaN prototype, which the memory rejects.
        padded: return U = B rows: the classes, then padding class -1 with zero prototypes (the
            memory update skips class -1). Nothing then waits for the data (no host sync on
            CUDA, shapes fixed for torch.compile), and labels and weights are not checked.

    Returns:
        classes: [U] int64, the sorted unique labels (then -1 padding when ``padded``).
        protos: [U, D] float32 (float64 for float64 x), unit rows (zero rows for padding).
        inverse: [B] int64, ``classes[inverse] == labels``.

    Raises:
        ValueError: negative labels or weights (unless ``padded``), or mismatched shapes/devices.
        TypeError: labels not int64, or x not floating point.

    On CUDA this costs one host sync unless ``padded``: U depends on the data.
    """
    return torch.ops.protomem.generate_prototypes(x, labels, weights, padded)


@torch.library.register_fake("protomem::generate_prototypes")
def _fake(x, labels, weights=None, padded=False):
    u = labels.shape[0] if padded else torch.library.get_ctx().new_dynamic_size()
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        labels.new_empty(u),
        x.new_empty(u, x.shape[1], dtype=dtype),
        labels.new_empty(labels.shape),
    )


def _setup_context(ctx, inputs, output):
    x, _, weights, _ = inputs
    _, protos, inverse = output
    ctx.save_for_backward(x, weights, inverse, protos)


def _backward(ctx, _grad_classes, grad_protos, _grad_inverse):
    x, weights, inverse, protos = ctx.saved_tensors
    if grad_protos is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    dt, num_classes = protos.dtype, protos.shape[0]
    xf = x.to(dt)
    xnorm = xf.norm(dim=1, keepdim=True)
    n = xf / xnorm.clamp_min(_EPS)
    w = torch.ones(x.shape[0], dtype=dt, device=x.device) if weights is None else weights.to(dt)
    wsum = torch.zeros(num_classes, dtype=dt, device=x.device).index_add_(0, inverse, w)
    s = torch.zeros_like(protos).index_add_(0, inverse, w[:, None] * n) / wsum[:, None]
    snorm = s.norm(dim=1, keepdim=True)
    g = grad_protos.to(dt)
    # d normalize(v) = (g - y <y, g>) / |v|, or g / eps where |v| <= eps (F.normalize's clamp)
    gs = torch.where(snorm > _EPS, (g - protos * (protos * g).sum(1, keepdim=True)) / snorm, g / _EPS)
    gn = (w / wsum[inverse])[:, None] * gs[inverse]
    gx = torch.where(xnorm > _EPS, (gn - n * (n * gn).sum(1, keepdim=True)) / xnorm, gn / _EPS)
    return gx.to(x.dtype), None, None, None


torch.library.register_autograd(
    "protomem::generate_prototypes", _backward, setup_context=_setup_context
)
