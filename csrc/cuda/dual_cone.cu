// CUDA kernel of the dual_cone op: every right-hand side in one launch, solved by csrc/dual_cone.h in
// float64 by one thread, with its scratch in global memory; no host synchronisation, and the
// scratch depends on k, m and the device only, so the op runs under CUDA-graph capture. The scratch
// is capped: one slot per thread (dual_cone_scratch(m) doubles and dual_cone_index_scratch(m)
// integers), at most kDualConeScratchBytes of slots or one per multiprocessor, whichever is more;
// a thread with more right-hand sides than slots allow solves them one after another in its slot,
// and the slots are spread over the multiprocessors (fewer threads per block) before any block
// is left out. Each block first checks G for non-finite entries (together, once) instead of every
// thread on its own.
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "../dual_cone.h"
#include "cuda_common.cuh"

namespace fusedjd::cuda {
namespace {

constexpr int kDualConeThreads = 64;
constexpr int64_t kDualConeScratchBytes = int64_t{256} << 20;

// paths: null, or dual_cone_solve's result for each right-hand side (the _dual_cone_paths op)
__global__ void dual_cone_kernel(const double* G, const double* U, double* V, double* work, int64_t* idx,
                                 int64_t* paths, int64_t k, int64_t m) {
  __shared__ int non_finite;
  if (threadIdx.x == 0) non_finite = 0;
  __syncthreads();
  int mine = 0;
  for (int64_t a = threadIdx.x; a < m * m; a += blockDim.x) mine |= isfinite(G[a]) ? 0 : 1;
  if (mine) atomicOr(&non_finite, 1);
  __syncthreads();
  const bool finite = non_finite == 0;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t slots = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double* w = work + slot * dual_cone_scratch(m);
  int64_t* i = idx + slot * dual_cone_index_scratch(m);
  for (int64_t r = slot; r < k; r += slots) {
    const int64_t path = dual_cone_solve(G, m, U + r * m, V + r * m, w, i, finite);
    if (paths != nullptr) paths[r] = path;
  }
}

// Every right-hand side of p solved in one launch; paths as the kernel's.
void solve_all(const DualConeProblem& p, int64_t* paths) {
  const int64_t k = p.k, m = p.m;
  if (k > 0) {
    const int64_t slot_bytes = 8 * (dual_cone_scratch(m) + dual_cone_index_scratch(m));
    const int64_t sms = sm_count();
    const int64_t slots_fit = std::max<int64_t>(sms, kDualConeScratchBytes / slot_bytes);
    const int64_t wanted = std::min(k, slots_fit);
    // up to kDualConeThreads per block, but every multiprocessor busy first
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(kDualConeThreads, (wanted + sms - 1) / sms));
    const int64_t blocks = (wanted + threads - 1) / threads;
    const int64_t slots = blocks * threads;
    at::Tensor work = at::empty({slots * dual_cone_scratch(m)}, p.U.options());
    at::Tensor idx = at::empty({slots * dual_cone_index_scratch(m)}, p.U.options().dtype(at::kLong));
    launch("dual_cone_kernel", dual_cone_kernel, dim3(static_cast<unsigned>(blocks)),
           dim3(static_cast<unsigned>(threads)), 0,
           p.G.data_ptr<double>(), p.U.data_ptr<double>(), p.V.data_ptr<double>(), work.data_ptr<double>(),
           idx.data_ptr<int64_t>(), paths, k, m);
  }
}

at::Tensor dual_cone_cuda(const at::Tensor& U, const at::Tensor& G) {
  const DeviceGuard guard(G.device());
  const DualConeProblem p = dual_cone_problem(U, G);
  solve_all(p, nullptr);
  return p.finish(U, G);
}

at::Tensor dual_cone_paths_cuda(const at::Tensor& U, const at::Tensor& G) {
  const DeviceGuard guard(G.device());
  const DualConeProblem p = dual_cone_problem(U, G);
  at::Tensor paths = at::zeros({p.k}, p.U.options().dtype(at::kLong));
  solve_all(p, paths.data_ptr<int64_t>());
  return paths;
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) {
  m.impl("dual_cone", &dual_cone_cuda);
  m.impl("_dual_cone_paths", &dual_cone_paths_cuda);
}

}  // namespace fusedjd::cuda
