"""lookup / rebuild_index_: read and rebuild the label->slot index of a PrototypeMemory."""
import torch


def lookup(index_keys, index_vals, labels):
    """Slot of each label in the memory.

    Args:
        index_keys, index_vals: [T] int64 label->slot index of the memory.
        labels: int64 tensor of any shape (class ids; negative ids are never present).

    Returns:
        int64 tensor shaped like ``labels``: the slot, or -1 where the class is not in memory.
    """
    return torch.ops.protomem.lookup(index_keys, index_vals, labels)


def rebuild_index_(index_keys, index_vals, slot_labels):
    """Rebuilds the index in place from ``slot_labels`` [M] int64 (-1 = empty slot): every slot s
    holding a class c maps c -> s. Used after loading state and to clear tombstones."""
    torch.ops.protomem.rebuild_index_(index_keys, index_vals, slot_labels)


@torch.library.register_fake("protomem::lookup")
def _fake_lookup(index_keys, index_vals, labels):
    return torch.empty_like(labels)


@torch.library.register_fake("protomem::rebuild_index_")
def _fake_rebuild(index_keys, index_vals, slot_labels):
    return None
