// What every fusedjd kernel (CPU and CUDA) shares: the argument-check macros, the accumulation
// dtype, the Jacobian as a list of column blocks, the column groups' offsets, and the CUDA-graph
// capture declarations. Each op's own checks and math live in its header (combine.h, gradvac.h,
// moco.h, dual_cone.h).
//
// Every check names the argument and says what was expected and what was
// received, so that a user who passes a wrong tensor learns which one and why.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

// `x` (called `name` in the message) must be on the device of the Jacobian's blocks B.
#define FUSEDJD_CHECK_ON_J(x, name, B)                                            \
  TORCH_CHECK((x).device() == (B).device, "fusedjd: `" name "` is on ",          \
              (x).device(), " but `J` is on ", (B).device,                        \
              "; all tensors must be on the same device")

#define FUSEDJD_CHECK_DTYPE(x, dt)                                                \
  TORCH_CHECK((x).scalar_type() == (dt), "fusedjd: `" #x "` must have dtype ",   \
              (dt), ", got ", (x).scalar_type())

#define FUSEDJD_CHECK_CONTIGUOUS(x)                                               \
  TORCH_CHECK((x).is_contiguous(), "fusedjd: `" #x "` must be contiguous, got "  \
              "strides ", (x).strides(), " for shape ", (x).sizes())

namespace fusedjd {

// Whether a CUDA-graph capture is in progress on the current stream of `device` (false for a
// non-CUDA device and in a build without CUDA kernels). Defined in csrc/fusedjd.cpp.
bool cuda_capture_active(const at::Device& device);

// Refuses (naming the way out, draws="device") to draw GradVac's and PCGrad's visit orders on the
// host for `device` while a CUDA-graph capture is in progress there. csrc/composite/draw_perms.cpp.
void check_host_draws_allowed(const at::Device& device);

// Accumulation / state dtype for a given input dtype: float32 for float16,
// bfloat16 and float32 inputs, float64 for float64 inputs.
// The dtypes the solver ops (dual_cone, mgda) take; they solve in float64 whatever the dtype.
inline bool solver_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A Jacobian given as a list of column blocks J[b] [m, n_b] (one per parameter in jac_to_grad;
// one block for a plain matrix): the kernels read them as the matrix [J[0] J[1] ...] of
// n = sum n_b columns, without forming it. Every block has unit column stride (a block with
// other strides is copied once; `J` keeps the copy alive).
struct Blocks {
  std::vector<at::Tensor> J;
  std::vector<int64_t> off;  // B + 1 column offsets
  int64_t m = 0, n = 0;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
};

// Checks the list (at least one block; each 2-D and floating; one dtype, device and row count)
// and returns its blocks.
inline Blocks check_blocks(at::TensorList Js) {
  TORCH_CHECK(!Js.empty(), "fusedjd: `J` must hold at least one matrix, got an empty list");
  Blocks B;
  B.m = Js[0].dim() == 2 ? Js[0].size(0) : 0;
  B.dtype = Js[0].scalar_type();
  B.device = Js[0].device();
  B.off.assign(1, 0);
  for (size_t b = 0; b < Js.size(); ++b) {
    const at::Tensor& x = Js[b];
    TORCH_CHECK(x.dim() == 2, "fusedjd: `J[", b, "]` must have 2 dimensions, got shape ", x.sizes());
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fusedjd: `J[", b,
                "]` must be a floating-point tensor, got dtype ", x.scalar_type());
    TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat ||
                    x.scalar_type() == at::kDouble,
                "fusedjd: `J[", b, "]` must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
    TORCH_CHECK(x.scalar_type() == B.dtype, "fusedjd: `J[", b, "]` must have the dtype of `J[0]` (", B.dtype,
                "), got ", x.scalar_type());
    TORCH_CHECK(x.device() == B.device, "fusedjd: `J[", b, "]` is on ", x.device(), " but `J[0]` is on ", B.device,
                "; all tensors must be on the same device");
    TORCH_CHECK(x.size(0) == B.m, "fusedjd: `J[", b, "]` must have m=", B.m, " rows like `J[0]`, got shape ",
                x.sizes());
    B.J.push_back((x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous());
    B.off.push_back(B.off.back() + x.size(1));
  }
  B.n = B.off.back();
  return B;
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
    TORCH_CHECK(!__builtin_add_overflow(off[g], group_sizes[g], &off[g + 1]),
                "fusedjd: `group_sizes` must sum to the number of columns n=", n,
                ", got a sum beyond the int64 range for ", group_sizes.size(), " groups");
  }
  TORCH_CHECK(off.back() == n, "fusedjd: `group_sizes` must sum to the number of columns n=",
              n, ", got sum ", off.back(), " for ", group_sizes.size(), " groups");
  return off;
}

}  // namespace fusedjd
