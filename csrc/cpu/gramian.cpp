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

// out[cols of g] = sum_i w[g * m + i] * J[i, cols of g], in one read of J: chunks of columns in
// parallel; each output vector is summed over the rows in registers (rows converted in registers
// for the half types) and written once.
template <typename T>
void combine_rows(const T* base, int64_t ld, int64_t m, int64_t n, const std::vector<int64_t>& off,
                  const double* w, T* o) {
  using RV = RowVec<T>;
  using A = typename RV::A;
  using V = typename RV::V;
  constexpr int L = RV::L;
  constexpr int64_t kChunk = 4096;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> wg(static_cast<size_t>(m));
    std::vector<const T*> rows(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) rows[i] = base + i * ld;
    for (int64_t ch = lo; ch < hi; ++ch) {
      const int64_t c0 = ch * kChunk, c1 = std::min(n, c0 + kChunk);
      for_each_segment(off, c0, c1, [&](int64_t g, int64_t s0, int64_t s1) {
        for (int64_t i = 0; i < m; ++i) wg[i] = static_cast<A>(w[g * m + i]);
        int64_t c = s0;
        for (; c + L <= s1; c += L) {
          V acc = V{};
          for (int64_t i = 0; i < m; ++i) acc += wg[i] * RV::load(rows[i] + c);
          A lanes[L];
          std::memcpy(lanes, &acc, sizeof(V));
          store_row(lanes, o + c, L);
        }
        for (; c < s1; ++c) {
          A acc = A(0);
          for (int64_t i = 0; i < m; ++i) acc += wg[i] * static_cast<A>(rows[i][c]);
          o[c] = static_cast<T>(acc);
        }
      });
    }
  });
}

at::Tensor combine_cpu(const at::Tensor& J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  const CombineArgs a = prepare_combine(J, weights, group_sizes);
  if (a.done) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.J.scalar_type(), "fusedjd_combine_cpu", [&] {
    combine_rows(a.J.data_ptr<scalar_t>(), a.J.stride(0), J.size(0), J.size(1), a.off, a.W.data_ptr<double>(),
                 a.out.data_ptr<scalar_t>());
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("gramian", &gramian_cpu);
  m.impl("combine", &combine_cpu);
}

}  // namespace fusedjd::cpu
