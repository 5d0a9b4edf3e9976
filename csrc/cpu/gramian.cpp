// CPU kernels of the matrix family: grouped Gramian (the streaming engine, gram_engine.h) and
// grouped combination (one read of J: each chunk of columns accumulates the weighted rows in
// registers/L1 and writes its slice of the output once).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "gram_engine.h"

namespace fusedjd::cpu {
namespace {

at::Tensor gramian_cpu(const at::Tensor& J, at::IntArrayRef group_sizes) {
  FUSEDJD_CHECK_DIM(J, 2);
  FUSEDJD_CHECK_FLOAT(J);
  const int64_t m = J.size(0), n = J.size(1);
  const std::vector<int64_t> off = group_offsets(group_sizes, n);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::Tensor out = at::zeros({k, m, m}, J.options().dtype(acc_dtype(J.scalar_type())));
  if (m == 0 || n == 0) return out;
  const at::Tensor Jc = unit_col_stride(J);
  std::vector<double> G(static_cast<size_t>(k * m * m), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jc.scalar_type(), "fusedjd_gramian_cpu", [&] {
    gram_groups(MatrixRows<scalar_t>{Jc.data_ptr<scalar_t>(), Jc.stride(0)}, m, off, G.data());
  });
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedjd_gramian_cpu_out", [&] {
    std::copy(G.begin(), G.end(), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor combine_cpu(const at::Tensor& J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  const std::vector<int64_t> off = check_combine_args(J, weights, group_sizes);
  const int64_t m = J.size(0), n = J.size(1);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::Tensor out = at::empty({n}, J.options());
  if (n == 0) return out;
  if (m == 0) return out.zero_();
  const at::Tensor Jc = unit_col_stride(J);
  const at::Tensor W = weights.to(at::kDouble).contiguous();
  const double* w = W.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jc.scalar_type(), "fusedjd_combine_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* base = Jc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t ld = Jc.stride(0);
    constexpr int64_t kChunk = 4096;
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<opmath_t> acc(kChunk);
      for (int64_t ch = lo; ch < hi; ++ch) {
        const int64_t c0 = ch * kChunk, c1 = std::min(n, c0 + kChunk);
        // first group whose columns reach past c0
        int64_t g = std::upper_bound(off.begin(), off.end(), c0) - off.begin() - 1;
        for (int64_t s0 = c0; s0 < c1; ++g) {
          const int64_t s1 = std::min(c1, off[g + 1]);
          if (s1 <= s0) continue;  // empty group
          opmath_t* a = acc.data();
          const int64_t len = s1 - s0;
          for (int64_t c = 0; c < len; ++c) a[c] = opmath_t(0);
          for (int64_t i = 0; i < m; ++i) {
            const opmath_t wi = static_cast<opmath_t>(w[g * m + i]);
            const scalar_t* row = base + i * ld + s0;
            for (int64_t c = 0; c < len; ++c) a[c] += wi * static_cast<opmath_t>(row[c]);
          }
          for (int64_t c = 0; c < len; ++c) o[s0 + c] = static_cast<scalar_t>(a[c]);
          s0 = s1;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("gramian", &gramian_cpu);
  m.impl("combine", &combine_cpu);
}

}  // namespace fusedjd::cpu
