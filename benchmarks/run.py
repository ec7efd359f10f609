"""Runs the benchmark suite and collects its rows into one long-format CSV per device.

Order: micro (bench_memory_update.py, bench_margin_ce.py), scale (bench_scale.py), accuracy
(bench_accuracy.py, when that file exists). Each bench runs as its own process with
``--device D --out TMP [--quick]`` and writes CSVs in the common row format (common.py) into TMP.
The rows replace that device's previous rows of the same benches in ``OUT/<device-slug>.csv``;
then ``OUT/<device-slug>-scale.png`` is drawn and, with --update-readme, the README's marked
sections (readme_tables.py) are rewritten from the CSVs in OUT.

    python benchmarks/run.py [--device cpu|cuda] [--only micro,scale,accuracy] [--quick]
                             [--out benchmarks/results] [--update-readme [--readme README.md]]
                             [--no-run] [--timeout S]
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile

from common import device_slug, merge_rows, read_rows, write_rows
from readme_tables import update_readme

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GROUPS = ("micro", "scale", "accuracy")


def commands(group, device, quick):
    """The argv lists (script and arguments, without --out) that a group runs."""
    if group == "micro":
        if quick:
            return [["bench_memory_update.py", "--sizes", "1e3", "--classes", "64", "--dim", "64",
                     "--min-run-time", "0.05"],
                    ["bench_margin_ce.py", "--B", "32", "--M", "2e3", "--D", "32", "--min-run-time", "0.05"],
                    ["bench_mining.py", "--quick"]]
        if device == "cuda":  # the sizes of the issues' GPU targets (H100, bf16, B = 512, D = 512)
            ce = ["bench_margin_ce.py", "--dtype", "bfloat16", "--B", "512", "--D", "512"]
            return [["bench_memory_update.py"], ce + ["--M", "1e6"], ce + ["--M", "1e5", "--grad-w"],
                    ["bench_mining.py"]]
        return [["bench_memory_update.py"], ["bench_margin_ce.py"], ["bench_mining.py"]]
    if group == "scale":
        return [["bench_scale.py"] + (["--quick"] if quick else [])]
    if os.path.exists(os.path.join(HERE, "bench_accuracy.py")):
        return [["bench_accuracy.py"] + (["--quick"] if quick else [])]
    print("accuracy: benchmarks/bench_accuracy.py does not exist yet, skipped")
    return []


def run_group(group, device, quick, timeout):
    """Runs a group's benches; returns (rows, failed command strings)."""
    rows, failed = [], []
    for argv in commands(group, device, quick):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, os.path.join(HERE, argv[0]), *argv[1:], "--device", device, "--out", tmp]
            print(f"== {group}: {' '.join(argv)}", flush=True)
            try:
                code = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = f"timed out after {timeout} s"
            got = [r for path in sorted(glob.glob(os.path.join(tmp, "*.csv"))) for r in read_rows(path)]
            if code:
                failed.append(f"{' '.join(argv)} ({code})")
            rows += got
    return rows, failed


def save(rows, out):
    """Merges rows (one device) into OUT/<slug>.csv and redraws its plot; returns the path."""
    devices = {r["device"] for r in rows}
    if len(devices) != 1:
        raise ValueError(f"rows of several devices in one run: {sorted(devices)}")
    path = os.path.join(out, device_slug(devices.pop()) + ".csv")
    old = read_rows(path) if os.path.exists(path) else []
    write_rows(path, merge_rows(old, rows))
    return path


def draw(csv_path):
    rows = [r for r in read_rows(csv_path) if r["bench"] == "scale"]
    if rows:
        from plots import plot_scale

        png = csv_path[:-4] + "-scale.png"
        plot_scale(rows, png)
        print(f"wrote {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--only", default=",".join(GROUPS), help="groups, comma separated: " + ",".join(GROUPS))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke); default --out build/bench-quick")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's marked tables")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--no-run", action="store_true", help="only redraw plots / README from the CSVs")
    p.add_argument("--timeout", type=float, help="seconds per bench process")
    a = p.parse_args(argv)
    out = a.out or (os.path.join(ROOT, "build", "bench-quick") if a.quick else os.path.join(HERE, "results"))
    groups = [g for g in a.only.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        p.error(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
    failed, paths = [], []
    if not a.no_run:
        if a.device is None:
            import torch

            a.device = "cuda" if torch.cuda.is_available() else "cpu"
        for g in (g for g in GROUPS if g in groups):
            rows, bad = run_group(g, a.device, a.quick, a.timeout)
            failed += bad
            if rows:  # saved group by group: a suite cut short keeps what it measured
                path = save(rows, out)
                paths += [path] if path not in paths else []
                print(f"wrote {path} ({len(rows)} {g} rows)")
    else:
        paths = sorted(glob.glob(os.path.join(out, "cpu-*.csv")) + glob.glob(os.path.join(out, "cuda-*.csv")))
    for path in paths:
        draw(path)
    if a.update_readme:
        missing = update_readme(a.readme, out)
        print(f"updated {a.readme}" + (f"; no results for {', '.join(missing)}" if missing else ""))
    if failed:
        print("FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
