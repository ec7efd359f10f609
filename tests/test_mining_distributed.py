"""Mining pairs under torch.distributed (2 gloo processes on CPU): every head's ``mining_pairs()``
names, on every rank, the same (row class, closest other class, cosine) for the global batch as
one process on the concatenated batch; ties across the ranks' class shards go to the smaller class
id; and a 2-process ``--mining doppelganger`` run keeps identical look-alike lists on both ranks
and resumes exactly (12 steps == 5 + resume + 7).

This file is also the worker (run as a script):
    python tests/test_mining_distributed.py heads RANK WORLD INIT_FILE OUT_DIR
    torchrun ... tests/test_mining_distributed.py train UNTIL DUMP_PREFIX CLI_ARGS...
"""
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from heads_setup import B, C, D, SPLIT, global_batch, local_rows, make, run_steps  # noqa: E402

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(os.path.abspath(__file__))
HEADS = ["pm", "dcq", "pfc", "full"]  # pfc: sample_rate 0.4 (a hash of (seed, step, class): deterministic)
STEPS = 4
TIE = (7, 30)  # identical class weights, on rank 0's shard [0, 25) and on rank 1's [25, 50)


# ------------------------------------------------------------------------------ shared by both sides
def mine_steps(name, rows):
    """Trains a fresh head of heads_setup on rows ``rows`` of global batches 0 .. STEPS-1 and
    returns each step's ``mining_pairs()`` (a collective under torch.distributed)."""
    head, opt = make(name)
    return run_steps(head, opt, name, range(STEPS), rows,
                     record=lambda head, loss, x: tuple(p.clone() for p in head.mining_pairs()))


def tie_batch():
    """(W [C, D], x [B, D], y [B]): classes TIE have the same weight row e_0 and every other
    class a negative first coordinate, so each row x ~ e_0 (classes outside TIE) has two equal
    closest other classes, with bitwise equal cosines (x . e_0 is exact whatever the order of
    the sum). Rows 0 and 1 are of the classes TIE themselves (Partial FC samples them)."""
    g = torch.Generator().manual_seed(11)
    W = torch.randn(C, D, generator=g)
    W[:, 0] = -W[:, 0].abs() - 1.0
    for c in TIE:
        W[c] = 0.0
        W[c, 0] = 1.0
    x = torch.zeros(B, D)
    x[:, 0] = 1.0
    x[:, 2:] = torch.randint(-2, 3, (B, D - 2), generator=g).float() / 8
    y = (torch.arange(B) * 3 + 1) % C
    y[y == TIE[0]], y[y == TIE[1]] = 0, 2
    y[0], y[1] = TIE
    x[0], x[1] = -x[0], -x[1]
    return W, x, y


def tie_pairs(name, rows):
    """One step of a fresh softmax head (pfc / full) holding tie_batch's weights (its shard)."""
    head, _ = make(name)
    W, x, y = tie_batch()
    with torch.no_grad():
        head.weight.copy_(W[head.start:head.end])
    head(x[rows], y[rows])
    return tuple(p.clone() for p in head.mining_pairs())


# ------------------------------------------------------------------------------ workers
def heads_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = local_rows(rank, world)
    results = {name: mine_steps(name, rows) for name in HEADS}
    results["ties"] = {name: tie_pairs(name, rows) for name in ("pfc", "full")}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def train_worker(until, dump, argv):
    """A trainer run (under torchrun) up to step ``until`` (0: the end); every rank saves its own
    look-alike lists to DUMP.rankR.pt."""
    from protomem.training import Trainer, resolve

    trainer = Trainer(resolve(argv))
    trainer.fit(until=until or None)
    torch.save(trainer.lookalikes.state_dict(), f"{dump}.rank{trainer.rank}.pt")
    trainer.close()


# ------------------------------------------------------------------------------ 1. the heads
@pytest.fixture(scope="module")
def heads_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining_dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "heads", str(r), "2",
                               str(root / "init"), str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", HEADS)
