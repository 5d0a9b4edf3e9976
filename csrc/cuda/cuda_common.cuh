// What every fusedjd CUDA source shares: the one way to launch a kernel, the device guard and
// stream, packed loads, warp reductions, and the per-grouping device tables.
//
// The .cu files compile two ways, unchanged:
// - by nvcc, the real build: `launch` is `kernel<<<grid, block, smem, stream>>>` followed by
//   C10_CUDA_KERNEL_LAUNCH_CHECK, the guard is c10::cuda::CUDAGuard, kernels register under
//   TORCH_LIBRARY_IMPL(fusedjd, CUDA);
// - as plain C++ with FUSEDJD_SIMT defined, the test-only emulation build (tests/simt): `launch`
//   runs the kernel on the CPU through the SIMT emulator, tensors are CPU tensors, and the same
//   host functions register under TORCH_LIBRARY_IMPL(fusedjd_simt, CPU).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "../common.h"

#if defined(FUSEDJD_SIMT)
#include "simt.h"  // the test-only emulator (tests/simt, on the emulation build's include path)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#if defined(FUSEDJD_SIMT)
#define FUSEDJD_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fusedjd_simt, CPU, m)
// `extern __shared__`: the block's dynamic shared memory as T*.
#define FUSEDJD_DYNAMIC_SMEM(T, name) T* name = ::simt::dynamic_smem<T>()
#else
#define FUSEDJD_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(fusedjd, CUDA, m)
#define FUSEDJD_DYNAMIC_SMEM(T, name)                          \
  extern __shared__ __align__(16) unsigned char fusedjd_smem_[]; \
  T* name = reinterpret_cast<T*>(fusedjd_smem_)
#endif

namespace fusedjd::cuda {

constexpr int kWarp = 32;

#if defined(FUSEDJD_SIMT)
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t stream() { return nullptr; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

// Launches kernel(args...) on the current stream and checks the launch. `name` names the kernel
// in the emulator's errors. Every kernel of fusedjd is launched through this function.
template <typename... P, typename... A>
inline void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "fusedjd: launch: wrong number of kernel arguments");
#if defined(FUSEDJD_SIMT)
  ::simt::launch<P...>(name, kernel, grid, block, smem, static_cast<P>(std::forward<A>(args))...);
#else
  (void)name;
  kernel<<<grid, block, smem, stream()>>>(static_cast<P>(std::forward<A>(args))...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

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

// One packed load from p, which must be aligned to the pack's size (the emulator checks it).
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
#if defined(FUSEDJD_SIMT)
  ::simt::check_aligned(p, sizeof(Pack<T, V>));
#endif
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// Number of multiprocessors of the current device (cached per device; the emulator's is
// configurable).
int sm_count();

// A Jacobian's column blocks (common.h's Blocks) split into column groups, as the kernels walk
// them: segments (the columns of one group inside one block, in column order), each cut into
// work items of at most `chunk` columns. Device pointers into one int64 table.
struct WorkTable {
  const int64_t* item_off;        // S + 1: each segment's first work item
  const int64_t* group;           // S: the segment's group
  const int64_t* block;           // S: its block
  const int64_t* col;             // S: its first column, counted in its block
  const int64_t* end;             // S: one past its last column, counted in its block
  const int64_t* gcol;            // S: its first column, counted in the whole matrix
  const int64_t* group_item_off;  // k + 1: each group's first work item (a group's items are consecutive)
  const int64_t* ptr;             // nb: the blocks' addresses
  const int64_t* ld;              // nb: their row strides
  const int64_t* head;            // nb: their packed-load heads (packed_head)
  int64_t segments, chunk, items;
};

// A work item: columns [c0, c1) of block `block` (counted in the block), the first of which is
// the matrix's column gcol, in group `group`.
struct Item {
  int64_t group, block, c0, c1, gcol;
};

__device__ __forceinline__ Item locate_item(const WorkTable& t, int64_t item) {
  int64_t lo = 0, hi = t.segments;  // largest s with item_off[s] <= item (a segment with items)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (t.item_off[mid] <= item) lo = mid; else hi = mid;
  }
  Item it;
  it.group = t.group[lo];
  it.block = t.block[lo];
  it.c0 = t.col[lo] + (item - t.item_off[lo]) * t.chunk;
  it.c1 = min(t.end[lo], it.c0 + t.chunk);
  it.gcol = t.gcol[lo] + (it.c0 - t.col[lo]);
  return it;
}

template <typename T>
__device__ __forceinline__ const T* block_row(const WorkTable& t, int64_t block, int64_t r) {
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(t.ptr[block])) + r * t.ld[block];
}

// The work table of `B` over the column groups with offsets `group_off` (k + 1 entries) for work
// items of `chunk` columns. `keep` receives the device tensor the table lives in: keep it until
// the kernels reading it are queued. Built on the host, written to the device by a kernel that
// carries it in its parameters (no pinned memory, no copy: capture-safe), and cached on the device
// by content, so that steady-state calls write nothing (work_table.cu).
WorkTable work_table(const Blocks& B, const std::vector<int64_t>& group_off, int64_t chunk, at::Tensor* keep);

// Work tables written to the device by this process so far (the emulated tests check that repeated
// calls on the same tensors write none).
int64_t work_table_writes();

// The first column of a block (counted in the block) at which every one of its rows is 16-byte
// aligned, so that 16-byte packed loads can start there in every row; -1 when the rows do not
// share an alignment (a row stride that is not a whole number of 16 bytes, with more than one
// row). Decided per block: an odd-sized block (a bias in jac_to_grad) reads scalars while the
// others take packed loads.
inline int64_t packed_head(const at::Tensor& x) {
  const int64_t es = static_cast<int64_t>(x.element_size());
  const int64_t addr = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x.data_ptr()));
  if (addr % es != 0 || (x.size(0) > 1 && (x.stride(0) * es) % 16 != 0)) return -1;
  return ((16 - addr % 16) % 16) / es;
}

// Columns [c0, c1) of a block with packed-load head `head` split for packed loads of V: scalar
// columns [c0, ca) and [cb, c1), packed columns [ca, cb) (ca = cb = c1 when head < 0).
__device__ __forceinline__ void packed_split(int64_t head, int V, int64_t c0, int64_t c1, int64_t* ca, int64_t* cb) {
  if (head < 0) {
    *ca = *cb = c1;
    return;
  }
  const int64_t first = c0 + (((head - c0) % V) + V) % V;
  const int64_t a = first < c1 ? first : c1;
  *ca = a;
  *cb = a + (c1 - a) / V * V;
}

}  // namespace fusedjd::cuda
