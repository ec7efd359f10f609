"""Identity evaluation on a ``SyntheticIdentities`` training set: TAR at fixed FARs and rank-1
identification on new samples of *head* and *tail* training identities and on *unseen* identities
(a held-out view), the split that shows whether rarely seen classes are learnt as well as frequent
ones."""
import math
import warnings

import torch

from .embedding import embed
from .labelled_sets import identification_split, pair_scores, rank1_identification
from .metrics import tar_at_far
from .report import far_key

__all__ = ["choose_eval_classes", "evaluate_identities"]



def choose_eval_classes(dataset, head_threshold=20, max_per_group=1000, seed=0):
    """The training identities to evaluate on, as a head group and a tail group.

    A class is *head* when it has at least ``head_threshold`` training samples, *tail* otherwise.
    The default 20 follows the long-tail literature's "few-shot" boundary; with the ``megaface2``
    preset (at least 3 samples, P(n >= 20) = (3/20)**1.76) about 3.6% of the classes are head and
    the rest tail. Up to ``max_per_group`` classes of each group are drawn uniformly without
    replacement, deterministically from ``seed``.

    Args:
        dataset: has ``class_counts``, an int64 tensor [C] of training samples per class.
        head_threshold: the smallest sample count of a head class (int >= 1).
        max_per_group: the most classes per group (int >= 0).
        seed: int seed of the draw.

    Returns:
        dict ``head`` / ``tail`` -> int64 tensor of local class ids (ascending, disjoint).
    """
    for name, value, low in (("head_threshold", head_threshold, 1), ("max_per_group", max_per_group, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    counts = torch.as_tensor(dataset.class_counts).reshape(-1)
    is_head = counts >= head_threshold
    gen = torch.Generator().manual_seed(seed)
    groups = {}
    for name, mask in (("head", is_head), ("tail", ~is_head)):
        ids = mask.nonzero()[:, 0]
        pick = torch.randperm(ids.numel(), generator=gen)[:max_per_group]
        groups[name] = ids[pick].sort().values
    return groups


def _embed_in_chunks(model, make, classes, n_per_class, batch_size, device):
    """Samples of ``classes`` made by ``make(chunk) -> (x, y)`` about ``batch_size`` at a time (so
    image sets are never held whole), embedded. Returns (float32 [m*n, E], int64 [m*n]) on the CPU."""
    embs, labels = [], []
    for chunk in classes.split(max(1, batch_size // n_per_class)):
        x, y = make(chunk)
        embs.append(embed(model, x, batch_size, device))
        labels.append(y.cpu())
    return torch.cat(embs), torch.cat(labels)


def _group_metrics(emb, labels, fars, max_impostor_pairs, seed):
    """TAR@FAR and rank-1 of one labelled embedding set: dict of floats (NaN where unmeasurable)."""
    gen = torch.Generator().manual_seed(seed)
    scores, genuine = pair_scores(emb, labels, max_impostor_pairs=max_impostor_pairs,
                                          generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # too few impostors: NaN, as documented
        tars = tar_at_far(scores, genuine, fars)
    out = {f"tar@far={far_key(far)}": tars[far][0] for far in fars}
    gallery, probes = identification_split(emb, labels)
    out["rank1"] = rank1_identification(emb[gallery], labels[gallery], emb[probes],
                                                labels[probes])
    return out


def _nan_metrics(fars):
    return {**{f"tar@far={far_key(far)}": math.nan for far in fars}, "rank1": math.nan}


def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    return next((t.device for t in model.parameters()), torch.device("cpu"))


def _check_identity_args(groups, n_per_class, heldout_classes):
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 2:
        raise ValueError(f"n_per_class must be an int >= 2 (genuine pairs need two samples), "
                         f"got {n_per_class!r}")
    if isinstance(heldout_classes, bool) or not isinstance(heldout_classes, int) or heldout_classes < 0:
        raise ValueError(f"heldout_classes must be an int >= 0, got {heldout_classes!r}")
    if "unseen" in groups:
        raise ValueError("groups may not be called 'unseen': that group is the held-out identities "
                         "(set its size with heldout_classes)")


def evaluate_identities(model, dataset, groups=None, n_per_class=5, heldout_classes=1000,
                        fars=(1e-3, 1e-4), device=None, batch_size=1024, seed=0,
                        max_impostor_pairs=20_000_000):
    """Verification (TAR at fixed FARs) and rank-1 identification on new samples of training
    identities, grouped, and on identities never trained on.

    For each group of training classes, ``n_per_class`` samples per class that training never
    drew (``dataset.fresh_samples``) are embedded; for the group ``unseen``, the samples of
    ``dataset.heldout(heldout_classes, n_per_class)``. On each set:

    - ``<group>/tar@far=<far>``: TAR at that FAR over every genuine pair and every impostor pair
      (``pair_scores``, ``tar_at_far``; exact thresholds). NaN when the set has
      fewer than ``1/far`` impostor pairs (FAR 1e-4 needs 10k: at 5 samples per identity, 29
      identities give 10,150 and 1000 give ~12.5M) or no genuine pair.
    - ``<group>/rank1``: closed-set rank-1 accuracy, the first sample of each identity in the
      gallery and the other ``n_per_class - 1`` as probes.
    - ``<group>/identities``: how many identities the group holds (an int); a group without any has
      NaN metrics.

    With more than ``max_impostor_pairs`` impostor pairs a uniform sample of that many is scored
    (seeded by ``seed``). Scoring all of them block-wise is the faster path while they fit in
    memory (about 0.7 s for 12.5M on 2 CPU cores), so the default only samples beyond 20M (80 MB).

    Args:
        model: encoder ``nn.Module`` mapping the dataset's samples [B, *sample_shape] to [B, E].
        dataset: a ``SyntheticIdentities`` (needs ``fresh_samples``, ``heldout``, ``class_counts``).
        groups: dict name -> int64 tensor of training class ids; default
            ``choose_eval_classes(dataset, seed=seed)`` (head / tail, up to 1000 each).
        n_per_class: samples per identity (>= 2).
        heldout_classes: identities of the unseen group; 0 leaves the group out.
        fars: the FARs of TAR, each in (0, 1].
        device: where the model runs (it is not moved there) and samples are made; default the
            model's device.
        batch_size: samples per forward pass.
        seed: seed of the default groups and of the impostor sample.
        max_impostor_pairs: the most impostor pairs scored per group.

    Returns:
        flat dict ``"<group>/<metric>"`` -> float (identities: int), groups in the order given
        followed by ``unseen``.
    """
    groups = choose_eval_classes(dataset, seed=seed) if groups is None else dict(groups)
    _check_identity_args(groups, n_per_class, heldout_classes)
    fars = tuple(fars)
    device = _model_device(model, device)
    makers = {name: (torch.as_tensor(classes, dtype=torch.int64).reshape(-1),
                     lambda c: dataset.fresh_samples(c, n_per_class, device))
              for name, classes in groups.items()}
    if heldout_classes:
        view = dataset.heldout(heldout_classes, n_per_class)
        # the view holds n_per_class samples of each class, class-major
        makers["unseen"] = (torch.arange(heldout_classes), lambda c: view.get_batch(
            (c[:, None] * n_per_class + torch.arange(n_per_class)).reshape(-1), device))
    results = {}
    for name, (classes, make) in makers.items():
        if classes.numel():
            emb, labels = _embed_in_chunks(model, make, classes, n_per_class, batch_size, device)
            values = _group_metrics(emb, labels, fars, max_impostor_pairs, seed)
        else:
            values = _nan_metrics(fars)
        results.update({f"{name}/{key}": value for key, value in values.items()})
        results[f"{name}/identities"] = int(classes.numel())
    return results
