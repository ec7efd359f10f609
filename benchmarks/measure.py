"""How the benchmarks measure: time per call, peak memory, out-of-memory, checks, workers.

Time: ``triton.testing.do_bench`` (CUDA events when Triton is missing) on GPU,
``torch.utils.benchmark`` on CPU. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on
CPU the growth of the resident set's high-water mark, reset at the start through
``/proc/self/clear_refs`` (Linux), else the growth of ``ru_maxrss``, which only ever grows: run
each provider in its own process (``run_worker``) for a clean reading.
"""
import ctypes
import ctypes.util
import json
import re
import resource
import subprocess

import torch


class CheckError(AssertionError):
    """A provider disagrees with the reference: it must not be timed."""


def check_close(what, got, want, rtol=1e-4, atol=1e-5):
    """Raises CheckError unless tensors ``got`` and ``want`` are allclose (float64 comparison)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
        diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
        raise CheckError(f"{what}: disagrees with the reference (max abs diff {diff})")


def _quantiles(times):
    ts = sorted(times)
    q = lambda f: ts[round(f * (len(ts) - 1))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def time_fn(fn, device, min_run_time=0.5):
    """Seconds per call of ``fn()``: (median, p20, p80). Run ``fn`` once before (warm-up)."""
    if str(device).startswith("cuda"):
        try:
            import triton.testing
        except ImportError:
            return _time_cuda_events(fn, min_run_time)
        ms = triton.testing.do_bench(fn, rep=int(min_run_time * 1e3), quantiles=[0.5, 0.2, 0.8],
                                     return_mode="median")
        return tuple(t / 1e3 for t in ms)
    import torch.utils.benchmark as tbench

    # Timer runs stmt with a thread pool of 1 unless told otherwise: time with the threads the
    # device row names (torch.get_num_threads())
    m = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                     ).blocked_autorange(min_run_time=min_run_time)
    return (m.median,) + _quantiles(m.times)[1:]


def _time_cuda_events(fn, min_run_time):
    times, total = [], 0.0
    while total < min_run_time or len(times) < 5:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        total += times[-1]
    return _quantiles(times)


def _proc_status_kb(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def _malloc_trim():
    """Returns the free memory of every glibc malloc arena to the system (best effort), so that a
    block freed before a measurement and reused during it counts as new resident memory."""
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0))
    except (OSError, AttributeError, TypeError):
        return False


def _mmap_threshold(nbytes):
    """Sets glibc malloc's M_MMAP_THRESHOLD (best effort; False where there is no glibc)."""
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, int(nbytes)))
    except (OSError, AttributeError, TypeError):
        return False


class PeakMemory:
    """``with PeakMemory(device) as pk: ...`` then ``pk.mb``: the peak memory beyond what was in
    use on entering (MiB). CUDA: allocated by torch's caching allocator; CPU: resident set."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.mb = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        # glibc moves its mmap threshold up as blocks are freed, so that freed blocks stay in the
        # heap, resident, and the RSS peak depends on history: while measuring, every block from
        # 64 KiB up is mapped on its own and returned to the system when freed.
        _mmap_threshold(64 << 10)
        # the worker threads' arenas keep the blocks of the warm-up: without a trim they are
        # reused in place and a kernel's per-thread buffers would not show
        _malloc_trim()
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base, self.hwm = _proc_status_kb("VmRSS") * 1024, True
        except OSError:
            self.base, self.hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
        return self

    def read(self):
        """Peak so far, MiB."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.hwm:
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base) / 2**20

    def __exit__(self, *exc):
        if exc[0] is None:
            self.mb = self.read()
        if not self.cuda:  # glibc's largest dynamic threshold: fast reuse again while timing
            _mmap_threshold(32 << 20)
        return False


def is_out_of_memory(exc):
    """Whether an exception is an allocation failure (CUDA OOM, or the CPU allocator's)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def run_worker(cmd, timeout=None):
    """Runs a worker process that prints a JSON object as its last stdout line.

    Returns that object; ``{"oom": reason}`` when the process was killed (SIGKILL: the kernel's
    out-of-memory killer); ``{"error": text}`` on any other failure or timeout."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if out.returncode == -9:
        return {"oom": "killed (SIGKILL), most likely by the out-of-memory killer"}
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        return {"error": f"exit status {out.returncode}\n{out.stderr[-3000:]}"}
    return json.loads(lines[-1])
