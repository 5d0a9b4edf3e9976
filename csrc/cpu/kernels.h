// The CPU kernels' cores, shared between the op kernels of this folder: each op's .cpp registers
// its op and exposes its core here, so that the CPU aggregate kernel (aggregate.cpp) runs GradVac
// or PCGrad in one call without a dispatcher hop or a temporary tensor per step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../common.h"

namespace fusedjd::cpu {

// gramian.cpp: the Gramians of B's column groups (`off`: k + 1 offsets) into `out` ([k, m, m],
// contiguous, float32 or float64: float64 sums rounded to its dtype), by the streaming engine.
void gramian_into(const Blocks& B, const std::vector<int64_t>& off, const at::Tensor& out);

// gradvac.cpp: the GradVac (targets given) or PCGrad (targets null) loop on the Gramians G
// [k, m, m] with the visit orders perms, after check_loop_args: the weights [k, m]; NaN weights
// and the targets untouched for a non-finite G or an invalid visit order.
at::Tensor run_loop(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets, double beta, double eps);

// combine.cpp: out[cols of g] = sum_i w[g * m + i] J[i, cols of g] (w: k * m float64), for m, n > 0.
void combine_into(const Blocks& B, const std::vector<int64_t>& off, const double* w, const at::Tensor& out);

}  // namespace fusedjd::cpu
