#!/usr/bin/env bash
# fusedjd on a GPU machine in one call: build, CUDA tests, compute-sanitizer on scripts/gpu/smoke.py,
# the benchmark's CUDA grid; each step capped so that the whole ends within --budget seconds, its
# output in $OUT (summary.txt: one line per step). Exit status 0 only when every step passed.
#   bash scripts/gpu_wheels.sh          # where PyPI is reachable: .whl/ (torchjd, qpsolvers, quadprog)
#   bash scripts/gpu_run.sh [options]   # on the GPU machine, with .whl/ sent along
#   bash scripts/gpu_run.sh --dry-run   # anywhere (CI): every step that needs no GPU, on the CPU
# Options (defaults): --out DIR ($OUT, else /tmp/fusedjd-gpu), --budget S (540), --bench-s S (240),
# --workers N (pytest-xdist workers where installed, 4), --max-files N, --max-mib M (what $OUT may
# hold: 8 files of 16 MiB, a larger file keeps its end; 0: no limit), --reuse-build (the extension
# built in place, as FUSEDJD_DRY_REUSE_BUILD=1). Also TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS, PYTHON.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd) PY=${PYTHON:-python3} T0=$SECONDS REUSE=${FUSEDJD_DRY_REUSE_BUILD:-0}
DRY=0 OUT=${OUT:-/tmp/fusedjd-gpu} BUDGET=540 BENCH_S=240 WORKERS=4 MAX_FILES=8 MAX_MIB=16
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;; --reuse-build) REUSE=1 ;; --out) OUT=$2; shift ;; --budget) BUDGET=$2; shift ;;
    --bench-s) BENCH_S=$2; shift ;; --workers) WORKERS=$2; shift ;; --max-files) MAX_FILES=$2; shift ;;
    --max-mib) MAX_MIB=$2; shift ;; *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
