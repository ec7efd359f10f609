"""torchrun with 2 gloo processes: a run stopped and resumed equals the run in one go, bit for bit.
(Not the one-process run: each rank's BatchNorm normalises its own half of the batch, as DDP
without SyncBatchNorm does; the heads' one-process equality is in test_heads_distributed.py.)"""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(__file__)
RUN = ["--num-classes", "200", "--samples-per-class", "6", "--feature-dim", "16", "--embedding-size", "16",
       "--hidden", "32", "--identities-per-batch", "8", "--eval-classes", "40", "--log-every", "2",
       "--max-steps", "6", "--lr", "0.05", "--no-progress", "--no-tensorboard"]


def torchrun(until, argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           os.path.join(HERE, "train_until.py"), str(until)] + argv
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def checkpoint(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=False)


@pytest.mark.parametrize("head", ["pm", "pfc"])
def test_two_process_resume_equals_the_run_in_one_go(tmp_path, head):
    argv = RUN + ["--head", head]
    torchrun(0, argv + ["--out", str(tmp_path / "straight")])
    torchrun(3, argv + ["--out", str(tmp_path / "cut")])
    torchrun(0, ["--out", str(tmp_path / "cut"), "--resume", "auto"])
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "cut")
    assert a["step"] == b["step"] == 6 and b["config"]["lr"] == 0.05 and b["config"]["head"] == head
    for part in ("model", "head"):
        for key, x in a[part].items():
            if key.endswith(("index_keys", "index_vals", "memory.counters")):  # layout only
                continue
            assert torch.equal(x, b[part][key]), (part, key)
    assert (tmp_path / "straight" / "eval.csv").read_text() == (tmp_path / "cut" / "eval.csv").read_text()


def test_resume_of_a_two_process_run_in_one_process(tmp_path, capsys):
    """World size 2 -> 1 with the sharded Partial FC head: the weights re-shard, the optimiser
    state of the class weights starts afresh (with a note), the run finishes."""
    from protomem.training import Trainer, resolve

    torchrun(3, RUN + ["--head", "pfc", "--out", str(tmp_path)])
    saved = checkpoint(tmp_path)
    trainer = Trainer(resolve(["--out", str(tmp_path), "--resume", "auto"]))
    assert "optimiser state of the head's class weights starts afresh" in capsys.readouterr().err
    assert torch.equal(trainer.head.weight.detach(), saved["head"]["weight"])
    trainer.fit()
    assert trainer.step == 6 and torch.isfinite(trainer.head.weight).all()
