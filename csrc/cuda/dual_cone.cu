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
  const DeviceGuard guard(G.device());
  const DualConeProblem p = dual_cone_problem(U, G);
  const int64_t k = p.k, m = p.m;
  if (k > 0) {
    at::Tensor work = at::empty({k * dual_cone_scratch(m)}, p.U.options());
    at::Tensor rows = at::empty({k * m}, p.U.options().dtype(at::kLong));
    const dim3 grid(static_cast<unsigned>((k + kDualConeThreads - 1) / kDualConeThreads));
    launch("dual_cone_kernel", dual_cone_kernel, grid, kDualConeThreads, 0, p.G.data_ptr<double>(),
           p.U.data_ptr<double>(), p.V.data_ptr<double>(), work.data_ptr<double>(), rows.data_ptr<int64_t>(), k, m);
  }
  return p.finish(U, G);
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) { m.impl("dual_cone", &dual_cone_cuda); }

}  // namespace fusedjd::cuda
