// The CPU streaming Gramian engine: per-column-group Gramians of a few very long rows, in one
// read of the rows. Used by every CPU op that needs a Gramian: the gramian op (whole matrix or
// column groups of any size and count) and MoCo's first pass (the Gramian of the updated Y, formed
// tile by tile in cache from Y and J).
//
// - Columns are cut into fixed chunks (chunk_cols: max(kChunkCols, 64 R), or a few smaller ones
//   for a matrix narrower than that), set by R and n and not by the thread count, so that results
//   do not depend on it; at::parallel_for spreads the chunks over the threads. A group that lies inside one chunk is finished there; a group cut
//   by chunk borders gets one partial per chunk, summed afterwards in chunk order (deterministic).
// - Within a chunk, tiles of TW columns of every row are streamed once from memory: read in place
//   (float32/float64 rows; bfloat16 where the CPU multiplies bfloat16 pairs; float16 where it
//   widens them in registers; a ragged end read as a partial vector), or converted into a
//   per-thread staging buffer (the other half-type cases, or rows computed on the fly such as
//   MoCo's Y + b (J - Y)).
// - While a tile is multiplied, its block pairs prefetch the next tile's rows (a few cache lines
//   per vector): the next tile's memory reads overlap this tile's multiply-adds. (Not for a
//   single block of rows read in place, whose few streams the hardware prefetcher follows.)
// - On a tile, 4 x 4 blocks of row pairs over the upper triangle (diagonal blocks included) keep
//   16 vector accumulators in registers (GCC/Clang vector extensions: AVX-512, AVX2 or SSE2/NEON,
//   whichever the build targets), in float32 lanes for float32/16/bf16 (float64 for float64),
//   flushed to float64 after each tile: at most TW / lanes products are summed in float32.
//   bfloat16 rows on CPUs with AVX512-BF16 are multiplied in pairs by vdpbf16ps, which treats
//   subnormal inputs and results as zero: a product below float32's normal range
//   (|x y| < 1.2e-38) counts as 0 there, and as itself elsewhere.
// Scratch per thread: a staging tile (R x TW elements, for converted rows), one R x R float64 sum
// and the next tile's 2 R stream addresses; per chunk: two R x R float64 partials for the groups
// cut by its borders.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "block_rows.h"
#include "simd.h"

namespace fusedjd::cpu {

inline constexpr int kBlock = 4;                // rows per register block
inline constexpr int64_t kChunkCols = 16384;    // columns per parallel task
inline constexpr int64_t kTileBytes = 1 << 18;        // rows read in place: a tile stays in L2
inline constexpr int64_t kStagedTileBytes = 1 << 14;  // rows converted into a buffer: it stays in L1
inline constexpr int64_t kInCacheBytes = 1 << 20;     // rows this small are not prefetched (L2)

// Columns per parallel task for R rows of n columns, set by R and n (never by the thread count, so
// that results do not depend on it): chunks of at least 64 R columns, whose partials for cut groups
// (2 R^2 float64 per chunk) stay below 1/16 of the float32 rows they sum; kChunkCols at least. A
// matrix of fewer than kSmallTasks such chunks is cut into up to kSmallTasks chunks (of whole cache
// lines) of at least kTaskMadds multiply-adds each, when that makes more chunks: a small call bound
// by its multiply-adds (R = 32 in cache) then runs on the threads too.
inline constexpr int64_t kTaskMadds = 1 << 18;
inline constexpr int64_t kSmallTasks = 8;
inline int64_t chunk_cols(int64_t R, int64_t n) {
  const int64_t big = std::max<int64_t>(kChunkCols, 64 * R);
  const int64_t tasks = std::clamp<int64_t>(n * (R * (R + 1) / 2) / kTaskMadds, 1, kSmallTasks);
  // (the smaller of the two: no cliff where n passes one big chunk)
  return std::min(big, std::max<int64_t>(64, ((n + tasks - 1) / tasks + 63) / 64 * 64));
}

// Tile width (columns, a multiple of the lane count) for R rows of lane type A.
template <typename A>
int64_t tile_cols(int64_t R, bool staged) {
  constexpr int L = Simd<A>::L;
  const int64_t rows = (R + kBlock - 1) / kBlock * kBlock;
  const int64_t w = (staged ? kStagedTileBytes : kTileBytes) / (rows * static_cast<int64_t>(sizeof(A))) / L * L;
  // at least 512 columns: each tile ends with a flush of every block's lane sums, which must stay
  // small next to the tile's multiply-adds (a staged tile of many rows then lives in L2)
  return std::clamp<int64_t>(w, std::max<int64_t>(L, 512), 2048);
}

// An empty asm that claims to change its operands in registers: the compiler must load each once
// and keep it there.
template <typename V>
inline void in_register(V& a0, V& a1, V& a2, V& a3, V& b0, V& b1, V& b2, V& b3) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(b0), "+v"(b1), "+v"(b2), "+v"(b3));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(a0), "+w"(a1), "+w"(a2), "+w"(a3), "+w"(b0), "+w"(b1), "+w"(b2), "+w"(b3));
#endif
}

