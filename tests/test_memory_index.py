"""The label->slot index's edge cases: rebuilds before inserts could overfill the table, lost
inserts are counted, an out-of-range ring head, duplicate classes under PROTOMEM_DEBUG, old and
edited checkpoints."""
import pytest
import torch
from conftest import HAS_CUDA, random_ids
from memory_helpers import new_memory, random_step, reference_state
from test_memory_update import check_against_reference

import protomem
from protomem.reference import EVICTIONS, HEAD, LOST_INSERTS, MISSES, REBUILDS, TOMBSTONES
from protomem.reference import memory_update_ref


def op_state(mem):
    return [mem.protos, mem.slot_labels, mem.stamps, mem.index_keys, mem.index_vals, mem.counters]


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_rebuild_when_tombstones_plus_inserts_pass_a_quarter(device, policy):
    """A step rebuilds exactly when its tombstones (after its evictions) plus its inserts exceed
    T/4, so live + deleted entries never pass 3/4 of the table, even within the step."""
    gen = torch.Generator().manual_seed(7)
    M, D = 16, 3
    pool = random_ids(gen, 5 * M)
    mem = new_memory(M, D, device, policy=policy)
    ref = reference_state(mem)
    T = mem.index_keys.numel()
    rebuilt = 0
    for step in range(200):
        classes, protos = random_step(gen, M, D, pool, full=step % 5 == 0)
        before = mem.counters.cpu().clone()
        mem.update(classes.to(device), protos.to(device))
        memory_update_ref(*ref, classes, protos, policy=policy)
        after = mem.counters.cpu()
        inserts = int(after[MISSES] - before[MISSES])
        tombstones = int(before[TOMBSTONES] + after[EVICTIONS] - before[EVICTIONS])
        due = (tombstones + inserts) * 4 > T
        assert int(after[REBUILDS] - before[REBUILDS]) == due, f"step {step}"
        rebuilt += due
        if not due:  # entries only fill up within a step without rebuild: this is its peak
            assert int((mem.index_keys != -1).sum()) * 4 <= 3 * T, f"step {step}"
        assert int((mem.index_keys == -2).sum()) == int(after[TOMBSTONES])
        check_against_reference(mem, ref, pool)
    assert 0 < rebuilt < 200 and int(mem.counters[LOST_INSERTS]) == 0


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_memory_driven_full_never_loses_an_insert(device, policy):
    gen = torch.Generator().manual_seed(11)
    M, D = 32, 2  # a power of two: T = 2M, the tightest table
    pool = random_ids(gen, 3 * M)
    mem = new_memory(M, D, device, policy=policy, momentum=0.5)
    ref = reference_state(mem)
    for _ in range(300):
        classes, protos = random_step(gen, M, D, pool, full=True)
        mem.update(classes.to(device), protos.to(device))
        memory_update_ref(*ref, classes, protos, momentum=0.5, policy=policy)
    check_against_reference(mem, ref, pool)
    assert mem.stats()["lost_inserts"] == 0


def test_a_failed_insert_is_counted(device):
    """A table with no free entry (only a corrupted state can have one) loses the insert and
    says so in stats()."""
    mem = new_memory(4, 3, device)
    mem.index_keys.copy_(torch.arange(10**12, 10**12 + mem.index_keys.numel(), device=device))
    slots = mem.update(torch.tensor([5], device=device), torch.randn(1, 3, device=device))
    assert mem.slot_labels[slots[0]].item() == 5
    assert mem.stats()["lost_inserts"] == 1
    assert mem.lookup(torch.tensor([5], device=device)).item() == -1


@pytest.mark.parametrize("head", [-3, 7, 2**40 + 1, -(2**50)])
@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_ring_head_out_of_range_is_wrapped(device, head, policy):
    gen = torch.Generator().manual_seed(2)
    M, D = 5, 4
    pool = random_ids(gen, 12)
    mem = new_memory(M, D, device, policy=policy)
    ref = reference_state(mem)
    for step in range(6):
        mem.counters[HEAD] = head + step
        ref[3][HEAD] = head + step
        classes, protos = random_step(gen, M, D, pool)
        slots = mem.update(classes.to(device), protos.to(device))
        want = memory_update_ref(*ref, classes, protos, policy=policy)
        assert torch.equal(slots.cpu(), want)
        assert ((slots >= 0) & (slots < M)).all()
        check_against_reference(mem, ref, pool)