def test_pairs_on_every_rank_equal_one_process(heads_runs, name):
    """PM and DCQ hold the same memory / queue on every rank (each rank scores its rows, the
    pairs are gathered); Partial FC and the full softmax shard the classes (each rank's best other
    class over its shard, combined over the ranks). Either way each rank must return the pairs of
    the whole global batch, in global row order, as one process computes them."""
    single = mine_steps(name, slice(0, B))
    for t, (rows, others, cos) in enumerate(single):
        assert rows.shape == (B,)
        if t > 0 or name != "dcq":  # DCQ's first step: an empty queue, no other class
            assert bool((others >= 0).all()) and bool((others != rows).all()), (name, t)
        for r, rank in enumerate(heads_runs):
            got_rows, got_others, got_cos = rank[name][t]
            assert torch.equal(got_rows, rows), (name, t, r)
            assert torch.equal(got_others, others), (name, t, r, got_others, others)
            assert got_cos.dtype == torch.float32
            # float32 sums in another order (and for pfc / full a few SGD steps on the weights)
            torch.testing.assert_close(got_cos, cos, atol=2e-5, rtol=0)
        # both ranks hold the very same tensors (the lists they feed must not diverge)
        for a, b in zip(heads_runs[0][name][t], heads_runs[1][name][t]):
            assert torch.equal(a, b), (name, t)
    # the global batch is split unevenly (6 + 7 rows): rank 1's rows come after rank 0's
    assert SPLIT == 6 and heads_runs[0][name][-1][0].shape == (B,)


@pytest.mark.parametrize("name", ["pfc", "full"])
def test_tie_across_shards_names_the_smaller_class_on_every_rank(heads_runs, name):
    """Classes 7 (rank 0's shard) and 30 (rank 1's) have identical weights: every row of another
    class names 7, on both ranks and in one process, at the exact cosine x_0 / |x|."""
    _, x, y = tie_batch()
    want_cos = (x[:, 0] / x.norm(dim=1))[2:]
    single = tie_pairs(name, slice(0, B))
    for pairs in [single] + [rank["ties"][name] for rank in heads_runs]:
        rows, others, cos = pairs
        assert torch.equal(rows, y)
        assert others[2:].tolist() == [TIE[0]] * (B - 2), others
        torch.testing.assert_close(cos[2:], want_cos, atol=1e-6, rtol=0)
        assert torch.equal(others, single[1]) and torch.equal(cos, single[2])


# ------------------------------------------------------------------------------ 2. the trainer
RUN = ["--num-classes", "120", "--samples-per-class", "4", "--feature-dim", "16", "--embedding-size", "16",
       "--hidden", "32", "--identities-per-batch", "8", "--eval-classes", "20", "--log-every", "3",
       "--lr", "0.05", "--no-progress", "--no-tensorboard", "--head", "pm", "--memory-size", "40",
       "--mining", "doppelganger", "--mining-fraction", "0.5", "--mining-k", "3", "--lookalikes", "0.5",
       "--max-steps", "12"]


def torchrun(until, dump, argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           os.path.abspath(__file__), "train", str(until), str(dump)] + argv
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def lists(dump, rank):
    return torch.load(f"{dump}.rank{rank}.pt", weights_only=False)


def assert_same_lists(a, b, what):
    assert a["updates"] == b["updates"], what
    assert torch.equal(a["others"], b["others"]), what
    assert torch.equal(a["scores"], b["scores"]), what


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining_train")
    torchrun(0, root / "straight", RUN + ["--out", str(root / "straight")])
    torchrun(5, root / "cut5", RUN + ["--out", str(root / "cut")])
    torchrun(0, root / "cut", ["--out", str(root / "cut"), "--resume", "auto"])
    return root


def test_two_ranks_hold_identical_lookalike_lists(trainer_runs):
    root = trainer_runs
    for run in ("straight", "cut5", "cut"):
        assert_same_lists(lists(root / run, 0), lists(root / run, 1), run)
    final = lists(root / "straight", 0)
    assert final["updates"] == 12 and lists(root / "cut5", 0)["updates"] == 5
    assert int((final["others"] >= 0).sum()) > 50  # the steps did feed the lists
    saved = torch.load(root / "straight" / "checkpoint.pt", weights_only=False)
    assert_same_lists(saved["sampler"]["doppelgangers"], final, "checkpoint")


def test_two_process_resume_with_mining_equals_the_run_in_one_go(trainer_runs):
    root = trainer_runs
    a = torch.load(root / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(root / "cut" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 12 and b["config"]["mining"] == "doppelganger"
    for part in ("model", "head"):
        for key, x in a[part].items():
            if key.endswith(("index_keys", "index_vals", "memory.counters")):  # layout only
                continue
            assert torch.equal(x, b[part][key]), (part, key)
    assert_same_lists(a["sampler"]["doppelgangers"], b["sampler"]["doppelgangers"], "checkpoints")
    for rank in range(2):
        assert_same_lists(lists(root / "straight", rank), lists(root / "cut", rank), f"rank {rank}")
    assert (root / "straight" / "eval.csv").read_text() == (root / "cut" / "eval.csv").read_text()


if __name__ == "__main__":
    if sys.argv[1] == "heads":
        heads_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif sys.argv[1] == "train":
        train_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
