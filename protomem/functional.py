"""Functional losses: the fused margin softmax cross-entropy every head runs on.

The work is split by where it belongs (the "V3" algorithm, benchmarks/NOTES.md): the kernel
``cos_lse_fwd`` reduces each row's softmax over its *other* columns (one read of W, two
tensor-core dots per tile, no B x M logits) to per-row values; the targets are handled here per
row, on B values: their cosines by a gather-dot, the margin, and the combination
``lse = logaddexp(lse_others, target)``. Autograd runs through both, so grad x costs O(B D) after
the forward and grad W one more pass over W, only when W requires grad."""
import torch
import torch.nn.functional as F

from .margins import CombinedMargin
from .ops.cos_lse import PRECISIONS, cos_lse_fwd

_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "fused", "reference")
_NEG_INF = float("-inf")


def _safe_logsumexp(z, dim):
    """logsumexp over ``dim`` that is -inf with a zero (not NaN) gradient where all of z is -inf."""
    empty = (z == _NEG_INF).all(dim=dim, keepdim=True)
    out = torch.logsumexp(torch.where(empty, 0.0, z), dim=dim, keepdim=True)
    return torch.where(empty, _NEG_INF, out).squeeze(dim)


def target_columns(row_labels, col_labels):
    """The columns carrying each row's label: (cols [B, K] int64, valid [B, K] bool) with K the
    largest count over the rows (one host sync for K). Rows labelled < 0 have none."""
    M = col_labels.shape[0]
    if M == 0 or row_labels.shape[0] == 0:
        empty = row_labels.new_zeros(row_labels.shape[0], 0)
        return empty, empty.bool()
    sorted_labels, order = torch.sort(col_labels)
    lo = torch.searchsorted(sorted_labels, row_labels)
    hi = torch.searchsorted(sorted_labels, row_labels, right=True)
    count = torch.where(row_labels >= 0, hi - lo, 0)
    K = int(count.max())
    k = torch.arange(K, device=row_labels.device)
    valid = k[None, :] < count[:, None]
    cols = order[(lo[:, None] + k[None, :]).clamp_max(M - 1)]
    return torch.where(valid, cols, -1), valid


def _target_cosines(x, W, cols, valid, normalize_x, normalize_w, dt):
    """cos(x_i, W[cols_ik]) [B, K] in dt, differentiable in x and W (a gather of B*K rows)."""
    wt = W[cols.clamp_min(0)].to(dt)  # [B, K, D]
    xt = x.to(dt)
    if normalize_x:
        xt = F.normalize(xt, dim=1, eps=1e-12)
    if normalize_w:
        wt = F.normalize(wt, dim=2, eps=1e-12)
    return torch.where(valid, torch.einsum("bd,bkd->bk", xt, wt), 0.0)


