// The dual-cone projection shared by the CPU and CUDA kernels of the dual_cone op (UPGrad's and
// DualProj's projector). For a Gramian G (m x m, symmetric) and a vector u it finds the v >= u
// minimising v^T G v (Proposition 1 of arXiv 2406.16232: J^T v is the projection of J^T u onto the
// dual cone of J's rows). With v = u + x it is the linear complementarity problem
//
//     x >= 0,   y = c + G x >= 0,   x_i y_i = 0 for every i,   c = G u
//
// (the KKT conditions of min 1/2 x^T G x + c^T x subject to x >= 0), solved exactly in float64.
//
// First, block principal pivoting (Judice and Pires, Comput. Oper. Res. 21, 1994; Kim and Park's
// NNLS form): guess the free set P (the rows with x > 0; first the rows with x > 0 after five
// projected Gauss-Seidel sweeps from x = 0, O(m^2) each, in decreasing x), solve
// G_PP x_P = -c_P (Cholesky), and exchange every row that violates its condition (x_i < 0 in P,
// y_i < 0 outside it) at once. When the number of violations has not dropped for three exchanges,
// only the violation with the largest index is exchanged (a single principal pivot in a fixed order,
// Murty's rule, as Kim and Park do) until it drops; for a positive-definite G (a P-matrix) this ends
// after finitely many exchanges at the solution. The
// factor of G_PP is kept across exchanges: the rows that stay keep their order, the entering rows
// are appended, and only the part of the factor from the first leaving row on is recomputed. Each
// exchange costs O(m |P|) for y and at most O(|P|^3) for the factor. Measured on UPGrad's
// right-hand sides (m = 128..512), in flops of one factorisation of the final G_PP: 1.02 on random
// Gramians (the sweeps' guess is nearly always right: 1.3 to 1.8 solves), 2.6 to 2.9 on strictly
// weakly stationary ones (4 to 5 solves), 1.4 to 1.9 on the IWRM Gramians of a small CNN; |P| is
// m / 2 to 4 m / 5 on them. Without the sweeps (the guess c_i < 0) it was 2.2 to 4.5.
//
// The solution is accepted only when it satisfies the conditions within rounding: x_i >= -t /
// max_i G_ii in P (then set to 0), |y_i| <= t in P, y_i >= -t outside P, with t = 16 m eps
// (|c|_max + max_i G_ii |x|_1) bounding the rounding of y. When G_PP is singular within rounding (a pivot below 4 m eps
// of its diagonal, possible only for a singular or nearly singular G) or the exchanges pass
// 30 + m / 4, the right-hand side is solved again by the primal active-set method below.
//
// The fallback: Lawson and Hanson's NNLS, in the Gramian form (Bro and de Jong's FNNLS), on G
// itself. The free set P grows by the row whose gradient c + G x is the most negative; the
// equality-constrained minimiser on P comes from a Cholesky factor of G_PP, extended by one row per
// entering row (O(|P|^2)) and rebuilt when rows leave (rarer). Each outer step strictly lowers the
// objective and no free set repeats, so the method ends after finitely many steps; in floating
// point two safeguards keep it finite: a row whose own coefficient comes out non-positive right
// after entering (rounding, at the optimum) ends the solve, and a cap of 3 m + 30 steps (outer and
// inner) returns the current iterate, which is always feasible (v >= u). A row that depends on the
// free rows within rounding (its squared Cholesky pivot below 4 m eps of its diagonal) cannot enter
// P as it stands; the next most negative gradient enters instead, and the row may enter again once
// a row has left P. Between two changes of P at most m rows are set aside, so this keeps the method
// finite.
//
// Everything is float64 and sequential per right-hand side: the result does not depend on the
// thread count; the CPU kernel's factor sums in another order (blocks of 8 rows with AVX-512, 6
// below; ScalarFactor row by row), so CPU levels and CUDA agree to rounding, as do two compilers'
// contractions. Exact for a
// positive-definite G (fusedjd.Projector adds reg_eps I, as torchjd's quadprog projector does).
#pragma once

#include <cstdint>

#include "common.h"
#include "hd.h"

