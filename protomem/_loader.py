"""Loads the compiled extension, or explains exactly how to build it."""
import glob
import importlib
import os
import sys

import torch  # noqa: F401  (loads libtorch, which protomem._C links against)

BUILD_COMMAND = "pip install --no-build-isolation -e ."


def shadowed_install():
    """The folder of a built protomem elsewhere on ``sys.path`` when this one is an unbuilt source
    tree that shadows it (python run from the repository root after a non-editable install),
    else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    if glob.glob(os.path.join(here, "_C*")) or not os.path.exists(os.path.join(here, "..", "setup.py")):
        return None
    for entry in sys.path:
        other = os.path.abspath(os.path.join(entry or os.getcwd(), "protomem"))
        if other != here and glob.glob(os.path.join(other, "_C*")):
            return other
    return None


def load_extension():
    """Imports ``protomem._C`` (which registers ``torch.ops.protomem``) and returns it.

    Raises:
        ImportError: the extension is not built, or was built against another torch, or an
            unbuilt source tree shadows an installed protomem; the message says what to do.
    """
    try:
        return importlib.import_module("protomem._C")
    except ImportError as err:
        installed = shadowed_install()
        if installed is not None:
            raise ImportError(
                f"this `import protomem` found the source tree {os.path.dirname(os.path.dirname(__file__))} "
                f"(the current folder comes first on sys.path), which is not built, instead of the "
                f"installed protomem at {installed}. Run from another folder, or build the source "
                f"tree in place with:\n    {BUILD_COMMAND}"
            ) from err
        raise ImportError(
            "protomem's compiled extension protomem._C is not built or failed to load "
            f"({err}). Build it from the repository root with:\n    {BUILD_COMMAND}\n"
            "(or `make build`, which also sets up .venv). Add FORCE_CUDA=1 "
            "TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=/usr/local/cuda to build the CUDA kernels "
            "on a machine without a GPU."
        ) from err
