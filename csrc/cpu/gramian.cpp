// CPU kernel of the gramian op: per-column-group Gramians by the streaming engine (gram_engine.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "gram_engine.h"
#include "kernels.h"

namespace fusedjd::cpu {

void gram_blocks(const Blocks& B, const std::vector<int64_t>& off, double* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_gramian_cpu", [&] {
    gram_groups(BlockRows<scalar_t>(B), B.m, off, out);
  });
}

namespace {

at::Tensor gramian_cpu(at::TensorList J, at::IntArrayRef group_sizes) {
  const Blocks B = check_blocks(J);
  const int64_t m = B.m;
  const std::vector<int64_t> off = group_offsets(group_sizes, B.n);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  const at::TensorOptions options = at::TensorOptions().dtype(acc_dtype(B.dtype));
  if (m == 0 || B.n == 0) return at::zeros({k, m, m}, options);
  at::Tensor out = at::empty({k, m, m}, options);  // (every entry written below)
  std::vector<double> G(static_cast<size_t>(k * m * m), 0.0);
  gram_blocks(B, off, G.data());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedjd_gramian_cpu_out", [&] {
    std::copy(G.begin(), G.end(), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("gramian", &gramian_cpu);
}

}  // namespace fusedjd::cpu
