// The fusedjd_simt operator library (test-only): the fusedjd op schemas, under their own
// namespace, whose CPU kernels are the CUDA host functions of csrc/cuda compiled against the
// SIMT emulator (tests/simt_build.py compiles them into this library), plus the emulator's
// settings, counters and self-tests.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/cuda_common.cuh"
#include "schemas.h"

namespace {

void configure(int64_t order, int64_t seed, int64_t sm_count) {
  TORCH_CHECK(order >= 0 && order <= 2, "fusedjd_simt: `order` must be 0 (forward), 1 (reverse) or 2 (random), got ",
              order);
  TORCH_CHECK(sm_count >= 1, "fusedjd_simt: `sm_count` must be >= 1, got ", sm_count);
  simt::config().order = static_cast<simt::Order>(order);
  simt::config().seed = static_cast<uint64_t>(seed);
  simt::config().sm_count = static_cast<int>(sm_count);
  simt::config().launch_index = 0;
}

// [launches, blocks, threads, fiber switches, work-table writes] since the library was loaded.
at::Tensor stats() {
  const simt::Stats& s = simt::stats();
  return at::tensor(std::vector<int64_t>{s.launches, s.blocks, s.threads, s.switches,
                                         fusedjd::cuda::work_table_writes()});
}

// ---- self-tests: small kernels, each breaking (or keeping) one rule ------------------------
using fusedjd::cuda::launch;

// Each of N threads writes its slot of shared memory, then reads the slot SHIFT further on:
// correct only with the barrier between the two (__syncthreads for a block, __syncwarp for a
// warp).
// `salt` differs from call to call, so what an earlier launch left in `buf` never looks right.
template <int N, int SHIFT, bool SYNC>
__global__ void neighbour_kernel(float* out, float salt) {
  __shared__ float buf[N];
  const int t = threadIdx.x;
  buf[t] = static_cast<float>(t) + salt;
  if (SYNC && N > 32) __syncthreads();
  if (SYNC && N <= 32) __syncwarp();
  out[t] = buf[(t + SHIFT) % N];
}

// Lanes 16..31 leave before a full-mask shuffle.
__global__ void exited_lane_kernel(float* out) {
  const int t = threadIdx.x;
  if (t >= 16) return;
  out[t] = __shfl_xor_sync(0xffffffffu, static_cast<float>(t), 1);
}

// Lanes 0..15 shuffle while lanes 16..31 wait at __syncwarp, all with the full mask.
__global__ void different_collectives_kernel(float* out) {
  const int t = threadIdx.x;
  if (t < 16) out[t] = __shfl_sync(0xffffffffu, static_cast<float>(t), 0);
  else __syncwarp();
}

// Warp 1 leaves; warp 0 waits at __syncthreads.
__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void packed_load_kernel(const float* p, float* out) {
  const fusedjd::cuda::Pack<float, 4> v = fusedjd::cuda::load_pack<4>(p);
  if (threadIdx.x == 0) out[0] = v.v[0] + v.v[1] + v.v[2] + v.v[3];
}

__global__ void nothing_kernel(float*) {}

__global__ void dynamic_smem_kernel(float* out) {
  FUSEDJD_DYNAMIC_SMEM(float, buf);
  out[0] = buf[0];  // never written: the emulator fills dynamic shared memory with 0xFF (NaN)
}

// Every collective on one warp: [shfl(src 3), xor 5, down 2, up 7, shfl width 8 (src 1), any, all,
// ballot] per lane, predicate lane % 3 == 0.
__global__ void collectives_kernel(float* out) {
  const int t = threadIdx.x;
  const float v = static_cast<float>(t * t);
  float* o = out + t * 8;
  o[0] = __shfl_sync(0xffffffffu, v, 3);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[2] = __shfl_down_sync(0xffffffffu, v, 2);
  o[3] = __shfl_up_sync(0xffffffffu, v, 7);
  o[4] = __shfl_sync(0xffffffffu, v, 1, 8);
  o[5] = static_cast<float>(__any_sync(0xffffffffu, t % 3 == 0));
  o[6] = static_cast<float>(__all_sync(0xffffffffu, t % 3 == 0));
  o[7] = static_cast<float>(__ballot_sync(0xffffffffu, t % 3 == 0));
}

// 3 blocks x 64 threads add 1 to the same counter.
__global__ void atomic_kernel(float* out) { atomicAdd(out, 1.0f); }

at::Tensor selftest(c10::string_view name_view) {
  const std::string name(name_view);
  at::Tensor out = at::zeros({64 * 8}, at::kFloat);
  float* o = out.data_ptr<float>();
  static int calls = 0;
  const float salt = static_cast<float>(++calls % 1000) + 0.5f;  // neighbour tests: out[t] - salt
  o[64 * 8 - 1] = salt;
  if (name == "neighbour_sync") launch("neighbour_kernel", neighbour_kernel<64, 1, true>, 1, 64, 0, o, salt);
  else if (name == "neighbour_nosync") launch("neighbour_kernel", neighbour_kernel<64, 1, false>, 1, 64, 0, o, salt);
  else if (name == "warp_neighbour_sync") launch("neighbour_kernel", neighbour_kernel<32, 5, true>, 1, 32, 0, o, salt);
  else if (name == "warp_neighbour_nosync") launch("neighbour_kernel", neighbour_kernel<32, 5, false>, 1, 32, 0, o, salt);
  else if (name == "exited_lane") launch("exited_lane_kernel", exited_lane_kernel, 1, 32, 0, o);
  else if (name == "different_collectives") launch("different_collectives_kernel", different_collectives_kernel, 1, 32, 0, o);
  else if (name == "barrier_after_exit") launch("barrier_after_exit_kernel", barrier_after_exit_kernel, 1, 64, 0, o);
  else if (name == "packed_aligned") {
    at::Tensor x = at::arange(8, at::kFloat);
    launch("packed_load_kernel", packed_load_kernel, 1, 32, 0, x.data_ptr<float>(), o);
  } else if (name == "packed_misaligned") {
    at::Tensor x = at::arange(8, at::kFloat);
    launch("packed_load_kernel", packed_load_kernel, 1, 32, 0, x.data_ptr<float>() + 1, o);
  } else if (name == "block_1025") launch("nothing_kernel", nothing_kernel, 1, 1025, 0, o);
  else if (name == "grid_y_65536") launch("nothing_kernel", nothing_kernel, dim3(1, 65536), 32, 0, o);
  else if (name == "grid_zero") launch("nothing_kernel", nothing_kernel, 0, 32, 0, o);
  else if (name == "smem_49k") launch("dynamic_smem_kernel", dynamic_smem_kernel, 1, 32, 49 * 1024, o);
  else if (name == "smem_49k_opt_in") {
    cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 49 * 1024);
    launch("dynamic_smem_kernel", dynamic_smem_kernel, 1, 32, 49 * 1024, o);
    cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
  } else if (name == "collectives") launch("collectives_kernel", collectives_kernel, 1, 32, 0, o);
  else if (name == "atomics") launch("atomic_kernel", atomic_kernel, 3, 64, 0, o);
  else TORCH_CHECK(false, "fusedjd_simt: unknown self-test `", name, "`");
  return out;
}

}  // namespace

TORCH_LIBRARY(fusedjd_simt, m) {
  fusedjd::define_ops(m);
  // order: 0 forward, 1 reverse, 2 random (seeded); sm_count: what the host code sees.
  m.def("configure(int order, int seed, int sm_count) -> ()", &configure);
  m.def("stats() -> Tensor", &stats);
  m.def("selftest(str name) -> Tensor", &selftest);
}
