"""The CPU kernels are built once per instruction-set level and the best one this CPU supports is
loaded (fusedjd/_cpu.py). Every level this machine can run is checked against the float64
reference, each in a process of its own (tests/cpu_level_check.py); scripts/check_cpu_levels.sh
runs the lower ones on emulated CPUs that lack the higher instruction sets (qemu)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusedjd
from fusedjd import _C, _cpu

HERE = Path(__file__).resolve().parent
BUILT = list(_cpu.BUILT)
SUPPORTED = list(_C.cpu_supports())


def _run(level: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != _cpu.ENV}
    if level is not None:
        env[_cpu.ENV] = level
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def test_the_best_level_is_loaded():
    info = fusedjd.build_info()
    if info["cpu_capability"] == "built-in":
        pytest.skip("this build compiles its CPU kernels into fusedjd._C (the sanitizer build): no level to choose")
    expected = next(level for level in _cpu.LEVELS if level in BUILT and level in SUPPORTED)
    if os.environ.get(_cpu.ENV):
        expected = _cpu._choose(BUILT, SUPPORTED, os.environ[_cpu.ENV])
    assert info["cpu_capability"] == expected
    assert info["cpu_levels"] == BUILT and "default" in BUILT


@pytest.mark.parametrize("level", _cpu.LEVELS)
def test_each_level_matches_the_reference(level):
    if level not in BUILT:
        pytest.skip(f"the {level!r} CPU kernels were not built (built: {BUILT})")
    if level not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {level!r} CPU kernels (it runs: {SUPPORTED}); "
                    "scripts/check_cpu_levels.sh runs the lower levels under emulated CPUs")
    done = _run(level, str(HERE / "cpu_level_check.py"), level)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cpu level {level}: ok" in done.stdout


def test_choice_rules():
    """The best level built and supported, capped by the environment variable; a bad value is
    refused by name."""
    assert _cpu._choose(["avx512", "avx2", "default"], ["avx2", "default"], None) == "avx2"
    assert _cpu._choose(["avx512", "avx2", "default"], ["avx512", "avx2", "default"], "avx2") == "avx2"
    assert _cpu._choose(["avx2", "default"], ["avx512", "avx2", "default"], "avx512") == "avx2"
    assert _cpu._choose(["avx512", "avx2", "default"], ["avx512", "avx2", "default"], "default") == "default"
    with pytest.raises(ValueError, match=r"Environment variable `FUSEDJD_CPU_CAPABILITY` must be one of "
                                         r"\('avx512', 'avx2', 'default'\)\. Found FUSEDJD_CPU_CAPABILITY='sse'\."):
        _cpu._choose(["default"], ["default"], "sse")
    with pytest.raises(ImportError, match="no CPU kernels this CPU can run"):
        _cpu._choose(["avx512"], ["avx2", "default"], None)
    done = _run("sse", "-c", "import fusedjd")
    assert done.returncode != 0 and "FUSEDJD_CPU_CAPABILITY" in done.stderr
