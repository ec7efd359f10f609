"""SyntheticIdentities: a face-identity-like dataset generated on the fly from a seed.

Sample j of class c is ``f(z)`` with the latent ``z = centre(c) + noise * eps(c, j) +
nuisance * A @ eta(c, j)``: a class centre drawn from N(0, I), isotropic per-sample noise, and a
large variation along a few directions shared by every class (pose / lighting stand-ins that a
trained encoder has to learn to ignore). ``f`` is a fixed random GELU MLP (feature mode) or a fixed
random map to a low-resolution pattern upsampled to an image (image mode). Every random number is
a hash of (seed, stream, class id, sample index, position) (see ``_hashrng``), so nothing of size
classes x dim is ever stored and any sample can be regenerated alone, on any device.
"""
import math

import torch
import torch.nn.functional as F

from . import _hashrng
from .longtail import long_tail_counts

# Hash streams: one per kind of random quantity, so none of them share values.
_CENTRE, _NOISE, _NUISANCE, _W1, _B1, _W2, _W_IMG, _PIXELS, _FAMILY, _FAMILY_PICK = range(1, 11)
_MODES = ("feature", "image")
_PATTERN = 14  # side of the low-resolution pattern an image is upsampled from


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class SyntheticIdentities(torch.utils.data.Dataset):
    """Identities with long-tailed sample counts; samples are ordered by class.

    Args:
        num_classes: C, the number of identities.
        feature_dim: F, the size of a feature-mode sample.
        samples_per_class: int, a sequence of C counts, "zipf" or "megaface2" (see
            ``longtail.long_tail_counts``; ``**zipf`` overrides zipf_a, min_samples, max_samples).
        mode: "feature" (samples float32 [F]) or "image" (float32 [3, image_size, image_size] in
            [-1, 1]).
        noise: std of the per-sample isotropic latent noise; the class centres have std 1.
        nuisance: std of the variation along ``nuisance_rank`` directions shared by all classes.
        latent_dim, hidden_dim: sizes of the latent and of the MLP's hidden layer.
        image_size, pixel_noise: image side and the amplitude of the uniform pixel noise.
        seed: int; everything (counts, centres, samples, maps) is a function of it.
        first_class: global id of local class 0 (``heldout`` views use ids past the training ones).
        lookalikes: the fraction (about; drawn per family) of identities in planted look-alike
            families, 0 (default) for none: twins or siblings for hard-example mining to find.
        family_size: identities per family: global ids ``f * family_size .. + family_size - 1``.
            Families follow global ids, so when ``first_class + num_classes`` is not a multiple
            of family_size the last family straddles the end of the set: with ``heldout`` (ids
            from num_classes on) a training identity's planted twin can be an unseen identity.
            ``planted_partners`` names only members inside the set (the others read -1).
        lookalike_spread: s in (0, 1]: a member's centre is ``sqrt(1 - s^2) * family centre +
            s * own centre`` (std 1 per dimension as every centre), so members lie s times as
            far apart as two unrelated identities.
    """

    def __init__(self, num_classes, feature_dim=128, samples_per_class="megaface2", mode="feature",
                 noise=0.8, nuisance=2.0, nuisance_rank=8, latent_dim=64, hidden_dim=256,
                 image_size=112, pixel_noise=0.1, seed=0, first_class=0, lookalikes=0.0,
                 family_size=2, lookalike_spread=0.3, **zipf):
        for name, value in (("num_classes", num_classes), ("feature_dim", feature_dim),
                            ("latent_dim", latent_dim), ("hidden_dim", hidden_dim),
                            ("image_size", image_size)):
            _positive_int(value, name)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        for name, value in (("noise", noise), ("nuisance", nuisance), ("pixel_noise", pixel_noise)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if isinstance(nuisance_rank, bool) or not isinstance(nuisance_rank, int) or nuisance_rank < 0:
            raise ValueError(f"nuisance_rank must be an int >= 0, got {nuisance_rank!r}")
        if isinstance(first_class, bool) or not isinstance(first_class, int) or first_class < 0:
            raise ValueError(f"first_class must be an int >= 0, got {first_class!r}")
        if not 0.0 <= lookalikes <= 1.0 or not 0.0 < lookalike_spread <= 1.0:
            raise ValueError(f"lookalikes must be in [0, 1] and lookalike_spread in (0, 1], got "
                             f"{lookalikes!r}, {lookalike_spread!r}")
        if isinstance(family_size, bool) or not isinstance(family_size, int) or family_size < 2:
            raise ValueError(f"family_size must be an int >= 2, got {family_size!r}")
        if first_class + num_classes > 2**62:
            raise ValueError(f"class ids must stay below 2**62, got first_class + num_classes = "
                             f"{first_class + num_classes}")
        self.num_classes, self.feature_dim, self.mode = num_classes, feature_dim, mode
        self.noise, self.nuisance, self.nuisance_rank = float(noise), float(nuisance), nuisance_rank
        self.latent_dim, self.hidden_dim = latent_dim, hidden_dim
        self.image_size, self.pixel_noise = image_size, float(pixel_noise)
        self.seed, self.first_class = seed, first_class
        self.lookalikes, self.family_size = float(lookalikes), family_size
        self.lookalike_spread = float(lookalike_spread)
        ids = torch.arange(first_class, first_class + num_classes, dtype=torch.int64)
        self.class_counts = long_tail_counts(ids, samples_per_class, seed, **zipf)
        self._ends = torch.cumsum(self.class_counts, 0)
        self._starts = self._ends - self.class_counts
        self._labels = None
        self._maps = {}  # device -> the fixed random maps' weights

    # ----------------------------------------------------------------------------- indexing
    def __len__(self):
        return int(self._ends[-1])

    @property
    def labels(self):
        """int64 tensor [N]: the class of every sample index (grouped: class 0's samples first)."""
        if self._labels is None:
            self._labels = torch.repeat_interleave(torch.arange(self.num_classes), self.class_counts)
        return self._labels

    @property
    def sample_shape(self):
        """The shape of one sample: (F,) or (3, image_size, image_size)."""
        if self.mode == "feature":
            return (self.feature_dim,)
        return (3, self.image_size, self.image_size)

    def locate(self, indices):
        """Dataset indices -> (class, sample index within the class).

        Args:
            indices: int64 tensor [n], each in [0, len(self)).
        Returns:
            (classes int64 [n], sample_ids int64 [n]) on the CPU.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        classes = torch.searchsorted(self._ends, indices, right=True)
        return classes, indices - self._starts[classes]

    def __getitem__(self, i):
        """Sample i: (x float32 of ``sample_shape``, label int)."""
        if i < 0:
            i += len(self)
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0])

    def __getitems__(self, indices):
        """The batched fetch ``DataLoader`` uses: a list of (x, label) for indices, made at once."""
        x, y = self.get_batch(torch.as_tensor(indices, dtype=torch.int64))
        return list(zip(x.unbind(0), y.unbind(0)))

    def get_batch(self, indices, device=None):
        """Samples by dataset index, generated together.

        Args:
            indices: int64 tensor [n] in [0, len(self)).
            device: where to generate (default: the CPU).
        Returns:
            (x float32 [n, *sample_shape], y int64 [n]: the local class labels), on ``device``.
        """
        classes, sample_ids = self.locate(indices)
        classes, sample_ids = classes.to(device), sample_ids.to(device)
        return self.sample(classes, sample_ids), classes

    # ----------------------------------------------------------------------------- generation
    def sample(self, classes, sample_ids):
        """Generates sample ``sample_ids[i]`` of class ``classes[i]`` (vectorised; the hot path).

        Sample ids are not checked against ``class_counts``: ids past a class's count are samples
        never seen in training (``fresh_samples``).

        Args:
            classes: int64 tensor [n] of local class ids in [0, C).
            sample_ids: int64 tensor [n], >= 0, on the same device.
        Returns:
            float32 tensor [n, *sample_shape] on the device of ``classes``.
        """
        classes = torch.as_tensor(classes, dtype=torch.int64)
        sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=classes.device)
        if classes.shape != sample_ids.shape or classes.dim() != 1:
            raise ValueError(f"classes and sample_ids must both be [n], got {tuple(classes.shape)} "
                             f"and {tuple(sample_ids.shape)}")
        z = self._latent(classes + self.first_class, sample_ids)
        maps = self._weights(classes.device)
        if self.mode == "feature":
            return F.gelu(z @ maps["w1"] + maps["b1"]) @ maps["w2"]
        return self._image(z, classes + self.first_class, sample_ids, maps)

    def _latent(self, ids, sample_ids):
        """[n] global class ids, [n] sample ids -> float32 latents [n, latent_dim]."""
        dim, rank = self.latent_dim, self.nuisance_rank
        z = self._centres(ids)
        eps = _hashrng.normal(_hashrng.key(self.seed, _NOISE, ids, sample_ids), dim + rank)
        z = z + self.noise * eps[:, :dim]
        if rank:
            z = z + self.nuisance * (eps[:, dim:] @ self._weights(ids.device)["nuisance"])
        return z

    def _centres(self, ids):
        """[n] global class ids -> float32 class centres [n, latent_dim] (planted families mixed in)."""
        z = _hashrng.normal(_hashrng.key(self.seed, _CENTRE, ids), self.latent_dim)
        if not self.lookalikes:
            return z
        family = ids // self.family_size
        s = self.lookalike_spread
        shared = _hashrng.normal(_hashrng.key(self.seed, _FAMILY, family), self.latent_dim)
        return torch.where(self._planted(family)[:, None], (1 - s * s) ** 0.5 * shared + s * z, z)

    def _planted(self, family):
        """[n] family ids -> bool [n]: the family is planted (a hash of the seed and the family)."""
        return _hashrng.uniform(_hashrng.key(self.seed, _FAMILY_PICK, family), 1)[:, 0] < self.lookalikes

    def planted_partners(self, classes):
        """The planted look-alikes of local classes: int64 [n, family_size - 1] local ids, -1 where
        a class is in no family or a member falls outside this dataset.

        Args:
            classes: int64 tensor [n] of local class ids.
        """
        classes = torch.as_tensor(classes, dtype=torch.int64).reshape(-1).cpu()
        ids = classes + self.first_class
        family = ids // self.family_size
        members = family[:, None] * self.family_size + torch.arange(self.family_size)
        others = members[members != ids[:, None]].view(len(ids), self.family_size - 1) - self.first_class
        ok = (others >= 0) & (others < self.num_classes) & self._planted(family)[:, None]
        ok &= self.lookalikes > 0
        return torch.where(ok, others, -1)

    def _weights(self, device):
        """The fixed random maps (a function of the seed only), made once per device."""
        device = torch.device(device)
        if device not in self._maps:
            def gauss(stream, rows, cols, scale):
                keys = _hashrng.key(self.seed, stream, torch.arange(rows, device=device))
                return _hashrng.normal(keys, cols) * scale

            dim, hidden = self.latent_dim, self.hidden_dim
            maps = {
                # unit-length (on average) shared nuisance directions
                "nuisance": gauss(_NUISANCE, self.nuisance_rank, dim, 1 / math.sqrt(dim)),
                "w1": gauss(_W1, dim, hidden, 1 / math.sqrt(dim)),
                "b1": gauss(_B1, 1, hidden, 0.5)[0],
                "w2": gauss(_W2, hidden, self.feature_dim, 1 / math.sqrt(hidden)),
            }
            if self.mode == "image":
                maps["w_img"] = gauss(_W_IMG, dim, 3 * _PATTERN * _PATTERN, 1 / math.sqrt(dim))
            self._maps[device] = maps
        return self._maps[device]

    def _image(self, z, ids, sample_ids, maps):
        """Latents [n, L] -> images [n, 3, S, S] in [-1, 1]: upsampled pattern + pixel noise."""
        n, side = z.shape[0], self.image_size
        pattern = torch.tanh(z @ maps["w_img"]).view(n, 3, _PATTERN, _PATTERN)
        img = F.interpolate(pattern, size=(side, side), mode="bilinear", align_corners=False)
        if self.pixel_noise:
            keys = _hashrng.key(self.seed, _PIXELS, ids, sample_ids)
            u = _hashrng.uniform8(keys, 3 * side * side).view(n, 3, side, side)
            img = img + self.pixel_noise * (2 * u - 1)
        return img.clamp_(-1.0, 1.0)

    # ----------------------------------------------------------------------------- evaluation
    def fresh_samples(self, classes, n_per_class, device=None):
        """New samples of training identities: sample ids ``class_counts[c] ..`` (never in ``self``).

        Args:
            classes: int64 tensor [m] of local class ids.
            n_per_class: samples per class.
            device: where to generate (default: the CPU).
        Returns:
            (x float32 [m * n_per_class, *sample_shape], y int64 [m * n_per_class]), class-major.
        """
        classes = torch.as_tensor(classes, dtype=torch.int64).reshape(-1).cpu()
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"classes must be in [0, {self.num_classes})")
        y = classes.repeat_interleave(n_per_class)
        sample_ids = self.class_counts[y] + torch.arange(n_per_class).repeat(classes.numel())
        y, sample_ids = y.to(device), sample_ids.to(device)
        return self.sample(y, sample_ids), y

    def head_tail_split(self, threshold):
        """Class ids with at least / fewer than ``threshold`` training samples.

        Returns:
            (head int64 [H], tail int64 [C - H]) local class ids, ascending.
        """
        head = self.class_counts >= threshold
        return torch.nonzero(head)[:, 0], torch.nonzero(~head)[:, 0]

    def heldout(self, num_classes, samples_per_class=10, first_class=None, **zipf):
        """A dataset of ``num_classes`` new identities generated like this one (same seed, maps, noise).

        Args:
            num_classes: identities in the view; its labels are 0..num_classes-1.
            samples_per_class: as in the constructor.
            first_class: global id of its first identity; default: just past this dataset's ids.
                Its ids must not overlap this dataset's.
        Returns:
            SyntheticIdentities.
        """
        if first_class is None:
            first_class = self.first_class + self.num_classes
        if first_class < self.first_class + self.num_classes and \
                first_class + num_classes > self.first_class:
            raise ValueError(f"held-out ids [{first_class}, {first_class + num_classes}) overlap this "
                             f"dataset's [{self.first_class}, {self.first_class + self.num_classes})")
        return SyntheticIdentities(
            num_classes, self.feature_dim, samples_per_class, self.mode, self.noise, self.nuisance,
            self.nuisance_rank, self.latent_dim, self.hidden_dim, self.image_size, self.pixel_noise,
            self.seed, first_class, self.lookalikes, self.family_size, self.lookalike_spread, **zipf)

    def __repr__(self):
        return (f"SyntheticIdentities(num_classes={self.num_classes}, samples={len(self)}, "
                f"mode={self.mode!r}, sample_shape={self.sample_shape}, noise={self.noise}, "
                f"nuisance={self.nuisance}, seed={self.seed}, first_class={self.first_class}"
                + (f", lookalikes={self.lookalikes}, family_size={self.family_size}, "
                   f"lookalike_spread={self.lookalike_spread})" if self.lookalikes else ")"))
