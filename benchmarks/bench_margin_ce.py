"""Fused margin cross-entropy vs what a user would otherwise run: forward + backward time and
peak memory beyond the inputs.

Providers:
  eager     idiomatic PyTorch as insightface / pytorch-metric-learning write a CosFace head:
            normalise x and W, ``F.linear``, the margin on the target column, ``F.cross_entropy``
  compiled  ``torch.compile`` of that same function (on CPU and GPU alike; the first call compiles)
  fused     ``protomem.functional.margin_cross_entropy`` (C++ kernel on CPU, Triton on CUDA)
  cce       cut-cross-entropy's linear_cross_entropy (CUDA, when installed): plain CE without
            normalisation or margin, a speed anchor only
``protomem.reference`` is what the tests compare with; it is not a provider (it is slower than
the idiomatic code). Every provider's loss is checked against the float64 reference first.

Times are taken side by side in one process, interleaved (round r runs every provider once), and
reported as medians with the ratios to eager and to compiled; peak memory per provider is read in
a fresh process each (CPU: growth of the resident set's high-water mark; CUDA:
max_memory_allocated). CPU target (issue 11): fused <= 0.8x compiled's time and <= 1/10 of its peak
memory at B = 256, M = 2e5, D = 128, float32.

    python benchmarks/bench_margin_ce.py [--device cpu] [--B 256] [--M 2e5] [--D 128] [--out DIR]
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from common import device_name, make_row, write_rows
from measure import PeakMemory, time_fn

PROVIDERS = ("eager", "compiled", "fused", "cce")
SCALE, MARGIN = 64.0, 0.4


def inputs(B, M, D, dtype, device, grad_w, seed=0):
    """x [B, D], W [M, D] (requires grad per grad_w), labels [B] in [0, M), col ids arange(M)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    W = torch.randn(M, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad_w)
    y = torch.randint(M, (B,), generator=g).to(device)
    return x, W, y, torch.arange(M, device=device)


def idiomatic_cosface(x, W, y):
    """A CosFace head as users write it (insightface's CombinedMarginLoss with m3, on an FC layer):
    the B x M cosine matrix, the margin subtracted on each row's target, then cross-entropy."""
    cos = F.linear(F.normalize(x), F.normalize(W))
    cos = cos.scatter_add(1, y[:, None], cos.new_full((y.shape[0], 1), -MARGIN))
    return F.cross_entropy(SCALE * cos.float(), y)


def loss_fn(provider, device):
    """(x, W, y, col) -> loss for a provider."""
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, W, y, col: linear_cross_entropy(x, W, y)
    if provider == "fused":
        from protomem.functional import margin_cross_entropy

        # labels are the column ids, so each row's target column is its label
        return lambda x, W, y, col: margin_cross_entropy(x, W, y, col, scale=SCALE, m3=MARGIN,
                                                         target_index=y, check_targets=False)
    fn = torch.compile(idiomatic_cosface) if provider == "compiled" else idiomatic_cosface
    return lambda x, W, y, col: fn(x, W, y)


def check(fn, x, W, y, col, provider):
    from protomem.reference import margin_cross_entropy_ref

    want = margin_cross_entropy_ref(x.detach().double(), W.detach().double(), y, col, scale=SCALE,
                                    m3=MARGIN)[0]
    got = fn(x, W, y, col).detach()
    tol = 1e-4 if x.dtype == torch.float32 else 5e-2
    if not abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want))):
        raise SystemExit(f"{provider}: loss {float(got)} != reference {float(want)}")


def stepper(provider, x, W, y, col):
    fn = loss_fn(provider, x.device)

    def step():
        x.grad = W.grad = None
        fn(x, W, y, col).backward()

    return fn, step


def peak(provider, B, M, D, device, grad_w, dtype):
    """In this (fresh) process: the provider's peak memory (MB) of one step after a warm-up."""
    x, W, y, col = inputs(B, M, D, dtype, device, grad_w)
    fn, step = stepper(provider, x, W, y, col)
    step()  # compile / autotune outside the reading
    with PeakMemory(device) as pk:
        step()
    return pk.mb


