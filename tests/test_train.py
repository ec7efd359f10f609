"""The training CLI: options, exact resume, a tiny run that learns, every head, AMP, gradient
accumulation, and torchrun with 2 gloo processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from protomem.training import Trainer, resolve
from protomem.training.config import load_file

TINY = dict(num_classes=300, samples_per_class=8, feature_dim=32, embedding_size=32, hidden="64",
            identities_per_batch=16, samples_per_identity=2, eval_classes=100, log_every=4,
            progress=False, tensorboard=False, lr=0.1, warmup_steps=2)


def tiny(tmp_path, **kw):
    return resolve([], **{**TINY, "out": str(tmp_path), **kw})


def test_options_defaults_file_and_command_line(tmp_path):
    cfg = resolve([])
    assert cfg["head"] == "pm" and cfg["identities_per_batch"] == 128 and cfg["memory_size"] is None
    toml = tmp_path / "run.toml"
    toml.write_text('head = "dcq"\nlr = 0.02\nepochs = 3\n')
    cfg = resolve(["--config", str(toml), "--lr", "0.5", "--detach-prototypes", "false"])
    assert (cfg["head"], cfg["lr"], cfg["epochs"], cfg["detach_prototypes"]) == ("dcq", 0.5, 3.0, False)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"head": "pfc", "sample_rate": 0.2}))
    assert load_file(str(js)) == {"head": "pfc", "sample_rate": 0.2}
    js.write_text(json.dumps({"hed": "pfc"}))
    with pytest.raises(ValueError, match="unknown options .*hed"):
        resolve(["--config", str(js)])


@pytest.mark.parametrize("change, match", [
    (dict(head="softmax"), "argument --head: invalid choice: 'softmax'"),
    (dict(head="pm", samples_per_identity=1), "samples_per_identity >= 2"),
    (dict(amp="fp8"), "argument --amp: invalid choice"),
    (dict(identities_per_batch=0), "identities_per_batch must be an int >= 1"),
])
def test_bad_options(change, match):
    with pytest.raises(ValueError, match=match):
        resolve([], **change)


def test_bad_data_path(tmp_path):
    with pytest.raises(ValueError, match="argument --data: .*missing.xyz' does not exist"):
        tiny(tmp_path, data=str(tmp_path / "missing.xyz"))
    (tmp_path / "file.xyz").write_text("")  # exists, but is no data set
    with pytest.raises(ValueError, match="data must be 'synthetic'"):
        Trainer(tiny(tmp_path, data=str(tmp_path / "file.xyz")))


@pytest.mark.parametrize("head", ["pm", "dcq", "pfc"])
def test_resume_continues_exactly(tmp_path, head):
    """12 steps in one go == 5 steps, save, a new process-like Trainer resuming, 7 steps."""
    opts = dict(head=head, max_steps=12, pm_momentum=0.5, queue_size=64)
    straight = Trainer(tiny(tmp_path / "a", **opts))
    straight.fit()
    first = Trainer(tiny(tmp_path / "b", **opts))
    first.fit(until=5)
    assert first.step == 5 and os.path.exists(tmp_path / "b" / "checkpoint.pt")
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts with
    resumed = Trainer(tiny(tmp_path / "b", **opts, resume="auto"))
    assert resumed.step == 5
    resumed.fit()
    for a, b in zip(straight.encoder.state_dict().values(), resumed.encoder.state_dict().values()):
        assert torch.equal(a, b)
    for key, a in straight.head.state_dict().items():
        if not key.endswith(("index_keys", "index_vals", "memory.counters")):  # index layout: see test_heads_common
            assert torch.equal(a, resumed.head.state_dict()[key]), key
    assert straight.head.last_stats["loss"] == resumed.head.last_stats["loss"]
    assert straight.eval_history[-1] == resumed.eval_history[-1]


def test_tiny_run_learns(tmp_path):
    """A few epochs on 300 identities: rank-1 and TAR far above chance, logs and checkpoint written."""
    trainer = Trainer(tiny(tmp_path, head="pm", epochs=6, eval_every=150, noise=0.3))
    summary = trainer.fit()
    ev = summary["eval"]
    assert ev["tail/rank1"] > 0.5 and ev["unseen/rank1"] > 0.3, ev  # chance: 1/100
    assert ev["tail/tar@far=1e-3"] > 0.3, ev
    logs = (tmp_path / "log.csv").read_text().splitlines()
    assert logs[0].startswith("step,epoch,lr,loss,accuracy") and len(logs) > 10
    first, last = (float(line.split(",")[3]) for line in (logs[1], logs[-1]))
    assert last < first
    assert len(trainer.eval_history) >= 2 and (tmp_path / "eval.csv").exists()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["format"] == "protomem-train-v1" and ckpt["step"] == summary["steps"]


@pytest.mark.parametrize("kw", [dict(head="full", amp="bf16"), dict(head="pfc", accum_steps=2),
                                dict(head="dcq", queue_size=64, clip_grad=1.0, optimizer="adamw", lr=1e-3),
                                dict(head="pm", exemplars="leave_one_out", schedule="cosine")],
                         ids=["full-bf16", "pfc-accum2", "dcq-clip-adamw", "pm-loo-cosine"])
def test_heads_and_options_run(tmp_path, kw):
    trainer = Trainer(tiny(tmp_path, max_steps=6, **kw))
    summary = trainer.fit()
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    assert summary["head_mb"] > 0 and summary["ms_per_step"] > 0
    row = (tmp_path / "log.csv").read_text().splitlines()[-1].split(",")
    assert all(v not in ("nan", "inf") for v in row[:4])


def test_torchrun_two_processes(tmp_path):
    """torchrun with 2 gloo processes: the run finishes and saves one checkpoint whose memory
    every rank agreed on; a second torchrun resumes it."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "protomem.train", "--num-classes", "200", "--samples-per-class", "6",
            "--feature-dim", "16", "--embedding-size", "16", "--hidden", "32",
            "--identities-per-batch", "8", "--eval-classes", "50", "--progress", "false",
            "--no-tensorboard", "--out", str(tmp_path), "--max-steps", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(base, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 6 and (ckpt["head"]["memory.slot_labels"] >= 0).any()
    again = subprocess.run(base[:-1] + ["9", "--resume", "auto"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 9
