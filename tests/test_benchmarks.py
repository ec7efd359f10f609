"""The benchmark plumbing (benchmarks/*.py): row format and CSV, README tables between markers,
out-of-memory rows, and a small bench_scale run on the CPU."""
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import bench_scale  # noqa: E402
import common  # noqa: E402
import measure  # noqa: E402
import readme_tables  # noqa: E402
import run as bench_run  # noqa: E402

CPU = "AMD EPYC (2 threads)"


def scale_rows(device=CPU):
    """Hand-made scale rows: PM flat, full softmax linear, then out of memory at C = 1e3."""
    rows = []
    for C, pm, full in ((10, 2.0, 1.0), (100, 2.1, 10.0), (1000, 2.0, None)):
        rows += [common.make_row("scale", "pm", dict(C=C, B=4, D=8, M=64), "time", "ms", (pm, pm - 0.1, pm + 0.1), device),
                 common.make_row("scale", "pm", dict(C=C, B=4, D=8, M=64), "peak_memory", "MB", 5.0, device)]
        if full is None:
            rows += common.oom_rows("scale", "full", dict(C=C, B=4, D=8, need_gb="9.5"),
                                    ("time", "peak_memory"), device)
        else:
            rows += [common.make_row("scale", "full", dict(C=C, B=4, D=8), "time", "ms", full, device),
                     common.make_row("scale", "full", dict(C=C, B=4, D=8), "peak_memory", "MB", full * 3, device)]
    return rows


def test_row_has_the_schema_and_survives_the_csv(tmp_path):
    rows = scale_rows()
    assert all(tuple(r) == common.COLUMNS for r in rows)
    r = rows[0]
    assert (r["params"], r["device"], r["torch"]) == ("C=10;B=4;D=8;M=64", CPU, torch.__version__)
    assert (r["median"], r["p20"], r["p80"]) == (2.0, 1.9, 2.1)
    path = tmp_path / "sub" / "x.csv"
    common.write_rows(path, rows)
    assert path.read_text().splitlines()[0] == ",".join(common.COLUMNS)
    back = common.read_rows(path)
    assert len(back) == len(rows)
    assert [b["params"] for b in back] == [r["params"] for r in rows]
    oom = [b for b in back if common.is_oom(b)]
    assert len(oom) == 2 and all(math.isnan(b["median"]) for b in oom)
    assert common.parse_params(back[0]["params"]) == {"C": "10", "B": "4", "D": "8", "M": "64"}


def test_read_rows_rejects_a_csv_without_the_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("bench,provider\nscale,pm\n")
    with pytest.raises(ValueError, match="missing columns"):
        common.read_rows(path)


def test_merge_replaces_only_the_benches_that_ran():
    old = scale_rows() + [common.make_row("margin_ce", "fused", "B=1", "time", "ms", 3.0, CPU)]
    new = [common.make_row("scale", "pm", "C=5", "time", "ms", 1.0, CPU)]
    merged = common.merge_rows(old, new)
    assert [r["bench"] for r in merged] == ["margin_ce", "scale"]
    assert merged[-1]["params"] == "C=5"


def test_device_name_and_slug():
    name = common.device_name("cpu")
    assert name.endswith(f"({torch.get_num_threads()} threads)")
    assert common.device_slug(CPU) == "cpu-amd-epyc-2-threads"
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "cuda-nvidia-h100-80gb-hbm3"


def test_cpu_peak_memory_counts_blocks_reused_from_the_warm_up():
    """The fused margin CE allocates a [1024, 256] float32 block buffer (1 MiB) per thread on each
    call; after a warm-up call the allocator's arenas hold those blocks, and without returning
    them to the system first the RSS peak of the next call showed 0.0-0.2 MB."""
    if not measure._malloc_trim():
        pytest.skip("no glibc malloc_trim")
    import bench_margin_ce

    assert bench_margin_ce.peak("fused", 256, 20000, 64, "cpu", False, torch.float32) >= 1.0


def test_out_of_memory_is_recognised():
    assert measure.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert measure.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert measure.is_out_of_memory(MemoryError())
    assert not measure.is_out_of_memory(RuntimeError("shape mismatch"))


def test_an_allocation_failure_becomes_oom_rows(monkeypatch):
    real = bench_scale.scale_heads.Step

    def step(head, C, *args):
        if C > 1000:  # the warm-up below 1000 classes still works
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 200.00 GiB")
        return real(head, C, *args)

    monkeypatch.setattr(bench_scale.scale_heads, "Step", step)
    result = bench_scale.measure("full", 10**8, 4, 8, 16, "cpu", 0.01)
    assert result == {"oom": "CUDA out of memory. Tried to allocate 200.00 GiB"}
    rows = bench_scale.rows_of("full", {"C": 10**8}, result, CPU)
    assert [r["metric"] for r in rows] == list(bench_scale.METRICS)
    assert all(r["unit"] == "oom" and math.isnan(r["median"]) for r in rows)
    with pytest.raises(ValueError):  # anything else is an error, not a result
        monkeypatch.setattr(bench_scale.scale_heads, "Step", lambda *a: (_ for _ in ()).throw(ValueError("bug")))
        bench_scale.measure("full", 10, 4, 8, 16, "cpu", 0.01)


