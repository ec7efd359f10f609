"""Per-class sample counts of a long-tailed identity dataset, deterministic from a seed."""
import torch

from . import _hashrng

# MegaFace2 (672K identities, 4.7M images): at least 3 images per identity, about 7 on average,
# about 88% of identities with fewer than 10 and a few heads with thousands. A discretised Pareto
# tail with these parameters gives P(n >= 10) = 0.3**1.76 = 0.12 and a mean of about 6.9.
MEGAFACE2 = dict(zipf_a=2.76, min_samples=3, max_samples=2000)
ZIPF = dict(zipf_a=2.0, min_samples=1, max_samples=1000)
PRESETS = {"megaface2": MEGAFACE2, "zipf": ZIPF}
_COUNT_STREAM = 0x636F756E  # separates count draws from every other use of the seed


def long_tail_counts(class_ids, samples_per_class, seed=0, **zipf):
    """The number of samples of each class.

    A long tail draws ``n = floor(min_samples * u ** (-1 / (zipf_a - 1)))`` with u uniform in
    (0, 1] hashed from (seed, class id), then caps it at ``max_samples``: P(n) ~ n**-zipf_a, the
    Zipf law. Each class's count depends only on (seed, its id), so views of disjoint id ranges of
    one dataset agree.

    Args:
        class_ids: int64 tensor [C] of (global) class ids.
        samples_per_class: an int (every class alike), a sequence or int tensor [C] of counts,
            "zipf" or "megaface2" (presets of the tail parameters, see ``PRESETS``).
        seed: int.
        **zipf: overrides of ``zipf_a`` (> 1), ``min_samples`` (>= 1), ``max_samples``.
    Returns:
        int64 tensor [C], every count >= 1.
    """
    num = class_ids.numel()
    if isinstance(samples_per_class, str):
        if samples_per_class not in PRESETS:
            raise ValueError(f"samples_per_class must be an int, counts or one of {sorted(PRESETS)}, "
                             f"got {samples_per_class!r}")
        params = {**PRESETS[samples_per_class], **zipf}
        return _zipf_counts(class_ids, seed, **params)
    if zipf:
        raise ValueError(f"{sorted(zipf)} only apply to samples_per_class='zipf' or 'megaface2'")
    if isinstance(samples_per_class, int) and not isinstance(samples_per_class, bool):
        counts = torch.full((num,), samples_per_class, dtype=torch.int64)
    else:
        counts = torch.as_tensor(samples_per_class).reshape(-1)
        if counts.is_floating_point() or counts.dtype == torch.bool or counts.numel() != num:
            raise ValueError(f"samples_per_class as counts must be {num} ints, got "
                             f"{counts.dtype} of shape {tuple(counts.shape)}")
        counts = counts.long()
    if counts.numel() and int(counts.min()) < 1:
        raise ValueError("samples_per_class must be >= 1 for every class")
    return counts


def _zipf_counts(class_ids, seed, zipf_a, min_samples, max_samples):
    if not zipf_a > 1:
        raise ValueError(f"zipf_a must be > 1, got {zipf_a}")
    if not 1 <= min_samples <= max_samples:
        raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    u = _hashrng.uniform(_hashrng.key(seed, _COUNT_STREAM, class_ids.cpu()), 1)[:, 0]
    n = torch.floor(min_samples * u.pow(-1.0 / (zipf_a - 1.0)))
    return n.clamp(max=max_samples).long()
