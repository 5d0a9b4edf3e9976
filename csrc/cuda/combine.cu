// CUDA kernel of the combine op: out[cols of g] = weights[g] @ J_g over J's blocks, one read of
// J with packed loads where the rows are aligned.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../combine.h"
#include "../common.h"
#include "cuda_common.cuh"
#include "kernels.cuh"

namespace fusedjd::cuda {
namespace {

constexpr int kCombineThreads = 256;

// One block per work item (columns of one group inside one block of J): every column's weighted
// row sum, with packed loads on the item's aligned middle when its block's rows allow them.
// W_t: the weights' dtype (float32 or float64, as the loops return them: read as they are, no
// conversion kernel).
template <typename T, typename opmath_t, int V, typename W_t>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(WorkTable tab, int64_t m, const W_t* W, T* out) {
  const Item it = locate_item(tab, blockIdx.x);
  const T* base = block_row<T>(tab, it.block, 0);
  const int64_t ld = tab.ld[it.block];
  const W_t* w = W + it.group * m;
  T* o = out + (it.gcol - it.c0);  // o[c] is the output of the block's column c
  auto column = [&](int64_t c) {
    opmath_t acc = opmath_t(0);
    for (int64_t i = 0; i < m; ++i) acc += static_cast<opmath_t>(w[i]) * static_cast<opmath_t>(base[i * ld + c]);
    o[c] = static_cast<T>(acc);
  };
  const int64_t c0 = it.c0, c1 = it.c1, tid = threadIdx.x;
  int64_t ca = c1, cb = c1;
  packed_split(tab.head[it.block], V, c0, c1, &ca, &cb);
  for (int64_t c = c0 + tid; c < ca; c += kCombineThreads) column(c);
  for (int64_t c = cb + tid; c < c1; c += kCombineThreads) column(c);
  for (int64_t c = ca + tid * V; c < cb; c += static_cast<int64_t>(kCombineThreads) * V) {
    opmath_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = opmath_t(0);
    for (int64_t i = 0; i < m; ++i) {
      const Pack<T, V> x = load_pack<V>(base + i * ld + c);
      const opmath_t wi = static_cast<opmath_t>(w[i]);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += wi * static_cast<opmath_t>(x.v[v]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) o[c + v] = static_cast<T>(acc[v]);
  }
}

at::Tensor combine_cuda(at::TensorList J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  const CombineArgs a = prepare_combine(J, weights, group_sizes);
  if (!a.done) combine_into(a.B, a.off, weights, a.out);
  return a.out;
}

}  // namespace

void combine_into(const Blocks& B, const std::vector<int64_t>& off, const at::Tensor& weights, const at::Tensor& out) {
  const DeviceGuard guard(B.device);
  // float32 and float64 weights are read as they are (float64 J: float64 weights, as its loops
  // return them; a float32-weights variant of the float64 kernel spills); others are widened first
  const bool wide = weights.scalar_type() == at::kDouble || B.dtype == at::kDouble;
  const at::Tensor W = weights.to(wide ? at::kDouble : at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_combine_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
    at::Tensor table;
    const WorkTable tab = work_table(B, off, /*chunk=*/int64_t{4} * kCombineThreads * V, &table);
    const dim3 grid(static_cast<unsigned>(tab.items));
    if (wide)
      launch("combine_kernel", combine_kernel<scalar_t, opmath_t, V, double>, grid, kCombineThreads, 0, tab, B.m,
             W.data_ptr<double>(), out.data_ptr<scalar_t>());
    else if constexpr (!std::is_same_v<scalar_t, double>)
      launch("combine_kernel", combine_kernel<scalar_t, opmath_t, V, float>, grid, kCombineThreads, 0, tab, B.m,
             W.data_ptr<float>(), out.data_ptr<scalar_t>());
  });
}

FUSEDJD_CUDA_IMPL(m) {
  m.impl("combine", &combine_cuda);
}

}  // namespace fusedjd::cuda