def margin_ce_stats(x, W, row_labels, col_labels, pos_cos=None, *, scale, m1=1.0, m2=0.0, m3=0.0,
                    normalize_x=True, normalize_w=True, target_index=None, precision="default",
                    with_index=False, backend="auto"):
    """Per-row statistics of the margin softmax of x against the columns of W, without the B x M
    logits: what the heads combine across column groups and ranks.

    Args: as ``margin_cross_entropy`` (x [B, D], W [M, D], row_labels [B] int64, col_labels [M]
    int64, pos_cos [B] optional, target_index [B] optional, precision).

    Returns:
        (lse, target, best_target, best_other), each [B] float32 (float64 for float64 inputs):
        log-sum-exp of all logits and of the target logits (-inf for a row without target), the
        best target cosine (or pos_cos) and the best non-target cosine (-inf if none). The loss of
        a row is ``lse - target``; it is top-1 correct when ``best_target >= best_other``. For
        column shards of one softmax: lse and target combine by logsumexp, the cosines by max.
        lse and target are differentiable in x, W and pos_cos. With ``with_index`` a fifth
        value, best_other_index [B] int64: the smallest column reaching best_other (-1 if none),
        which names each row's closest other class (hard-example mining).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    margin = CombinedMargin(scale, m1, m2, m3)  # validates the parameters
    if backend == "reference":
        from .reference import margin_ce_stats_ref

        return margin_ce_stats_ref(x, W, row_labels, col_labels, pos_cos, **margin.params(),
                                   normalize_x=normalize_x, normalize_w=normalize_w,
                                   with_index=with_index)
    lse_o, best_o, best_idx, _, _ = cos_lse_fwd(x, W, row_labels, col_labels, margin.scale, normalize_x,
                                         normalize_w, precision)
    dt = lse_o.dtype
    if pos_cos is not None:
        if pos_cos.shape != row_labels.shape:
            raise ValueError(f"pos_cos.size must be [B] = {tuple(row_labels.shape)}, got "
                             f"{tuple(pos_cos.shape)}")
        cos_t = pos_cos.to(dt)[:, None]
        valid = torch.ones_like(cos_t, dtype=torch.bool)
    else:
        if target_index is None:
            cols, valid = target_columns(row_labels, col_labels)
        else:
            if target_index.shape != row_labels.shape or target_index.dtype != torch.int64:
                raise ValueError(f"target_index must be int64 [B] like row_labels, got "
                                 f"{target_index.dtype} {tuple(target_index.shape)}")
            cols = target_index[:, None]
            valid = (cols >= 0) & (row_labels[:, None] >= 0)
        cos_t = _target_cosines(x, W, cols, valid, normalize_x, normalize_w, dt)
    z = torch.where(valid, margin.scale * margin.target_cos(cos_t), _NEG_INF)
    target = _safe_logsumexp(z, dim=1)
    lse = _safe_logsumexp(torch.stack([lse_o, target], dim=1), dim=1)
    best_target = torch.where(valid, cos_t, _NEG_INF).amax(dim=1) if valid.shape[1] else \
        torch.full_like(lse_o, _NEG_INF)
    if with_index:
        return lse, target, best_target.detach(), best_o, best_idx
    return lse, target, best_target.detach(), best_o


def reduce_rows(per_row, ignored, reduction):
    """Reduces per-row losses [B]: "mean" over the rows not ``ignored`` [B] bool, "sum", or "none"."""
    if reduction == "mean":
        return per_row.sum() / (~ignored).sum().clamp_min(1)
    if reduction == "sum":
        return per_row.sum()
    return per_row


def margin_cross_entropy(x, W, row_labels, col_labels, pos_cos=None, *, scale, m1=1.0, m2=0.0,
                         m3=0.0, normalize_x=True, normalize_w=True, reduction="mean",
                         ignore_index=-1, check_targets=True, return_stats=False,
                         target_index=None, precision="default", backend="auto"):
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
        scale, m1, m2, m3: the margin (see ``protomem.margins``); any m1 on every device.
        normalize_x, normalize_w: L2-normalise the rows first (False when already unit).
        reduction: "mean" (over non-ignored rows), "sum" or "none" ([B]).
        ignore_index: the row label of rows to leave out.
        check_targets: raise ValueError if a non-ignored row has no target (one host sync).
            With False such a row's loss is +inf: skip the check only when every row is known
            to have a target.
        return_stats: also return the per-row log-sum-exp [B] and top-1 correctness [B] bool.
        target_index: optional [B] int64, the column of each row's target (-1: none), for
            callers that know it (one column per label, e.g. memory slots or class ids): saves
            finding the targets by sorting col_labels (a sort of M and a host sync). Other
            same-label columns are then masked out, not counted as targets.
        precision: "default" (CUDA: tensor-core dots, bfloat16 operands with float32
            accumulation even for float32 inputs; float16 when x and W are float16) or
            "highest" (float32 operands, ~10-50x slower on CUDA). The CPU kernel computes in
            float32 (float64 for float64 inputs) either way.
        backend: "auto"/"fused" (the fused kernels: C++ on CPU, Triton on CUDA) or "reference"
            (materialises the logits).

    Returns:
        loss (float32; float64 for float64 inputs), or (loss, lse, correct) with return_stats.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    lse, target, best_target, best_other = margin_ce_stats(
        x, W, row_labels, col_labels, pos_cos, scale=scale, m1=m1, m2=m2, m3=m3,
        normalize_x=normalize_x, normalize_w=normalize_w, target_index=target_index,
        precision=precision, backend=backend)
    ignored = row_labels == ignore_index
    if check_targets and bool((torch.isinf(target) & ~ignored).any()):
        raise ValueError("some rows have no target column (no column carries their label); "
                         "label them ignore_index or pass pos_cos")
    per_row = torch.where(ignored, torch.zeros_like(lse), lse - torch.where(ignored, lse, target))
    loss = reduce_rows(per_row, ignored, reduction)
    return (loss, lse, (best_target >= best_other) & ~ignored) if return_stats else loss
