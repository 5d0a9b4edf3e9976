// MGDA's weighting (torchjd.aggregation.MGDAWeighting) shared by the CPU and CUDA kernels of the mgda
// op: the Frank-Wolfe solver of Algorithm 2 of Sener and Koltun (NeurIPS 2018) for the min-norm
// point of the convex hull of J's rows, on the Gramian G, exactly as torchjd iterates it:
//
//     alpha = 1 / m;  up to max_iters times:
//       t = argmin_i (G alpha)_i (the first index on ties), a = alpha . G e_t, b = alpha . G alpha,
//       c = G_tt; gamma = 1 if c <= a, else 0 if b <= a, else (b - a) / (b + c - 2 a);
//       alpha = (1 - gamma) alpha + gamma e_t; stop when gamma < epsilon (after the update).
//
// In float64 whatever G's dtype (torchjd iterates in G's dtype). The branches meet continuously (the
// formula gives 1 at c = a and 0 at b = a), so rounding changes the weights continuously except
// through argmin's ties and the stopping test. G alpha is recomputed each iteration, as torchjd
// does, each row summed in order; the CUDA kernel splits the rows over a warp's lanes and does the
// rest on one lane, so CPU and CUDA run the same operations in the same order (up to the
// compilers' contraction of multiply-adds).
#pragma once

#include <cstdint>

#include "common.h"
#include "hd.h"

namespace fusedjd {

// (G alpha)_i, the terms in order.
FUSEDJD_HD double mgda_row(const double* G, int64_t m, int64_t i, const double* alpha) {
  const double* g = G + i * m;
  double s = 0.0;
  for (int64_t j = 0; j < m; ++j) s += g[j] * alpha[j];
  return s;
}

// One Frank-Wolfe step from Ga = G alpha: gamma, and t (the vertex e_t stepped toward) in *t_out.
FUSEDJD_HD double mgda_gamma(const double* G, int64_t m, const double* alpha, const double* Ga, int64_t* t_out) {
  int64_t t = 0;
  for (int64_t i = 1; i < m; ++i) {
    if (Ga[i] < Ga[t]) t = i;
  }
  double a = 0.0, b = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    a += alpha[i] * G[i * m + t];
    b += alpha[i] * Ga[i];
  }
  const double c = G[t * m + t];
  *t_out = t;
  if (c <= a) return 1.0;
  if (b <= a) return 0.0;
  return (b - a) / (b + c - 2.0 * a);
}

// alpha_i after the step to e_t with gamma.
FUSEDJD_HD double mgda_update(double alpha_i, int64_t i, int64_t t, double gamma) {
  return (1.0 - gamma) * alpha_i + (i == t ? gamma : 0.0);
}

// Checks of the mgda op on every backend: G [m, m] float16, bfloat16, float32 or float64;
// epsilon > 0, max_iters > 0 (torchjd's conditions).
inline void check_mgda_args(const at::Tensor& G, double epsilon, int64_t max_iters) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1), "fusedjd: `G` must be a square Gramian [m, m], got shape ",
              G.sizes());
  TORCH_CHECK(solver_dtype(G.scalar_type()), "fusedjd: `G` must be float16, bfloat16, float32 or float64, got ",
              G.scalar_type());
  TORCH_CHECK(epsilon > 0.0, "fusedjd: `epsilon` must be positive, got ", epsilon);
  TORCH_CHECK(max_iters > 0, "fusedjd: `max_iters` must be a positive integer, got ", max_iters);
}

}  // namespace fusedjd
