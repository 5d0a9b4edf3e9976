// CUDA kernels of the MoCo family: one in-place MoCo step, free of host syncs.
//   pass 1: the Gramian of the updated rows Y + b (J - Y), formed as the streaming engine reads Y
//           and J (gram_engine.cuh, Update; b from the device step counter), rounded as pass
//           2 stores them; for m beyond the engine's tiles, the Gramian of the stacked rows
//           [Y; J] by blas_gram (no m x n temporary either), folded into the m x m one. Skipped
//           when the caller gives the Gramian; moco_gramian is this pass alone;
//   step:   one warp reads the device step counter, computes the step sizes, the weight
//           update (its O(m^2) product over the lanes) and the skip decision (moco.h), and
//           updates lam and step;
//   pass 2: Y <- Y + b (J - Y) in place and out = lam^T Y, or NaN and no write when the
//           step was refused (non-finite J).
// Peak memory: J + Y + O(m^2 + n).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "blas_gram.cuh"
#include "../common.h"
#include "../moco.h"
#include "gram_engine.cuh"

namespace fusedjd::cuda {
namespace {

// scratch (float64): [lam_old m | lam_new m | tmp 2m | b | ok]; `gram` the (m x m) Gramian of the
// updated rows. One warp: each lane takes rows r = lane, lane + 32, ... of (M + rho I) lam, each
// summed over s in order as moco.h's moco_lambda_step sums it (so the result is what one thread
// running moco_lambda_step on the device gives, bit for bit); lane 0 then applies the softmax or the simplex projection (O(m), and the projection's
// O(m^2) sort only with simplex="projection").
template <typename acc_t, typename lam_t>
__global__ void __launch_bounds__(kWarp)
    moco_update_kernel(const acc_t* gram, int64_t m, lam_t* lam, int64_t* step, double beta, double beta_sigma,
                       double gamma, double gamma_sigma, double rho, bool projection, double* scratch,
                       lam_t* weights) {
  const int lane = threadIdx.x;
  double* lam_old = scratch;
  double* lam_new = scratch + m;
  double* tmp = scratch + 2 * m;
  const int64_t k = *step + 1;
  double b = 0.0, c = 0.0;
  moco_rates(k, beta, beta_sigma, gamma, gamma_sigma, &b, &c);
  for (int64_t r = lane; r < m; r += kWarp) lam_old[r] = static_cast<double>(lam[r]);
  __syncwarp();
  bool bad = false;
  for (int64_t r = lane; r < m; r += kWarp) {
    double acc = rho * lam_old[r];
    for (int64_t s = 0; s < m; ++s) {
      const double v = static_cast<double>(gram[r * m + s]);
      bad |= !isfinite(v);
      acc += v * lam_old[s];
    }
    lam_new[r] = lam_old[r] - c * acc;
  }
  bad = __any_sync(0xffffffffu, bad);
  __syncwarp();
  int ok = 0;
  if (lane == 0 && !bad) {
    if (projection) {
      project_simplex(lam_new, tmp, m);
    } else {
      softmax_inplace(lam_new, m);
    }
    ok = 1;
    for (int64_t r = 0; r < m; ++r)
      if (!isfinite(lam_new[r])) ok = 0;
  }
  ok = __shfl_sync(0xffffffffu, ok, 0);
  __syncwarp();
  for (int64_t r = lane; r < m; r += kWarp) {
    if (ok) lam[r] = static_cast<lam_t>(lam_new[r]);
    weights[r] = ok ? static_cast<lam_t>(lam_new[r]) : static_cast<lam_t>(NAN);
  }
  if (lane == 0) {
    if (ok) *step = k;
    scratch[4 * m] = b;
    scratch[4 * m + 1] = ok ? 1.0 : 0.0;
  }
}

// The (m x m) Gramian of the updated rows from the (2m x 2m) Gramian of [Y; J], with b from the
// device step counter: one thread per entry.
template <typename acc_t>
__global__ void moco_fold_stacked_kernel(const acc_t* stacked, int64_t m, const int64_t* step, double beta,
                                         double beta_sigma, acc_t* gram) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= m * m) return;
  double b = 0.0, unused = 0.0;
  moco_rates(*step + 1, beta, beta_sigma, 0.0, 0.0, &b, &unused);
  gram[e] = static_cast<acc_t>(moco_stacked_entry(stacked, m, b, e / m, e % m));
}

