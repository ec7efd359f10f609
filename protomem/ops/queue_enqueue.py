"""queue_enqueue_: the per-sample FIFO ring of keys and labels of the Dynamic Class Queue."""
import torch


def queue_enqueue_(queue, queue_labels, counters, keys, labels, done=None):
    """Writes ``keys`` and ``labels`` at the ring head in place, overwriting the oldest entries.

    Row i of N goes to position ``(head + i) % K``; when N > K only the newest K rows remain.
    A row whose key is not finite, or whose label is negative, is stored as an empty entry
    (label -1) and counted as rejected. No host synchronisation.

    Args:
        queue: [K, D] float32/bfloat16/float16 keys (written).
        queue_labels: [K] int64 labels, -1 empty (written).
        counters: [3] int64: head, rows offered, rows rejected (written).
        keys: [N, D] floating.
        labels: [N] int64 (duplicates allowed).
        done: optional int64 [1] zero tensor on the queue's device (left at zero): lets the CUDA
            kernel's last row advance the ring, one launch instead of two; unused on CPU.
    """
    torch.ops.protomem.queue_enqueue_(queue, queue_labels, counters, keys, labels, done)


@torch.library.register_fake("protomem::queue_enqueue_")
def _fake(queue, queue_labels, counters, keys, labels, done=None):
    return None