def test_load_rejects_a_head_out_of_range_and_pads_old_counters(device):
    mem = new_memory(6, 3, device)
    mem.update(torch.tensor([4, 9], device=device), torch.randn(2, 3, device=device))
    state = mem.state_dict()
    edited = dict(state, counters=state["counters"].clone())
    edited["counters"][HEAD] = 6
    fresh = new_memory(6, 3, device)
    with pytest.raises(ValueError, match="ring head 6 is outside"):
        fresh.load_state_dict(edited)
    old = dict(state, counters=state["counters"][:LOST_INSERTS].clone())  # an 8-counter checkpoint
    fresh.load_state_dict(old)
    assert torch.equal(fresh.counters[:TOMBSTONES], mem.counters[:TOMBSTONES])
    assert fresh.counters[LOST_INSERTS].item() == 0
    assert torch.equal(fresh.lookup(torch.tensor([4, 9], device=device)),
                       mem.lookup(torch.tensor([4, 9], device=device)))


def test_duplicate_classes_are_an_error_in_debug_mode(device, monkeypatch):
    mem = new_memory(8, 3, device)
    classes, protos = torch.tensor([3, -1, 7, 3], device=device), torch.randn(4, 3, device=device)
    padding = torch.tensor([3, -1, -1, 7], device=device)  # repeated padding is not a duplicate
    monkeypatch.setenv("PROTOMEM_DEBUG", "1")
    with pytest.raises(ValueError, match="distinct"):
        protomem.memory_update_(*op_state(mem), classes, protos)
    assert (mem.slot_labels == -1).all()
    protomem.memory_update_(*op_state(mem), padding, protos)
    assert sorted(mem.slot_labels[mem.slot_labels >= 0].tolist()) == [3, 7]
    assert mem.stats()["rejected"] == 0  # padding is not counted


def test_commit_flag_and_previous_slots(device):
    """The op's commit switch leaves every buffer as it was; the previous slot and stamp it
    returns equal a lookup before the update."""
    mem = new_memory(6, 3, device)
    mem.update(torch.tensor([1, 2, 3], device=device), torch.randn(3, 3, device=device))
    mem.update(torch.tensor([4], device=device), torch.randn(1, 3, device=device))
    classes = torch.tensor([2, 4, 8, -1], device=device)
    protos = torch.randn(4, 3, device=device)
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    prev = mem.lookup(classes)
    stamps = torch.where(prev >= 0, mem.stamps[prev.clamp_min(0)], -1)
    no = torch.tensor(False, device=device)
    slots, prev_slots, prev_stamps = mem.update(classes, protos, check=False, commit=no,
                                                with_previous=True)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(slots, prev) and torch.equal(prev_slots, prev)
    assert torch.equal(prev_stamps, stamps)
    yes = torch.tensor(True, device=device)
    slots, prev_slots, prev_stamps = mem.update(classes, protos, check=False, commit=yes,
                                                with_previous=True)
    assert torch.equal(prev_slots, prev) and torch.equal(prev_stamps, stamps)
    assert torch.equal(mem.lookup(classes), slots)
    assert slots[3].item() == -1 and prev_slots[3].item() == -1


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_cuda_update_launches_and_allocations(policy):
    """At most 4 kernels (3 + the rebuild kernel, which returns at once unless due) and no
    allocation but the returned tensor once the workspace exists."""
    mem = new_memory(1000, 16, "cuda", policy=policy)
    ok = torch.tensor(True, device="cuda")
    steps = [(torch.randperm(3000, device="cuda")[:100], torch.randn(100, 16, device="cuda"))
             for _ in range(3)]
    mem.update(*steps[0], check=False, commit=ok)  # allocates the workspace
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_stats()["allocation.all.allocated"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for classes, protos in steps[1:]:
            mem.update(classes, protos, check=False, commit=ok)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= 2 * 4, [e.name for e in kernels]
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - allocated <= 2
