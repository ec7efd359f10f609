"""DoppelgangerLists: for every class, the k classes that recently looked most like it.

Host-side (numpy), ``num_classes x k`` entries of an int32 class id and a float16 score:
6 k bytes per class (k = 4: 24 bytes; 1e7 classes: 240 MB). An update of n pairs is a C++ host op
(``lookalike_update_``), O(n log n + n k): tens of microseconds for a batch of 512 rows.

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

from ..ops.lookalike_update import lookalike_update_


def _to_tensor(t, dtype):
    """A contiguous 1-d CPU tensor of ``dtype`` from an array, list or tensor."""
    if isinstance(t, torch.Tensor):
        return t.detach().reshape(-1).to("cpu", dtype).contiguous()
    np_dtype = {torch.int64: np.int64, torch.float32: np.float32}[dtype]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(t, dtype=np_dtype).reshape(-1)))


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
        self._apply(packed[:, 0], packed[:, 1], packed[:, 2].to(torch.int32).view(torch.float32))

    def update(self, rows, others, cos):
        """Adds pairs (row class, closest other class, cosine): arrays or tensors [n].

        Pairs with a class outside [0, C), a == b, or a non-finite cosine are ignored. The work
        is the host op ``torch.ops.protomem.lookalike_update_`` (C++; the rule written pair by
        pair is ``protomem.reference.lookalike_update_ref``).
        """
        rows, others, cos = (_to_tensor(rows, torch.int64), _to_tensor(others, torch.int64),
                             _to_tensor(cos, torch.float32))
        if not rows.shape == others.shape == cos.shape:
            raise ValueError(f"rows, others and cos must have one length, got {tuple(rows.shape)}, "
                             f"{tuple(others.shape)}, {tuple(cos.shape)}")
        self._apply(rows, others, cos)

    def _apply(self, rows, others, cos):
        """One update: int64 / int64 / float32 CPU tensors [n] into the lists, in place."""
        self.updates += 1
        lookalike_update_(torch.from_numpy(self.others), torch.from_numpy(self.scores), rows, others,
                          cos, self.decay, self.symmetric)

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
