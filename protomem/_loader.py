"""Loads the compiled extension, or explains exactly how to build it."""
import importlib

import torch  # noqa: F401  (loads libtorch, which protomem._C links against)

BUILD_COMMAND = "pip install --no-build-isolation -e ."


def load_extension():
    """Imports ``protomem._C`` (which registers ``torch.ops.protomem``) and returns it.

    Raises:
        ImportError: the extension is not built, or was built against another torch; the message
            names the command that builds it.
    """
    try:
        return importlib.import_module("protomem._C")
    except ImportError as err:
        raise ImportError(
            "protomem's compiled extension protomem._C is not built or failed to load "
            f"({err}). Build it from the repository root with:\n    {BUILD_COMMAND}\n"
            "(or `make build`, which also sets up .venv). Add FORCE_CUDA=1 "
            "TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=/usr/local/cuda to build the CUDA kernels "
            "on a machine without a GPU."
        ) from err
