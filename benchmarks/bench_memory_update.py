"""Fused memory_update_ vs the plain-PyTorch reference.

For each memory size M and number of classes per step U (D = 512 by default), fills the memory,
checks the fused op against protomem.reference on a few steps, then times one update per call
(a new set of classes each call: some refreshed, the rest evicting the oldest) and prints a table
with the device. On CUDA it also times the wall clock of back-to-back calls with a sync every 20
calls ("fused_wall_clock"), which counts the host and launch cost that do_bench's GPU time hides. Targets: CPU fused >= 3x the reference at M = 1e6, U = 512; H100 <= 50 us.

    python benchmarks/bench_memory_update.py [--device cpu|cuda] [--sizes 1e4,1e5,1e6]
                                             [--classes 64,512,4096] [--dim 512] [--out DIR]
"""
import argparse
import os
import sys

import torch

import protomem
from protomem.reference import memory_update_ref

from common import device_name, make_row, write_rows
from measure import time_fn

STEPS = 8  # distinct steps cycled through while timing


def filled_memory(M, D, device):
    """A full memory holding classes 0..M-1 (the state after many steps)."""
    mem = protomem.PrototypeMemory(M, D, device=device)
    mem.protos.copy_(torch.nn.functional.normalize(torch.randn(M, D, device=device), dim=1))
    mem.slot_labels.copy_(torch.arange(M, device=device))
    protomem.rebuild_index_(mem.index_keys, mem.index_vals, mem.slot_labels)
    return mem


def make_steps(M, U, D, device, seed=0):
    """Classes drawn from 2M ids (about half hit), unit prototypes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        classes = torch.randperm(2 * M, generator=g)[:U]
        protos = torch.nn.functional.normalize(torch.randn(U, D, generator=g), dim=1)
        out.append((classes.to(device), protos.to(device)))
    return out


def check(mem, steps):
    """The fused op and the reference agree on these steps (on copies of the memory)."""
    fused = protomem.PrototypeMemory(mem.memory_size, mem.embedding_size, device=mem.protos.device)
    fused.load_state_dict(mem.state_dict())
    ref = [mem.protos.clone(), mem.slot_labels.clone(), mem.stamps.clone(), mem.counters.clone()]
    for classes, protos in steps[:2]:
        got = fused.update(classes, protos, check=False)
        want = memory_update_ref(*ref, classes, protos)
        if not (torch.equal(got, want) and torch.equal(fused.slot_labels, ref[1])):
            sys.exit("bench_memory_update: the fused op disagrees with the reference")
        if not torch.allclose(fused.protos, ref[0], atol=1e-5):
            sys.exit("bench_memory_update: prototypes disagree with the reference")


def cycle(fn_step, steps):
    state = {"i": 0}

    def call():
        classes, protos = steps[state["i"] % STEPS]
        state["i"] += 1
        fn_step(classes, protos)

    return call


def wall_clock(fn, calls_per_sync=20, repeats=15):
    """Seconds per call of back-to-back ``fn()`` calls on CUDA with one sync every
    ``calls_per_sync`` calls, measured on the host clock: the launch and host cost of each call
    counts, not only the GPU time that CUDA events see. (median, p20, p80) over ``repeats``."""
    import time

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls_per_sync):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls_per_sync)
    ts = sorted(times)
    return tuple(ts[round(f * (len(ts) - 1))] for f in (0.5, 0.2, 0.8))


def run(args):
    device = args.device
    rows = []
    name = device_name(device)
    print(f"memory_update_: fused op vs reference on {name}, D = {args.dim}, torch {torch.__version__}")
    wall = f" {'wall us':>10}" if device == "cuda" else ""
    print(f"{'M':>9} {'U':>6} {'reference us':>14} {'fused us':>10} {'speed-up':>9}{wall}")
    for M in args.sizes:
        mem = filled_memory(M, args.dim, device)
        for U in args.classes:
            if U > M:
                continue
            steps = make_steps(M, U, args.dim, device)
            check(mem, steps)
            ref_state = [mem.protos.clone(), mem.slot_labels.clone(), mem.stamps.clone(), mem.counters.clone()]
            ref_fn = cycle(lambda c, p: memory_update_ref(*ref_state, c, p), steps)
            fused_fn = cycle(lambda c, p: mem.update(c, p, check=False), steps)
            t_ref = time_fn(ref_fn, device, args.min_run_time)
            t_fused = time_fn(fused_fn, device, args.min_run_time)
            timed = [("reference", t_ref), ("fused", t_fused)]
            wall = ""
            if device == "cuda":
                t_wall = wall_clock(fused_fn)
                timed.append(("fused_wall_clock", t_wall))
                wall = f" {t_wall[0] * 1e6:>10.1f}"
            print(f"{M:>9} {U:>6} {t_ref[0] * 1e6:>14.1f} {t_fused[0] * 1e6:>10.1f} {t_ref[0] / t_fused[0]:>8.1f}x{wall}")
            for provider, t in timed:
                rows.append(make_row("memory_update", provider, dict(M=M, U=U, D=args.dim, dtype="float32"),
                                     "time", "us", [v * 1e6 for v in t], name))
        del mem
    if args.out:
        tag = "cuda" if device == "cuda" else "cpu"
        path = os.path.join(args.out, f"memory_update_{tag}.csv")
        write_rows(path, rows)
        print(f"wrote {path}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="memory sizes M, comma separated")
    p.add_argument("--classes", default="64,512,4096", help="classes per step U, comma separated")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds per CPU measurement")
    p.add_argument("--out", help="folder for the CSV")
    a = p.parse_args(argv)
    a.sizes = [int(float(s)) for s in a.sizes.split(",")]
    a.classes = [int(float(s)) for s in a.classes.split(",")]
    return a


if __name__ == "__main__":
    run(parse_args())
