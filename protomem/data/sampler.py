"""IdentityBatchSampler: batches of G distinct identities x k samples each, resumable mid-epoch.

An epoch cuts every identity's shuffled samples into chunks of k (2k with ``pairs``); an identity
with fewer samples gives one chunk, filled by cycling through its samples. Chunks are laid out
identity by identity (identities in random order) and dealt row by row into a grid of G rows and
one column per batch, so the chunks of one identity land in consecutive, hence distinct, columns
as long as no identity has more chunks than there are batches (more are dropped for the epoch).
"""
import numpy as np
import torch


def _count_arg(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _full_batches(chunks, group):
    """The largest B with sum(min(chunks, B)) >= B * group: full batches when an identity may
    give at most one chunk per batch. ``h(B) = sum(min(chunks, B)) - group * B`` is concave with
    h(0) = 0 and h(1) >= 0, so the B with h(B) >= 0 form an interval [0, B*]: a binary search."""
    lo, hi = 1, int(chunks.sum()) // group
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(chunks, mid).sum()) >= mid * group:
            lo = mid
        else:
            hi = mid - 1
    return lo


class IdentityBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for identity losses; use as ``DataLoader(ds, batch_sampler=sampler)``.

    Each batch holds G distinct identities with k sample indices each, identity by identity
    (G*k indices). Within an epoch a sample index repeats only when its identity has fewer than
    k samples (2k with ``pairs``); samples left over after cutting chunks wait for a later epoch.
    Batches are a function of (seed, epoch, labels) only.

    With ``pairs=True`` a batch is 2*G*k indices: G*k queries, then G*k keys in the same order;
    key i is another sample of query i's identity whenever the identity has >= 2 samples (the
    Dynamic Class Queue's second view).

    Args:
        labels: int tensor or array [N], the identity of every sample (any int values).
        identities_per_batch: G (the labels must hold at least G identities).
        samples_per_identity: k.
        seed: int.
        pairs: emit query and key halves as above.
        drop_last: drop the last, smaller batch (fewer than G identities) instead of yielding it.
    """

    def __init__(self, labels, identities_per_batch, samples_per_identity, seed=0, pairs=False,
                 drop_last=True):
        self.group = _count_arg(identities_per_batch, "identities_per_batch")
        self.k = _count_arg(samples_per_identity, "samples_per_identity")
        self.seed, self.pairs, self.drop_last = int(seed), bool(pairs), bool(drop_last)
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-d int array, got {labels.dtype} {labels.shape}")
        self._identities, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if len(counts) < self.group:
            raise ValueError(f"identities_per_batch={self.group} needs at least that many "
                             f"identities, labels hold {len(counts)}")
        self.num_samples = len(labels)
        self._grouped = np.argsort(inverse, kind="stable")  # sample indices, identity by identity
        self._group_of = inverse[self._grouped]  # identity of each position of _grouped
        self._counts = counts
        self._starts = np.cumsum(counts) - counts
        chunk = self.k * (2 if self.pairs else 1)
        chunks = np.maximum(counts // chunk, 1)
        self._full = _full_batches(chunks, self.group)
        self._chunks = np.minimum(chunks, self._full)
        self._partial = 0 if self.drop_last else int(self._chunks.sum()) - self._full * self.group
        self.epoch, self._done, self._resume = 0, 0, None
        self._plan_epoch, self._plan = None, None

    def __len__(self):
        """Batches per epoch (the same every epoch)."""
        return self._full + (1 if self._partial else 0)

    def set_epoch(self, epoch):
        """Selects the epoch whose batches the next iteration yields."""
        if epoch != self.epoch:
            self.epoch, self._done = int(epoch), 0

    def state_dict(self, batches_done=None):
        """The position to resume from.

        Args:
            batches_done: batches of this epoch the training consumed; default: the batches this
                sampler has yielded (more than consumed when a DataLoader prefetches).
        Returns:
            dict with epoch, batches_done, seed and the settings a resume must share.
        """
        return {"epoch": self.epoch, "batches_done": self._done if batches_done is None
                else int(batches_done), "seed": self.seed, "num_samples": self.num_samples,
                "identities_per_batch": self.group, "samples_per_identity": self.k,
                "pairs": self.pairs, "drop_last": self.drop_last, "num_batches": len(self)}

    def load_state_dict(self, state):
        """Restores a position: the next iteration of that epoch yields the batches after it."""
        mine = self.state_dict()
        for name in ("num_samples", "identities_per_batch", "samples_per_identity", "pairs",
                     "drop_last", "num_batches"):
            if state[name] != mine[name]:
                raise ValueError(f"state has {name}={state[name]!r}, this sampler {mine[name]!r}")
        done = int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done must be in [0, {len(self)}], got {done}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._done, self._resume = done, (self.epoch, done)
        self._plan_epoch = None

    def __iter__(self):
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume, self._done = None, start
        for b in range(start, len(self)):
            self._done = b + 1
            yield self.batch(self.epoch, b).tolist()

    def batch(self, epoch, b):
        """Batch ``b`` of an epoch: int64 array [G*k] (2*G*k with pairs), as ``batches(epoch)[b]``.
        Subclasses that build batches from a state (mining) build them here, when asked."""
        return self.batches(epoch)[b]

    def batches(self, epoch):
        """All batches of an epoch.

        Returns:
            int64 array [num_batches, G*k] (2*G*k with pairs); with ``drop_last=False`` the last
            batch may be shorter, so then a list of int64 arrays.
        """
        if self._plan_epoch != (self.seed, epoch):
            self._plan, self._plan_epoch = self._make_plan(epoch), (self.seed, epoch)
        return self._plan

    def _make_plan(self, epoch):
        rng = np.random.default_rng([self.seed, int(epoch)])
        # 1. Each identity's samples in random order (sorting identity + u, u in [0, 1)).
        shuffled = self._grouped[np.argsort(self._group_of + rng.random(self.num_samples))]
        # 2. Chunks identity by identity, identities in random order.
        ident = rng.permutation(len(self._counts))
        per = self._chunks[ident]
        chunk_id = np.repeat(ident, per)
        chunk_no = np.arange(len(chunk_id)) - np.repeat(np.cumsum(per) - per, per)
        # 3. Deal them row-major into G rows x columns; a partial last column gets rows < partial.
        cols = self._full + (1 if self._partial else 0)
        cells = np.arange(self.group * cols)
        cells = cells[(cells % cols < self._full) | (cells // cols < self._partial)]
        chunk_id, chunk_no = chunk_id[:len(cells)], chunk_no[:len(cells)]
        row, col = cells // cols, cells % cols
        # 4. The sample positions of each chunk, cycling within identities too small for a chunk.
        samples = self._chunk_samples(shuffled, chunk_id, chunk_no)
        # 5. Full batches in random order, the partial one last.
        order = np.concatenate([rng.permutation(self._full), np.arange(self._full, cols)])
        rank = np.empty(cols, np.int64)
        rank[order] = np.arange(cols)
        grid = np.full((cols, self.group) + samples.shape[1:], -1, np.int64)
        grid[rank[col], row] = samples
        if self.pairs:  # [cols, G, 2, k] -> queries of the G identities, then their keys
            grid = grid.transpose(0, 2, 1, 3)
        grid = grid.reshape(cols, -1)
        if not self._partial:
            return grid
        last = grid[-1]
        return list(grid[:-1]) + [last[last >= 0]]

    def _chunk_samples(self, shuffled, ident, chunk_no):
        """Sample indices of chunks: [n, k], or [n, 2, k] (queries, keys) with pairs."""
        k, counts = self.k, self._counts[ident]
        pos = chunk_no[:, None] * (2 * k if self.pairs else k) + np.arange(k)
        if self.pairs:
            # Keys follow the queries; when cycling would land key i on query i's sample
            # (k a multiple of the count), shift the keys by one.
            shift = ((counts < 2 * k) & (counts >= 2) & (k % counts == 0)).astype(np.int64)
            pos = np.stack([pos, pos + k + shift[:, None]], axis=1)
        pos = pos % counts.reshape((-1,) + (1,) * (pos.ndim - 1))
        return shuffled[self._starts[ident].reshape(pos.shape[:1] + (1,) * (pos.ndim - 1)) + pos]
