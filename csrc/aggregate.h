// The aggregate op (GradVac or PCGrad in one call), one sequence for every backend: every check
// first (a refused call leaves the targets and the default generator as they were), then the
// Gramians, the visit orders (drawn on the host from the default CPU generator exactly as torchjd
// draws them, unless given), the loop and the combination, each by the backend's own core
// (`Cores`: cpu/kernels.h on the CPU, cuda/kernels.cuh on CUDA). The result is bit for bit that of
// the gramian, draw_perms, gradvac_loop (or pcgrad_loop) and combine ops called in turn, without a
// dispatcher hop or an op call per stage.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "draws.h"
#include "gradvac.h"

namespace fusedjd {

// Cores provides, for the backend of J:
//   static void check_draws(const at::Device&);  refuses host draws the backend cannot take
//   static at::Tensor gramian(const Blocks&, const std::vector<int64_t>& off);  [k, m, m]
//   static at::Tensor loop(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets,
//                          double beta, double eps);  the weights [k, m]; PCGrad when targets is null
//   static at::Tensor combine(const Blocks&, const std::vector<int64_t>& off, const at::Tensor& W);  [n]
template <typename Cores>
std::tuple<at::Tensor, at::Tensor> aggregate(at::TensorList J, at::IntArrayRef group_sizes,
                                             const std::optional<at::Tensor>& targets, double beta, double eps,
                                             bool pcgrad, const std::optional<at::Tensor>& given_perms) {
  TORCH_CHECK(pcgrad || targets.has_value(), "fusedjd: `targets` is required for GradVac (pcgrad=False), got None");
  const Blocks B = check_blocks(J);
  const std::vector<int64_t> off = group_offsets(group_sizes, B.n);
  const int64_t k = static_cast<int64_t>(group_sizes.size()), m = B.m;
  const std::vector<int64_t> G_sizes{k, m, m};  // the Gramians' shape, dtype and device, checked against
  const at::ScalarType acc = acc_dtype(B.dtype);
  at::Tensor T = targets.has_value() && !pcgrad ? *targets : at::Tensor();
  if (T.defined()) {
    check_targets_for(T, G_sizes, acc, B.device);
    check_gradvac_hyper(beta, eps);
  }
  if (given_perms.has_value()) {
    check_perms_for(*given_perms, k, m, B.device);
  } else {
    Cores::check_draws(B.device);
  }
  const at::Tensor G = Cores::gramian(B, off);
  const at::Tensor perms = given_perms.has_value() ? *given_perms : draw_perms_on(k, m, pcgrad, B.device);
  at::Tensor W = Cores::loop(G, perms, T.defined() ? &T : nullptr, beta, eps);
  return {Cores::combine(B, off, W), W};
}

}  // namespace fusedjd
