// CPU kernels of the matrix family: grouped Gramian and grouped combination.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "gram_rows.h"

namespace fusedjd::cpu {
namespace {

// Groups at least this wide go to BLAS (float32 / float64 only): there the
// library's blocking beats the generic loop; below it the per-call overhead
// dominates and groups are better run side by side in one parallel loop.
constexpr int64_t kBlasMinCols = 32768;

at::Tensor gramian_cpu(const at::Tensor& J, at::IntArrayRef group_sizes) {
  FUSEDJD_CHECK_DIM(J, 2);
  FUSEDJD_CHECK_FLOAT(J);
  const int64_t m = J.size(0), n = J.size(1);
  const std::vector<int64_t> off = group_offsets(group_sizes, n);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::Tensor out = at::zeros({k, m, m}, J.options().dtype(acc_dtype(J.scalar_type())));
  if (m == 0 || n == 0) return out;
  const at::Tensor Jc = unit_col_stride(J);
  const bool blas_dtype = Jc.scalar_type() == at::kFloat || Jc.scalar_type() == at::kDouble;

  // Wide float32/float64 groups: one BLAS call each (itself multi-threaded).
  std::vector<int64_t> rest;
  for (int64_t g = 0; g < k; ++g) {
    const int64_t s = off[g + 1] - off[g];
    if (blas_dtype && s >= kBlasMinCols) {
      const at::Tensor Jg = Jc.narrow(1, off[g], s);
      at::Tensor og = out.select(0, g);
      at::mm_out(og, Jg, Jg.t());
      // BLAS need not return an exactly symmetric A A^T: mirror the upper triangle, as
      // every other path (and the CUDA kernel) does.
      AT_DISPATCH_FLOATING_TYPES(og.scalar_type(), "fusedjd_mirror", [&] {
        scalar_t* o = og.data_ptr<scalar_t>();
        for (int64_t a = 0; a < m; ++a)
          for (int64_t b = a + 1; b < m; ++b) o[b * m + a] = o[a * m + b];
      });
    } else if (s > 0) {
      rest.push_back(g);
    }
  }
  if (rest.empty()) return out;

  // The rest: (group, column chunk) tasks in one parallel loop, float64 partials.
  struct Task { int64_t g, c0, c1; };
  std::vector<Task> tasks;
  for (int64_t g : rest) {
    const int64_t s = off[g + 1] - off[g];
    const int64_t chunks = num_chunks(s), per = (s + chunks - 1) / chunks;
    for (int64_t t = 0; t < chunks; ++t) {
      const int64_t c0 = off[g] + t * per, c1 = std::min(off[g + 1], c0 + per);
      if (c0 < c1) tasks.push_back({g, c0, c1});
    }
  }
  const int64_t T = static_cast<int64_t>(tasks.size());
  std::vector<double> partial(static_cast<size_t>(T * m * m), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jc.scalar_type(), "fusedjd_gramian_cpu", [&] {
    const scalar_t* base = Jc.data_ptr<scalar_t>();
    const int64_t ld = Jc.stride(0);
    at::parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
      std::vector<const scalar_t*> rows(static_cast<size_t>(m));
      for (int64_t t = lo; t < hi; ++t) {
        for (int64_t a = 0; a < m; ++a) rows[a] = base + a * ld;
        gram_rows_accumulate(rows.data(), m, tasks[t].c0, tasks[t].c1, partial.data() + t * m * m);
      }
    });
  });
  // Ordered reduction per group (deterministic), then mirror the upper triangle.
  std::vector<double> acc(static_cast<size_t>(m * m));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedjd_gramian_cpu_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    int64_t t = 0;
    for (int64_t g : rest) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (; t < T && tasks[t].g == g; ++t)
        for (int64_t e = 0; e < m * m; ++e) acc[e] += partial[t * m * m + e];
      for (int64_t a = 0; a < m; ++a)
        for (int64_t b = a; b < m; ++b) {
          o[g * m * m + a * m + b] = static_cast<scalar_t>(acc[a * m + b]);
          o[g * m * m + b * m + a] = static_cast<scalar_t>(acc[a * m + b]);
        }
    }
  });
  return out;
}

at::Tensor combine_cpu(const at::Tensor& J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  const std::vector<int64_t> off = check_combine_args(J, weights, group_sizes);
  const int64_t m = J.size(0), n = J.size(1);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::Tensor out = at::empty({n}, J.options());
  if (n == 0) return out;
  if (m == 0) return out.zero_();
  const at::Tensor Jc = unit_col_stride(J);
  const at::Tensor W = weights.to(at::kDouble).contiguous();
  const double* w = W.data_ptr<double>();
  // Wide float32/float64 groups: BLAS gemv into the output slice; the rest below.
  std::vector<bool> done(static_cast<size_t>(k), false);
  if (Jc.scalar_type() == at::kFloat || Jc.scalar_type() == at::kDouble) {
    const at::Tensor Wj = W.to(Jc.scalar_type());
    for (int64_t g = 0; g < k; ++g) {
      const int64_t s = off[g + 1] - off[g];
      if (s < kBlasMinCols) continue;
      at::Tensor og = out.narrow(0, off[g], s);
      at::mv_out(og, Jc.narrow(1, off[g], s).t(), Wj.select(0, g));
      done[g] = true;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jc.scalar_type(), "fusedjd_combine_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* base = Jc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t ld = Jc.stride(0);
    constexpr int64_t kChunk = 4096;
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<opmath_t> acc(kChunk);
      for (int64_t ch = lo; ch < hi; ++ch) {
        const int64_t c0 = ch * kChunk, c1 = std::min(n, c0 + kChunk);
        // first group whose columns reach past c0
        int64_t g = std::upper_bound(off.begin(), off.end(), c0) - off.begin() - 1;
        for (int64_t s0 = c0; s0 < c1; ++g) {
          const int64_t s1 = std::min(c1, off[g + 1]);
          if (s1 <= s0) continue;  // empty group
          if (done[g]) {           // already written by BLAS
            s0 = s1;
            continue;
          }
          opmath_t* a = acc.data();
          const int64_t len = s1 - s0;
          for (int64_t c = 0; c < len; ++c) a[c] = opmath_t(0);
          for (int64_t i = 0; i < m; ++i) {
            const opmath_t wi = static_cast<opmath_t>(w[g * m + i]);
            const scalar_t* row = base + i * ld + s0;
            for (int64_t c = 0; c < len; ++c) a[c] += wi * static_cast<opmath_t>(row[c]);
          }
          for (int64_t c = 0; c < len; ++c) o[s0 + c] = static_cast<scalar_t>(a[c]);
          s0 = s1;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("gramian", &gramian_cpu);
  m.impl("combine", &combine_cpu);
}

}  // namespace fusedjd::cpu
