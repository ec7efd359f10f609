"""Pair scores and closed-set identification on a labelled embedding set.

- ``pair_scores``: genuine and impostor cosine scores of a labelled embedding set (block-wise).
- ``rank1_identification`` / ``identification_split``: closed-set rank-1 identification.
"""
import math

import torch

from ._checks import _generator_device, _labels, _matrix, _normalized, _positive_int

__all__ = ["identification_split", "pair_scores", "rank1_identification"]

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
