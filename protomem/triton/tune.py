"""Autotune and time the Triton margin cross-entropy kernels at one size; print the configs the
autotuner chose (for benchmarks/NOTES.md).

    python -m protomem.triton.tune --B 512 --M 1e6 --D 512 --dtype bfloat16 [--grad-w]
        [--splits auto,1,16,66] [--with-pos] [--no-autotune] [--peak-tflops 989]

On a GPU each phase (forward, backward) is timed with triton.testing.do_bench after the first
call has autotuned it; the TFLOP/s column counts the ideal dot FLOPs (forward 2BMD, backward
2BMD of recompute + 2BMD per gradient). On a CPU (TRITON_INTERPRET=1) it runs once, untimed."""
import argparse
import os
import time

import torch


def make_inputs(B, M, D, dtype, device, with_pos, seed=0):
    """x [B, D], W [M, D] in dtype; row labels [B] each with one target column; col labels [M]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype)
    W = torch.randn(M, D, generator=g).to(device=device, dtype=dtype)
    col = torch.arange(M, device=device)
    row = torch.randint(M, (B,), generator=g).to(device)
    pos = (torch.rand(B, generator=g) * 1.8 - 0.9).to(device) if with_pos else None
    return x, W, row, col, pos


def time_ms(fn, device):
    """Milliseconds of fn(): do_bench on a GPU, one call on a CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(B, M, D, dtype, device, grad_w=False, with_pos=False, splits=None):
    """{phase: ms} for the forward and the backward (grad x, and grad W with grad_w) at one split
    count (None: auto_splits); the first call of each phase autotunes, outside the timing."""
    from . import margin_ce as mc

    x, W, row, col, pos = make_inputs(B, M, D, dtype, device, with_pos)
    args = (64.0, 1.0, 0.0, 0.4, True, True)  # CosFace(64, 0.4), as benchmarks/bench_margin_ce.py
    stats = mc.margin_ce_fwd_triton(x, W, row, col, pos, *args, splits=splits)
    ga, gb = torch.ones_like(stats[0]), -torch.ones_like(stats[1])
    fwd = lambda: mc.margin_ce_fwd_triton(x, W, row, col, pos, *args, splits=splits)  # noqa: E731
    bwd = lambda: mc.margin_ce_bwd_triton(ga, gb, x, W, row, col, pos, stats[0], stats[1], *args,  # noqa: E731
                                          grad_w, splits=splits)
    bwd()
    return {"forward": time_ms(fwd, device), "backward": time_ms(bwd, device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, kind, default in (("--B", int, 512), ("--M", float, 1e6), ("--D", int, 512)):
        p.add_argument(name, type=kind, default=default)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--grad-w", action="store_true", help="the backward also computes grad W")
    p.add_argument("--with-pos", action="store_true", help="given target cosines (DCQ) instead of margins")
    p.add_argument("--splits", default="auto", help="comma-separated column-split counts; auto = auto_splits")
    p.add_argument("--no-autotune", action="store_true", help="first configs only (PROTOMEM_TRITON_AUTOTUNE=0)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense tensor-core peak, for the %% column")
    a = p.parse_args(argv)
    if a.no_autotune:
        os.environ["PROTOMEM_TRITON_AUTOTUNE"] = "0"
    if a.device == "cpu":  # before the kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import margin_ce as mc

    B, M, D, device = a.B, int(a.M), a.D, torch.device(a.device)
    bmd = 2.0 * B * M * D
    flops = {"forward": bmd, "backward": bmd * (3 if a.grad_w else 2)}
    for s in a.splits.split(","):
        splits = None if s == "auto" else int(s)
        times = run(B, M, D, getattr(torch, a.dtype), device, a.grad_w, a.with_pos, splits)
        label = f"splits={s}" + (f" (auto: {mc.resolve_splits(None, B, M, device)})" if splits is None else "")
        for phase, ms in times.items():
            tflops = flops[phase] / ms / 1e9
            print(f"{label:>22} {phase:>9}: {ms:9.3f} ms  {tflops:7.1f} TFLOP/s  "
                  f"{100 * tflops / a.peak_tflops:5.1f}% of peak")
        print(f"{label:>22}     total: {sum(times.values()):9.3f} ms")
    mc.print_chosen_configs()


if __name__ == "__main__":
    main()
