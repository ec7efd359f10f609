# Two commands set everything up on a fresh machine:
#   make test   .venv + torch + build tools, build protomem._C (CUDA kernels whenever a CUDA
#               toolkit is found), run the whole test suite
#   make demo   the same set-up, then the main job: four heads trained on synthetic identities
# Both are idempotent: nothing is reinstalled or recompiled unless its inputs changed.

VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.14.1
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
PYTEST_ARGS ?=

# CUDA: use the toolkit at CUDA_HOME (default /usr/local/cuda) when it has nvcc, unless
# FORCE_ONLY_CPU=1. Without a GPU, the kernels are built for TORCH_CUDA_ARCH_LIST (default 9.0).
CUDA_HOME ?= /usr/local/cuda
ifeq ($(FORCE_ONLY_CPU),1)
  BUILD_ENV := FORCE_ONLY_CPU=1
else ifneq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
  TORCH_CUDA_ARCH_LIST ?= 9.0
  BUILD_ENV := FORCE_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)"
else
  BUILD_ENV := FORCE_ONLY_CPU=1
endif

SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cuh csrc/cuda/*.cu) setup.py
BUILT   := $(VENV)/.protomem-built

.PHONY: setup build test demo bench cmake-check clean

setup: $(VENV)/.deps

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" numpy pytest ninja setuptools wheel \
	  Pillow tqdm matplotlib pytorch-metric-learning onnx onnxruntime onnxscript
	touch $@

build: $(BUILT)

$(BUILT): $(VENV)/.deps $(SOURCES)
	$(BUILD_ENV) MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation --no-deps -e . \
	  || { echo "protomem: the build failed (see above)"; exit 1; }
	touch $@

test: $(BUILT)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(BUILT)
	$(PY) -m protomem.demo --out demo_out

bench: $(BUILT)
	$(PY) benchmarks/run.py --update-readme

# The CMake build of the same sources (CPU-only), with compile_commands.json. A CUDA build of
# torch makes find_package(Torch) look for the toolkit even then: point it at CUDA_HOME, skip its
# GPU probe with an explicit arch list, and lend it nvrtc from the pip CUDA wheels when the
# toolkit has none.
NVRTC := $(firstword $(wildcard $(CUDA_HOME)/lib64/libnvrtc.so $(VENV)/lib/python3*/site-packages/nvidia/cu*/lib/libnvrtc.so.*))
cmake-check: $(VENV)/.deps
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" cmake -S . -B build/cmake -G Ninja -DWITH_CUDA=OFF \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) \
	  $(if $(NVRTC),-DCUDA_nvrtc_LIBRARY=$(abspath $(NVRTC))) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j $${MAX_JOBS:-2}
	$(PY) -c "import glob, importlib.util as u; p = glob.glob('build/cmake/_C*.so')[0]; \
	  m = u.module_from_spec(u.spec_from_file_location('protomem._C', p)); \
	  u.spec_from_file_location('protomem._C', p).loader.exec_module(m); print('cmake build:', p, m.build_info())"

clean:
	rm -rf build protomem/_C*.so $(BUILT)