// (s[0] + s[N/2]) + ... summed by halving: s[l] + s[l + N/2] for l < N/2, and so on. N is a
// compile-time constant, so that every step is straight-line vector code: with the halving width
// a loop variable, the compiler left a scalar loop through memory, which cost a small call as much
// as its multiply-adds (each 4 x 4 block is summed this way once per tile).
template <int N>
inline double halving_sum(const double* s) {
  if constexpr (N == 1) {
    return s[0];
  } else {
    double t[N / 2];
    for (int l = 0; l < N / 2; ++l) t[l] = s[l] + s[l + N / 2];
    return halving_sum<N / 2>(t);
  }
}

// acc[i][j] += a[i] b[j] (a[j] when DIAG, for j >= i), lane by lane (bfloat16: pairs of lanes).
template <typename E, bool DIAG, typename V>
inline void multiply_add(V (&acc)[kBlock][kBlock], const V (&a)[kBlock], const V (&b)[kBlock]) {
  for (int i = 0; i < kBlock; ++i)
    for (int j = DIAG ? i : 0; j < kBlock; ++j) {
      if constexpr (std::is_same_v<E, c10::BFloat16>) {
#if defined(__AVX512BF16__)
        acc[i][j] = V(_mm512_dpbf16_ps(__m512(acc[i][j]), __m512bh(a[i]), __m512bh(DIAG ? a[j] : b[j])));
#endif
      } else {
        acc[i][j] += a[i] * (DIAG ? a[j] : b[j]);
      }
    }
}

// Sums over nvec vectors (then the `tail` < L elements after them, as a vector padded with zeros)
// of the pairs (xa[i], xb[j]) of a 4 x 4 block into out[i * 4 + j] (float64). DIAG: xa == xb and
// only j >= i is needed. Vector v also prefetches the v-th cache line of each of pf[0..NPF), for
// v < pf_lines.
template <typename E, bool DIAG, int NPF>
inline void block_pairs(const E* const* xa, const E* const* xb, int64_t nvec, int64_t tail, double* out,
                        const char* const* pf, int64_t pf_lines) {
  using S = Simd<E>;
  using V = typename S::V;
  constexpr int L = S::L;
  V acc[kBlock][kBlock];
  for (int i = 0; i < kBlock; ++i)
    for (int j = 0; j < kBlock; ++j) acc[i][j] = V{};
  for (int64_t v = 0; v < nvec; ++v) {
    if (v < pf_lines) {
      for (int k = 0; k < NPF; ++k) __builtin_prefetch(pf[k] + v * 64, 0, 1);
    }
    V a[kBlock], b[kBlock];
    // off the diagonal, keep the 8 loaded vectors in registers: otherwise the compiler folds each
    // load into the four multiply-adds that use it (20 loads for 16 multiply-adds, not 8), and the
    // loads, not the multiply-adds, bound the loop. Measured against forcing only b: 6-13% faster
    // with AVX2's 16 registers too (accumulators spill either way), 2-6% slower with SSE2.
    for (int i = 0; i < kBlock; ++i) a[i] = S::load(xa[i] + v * L);
    if constexpr (!DIAG) {
      for (int j = 0; j < kBlock; ++j) b[j] = S::load(xb[j] + v * L);
      in_register(a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]);
    }
    multiply_add<E, DIAG>(acc, a, b);
  }
  if (tail > 0) {
    V a[kBlock], b[kBlock];
    for (int i = 0; i < kBlock; ++i) a[i] = S::load_partial(xa[i] + nvec * L, tail);
    if constexpr (!DIAG)
      for (int j = 0; j < kBlock; ++j) b[j] = S::load_partial(xb[j] + nvec * L, tail);
    multiply_add<E, DIAG>(acc, a, b);
  }
  // each block's lanes summed in float64 by halving (a fixed order)
  constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(acc[0][0][0]));
  for (int i = 0; i < kBlock; ++i)
    for (int j = DIAG ? i : 0; j < kBlock; ++j) {
      double s[kLanes];
      for (int l = 0; l < kLanes; ++l) s[l] = static_cast<double>(acc[i][j][l]);
      out[i * kBlock + j] = halving_sum<kLanes>(s);
    }
}

