"""How well doppelganger mining recovers planted look-alikes, and what bounds it.

Each run trains one head with ``--mining doppelganger`` on the demo's data with planted
look-alike pairs (``--lookalikes 0.5``; the demo's options otherwise) for some epochs, then
reports the lists' recovery of the planted partners (``protomem.mining.planted_recovery``) and
three bounds:

- ``vote_bound``: the share of planted classes whose twin was the closest other class of at
  least one row of the run (a row of the class, or of the twin: the lists are symmetric). The
  lists see nothing but these (row class, closest other class, cosine) pairs, so no list rule
  can put the twin first for more planted classes than this.
- from the trained encoder, on 4 fresh samples of every class: the share of planted classes whose
  closest other class mean is the twin (``mean_oracle``), and the share of samples of planted
  classes whose closest other class mean is the twin (``sample_oracle``: what one row's vote
  could know with up-to-date class centres).

    python benchmarks/mining_recovery.py [--runs pm:3:0.15,full:10:0.3,full:3:0.3:0] [--num-classes 20000]
        [--out results/FILE.md]

A run is HEAD:EPOCHS:SPREAD[:FRACTION] (FRACTION: ``--mining-fraction``, default 0.5; 0 feeds
the lists from random batches). Writes a markdown table (one row per run).
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from common import device_name, device_slug

RUNS = "pm:3:0.3,full:3:0.3,pm:3:0.15,full:3:0.15,pm:10:0.3,full:10:0.3,pm:3:0.3:0,full:3:0.3:0"


def train(head, epochs, spread, out, num_classes=20000, fraction=0.5):
    """(trainer, vote_bound) after a mining run of the demo's options on planted look-alikes."""
    from protomem.demo import demo_options
    from protomem.training import Trainer, resolve

    args = argparse.Namespace(num_classes=num_classes, epochs=epochs, seed=0, device="cpu", eval_every=0,
                              eval_classes=1000, out=out, quiet=True, lookalikes=0.5,
                              lookalike_spread=spread)
    options = demo_options(head + "+mining", args) | {"mining_fraction": fraction}
    trainer = Trainer(resolve([], **options))
    partners = trainer.dataset.planted_partners(torch.arange(trainer.dataset.num_classes))
    voted = torch.zeros(len(partners), dtype=torch.bool)
    update = trainer.lookalikes.update_packed

    def watch(packed):  # the pairs the lists are fed: did any name a planted twin?
        a, b = packed[:, 0].cpu(), packed[:, 1].cpu()
        ok = (a >= 0) & (b >= 0)
        a, b = a[ok], b[ok]
        twin = (partners[a] == b[:, None]).any(dim=1)
        voted[a[twin]] = True
        voted[b[twin]] = True
        return update(packed)

    trainer.lookalikes.update_packed = watch
    trainer.fit()
    planted = (partners >= 0).any(dim=1)
    return trainer, float(voted[planted].float().mean())


@torch.no_grad()
def oracles(trainer, samples=4, chunk=4096):
    """(mean_oracle, sample_oracle) of the trained encoder (see the module docstring)."""
    ds = trainer.dataset
    C = ds.num_classes
    partners = ds.planted_partners(torch.arange(C))
    planted = (partners >= 0).any(dim=1)
    x, y = ds.fresh_samples(torch.arange(C), samples)
    e = torch.cat([F.normalize(trainer.encoder(x[i:i + chunk]), dim=1) for i in range(0, len(y), chunk)])
    mean = F.normalize(e.view(C, samples, -1).mean(dim=1), dim=1)
    cm = mean @ mean.T
    cm.fill_diagonal_(-2)
    mean_hit = (partners == cm.argmax(dim=1)[:, None]).any(dim=1)[planted].float().mean()
    hits = total = 0
    for i in range(0, len(y), chunk):
        yy = y[i:i + chunk]
        c = e[i:i + chunk] @ mean.T
        c[torch.arange(len(yy)), yy] = -2
        keep = planted[yy]
        hits += int((partners[yy] == c.argmax(dim=1)[:, None]).any(dim=1)[keep].sum())
        total += int(keep.sum())
    return float(mean_hit), hits / max(total, 1)


def main(argv=None):
    from protomem.mining import planted_recovery

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=RUNS, help=f"HEAD:EPOCHS:SPREAD, comma separated (default {RUNS})")
    p.add_argument("--out", help="markdown file (default results/mining-recovery-<device>.md)")
    p.add_argument("--num-classes", type=int, default=20000)
    a = p.parse_args(argv)
    dev = device_name("cpu")
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"mining-recovery-{device_slug(dev)}.md")
    lines = ["| head | epochs | spread | fraction | precision | recall | vote_bound | mean_oracle | "
             "sample_oracle | minutes |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in a.runs.split(","):
        head, epochs, spread, fraction = (run.split(":") + ["0.5"])[:4]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer, vote_bound = train(head, float(epochs), float(spread), tmp, a.num_classes, float(fraction))
        C = trainer.dataset.num_classes
        rec = planted_recovery(trainer.lookalikes, trainer.dataset.planted_partners(torch.arange(C)))
        mean_hit, sample_hit = oracles(trainer)
        lines.append(f"| {head} | {epochs} | {spread} | {fraction} | {rec['precision']:.3f} | {rec['recall']:.3f} | "
                     f"{vote_bound:.3f} | {mean_hit:.3f} | {sample_hit:.3f} | {(time.perf_counter() - t0) / 60:.1f} |")
        print(lines[-1], flush=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + f"\n\n{a.num_classes} synthetic identities, 0.5 of them in planted look-alike pairs, "
                f"the demo's options with --mining doppelganger; {dev}, torch {torch.__version__}, "
                f"{datetime.date.today()}: "
                f"`python benchmarks/mining_recovery.py --runs {a.runs}`\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
