"""PrototypeMemory and ClassQueue: state modules whose whole state is buffers, so state_dict()
and load_state_dict() restore them exactly and .to(device) moves them."""
import torch
from torch import nn

from .ops import (
    generate_prototypes,
    index_capacity,
    lookup,
    memory_update_,
    queue_enqueue_,
    rebuild_index_,
)
from .ops.memory_update import workspace_numel
from .reference import EVICTIONS, HEAD, HITS, LOST_INSERTS, MISSES, NUM_COUNTERS, Q_HEAD
from .reference import Q_REJECTED, Q_TOTAL, REBUILDS, REJECTED, STEP, TOMBSTONES

_POLICIES = ("lru", "fifo")
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _as_labels(labels, name="labels"):
    """int32/int64 labels of shape [N] or [N, 1] -> int64 [N]."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32 class ids, got {labels.dtype}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape [N] or [N, 1], got {tuple(labels.shape)}")
    return labels.long()


class PrototypeMemory(nn.Module):
    """A fixed-size memory of class prototypes (Smirnov et al., arXiv 2105.02103).

    Holds ``memory_size`` (M) unit prototypes of ``embedding_size`` (D), a ring head, a step stamp
    per slot, and a GPU-resident label->slot hash index sized from M (not from the number of
    classes in the dataset). Class ids are arbitrary non-negative int64.

    Args:
        memory_size: M, the number of slots.
        embedding_size: D.
        momentum: a in [0, 1]; a refreshed prototype is ``normalize(a*old + (1-a)*new)``.
        policy: "lru" (evict the least recently seen classes) or "fifo" (refresh in place; evict in
            insertion order, never a class of the current step).
        dtype: storage dtype of the prototypes (float32, bfloat16, float16); arithmetic is float32.
        device: where the state lives.
    """

    def __init__(self, memory_size, embedding_size, momentum=0.0, policy="lru",
                 dtype=torch.float32, device=None):
        super().__init__()
        _check_size(memory_size, "memory_size")
        _check_size(embedding_size, "embedding_size")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of {_STORAGE_DTYPES}, got {dtype}")
        self.memory_size = memory_size
        self.embedding_size = embedding_size
        self.momentum = float(momentum)
        self.policy = policy
        capacity = index_capacity(memory_size)
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("protos", torch.zeros(memory_size, embedding_size, dtype=dtype, device=device))
        self.register_buffer("slot_labels", torch.full((memory_size,), -1, **long))
        self.register_buffer("stamps", torch.zeros(memory_size, **long))
        self.register_buffer("index_keys", torch.full((capacity,), -1, **long))
        self.register_buffer("index_vals", torch.full((capacity,), -1, **long))
        self.register_buffer("counters", torch.zeros(NUM_COUNTERS, **long))
        self._workspace = None  # the CUDA update's scratch, grown on demand (not state)
        self.register_load_state_dict_post_hook(PrototypeMemory._rebuild_after_load)

    @torch.no_grad()
    def update(self, classes, prototypes, check=True, commit=None, with_previous=False):
        """Refreshes or enqueues the prototypes of one step's distinct classes.

        Args:
            classes: [U] int64/int32 distinct class ids >= 0, U <= memory_size; -1 marks padding
                (skipped, not counted) when ``check`` is False.
            prototypes: [U, D] floating (written L2-normalised). Rows that are not finite are
                skipped and counted in ``stats()["rejected"]``.
            check: verify that ``classes`` are distinct and non-negative first (one host sync on
                CUDA). Pass False for classes that come from ``generate_prototypes``.
            commit: optional 0-d bool tensor on the memory's device; where it is False the memory
                (prototypes, labels, stamps, index and counters) is left exactly as it was,
                without a host sync (a skipped step, e.g. non-finite embeddings).
            with_previous: also return each class's slot and stamp before the update.

        Returns:
            [U] int64 slot of each class (-1 for a skipped class no longer held); with
            ``with_previous``, (slots, previous slots, previous stamps), -1 where absent before.

        Raises:
            ValueError / TypeError: bad shapes, dtypes, devices, U > memory_size, negative or
                repeated class ids; the memory is unchanged.
        """
        classes = _as_labels(classes, "classes")
        if check and classes.numel():
            if bool((classes < 0).any()):
                raise ValueError("classes must be non-negative class ids")
            if classes.unique().numel() != classes.numel():
                raise ValueError("classes must be distinct; use update_from_batch for raw labels")
        return memory_update_(self.protos, self.slot_labels, self.stamps, self.index_keys,
                              self.index_vals, self.counters, classes, prototypes, self.momentum,
                              self.policy, commit=commit, workspace=self._scratch(classes.shape[0]),
                              with_previous=with_previous)

    def _scratch(self, num_classes):
        """The CUDA update's workspace for ``num_classes`` classes, kept between calls (None on
        CPU, which needs none, and while compiling, where the op allocates its own)."""
        if self.protos.device.type != "cuda" or torch.compiler.is_compiling():
            return None
        need = workspace_numel(num_classes, self.embedding_size)
        ws = self._workspace
        if ws is None or ws.numel() < need or ws.device != self.protos.device:
            self._workspace = ws = torch.empty(need, dtype=torch.long, device=self.protos.device)
        return ws

    def update_from_batch(self, x, labels, weights=None):
        """Generates the batch's class prototypes and writes them into the memory.

        Args:
            x: [B, D] embeddings (gradients are not taken through the memory).
            labels: [B] or [B, 1] int64/int32 class ids >= 0.
            weights: optional [B] non-negative exemplar weights.

        Returns:
            (classes [U], protos [U, D] float32, inverse [B], slots [U]); ``protos`` carries the
            gradient of x.
        """
        labels = _as_labels(labels)
        classes, protos, inverse = generate_prototypes(x, labels, weights)
        with torch.no_grad():
            slots = self.update(classes, protos.detach(), check=False)
        return classes, protos, inverse, slots

    @torch.no_grad()
    def lookup(self, labels):
        """Slot of each class id (int64/int32 tensor of any shape), -1 where it is not in memory."""
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be int64 or int32 class ids, got {labels.dtype}")
        return lookup(self.index_keys, self.index_vals, labels.long())

    @torch.no_grad()
    def reset(self):
        """Empties the memory: no classes, head and counters at zero."""
        self.protos.zero_()
        self.slot_labels.fill_(-1)
        self.stamps.zero_()
        self.index_keys.fill_(-1)
        self.index_vals.fill_(-1)
        self.counters.zero_()

    @torch.no_grad()
    def stats(self):
        """Occupancy and traffic (one host sync).

        Returns:
            dict: size, filled, step, head, hits, misses, evictions, rejected, index_rebuilds,
            lost_inserts (index inserts that found no free entry: 0 unless the state was
            corrupted), mean_age and max_age (in steps since each filled slot was last written; 0 if empty).
        """
        c = self.counters.tolist()
        filled = self.slot_labels >= 0
        n = int(filled.sum())
        ages = (c[STEP] - 1 - self.stamps[filled]).float()
        return {
            "size": self.memory_size,
            "filled": n,
            "step": c[STEP],
            "head": c[HEAD],
            "hits": c[HITS],
            "misses": c[MISSES],
            "evictions": c[EVICTIONS],
            "rejected": c[REJECTED],
            "index_rebuilds": c[REBUILDS],
            "lost_inserts": c[LOST_INSERTS],
            "mean_age": float(ages.mean()) if n else 0.0,
            "max_age": int(ages.max()) if n else 0,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "counters"
        counters = state_dict.get(key)
        if isinstance(counters, torch.Tensor) and counters.dim() == 1:
            if counters.numel() == LOST_INSERTS:  # saved before the lost-inserts counter existed
                counters = torch.cat([counters, counters.new_zeros(1)])
                state_dict[key] = counters
            head = int(counters[HEAD]) if counters.numel() > HEAD else 0
            if not 0 <= head < self.memory_size:
                raise ValueError(f"{key}: the ring head {head} is outside [0, memory_size="
                                 f"{self.memory_size}); the state is from another memory or edited")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _rebuild_after_load(module, incompatible_keys):
        # A checkpoint's index is valid as saved; rebuilding makes loads robust to indexes written
        # by older versions and clears tombstones.
        with torch.no_grad():
            rebuild_index_(module.index_keys, module.index_vals, module.slot_labels)
            module.counters[TOMBSTONES] = 0

    def extra_repr(self):
        return (f"memory_size={self.memory_size}, embedding_size={self.embedding_size}, "
                f"momentum={self.momentum}, policy={self.policy!r}, dtype={self.protos.dtype}, "
                f"device={self.protos.device}")


class ClassQueue(nn.Module):
    """A FIFO ring of per-sample class weights and their labels (Dynamic Class Queue,
    Li et al., arXiv 2105.11113); duplicates of a label are allowed.

    Args:
        queue_size: K, the number of entries.
        embedding_size: D.
        dtype: storage dtype (float32, bfloat16, float16).
        device: where the state lives.
    """

    def __init__(self, queue_size, embedding_size, dtype=torch.float32, device=None):
        super().__init__()
        _check_size(queue_size, "queue_size")
        _check_size(embedding_size, "embedding_size")
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of {_STORAGE_DTYPES}, got {dtype}")
        self.queue_size = queue_size
        self.embedding_size = embedding_size
        self.register_buffer("keys", torch.zeros(queue_size, embedding_size, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((queue_size,), -1, dtype=torch.long, device=device))
        self.register_buffer("counters", torch.zeros(3, dtype=torch.long, device=device))
        # the CUDA enqueue's count of finished rows, always zero between calls (not state)
        self.register_buffer("_done", torch.zeros(1, dtype=torch.long, device=device), persistent=False)

    @torch.no_grad()
    def enqueue(self, keys, labels, commit=None):
        """Appends keys [N, D] (floating) with labels [N] or [N, 1] (int64/int32), overwriting the
        oldest entries. Non-finite keys or negative labels become empty entries (counted).

        ``commit``: optional 0-d bool tensor on the queue's device; where False the queue is left
        exactly as it was, without a host sync."""
        labels = _as_labels(labels)
        if commit is not None:  # rewrite the entries the rows would overwrite with themselves
            pos = (self.counters[Q_HEAD] + torch.arange(keys.shape[0], device=keys.device)) % self.queue_size
            keys = torch.where(commit, keys, self.keys[pos])  # promotes: old rows stay exact
            labels = torch.where(commit, labels, self.labels[pos])
            saved = self.counters.clone()
        queue_enqueue_(self.keys, self.labels, self.counters, keys, labels, self._done)
        if commit is not None:
            self.counters.copy_(torch.where(commit, self.counters, saved))

    @torch.no_grad()
    def reset(self):
        """Empties the queue."""
        self.keys.zero_()
        self.labels.fill_(-1)
        self.counters.zero_()

    @torch.no_grad()
    def stats(self):
        """dict: size, filled, enqueued (rows offered so far), rejected, head (one host sync)."""
        c = self.counters.tolist()
        return {
            "size": self.queue_size,
            "filled": int((self.labels >= 0).sum()),
            "enqueued": c[Q_TOTAL],
            "rejected": c[Q_REJECTED],
            "head": c[Q_HEAD],
        }

    def extra_repr(self):
        return (f"queue_size={self.queue_size}, embedding_size={self.embedding_size}, "
                f"dtype={self.keys.dtype}, device={self.keys.device}")
