"""The build: extension info, the CUDA expectation switch, and the not-built error."""
import importlib
import os

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
