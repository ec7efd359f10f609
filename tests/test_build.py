"""The build: extension info, the CUDA expectation switch, and the not-built error."""
import importlib
import os
import sys

import pytest
import torch

import protomem
from protomem import _loader


def test_build_info_fields():
    info = protomem.build_info()
    assert info["version"] == protomem.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None
    assert isinstance(info["openmp"], bool)


@pytest.mark.skipif(os.environ.get("PROTOMEM_OPENMP", "1") == "0", reason="built with PROTOMEM_OPENMP=0")
def test_cpu_kernels_are_parallel_where_torch_uses_openmp():
    """at::parallel_for is a header that runs in parallel only under _OPENMP: the build must pass
    -fopenmp wherever torch's own backend is OpenMP, or every CPU kernel runs on one thread."""
    info = torch.__config__.parallel_info()
    if "OpenMP" not in info or "OpenMP not found" in info or sys.platform in ("darwin", "win32"):
        pytest.skip("torch's parallel backend is not OpenMP here")
    assert protomem.build_info()["openmp"]


@pytest.mark.skipif(os.environ.get("PROTOMEM_EXPECT_CUDA") != "1", reason="PROTOMEM_EXPECT_CUDA!=1")
def test_build_has_cuda_kernels():
    assert protomem.build_info()["with_cuda"], "PROTOMEM_EXPECT_CUDA=1 but the build has no CUDA kernels"
    for op in ("generate_prototypes", "memory_update_", "lookup", "rebuild_index_", "queue_enqueue_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"protomem::{op}", "CUDA"), op


def test_every_op_has_a_cpu_kernel():
    for op in ("generate_prototypes", "memory_update_", "lookup", "rebuild_index_", "queue_enqueue_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"protomem::{op}", "CPU"), op


def test_missing_extension_names_the_build_command(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _loader.load_extension()


def test_unbuilt_source_tree_shadowing_an_install_says_so(monkeypatch, tmp_path):
    """python run from the repository root after a non-editable install imports the source tree."""
    installed = tmp_path / "site-packages" / "protomem"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(_loader.glob, "glob", lambda pattern: [] if pattern.startswith(
        os.path.dirname(_loader.__file__)) else [p for p in map(str, installed.glob("_C*"))
                                                 if pattern.startswith(str(installed))])
    monkeypatch.setattr(_loader.sys, "path", ["", str(tmp_path / "site-packages")])
    monkeypatch.setattr(importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    with pytest.raises(ImportError, match=f"instead of the installed protomem at {installed}"):
        _loader.load_extension()


def test_force_cuda_without_an_arch_list_or_gpu_is_a_clear_exit(monkeypatch, tmp_path):
    import setup

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("FORCE_ONLY_CPU", raising=False)
    monkeypatch.setattr(setup, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match='TORCH_CUDA_ARCH_LIST="9.0"'):
        setup.want_cuda()


def test_toml_reader_is_a_dependency_before_python_3_11():
    """protomem.training reads TOML configs with tomllib, or tomli before Python 3.11."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("tomli>=") and "python_version<'3.11'" in d.replace(" ", "")
               for d in deps), deps
