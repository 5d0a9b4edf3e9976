#!/usr/bin/env bash
# The emulated CUDA kernels under AddressSanitizer + UBSan: builds the instrumented emulation
# library (tests/simt_build.py --asan) and runs the test cases marked `asan` with the sanitizer
# runtime preloaded, so that a read past a tensor's storage or undefined behaviour fails the run.
# Expects the extension installed (scripts/install.sh, which scripts/test.sh runs first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export FUSEDJD_SIMT_ASAN=1  # the tests then build (cached) and load the instrumented library
# libstdc++ is preloaded too: ASan's __cxa_throw interceptor needs it resolved at start-up.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# --capture=sys: a sanitizer report goes to the real stderr before the abort, not into a capture
exec "$PY" -m pytest -q -rs --capture=sys -m asan tests/test_cuda_emulated.py "$@"
