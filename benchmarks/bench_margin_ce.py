"""Fused margin cross-entropy vs the materialising reference: forward + backward time and peak
memory beyond the inputs.

Providers: "eager" (protomem.reference, B x M logits), "compiled" (torch.compile of it; opt-in
with --compiled on CPU, where compiling takes minutes), "fused" (protomem's kernel), and on CUDA
"cce", cut-cross-entropy's linear_cross_entropy (plain CE, no normalisation or margin) as a speed
anchor when it is installed. Each
provider runs in its own process; on CPU the peak is the growth of the peak resident set size
over the state after the inputs were made, on CUDA torch.cuda.max_memory_allocated. Each is
checked against the reference first. CPU target: fused <= 1.2x the eager time with <= 1/10 of
its peak memory at B = 256, M = 2e5, D = 128.

    python benchmarks/bench_margin_ce.py [--device cpu] [--B 256] [--M 2e5] [--D 128] [--out DIR]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import torch

from common import device_name, make_row, write_rows
from measure import PeakMemory, time_fn

PROVIDERS = ("eager", "compiled", "fused", "cce")


def inputs(B, M, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    W = torch.randn(M, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    col = torch.arange(M, device=device)
    row = torch.randint(M, (B,), generator=g).to(device)
    return x, W, row, col


def loss_fn(provider):
    from protomem.functional import margin_cross_entropy
    from protomem.reference import margin_cross_entropy_ref

    if provider == "cce":  # speed anchor only: plain CE, no normalisation or margin
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, W, row, col: linear_cross_entropy(x, W, row)
    if provider == "fused":
        return lambda x, W, row, col: margin_cross_entropy(x, W, row, col, scale=64.0, m3=0.4)
    ref = lambda x, W, row, col: margin_cross_entropy_ref(x, W, row, col, scale=64.0, m3=0.4)[0]  # noqa: E731
    return torch.compile(ref) if provider == "compiled" else ref


def check(fn, x, W, row, col, provider):
    from protomem.reference import margin_cross_entropy_ref

    want = margin_cross_entropy_ref(x.detach(), W.detach(), row, col, scale=64.0, m3=0.4)[0]
    got = fn(x, W, row, col)
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    if not torch.allclose(got.detach().float(), want.float(), rtol=tol, atol=tol):
        raise SystemExit(f"{provider}: loss {float(got)} != reference {float(want)}")


def measure(provider, B, M, D, device, grad_w, min_run_time, dtype=torch.float32):
    """In this process: check, then time forward + backward and measure the peak memory."""
    import protomem  # noqa: F401

    x, W, row, col = inputs(B, M, D, dtype, device)
    W.requires_grad_(grad_w)
    fn = loss_fn(provider)

    def step():
        x.grad = W.grad = None
        fn(x, W, row, col).backward()

    with PeakMemory(device) as pk:
        step()
    if provider != "cce":  # cce computes another loss: nothing to check it against
        check(fn, x, W, row, col, provider)  # after the memory reading: the reference is eager
    return {"time_s": list(time_fn(step, device, min_run_time)), "peak_mb": pk.mb}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--M", type=float, default=2e5)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--grad-w", action="store_true", help="also the gradient of W (full softmax)")
    p.add_argument("--compiled", action="store_true", help="include torch.compile of the reference")
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--out", help="folder for the CSV")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    M = int(a.M)
    if a.worker:  # one provider, in a fresh process
        print(json.dumps(measure(a.worker, a.B, M, a.D, a.device, a.grad_w, a.min_run_time,
                                 getattr(torch, a.dtype))))
        return
    providers = [q for q in PROVIDERS if (q != "compiled" or a.compiled or a.device == "cuda")
                 and (q != "cce" or (a.device == "cuda" and importlib.util.find_spec("cut_cross_entropy")))]
    name = device_name(a.device)
    print(f"margin_cross_entropy fwd+bwd, CosFace(64, 0.4), B={a.B} M={M} D={a.D} {a.dtype}, "
          f"grad W: {a.grad_w}, on {name}")
    results = {}
    for provider in providers:
        cmd = [sys.executable, __file__, "--worker", provider, "--device", a.device, "--B", str(a.B),
               "--M", str(M), "--D", str(a.D), "--dtype", a.dtype, "--min-run-time", str(a.min_run_time)] + (["--grad-w"] if a.grad_w else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{provider:>9}: failed\n{out.stderr[-2000:]}")
            continue
        results[provider] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[provider]
        print(f"{provider:>9}: {r['time_s'][0] * 1e3:9.2f} ms   peak {r['peak_mb']:9.1f} MB")
    if "eager" in results and "fused" in results:
        e, f = results["eager"], results["fused"]
        print(f"fused / eager: time {f['time_s'][0] / e['time_s'][0]:.2f}x, "
              f"peak memory {f['peak_mb'] / max(e['peak_mb'], 1e-9):.3f}x")
    if a.out:
        path = os.path.join(a.out, f"margin_ce_{a.device}_{a.dtype}{'_gradw' if a.grad_w else ''}.csv")
        params = dict(B=a.B, M=M, D=a.D, dtype=a.dtype, grad_w=a.grad_w)
        rows = []
        for provider, r in results.items():
            rows.append(make_row("margin_ce", provider, params, "time_fwd_bwd", "ms",
                                 [t * 1e3 for t in r["time_s"]], name))
            rows.append(make_row("margin_ce", provider, params, "peak_memory", "MB", r["peak_mb"], name))
        write_rows(path, rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
