"""Planted wrong answers, one at a time, that the test suite must catch (scripts/check_mutants.sh).

With ``FUSEDJD_MUTANT=<name>`` in the environment, ``conftest.py`` calls :func:`plant` before any
test runs: it replaces one function of fusedjd (an attribute of :mod:`fusedjd.ops` or of a class,
which every caller looks up at call time) with a plausible wrong version of it. Each mutant names
the tests that must fail under it; the check runs them and fails if one passes. Test-only: never
installed, and nothing happens without the variable.

The wrong versions are written in Python over fusedjd's own ops and :mod:`fusedjd.reference`, so
that each differs from the right answer in exactly the way its name says.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import fusedjd
from fusedjd import _distributed, ops, reference

ENV = "FUSEDJD_MUTANT"


def _nan_on_rank_deficient_float32() -> None:
    """GradVac and PCGrad give NaN for a rank-deficient float32 J with m >= 16 (a guard that
    fails where rounding matters most)."""
    right = ops.aggregate

    def wrong(J, group_sizes, targets, beta, eps, pcgrad, perms=None):
        out, W = right(J, group_sizes, targets, beta, eps, pcgrad, perms)
        blocks = ops._blocks(J)
        m = blocks[0].shape[0]
        if blocks[0].dtype == torch.float32 and m >= 16:
            # rank-deficient to float32's precision (its rounding makes any J full-rank in float64)
            if torch.linalg.matrix_rank(torch.cat(blocks, dim=1).double(), rtol=1e-5) < m:
                return torch.full_like(out, float("nan")), torch.full_like(W, float("nan"))
        return out, W

    ops.aggregate = wrong


def _mean_for_half_jacobians() -> None:
    """The Gramian-weighted route (fusedjd's UPGrad and DualProj, and torchjd's Gramian-weighted
    aggregators in jac_to_grad) weighs the rows of a float16/bfloat16 Jacobian uniformly (Mean)
    instead of calling the weighting."""
    right = _distributed.sharded_aggregate

    def wrong(J, sizes, group, weigh, aggregator):
        if J[0].dtype in (torch.float16, torch.bfloat16):
            def weigh(G):  # noqa: F811 (the planted wrong weighting)
                return torch.full(G.shape[:2], 1.0 / G.shape[1], dtype=G.dtype, device=G.device)
        return right(J, sizes, group, weigh, aggregator)

    _distributed.sharded_aggregate = wrong


def _clamp_instead_of_projection() -> None:
    """The dual-cone projector answers max(u, 0) (u itself for UPGrad) without solving."""
    ops.dual_cone = lambda U, G: U.clamp(min=0).to(G.dtype)


def _reference_loop(G, perms, targets, beta, eps, pcgrad):
    """The loops of :mod:`fusedjd.reference` with the last visit of every row skipped (an
    off-by-one in the loop bound), targets updated in place in their dtype."""
    short = perms[..., :-1].cpu()  # sync-ok: a test-only mutant
    if pcgrad:
        W = reference.pcgrad_loop(G, short)
    else:
        T = targets.detach().double().cpu().clone()  # sync-ok: a test-only mutant
        W = reference.gradvac_loop(G, short, T, beta, eps)
        targets.copy_(T)
    return W.to(G.dtype).to(G.device)


def _loop_skips_last_pair() -> None:
    """The GradVac and PCGrad loops skip the last pair of every row's visit order."""

    def aggregate(J, group_sizes, targets, beta, eps, pcgrad, perms=None):
        blocks = ops._blocks(J)
        k, m = len(group_sizes), blocks[0].shape[0]
        if perms is None:
            perms = ops.draw_perms(k, m, pcgrad)
        G = ops.gramian(blocks, group_sizes)
        W = _reference_loop(G, perms, targets, beta, eps, pcgrad)
        return ops.combine(blocks, W, group_sizes), W

    ops.aggregate = aggregate
    ops.gradvac_loop = lambda G, perms, targets, beta, eps: _reference_loop(G, perms, targets, beta, eps, False)
    ops.pcgrad_loop = lambda G, perms: _reference_loop(G, perms, None, 0.0, 0.0, True)


def _drop_last(out, blocks):
    """Zeroes what the last block of columns contributed: the last matrix of a list, or the ragged
    end (``n % 64`` columns, 64 when none) of a single matrix."""
    n_last = blocks[-1].shape[1] if len(blocks) > 1 else (out.shape[0] % 64 or 64)
    out = out.clone()
    out[max(out.shape[0] - n_last, 0):] = 0
    return out


def _combine_drops_last_block() -> None:
    """The combination leaves out the last block of columns."""
    right_combine, right_aggregate = ops.combine, ops.aggregate

    def combine(J, weights, group_sizes):
        return _drop_last(right_combine(J, weights, group_sizes), ops._blocks(J))

    def aggregate(J, *args, **kwargs):
        out, W = right_aggregate(J, *args, **kwargs)
        return _drop_last(out, ops._blocks(J)), W

    ops.combine, ops.aggregate = combine, aggregate


