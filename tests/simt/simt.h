// A small SIMT emulator: compiles the CUDA sources of csrc/cuda as plain C++ and runs their
// kernels on the CPU, so that a machine without a GPU still executes them (the spirit of the
// old `nvcc -deviceemu`). Test-only: the library users install never includes this file.
//
// Model
// - Every CUDA thread of a block is a fiber on the calling OS thread (hand-written x86-64
//   context switch; ucontext elsewhere). Blocks run one after another.
// - Between two sync points the fibers of a block run one after the other, each until its next
//   sync point, in a configurable order (forward, reverse or seeded random, per round). A result
//   that changes with the order exposes a missing __syncthreads/__syncwarp or a
//   warp-synchronous assumption.
// - Sync points: __syncthreads (every thread of the block), and the warp collectives
//   __syncwarp, __shfl*_sync, __any/__all/__ballot_sync, which complete once every lane their
//   mask names has arrived at the same collective with the same mask.
// - Refused with an error naming the kernel and the rule: block > 1024 threads (or a dimension
//   beyond sm_90's limits), gridDim.y/z > 65535, a 0-sized grid or block, dynamic shared memory
//   > 48 KiB without the opt-in, a warp collective whose mask names lanes that have exited, do
//   not exist, or sit at a different collective (or with another mask) -- stricter than CUDA,
//   which lets exited lanes stay in a mask: that is how a lost early return shows --, a
//   shuffle reading a lane
//   outside the mask, __syncthreads reached while other threads have exited, a deadlock, and a
//   packed load (load_pack) from an address not aligned to its size.
// - Static __shared__ variables are one copy per kernel (blocks run one after another, so one
//   copy per block at a time); they keep their contents from one block to the next, so a read of
//   shared memory the block never wrote is not caught there. Dynamic shared memory is a fresh
//   heap buffer of exactly the requested size per block, filled with 0xFF bytes (NaN for
//   floats), so such reads and overflows show (the latter under AddressSanitizer).
// - Atomics are plain read-modify-writes: fibers only switch at sync points.
// - One launch at a time (a global lock); the multiprocessor count the host code sees
//   (sm_count) is configurable, so every grid decomposition can be exercised.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA's vocabulary --------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

namespace simt {

enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
  Order order = Order::kForward;
  uint64_t seed = 0;
  int sm_count = 132;  // H100 SXM
  uint64_t launch_index = 0;  // launches since the settings were last set: seeds the random order
};

// The settings the next launches use (not thread-safe: set them between launches).
Config& config();

struct Stats {
  int64_t launches = 0;   // kernel launches run
  int64_t blocks = 0;     // blocks run
  int64_t threads = 0;    // threads (fibers) run
  int64_t switches = 0;   // fiber resumptions
};
Stats& stats();

