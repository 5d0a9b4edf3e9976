#!/usr/bin/env bash
# fusedjd on a GPU machine (H100/H200, no network) in one call of at most 10 minutes: builds the
# CUDA kernels for sm_90, runs the CUDA tests, compute-sanitizer and the GPU checks, then the GPU
# benchmark. Every step is capped in time, so that the whole ends within FUSEDJD_GPU_BUDGET
# seconds (default 540), and each step's output is kept even when its cap cuts it.
#
#   bash scripts/gpu_wheels.sh          # first, where the package registry is reachable: .whl/
#   bash scripts/gpu_run.sh             # on the GPU machine, with .whl/ sent along; results in $OUT
#   bash scripts/gpu_run.sh --dry-run   # anywhere, CI included: every step that needs no GPU
#
# The GPU machine has torch, pytest and nvcc, but not torchjd, qpsolvers nor quadprog (torchjd's
# UPGrad, used by the tests and the benchmark, needs the last two): scripts/gpu_wheels.sh puts
# their wheels for CPython 3.12 into .whl/ (git-ignored: it has to travel with the working tree
# explicitly), and this script installs them into /tmp/site (PYTHONPATH).
#
# Steps (times expected on an H200 machine with 16 cores):
#   1. environment: GPU, toolchain (CUDA_HOME found from the real nvcc, also behind a wrapper
#      script), packages; the wheels into /tmp/site                                    ~15 s
#   2. build: setup.py build_ext --inplace, FUSEDJD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) (CPU level: default);
#      registers, stack and shared memory of every kernel (cuobjdump --dump-resource-usage)  ~60-90 s
#   3. in parallel, each capped (2-3 min):
#      - pytest, the CUDA cases only (-k cuda, not -x; the emulated-CUDA tests are for machines
#        without a GPU); pytest-xdist workers and a per-test timeout when those plugins are there
#      - compute-sanitizer memcheck, racecheck, synccheck and initcheck, one process each, on
#        scripts/gpu/smoke.py, with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (one allocation per tensor,
#        so that memcheck sees small overruns)
#      - scripts/gpu/checks.py: CUDA-graph capture and replay against eager, the visit orders
#        drawn on the device, host synchronisation, kernel launches per step
#   4. scripts/gpu/checks.py --timing: eager call against graph replay (alone)         ~15 s
#   5. the benchmark, bench/run.py --device cuda (alone; each table written as it ends)  ~4 min
#
# What comes back ($OUT, 8 files): summary.txt (one page: what ran, what failed, the figures'
# headlines), build.log, tests.log, sanitizer.log, graph.log, bench.log, cuda.md (the benchmark's
# tables), cuda.png (its plot). stdout ends with summary.txt. Exit status 0 when every step passed.
#
# Settings: FUSEDJD_GPU_BUDGET (seconds for the whole, 540), FUSEDJD_BENCH_S (the benchmark's
# budget, 240), FUSEDJD_TEST_WORKERS (pytest-xdist workers, 4; 0 for none), FUSEDJD_GPU_SKIP_BUILD=1
# (use the extension already built in place), TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON (python3).
# The dry run: FUSEDJD_DRY_REUSE_BUILD=1 uses the extension built in place instead of building a
# copy of the tree; it needs the package registry for the wheels.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
T0=$SECONDS
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT_FILES="summary.txt build.log tests.log sanitizer.log graph.log bench.log cuda.md cuda.png"

