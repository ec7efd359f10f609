"""ONNX export: onnxruntime on the CPU equals torch within 1e-4 for the backbones, at batch sizes
1 and 7 and any other batch (dynamic axis); the CLI exports the encoder evaluation would use."""
import json
import os

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime  # noqa: E402

from protomem import MomentumEncoder  # noqa: E402
from protomem import export as export_cli  # noqa: E402
from protomem.export import OPSET, export_onnx, sample_shape  # noqa: E402
from protomem.models import build_backbone  # noqa: E402
from protomem.training.checkpoint import CHECKPOINT_FORMAT  # noqa: E402

# the deeper IR-ResNets take minutes to export on a small CPU and use the same layers as iresnet18
DEEP = ["iresnet34", "iresnet50", "iresnet100"] if os.environ.get("PROTOMEM_EXPORT_ALL") else []


def calibrated(name, seed=0, **kwargs):
    """A backbone whose BatchNorm running statistics come from a few random batches, so eval-mode
    outputs have the scale of a trained model's (fresh statistics let activations grow ~1e9)."""
    torch.manual_seed(seed)
    model = build_backbone(name, 32, in_dim=24 if name == "mlp" else None, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None                                 # a plain average over the batches
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *sample_shape(model)))
    return model.eval()


def run_onnx(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("name", ["mlp", "iresnet18", *DEEP])
def test_onnxruntime_equals_torch(tmp_path, name):
    model = calibrated(name)
    model.train()                                             # export uses eval mode on a copy
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, path)
    assert model.training and all(p.device.type == "cpu" for p in model.parameters())
    assert report["opset"] == OPSET and report["input_shape"] == ["batch", *sample_shape(model)]
    assert set(report["max_abs_diff"]) == {1, 7}
    assert all(d <= 1e-4 for d in report["max_abs_diff"].values())
    model.eval()
    x = torch.randn(3, *sample_shape(model))                  # another batch size, checked here
    with torch.no_grad():
        expected = model(x)
    got = run_onnx(path, x)
    assert got.shape == expected.shape and expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_export_rejects_a_wrong_model(tmp_path):
    with pytest.raises(ValueError, match="input shape"):
        export_onnx(torch.nn.Linear(4, 2), tmp_path / "x.onnx")
    # an explicit shape exports any module; a too strict tolerance fails the check
    report = export_onnx(torch.nn.Linear(4, 2), tmp_path / "x.onnx", input_shape=(4,))
    assert report["input_shape"] == ["batch", 4]
    with pytest.raises(ValueError, match="differs from torch"):
        export_onnx(torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Linear(64, 2)),
                    tmp_path / "y.onnx", input_shape=(4,), atol=0.0, batch_sizes=(64,))


def test_cli_exports_the_momentum_encoder_of_a_dcq_run(tmp_path, capsys):
    ema = calibrated("mlp", seed=1)
    encoder = calibrated("mlp", seed=2)
    config = dict(backbone="mlp", embedding_size=32, in_dim=24, hidden="512", head="dcq",
                  data="synthetic")
    path = str(tmp_path / "dcq.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "model": encoder.state_dict(),
                "ema": MomentumEncoder(ema).state_dict()}, path)
    out = tmp_path / "encoder.onnx"
    assert export_cli.main([path, "--onnx", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["encoder"] == "ema" and report["path"] == str(out)
    assert all(d <= 1e-4 for d in report["max_abs_diff"].values())
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(out, x), ema(x), rtol=0, atol=1e-4)
    assert export_cli.main([path, "--onnx", str(out), "--no-use-ema", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["encoder"] == "model"
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(out, x), encoder(x), rtol=0, atol=1e-4)
    with pytest.raises(SystemExit) as exc:
        export_cli.main([str(tmp_path / "missing.pt"), "--onnx", str(out)])
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err
