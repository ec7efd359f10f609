"""PrototypeMemoryLoss: the margin softmax against a fixed-size memory of class prototypes
generated from the mini-batches (Smirnov et al., arXiv 2105.02103)."""
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..functional import margin_ce_stats
from ..margins import CosFace
from ..memory import PrototypeMemory
from ..mining.pairs import closest_other_class, global_pairs, pack_pairs
from ..ops import generate_prototypes
from ..reference import STEP
from ._common import StepStats, check_embeddings, check_labels, check_margin, cosine, global_mean
from ._common import check_precision, row_loss

_EXEMPLARS = ("all", "leave_one_out")
_QUALITY = (None, "norm")


def check_batch_labels(labels):
    """Negative labels are a ValueError where checking costs no host sync (CPU), or with
    PROTOMEM_DEBUG=1; on CUDA otherwise their rows are left out of the loss and the memory."""
    if torch.compiler.is_compiling():
        return
    if labels.device.type == "cpu" or os.environ.get("PROTOMEM_DEBUG", "0") not in ("", "0"):
        if bool((labels < 0).any()):
            raise ValueError("labels must be non-negative class ids")


class PrototypeMemoryLoss(nn.Module):
    """Drop-in loss head: ``loss = head(embeddings, labels)`` with a Prototype Memory classifier.

    Each step: the batch's class prototypes are generated (L2-normalised mean of the class's
    L2-normalised embeddings), written into the memory (refreshing classes already there,
    enqueueing the others and evicting the least recently seen), and every embedding is
    classified against all ``memory_size`` prototypes by the fused margin softmax, which never
    builds the B x M logits. GPU memory is O(memory_size * embedding_size) whatever the number
    of classes in the dataset; class ids are arbitrary int64 >= 0.

    Args:
        embedding_size: D.
        memory_size: M, the number of prototypes held (>= the distinct classes of one global batch).
        margin: a ``protomem.margins`` margin (default CosFace(64, 0.4)).
        momentum: a in [0, 1]: a refreshed prototype is ``normalize(a*old + (1-a)*new)`` (0: replace).
        policy: eviction, "lru" (default) or "fifo" (see ``PrototypeMemory``).
        exemplars: "all" (the target is the class prototype, the sample included) or
            "leave_one_out" (each sample's positive is its class prototype without itself; a class
            with one exemplar in the batch uses its previous memory prototype if there is one,
            else the row is left out of the loss and counted in ``last_stats["skipped_rows"]``).
        detach_prototypes: True (default): prototypes are constants of the loss. False: gradients
            also flow through the current batch's prototypes into the embeddings that made them
            (as the positive and as negatives of other rows).
        quality: None, or "norm" to weight exemplars by their embedding norm (the quality-aware
            follow-up, arXiv 2311.07734).
        memory_dtype: storage dtype of the prototypes (float32, bfloat16, float16).
        precision: the margin softmax's dot products, "default" (on CUDA: tensor cores,
            bfloat16 operands with float32 accumulation, also for a float32 memory) or "highest"
            (float32 operands; ~10-50x slower on CUDA). See ``margin_cross_entropy``.
        device: where the memory lives.

    Under torch.distributed the embeddings (with gradient) and labels of all ranks are gathered,
    so every rank applies the same update and the memories stay identical; each rank computes the
    loss of its own rows, and the returned loss is the mean over the global batch (its gradient
    with respect to this rank's embeddings is that of the global mean).
    """

    def __init__(self, embedding_size, memory_size, margin=None, momentum=0.0, policy="lru",
                 exemplars="all", detach_prototypes=True, quality=None,
                 memory_dtype=torch.float32, precision="default", device=None):
        super().__init__()
        self.precision = check_precision(precision)
        if exemplars not in _EXEMPLARS:
            raise ValueError(f"exemplars must be one of {_EXEMPLARS}, got {exemplars!r}")
        if quality not in _QUALITY:
            raise ValueError(f"quality must be None or 'norm', got {quality!r}")
        self.margin = check_margin(CosFace(64.0, 0.4) if margin is None else margin)
        self.embedding_size = embedding_size
        self.exemplars = exemplars
        self.detach_prototypes = bool(detach_prototypes)
        self.quality = quality
        self.memory = PrototypeMemory(memory_size, embedding_size, momentum, policy, memory_dtype, device)
        self.register_buffer("skipped_rows", torch.zeros((), dtype=torch.long, device=device))
        self._stats = StepStats()
        self._mining = None

    def mining_pairs(self, packed=False):
        """The last step's (row class [N] int64, closest other class [N] int64 (-1: none), its
        cosine [N] float32) over the global batch, on the memory's device: each row's best
        non-target prototype's label (``protomem.mining``). No host sync without a process group;
        under torch.distributed a collective (call it on every rank). None before the first step.
        With ``packed``: the pairs as ``protomem.mining.pack_pairs`` packs them, one int64 [N, 3]
        tensor (one transfer)."""
        return global_pairs(self._mining, packed)

    @property
    def last_stats(self):
        """Statistics of the last step (one host sync): loss and its parts (mean log-sum-exp ``lse``
        and mean target logit ``target_logit``: loss = lse - target_logit), accuracy (top-1 without
        margin over the counted rows), prior_accuracy (the same with the row's class prototype as
        it was before this step, a class new to the memory counting as wrong: with
        exemplars="all" the refreshed prototype contains the row, so accuracy is ~1.0), rows, skipped_rows, hit_rate (fraction of the batch's classes already in
        memory), refresh_age (mean steps since those were last written), committed (False for a
        skipped non-finite step), and the memory's fill and age (``PrototypeMemory.stats``)."""
        out = self._stats.as_dict()
        if out:
            out.update({f"memory_{k}": v for k, v in self.memory.stats().items()})
        return out

    def forward(self, embeddings, labels):
        """Loss of one step, and the memory update.

        Args:
            embeddings: [B, D] float32/bfloat16/float16 (autocast outputs are fine).
            labels: [B] or [B, 1] int64/int32 class ids >= 0.

        Returns:
            0-d float32 loss (the mean over the global batch's counted rows). Non-finite
            embeddings give a non-finite loss (so a GradScaler skips the step) and leave the
            memory untouched.

        Raises:
            TypeError / ValueError: bad shapes, dtypes, devices, negative labels, or more
                distinct classes in the (global) batch than ``memory_size``; nothing is changed.
                Negative labels are checked on CPU, and on CUDA only with PROTOMEM_DEBUG=1 (the
                check would wait for the device); unchecked, their rows are left out of the loss
                and of the memory.

        No host synchronisation on CUDA while the global batch has at most ``memory_size``
        rows, so the step can be captured in a CUDA graph or compiled with fullgraph=True.
        """
        mem = self.memory
        check_embeddings(embeddings, self.embedding_size, mem.protos.device)
        labels = check_labels(labels, embeddings.shape[0], embeddings.device)
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._step(embeddings, labels)

    def _step(self, x, y):
        mem, cross = self.memory, not self.detach_prototypes
        X, Y, offset = distributed.gather_batch(x, y, with_grad=cross)
        rows = slice(offset, offset + x.shape[0])
        w = X.detach().float().norm(dim=1) if self.quality == "norm" else None
        check_batch_labels(Y)
        # prototypes carry gradient only when it flows through them (no autograd node otherwise);
        # padded to the global batch (class -1 after the batch's classes) so nothing waits for U
        classes, protos, inverse = generate_prototypes(X if cross else X.detach(), Y, w, padded=True)
        if classes.shape[0] > mem.memory_size:
            classes, protos = self._fit_to_memory(classes, protos, inverse)
        ok = torch.isfinite(X.detach()).all() & torch.isfinite(protos.detach()).all()
        # the classes' prototypes before the update (the positives of cross / leave-one-out, and
        # the reference of the prior accuracy): one lookup and a gather of U rows
        prev = mem.protos[mem.lookup(classes).clamp_min(0)].float()
        # slots: each class's slot after the update (the margin CE's target columns)
        slots, prev_slot, prev_stamp = mem.update(classes, protos.detach(), check=False, commit=ok,
                                                  with_previous=True)
        hit = prev_slot >= 0
        age = mem.counters[STEP] - ok.long() - 1 - prev_stamp  # steps since its last write

        xr, inv_r = (X[rows] if cross else x), inverse[rows]
        pos, fresh, skipped = None, None, torch.zeros_like(Y, dtype=torch.bool)
        if cross:  # the batch's prototypes as the memory now holds them, with gradient
            a = torch.where(hit, mem.momentum, 0.0)[:, None]
            fresh = F.normalize(a * prev + (1 - a) * protos, dim=1, eps=1e-12)
            pos = cosine(xr, fresh[inv_r])
        if self.exemplars == "leave_one_out":
            pos, skipped = self._leave_one_out(xr, X, w, inverse, rows, prev, hit, cross)
        row_labels = torch.where(skipped[rows], -1, y)
        # the memory holds one slot per class: each row's target column is its class's slot
        target_index = None if pos is not None else slots[inv_r]
        lse, target, best_t, best_o, best_i = margin_ce_stats(xr, mem.protos, row_labels, mem.slot_labels,
                                                              pos, **self.margin.params(),
                                                              target_index=target_index,
                                                              precision=self.precision, with_index=True)
        self._mining = pack_pairs(row_labels, closest_other_class(best_i, mem.slot_labels), best_o)
        ignored = row_labels < 0
        local = row_loss(lse, target, ignored).sum()
        if cross:
            local = local + self._negatives_surrogate(xr, fresh, classes, inv_r, lse, ignored)
        n_total = (~skipped & (Y >= 0)).sum()  # rows with a negative label take no part
        correct = ((best_t >= best_o) & ~ignored).sum()
        # top-1 of the row's class prototype as it was *before* this step (a class new to the
        # memory counts as wrong): with exemplars="all" the refreshed prototype holds the row
        # itself, so the plain accuracy is ~1.0 and says little
        prior_cos = cosine(xr.detach(), prev[inv_r])
        prior = ((prior_cos >= best_o) & hit[inv_r] & ~ignored).sum()
        parts = (correct, torch.where(ignored, 0, lse).detach().sum(),
                 torch.where(ignored, 0, target).detach().sum(), prior)
        loss, (n_correct, lse_sum, target_sum, n_prior) = global_mean(local, n_total, parts)
        with torch.no_grad():
            self.skipped_rows += torch.where(ok, skipped.sum(), 0)
        n_hit, n_classes = hit.sum(), (classes >= 0).sum()
        n = n_total.clamp_min(1)
        self._stats.set(loss=loss, lse=lse_sum / n, target_logit=target_sum / n,
                        accuracy=n_correct / n, prior_accuracy=n_prior / n, rows=n_total,
                        skipped_rows=skipped.sum(), hit_rate=n_hit / n_classes.clamp_min(1),
                        refresh_age=torch.where(hit, age, 0).sum() / n_hit.clamp_min(1), committed=ok)
        return loss

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, margin={self.margin}, "
                f"exemplars={self.exemplars!r}, detach_prototypes={self.detach_prototypes}, "
                f"quality={self.quality!r}, precision={self.precision!r}")

    def _fit_to_memory(self, classes, protos, inverse):
        """A global batch larger than the memory: its class count must fit (one host sync, only
        for such batches); then the padding beyond ``memory_size`` rows is dropped."""
        M = self.memory.memory_size
        n = int(inverse.max()) + 1
        if n > M:
            raise ValueError(f"the batch holds {n} distinct classes but the memory has only {M} "
                             "slots; use a larger memory_size or fewer identities per batch")
        return classes[:M], protos[:M]

    def _leave_one_out(self, xr, X, w, inverse, rows, prev, hit, cross):
        """Each local row's positive cosine against its class prototype without itself, and which
        global rows are skipped (a lone exemplar of a class not in memory before the step)."""
        n = F.normalize(X.float() if cross else X.detach().float(), dim=1, eps=1e-12)
        wn = n if w is None else n * w[:, None]
        sums = torch.zeros(prev.shape[0], n.shape[1], device=n.device).index_add(0, inverse, wn)
        count = torch.zeros_like(hit, dtype=torch.long).index_add_(0, inverse, torch.ones_like(inverse))
        lone = count[inverse] == 1
        inv_r = inverse[rows]
        others = torch.where(lone[rows, None], prev[inv_r], sums[inv_r] - wn[rows])
        return cosine(xr, others), lone & ~hit[inverse]

    def _negatives_surrogate(self, xr, fresh, classes, inv_r, lse, ignored):
        """A term of value 0 whose gradient is that of the loss with respect to the batch's
        prototypes acting as other rows' negatives (the fused op sees the memory as constants);
        padding columns (class < 0, never in memory) take no part."""
        s = self.margin.scale
        logits = s * (F.normalize(xr.detach().float(), dim=1, eps=1e-12) @ fresh.T)
        own = torch.arange(fresh.shape[0], device=fresh.device)[None, :] == inv_r[:, None]
        out = own | ignored[:, None] | (classes < 0)[None, :]
        p = torch.exp(logits.detach() - lse.detach()[:, None]).masked_fill(out, 0)
        term = (p * logits).sum()
        return term - term.detach()

