// CUDA kernels of the GradVac family: the GradVac and PCGrad loops on k Gramians in one
// launch. Each (group, row) chain is one warp; its steps run in order, the O(m) work of a
// step (|p|^2, the update of <p, g_.>) is spread over the warp's lanes. A first tiny kernel
// checks that every Gramian is finite: if not, no target is written and the weights are NaN.
// The weights (column sums of the coefficient rows) are summed in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

#include "../common.h"
#include "../math.h"
#include "cuda_common.cuh"

namespace fusedjd::cuda {
namespace {

constexpr int kChainsPerBlock = 4;

template <typename S>
__global__ void nonfinite_kernel(const S* x, int64_t count, int* flag) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += stride)
    bad |= !isfinite(static_cast<double>(x[e]));
  if (__any_sync(0xffffffffu, bad) && threadIdx.x % kWarp == 0) atomicOr(flag, 1);
}

// flags[0]: a Gramian is non-finite; flags[1]: a visit order names an invalid row.
template <typename S>
__global__ void chain_kernel(const S* G, const int64_t* perms, S* targets, double* coef, int64_t k, int64_t m,
                             double beta, double eps, bool pcgrad, int* flags) {
  extern __shared__ double smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t chain = static_cast<int64_t>(blockIdx.x) * kChainsPerBlock + warp;
  if (chain >= k * m || flags[0] != 0) return;  // whole warps leave together
  const int64_t g = chain / m, i = chain % m;
  const S* Gg = G + g * m * m;
  double* C = smem + static_cast<int64_t>(warp) * 2 * m;
  double* cG = C + m;
  const int64_t* order = perms + chain * (m - 1);
  const double floor = target_sine_floor<S>();
  for (int64_t a = lane; a < m; a += kWarp) {
    C[a] = (a == i) ? 1.0 : 0.0;
    cG[a] = static_cast<double>(Gg[i * m + a]);
  }
  __syncwarp();
  for (int64_t s = 0; s + 1 < m; ++s) {
    const int64_t j = order[s];
    if (j < 0 || j >= m || j == i) {
      if (lane == 0) atomicOr(flags + 1, 1);
      continue;
    }
    double part = 0.0;
    for (int64_t a = lane; a < m; a += kWarp) part += cG[a] * C[a];
    const double norm_sq = warp_sum(part);
    S* tgt = pcgrad ? nullptr : targets + (g * m + i) * m + j;
    const double t = pcgrad ? 0.0 : static_cast<double>(*tgt);
    double c = 0.0;
    const double w = gradvac_pair(norm_sq, cG[j], static_cast<double>(Gg[j * m + j]), t, eps, floor, pcgrad, &c);
    __syncwarp();  // every lane has read cG[j] before it changes
    if (w != 0.0) {
      for (int64_t a = lane; a < m; a += kWarp) cG[a] += w * static_cast<double>(Gg[j * m + a]);
      if (lane == 0) C[j] += w;
    }
    if (!pcgrad && lane == 0) *tgt = static_cast<S>((1.0 - beta) * t + beta * c);
    __syncwarp();
  }
  for (int64_t a = lane; a < m; a += kWarp) coef[chain * m + a] = C[a];
}

template <typename S>
__global__ void column_sums_kernel(const double* coef, int64_t k, int64_t m, const int* flags, S* weights) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= k * m) return;
  const int64_t g = e / m, b = e % m;
  if (flags[0] != 0 || flags[1] != 0) {
    weights[e] = static_cast<S>(NAN);
    return;
  }
  double s = 0.0;
  for (int64_t i = 0; i < m; ++i) s += coef[(g * m + i) * m + b];
  weights[e] = static_cast<S>(s);
}

at::Tensor loop_cuda(const at::Tensor& G_in, const at::Tensor& perms_in, at::Tensor* targets, double beta,
                     double eps) {
  check_loop_args(G_in, perms_in);
  const c10::cuda::CUDAGuard guard(G_in.device());
  const int64_t k = G_in.size(0), m = G_in.size(1);
  at::Tensor weights = at::empty({k, m}, G_in.options());
  if (k == 0 || m == 0) return weights;
  const at::Tensor G = G_in.contiguous();
  const at::Tensor perms = perms_in.contiguous();
  at::Tensor flags = at::zeros({2}, G.options().dtype(at::kInt));
  at::Tensor coef = at::empty({k * m * m}, G.options().dtype(at::kDouble));
  const size_t smem = static_cast<size_t>(kChainsPerBlock) * 2 * m * sizeof(double);
  TORCH_CHECK(smem <= 48 * 1024, "fusedjd: the CUDA GradVac loop takes m <= ", 48 * 1024 / (2 * 8 * kChainsPerBlock),
              ", got m=", m);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "fusedjd_gradvac_loop_cuda", [&] {
    const int64_t count = k * m * m;
    const int64_t fblocks = std::min<int64_t>((count + 255) / 256, 4 * static_cast<int64_t>(sm_count()));
    nonfinite_kernel<scalar_t><<<static_cast<unsigned>(fblocks), 256, 0, stream()>>>(G.data_ptr<scalar_t>(), count,
                                                                                      flags.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t chains = k * m;
    const int64_t blocks = (chains + kChainsPerBlock - 1) / kChainsPerBlock;
    chain_kernel<scalar_t><<<static_cast<unsigned>(blocks), kChainsPerBlock * kWarp, smem, stream()>>>(
        G.data_ptr<scalar_t>(), perms.data_ptr<int64_t>(), targets ? targets->data_ptr<scalar_t>() : nullptr,
        coef.data_ptr<double>(), k, m, beta, eps, targets == nullptr, flags.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_sums_kernel<scalar_t><<<static_cast<unsigned>((chains + 255) / 256), 256, 0, stream()>>>(
        coef.data_ptr<double>(), k, m, flags.data_ptr<int>(), weights.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return weights;
}

at::Tensor gradvac_loop_cuda(const at::Tensor& G, const at::Tensor& perms, at::Tensor& targets, double beta,
                             double eps) {
  check_targets(G, targets);
  check_gradvac_hyper(beta, eps);
  return loop_cuda(G, perms, &targets, beta, eps);
}

at::Tensor pcgrad_loop_cuda(const at::Tensor& G, const at::Tensor& perms) {
  return loop_cuda(G, perms, nullptr, 0.0, 0.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CUDA, m) {
  m.impl("gradvac_loop", &gradvac_loop_cuda);
  m.impl("pcgrad_loop", &pcgrad_loop_cuda);
}

}  // namespace fusedjd::cuda
