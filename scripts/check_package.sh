#!/usr/bin/env bash
# What a user installs, checked outside the repository: the source distribution holds every source
# the build needs (csrc/ entire, the CUDA sources included, compared with git's list), a wheel
# builds from it alone (pip wheel --no-build-isolation, against the torch already installed), and
# that wheel installs into a fresh virtual environment (torch and torchjd taken from this one) in
# which `import fusedjd` and a short check against the reference and torchjd run from outside the
# source tree. The wheel here is built for the default CPU level only (FUSEDJD_CPU_LEVELS=default),
# to keep CI short: every level compiles the same sources.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip install --disable-pip-version-check -q build
echo "[fusedjd] sdist: python -m build --sdist --no-isolation"
"$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" . >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/fusedjd-*.tar.gz)
missing=$(comm -23 <(git ls-files csrc | sort) <(tar -tzf "$SDIST" | sed 's|^[^/]*/||' | grep '^csrc/' | sort))
if [ -n "$missing" ]; then
  echo "[fusedjd] the sdist lacks sources the build needs:"; echo "$missing"; exit 1
fi
echo "[fusedjd] sdist: $(basename "$SDIST"), every file of csrc/ in it ($(git ls-files csrc | wc -l) files)"
echo "[fusedjd] wheel from the sdist alone (default CPU level; about a minute)"
FUSEDJD_CUDA=0 FUSEDJD_CPU_LEVELS=default MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation --no-deps \
  -w "$WORK/wheel" "$SDIST" >"$WORK/wheel.log" 2>&1 || { tail -40 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/wheel/fusedjd-*.whl)
"$PY" -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --no-deps --disable-pip-version-check "$WHEEL"
cd "$WORK"
"$WORK/venv/bin/python" - <<'PYEOF'
import os, torch, fusedjd
from torchjd import aggregation as ta
from fusedjd import reference
from fusedjd.reference import rel_err
assert "/venv/" in fusedjd.__file__, f"fusedjd was imported from {fusedjd.__file__}, not from the installed wheel"
info = fusedjd.build_info()
assert info["cpu_levels"] == ["default"] and info["cpu_capability"] == "default", info
J = torch.randn(5, 3001, dtype=torch.float64)
assert rel_err(fusedjd.ops.gramian(J, [1000, 2001]), reference.gramian(J, [1000, 2001])) < 1e-12
torch.manual_seed(0); ours = fusedjd.GradVac()(J)
torch.manual_seed(0); theirs = ta.GradVac()(J)
assert rel_err(ours, theirs) < 1e-10
print(f"[fusedjd] the wheel installs and runs in a fresh virtual environment: {fusedjd.__file__}, {info}")
PYEOF
