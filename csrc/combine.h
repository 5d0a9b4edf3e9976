// The combine op's preamble, shared by the CPU and CUDA kernels (cpu/combine.cpp, cuda/combine.cu).
#pragma once

#include "common.h"

namespace fusedjd {

// The combine's preamble, one for both backends: the checks, the output, and the blocks in the
// layout the kernels read (unit column stride); each backend takes the weights in the layout it
// reads. When n or m is 0 the output is already complete (zeros) and `done` is set.
struct CombineArgs {
  Blocks B;
  std::vector<int64_t> off;  // group offsets, k + 1 entries
  at::Tensor out;
  bool done;
};

inline CombineArgs prepare_combine(at::TensorList J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  CombineArgs a;
  a.B = check_blocks(J);
  FUSEDJD_CHECK_DIM(weights, 2);
  FUSEDJD_CHECK_FLOAT(weights);
  FUSEDJD_CHECK_ON_J(weights, "weights", a.B);
  a.off = group_offsets(group_sizes, a.B.n);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK(weights.size(0) == k && weights.size(1) == a.B.m, "fusedjd: `weights` must have shape [k, m] = [", k,
              ", ", a.B.m, "], got ", weights.sizes());
  a.out = at::empty({a.B.n}, at::TensorOptions().dtype(a.B.dtype).device(a.B.device));
  a.done = a.B.n == 0 || a.B.m == 0;
  if (a.done) a.out.zero_();
  return a;
}

}  // namespace fusedjd
