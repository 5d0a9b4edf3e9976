// The CPU kernels' cores, shared between the op kernels of this folder: each op's .cpp registers
// its op and exposes its core here, and `Cores` hands them to the aggregate op's sequence
// (../aggregate.h), so that GradVac or PCGrad runs in one call without a dispatcher hop.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common.h"

namespace fusedjd::cpu {

// gramian.cpp: the Gramians of B's column groups (`off`: k + 1 offsets) into `out` ([k, m, m],
// contiguous, float32 or float64: float64 sums rounded to its dtype), by the streaming engine.
void gramian_into(const Blocks& B, const std::vector<int64_t>& off, const at::Tensor& out);

// gradvac.cpp: the GradVac (targets given) or PCGrad (targets null) loop on the Gramians G
// [k, m, m] with the visit orders perms, after check_loop_args: the weights [k, m]; NaN weights
// and the targets untouched for a non-finite G or an invalid visit order.
at::Tensor run_loop(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets, double beta, double eps);

// combine.cpp: out[cols of g] = sum_i w[g * m + i] J[i, cols of g] (w: k * m float64), for m, n > 0.
void combine_into(const Blocks& B, const std::vector<int64_t>& off, const double* w, const at::Tensor& out);

// The cores as the aggregate op's sequence takes them (../aggregate.h).
struct Cores {
  static void check_draws(const at::Device&) {}  // (no CUDA-graph capture on the CPU)

  static at::Tensor gramian(const Blocks& B, const std::vector<int64_t>& off) {
    const int64_t k = static_cast<int64_t>(off.size()) - 1;
    at::Tensor G = at::empty({k, B.m, B.m}, at::TensorOptions().dtype(acc_dtype(B.dtype)));
    gramian_into(B, off, G);
    return G;
  }

  static at::Tensor loop(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets, double beta, double eps) {
    return run_loop(G, perms, targets, beta, eps);
  }

  static at::Tensor combine(const Blocks& B, const std::vector<int64_t>& off, const at::Tensor& W) {
    at::Tensor out = at::empty({B.n}, at::TensorOptions().dtype(B.dtype));
    if (B.n == 0 || B.m == 0) return out.zero_();
    const int64_t km = W.numel();
    std::vector<double> w(static_cast<size_t>(km));
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "fusedjd_aggregate_weights", [&] {
      std::copy(W.data_ptr<scalar_t>(), W.data_ptr<scalar_t>() + km, w.begin());
    });
    combine_into(B, off, w.data(), out);
    return out;
  }
};

}  // namespace fusedjd::cpu
