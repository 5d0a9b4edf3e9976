"""The fused dual-cone projector (UPGrad, DualProj): the op against an enumeration of active sets
and against torchjd's quadprog projector, UPGrad's properties, the drop-in classes, jac_to_grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchjd import aggregation as ta
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.linalg import DualConeProjector, QuadprogProjector

import fusedjd
from fusedjd import ops, reference
from fusedjd.reference import rel_err

from conftest import DispatchRecorder

F64 = torch.float64


def _pd(m: int, n: int, seed: int, ridge: float = 1e-3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=gen, dtype=F64)
    return J @ J.T + ridge * torch.eye(m, dtype=F64)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_op_equals_the_enumeration_of_active_sets(m):
    for seed in range(4):
        G = _pd(m, 3 + seed * 3, seed)  # rank-deficient (m > n) once the ridge is small against G
        gen = torch.Generator().manual_seed(100 + seed)
        U = torch.randn(6, m, generator=gen, dtype=F64)
        V = ops.dual_cone(U, G)
        assert V.shape == U.shape and V.dtype == F64
        assert (V >= U).all()  # feasible: v >= u
        assert rel_err(V, reference.dual_cone(U, G)) < 1e-12
        assert rel_err(ops.dual_cone(U[2], G), V[2]) == 0  # a vector [m] like a row of [k, m]


def _jacobians():
    """Named Jacobians: well-conditioned, rank-deficient (m > n), nearly collinear rows, a zero row,
    conflicting rows, and scaled ones."""
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    base = r(6, 40)
    collinear = r(1, 30).repeat(5, 1) * torch.tensor([[1.0], [2.0], [-1.0], [0.5], [-3.0]], dtype=F64) + 1e-7 * r(5, 30)
    zero_row = r(5, 20)
    zero_row[2] = 0
    out = {
        "well-conditioned": base,
        "rank-deficient": r(12, 5),
        "nearly-collinear": collinear,
        "zero-row": zero_row,
        "conflicting": torch.cat([base[:3], -base[:3] + 0.3 * r(3, 40)]),
        "scaled-1e-8": base * 1e-8,
        "scaled-1e8": base * 1e8,
    }
    for m in (16, 32, 64, 128):
        out[f"m={m}"] = r(m, 2 * m // 3)
    return out


JACOBIANS = _jacobians()


@pytest.mark.parametrize("name", list(JACOBIANS))
def test_projector_equals_quadprog(name):
    """Weights equal to torchjd's QuadprogProjector within 1e-9 relative (float64) for UPGrad's
    right-hand sides (the identity), DualProj's (the mean), arbitrary U [k, m] and a vector [m], with
    the default parameters and with ``norm_eps = 0``: the Gramian of ``scaled-1e-8`` (trace 2e-14) is
    below the default ``norm_eps``, where both answer ``max(U, 0)`` without solving anything; with
    ``norm_eps = 0`` it is solved like the others."""
    J = JACOBIANS[name]
    G = J @ J.T
    m = G.shape[0]
    gen = torch.Generator().manual_seed(m)
    solved = 0
    for mine, theirs in ((fusedjd.Projector(), QuadprogProjector()),
                         (fusedjd.Projector(norm_eps=0.0), QuadprogProjector(norm_eps=0.0))):
        for U in (torch.eye(m, dtype=F64), torch.full((m,), 1.0 / m, dtype=F64),
                  torch.randn(3, m, generator=gen, dtype=F64), torch.rand(m, generator=gen, dtype=F64)):
            got, expected = mine(U, G), theirs(U, G)
            assert got.shape == expected.shape and got.dtype == expected.dtype
            assert rel_err(got, expected) < 1e-9, (name, mine, rel_err(got, expected))
            solved += mine.norm_eps == 0 and rel_err(expected, U.clamp(min=0)) > 1e-3  # the projection moved u
    assert solved >= (1 if m == 1 else 2), (name, solved)  # (m = 1: a 1 x 1 problem moves only a negative u)


@pytest.mark.parametrize("scale", [1e-100, 1e-30, 1e-8, 3.5, 1e8, 1e30, 1e100])
def test_op_at_every_scale(scale):
    """The op itself does not normalize (Projector divides by the trace before it): its tolerances
    are relative to G and u, so ``dual_cone(U, s G)`` is the enumeration's answer at every scale,
    rank-deficient Gramians and conflicting rows included."""
    for name in ("well-conditioned", "conflicting", "zero-row", "rank-deficient"):
        J = JACOBIANS[name][:12]
        G = J @ J.T + 1e-6 * (J @ J.T).diagonal().mean() * torch.eye(J.shape[0], dtype=F64)
        U = torch.cat([torch.eye(G.shape[0], dtype=F64),
                       torch.randn(2, G.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)])
        V = ops.dual_cone(U, scale * G)
        expected = reference.dual_cone(U, G)
        assert rel_err(V, expected) < 1e-9, (name, scale, rel_err(V, expected))
        assert rel_err(expected, U.clamp(min=0)) > 1e-2, name  # a real projection, not max(u, 0)


def test_projector_at_m_256():
    J = torch.randn(256, 100, dtype=F64, generator=torch.Generator().manual_seed(1))
    G = J @ J.T
    U = torch.eye(256, dtype=F64)[::37]  # 7 of UPGrad's right-hand sides (quadprog takes seconds for all)
    assert rel_err(fusedjd.Projector()(U, G), QuadprogProjector()(U, G)) < 1e-9


def _family(name: str, m: int, seed: int) -> torch.Tensor:
    """A Jacobian [m, n] of a named family (torchjd's test families among them): random (n = 2 m),
    rank-deficient (n = m / 2 + 1), strongly stationary (a positive combination of the rows is 0),
    strictly weakly stationary (a non-negative one, with zeros, and no positive one), non-weak (no
    non-negative combination is 0), scaled by 1e-8 and 1e8, and with zero rows."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    if name in ("strong", "weak"):
        w = torch.rand(m, generator=gen, dtype=F64) + 0.1
        if name == "weak":
            w[: m // 3] = 0.0  # a third of the rows out of the vanishing combination
        A = r(m, max(1, m // 2))
        return A - torch.outer(w, w @ A) / (w @ w)
    if name == "non-weak":  # every row has a positive component along one common direction
        A = r(m, m + 2)
        A[:, 0] = A[:, 0].abs() + 1.0
        return A
    J = r(m, m // 2 + 1) if name == "rank-deficient" else r(m, 2 * m)
    if name == "zero-rows":
        J[:: 3] = 0.0
    return J * {"scaled-1e-8": 1e-8, "scaled-1e8": 1e8}.get(name, 1.0)


FAMILIES = ["random", "rank-deficient", "strong", "weak", "non-weak", "scaled-1e-8", "scaled-1e8", "zero-rows"]


@pytest.mark.parametrize("m", [1, 2, 7, 33, 128, 512])
def test_kkt_conditions_across_families(m):
    """UPGrad's m right-hand sides and DualProj's one on fusedjd.Projector's Gramian (trace-normalised,
    reg_eps I added; norm_eps = 1e-30 so that the scaled-1e-8 family is solved too) of every family: the
    KKT conditions hold within 1e-12 relative in float64; where quadprog solves in a moment
    (m ≤ 33), the weights equal quadprog's within 1e-9; and the weights are the same for the rows
    in another order (a permutation of u and G) within 1e-12. Block principal pivoting, not its
    fallback, solves at least 9 in 10 of the right-hand sides of every family (the answers alone
    cannot tell: the fallback is exact too, only slower; a factor that loses accuracy shows here)."""
    projector = fusedjd.Projector(norm_eps=1e-30)
    for seed, name in enumerate(FAMILIES):
        J = _family(name, m, seed)
        G = J @ J.T
        trace = G.trace()
        Gn = (G / trace if trace >= 1e-30 else torch.zeros_like(G)) + 1e-4 * torch.eye(m, dtype=F64)
        for U in (torch.eye(m, dtype=F64), torch.full((1, m), 1.0 / m, dtype=F64)):
            V = projector(U, G)
            assert rel_err(V, ops.dual_cone(U, Gn)) < 1e-13  # the projector solves Gn
            residuals = reference.dual_cone_kkt(V, U, Gn)
            assert max(residuals) <= 1e-12, (name, m, residuals)
            paths = torch.ops.fusedjd._dual_cone_paths(U, Gn)
            assert paths.shape == (U.shape[0],) and (paths == 0).double().mean() >= 0.9, (name, m, paths)
            if m <= 33:
                assert rel_err(V, QuadprogProjector(norm_eps=1e-30)(U, G)) < 1e-9, name
            perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
            Vp = projector(U[:, perm], G[perm][:, perm])
            assert rel_err(Vp, V[:, perm]) < 1e-12, (name, m, rel_err(Vp, V[:, perm]))
        if m >= 7:  # a real projection, not u itself
            assert rel_err(projector(torch.eye(m, dtype=F64), G), torch.eye(m, dtype=F64)) > 1e-3, name


@pytest.mark.parametrize("m,rank,fallback", [(96, 20, True), (200, 150, False)])
def test_singular_gramian_at_batch_size(m, rank, fallback):
    """reg_eps = 0 and a rank-deficient J. At rank 20 the free sets outnumber the rank, so G_PP is
    singular and block principal pivoting hands every one of UPGrad's right-hand sides to the
    active-set method, which sets the dependent rows aside; at rank 150 the free sets fit in the
    rank and block principal pivoting solves them on the singular G. The solution v is not unique,
    its objective vᵀGv is: the
    KKT conditions hold within 1e-9, and the objective is at most quadprog's on the barely
    regularised problem (+1e-9 of max G_ii |v|₁²)."""
    J = torch.randn(m, rank, generator=torch.Generator().manual_seed(m), dtype=F64)
    G = J @ J.T
    Gn = G / G.trace()
    U = torch.eye(m, dtype=F64)
    V = fusedjd.Projector(reg_eps=0.0)(U, G)
    assert max(reference.dual_cone_kkt(V, U, Gn)) <= 1e-9
    paths = torch.ops.fusedjd._dual_cone_paths(U, Gn)  # 0: block principal pivoting; else the fallback
    assert ((paths > 0) if fallback else (paths == 0)).all(), paths
    rows = torch.arange(0, m, 11)  # (quadprog takes seconds for all of them)
    expected = QuadprogProjector(reg_eps=1e-12)(U[rows], G)
    assert (expected >= U[rows] - 1e-9).all()
    ours, theirs = ((V[rows] @ Gn) * V[rows]).sum(1), ((expected @ Gn) * expected).sum(1)
    scale = Gn.diagonal().max() * V[rows].abs().sum(1) ** 2
    assert (ours <= theirs + 1e-9 * scale).all(), (ours - theirs) / scale


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("cls,tol32", [(fusedjd.UPGrad, 5e-7), (fusedjd.DualProj, 2e-7)])
def test_permutation_invariant_like_torchjd(cls, tol32, dtype):
    """torchjd's permutation tests of UPGrad and DualProj (atol = rtol = 5e-7 and 2e-7 in float32;
    1e-12 here in float64): the aggregation of the rows in five random orders equals the
    original's, on matrices of torchjd's shapes and of every family above."""
    tol = tol32 if dtype == torch.float32 else 1e-12
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.randn(*shape, generator=gen, dtype=F64) for shape in ((2, 5), (5, 7), (9, 37), (32, 114), (50, 100))]
    matrices += [_family(name, 16, seed) for seed, name in enumerate(FAMILIES) if not name.startswith("scaled")]
    aggregator = cls()
    for J in matrices:
        J = J.to(dtype)
        expected = aggregator(J)
        for _ in range(5):
            perm = torch.randperm(J.shape[0], generator=gen)
            torch.testing.assert_close(aggregator(J[perm]), expected, atol=tol, rtol=tol)


def test_float32_on_the_aggregated_vector():
    """float32: 1e-5 on the aggregated vector Jᵀw (the weights are unique only up to J's null space)."""
    for name in ("well-conditioned", "rank-deficient", "conflicting", "m=64"):
        J = JACOBIANS[name].float()
        got = fusedjd.UPGrad()(J)
        expected = ta.UPGrad()(J)
        assert got.dtype == torch.float32
        assert rel_err(got, expected) < 1e-5, name


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("cls,theirs", [(fusedjd.UPGrad, ta.UPGrad), (fusedjd.DualProj, ta.DualProj)])
def test_half_precision_matrices(dtype, bound, cls, theirs):
    """float16 and bfloat16 matrices (torchjd's quadprog projector refuses bfloat16: numpy has no
    such dtype) against torchjd's float64 result on the very same values, m = 2 to 32 with a
    conflicting pair of rows. The fused route computes the Gramian and the weights in float32 and
    rounds only the combination to the matrix's dtype: measured at most 2.5e-4 (float16) and
    2.4e-3 (bfloat16) relative, about the output's own rounding (bounds 4x that). The Mean of the
    rows is 32-52 % away from these results."""
    gen = torch.Generator().manual_seed(3)
    for m in (2, 5, 9, 16, 32):
        J = torch.randn(m, 40, generator=gen, dtype=F64)
        J[m // 2] = -J[0] + 0.3 * torch.randn(40, generator=gen, dtype=F64)
        J = J.to(dtype)
        expected = theirs()(J.double())
        got = cls()(J)
        assert got.dtype == dtype
        assert rel_err(got, expected) < bound, (m, rel_err(got, expected))
        assert rel_err(J.double().mean(0), expected) > 0.3 if cls is fusedjd.UPGrad else True


def test_upgrad_is_non_conflicting_permutation_invariant_and_linear():
    for name, J in JACOBIANS.items():
        if name.startswith("scaled"):
            continue
        d = fusedjd.UPGrad(projector=fusedjd.Projector(reg_eps=0.0))(J)
        # non-conflicting: every row's inner product with the update is >= 0 (to rounding)
        assert (J @ d >= -1e-9 * J.norm(dim=1) * d.norm()).all(), name
        perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(0))
        assert rel_err(fusedjd.UPGrad()(J[perm]), fusedjd.UPGrad()(J)) < 1e-9, name
        # linear in J (positively homogeneous): the projector divides G by its trace, so this holds
        # by construction; test_op_at_every_scale checks the solver itself at every scale
        assert rel_err(fusedjd.UPGrad()(3.5 * J), 3.5 * fusedjd.UPGrad()(J)) < 1e-9, name


def test_hand_worked_m_2():
    """g1 = (1, 0), g2 = (-1, 1): projecting g1/2 gives v = (1/2, 1/4), projecting g2/2 gives
    v = (1/2, 1/2); UPGrad's weights are their sum (1, 3/4) and its update (1/4, 3/4). Orthogonal
    rows are not changed: the update is their mean."""
    exact = fusedjd.Projector(reg_eps=0.0)
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    V = exact(torch.eye(2, dtype=F64) / 2, J @ J.T)
    torch.testing.assert_close(V, torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(fusedjd.UPGrad(projector=exact)(J), torch.tensor([0.25, 0.75], dtype=F64),
                               rtol=0, atol=1e-15)
    J = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=F64)
    torch.testing.assert_close(fusedjd.UPGrad(projector=exact)(J), torch.tensor([1.0, 2.0], dtype=F64),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_classes_equal_torchjds_defaults(dtype):
    gen = torch.Generator().manual_seed(8)
    tol = 1e-9 if dtype == F64 else 1e-5
    for m in (1, 2, 5, 9):
        J = torch.randn(m, 30, generator=gen, dtype=dtype)
        pref = torch.rand(m, generator=gen, dtype=dtype)
        for ours, theirs in ((fusedjd.UPGrad(), ta.UPGrad()), (fusedjd.DualProj(), ta.DualProj()),
                             (fusedjd.UPGrad(pref), ta.UPGrad(pref)), (fusedjd.DualProj(pref), ta.DualProj(pref))):
            assert rel_err(ours(J), theirs(J)) < tol, (m, ours)
        G = J @ J.T
        for ours, theirs in ((fusedjd.UPGradWeighting(), ta.UPGradWeighting()),
                             (fusedjd.DualProjWeighting(), ta.DualProjWeighting())):
            assert rel_err(ours(G), theirs(G)) < tol, (m, ours)


def test_classes_are_torchjds_with_another_default():
    assert isinstance(fusedjd.Projector(), DualConeProjector)
    for cls, base in ((fusedjd.UPGrad, ta.UPGrad), (fusedjd.DualProj, ta.DualProj),
                      (fusedjd.UPGradWeighting, ta.UPGradWeighting), (fusedjd.DualProjWeighting, ta.DualProjWeighting)):
        agg = cls()
        assert isinstance(agg, base) and isinstance(agg.projector, fusedjd.Projector)
        agg.projector = None  # torchjd's setter semantics: None is the default projector
        assert isinstance(agg.projector, fusedjd.Projector)
        agg.projector = QuadprogProjector()
        assert isinstance(agg.projector, QuadprogProjector)
    assert repr(fusedjd.Projector()) == "Projector(norm_eps=0.0001, reg_eps=0.0001)"
    assert repr(fusedjd.UPGrad()) == repr(ta.UPGrad()).replace("QuadprogProjector", "Projector")
    assert repr(fusedjd.DualProj()) == repr(ta.DualProj()).replace("QuadprogProjector", "Projector")
    pref = torch.tensor([1.0, 2.0])
    assert str(fusedjd.UPGrad(pref)) == str(ta.UPGrad(pref))
    assert str(fusedjd.DualProj()) == str(ta.DualProj()) == "DualProj"
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="norm_eps"):
            fusedjd.Projector(norm_eps=bad)
        with pytest.raises(ValueError, match="reg_eps"):
            fusedjd.Projector(reg_eps=bad)
    with pytest.raises(TypeError, match="reg_eps"):
        fusedjd.Projector(reg_eps="1e-4")


def test_normalization_below_norm_eps_and_non_finite_input():
    """A Gramian whose trace is below norm_eps is replaced by zeros, as torchjd does (the projection
    is then u itself: reg_eps I alone); a non-finite Gramian gives NaN weights, no exception."""
    G = 1e-6 * torch.eye(3, dtype=F64)
    U = torch.eye(3, dtype=F64)
    torch.testing.assert_close(fusedjd.Projector()(U, G), QuadprogProjector()(U, G))
    bad = _pd(3, 5, 0)
    bad[0, 1] = float("nan")
    assert torch.isnan(fusedjd.Projector()(U, bad)).all()
    assert torch.isnan(ops.dual_cone(torch.tensor([1.0, float("inf"), 0.0], dtype=F64), _pd(3, 5, 0))).all()


def test_op_errors_name_the_argument():
    G = _pd(3, 5, 0)
    with pytest.raises(RuntimeError, match=r"`G` must be a square Gramian \[m, m\], got shape \[3, 2\]"):
        ops.dual_cone(torch.ones(3, dtype=F64), G[:, :2])
    with pytest.raises(RuntimeError, match=r"`U` must have shape \[\.\.\., m\] with m = 3 \(the size of `G`\), got shape \[4\]"):
        ops.dual_cone(torch.ones(4, dtype=F64), G)
    with pytest.raises(RuntimeError, match=r"`U` must be float16, bfloat16, float32 or float64, got Long"):
        ops.dual_cone(torch.ones(3, dtype=torch.long), G)
    with pytest.raises(RuntimeError, match=r"`G` must be float16, bfloat16, float32 or float64, got Float8_e4m3fn"):
        ops.dual_cone(torch.ones(3), G.to(torch.float8_e4m3fn))
    assert ops.dual_cone(torch.ones(2, 0), G[:0, :0]).shape == (2, 0)


def test_jac_to_grad_with_upgrad_equals_torchjds():
    """fusedjd.jac_to_grad with fusedjd.UPGrad equals torchjd's jac_to_grad with torchjd's UPGrad on
    a small multi-task model (the Gramian and the combination fused, the projector fused)."""

    def grads(agg, ours: bool):
        torch.manual_seed(0)
        shared = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6)).double()
        heads = [nn.Linear(6, 1).double() for _ in range(4)]
        x = torch.randn(16, 5, dtype=F64)
        feats = shared(x)
        losses = [h(feats).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]
        mtl_backward(losses, features=feats)
        (fusedjd.jac_to_grad if ours else jac_to_grad)(list(shared.parameters()), agg)
        return torch.cat([p.grad.flatten() for p in shared.parameters()])

    assert rel_err(grads(fusedjd.UPGrad(), True), grads(ta.UPGrad(), False)) < 1e-9
    assert rel_err(grads(fusedjd.DualProj(), True), grads(ta.DualProj(), False)) < 1e-9


def test_compiled_upgrad_fullgraph():
    J = torch.randn(5, 40, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    fn = torch.compile(fusedjd.UPGrad(), fullgraph=True)
    assert rel_err(fn(J), fusedjd.UPGrad()(J)) < 1e-12
    torch._dynamo.reset()


def test_nearly_singular_gramian_without_regularization():
    """reg_eps = 0 and a row that is a combination of others plus 4e-8 noise: the rows whose
    Cholesky pivot is lost in rounding are set aside, and the projection stays at the optimum
    (checked against the KKT conditions and the enumeration of free sets)."""
    worst = 0.0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        J = torch.randn(7, 12, generator=gen, dtype=F64)
        J[3] = 0.7 * J[0] - 1.3 * J[5] + 4e-8 * torch.randn(12, generator=gen, dtype=F64)
        G = J @ J.T
        U = torch.eye(7, dtype=F64)
        V = ops.dual_cone(U, G)
        assert (V >= U).all()
        W = V @ G  # the gradients at the solution: >= 0 everywhere, 0 where v > u
        scale = G.diagonal().max() * V.abs().sum(1, keepdim=True)
        assert (W >= -1e-6 * scale).all(), seed  # (the set-aside row: its independent part is 4e-8)
        assert ((V - U) * W <= 1e-9 * scale * V.abs().sum(1, keepdim=True)).all(), seed
        ours = (V @ J).norm(dim=1)
        enumerated = (reference.dual_cone(U, G) @ J).norm(dim=1)
        worst = max(worst, float(((ours - enumerated) / enumerated).max()))
    assert worst < 1e-6, worst  # never a longer projection than the enumeration's


def test_projector_detaches_like_torchjd():
    J = torch.randn(3, 5, dtype=F64, requires_grad=True)
    G = J @ J.T
    out = fusedjd.Projector()(torch.eye(3, dtype=F64), G)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("cls,theirs", [(fusedjd.UPGrad, ta.UPGrad), (fusedjd.DualProj, ta.DualProj)])
def test_classes_take_the_fused_route(cls, theirs):
    """UPGrad and DualProj on a matrix: the fused Gramian, the projector's op and the fused
    combination, no J @ J.T or w @ J of torchjd's (a dispatch mode sees every op); with hooks on
    ``weighting`` or ``gramian_weighting`` they run, on the same route, with the same result."""
    J = torch.randn(6, 300, dtype=F64, generator=torch.Generator().manual_seed(4))
    with DispatchRecorder() as rec:
        out = cls()(J)
    assert {"fusedjd.gramian", "fusedjd.dual_cone", "fusedjd.combine"} <= rec.packets(), rec.seen
    assert not {"aten.mm", "aten.matmul"} & rec.packets(), rec.seen
    assert rel_err(out, theirs()(J)) < 1e-9
    for module in ("weighting", "gramian_weighting"):
        agg, calls = cls(), []
        getattr(agg, module).register_forward_hook(lambda mod, args, result: calls.append(result))
        with DispatchRecorder() as rec:
            hooked = agg(J)
        assert len(calls) == 1 and "fusedjd.gramian" in rec.packets() and "aten.mm" not in rec.packets(), module
        assert rel_err(hooked, out) < 1e-12, module
