#!/usr/bin/env bash
# Builds the C++ library with CMake (find_package(Torch)) and runs one op from it, so the
# CMake build cannot rot.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" >"$BUILD/cmake.log" 2>&1 \
  || { cat "$BUILD/cmake.log"; exit 1; }
cmake --build "$BUILD" -j2 >>"$BUILD/cmake.log" 2>&1 || { cat "$BUILD/cmake.log"; exit 1; }
"$PY" - "$BUILD/libfusedjd.so" <<'PYEOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
J = torch.randn(3, 101, dtype=torch.float64)
G = torch.ops.fusedjd.gramian(J, [40, 61])
ref = torch.stack([J[:, :40] @ J[:, :40].T, J[:, 40:] @ J[:, 40:].T])
assert torch.allclose(G, ref, rtol=1e-12, atol=1e-12), (G - ref).abs().max()
print("[fusedjd] CMake build OK:", sys.argv[1])
PYEOF