namespace detail {

// What a kernel reads of the running fiber (the runtime's fiber extends it).
struct FiberHead {
  uint3 tid;
};
extern FiberHead* g_cur;  // the running fiber
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

enum class Op : uint8_t { kSyncWarp, kShfl, kShflXor, kShflDown, kShflUp, kAny, kAll, kBallot };

// Arrives at a warp collective, waits for the other lanes of `mask`, returns this lane's
// result (the shuffled bits, or the vote).
uint64_t warp_collective(Op op, unsigned mask, uint64_t bits, int arg, int width);
void sync_threads();
void* dynamic_smem();
[[noreturn]] void fail(const std::string& rule);

// Body of a launch: every fiber calls fn(ctx).
struct Body {
  void (*fn)(const void*);
  const void* ctx;
};
void run_grid(const char* kernel, const void* fn, dim3 grid, dim3 block, size_t smem, Body body);
void set_max_dynamic_smem(const void* fn, size_t bytes);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffled values are at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace detail

// Runs kernel(args...) on a grid of blocks, one fiber per thread. Throws (a std::runtime_error
// naming the kernel) when the launch or a thread breaks one of the rules above.
template <typename... P>
void launch(const char* kernel, void (*fn)(P...), dim3 grid, dim3 block, size_t smem, P... args) {
  struct Ctx {
    void (*fn)(P...);
    std::tuple<P...> args;
  } ctx{fn, std::tuple<P...>(args...)};
  detail::Body body{[](const void* c) {
                      const Ctx* x = static_cast<const Ctx*>(c);
                      std::apply(x->fn, x->args);  // each thread gets its own copy of the arguments
                    },
                    &ctx};
  detail::run_grid(kernel, reinterpret_cast<const void*>(fn), grid, block, smem, body);
}

// The dynamic shared memory of the running block (extern __shared__), as T*.
template <typename T>
T* dynamic_smem() {
  return static_cast<T*>(detail::dynamic_smem());
}

// Refuses a packed access of `bytes` bytes at p unless p is aligned to `bytes`.
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    detail::fail("misaligned packed load: " + std::to_string(bytes) + "-byte access at address " +
                 std::to_string(reinterpret_cast<uintptr_t>(p)) + " (address % " + std::to_string(bytes) + " = " +
                 std::to_string(reinterpret_cast<uintptr_t>(p) % bytes) + ")");
}

}  // namespace simt

#define threadIdx (::simt::detail::g_cur->tid)
#define blockIdx (::simt::detail::g_block_idx)
#define blockDim (::simt::detail::g_block_dim)
#define gridDim (::simt::detail::g_grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::simt::detail::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::simt::detail::warp_collective(::simt::detail::Op::kSyncWarp, mask, 0, 0, 32);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_collective(Op::kShfl, mask, to_bits(v), src, width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_collective(Op::kShflXor, mask, to_bits(v), lane_mask, width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_collective(Op::kShflDown, mask, to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_collective(Op::kShflUp, mask, to_bits(v), static_cast<int>(delta), width));
}
inline int __any_sync(unsigned mask, int pred) {
  using namespace ::simt::detail;
  return static_cast<int>(warp_collective(Op::kAny, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  using namespace ::simt::detail;
  return static_cast<int>(warp_collective(Op::kAll, mask, pred != 0, 0, 32));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  using namespace ::simt::detail;
  return static_cast<unsigned>(warp_collective(Op::kBallot, mask, pred != 0, 0, 32));
}

// Fibers switch only at sync points, so a plain read-modify-write is atomic here.
namespace simt::detail {
template <typename T, typename F>
T read_modify_write(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}
}  // namespace simt::detail
template <typename T>
T atomicAdd(T* p, T v) { return ::simt::detail::read_modify_write(p, [v](T o) { return o + v; }); }
template <typename T>
T atomicOr(T* p, T v) { return ::simt::detail::read_modify_write(p, [v](T o) { return o | v; }); }
template <typename T>
T atomicAnd(T* p, T v) { return ::simt::detail::read_modify_write(p, [v](T o) { return o & v; }); }
template <typename T>
T atomicMax(T* p, T v) { return ::simt::detail::read_modify_write(p, [v](T o) { return o > v ? o : v; }); }
template <typename T>
T atomicMin(T* p, T v) { return ::simt::detail::read_modify_write(p, [v](T o) { return o < v ? o : v; }); }
template <typename T>
T atomicExch(T* p, T v) { return ::simt::detail::read_modify_write(p, [v](T) { return v; }); }
template <typename T>
T atomicCAS(T* p, T expected, T v) {
  return ::simt::detail::read_modify_write(p, [&](T o) { return o == expected ? v : o; });
}

// The opt-in for more than 48 KiB of dynamic shared memory.
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaError_t { cudaSuccess = 0 };
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*fn)(P...), cudaFuncAttribute, int bytes) {
  ::simt::detail::set_max_dynamic_smem(reinterpret_cast<const void*>(fn), static_cast<size_t>(bytes));
  return cudaSuccess;
}

// Device-side math the kernels call unqualified.
using std::isfinite;
using std::max;
using std::min;