// upper[a * R + b] += sum over the tile of x[a][c] x[b][c], for a <= b. Each x[r] holds `len`
// values (the last len % L, if any, read as a vector padded with zeros); rows beyond R read `zero`. The P block pairs
// prefetch the S streams of `next` (NPF per pair at most; none if S > NPF P): pair p the streams
// [p S / P, (p + 1) S / P), one cache line of each per vector.
template <typename A, int NPF>
void tile_pairs(const A* const* x, int64_t R, int64_t len, const A* zero, double* upper, const Streams& next) {
  const int64_t nb = (R + kBlock - 1) / kBlock, nvec = len / Simd<A>::L, tail = len % Simd<A>::L;
  const int64_t P = nb * (nb + 1) / 2;
  const int64_t S = next.count <= NPF * P ? next.count : 0;
  const A* xa[kBlock];
  const A* xb[kBlock];
  double blk[kBlock * kBlock];
  // block column by block column: the tile's rows are first needed in order, as they were
  // prefetched during the previous tile
  for (int64_t bj = 0, p = 0; bj < nb; ++bj) {
    for (int j = 0; j < kBlock; ++j) xb[j] = bj * kBlock + j < R ? x[bj * kBlock + j] : zero;
    for (int64_t bi = 0; bi <= bj; ++bi, ++p) {
      for (int i = 0; i < kBlock; ++i) xa[i] = bi * kBlock + i < R ? x[bi * kBlock + i] : zero;
      const int64_t s0 = p * S / P, s1 = (p + 1) * S / P;
      const char* pf[NPF];  // the pair's streams, the last repeated
      for (int k = 0; k < NPF; ++k) pf[k] = s1 > s0 ? next.ptr[std::min(s0 + k, s1 - 1)] : nullptr;
      const int64_t lines = s1 > s0 ? (next.bytes[s0] + 63) / 64 : 0;
      if (bj == bi)
        block_pairs<A, true, NPF>(xa, xa, nvec, tail, blk, pf, lines);
      else
        block_pairs<A, false, NPF>(xa, xb, nvec, tail, blk, pf, lines);
      for (int i = 0; i < kBlock; ++i)
        for (int j = bj == bi ? i : 0; j < kBlock; ++j) {
          const int64_t a = bi * kBlock + i, b = bj * kBlock + j;
          if (b < R) upper[a * R + b] += blk[i * kBlock + j];
        }
    }
  }
}

