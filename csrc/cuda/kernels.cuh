// The CUDA kernels' cores, shared between the op kernels of this folder (as cpu/kernels.h is for
// the CPU): each op's .cu registers its op and exposes its core here, and `Cores` hands them to
// the aggregate op's sequence (../aggregate.h, registered by aggregate.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <vector>

#include "../common.h"

namespace fusedjd::cuda {

// gramian.cu: the Gramians [k, m, m] of B's column groups (`off`: k + 1 offsets), float32 (float64
// for float64 J), on B's device.
at::Tensor gramian_core(const Blocks& B, const std::vector<int64_t>& off);

// gradvac.cu: the GradVac loop (targets given) or the PCGrad loop (targets null) on the Gramians G
// [k, m, m] with the visit orders perms: the weights [k, m] (check_loop_args included).
at::Tensor loop_core(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets, double beta, double eps);

// combine.cu: out[cols of g] = W[g] J[:, cols of g] into out ([n], B's dtype, on its device), for m, n > 0.
void combine_into(const Blocks& B, const std::vector<int64_t>& off, const at::Tensor& W, const at::Tensor& out);

// The cores as the aggregate op's sequence takes them (../aggregate.h).
struct Cores {
  static void check_draws(const at::Device& device) {
#if !defined(FUSEDJD_SIMT)  // (the emulation's tensors live on the CPU: no capture there)
    check_host_draws_allowed(device);  // a CUDA graph cannot replay a host draw: refused before any launch
#else
    (void)device;
#endif
  }
  static at::Tensor gramian(const Blocks& B, const std::vector<int64_t>& off) { return gramian_core(B, off); }
  static at::Tensor loop(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets, double beta, double eps) {
    return loop_core(G, perms, targets, beta, eps);
  }
  static at::Tensor combine(const Blocks& B, const std::vector<int64_t>& off, const at::Tensor& W) {
    at::Tensor out = at::empty({B.n}, at::TensorOptions().dtype(B.dtype).device(B.device));
    if (B.n == 0 || B.m == 0) return out.zero_();
    combine_into(B, off, W, out);
    return out;
  }
};

}  // namespace fusedjd::cuda
