"""The Prototype Memory head's step (and DCQ's, once its label check no longer syncs) waits for
nothing on the host: torch.compile(fullgraph=True) compiles it on CPU (a host sync would break
the graph) and matches eager; on a GPU it runs under torch.cuda.set_sync_debug_mode("error")."""
import pytest
import torch
from conftest import HAS_CUDA

from protomem.losses import DCQLoss, PrototypeMemoryLoss

D, M, B = 12, 24, 16
CONFIGS = {
    "default": dict(momentum=0.3),
    "fifo": dict(policy="fifo", momentum=0.5),
    "loo_cross": dict(exemplars="leave_one_out", detach_prototypes=False),
}


def step_data(t):
    g = torch.Generator().manual_seed(200 + t)
    y = torch.randint(40, (B,), generator=g)
    return torch.randn(B, D, generator=g), y


def run(head, steps, device="cpu"):
    data = [tuple(t.to(device) for t in step_data(t)) for t in range(steps)]  # before any check
    out = []
    for x, y in data:
        x = x.clone().requires_grad_()
        loss = head(x, y)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_compiles_fullgraph_and_matches_eager(name):
    eager, compiled = PrototypeMemoryLoss(D, M, **CONFIGS[name]), PrototypeMemoryLoss(D, M, **CONFIGS[name])
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for (la, ga), (lb, gb) in zip(run(step, 5), run(eager, 5)):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("name", CONFIGS)
def test_no_host_sync_on_cuda(name):
    head = PrototypeMemoryLoss(D, M, **CONFIGS[name]).cuda()
    run(head, 1, "cuda")  # first call: the update's workspace is allocated
    data = [tuple(t.cuda() for t in step_data(t)) for t in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in data:
            head(x.requires_grad_(), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert head.memory.stats()["lost_inserts"] == 0


def test_unchecked_negative_labels_are_left_out():
    """Compiled (no label check, as on CUDA without PROTOMEM_DEBUG): rows with a negative label
    take no part in the loss or the memory; the rest is the step of the batch without them."""
    a, b = PrototypeMemoryLoss(D, M, momentum=0.3), PrototypeMemoryLoss(D, M, momentum=0.3)
    step = torch.compile(a, fullgraph=True, backend="aot_eager")
    for t in range(3):
        x, y = step_data(t)
        y[:3] = torch.tensor([-1, -3, -1])
        keep = y >= 0
        xa, xb = x.clone().requires_grad_(), x[keep].clone().requires_grad_()
        la, lb = step(xa, y), b(xb, y[keep])
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xa.grad[keep], xb.grad, atol=1e-5, rtol=1e-4)
        assert (xa.grad[~keep] == 0).all()
    assert torch.equal(a.memory.slot_labels, b.memory.slot_labels)
    torch.testing.assert_close(a.memory.protos, b.memory.protos, atol=1e-6, rtol=0)
    assert a.memory.stats()["rejected"] == 3  # class -3 in each step; -1 is padding


def test_dcq_step_compiles_fullgraph_and_matches_eager():
    eager, compiled = DCQLoss(D, 15), DCQLoss(D, 15)
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for t in range(5):
        x, y = step_data(t)
        k = torch.randn(B, D, generator=torch.Generator().manual_seed(t))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = step(xa, k, y), eager(xb, k, y)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    for key, value in eager.state_dict().items():  # state_dict flushes the pending enqueue
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
