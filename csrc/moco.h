// MoCo's checks and scalar math, shared by the CPU and CUDA kernels (cpu/moco.cpp, cuda/moco.cu,
// cuda/gram_engine.cu): the row update, the step sizes, the weight update (softmax or simplex
// projection) and the checks of J, Y, lam, step and a given Gramian.
#pragma once

#include "common.h"
#include "hd.h"

namespace fusedjd {

// MoCo's row update Y + b (J - Y) in the op math type O, rounded to the storage type T. The
// second pass (which stores Y) and the engine's first pass (which takes the Gramian of the
// updated rows) both use it, on both backends, so that Gramian is that of exactly the stored Y.
// Where the target has fused multiply-adds it is one, so no compiler choice can make two call
// sites round differently; elsewhere (no FMA instruction, nothing to contract) the plain form,
// which stays vectorizable.
template <typename T, typename O>
FUSEDJD_HD T moco_row_update(T y, T j, O b) {
  const O yv = static_cast<O>(y);
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
  return static_cast<T>(fma(b, static_cast<O>(j) - yv, yv));
#else
  return static_cast<T>(yv + b * (static_cast<O>(j) - yv));
#endif
}

// MoCo step sizes for the (1-based) step k.
FUSEDJD_HD void moco_rates(int64_t k, double beta, double beta_sigma, double gamma,
                           double gamma_sigma, double* b, double* c) {
  const double kk = static_cast<double>(k);
  *b = beta / pow(kk, beta_sigma);
  *c = gamma / pow(kk, gamma_sigma);
}

// Euclidean projection of v (length m) onto the probability simplex, in place.
// `u` is scratch of length m.
FUSEDJD_HD void project_simplex(double* v, double* u, int64_t m) {
  for (int64_t a = 0; a < m; ++a) u[a] = v[a];
  // insertion sort, descending (m is small)
  for (int64_t a = 1; a < m; ++a) {
    const double x = u[a];
    int64_t b = a - 1;
    while (b >= 0 && u[b] < x) { u[b + 1] = u[b]; --b; }
    u[b + 1] = x;
  }
  double cum = 0.0, theta = 0.0;
  for (int64_t r = 0; r < m; ++r) {
    cum += u[r];
    const double th = (cum - 1.0) / static_cast<double>(r + 1);
    if (u[r] - th > 0.0) theta = th;
  }
  for (int64_t a = 0; a < m; ++a) v[a] = fmax(v[a] - theta, 0.0);
}

FUSEDJD_HD void softmax_inplace(double* v, int64_t m) {
  double mx = v[0];
  for (int64_t a = 1; a < m; ++a) mx = fmax(mx, v[a]);
  double s = 0.0;
  for (int64_t a = 0; a < m; ++a) { v[a] = exp(v[a] - mx); s += v[a]; }
  for (int64_t a = 0; a < m; ++a) v[a] /= s;
}

// The MoCo weight update: lam_new = S(lam - c (M + rho I) lam) with M = Yn Yn^T, the Gramian of
// the updated Y, given entry by entry by mrs(r, s) (double).
//   scratch: m doubles (the simplex projection's sort).
// Returns false (and leaves lam_new unspecified) when an entry of M or the result is not finite:
// the caller must then leave the whole state untouched. A non-finite J always shows in M (an
// infinite or NaN term stays non-finite through the products, 0 * inf included).
template <typename MRS>
FUSEDJD_HD bool moco_lambda_step(MRS mrs, const double* lam, double* lam_new, int64_t m, double c, double rho,
                                 bool projection, double* scratch) {
  for (int64_t r = 0; r < m; ++r) {
    double acc = rho * lam[r];
    for (int64_t s = 0; s < m; ++s) {
      const double v = mrs(r, s);
      if (!isfinite(v)) return false;
      acc += v * lam[s];
    }
    lam_new[r] = lam[r] - c * acc;
  }
  if (projection) {
    project_simplex(lam_new, scratch, m);
  } else {
    softmax_inplace(lam_new, m);
  }
  for (int64_t r = 0; r < m; ++r)
    if (!isfinite(lam_new[r])) return false;
  return true;
}

// The same update from the Gramian of the updated rows Yn (m x m, row-major): what the first pass
// of both backends computes, forming Yn as it reads Y and J.
template <typename GT>
FUSEDJD_HD bool moco_lambda_update(const GT* gram, const double* lam, double* lam_new, int64_t m, double c,
                                   double rho, bool projection, double* scratch) {
  return moco_lambda_step([&](int64_t r, int64_t s) { return static_cast<double>(gram[r * m + s]); }, lam, lam_new,
                          m, c, rho, projection, scratch);
}

// Entry (r, s) of the Gramian of Yn = (1 - b) Y + b J from the (2m x 2m) Gramian of the stacked
// rows [Y; J] (YY^T top-left, YJ^T top-right, JJ^T bottom-right): the CUDA kernels' fallback for
// more rows than their streaming engine takes.
template <typename GT>
FUSEDJD_HD double moco_stacked_entry(const GT* gram, int64_t m, double b, int64_t r, int64_t s) {
  const int64_t w = 2 * m;
  const double a = 1.0 - b;
  const double yy = static_cast<double>(gram[r * w + s]);
  const double yj = static_cast<double>(gram[r * w + (m + s)]);  // <Y_r, J_s>
  const double jy = static_cast<double>(gram[s * w + (m + r)]);  // <Y_s, J_r>
  const double jj = static_cast<double>(gram[(m + r) * w + (m + s)]);
  return a * a * yy + a * b * (yj + jy) + b * b * jj;
}

// Checks of MoCo's J, Y and step (the moco_gramian op's arguments); returns J's blocks.
inline Blocks check_moco_state(at::TensorList J, const at::Tensor& Y, const at::Tensor& step) {
  Blocks B = check_blocks(J);
  FUSEDJD_CHECK_ON_J(Y, "Y", B);
  TORCH_CHECK(Y.dim() == 2 && Y.size(0) == B.m && Y.size(1) == B.n, "fusedjd: `Y` must have shape [m, n] = [", B.m,
              ", ", B.n, "], got ", Y.sizes());
  TORCH_CHECK(Y.scalar_type() == B.dtype, "fusedjd: `Y` must have the dtype of `J` (", B.dtype, "), got ",
              Y.scalar_type());
  FUSEDJD_CHECK_CONTIGUOUS(Y);
  for (size_t b = 0; b < J.size(); ++b)  // Y is updated in place while J is read (pass 2: __restrict__)
    TORCH_CHECK(!Y.is_alias_of(J[b]), "fusedjd: `Y` (updated in place) must not share memory with `J[", b, "]`");
  FUSEDJD_CHECK_ON_J(step, "step", B);
  FUSEDJD_CHECK_DIM(step, 0);
  FUSEDJD_CHECK_DTYPE(step, at::kLong);
  return B;
}

// Checks of the moco_step op: J, Y and step, then lam, then the Gramian when one is given.
inline Blocks check_moco_args(at::TensorList J, const at::Tensor& Y, const at::Tensor& lam, const at::Tensor& step,
                              const c10::optional<at::Tensor>& gram) {
  Blocks B = check_moco_state(J, Y, step);
  FUSEDJD_CHECK_ON_J(lam, "lam", B);
  FUSEDJD_CHECK_DIM(lam, 1);
  TORCH_CHECK(lam.size(0) == B.m, "fusedjd: `lam` must have length m=", B.m, ", got ", lam.size(0));
  FUSEDJD_CHECK_DTYPE(lam, acc_dtype(B.dtype));
  FUSEDJD_CHECK_CONTIGUOUS(lam);
  if (gram.has_value()) {
    const at::Tensor& G = *gram;
    FUSEDJD_CHECK_ON_J(G, "gram", B);
    TORCH_CHECK(G.dim() == 2 && G.size(0) == B.m && G.size(1) == B.m, "fusedjd: `gram` must have shape [m, m] = [",
                B.m, ", ", B.m, "], got ", G.sizes());
    TORCH_CHECK(G.scalar_type() == acc_dtype(B.dtype), "fusedjd: `gram` must have dtype ", acc_dtype(B.dtype),
                ", got ", G.scalar_type());
    TORCH_CHECK(G.is_contiguous(), "fusedjd: `gram` must be contiguous, got strides ", G.strides(), " for shape ",
                G.sizes());
  }
  return B;
}

}  // namespace fusedjd
