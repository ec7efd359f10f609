"""The four loss heads as the scale benchmark runs them: one training step each, their state's
size, a RAM estimate, and a check of each head against ``protomem.reference`` at a small size.

A step is forward + backward to the embeddings + the head's own update: the memory update (PM,
inside the forward), the enqueue of the previous step's keys (DCQ), an SGD-with-momentum step of
the class weights (Partial FC, full softmax; their optimiser state is part of their memory).
"""
import torch
import torch.nn.functional as F

import protomem
from protomem.losses import partial_fc
from protomem.reference import margin_cross_entropy_ref
from measure import check_close

HEADS = ("pm", "dcq", "pfc", "full")
SAMPLE_RATE = 0.1
N_BATCHES = 8  # label batches cycled through while timing


def head_params(head, C, B, D, M):
    """The row params of a head's configuration (only what that head depends on)."""
    own = {"pm": {"M": M}, "dcq": {"K": M}, "pfc": {"r": SAMPLE_RATE}, "full": {}}[head]
    return dict(C=C, B=B, D=D, **own)


def estimate_bytes(head, C, B, D, M):
    """Rough peak memory of a step in bytes (float32): used to refuse a CPU run over the budget.

    PFC / full: weight, its gradient and the momentum buffer (C x D each) plus per-class int64 /
    float64 sampling temporaries; PFC also the sampled rows and their gradient (r*C x D each).
    PM / DCQ: the memory or queue (M x D) and its hash index; never C.
    """
    f32, i64 = 4, 8
    if head in ("pfc", "full"):
        sampled = 2 * SAMPLE_RATE * C * D * f32 if head == "pfc" else 0
        return 3 * C * D * f32 + 6 * C * i64 + sampled + 4 * B * D * f32
    return 2 * M * D * f32 + 8 * M * i64 + 4 * B * D * f32


def _fast_init_rows(start, end, embedding_size, seed, dtype, device):
    # The heads' seeded initialisation draws C x D numbers on the CPU in 65536-row blocks
    # (about a minute at C = 1e7, D = 512); the values do not change the timing.
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    return torch.randn(end - start, embedding_size, generator=g, dtype=dtype, device=device).mul_(0.01)


def make_head(head, C, D, M, device):
    """(module, optimizer or None). PFC / full get SGD(lr=0.1, momentum=0.9) over the weights."""
    if head == "pm":
        return protomem.PrototypeMemoryLoss(D, M, device=device), None
    if head == "dcq":
        return protomem.DCQLoss(D, M, device=device), None
    rate = SAMPLE_RATE if head == "pfc" else 1.0
    seeded, partial_fc.init_rows = partial_fc.init_rows, _fast_init_rows
    try:
        module = protomem.PartialFCLoss(D, C, rate, device=device)
    finally:
        partial_fc.init_rows = seeded
    return module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)


@torch.no_grad()
def prefill(module, C, D, device):
    """Fills the memory or queue as after a long run: min(M, C) classes spread over [0, C)."""
    size = module.memory.memory_size if hasattr(module, "memory") else module.queue.queue_size
    n = min(size, C)
    labels = torch.arange(n, device=device) * (C // n)
    rows = F.normalize(torch.randn(size, D, device=device), dim=1)
    if hasattr(module, "memory"):
        module.memory.update(labels, rows[:n], check=False)
    else:
        module.queue.enqueue(rows, torch.arange(size, device=device) % n * (C // n))


class Step:
    """One head at one class count, ready to time: ``step()`` runs one training step.

    Inputs: embeddings x [B, D] float32 with grad (DCQ: also keys k [B, D]), labels [B] int64
    drawn uniformly from [0, C), ``N_BATCHES`` label batches cycled through.
    """

    def __init__(self, head, C, B, D, M, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(B, D, generator=g).to(device).requires_grad_()
        self.k = torch.randn(B, D, generator=g).to(device)
        self.labels = [torch.randint(C, (B,), generator=g).to(device) for _ in range(N_BATCHES)]
        self.i = 0
        self.head = head
        self.module, self.opt = make_head(head, C, D, M, device)
        if head in ("pm", "dcq"):
            prefill(self.module, C, D, device)

    def step(self):
        y = self.labels[self.i % N_BATCHES]
        self.i += 1
        self.x.grad = None
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        loss = self.module(self.x, self.k, y) if self.head == "dcq" else self.module(self.x, y)
        loss.backward()
        if self.opt is not None:
            self.opt.step()

    def state_bytes(self):
        """Bytes of the head's parameters, buffers and optimiser state."""
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        if self.opt is not None:
            tensors += [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def check_head(head, device, C=3000, B=48, D=32, M=100, steps=3):
    """Raises measure.CheckError unless ``head`` matches the materialising reference
    (``margin_cross_entropy_ref``: loss and gradient of the embeddings, and of the weights for
    full softmax) over a few steps at a small size, with evictions (C > M) and a filled state."""
    g = torch.Generator().manual_seed(1)
    module, _ = make_head(head, C, D, M, device)
    mp = module.margin.params()
    for t in range(steps):
        x = torch.randn(B, D, generator=g).to(device).requires_grad_()
        y = torch.randint(C, (B,), generator=g).to(device)
        xr = x.detach().clone().requires_grad_()
        what = f"{head} step {t}"
        if head == "dcq":
            k = torch.randn(B, D, generator=g).to(device)
            module.flush()
            W, cols = module.queue.keys.clone(), module.queue.labels.clone()
            loss = module(x, k, y)
            pos = F.cosine_similarity(xr, k, dim=1)
            want = margin_cross_entropy_ref(xr, W, y, cols, pos, **mp)[0]
        elif head == "pm":
            loss = module(x, y)  # the target is the memory as updated by this step
            W, cols = module.memory.protos.clone(), module.memory.slot_labels.clone()
            want = margin_cross_entropy_ref(xr, W, y, cols, **mp)[0]
        else:
            Wr = module.weight.detach().clone().requires_grad_()
            loss = module(x, y)
            cols = torch.nonzero(module.last_sampled == t).squeeze(1)
            want = margin_cross_entropy_ref(xr, Wr[cols], y, cols, **mp)[0]
            if head == "pfc" and not 0.5 < cols.numel() / (SAMPLE_RATE * C) < 1.5:
                raise AssertionError(f"{what}: sampled {cols.numel()} classes, expected ~{SAMPLE_RATE * C}")
        loss.backward()
        want.backward()
        check_close(f"{what} loss", loss, want)
        check_close(f"{what} grad x", x.grad, xr.grad, rtol=1e-3)
        if head == "full":
            check_close(f"{what} grad W", module.weight.grad, Wr.grad, rtol=1e-3)
            module.weight.grad = None
    if head == "pm":  # LRU frees a refreshed class's old slot: a few holes are expected
        st = module.memory.stats()
        if st["filled"] < 0.9 * M or st["evictions"] == 0:
            raise AssertionError(f"pm: memory holds {st['filled']} of {M} classes, "
                                 f"{st['evictions']} evictions after {steps} steps")
