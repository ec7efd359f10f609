"""The CUDA memory update against the CPU op over 1,000 random steps of up to U = M classes at
M = 1e4 (skipped without a GPU): slots, labels, stamps, prototypes, the order-independent
counters and lookups stay equal step after step."""
import pytest
import torch
from conftest import HAS_CUDA, random_ids

import protomem
from protomem.reference import LOST_INSERTS, REJECTED

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")]

OBSERVABLE = list(range(REJECTED + 1)) + [LOST_INSERTS]


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_cuda_matches_cpu_over_1000_steps(policy):
    M, D, steps = 10_000, 8, 1000
    gen = torch.Generator().manual_seed(17)
    pool = random_ids(gen, 3 * M)
    mems = {dev: protomem.PrototypeMemory(M, D, momentum=0.5, policy=policy, device=dev)
            for dev in ("cpu", "cuda")}
    for step in range(steps):
        big = step % 50 == 0
        U = M if big else int(torch.randint(1, M // 8, (1,), generator=gen))
        classes = pool[torch.randperm(len(pool), generator=gen)[:U]]
        protos = torch.randn(U, D, generator=gen)
        protos[torch.rand(U, generator=gen) < 0.01] = float("nan")
        slots = {dev: m.update(classes.to(dev), protos.to(dev), check=False) for dev, m in mems.items()}
        cpu, cuda = mems["cpu"], mems["cuda"]
        assert torch.equal(slots["cuda"].cpu(), slots["cpu"]), f"step {step}"
        if big or step % 97 == 0 or step == steps - 1:
            assert torch.equal(cuda.slot_labels.cpu(), cpu.slot_labels), f"step {step}"
            assert torch.equal(cuda.stamps.cpu(), cpu.stamps), f"step {step}"
            assert torch.equal(cuda.counters.cpu()[OBSERVABLE], cpu.counters[OBSERVABLE]), f"step {step}"
            torch.testing.assert_close(cuda.protos.cpu(), cpu.protos, atol=2e-6, rtol=0)
            query = pool[torch.randperm(len(pool), generator=gen)[:2000]]
            assert torch.equal(cuda.lookup(query.cuda()).cpu(), cpu.lookup(query)), f"step {step}"
    assert cpu.counters[LOST_INSERTS].item() == 0 and cuda.counters[LOST_INSERTS].item() == 0
