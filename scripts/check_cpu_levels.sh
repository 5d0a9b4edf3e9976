#!/usr/bin/env bash
# The installed fusedjd on CPUs without the instruction sets of this machine: under qemu-user's
# Haswell model (AVX2, FMA, F16C, no AVX-512) `import fusedjd` must choose the avx2 CPU kernels,
# under its Nehalem model (SSE4.2, no AVX) the default ones, and each must give the float64
# reference's results (tests/cpu_level_check.py --quick). An AVX-512 instruction outside its
# dispatch (a flag in the wrong library, a header function compiled for the wrong level) dies
# here with SIGILL. Installs Debian's qemu-user when it is missing (CI runs as root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$("${PYTHON:-python3}" -c "import sys; print(sys.executable)")
if ! command -v qemu-x86_64 >/dev/null 2>&1; then
  echo "[fusedjd] installing qemu-user (Debian) for the emulated-CPU checks"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user; } >/dev/null
fi
status=0
for pair in Haswell:avx2 Nehalem:default; do
  model=${pair%%:*} level=${pair##*:}
  # qemu warns about host CPUID features its emulator does not model: noise here
  if qemu-x86_64 -cpu "$model" "$PY" tests/cpu_level_check.py "$level" --quick 2> >(grep -v "TCG doesn't support" >&2); then
    echo "[fusedjd] qemu -cpu $model: the $level CPU kernels load and match the reference"
  else
    echo "[fusedjd] qemu -cpu $model: FAILED (exit $?; 132 is SIGILL: an instruction this CPU lacks)"
    status=1
  fi
done
exit $status
