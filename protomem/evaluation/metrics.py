"""Verification metrics on scores and embedding pairs: pure functions, torch tensors in, Python
floats out.

- ``tar_at_far``: TAR at fixed FARs from similarity scores, with an exact order-statistic threshold.
- ``verification_accuracy``: insightface's LFW-style k-fold verification protocol (accuracy with the
  threshold chosen on the other folds, and VAL at a target FAR).
- ``kfold_split``: contiguous k-fold splits (sklearn's ``KFold(shuffle=False)`` rule).

Conventions: a *score* is a similarity (higher = more alike; here the cosine) and a pair is accepted
when its score is strictly above the threshold; a *distance* (the verification protocol) accepts a
pair when it is strictly below the threshold, as insightface's ``np.less(dist, threshold)``.
"""
import math
import warnings

import torch
import torch.nn.functional as F

from ._checks import _fars, _matrix, _positive_int, _vector

__all__ = ["kfold_split", "tar_at_far", "verification_accuracy"]


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
