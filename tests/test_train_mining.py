"""The trainer with --mining doppelganger: the steps feed the look-alike lists, the batches use
them, and a resume continues exactly (12 steps == 5 + resume + 7: losses, memories, lists)."""
import json

import numpy as np
import pytest
import torch

from protomem.training import Trainer, resolve
from protomem.training.config import ConfigError
from test_train_resume import RUN, assert_same_run, run_cli

MINING = ["--mining", "doppelganger", "--mining-fraction", "0.5", "--mining-k", "3", "--max-steps", "12",
          "--lookalikes", "0.5"]
HEADS = {
    "pm": ["--head", "pm", "--memory-size", "40"],
    "dcq": ["--head", "dcq", "--queue-size", "64", "--ema-momentum", "0.9"],
    "full": ["--head", "full", "--margin", "cosface"],
}


@pytest.mark.parametrize("head", list(HEADS))
def test_resume_with_mining_continues_exactly(tmp_path, capsys, head):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = RUN + HEADS[head] + MINING
    straight, _ = run_cli(argv + ["--out", str(a)], capsys)
    Trainer(resolve(argv + ["--out", str(b)])).fit(until=5)
    torch.manual_seed(99)
    resumed, _ = run_cli(["--out", str(b), "--resume", "auto"], capsys)
    assert resumed.step == 12 and resumed.cfg["mining"] == "doppelganger"
    assert_same_run(a, b, straight, resumed)
    lists_a, lists_b = straight.lookalikes, resumed.lookalikes
    assert (lists_a.others >= 0).sum() > 100  # the steps did feed the lists
    np.testing.assert_array_equal(lists_a.others, lists_b.others)
    np.testing.assert_array_equal(lists_a.scores, lists_b.scores)
    assert lists_a.updates == lists_b.updates == 12


def test_mining_changes_the_batches_and_reads_the_config_file(tmp_path):
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"mining": "doppelganger", "mining_fraction": 0.5, "mining_k": 2}))
    argv = RUN + HEADS["pm"] + ["--no-progress", "--max-steps", "6"]
    mined = Trainer(resolve(argv + ["--config", str(conf), "--out", str(tmp_path / "m")]))
    plain = Trainer(resolve(argv + ["--out", str(tmp_path / "p")]))
    assert mined.lookalikes.k == 2 and mined.sampler.fraction == 0.5 and plain.lookalikes is None
    mined.fit(), plain.fit()
    b_mined, b_plain = mined.sampler.batch(0, 6), plain.sampler.batch(0, 6)
    assert not np.array_equal(b_mined, b_plain)  # the look-alikes replaced identities
    assert np.array_equal(b_mined[:8 * 2], b_plain[:8 * 2])  # the anchors stayed (G=16: 8 of them)


def test_bad_mining_options_and_resume_refuses_another_k(tmp_path):
    for bad in (["--mining-fraction", "1.5"], ["--mining-k", "0"], ["--lookalikes", "-0.1"]):
        with pytest.raises(ConfigError, match=bad[0]):
            resolve(RUN + bad)
    out = tmp_path / "r"
    Trainer(resolve(RUN + HEADS["pm"] + MINING + ["--out", str(out)])).fit(until=2)
    with pytest.raises(ConfigError, match="mining_k"):
        resolve(["--out", str(out), "--resume", "auto", "--mining-k", "5"])
