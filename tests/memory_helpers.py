"""Helpers for the memory tests: random update steps and state snapshots."""
import torch

import protomem


def snapshot(mem):
    """A copy of every buffer of a PrototypeMemory or ClassQueue."""
    return {k: v.clone() for k, v in mem.state_dict().items()}


def assert_unchanged(mem, before):
    for k, v in mem.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def random_step(gen, M, D, pool, *, nan_rate=0.0, negative_rate=0.0, full=False):
    """One step's (classes [U], protos [U, D]) drawn from the id pool; U <= M (U == M if full)."""
    U = M if full else int(torch.randint(1, M + 1, (1,), generator=gen))
    U = min(U, len(pool))
    classes = pool[torch.randperm(len(pool), generator=gen)[:U]].clone()
    protos = torch.randn(U, D, generator=gen)
    bad = torch.rand(U, generator=gen)
    protos[bad < nan_rate] = float("nan")
    classes[(bad > 1 - negative_rate)] = -5
    return classes, protos


def reference_state(mem):
    """Clones of the tensors memory_update_ref works on."""
    return [mem.protos.clone(), mem.slot_labels.clone(), mem.stamps.clone(), mem.counters.clone()]


def new_memory(M, D, device, **kw):
    return protomem.PrototypeMemory(M, D, device=device, **kw)
