"""Every head on CUDA against the same head on CPU (skipped without a GPU and a CUDA build):
same losses, embedding gradients and memories over several steps."""
import pytest
import torch
from conftest import HAS_CUDA
from test_heads_common import HEADS, call, optimiser, step_data

from protomem.reference import LOST_INSERTS, REJECTED

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")]
OBSERVABLE = list(range(REJECTED + 1)) + [LOST_INSERTS]


@pytest.mark.parametrize("name", HEADS)
def test_cuda_matches_cpu(name):
    heads = {dev: HEADS[name]().to(dev) for dev in ("cpu", "cuda")}
    opts = {dev: optimiser(h) for dev, h in heads.items()}
    for t in range(6):
        x, y = step_data(t)
        out = {}
        for dev, head in heads.items():
            xd = x.to(dev).requires_grad_()
            loss = call(head, xd, y.to(dev))
            loss.backward()
            if opts[dev] is not None:
                opts[dev].step()
                opts[dev].zero_grad()
            out[dev] = (loss.item(), xd.grad.cpu())
        assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-4, abs=1e-4)
        torch.testing.assert_close(out["cuda"][1], out["cpu"][1], atol=1e-4, rtol=1e-3)
    states = {dev: h.state_dict() for dev, h in heads.items()}
    for key, value in states["cpu"].items():
        if key.endswith(("index_keys", "index_vals")):
            continue  # same content, layout may differ with hash-table insertion order
        got = states["cuda"][key].cpu()
        if key.endswith("memory.counters"):
            # head, step, hits, misses, evictions, rejected and lost inserts are equal; tombstones
            # and rebuilds follow the order of the concurrent inserts on CUDA
            got, value = got[OBSERVABLE], value[OBSERVABLE]
        if value.is_floating_point():
            torch.testing.assert_close(got, value, atol=1e-4, rtol=1e-3)
        else:
            assert torch.equal(got, value), key
