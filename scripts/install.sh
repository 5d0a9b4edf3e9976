#!/usr/bin/env bash
# Installs what fusedjd needs and builds it in place. Sourced by scripts/test.sh and
# scripts/bench.sh. torch is installed only if none is present (FUSEDJD_TORCH picks the
# version; the default is torch 2.13.0's CPU build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[fusedjd] no torch found: installing torch==${FUSEDJD_TORCH:-2.13.0}"
  pip_install "torch==${FUSEDJD_TORCH:-2.13.0}"
fi
pip_install "torchjd[quadprog-projector]==0.18.0" pybind11 ninja numpy pytest "setuptools>=64" wheel
if [ "${FUSEDJD_PLOT:-0}" = "1" ]; then pip_install matplotlib || echo "[fusedjd] matplotlib unavailable: no plot"; fi
# Rebuild only when a library is missing (_C, or the CPU kernels of a level), the package is
# installed from another checkout, or a library is older than a source file (the build takes
# about 4 minutes on 2 cores: the CPU kernels are compiled once per instruction-set level).
OLDEST=$(ls -tr python/fusedjd/_C*.so python/fusedjd/_cpu_default*.so 2>/dev/null | head -n 1 || true)
HERE_PKG="$(pwd)/python/fusedjd"
if [ -n "$OLDEST" ] && [ -n "$(ls python/fusedjd/_cpu_default*.so 2>/dev/null)" ] \
    && [ -z "$(find csrc setup.py -newer "$OLDEST" -type f 2>/dev/null | head -n 1)" ] \
    && [ "$("$PY" -c "import os, fusedjd; print(os.path.dirname(os.path.abspath(fusedjd.__file__)))" 2>/dev/null)" = "$HERE_PKG" ]; then
  echo "[fusedjd] extension up to date ($OLDEST is newer than csrc/ and setup.py): not rebuilding"
else
  echo "[fusedjd] building the extension: pip install --no-build-isolation -e . (about 4 minutes on 2 cores)"
  MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation -e .
fi
"$PY" -c "import importlib.metadata as md, torch, fusedjd; print('[fusedjd] torch', torch.__version__, '| torchjd', md.version('torchjd'), '| build:', fusedjd.build_info())"
