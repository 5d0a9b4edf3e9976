// What every fusedjd CUDA source shares: the one way to launch a kernel, the device guard and
// stream, packed loads, warp reductions, and the per-grouping device tables.
//
// The .cu files compile two ways, unchanged:
// - by nvcc, the real build: `launch` is `kernel<<<grid, block, smem, stream>>>` followed by
//   C10_CUDA_KERNEL_LAUNCH_CHECK, the guard is c10::cuda::CUDAGuard, kernels register under
//   TORCH_LIBRARY_IMPL(fusedjd, CUDA);
// - as plain C++ with FUSEDJD_SIMT defined, the test-only emulation build (csrc/simt): `launch`
//   runs the kernel on the CPU through the SIMT emulator, tensors are CPU tensors, and the same
//   host functions register under TORCH_LIBRARY_IMPL(fusedjd_simt, CPU).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <utility>
#include <vector>

#if defined(FUSEDJD_SIMT)
#include "../simt/simt.h"
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

// Device table for a column grouping: [col_off (k+1) | item_off (k+1)] int64, where group
// g is split into ceil(size_g / chunk) work items; *items receives the total number of work
// items (known on the host: no sync). See device.cu for why a table is never read before it
// is written, nor freed while a captured graph may use it.
at::Tensor group_table(at::IntArrayRef group_sizes, int64_t chunk, const at::Device& device, int64_t* items);

}  // namespace fusedjd::cuda
