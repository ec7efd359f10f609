"""memory_update_: the one fused prototype-memory update (refresh hits, enqueue misses, evict)."""
import torch


def index_capacity(memory_size):
    """Length T of the label->slot index for a memory of ``memory_size`` slots: the smallest power
    of two >= 2 * memory_size (at least 16)."""
    if memory_size <= 0:
        raise ValueError(f"memory_size must be positive, got {memory_size}")
    return max(16, 1 << (2 * memory_size - 1).bit_length())


def memory_update_(protos, slot_labels, stamps, index_keys, index_vals, counters, classes,
                   new_protos, momentum=0.0, policy="lru"):
    """Writes the prototypes of one step's classes into the memory, in place.

    For each class: a hit (already in memory) is refreshed to ``normalize(a*P[old] + (1-a)*p)``
    (``a = momentum``; 0 replaces), a miss is enqueued at the ring head evicting the slot's
    previous class. ``policy="lru"`` writes every class of the step into one contiguous window at
    the head (a hit's old slot is freed first), so the least recently seen classes are dropped;
    ``policy="fifo"`` refreshes hits in place and gives misses the next head slots that hold no
    class of this step. Every written slot gets the step's stamp. A row of ``new_protos`` that is
    not finite, or a negative class id, is never written (counted as rejected; it is treated as
    absent from the step). No host synchronisation.

    Args:
        protos: [M, D] float32/bfloat16/float16 memory (written).
        slot_labels: [M] int64 class of each slot, -1 empty (written).
        stamps: [M] int64 step of each slot's last write (written).
        index_keys, index_vals: [T] int64 label->slot index, T = index_capacity(M) (written).
        counters: [8] int64: head, step, hits, misses, evictions, rejected, tombstones, rebuilds.
        classes: [U] int64 distinct class ids, U <= M (duplicates are not checked here; see
            PrototypeMemory.update).
        new_protos: [U, D] floating prototypes (any norm; written normalised).
        momentum: float in [0, 1].
        policy: "lru" or "fifo".

    Returns:
        [U] int64 slot of each class after the update (-1 for a rejected class no longer held).
    """
    return torch.ops.protomem.memory_update_(
        protos, slot_labels, stamps, index_keys, index_vals, counters, classes, new_protos,
        float(momentum), policy,
    )


@torch.library.register_fake("protomem::memory_update_")
def _fake(protos, slot_labels, stamps, index_keys, index_vals, counters, classes, new_protos,
          momentum, policy):
    return torch.empty_like(classes)
