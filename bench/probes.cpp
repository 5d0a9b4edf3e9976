// Measurement kernels for the benchmark (bench/run.py): the floors it divides its CPU rows by. Not
// part of fusedjd: built by the benchmark (bench/probes.py) with the flags of the CPU kernels'
// level that its process loaded, so that they measure with the instructions the kernels use, and
// registered in their own namespace, torch.ops.fusedjd_bench.
//   read(x):           reads every byte of the tensors once over the threads; the fastest read
//                      this code does (vectors, four independent integer sums, no floating-point
//                      latency chain). Returns a checksum, so that the reads cannot be dropped.
//   multiply_adds(r, dtype): r calls per thread of the Gramian engine's own 4 x 4 register block
//                      (block_pairs, off the diagonal) on rows of what the engine reads for rows
//                      of `dtype` (float32 lanes; float16 widened in registers, bfloat16 pairs
//                      where the CPU has them), kept in L1: the rate the engine's blocks reach
//                      when memory costs nothing. Returns the multiply-adds (element pairs) done.
//   block_sums(dtype): one such block sum, its rows and its 16 results (what the test of
//                      multiply_adds' count checks against the rows' own dot products).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <tuple>
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

// The probe's rows: 2 rows of 2048 elements (16 KiB at most, in L1) of the element type E the
// engine reads for rows of T, read as the rows of an off-diagonal 4 x 4 block (x = {r0, r1, r0, r1}):
// the engine's 8 loads and 16 multiply-adds per vector, and its widest tile, 2048 columns, between
// two block sums.
template <typename T>
struct ProbeRows {
  using E = elem_t<T>;
  static constexpr int64_t kCols = 2048, kVec = kCols / Simd<E>::L;
  std::vector<E> rows;
  const E* x[kBlock];
  ProbeRows() : rows(static_cast<size_t>(2 * kCols)) {
    for (size_t e = 0; e < rows.size(); ++e) rows[e] = static_cast<E>(1e-3f * static_cast<float>(e % 7 + 1));
    x[0] = x[2] = rows.data();
    x[1] = x[3] = rows.data() + kCols;
  }
  // one block sum: out[a * 4 + b] = <x[a], x[b]> over the 2048 columns
  void block(double* out) const {
    const char* pf[2] = {nullptr, nullptr};
    block_pairs<E, false, 2>(x, x, kVec, 0, out, pf, 0);
  }
};

// `reps` block sums per thread: the multiply-adds the loop does are 16 pairs x 2048 columns a block
// sum (block_sums below returns one block sum's results, for the test that checks this count).
template <typename T>
double multiply_adds_of(int64_t reps) {
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> done{0};
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    const ProbeRows<T> probe;
    double out[kBlock * kBlock], sink = 0.0;
    for (int64_t t = lo; t < hi; ++t) {
      for (int64_t r = 0; r < reps; ++r) {
        probe.block(out);
        sink += out[r % (kBlock * kBlock)];
      }
      probe_sink = sink;  // (a volatile store: the calls cannot be dropped)
      done += 1;
    }
  });
  return static_cast<double>(done.load()) * static_cast<double>(reps) * kBlock * kBlock * ProbeRows<T>::kCols;
}

// One block sum of the probe: its rows (float64, [2, 2048], the values the engine read) and its
// 4 x 4 results, so that a test can check that all 16 pairs were summed over all 2048 columns.
std::tuple<at::Tensor, at::Tensor> block_sums(at::ScalarType dtype) {
  at::Tensor rows, out = at::empty({kBlock, kBlock}, at::TensorOptions().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedjd_bench_block_sums", [&] {
    const ProbeRows<scalar_t> probe;
    rows = at::empty({2, ProbeRows<scalar_t>::kCols}, at::TensorOptions().dtype(at::kDouble));
    for (int64_t e = 0; e < rows.numel(); ++e) rows.data_ptr<double>()[e] = static_cast<double>(probe.rows[e]);
    probe.block(out.data_ptr<double>());
  });
  return {rows, out};
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
  m.def("block_sums(ScalarType dtype) -> (Tensor, Tensor)", &fusedjd::cpu::block_sums);
}
