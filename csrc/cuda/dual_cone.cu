// CUDA kernel of the dual_cone op: every right-hand side in one launch, one thread each, solved by
// csrc/dual_cone.h in float64 with its scratch in global memory (sized by k and m only, so the op
// runs under CUDA-graph capture; no host synchronisation). A thread per right-hand side rather than
// a warp: the active-set steps are short sequential triangular solves on an m x m factor, and
// UPGrad's m right-hand sides keep m threads busy.
#include <torch/library.h>

#include "../common.h"
#include "../dual_cone.h"
#include "cuda_common.cuh"

namespace fusedjd::cuda {
namespace {

constexpr int kDualConeThreads = 64;

__global__ void dual_cone_kernel(const double* G, const double* U, double* V, double* work, int64_t* rows, int64_t k,
                                 int64_t m) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kDualConeThreads + threadIdx.x;
  if (r >= k) return;
  dual_cone_solve(G, m, U + r * m, V + r * m, work + r * dual_cone_scratch(m), rows + r * m);
}

at::Tensor dual_cone_cuda(const at::Tensor& U, const at::Tensor& G) {
  check_dual_cone_args(U, G);
  const DeviceGuard guard(G.device());
  const int64_t m = G.size(0);
  if (m == 0 || U.numel() == 0) return at::empty(U.sizes(), U.options().dtype(G.scalar_type()));
  const at::Tensor Gd = G.to(at::kDouble).contiguous();
  const at::Tensor Ud = U.reshape({-1, m}).to(at::kDouble).contiguous();
  const int64_t k = Ud.size(0);
  at::Tensor V = at::empty({k, m}, Ud.options());
  {
    at::Tensor work = at::empty({k * dual_cone_scratch(m)}, Ud.options());
    at::Tensor rows = at::empty({k * m}, Ud.options().dtype(at::kLong));
    const dim3 grid(static_cast<unsigned>((k + kDualConeThreads - 1) / kDualConeThreads));
    launch("dual_cone_kernel", dual_cone_kernel, grid, kDualConeThreads, 0, Gd.data_ptr<double>(),
           Ud.data_ptr<double>(), V.data_ptr<double>(), work.data_ptr<double>(), rows.data_ptr<int64_t>(), k, m);
  }
  return V.to(G.scalar_type()).reshape(U.sizes());
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) { m.impl("dual_cone", &dual_cone_cuda); }

}  // namespace fusedjd::cuda
