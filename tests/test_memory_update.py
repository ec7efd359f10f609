"""memory_update_, lookup and rebuild_index_ against protomem.reference, plus bad input."""
import pytest
import torch
from conftest import STORAGE_ATOL, random_ids
from memory_helpers import assert_unchanged, new_memory, random_step, reference_state, snapshot

import protomem
from protomem.reference import lookup_ref, memory_update_ref

OBSERVABLE_COUNTERS = slice(0, 6)  # head, step, hits, misses, evictions, rejected


def check_against_reference(mem, ref, pool):
    protos, labels, stamps, counters = ref
    assert torch.equal(mem.slot_labels.cpu(), labels)
    assert torch.equal(mem.stamps.cpu(), stamps)
    assert torch.equal(mem.counters.cpu()[OBSERVABLE_COUNTERS], counters[OBSERVABLE_COUNTERS])
    atol = STORAGE_ATOL[mem.protos.dtype]
    torch.testing.assert_close(mem.protos.cpu().float(), protos.float(), atol=atol, rtol=0)
    assert torch.equal(mem.lookup(pool.to(mem.protos.device)).cpu(), lookup_ref(labels, pool))


@pytest.mark.parametrize("policy", ["lru", "fifo"])
@pytest.mark.parametrize("momentum", [0.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M,D", [(1, 3), (7, 5), (64, 33)])
def test_matches_reference(device, policy, momentum, dtype, M, D):
    gen = torch.Generator().manual_seed(M * 1000 + D)
    pool = random_ids(gen, 3 * M + 2)
    mem = new_memory(M, D, device, momentum=momentum, policy=policy, dtype=dtype)
    ref = reference_state(mem)
    for step in range(40):
        classes, protos = random_step(gen, M, D, pool, nan_rate=0.1, negative_rate=0.05,
                                      full=step % 7 == 3)
        slots = protomem.memory_update_(mem.protos, mem.slot_labels, mem.stamps, mem.index_keys,
                                        mem.index_vals, mem.counters, classes.to(device),
                                        protos.to(device), momentum, policy)
        ref_slots = memory_update_ref(*ref, classes, protos, momentum, policy)
        assert torch.equal(slots.cpu(), ref_slots), f"step {step}"
        check_against_reference(mem, ref, pool)


def test_index_survives_many_evictions(device):
    """Tombstones pile up with evictions; the index is rebuilt and lookups stay exact."""
    gen = torch.Generator().manual_seed(1)
    M, D = 16, 4
    pool = random_ids(gen, 400)
    mem = new_memory(M, D, device)
    ref = reference_state(mem)
    for _ in range(300):
        classes, protos = random_step(gen, M, D, pool)
        mem.update(classes.to(device), protos.to(device))
        memory_update_ref(*ref, classes, protos)
    check_against_reference(mem, ref, pool)
    assert mem.counters[protomem.reference.REBUILDS] > 0


def test_u_equals_m(device):
    mem = new_memory(5, 3, device)
    classes = torch.arange(10, 15, device=device)
    assert torch.equal(mem.update(classes, torch.randn(5, 3, device=device)).cpu(), torch.arange(5))
    slots = mem.update(torch.arange(12, 17, device=device), torch.randn(5, 3, device=device))
    assert sorted(slots.tolist()) == list(range(5))
    assert sorted(mem.slot_labels.tolist()) == list(range(12, 17))


def test_non_finite_rows_are_rejected_not_written(device):
    mem = new_memory(4, 3, device)
    mem.update(torch.tensor([1, 2], device=device), torch.randn(2, 3, device=device))
    before = mem.protos.clone()
    p = torch.randn(2, 3, device=device)
    p[0, 1] = float("inf")
    slots = mem.update(torch.tensor([1, 9], device=device), p)
    assert mem.stats()["rejected"] == 1
    assert torch.equal(mem.protos[slots[0]], before[slots[0]])  # class 1 kept its old prototype
    assert torch.isfinite(mem.protos).all()


def bad_calls(d):
    ok_c, ok_p = torch.tensor([1, 2], device=d), torch.randn(2, 4, device=d)
    return [
        (dict(classes=ok_c.float()), TypeError, "int64 or int32"),
        (dict(prototypes=torch.randn(2, 5, device=d)), ValueError, "embedding size"),
        (dict(prototypes=torch.randn(3, 4, device=d)), ValueError, "len\\(classes\\)"),
        (dict(prototypes=ok_p.long()), TypeError, "new_protos must be float"),
        (dict(classes=torch.arange(9, device=d), prototypes=torch.randn(9, 4, device=d)), ValueError, "only 8 slots"),
        (dict(classes=torch.tensor([1, -3], device=d)), ValueError, "non-negative"),
        (dict(classes=torch.tensor([4, 4], device=d)), ValueError, "distinct"),
        (dict(classes=ok_c[:, None, None]), ValueError, "shape"),
    ], ok_c, ok_p


def test_bad_input_leaves_memory_unchanged(device):
    mem = new_memory(8, 4, device)
    mem.update(torch.tensor([3, 5, 7], device=device), torch.randn(3, 4, device=device))
    calls, ok_c, ok_p = bad_calls(device)
    before = snapshot(mem)
    for kwargs, error, match in calls:
        args = dict(classes=ok_c, prototypes=ok_p) | kwargs
        with pytest.raises(error, match=match):
            mem.update(**args)
        assert_unchanged(mem, before)


def test_op_level_bad_arguments(device):
    mem = new_memory(8, 4, device)
    c, p = torch.tensor([1, 2], device=device), torch.randn(2, 4, device=device)
    state = [mem.protos, mem.slot_labels, mem.stamps, mem.index_keys, mem.index_vals, mem.counters]
    before = snapshot(mem)
    with pytest.raises(ValueError, match="policy"):
        protomem.memory_update_(*state, c, p, 0.0, "random")
    with pytest.raises(ValueError, match="momentum"):
        protomem.memory_update_(*state, c, p, 1.5, "lru")
    with pytest.raises(ValueError, match="counters"):
        protomem.memory_update_(*state[:5], mem.counters[:4], c, p, 0.0, "lru")
    with pytest.raises(ValueError, match="power-of-two"):
        protomem.memory_update_(*state[:3], mem.index_keys[:12], mem.index_vals[:12], state[5], c, p, 0.0, "lru")
    with pytest.raises(TypeError, match="slot_labels must be"):
        protomem.memory_update_(state[0], mem.slot_labels.int(), *state[2:], c, p, 0.0, "lru")
    assert_unchanged(mem, before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch_is_an_error():
    mem = new_memory(8, 4, "cuda")
    with pytest.raises(ValueError, match="device"):
        mem.update(torch.tensor([1, 2]), torch.randn(2, 4, device="cuda"))


def test_opcheck(device):
    mem = new_memory(8, 4, device)
    mem.update(torch.tensor([3, 5], device=device), torch.randn(2, 4, device=device))
    args = (mem.protos, mem.slot_labels, mem.stamps, mem.index_keys, mem.index_vals, mem.counters,
            torch.tensor([5, 11, 12], device=device), torch.randn(3, 4, device=device), 0.5, "fifo")
    torch.library.opcheck(torch.ops.protomem.memory_update_.default, args)
    labels = torch.tensor([[3, 4], [5, 11]], device=device)
    torch.library.opcheck(torch.ops.protomem.lookup.default, (mem.index_keys, mem.index_vals, labels))
    torch.library.opcheck(torch.ops.protomem.rebuild_index_.default,
                          (mem.index_keys, mem.index_vals, mem.slot_labels))


def test_torch_compile_fullgraph(device):
    mem = new_memory(16, 8, device, momentum=0.3)
    twin = new_memory(16, 8, device, momentum=0.3)

    def step(m, classes, protos):
        slots = m.update(classes, protos, check=False)
        return slots, m.lookup(classes + 1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        classes = torch.randperm(40, generator=gen)[:6].to(device)
        protos = torch.randn(6, 8, generator=gen).to(device)
        out, want = compiled(mem, classes, protos), step(twin, classes, protos)
        assert all(torch.equal(a, b) for a, b in zip(out, want))
    assert torch.equal(mem.slot_labels, twin.slot_labels)
    torch.testing.assert_close(mem.protos, twin.protos)


def test_rebuild_index_restores_lookups(device):
    mem = new_memory(8, 4, device)
    mem.update(torch.tensor([3, 50, 2**50], device=device), torch.randn(3, 4, device=device))
    query = torch.tensor([3, 50, 2**50, 7], device=device)
    want = mem.lookup(query)
    mem.index_keys.fill_(-1)
    assert (mem.lookup(query) == -1).all()
    protomem.rebuild_index_(mem.index_keys, mem.index_vals, mem.slot_labels)
    assert torch.equal(mem.lookup(query), want)


def test_torch_compile_fullgraph_generate_and_update(device):
    """The whole memory step (data-dependent U included) compiles as one graph."""
    mems = [new_memory(16, 8, device) for _ in range(2)]

    def step(m, x, labels):
        classes, protos, inverse = protomem.generate_prototypes(x, labels)
        slots = protomem.memory_update_(m.protos, m.slot_labels, m.stamps, m.index_keys,
                                        m.index_vals, m.counters, classes, protos.detach(), 0.0, "lru")
        return protos, slots[inverse]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(10, 8, generator=gen).to(device)
        labels = torch.randint(0, 12, (10,), generator=gen).to(device)
        (p1, s1), (p2, s2) = compiled(mems[0], x, labels), step(mems[1], x, labels)
        torch.testing.assert_close(p1, p2)
        assert torch.equal(s1, s2)
    assert torch.equal(mems[0].slot_labels, mems[1].slot_labels)
