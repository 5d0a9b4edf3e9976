// Scalar math shared by the CPU and CUDA kernels: the GradVac correction, the
// MoCo step sizes and the MoCo weight update (softmax or simplex projection).
// Everything here is plain arithmetic on small arrays, callable from host and
// device code, so that both backends compute the same thing.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDJD_HD __host__ __device__ __forceinline__
#else
#define FUSEDJD_HD inline
#endif

namespace fusedjd {

#if !defined(__CUDA_ARCH__)
using std::exp;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::pow;
using std::sqrt;
#endif

// Machine epsilon of the dtype the GradVac targets are stored in.
template <typename T> struct StateEps;
template <> struct StateEps<float> { static constexpr double value = 1.1920928955078125e-07; };
template <> struct StateEps<double> { static constexpr double value = 2.220446049250313e-16; };

// Floor on sqrt(1 - t^2) in the GradVac weight. For every target t the state
// dtype can hold strictly inside (-1, 1), sqrt(1 - t^2) >= sqrt(eps_dtype), so
// half of that never changes a result; it only acts once an EMA target has
// saturated at exactly +-1, where the closed form divides by `eps` alone and
// overflows (the blow-up torchjd shows on collinear rows at large scale).
template <typename S>
FUSEDJD_HD double target_sine_floor() {
  return 0.5 * sqrt(StateEps<S>::value);
}

// One GradVac step for the pair (i, j), given |p|^2, <p, g_j>, |g_j|^2 and the
// current target t. Returns the cosine c (written to *cos_out) and the
// coefficient w to add to C[i, j] (0 when no correction applies).
//   PCGRAD = true: PCGrad's rule, w = -<p, g_j> / |g_j|^2 when <p, g_j> < 0 (t, eps and
//   sine_floor unused, *cos_out = 0).
template <bool PCGRAD>
FUSEDJD_HD double gradvac_pair(double norm_i_sq, double dot, double gjj, double t, double eps,
                               double sine_floor, double* cos_out) {
  if (PCGRAD) {
    *cos_out = 0.0;
    return (dot < 0.0 && gjj > 0.0) ? -dot / gjj : 0.0;
  }
  const double ni = sqrt(fmax(norm_i_sq, 0.0));
  const double nj = sqrt(fmax(gjj, 0.0));
  const double denom = ni * nj + eps;
  // A zero row with eps = 0 would give 0/0: its cosine is taken as 0. A cosine is in
  // [-1, 1] (Cauchy-Schwarz); rounding can push it out -- slightly for collinear rows, and
  // without bound once a row has cancelled to rounding noise (|p| ~ 0, <p, g_j> != 0) --
  // so it is clamped there before it reaches the comparison or the EMA target.
  const double c = denom > 0.0 ? fmin(fmax(dot / denom, -1.0), 1.0) : 0.0;
  *cos_out = c;
  if (!(c < t) || nj == 0.0) return 0.0;  // adding w * 0 changes nothing but the weights
  const double sc = sqrt(fmax(1.0 - c * c, 0.0));
  const double st = fmax(sqrt(fmax(1.0 - t * t, 0.0)), sine_floor);
  return ni * (t * sc - c * st) / (nj * st + eps);
}

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

}  // namespace fusedjd
