"""The step-time cost of doppelganger mining: the demo's training with and without
``--mining doppelganger``, side by side in one process.

Two trainers (same head, data and seed; one mines) run alternately, ``--steps`` steps each per
round, after a warm-up; the ms per step of every round is kept and the medians compared. The
mining trainer's extra work per step is the pairs' transfer, ``DoppelgangerLists.update`` and the
sampler's look-alike batch; those are also timed alone (``lists_update``, ``mined_batch``).

    python benchmarks/bench_mining.py [--device cpu|cuda] [--out DIR] [--heads pm,full] [--quick]

Rows: bench "mining", provider = the head, metrics ``ms_per_step`` (params mining=none /
doppelganger), ``ratio`` (mining / none, the median of the per-round ratios), ``lists_update`` and
``mined_batch`` (ms).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from common import device_name, make_row, write_rows

SIZES = {"cpu": dict(num_classes=20000, identities_per_batch=128, embedding_size=128),
         "cuda": dict(num_classes=200000, identities_per_batch=512, embedding_size=512),
         "quick": dict(num_classes=1000, identities_per_batch=32, embedding_size=32)}


def trainer(head, mining, size, device, out):
    """A Trainer with the demo's options at ``size`` (mining on or off)."""
    from protomem.demo import variant_options
    from protomem.training import Trainer, resolve

    opts = dict(**variant_options(head + ("+mining" if mining else "")), data="synthetic",
                samples_per_class="megaface2", feature_dim=128, backbone="mlp", hidden="512",
                margin="cosface", scale=64.0, m3=0.4, memory_fraction=0.1, queue_fraction=0.1,
                sample_rate=0.1, ema_momentum=0.99, samples_per_identity=2, lr=0.1, epochs=3.0,
                warmup_steps=50, schedule="poly", device=device, progress=False,
                tensorboard=False, eval_every=0, out=out, **size)
    return Trainer(resolve([], **opts))


def timed_steps(tr, batches, steps):
    """ms per step over ``steps`` train steps (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step(batches)
    sync()
    return 1000 * (time.perf_counter() - t0) / steps


def overhead(tr, repeats=50):
    """(ms of one lists update from the last step's pairs, ms of one mined batch)."""
    packed = tr.head.mining_pairs(packed=True)
    t0 = time.perf_counter()
    for _ in range(repeats):
        tr.lookalikes.update_packed(packed)
    upd = 1000 * (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for b in range(repeats):
        tr.sampler.batch(tr.epoch, b)
    return upd, 1000 * (time.perf_counter() - t0) / repeats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--heads", default="pm,full")
    p.add_argument("--steps", type=int, default=30, help="steps per trainer and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=60, help="steps before timing (lists fill up)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.rounds, a.warmup = 3, 2, 3
    size = SIZES["quick" if a.quick else a.device]
    dev = device_name(a.device)
    params = {"C": size["num_classes"], "B": 2 * size["identities_per_batch"], "D": size["embedding_size"]}
    rows = []
    for head in a.heads.split(","):
        with tempfile.TemporaryDirectory() as o1, tempfile.TemporaryDirectory() as o2:
            plain, mined = trainer(head, False, size, a.device, o1), trainer(head, True, size, a.device, o2)
            runs = [(plain, plain._batches()), (mined, mined._batches())]
            for tr, batches in runs:
                timed_steps(tr, batches, a.warmup)
            ms = {"none": [], "doppelganger": []}
            for _ in range(a.rounds):  # interleaved: a busy moment hits both
                ms["none"].append(timed_steps(*runs[0], a.steps))
                ms["doppelganger"].append(timed_steps(*runs[1], a.steps))
            upd, batch = overhead(mined)
        ratios = [m / n for m, n in zip(ms["doppelganger"], ms["none"])]
        for mode, values in ms.items():
            q = statistics.quantiles(values, n=5) if len(values) > 1 else values * 4
            rows.append(make_row("mining", head, {**params, "mining": mode}, "ms_per_step", "ms",
                                 (statistics.median(values), q[0], q[-1]), dev))
        rows.append(make_row("mining", head, params, "ratio", "x", statistics.median(ratios), dev))
        rows.append(make_row("mining", head, params, "lists_update", "ms", upd, dev))
        rows.append(make_row("mining", head, params, "mined_batch", "ms", batch, dev))
        print(f"{head}: {statistics.median(ms['none']):.2f} ms/step without mining, "
              f"{statistics.median(ms['doppelganger']):.2f} with (ratio {statistics.median(ratios):.3f}); "
              f"lists update {upd:.3f} ms, mined batch {batch:.3f} ms", flush=True)
    write_rows(os.path.join(a.out, "mining.csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
