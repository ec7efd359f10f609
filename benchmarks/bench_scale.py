"""Time per training step and peak memory of each loss head against the number of classes C.

Heads: Prototype Memory (memory M fixed), DCQ (queue K = M fixed), Partial FC (r = 0.1) and full
softmax (both with an SGD-with-momentum step, so their optimiser state counts). A step is forward
+ backward to the embeddings + the head's update; labels are drawn uniformly from [0, C): PM and
DCQ see C only through the label values, so their cost should stay flat while Partial FC and the
full softmax grow with C until they run out of memory.

Defaults: GPU C in {1e5, 1e6, 1e7, 1e8}, B = 512, D = 512, M = K = 1e5 (the paper's point: a
memory that stays fixed as the dataset grows); CPU C in {1e4, 1e5, 1e6, 1e7}, B = 128, D = 128,
M = K = 1e4, where a configuration whose estimated need exceeds --ram-budget-gb (default 8) is
recorded as out of memory without being run. Each (head, C) runs in its own process; each head is
first checked against protomem.reference at a small size (in another process) and not timed if
it disagrees. Rows (bench "scale"; metrics time [ms], peak_memory and state_memory [MB]) go to
DIR/scale_<device>.csv.

    python benchmarks/bench_scale.py [--device cpu|cuda] [--classes 1e4,1e5,1e6,1e7] [--B 128]
        [--D 128] [--M 1e4] [--heads pm,dcq,pfc,full] [--ram-budget-gb 8] [--quick] [--out DIR]
"""
import argparse
import json
import os
import sys

import torch

from common import device_name, make_row, oom_rows, write_rows
from measure import PeakMemory, is_out_of_memory, run_worker, time_fn
from readme_tables import fmt_count, scale_ratios, scale_table
import scale_heads

METRICS = ("time", "peak_memory", "state_memory")
DEFAULTS = {  # device -> classes, B, D, M
    "cuda": ("1e5,1e6,1e7,1e8", 512, 512, "1e5"),
    "cpu": ("1e4,1e5,1e6,1e7", 128, 128, "1e4"),
    "quick": ("1e3,1e4", 16, 32, "256"),
}
WARMUP = 2  # steps before timing; the first allocates the optimiser state


def measure(head, C, B, D, M, device, min_run_time):
    """In this process: build the head, run WARMUP steps for the peak memory, then time steps."""
    warm = scale_heads.Step(head, min(C, 1000), 8, 16, 64, device)
    for _ in range(WARMUP):  # lazy imports and thread pools are not the head's memory
        warm.step()
    del warm
    try:
        with PeakMemory(device) as pk:
            s = scale_heads.Step(head, C, B, D, M, device)
            for _ in range(WARMUP):
                s.step()
        state = s.state_bytes() / 2**20
        t = time_fn(s.step, device, min_run_time)
    except Exception as e:  # noqa: BLE001 (an allocation failure is a result, anything else is not)
        if is_out_of_memory(e):
            return {"oom": str(e).splitlines()[0][:300]}
        raise
    return {"time_s": list(t), "peak_mb": pk.mb, "state_mb": state}


def worker_cmd(a, *extra):
    return [sys.executable, os.path.abspath(__file__), "--device", a.device, "--B", str(a.B),
            "--D", str(a.D), "--M", str(a.M), "--min-run-time", str(a.min_run_time), *extra]


def rows_of(head, params, result, device):
    if "oom" in result:
        return oom_rows("scale", head, params, METRICS, device)
    t = [v * 1e3 for v in result["time_s"]]
    return [make_row("scale", head, params, "time", "ms", t, device),
            make_row("scale", head, params, "peak_memory", "MB", result["peak_mb"], device),
            make_row("scale", head, params, "state_memory", "MB", result["state_mb"], device)]