TMP=$(mktemp -d /tmp/fusedjd-gpu-run.XXXXXX) && trap 'rm -rf "$TMP"' EXIT
[ $DRY = 1 ] && OUT=$TMP/out BUDGET=100000  # (the dry run: each step its own cap)
mkdir -p "$OUT" && SUM=$OUT/summary.txt && : >"$SUM"
say() { echo "$*" | tee -a "$SUM"; }
cap() { local c=$((BUDGET - (SECONDS - T0) - $2)); [ "$c" -gt "$1" ] && c=$1; echo $((c < 30 ? 30 : c)); }  # MAX RESERVE
step() {  # NAME LOG CAP CMD...: CMD capped at CAP seconds, its output appended to LOG, one summary line
  local name=$1 log=$2 t=$3 s=$SECONDS rc; shift 3
  timeout -k 10 "$t" "$@" >>"$log" 2>&1; rc=$?
  if [ $rc = 0 ]; then say "[$(printf '%4d' $((SECONDS - T0)))s] ok: $name ($((SECONDS - s)) s)"; return 0; fi
  say "[$(printf '%4d' $((SECONDS - T0)))s] FAILED: $name (exit $rc$([ $rc = 124 ] && echo ", cut at $t s"))"
  grep -v '^\s*$' "$log" | tail -3 | cut -c1-200 | sed 's/^/      /' | tee -a "$SUM"
  echo "$name" >>"$TMP/failed"
  return $rc
}
find_cuda_home() {  # CUDA_HOME, the real nvcc's (through links, or named by a wrapper script), the usual places,
  local c need real cands=("${CUDA_HOME:-}")  # pip's toolkits; one with its runtime library first
  real=$(readlink -f "$(command -v nvcc)" 2>/dev/null) && cands+=("${real%/bin/nvcc}") && [ "$(head -c 2 "$real")" = "#!" ] \
    && cands+=($(grep -oE '/[A-Za-z0-9._+/-]*/bin/nvcc' "$real" | sed 's,/bin/nvcc$,,'))
  cands+=(/usr/local/cuda /usr/local/cuda-* /opt/cuda $("$PY" -c 'import nvidia, os
for p in nvidia.__path__: print(*(os.path.join(p, d) for d in sorted(os.listdir(p))), sep="\n")' 2>/dev/null))
  for need in libcudart ""; do for c in "${cands[@]}"; do [ -n "$c" ] && [ -x "$c/bin/nvcc" ] \
    && [ -f "$c/include/cuda_runtime.h" ] && { [ -z "$need" ] || ls "$c"/lib*/$need.so* >/dev/null 2>&1; } && echo "$c" && return
  done; done
}

# ---- the environment; the wheels of torchjd, qpsolvers and quadprog (the GPU machine has no network)
say "fusedjd gpu_run$([ $DRY = 1 ] && echo ' --dry-run'): $(date -u '+%F %T UTC'), $(nproc) cores, $("$PY" -V 2>&1), $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
if [ $DRY = 1 ]; then
  step "bash -n" "$TMP/env.log" 30 bash -c 'bash -n scripts/gpu_run.sh && bash -n scripts/gpu_wheels.sh'
  step "scripts/gpu_wheels.sh" "$TMP/wheels.log" 300 bash scripts/gpu_wheels.sh "$TMP/whl" \
    && step "pip install --target of the wheels, for CPython 3.12" "$TMP/wheels.log" 120 "$PY" -m pip install -q \
      --disable-pip-version-check --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 --target "$TMP/site" "$TMP"/whl/*.whl \
    && step "torchjd and qpsolvers import from there (quadprog's cp312 extension: present)" "$TMP/wheels.log" 60 \
      env PYTHONPATH="$TMP/site" "$PY" -c "import sys, glob, torchjd, qpsolvers
assert all(m.__file__.startswith(sys.argv[1]) for m in (torchjd, qpsolvers)) and glob.glob(sys.argv[1] + '/quadprog*.so')" "$TMP/site"
else
  export PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"  # its ninja: a parallel build
  CUDA_HOME=$(find_cuda_home) && [ -n "$CUDA_HOME" ] && export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/{compute-sanitizer,bin}/compute-sanitizer 2>/dev/null | head -1)
  MODE=$(timeout 20 nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$SUM"
  say "CUDA_HOME=${CUDA_HOME:-NOT FOUND}; nvcc $("${CUDA_HOME:-/usr/local/cuda}"/bin/nvcc --version 2>&1 | grep -o 'release [0-9.]*'); compute-sanitizer: ${SAN:-NOT FOUND}"
  if ls .whl/*.whl >/dev/null 2>&1; then
    step "wheels into /tmp/site: $(cd .whl && ls -- *.whl | paste -sd' ' -)" "$TMP/wheels.log" 60 "$PY" -m pip install -q \
      --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else say "no .whl/ sent along (scripts/gpu_wheels.sh makes it)"; fi
  step "torchjd's UPGrad runs (torchjd, qpsolvers, quadprog)" "$TMP/wheels.log" 60 "$PY" -c \
    "import torch, quadprog; from torchjd.aggregation import UPGrad; UPGrad()(torch.randn(3, 5))"
fi

# ---- the build: in place, or (the dry run) a copy of the tree as the GPU machine receives it, without CUDA
SRC=$ROOT CUDA=$((1 - DRY))
if [ "$REUSE" = 1 ]; then
  say "build: the extension built in place, $(ls python/fusedjd/_C*.so 2>/dev/null || echo 'NONE')"
else
  if [ $DRY = 1 ]; then
    SRC=$TMP/src && mkdir -p "$SRC"
    git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
      | tar --null -T - -cf - | tar -xf - -C "$SRC"
  else rm -f python/fusedjd/_C*.so; fi
  step "build in $SRC (FUSEDJD_CUDA=$CUDA, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})" "$OUT/build.log" \
    "$(cap $((DRY ? 900 : 400)) 60)" env -C "$SRC" FUSEDJD_CUDA=$CUDA TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
    FUSEDJD_CPU_LEVELS=default MAX_JOBS="${MAX_JOBS:-$((DRY ? 2 : $(nproc)))}" "$PY" setup.py build_ext --inplace
fi
export PYTHONPATH="$SRC/python${PYTHONPATH:+:$PYTHONPATH}"
step "fusedjd imports from $SRC/python$([ $DRY = 0 ] && echo ', with CUDA kernels')" "$OUT/build.log" 120 \
  env -C "$SRC" "$PY" -c "import sys, fusedjd; print(fusedjd.__file__, fusedjd.build_info())
assert fusedjd.__file__.startswith(sys.argv[1]) and (sys.argv[2] == '1' or fusedjd.ops.has_cuda_kernels())" "$SRC/python" $DRY
if [ -s "$TMP/failed" ] && [ $DRY = 0 ]; then say "STOP: nothing to test (above)"; exit 1; fi
cd "$SRC" || exit 1

# ---- the CUDA tests and compute-sanitizer, side by side (one after another if the GPU takes one process)
if [ $DRY = 1 ]; then
  step "the CUDA tests, collected" "$OUT/tests.log" 300 "$PY" -m pytest --collect-only -q -p no:cacheprovider \
    --ignore=tests/test_cuda_emulated.py -k cuda tests && say "      $(grep collected "$OUT/tests.log" | tail -1)"
  step "scripts/gpu/smoke.py --cpu (the sanitizer's workload)" "$OUT/sanitizer.log" 300 "$PY" scripts/gpu/smoke.py --cpu
else
  ARGS=(-q -rfEs --tb=short -p no:cacheprovider --ignore=tests/test_cuda_emulated.py -k cuda)
  TIMEOUT=0; "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT=1 && ARGS+=(--timeout=120)
  # (a hung kernel ignores signals: the thread method ends the worker, and xdist starts another)
  if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    ARGS+=(-n "$WORKERS"); [ $TIMEOUT = 1 ] && ARGS+=(--timeout-method=thread)
  fi
  P=$(cap 300 $((BENCH_S + 40)))
  both() { if [ "${MODE:-Default}" = Default ]; then "$@" & else "$@"; fi; }
  both step "the CUDA tests" "$OUT/tests.log" "$P" env OMP_NUM_THREADS=2 "$PY" -m pytest "${ARGS[@]}" tests
  for t in memcheck racecheck synccheck initcheck; do
    [ -n "$SAN" ] || { say "FAILED: compute-sanitizer not found"; echo sanitizer >>"$TMP/failed"; break; }
    echo "==== compute-sanitizer --tool $t" >"$TMP/san-$t.log"
    both step "compute-sanitizer --tool $t" "$TMP/san-$t.log" "$(cap "$P" $((BENCH_S + 40)))" env OMP_NUM_THREADS=2 \
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$t" --error-exitcode 9 --print-limit 40 "$PY" scripts/gpu/smoke.py
  done
  wait
  cat "$TMP"/san-*.log >"$OUT/sanitizer.log" 2>/dev/null
  say "      $(tail -1 "$OUT/tests.log")"
fi

# ---- the benchmark (the dry run: the CUDA grid's code on a tiny grid, on the CPU)
BS=$(cap "$BENCH_S" 30) && BENCH=(--device cuda --budget-s "$BS") && [ $DRY = 1 ] && BENCH=(--tiny)
step "bench/run.py ${BENCH[*]}" "$OUT/bench.log" "$(cap $((BS + 60)) 5)" "$PY" bench/run.py "${BENCH[@]}" --out "$OUT/cuda.md"
say "      $(grep -c '^### ' "$OUT/cuda.md" 2>/dev/null) tables in cuda.md; $(grep -E '^- floors at the start' "$OUT/cuda.md" | cut -c1-150)"

# ---- what comes back
for f in "$OUT"/*; do
  if [ "$MAX_MIB" -gt 0 ] && [ "$(stat -c %s "$f")" -gt $((MAX_MIB << 20)) ]; then
    tail -c $((MAX_MIB << 20)) "$f" >"$TMP/cut" && mv "$TMP/cut" "$f" && say "$(basename "$f"): its last $MAX_MIB MiB kept"
  fi
done
n=$(find "$OUT" -type f | wc -l)
[ "$MAX_FILES" -gt 0 ] && [ "$n" -gt "$MAX_FILES" ] && { say "FAILED: $n files in \$OUT, over --max-files $MAX_FILES"; echo out >>"$TMP/failed"; }
if [ -s "$TMP/failed" ]; then say "FAILED: $(sort -u "$TMP/failed" | paste -sd, -)"; exit 1; fi
say "every step passed; $(ls "$OUT" | wc -l) files in \$OUT: $(ls "$OUT" | paste -sd' ' -)"
