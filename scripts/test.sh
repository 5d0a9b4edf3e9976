#!/usr/bin/env bash
# Installs fusedjd and its test dependencies, then runs the whole test suite
# (CUDA tests run when a GPU is present and skip, saying so, when none is).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q -rs tests "$@"
