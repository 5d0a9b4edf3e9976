// The GradVac / PCGrad loop's checks and scalar math, shared by the CPU and CUDA kernels
// (cpu/gradvac.cpp, cpu/aggregate.cpp, cuda/gradvac.cu): the pair update with its guards
// (docs/CONTRACT.md §1) and the checks of G, the visit orders, the targets and the
// hyper-parameters.
#pragma once

#include "common.h"
#include "hd.h"

namespace fusedjd {

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

// The visit orders of a loop on Gramians [k, m, m] on `device`: [k, m, m-1], int64.
inline void check_perms_for(const at::Tensor& perms, int64_t k, int64_t m, const at::Device& device) {
  FUSEDJD_CHECK_DIM(perms, 3);
  FUSEDJD_CHECK_DTYPE(perms, at::kLong);
  TORCH_CHECK(perms.device() == device, "fusedjd: `G` is on ", device, " but `perms` is on ", perms.device(),
              "; all tensors must be on the same device");
  TORCH_CHECK(perms.size(0) == k && perms.size(1) == m && perms.size(2) == (m > 0 ? m - 1 : 0),
              "fusedjd: `perms` must have shape [k, m, m-1] = [", k, ", ", m, ", ",
              (m > 0 ? m - 1 : 0), "], got ", perms.sizes());
}

// Checks shared by the GradVac / PCGrad loop on every backend.
inline void check_loop_args(const at::Tensor& G, const at::Tensor& perms) {
  FUSEDJD_CHECK_DIM(G, 3);
  TORCH_CHECK(G.size(1) == G.size(2), "fusedjd: `G` must be a stack of square Gramians [k, m, m], got shape ",
              G.sizes());
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "fusedjd: `G` must be float32 or float64, got ", G.scalar_type());
  check_perms_for(perms, G.size(0), G.size(1), G.device());
}

inline void check_gradvac_hyper(double beta, double eps) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "fusedjd: `beta` must be in [0, 1], got ", beta);
  TORCH_CHECK(eps >= 0.0, "fusedjd: `eps` must be non-negative, got ", eps);
}

// The GradVac targets of a loop on Gramians of shape `G_sizes`, dtype `G_dtype`, on `device`
// (before those Gramians exist: the aggregate op checks everything first).
inline void check_targets_for(const at::Tensor& targets, at::IntArrayRef G_sizes, at::ScalarType G_dtype,
                              const at::Device& device) {
  TORCH_CHECK(targets.device() == device, "fusedjd: `G` is on ", device, " but `targets` is on ", targets.device(),
              "; all tensors must be on the same device");
  TORCH_CHECK(targets.sizes() == G_sizes, "fusedjd: `targets` must have the shape of `G` ", G_sizes, ", got ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == G_dtype, "fusedjd: `targets` must have the dtype of `G` (", G_dtype,
              "), got ", targets.scalar_type());
  FUSEDJD_CHECK_CONTIGUOUS(targets);
}

inline void check_targets(const at::Tensor& G, const at::Tensor& targets) {
  check_targets_for(targets, G.sizes(), G.scalar_type(), G.device());
  TORCH_CHECK(!targets.is_alias_of(G), "fusedjd: `targets` (updated in place) must not share memory with `G`");
}

}  // namespace fusedjd
