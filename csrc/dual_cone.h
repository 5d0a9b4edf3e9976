// The dual-cone projection shared by the CPU and CUDA kernels of the dual_cone op (UPGrad's and
// DualProj's projector). For a Gramian G (m x m) and a vector u it finds the v >= u minimising
// v^T G v (Proposition 1 of arXiv 2406.16232: J^T v is the projection of J^T u onto the dual cone
// of J's rows). With v = u + x it is the nonnegative quadratic program
//
//     min 1/2 x^T G x + c^T x   subject to x >= 0,   c = G u,
//
// solved exactly by a primal active-set method: Lawson and Hanson's NNLS, in the Gramian form
// (Bro and de Jong's FNNLS), on G itself. The free set P (the rows with x > 0) grows by the row
// whose gradient c + G x is the most negative; the equality-constrained minimiser on P comes from a
// Cholesky factor of G_PP, extended by one row per entering row (O(|P|^2)) and rebuilt when rows
// leave (rarer). Each outer step strictly lowers the objective and no free set repeats, so the
// method ends after finitely many steps; in floating point two safeguards keep it finite: a row
// whose own coefficient comes out non-positive right after entering (rounding, at the optimum) ends
// the solve, and a cap of 3 m + 30 steps (outer and inner) returns the current iterate, which is
// always feasible (v >= u). Everything is float64 and sequential per right-hand side: the result
// does not depend on the thread count or the backend beyond the compiler's contraction of
// multiply-adds.
//
// Exact for a positive-definite G (fusedjd.Projector adds reg_eps I, as torchjd's quadprog
// projector does). A row that depends on the free rows within rounding (its squared Cholesky pivot
// below 4 m eps of its diagonal: a singular or nearly singular G) cannot enter P as it stands; the
// next most negative gradient enters instead, and the row may enter again once a row has left P.
// Between two changes of P at most m rows are set aside, so this keeps the method finite.
#pragma once

#include <cstdint>

#include "common.h"
#include "hd.h"

namespace fusedjd {

// float64 scratch per right-hand side: the factor (m x m), x, the solution on P, c, and the rows
// that cannot enter P as it stands.
FUSEDJD_HD int64_t dual_cone_scratch(int64_t m) { return m * m + 4 * m; }

// The iteration cap of one right-hand side.
FUSEDJD_HD int64_t dual_cone_max_steps(int64_t m) { return 3 * m + 30; }

namespace detail {

// Appends row t to the Cholesky factor L (row-major, stride m) of G_PP, P = rows[0..p): writes row
// p of L. False when t depends on P within rounding (or G_tt <= 0): nothing is appended.
FUSEDJD_HD bool chol_append(const double* G, int64_t m, double* L, const int64_t* rows, int64_t p, int64_t t) {
  double d = G[t * m + t];
  const double gtt = d;
  double* Lp = L + p * m;
  for (int64_t q = 0; q < p; ++q) {
    double s = G[rows[q] * m + t];
    for (int64_t r = 0; r < q; ++r) s -= L[q * m + r] * Lp[r];
    Lp[q] = s / L[q * m + q];
    d -= Lp[q] * Lp[q];
  }
  if (!(gtt > 0.0) || !(d > 4.0 * static_cast<double>(m) * 2.220446049250313e-16 * gtt)) return false;
  Lp[p] = sqrt(d);
  return true;
}

// z[0..p) = the solution of G_PP z = -c_P, from the factor L.
FUSEDJD_HD void chol_solve(const double* L, int64_t m, const int64_t* rows, int64_t p, const double* c,
                                  double* z) {
  for (int64_t q = 0; q < p; ++q) {
    double s = -c[rows[q]];
    for (int64_t r = 0; r < q; ++r) s -= L[q * m + r] * z[r];
    z[q] = s / L[q * m + q];
  }
  for (int64_t q = p - 1; q >= 0; --q) {
    double s = z[q];
    for (int64_t r = q + 1; r < p; ++r) s -= L[r * m + q] * z[r];
    z[q] = s / L[q * m + q];
  }
}

}  // namespace detail

// v (m) for one right-hand side u (m), G (m x m, row-major, float64). `work`: dual_cone_scratch(m)
// doubles; `rows`: m integers. Returns the number of steps taken (dual_cone_max_steps(m) + 1 when
// the cap ended the solve). A non-finite G or u gives a NaN v.
FUSEDJD_HD int64_t dual_cone_solve(const double* G, int64_t m, const double* u, double* v, double* work,
                                          int64_t* rows) {
  bool finite = true;
  for (int64_t a = 0; a < m * m; ++a) finite = finite && isfinite(G[a]);
  for (int64_t a = 0; a < m; ++a) finite = finite && isfinite(u[a]);
  if (!finite) {
    for (int64_t a = 0; a < m; ++a) v[a] = NAN;
    return 0;
  }
  double* L = work;
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
    if (!detail::chol_append(G, m, L, rows, p, enter)) {  // depends on P: the next candidate
      blocked[enter] = 1.0;
      continue;
    }
    rows[p++] = enter;
    bool first = true, stop = false;
    for (;;) {
      detail::chol_solve(L, m, rows, p, c, z);
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
        if (!detail::chol_append(G, m, L, rows, p, rows[q])) {
          x[rows[q]] = 0.0;
          continue;
        }
        rows[p++] = rows[q];
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

// Checks of the dual_cone op on every backend: G [m, m], U [..., m], both float16, bfloat16,
// float32 or float64, on one device.
inline void check_dual_cone_args(const at::Tensor& U, const at::Tensor& G) {
  const auto half_to_double = [](at::ScalarType t) {
    return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
  };
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1), "fusedjd: `G` must be a square Gramian [m, m], got shape ",
              G.sizes());
  TORCH_CHECK(half_to_double(G.scalar_type()), "fusedjd: `G` must be float16, bfloat16, float32 or float64, got ",
              G.scalar_type());
  TORCH_CHECK(U.dim() >= 1 && U.size(-1) == G.size(0), "fusedjd: `U` must have shape [..., m] with m = ", G.size(0),
              " (the size of `G`), got shape ", U.sizes());
  TORCH_CHECK(half_to_double(U.scalar_type()), "fusedjd: `U` must be float16, bfloat16, float32 or float64, got ",
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
