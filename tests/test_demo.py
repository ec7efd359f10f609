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
