"""The heads, batches and training loop shared by the one-process and the 2-process runs of
tests/test_heads_distributed.py (imported by the test and by tests/distributed_worker.py)."""
import torch

from protomem.losses import DCQLoss, FullSoftmaxLoss, PartialFCLoss, PrototypeMemoryLoss

D, C, B, STEPS = 10, 50, 13, 20
SPLIT = 6  # rank 0 holds rows [0, 6) of each global batch, rank 1 the other 7: unequal on purpose

CASES = {
    "pm": lambda: (PrototypeMemoryLoss(D, 24, momentum=0.4), False),
    "pm_loo_cross": lambda: (PrototypeMemoryLoss(D, 24, exemplars="leave_one_out",
                                                 detach_prototypes=False, quality="norm"), False),
    "dcq": lambda: (DCQLoss(D, 17), False),
    "pfc": lambda: (PartialFCLoss(D, C, sample_rate=0.4, seed=4), True),
    "full": lambda: (FullSoftmaxLoss(D, C, seed=4), True),
}


def make(name):
    """(head, optimiser or None) of a case; the optimiser trains the class weights."""
    head, trains = CASES[name]()
    return head, (torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9) if trains else None)


def global_batch(t):
    """(x [B, D], k [B, D], y [B]) of global step t."""
    g = torch.Generator().manual_seed(100 + t)
    y = torch.randint(C, (B,), generator=g)
    y[-3:] = y[:3]  # some classes with several exemplars, spread over both ranks
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g), y


def local_rows(rank, world):
    """This rank's slice of each global batch (all of it in a world of one)."""
    if world == 1:
        return slice(0, B)
    return slice(0, SPLIT) if rank == 0 else slice(SPLIT, B)


def run_steps(head, opt, name, steps, rows, record=None):
    """Trains on rows ``rows`` of the global batches ``steps``; returns [(loss, grad of x)], or
    [record(head, loss, x)] per step when ``record`` is given."""
    out = []
    for t in steps:
        x, k, y = global_batch(t)
        x = x[rows].clone().requires_grad_()
        loss = head(x, k[rows], y[rows]) if name == "dcq" else head(x, y[rows])
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        out.append((loss.item(), x.grad.clone()) if record is None else record(head, loss, x))
    return out


def step_with_nan_on_rank_one(head, name, rows, rank, t):
    """One step of global batch t in which only rank 1's rows hold a NaN: (loss, committed,
    state before, state after); state_dict is a collective, so every rank calls this."""
    before = head.state_dict()
    x, k, y = global_batch(t)
    x = x[rows].clone()
    if rank == 1:
        x[0, 0] = float("nan")
    loss = head(x, k[rows], y[rows]) if name == "dcq" else head(x, y[rows])
    return loss.item(), head.last_stats["committed"], before, head.state_dict()


def encoder_gradient(head_name, rows, ddp=False):
    """The gradient of a Linear encoder's weight after one step of a head on rows ``rows`` of
    global batch 0; with ``ddp`` the encoder is wrapped in DDP with protomem's sum hook."""
    import protomem

    torch.manual_seed(0)
    enc = torch.nn.Linear(D, D)
    model = enc
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(enc)
        model.register_comm_hook(None, protomem.distributed.sum_gradients_hook)
    head, _ = make(head_name)
    if head_name == "dcq":  # a first step fills the queue (else the loss has no negatives)
        x1, k1, y1 = global_batch(1)
        head(x1[rows], k1[rows], y1[rows])
    x, k, y = global_batch(0)
    emb = model(x[rows])
    loss = head(emb, k[rows], y[rows]) if head_name == "dcq" else head(emb, y[rows])
    loss.backward()
    return enc.weight.grad.clone()
