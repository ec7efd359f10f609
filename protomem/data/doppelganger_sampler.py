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
        n_ident = len(self._identities)
        # label -> identity index (-1: none); the extra last entry answers label -1
        self._position = np.full(lists.num_classes + 1, -1, np.int32)
        self._position[ids] = np.arange(n_ident)
        # scratch of batch(): marks per identity (all False between calls, but the last entry, the
        # index of "no look-alike", always True) and a slot per identity
        self._mark = np.zeros(n_ident + 1, bool)
        self._mark[-1] = True
        self._slot = np.zeros(n_ident + 1, np.int64)
        self._draws_epoch, self._draws = None, None

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
        order, u, offsets = (d[b] for d in self._epoch_draws(epoch))
        anchors, tail = ident[:n_id - n], ident[n_id - n:]
        # every anchor once (random order) before any twice
        source = anchors[np.resize(np.argsort(order[:len(anchors)]), n)]
        cand = self._lookalike(source, u[:n])
        # a slot takes its candidate when it is listed, not an anchor and not an earlier slot's
        # (scratch marks per identity instead of np.isin / np.unique: this runs every step)
        mark, slot, at = self._mark, self._slot, np.arange(n)
        mark[anchors] = True
        slot[cand[::-1]] = at[::-1]  # the first slot naming an identity writes last
        take = ~mark[cand] & (slot[cand] == at)
        mined = cand[take]
        mark[anchors] = False
        mark[mined] = True
        tail_mined = mark[tail]  # random tail identities that a look-alike now brings
        mark[mined] = False
        offsets = offsets[:n][take] % self._counts[mined]
        kept_tail = rows[n_id - n:][~tail_mined][:n - len(mined)]
        out = np.concatenate([rows[:n_id - n], self._samples(mined, offsets), kept_tail])
        return out.transpose(1, 0, 2).reshape(-1)

    def _epoch_draws(self, epoch):
        """The random numbers of every batch of an epoch, drawn at once from (seed, epoch):
        anchor order keys, look-alike picks in [0, 1) and sample offsets, each [batches, G]."""
        if self._draws_epoch != (self.seed, epoch):
            rng = np.random.default_rng([self.seed, int(epoch), _STREAM])
            shape = (len(self), self.group)
            self._draws = (rng.random(shape), rng.random(shape),
                           rng.integers(0, np.iinfo(np.int64).max, shape))
            self._draws_epoch = (self.seed, epoch)
        return self._draws

    def _lookalike(self, source, u):
        """A random listed look-alike (identity index) of each ``source`` identity, -1 if none."""
        listed = self.lists.others[self._identities[source]]  # labels, best first, -1 last
        count = (listed >= 0).sum(axis=1)
        label = listed[np.arange(len(source)), (u * count).astype(np.int64)]  # u < 1: j < count
        return self._position[label]

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
