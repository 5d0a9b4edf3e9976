// Shared argument checks for the fusedjd kernels (CPU and CUDA).
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

inline void check_gradvac_hyper(double beta, double eps) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "fusedjd: `beta` must be in [0, 1], got ", beta);
  TORCH_CHECK(eps >= 0.0, "fusedjd: `eps` must be non-negative, got ", eps);
}

// The combine's preamble, one for both backends: the checks, the output, and the blocks in the
// layout the kernels read (unit column stride); each backend takes the weights in the layout it
// reads. When n or m is 0 the output is already complete and `done` is set.
struct CombineArgs {
  Blocks B;
  std::vector<int64_t> off;  // group offsets, k + 1 entries
  at::Tensor out;
  bool done;
};

inline CombineArgs prepare_combine(at::TensorList J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  CombineArgs a;
  a.B = check_blocks(J);
  FUSEDJD_CHECK_DIM(weights, 2);
  FUSEDJD_CHECK_FLOAT(weights);
  FUSEDJD_CHECK_ON_J(weights, "weights", a.B);
  a.off = group_offsets(group_sizes, a.B.n);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK(weights.size(0) == k && weights.size(1) == a.B.m, "fusedjd: `weights` must have shape [k, m] = [", k,
              ", ", a.B.m, "], got ", weights.sizes());
  a.out = at::empty({a.B.n}, at::TensorOptions().dtype(a.B.dtype).device(a.B.device));
  a.done = a.B.n == 0 || a.B.m == 0;
  if (a.done) {
    a.out.zero_();
    return a;
  }
  return a;
}

inline void check_targets(const at::Tensor& G, const at::Tensor& targets) {
  FUSEDJD_CHECK_SAME_DEVICE(G, targets);
  TORCH_CHECK(targets.sizes() == G.sizes(), "fusedjd: `targets` must have the shape of `G` ",
              G.sizes(), ", got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == G.scalar_type(), "fusedjd: `targets` must have the dtype of `G` (",
              G.scalar_type(), "), got ", targets.scalar_type());
  FUSEDJD_CHECK_CONTIGUOUS(targets);
  TORCH_CHECK(!targets.is_alias_of(G), "fusedjd: `targets` (updated in place) must not share memory with `G`");
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
