// CPU kernel of the aggregate op: GradVac or PCGrad in one call, what the composite kernel
// (composite/aggregate.cpp, which serves the other backends) does through the dispatcher, done
// here by the CPU kernels' cores (kernels.h) in turn: the Gramians, the visit orders (draws.h),
// the loop and the combination. Same draws, same arithmetic, bit-identical results; no dispatcher
// hop and no temporary tensor beyond the rounded Gramians and the visit orders, which is what a
// step costs at small sizes (a few microseconds). Every check runs before anything is drawn or
// written: a refused call leaves the targets and the default generator as they were.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../draws.h"
#include "kernels.h"

namespace fusedjd::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> aggregate_cpu(at::TensorList J, at::IntArrayRef group_sizes,
                                                 const std::optional<at::Tensor>& targets, double beta, double eps,
                                                 bool pcgrad, const std::optional<at::Tensor>& given_perms) {
  TORCH_CHECK(pcgrad || targets.has_value(), "fusedjd: `targets` is required for GradVac (pcgrad=False), got None");
  const Blocks B = check_blocks(J);
  const std::vector<int64_t> off = group_offsets(group_sizes, B.n);
  const int64_t k = static_cast<int64_t>(group_sizes.size()), m = B.m;
  // the Gramians as the gramian op returns them (filled once every check has passed)
  at::Tensor G = at::empty({k, m, m}, at::TensorOptions().dtype(acc_dtype(B.dtype)));
  at::Tensor T = targets.has_value() && !pcgrad ? *targets : at::Tensor();
  if (T.defined()) {
    check_targets(G, T);
    check_gradvac_hyper(beta, eps);
  }
  at::Tensor perms;
  if (given_perms.has_value()) {
    perms = *given_perms;
    check_loop_args(G, perms);
  }
  gramian_into(B, off, G);
  if (!perms.defined()) {
    perms = at::empty({k, m, m > 0 ? m - 1 : 0}, at::TensorOptions().dtype(at::kLong));
    draw_perms_into(k, m, pcgrad, perms.data_ptr<int64_t>());
  }
  at::Tensor W = run_loop(G, perms, T.defined() ? &T : nullptr, beta, eps);
  at::Tensor out = at::empty({B.n}, at::TensorOptions().dtype(B.dtype));
  if (B.n == 0 || m == 0) return {out.zero_(), W};
  std::vector<double> w(static_cast<size_t>(k * m));
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "fusedjd_aggregate_weights", [&] {
    std::copy(W.data_ptr<scalar_t>(), W.data_ptr<scalar_t>() + k * m, w.begin());
  });
  combine_into(B, off, w.data(), out);
  return {out, W};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("aggregate", &aggregate_cpu);
}

}  // namespace fusedjd::cpu
