#!/usr/bin/env bash
# Compiles every CUDA source for sm_90 (compile only, no GPU and no CUDA torch needed):
# a CUDA compile error, or a kernel that spills registers, fails CI even on a machine without a
# GPU. Skips, saying so, when nvcc is absent. Uses the installed torch's headers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if ! command -v nvcc >/dev/null 2>&1; then
  echo "[fusedjd] nvcc not found: CUDA compile check skipped"
  exit 0
fi
ARCH=${FUSEDJD_CUDA_ARCH:-90}
INCLUDES=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0
for src in csrc/cuda/*.cu; do
  # C10_USING_CUSTOM_GENERATED_MACROS: a CPU build of torch ships no cuda_cmake_macros.h
  if nvcc -c -std=c++17 -O3 -arch=sm_${ARCH} -DC10_USING_CUSTOM_GENERATED_MACROS -diag-suppress 3306 \
      -Xptxas -warn-spills $INCLUDES "$src" -o "$OUT/$(basename "$src").o" 2>"$OUT/log"; then
    if grep -q "spill" "$OUT/log"; then  # a spill in a streaming kernel costs memory traffic: refused
      echo "[fusedjd] $src: register spills (ptxas):"; grep spill "$OUT/log"
      echo "[fusedjd] nvcc sm_${ARCH} FAILED: $src spills registers"
      status=1
    else
      echo "[fusedjd] nvcc sm_${ARCH} OK: $src"
    fi
  else
    cat "$OUT/log"
    echo "[fusedjd] nvcc sm_${ARCH} FAILED: $src"
    status=1
  fi
done
exit $status
