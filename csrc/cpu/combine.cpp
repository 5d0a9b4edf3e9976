// CPU kernel of the combine op: per-column-group combination of the rows of J in one read of J
// (each chunk of columns accumulates the weighted rows in registers and writes its slice of the
// output once).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../combine.h"
#include "../common.h"
#include "block_rows.h"
#include "kernels.h"
#include "simd.h"

namespace fusedjd::cpu {
namespace {

// out[cols of g] = sum_i w[g * m + i] * J[i, cols of g], in one read of J: chunks of columns in
// parallel; each output vector is summed over the rows in registers (rows converted in registers
// for the half types) and written once.
template <typename T>
void combine_rows(const Blocks& B, const std::vector<int64_t>& off, const double* w, T* o) {
  using RV = RowVec<T>;
  using A = typename RV::A;
  using V = typename RV::V;
  constexpr int L = RV::L;
  constexpr int64_t kChunk = 4096;
  const int64_t m = B.m, n = B.n;
  const BlockRows<T> src(B);
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> wg(static_cast<size_t>(m));
    std::vector<const T*> rows(static_cast<size_t>(m));
    for (int64_t ch = lo; ch < hi; ++ch) {
      const int64_t c0 = ch * kChunk, c1 = std::min(n, c0 + kChunk);
      for_each_segment(off, c0, c1, [&](int64_t g, int64_t s0, int64_t s1) {
        for (int64_t i = 0; i < m; ++i) wg[i] = static_cast<A>(w[g * m + i]);
        for_each_segment(B.off, s0, s1, [&](int64_t b, int64_t q0, int64_t q1) {
          // rows[i][e]: row i of block b at the global column q0 + e
          for (int64_t i = 0; i < m; ++i) rows[i] = src.base[b] + i * src.ld[b] + (q0 - B.off[b]);
          T* oq = o + q0;
          const int64_t len = q1 - q0;
          int64_t e = 0;
          for (; e + L <= len; e += L) {
            V acc = V{};
            for (int64_t i = 0; i < m; ++i) {
              // every row's stream prefetched ahead: the hardware prefetcher alone loses m streams
              __builtin_prefetch(reinterpret_cast<const char*>(rows[i] + e) + kPrefetchBytes);
              acc += wg[i] * RV::load(rows[i] + e);
            }
            A lanes[L];
            std::memcpy(lanes, &acc, sizeof(V));
            store_row(lanes, oq + e, L);
          }
          for (; e < len; ++e) {
            A acc = A(0);
            for (int64_t i = 0; i < m; ++i) acc += wg[i] * static_cast<A>(rows[i][e]);
            oq[e] = static_cast<T>(acc);
          }
        });
      });
    }
  });
}

at::Tensor combine_cpu(at::TensorList J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  const CombineArgs a = prepare_combine(J, weights, group_sizes);
  if (a.done) return a.out;
  const at::Tensor W = weights.to(at::kDouble).contiguous();
  combine_into(a.B, a.off, W.data_ptr<double>(), a.out);
  return a.out;
}

}  // namespace

void combine_into(const Blocks& B, const std::vector<int64_t>& off, const double* w, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_combine_cpu", [&] {
    combine_rows(B, off, w, out.data_ptr<scalar_t>());
  });
}

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("combine", &combine_cpu);
}

}  // namespace fusedjd::cpu
