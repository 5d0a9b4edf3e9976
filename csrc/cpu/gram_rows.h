// CPU building block: the Gramian of R rows given by pointers (unit column
// stride), accumulated in float64. Used by the grouped Gramian for groups (and
// dtypes) where BLAS does not pay, and by MoCo's first pass, which needs the
// Gramian of the stacked rows [Y; J] without materializing them.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedjd::cpu {

constexpr int64_t kTile = 256;   // columns staged per tile (fits L1/L2 for R <= 64)
constexpr int kLanes = 8;        // independent partial sums per pair (vectorizable)

// out[a * R + b] += sum_{c in [c0, c1)} rows[a][c] * rows[b][c] for a <= b.
template <typename scalar_t>
void gram_rows_accumulate(const scalar_t* const* rows, int64_t R, int64_t c0, int64_t c1,
                          double* out) {
  std::vector<double> x(static_cast<size_t>(R * kTile));
  for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
    const int64_t len = std::min(kTile, c1 - t0);
    for (int64_t a = 0; a < R; ++a) {
      const scalar_t* src = rows[a] + t0;
      double* dst = x.data() + a * kTile;
      for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<double>(src[c]);
    }
    const int64_t body = len - len % kLanes;
    for (int64_t a = 0; a < R; ++a) {
      const double* xa = x.data() + a * kTile;
      for (int64_t b = a; b < R; ++b) {
        const double* xb = x.data() + b * kTile;
        double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t c = 0; c < body; c += kLanes)
          for (int l = 0; l < kLanes; ++l) lane[l] += xa[c + l] * xb[c + l];
        double s = 0.0;
        for (int64_t c = body; c < len; ++c) s += xa[c] * xb[c];
        for (int l = 0; l < kLanes; ++l) s += lane[l];
        out[a * R + b] += s;
      }
    }
  }
}

// Number of column chunks to split n columns into: enough to keep every
// thread busy, few enough that the per-chunk partial Gramians stay small.
inline int64_t num_chunks(int64_t n) {
  const int64_t min_chunk = 16384;
  const int64_t by_size = (n + min_chunk - 1) / min_chunk;
  const int64_t cap = 8 * static_cast<int64_t>(at::get_num_threads());
  return std::max<int64_t>(1, std::min(by_size, cap));
}

// Full symmetric Gramian (R x R, float64) of the rows over columns [0, n),
// parallel over column chunks with a deterministic, ordered final sum.
template <typename scalar_t>
void gram_rows_parallel(const scalar_t* const* rows, int64_t R, int64_t n, double* out) {
  std::fill(out, out + R * R, 0.0);
  if (R == 0 || n == 0) return;
  const int64_t chunks = num_chunks(n);
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<double> partial(static_cast<size_t>(chunks * R * R), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t c0 = t * per, c1 = std::min(n, c0 + per);
      if (c0 < c1) gram_rows_accumulate(rows, R, c0, c1, partial.data() + t * R * R);
    }
  });
  for (int64_t t = 0; t < chunks; ++t)
    for (int64_t e = 0; e < R * R; ++e) out[e] += partial[t * R * R + e];
  for (int64_t a = 0; a < R; ++a)
    for (int64_t b = 0; b < a; ++b) out[a * R + b] = out[b * R + a];
}

}  // namespace fusedjd::cpu