def run(a):
    # the parent never touches the GPU: its context would take device memory from the workers
    got = {"name": device_name("cpu")} if a.device == "cpu" else run_worker(worker_cmd(a, "--worker", "name"))
    if "name" not in got:
        sys.exit(f"bench_scale: no {a.device} device: {got.get('error')}")
    name = got["name"]
    print(f"bench_scale on {name}: B={a.B} D={a.D} M=K={a.M}, classes {a.classes}, heads {a.heads}")
    checked = run_worker(worker_cmd(a, "--worker", "check", "--heads", ",".join(a.heads)))
    if "error" in checked:
        sys.exit(f"bench_scale: a head disagrees with the reference, nothing timed\n{checked['error']}")
    print(f"checked against protomem.reference: {', '.join(checked['ok'])}")
    rows, failed = [], []
    path = os.path.join(a.out, f"scale_{a.device}.csv") if a.out else None
    for C in a.classes:
        for head in a.heads:
            params = scale_heads.head_params(head, C, a.B, a.D, a.M)
            need = scale_heads.estimate_bytes(head, C, a.B, a.D, a.M) / 1e9
            if a.device == "cpu" and need > a.ram_budget_gb:
                result = {"oom": f"estimated {need:.1f} GB > --ram-budget-gb {a.ram_budget_gb:g}"}
                params.update(need_gb=f"{need:.3g}", budget_gb=f"{a.ram_budget_gb:g}")
            else:
                result = run_worker(worker_cmd(a, "--worker", "measure", "--heads", head, "--classes", str(C)),
                                    timeout=a.timeout)
            if "error" in result:
                print(f"  {head:>4} C={fmt_count(C):>5}: FAILED\n{result['error']}")
                failed.append((head, C))
                continue
            rows += rows_of(head, params, result, name)
            if path:  # after each configuration: a run cut short keeps what it measured
                write_rows(path, rows)
            if "oom" in result:
                print(f"  {head:>4} C={fmt_count(C):>5}: OOM ({result['oom']})")
            else:
                print(f"  {head:>4} C={fmt_count(C):>5}: {result['time_s'][0] * 1e3:9.2f} ms  "
                      f"peak {result['peak_mb']:9.1f} MB  state {result['state_mb']:9.1f} MB", flush=True)
    if rows:
        print("\n" + "\n".join(scale_table(rows)))
        for head, r in scale_ratios(rows).items():
            if r:
                print(f"{head}: C {fmt_count(r[0])} -> {fmt_count(r[1])}: time {r[2]:.2f}x, memory {r[3]:.2f}x"
                      + (f", OOM from C = {fmt_count(r[4])}" if r[4] else ""))
    if path and rows:
        print(f"wrote {path}")
    return 1 if failed else 0


def worker(a):
    if a.worker == "name":
        return {"name": device_name(a.device)}
    if a.worker == "check":
        for head in a.heads:
            scale_heads.check_head(head, a.device)
        return {"ok": a.heads}
    return measure(a.heads[0], a.classes[0], a.B, a.D, a.M, a.device, a.min_run_time)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--classes", help="class counts C, comma separated")
    p.add_argument("--B", type=int)
    p.add_argument("--D", type=int)
    p.add_argument("--M", type=float, help="PM memory size M = DCQ queue size K")
    p.add_argument("--heads", default=",".join(scale_heads.HEADS))
    p.add_argument("--ram-budget-gb", type=float, default=8.0, help="CPU: larger estimates are OOM")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per configuration")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", help="folder for the CSV")
    p.add_argument("--worker", choices=["name", "check", "measure"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    classes, B, D, M = DEFAULTS["quick" if a.quick else a.device]
    a.classes = [int(float(c)) for c in (a.classes or classes).split(",")]
    a.B, a.D, a.M = a.B or B, a.D or D, int(a.M or float(M))
    a.min_run_time = a.min_run_time or (0.05 if a.quick else 1.0 if a.device == "cpu" else 0.3)
    a.heads = a.heads.split(",")
    unknown = set(a.heads) - set(scale_heads.HEADS)
    if unknown:
        p.error(f"unknown heads {sorted(unknown)}; choose from {scale_heads.HEADS}")
    return a


if __name__ == "__main__":
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
    else:
        sys.exit(run(args))