def _moco_skips_the_ema() -> None:
    """MoCo's step replaces Y by J instead of moving it toward J (no exponential moving average)."""
    right = ops.moco_step

    def wrong(J, Y, lam, step, beta, beta_sigma, gamma, gamma_sigma, rho, projection, gram=None):
        Y.copy_(torch.cat(ops._blocks(J), dim=1))
        return right(J, Y, lam, step, 0.0, beta_sigma, gamma, gamma_sigma, rho, projection, gram)

    ops.moco_step = wrong


def _mgda_last_index_on_ties() -> None:
    """MGDA's Frank-Wolfe step goes toward the last row with the smallest (G alpha)_i where torchjd
    takes the first (argmin with <=): duplicated rows of J get other weights."""

    def wrong(G, epsilon=0.001, max_iters=100):
        Gd = G.double()
        m = Gd.shape[0]
        alpha = torch.full((m,), 1.0 / m, dtype=torch.float64, device=G.device)
        for _ in range(max_iters):
            Ga = Gd @ alpha
            t = m - 1 - int(torch.argmin(Ga.flip(0)))  # sync-ok: a test-only mutant
            a, b, c = float(alpha @ Gd[:, t]), float(alpha @ Ga), float(Gd[t, t])  # sync-ok: a test-only mutant
            gamma = 1.0 if c <= a else 0.0 if b <= a else (b - a) / (b + c - 2 * a)
            alpha = (1 - gamma) * alpha
            alpha[t] += gamma
            if gamma < epsilon:
                break
        return alpha.to(G.dtype)

    ops.mgda = wrong


# name: (what plants it, the tests that must fail under it: node ids, a parametrized id's prefix
# naming all its cases, of which at least one must fail)
MUTANTS = {
    "nan-on-rank-deficient-float32": (_nan_on_rank_deficient_float32, [
        "tests/test_gradvac.py::test_float32_on_rank_deficient_jacobians_stays_near_the_float64_result",
    ]),
    "mean-for-half-jacobians": (_mean_for_half_jacobians, [
        "tests/test_jac_to_grad.py::test_half_jacobians",
    ]),
    "clamp-instead-of-projection": (_clamp_instead_of_projection, [
        "tests/test_projector.py::test_projector_equals_quadprog[scaled-1e-8]",
        "tests/test_projector.py::test_op_at_every_scale",
        "tests/test_projector.py::test_op_equals_the_enumeration_of_active_sets",
        "tests/test_projector.py::test_half_precision_matrices",
    ]),
    "loop-skips-last-pair": (_loop_skips_last_pair, [
        "tests/test_gradvac.py::test_parity_with_torchjd_over_20_calls",
        "tests/test_jac_to_grad.py::test_gradvac_equals_torchjds_own_gradvac",
        "tests/test_jac_to_grad.py::test_equals_torchjd_jac_to_grad",
        "tests/test_ops.py",
    ]),
    "combine-drops-last-block": (_combine_drops_last_block, [
        "tests/test_ops.py",
        "tests/test_jac_to_grad.py::test_equals_torchjd_jac_to_grad",
        "tests/test_gradvac.py::test_parity_with_torchjd_over_20_calls",
    ]),
    "moco-skips-the-ema": (_moco_skips_the_ema, [
        "tests/test_moco.py",
        "tests/test_jac_to_grad.py::test_equals_torchjd_jac_to_grad",
    ]),
    "mgda-last-index-on-ties": (_mgda_last_index_on_ties, [
        "tests/test_mgda.py::test_weights_equal_torchjd",
    ]),
}


def plant() -> str | None:
    """Plants the mutant named by ``FUSEDJD_MUTANT`` (none without it); returns its name."""
    name = os.environ.get(ENV)
    if not name:
        return None
    if name not in MUTANTS:
        raise ValueError(f"{ENV} must be one of {sorted(MUTANTS)}, got {name!r}")
    MUTANTS[name][0]()
    assert fusedjd.ops is ops
    return name


def check(python: str = sys.executable) -> int:
    """Runs, for each mutant, each of its tests in a process of its own with the mutant planted
    (``pytest -x``: up to its first failing case). Returns 0 when every one failed, 1 otherwise."""
    here = Path(__file__).resolve().parent.parent
    survived = []
    for name, (_, tests) in MUTANTS.items():
        for test in tests:
            env = {**os.environ, ENV: name}
            done = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
                                  cwd=here, env=env, capture_output=True, text=True, timeout=900)
            last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
            caught = done.returncode == 1 and " failed" in last  # 1: tests failed (not a usage or collection error)
            print(f"[mutants] {name:32s} {'caught' if caught else 'SURVIVED'} by {test}: {last}", flush=True)
            if not caught:
                survived.append((name, test, done.stdout[-3000:] + done.stderr[-3000:]))
    for name, test, output in survived:
        print(f"\n[mutants] {name} passed {test}; its output:\n{output}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(check())
