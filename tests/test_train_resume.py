"""``--resume auto`` continues a run from its checkpoint exactly: the run's options come from the
checkpoint, the logs hold each row once, and a finished run is not evaluated again."""
import csv
import json
import shutil

import pytest
import torch

from protomem import train
from protomem.training import Trainer, resolve
from protomem.training.config import ConfigError

# Non-default options everywhere: a resume that fell back to the defaults would not match.
RUN = ["--num-classes", "300", "--samples-per-class", "8", "--feature-dim", "32", "--embedding-size", "32",
       "--hidden", "64", "--identities-per-batch", "16", "--eval-classes", "50", "--log-every", "3",
       "--eval-every", "5", "--max-steps", "11", "--lr", "0.05", "--warmup-steps", "2",
       "--no-progress", "--no-tensorboard"]
HEADS = {
    "pm": ["--head", "pm", "--memory-size", "40", "--pm-momentum", "0.5"],
    "dcq": ["--head", "dcq", "--queue-size", "64", "--ema-momentum", "0.9"],
    "pfc": ["--head", "pfc", "--sample-rate", "0.3"],
    "full": ["--head", "full", "--margin", "cosface"],
    "full-accum2": ["--head", "full", "--accum-steps", "2"],
    "pm-fp16": ["--head", "pm", "--memory-size", "40", "--amp", "fp16"],
}
TIME_COLUMNS = ("ms_per_step", "samples_per_s")


def rows(path):
    """The CSV rows without the timing columns (they differ between any two runs)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(f)]


def assert_same_run(a, b, trainer_a, trainer_b):
    for (name, x), y in zip(trainer_a.encoder.state_dict().items(), trainer_b.encoder.state_dict().values()):
        assert torch.equal(x, y), name
    for key, x in trainer_a.head.state_dict().items():
        if not key.endswith(("index_keys", "index_vals", "memory.counters")):  # index layout: see test_heads_common
            assert torch.equal(x, trainer_b.head.state_dict()[key]), key
    assert rows(a / "log.csv") == rows(b / "log.csv")
    assert rows(a / "eval.csv") == rows(b / "eval.csv")


def run_cli(argv, capsys):
    """``python -m protomem.train ARGV``: (the Trainer it ran, the final JSON line)."""
    made = []
    real = train.Trainer

    class Recording(real):
        def __init__(self, cfg):
            super().__init__(cfg)
            made.append(self)

    train.Trainer = Recording
    try:
        capsys.readouterr()
        train.main(argv)
    finally:
        train.Trainer = real
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return made[0], json.loads(last, parse_constant=lambda c: pytest.fail(f"{c} in the JSON line"))


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("stop", [4, 5])  # inside a log window; at an evaluation
def test_resume_auto_alone_continues_exactly(tmp_path, capsys, head, stop):
    a, b = tmp_path / "a", tmp_path / "b"
    straight, summary_a = run_cli(RUN + HEADS[head] + ["--out", str(a)], capsys)
    Trainer(resolve(RUN + HEADS[head] + ["--out", str(b)])).fit(until=stop)
    torch.manual_seed(99)  # the resumed run must not depend on the RNG state it starts in
    resumed, summary_b = run_cli(["--out", str(b), "--resume", "auto"], capsys)
    assert resumed.step == 11 and resumed.cfg["max_steps"] == 11 and resumed.cfg["lr"] == 0.05
    assert_same_run(a, b, straight, resumed)
    assert summary_a["eval"] == summary_b["eval"] and summary_b["eval"]["step"] == 11


def test_resume_after_a_crash_drops_the_rows_logged_after_the_checkpoint(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    straight, _ = run_cli(RUN + HEADS["pm"] + ["--out", str(a)], capsys)
    crashed = Trainer(resolve(RUN + HEADS["pm"] + ["--out", str(b)]))
    crashed.fit(until=4)
    shutil.copy(b / "checkpoint.pt", tmp_path / "at4.pt")
    crashed.fit(until=9)  # logs rows 6 and 9 and evaluates at 5, then "crashes": its checkpoint is lost
    shutil.copy(tmp_path / "at4.pt", b / "checkpoint.pt")
    assert [r["step"] for r in rows(b / "log.csv")] == ["3", "6", "9"]
    resumed, _ = run_cli(["--out", str(b), "--resume", "auto"], capsys)
    assert_same_run(a, b, straight, resumed)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    first, summary = run_cli(RUN + HEADS["pfc"] + ["--out", str(tmp_path)], capsys)
    logs, evals = rows(tmp_path / "log.csv"), rows(tmp_path / "eval.csv")
    again, summary2 = run_cli(["--out", str(tmp_path), "--resume", "auto"], capsys)
    assert again.step == 11 and rows(tmp_path / "log.csv") == logs and rows(tmp_path / "eval.csv") == evals
    assert summary2["eval"] == summary["eval"] and summary2["ms_per_step"] is None  # null, not NaN
    assert len(evals) == 3  # steps 5, 10 and the end


def test_resume_overrides_say_what_changed(tmp_path, capsys):
    Trainer(resolve(RUN + HEADS["pm"] + ["--out", str(tmp_path)])).fit(until=5)
    cfg = resolve(["--out", str(tmp_path), "--resume", "auto", "--lr", "0.01", "--max-steps", "20"])
    assert cfg["resume_changes"] == ["lr: 0.05 -> 0.01", "max_steps: 11 -> 20"]
    trainer = Trainer(cfg)
    assert trainer.schedule.base_lrs == [0.01] * len(trainer.optimizer.param_groups)
    factor = trainer.schedule.lr_lambdas[0](5)  # poly over the new 20 steps at step 5
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * factor)
    assert "changed: lr: 0.05 -> 0.01; max_steps: 11 -> 20" in trainer.describe()


@pytest.mark.parametrize("change, named", [(["--head", "dcq"], "head: 'pm' -> 'dcq'"),
                                           (["--memory-size", "30"], "memory_size: 40 -> 30"),
                                           (["--num-classes", "200"], "num_classes: 300 -> 200")])
def test_resume_refuses_changes_it_cannot_continue_exactly(tmp_path, capsys, change, named):
    Trainer(resolve(RUN + HEADS["pm"] + ["--out", str(tmp_path)])).fit(until=2)
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path), "--resume", "auto"] + change)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --resume" in err and named in err and "Traceback" not in err


def test_trainer_built_directly_refuses_a_mismatched_checkpoint(tmp_path):
    Trainer(resolve(RUN + HEADS["pm"] + ["--out", str(tmp_path)])).fit(until=2)
    cfg = resolve(RUN + HEADS["pm"] + ["--out", str(tmp_path)])
    cfg.update(memory_size=30, resume="auto")  # around resolve(): the Trainer itself checks
    with pytest.raises(ConfigError, match="memory_size: 40 -> 30"):
        Trainer(cfg)
