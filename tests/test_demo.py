"""python -m protomem.demo: finishes without the optional plotting package, saying so up front."""
import json
import sys

from protomem import demo


def test_demo_without_matplotlib_skips_the_plot_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    demo.main(["--out", str(tmp_path), "--heads", "pm", "--num-classes", "2000", "--epochs", "0.05",
               "--eval-every", "0", "--eval-classes", "50", "--quiet"])
    out, err = capsys.readouterr()
    assert err.startswith("protomem-demo: matplotlib is not installed")  # before the training
    assert "wrote" in out and "curves.png" not in out and not (tmp_path / "curves.png").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["pm"]["steps"] > 0 and (tmp_path / "results.md").read_text().startswith("| head")


def test_demo_mining_rows_and_planted_recovery_column(tmp_path, capsys):
    """A HEAD+mining row trains with --mining doppelganger; on planted look-alikes the table has
    the recovery column: a number for the mining run, "-" for the plain one."""
    demo.main(["--out", str(tmp_path), "--heads", "pm,pm+mining", "--num-classes", "2000",
               "--epochs", "0.05", "--eval-every", "0", "--eval-classes", "50", "--quiet",
               "--lookalikes", "0.5"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert "mining" not in results["pm"]
    rec = results["pm+mining"]["mining"]
    assert 0.0 <= rec["precision"] <= 1.0 and rec["found"] > 0
    rows = (tmp_path / "results.md").read_text().splitlines()
    assert rows[0].endswith("planted partner found (precision) |")
    assert rows[2].endswith("| - |") and rows[3].endswith(f"| {rec['precision']:.3f} |")
    assert (tmp_path / "pm-mining" / "log.csv").exists()
    assert "planted look-alike pairs" in capsys.readouterr().out


def test_demo_unknown_head_fails_before_training(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"unknown head 'pm\+minning'"):
        demo.main(["--out", str(tmp_path), "--heads", "pm,pm+minning", "--quiet"])
    assert not (tmp_path / "pm").exists()
