#!/usr/bin/env bash
# The one-command GPU proof, for a lent GPU machine (no package registry there: the project runs
# from this checkout via PYTHONPATH): build the kernels, run the whole test suite on the GPU,
# compute-sanitizer memcheck and racecheck on a small case of every kernel, and the benchmarks
# (with the full GPU grid). Everything lands in $OUT (default benchmarks/results/gpu/): versions,
# logs, the benchmark JSON and its report. Exit status 1 if any check failed.
#   bash benchmarks/gpu_check.sh                 # all stages
#   bash benchmarks/gpu_check.sh tests bench     # chosen stages (build, tests, sanitizer, bench), e.g.
#                                                # to fit a per-call time limit; the JIT cache
#                                                # (.torch_extensions/) carries over between calls
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitizer bench)
status=0

build() {
  echo "== versions" | tee "$OUT/versions.txt"
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    python -c "import triton; print('triton', triton.__version__)"
    nvcc --version | tail -n 1; } 2>&1 | tee -a "$OUT/versions.txt"

  echo "== build (JIT, timed)"
  python -c "import time, sagan_ext; t = time.time(); print(sagan_ext.available_backends(), f'{time.time() - t:.1f} s')" \
    2>&1 | tee "$OUT/build.txt"
}

tests() {
  echo "== tests on the GPU"
  python -m pytest tests/ -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -n 25 || status=1
}

sanitizer() {
  echo "== compute-sanitizer"
  for tool in memcheck racecheck; do
    if compute-sanitizer --tool "$tool" --error-exitcode 1 python benchmarks/gpu_small_case.py > "$OUT/sanitizer_$tool.txt" 2>&1; then
      echo "$tool: clean"
    else
      echo "$tool: FAILED (see $OUT/sanitizer_$tool.txt)"; status=1
    fi
    tail -n 3 "$OUT/sanitizer_$tool.txt"
  done
}

bench() {
  echo "== benchmarks"
  python -m pytest benchmarks/ --benchmark-only --benchmark-json="$OUT/gpu.json" -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/benchmarks.txt" | tail -n 5 || status=1
  python benchmarks/report.py "$OUT/gpu.json" 2>&1 | tail -n 3 || status=1
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build|tests|sanitizer|bench) "$stage" ;;
    *) echo "unknown stage $stage (build, tests, sanitizer, bench)"; exit 2 ;;
  esac
done
exit $status
