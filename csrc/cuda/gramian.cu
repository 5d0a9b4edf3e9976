// CUDA kernel of the gramian op: per-column-group Gramians of J by the streaming engine
// (gram_engine.cuh); J taller than the engine's tiles goes to blas_gram, group by group.
#include <torch/library.h>

#include <algorithm>

#include "blas_gram.cuh"
#include "../common.h"
#include "gram_engine.cuh"
#include "kernels.cuh"

namespace fusedjd::cuda {

at::Tensor gramian_core(const Blocks& B, const std::vector<int64_t>& off) {
  const DeviceGuard guard(B.device);
  if (B.m > gram_rows_max(B.dtype)) {  // group by group, block piece by block piece
    const int64_t k = static_cast<int64_t>(off.size()) - 1;
    at::Tensor out = at::zeros({k, B.m, B.m}, at::TensorOptions().dtype(acc_dtype(B.dtype)).device(B.device));
    for (int64_t g = 0; g < k; ++g)
      for (size_t b = 0; b < B.J.size(); ++b) {
        const int64_t c0 = std::max(off[g], B.off[b]), c1 = std::min(off[g + 1], B.off[b + 1]);
        if (c1 > c0) out.select(0, g).add_(blas_gram(B.J[b].narrow(1, c0 - B.off[b], c1 - c0), at::Tensor(), out.scalar_type()));
      }
    return out;
  }
  return gram_blocks(B, off, nullptr);
}

namespace {

at::Tensor gramian_cuda(at::TensorList J, at::IntArrayRef group_sizes) {
  const Blocks B = check_blocks(J);
  return gramian_core(B, group_offsets(group_sizes, B.n));
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) {
  m.impl("gramian", &gramian_cuda);
}

}  // namespace fusedjd::cuda
