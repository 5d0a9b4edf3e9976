// The streaming Gramian engine: per-column-group Gramians of a few very long rows, used by the
// gramian op and by MoCo's first pass (the Gramian of the updated rows Y + b (J - Y), see Update).
#pragma once

#include "cuda_common.cuh"

namespace fusedjd::cuda {

// MoCo's first pass: the rows are Y_r + b (J_r - Y_r) instead of J_r (Y [m, n] contiguous; as
// moco.h's moco_row_update rounds them), with the step's rate b = beta / (*step + 1)^beta_sigma
// read on the device: the Gramian of the Y that pass 2 stores.
struct Update {
  const void* y;
  const int64_t* step;
  double beta, beta_sigma;
};

// Most rows gram_blocks takes for this dtype (128; 64 for float64). Beyond, callers use
// blas_gram (blas_gram.cuh).
int64_t gram_rows_max(at::ScalarType dtype);

// Per-group Gramians [k, m, m] (float32, or float64 for float64 input) of the blocks' rows (or
// of MoCo's updated rows when `upd` is set) over the column groups with offsets `group_off`.
at::Tensor gram_blocks(const Blocks& B, const std::vector<int64_t>& group_off, const Update* upd);

}  // namespace fusedjd::cuda
