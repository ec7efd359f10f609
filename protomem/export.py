"""``python -m protomem.export CHECKPOINT --onnx encoder.onnx``: the encoder that evaluation would
use (the momentum encoder of a DCQ run) as an ONNX model with a dynamic batch axis, checked against
torch with onnxruntime on the CPU before the command reports success.

The graph comes from torch's ``torch.export``-based ONNX exporter (``torch.onnx.export(...,
dynamo=True)``, the default since torch 2.9; it needs the ``onnxscript`` package and nothing from
the network), at opset ``OPSET``. The model reads ``input`` float32 [B, 3, 112, 112] (RGB,
insightface's ``(x / 255 - 0.5) / 0.5``) or [B, in_dim] for the MLP, and writes ``embedding``
float32 [B, E], not normalised. Needs ``pip install protomem[export]`` (onnx, onnxruntime,
onnxscript).
"""
import argparse
import contextlib
import copy
import io
import json
import sys

import torch

__all__ = ["OPSET", "export_onnx", "main", "sample_shape", "verify_onnx"]

OPSET = 18


def sample_shape(model):
    """The shape of one input of a protomem encoder: (3, 112, 112) for the IR-ResNets, (in_dim,) for
    the MLP (tuple of ints); ValueError for other models (pass ``input_shape`` yourself)."""
    from .models import IResNet, MLPEncoder
    if isinstance(model, IResNet):
        return (3, 112, 112)
    if isinstance(model, MLPEncoder):
        return (model.in_dim,)
    raise ValueError(f"cannot tell the input shape of a {type(model).__name__}: pass input_shape")


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError("ONNX export needs onnx, onnxruntime and onnxscript: "
                          "pip install 'protomem[export]'") from err
    return onnx, onnxruntime


def verify_onnx(model, path, input_shape, batch_sizes=(1, 7), atol=1e-4, seed=0):
    """Runs an exported encoder with onnxruntime on the CPU and torch on the same random inputs.

    Args:
        model: the torch ``nn.Module`` (run in eval mode on the CPU, float32).
        path: the ``.onnx`` file.
        input_shape: shape of one input, without the batch axis.
        batch_sizes: the batch sizes to try.
        atol: the largest absolute difference accepted.
        seed: seed of the random inputs (standard normal).

    Returns:
        dict batch size -> max |onnxruntime - torch| (float). Raises ``ValueError`` when one exceeds
        ``atol``.
    """
    _, onnxruntime = _onnx_modules()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batch_sizes:
        x = torch.randn(b, *input_shape, generator=gen)
        with torch.no_grad():
            expected = model(x).float()
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        if got.shape != expected.shape:
            raise ValueError(f"{path}: onnxruntime gave shape {tuple(got.shape)} for batch {b}, torch "
                             f"{tuple(expected.shape)}")
        diffs[b] = (got - expected).abs().max().item()
    bad = {b: d for b, d in diffs.items() if not d <= atol}
    if bad:
        raise ValueError(f"{path}: onnxruntime differs from torch by {bad} (batch: max abs), over {atol}")
    return diffs


def export_onnx(model, path, input_shape=None, opset=OPSET, verify=True, atol=1e-4,
                batch_sizes=(1, 7)):
    """Exports an encoder to ONNX with a dynamic batch axis and checks it.

    A copy of the model is exported in eval mode (BatchNorm running statistics, no dropout), on the
    CPU in float32; the model itself is left as it was. The file passes ``onnx.checker`` and, with
    ``verify``, onnxruntime's outputs are within ``atol`` of torch's (``verify_onnx``).

    Args:
        model: ``nn.Module`` mapping [B, *input_shape] float32 to [B, E].
        path: the ``.onnx`` file to write.
        input_shape: one input's shape without the batch axis; default ``sample_shape(model)``.
        opset: the ONNX opset.
        verify: run the onnxruntime check.
        atol: its tolerance.
        batch_sizes: its batch sizes.

    Returns:
        dict: ``path``, ``opset``, ``input`` / ``output`` (names), ``input_shape`` (list, batch
        first as "batch"), ``onnxruntime`` (version) and ``max_abs_diff`` (batch size -> float;
        empty without ``verify``).
    """
    onnx, onnxruntime = _onnx_modules()
    input_shape = tuple(sample_shape(model) if input_shape is None else input_shape)
    model = copy.deepcopy(model).cpu().float().eval()
    example = torch.randn(2, *input_shape)
    # the exporter reports progress on stdout; keep a command's output to its own lines
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                    input_names=["input"], output_names=["embedding"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        program.save(str(path))
    onnx.checker.check_model(str(path))
    diffs = verify_onnx(model, path, input_shape, batch_sizes, atol) if verify else {}
    return {"path": str(path), "opset": opset, "input": "input", "output": "embedding",
            "input_shape": ["batch", *input_shape], "onnxruntime": onnxruntime.__version__,
            "max_abs_diff": diffs}


def build_parser():
    """The argparse parser of ``python -m protomem.export``."""
    p = argparse.ArgumentParser(prog="protomem-export", description="Export the encoder of a "
                                "python -m protomem.train checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint written by python -m protomem.train")
    p.add_argument("--onnx", required=True, metavar="PATH", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=None,
                   help="export the momentum (EMA) encoder; default: when saved and head is dcq")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest |onnxruntime - torch| accepted on random inputs")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the onnxruntime check")
    return p


def main(argv=None):
    """The command line: export, verify, print the report as JSON. Returns 0; bad input exits with
    status 2 and a message."""
    from .training import checkpoint
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ckpt = checkpoint.load_checkpoint(args.checkpoint)
        use_ema = checkpoint.resolve_use_ema(ckpt, args.use_ema)
        model = checkpoint.model_from_checkpoint(ckpt, use_ema=use_ema)
        report = export_onnx(model, args.onnx, opset=args.opset, verify=args.verify, atol=args.atol)
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.error(str(err))
    report = {"checkpoint": args.checkpoint, "encoder": "ema" if use_ema else "model", **report}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