left() { echo $((BUDGET - (SECONDS - T0))); }
say() { echo "$*" | tee -a "$SUM"; }
stamp() { say "[$(printf '%4d' $((SECONDS - T0)))s] $*"; }
cap() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
atleast() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# The limits on what a GPU run returns from $OUT: at most 8 files, 16 MiB each, no deeper than two
# folders, named with letters, digits, '.', '_' and '-'. Prints what breaks a rule; status 1 then.
check_out() {
  local dir=$1 bad=0 n f rel
  n=$(find "$dir" -type f | wc -l)
  if [ "$n" -gt 8 ]; then echo "\$OUT holds $n files (at most 8 come back)"; bad=1; fi
  while IFS= read -r f; do
    rel=${f#"$dir"/}
    if [[ ! "$rel" =~ ^[A-Za-z0-9._/-]+$ ]]; then echo "\$OUT/$rel: a name that does not come back"; bad=1; fi
    if [ "$(echo "$rel" | tr -cd '/' | wc -c)" -gt 2 ]; then echo "\$OUT/$rel: deeper than two folders"; bad=1; fi
    if [ "$(stat -c %s "$f")" -gt $((16 * 1024 * 1024)) ]; then echo "\$OUT/$rel: over 16 MiB"; bad=1; fi
  done < <(find "$dir" -type f)
  if find "$dir" -mindepth 1 ! -type f ! -type d | grep -q .; then echo "\$OUT holds links or special files"; bad=1; fi
  return $bad
}

# The CUDA toolkit folder (bin/nvcc, include/cuda_runtime.h): CUDA_HOME when it is one; else the
# folder of the real nvcc (through links, and through a wrapper script that names it), the usual
# places, and the toolkits pip installs under nvidia/; the first with libcudart wins.
find_cuda_home() {
  local c real cands=() ok=()
  is_toolkit() { [ -n "$1" ] && [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
  if [ -n "${CUDA_HOME:-}" ] && is_toolkit "$CUDA_HOME"; then echo "$CUDA_HOME"; return; fi
  if real=$(readlink -f "$(command -v nvcc 2>/dev/null)" 2>/dev/null) && [ -n "$real" ]; then
    cands+=("${real%/bin/nvcc}")
    if [ "$(head -c 2 "$real" 2>/dev/null)" = "#!" ]; then
      while IFS= read -r c; do cands+=("${c%/bin/nvcc}"); done < <(grep -oE '/[A-Za-z0-9._+/-]*/bin/nvcc' "$real" | sort -u)
    fi
  fi
  cands+=(/usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 /opt/cuda)
  while IFS= read -r c; do cands+=("$c"); done < <(ls -d /usr/local/cuda-* 2>/dev/null)
  while IFS= read -r c; do cands+=("$c"); done < <("$PY" -c "
import os
try:
    import nvidia
    for p in nvidia.__path__:
        for d in sorted(os.listdir(p)):
            print(os.path.join(p, d))
except Exception:
    pass" 2>/dev/null)
  for c in "${cands[@]}"; do is_toolkit "$c" && ok+=("$c"); done
  for c in "${ok[@]}"; do
    if ls "$c"/lib64/libcudart.so* "$c"/lib/libcudart.so* >/dev/null 2>&1; then echo "$c"; return; fi
  done
  [ ${#ok[@]} -gt 0 ] && echo "${ok[0]}"
}

# The digest of cuobjdump --dump-resource-usage (in $1): kernels, registers, stack, local, shared.
resource_digest() {
  awk '
    /REG:/ {
      k++
      for (i = 1; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] + 0 }
      if (v["REG"] > reg) reg = v["REG"]; if (v["REG"] >= 200) big++
      if (v["STACK"] > 0) { st++; if (v["STACK"] > stmax) stmax = v["STACK"] }
      if (v["LOCAL"] > 0) lo++
      if (v["SHARED"] > sh) sh = v["SHARED"]
    }
    END { printf "%d kernels; registers max %d (%d kernels at 200 or more); stack > 0 in %d (max %d B); local memory in %d; static shared max %d B\n", k, reg, big, st, stmax, lo, sh }
  ' "$1"
}

# ================================================================================================
# The dry run: what needs no GPU, on this machine (CI included).
# ================================================================================================
dry_run() {
  local DRY OUT SRC fails=0 n
  DRY=$(mktemp -d /tmp/fusedjd-dry.XXXXXX)
  # shellcheck disable=SC2064  # (expanded now: DRY is local)
  [ "${FUSEDJD_DRY_KEEP:-0}" = 1 ] || trap "rm -rf '$DRY'" EXIT  # FUSEDJD_DRY_KEEP=1 keeps it
  OUT=$DRY/out
  mkdir -p "$OUT"
  SUM=$OUT/summary.txt
  BUDGET=100000
  : >"$SUM"
  step() { stamp "dry run: $*"; }
  ok() { say "   ok: $*"; }
  bad() { say "   FAILED: $*"; fails=$((fails + 1)); }

  step "environment"
  say "   $("$PY" -V 2>&1) at $(command -v "$PY"); $(nproc) cores; $("$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA visible:", torch.cuda.is_available())' 2>&1)"
  if bash -n scripts/gpu_run.sh && bash -n scripts/gpu_wheels.sh; then ok "bash -n scripts/gpu_run.sh scripts/gpu_wheels.sh"; else bad "bash -n"; fi

  step "wheels: scripts/gpu_wheels.sh into a temporary folder, installed as the GPU machine will"
  if bash scripts/gpu_wheels.sh "$DRY/whl" >"$DRY/wheels.log" 2>&1; then
    ok "$(tail -1 "$DRY/wheels.log")"
    if "$PY" scripts/gpu/report.py wheels "$DRY/whl" >"$DRY/wheel-files.log" 2>&1; then
      sed 's/^/   ok: /' "$DRY/wheel-files.log" | tee -a "$SUM"
    else bad "wheel contents: $(tail -2 "$DRY/wheel-files.log")"; fi
    # pip, told it installs for CPython 3.12 on x86-64 manylinux, takes them with --target, as the
    # GPU machine's `pip install --no-index --no-deps --target /tmp/site` will
    if "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --target "$DRY/site" "$DRY"/whl/*.whl >>"$DRY/wheels.log" 2>&1 \
        && ls "$DRY"/site/quadprog*.so >/dev/null 2>&1 && [ -d "$DRY/site/torchjd" ] && [ -d "$DRY/site/qpsolvers" ]; then
      ok "pip install --target (for CPython 3.12): $(cd "$DRY/site" && ls -d torchjd qpsolvers quadprog*.so | tr '\n' ' ')"
    else bad "pip install --target: $(tail -3 "$DRY/wheels.log")"; fi
    # the two pure-Python wheels import here from that folder; quadprog's is built for CPython
    # 3.12 and is checked only as a file (this Python may be another)
    if PYTHONPATH="$DRY/site" "$PY" -c "
import sys, torchjd, qpsolvers
for mod in (torchjd, qpsolvers):
    assert mod.__file__.startswith(sys.argv[1]), mod.__file__
" "$DRY/site" >>"$DRY/wheels.log" 2>&1; then
      ok "torchjd and qpsolvers import from it (quadprog's cp312 extension is not loaded here)"
    else bad "import torchjd, qpsolvers from the --target folder: $(tail -2 "$DRY/wheels.log")"; fi
  else
    bad "scripts/gpu_wheels.sh: $(tail -3 "$DRY/wheels.log")"
  fi

  if [ "${FUSEDJD_DRY_REUSE_BUILD:-0}" = 1 ]; then
    step "build: reusing the extension built in place (FUSEDJD_DRY_REUSE_BUILD=1)"
    SRC=$ROOT
    if ls "$SRC"/python/fusedjd/_C*.so >/dev/null 2>&1; then
      echo "reused: $(ls "$SRC"/python/fusedjd/_C*.so)" >"$OUT/build.log"
      ok "$(ls "$SRC"/python/fusedjd/_C*.so)"
    else bad "no python/fusedjd/_C*.so to reuse"; fi
  else
    step "build: the working tree copied as the GPU machine receives it, FUSEDJD_CUDA=0 FUSEDJD_CPU_LEVELS=default MAX_JOBS=2 setup.py build_ext --inplace"
    SRC=$DRY/src
    mkdir -p "$SRC"
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      # tracked files and untracked ones git does not ignore: what travels to the GPU machine
      git -C "$ROOT" ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && printf '%s\0' "$f"
      done | tar --null -T - -cf - | tar -xf - -C "$SRC"
    else
      tar --exclude=./build --exclude=./.whl --exclude='*.so' --exclude=__pycache__ -cf - . | tar -xf - -C "$SRC"
    fi
    local b0=$SECONDS
    if (cd "$SRC" && FUSEDJD_CUDA=0 FUSEDJD_CPU_LEVELS=default MAX_JOBS=${MAX_JOBS:-2} timeout -k 10 900 "$PY" setup.py build_ext --inplace) \
        >"$OUT/build.log" 2>&1; then
      ok "built in $((SECONDS - b0)) s: $(cd "$SRC" && ls python/fusedjd/_C*.so)"
    else bad "build (the end of build.log):"; tail -30 "$OUT/build.log" | tee -a "$SUM"; fi
  fi
  export PYTHONPATH="$SRC/python${PYTHONPATH:+:$PYTHONPATH}"
  if (cd "$SRC" && "$PY" -c "
import sys, fusedjd
assert fusedjd.__file__.startswith(sys.argv[1]), f'fusedjd imported from {fusedjd.__file__}, not {sys.argv[1]}'
print('   ok: fusedjd from', fusedjd.__file__, fusedjd.build_info())" "$SRC/python") >"$DRY/import.log" 2>&1; then
    tee -a "$SUM" <"$DRY/import.log"
  else bad "import fusedjd from $SRC/python: $(tail -1 "$DRY/import.log")"; fi

  step "tests: the GPU run's selection, collected (pytest --collect-only -k cuda --ignore=tests/test_cuda_emulated.py)"
  (cd "$SRC" && timeout -k 10 300 "$PY" -m pytest --collect-only -q -p no:cacheprovider \
    --ignore=tests/test_cuda_emulated.py -k cuda tests) >"$OUT/tests.log" 2>&1
  n=$(grep -oE '^[0-9]+(/[0-9]+)? tests? collected' "$OUT/tests.log" | grep -oE '^[0-9]+' | head -1)
  if [ "${n:-0}" -gt 0 ] && ! grep -q "test_cuda_emulated" "$OUT/tests.log"; then
    ok "$(grep -E 'collected' "$OUT/tests.log" | tail -1)"
  else bad "collection: $(tail -3 "$OUT/tests.log")"; fi

  step "scripts: py_compile of scripts/gpu/*.py and bench/*.py; the checks' and the smoke's case lists"
  if (cd "$SRC" && PYTHONPYCACHEPREFIX="$DRY/pycache" "$PY" -m py_compile scripts/gpu/*.py bench/*.py) >>"$SUM" 2>&1; then
    ok "py_compile"
  else bad "py_compile"; fi
  if (cd "$SRC" && "$PY" scripts/gpu/checks.py --list) >"$OUT/graph.log" 2>&1; then
    ok "scripts/gpu/checks.py --list: $(grep -c . "$OUT/graph.log") cases"
  else bad "scripts/gpu/checks.py --list: $(tail -2 "$OUT/graph.log")"; fi
  # the sanitizer workload's calls, on the CPU: a wrong call fails here rather than on the GPU
  if (cd "$SRC" && timeout -k 5 120 "$PY" scripts/gpu/smoke.py --cpu) >"$OUT/sanitizer.log" 2>&1; then
    ok "scripts/gpu/smoke.py --cpu: $(tail -1 "$OUT/sanitizer.log")"
  else bad "scripts/gpu/smoke.py --cpu: $(tail -3 "$OUT/sanitizer.log")"; fi

  step "benchmark: the GPU grid's code on the tiny grid, on the CPU (bench/run.py --tiny)"
  if (cd "$SRC" && timeout -k 5 180 "$PY" bench/run.py --tiny --out "$OUT/cuda.md") >"$OUT/bench.log" 2>&1; then
    ok "$(grep -c '^### ' "$OUT/cuda.md") tables in cuda.md, $(grep -c '^| [0-9]' "$OUT/cuda.md") rows"
  else bad "bench/run.py --tiny: $(tail -5 "$OUT/bench.log")"; fi

  step "\$OUT: the files a GPU run returns ($OUT_FILES)"
  for f in $OUT_FILES; do [ -e "$OUT/$f" ] || [ "$f" = cuda.png ] || [ "$f" = summary.txt ] || bad "no $f"; done
  [ -e "$OUT/cuda.png" ] || : >"$OUT/cuda.png"  # (the plot needs matplotlib, which the GPU machine has)
  if check_out "$OUT" >>"$SUM"; then ok "$(find "$OUT" -type f | wc -l) files, within what comes back"; else bad "\$OUT rules (above)"; fi

  if [ "$fails" -gt 0 ]; then
    stamp "dry run: $fails step(s) FAILED"
    return 1
  fi
  stamp "dry run: done"
  echo "[fusedjd] gpu_run dry run OK"
}

if [ "${1:-}" = "--dry-run" ]; then
  dry_run
  exit $?
fi

# ================================================================================================
# The GPU run.
# ================================================================================================
OUT=${OUT:-/tmp/fusedjd-gpu}
WORK=/tmp/fusedjd-work
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
BUDGET=${FUSEDJD_GPU_BUDGET:-540}
BENCH_S=${FUSEDJD_BENCH_S:-240}
SUM="$OUT/summary.txt"
: >"$SUM"
FAILED=()

# ---- 1. environment -----------------------------------------------------------------------------
stamp "1. environment"
PYBIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
export PATH="$PYBIN:$PATH"  # the environment's ninja: without it the build is serial
CUDA_HOME=$(find_cuda_home)
[ -n "$CUDA_HOME" ] && export CUDA_HOME && export PATH="$CUDA_HOME/bin:$PATH"
SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/compute-sanitizer/compute-sanitizer 2>/dev/null || true)
CUOBJDUMP=$(command -v cuobjdump || true)
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) cores; $(free -g | awk '/Mem:/ {print $2 " GiB RAM"}'); kernel $(uname -r)"
  timeout 20 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,compute_mode,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
  echo "python: $(command -v "$PY") $("$PY" -V 2>&1); CUDA_HOME=${CUDA_HOME:-NOT FOUND} (nvcc on PATH: $(command -v nvcc || echo none) -> $(readlink -f "$(command -v nvcc)" 2>/dev/null))"
  echo "nvcc: $("${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1 | grep -o 'release [0-9.]*, V[0-9.]*' || echo MISSING); c++: $(c++ --version 2>&1 | head -1)"
  echo "compute-sanitizer: ${SAN:-MISSING} $([ -n "$SAN" ] && "$SAN" --version 2>&1 | grep -o 'Version [0-9.]*' | head -1); cuobjdump: ${CUOBJDUMP:-MISSING}"
  timeout 60 "$PY" scripts/gpu/report.py env 2>&1
} 2>&1 | tee -a "$SUM"
COMPUTE_MODE=$(timeout 20 nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
if ls .whl/*.whl >/dev/null 2>&1; then
  say "wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
  if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$WORK/wheels.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    say "wheel install FAILED:"; tail -5 "$WORK/wheels.log" | tee -a "$SUM"
  fi
else
  say "NO .whl/ SENT ALONG (scripts/gpu_wheels.sh makes it): torchjd, qpsolvers and quadprog are missing"
fi
WHEELS_OK=0
if timeout 60 "$PY" scripts/gpu/report.py upgrad 2>&1 | tail -1 | tee -a "$SUM" | grep -q "UPGrad OK"; then WHEELS_OK=1; fi

# ---- 2. build -------------------------------------------------------------------------------------
# the CPU kernels at one level only (the GPU run measures the CUDA kernels; each CPU level is a
# library of its own to compile)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FUSEDJD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  FUSEDJD_CPU_LEVELS=${FUSEDJD_CPU_LEVELS:-default}
stamp "2. build: setup.py build_ext --inplace (FUSEDJD_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, FUSEDJD_CPU_LEVELS=$FUSEDJD_CPU_LEVELS)"
B0=$SECONDS
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"  # no write into the Python's site-packages
if [ "${FUSEDJD_GPU_SKIP_BUILD:-0}" = 1 ] && ls python/fusedjd/_C*.so >/dev/null 2>&1; then
  echo "build skipped (FUSEDJD_GPU_SKIP_BUILD=1): using $(ls python/fusedjd/_C*.so)" >"$OUT/build.log"
  rc=0
else
  rm -f python/fusedjd/_C*.so
  timeout -k 10 300 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
fi
stamp "   build exit $rc in $((SECONDS - B0)) s ($(grep -ci 'warning' "$OUT/build.log") lines with 'warning')"
if [ "$rc" != 0 ]; then
  FAILED+=("build")
  grep -E "error|Error" "$OUT/build.log" | head -20 | sed 's/^/   /' | tee -a "$SUM"
fi
SO=$(ls python/fusedjd/_C*.so 2>/dev/null | head -1)
if [ -n "$SO" ] && [ -n "$CUOBJDUMP" ]; then
  { echo; echo "==== cuobjdump --list-elf / --list-ptx $SO"; "$CUOBJDUMP" --list-elf "$SO"; "$CUOBJDUMP" --list-ptx "$SO"
    echo "==== cuobjdump --dump-resource-usage $SO"
    if command -v c++filt >/dev/null; then "$CUOBJDUMP" --dump-resource-usage "$SO" | c++filt; else "$CUOBJDUMP" --dump-resource-usage "$SO"; fi
  } 2>&1 | head -c 4000000 >"$WORK/cuobjdump.log"
  cat "$WORK/cuobjdump.log" >>"$OUT/build.log"
  say "   cuobjdump: $(grep -c '\.cubin' "$WORK/cuobjdump.log") cubins ($(grep -o 'sm_[0-9]*a*' "$WORK/cuobjdump.log" | sort -u | tr '\n' ' ')), $(grep -c '\.ptx' "$WORK/cuobjdump.log") PTX; $(resource_digest "$WORK/cuobjdump.log")"
fi
timeout -k 5 120 "$PY" scripts/gpu/report.py first-call >"$WORK/first.log" 2>&1
cat "$WORK/first.log" >>"$OUT/build.log"
grep -E '^(build_info|first GPU call)' "$WORK/first.log" | sed 's/^/   /' | tee -a "$SUM"
grep -q '^first GPU call' "$WORK/first.log" || tail -1 "$WORK/first.log" | sed 's/^/   first GPU call FAILED: /' | tee -a "$SUM"
if ! timeout 60 "$PY" -c "import fusedjd, sys; sys.exit(0 if fusedjd.ops.has_cuda_kernels() else 1)" >/dev/null 2>&1 || [ $WHEELS_OK -ne 1 ]; then
  stamp "STOP: fusedjd does not import with CUDA kernels, or torchjd/qpsolvers/quadprog are missing (above)"
  tail -40 "$OUT/build.log"
  exit 1
fi

# ---- 3. CUDA tests, compute-sanitizer and the GPU checks, in parallel -------------------------------
# The benchmark keeps BENCH_S (+ 25 s to start and end), the timing 30 s; phase 3 gets the rest,
# between 90 and 300 s (below 90 the benchmark gives way).
P=$(($(left) - BENCH_S - 25 - 30 - 10))
if [ "$P" -lt 90 ]; then P=90; BENCH_S=$(atleast $(($(left) - P - 25 - 30 - 10)) 60); fi
P=$(cap "$P" 300)
WORKERS=${FUSEDJD_TEST_WORKERS:-4}
"$PY" -c "import xdist" >/dev/null 2>&1 || WORKERS=0
PYTEST_ARGS=()
if [ "$WORKERS" -gt 0 ]; then PYTEST_ARGS+=(-n "$WORKERS"); fi
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  # a hung kernel cannot be interrupted by a signal: the thread method ends the worker, and
  # xdist starts another one (without xdist it would end the run: the signal method then)
  if [ "$WORKERS" -gt 0 ]; then PYTEST_ARGS+=(--timeout=120 --timeout-method=thread); else PYTEST_ARGS+=(--timeout=120); fi
fi
stamp "3. CUDA tests (${PYTEST_ARGS[*]:-no xdist, no timeout}), compute-sanitizer (memcheck racecheck synccheck initcheck), GPU checks; each capped at ${P} s; compute mode ${COMPUTE_MODE:-?}"
run_tests() {
  local s=$SECONDS
  OMP_NUM_THREADS=2 timeout -k 15 "$P" "$PY" -m pytest -q -rfEs --tb=short -p no:cacheprovider --durations=25 \
    "${PYTEST_ARGS[@]}" --ignore=tests/test_cuda_emulated.py -k cuda tests >"$OUT/tests.log" 2>&1
  echo "$? $((SECONDS - s))" >"$WORK/tests.rc"
}
run_sanitizer() {  # $1: tool, $2: cap in seconds
  local s=$SECONDS
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 OMP_NUM_THREADS=2 timeout -k 10 "$2" "$SAN" --tool "$1" --error-exitcode 9 \
    --print-limit 40 "$PY" scripts/gpu/smoke.py >"$WORK/san-$1.log" 2>&1
  echo "$? $((SECONDS - s))" >"$WORK/san-$1.rc"
}
run_checks() {  # $1: cap in seconds
  local s=$SECONDS
  OMP_NUM_THREADS=2 timeout -k 10 "$1" "$PY" scripts/gpu/checks.py >"$OUT/graph.log" 2>&1
  echo "$? $((SECONDS - s))" >"$WORK/checks.rc"
}
TOOLS="memcheck racecheck synccheck initcheck"
[ -z "$SAN" ] && TOOLS=""
P3=$SECONDS
if [ "${COMPUTE_MODE:-Default}" = "Default" ]; then
  run_tests &
  run_checks "$(cap "$P" 200)" &
  for t in $TOOLS; do run_sanitizer "$t" "$P" & done
  wait
else  # an exclusive compute mode: one GPU process at a time
  run_tests
  run_checks "$(cap "$(atleast $(($(left) - BENCH_S - 60)) 30)" 200)"
  for t in $TOOLS; do
    r=$(($(left) - BENCH_S - 60))
    if [ "$r" -lt 30 ]; then echo "124 0" >"$WORK/san-$t.rc"; echo "skipped: no time left" >"$WORK/san-$t.log"; continue; fi
    run_sanitizer "$t" "$(cap "$r" "$P")"
  done
fi
for t in $TOOLS; do  # a tool that failed by itself (not on the workload) runs once more, alone, if time allows
  read -r src _ <"$WORK/san-$t.rc"
  case $src in 0 | 9 | 124 | 137) continue ;; esac
  if grep -qE '========= (Error|Internal)|Device not supported' "$WORK/san-$t.log" && [ $(($(left) - BENCH_S - 60)) -gt 60 ]; then
    mv "$WORK/san-$t.log" "$WORK/san-$t.first.log"
    run_sanitizer "$t" "$(cap $(($(left) - BENCH_S - 60)) "$P")"
    { echo "(first run, beside the others, failed:)"; cat "$WORK/san-$t.first.log"; echo "(run again, alone:)"; cat "$WORK/san-$t.log"; } >"$WORK/san-$t.both.log"
    mv "$WORK/san-$t.both.log" "$WORK/san-$t.log"
  fi
done
read -r trc tsec <"$WORK/tests.rc"
stamp "   pytest exit $trc in ${tsec} s: $(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)' "$OUT/tests.log" | tail -1)"
[ "$trc" = 0 ] || FAILED+=("tests")
[ "$trc" = 124 ] && say "   pytest TIMED OUT at ${P} s (tests.log shows how far it got)"
grep -E '^(FAILED|ERROR) |crashed' "$OUT/tests.log" | head -25 | cut -c1-240 | sed 's/^/   /' | tee -a "$SUM"
: >"$OUT/sanitizer.log"
if [ -z "$SAN" ]; then
  say "   compute-sanitizer not found: skipped"
  echo "compute-sanitizer not found" >"$OUT/sanitizer.log"
  FAILED+=("sanitizer (missing)")
fi
for t in $TOOLS; do
  read -r src ssec <"$WORK/san-$t.rc"
  verdict=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|smoke OK|smoke: .* FAILED' "$WORK/san-$t.log" | tr '\n' ' ' | sed 's/========= //g')
  case $src in 0) what=clean ;; 9) what="ERRORS FOUND" ;; 124 | 137) what="TIMED OUT ($(grep -c 'smoke: .* done' "$WORK/san-$t.log") of 8 sections done)" ;; *) what="exit $src" ;; esac
  say "   compute-sanitizer $t: $what in ${ssec} s: ${verdict:-no summary line}"
  case $src in 0 | 9) ;; *) say "      its last line: $(grep -v '^=========' "$WORK/san-$t.log" | grep . | tail -1 | cut -c1-200)" ;; esac
  [ "$src" = 0 ] || FAILED+=("sanitizer $t")
  { echo "==================== compute-sanitizer --tool $t: exit $src in ${ssec} s"; cat "$WORK/san-$t.log"; echo; } >>"$OUT/sanitizer.log"
done
read -r crc csec <"$WORK/checks.rc"
stamp "   GPU checks exit $crc in ${csec} s: $(grep -E '^graph check:' "$OUT/graph.log" || echo 'no summary line (graph.log shows how far it got)')"
[ "$crc" = 0 ] || FAILED+=("GPU checks")
grep -q '^graph check:' "$OUT/graph.log" || say "      its last line: $(grep . "$OUT/graph.log" | tail -1 | cut -c1-200)"
grep -E '^(FAIL|INFO) |launches:' "$OUT/graph.log" | cut -c1-300 | sed 's/^/   /' | tee -a "$SUM"
stamp "   phase 3 took $((SECONDS - P3)) s"
timeout 20 nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null | sed 's/^/   still on the GPU: /' | tee -a "$SUM"

# ---- 4. eager against graph replay, alone -----------------------------------------------------------
G0=$SECONDS
stamp "4. eager call against graph replay (scripts/gpu/checks.py --timing, capped at 30 s)"
{ echo; echo "==================== scripts/gpu/checks.py --timing (alone)"; } >>"$OUT/graph.log"
timeout -k 5 30 "$PY" scripts/gpu/checks.py --timing >>"$OUT/graph.log" 2>&1
stamp "   exit $? in $((SECONDS - G0)) s"
grep -E '^TIME ' "$OUT/graph.log" | sed 's/^/   /' | tee -a "$SUM"

# ---- 5. benchmark, alone ------------------------------------------------------------------------------
BS=$(cap "$BENCH_S" $(($(left) - 25)))
BCAP=$(($(left) - 5))
if [ "$BS" -lt 30 ]; then
  stamp "5. benchmark SKIPPED: $(left) s left"
  echo "skipped: $(left) s left" >"$OUT/bench.log"
  FAILED+=("benchmark (no time)")
else
  stamp "5. benchmark: bench/run.py --device cuda --budget-s $BS (killed at ${BCAP} s; each table lands in cuda.md when its section ends)"
  B0=$SECONDS
  timeout -k 5 "$BCAP" "$PY" bench/run.py --device cuda --budget-s "$BS" --out "$OUT/cuda.md" >"$OUT/bench.log" 2>&1
  brc=$?
  stamp "   benchmark exit $brc in $((SECONDS - B0)) s$([ "$brc" = 124 ] && echo ' (TIMED OUT: cuda.md holds the tables finished before)'); tables: $(grep -c '^### ' "$OUT/cuda.md" 2>/dev/null)"
  [ "$brc" = 0 ] || FAILED+=("benchmark")
  grep -E '^- floors' "$OUT/cuda.md" 2>/dev/null | sed 's/^/   /' | tee -a "$SUM"
  # the headline: each section's n = 1e8 float32 rows, m, time and time / floor
  timeout 30 "$PY" scripts/gpu/report.py headline "$OUT/cuda.md" 2>&1 | sed 's/^/   /' | tee -a "$SUM"
  grep -E 'MISMATCH|^- .*(Error|error)' "$OUT/cuda.md" "$OUT/bench.log" 2>/dev/null | head -10 | cut -c1-240 | sed 's/^/   /' | tee -a "$SUM"
fi

# ---- the end --------------------------------------------------------------------------------------------
for f in "$OUT"/*; do  # what is over the size limit keeps its end
  if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 * 1024 * 1024)) ]; then
    tail -c $((15 * 1024 * 1024)) "$f" >"$f.tmp" && mv "$f.tmp" "$f"
    say "   $(basename "$f") cut to its last 15 MiB"
  fi
done
if [ ${#FAILED[@]} -eq 0 ]; then RESULT="every step passed"; else RESULT="FAILED: $(IFS=,; echo "${FAILED[*]}")"; fi
stamp "done: $RESULT; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
check_out "$OUT" | sed 's/^/   /' | tee -a "$SUM"
echo
echo "======== summary.txt"
cat "$SUM"
[ ${#FAILED[@]} -eq 0 ]
