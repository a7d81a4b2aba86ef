#!/usr/bin/env bash
# The GPU proof in one command, for a lent GPU machine (no package registry there: the project runs
# from this checkout through PYTHONPATH). Stages, in priority order, each writing to $OUT as it ends
# so that a run cut short still returns what it finished:
#   versions   versions, nvidia-smi                                        -> versions.txt
#   build      the JIT kernel build (MAX_JOBS = all cores), timed; the sanitizer program linked
#              with the kernel objects it built                             -> versions.txt
#   sanitizer  compute-sanitizer memcheck, racecheck, initcheck and synccheck on a small case of
#              every CUDA kernel (benchmarks/sanitizer_cases.cu, no torch), then memcheck on the
#              Triton kernels' small cases (the forward's TMA path too); runs beside the tests
#                                                                           -> sanitizer.txt
#   tests      tests/test_gpu.py and tests/test_triton.py on the GPU      -> tests.txt
#   bench      spectral norm, the trainer step, the headline benchmark    -> bench_headline.json
#   grid       the wider grid, with whatever time is left                  -> bench_grid.json
# then their tables (bench.md) and a summary, last. Everything printed is in gpu_check.log: seven
# files in all (a device call brings back at most eight).
#   OUT=dir bash benchmarks/gpu_check.sh [stage ...]     # default: every stage, in the order above
#   GPU_CHECK_BUDGET=400    seconds for the whole run; stages stop at fixed shares of it
# Without a GPU every stage still runs what it can (the rehearsal): the GPU tests and benchmarks
# skip, the sanitizer program is compiled but not run. Exit status 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-400}
PY=${PYTHON:-python3}
PATH="$(dirname "$(command -v "$PY")"):$PATH:/usr/local/cuda/bin"  # ninja beside python; nvcc, compute-sanitizer
export PATH PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
WORK=$(mktemp -d)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
declare -A RESULT

