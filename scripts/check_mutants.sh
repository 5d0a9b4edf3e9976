#!/usr/bin/env bash
# The mutation check: plausible wrong answers planted one at a time (tests/mutants.py: NaN from
# GradVac on a rank-deficient float32 J, Mean instead of UPGrad for half-precision .jac, max(u, 0)
# instead of the dual-cone projection, loops that skip a pair, a combination that drops its last
# block of columns, a MoCo step without its moving average, MGDA stepping toward the last of tied
# rows), each of which must make the tests it
# names fail. A mutant that survives fails this script, with the surviving test's output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" tests/mutants.py
