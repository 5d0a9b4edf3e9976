#!/usr/bin/env bash
# Builds the C++ library with CMake (find_package(Torch)) and checks its ops against the float64
# reference, so the CMake build (and the portable vector paths it compiles) cannot rot.
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
# The CMake build is portable (the compiler's default target): its CPU kernels take the
# narrow-vector paths (as the default CPU level of the Python build does); check them against the
# reference.
import importlib.util
import sys

import torch

torch.ops.load_library(sys.argv[1])
spec = importlib.util.spec_from_file_location("reference", "python/fusedjd/reference.py")
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)  # the file alone: importing the package would load its own library
ops = torch.ops.fusedjd
gen = torch.Generator().manual_seed(0)
for dtype in [torch.float64, torch.float32, torch.bfloat16, torch.float16]:
    m, n = 7, 2 * 16384 + 77
    J = torch.randn(m, n, generator=gen).to(dtype)
    sizes = [40, 30001, 0, n - 30041]
    blocks = [J[:, :5], J[:, 5:20000], J[:, 20000:]]  # the ops take J as a list of column blocks
    err = ref.rel_err(ops.gramian(blocks, sizes), ref.gramian(J, sizes))
    assert err <= ref.TOLERANCE["gramian"][dtype], (dtype, "gramian", err)
    W = torch.randn(4, m, generator=gen)
    err = ref.rel_err(ops.combine(blocks, W, sizes), ref.combine(J, W, sizes))
    assert err <= ref.TOLERANCE["combine"][dtype], (dtype, "combine", err)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    Y, lam, step = torch.zeros(m, n, dtype=dtype), torch.full((m,), 1 / m, dtype=acc), torch.zeros((), dtype=torch.long)
    moco = ref.MoCo()
    for _ in range(3):
        Jk = (torch.randn(m, n, generator=gen) / n**0.5).to(dtype)
        w, out = ops.moco_step([Jk[:, :7], Jk[:, 7:]], Y, lam, step, 0.5, 0.5, 0.1, 0.5, 0.0, False)
        w_ref, out_ref = moco(Jk)
        for got, expected, what in [(w, w_ref, "weights"), (out, out_ref, "out"), (Y, moco.Y, "Y")]:
            assert ref.rel_err(got, expected) <= ref.TOLERANCE["moco"][dtype], (dtype, "moco", what)
print("[fusedjd] CMake build OK (portable CPU kernels match the reference):", sys.argv[1])
PYEOF
