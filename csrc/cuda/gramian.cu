// CUDA kernel of the gramian op: per-column-group Gramians of J by the streaming engine
// (gram_engine.cuh); J taller than the engine's tiles goes to blas_gram, group by group.
#include <torch/library.h>

#include "../blas_gram.h"
#include "../common.h"
#include "gram_engine.cuh"

namespace fusedjd::cuda {
namespace {

at::Tensor gramian_cuda(const at::Tensor& J, at::IntArrayRef group_sizes) {
  FUSEDJD_CHECK_DIM(J, 2);
  FUSEDJD_CHECK_FLOAT(J);
  const DeviceGuard guard(J.device());
  const int64_t m = J.size(0), n = J.size(1);
  const std::vector<int64_t> off = group_offsets(group_sizes, n);
  const at::Tensor Jc = unit_col_stride(J);
  if (m > gram_rows_max(J.scalar_type())) {
    const int64_t k = static_cast<int64_t>(group_sizes.size());
    at::Tensor out = at::empty({k, m, m}, J.options().dtype(acc_dtype(J.scalar_type())));
    for (int64_t g = 0; g < k; ++g)
      out.select(0, g).copy_(blas_gram(Jc.narrow(1, off[g], off[g + 1] - off[g]), at::Tensor(), out.scalar_type()));
    return out;
  }
  const Rows R{Jc.data_ptr(), Jc.stride(0), Jc.data_ptr(), Jc.stride(0), m};
  return gram_rows(R, m, group_sizes, n, Jc.scalar_type(), J.device());
}

}  // namespace

FUSEDJD_CUDA_IMPL(m) {
  m.impl("gramian", &gramian_cuda);
}

}  // namespace fusedjd::cuda
