"""queue_enqueue_ and ClassQueue against protomem.reference.queue_enqueue_ref."""
import pytest
import torch
from conftest import STORAGE_ATOL
from memory_helpers import assert_unchanged, snapshot

import protomem
from protomem.reference import queue_enqueue_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K,D", [(1, 1), (7, 5), (100, 33)])
def test_matches_reference(device, dtype, K, D):
    gen = torch.Generator().manual_seed(K + D)
    q = protomem.ClassQueue(K, D, dtype=dtype, device=device)
    ref = [q.keys.cpu().clone(), q.labels.cpu().clone(), q.counters.cpu().clone()]
    for _ in range(30):
        N = int(torch.randint(0, 2 * K + 3, (1,), generator=gen))
        keys = torch.randn(N, D, generator=gen)
        labels = torch.randint(0, 2**62, (N,), generator=gen)
        r = torch.rand(N, generator=gen)
        keys[r < 0.1, 0] = float("nan")
        labels[r > 0.95] = -1
        q.enqueue(keys.to(device), labels.to(device))
        queue_enqueue_ref(*ref, keys, labels)
        assert torch.equal(q.labels.cpu(), ref[1]) and torch.equal(q.counters.cpu(), ref[2])
        filled = ref[1] >= 0
        torch.testing.assert_close(q.keys.cpu()[filled].float(), ref[0][filled].float(),
                                   atol=STORAGE_ATOL[dtype], rtol=0)


def test_overwrites_oldest(device):
    q = protomem.ClassQueue(3, 2, device=device)
    for i in range(5):
        q.enqueue(torch.full((1, 2), float(i), device=device), torch.tensor([i], device=device))
    assert sorted(q.labels.tolist()) == [2, 3, 4]
    assert q.stats() == {"size": 3, "filled": 3, "enqueued": 5, "rejected": 0, "head": 2}


def test_bad_input_leaves_queue_unchanged(device):
    q = protomem.ClassQueue(4, 3, device=device)
    q.enqueue(torch.randn(2, 3, device=device), torch.tensor([1, 2], device=device))
    before = snapshot(q)
    with pytest.raises(ValueError, match="embedding size"):
        q.enqueue(torch.randn(2, 4, device=device), torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="labels.size"):
        q.enqueue(torch.randn(2, 3, device=device), torch.tensor([1, 2, 3], device=device))
    with pytest.raises(TypeError, match="int64 or int32"):
        q.enqueue(torch.randn(2, 3, device=device), torch.tensor([1.0, 2.0], device=device))
    assert_unchanged(q, before)


def test_opcheck(device):
    q = protomem.ClassQueue(5, 3, device=device)
    args = (q.keys, q.labels, q.counters, torch.randn(7, 3, device=device),
            torch.arange(7, device=device))
    torch.library.opcheck(torch.ops.protomem.queue_enqueue_.default, args)


def test_state_round_trip(device):
    a = protomem.ClassQueue(6, 2, device=device)
    a.enqueue(torch.randn(4, 2, device=device), torch.arange(4, device=device))
    b = protomem.ClassQueue(6, 2, device=device)
    b.load_state_dict(a.state_dict())
    keys, labels = torch.randn(5, 2, device=device), torch.arange(5, device=device)
    a.enqueue(keys, labels)
    b.enqueue(keys, labels)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "queue_size=6" in repr(a)


@pytest.mark.parametrize("head", [-4, 9, 2**45 + 3])
def test_head_out_of_range_is_wrapped(device, head):
    K, D = 7, 3
    gen = torch.Generator().manual_seed(5)
    q = protomem.ClassQueue(K, D, device=device)
    ref = [q.keys.cpu().clone(), q.labels.cpu().clone(), q.counters.cpu().clone()]
    for step, N in enumerate([3, 9, 1]):
        q.counters[0], ref[2][0] = head + step, head + step
        keys, labels = torch.randn(N, D, generator=gen), torch.randint(0, 50, (N,), generator=gen)
        q.enqueue(keys.to(device), labels.to(device))
        queue_enqueue_ref(*ref, keys, labels)
        assert torch.equal(q.labels.cpu(), ref[1]) and torch.equal(q.counters.cpu(), ref[2])
        torch.testing.assert_close(q.keys.cpu(), ref[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_enqueue_is_one_kernel_and_leaves_its_ticket_at_zero():
    q = protomem.ClassQueue(50, 8, device="cuda")
    keys, labels = torch.randn(37, 8, device="cuda"), torch.arange(37, device="cuda")
    q.enqueue(keys, labels)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        q.enqueue(keys, labels)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    assert q._done.item() == 0 and q.stats()["head"] == 74 % 50 and q.stats()["enqueued"] == 74
