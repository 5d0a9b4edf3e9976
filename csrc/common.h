// Shared argument checks for the fusedjd kernels (CPU and CUDA).
//
// Every check names the argument and says what was expected and what was
// received, so that a user who passes a wrong tensor learns which one and why.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#define FUSEDJD_CHECK_DIM(x, d)                                                   \
  TORCH_CHECK((x).dim() == (d), "fusedjd: `" #x "` must have ", (d),              \
              " dimensions, got shape ", (x).sizes())

#define FUSEDJD_CHECK_FLOAT(x)                                                    \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()),                              \
              "fusedjd: `" #x "` must be a floating-point tensor, got dtype ",    \
              (x).scalar_type())

#define FUSEDJD_CHECK_SAME_DEVICE(x, y)                                           \
  TORCH_CHECK((x).device() == (y).device(), "fusedjd: `" #x "` is on ",          \
              (x).device(), " but `" #y "` is on ", (y).device(),                 \
              "; all tensors must be on the same device")

#define FUSEDJD_CHECK_DTYPE(x, dt)                                                \
  TORCH_CHECK((x).scalar_type() == (dt), "fusedjd: `" #x "` must have dtype ",   \
              (dt), ", got ", (x).scalar_type())

#define FUSEDJD_CHECK_CONTIGUOUS(x)                                               \
  TORCH_CHECK((x).is_contiguous(), "fusedjd: `" #x "` must be contiguous, got "  \
              "strides ", (x).strides(), " for shape ", (x).sizes())

namespace fusedjd {

// Accumulation / state dtype for a given input dtype: float32 for float16,
// bfloat16 and float32 inputs, float64 for float64 inputs.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels read columns with unit stride (rows may have any stride): other layouts are
// copied once.
inline at::Tensor unit_col_stride(const at::Tensor& J) {
  return (J.size(1) <= 1 || J.stride(1) == 1) ? J : J.contiguous();
}

// Validates column-group sizes against n and returns their prefix offsets
// (size k + 1). Sizes may be zero; they must be non-negative and sum to n.
inline std::vector<int64_t> group_offsets(at::IntArrayRef group_sizes, int64_t n) {
  TORCH_CHECK(!group_sizes.empty(),
              "fusedjd: `group_sizes` must name at least one group, got []");
  std::vector<int64_t> off(group_sizes.size() + 1, 0);
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    TORCH_CHECK(group_sizes[g] >= 0, "fusedjd: `group_sizes` must be non-negative, got ",
                group_sizes[g], " at position ", g);
    off[g + 1] = off[g] + group_sizes[g];
  }
  TORCH_CHECK(off.back() == n, "fusedjd: `group_sizes` must sum to the number of columns n=",
              n, ", got sum ", off.back(), " for ", group_sizes.size(), " groups");
  return off;
}

// Checks shared by the GradVac / PCGrad loop on every backend.
inline void check_loop_args(const at::Tensor& G, const at::Tensor& perms) {
  FUSEDJD_CHECK_DIM(G, 3);
  TORCH_CHECK(G.size(1) == G.size(2), "fusedjd: `G` must be a stack of square Gramians [k, m, m], got shape ",
              G.sizes());
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "fusedjd: `G` must be float32 or float64, got ", G.scalar_type());
  FUSEDJD_CHECK_DIM(perms, 3);
  FUSEDJD_CHECK_DTYPE(perms, at::kLong);
  FUSEDJD_CHECK_SAME_DEVICE(G, perms);
  const int64_t k = G.size(0), m = G.size(1);
  TORCH_CHECK(perms.size(0) == k && perms.size(1) == m && perms.size(2) == (m > 0 ? m - 1 : 0),
              "fusedjd: `perms` must have shape [k, m, m-1] = [", k, ", ", m, ", ",
              (m > 0 ? m - 1 : 0), "], got ", perms.sizes());
}

