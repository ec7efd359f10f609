"""Plain-PyTorch ground truth for every protomem op. Tests and benchmarks compare the kernels to
these. They favour clarity over speed and may synchronise with the host; the memory reference
finds classes by searching ``slot_labels`` and never uses the hash index."""
import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-12

# counters layout of a PrototypeMemory (csrc/memory_layout.h)
HEAD, STEP, HITS, MISSES, EVICTIONS, REJECTED, TOMBSTONES, REBUILDS, LOST_INSERTS = range(9)
NUM_COUNTERS = 9
# counters layout of a ClassQueue
Q_HEAD, Q_TOTAL, Q_REJECTED = range(3)


def generate_prototypes_ref(x, labels, weights=None):
    """Reference of ``generate_prototypes``: x [B, D], labels [B] int64, weights [B]? ->
    (classes [U] sorted unique, protos [U, D] float32 (float64 for float64 x), inverse [B]).
    Differentiable in x through autograd."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    n = F.normalize(x.to(dt), dim=1, eps=_EPS)
    w = torch.ones(x.shape[0], dtype=dt, device=x.device) if weights is None else weights.to(dt)
    wsum = torch.zeros(len(classes), dtype=dt, device=x.device).index_add(0, inverse, w)
    s = torch.zeros(len(classes), x.shape[1], dtype=dt, device=x.device)
    s = s.index_add(0, inverse, w[:, None] * n) / wsum[:, None]
    return classes, F.normalize(s, dim=1, eps=_EPS), inverse


def lookup_ref(slot_labels, labels):
    """Reference of ``lookup`` from the slot labels alone: labels (any shape) int64 -> slot of each
    label, -1 where absent or negative."""
    filled = torch.nonzero(slot_labels >= 0).squeeze(1)
    sorted_labels, order = slot_labels[filled].sort()
    flat = labels.reshape(-1)
    if len(sorted_labels) == 0:
        return torch.full_like(labels, -1)
    i = torch.searchsorted(sorted_labels, flat).clamp_max(len(sorted_labels) - 1)
    found = (sorted_labels[i] == flat) & (flat >= 0)
    return torch.where(found, filled[order[i]], -1).reshape(labels.shape)


def memory_update_ref(protos, slot_labels, stamps, counters, classes, new_protos, momentum=0.0,
                      policy="lru"):
    """Reference of ``memory_update_`` (same arguments less the index); updates protos [M, D],
    slot_labels [M], stamps [M] and counters (head, step, hits, misses, evictions, rejected) in
    place and returns the [U] int64 slot of each class. Class -1 is padding: skipped, not
    counted; a head outside [0, M) is taken modulo M."""
    M = protos.shape[0]
    U = classes.shape[0]
    head, step = int(counters[HEAD]) % M, int(counters[STEP])
    p = new_protos.float()
    old = lookup_ref(slot_labels, classes)
    valid = (classes >= 0) & torch.isfinite(p).all(dim=1)
    hit = valid & (old >= 0)
    a = torch.where(hit, momentum, 0.0)[:, None]
    prev = protos[old.clamp_min(0)].float()
    fresh = F.normalize(a * prev + (1 - a) * p, dim=1, eps=_EPS)

    slot = torch.full((U,), -1, dtype=torch.long, device=classes.device)
    held = torch.zeros(U, dtype=torch.bool, device=classes.device)
    if policy == "lru":
        placed = valid
        slot_labels[old[hit]] = -1
    else:
        placed = valid & ~hit
        slot[hit] = old[hit]
        r = (old[hit] - head) % M
        held[r[r < U]] = True
    n_placed = int(placed.sum())
    window = torch.nonzero(~held).squeeze(1)[:n_placed]
    new_slots = (head + window) % M
    slot[placed] = new_slots
    evictions = int((slot_labels[new_slots] >= 0).sum())

    protos[slot[valid]] = fresh[valid].to(protos.dtype)
    slot_labels[slot[valid]] = classes[valid]
    stamps[slot[valid]] = step
    if n_placed:
        counters[HEAD] = (head + int(window[-1]) + 1) % M
    counters[STEP] = step + 1
    counters[HITS] += int(hit.sum())
    counters[MISSES] += int((valid & ~hit).sum())
    counters[EVICTIONS] += evictions
    counters[REJECTED] += int((~valid & (classes != -1)).sum())
    kept = (old >= 0) & (slot_labels[old.clamp_min(0)] == classes)
    return torch.where(valid, slot, torch.where(kept, old, -1))


def queue_enqueue_ref(queue, queue_labels, counters, keys, labels):
    """Reference of ``queue_enqueue_``: queue [K, D], queue_labels [K], counters [3] updated in
    place with keys [N, D], labels [N]."""
    K = queue.shape[0]
    N = keys.shape[0]
    head = int(counters[Q_HEAD]) % K  # a head outside [0, K) wraps, as in the op
    ok = (labels >= 0) & torch.isfinite(keys.float()).all(dim=1)
    first = max(0, N - K)
    pos = (head + torch.arange(first, N, device=queue.device)) % K
    keep = ok[first:]
    queue_labels[pos] = torch.where(keep, labels[first:], -1)
    queue[pos[keep]] = keys[first:][keep].float().to(queue.dtype)
    counters[Q_HEAD] = (head + N) % K
    counters[Q_TOTAL] += N
    counters[Q_REJECTED] += int((~ok).sum())


def lookalike_update_ref(others, scores, rows, other_classes, cos, decay, symmetric):
    """Reference of ``lookalike_update_`` (the rule of ``protomem.mining.DoppelgangerLists``),
    written pair by pair: others [C, k] int32 and scores [C, k] float16 updated in place from
    rows / other_classes [n] int64 and cos [n] float32.

    1. A pair (a, b, cos) counts when 0 <= a, b < C, a != b and cos is finite; with
       ``symmetric`` every counted pair is followed (after all of them) by (b, a, cos).
    2. Its evidence is ``min(max((1 + cos) / 2, 0), 1)`` in float32.
    3. For each class a with pairs: its listed look-alikes keep ``float32(score) * decay``; each
       look-alike b of its pairs gets the float32 sum of their evidence, added in the order of the
       pairs from 0, plus its kept score if already listed; the k best by score, then the smaller
       id, stay (score rounded to float16), the rest of the row is -1 / 0.
    """
    f32 = np.float32
    C, K = others.shape
    pairs = [(a, b, f32(c)) for a, b, c in zip(rows.tolist(), other_classes.tolist(), cos.tolist())
             if 0 <= a < C and 0 <= b < C and a != b and np.isfinite(c)]
    if symmetric:
        pairs += [(b, a, c) for a, b, c in pairs]
    new = {}
    for a, b, c in pairs:
        ev = f32(min(max((f32(1) + c) / f32(2), f32(0)), f32(1)))
        row = new.setdefault(a, {})
        row[b] = f32(row.get(b, f32(0)) + ev)
    for a, found in new.items():
        cand = {int(b): f32(f32(s) * f32(decay))
                for b, s in zip(others[a].tolist(), scores[a].float().tolist()) if b >= 0}
        for b, e in found.items():
            cand[b] = f32(e + cand[b]) if b in cand else e
        best = sorted(cand.items(), key=lambda t: (-t[1], t[0]))[:K]
        others[a] = torch.tensor([b for b, _ in best] + [-1] * (K - len(best)), dtype=torch.int32)
        scores[a] = torch.tensor([float(s) for _, s in best] + [0.0] * (K - len(best)),
                                 dtype=torch.float32).to(torch.float16)


def margin_ce_stats_ref(x, W, row_labels, col_labels, pos_cos=None, *, scale, m1=1.0, m2=0.0,
                        m3=0.0, normalize_x=True, normalize_w=True, with_index=False):
    """Materialising reference of ``protomem.functional.margin_ce_stats``: the per-row statistics of
    the margin softmax.

    Logits ``s*cos(x_i, W_j)`` over the columns whose label is >= 0 (a negative column label is
    an empty memory slot or queue entry and never takes part). Without ``pos_cos`` the columns
    whose label equals the row's are its targets and get the margin ``cos(m1*theta+m2) - m3``
    (insightface's fallback where m1*theta+m2 > pi). With ``pos_cos`` [B], every same-label
    column is masked out and ``s*margin(pos_cos_i)`` is the single target logit.

    Args:
        x: [B, D] float; W: [M, D] float; row_labels: [B] int64; col_labels: [M] int64;
        pos_cos: optional [B] float target cosines.

    Returns:
        (lse, target, best_target, best_other), each [B] float32 (float64 for float64 inputs):
        the log-sum-exp of all logits and of the target logits (-inf without a target), the best
        target cosine (pos_cos when given) and the best cosine of a live non-target column (-inf
        if none). lse and target are differentiable. With ``with_index`` also best_other_index
        [B] int64: the smallest column reaching best_other (-1 if none).
    """
    from .margins import CombinedMargin

    margin = CombinedMargin(scale, m1, m2, m3)
    dt = torch.float64 if torch.float64 in (x.dtype, W.dtype) else torch.float32
    xf, wf = x.to(dt), W.to(dt)
    if normalize_x:
        xf = F.normalize(xf, dim=1, eps=_EPS)
    if normalize_w:
        wf = F.normalize(wf, dim=1, eps=_EPS)
    cos = xf @ wf.T
    live = (col_labels >= 0)[None, :]
    same = (row_labels[:, None] == col_labels[None, :]) & live
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=x.device)
    others = torch.where(live & ~same, cos, neg_inf)
    if pos_cos is None:
        logits = torch.where(live, scale * torch.where(same, margin.target_cos(cos), cos), neg_inf)
        target = torch.logsumexp(torch.where(same, logits, neg_inf), dim=1)
        best_target = torch.where(same, cos, neg_inf).amax(dim=1)
    else:
        best_target = pos_cos.to(dt)
        target = scale * margin.target_cos(best_target)
        logits = torch.cat([target[:, None], scale * others], dim=1)
    lse = torch.logsumexp(logits, dim=1)
    best_other = others.amax(dim=1).detach() if others.shape[1] else torch.full_like(lse, float("-inf"))
    if not with_index:
        return lse, target, best_target.detach(), best_other
    cols = torch.arange(W.shape[0], device=x.device)
    first = torch.where(others == best_other[:, None], cols[None, :], W.shape[0]).amin(dim=1) \
        if others.shape[1] else torch.zeros_like(row_labels)
    return lse, target, best_target.detach(), best_other, torch.where(best_other > float("-inf"), first, -1)


def margin_cross_entropy_ref(x, W, row_labels, col_labels, pos_cos=None, *, scale, m1=1.0, m2=0.0,
                             m3=0.0, normalize_x=True, normalize_w=True, reduction="mean",
                             ignore_index=-1):
    """Materialising reference of the fused margin softmax cross-entropy: ``lse - target`` per row
    from ``margin_ce_stats_ref`` (see there for the logits). With several target columns the loss
    is ``LSE(all) - LSE(targets)``. Rows labelled ``ignore_index`` give 0 and are left out of the
    mean; any other row without a target is a ValueError.

    Returns:
        (loss, lse [B], correct [B] bool): loss reduced by ``reduction`` ("mean", "sum", "none");
        correct whether the target's plain cosine beats every other column's (top-1 without
        margin; False for ignored rows).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    lse, target, best_target, best_other = margin_ce_stats_ref(
        x, W, row_labels, col_labels, pos_cos, scale=scale, m1=m1, m2=m2, m3=m3,
        normalize_x=normalize_x, normalize_w=normalize_w)
    ignored = row_labels == ignore_index
    if bool((torch.isinf(target) & ~ignored).any()):
        raise ValueError("some rows have no target column (no column carries their label)")
    per_row = torch.where(ignored, torch.zeros_like(lse), lse - torch.where(ignored, lse, target))
    correct = (best_target >= best_other) & ~ignored
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.sum() / (~ignored).sum().clamp_min(1)
    return loss, lse, correct


def cos_lse_fwd_ref(x, W, row_labels, col_labels, scale, normalize_x=True, normalize_w=True):
    """Materialising reference of ``cos_lse_fwd``: the softmax of ``scale * cos(x_i, W_j)`` over
    each row's *other* columns (label >= 0 and != the row's label), reduced to per-row values.

    Args:
        x: [B, D] float; W: [M, D] float; row_labels: [B] int64; col_labels: [M] int64
        (negative = empty column); scale: s > 0; normalize_x / normalize_w: L2-normalise the rows
        of x / W first (else their raw dot products are the "cosines").

    Returns:
        lse [B]: log-sum-exp of ``s * cos`` over the row's other columns (-inf if none);
        best [B]: the highest such cosine (-inf if none);
        best_index [B] int64: the smallest column index reaching ``best`` (-1 if none);
        direction [B, D]: ``sum_j softmax_ij * w_j * w_inv_norm_j`` (zeros if none), which makes
            grad x of the lse O(B D): d lse_i / d x_i = s * d/dx_i <x_hat_i, direction_i>;
        w_inv_norm [M]: 1 / max(|w_j|, 1e-12) with normalize_w, else ones.
        Floats are float32 (float64 when x or W is float64). No gradient: the op's autograd
        (protomem/ops/cos_lse.py) differentiates lse through ``direction`` and cos_lse_bwd_w.
    """
    dt = torch.float64 if torch.float64 in (x.dtype, W.dtype) else torch.float32
    xf, wf = x.detach().to(dt), W.detach().to(dt)
    if normalize_x:
        xf = F.normalize(xf, dim=1, eps=_EPS)
    w_inv = (1 / wf.norm(dim=1).clamp_min(_EPS)) if normalize_w else torch.ones_like(wf[:, 0])
    wh = wf * w_inv[:, None]
    cos = xf @ wh.T
    other = (col_labels >= 0)[None, :] & (row_labels[:, None] != col_labels[None, :])
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=x.device)
    logits = torch.where(other, scale * cos, neg_inf)
    lse = torch.logsumexp(logits, dim=1)
    has = other.any(dim=1)
    p = torch.where(has[:, None], torch.exp(logits - torch.where(has, lse, 0)[:, None]), 0)
    direction = p @ wh
    masked = torch.where(other, cos, neg_inf)
    best = masked.amax(dim=1) if masked.shape[1] else torch.full_like(lse, float("-inf"))
    cols = torch.arange(W.shape[0], device=x.device)
    hit = other & (masked == best[:, None])
    big = torch.iinfo(torch.int64).max
    best_index = torch.where(hit, cols[None, :], big).amin(dim=1) if W.shape[0] else \
        torch.full_like(row_labels, big)
    best_index = torch.where(has, best_index, -1)
    return lse, best, best_index, direction, w_inv


