#!/usr/bin/env bash
# Installs fusedjd (and matplotlib for the plot, when it can), then runs the benchmark:
# fusedjd against torchjd 0.18 and plain PyTorch on the device at hand.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FUSEDJD_PLOT=1 bash scripts/install.sh
exec "${PYTHON:-python3}" bench/run.py "$@"
