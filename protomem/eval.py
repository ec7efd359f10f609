"""``python -m protomem.eval CHECKPOINT``: evaluate a trained encoder.

On the run's synthetic dataset (rebuilt from the checkpoint's config): TAR@FAR and rank-1 of head,
tail and unseen identities (``evaluation.evaluate_identities``); on insightface ``.bin`` sets
(``--bin``): 10-fold verification accuracy (``evaluation.evaluate_bin``); on an IJB-B / IJB-C
release (``--ijb DIR --ijb-target IJBC``): 1:1 verification TAR at FAR 1e-6 ... 1e-1
(``evaluation.evaluate_ijb``). Prints a table and, with ``--json``, writes the results (NaN as
null); ``--roc`` plots the IJB ROC.
"""
import argparse
import json
import math
import os
import sys

import torch

from . import evaluation
from .training import checkpoint


def build_parser():
    """The argparse parser of ``python -m protomem.eval``."""
    p = argparse.ArgumentParser(prog="protomem-eval", description="Evaluate an encoder trained by "
                                "python -m protomem.train.")
    p.add_argument("checkpoint", help="a checkpoint written by python -m protomem.train")
    p.add_argument("--bin", nargs="+", default=[], metavar="BIN",
                   help="insightface .bin verification sets (LFW, CFP-FP, AgeDB-30, ...)")
    p.add_argument("--ijb", metavar="DIR",
                   help="an IJB-B / IJB-C release folder (loose_crop/, meta/): 1:1 verification")
    p.add_argument("--ijb-target", type=str.upper, choices=("IJBB", "IJBC"), default="IJBC",
                   help="which release --ijb holds (its meta files are meta/<target>_*.txt)")
    p.add_argument("--ijb-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="ijb: keep embedding norms as quality weights (insightface's N1 mode); "
                        "--no-ijb-norm normalises each crop")
    p.add_argument("--ijb-detector-score", action=argparse.BooleanOptionalAction, default=True,
                   help="ijb: weight crops by their detector score (insightface's D1 mode)")
    p.add_argument("--ijb-far-rule", choices=("exact", "insightface"), default="exact",
                   help="ijb: TAR at the exact threshold of each FAR, or at the nearest point of "
                        "sklearn's ROC as insightface's eval_ijbc.py reads it (papers' numbers)")
    p.add_argument("--workers", type=int, default=0,
                   help="ijb: processes decoding and aligning crops")
    p.add_argument("--roc", metavar="PNG", help="ijb: also plot the ROC to this file (matplotlib)")
    p.add_argument("--synthetic", action="store_true",
                   help="evaluate on the run's synthetic identities (the default without --bin "
                        "or --ijb)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=1024, help="inputs per forward pass")
    p.add_argument("--n-per-class", type=int, default=5, help="synthetic: samples per identity")
    p.add_argument("--heldout-classes", type=int, default=1000,
                   help="synthetic: unseen identities (0: none)")
    p.add_argument("--classes-per-group", type=int, default=1000,
                   help="synthetic: the most head / tail training identities evaluated")
    p.add_argument("--head-threshold", type=int, default=20,
                   help="synthetic: training samples that make a class 'head'")
    p.add_argument("--seed", type=int, default=0, help="seed of the class and impostor samples")
    p.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the momentum (EMA) encoder; default: when saved and head is dcq")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help=".bin and ijb: no flip test")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def _device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    return torch.device(name)


def _synthetic_results(args, ckpt, model, device):
    dataset = checkpoint.dataset_from_config(ckpt["config"])
    groups = evaluation.choose_eval_classes(dataset, args.head_threshold, args.classes_per_group,
                                            args.seed)
    return evaluation.evaluate_identities(
        model, dataset, groups, n_per_class=args.n_per_class, heldout_classes=args.heldout_classes,
        device=device, batch_size=args.batch_size, seed=args.seed)


def _bin_results(args, model, device):
    results = {}
    for path in args.bin:
        values = evaluation.evaluate_bin(model, path, batch_size=args.batch_size, device=device,
                                         flip=args.flip)
        name = values.pop("name")
        results.update({f"{name}/{key}": value for key, value in values.items()})
    return results


def _ijb_results(args, model, device):
    values = evaluation.evaluate_ijb(model, args.ijb, args.ijb_target, batch_size=args.batch_size,
                                     device=device, flip=args.flip, norm=args.ijb_norm,
                                     detector_score=args.ijb_detector_score, workers=args.workers,
                                     far_rule=args.ijb_far_rule)
    name, (far, tar) = values.pop("name"), values.pop("roc")
    if args.roc:
        evaluation.ijb.plot_roc({f"{name} ({os.path.basename(args.checkpoint)})": (far, tar)},
                                args.roc, title=f"{name} 1:1 verification", marks=evaluation.ijb.IJB_FARS)
    results = {f"{name}/{key}": value for key, value in values.items()}
    return results, {"far": far.tolist(), "tar": tar.tolist()}


def evaluate(args):
    """Runs the evaluations ``args`` (parsed by ``build_parser``) ask for.

    Returns:
        dict with ``checkpoint`` (path), ``encoder`` ("ema" or "model") and ``results``, the flat
        ``"<group>/<metric>"`` dict of every evaluation; with ``--ijb`` also ``roc`` (lists ``far``
        and ``tar``).
    """
    device = _device(args.device)
    ckpt = checkpoint.load_checkpoint(args.checkpoint)
    use_ema = checkpoint.resolve_use_ema(ckpt, args.use_ema)
    model = checkpoint.model_from_checkpoint(ckpt, use_ema=use_ema).to(device)
    synthetic = args.synthetic or not (args.bin or args.ijb)
    if synthetic and ckpt["config"].get("data") != "synthetic":
        raise ValueError(f"the run trained on {ckpt['config'].get('data')!r}, not synthetic data: "
                         f"pass --bin or --ijb to evaluate on verification sets")
    results = _synthetic_results(args, ckpt, model, device) if synthetic else {}
    results.update(_bin_results(args, model, device))
    report = {"checkpoint": args.checkpoint, "encoder": "ema" if use_ema else "model"}
    if args.ijb:
        ijb_results, report["roc"] = _ijb_results(args, model, device)
        results.update(ijb_results)
    return {**report, "results": results}


def _json_safe(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv=None):
    """The command line: parse, evaluate, print the table, write JSON. Returns 0; bad input exits
    with status 2 and a message (argparse's ``error``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.roc and not args.ijb:
        parser.error("--roc plots the IJB ROC: pass --ijb DIR too")
    try:
        report = evaluate(args)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"{report['checkpoint']} ({report['encoder']} encoder)")
    print(evaluation.format_results(report["results"]))
    if args.json:
        report["results"] = {k: _json_safe(v) for k, v in report["results"].items()}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
