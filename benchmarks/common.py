"""The benchmarks' one result format: long-format rows, one CSV per device.

Every row is one measurement: ``bench, provider, params, metric, unit, median, p20, p80, device,
torch, protomem, date``. ``params`` is a compact ``k=v;k=v`` string; an out-of-memory measurement
is a row with unit ``"oom"`` and NaN values. ``benchmarks/results/<device-slug>.csv`` holds all
rows of one device (``device_slug``).
"""
import csv
import datetime
import math
import os
import platform
import re

COLUMNS = ("bench", "provider", "params", "metric", "unit", "median", "p20", "p80",
           "device", "torch", "protomem", "date")
VALUES = ("median", "p20", "p80")
OOM = "oom"


def format_params(params):
    """dict -> "k=v;k=v" (insertion order); a string is returned unchanged."""
    if isinstance(params, str):
        return params
    return ";".join(f"{k}={v}" for k, v in params.items())


def parse_params(text):
    """"k=v;k=v" -> dict of str -> str (values left as strings)."""
    return dict(part.split("=", 1) for part in text.split(";") if part)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    """Human-readable device of a run: the GPU's name, or the CPU model and torch's thread count.

    Args:
        device: "cpu" or "cuda" (initialises CUDA when "cuda").
    """
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(name):
    """File-name key of a device name: "cuda-nvidia-h100-80gb-hbm3", "cpu-amd-epyc-2-threads".

    A CPU name is recognised by its "(N threads)" suffix (as ``device_name`` writes it)."""
    kind = "cpu" if re.search(r"\(\d+ threads\)$", name) else "cuda"
    return f"{kind}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_row(bench, provider, params, metric, unit, values, device):
    """One result row.

    Args:
        bench, provider, metric, unit: str.
        params: dict or "k=v;k=v" string.
        values: (median, p20, p80) numbers, or one number for all three.
        device: ``device_name(...)``.
    """
    import torch

    import protomem

    if not isinstance(values, (tuple, list)):
        values = (values, values, values)
    return dict(bench=bench, provider=provider, params=format_params(params), metric=metric,
                unit=unit, median=float(values[0]), p20=float(values[1]), p80=float(values[2]),
                device=device, torch=torch.__version__, protomem=protomem.__version__,
                date=datetime.date.today().isoformat())


def oom_rows(bench, provider, params, metrics, device):
    """Rows saying that a measurement ran out of memory: one per metric, unit "oom", NaN values."""
    return [make_row(bench, provider, params, m, OOM, math.nan, device) for m in metrics]


def is_oom(row):
    return row["unit"] == OOM


def write_rows(path, rows):
    """Writes rows (dicts with ``COLUMNS``) as a CSV with a header, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_rows(path):
    """Rows of a CSV written by ``write_rows`` (any column order); values as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        missing = [c for c in COLUMNS if c not in r]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        for c in VALUES:
            r[c] = float(r[c])
    return rows


def merge_rows(old, new):
    """``old`` without the benches that ``new`` has, then ``new``: a re-run replaces a bench's rows."""
    replaced = {r["bench"] for r in new}
    return [r for r in old if r["bench"] not in replaced] + list(new)
