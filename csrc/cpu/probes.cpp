// Measurement kernels for the benchmark (bench/run.py), compiled with the CPU kernels of each
// instruction-set level so that they measure with the instructions the kernels use: the floors the
// benchmark divides its CPU rows by. Not part of fusedjd's ops: they live in their own namespace,
// torch.ops.fusedjd_bench (one CPU kernels' library is loaded per process, which defines it).
//   read(x):           reads every byte of the tensors once over the threads; the fastest read
//                      this code does (vectors, four independent integer sums, no floating-point
//                      latency chain). Returns a checksum, so that the reads cannot be dropped.
//   multiply_adds(r, dtype): r calls per thread of the Gramian engine's own 4 x 4 register block
//                      (block_pairs, off the diagonal) on rows of what the engine reads for rows
//                      of `dtype` (float32 lanes; float16 widened in registers, bfloat16 pairs
//                      where the CPU has them), kept in L1: the rate the engine's blocks reach
//                      when memory costs nothing. Returns the multiply-adds (element pairs) done.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "gram_engine.h"
#include "simd.h"

namespace fusedjd::cpu {
namespace {

volatile double probe_sink = 0.0;

double read_all(at::TensorList xs) {
  typedef uint64_t U __attribute__((vector_size(kVecBytes)));
  std::atomic<uint64_t> total{0};
  for (size_t t = 0; t < xs.size(); ++t) {
    const at::Tensor& x = xs[t];
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "fusedjd_bench.read: `x[", t,
                "]` must be a contiguous CPU tensor, got device ", x.device(), " and strides ", x.strides());
    const char* base = static_cast<const char*>(x.data_ptr());
    const int64_t nv = static_cast<int64_t>(x.nbytes()) / kVecBytes;
    at::parallel_for(0, nv, 4096, [&](int64_t lo, int64_t hi) {
      U a0{}, a1{}, a2{}, a3{}, v0, v1, v2, v3;
      int64_t v = lo;
      for (; v + 4 <= hi; v += 4) {
        std::memcpy(&v0, base + v * kVecBytes, sizeof(U));
        std::memcpy(&v1, base + (v + 1) * kVecBytes, sizeof(U));
        std::memcpy(&v2, base + (v + 2) * kVecBytes, sizeof(U));
        std::memcpy(&v3, base + (v + 3) * kVecBytes, sizeof(U));
        a0 += v0;
        a1 += v1;
        a2 += v2;
        a3 += v3;
      }
      for (; v < hi; ++v) {
        std::memcpy(&v0, base + v * kVecBytes, sizeof(U));
        a0 += v0;
      }
      const U s = (a0 + a1) + (a2 + a3);
      uint64_t sum = 0;
      for (size_t l = 0; l < sizeof(U) / sizeof(uint64_t); ++l) sum += s[l];
      total += sum;
    });
    for (int64_t b = nv * kVecBytes; b < static_cast<int64_t>(x.nbytes()); ++b)  // the last partial vector
      total += static_cast<unsigned char>(base[b]);
  }
  return static_cast<double>(total.load() % (1ull << 52));
}

// `reps` block sums per thread on rows of the element type E the engine reads for rows of T.
template <typename T>
double multiply_adds_of(int64_t reps) {
  using E = elem_t<T>;
  using S = Simd<E>;
  // 2 rows of 2048 elements (16 KiB at most, in L1), read as the rows of an off-diagonal 4 x 4 block
  // (x = {r0, r1, r0, r1}): the engine's 8 loads and 16 multiply-adds per vector, and its widest
  // tile, 2048 columns, between two block sums
  constexpr int64_t kCols = 2048, kVec = kCols / S::L;
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> done{0};
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<E> rows(static_cast<size_t>(2 * kCols));
    for (size_t e = 0; e < rows.size(); ++e) rows[e] = static_cast<E>(1e-3f * static_cast<float>(e % 7 + 1));
    const E* x[kBlock] = {rows.data(), rows.data() + kCols, rows.data(), rows.data() + kCols};
    const char* pf[2] = {nullptr, nullptr};
    double out[kBlock * kBlock], sink = 0.0;
    for (int64_t t = lo; t < hi; ++t) {
      for (int64_t r = 0; r < reps; ++r) {
        block_pairs<E, false, 2>(x, x, kVec, 0, out, pf, 0);
        sink += out[r % (kBlock * kBlock)];
      }
      probe_sink = sink;  // (a volatile store: the calls cannot be dropped)
      done += 1;
    }
  });
  return static_cast<double>(done.load()) * static_cast<double>(reps) * kBlock * kBlock * kCols;
}

double multiply_adds(int64_t reps, at::ScalarType dtype) {
  TORCH_CHECK(reps >= 0, "fusedjd_bench.multiply_adds: `reps` must be non-negative, got ", reps);
  double count = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedjd_bench_multiply_adds",
                                  [&] { count = multiply_adds_of<scalar_t>(reps); });
  return count;
}

}  // namespace
}  // namespace fusedjd::cpu

TORCH_LIBRARY(fusedjd_bench, m) {
  m.def("read(Tensor[] x) -> float", &fusedjd::cpu::read_all);
  m.def("multiply_adds(int reps, ScalarType dtype) -> float", &fusedjd::cpu::multiply_adds);
}
