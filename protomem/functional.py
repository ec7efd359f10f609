"""Functional losses: the fused margin softmax cross-entropy every head runs on."""
import torch

from .margins import CombinedMargin
from .ops.margin_ce import margin_ce_fwd

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "fused", "reference")


def margin_ce_stats(x, W, row_labels, col_labels, pos_cos=None, *, scale, m1=1.0, m2=0.0, m3=0.0,
                    normalize_x=True, normalize_w=True, backend="auto"):
    """Per-row statistics of the margin softmax of x against the columns of W, without the B x M
    logits: what the heads combine across column groups and ranks.

    Args: as ``margin_cross_entropy`` (x [B, D], W [M, D], row_labels [B] int64, col_labels [M]
    int64, pos_cos [B] optional).

    Returns:
        (lse, target, best_target, best_other), each [B] float32 (float64 for float64 inputs):
        log-sum-exp of all logits and of the target logits (-inf for a row without target), the
        best target cosine (or pos_cos) and the best non-target cosine (-inf if none). The loss of
        a row is ``lse - target``; it is top-1 correct when ``best_target >= best_other``. For
        column shards of one softmax: lse and target combine by logsumexp, the cosines by max.
        lse and target are differentiable in x, W and pos_cos.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    margin = CombinedMargin(scale, m1, m2, m3)  # validates the parameters
    if backend == "reference" or (backend == "auto" and x.device.type != "cpu" and margin.m1 != 1.0):
        from .reference import margin_ce_stats_ref

        return margin_ce_stats_ref(x, W, row_labels, col_labels, pos_cos, **margin.params(),
                                   normalize_x=normalize_x, normalize_w=normalize_w)
    return margin_ce_fwd(x, W, row_labels, col_labels, pos_cos, margin.scale, margin.m1, margin.m2,
                         margin.m3, normalize_x, normalize_w)


def reduce_rows(per_row, ignored, reduction):
    """Reduces per-row losses [B]: "mean" over the rows not ``ignored`` [B] bool, "sum", or "none"."""
    if reduction == "mean":
        return per_row.sum() / (~ignored).sum().clamp_min(1)
    if reduction == "sum":
        return per_row.sum()
    return per_row


def margin_cross_entropy(x, W, row_labels, col_labels, pos_cos=None, *, scale, m1=1.0, m2=0.0,
                         m3=0.0, normalize_x=True, normalize_w=True, reduction="mean",
                         ignore_index=-1, check_targets=True, return_stats=False, backend="auto"):
    """Normalised-logit + margin + softmax cross-entropy that never builds the B x M logits.

    Logits are ``scale * cos(x_i, W_j)`` over the columns whose label is >= 0; the target column
    (label == row label) gets the margin ``cos(m1*theta + m2) - m3`` (insightface's combined
    margin; ``CosFace`` = (1, 0, m), ``ArcFace`` = (1, m, 0)). With ``pos_cos`` given, every
    same-label column is masked out and ``pos_cos`` is the target cosine (DCQ, leave-one-out
    Prototype Memory). Several same-label columns without ``pos_cos`` are all targets
    (loss = LSE(all) - LSE(targets)).

    Args:
        x: [B, D] float32/bfloat16/float16/float64 embeddings.
        W: [M, D] same dtypes: class weights, prototypes or queue entries.
        row_labels: [B] int64. Rows equal to ``ignore_index`` give 0 and leave the mean.
        col_labels: [M] int64; negative = empty column (never counted).
        pos_cos: optional [B] float target cosines (differentiable).
        scale, m1, m2, m3: the margin (see ``protomem.margins``).
        normalize_x, normalize_w: L2-normalise the rows first (False when already unit).
        reduction: "mean" (over non-ignored rows), "sum" or "none" ([B]).
        check_targets: raise ValueError if a non-ignored row has no target (one host sync).
            With False such a row's loss is +inf (its gradient NaN): skip the check only when
            every row is known to have a target.
        return_stats: also return the per-row log-sum-exp [B] and top-1 correctness [B] bool.
        backend: "auto" (the fused op: the C++ kernel on CPU, the Triton kernel on CUDA, which
            supports m1 = 1 only; other margins on CUDA use the reference), "fused" (the
            fused op whatever the margin), or "reference" (materialises the logits).

    Returns:
        loss (float32; float64 for float64 inputs), or (loss, lse, correct) with return_stats.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    lse, target, best_target, best_other = margin_ce_stats(
        x, W, row_labels, col_labels, pos_cos, scale=scale, m1=m1, m2=m2, m3=m3,
        normalize_x=normalize_x, normalize_w=normalize_w, backend=backend)
    ignored = row_labels == ignore_index
    if check_targets and bool((torch.isinf(target) & ~ignored).any()):
        raise ValueError("some rows have no target column (no column carries their label); "
                         "label them ignore_index or pass pos_cos")
    per_row = torch.where(ignored, torch.zeros_like(lse), lse - torch.where(ignored, lse, target))
    loss = reduce_rows(per_row, ignored, reduction)
    return (loss, lse, (best_target >= best_other) & ~ignored) if return_stats else loss
