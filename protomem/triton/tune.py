"""Autotune and time the Triton margin cross-entropy kernels (protomem/triton/cos_lse.py) at one
size; print the configs the autotuner chose (for benchmarks/NOTES.md).

    python -m protomem.triton.tune --B 512 --M 1e6 --D 512 --dtype bfloat16 [--grad-w]
        [--splits auto,1,16,33,66] [--precision default] [--no-autotune] [--peak-tflops 989]

Phases: "norms" (1/|W_j|, one read of W), "forward" (the cos_lse forward kernel and the merge of
its column slices: the per-row log-sum-exp and the grad-x direction), "grad_x" (O(B D) from the
direction) and, with --grad-w, "grad_w" (the backward kernel over W). On a GPU each phase is timed
with triton.testing.do_bench after a first call that autotunes; the TFLOP/s column counts the
ideal dot FLOPs (forward 4BMD: the cosine and P @ W dots; grad_w 4BMD). On a CPU
(TRITON_INTERPRET=1) it runs once, untimed."""
import argparse
import os
import time

import torch


def make_inputs(B, M, D, dtype, device, seed=0):
    """x [B, D], W [M, D] in dtype; row labels [B] in [0, M); col labels arange(M)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(device=device, dtype=dtype)
    W = torch.randn(M, D, generator=g).to(device=device, dtype=dtype)
    return x, W, torch.randint(M, (B,), generator=g).to(device), torch.arange(M, device=device)


def time_ms(fn, device):
    """Milliseconds of fn(): do_bench on a GPU, one call on a CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(B, M, D, dtype, device, grad_w=False, splits=None, precision="default"):
    """{phase: ms} at one split count (None: auto_splits); every phase runs once before timing."""
    from ..ops.cos_lse import grad_x_from_direction
    from . import cos_lse as K

    x, W, row, col = make_inputs(B, M, D, dtype, device)
    s = 64.0
    out = K.cos_lse_fwd_triton(x, W, row, col, s, True, True, precision, splits=splits)
    g = torch.ones_like(out[0])
    phases = {
        "norms": lambda: K.inverse_norms(W, True),
        "forward": lambda: K.cos_lse_fwd_triton(x, W, row, col, s, True, True, precision, splits=splits),
        "grad_x": lambda: grad_x_from_direction(g, x, out[3], s, True),
    }
    if grad_w:
        phases["grad_w"] = lambda: K.cos_lse_bwd_w_triton(g, x, W, row, col, out[0], out[4], s,
                                                         True, True, precision)
    for fn in phases.values():
        fn()
    return {name: time_ms(fn, device) for name, fn in phases.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, kind, default in (("--B", int, 512), ("--M", float, 1e6), ("--D", int, 512)):
        p.add_argument(name, type=kind, default=default)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--precision", default="default", choices=["default", "highest"])
    p.add_argument("--grad-w", action="store_true", help="also time the grad-W kernel")
    p.add_argument("--splits", default="auto", help="comma-separated column-split counts; auto = auto_splits")
    p.add_argument("--no-autotune", action="store_true", help="first configs only (PROTOMEM_TRITON_AUTOTUNE=0)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense tensor-core peak, for the %% column")
    a = p.parse_args(argv)
    if a.no_autotune:
        os.environ["PROTOMEM_TRITON_AUTOTUNE"] = "0"
    if a.device == "cpu":  # before the kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import cos_lse as K

    B, M, D, device = a.B, int(a.M), a.D, torch.device(a.device)
    flops = {"forward": 4.0 * B * M * D, "grad_w": 4.0 * B * M * D}
    for s in a.splits.split(","):
        splits = None if s == "auto" else int(s)
        times = run(B, M, D, getattr(torch, a.dtype), device, a.grad_w, splits, a.precision)
        label = f"splits={s}" + (f" (auto: {K.resolve_splits(None, B, M, device)})" if splits is None else "")
        for phase, ms in times.items():
            extra = ""
            if phase in flops:
                tflops = flops[phase] / ms / 1e9
                extra = f"  {tflops:7.1f} TFLOP/s  {100 * tflops / a.peak_tflops:5.1f}% of peak"
            print(f"{label:>22} {phase:>9}: {ms:9.3f} ms{extra}")
        print(f"{label:>22}     total: {sum(times.values()):9.3f} ms")
    K.print_chosen_configs()


if __name__ == "__main__":
    main()
