#!/usr/bin/env bash
# On a GPU machine with no internet (torch, nvcc, ninja, triton, matplotlib already installed):
# build the extension with CUDA kernels, run the CUDA and Triton tests (the memory stress test
# included: M = 1e4, U up to M, 1,000 steps against the CPU op), the memory kernels under
# compute-sanitizer (memcheck, initcheck, synccheck), then the benchmark suite (benchmarks/run.py --device
# cuda: micro, scale, accuracy); logs, the device's long-format CSV and the scale PNG go to OUT_DIR.
#   bash benchmarks/gpu_suite.sh OUT_DIR
#
# Everything must fit in 10 minutes (SUITE_BUDGET_S, default 570 s): each step runs under the time
# left, and the benchmarks save their rows group by group, so a run cut short keeps what it
# measured. Estimate on one H100 (not yet measured): build 1.5-2 min (MAX_JOBS=16), CUDA/Triton
# tests 1-1.5 min, sanitizer 1-1.5 min, micro benches 2.5-3.5 min (the margin CE's torch.compile
# provider compiles twice; the forward autotunes over the row and column-tile kernels;
# bench_mining trains two heads with and without mining, ~420 steps each), scale 2-2.5 min (17 processes of ~5 s start-up each; full softmax at
# C = 1e7 about 10 s; C = 1e8 ends at the first allocation), accuracy what is left.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
budget=${SUITE_BUDGET_S:-570}
deadline=$((SECONDS + budget))
status=0
run() {  # run NAME CMD...: log to $out/NAME.log under the time left, remember failures, keep going
  local name=$1; shift
  local left=$((deadline - SECONDS))
  if ((left < 10)); then echo "== $name: skipped, the ${budget} s budget is spent"; status=1; return; fi
  echo "== $name ($left s left): $*"
  local t0=$SECONDS
  if timeout "$left" "$@" > "$out/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"
  else echo "   FAILED or cut off ($((SECONDS - t0)) s, see $name.log)"; status=1; fi
  tail -n 3 "$out/$name.log"
}
export FORCE_CUDA=1 PROTOMEM_EXPECT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
run build pip install --no-build-isolation --no-deps -e .
run env python -c "import torch, protomem; print(torch.__version__, torch.cuda.get_device_name(), protomem.build_info())"
run tests_cuda python -m pytest -q -p no:cacheprovider -m "cuda or triton"
# racecheck inspects shared memory only, which the memory kernels use just for block scans and
# sums; memcheck (out of bounds), initcheck (reads of unwritten memory) and synccheck (barriers)
# cover them. The slow property and stress tests would overrun the budget under the sanitizer.
# memcheck gets float32 and every edge-case test (~80); initcheck and synccheck a smaller set.
if command -v compute-sanitizer > /dev/null; then
  san_files="tests/test_memory_update.py tests/test_memory_index.py tests/test_generate_prototypes.py tests/test_queue_enqueue.py"
  no_profiler="not launches and not one_kernel"
  run sanitizer_memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider -m "cuda and not slow" $san_files \
    -k "(float32 or not (matches_reference or padded_matches)) and $no_profiler"
  for tool in initcheck synccheck; do
    run "sanitizer_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python -m pytest -q -p no:cacheprovider -m "cuda and not slow" $san_files \
      -k "(64-33-torch.float32 or 64-129-1 or index or wrapped or debug or commit or failed) and $no_profiler"
  done
else
  echo "compute-sanitizer not found: skipped"
fi
# The static sm_90a report of the Triton kernels (registers, spills, SASS per logit), kept next to
# the measured times so the model in benchmarks/NOTES.md can be checked against them.
run static_report python -m protomem.triton.inspect --B 512 --M 1e6 --D 512 --dtype bfloat16 \
  --json "$out/static_report.json"
# One process per bench; one bench may take at most 4 minutes.
run bench python benchmarks/run.py --device cuda --out "$out" --timeout 240
echo "suite: $SECONDS s of ${budget} s"
exit $status