def test_scale_table_ratios_and_oom():
    text = readme_tables.table(scale_rows(), "scale")
    lines = text.splitlines()
    assert lines[0].startswith("Time per training step") and CPU in lines[0]
    assert lines[2] == "| head | C = 10 | C = 100 | C = 1e3 | largest / smallest C |"
    assert lines[4] == ("| Prototype Memory (M = 64) | 2.00 ms, 5.00 MB | 2.10 ms, 5.00 MB | 2.00 ms, 5.00 MB "
                        "| time 1.00x, memory 1.00x (C = 10 to 1e3) |")
    assert lines[5] == ("| full softmax | 1.00 ms, 3.00 MB | 10.0 ms, 30.0 MB | OOM (needs ~9.5 GB) "
                        "| time 10.00x, memory 10.00x (C = 10 to 100); OOM from C = 1e3 |")


def test_generic_table_pivots_params_by_provider_and_metric():
    rows = [common.make_row("memory_update", p, dict(M=m, U=64), "time", "us", v, CPU)
            for m in (1000, 10000) for p, v in (("reference", 100.0), ("fused", 12.5))]
    lines = readme_tables.table(rows, "memory_update").splitlines()
    assert lines[2] == "| params | reference time (us) | fused time (us) |"
    assert lines[4] == "| M=1000, U=64 | 100 | 12.5 |"
    assert len(lines) == 6
    assert readme_tables.table(rows, "scale") is None


README = """# title
intro <!-- not a marker -->

<!-- bench:scale:cpu -->
old table
<!-- /bench:scale:cpu -->
between
<!-- bench:memory_update:cpu-amd-epyc-2-threads -->
<!-- /bench:memory_update:cpu-amd-epyc-2-threads -->
<!-- bench:accuracy:cpu -->
keep me
<!-- /bench:accuracy:cpu -->
tail
"""


def test_readme_sections_are_rewritten_between_markers_only(tmp_path):
    results = tmp_path / "results"
    mu = [common.make_row("memory_update", "fused", "M=10;U=2", "time", "us", 7.0, CPU)]
    common.write_rows(results / "cpu-amd-epyc-2-threads.csv", scale_rows() + mu)
    common.write_rows(results / "cpu-old-box-1-threads.csv",  # older: the "cpu" key takes the newest
                      [dict(r, date="2000-01-01", median=99.0) for r in scale_rows("old box (1 threads)")])
    readme = tmp_path / "README.md"
    readme.write_text(README)
    missing = readme_tables.update_readme(readme, results)
    once = readme.read_text()
    assert missing == ["accuracy:cpu"]
    scale = readme_tables.table(scale_rows(), "scale")
    assert f"<!-- bench:scale:cpu -->\n{scale}<!-- /bench:scale:cpu -->\nbetween\n" in once
    assert "old table" not in once and "99" not in once
    assert "| M=10, U=2 | 7.00 |\n<!-- /bench:memory_update:cpu-amd-epyc-2-threads -->" in once
    assert "keep me" in once
    outside = once.split("<!-- bench:scale:cpu -->")[0], once.split("<!-- /bench:accuracy:cpu -->")[1]
    assert outside == (README.split("<!-- bench:scale:cpu -->")[0], "\ntail\n")
    assert readme_tables.update_readme(readme, results) == ["accuracy:cpu"]
    assert readme.read_text() == once  # idempotent


def test_run_no_run_draws_plots_and_updates_the_readme(tmp_path):
    common.write_rows(tmp_path / "cpu-amd-epyc-2-threads.csv", scale_rows())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:scale:cpu -->\n<!-- /bench:scale:cpu -->\n")
    assert bench_run.main(["--no-run", "--out", str(tmp_path), "--update-readme", "--readme", str(readme)]) == 0
    png = tmp_path / "cpu-amd-epyc-2-threads-scale.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| full softmax |" in readme.read_text()


