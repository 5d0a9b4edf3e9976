// Reading a Jacobian given as column blocks (common.h's Blocks) tile by tile: the rows of a tile
// in place or converted into a staging buffer, the memory streams of the next tile (for the
// engine's prefetches), and the walk over the parts of column groups inside a column range.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "simd.h"

namespace fusedjd::cpu {

inline constexpr int64_t kPrefetchBytes = 4096;  // how far ahead converted rows are prefetched

// The memory streams (byte ranges) of the next tile, which the block pairs of the current tile
// prefetch while they multiply: the next tile's reads from memory then overlap this tile's
// multiply-adds, where the hardware prefetcher alone leaves the first block row of each tile
// waiting on memory and the other rows on the multiply-adds, one after the other.
struct Streams {
  std::vector<const char*> ptr;
  std::vector<int64_t> bytes;
  int64_t count = 0;
};

// Rows of a matrix given as column blocks (each with its row stride and unit column stride:
// common.h's Blocks), converted to the element type when needed.
template <typename T>
struct BlockRows {
  using A = elem_t<T>;
  static constexpr bool kStaged = !std::is_same_v<T, A>;
  std::vector<const T*> base;  // per block
  std::vector<int64_t> ld;     // per block
  const std::vector<int64_t>& off;  // the B + 1 block offsets: the pieces the engine cuts tiles at

  explicit BlockRows(const Blocks& B) : off(B.off) {
    for (const at::Tensor& x : B.J) {
      base.push_back(x.data_ptr<T>());
      ld.push_back(x.stride(0));
    }
  }

  // The memory the tile of the columns [c0, c0 + len) (inside block b) reads: R rows, added to
  // `st` (which has room for them).
  void streams(int64_t R, int64_t b, int64_t c0, int64_t len, Streams& st) const {
    const T* first = base[b] + (c0 - off[b]);
    for (int64_t r = 0; r < R; ++r, ++st.count) {
      st.ptr[st.count] = reinterpret_cast<const char*>(first + r * ld[b]);
      st.bytes[st.count] = len * static_cast<int64_t>(sizeof(T));
    }
  }

  // Points x[r] at the columns [c0, c0 + len) (inside block b) of row r and returns how many
  // values the engine reads there: in place, len (the engine reads a ragged end as a partial
  // vector), when the rows are of the lane type; else converted into `stage` (row r at
  // stage + r * stride), len rounded up to the lane count with zeros after len.
  int64_t tile(int64_t R, int64_t b, int64_t c0, int64_t len, const A** x, A* stage, int64_t stride) const {
    constexpr int L = Simd<A>::L;
    const int64_t padded = (len + L - 1) / L * L;
    const T* first = base[b] + (c0 - off[b]);
    if constexpr (std::is_same_v<T, A>) {
      for (int64_t r = 0; r < R; ++r) x[r] = first + r * ld[b];
      return len;
    }
    // the rows advance together, a few cache lines at a time, so that every row's memory stream
    // stays in flight (row after row, each 4 KiB page would restart the prefetcher)
    constexpr int64_t kStep = 256;
    for (int64_t s = 0; s < len; s += kStep)
      for (int64_t r = 0; r < R; ++r) {
        const T* src = first + r * ld[b] + s;
        for (int64_t p = 0; p < kStep * static_cast<int64_t>(sizeof(T)); p += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(src) + kPrefetchBytes + p);
        convert_row(src, stage + r * stride + s, std::min(kStep, len - s));
      }
    for (int64_t r = 0; r < R; ++r) {
      A* dst = stage + r * stride;
      for (int64_t c = len; c < padded; ++c) dst[c] = A(0);
      x[r] = dst;
    }
    return padded;
  }
};

// Calls fn(g, s0, s1) for each non-empty part [s0, s1) of a column group g inside the columns
// [c0, c1), in column order (`off`: the k + 1 group offsets).
template <typename Fn>
inline void for_each_segment(const std::vector<int64_t>& off, int64_t c0, int64_t c1, Fn fn) {
  int64_t g = std::upper_bound(off.begin(), off.end(), c0) - off.begin() - 1;  // the group holding c0
  for (int64_t s0 = c0; s0 < c1; ++g) {
    const int64_t s1 = std::min(c1, off[g + 1]);
    if (s1 <= s0) continue;  // empty group
    fn(g, s0, s1);
    s0 = s1;
  }
}

}  // namespace fusedjd::cpu
