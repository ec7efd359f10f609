"""The trainer's step: a non-finite loss never reaches the optimiser (with and without fp16's
GradScaler), and the run goes on normally after it."""
import pytest
import torch

from protomem.training import Trainer, resolve

SMALL = ["--num-classes", "200", "--samples-per-class", "6", "--feature-dim", "16", "--embedding-size", "16",
         "--hidden", "32", "--identities-per-batch", "8", "--eval-classes", "40", "--log-every", "1",
         "--max-steps", "5", "--no-progress", "--no-tensorboard"]


def poison_step(trainer, at):
    """Makes the encoder's output NaN in optimiser step ``at`` (0-based)."""
    real = trainer._loss

    def loss(x, y):
        if trainer.step == at:
            x = x.clone()
            x[0] = float("nan")
        return real(x, y)

    trainer._loss = loss


def params(trainer):
    return [p.detach().clone() for p in list(trainer.encoder.parameters()) + list(trainer.head.parameters())]


@pytest.mark.parametrize("head, amp", [("pm", "none"), ("full", "none"), ("dcq", "none"), ("full", "fp16")])
def test_non_finite_step_leaves_the_weights_and_optimiser_alone(tmp_path, head, amp):
    trainer = Trainer(resolve(SMALL + ["--head", head, "--amp", amp, "--out", str(tmp_path)]))
    trainer.fit(until=2)
    before = params(trainer)
    moments = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"].get(0, {}).items()}
    scale = trainer.scaler.get_scale() if amp == "fp16" else None
    poison_step(trainer, 2)
    trainer.fit(until=3)
    assert trainer.step == 3
    for a, b in zip(before, params(trainer)):
        assert torch.equal(a, b)
    for k, v in trainer.optimizer.state_dict()["state"].get(0, {}).items():
        assert torch.equal(v, moments[k]), k
    if amp == "fp16":  # the GradScaler skipped it and lowered its scale
        assert trainer.scaler.get_scale() < scale
    else:
        assert trainer.skipped == 1
    trainer.fit()  # then steps again
    assert any(not torch.equal(a, b) for a, b in zip(before, params(trainer)))
    last = (tmp_path / "log.csv").read_text().splitlines()[-1].split(",")
    assert last[0] == "5" and last[3] not in ("nan", "inf")
