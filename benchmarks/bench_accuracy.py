"""Accuracy and prototype obsolescence of each head on synthetic long-tailed identities.

Each head trains the same MLP encoder on the same data (``protomem.training``; the settings of
``python -m protomem.demo``), then:
  - accuracy: TAR at FAR 1e-3 / 1e-4 and rank-1 on fresh samples of head identities (>= 20
    training samples), tail identities and unseen identities; ms per step; head memory;
  - staleness: for a random sample of training classes, the cosine between the class's
    classifier row (weight row, memory prototype, or the mean of its queue entries) and the
    current encoder's mean embedding of the class, binned by the steps since the class was last
    in a batch (PM holds only part of the classes: ``held`` is the fraction it still has).

    python benchmarks/bench_accuracy.py [--device cpu|cuda] [--out DIR] [--quick]

Rows: bench "accuracy" (one row per head) and "staleness" (params = the age bin), and a PNG of
both in --plot-dir (``--plot-only CSV`` redraws it from a results CSV). Sizes: CPU 20k classes x 2 epochs (about 3 minutes on 2
cores); GPU 200k classes, 512-d, 2 epochs; --quick 1000 classes, a fraction of an epoch.
"""
import argparse
import math
import os
import sys
import tempfile

import torch

from common import device_name, device_slug, make_row, write_rows

HEADS = ("full", "pfc", "pm", "dcq", "full+mining", "pm+mining")  # HEAD+mining: --mining doppelganger
ACCURACY = [("head/tar@far=1e-3", "head_tar_at_far_1e-3"), ("tail/tar@far=1e-3", "tail_tar_at_far_1e-3"),
            ("tail/tar@far=1e-4", "tail_tar_at_far_1e-4"), ("unseen/tar@far=1e-3", "unseen_tar_at_far_1e-3"),
            ("head/rank1", "head_rank1"), ("tail/rank1", "tail_rank1"), ("unseen/rank1", "unseen_rank1")]
SIZES = {
    "cpu": dict(num_classes=20000, embedding_size=128, identities_per_batch=128, epochs=2.0, eval_classes=1000),
    "cuda": dict(num_classes=200000, embedding_size=512, identities_per_batch=512, epochs=2.0, eval_classes=2000),
    "quick": dict(num_classes=1000, embedding_size=32, identities_per_batch=32, epochs=0.5, eval_classes=100),
}


def options(head, size, device, out, lookalikes=0.0):
    """The training options of one head (the demo's, at this size)."""
    from protomem.demo import variant_options

    return dict(**variant_options(head), lookalikes=lookalikes, data="synthetic",
                samples_per_class="megaface2", feature_dim=128,
                backbone="mlp", hidden="512", margin="cosface", scale=64.0, m3=0.4,
                memory_fraction=0.1, queue_fraction=0.1, sample_rate=0.1, ema_momentum=0.99,
                samples_per_identity=2, lr=0.1, warmup_steps=50, schedule="poly", device=device,
                track_staleness=True, progress=False, tensorboard=False, log_every=50, out=out, **size)


def train(head, size, device, lookalikes=0.0):
    """(trainer, summary) of one head's run, in a temporary output folder."""
    from protomem.training import Trainer, resolve

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(resolve([], **options(head, size, device, out, lookalikes)))
        return trainer, trainer.fit()


def staleness_rows(trainer, head, params, dev_name, n_classes, seed=0):
    """Rows of bench "staleness" for one trained head; returns (rows, bins)."""
    from protomem.staleness import by_age, staleness

    g = torch.Generator().manual_seed(seed)
    C = trainer.dataset.num_classes
    classes = torch.randperm(C, generator=g)[:n_classes]
    res = staleness(trainer.encoder, trainer.head, trainer.dataset, classes, trainer.last_seen,
                    trainer.step, device=trainer.device)
    bins = by_age(res)
    rows = []
    for b in bins:
        age = f"{b['lo']}-{b['hi'] - 1}" if b["hi"] is not None else f">={b['lo']}"
        p = {**params, "age": age}
        rows.append(make_row("staleness", head, p, "cos", "cos", b["cos"], dev_name))
        rows.append(make_row("staleness", head, p, "held", "%", 100 * b["held"], dev_name))
        rows.append(make_row("staleness", head, p, "classes", "count", b["classes"], dev_name))
    return rows, bins