inline void check_gradvac_hyper(double beta, double eps) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "fusedjd: `beta` must be in [0, 1], got ", beta);
  TORCH_CHECK(eps >= 0.0, "fusedjd: `eps` must be non-negative, got ", eps);
}

// Checks of the combine op; returns the group offsets.
inline std::vector<int64_t> check_combine_args(const at::Tensor& J, const at::Tensor& weights,
                                               at::IntArrayRef group_sizes) {
  FUSEDJD_CHECK_DIM(J, 2);
  FUSEDJD_CHECK_FLOAT(J);
  FUSEDJD_CHECK_DIM(weights, 2);
  FUSEDJD_CHECK_FLOAT(weights);
  FUSEDJD_CHECK_SAME_DEVICE(J, weights);
  std::vector<int64_t> off = group_offsets(group_sizes, J.size(1));
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK(weights.size(0) == k && weights.size(1) == J.size(0), "fusedjd: `weights` must have shape [k, m] = [",
              k, ", ", J.size(0), "], got ", weights.sizes());
  return off;
}

// The combine's preamble, one for both backends: the checks, the output, and the inputs in the
// layout the kernels read (J with unit column stride, the weights as contiguous float64). When n
// or m is 0 the output is already complete and `done` is set.
struct CombineArgs {
  std::vector<int64_t> off;  // group offsets, k + 1 entries
  at::Tensor out, J, W;
  bool done;
};

inline CombineArgs prepare_combine(const at::Tensor& J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  CombineArgs a;
  a.off = check_combine_args(J, weights, group_sizes);
  a.out = J.new_empty({J.size(1)});
  a.done = J.size(1) == 0 || J.size(0) == 0;
  if (a.done) {
    a.out.zero_();
    return a;
  }
  a.J = unit_col_stride(J);
  a.W = weights.to(at::kDouble).contiguous();
  return a;
}

inline void check_targets(const at::Tensor& G, const at::Tensor& targets) {
  FUSEDJD_CHECK_SAME_DEVICE(G, targets);
  TORCH_CHECK(targets.sizes() == G.sizes(), "fusedjd: `targets` must have the shape of `G` ",
              G.sizes(), ", got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == G.scalar_type(), "fusedjd: `targets` must have the dtype of `G` (",
              G.scalar_type(), "), got ", targets.scalar_type());
  FUSEDJD_CHECK_CONTIGUOUS(targets);
}

inline void check_moco_args(const at::Tensor& J, const at::Tensor& Y, const at::Tensor& lam,
                            const at::Tensor& step) {
  FUSEDJD_CHECK_DIM(J, 2);
  FUSEDJD_CHECK_FLOAT(J);
  FUSEDJD_CHECK_SAME_DEVICE(J, Y);
  FUSEDJD_CHECK_SAME_DEVICE(J, lam);
  FUSEDJD_CHECK_SAME_DEVICE(J, step);
  TORCH_CHECK(Y.sizes() == J.sizes(), "fusedjd: `Y` must have the shape of `J` ", J.sizes(), ", got ",
              Y.sizes());
  TORCH_CHECK(Y.scalar_type() == J.scalar_type(), "fusedjd: `Y` must have the dtype of `J` (",
              J.scalar_type(), "), got ", Y.scalar_type());
  FUSEDJD_CHECK_CONTIGUOUS(Y);
  FUSEDJD_CHECK_DIM(lam, 1);
  TORCH_CHECK(lam.size(0) == J.size(0), "fusedjd: `lam` must have length m=", J.size(0), ", got ",
              lam.size(0));
  FUSEDJD_CHECK_DTYPE(lam, acc_dtype(J.scalar_type()));
  FUSEDJD_CHECK_CONTIGUOUS(lam);
  FUSEDJD_CHECK_DIM(step, 0);
  FUSEDJD_CHECK_DTYPE(step, at::kLong);
}

}  // namespace fusedjd