def test_save_keeps_other_benches_of_the_device(tmp_path):
    other = [common.make_row("margin_ce", "fused", "B=1", "time", "ms", 3.0, CPU)]
    common.write_rows(tmp_path / "cpu-amd-epyc-2-threads.csv", other + scale_rows())
    path = bench_run.save([common.make_row("scale", "pm", "C=5;B=1;D=1;M=1", "time", "ms", 1.0, CPU)], tmp_path)
    rows = common.read_rows(path)
    assert [(r["bench"], r["params"]) for r in rows] == [("margin_ce", "B=1"), ("scale", "C=5;B=1;D=1;M=1")]
    with pytest.raises(ValueError, match="several devices"):
        bench_run.save(other + [dict(other[0], device="GPU")], tmp_path)


def test_quick_scale_run_on_cpu(tmp_path, capsys):
    # PM at two class counts, Partial FC at 1e3 and over a tiny RAM budget at 1e4: 4 processes
    a = bench_scale.parse_args(["--device", "cpu", "--quick", "--heads", "pm,pfc",
                                "--ram-budget-gb", "0.002", "--out", str(tmp_path)])
    assert bench_scale.run(a) == 0
    rows = common.read_rows(tmp_path / "scale_cpu.csv")
    assert all(tuple(r) == common.COLUMNS for r in rows)
    assert {r["device"] for r in rows} == {common.device_name("cpu")}
    got = {(r["provider"], common.parse_params(r["params"])["C"], r["metric"]): r for r in rows}
    assert len(got) == len(rows) == 4 * 3
    for key, r in got.items():
        if key[:2] == ("pfc", "10000"):
            assert r["unit"] == "oom" and math.isnan(r["median"])
        else:
            assert r["unit"] in ("ms", "MB") and math.isfinite(r["median"]) and r["median"] >= 0
            assert r["p20"] <= r["median"] <= r["p80"]
    assert got["pm", "1000", "time"]["median"] > 0
    assert got["pm", "1000", "state_memory"]["median"] == got["pm", "10000", "state_memory"]["median"] > 0
    assert "checked against protomem.reference: pm, pfc" in capsys.readouterr().out


def test_quick_margin_ce_run_on_cpu(tmp_path):
    """bench_margin_ce: the idiomatic eager head agrees with the reference, every provider gets a
    time and a peak-memory row with p20 <= median <= p80."""
    import subprocess

    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_margin_ce.py"), "--device", "cpu",
                          "--B", "9", "--M", "300", "--D", "16", "--providers", "eager,fused",
                          "--rounds", "3", "--min-run-time", "0.01", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fused / eager: time" in out.stdout
    rows = common.read_rows(tmp_path / "margin_ce_cpu_float32.csv")
    got = {(r["provider"], r["metric"]): r for r in rows}
    assert set(got) == {(p, m) for p in ("eager", "fused") for m in ("time_fwd_bwd", "peak_memory")}
    for r in rows:
        assert r["p20"] <= r["median"] <= r["p80"] and r["median"] >= 0


def test_idiomatic_cosface_is_the_reference_loss():
    import bench_margin_ce

    from protomem.reference import margin_cross_entropy_ref

    x, W, y, col = bench_margin_ce.inputs(7, 50, 12, torch.float64, "cpu", True)
    want = margin_cross_entropy_ref(x, W, y, col, scale=bench_margin_ce.SCALE, m3=bench_margin_ce.MARGIN)[0]
    torch.testing.assert_close(bench_margin_ce.idiomatic_cosface(x, W, y).double(), want)


def test_quick_mining_runs_on_cpu(tmp_path):
    """bench_mining (step time with and without mining) and mining_recovery (the lists against
    the planted twins) at tiny sizes: the rows and the table they write."""
    import bench_mining
    import mining_recovery

    assert bench_mining.main(["--quick", "--heads", "pm", "--out", str(tmp_path)]) == 0
    rows = common.read_rows(tmp_path / "mining.csv")
    got = {(r["metric"], common.parse_params(r["params"]).get("mining")): r["median"] for r in rows}
    assert got["ms_per_step", "none"] > 0 and got["ms_per_step", "doppelganger"] > 0
    assert got["ratio", None] > 0 and got["lists_update", None] > 0 and got["mined_batch", None] > 0
    out = tmp_path / "recovery.md"
    assert mining_recovery.main(["--runs", "full:0.3:0.3:0.25", "--num-classes", "2000", "--out", str(out)]) == 0
    table = out.read_text().splitlines()
    assert table[0].startswith("| head | epochs | spread | fraction | precision")
    assert table[2].startswith("| full | 0.3 | 0.3 | 0.25 |")
    precision, recall, vote_bound, mean_oracle, sample_oracle = map(float, table[2].strip("| ").split(" | ")[4:9])
    assert all(0.0 <= v <= 1.0 for v in (precision, recall, vote_bound, mean_oracle, sample_oracle))
    assert mean_oracle > 0  # the encoder finds some twins
    assert 0 < recall <= vote_bound  # a listed twin came from a pair that named it
