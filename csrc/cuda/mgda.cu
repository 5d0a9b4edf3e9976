// CUDA kernel of the mgda op (MGDA's weighting): torchjd's Frank-Wolfe iteration (csrc/mgda.h) in
// one launch of one warp, in float64: the lanes compute the rows of G alpha and update their own
// entries of alpha, lane 0 the argmin and the step in between (the CPU's operations in the CPU's
// order). The loop and its stopping test stay on the device: no host synchronisation, so a step
// that uses MGDA can be captured in a CUDA graph.
#include <torch/library.h>

#include "../common.h"
#include "../mgda.h"
#include "cuda_common.cuh"

namespace fusedjd::cuda {
namespace {

__global__ void mgda_kernel(const double* G, double* alpha, double* Ga, int64_t m, double epsilon,
                            int64_t max_iters) {
  __shared__ double step_gamma;
  __shared__ int64_t step_t;
  const int lane = static_cast<int>(threadIdx.x);
  int bad = 0;
  for (int64_t a = lane; a < m * m; a += kWarp) bad |= isfinite(G[a]) ? 0 : 1;
  if (__any_sync(0xffffffffu, bad)) {
    for (int64_t i = lane; i < m; i += kWarp) alpha[i] = NAN;
    return;
  }
  for (int64_t i = lane; i < m; i += kWarp) alpha[i] = 1.0 / static_cast<double>(m);
  __syncwarp();
  for (int64_t it = 0; it < max_iters; ++it) {
    for (int64_t i = lane; i < m; i += kWarp) Ga[i] = mgda_row(G, m, i, alpha);
    __syncwarp();
    if (lane == 0) {
      int64_t t = 0;
      step_gamma = mgda_gamma(G, m, alpha, Ga, &t);
      step_t = t;
    }
    __syncwarp();
    const double gamma = step_gamma;
    const int64_t t = step_t;
    for (int64_t i = lane; i < m; i += kWarp) alpha[i] = mgda_update(alpha[i], i, t, gamma);
    __syncwarp();
    if (gamma < epsilon) break;
  }
}

at::Tensor mgda_cuda(const at::Tensor& G_in, double epsilon, int64_t max_iters) {
  check_mgda_args(G_in, epsilon, max_iters);
  const DeviceGuard guard(G_in.device());
  const int64_t m = G_in.size(0);
  const at::Tensor G = G_in.to(at::kDouble).contiguous();
  at::Tensor alpha = at::empty({m}, G.options());
  if (m > 0) {
    at::Tensor Ga = at::empty({m}, G.options());
    launch("mgda_kernel", mgda_kernel, dim3(1), dim3(kWarp), 0, G.data_ptr<double>(), alpha.data_ptr<double>(),
           Ga.data_ptr<double>(), m, epsilon, max_iters);
  }
  return alpha.to(G_in.scalar_type());
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) { m.impl("mgda", &mgda_cuda); }

}  // namespace fusedjd::cuda
