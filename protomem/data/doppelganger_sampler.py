"""DoppelgangerBatchSampler: ``IdentityBatchSampler`` batches in which a fraction of the identities
are look-alikes of others in the same batch (Doppelganger Mining, Smirnov et al., ICCVW 2017)."""
import numpy as np

from .sampler import IdentityBatchSampler

_STREAM = 0x6D696E65  # this sampler's random numbers, apart from the epoch plan's


class DoppelgangerBatchSampler(IdentityBatchSampler):
    """G identities x k samples per batch, of which ``round(fraction * G)`` are look-alikes.

    Batch b of an epoch starts as ``IdentityBatchSampler``'s batch b (random identities). Its
    first ``G - n`` identities stay (the anchors); each of the last n slots takes a look-alike
    of an anchor (the anchors in random order, each once before any twice), drawn from the anchor's list in ``lists`` (``protomem.mining
    .DoppelgangerLists``, indexed by label), when that look-alike is not already in the batch;
    otherwise the slot keeps a random identity of the original batch. A look-alike brings k
    samples (2k with ``pairs``: queries, then keys of the same identity, as the base class)
    from a random offset in its samples. The batch is built when asked for, from the lists as
    they are then: a function of (seed, epoch, b, the lists' state). The trainer updates the
    lists after every step, before it asks for the next batch.

    Args:
        labels, identities_per_batch, samples_per_identity, seed, pairs, drop_last: as
            ``IdentityBatchSampler``; labels must lie in [0, lists.num_classes).
        lists: ``DoppelgangerLists`` (shared: the caller updates it; its state is in this
            sampler's ``state_dict``).
        fraction: in [0, 1], the share of each batch's identities that are look-alikes.
    """

    def __init__(self, labels, identities_per_batch, samples_per_identity, lists, fraction=0.5,
                 seed=0, pairs=False, drop_last=True):
        super().__init__(labels, identities_per_batch, samples_per_identity, seed, pairs, drop_last)
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        ids = self._identities
        if ids[0] < 0 or ids[-1] >= lists.num_classes:
            raise ValueError(f"labels must lie in [0, lists.num_classes={lists.num_classes}), got "
                             f"[{ids[0]}, {ids[-1]}]")
        self.lists, self.fraction = lists, float(fraction)
        self._identity_of = np.empty(self.num_samples, np.int64)  # sample index -> identity index
        self._identity_of[self._grouped] = self._group_of
        self._mark = np.zeros(len(self._identities), bool)  # scratch of batch(), all False between calls

    def state_dict(self, batches_done=None):
        """The base position plus ``fraction`` and the lists (``doppelgangers``)."""
        return super().state_dict(batches_done) | {"mining_fraction": self.fraction,
                                                   "doppelgangers": self.lists.state_dict()}

    def load_state_dict(self, state):
        """Restores the position and, when the state holds them, the lists."""
        super().load_state_dict(state)
        if "doppelgangers" in state:
            self.lists.load_state_dict(state["doppelgangers"])

    def batch(self, epoch, b):
        """Batch b of the epoch with look-alikes, from the lists' current state."""
        base = np.asarray(super().batch(epoch, b))
        k = self.k
        halves = 2 if self.pairs else 1
        n_id = len(base) // (halves * k)
        # rows [n_id, halves, k]: each identity's queries (and keys)
        rows = base.reshape(halves, n_id, k).transpose(1, 0, 2)
        ident = self._identity_of[rows[:, 0, 0]]
        n = int(round(self.fraction * n_id)) if n_id >= 2 else 0
        n = min(n, n_id - 1)
        if n == 0:
            return base
        rng = np.random.default_rng([self.seed, int(epoch), int(b), _STREAM])
        anchors, tail = ident[:n_id - n], ident[n_id - n:]
        # every anchor once (random order) before any twice
        source = anchors[np.resize(rng.permutation(len(anchors)), n)]
        cand = self._lookalike(source, rng.random(n))
        # a slot takes its candidate when it is listed, not an anchor and not an earlier slot's
        # (a scratch mark per identity instead of np.isin / np.unique: this runs every step)
        mark = self._mark
        mark[anchors] = True
        take = np.zeros(n, bool)
        for i, c in enumerate(cand.tolist()):
            if c >= 0 and not mark[c]:
                mark[c] = take[i] = True
        mined = cand[take]
        mark[anchors] = False
        tail_mined = mark[tail]  # random tail identities that a look-alike now brings
        mark[mined] = False
        offsets = rng.integers(0, np.iinfo(np.int64).max, n)[take] % self._counts[mined]
        kept_tail = rows[n_id - n:][~tail_mined][:n - len(mined)]
        out = np.concatenate([rows[:n_id - n], self._samples(mined, offsets), kept_tail])
        return out.transpose(1, 0, 2).reshape(-1)

    def _lookalike(self, source, u):
        """A random listed look-alike (identity index) of each ``source`` identity, -1 if none."""
        listed = self.lists.lookalikes(self._identities[source])  # labels, best first, -1 last
        count = (listed >= 0).sum(axis=1)
        j = np.minimum((u * count).astype(np.int64), np.maximum(count - 1, 0))
        label = listed[np.arange(len(source)), j]
        pos = np.searchsorted(self._identities, label).clip(0, len(self._identities) - 1)
        return np.where((count > 0) & (self._identities[pos] == label), pos, -1)

    def _samples(self, ident, offsets):
        """[n, halves, k] sample indices of identities ``ident`` from ``offsets`` on, cycling; keys
        follow the queries, shifted by one where cycling would put key i on query i's sample."""
        k, counts = self.k, self._counts[ident][:, None]
        pos = offsets[:, None] + np.arange(k)
        if self.pairs:
            shift = ((counts < 2 * k) & (counts >= 2) & (k % counts == 0)).astype(np.int64)
            pos = np.stack([pos, pos + k + shift], axis=1)
        else:
            pos = pos[:, None, :]
        return self._grouped[self._starts[ident][:, None, None] + pos % counts[:, :, None]]
