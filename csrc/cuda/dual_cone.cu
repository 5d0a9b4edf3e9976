// CUDA kernel of the dual_cone op: every right-hand side in one launch, one thread each, solved by
// csrc/dual_cone.h in float64 with its scratch in global memory; no host synchronisation, and the
// scratch depends on k and m only, so the op runs under CUDA-graph capture. The scratch is capped:
// at most kDualConeScratchBytes of slots (one per thread, dual_cone_scratch(m) doubles and
// dual_cone_index_scratch(m) integers each), and a thread with more right-hand sides than slots
// allow solves them one after another in its slot. Each block first checks G for non-finite
// entries (together, once) instead of every thread on its own.
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "../dual_cone.h"
#include "cuda_common.cuh"

namespace fusedjd::cuda {
namespace {

constexpr int kDualConeThreads = 64;
constexpr int64_t kDualConeScratchBytes = int64_t{256} << 20;

__global__ void dual_cone_kernel(const double* G, const double* U, double* V, double* work, int64_t* idx, int64_t k,
                                 int64_t m) {
  __shared__ int non_finite;
  if (threadIdx.x == 0) non_finite = 0;
  __syncthreads();
  int mine = 0;
  for (int64_t a = threadIdx.x; a < m * m; a += kDualConeThreads) mine |= isfinite(G[a]) ? 0 : 1;
  if (mine) atomicOr(&non_finite, 1);
  __syncthreads();
  const bool finite = non_finite == 0;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kDualConeThreads + threadIdx.x;
  const int64_t slots = static_cast<int64_t>(gridDim.x) * kDualConeThreads;
  double* w = work + slot * dual_cone_scratch(m);
  int64_t* i = idx + slot * dual_cone_index_scratch(m);
  for (int64_t r = slot; r < k; r += slots) dual_cone_solve(G, m, U + r * m, V + r * m, w, i, finite);
}

at::Tensor dual_cone_cuda(const at::Tensor& U, const at::Tensor& G) {
  const DeviceGuard guard(G.device());
  const DualConeProblem p = dual_cone_problem(U, G);
  const int64_t k = p.k, m = p.m;
  if (k > 0) {
    const int64_t slot_bytes = 8 * (dual_cone_scratch(m) + dual_cone_index_scratch(m));
    const int64_t blocks_needed = (k + kDualConeThreads - 1) / kDualConeThreads;
    const int64_t blocks_fit = std::max<int64_t>(1, kDualConeScratchBytes / (slot_bytes * kDualConeThreads));
    const int64_t blocks = std::min(blocks_needed, blocks_fit);
    const int64_t slots = blocks * kDualConeThreads;
    at::Tensor work = at::empty({slots * dual_cone_scratch(m)}, p.U.options());
    at::Tensor idx = at::empty({slots * dual_cone_index_scratch(m)}, p.U.options().dtype(at::kLong));
    launch("dual_cone_kernel", dual_cone_kernel, dim3(static_cast<unsigned>(blocks)), kDualConeThreads, 0,
           p.G.data_ptr<double>(), p.U.data_ptr<double>(), p.V.data_ptr<double>(), work.data_ptr<double>(),
           idx.data_ptr<int64_t>(), k, m);
  }
  return p.finish(U, G);
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) { m.impl("dual_cone", &dual_cone_cuda); }

}  // namespace fusedjd::cuda
