"""Devices, dtypes and tolerances shared by the test files."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter; set before anything imports triton kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import protomem  # noqa: E402

WITH_CUDA_BUILD = protomem.build_info()["with_cuda"]
HAS_CUDA = WITH_CUDA_BUILD and torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")],
    ),
]

# Absolute tolerance of a result computed in float32 (float64 for float64 inputs) by two different
# summation orders, by the dtype it is stored in.
STORAGE_ATOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.bfloat16: 8e-3,  # one bfloat16 ulp at magnitude ~1 (a float32 tie can round either way)
    torch.float16: 1e-3,
}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_report_header(config):
    info = protomem.build_info()
    return (f"protomem {info['version']} built against torch {info['torch_version']}, "
            f"with_cuda={info['with_cuda']} (arch {info['cuda_arch_list']}); "
            f"GPU visible: {torch.cuda.is_available()}; "
            f"PROTOMEM_EXPECT_CUDA={os.environ.get('PROTOMEM_EXPECT_CUDA', '0')}")


def random_ids(gen, n, huge=True):
    """n distinct non-negative int64 class ids, a mix of small and huge sparse values."""
    small = torch.randperm(4 * n + 8, generator=gen)[: n // 2]
    big = torch.randint(2**40, 2**62, (n - n // 2,), generator=gen) if huge else small.new_empty(0)
    ids = torch.cat([small, big]).unique()
    while ids.numel() < n:  # collisions between the two draws are astronomically unlikely
        ids = torch.cat([ids, torch.randint(2**40, 2**62, (n - ids.numel(),), generator=gen)]).unique()
    return ids[torch.randperm(n, generator=gen)]
