"""Shared helpers for the fusedjd tests: devices, independent float64 references."""

from __future__ import annotations

import pytest
import torch

import fusedjd

CUDA = torch.cuda.is_available() and fusedjd.ops.has_cuda_kernels()

# CPU always; CUDA only where a GPU is present and the CUDA kernels were built.
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

requires_cuda = pytest.mark.skipif(
    not CUDA,
    reason="no CUDA GPU present (or fusedjd built without CUDA kernels): CUDA tests need one",
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (NaN never passes)."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def ref_gramians(J: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per-group Gramians in float64, by plain matrix products."""
    Jd = J.double().cpu()
    out, start = [], 0
    for s in sizes:
        blk = Jd[:, start : start + s]
        out.append(blk @ blk.T)
        start += s
    return torch.stack(out)


def ref_gradvac_loop(G: torch.Tensor, perms: torch.Tensor, targets: torch.Tensor, beta: float, eps: float,
                     pcgrad: bool = False) -> torch.Tensor:
    """SPEC §1, written as a plain float64 Python loop over one stack of Gramians, with the three
    documented guards: the cosine clamped to [-1, 1] (0 for 0/0), and sqrt(1 - t²) floored at
    half the square root of the machine epsilon of G's dtype (the dtype the targets are kept in).
    Updates `targets` (float64, CPU) in place and returns the weights [k, m]."""
    sine_floor = 0.5 * torch.finfo(G.dtype).eps ** 0.5
    G = G.double().cpu()
    k, m = G.shape[0], G.shape[1]
    W = torch.zeros(k, m, dtype=torch.float64)
    for g in range(k):
        for i in range(m):
            C = torch.zeros(m, dtype=torch.float64)
            C[i] = 1.0
            for j in perms[g, i].tolist():
                cG = C @ G[g]
                if pcgrad:
                    if cG[j] < 0 and G[g, j, j] > 0:
                        C[j] -= cG[j] / G[g, j, j]
                    continue
                ni = (C @ G[g] @ C).clamp(min=0).sqrt()
                nj = G[g, j, j].clamp(min=0).sqrt()
                denom = ni * nj + eps
                c = (cG[j] / denom).clamp(-1.0, 1.0) if denom > 0 else torch.zeros((), dtype=torch.float64)
                t = targets[g, i, j].clone()
                if c < t and nj > 0:
                    sc = (1 - c * c).clamp(min=0).sqrt()
                    st = (1 - t * t).clamp(min=0).sqrt().clamp(min=sine_floor)
                    C[j] += ni * (t * sc - c * st) / (nj * st + eps)
                targets[g, i, j] = (1 - beta) * t + beta * c
            W[g] += C
    return W


class MoCoRef:
    """SPEC §2 as a plain float64 PyTorch loop (independent of the fused op)."""

    def __init__(self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, simplex="softmax"):
        self.h = (beta, beta_sigma, gamma, gamma_sigma, rho)
        self.simplex = simplex
        self.Y = None
        self.lam = None
        self.k = 0

    @staticmethod
    def project(v: torch.Tensor) -> torch.Tensor:
        u, _ = torch.sort(v, descending=True)
        cssv = torch.cumsum(u, 0) - 1
        r = torch.arange(1, v.numel() + 1, dtype=v.dtype)
        cond = u - cssv / r > 0
        rho_idx = int(torch.nonzero(cond)[-1])
        theta = cssv[rho_idx] / (rho_idx + 1)
        return (v - theta).clamp(min=0)

    def __call__(self, J: torch.Tensor):
        beta, bs, gamma, gs, rho = self.h
        J = J.double().cpu()
        m, n = J.shape
        if self.Y is None:
            self.Y = torch.zeros(m, n, dtype=torch.float64)
            self.lam = torch.full((m,), 1.0 / m, dtype=torch.float64)
        self.k += 1
        b = beta / self.k**bs
        c = gamma / self.k**gs
        self.Y = self.Y - b * (self.Y - J)
        v = self.lam - c * ((self.Y @ self.Y.T + rho * torch.eye(m, dtype=torch.float64)) @ self.lam)
        self.lam = torch.softmax(v, 0) if self.simplex == "softmax" else self.project(v)
        return self.lam.clone(), self.lam @ self.Y
