// CUDA kernels of the GradVac family: the GradVac and PCGrad loops on k Gramians in one
// launch. Each (group, row) chain is one warp; its steps run in order, the O(m) work of a
// step (|p|^2, the update of <p, g_.>) is spread over the warp's lanes. A first kernel (one
// block) checks that every Gramian is finite and every visit order valid: if not, no chain runs,
// no target is written and the weights are NaN. The weights (column sums of the coefficient rows)
// are summed in a fixed order by the last chain block to finish: two launches per loop, no fill.
// A chain's working rows live in shared memory up to m = kSmemMaxRows, in global memory beyond
// (any m).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common.h"
#include "../gradvac.h"
#include "cuda_common.cuh"
#include "kernels.cuh"

namespace fusedjd::cuda {
namespace {

constexpr int kChainsPerBlock = 4;
// 48 KiB of shared memory without the opt-in, less the kernel's static `last` flag: 767 rows
constexpr int64_t kSmemMaxRows = (48 * 1024 - 16) / (2 * static_cast<int64_t>(sizeof(double)) * kChainsPerBlock);
constexpr int kCheckThreads = 1024;

// status[0] = some G entry is not finite; status[1] = some visit order names row i itself or a row
// outside [0, m); status[2] = 0 (the chain blocks' arrival counter). One block: it writes the whole
// status, so no fill has to run before it.
template <typename S>
__global__ void __launch_bounds__(kCheckThreads)
    check_inputs_kernel(const S* G, int64_t count, const int64_t* perms, int64_t chains, int64_t m, int* status) {
  __shared__ int bad[2];
  if (threadIdx.x < 2) bad[threadIdx.x] = 0;
  __syncthreads();
  const int64_t nperm = chains * (m - 1);
  const int64_t total = count > nperm ? count : nperm;
  bool bad_g = false, bad_p = false;
  for (int64_t e = threadIdx.x; e < total; e += kCheckThreads) {
    if (e < count) bad_g |= !isfinite(static_cast<double>(G[e]));
    if (e < nperm) {
      const int64_t i = (e / (m - 1)) % m, j = perms[e];
      bad_p |= j < 0 || j >= m || j == i;
    }
  }
  if (bad_g) atomicOr(&bad[0], 1);
  if (bad_p) atomicOr(&bad[1], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    status[0] = bad[0];
    status[1] = bad[1];
    status[2] = 0;
  }
}

// The weights: column sums of the coefficient rows in a fixed order (NaN when the inputs were
// refused), by the threads of one block.
template <typename S>
__device__ void column_sums(const double* coef, int64_t k, int64_t m, bool refused, S* weights) {
  for (int64_t e = threadIdx.x; e < k * m; e += blockDim.x) {
    const int64_t g = e / m, b = e % m;
    double s = 0.0;
    if (!refused)
      for (int64_t i = 0; i < m; ++i) s += coef[(g * m + i) * m + b];
    weights[e] = refused ? static_cast<S>(NAN) : static_cast<S>(s);
  }
}

// PCGRAD: PCGrad's rule, no targets. SMEM: the chain's rows C and C·G in shared memory (else in
// global scratch). The last block to finish (counted in status[2]) writes the weights, so the loop
// is two launches: check_inputs_kernel, then this one.
template <typename S, bool PCGRAD, bool SMEM>
__global__ void chain_kernel(const S* G, const int64_t* perms, S* targets, double* coef, double* scratch, int64_t k,
                             int64_t m, double beta, double eps, int* status, S* weights) {
  FUSEDJD_DYNAMIC_SMEM(double, smem);
  __shared__ bool last;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t chain = static_cast<int64_t>(blockIdx.x) * kChainsPerBlock + warp;
  const bool refused = status[0] != 0 || status[1] != 0;
  if (chain < k * m && !refused) {  // the same for a whole warp
    const int64_t g = chain / m, i = chain % m;
    const S* Gg = G + g * m * m;
    double* C = SMEM ? smem + static_cast<int64_t>(warp) * 2 * m : coef + chain * m;
    double* cG = SMEM ? C + m : scratch + chain * m;
    const int64_t* order = perms + chain * (m - 1);
    const double floor = target_sine_floor<S>();
    const double precision = gramian_precision<S>();
    // sum_a |C_a| |g_a|, kept up to date as C changes, the same value in every lane
    double magnitude = sqrt(fmax(static_cast<double>(Gg[i * m + i]), 0.0));
    for (int64_t a = lane; a < m; a += kWarp) {
      C[a] = (a == i) ? 1.0 : 0.0;
      cG[a] = static_cast<double>(Gg[i * m + a]);
    }
    __syncwarp();
    for (int64_t s = 0; s + 1 < m; ++s) {
      const int64_t j = order[s];
      double part = 0.0;
      for (int64_t a = lane; a < m; a += kWarp) part += cG[a] * C[a];
      const double norm_sq = warp_sum(part);
      S* tgt = PCGRAD ? nullptr : targets + (g * m + i) * m + j;
      const double t = PCGRAD ? 0.0 : static_cast<double>(*tgt);
      double c = 0.0;
      const double gjj = static_cast<double>(Gg[j * m + j]);
      const double w = gradvac_pair<PCGRAD>(norm_sq, cG[j], gjj, t, eps, floor, magnitude, precision, &c);
      const double cj = C[j];
      __syncwarp();  // every lane has read cG[j] and C[j] before they change
      if (w != 0.0) {
        if (!PCGRAD) magnitude += (fabs(cj + w) - fabs(cj)) * sqrt(fmax(gjj, 0.0));
        for (int64_t a = lane; a < m; a += kWarp) cG[a] += w * static_cast<double>(Gg[j * m + a]);
        if (lane == 0) C[j] += w;
      }
      if (!PCGRAD && lane == 0) *tgt = static_cast<S>((1.0 - beta) * t + beta * c);
      __syncwarp();
    }
    if (SMEM)
      for (int64_t a = lane; a < m; a += kWarp) coef[chain * m + a] = C[a];
  }
  // the last block to arrive sums the coefficient rows of every chain
  __threadfence();  // this block's coefficient rows are visible to the block that sums them
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(status + 2, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  column_sums(coef, k, m, refused, weights);
}

template <bool PCGRAD>
at::Tensor loop_cuda(const at::Tensor& G_in, const at::Tensor& perms_in, at::Tensor* targets, double beta,
                     double eps) {
  check_loop_args(G_in, perms_in);
  const DeviceGuard guard(G_in.device());
  const int64_t k = G_in.size(0), m = G_in.size(1);
  at::Tensor weights = at::empty({k, m}, G_in.options());
  if (k == 0 || m == 0) return weights;
  const at::Tensor G = G_in.contiguous();
  const at::Tensor perms = perms_in.contiguous();
  at::Tensor status = at::empty({3}, G.options().dtype(at::kInt));  // written whole by check_inputs_kernel
  at::Tensor coef = at::empty({k * m * m}, G.options().dtype(at::kDouble));
  const bool smem_path = m <= kSmemMaxRows;
  at::Tensor scratch = smem_path ? coef : at::empty({k * m * m}, G.options().dtype(at::kDouble));
  const size_t smem = smem_path ? static_cast<size_t>(kChainsPerBlock) * 2 * m * sizeof(double) : 0;
  const int64_t chains = k * m;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "fusedjd_gradvac_loop_cuda", [&] {
    launch("check_inputs_kernel", check_inputs_kernel<scalar_t>, dim3(1), kCheckThreads, 0, G.data_ptr<scalar_t>(),
           k * m * m, perms.data_ptr<int64_t>(), chains, m, status.data_ptr<int>());
    const dim3 grid(static_cast<unsigned>((chains + kChainsPerBlock - 1) / kChainsPerBlock));
    scalar_t* tg = targets ? targets->data_ptr<scalar_t>() : nullptr;
    auto kernel = smem_path ? chain_kernel<scalar_t, PCGRAD, true> : chain_kernel<scalar_t, PCGRAD, false>;
    launch("chain_kernel", kernel, grid, kChainsPerBlock * kWarp, smem, G.data_ptr<scalar_t>(),
           perms.data_ptr<int64_t>(), tg, coef.data_ptr<double>(), scratch.data_ptr<double>(), k, m, beta, eps,
           status.data_ptr<int>(), weights.data_ptr<scalar_t>());
  });
  return weights;
}

at::Tensor gradvac_loop_cuda(const at::Tensor& G, const at::Tensor& perms, at::Tensor& targets, double beta,
                             double eps) {
  check_targets(G, targets);
  check_gradvac_hyper(beta, eps);
  return loop_cuda<false>(G, perms, &targets, beta, eps);
}

at::Tensor pcgrad_loop_cuda(const at::Tensor& G, const at::Tensor& perms) {
  return loop_cuda<true>(G, perms, nullptr, 0.0, 0.0);
}

}  // namespace

at::Tensor loop_core(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets, double beta, double eps) {
  return targets != nullptr ? loop_cuda<false>(G, perms, targets, beta, eps) : loop_cuda<true>(G, perms, nullptr, 0.0, 0.0);
}

FUSEDJD_CUDA_IMPL(m) {
  m.impl("gradvac_loop", &gradvac_loop_cuda);
  m.impl("pcgrad_loop", &pcgrad_loop_cuda);
}

}  // namespace fusedjd::cuda
