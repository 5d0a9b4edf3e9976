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

// Relative precision of a Gramian stored in S: one machine epsilon. Each entry of fusedjd's
// Gramians is within about eps |g_a| |g_b| of the exact inner product of the stored rows (measured
// up to 0.95 eps for float32), so |p|^2 = C^T G C is within precision * M^2 of |p|^2, with
// M = sum_a |C_a| |g_a| (>= |p|) the size of the terms p is made of, and the cosine
// <p, g_j> / (|p| |g_j|) within about delta = precision * M^2 / |p|^2.
template <typename S>
FUSEDJD_HD double gramian_precision() {
  return StateEps<S>::value;
}

// One GradVac step for the pair (i, j), given |p|^2, <p, g_j>, |g_j|^2, the
// current target t, and M = sum_a |C_a| |g_a|.
// Returns the cosine c (written to *cos_out: the value the EMA target moves toward) and the
// coefficient w to add to C[i, j] (0 when no correction applies).
//   PCGRAD = true: PCGrad's rule, w = -<p, g_j> / |g_j|^2 when <p, g_j> < 0 (t, eps,
//   sine_floor, magnitude and precision unused, *cos_out = 0).
template <bool PCGRAD>
FUSEDJD_HD double gradvac_pair(double norm_i_sq, double dot, double gjj, double t, double eps,
                               double sine_floor, double magnitude, double precision, double* cos_out) {
  if (PCGRAD) {
    *cos_out = 0.0;
    return (dot < 0.0 && gjj > 0.0) ? -dot / gjj : 0.0;
  }
  // The fourth guard, rounding (docs/CONTRACT.md section 1). A p whose squared norm the Gramian
  // cannot resolve (the row has cancelled, delta >= 1) is zero for this pair: cosine 0, no
  // correction. Otherwise the cosine is known within delta, and:
  // - a correction applies only when c < t - delta: the cosine of collinear rows computes to
  //   +-(1 - delta), and against a target saturated at +-1 a correction driven by that noise
  //   divides by the sine floor;
  // - sqrt(1 - c^2), which turns delta into sqrt(2 delta), is 0 when 1 - c^2 <= 2 delta: rows
  //   collinear up to rounding are cancelled exactly by the correction, as in float64;
  // - the cosine the target moves toward is kept within 1 - delta of +-1, so that noise does not
  //   saturate a target that a later, better resolved, cosine is then compared with.
  const double rounding_sq = precision * magnitude * magnitude;
  *cos_out = 0.0;
  if (!(norm_i_sq > rounding_sq)) return 0.0;
  const double delta = rounding_sq / norm_i_sq;
  const double ni = sqrt(norm_i_sq);
  const double nj = sqrt(fmax(gjj, 0.0));
  const double denom = ni * nj + eps;
  // A zero row with eps = 0 would give 0/0: its cosine is taken as 0 (guard 2). A cosine is in
  // [-1, 1] (Cauchy-Schwarz); rounding can push it slightly out, so it is clamped (guard 1).
  const double c = denom > 0.0 ? fmin(fmax(dot / denom, -1.0), 1.0) : 0.0;
  *cos_out = fmin(fmax(c, delta - 1.0), 1.0 - delta);
  if (!(c < t - delta) || nj == 0.0) return 0.0;  // adding w * 0 changes nothing but the weights
  const double sin_sq = 1.0 - c * c;
  const double sc = sin_sq > 2.0 * delta ? sqrt(sin_sq) : 0.0;
  const double st = fmax(sqrt(fmax(1.0 - t * t, 0.0)), sine_floor);  // guard 3
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