def plot(rows, path):
    """Two panels from the rows: TAR@FAR=1e-3 on head / tail / unseen identities per head (bars),
    and the staleness curves (mean cosine of classifier row and class mean per age bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(dict.fromkeys(r["provider"] for r in rows if r["bench"] == "accuracy"))
    groups = ("head", "tail", "unseen")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(heads))
    for i, head in enumerate(heads):
        vals = [next((r["median"] for r in rows if r["bench"] == "accuracy" and r["provider"] == head
                      and r["metric"] == f"{g}_tar_at_far_1e-3"), float("nan")) for g in groups]
        ax1.bar([j + i * width for j in range(len(groups))], vals, width, label=head)
        stale = [r for r in rows if r["bench"] == "staleness" and r["provider"] == head and r["metric"] == "cos"]
        ages = [int(r["params"].split("age=")[1].split("-")[0].lstrip(">=")) for r in stale]
        ax2.plot([a + 0.5 for a in ages], [r["median"] for r in stale], marker="o", label=head)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{g} identities" for g in groups])
    ax1.set(ylabel="TAR @ FAR=1e-3 (%)", title="verification on fresh samples")
    ax2.set(xscale="symlog", xlabel="steps since the class was last in a batch (bin start)",
            ylabel="cos(classifier row, class mean)", title="prototype obsolescence")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(rows[0]["device"] + ", " + rows[0]["params"].split(";age")[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--plot-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--lookalikes", type=float, default=0.0,
                   help="fraction of identities in planted look-alike pairs; mining runs then add "
                        "a planted_precision row (default 0: none)")
    p.add_argument("--staleness-classes", type=int, default=5000)
    p.add_argument("--plot-only", help="redraw the PNG from this results CSV and exit")
    a = p.parse_args(argv)
    if a.plot_only:
        from common import read_rows

        rows = [r for r in read_rows(a.plot_only) if r["bench"] in ("accuracy", "staleness")]
        png = os.path.join(a.plot_dir, f"{device_slug(rows[0]['device'])}-accuracy.png")
        plot(rows, png)
        print(f"wrote {png}")
        return 0
    size = SIZES["quick" if a.quick else a.device]
    dev_name = device_name(a.device)
    params = {"C": size["num_classes"], "epochs": size["epochs"], "D": size["embedding_size"],
              "B": 2 * size["identities_per_batch"]}
    if a.lookalikes:
        params["lookalikes"] = a.lookalikes
    rows = []
    csv_path = os.path.join(a.out, "accuracy.csv")
    for head in a.heads.split(","):
        trainer, summary = train(head, size, a.device, a.lookalikes)
        ev = summary["eval"]
        for key, metric in ACCURACY:
            value = ev.get(key, math.nan)
            rows.append(make_row("accuracy", head, params, metric, "%", 100 * value, dev_name))
        rows.append(make_row("accuracy", head, params, "ms_per_step", "ms", summary["ms_per_step"], dev_name))
        rows.append(make_row("accuracy", head, params, "head_memory", "MB", summary["head_mb"], dev_name))
        if "mining" in summary:
            rows.append(make_row("accuracy", head, params, "planted_precision", "%",
                                 100 * summary["mining"]["precision"], dev_name))
        more, bins = staleness_rows(trainer, head, params, dev_name, a.staleness_classes)
        rows += more
        write_rows(csv_path, rows)  # as it goes: a run cut short keeps its rows
        print(f"{head}: " + ", ".join(f"{m}={100 * ev.get(k, math.nan):.1f}%" for k, m in ACCURACY[:4])
              + "; staleness cos by age: " + ", ".join(f"{b['lo']}:{b['cos']:.3f}" for b in bins),
              flush=True)
    if not a.quick:
        os.makedirs(a.plot_dir, exist_ok=True)
        png = os.path.join(a.plot_dir, f"{device_slug(dev_name)}-accuracy.png")
        plot(rows, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
