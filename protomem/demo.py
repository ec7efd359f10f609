"""The main job (``make demo``): the same MLP encoder trained on one synthetic long-tailed
identity set with each head — full softmax, Partial FC, Prototype Memory, DCQ, and the full
softmax and Prototype Memory again with doppelganger mining (``HEAD+mining``) — then a table of
TAR@FAR and rank-1 on head, tail and unseen identities, ms per step and head memory, and a PNG of
the curves (matplotlib: ``pip install 'protomem[train]'``; without it the plot is skipped). With
``--lookalikes F`` the identities include planted look-alike pairs and the table says how many of
them each mining run's lists recovered. Minutes on a 2-core CPU (measured:
benchmarks/results/demo-cpu-amd-epyc-2-threads.md).

    python -m protomem.demo [--out demo_out] [--epochs 3] [--num-classes 20000] [--lookalikes 0.5]
        [--heads full,pfc,pm,dcq,full+mining,pm+mining]
"""
import argparse
import csv
import json
import importlib.util
import os
import sys
import time

import torch

HEAD_NAMES = {"full": "full softmax", "pfc": "Partial FC (r=0.1)", "pm": "Prototype Memory (10%)",
              "dcq": "DCQ (queue 10%)"}
HEAD_NAMES.update({f"{h}+mining": f"{n} + mining" for h, n in list(HEAD_NAMES.items())})
DEFAULT_HEADS = "full,pfc,pm,dcq,full+mining,pm+mining"


def variant_options(name):
    """The options a head name sets: "pm" -> head pm; "pm+mining" -> head pm with
    ``--mining doppelganger`` (the trainer's defaults: fraction 0.5, k 4).

    Raises:
        ValueError: an unknown name."""
    if name not in HEAD_NAMES:
        raise ValueError(f"unknown head {name!r}: choose from {', '.join(HEAD_NAMES)}")
    head, _, extra = name.partition("+")
    return dict(head=head, mining="doppelganger" if extra == "mining" else "none")
COLUMNS = [("head/tar@far=1e-3", "head TAR@1e-3"), ("tail/tar@far=1e-3", "tail TAR@1e-3"),
           ("tail/tar@far=1e-4", "tail TAR@1e-4"), ("unseen/tar@far=1e-3", "unseen TAR@1e-3"),
           ("head/rank1", "head rank-1"), ("tail/rank1", "tail rank-1"), ("unseen/rank1", "unseen rank-1")]


def demo_options(head, args):
    """The options of one run: everything but the head is shared. DCQ's momentum encoder uses
    0.99 (not the paper's 0.999, meant for 1e5+ steps): over a run of ~1000 steps a 0.999 EMA
    would still be mostly its random initialisation."""
    return dict(**variant_options(head), data="synthetic", num_classes=args.num_classes,
                samples_per_class="megaface2", lookalikes=args.lookalikes,
                lookalike_spread=args.lookalike_spread,
                feature_dim=128, backbone="mlp", hidden="512", embedding_size=128,
                margin="cosface", scale=64.0, m3=0.4, memory_fraction=0.1, queue_fraction=0.1,
                sample_rate=0.1, ema_momentum=0.99, identities_per_batch=128, samples_per_identity=2, lr=0.1,
                momentum=0.9, weight_decay=5e-4, epochs=args.epochs, warmup_steps=50, schedule="poly",
                seed=args.seed, device=args.device, eval_every=args.eval_every,
                eval_classes=args.eval_classes, log_every=10, out=os.path.join(args.out, head.replace("+", "-")),
                progress=not args.quiet, tensorboard=False)


def run(head, args):
    """Trains one head; returns (summary, eval rows, log rows)."""
    from .training import Trainer, resolve

    cfg = resolve([], **demo_options(head, args))
    for name in ("log.csv", "eval.csv"):  # a fresh run: no rows of an earlier demo
        path = os.path.join(cfg["out"], name)
        if os.path.exists(path):
            os.remove(path)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    summary["train_s"] = time.perf_counter() - t0
    with open(os.path.join(cfg["out"], "log.csv")) as f:
        log = list(csv.DictReader(f))
    return summary, trainer.eval_history, log


def table(results):
    """The results as a markdown table (one row per head); with planted look-alikes a column of
    the mining runs' recovery: the share of planted identities whose best listed look-alike is
    their planted partner (precision), of those with a list."""
    planted = any("mining" in s for s, _, _ in results.values())
    head = ["head"] + [c[1] for c in COLUMNS] + ["ms/step", "head memory (MB)"]
    head += ["planted partner found (precision)"] if planted else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, (summary, _, _) in results.items():
        ev = summary["eval"]
        cells = [HEAD_NAMES[name]] + [f"{ev.get(key, float('nan')):.3f}" for key, _ in COLUMNS]
        cells += [f"{summary['ms_per_step']:.1f}", f"{summary['head_mb']:.2f}"]
        if planted:
            m = summary.get("mining")
            cells += [f"{m['precision']:.3f}" if m else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    """Training loss and tail TAR@FAR=1e-3 against training samples seen, one line per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (_, evals, log) in results.items():
        ax1.plot([float(r["epoch"]) for r in log], [float(r["loss"]) for r in log], label=HEAD_NAMES[name])
        steps_per_epoch = float(log[-1]["step"]) / max(float(log[-1]["epoch"]), 1e-9)
        ax2.plot([r["step"] / steps_per_epoch for r in evals],
                 [r.get("tail/tar@far=1e-3", float("nan")) for r in evals], marker="o", label=HEAD_NAMES[name])
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss (each head's own softmax)")
    ax2.set(xlabel="epoch", ylabel="TAR @ FAR=1e-3", title="tail identities (fresh samples)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="protomem-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--heads", default=DEFAULT_HEADS,
                   help="comma separated, of " + ", ".join(HEAD_NAMES) + f" (default {DEFAULT_HEADS})")
    p.add_argument("--num-classes", type=int, default=20000)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-classes", type=int, default=1000)
    p.add_argument("--lookalikes", type=float, default=0.0,
                   help="fraction of identities in planted look-alike pairs (default 0: none)")
    p.add_argument("--lookalike-spread", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None):
    """Runs the demo; prints the table and writes OUT/results.{md,json} and OUT/curves.png."""
    args = parse(argv)
    for head in args.heads.split(","):
        variant_options(head)  # an unknown name fails now, not after minutes of training
    can_plot = importlib.util.find_spec("matplotlib") is not None  # known before minutes of work
    if not can_plot:
        print("protomem-demo: matplotlib is not installed, so curves.png will not be drawn "
              "(pip install 'protomem[train]' installs it)", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for head in args.heads.split(","):
        print(f"== {HEAD_NAMES[head]}", flush=True)
        results[head] = run(head, args)
    md = table(results)
    total = time.perf_counter() - t0
    planted = (f", {args.lookalikes:g} of them in planted look-alike pairs (spread "
               f"{args.lookalike_spread:g})") if args.lookalikes else ""
    print(f"\n{md}\n\n{args.num_classes} synthetic identities (MegaFace2-like long tail){planted}, "
          f"{args.epochs:g} epochs, device {_device_name(args.device)}; total {total / 60:.1f} min")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({h: s for h, (s, _, _) in results.items()}, f, indent=1, default=float)
    if can_plot:
        plot(results, os.path.join(args.out, "curves.png"))
    print(f"wrote {args.out}/results.md, results.json" + (", curves.png" if can_plot else ""))
    return results


def _device_name(device):
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