def cos_lse_bwd_w_ref(grad_lse, x, W, row_labels, col_labels, lse, scale, normalize_x=True,
                      normalize_w=True):
    """Reference of ``cos_lse_bwd_w``: the gradient with respect to W [M, D] of
    ``sum_i grad_lse_i * lse_i`` for ``lse`` of ``cos_lse_fwd_ref`` (the forward's lse [B] is
    passed in). Rows without other columns (lse = -inf) or with grad_lse = 0 contribute nothing.
    Returns grad_W [M, D] in W's dtype."""
    dt = torch.float64 if torch.float64 in (x.dtype, W.dtype) else torch.float32
    xf = x.detach().to(dt)
    with torch.enable_grad():  # also when called from a backward
        w = W.detach().to(dt).requires_grad_(True)
        xh = F.normalize(xf, dim=1, eps=_EPS) if normalize_x else xf
        wh = F.normalize(w, dim=1, eps=_EPS) if normalize_w else w
        cos = xh @ wh.T
        other = (col_labels >= 0)[None, :] & (row_labels[:, None] != col_labels[None, :])
        finite = torch.isfinite(lse.to(dt)) | torch.isnan(lse.to(dt))
        lse_safe = torch.where(finite, lse.to(dt), 0)[:, None]
        p = torch.where(other & finite[:, None], torch.exp(scale * cos.detach() - lse_safe), 0)
        # d lse_i / d cos_ij = s * p_ij with the forward's lse held fixed (its own gradient cancels)
        surrogate = (grad_lse.to(dt)[:, None] * scale * p * cos).sum()
        (g,) = torch.autograd.grad(surrogate, w)
    return g.to(W.dtype)
