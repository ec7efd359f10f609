"""``python -m protomem.train`` as a user meets it: argparse errors instead of tracebacks, a
readable --help, the old option spellings, Ctrl-C, the start-up summary and the final JSON."""
import json
import os
import signal

import pytest
import torch

from protomem import train
from protomem.training import Trainer, resolve

SMALL = ["--num-classes", "200", "--samples-per-class", "6", "--feature-dim", "16", "--embedding-size", "16",
         "--hidden", "32", "--identities-per-batch", "8", "--eval-classes", "40", "--log-every", "2",
         "--max-steps", "8", "--no-tensorboard"]


@pytest.mark.parametrize("argv, message", [
    (["--head", "arcface"], "argument --head: invalid choice: 'arcface'"),
    (["--memory-size", "abc"], "argument --memory-size: invalid int value: 'abc'"),
    (["--data", "/nonexistent/faces"], "argument --data: '/nonexistent/faces' does not exist"),
    (["--samples-per-class", "many"], "argument --samples-per-class: expected an int, 'zipf' or 'megaface2'"),
    (["--head", "pm", "--samples-per-identity", "1"], "argument --samples-per-identity"),
    (SMALL + ["--memory-size", "5"], "argument --memory-size: the memory (5 slots) is smaller than the 8 identities"),
    (["--bin", "/nonexistent/lfw.bin"], "argument --bin: '/nonexistent/lfw.bin' does not exist"),
    (["--resume", "/nonexistent/ckpt.pt"], "argument --resume: checkpoint '/nonexistent/ckpt.pt' not found"),
])
def test_bad_options_are_argparse_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "protomem-train: error: " + message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--device", "cuda", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "argument --device: cuda asked for, but torch sees no CUDA GPU" in capsys.readouterr().err


def test_help_lists_metavars_choices_flags_and_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert " X " not in text and "--head {pm,dcq,pfc,full}" in text and "--amp {none,bf16,fp16}" in text
    assert "--progress, --no-progress" in text and "--image-mode, --no-image-mode" in text
    assert "--lr LR" in text and "--bin FILE [FILE ...]" in text and "(default: 0.1)" in text


def test_flags_and_old_spellings():
    cfg = resolve(["--no-progress", "--image-mode", "--tensorboard", "false", "--detach-prototypes=no"])
    assert (cfg["progress"], cfg["image_mode"], cfg["tensorboard"], cfg["detach_prototypes"]) == (False, True, False, False)
    assert resolve(["--quality", "none"])["quality"] is None


def test_val_bins_is_the_old_spelling_of_bin(tmp_path):
    for name in ("lfw.bin", "cfp_fp.bin"):
        (tmp_path / name).write_bytes(b"")
    paths = [str(tmp_path / "lfw.bin"), str(tmp_path / "cfp_fp.bin")]
    assert resolve(["--bin"] + paths)["bin"] == paths
    with pytest.warns(FutureWarning, match="--val-bins a,b is deprecated: use --bin a b"):
        assert resolve(["--val-bins", ",".join(paths)])["bin"] == paths
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"val_bins": paths[0]}))
    with pytest.warns(FutureWarning):
        assert resolve(["--config", str(config)])["bin"] == paths[:1]


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path, capsys):
    """SIGINT during step 3: the run stops after it, saves, says how to resume; the resumed run
    equals one uninterrupted run."""
    straight = Trainer(resolve(SMALL + ["--no-progress", "--out", str(tmp_path / "a")]))
    straight.fit()
    cut = Trainer(resolve(SMALL + ["--no-progress", "--out", str(tmp_path / "b")]))
    real_step = cut.train_step

    def step_with_ctrl_c(batches):
        if cut.step == 2:  # the signal arrives in the middle of the third step
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(batches)

    cut.train_step = step_with_ctrl_c
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    summary = cut.fit()
    assert cut.interrupted and summary["interrupted"] and cut.step == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is gone again
    err = capsys.readouterr().err
    assert "interrupted at step 3/8" in err and f"--out {tmp_path / 'b'} --resume auto" in err
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed = Trainer(resolve(["--out", str(tmp_path / "b"), "--resume", "auto"]))
    resumed.fit()
    for x, y in zip(straight.encoder.state_dict().values(), resumed.encoder.state_dict().values()):
        assert torch.equal(x, y)
    assert (tmp_path / "a" / "eval.csv").read_text() == (tmp_path / "b" / "eval.csv").read_text()


def test_summary_eval_table_and_json_without_progress(tmp_path, capsys):
    train.main(SMALL + ["--head", "dcq", "--no-progress", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "eval at step 8:" in out and "unseen" in out  # the table is not tied to the progress bar
    assert "train:" not in err  # no bar
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 8 and summary["eval"]["step"] == 8 and "tail/rank1" in summary["eval"]


def test_start_up_summary(tmp_path, capsys):
    trainer = Trainer(resolve(SMALL + ["--head", "pm", "--memory-size", "30", "--out", str(tmp_path)]))
    text = trainer.describe()
    assert "device cpu" in text and "steps 0 -> 8" in text and "8 identities x 2 samples = 16 rows" in text
    assert "pm (Prototype Memory), memory 30 slots" in text and "200 identities" in text


def test_dcq_queue_smaller_than_a_batch_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(SMALL + ["--head", "dcq", "--queue-size", "10", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "argument --queue-size: the queue (10 entries) is smaller than the 16 keys" in capsys.readouterr().err
