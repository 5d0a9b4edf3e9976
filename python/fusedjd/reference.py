"""The executable specification of fusedjd: plain PyTorch versions of every kernel.

Each function here computes what the op of the same name in :mod:`fusedjd.ops` computes, written
for clarity, not speed: float64 by default, loops where the math is a loop, no fused passes. The
test suite checks every CPU and CUDA kernel against this module on fresh random inputs, and the
benchmark checks the results it times against it. The math and the contract are stated in
``docs/CONTRACT.md``; where this module and that text disagree, it is a bug in one of them.

Accuracy of the kernels against this module (relative error ``‖got − ref‖ / ‖ref‖``, the
reference run in float64 on the same input values) is bounded by :data:`TOLERANCE`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "TOLERANCE",
    "MoCo",
    "combine",
    "dual_cone",
    "dual_cone_kkt",
    "gradvac_loop",
    "gramian",
    "moco_step",
    "pcgrad_loop",
    "project_simplex",
    "rel_err",
]

_F64, _F32, _F16, _BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

#: Largest relative error of a kernel's output against this module, per quantity and input dtype.
#: Gramians and loop weights accumulate in float32 (float64 for float64 input); the combination is
#: rounded to the input dtype; MoCo's state is carried in the input dtype over several steps.
TOLERANCE: dict[str, dict[torch.dtype, float]] = {
    "gramian": {_F64: 1e-12, _F32: 1e-5, _F16: 1e-5, _BF16: 1e-5},
    "combine": {_F64: 1e-12, _F32: 1e-5, _F16: 2e-3, _BF16: 1e-2},
    "moco": {_F64: 1e-10, _F32: 1e-3, _F16: 3e-2, _BF16: 6e-2},
}


def rel_err(got: Tensor, ref: Tensor) -> float:
    """``‖got − ref‖ / ‖ref‖`` in float64 on the CPU (``‖got − ref‖`` when ``ref`` is zero); ``inf``
    when ``got`` is not finite, so a NaN never passes a tolerance."""
    a = got.detach().double().cpu()  # sync-ok: the reference runs on the CPU, in float64
    b = ref.detach().double().cpu()  # sync-ok
    if not torch.isfinite(a).all():
        return float("inf")
    diff = (a - b).norm().item()  # sync-ok (CPU tensors)
    denom = b.norm().item()  # sync-ok (CPU tensors)
    return diff / denom if denom > 0 else diff


def _groups(n: int, group_sizes: Sequence[int]) -> list[slice]:
    if sum(group_sizes) != n or any(s < 0 for s in group_sizes):
        raise ValueError(f"group_sizes={list(group_sizes)!r} must be non-negative and sum to n={n}")
    out, start = [], 0
    for s in group_sizes:
        out.append(slice(start, start + s))
        start += s
    return out


def gramian(J: Tensor, group_sizes: Sequence[int]) -> Tensor:
    """``[k, m, m]`` float64: ``G[g] = J_g J_gᵀ`` for the consecutive column groups ``J_g``."""
    Jd = J.detach().double().cpu()  # sync-ok: reference, CPU float64
    blocks = [Jd[:, cols] @ Jd[:, cols].T for cols in _groups(Jd.shape[1], group_sizes)]
    return torch.stack(blocks) if blocks else Jd.new_zeros((0, Jd.shape[0], Jd.shape[0]))


def combine(J: Tensor, weights: Tensor, group_sizes: Sequence[int]) -> Tensor:
    """``[n]`` float64: ``out[cols of g] = weights[g] @ J_g``."""
    Jd = J.detach().double().cpu()  # sync-ok: reference, CPU float64
    W = weights.detach().double().cpu()  # sync-ok: reference, CPU float64
    parts = [W[g] @ Jd[:, cols] for g, cols in enumerate(_groups(Jd.shape[1], group_sizes))]
    return torch.cat(parts) if parts else Jd.new_zeros((0,))


def _valid_orders(perms: Tensor, m: int) -> bool:
    """Every visited row lies in [0, m) and is not the visiting row itself (the kernels' rule)."""
    rows = torch.arange(m).view(1, m, 1)
    return bool(((perms >= 0) & (perms < m) & (perms != rows)).all())


def gradvac_loop(G: Tensor, perms: Tensor, targets: Tensor, beta: float, eps: float) -> Tensor:
    """The GradVac loop (``docs/CONTRACT.md`` §1) on each Gramian of ``G [k, m, m]``, in float64.

    Row ``i`` of group ``g`` starts as the unit coefficient vector ``e_i`` and visits the other
    rows in the order ``perms[g, i]``; for each visited row ``j``, with ``p = C G`` the corrected
    row and ``t = targets[g, i, j]``::

        if |p|² <= r M²:  c = 0, no correction                   (p is rounding noise)
        else:                                                   (c known within δ = r M² / |p|²)
            c = clamp(<p, g_j> / (|p| |g_j| + eps), -1, 1)       (0 when the denominator is 0)
            if c < t - δ and |g_j| > 0:
                C[j] += |p| (t s_c - c s_t) / (|g_j| s_t + eps)
                    s_c = sqrt(1 - c²), or 0 if 1 - c² <= 2 δ;  s_t = max(sqrt(1 - t²), floor)
            c = clamp(c, -(1 - δ), 1 - δ)                        (the value the target moves toward)
        targets[g, i, j] = (1 - beta) t + beta c

    The four guards (the clamp, 0/0 as 0, ``floor = ½ sqrt(machine eps of G's dtype)``, a value no
    unsaturated target's sine reaches, and the rounding test with ``M = Σ_a |C_a| |g_a|`` and
    ``r = machine eps of G's dtype``, the relative precision of the Gramian's entries) are the
    contract; elsewhere this is torchjd's GradVac. ``targets`` (float64, CPU, ``[k, m, m]``) is
    updated in place. Returns the weights ``[k, m]``: the column sums of the coefficient
    matrices. A non-finite ``G`` or an invalid visit order (one naming the row itself or a row outside ``[0, m)``) returns NaN weights and leaves
    ``targets`` untouched.
    """
    return _loop(G, perms, targets, beta, eps, pcgrad=False)


def pcgrad_loop(G: Tensor, perms: Tensor) -> Tensor:
    """The PCGrad loop: :func:`gradvac_loop` with the target fixed at 0 and no state, i.e.
    ``C[j] -= <p, g_j> / |g_j|²`` when ``<p, g_j> < 0`` and ``|g_j| > 0``."""
    return _loop(G, perms, None, 0.0, 0.0, pcgrad=True)


def _loop(G: Tensor, perms: Tensor, targets: Tensor | None, beta: float, eps: float, pcgrad: bool) -> Tensor:
    sine_floor = 0.5 * torch.finfo(G.dtype).eps ** 0.5
    precision = torch.finfo(G.dtype).eps
    Gd = G.detach().double().cpu()  # sync-ok: reference, CPU float64
    k, m = Gd.shape[0], Gd.shape[1]
    W = torch.zeros(k, m, dtype=torch.float64)
    if not torch.isfinite(Gd).all() or not _valid_orders(perms.cpu(), m):  # sync-ok: reference, CPU float64
        return torch.full((k, m), float("nan"), dtype=torch.float64)
    for g in range(k):
        for i in range(m):
            C = torch.zeros(m, dtype=torch.float64)
            C[i] = 1.0
            for j in perms[g, i].tolist():  # sync-ok: reference, CPU float64
                cG = C @ Gd[g]
                if pcgrad:
                    if cG[j] < 0 and Gd[g, j, j] > 0:
                        C[j] -= cG[j] / Gd[g, j, j]
                    continue
                norm_sq = C @ Gd[g] @ C
                magnitude = C.abs() @ Gd[g].diagonal().clamp(min=0).sqrt()
                noise = precision * magnitude
                t = targets[g, i, j].clone()
                if not norm_sq > noise * magnitude:  # p is rounding noise: cosine 0, no correction
                    targets[g, i, j] = (1 - beta) * t
                    continue
                delta = noise * magnitude / norm_sq  # the cosine's rounding
                ni = norm_sq.sqrt()
                nj = Gd[g, j, j].clamp(min=0).sqrt()
                denom = ni * nj + eps
                c = (cG[j] / denom).clamp(-1.0, 1.0) if denom > 0 else torch.zeros((), dtype=torch.float64)
                if c < t - delta and nj > 0:
                    sin_sq = 1 - c * c
                    sc = sin_sq.sqrt() if sin_sq > 2 * delta else torch.zeros((), dtype=torch.float64)
                    st = (1 - t * t).clamp(min=0).sqrt().clamp(min=sine_floor)
                    C[j] += ni * (t * sc - c * st) / (nj * st + eps)
                c = c.clamp(delta - 1, 1 - delta)
                targets[g, i, j] = (1 - beta) * t + beta * c
            W[g] += C
    return W


def dual_cone(U: Tensor, G: Tensor) -> Tensor:
    """For each ``u`` in ``U [..., m]``, the ``v >= u`` minimising ``vᵀ G v`` (``G`` positive definite),
    in float64, by enumeration of the free sets rather than the kernel's active-set steps: with
    ``v = u + x`` and ``c = G u``, the unique solution is the ``x >= 0`` that solves
    ``G_SS x_S = -c_S`` on its support ``S`` and has ``(c + G x)_i >= 0`` off it (the KKT
    conditions), found among all ``2^m`` sets in order of size. For tests: ``m <= 12``."""
    Gd = G.detach().double().cpu()  # sync-ok: reference, CPU float64
    m = Gd.shape[0]
    if m > 12:
        raise ValueError(f"reference.dual_cone enumerates 2^m free sets: m <= 12, got m = {m}")
    Ud = U.detach().double().cpu().reshape(-1, m)  # sync-ok: reference, CPU float64
    V = torch.empty_like(Ud)
    subsets = sorted(range(1 << m), key=lambda mask: bin(mask).count("1"))
    for r, u in enumerate(Ud):
        c = Gd @ u
        tol = 1e-10 * (float(c.abs().max()) if m else 0.0) + 1e-300  # sync-ok: reference
        for mask in subsets:
            S = [i for i in range(m) if mask >> i & 1]
            x = torch.zeros(m, dtype=torch.float64)
            if S:
                try:
                    x[S] = torch.linalg.solve(Gd[S][:, S], -c[S])
                except torch.linalg.LinAlgError:  # a singular G_SS: no unique minimiser on S
                    continue
            if (x >= 0).all() and ((c + Gd @ x) >= -tol * (1 + float(x.abs().sum()))).all():  # sync-ok: reference
                break
        V[r] = u + x
    return V.reshape(U.shape)


def dual_cone_kkt(V: Tensor, U: Tensor, G: Tensor) -> tuple[float, float, float]:
    """The KKT residuals of ``V`` (rows) as the solutions of ``min vᵀGv`` subject to ``v >= u`` for
    the rows ``u`` of ``U`` (``G`` symmetric), in float64, relative to ``max_i G_ii |v|_1`` (a bound
    on every ``|(Gv)_i|``): ``v >= u`` (primal), ``Gv >= 0`` (dual), ``(v - u)_i (Gv)_i = 0``
    (complementary slackness, also relative to ``|v - u|_inf``). A NaN in ``V`` gives NaN."""
    G, V = G.detach().double(), V.detach().double()
    U = U.detach().double().reshape(V.shape)
    Y = V @ G  # G symmetric: row r is G v_r
    scale = G.diagonal().max() * V.abs().sum(1, keepdim=True)
    X = V - U
    primal = float((-X).clamp(min=0).max() / V.abs().max().clamp(min=1e-300))  # sync-ok: reference
    dual = float(((-Y).clamp(min=0) / scale).max())  # sync-ok: reference
    slack = float(((X * Y).abs() / (scale * X.abs().amax(1, keepdim=True).clamp(min=1e-300))).max())  # sync-ok: reference
    return primal, dual, slack


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` onto the probability simplex: sort descending into ``u``, take
    the largest ``r`` with ``u_r − (u_1 + … + u_r − 1) / r > 0``, ``θ = (u_1 + … + u_r − 1) / r``,
    return ``max(v − θ, 0)``."""
    u, _ = torch.sort(v, descending=True)
    cssv = torch.cumsum(u, 0) - 1
    r = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - cssv / r > 0)[-1])
    return (v - cssv[rho] / (rho + 1)).clamp(min=0)


def moco_step(
    J: Tensor,
    Y: Tensor,
    lam: Tensor,
    step: int,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
    projection: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One MoCo step (``docs/CONTRACT.md`` §2), computed in the dtype of the inputs::

        k = step + 1;  b = beta / k^beta_sigma;  c = gamma / k^gamma_sigma
        Y ← Y − b (Y − J)
        λ ← S(λ − c (Y Yᵀ + rho I) λ)          (S: softmax, or the simplex projection)

    Returns ``(λ, λᵀ Y, Y, k)`` (new tensors; the inputs are not modified)."""
    k = step + 1
    b = beta / k**beta_sigma
    c = gamma / k**gamma_sigma
    Y = Y - b * (Y - J)
    m = J.shape[0]
    v = lam - c * ((Y @ Y.T + rho * torch.eye(m, dtype=Y.dtype, device=Y.device)) @ lam)
    lam = project_simplex(v) if projection else torch.softmax(v, 0)
    return lam, lam @ Y, Y, k


class MoCo:
    """Stateful MoCo on :func:`moco_step`: call it with ``J``, get ``(λ, λᵀ Y)``.

    :param dtype: Arithmetic dtype (float64 by default: the reference). ``None`` computes in the
        dtype and on the device of ``J``: plain PyTorch MoCo, the benchmark's baseline.
    """

    def __init__(self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, simplex="softmax",
                 dtype: torch.dtype | None = torch.float64):
        if simplex not in ("softmax", "projection"):
            raise ValueError(f"simplex must be 'softmax' or 'projection', got {simplex!r}")
        self.hyper = (beta, beta_sigma, gamma, gamma_sigma, rho, simplex == "projection")
        self.dtype = dtype
        self.Y: Tensor | None = None
        self.lam: Tensor | None = None
        self.step = 0

    def __call__(self, J: Tensor) -> tuple[Tensor, Tensor]:
        if self.dtype == torch.float64:
            J = J.detach().to(torch.float64).cpu()  # sync-ok: the reference runs on the CPU
        else:
            J = J.detach().to(self.dtype or J.dtype)
        m, n = J.shape
        if self.Y is None or self.Y.shape != J.shape:
            self.Y = torch.zeros(m, n, dtype=J.dtype, device=J.device)
            self.lam = torch.full((m,), 1.0 / max(m, 1), dtype=J.dtype, device=J.device)
            self.step = 0
        self.lam, out, self.Y, self.step = moco_step(J, self.Y, self.lam, self.step, *self.hyper)
        return self.lam, out
