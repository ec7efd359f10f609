"""Thousands of random steps of generate_prototypes + memory update against a small loop-based
Python model of the ring and a dict (independent of protomem.reference)."""
import math

import pytest
import torch
from conftest import random_ids

import protomem


class RingModel:
    """The documented semantics, one class at a time."""

    def __init__(self, M, D, momentum, policy):
        self.M, self.D, self.a, self.policy = M, D, momentum, policy
        self.P = [[0.0] * D for _ in range(M)]
        self.L = [-1] * M
        self.S = [0] * M
        self.head = self.step = 0
        self.where = {}  # class -> slot

    @staticmethod
    def _normalize(v):
        n = max(math.sqrt(sum(t * t for t in v)), 1e-12)
        return [t / n for t in v]

    def update(self, classes, protos):
        M, U = self.M, len(classes)
        valid = [c >= 0 and all(math.isfinite(t) for t in p) for c, p in zip(classes, protos)]
        old = [self.where.get(c, -1) for c in classes]
        fresh = {}
        for u in range(U):
            if valid[u]:
                a = self.a if old[u] >= 0 else 0.0
                prev = self.P[old[u]] if old[u] >= 0 else [0.0] * self.D
                fresh[u] = self._normalize([a * q + (1 - a) * t for q, t in zip(prev, protos[u])])
        slot = [-1] * U
        held = set()
        placed = []
        for u in range(U):
            if not valid[u]:
                continue
            if old[u] >= 0 and self.policy == "fifo":
                slot[u] = old[u]
                held.add((old[u] - self.head) % M)
            else:
                if old[u] >= 0:
                    self.L[old[u]] = -1
                    del self.where[classes[u]]
                placed.append(u)
        r, last = 0, -1
        for u in placed:
            while r in held:
                r += 1
            s = (self.head + r) % M
            if self.L[s] >= 0:
                del self.where[self.L[s]]
                self.L[s] = -1
            slot[u], last, r = s, r, r + 1
        for u in fresh:
            s = slot[u]
            self.P[s], self.L[s], self.S[s] = fresh[u], classes[u], self.step
            self.where[classes[u]] = s
        if last >= 0:
            self.head = (self.head + last + 1) % M
        self.step += 1
        return [slot[u] if valid[u] else (old[u] if old[u] >= 0 and self.L[old[u]] == classes[u] else -1)
                for u in range(U)]


def run(device, M, D, momentum, policy, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    pool = random_ids(gen, 3 * M + 3)
    mem = protomem.PrototypeMemory(M, D, momentum=momentum, policy=policy, device=device)
    model = RingModel(M, D, momentum, policy)
    for step in range(steps):
        if step % 11 == 5:  # exactly M distinct classes
            labels = pool[torch.randperm(len(pool), generator=gen)[:M]]
            labels = labels[torch.randint(M, (2 * M,), generator=gen)] if step % 2 else labels
        else:  # repeated classes within a batch
            B = int(torch.randint(1, 3 * M + 1, (1,), generator=gen))
            few = pool[torch.randperm(len(pool), generator=gen)[:M]]
            labels = few[torch.randint(M, (B,), generator=gen)]
        x = torch.randn(len(labels), D, generator=gen)
        if step % 13 == 7:
            x[0] = float("nan")  # that class's prototype is NaN: rejected
        classes, protos, inverse, slots = mem.update_from_batch(x.to(device), labels.to(device))
        want = model.update(classes.tolist(), protos.cpu().double().tolist())
        assert slots.tolist() == want, f"step {step}"
        assert mem.slot_labels.tolist() == model.L, f"step {step}"
        assert mem.stamps.tolist() == model.S
        assert int(mem.counters[0]) == model.head and int(mem.counters[1]) == model.step
        filled = [s for s in range(M) if model.L[s] >= 0]
        torch.testing.assert_close(mem.protos[filled].cpu().double(),
                                   torch.tensor([model.P[s] for s in filled], dtype=torch.float64).reshape(-1, D),
                                   atol=1e-5, rtol=0)
        looked = mem.lookup(pool.to(device)).tolist()
        assert looked == [model.where.get(c, -1) for c in pool.tolist()]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lru", "fifo"])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("M", [1, 6, 17])
def test_random_steps_match_python_model(device, policy, momentum, M):
    run(device, M, 3, momentum, policy, steps=1000, seed=M + int(10 * momentum))
