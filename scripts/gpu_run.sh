#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200): build the CUDA kernels for sm_90, run the
# whole test suite (CUDA tests included), compute-sanitizer memcheck + racecheck on every
# op, and the benchmark on the GPU. Logs and the results table go to $OUT.
#
# The device machine has no network: carry a torchjd wheel in .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl torchjd==0.18.0
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/fusedjd-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FUSEDJD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
python3 -c "import fusedjd; assert fusedjd.ops.has_cuda_kernels(), 'built without CUDA kernels'"
python3 -m pytest -q -rs -x tests 2>&1 | tee "$OUT/tests.log" | tail -15
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python3 scripts/cuda_smoke.py >"$OUT/sanitizer-$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? (log: sanitizer-$tool.log)"; tail -3 "$OUT/sanitizer-$tool.log"
done
PYTHONUNBUFFERED=1 python3 bench/run.py --device cuda --out "$OUT/cuda.md" 2>"$OUT/bench.err" | tail -70
