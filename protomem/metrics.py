"""Face-recognition evaluation metrics on embeddings: pure functions, torch tensors in, Python floats
or tensors out.

- ``verification_accuracy``: insightface's LFW-style k-fold verification protocol (accuracy with the
  threshold chosen on the other folds, and VAL at a target FAR).
- ``tar_at_far``: TAR at fixed FARs from similarity scores, with an exact order-statistic threshold.
- ``pair_scores``: genuine and impostor cosine scores of a labelled embedding set (block-wise).
- ``rank1_identification`` / ``identification_split``: closed-set rank-1 identification.
- ``flip_embeddings``: embed images with insightface's flip test.
- ``kfold_split``: contiguous k-fold splits (sklearn's ``KFold(shuffle=False)`` rule).

Conventions: a *score* is a similarity (higher = more alike; here the cosine) and a pair is accepted
when its score is strictly above the threshold; a *distance* (the verification protocol) accepts a
pair when it is strictly below the threshold, as insightface's ``np.less(dist, threshold)``.
"""
import math
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "flip_embeddings",
    "identification_split",
    "kfold_split",
    "pair_scores",
    "rank1_identification",
    "tar_at_far",
    "verification_accuracy",
]


# --------------------------------------------------------------------------------------------------
# argument checks


def _matrix(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, E], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _vector(x, name, n, dtype=None):
    """x as a 1-D tensor of length n (lists and numpy arrays accepted)."""
    x = torch.as_tensor(x)
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 1 or x.numel() != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(x.shape)}")
    if dtype is torch.bool:
        if x.dtype != torch.bool:
            if x.is_floating_point() or x.is_complex() or not ((x == 0) | (x == 1)).all():
                raise ValueError(f"{name} must be boolean (or 0/1 integers), got {x.dtype}")
            x = x.bool()
    elif dtype is torch.int64:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer labels, got {x.dtype}")
        x = x.long()
    return x


def _labels(labels, name, n, device):
    return _vector(labels, name, n, torch.int64).to(device)


def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _fars(fars):
    fars = (fars,) if isinstance(fars, (int, float)) else tuple(fars)
    for far in fars:
        if not (isinstance(far, (int, float)) and 0 < far <= 1):
            raise ValueError(f"every far must be a number in (0, 1], got {far!r}")
    return fars


def _normalized(x):
    """Rows L2-normalised, computed in float32 (float64 stays float64)."""
    return F.normalize(x.double() if x.dtype == torch.float64 else x.float(), dim=1)


def _generator_device(generator):
    return generator.device if generator is not None else "cpu"


# --------------------------------------------------------------------------------------------------
# thresholds at a false-accept rate


def _allowed_false_accepts(far, n_impostors):
    """The largest k with k <= far * n (far read as the decimal it was written as: a product that is
    an integer up to float rounding counts as that integer)."""
    return int(math.floor(far * n_impostors * (1 + 1e-9)))


def _threshold_at_far(impostor_scores, far):
    """The smallest threshold t with #{impostor scores > t} <= far * n: the (k+1)-th largest impostor
    score, k = floor(far * n). -inf when every impostor may be accepted (k >= n); NaN when
    far * n < 1 (fewer than 1/far impostors: no false accept can be afforded, so the threshold would
    be the largest impostor score, an extreme value rather than an estimate)."""
    n = impostor_scores.numel()
    k = _allowed_false_accepts(far, n)
    if k < 1:
        return math.nan
    if k >= n:
        return -math.inf
    return impostor_scores.kthvalue(n - k).values.item()


def _fraction_above(scores, threshold):
    if scores.numel() == 0 or math.isnan(threshold):
        return math.nan
    return (scores > threshold).double().mean().item()


