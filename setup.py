"""Builds protomem._C from csrc/: C++ kernels always, CUDA kernels when CUDA is wanted.

CUDA is wanted when FORCE_CUDA=1, a GPU is visible, or TORCH_CUDA_ARCH_LIST is set;
FORCE_ONLY_CPU=1 turns it off. Sources are found by the globs in SOURCE_GLOBS, which
CMakeLists.txt reads too, so there is one list for both builds.

The C++ kernels are compiled with OpenMP when torch's own parallel backend is OpenMP (as in the
Linux wheels): ATen's ``at::parallel_for`` is a header that only runs in parallel under
``_OPENMP``, so without the flag every CPU kernel of this extension would run on one thread.
PROTOMEM_OPENMP=0 builds without it.
"""
import glob
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCE_GLOBS = {"cpp": ["csrc/*.cpp", "csrc/cpu/*.cpp"], "cuda": ["csrc/cuda/*.cu"]}


def _default_cuda_home():
    # The nvcc on PATH may be a shim outside the toolkit (torch would then guess its parent and
    # fail to link), so prefer the standard toolkit location when CUDA_HOME is not set.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


_default_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if _env_flag("FORCE_ONLY_CPU"):
        return False
    wanted = _env_flag("FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    wanted = wanted or torch.cuda.is_available()
    if not wanted:
        return False
    if torch.version.cuda is None:
        sys.exit(
            "protomem: CUDA kernels were requested (FORCE_CUDA / TORCH_CUDA_ARCH_LIST / a visible GPU) "
            f"but the installed torch {torch.__version__} is a CPU-only build. Install a CUDA build of "
            "torch, or build without CUDA: FORCE_ONLY_CPU=1 pip install --no-build-isolation -e ."
        )
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        sys.exit(
            "protomem: CUDA kernels were requested but no CUDA toolkit (nvcc) was found "
            f"(CUDA_HOME={CUDA_HOME!r}). Set CUDA_HOME to the toolkit root, e.g. "
            "CUDA_HOME=/usr/local/cuda, or build without CUDA: FORCE_ONLY_CPU=1 pip install "
            "--no-build-isolation -e ."
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch would otherwise look for the GPUs to compile for and fail with an IndexError
        sys.exit(
            "protomem: CUDA kernels were requested (FORCE_CUDA=1) but no GPU is visible to choose the "
            "architectures from. Name them: TORCH_CUDA_ARCH_LIST=\"9.0\" (H100; 8.0 for A100, 8.6 for "
            "RTX 30xx, 8.9 for L4/RTX 40xx; several as \"8.0;9.0\"), or build without CUDA: FORCE_ONLY_CPU=1"
        )
    return True


def openmp_flags():
    """The compile flags for OpenMP, [] unless torch's parallel backend is OpenMP on a compiler
    that takes -fopenmp (not macOS's clang) and PROTOMEM_OPENMP is not 0."""
    if os.environ.get("PROTOMEM_OPENMP", "1").lower() in ("0", "false", "no", "off"):
        return []
    info = torch.__config__.parallel_info()
    if "OpenMP" not in info or "OpenMP not found" in info or sys.platform in ("darwin", "win32"):
        return []
    return ["-fopenmp"]


def sources(kind):
    return sorted(f for g in SOURCE_GLOBS[kind] for f in glob.glob(os.path.join(ROOT, g)))


def version():
    text = open(os.path.join(ROOT, "protomem", "_version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def extension():
    with_cuda = want_cuda()
    srcs = [os.path.relpath(f, ROOT) for f in sources("cpp") + (sources("cuda") if with_cuda else [])]
    macros = [("PROTOMEM_VERSION", f'"{version()}"')]
    omp = openmp_flags()
    cxx = ["-O3"] + omp
    extra = {"cxx": cxx}
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs")
        macros += [("WITH_CUDA", None), ("PROTOMEM_CUDA_ARCH_LIST", f'"{arch}"')]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension("protomem._C", srcs, define_macros=macros, extra_compile_args=extra,
                             extra_link_args=omp)
    return CppExtension("protomem._C", srcs, define_macros=macros, extra_compile_args=extra,
                        extra_link_args=omp)


class Build(BuildExtension):
    """Keeps object files in build/temp, also under pip's editable builds (which would otherwise
    use a fresh temporary folder), so that ninja rebuilds only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--list-sources"]:  # for CMakeLists.txt: one source list for both builds
        print(";".join(sources(sys.argv[2])), end="")
        sys.exit(0)
    if sys.argv[1:2] == ["--version"]:
        print(version(), end="")
        sys.exit(0)
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)},
    )
