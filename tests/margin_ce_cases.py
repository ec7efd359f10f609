"""Inputs and plain-PyTorch baselines for the margin cross-entropy tests.

Two regimes: "random" embeddings (every cosine near 0, the target's probability tiny) and
"dominated" ones lying near their target column (cosine ~0.98), where the target dominates the
softmax as it does in training; a kernel error in the margin or target path shows there."""
import torch
import torch.nn.functional as F

from protomem.margins import ArcFace, CombinedMargin, CosFace
from protomem.reference import margin_cross_entropy_ref

MARGINS = [CosFace(64, 0.4), ArcFace(64, 0.5), ArcFace(16, 2.0), CombinedMargin(32, 1.1, 0.2, 0.1)]
REGIMES = ["random", "dominated"]


def make(B, M, D, dtype=torch.float32, regime="random", seed=0, dup=False, empty=True,
         ignored=False):
    """dict(x [B, D], W [M, D], row [B], col [M], pos [B], target_index [B]).

    Column labels are distinct (dup=True gives row 0's label to a quarter of the columns) and every
    fifth column is empty (label -1) when ``empty``; each row's label is that of a live column
    (its target, ``target_index``). ``ignored`` labels row 1 -1 (target_index -1 there)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, D, generator=g, dtype=torch.float64)
    col = torch.randperm(3 * M + 3, generator=g)[:M]
    if empty and M > 1:
        col[1::5] = -1
    live = torch.nonzero(col >= 0).squeeze(1)
    tgt = live[torch.randint(len(live), (B,), generator=g)]
    row = col[tgt].clone()
    if regime == "random":
        x = torch.randn(B, D, generator=g, dtype=torch.float64)
        pos = torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1
    else:
        noise = torch.randn(B, D, generator=g, dtype=torch.float64)
        x = W[tgt] * (0.5 + torch.rand(B, 1, generator=g, dtype=torch.float64)) + \
            0.2 * W[tgt].norm(dim=1, keepdim=True) / D ** 0.5 * noise
        pos = 0.8 + 0.15 * torch.rand(B, generator=g, dtype=torch.float64)
    if dup:  # columns that are no row's target take row 0's label
        free = torch.ones(M, dtype=torch.bool)
        free[tgt] = False
        free = torch.nonzero(free).squeeze(1)
        col[free[torch.randperm(len(free), generator=g)[: max(1, M // 4)]]] = row[0]
    target_index = tgt.clone()
    if ignored and B > 2:
        row[1] = -1
        target_index[1] = -1
    return dict(x=x.to(dtype), W=W.to(dtype), row=row, col=col, pos=pos, target_index=target_index)


def exact(case, margin, with_pos, reduction="none"):
    """The float64 reference loss of the case's inputs as given, and its gradients (x, W[, pos])."""
    x = case["x"].double().requires_grad_()
    W = case["W"].double().requires_grad_()
    pos = case["pos"].double().requires_grad_() if with_pos else None
    loss = margin_cross_entropy_ref(x, W, case["row"], case["col"], pos, **margin.params(),
                                    reduction=reduction)[0]
    leaves = [x, W] + ([pos] if with_pos else [])
    return loss.detach(), torch.autograd.grad(loss.sum(), leaves)


def plain(case, margin, with_pos, dtype):
    """Idiomatic PyTorch (insightface-style) in ``dtype``: normalise, matmul, margin on the target,
    cross-entropy in float32. Returns the per-row loss [B] and the gradients (x, W[, pos]) of its
    sum, in ``dtype``."""
    x = case["x"].to(dtype).requires_grad_()
    W = case["W"].to(dtype).requires_grad_()
    pos = case["pos"].to(dtype).requires_grad_() if with_pos else None
    row, col = case["row"], case["col"]
    cos = F.normalize(x, dim=1) @ F.normalize(W, dim=1).T
    live = (col >= 0)[None, :]
    same = (row[:, None] == col[None, :]) & live
    s = margin.scale
    ninf = torch.tensor(float("-inf"))
    if pos is None:
        logits = torch.where(same, s * margin.target_cos(cos), s * cos).float()
        logits = torch.where(live, logits, ninf)
        target = torch.logsumexp(torch.where(same, logits, ninf), dim=1)
    else:
        target = (s * margin.target_cos(pos)).float()
        logits = torch.cat([target[:, None], torch.where(live & ~same, s * cos.float(), ninf)], dim=1)
    loss = torch.logsumexp(logits, dim=1) - target
    keep = row >= 0
    loss = torch.where(keep, loss, 0.0)
    leaves = [x, W] + ([pos] if with_pos else [])
    return loss.detach(), torch.autograd.grad(loss.sum(), leaves)


def max_err(a, b, keep=None):
    """max |a - b| (over ``keep`` rows), float64."""
    d = (a.double() - b.double()).abs()
    d = d[keep] if keep is not None else d
    return float(d.max()) if d.numel() else 0.0


def rel_err(a, b):
    """max |a - b| / max |b|, float64."""
    return max_err(a, b) / max(float(b.double().abs().max()), 1e-300)
