#!/usr/bin/env bash
# On a GPU machine with no internet (torch, nvcc, ninja already installed): build the extension
# with CUDA kernels, run the whole test suite on CUDA, the memory kernels under compute-sanitizer
# (memcheck, racecheck), and the benchmarks; write logs and CSVs to the given folder.
#   bash benchmarks/gpu_suite.sh OUT_DIR
# (So far: the memory kernels and the margin cross-entropy; later issues add their benchmarks.)
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
status=0
run() {  # run NAME CMD...: log to $out/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$out/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $name.log)"; status=1; fi
  tail -n 3 "$out/$name.log"
}
export FORCE_CUDA=1 PROTOMEM_EXPECT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
run build pip install --no-build-isolation --no-deps -e .
run env python -c "import torch, protomem; print(torch.__version__, torch.cuda.get_device_name(), protomem.build_info())"
run tests python -m pytest -q -p no:cacheprovider
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    run "sanitizer_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python -m pytest -q -p no:cacheprovider -k cuda tests/test_memory_update.py tests/test_memory_property.py
  done
else
  echo "compute-sanitizer not found: skipped"
fi
run bench_memory_update python benchmarks/bench_memory_update.py --device cuda --out "$out"
run bench_margin_ce_bf16 python benchmarks/bench_margin_ce.py --device cuda --dtype bfloat16 \
  --B 512 --M 1e6 --D 512 --out "$out"
run bench_margin_ce_bf16_gradw python benchmarks/bench_margin_ce.py --device cuda --dtype bfloat16 \
  --B 512 --M 1e5 --D 512 --grad-w --out "$out"
exit $status
