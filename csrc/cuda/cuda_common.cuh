// Launch helpers shared by the fusedjd CUDA kernels: stream/guard, warp reductions,
// packed loads, and a small cache of per-grouping index tables on the device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace fusedjd::cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  // xor butterfly: every lane ends with the same, deterministically ordered sum
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// V consecutive elements loaded with one (up to 16-byte) access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Number of multiprocessors of the current device (cached per device).
int sm_count();

// Device table for a column grouping: [col_off (k+1) | item_off (k+1)] int64, where group
// g is split into ceil(size_g / chunk) work items. Built once per (device, sizes, chunk)
// from pinned host memory that stays alive with it, so the copy is asynchronous and a
// CUDA graph that captured it replays correctly. Returns the table; *items receives the
// total number of work items (known on the host: no sync).
at::Tensor group_table(at::IntArrayRef group_sizes, int64_t chunk, const at::Device& device, int64_t* items);

// Rows of the matrix whose Gramian is taken: row r < split comes from `a` (row stride
// lda), row r >= split from `b` (row r - split, stride ldb). Columns have unit stride.
struct Rows {
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  int64_t split;
};

// Most rows gram_rows takes for this dtype (the tiled kernel's limit).
int64_t gram_rows_max(at::ScalarType dtype);

// Per-group Gramians [k, rows, rows] (float32, or float64 for float64 input) of `rows`
// rows over column groups of the given sizes. `dtype` is the element type of the rows.
at::Tensor gram_rows(const Rows& R, int64_t rows, at::IntArrayRef group_sizes, int64_t n, at::ScalarType dtype,
                     const at::Device& device);

}  // namespace fusedjd::cuda