elapsed() { echo $(( $(date +%s) - T0 )); }
until_share() { local t=$(( T0 + BUDGET * $1 / 100 - $(date +%s) )); echo $(( t > 5 ? t : 5 )); }  # seconds to $1% of the budget
stage() { echo; echo "== $1 (t=$(elapsed) s)"; }
has_gpu() { "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
pytest_plugin() { "$PY" -c "import $1" 2>/dev/null; }

versions() {
  stage versions
  { date -u
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$PY" -c "import triton; print('triton', triton.__version__)"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(pytest|pytest-xdist|pytest-timeout|pytest-benchmark|ninja) "
    nvcc --version | tail -n 2
    compute-sanitizer --version | tail -n 1
    echo "cores $(nproc)"; } > "$OUT/versions.txt" 2>&1
  cat "$OUT/versions.txt"
  RESULT[versions]=done
}

build() {
  stage "build (JIT, MAX_JOBS=$MAX_JOBS)"
  # beside the CUDA build: the CPU kernels (the tests' conftest loads them) and the sanitizer
  # program's own object, which needs no torch
  "$PY" -c "from sagan_ext import _build; print('cpu kernels:', _build.load('cpu') or 'built and loaded')" \
    > "$WORK/cpu_build.txt" 2>&1 &
  local cpu_build=$!
  { nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo -Icsrc/cuda -Itests/cuda -c benchmarks/sanitizer_cases.cu \
      -o "$WORK/sanitizer_cases.o" &&
    nvcc -O3 -std=c++17 --use_fast_math -gencode=arch=compute_90,code=sm_90 -lineinfo -Icsrc/cuda -Itests/cuda \
      -c tests/cuda/ptx_selftest.cu -o "$WORK/ptx_selftest.o"; } > "$WORK/sanitizer_build.txt" 2>&1 &
  local sanitizer_build=$!
  timeout "$(until_share 30)" "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/versions.txt"
import time
start = time.time()
from sagan_ext import _build
reason = _build.load("cuda")
print(f"cuda kernels: {reason or 'built and loaded'} ({time.time() - start:.1f} s)")
print("jit folder:", _build.jit_plan("cuda")[1] if reason is None else "-")
EOF
  if grep -q "cuda kernels: built and loaded" "$OUT/versions.txt"; then RESULT[build]=ok
  elif has_gpu; then RESULT[build]=FAILED
  else RESULT[build]="no GPU: the JIT build is not tried; the sanitizer program compiled"; fi
  wait $cpu_build; cat "$WORK/cpu_build.txt" | tee -a "$OUT/versions.txt"
  # the sanitizer program, linked with the objects the JIT build just compiled (or from the sources)
  local objects
  objects=$(ls "$(grep -oP '^jit folder: \K/.*' "$OUT/versions.txt" | tail -n 1)"/*.cuda.o 2>/dev/null || true)
  [ -z "$objects" ] && objects=$(ls csrc/cuda/*.cu)
  wait $sanitizer_build; cat "$WORK/sanitizer_build.txt" | tee -a "$OUT/versions.txt"
  echo "sanitizer program from: $(echo $objects | tr '\n' ' ')" | tee -a "$OUT/versions.txt"
  if timeout "$(until_share 40)" nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -lineinfo -Icsrc/cuda \
       "$WORK/sanitizer_cases.o" "$WORK/ptx_selftest.o" $objects -o "$WORK/sanitizer_cases" 2>&1 | tee -a "$OUT/versions.txt"; then
    [ -x "$WORK/sanitizer_cases" ] && echo "sanitizer program built" || RESULT[build]=FAILED
  else
    RESULT[build]=FAILED
  fi
  echo "build stage ended at t=$(elapsed) s" | tee -a "$OUT/versions.txt"
}

sanitizer() {
  stage sanitizer
  if ! has_gpu || [ ! -x "$WORK/sanitizer_cases" ]; then
    echo "skipped: no GPU or no sanitizer program" | tee "$OUT/sanitizer.txt"; RESULT[sanitizer]=skipped; return
  fi
  local status=ok tool
  : > "$OUT/sanitizer.txt"
  for tool in memcheck racecheck initcheck synccheck; do
    echo "---- $tool (t=$(elapsed) s)" >> "$OUT/sanitizer.txt"
    if timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 99 "$WORK/sanitizer_cases" >> "$OUT/sanitizer.txt" 2>&1; then
      echo "$tool: clean" | tee -a "$OUT/sanitizer.txt"
    else
      echo "$tool: FAILED (exit $?)" | tee -a "$OUT/sanitizer.txt"; status=FAILED
    fi
  done
  echo "---- memcheck, Triton kernels (t=$(elapsed) s)" >> "$OUT/sanitizer.txt"
  if SAGAN_EXT_TRITON_TMA=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 --kernel-name kns=_attention --kernel-name kns=_spectral_norm \
       "$PY" benchmarks/gpu_small_case.py triton >> "$OUT/sanitizer.txt" 2>&1; then
    echo "memcheck (triton): clean" | tee -a "$OUT/sanitizer.txt"
  else
    echo "memcheck (triton): FAILED (exit $?)" | tee -a "$OUT/sanitizer.txt"; status=FAILED
  fi
  RESULT[sanitizer]=$status
}

tests() {
  stage tests
  local args=(tests/test_gpu.py tests/test_triton.py -v -rs --durations=15 -p no:cacheprovider)
  pytest_plugin xdist && args+=(-n 8)
  pytest_plugin pytest_timeout && args+=(--timeout 180)
  if timeout "$(until_share 60)" "$PY" -m pytest "${args[@]}" > "$OUT/tests.txt" 2>&1; then RESULT[tests]=ok; else RESULT[tests]=FAILED; fi
  grep -E "FAILED|ERROR" "$OUT/tests.txt" | head -n 20
  tail -n 3 "$OUT/tests.txt"
}

benchmarks() {  # $1: stage, $2: JSON name, $3: % of the budget before which cases may start, then pytest arguments
  local name=$1 json=$2 share=$3
  shift 3
  # a case starts only before the deadline; the hard limit, 40 s later, ends one that hangs (its JSON is lost then)
  SAGAN_EXT_BENCH_DEADLINE=$(( T0 + BUDGET * share / 100 )) timeout $(( $(until_share "$share") + 40 )) \
    "$PY" -m pytest "$@" --benchmark-only --benchmark-json="$OUT/$json.json" -q -rs -p no:cacheprovider
  local rc=$?  # 5: nothing ran (no GPU)
  if [ $rc -eq 0 ] || [ $rc -eq 5 ]; then RESULT[$name]=ok; else RESULT[$name]="FAILED (exit $rc)"; fi
}

bench() {
  stage "bench: spectral norm, trainer step, headline"
  benchmarks bench bench_headline 88 benchmarks/test_spectral_norm.py benchmarks/test_train_step.py \
    benchmarks/test_attention_gpu.py -k "all_layers or train_step or test_gpu_headline"
}

grid() {
  stage grid
  benchmarks grid bench_grid 95 benchmarks/test_attention_gpu.py -k grid
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(versions build sanitizer tests bench grid)
sanitizer_job=
for s in "${stages[@]}"; do
  case "$s" in
    sanitizer) sanitizer & sanitizer_job=$! ;;  # beside the tests: it needs seconds of the GPU, they need minutes
    versions|build|tests|bench|grid)
      if [ "$s" = bench ] && [ -n "$sanitizer_job" ]; then wait "$sanitizer_job"; sanitizer_job=; fi
      "$s" ;;
    *) echo "unknown stage $s (versions build sanitizer tests bench grid)"; exit 2 ;;
  esac
done
[ -n "$sanitizer_job" ] && wait "$sanitizer_job"
RESULT[sanitizer]=$(grep -qs FAILED "$OUT/sanitizer.txt" && echo FAILED || { grep -qs "skipped" "$OUT/sanitizer.txt" && echo skipped || echo ok; })

stage report
jsons=$(ls "$OUT"/bench_*.json 2>/dev/null)
[ -n "$jsons" ] && "$PY" benchmarks/report.py $jsons --output "$OUT/bench.md" && cat "$OUT/bench.md"
echo
echo "== summary (t=$(elapsed) s of a $BUDGET s budget)"
status=0
for s in "${stages[@]}"; do
  r=${RESULT[$s]:-not run}
  echo "$s: $r"
  case "$r" in FAILED*) status=1 ;; esac
done
grep -hE "^(memcheck|racecheck|initcheck|synccheck).*:" "$OUT/sanitizer.txt" 2>/dev/null
tail -n 1 "$OUT/tests.txt" 2>/dev/null
rm -rf "$WORK"
exit $status
