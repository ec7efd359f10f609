"""Plain-PyTorch models of the loss heads, written for clarity: the B x M logits are built in
full, the memory follows protomem.reference.memory_update_ref, and every gradient comes from
autograd through the materialised logits. The heads' tests compare against these."""
import torch
import torch.nn.functional as F

from protomem.reference import generate_prototypes_ref, lookup_ref, memory_update_ref


def margin_logits(cos, target_mask, margin):
    """s * cos with the margin on the target entries."""
    return margin.scale * torch.where(target_mask, margin.target_cos(cos), cos)


class PMReference:
    """Prototype Memory head: memory as plain tensors, loss from materialised logits."""

    def __init__(self, D, M, margin, momentum=0.0, policy="lru", exemplars="all", detach=True,
                 quality=None, dtype=torch.float32):
        self.protos = torch.zeros(M, D, dtype=dtype)
        self.labels = torch.full((M,), -1, dtype=torch.long)
        self.stamps = torch.zeros(M, dtype=torch.long)
        self.counters = torch.zeros(8, dtype=torch.long)
        self.margin, self.momentum, self.policy = margin, momentum, policy
        self.exemplars, self.detach, self.quality = exemplars, detach, quality

    def step(self, x, y):
        """loss (mean over counted rows) of one step; updates the memory."""
        w = x.detach().float().norm(dim=1) if self.quality == "norm" else None
        classes, protos, inverse = generate_prototypes_ref(x, y, w)
        prev_slot = lookup_ref(self.labels, classes)
        prev = self.protos[prev_slot.clamp_min(0)].float()
        memory_update_ref(self.protos, self.labels, self.stamps, self.counters, classes,
                          protos.detach(), self.momentum, self.policy)
        slots = lookup_ref(self.labels, classes)
        W = self.protos.float()
        if not self.detach:  # the batch's memory rows as differentiable functions of x
            a = torch.where(prev_slot >= 0, self.momentum, 0.0)[:, None]
            fresh = F.normalize(a * prev + (1 - a) * protos, dim=1)
            W = W.index_put((slots,), fresh)
        cos = F.normalize(x.float(), dim=1) @ F.normalize(W, dim=1).T
        live = self.labels >= 0
        same = (y[:, None] == self.labels[None, :]) & live
        counted = torch.ones_like(y, dtype=torch.bool)
        if self.exemplars == "all":
            logits = margin_logits(cos, same, self.margin).masked_fill(~live, float("-inf"))
            target = logits[same]
        else:
            pos = torch.empty(x.shape[0])
            n = F.normalize(x.float() if not self.detach else x.detach().float(), dim=1)
            wts = torch.ones(x.shape[0]) if w is None else w
            for i in range(x.shape[0]):
                mates = (y == y[i]) & (torch.arange(x.shape[0]) != i)
                if mates.any():
                    p = (n[mates] * wts[mates, None]).sum(0)
                elif prev_slot[inverse[i]] >= 0:
                    p = prev[inverse[i]]
                else:
                    counted[i] = False
                    p = torch.ones(x.shape[1])
                pos[i] = F.cosine_similarity(x[i].float(), p, dim=0)
            target = self.margin.scale * self.margin.target_cos(pos)
            logits = torch.cat([target[:, None], (self.margin.scale * cos).masked_fill(same | ~live, float("-inf"))], 1)
        per_row = torch.logsumexp(logits, 1) - target
        return per_row[counted].sum() / counted.sum().clamp_min(1)


class DCQReference:
    """Dynamic Class Queue head: a list-like ring, loss from materialised logits."""

    def __init__(self, D, K, margin, dtype=torch.float32):
        self.keys = torch.zeros(K, D, dtype=dtype)
        self.labels = torch.full((K,), -1, dtype=torch.long)
        self.head = 0
        self.margin = margin

    def step(self, q, k, y):
        pos = F.cosine_similarity(q.float(), k.float(), dim=1)
        cos = F.normalize(q.float(), dim=1) @ F.normalize(self.keys.float(), dim=1).T
        neg = (self.labels[None, :] < 0) | (y[:, None] == self.labels[None, :])
        target = self.margin.scale * self.margin.target_cos(pos)
        logits = torch.cat([target[:, None], (self.margin.scale * cos).masked_fill(neg, float("-inf"))], 1)
        loss = (torch.logsumexp(logits, 1) - target).mean()
        for i in range(k.shape[0]):
            self.keys[self.head] = k[i].detach().to(self.keys.dtype)
            self.labels[self.head] = y[i]
            self.head = (self.head + 1) % self.keys.shape[0]
        return loss


def full_softmax_reference(x, W, y, margin):
    """Mean margin softmax cross-entropy of x [B, D] against every row of W [C, D]."""
    cos = F.normalize(x.float(), dim=1) @ F.normalize(W.float(), dim=1).T
    target = F.one_hot(y, W.shape[0]).bool()
    return F.cross_entropy(margin_logits(cos, target, margin), y)