def times(providers, B, M, D, device, grad_w, dtype, rounds, min_run_time):
    """Seconds per step of each provider, interleaved over ``rounds``: {provider: [medians]}."""
    x, W, y, col = inputs(B, M, D, dtype, device, grad_w)
    steps = {}
    for p in providers:
        fn, steps[p] = stepper(p, x, W, y, col)
        steps[p]()  # warm-up: compile, autotune
        if p != "cce":
            check(fn, x, W, y, col, p)
    out = {p: [] for p in providers}
    for _ in range(rounds):
        for p in providers:
            out[p].append(time_fn(steps[p], device, min_run_time)[0])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--M", type=float, default=2e5)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--grad-w", action="store_true", help="also the gradient of W (full softmax)")
    p.add_argument("--providers", default=",".join(PROVIDERS[:3]),
                   help="comma-separated subset of " + ",".join(PROVIDERS))
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per provider per round")
    p.add_argument("--out", help="folder for the CSV")
    p.add_argument("--peak-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    M, dtype = int(a.M), getattr(torch, a.dtype)
    if a.peak_worker:
        print(json.dumps({"peak_mb": peak(a.peak_worker, a.B, M, a.D, a.device, a.grad_w, dtype)}))
        return
    wanted = [q.strip() for q in a.providers.split(",") if q.strip()]
    providers = [q for q in wanted if q in PROVIDERS and
                 (q != "cce" or (a.device == "cuda" and importlib.util.find_spec("cut_cross_entropy")))]
    import protomem  # noqa: F401  (the ops)

    name = device_name(a.device)
    print(f"margin_cross_entropy fwd+bwd, CosFace({SCALE:g}, {MARGIN}), B={a.B} M={M} D={a.D} "
          f"{a.dtype}, grad W: {a.grad_w}, on {name}; {a.rounds} interleaved rounds", flush=True)
    peaks = {}
    for q in providers:
        cmd = [sys.executable, __file__, "--peak-worker", q, "--device", a.device, "--B", str(a.B),
               "--M", str(M), "--D", str(a.D), "--dtype", a.dtype] + (["--grad-w"] if a.grad_w else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{q:>9}: peak memory run failed\n{out.stderr[-2000:]}")
            continue
        peaks[q] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    providers = [q for q in providers if q in peaks]
    t = times(providers, a.B, M, a.D, a.device, a.grad_w, dtype, a.rounds, a.min_run_time)
    med = {q: statistics.median(v) for q, v in t.items()}
    for q in providers:
        print(f"{q:>9}: {med[q] * 1e3:9.2f} ms (rounds {', '.join(f'{v * 1e3:.1f}' for v in t[q])})"
              f"   peak {peaks[q]:9.1f} MB", flush=True)
    for base in ("eager", "compiled"):
        if base in med and "fused" in med:
            print(f"fused / {base}: time {med['fused'] / med[base]:.2f}x, peak memory "
                  f"{peaks['fused'] / max(peaks[base], 1e-9):.3f}x")
    if a.out:
        path = os.path.join(a.out, f"margin_ce_{a.device}_{a.dtype}{'_gradw' if a.grad_w else ''}.csv")
        params = dict(B=a.B, M=M, D=a.D, dtype=a.dtype, grad_w=a.grad_w)
        rows = []
        for q in providers:
            ms = sorted(v * 1e3 for v in t[q])
            pick = lambda f: ms[round(f * (len(ms) - 1))]  # noqa: E731
            rows.append(make_row("margin_ce", q, params, "time_fwd_bwd", "ms",
                                 (statistics.median(ms), pick(0.2), pick(0.8)), name))
            rows.append(make_row("margin_ce", q, params, "peak_memory", "MB", peaks[q], name))
        write_rows(path, rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
