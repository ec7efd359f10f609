"""DoppelgangerLists: for every class, the k classes that recently looked most like it.

Host-side (numpy), ``num_classes x k`` entries of an int32 class id and a float16 score:
6 k bytes per class (k = 4: 24 bytes; 1e7 classes: 240 MB). An update costs O(n k) for n pairs.

The rule (decayed evidence): a pair (a, b, cos) - a row of class a whose closest other class
was b at cosine ``cos`` - is evidence ``(1 + cos) / 2`` in [0, 1] that b looks like a. When class
a is updated, the scores already in its list are first multiplied by ``decay`` (once per update,
not per pair), then each look-alike's evidence of this update (summed over its pairs) is added
to its score (0 for a newcomer), and the k highest scores stay (ties: the smaller class id). A
true look-alike is the closest other class of many of a's rows, update after update, so its
score builds up; a one-off (noise: a sample that happened to fall near another class) fades by
``decay`` per update of the class. With ``symmetric`` the pair also offers a to b's list. Each
list is kept sorted by score, best first.
"""
import numpy as np
import torch


def _to_numpy(t, dtype):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.asarray(t).astype(dtype, copy=False).reshape(-1)


class DoppelgangerLists:
    """Look-alike lists of ``num_classes`` classes (ids 0 .. num_classes - 1), k per class.

    Args:
        num_classes: C (class ids >= C or < 0 in an update are ignored).
        k: look-alikes kept per class.
        decay: in (0, 1], the factor on a class's scores at each of its updates (1: no decay,
            pure highest cosine).
        symmetric: a pair (a, b) also offers a to b's list.
    """

    def __init__(self, num_classes, k=4, decay=0.9, symmetric=True):
        for name, v in (("num_classes", num_classes), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_classes >= 2**31:
            raise ValueError(f"num_classes must be < 2**31 (int32 ids), got {num_classes}")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.num_classes, self.k = int(num_classes), int(k)
        self.decay, self.symmetric = float(decay), bool(symmetric)
        self.others = np.full((self.num_classes, self.k), -1, np.int32)
        self.scores = np.zeros((self.num_classes, self.k), np.float16)
        self.updates = 0

    @property
    def nbytes(self):
        """Bytes held: 6 * num_classes * k."""
        return self.others.nbytes + self.scores.nbytes

    def lookalikes(self, classes):
        """int64 [n, k]: the look-alikes of ``classes`` (int array [n]), best first, -1 = empty."""
        return self.others[_to_numpy(classes, np.int64)].astype(np.int64)

    def update_packed(self, packed):
        """Update from ``protomem.mining.pack_pairs`` output (a device tensor: one transfer)."""
        packed = packed.detach().cpu()
        rows, others, bits = packed[:, 0], packed[:, 1], packed[:, 2]
        self.update(rows, others, bits.to(torch.int32).view(torch.float32))

    def update(self, rows, others, cos):
        """Adds pairs (row class, closest other class, cosine): arrays or tensors [n].

        Pairs with a class outside [0, C), a == b, or a non-finite cosine are ignored.
        """
        rows, others = _to_numpy(rows, np.int64), _to_numpy(others, np.int64)
        cos = _to_numpy(cos, np.float32)
        C = self.num_classes
        keep = (rows >= 0) & (rows < C) & (others >= 0) & (others < C) & (rows != others) & np.isfinite(cos)
        rows, others, cos = rows[keep], others[keep], cos[keep]
        if self.symmetric:
            rows, others, cos = np.concatenate([rows, others]), np.concatenate([others, rows]), np.tile(cos, 2)
        self.updates += 1
        if rows.size == 0:
            return
        score = np.clip((1.0 + cos) / 2.0, 0.0, 1.0).astype(np.float32)
        # distinct (row, other) pairs, the summed evidence of each
        order = np.lexsort((others, rows))
        rows, others, score = rows[order], others[order], score[order]
        first = np.ones(rows.size, bool)
        first[1:] = (rows[1:] != rows[:-1]) | (others[1:] != others[:-1])
        score = np.add.reduceat(score, np.flatnonzero(first)).astype(np.float32)
        rows, others = rows[first], others[first]
        classes, start, count = np.unique(rows, return_index=True, return_counts=True)
        # the new candidates of each updated class in a [U, m] grid
        u = np.repeat(np.arange(classes.size), count)
        j = np.arange(rows.size) - np.repeat(start, count)
        new_o = np.full((classes.size, int(count.max())), -1, np.int64)
        new_s = np.full(new_o.shape, -np.inf, np.float32)
        new_o[u, j], new_s[u, j] = others, score
        old_o = self.others[classes].astype(np.int64)
        old_s = np.where(old_o >= 0, self.scores[classes].astype(np.float32) * self.decay, -np.inf)
        again = (old_o[:, :, None] == new_o[:, None, :]) & (old_o[:, :, None] >= 0)  # [U, k, m]
        new_s += np.where(again, old_s[:, :, None], 0.0).sum(axis=1)
        old_s[again.any(axis=2)] = -np.inf
        cand_o = np.concatenate([np.where(np.isfinite(old_s), old_o, -1), new_o], axis=1)
        cand_s = np.concatenate([old_s, new_s], axis=1)
        top = np.lexsort((cand_o, -cand_s), axis=1)[:, :self.k]
        best_o = np.take_along_axis(cand_o, top, axis=1)
        best_s = np.take_along_axis(cand_s, top, axis=1)
        empty = ~np.isfinite(best_s)
        self.others[classes] = np.where(empty, -1, best_o).astype(np.int32)
        self.scores[classes] = np.where(empty, 0.0, best_s).astype(np.float16)

    def state_dict(self):
        """dict of tensors and settings (the lists exactly)."""
        return {"others": torch.from_numpy(self.others.copy()), "scores": torch.from_numpy(self.scores.copy()),
                "num_classes": self.num_classes, "k": self.k, "decay": self.decay,
                "symmetric": self.symmetric, "updates": self.updates}

    def load_state_dict(self, state):
        """Restores ``state_dict()`` output; the class count and k must match."""
        for name in ("num_classes", "k"):
            if state[name] != getattr(self, name):
                raise ValueError(f"state has {name}={state[name]!r}, these lists {getattr(self, name)!r}")
        self.others = state["others"].numpy().astype(np.int32, copy=True)
        self.scores = state["scores"].numpy().astype(np.float16, copy=True)
        self.decay, self.symmetric = float(state["decay"]), bool(state["symmetric"])
        self.updates = int(state["updates"])

    def __repr__(self):
        return (f"DoppelgangerLists(num_classes={self.num_classes}, k={self.k}, decay={self.decay}, "
                f"symmetric={self.symmetric}, {self.nbytes / 2**20:.1f} MB)")


def planted_recovery(lists, partners):
    """How well the lists found known look-alikes (e.g. ``SyntheticIdentities.planted_partners``).

    Args:
        lists: DoppelgangerLists.
        partners: int64 [C, P] tensor or array: each class's true look-alikes, -1 padded (a
            class with none takes no part).
    Returns:
        dict: ``precision`` (of the planted classes with a non-empty list, the share whose best
        entry is a true look-alike), ``recall`` (of the planted classes, the share with a true
        look-alike anywhere in its list), ``found`` (planted classes with a non-empty list).
    """
    partners = _to_numpy(partners, np.int64).reshape(lists.num_classes, -1)
    planted = (partners >= 0).any(axis=1)
    listed = lists.others.astype(np.int64)
    hit = (listed[:, :, None] == partners[:, None, :]) & (partners[:, None, :] >= 0)
    found = planted & (listed[:, 0] >= 0)
    return {"precision": float(hit[found, 0].any(axis=1).mean()) if found.any() else float("nan"),
            "recall": float(hit[planted].any(axis=(1, 2)).mean()) if planted.any() else float("nan"),
            "found": int(found.sum())}
