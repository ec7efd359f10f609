"""PartialFCLoss / FullSoftmaxLoss: the baselines, one weight row per class (Partial FC: An et al.,
arXiv 2203.15565; full softmax: an ArcFace/CosFace FC layer), on the fused margin softmax."""
import torch
from torch import nn

from .. import distributed
from ..functional import margin_ce_stats
from ..margins import ArcFace
from ..mining.pairs import closest_other_class, combine_best_other, pack_pairs
from ._common import StepStats, check_embeddings, check_labels, check_margin, check_precision

_M32 = 0xFFFFFFFF
_INIT_BLOCK = 1 << 16  # rows per block of the seeded initialisation (independent of sharding)


def _mul32(h, c):
    """(h * c) mod 2^32 for int64 h < 2^32 and a 32-bit constant, without int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def class_uniform(ids, seed, step):
    """A uniform number in [0, 1) per class id, a hash of (seed, step, id): the same on every
    device and world size. ids: int64 tensor (< 2^31); returns float64 of its shape."""
    key = (seed * 0x9E3779B1 + step * 0x85EBCA6B) & _M32
    h = (ids & 0x7FFFFFFF) ^ key
    for shift, c in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, 0x9E3779B1)):
        h = _mul32(h ^ (h >> shift), c)
    return (h ^ (h >> 16)).double() / 2.0**32


def init_rows(start, end, embedding_size, seed, dtype, device):
    """Rows [start, end) of the N(0, 0.01) class-weight matrix seeded by ``seed``: blocks of
    65536 rows drawn from their own generator, so a shard's rows do not depend on the shards."""
    out = torch.empty(end - start, embedding_size, dtype=dtype, device=device)
    first = start // _INIT_BLOCK
    for block in range(first, (end - 1) // _INIT_BLOCK + 1 if end > start else first):
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(_INIT_BLOCK, embedding_size, generator=g).mul_(0.01)
        b0 = block * _INIT_BLOCK
        lo, hi = max(start, b0), min(end, b0 + _INIT_BLOCK)
        out[lo - start:hi - start] = rows[lo - b0:hi - b0].to(dtype)
    return out


class PartialFCLoss(nn.Module):
    """Drop-in loss head ``loss = head(embeddings, labels)`` with a weight row per class, of which
    each step uses every positive class of the (global) batch and random negatives up to
    ``sample_rate`` of the classes (Partial FC); ``sample_rate=1.0`` is the full softmax.

    Unlike insightface's PartialFC it works without torch.distributed, with any batch size on
    any step and any rank. The negatives are drawn per class by a hash of (seed, step, class id)
    with probability ``(rate*C - P) / (C - P)`` (P the distinct positives), so their number is
    ``rate*C`` on average and the sample does not depend on the world size or sharding.

    Args:
        embedding_size: D.
        num_classes: C; labels must be in [0, C).
        sample_rate: r in (0, 1].
        margin: a ``protomem.margins`` margin (default ArcFace(64, 0.5), as insightface).
        seed: seeds the weight initialisation (N(0, 0.01)) and the sampling.
        dtype, device: of the weight.
        precision: "default" (CUDA: tensor-core dots, bfloat16 operands with float32
            accumulation, also for float32 weights) or "highest" (float32 operands); see
            ``margin_cross_entropy``.

    Under torch.distributed the class weights are sharded over the ranks (contiguous ranges);
    embeddings (with gradient) and labels are gathered, each rank scores the global batch
    against its shard and the log-sum-exp is combined over the ranks. The loss is the mean over
    the global batch on every rank; its gradient w.r.t. this rank's embeddings is that of the
    global mean. ``state_dict()`` is then a collective (call it on every rank): it holds the
    full [C, D] weight, and ``load_state_dict`` re-shards it to the current world size.
    """

    def __init__(self, embedding_size, num_classes, sample_rate=0.1, margin=None, seed=0,
                 dtype=torch.float32, precision="default", device=None):
        super().__init__()
        self.precision = check_precision(precision)
        for name, v in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.margin = check_margin(ArcFace(64.0, 0.5) if margin is None else margin)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        self.rank, self.world_size = distributed.world()
        self.start, self.end = distributed.shard_range(num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(init_rows(self.start, self.end, embedding_size, self.seed, dtype, device))
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("step", torch.zeros((), **long))
        self.register_buffer("last_sampled", torch.full((self.end - self.start,), -1, **long))
        self._stats = StepStats()
        self._mining = None

    def mining_pairs(self, packed=False):
        """The last step's (row class [N] int64, closest other class [N] int64 (-1: none), its
        cosine [N] float32) over the global batch: the class of each row's best non-target weight
        row among the step's (sampled) classes (``protomem.mining``), combined over the ranks'
        shards like the max itself (ties: the smaller class id). No host sync without a process
        group; under torch.distributed a collective (call it on every rank). None before a step.
        With ``packed``: the pairs as ``protomem.mining.pack_pairs`` packs them, one int64 [N, 3]
        tensor (one transfer)."""
        if self._mining is None:
            return None
        Y, best, cls = self._mining
        both = distributed.all_gather_stack(torch.stack([best.double(), cls.double()]))
        best, cls = combine_best_other(both[:, 0].to(best.dtype), both[:, 1].long())
        return pack_pairs(Y, cls, best) if packed else (Y, cls, best.float())

    @property
    def last_stats(self):
        """Statistics of the last step (one host sync): loss and its parts (mean ``lse`` and
        ``target_logit``), accuracy (top-1 over the sampled classes, without margin), rows,
        sampled (classes used, all ranks), positive_age (mean steps since the batch's classes were
        last sampled, -1 for never), committed (False for a non-finite step, which left the
        sampling step and ``last_sampled`` as they were)."""
        return self._stats.as_dict()

    def forward(self, embeddings, labels):
        """Loss of one step.

        Args:
            embeddings: [B, D] float32/bfloat16/float16 (autocast outputs are fine).
            labels: [B] or [B, 1] int64/int32 in [0, num_classes).

        Returns:
            0-d float32 loss, the mean over the global batch.

        Raises:
            TypeError / ValueError: bad shapes, dtypes or devices, labels outside [0, C).
        """
        check_embeddings(embeddings, self.embedding_size, self.weight.device)
        labels = check_labels(labels, embeddings.shape[0], embeddings.device)
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._step(embeddings, labels)

    def _step(self, x, y):
        X, Y, _ = distributed.gather_batch(x, y, with_grad=True)
        if bool(((Y < 0) | (Y >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, num_classes={self.num_classes}), got values "
                             f"from {int(Y.min())} to {int(Y.max())}")
        cols = self._sample(Y)
        W = self.weight if cols is None else self.weight[cols]
        col_labels = torch.arange(self.start, self.end, device=X.device) if cols is None else cols + self.start
        lse, target, best_t, best_o, best_i = margin_ce_stats(
            X, W, Y, col_labels, None, **self.margin.params(), target_index=self._target_index(Y, cols),
            precision=self.precision, with_index=True)
        self._mining = (Y, best_o, closest_other_class(best_i, col_labels))
        with torch.no_grad():
            mine = (Y >= self.start) & (Y < self.end)
            seen = self.last_sampled[(Y - self.start).clamp(0, self.end - self.start - 1)]
            age = torch.where(seen >= 0, self.step - seen, -1)
            age_sum = torch.where(mine, age, 0).sum().float()
            sampled = torch.tensor(float(W.shape[0]), device=X.device)
        loss, stats = _combine_shards(lse, target, best_t, best_o, (age_sum, sampled))
        with torch.no_grad():
            # a non-finite step (the same global loss on every rank) leaves the sampling state as
            # it was, decided on the device: the next step draws the same sample again
            ok = torch.isfinite(loss.detach())
            if cols is None:
                self.last_sampled.copy_(torch.where(ok, self.step, self.last_sampled))
            else:
                self.last_sampled[cols] = torch.where(ok, self.step, self.last_sampled[cols])
            self.step += ok.long()
        n = Y.shape[0]
        self._stats.set(loss=loss, lse=stats[1] / n, target_logit=stats[2] / n, accuracy=stats[0] / n,
                        rows=n, sampled=stats[4], positive_age=stats[3] / n, committed=ok)
        return loss

    def _target_index(self, Y, cols):
        """Each row's column in this step's (sampled) shard of the weights, -1 when its class is
        on another rank's shard (every positive of the shard is sampled)."""
        local = Y - self.start
        mine = (local >= 0) & (local < self.end - self.start)
        if cols is None:
            return torch.where(mine, local, -1)
        at = torch.searchsorted(cols, local).clamp_max(max(cols.shape[0] - 1, 0))
        return torch.where(mine & (cols[at] == local), at, -1) if cols.shape[0] else torch.full_like(Y, -1)

    def _sample(self, Y):
        """Local row indices of this step's classes (None: all of them)."""
        if self.sample_rate >= 1.0:
            return None
        positives = torch.unique(Y)
        C, P = self.num_classes, positives.numel()
        rate = min(1.0, max(0.0, (self.sample_rate * C - P) / max(C - P, 1)))
        ids = torch.arange(self.start, self.end, device=Y.device)
        keep = class_uniform(ids, self.seed, int(self.step)) < rate
        mine = positives[(positives >= self.start) & (positives < self.end)]
        keep[mine - self.start] = True
        return torch.nonzero(keep).squeeze(1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.world_size > 1:  # the full matrix, whatever the world size that loads it
            for name in ("weight", "last_sampled"):
                destination[prefix + name] = distributed.gather_shards(getattr(self, name).detach(), self.num_classes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "last_sampled"):
            t = state_dict.get(prefix + name)
            if t is not None and t.shape[0] == self.num_classes and self.world_size > 1:
                state_dict[prefix + name] = t[self.start:self.end]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        shard = f", shard=[{self.start}, {self.end})" if self.world_size > 1 else ""
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"sample_rate={self.sample_rate}, margin={self.margin}, "
                f"precision={self.precision!r}{shard}")


class FullSoftmaxLoss(PartialFCLoss):
    """The full margin softmax over every class (an ArcFace/CosFace FC layer): ``PartialFCLoss``
    with ``sample_rate=1.0``; sharded over the ranks under torch.distributed."""

    def __init__(self, embedding_size, num_classes, margin=None, seed=0, dtype=torch.float32,
                 precision="default", device=None):
        super().__init__(embedding_size, num_classes, 1.0, margin, seed, dtype, precision, device)


def _combine_shards(lse_r, target_r, best_t, best_o, extra):
    """The global mean loss from every rank's per-row statistics over its shard of the columns.

    Each rank scored all N rows against its columns. The value is combined exactly (log-sum-exp
    over the ranks); the gradient of each rank's part is its share of the softmax, so the
    gathered embeddings' backward (a sum over ranks) gives the full gradient.
    Returns (loss, [n_correct, sum of lse, sum of target logits, *extra summed over ranks]).
    """
    n = lse_r.shape[0]
    stats = [s.float() for s in extra]
    if distributed.world()[1] == 1:
        correct = (best_t >= best_o).sum().float()
        parts = [correct, lse_r.detach().sum().float(), target_r.detach().sum().float()]
        return (lse_r - target_r).sum() / n, torch.stack(parts + stats)
    both = distributed.all_gather_stack(torch.stack([lse_r.detach(), target_r.detach()]))
    lse, target = torch.logsumexp(both[:, 0], 0), torch.logsumexp(both[:, 1], 0)
    best = distributed.all_reduce(torch.stack([best_t, best_o]), op="max")
    a = torch.exp(lse_r.detach() - lse)
    finite = torch.isfinite(target_r)
    b = torch.where(finite, torch.exp(target_r.detach() - target), 0.0)
    part = (a * lse_r - b * torch.where(finite, target_r, 0.0)).sum()
    loss = ((lse - target).sum() + part - part.detach()) / n
    sums = distributed.all_reduce(torch.stack(stats)) if stats else torch.zeros(0, device=lse.device)
    parts = torch.stack([(best[0] >= best[1]).sum().float(), lse.sum().float(), target.sum().float()])
    return loss, torch.cat([parts, sums])
