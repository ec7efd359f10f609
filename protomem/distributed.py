"""torch.distributed glue for the heads: gathering the global batch (with gradient), shard ranges,
and gathering sharded state for checkpoints. Every function works without an initialised process
group (then it is the identity of a world of one)."""
import torch
import torch.distributed as dist


def world():
    """(rank, world_size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n, rank, world_size):
    """[start, end) of shard ``rank`` when n items are split into ``world_size`` near-equal
    contiguous shards (the first ``n % world_size`` shards hold one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _gather_padded(t, sizes):
    """Concatenation over ranks of ``t`` [sizes[rank], ...]; pads to max(sizes) for all_gather."""
    pad = max(sizes)
    if t.shape[0] < pad:
        t = torch.cat([t, t.new_zeros((pad - t.shape[0],) + t.shape[1:])])
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank):
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def batch_sizes(n, device):
    """The batch size of every rank (one tiny all_gather and a host sync): [n_0, ..., n_{W-1}]."""
    rank, world_size = world()
    if world_size == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return [int(p) for p in torch.cat(parts).tolist()]


def gather_batch(x, labels, with_grad=True):
    """The global batch: every rank's embeddings and labels, concatenated in rank order.

    Args:
        x: [B_r, D] float embeddings of this rank (B_r may differ between ranks).
        labels: [B_r] int64.
        with_grad: the gathered embeddings carry gradient back to every rank's x (the backward
            sums the gradients all ranks computed for a row); otherwise they are detached.

    Returns:
        (X [N, D], Y [N], offset): N = sum of the batch sizes; this rank's rows are
        ``X[offset:offset + B_r]``. Without a process group: (x, labels, 0).
    """
    rank, world_size = world()
    if world_size == 1:
        return x, labels, 0
    sizes = batch_sizes(x.shape[0], x.device)
    offset = sum(sizes[:rank])
    Y = _gather_padded(labels, sizes)
    X = _GatherWithGrad.apply(x, sizes, rank) if with_grad else _gather_padded(x.detach(), sizes)
    return X, Y, offset


def all_reduce(t, op="sum"):
    """All-reduce of a tensor without gradient ("sum" or "max"); returns it (in place)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_stack(t):
    """[world_size, *t.shape]: ``t`` of every rank (no gradient; same shape on every rank)."""
    if world()[1] == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def gather_shards(t, total):
    """The full tensor [total, ...] from the contiguous shards ``t`` of every rank (shard_range
    split of ``total`` rows). Called on every rank (a collective)."""
    rank, world_size = world()
    if world_size == 1:
        return t
    sizes = [e - s for s, e in (shard_range(total, r, world_size) for r in range(world_size))]
    return _gather_padded(t, sizes)


def sum_gradients_hook(state, bucket):
    """DDP communication hook (``ddp_model.register_comm_hook(None, sum_gradients_hook)``) that
    sums the encoder's gradients over the ranks instead of averaging them. The heads return the
    global-mean loss with its exact gradient w.r.t. each rank's embeddings, so the sum is the
    gradient of the global mean. (Scaling the loss by the world size instead would also scale the
    sharded class weights' gradients of Partial FC and the full softmax.)"""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
