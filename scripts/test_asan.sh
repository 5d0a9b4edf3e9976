#!/usr/bin/env bash
# The kernels under AddressSanitizer + UBSan, with the sanitizer runtime preloaded, so that a read
# or write past a buffer, or undefined behaviour, fails the run:
#   1. the emulated CUDA kernels: builds the instrumented emulation library (tests/simt_build.py
#      --asan) and runs the test cases marked `asan`;
#   2. the CPU kernels: builds an instrumented copy of the extension into build/asan_pkg (the
#      package's Python files next to it) and runs the op and class tests on it.
# Arguments go to step 1's pytest.
# Expects the extension installed (scripts/install.sh, which scripts/test.sh runs first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

# 2's build, done first (without the sanitizer preloaded); rebuilt only when a source changed
PKG=build/asan_pkg/fusedjd
SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
SO="$PKG/_C$SUFFIX"
mkdir -p "$PKG"
cp python/fusedjd/*.py "$PKG"/
if [ ! -f "$SO" ] || [ -n "$(find csrc scripts/test_asan.sh -newer "$SO" -type f | head -n 1)" ]; then
  echo "[fusedjd] building the CPU kernels with AddressSanitizer + UBSan into $PKG (about a minute)"
  INCLUDES=$("$PY" -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
  LIBDIR=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  TV=$("$PY" -c "import torch; print(torch.__version__)")
  FLAGS=(-fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fopenmp -march=native -std=c++17
         -DFUSEDJD_PYTHON_MODULE "-DFUSEDJD_TORCH_VERSION=\"$TV\"" -DTORCH_EXTENSION_NAME=_C)
  OBJ=$(mktemp -d)
  trap 'rm -rf "$OBJ"' EXIT
  pids=()
  for src in csrc/fusedjd.cpp csrc/composite/*.cpp csrc/cpu/*.cpp; do
    g++ "${FLAGS[@]}" $INCLUDES -c "$src" -o "$OBJ/$(basename "$src").o" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  # linked beside, then moved: an interrupted link leaves no newer-looking library behind
  g++ -shared -fsanitize=address,undefined -fopenmp "$OBJ"/*.o -L"$LIBDIR" -lc10 -ltorch_cpu -ltorch -ltorch_python \
    -Wl,-rpath,"$LIBDIR" -o "$OBJ/_C.so"
  mv "$OBJ/_C.so" "$SO"
fi

# libstdc++ is preloaded too: ASan's __cxa_throw interceptor needs it resolved at start-up.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# --capture=sys: a sanitizer report goes to the real stderr before the abort, not into a capture
echo "[fusedjd] 1/2: the emulated CUDA kernels under ASan + UBSan"
FUSEDJD_SIMT_ASAN=1 "$PY" -m pytest -q -rs --capture=sys -m asan tests/test_cuda_emulated.py "$@"
echo "[fusedjd] 2/2: the CPU kernels under ASan + UBSan"
PYTHONPATH="build/asan_pkg${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
  "import fusedjd, sys; sys.exit(0 if fusedjd.__file__.startswith('build/asan_pkg') or '/build/asan_pkg/' in fusedjd.__file__ else 'the instrumented copy was not imported: ' + fusedjd.__file__)"
PYTHONPATH="build/asan_pkg${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -rs --capture=sys -m "not slow" \
  tests/test_ops.py tests/test_moco.py tests/test_gradvac.py tests/test_jac_to_grad.py tests/test_projector.py