def tar_at_far(scores, genuine, fars=(1e-3, 1e-4)):
    """True-accept rate at fixed false-accept rates, with exact (order-statistic) thresholds.

    A pair is accepted when its score is strictly above the threshold. For each ``far`` with ``n``
    impostor scores, ``k = floor(far * n)`` false accepts are allowed and the threshold is the
    (k+1)-th largest impostor score: the smallest threshold with
    ``#{impostor scores > threshold} <= far * n``. Ties: impostors equal to the threshold are
    rejected, so with tied impostor scores the realised FAR may be below ``far``; genuine scores equal
    to the threshold are rejected too (they do not count towards TAR).

    When there are fewer than ``1/far`` impostor scores (``far * n < 1``), no false accept can be
    afforded and the threshold would be the single largest impostor score: TAR at that FAR is not
    measurable from this data, so that entry is ``(nan, nan)`` and a ``RuntimeWarning`` says so.
    ``far = 1`` gives threshold ``-inf`` (everything accepted). Without genuine scores TAR is NaN.

    Args:
        scores: [P] float tensor of similarity scores (higher = more alike).
        genuine: [P] bool tensor (or 0/1 integers, list, array): True for genuine (same-identity)
            pairs, False for impostor pairs.
        fars: a FAR or a sequence of FARs, each in (0, 1].

    Returns:
        dict ``far -> (tar, threshold)``, both Python floats.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError("scores must be a 1-D floating-point tensor [P]")
    genuine = _vector(genuine, "genuine", scores.numel(), torch.bool).to(scores.device)
    fars = _fars(fars)
    genuine_scores, impostor_scores = scores[genuine], scores[~genuine]
    out, unmeasurable = {}, []
    for far in fars:
        threshold = _threshold_at_far(impostor_scores, far)
        if math.isnan(threshold):
            unmeasurable.append(far)
        out[far] = (_fraction_above(genuine_scores, threshold), threshold)
    if unmeasurable:
        warnings.warn(f"tar_at_far: {impostor_scores.numel()} impostor pairs are fewer than 1/far "
                      f"for far in {unmeasurable}; TAR there is NaN", RuntimeWarning, stacklevel=2)
    return out


# --------------------------------------------------------------------------------------------------
# k-fold verification (insightface's protocol)


def kfold_split(n, nfolds):
    """Contiguous k-fold splits of ``range(n)``, the rule of sklearn's ``KFold(shuffle=False)``: the
    first ``n % nfolds`` folds hold ``n // nfolds + 1`` items, the others ``n // nfolds``.

    Args:
        n: number of items (>= nfolds).
        nfolds: number of folds (>= 2).

    Returns:
        list of ``nfolds`` pairs ``(train, test)`` of int64 index tensors (ascending); ``test`` is
        contiguous and ``train`` is the rest.
    """
    _positive_int(n, "n")
    if isinstance(nfolds, bool) or not isinstance(nfolds, int) or not 2 <= nfolds <= n:
        raise ValueError(f"nfolds must be an int in [2, n={n}], got {nfolds!r}")
    sizes = [n // nfolds + (1 if f < n % nfolds else 0) for f in range(nfolds)]
    idx = torch.arange(n)
    splits, start = [], 0
    for size in sizes:
        stop = start + size
        splits.append((torch.cat([idx[:start], idx[stop:]]), idx[start:stop]))
        start = stop
    return splits


def _count_below(values, thresholds):
    """[T] int64: for each threshold, how many values are strictly below it."""
    return torch.searchsorted(values.sort().values, thresholds, side="left")


def verification_accuracy(emb1, emb2, issame, nfolds=10, thresholds=None, far_target=1e-3):
    """insightface's LFW-style k-fold verification on embedding pairs.

    The embeddings are L2-normalised (in float64) and the distance of a pair is the squared Euclidean
    distance of its normalised embeddings (``2 - 2 cos``); a pair is predicted "same" when its
    distance is strictly below the threshold. The pairs are split into ``nfolds`` contiguous folds
    (``kfold_split``, sklearn's ``KFold`` without shuffling). For each fold, the threshold of the grid
    with the most correct predictions on the other folds' pairs (the first such in grid order, as
    ``np.argmax``) is applied to the fold's pairs.

    VAL at ``far_target`` (insightface's ``val@far``, TAR at FAR): per fold, the threshold is chosen
    on the other folds' impostor pairs and VAL / FAR are measured on the fold. Instead of
    insightface's interpolation on a 0.001 grid, the threshold is exact: the largest distance
    threshold whose train FAR is <= ``far_target`` (the (k+1)-th smallest train impostor distance,
    k = floor(far_target * n_train_impostors), see ``tar_at_far``). When the train folds hold fewer
    than ``1/far_target`` impostor pairs, or a fold has no genuine pair, VAL is NaN.

    Args:
        emb1, emb2: [P, E] float tensors, the two sides of each pair (insightface's ``.bin`` sets
            interleave them: ``emb[0::2]``, ``emb[1::2]``).
        issame: [P] bool tensor (or list / array / 0-1 integers): True for same-identity pairs.
        nfolds: number of folds (insightface: 10), 2 <= nfolds <= P.
        thresholds: 1-D grid of distance thresholds; default ``0, 0.01, ..., 3.99``
            (insightface's ``np.arange(0, 4, 0.01)``).
        far_target: the FAR of VAL, in (0, 1] (insightface: 1e-3).

    Returns:
        dict of Python floats: ``accuracy`` (mean over folds), ``accuracy_std`` (population std, as
        ``np.std``), ``threshold`` (mean best threshold), ``fold_accuracy`` (list of nfolds floats),
        ``val`` (mean TAR at ``far_target``), ``val_std``, ``far`` (mean FAR realised on the test
        folds), ``val_threshold`` (mean distance threshold of VAL), ``far_target``.
    """
    emb1, emb2 = _matrix(emb1, "emb1"), _matrix(emb2, "emb2")
    if emb1.shape != emb2.shape:
        raise ValueError(f"emb1 and emb2 must have the same shape, got {tuple(emb1.shape)} and "
                         f"{tuple(emb2.shape)}")
    n = emb1.shape[0]
    same = _vector(issame, "issame", n, torch.bool).cpu()
    folds = kfold_split(n, nfolds)
    far_target = _fars((far_target,))[0]
    if thresholds is None:
        thresholds = torch.arange(400, dtype=torch.float64) * 0.01
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).flatten().cpu()
    if thresholds.numel() == 0:
        raise ValueError("thresholds must not be empty")

    diff = F.normalize(emb1.double(), dim=1) - F.normalize(emb2.double(), dim=1)
    dist = diff.pow(2).sum(1).cpu()

    # Per fold and threshold: genuine / impostor pairs of the fold predicted "same".
    tp = torch.stack([_count_below(dist[test][same[test]], thresholds) for _, test in folds])
    fp = torch.stack([_count_below(dist[test][~same[test]], thresholds) for _, test in folds])
    n_gen = torch.stack([same[test].sum() for _, test in folds])
    n_imp = torch.stack([(~same[test]).sum() for _, test in folds])
    correct = tp + (n_imp[:, None] - fp)                              # [nfolds, T]
    best = (correct.sum(0, keepdim=True) - correct).argmax(1)          # train = all - this fold
    rows = torch.arange(len(folds))
    fold_acc = correct[rows, best].double() / (n_gen + n_imp).double()

    vals, fars_realised, val_thresholds = [], [], []
    for train, test in folds:
        # distance d accepted iff d < t  <=>  score -d > -t: the score-side threshold, negated
        t = -_threshold_at_far(-dist[train][~same[train]], far_target)
        val_thresholds.append(t)
        vals.append(_fraction_above(-dist[test][same[test]], -t))
        fars_realised.append(_fraction_above(-dist[test][~same[test]], -t))
    vals_t = torch.tensor(vals, dtype=torch.float64)
    return dict(
        accuracy=fold_acc.mean().item(),
        accuracy_std=fold_acc.std(correction=0).item(),
        threshold=thresholds[best].mean().item(),
        fold_accuracy=fold_acc.tolist(),
        val=vals_t.mean().item(),
        val_std=vals_t.std(correction=0).item(),
        far=torch.tensor(fars_realised, dtype=torch.float64).mean().item(),
        val_threshold=torch.tensor(val_thresholds, dtype=torch.float64).mean().item(),
        far_target=far_target,
    )


# --------------------------------------------------------------------------------------------------
# embedding images


def _module_device(model):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def flip_embeddings(model, images, batch_size=256, device=None, flip=True):
    """Embed images in batches, with insightface's flip test.

    Runs under ``torch.no_grad()`` with every submodule in eval mode; each submodule's own training
    flag is restored afterwards (also on error). With ``flip=True`` an image's embedding is
    ``model(x) + model(x flipped left-right)`` (the width axis, dim 3), summed in float32 before any
    normalisation, as insightface's verification does. Images are passed to the model as they are
    (only moved to ``device``): preprocessing is the caller's.

    Args:
        model: ``torch.nn.Module`` mapping [B, 3, H, W] to [B, E].
        images: [N, C, H, W] tensor (any dtype the model accepts), on any device.
        batch_size: images per forward pass.
        device: where the model runs; default the device of its first parameter/buffer (CPU if none).
        flip: add the embedding of the horizontally flipped image.

    Returns:
        [N, E] float32 tensor on the CPU (not normalised).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty 4-D tensor [N, C, H, W]")
    _positive_int(batch_size, "batch_size")
    device = _module_device(model) if device is None else torch.device(device)
    modes = [(m, m.training) for m in model.modules()]
    out = []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(device)
                e = model(x)
                if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] != x.shape[0]:
                    raise ValueError(f"model must return a [B, E] tensor, got "
                                     f"{getattr(e, 'shape', type(e).__name__)}")
                e = e.float()
                if flip:
                    e = e + model(torch.flip(x, dims=[3])).float()
                out.append(e.cpu())
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# pairs of a labelled set


def _sample_distinct(n, k, generator):
    """k distinct int64 values drawn uniformly from range(n), in random order."""
    dev = _generator_device(generator)
    if 2 * k > n:
        return torch.randperm(n, generator=generator, device=dev)[:k].cpu()
    got = torch.empty(0, dtype=torch.int64)
    while got.numel() < k:
        draw = torch.randint(0, n, (int(1.2 * (k - got.numel())) + 16,), generator=generator,
                             device=dev)
        got = torch.cat([got, draw.cpu()]).unique()
    # got is a uniformly random set given its size, so a random k-subset of it is uniform
    return got[torch.randperm(got.numel(), generator=generator, device=dev).cpu()[:k]]


def _rowwise_cos(e, i, j):
    """cos(e[i[p]], e[j[p]]) for each pair p, in chunks of ~16M gathered elements (64 MB in float32
    per side); e rows are normalised."""
    chunk = max(1, (1 << 24) // max(1, e.shape[1]))
    parts = [torch.einsum("pd,pd->p", e.index_select(0, i[a:a + chunk]), e.index_select(0, j[a:a + chunk]))
             for a in range(0, i.numel(), chunk)]
    return torch.cat(parts) if parts else e.new_empty(0)


def _ordered_pairs(i, j, n):
    """(i, j) as (min, max), sorted lexicographically."""
    lo, hi = torch.minimum(i, j), torch.maximum(i, j)
    order = (lo * n + hi).argsort()
    return lo[order], hi[order]


def pair_scores(embeddings, labels, max_impostor_pairs=None, generator=None, block_size=512,
                return_pairs=False):
    """Cosine scores of every genuine pair and of every (or a uniform sample of the) impostor pairs.

    Pairs are unordered, ``i < j``. The output holds the genuine pairs first, then the impostor
    pairs, each group in lexicographic order of ``(i, j)``; the order and the pairs do not depend on
    ``block_size``. All impostor pairs are scored ``block_size`` rows at a time (memory: the output
    plus a ``block_size x N`` block; for N = 10k and ~10 images per identity the output is ~50M
    scores, 200 MB in float32: pass ``max_impostor_pairs`` to sample instead). With
    ``max_impostor_pairs = m`` smaller than the number of impostor pairs, ``m`` distinct impostor
    pairs are drawn uniformly without replacement (with ``generator``) and nothing quadratic in N is
    built.

    Args:
        embeddings: [N, E] float tensor (normalised here; scores in float32, float64 for float64).
        labels: [N] integer identity labels.
        max_impostor_pairs: None for all impostor pairs, else an int >= 0.
        generator: ``torch.Generator`` for the sampling (default: the global RNG).
        block_size: rows per block when scoring all impostor pairs.
        return_pairs: also return the pair indices.

    Returns:
        ``(scores, genuine)``: [P] float tensor of cosines and [P] bool mask (True = genuine), on the
        embeddings' device; with ``return_pairs=True`` also ``pairs``, [P, 2] int64 ``(i, j)``.
    """
    e = _normalized(_matrix(embeddings, "embeddings"))
    n, dev = e.shape[0], e.device
    labels = _labels(labels, "labels", n, dev)
    _positive_int(block_size, "block_size")
    if max_impostor_pairs is not None and (isinstance(max_impostor_pairs, bool)
                                           or not isinstance(max_impostor_pairs, int)
                                           or max_impostor_pairs < 0):
        raise ValueError(f"max_impostor_pairs must be None or an int >= 0, got {max_impostor_pairs!r}")

    # Sorted by label, an identity is a contiguous run [start, end): the genuine partners of
    # position p are (p, end) and its later impostor partners [end, n).
    order = labels.argsort(stable=True)
    _, counts = labels[order].unique_consecutive(return_counts=True)
    ends = counts.cumsum(0).repeat_interleave(counts)                     # [n]
    pos = torch.arange(n, device=dev)
    n_gen_after = ends - pos - 1
    p = pos.repeat_interleave(n_gen_after)
    first = (n_gen_after.cumsum(0) - n_gen_after).repeat_interleave(n_gen_after)
    q = p + 1 + (torch.arange(p.numel(), device=dev) - first)
    gi, gj = _ordered_pairs(order[p], order[q], n)
    gen_scores = _rowwise_cos(e, gi, gj)

    n_imp_after = n - ends
    n_impostor = int(n_imp_after.sum())
    if max_impostor_pairs is None or max_impostor_pairs >= n_impostor:
        imp_scores, ii, ij = [], [], []
        for a in range(0, n, block_size):
            b = min(a + block_size, n)
            s = e[a:b] @ e[a:].T                                            # rows a..b, cols a..n
            mask = pos[None, a:] > pos[a:b, None]
            mask &= labels[a:b, None] != labels[None, a:]
            imp_scores.append(s[mask])
            if return_pairs:
                r, c = mask.nonzero(as_tuple=True)
                ii.append(r + a)
                ij.append(c + a)
        imp_scores = torch.cat(imp_scores)
        if return_pairs:
            ii, ij = torch.cat(ii), torch.cat(ij)
    else:
        lin = _sample_distinct(n_impostor, max_impostor_pairs, generator).to(dev)
        inclusive = n_imp_after.cumsum(0)
        src = torch.searchsorted(inclusive, lin, right=True)
        dst = ends[src] + (lin - (inclusive[src] - n_imp_after[src]))
        ii, ij = _ordered_pairs(order[src], order[dst], n)
        imp_scores = _rowwise_cos(e, ii, ij)

    scores = torch.cat([gen_scores, imp_scores])
    genuine = torch.cat([torch.ones_like(gen_scores, dtype=torch.bool),
                         torch.zeros_like(imp_scores, dtype=torch.bool)])
    if not return_pairs:
        return scores, genuine
    pairs = torch.stack([torch.cat([gi, ii]), torch.cat([gj, ij])], dim=1)
    return scores, genuine, pairs


# --------------------------------------------------------------------------------------------------
# closed-set identification


def rank1_identification(gallery, gallery_labels, probes, probe_labels, probe_block_size=1024,
                         gallery_block_size=8192, return_correct=False):
    """Closed-set rank-1 identification accuracy by cosine similarity.

    Each probe is assigned the label of its most similar gallery embedding (the first one on exact
    ties, as ``argmax``); it is correct when that label equals its own. The similarity matrix is
    computed in ``probe_block_size x gallery_block_size`` tiles with a running maximum, so it is
    never materialised (100k probes x 10k gallery is fine). A probe whose identity is absent from
    the gallery can never be correct (closed-set use assumes there is none).

    Args:
        gallery: [G, E] float tensor; gallery_labels: [G] integer labels.
        probes: [Q, E] float tensor (same E); probe_labels: [Q] integer labels.
        probe_block_size, gallery_block_size: tile shape.
        return_correct: also return the per-probe correctness (e.g. to split by head / tail class).

    Returns:
        rank-1 accuracy as a Python float (NaN without probes); with ``return_correct=True``,
        ``(accuracy, correct)`` with ``correct`` a [Q] bool tensor on the probes' device.
    """
    g = _normalized(_matrix(gallery, "gallery"))
    pr = _normalized(_matrix(probes, "probes")).to(device=g.device)
    if g.shape[0] == 0:
        raise ValueError("gallery must not be empty")
    if pr.shape[1] != g.shape[1]:
        raise ValueError(f"probes have E={pr.shape[1]} but gallery has E={g.shape[1]}")
    if pr.dtype != g.dtype:
        pr, g = pr.double(), g.double()
    gallery_labels = _labels(gallery_labels, "gallery_labels", g.shape[0], g.device)
    probe_labels = _labels(probe_labels, "probe_labels", pr.shape[0], g.device)
    _positive_int(probe_block_size, "probe_block_size")
    _positive_int(gallery_block_size, "gallery_block_size")

    nearest = torch.empty(pr.shape[0], dtype=torch.int64, device=g.device)
    for a in range(0, pr.shape[0], probe_block_size):
        block = pr[a:a + probe_block_size]
        best = torch.full((block.shape[0],), -math.inf, dtype=g.dtype, device=g.device)
        arg = torch.zeros(block.shape[0], dtype=torch.int64, device=g.device)
        for c in range(0, g.shape[0], gallery_block_size):
            s = block @ g[c:c + gallery_block_size].T
            j = s.argmax(1)
            m = s.gather(1, j[:, None])[:, 0]
            better = m > best                      # strict: an earlier block wins ties
            best = torch.where(better, m, best)
            arg = torch.where(better, j + c, arg)
        nearest[a:a + block.shape[0]] = arg
    correct = gallery_labels[nearest] == probe_labels
    acc = correct.double().mean().item() if correct.numel() else math.nan
    return (acc, correct.to(probes.device)) if return_correct else acc


def identification_split(embeddings, labels, generator=None):
    """Split a labelled set into a gallery (one sample per identity) and probes (all the others).

    Without ``generator`` the gallery sample of an identity is its first occurrence; with one, a
    sample drawn uniformly from the identity's samples. Identities with a single sample have no
    probe. Use with ``rank1_identification(emb[g], labels[g], emb[p], labels[p])``.

    Args:
        embeddings: [N, E] tensor (only its length is used, checked against ``labels``).
        labels: [N] integer identity labels.
        generator: ``torch.Generator`` for the random choice, or None for the first occurrence.

    Returns:
        ``(gallery_idx, probe_idx)``: int64 index tensors into ``range(N)``, ascending, disjoint,
        covering it; ``gallery_idx`` has one index per identity. On the labels' device.
    """
    n = _matrix(embeddings, "embeddings").shape[0]
    labels = _labels(labels, "labels", n, embeddings.device)
    dev = labels.device
    _, inverse = labels.unique(return_inverse=True)
    if generator is None:
        priority = torch.arange(n, device=dev)
    else:
        priority = torch.randperm(n, generator=generator, device=_generator_device(generator)).to(dev)
    n_classes = int(inverse.max()) + 1 if n else 0
    lowest = torch.full((n_classes,), n, dtype=torch.int64, device=dev)
    lowest = lowest.scatter_reduce(0, inverse, priority, reduce="amin")
    is_gallery = priority == lowest[inverse]
    return is_gallery.nonzero()[:, 0], (~is_gallery).nonzero()[:, 0]