namespace fusedjd {

// float64 scratch per right-hand side: the factor (m x m) and four vectors.
FUSEDJD_HD int64_t dual_cone_scratch(int64_t m) { return m * m + 4 * m; }

// int64 scratch per right-hand side: the order of P and the entering rows.
FUSEDJD_HD int64_t dual_cone_index_scratch(int64_t m) { return 2 * m; }

// The step cap of the fallback (active-set steps) and of the exchanges.
FUSEDJD_HD int64_t dual_cone_max_steps(int64_t m) { return 3 * m + 30; }
FUSEDJD_HD int64_t dual_cone_max_exchanges(int64_t m) { return 30 + m / 4; }

// The projected Gauss-Seidel sweeps (O(m^2) each) behind block principal pivoting's first guess.
FUSEDJD_HD constexpr int dual_cone_sweeps() { return 5; }

namespace detail {

// The factor U (upper, row-major, stride m: G_PP = U^T U for P = rows[0..p) in that order) from
// its leading `pos` rows and columns, which are kept, to all p: row t of U from the rows above it
// (the inner loops run along rows of U, four rows above at a time, so that row t stays in cache).
// False when a pivot falls below 4 m eps of its diagonal (G_PP singular within rounding).
FUSEDJD_HD bool chol_extend(const double* G, int64_t m, double* U, const int64_t* rows, int64_t pos, int64_t p) {
  const double tiny = 4.0 * static_cast<double>(m) * 2.220446049250313e-16;
  for (int64_t t = 0; t < p; ++t) {
    const int64_t r0 = t > pos ? t : pos;  // the columns of row t to compute
    const double* g = G + rows[t] * m;
    double* Ut = U + t * m;
    for (int64_t r = r0; r < p; ++r) Ut[r] = g[rows[r]];
    int64_t k = 0;
    for (; k + 4 <= t; k += 4) {
      const double* U0 = U + k * m;
      const double* U1 = U0 + m;
      const double* U2 = U1 + m;
      const double* U3 = U2 + m;
      const double a0 = U0[t], a1 = U1[t], a2 = U2[t], a3 = U3[t];
      for (int64_t r = r0; r < p; ++r) Ut[r] -= (a0 * U0[r] + a1 * U1[r]) + (a2 * U2[r] + a3 * U3[r]);
    }
    for (; k < t; ++k) {
      const double* Uk = U + k * m;
      const double a = Uk[t];
      for (int64_t r = r0; r < p; ++r) Ut[r] -= a * Uk[r];
    }
    if (t >= pos) {
      const double gtt = g[rows[t]];
      if (!(gtt > 0.0) || !(Ut[t] > tiny * gtt)) return false;
      Ut[t] = sqrt(Ut[t]);
    }
    const double inv = 1.0 / Ut[t];
    for (int64_t r = t >= pos ? t + 1 : r0; r < p; ++r) Ut[r] *= inv;
  }
  return true;
}

// The factorisation block principal pivoting uses: chol_extend. The CPU kernel passes its own (the
// same factor in blocks of rows, vectorised: csrc/cpu/dual_cone.cpp).
struct ScalarFactor {
  FUSEDJD_HD bool operator()(const double* G, int64_t m, double* U, const int64_t* rows, int64_t pos,
                             int64_t p) const {
    return chol_extend(G, m, U, rows, pos, p);
  }
};

// z[0..p) = the solution of G_PP z = -c_P from chol_extend's factor U.
FUSEDJD_HD void chol_solve_upper(const double* U, int64_t m, const int64_t* rows, int64_t p, const double* c,
                                 double* z) {
  for (int64_t q = 0; q < p; ++q) z[q] = -c[rows[q]];
  for (int64_t q = 0; q < p; ++q) {  // U^T w = -c_P, w in z
    const double* Uq = U + q * m;
    const double w = z[q] / Uq[q];
    z[q] = w;
    for (int64_t r = q + 1; r < p; ++r) z[r] -= w * Uq[r];
  }
  for (int64_t q = p - 1; q >= 0; --q) {  // U z = w; the dot product in 8 partial sums (vectorised)
    const double* Uq = U + q * m;
    double part[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t r = q + 1;
    for (; r + 8 <= p; r += 8) {
      for (int j = 0; j < 8; ++j) part[j] += Uq[r + j] * z[r + j];
    }
    double s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; r < p; ++r) s += Uq[r] * z[r];
    z[q] = (z[q] - s) / Uq[q];
  }
}

// Block principal pivoting for one right-hand side (G and u finite): true when it found v (the
// conditions hold within rounding), false when G_PP came out singular or the exchanges hit their
// cap (v is then unset). `work`: dual_cone_scratch(m) doubles; `idx`: dual_cone_index_scratch(m);
// `factor`: chol_extend or an equivalent (ScalarFactor's signature and result).
template <class Factor>
FUSEDJD_HD bool dual_cone_bpp(const double* G, int64_t m, const double* u, double* v, double* work, int64_t* idx,
                              const Factor& factor) {
  double* U = work;
  double* c = U + m * m;
  double* z = c + m;   // x on P, in the order of rows
  double* y = z + m;   // c + G x
  double* in = y + m;  // 1 for the rows of P
  int64_t* rows = idx;
  int64_t* enter = idx + m;
  const double eps = 2.220446049250313e-16;
  double c_max = 0.0, diag_max = 0.0;
  for (int64_t a = 0; a < m; ++a) c[a] = 0.0;
  for (int64_t b = 0; b < m; ++b) {  // c = G u, by rows of G (u is often sparse)
    const double ub = u[b];
    if (ub == 0.0) continue;
    const double* g = G + b * m;
    for (int64_t a = 0; a < m; ++a) c[a] += ub * g[a];
  }
  for (int64_t a = 0; a < m; ++a) {
    c_max = fmax(c_max, fabs(c[a]));
    diag_max = fmax(diag_max, G[a * m + a]);
    z[a] = 0.0;  // x, by row, for the sweeps
    y[a] = c[a];
  }
  // the first guess of P: the rows with x > 0 after a few projected Gauss-Seidel sweeps from x = 0
  // (each x_a set to its minimiser with the others fixed, clipped at 0; y = c + G x kept current)
  for (int sweep = 0; sweep < dual_cone_sweeps(); ++sweep) {
    for (int64_t a = 0; a < m; ++a) {
      const double gaa = G[a * m + a];
      if (!(gaa > 0.0)) continue;
      const double xa = fmax(0.0, z[a] - y[a] / gaa);
      const double d = xa - z[a];
      if (d == 0.0) continue;
      const double* g = G + a * m;
      for (int64_t b = 0; b < m; ++b) y[b] += d * g[b];
      z[a] = xa;
    }
  }
  int64_t p = 0;
  for (int64_t a = 0; a < m; ++a) {
    in[a] = z[a] > 0.0 ? 1.0 : 0.0;
    if (z[a] > 0.0) rows[p++] = a;
  }
  for (int64_t q = 1; q < p; ++q) {  // in decreasing x: the rows likely to leave come last
    const int64_t rq = rows[q];
    int64_t t = q;
    for (; t > 0 && z[rows[t - 1]] < z[rq]; --t) rows[t] = rows[t - 1];
    rows[t] = rq;
  }
  int64_t pos = 0, best = m + 1, tries = 3;
  const int64_t cap = dual_cone_max_exchanges(m);
  for (int64_t it = 0; it <= cap; ++it) {
    if (!factor(G, m, U, rows, pos, p)) return false;
    chol_solve_upper(U, m, rows, p, c, z);
    double x_sum = 0.0;
    for (int64_t a = 0; a < m; ++a) y[a] = c[a];
    for (int64_t q = 0; q < p; ++q) {
      const double zq = z[q];
      x_sum += fabs(zq);
      const double* g = G + rows[q] * m;
      for (int64_t a = 0; a < m; ++a) y[a] += zq * g[a];
    }
    const double tol = 16.0 * static_cast<double>(m) * eps * (c_max + diag_max * x_sum);
    const double tol_x = diag_max > 0.0 ? tol / diag_max : 0.0;
    // the violations: x_i < -tol_x in P, y_i < -tol outside; y_P = 0 within tol, or the solve
    // lost its accuracy (G_PP ill-conditioned): the fallback
    int64_t count = 0, last = -1;
    for (int64_t q = 0; q < p; ++q) {
      if (!(fabs(y[rows[q]]) <= tol)) return false;
      if (z[q] < -tol_x) {
        ++count;
        last = rows[q] > last ? rows[q] : last;
      }
    }
    for (int64_t a = 0; a < m; ++a) {
      if (in[a] == 0.0 && y[a] < -tol) {
        ++count;
        last = a > last ? a : last;
      }
    }
    if (count == 0) {
      for (int64_t a = 0; a < m; ++a) v[a] = u[a];
      for (int64_t q = 0; q < p; ++q) v[rows[q]] += z[q] > 0.0 ? z[q] : 0.0;
      return true;
    }
    if (it == cap) break;
    bool one = false;  // the backup rule: only the violation with the largest index
    if (count < best) {
      best = count;
      tries = 3;
    } else if (tries > 0) {
      --tries;
    } else {
      one = true;
    }
    int64_t entering = 0;
    for (int64_t a = 0; a < m; ++a) {
      if (in[a] == 0.0 && y[a] < -tol && (!one || a == last)) enter[entering++] = a;
    }
    int64_t kept = 0;
    pos = p;
    for (int64_t q = 0; q < p; ++q) {
      const int64_t r = rows[q];
      if (z[q] < -tol_x && (!one || r == last)) {
        in[r] = 0.0;
        if (pos == p) pos = kept;
      } else {
        z[kept] = z[q];
        rows[kept++] = r;
      }
    }
    if (pos > kept) pos = kept;
    if (2 * pos < kept) {
      // most of the factor is recomputed anyway: the rows of P in decreasing x, so that the rows
      // likely to leave next (small x) come last and a later exchange recomputes less
      for (int64_t q = 1; q < kept; ++q) {
        const double zq = z[q];
        const int64_t rq = rows[q];
        int64_t t = q;
        for (; t > 0 && z[t - 1] < zq; --t) {
          z[t] = z[t - 1];
          rows[t] = rows[t - 1];
        }
        z[t] = zq;
        rows[t] = rq;
      }
      pos = 0;
    }
    for (int64_t e = 0; e < entering; ++e) {
      rows[kept++] = enter[e];
      in[enter[e]] = 1.0;
    }
    p = kept;
  }
  return false;
}

}  // namespace detail

// The active-set method (NNLS) for one right-hand side u (m), G (m x m, row-major, float64, finite):
// v (m). `work`: dual_cone_scratch(m) doubles; `rows`: m integers. Returns the number of steps taken
// (dual_cone_max_steps(m) + 1 when the cap ended the solve).
FUSEDJD_HD int64_t dual_cone_nnls(const double* G, int64_t m, const double* u, double* v, double* work,
                                  int64_t* rows) {
  double* L = work;  // the factor of G_PP, upper (detail::chol_extend's layout)
  double* x = L + m * m;
  double* z = x + m;
  double* c = z + m;
  double* blocked = c + m;  // 1: the row depends on P (within rounding) and cannot enter it
  double c_max = 0.0, diag_max = 0.0;
  for (int64_t a = 0; a < m; ++a) {
    double s = 0.0;
    for (int64_t b = 0; b < m; ++b) s += G[a * m + b] * u[b];
    c[a] = s;
    x[a] = 0.0;
    blocked[a] = 0.0;
    c_max = fmax(c_max, fabs(s));
    diag_max = fmax(diag_max, G[a * m + a]);
  }
  const int64_t cap = dual_cone_max_steps(m);
  const double eps = 2.220446049250313e-16;
  int64_t p = 0, steps = 0;
  for (;;) {
    if (++steps > cap) break;
    // the most negative gradient c + G x outside P (|(G x)_i| <= diag_max |x|_1 for a PSD G)
    double x_sum = 0.0;
    for (int64_t a = 0; a < m; ++a) x_sum += x[a];
    const double tol = 16.0 * static_cast<double>(m) * eps * (c_max + diag_max * x_sum);
    int64_t enter = -1;
    double w_min = -tol;
    for (int64_t i = 0; i < m; ++i) {
      // the rows of P are exactly those with x > 0: a solve leaves x_P = z > 0, a step drops the
      // rows it brings to 0
      if (x[i] > 0.0 || blocked[i] != 0.0) continue;
      double w = c[i];
      for (int64_t a = 0; a < m; ++a) w += G[i * m + a] * x[a];
      if (w < w_min) {
        w_min = w;
        enter = i;
      }
    }
    if (enter < 0) break;  // optimal: every gradient outside P is >= -tol
    rows[p] = enter;  // appended to the factor, O(|P|^2)
    if (!detail::chol_extend(G, m, L, rows, p, p + 1)) {  // depends on P: the next candidate
      blocked[enter] = 1.0;
      continue;
    }
    ++p;
    bool first = true, stop = false;
    for (;;) {
      detail::chol_solve_upper(L, m, rows, p, c, z);
      bool positive = true;
      for (int64_t q = 0; q < p; ++q) positive = positive && z[q] > 0.0;
      if (positive) {
        for (int64_t q = 0; q < p; ++q) x[rows[q]] = z[q];
        break;
      }
      if (first && !(z[p - 1] > 0.0)) {  // the entering row's own coefficient: rounding at the optimum
        --p;
        stop = true;
        break;
      }
      first = false;
      // step from x toward z until the first coefficient of P reaches 0; those rows leave P
      double alpha = 1.0;
      int64_t leave = -1;
      for (int64_t q = 0; q < p; ++q) {
        if (z[q] > 0.0) continue;
        const double xq = x[rows[q]];
        const double a = xq / (xq - z[q]);
        if (leave < 0 || a < alpha) {
          alpha = a;
          leave = q;
        }
      }
      int64_t kept = 0;
      for (int64_t q = 0; q < p; ++q) {
        const int64_t r = rows[q];
        x[r] += alpha * (z[q] - x[r]);
        if (q == leave || !(x[r] > 0.0)) {
          x[r] = 0.0;
        } else {
          rows[kept++] = r;
        }
      }
      for (int64_t a = 0; a < m; ++a) blocked[a] = 0.0;  // P lost a row: every row may enter again
      p = 0;  // rebuild the factor of the remaining rows (independent: a subset of an independent set)
      for (int64_t q = 0; q < kept; ++q) {
        const int64_t r = rows[q];
        rows[p] = r;
        if (!detail::chol_extend(G, m, L, rows, p, p + 1)) {
          x[r] = 0.0;
          continue;
        }
        ++p;
      }
      if (++steps > cap) {
        stop = true;
        break;
      }
    }
    if (stop) break;
  }
  for (int64_t a = 0; a < m; ++a) v[a] = u[a] + x[a];
  return steps;
}


// v (m) for one right-hand side u (m), G (m x m, row-major, float64): block principal pivoting,
// and the active-set method where it gives up. `work`: dual_cone_scratch(m) doubles; `idx`:
// dual_cone_index_scratch(m) integers; `G_finite`: whether every entry of G is finite (the caller
// checks G once for all right-hand sides); `factor`: block principal pivoting's factorisation
// (detail::ScalarFactor's signature). A non-finite G or u gives a NaN v. Returns 0 when block
// principal pivoting solved it, else 1 + the active-set method's steps.
template <class Factor = detail::ScalarFactor>
FUSEDJD_HD int64_t dual_cone_solve(const double* G, int64_t m, const double* u, double* v, double* work,
                                   int64_t* idx, bool G_finite, const Factor& factor = Factor()) {
  bool finite = G_finite;
  for (int64_t a = 0; a < m; ++a) finite = finite && isfinite(u[a]);
  if (!finite) {
    for (int64_t a = 0; a < m; ++a) v[a] = NAN;
    return 0;
  }
  if (detail::dual_cone_bpp(G, m, u, v, work, idx, factor)) return 0;
  return 1 + dual_cone_nnls(G, m, u, v, work, idx);
}

// Checks of the dual_cone op on every backend: G [m, m], U [..., m], both float16, bfloat16,
// float32 or float64, on one device.
inline void check_dual_cone_args(const at::Tensor& U, const at::Tensor& G) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1), "fusedjd: `G` must be a square Gramian [m, m], got shape ",
              G.sizes());
  TORCH_CHECK(solver_dtype(G.scalar_type()), "fusedjd: `G` must be float16, bfloat16, float32 or float64, got ",
              G.scalar_type());
  TORCH_CHECK(U.dim() >= 1 && U.size(-1) == G.size(0), "fusedjd: `U` must have shape [..., m] with m = ", G.size(0),
              " (the size of `G`), got shape ", U.sizes());
  TORCH_CHECK(solver_dtype(U.scalar_type()), "fusedjd: `U` must be float16, bfloat16, float32 or float64, got ",
              U.scalar_type());
  FUSEDJD_CHECK_SAME_DEVICE(U, G);
}

// The dual_cone op's inputs as its kernels solve them: G [m, m] and U as k rows [k, m], both
// float64 and contiguous (empty when m or U is), and the output V [k, m] float64 to fill; `finish`
// returns V in U's shape and G's dtype.
struct DualConeProblem {
  at::Tensor G, U, V;
  int64_t k = 0, m = 0;
  at::Tensor finish(const at::Tensor& U_in, const at::Tensor& G_in) const {
    return V.to(G_in.scalar_type()).reshape(U_in.sizes());
  }
};

inline DualConeProblem dual_cone_problem(const at::Tensor& U, const at::Tensor& G) {
  check_dual_cone_args(U, G);
  DualConeProblem p;
  p.m = G.size(0);
  p.k = p.m == 0 ? 0 : U.numel() / p.m;
  p.G = G.to(at::kDouble).contiguous();
  p.U = U.reshape({p.k, p.m}).to(at::kDouble).contiguous();
  p.V = at::empty({p.k, p.m}, p.U.options());
  return p;
}

}  // namespace fusedjd
