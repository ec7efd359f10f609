"""memory_update_: the one fused prototype-memory update (refresh hits, enqueue misses, evict)."""
import torch


def index_capacity(memory_size):
    """Length T of the label->slot index for a memory of ``memory_size`` slots: the smallest power
    of two >= 2 * memory_size (at least 16)."""
    if memory_size <= 0:
        raise ValueError(f"memory_size must be positive, got {memory_size}")
    return max(16, 1 << (2 * memory_size - 1).bit_length())


def workspace_numel(num_classes, embedding_size):
    """int64 elements of the CUDA scratch of ``memory_update_`` for U = ``num_classes`` classes of
    dimension D = ``embedding_size`` (csrc/memory_layout.h::memory_workspace_numel)."""
    return 6 * num_classes + 8 + (num_classes * embedding_size + 1) // 2


def memory_update_(protos, slot_labels, stamps, index_keys, index_vals, counters, classes,
                   new_protos, momentum=0.0, policy="lru", commit=None, workspace=None,
                   with_previous=False):
    """Writes the prototypes of one step's classes into the memory, in place.

    For each class: a hit (already in memory) is refreshed to ``normalize(a*P[old] + (1-a)*p)``
    (``a = momentum``; 0 replaces), a miss is enqueued at the ring head evicting the slot's
    previous class. ``policy="lru"`` writes every class of the step into one contiguous window at
    the head (a hit's old slot is freed first), so the least recently seen classes are dropped;
    ``policy="fifo"`` refreshes hits in place and gives misses the next head slots that hold no
    class of this step. Every written slot gets the step's stamp. A row of ``new_protos`` that is
    not finite, or a negative class id, is never written (counted as rejected; it is treated as
    absent from the step); class id -1 is padding (``generate_prototypes(padded=True)``): skipped
    and not counted. No host synchronisation; on CUDA three kernels plus an index rebuild kernel
    that returns at once unless a rebuild is due.

    Args:
        protos: [M, D] float32/bfloat16/float16 memory (written).
        slot_labels: [M] int64 class of each slot, -1 empty (written).
        stamps: [M] int64 step of each slot's last write (written).
        index_keys, index_vals: [T] int64 label->slot index, T = index_capacity(M) (written).
        counters: [9] int64: head, step, hits, misses, evictions, rejected, tombstones, rebuilds,
            lost index inserts (written).
        classes: [U] int64 class ids, U <= M. Ids >= 0 must be distinct: duplicates are not
            checked (they race on CUDA) unless PROTOMEM_DEBUG=1 (a check that syncs on CUDA);
            ``PrototypeMemory.update`` checks them by default.
        new_protos: [U, D] floating prototypes (any norm; written normalised).
        momentum: float in [0, 1].
        policy: "lru" or "fifo".
        commit: optional one-element bool tensor on the memory's device; where False nothing
            (prototypes, labels, stamps, index, counters) changes, without a host sync.
        workspace: optional int64 tensor of at least ``workspace_numel(U, D)`` elements on the
            memory's device, the CUDA kernels' scratch (reused: no allocation); unused on CPU.
        with_previous: also return each class's slot and stamp before the update.

    Returns:
        [U] int64 slot of each class after the update (-1 for a rejected class no longer held);
        with ``with_previous``, (slots, previous slots, previous stamps), each [U] int64, -1
        where the class was not in memory.
    """
    out = torch.ops.protomem.memory_update_(
        protos, slot_labels, stamps, index_keys, index_vals, counters, classes, new_protos,
        float(momentum), policy, commit, workspace,
    )
    return tuple(out.unbind(0)) if with_previous else out[0]


@torch.library.register_fake("protomem::memory_update_")
def _fake(protos, slot_labels, stamps, index_keys, index_vals, counters, classes, new_protos,
          momentum, policy, commit=None, workspace=None):
    return classes.new_empty(3, classes.shape[0])
