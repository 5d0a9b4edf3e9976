#!/usr/bin/env bash
# Installs what fusedjd needs and builds it in place. Sourced by scripts/test.sh and
# scripts/bench.sh. torch is installed only if none is present (FUSEDJD_TORCH picks the
# version; the default is the CPU build this project's machines carry).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[fusedjd] no torch found: installing torch==${FUSEDJD_TORCH:-2.13.0}"
  pip_install "torch==${FUSEDJD_TORCH:-2.13.0}"
fi
pip_install "torchjd==0.18.0" pybind11 ninja numpy pytest "setuptools>=64" wheel
if [ "${FUSEDJD_PLOT:-0}" = "1" ]; then pip_install matplotlib || echo "[fusedjd] matplotlib unavailable: no plot"; fi
echo "[fusedjd] building the extension (pip install --no-build-isolation -e .)"
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation -e .
"$PY" -c "import torch, torchjd, fusedjd; print('[fusedjd] torch', torch.__version__, '| torchjd', torchjd.__version__ if hasattr(torchjd, '__version__') else '0.18.0', '| CUDA kernels:', fusedjd.ops.has_cuda_kernels())"
