// CUDA kernel of the combine op: out[cols of g] = weights[g] @ J_g, one read of J with packed
// loads where the rows are aligned.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "cuda_common.cuh"

namespace fusedjd::cuda {
namespace {

template <typename T, typename opmath_t, int V>
__global__ void combine_kernel(const T* J, int64_t ld, int64_t m, int64_t n, const double* W, const int64_t* col_off,
                               int64_t k, bool packed, T* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; c < n; c += stride) {
    const int nv = static_cast<int>((n - c < V ? n - c : static_cast<int64_t>(V)));
    int64_t lo = 0, hi = k;  // group of column c: largest g with col_off[g] <= c
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (col_off[mid] <= c) lo = mid; else hi = mid;
    }
    int64_t gv[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      while (lo + 1 < k && col_off[lo + 1] <= c + v) ++lo;
      gv[v] = lo;
    }
    opmath_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = opmath_t(0);
    for (int64_t i = 0; i < m; ++i) {
      const T* row = J + i * ld + c;
      T x[V];
      if (packed && nv == V) {
        const Pack<T, V> p = load_pack<V>(row);
#pragma unroll
        for (int v = 0; v < V; ++v) x[v] = p.v[v];
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) x[v] = v < nv ? row[v] : T(0);
      }
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += static_cast<opmath_t>(W[gv[v] * m + i]) * static_cast<opmath_t>(x[v]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (v < nv) out[c + v] = static_cast<T>(acc[v]);
  }
}

at::Tensor combine_cuda(const at::Tensor& J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  const DeviceGuard guard(J.device());
  const CombineArgs a = prepare_combine(J, weights, group_sizes);
  if (a.done) return a.out;
  const int64_t m = J.size(0), n = J.size(1);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  const at::Tensor& Jc = a.J;
  const at::Tensor& W = a.W;
  const at::Tensor& out = a.out;
  int64_t items = 0;
  const at::Tensor table = group_table(group_sizes, /*chunk=*/int64_t{1} << 30, J.device(), &items);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jc.scalar_type(), "fusedjd_combine_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
    const bool packed = reinterpret_cast<uintptr_t>(Jc.data_ptr()) % 16 == 0 &&
                        (Jc.stride(0) * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
    constexpr int threads = 256;
    const int64_t want = (n + static_cast<int64_t>(threads) * V - 1) / (static_cast<int64_t>(threads) * V);
    const int64_t blocks = std::min<int64_t>(want, 32 * static_cast<int64_t>(sm_count()));
    launch("combine_kernel", combine_kernel<scalar_t, opmath_t, V>, dim3(static_cast<unsigned>(blocks)), threads, 0,
           Jc.data_ptr<scalar_t>(), Jc.stride(0), m, n, W.data_ptr<double>(), table.data_ptr<int64_t>(), k, packed,
           out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) {
  m.impl("combine", &combine_cuda);
}

}  // namespace fusedjd::cuda
