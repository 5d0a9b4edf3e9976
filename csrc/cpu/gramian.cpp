// CPU kernel of the gramian op: per-column-group Gramians by the streaming engine (gram_engine.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "gram_engine.h"
#include "kernels.h"

namespace fusedjd::cpu {

void gramian_into(const Blocks& B, const std::vector<int64_t>& off, const at::Tensor& out) {
  if (B.m == 0 || B.n == 0) {
    out.zero_();
    return;
  }
  std::vector<double> G(static_cast<size_t>(out.numel()), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_gramian_cpu", [&] {
    gram_groups(BlockRows<scalar_t>(B), B.m, off, G.data());
  });
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedjd_gramian_cpu_out", [&] {
    std::copy(G.begin(), G.end(), out.data_ptr<scalar_t>());
  });
}

namespace {

at::Tensor gramian_cpu(at::TensorList J, at::IntArrayRef group_sizes) {
  const Blocks B = check_blocks(J);
  const std::vector<int64_t> off = group_offsets(group_sizes, B.n);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::Tensor out = at::empty({k, B.m, B.m}, at::TensorOptions().dtype(acc_dtype(B.dtype)));
  gramian_into(B, off, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("gramian", &gramian_cpu);
}

}  // namespace fusedjd::cpu
