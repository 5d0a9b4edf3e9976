// CPU kernel of the MoCo family: one in-place MoCo step in two passes over J
// and Y, with no m x n temporary.
//   pass 1: the Gramian of the stacked rows [Y; J] (gives Yn Yn^T for the new Y
//           without forming it) -- a non-finite term means a non-finite J; BLAS
//           products for float32/float64, the generic row loop for half types;
//   step:   step sizes, the weight update and the skip decision (math.h);
//   pass 2: Y <- Y + b (J - Y) in place and out = lam^T Y, fused.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <tuple>
#include <vector>

#include "../blas_gram.h"
#include "../common.h"
#include "../math.h"
#include "gram_rows.h"

namespace fusedjd::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> moco_step_cpu(const at::Tensor& J, at::Tensor& Y, at::Tensor& lam,
                                                 at::Tensor& step, double beta, double beta_sigma, double gamma,
                                                 double gamma_sigma, double rho, bool projection) {
  check_moco_args(J, Y, lam, step);
  const int64_t m = J.size(0), n = J.size(1);
  at::Tensor weights = at::empty({m}, lam.options());
  at::Tensor out = at::empty({n}, J.options());
  if (m == 0) {  // nothing to weigh: zeros, state untouched
    out.zero_();
    return {weights, out};
  }
  const at::Tensor Jc = unit_col_stride(J);
  const int64_t k = step.data_ptr<int64_t>()[0] + 1;
  double b = 0.0, c = 0.0;
  moco_rates(k, beta, beta_sigma, gamma, gamma_sigma, &b, &c);

  std::vector<double> gram(static_cast<size_t>(4 * m * m)), lam_old(m), lam_new(m), scratch(2 * m);
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "fusedjd_moco_lam", [&] {
    for (int64_t r = 0; r < m; ++r) lam_old[r] = static_cast<double>(lam.data_ptr<scalar_t>()[r]);
  });

  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jc.scalar_type(), "fusedjd_moco_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* y = Y.data_ptr<scalar_t>();
    const scalar_t* j = Jc.data_ptr<scalar_t>();
    const int64_t ldj = Jc.stride(0);
    std::vector<const scalar_t*> rows(static_cast<size_t>(2 * m));
    for (int64_t r = 0; r < m; ++r) {
      rows[r] = y + r * n;
      rows[m + r] = j + r * ldj;
    }
    if (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      // BLAS products into the blocks of the stacked Gramian (no m x n temporary)
      const at::Tensor g = blas_gram(Y, Jc, Y.scalar_type()).to(at::kDouble).contiguous();
      std::copy(g.data_ptr<double>(), g.data_ptr<double>() + 4 * m * m, gram.begin());
    } else {
      gram_rows_parallel(rows.data(), 2 * m, n, gram.data());
    }
    ok = moco_lambda_update(gram.data(), lam_old.data(), lam_new.data(), m, b, c, rho, projection,
                            scratch.data());
    if (!ok) return;
    scalar_t* o = out.data_ptr<scalar_t>();
    constexpr int64_t kChunk = 4096;
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<opmath_t> acc(kChunk);
      for (int64_t ch = lo; ch < hi; ++ch) {
        const int64_t c0 = ch * kChunk, len = std::min(n, c0 + kChunk) - c0;
        for (int64_t e = 0; e < len; ++e) acc[e] = opmath_t(0);
        for (int64_t r = 0; r < m; ++r) {
          scalar_t* yr = y + r * n + c0;
          const scalar_t* jr = j + r * ldj + c0;
          const opmath_t br = static_cast<opmath_t>(b), lr = static_cast<opmath_t>(lam_new[r]);
          for (int64_t e = 0; e < len; ++e) {
            const opmath_t yv = static_cast<opmath_t>(yr[e]);
            const scalar_t ynew = static_cast<scalar_t>(yv + br * (static_cast<opmath_t>(jr[e]) - yv));
            yr[e] = ynew;
            acc[e] += lr * static_cast<opmath_t>(ynew);
          }
        }
        for (int64_t e = 0; e < len; ++e) o[c0 + e] = static_cast<scalar_t>(acc[e]);
      }
    });
  });
  if (!ok) {  // non-finite input: every piece of state stays as it was
    weights.fill_(std::numeric_limits<double>::quiet_NaN());
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    return {weights, out};
  }
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "fusedjd_moco_lam_out", [&] {
    scalar_t* l = lam.data_ptr<scalar_t>();
    scalar_t* wo = weights.data_ptr<scalar_t>();
    for (int64_t r = 0; r < m; ++r) l[r] = wo[r] = static_cast<scalar_t>(lam_new[r]);
  });
  step.data_ptr<int64_t>()[0] = k;
  return {weights, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("moco_step", &moco_step_cpu);
}

}  // namespace fusedjd::cpu
