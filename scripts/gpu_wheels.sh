#!/usr/bin/env bash
# Downloads the Python packages the GPU machine lacks (it has no network) as wheels for its
# Python (CPython 3.12, x86-64 Linux): torchjd 0.18.0, and qpsolvers 4.13.0 and quadprog 0.1.14,
# which torchjd's UPGrad needs (the tests and the benchmark use UPGrad). scripts/gpu_run.sh
# installs them from .whl/ into /tmp/site there. .whl/ is git-ignored: send it along with the
# working tree explicitly. Needs the package registry (pip download).
#
#   bash scripts/gpu_wheels.sh          # into .whl/
#   bash scripts/gpu_wheels.sh DIR      # into DIR (its old *.whl files are removed first)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" torchjd==0.18.0 qpsolvers==4.13.0 quadprog==0.1.14
count=0
for name in torchjd-0.18.0 qpsolvers-4.13.0 quadprog-0.1.14; do
  if ls "$DIR/$name"-*.whl >/dev/null 2>&1; then count=$((count + 1)); else echo "[fusedjd] missing: $name wheel" >&2; fi
done
[ "$count" = 3 ] || exit 1
echo "[fusedjd] wheels for the GPU machine in $DIR: $(cd "$DIR" && ls *.whl | tr '\n' ' ')($(du -sh "$DIR" | cut -f1))"
