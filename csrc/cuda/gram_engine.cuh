// The streaming Gramian engine: per-column-group Gramians of a few very long rows, used by the
// gramian op and by MoCo's first pass (the Gramian of the updated rows Y + b (J - Y), see Rows).
#pragma once

#include "cuda_common.cuh"

namespace fusedjd::cuda {

// Rows of the matrix whose Gramian is taken: row r < split comes from `a` (row stride
// lda), row r >= split from `b` (row r - split, stride ldb). Columns have unit stride.
//
// MoCo's first pass: when `step` is set, the rows are instead Y_r + b (J_r - Y_r) for r < split
// (Y_r from `a`, J_r from `b`, as math.h's moco_row_update rounds them), with the step's rate
// b = beta / (*step + 1)^beta_sigma read on the device: the Gramian of the Y that pass 2 stores.
struct Rows {
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  int64_t split;
  const int64_t* step = nullptr;
  double beta = 0.0, beta_sigma = 0.0;
};

// Most rows gram_rows takes for this dtype (128; 64 for float64). Beyond, callers use
// blas_gram (csrc/blas_gram.h).
int64_t gram_rows_max(at::ScalarType dtype);

// Per-group Gramians [k, rows, rows] (float32, or float64 for float64 input) of `rows`
// rows over column groups of the given sizes. `dtype` is the element type of the rows.
at::Tensor gram_rows(const Rows& R, int64_t rows, at::IntArrayRef group_sizes, int64_t n, at::ScalarType dtype,
                     const at::Device& device);

}  // namespace fusedjd::cuda
