"""PrototypeMemory as a module: state round trips, stats, repr, reset, constructor errors."""
import io

import pytest
import torch
from conftest import random_ids

import protomem


def steps(mem, gen, pool, n, device):
    out = []
    for _ in range(n):
        labels = pool[torch.randint(len(pool), (12,), generator=gen)]
        x = torch.randn(12, mem.embedding_size, generator=gen)
        out.append(mem.update_from_batch(x.to(device), labels.to(device))[3])
    return out


@pytest.mark.parametrize("policy", ["lru", "fifo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_save_load_continues_exactly(device, policy, dtype):
    pool = random_ids(torch.Generator().manual_seed(0), 40)
    straight = protomem.PrototypeMemory(16, 5, momentum=0.4, policy=policy, dtype=dtype, device=device)
    steps(straight, torch.Generator().manual_seed(1), pool, 30, device)

    first = protomem.PrototypeMemory(16, 5, momentum=0.4, policy=policy, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    steps(first, gen, pool, 15, device)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = protomem.PrototypeMemory(16, 5, momentum=0.4, policy=policy, dtype=dtype, device=device)
    resumed.load_state_dict(torch.load(buf))
    steps(resumed, gen, pool, 15, device)

    for name in ("protos", "slot_labels", "stamps"):
        assert torch.equal(getattr(straight, name), getattr(resumed, name)), name
    assert torch.equal(straight.counters[:6], resumed.counters[:6])
    assert torch.equal(straight.lookup(pool.to(device)), resumed.lookup(pool.to(device)))


def test_load_rebuilds_a_stale_index(device):
    a = protomem.PrototypeMemory(8, 3, device=device)
    a.update(torch.tensor([4, 9, 2**45], device=device), torch.randn(3, 3, device=device))
    state = a.state_dict()
    state["index_keys"] = torch.full_like(state["index_keys"], -1)  # an index that lost its keys
    b = protomem.PrototypeMemory(8, 3, device=device)
    b.load_state_dict(state)
    q = torch.tensor([4, 9, 2**45, 5], device=device)
    assert torch.equal(b.lookup(q), a.lookup(q))


def test_stats_repr_reset(device):
    mem = protomem.PrototypeMemory(4, 3, device=device)
    assert mem.stats()["filled"] == 0 and mem.stats()["mean_age"] == 0.0
    mem.update(torch.tensor([1, 2, 3], device=device), torch.randn(3, 3, device=device))
    mem.update(torch.tensor([3, 4], dtype=torch.int32, device=device), torch.randn(2, 3, device=device))
    s = mem.stats()
    # lru: the window after the head is slots 3, 0; class 3 moves there from slot 2, class 4 evicts 1
    assert (s["filled"], s["step"], s["hits"], s["misses"], s["evictions"], s["rejected"]) == (3, 2, 1, 4, 1, 0)
    assert mem.slot_labels.tolist() == [4, 2, -1, 3]
    assert s["max_age"] == 1 and 0 < s["mean_age"] < 1
    assert "memory_size=4" in repr(mem) and "policy='lru'" in repr(mem)
    mem.reset()
    assert mem.stats()["filled"] == 0 and (mem.lookup(torch.tensor([1, 2], device=device)) == -1).all()


def test_labels_of_shape_b_by_1(device):
    mem = protomem.PrototypeMemory(8, 3, device=device)
    classes, _, inverse, slots = mem.update_from_batch(
        torch.randn(4, 3, device=device), torch.tensor([[5], [6], [5], [7]], dtype=torch.int32, device=device))
    assert classes.tolist() == [5, 6, 7] and inverse.tolist() == [0, 1, 0, 2]
    assert torch.equal(mem.lookup(classes), slots)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(memory_size=0, embedding_size=4), ValueError),
        (dict(memory_size=4, embedding_size=-1), ValueError),
        (dict(memory_size=4, embedding_size=4, momentum=1.5), ValueError),
        (dict(memory_size=4, embedding_size=4, policy="random"), ValueError),
        (dict(memory_size=4, embedding_size=4, dtype=torch.int64), TypeError),
    ],
)
def test_constructor_errors(kwargs, error):
    with pytest.raises(error):
        protomem.PrototypeMemory(**kwargs)


def test_index_capacity():
    assert protomem.ops.index_capacity(1) == 16
    assert protomem.ops.index_capacity(1000) == 2048
    assert protomem.ops.index_capacity(1024) == 2048
    assert protomem.ops.index_capacity(1025) == 4096


@pytest.mark.parametrize("kind", ["memory", "queue"])
def test_commit_false_leaves_state_exactly(device, kind):
    """commit=tensor(False) (a skipped step, decided on the device) changes nothing; True is a
    normal update."""
    gen = torch.Generator().manual_seed(3)
    make = {"memory": lambda: protomem.PrototypeMemory(6, 4, momentum=0.5, device=device),
            "queue": lambda: protomem.ClassQueue(5, 4, dtype=torch.bfloat16, device=device)}[kind]
    a, b = make(), make()

    def write(mem, classes, rows, commit=None):
        classes, rows = classes.to(device), rows.to(device)
        if kind == "memory":
            mem.update(classes, rows, commit=commit)
        else:
            mem.enqueue(rows, classes, commit=commit)

    for step in range(4):
        classes, rows = torch.randperm(9, generator=gen)[:3], torch.randn(3, 4, generator=gen)
        write(a, classes, rows)
        before = {k: v.clone() for k, v in a.state_dict().items()}
        write(a, classes + 20, rows * 2, commit=torch.tensor(False, device=device))
        for k, v in a.state_dict().items():
            assert torch.equal(v, before[k]), (step, k)
        write(b, classes, rows, commit=torch.tensor(True, device=device))
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), (step, k)