// Per-group Gramians of R rows given by `src` over the consecutive column groups whose offsets
// are `off` (k + 1 entries, off[k] = n; a group may span several of the source's blocks, whose
// offsets are `src.off`): out[g * R * R + a * R + b], float64, symmetric. `out`
// must hold k * R * R zeros.
template <typename Src>
void gram_groups(const Src& src, int64_t R, const std::vector<int64_t>& off, double* out) {
  using A = typename Src::A;
  const int64_t k = static_cast<int64_t>(off.size()) - 1, n = off.back(), RR = R * R;
  if (R == 0 || n == 0) return;
  const int64_t chunk = chunk_cols(R, n);
  // rows that fit in L2 are read from the caches after the first call: no prefetches then, each
  // would cost an issue slot and bring nothing
  const bool in_cache = R * n * static_cast<int64_t>(sizeof(A)) <= kInCacheBytes;
  const int64_t tasks = (n + chunk - 1) / chunk, TW = tile_cols<A>(R, Src::kStaged);
  const int64_t nb = (R + kBlock - 1) / kBlock, pairs = nb * (nb + 1) / 2;  // block pairs per tile
  // a group cut by a chunk border leaves a partial in its chunk's slot 0 (first segment) or 1
  // (written before they are read, as their tags say: left uninitialized)
  const std::unique_ptr<double[]> slots(new double[static_cast<size_t>(tasks * 2 * RR)]);
  std::vector<int64_t> tags(static_cast<size_t>(tasks * 2), -1);
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    // (the staging tile, for rows converted or computed on the fly only, is written before it is
    // read: left uninitialized, since zeroing it -- or allocating it for rows read in place: a
    // fresh mapping from the OS past 128 KiB -- would cost more than a small call's multiply-adds;
    // the zero row is read only when R is not a multiple of the block)
    const std::unique_ptr<A[]> stage(Src::kStaged ? new A[static_cast<size_t>(R * TW)] : nullptr);
    const std::vector<A> zero(static_cast<size_t>(R % kBlock ? TW : 0), A(0));
    std::vector<const A*> x(static_cast<size_t>(R));
    std::vector<double> acc(static_cast<size_t>(RR));
    Streams next;  // a row source reads at most 2 streams per row
    next.ptr.resize(static_cast<size_t>(2 * R));
    next.bytes.resize(static_cast<size_t>(2 * R));
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t c0 = t * chunk, c1 = std::min(n, c0 + chunk);
      for_each_segment(off, c0, c1, [&](int64_t g, int64_t s0, int64_t s1) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for_each_segment(src.off, s0, s1, [&](int64_t b, int64_t q0, int64_t q1) {  // the block pieces
          for (int64_t p = q0, len = 0; p < q1; p += len) {
            // (rows read in place end with a partial vector when len is not a multiple of L)
            len = std::min(TW, q1 - p);
            const int64_t padded = src.tile(R, b, p, len, x.data(), stage.get(), TW);
            // prefetch the next tile of this block (which may lie in the next chunk, most often
            // this thread's) while this one is multiplied; not for a single block of rows read in
            // place, whose few streams the hardware prefetcher follows better
            next.count = 0;
            const int64_t ahead = std::min(TW, src.off[b + 1] - (p + len));
            if (!in_cache && (R > kBlock || Src::kStaged) && ahead > 0) src.streams(R, b, p + len, ahead, next);
            // 2, 4 or 8 prefetches per vector, the fewest that cover the streams: each costs an
            // issue slot (a pair with one stream prefetches it twice, which measured faster than
            // once)
            if (next.count <= 2 * pairs)
              tile_pairs<A, 2>(x.data(), R, padded, zero.data(), acc.data(), next);
            else if (next.count <= 4 * pairs)
              tile_pairs<A, 4>(x.data(), R, padded, zero.data(), acc.data(), next);
            else
              tile_pairs<A, 8>(x.data(), R, padded, zero.data(), acc.data(), next);
          }
        });
        double* dst = out + g * RR;
        if (s0 != off[g] || s1 != off[g + 1]) {  // cut: at most the first and the last segment
          const int64_t slot = 2 * t + (s0 == c0 ? 0 : 1);
          tags[slot] = g;
          dst = slots.get() + slot * RR;
        }
        for (int64_t a = 0; a < R; ++a)
          for (int64_t b = a; b < R; ++b) dst[a * R + b] = acc[a * R + b];
      });
    }
  });
  for (int64_t slot = 0; slot < 2 * tasks; ++slot) {  // chunk order: a fixed summation order
    if (tags[slot] < 0) continue;
    double* dst = out + tags[slot] * RR;
    const double* p = slots.get() + slot * RR;
    for (int64_t a = 0; a < R; ++a)
      for (int64_t b = a; b < R; ++b) dst[a * R + b] += p[a * R + b];
  }
  at::parallel_for(0, k, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g)
      for (int64_t a = 0; a < R; ++a)
        for (int64_t b = a + 1; b < R; ++b) out[g * RR + b * R + a] = out[g * RR + a * R + b];
  });
}

}  // namespace fusedjd::cpu