// Pass 1: the Gramian (acc dtype, m x m) of the rows Y + b (J - Y) the step would store.
at::Tensor updated_gram(const Blocks& B, const at::Tensor& Y, const at::Tensor& step, double beta, double beta_sigma) {
  const int64_t m = B.m, n = B.n;
  const at::ScalarType acc = acc_dtype(B.dtype);
  if (m <= gram_rows_max(B.dtype)) {
    const Update upd{Y.data_ptr(), step.data_ptr<int64_t>(), beta, beta_sigma};
    return gram_blocks(B, {0, n}, &upd).select(0, 0);
  }
  // the Gramian of [Y; J], block by block, folded
  at::Tensor stacked = at::zeros({2 * m, 2 * m}, Y.options().dtype(acc));
  for (size_t b = 0; b < B.J.size(); ++b)
    if (B.off[b + 1] > B.off[b]) stacked.add_(blas_gram(Y.narrow(1, B.off[b], B.off[b + 1] - B.off[b]), B.J[b], acc));
  at::Tensor gram = at::empty({m, m}, Y.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "fusedjd_moco_fold_cuda", [&] {
    constexpr int threads = 256;
    launch("moco_fold_stacked_kernel", moco_fold_stacked_kernel<scalar_t>,
           dim3(static_cast<unsigned>((m * m + threads - 1) / threads)), threads, 0, stacked.data_ptr<scalar_t>(), m,
           step.data_ptr<int64_t>(), beta, beta_sigma, gram.data_ptr<scalar_t>());
  });
  return gram;
}

constexpr int kPass2Threads = 256;

// One block per work item (columns of one block of J): Y <- Y + b (J - Y) and out = lam^T Y.
template <typename T, typename opmath_t>
__global__ void __launch_bounds__(kPass2Threads)
    moco_pass2_kernel(WorkTable tab, T* __restrict__ Y, int64_t m, int64_t n, const double* __restrict__ scratch,
                      T* __restrict__ out) {
  const Item it = locate_item(tab, blockIdx.x);
  const T* __restrict__ J = block_row<T>(tab, it.block, 0);
  const int64_t ldj = tab.ld[it.block];
  const double* lam_new = scratch + m;
  const bool ok = scratch[4 * m + 1] != 0.0;
  const opmath_t b = static_cast<opmath_t>(scratch[4 * m]);
  for (int64_t c = it.c0 + threadIdx.x; c < it.c1; c += kPass2Threads) {
    const int64_t g = it.gcol + (c - it.c0);  // the column in Y and out
    if (!ok) {
      out[g] = static_cast<T>(NAN);
      continue;
    }
    opmath_t acc = opmath_t(0);
    // __restrict__: the loads of the next rows may be issued before this row's store
#pragma unroll 4
    for (int64_t r = 0; r < m; ++r) {
      const T ynew = moco_row_update(Y[r * n + g], J[r * ldj + c], b);
      Y[r * n + g] = ynew;
      acc += static_cast<opmath_t>(lam_new[r]) * static_cast<opmath_t>(ynew);
    }
    out[g] = static_cast<T>(acc);
  }
}

at::Tensor moco_gramian_cuda(at::TensorList J, const at::Tensor& Y, const at::Tensor& step, double beta,
                             double beta_sigma) {
  const Blocks B = check_moco_state(J, Y, step);
  const DeviceGuard guard(B.device);
  if (B.m == 0) return at::zeros({0, 0}, Y.options().dtype(acc_dtype(B.dtype)));
  return updated_gram(B, Y, step, beta, beta_sigma);
}

std::tuple<at::Tensor, at::Tensor> moco_step_cuda(at::TensorList J, at::Tensor& Y, at::Tensor& lam, at::Tensor& step,
                                                  double beta, double beta_sigma, double gamma, double gamma_sigma,
                                                  double rho, bool projection, const c10::optional<at::Tensor>& given) {
  const Blocks B = check_moco_args(J, Y, lam, step, given);
  const DeviceGuard guard(B.device);
  const int64_t m = B.m, n = B.n;
  at::Tensor weights = at::empty({m}, lam.options());
  at::Tensor out = at::empty({n}, Y.options());
  if (m == 0) {
    out.zero_();
    return {weights, out};
  }
  const at::ScalarType acc = acc_dtype(B.dtype);
  const at::Tensor gram = given.has_value() ? *given : updated_gram(B, Y, step, beta, beta_sigma);
  at::Tensor scratch = at::empty({4 * m + 2}, Y.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "fusedjd_moco_update_cuda", [&] {
    launch("moco_update_kernel", moco_update_kernel<scalar_t, scalar_t>, dim3(1), dim3(kWarp), 0,
           gram.data_ptr<scalar_t>(), m,
           lam.data_ptr<scalar_t>(),
           step.data_ptr<int64_t>(), beta, beta_sigma, gamma, gamma_sigma, rho, projection,
           scratch.data_ptr<double>(), weights.data_ptr<scalar_t>());
  });
  if (n == 0) return {weights, out};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_moco_pass2_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor table;
    const WorkTable tab = work_table(B, {0, n}, /*chunk=*/int64_t{8} * kPass2Threads, &table);
    launch("moco_pass2_kernel", moco_pass2_kernel<scalar_t, opmath_t>, dim3(static_cast<unsigned>(tab.items)),
           kPass2Threads, 0, tab, Y.data_ptr<scalar_t>(), m, n, scratch.data_ptr<double>(), out.data_ptr<scalar_t>());
  });
  return {weights, out};
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) {
  m.impl("moco_step", &moco_step_cuda);
  m.impl("moco_gramian", &moco_gramian_cuda);
}

}  // namespace fusedjd::cuda
