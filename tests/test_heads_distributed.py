"""The heads under torch.distributed: 2 gloo processes on CPU against one process on the
concatenated batches (uneven per-rank batch sizes): same losses and embedding gradients, the
same memories on both ranks, and checkpoints that move between world sizes (Partial FC and the
full softmax re-shard their class weights)."""
import os
import subprocess
import sys

import pytest
import torch
from heads_setup import CASES, STEPS, B, SPLIT, encoder_gradient, make, run_steps

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run (with checkpoints written for the workers to load) and both ranks'
    results of the 2-process run."""
    root = tmp_path_factory.mktemp("dist")
    single = {}
    for name in CASES:
        head, opt = make(name)
        steps = run_steps(head, opt, name, range(STEPS), slice(0, B))
        torch.save(head.state_dict(), root / f"{name}.pt")
        resumed, opt = make(name)  # as the workers do: load the checkpoint, a fresh optimiser
        resumed.load_state_dict(torch.load(root / f"{name}.pt"))
        later = run_steps(resumed, opt, name, range(STEPS, STEPS + 3), slice(0, B))
        single[name] = {"steps": steps, "state": torch.load(root / f"{name}.pt"), "later": later}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"), str(r), "2",
                               str(root / "init"), str(root), str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode()[-3000:]
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranks


@pytest.mark.parametrize("name", CASES)
def test_losses_and_gradients_equal_one_process(runs, name):
    single, ranks = runs
    for t, (loss, grad) in enumerate(single[name]["steps"]):
        for rank in ranks:
            assert abs(rank[name]["steps"][t][0] - loss) <= 1e-5 * max(1.0, abs(loss)), (t, name)
        both = torch.cat([ranks[0][name]["steps"][t][1], ranks[1][name]["steps"][t][1]])
        assert both.shape[0] == B and ranks[0][name]["steps"][t][1].shape[0] == SPLIT
        # float32 sums in another order, compounded by 8 SGD steps on the class weights
        torch.testing.assert_close(both, grad, atol=1e-4 * float(grad.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_states_identical_on_both_ranks_and_equal_one_process(runs, name):
    single, ranks = runs
    a, b, want = ranks[0][name]["state"], ranks[1][name]["state"], single[name]["state"]
    assert a.keys() == b.keys() == want.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # memories identical on the ranks
        if a[key].is_floating_point():
            # float32 sums in another order, compounded by 20 SGD steps (lr 0.5, momentum 0.9) on
            # the class weights: one process with another column block size of the kernel
            # differs from itself by 1.8e-4 (a sharding error would be O(0.1))
            torch.testing.assert_close(a[key], want[key], atol=1e-3, rtol=1e-3)
        else:
            assert torch.equal(a[key], want[key]), key
    if name.startswith("pm"):
        assert (a["memory.slot_labels"] >= 0).sum() > 0


@pytest.mark.parametrize("name", ["pfc", "full"])
def test_checkpoint_from_world_two_loads_in_world_one(runs, name):
    single, ranks = runs
    head, opt = make(name)
    head.load_state_dict(ranks[0][name]["state"])  # saved at world size 2: the full matrix
    assert head.weight.shape[0] == 50
    # the 2-process weights hold the rounding of another summation order (see above)
    torch.testing.assert_close(head.weight.detach(), single[name]["state"]["weight"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_from_world_one_loads_in_world_two(runs, name):
    """Each rank loads the one-process checkpoint (the sharded heads keep their slice) and
    training goes on exactly as a one-process run resumed from it."""
    single, ranks = runs
    if name in ("pfc", "full"):
        full = single[name]["state"]["weight"]
        assert torch.equal(ranks[0][name]["resumed"]["local_weight"], full[:25])
        assert torch.equal(ranks[1][name]["resumed"]["local_weight"], full[25:])
    for t, (loss, grad) in enumerate(single[name]["later"]):
        for rank in ranks:
            assert abs(rank[name]["resumed"]["steps"][t][0] - loss) <= 1e-5 * max(1.0, abs(loss)), (t, name)
        both = torch.cat([r[name]["resumed"]["steps"][t][1] for r in ranks])
        # float32 sums in another order, compounded by 8 SGD steps on the class weights
        torch.testing.assert_close(both, grad, atol=1e-4 * float(grad.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_ddp_with_the_sum_hook_gives_the_one_process_encoder_gradient(runs, name):
    """DDP over the encoder with protomem.distributed.sum_gradients_hook: every rank's encoder
    gradient equals the one-process gradient on the concatenated batch."""
    _, ranks = runs
    want = encoder_gradient(name, slice(0, B))
    for rank in ranks:
        torch.testing.assert_close(rank[name]["ddp_grad"], want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_nan_on_one_rank_skips_the_step_on_every_rank(runs, name):
    """Only rank 1's embeddings hold a NaN: both ranks get a non-finite loss, commit nothing and
    keep their whole state (memory, queue, sampling step) as it was."""
    _, ranks = runs
    for rank in ranks:
        loss, committed, before, after = rank[name]["nan_one_rank"]
        assert not torch.isfinite(torch.tensor(loss)) and committed is False
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), key
