"""DCQLoss: the Dynamic Class Queue head (Li et al., CVPR 2021, arXiv 2105.11113)."""
import torch
from torch import nn

from .. import distributed
from ..functional import margin_ce_stats
from ..margins import CosFace
from ..memory import ClassQueue
from ..mining.pairs import closest_other_class, global_pairs, pack_pairs
from ._common import StepStats, check_embeddings, check_labels, check_margin, cosine, global_mean
from ._common import check_precision, row_loss
from .prototype_memory import check_batch_labels


class DCQLoss(nn.Module):
    """Drop-in loss head ``loss = head(q, k, labels)`` over a FIFO queue of per-sample class weights.

    ``q`` are the query embeddings (with gradient) and ``k`` the keys of a second image of the
    same identity from a momentum encoder (``MomentumEncoder``; no gradient). Each query is
    classified against its own key as the positive (with the margin) and the queue's entries as
    negatives, entries carrying the query's label masked out; then the keys are enqueued
    (overwriting the oldest). The enqueue is applied at the start of the next call (or by
    ``flush()``, ``state_dict()``), so that this step's backward still sees the queue its forward
    used, without a copy of the queue.

    Args:
        embedding_size: D.
        queue_size: K, the number of entries (the paper: about 10% of the classes).
        margin: a ``protomem.margins`` margin (default CosFace(50, 0.3), as the paper).
        queue_dtype: storage dtype of the queue (float32, bfloat16, float16).
        precision: "default" (CUDA: tensor-core dots, bfloat16 operands with float32
            accumulation) or "highest" (float32 operands); see ``margin_cross_entropy``.
        device: where the queue lives.

    Under torch.distributed the keys and labels of all ranks are gathered and enqueued on every
    rank, so the queues stay identical; the returned loss is the mean over the global batch.
    """

    def __init__(self, embedding_size, queue_size, margin=None, queue_dtype=torch.float32,
                 precision="default", device=None):
        super().__init__()
        self.precision = check_precision(precision)
        self.margin = check_margin(CosFace(50.0, 0.3) if margin is None else margin)
        self.embedding_size = embedding_size
        self.queue = ClassQueue(queue_size, embedding_size, queue_dtype, device)
        self._pending = None
        self._stats = StepStats()
        self._mining = None

    def mining_pairs(self, packed=False):
        """The last step's (row class [N] int64, closest other class [N] int64 (-1: none), its
        cosine [N] float32) over the global batch: the label of each query's best queue entry of
        another class (``protomem.mining``). No host sync without a process group; under
        torch.distributed a collective (call it on every rank). None before the first step.
        With ``packed``: the pairs as ``protomem.mining.pack_pairs`` packs them, one int64 [N, 3]
        tensor (one transfer)."""
        return global_pairs(self._mining, packed)

    @property
    def last_stats(self):
        """Statistics of the last step (one host sync): loss and its parts (mean ``lse`` and
        ``target_logit``), accuracy (positive beats every negative, without margin), rows, positive_cos (mean cos(q, k)), committed, and the
        queue's fill (``ClassQueue.stats``)."""
        out = self._stats.as_dict()
        if out:
            out.update({f"queue_{k}": v for k, v in self.queue.stats().items()})
        return out

    def forward(self, q, k, labels):
        """Loss of one step; the keys join the queue.

        Args:
            q: [B, D] float32/bfloat16/float16 query embeddings.
            k: [B, D] keys of a second view of the same identities (detached here).
            labels: [B] or [B, 1] int64/int32 class ids >= 0.

        Returns:
            0-d float32 loss, the mean over the global batch. Non-finite q or k give a
            non-finite loss and the queue is left untouched.

        Raises:
            TypeError / ValueError: bad shapes, dtypes or devices, before any state changes;
                negative labels on CPU, and on CUDA only with PROTOMEM_DEBUG=1 (the check would
                wait for the device): unchecked, their rows are left out of the loss and their
                keys are not enqueued.

        A global batch larger than the queue is allowed: its keys wrap around the ring, so the
        queue then holds the batch's last ``queue_size`` keys only (the trainer's CLI refuses
        such a --queue-size, which is almost surely a mistake).
        """
        device = self.queue.keys.device
        check_embeddings(q, self.embedding_size, device, "q")
        check_embeddings(k, self.embedding_size, device, "k")
        if k.shape != q.shape:
            raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
        labels = check_labels(labels, q.shape[0], q.device)
        self.flush()
        with torch.autocast(q.device.type, enabled=False):
            return self._step(q, k.detach(), labels)

    def _step(self, q, k, y):
        K, Y, _ = distributed.gather_batch(k, y, with_grad=False)
        check_batch_labels(Y)  # as PM: no host sync on CUDA, where negative labels' rows are left out
        bad = (~torch.isfinite(q).all() | ~torch.isfinite(K).all()).to(torch.float32)
        ok = distributed.all_reduce(bad[None], op="max")[0] == 0  # one rank's NaN skips all
        pos = cosine(q, k)
        lse, target, best_t, best_o, best_i = margin_ce_stats(q, self.queue.keys, y, self.queue.labels,
                                                              pos, **self.margin.params(),
                                                              precision=self.precision, with_index=True)
        self._mining = pack_pairs(y, closest_other_class(best_i, self.queue.labels), best_o)
        ignored = y < 0
        local = row_loss(lse, target, ignored).sum()
        correct = ((best_t >= best_o) & ~ignored).sum()
        n_total = (Y >= 0).sum()  # rows with a negative label take no part (their keys are not enqueued)
        parts = (correct,) + tuple(torch.where(ignored, 0, v.detach()).sum() for v in (pos, lse, target))
        loss, (n_correct, pos_sum, lse_sum, target_sum) = global_mean(local, n_total, parts)
        self._pending = (K, Y, ok)
        n = n_total.clamp_min(1)
        self._stats.set(loss=loss, lse=lse_sum / n, target_logit=target_sum / n,
                        accuracy=n_correct / n, rows=n_total,
                        positive_cos=pos_sum / n, committed=ok)
        return loss

    @torch.no_grad()
    def flush(self):
        """Applies the pending enqueue of the last step's keys (done by the next forward and by
        ``state_dict``; call it yourself before reading ``queue`` directly)."""
        if self._pending is not None:
            K, Y, ok = self._pending
            self._pending = None
            self.queue.enqueue(K, Y, commit=ok)

    def reset(self):
        """Empties the queue and drops the pending keys."""
        self._pending = None
        self.queue.reset()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush()  # runs before the queue's buffers are saved
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self._pending = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, margin={self.margin}, "
                f"precision={self.precision!r}")
