// The streaming Gramian engine (gram_engine.cuh).
//
// The columns are split into work items (enough to fill the GPU; each inside one block of the
// list and one column group: cuda_common.cuh's WorkTable); the row pairs into tiles.
// One block takes one (item, tile): each thread keeps the tile's pair sums in registers while it
// streams its columns (packed loads on the diagonal tiles in every block whose rows share an
// alignment, from the block's first aligned column: 16 bytes a row up to 8 rows (8 for 2-byte
// types at 8 rows), 8 bytes a row at 16 rows; scalar head and tail), the block reduces them into the tile's slots of `partial`, and a second kernel sums the
// partials of each group in a fixed order (deterministic). Blocks are numbered tile-fastest, so
// the tiles over the same columns run side by side and a row's second read comes from L2.
//
// Tiles: up to BASE rows (16; 8 for float64), one diagonal tile. Beyond, diagonal tiles of BASE
// rows and off-diagonal tiles of BASE x 2*OFFB rows (OFFB = 8). An off-diagonal tile's columns
// are shared by two neighbouring lanes: both load the tile's BASE `a` rows of the column (same
// address in one warp: one transaction) and each its own OFFB `b` rows, so a thread keeps
// BASE x OFFB sums in registers while the tile reads each of its rows once.
// Row reads per column over the rows, i.e. reads of J through L2 (the tiles of one item run
// side by side, so DRAM should see about one read; scripts/gpu_run.sh measures it on a GPU):
//   float32/16/bf16: m <= 16: 1;  17 <= m <= 32: 2;  m = 33: 3;  m = 64: 4;  m = 128: 8
//   float64:         m <= 8: 1;   m = 16: 2;  m = 17: 2.53;  m = 24: 2.67;  m = 32: 3.5;  m = 64: 6.5
// (float64 keeps 8-row diagonal tiles: a 16-row one would need 136 double sums per thread; MoCo's
// first pass, which forms each updated row value from Y and J, takes float64's tiles too.)
// `partial` holds exactly the tiles' slots: sum over tiles of rows_a x rows_b, per work item.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common.h"
#include "../moco.h"
#include "gram_engine.cuh"

namespace fusedjd::cuda {
namespace {

constexpr int kGramThreads = 256;
constexpr int kGramWarps = kGramThreads / kWarp;
constexpr int kMaxTiles = 80;  // covers up to 128 rows in tiles of 8 (MoCo's first pass)

// Rows [a0, a0 + na) x [b0, b0 + nb); its slots in `partial` start at slot0.
struct Tile {
  int a0, b0, na, nb;
  int slot0;
  int diag;
};
struct TileList {
  Tile t[kMaxTiles];
};

inline int64_t max_rows(at::ScalarType t) { return t == at::kDouble ? 64 : 128; }

// The rows a work item reads, at its columns (counted in its block): row r at a + r * lda. With
// UPD (MoCo's first pass), row r is Y_r + b (J_r - Y_r) with Y_r at `a` and J_r at b + r * ldb.
struct Rows {
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
};

// The rows of work item `it`: J's block, or (upd.y set) MoCo's Y (row stride n) and J's block.
template <typename T>
__device__ __forceinline__ Rows item_rows(const WorkTable& tab, const Item& it, const Update& upd, int64_t n) {
  const T* blk = block_row<T>(tab, it.block, 0);
  const int64_t ld = tab.ld[it.block];
  if (upd.y != nullptr)  // Y's column gcol + (c - c0) for the block's column c: rows index both by c
    return Rows{static_cast<const T*>(upd.y) + (it.gcol - it.c0), n, blk, ld};
  return Rows{blk, ld, blk, ld};
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const Rows& R, int64_t r) {
  return static_cast<const T*>(R.a) + r * R.lda;
}

// Sum over the lanes of a warp that agree on lane % S, in a fixed order; lanes 0..S-1 hold them.
template <int S, typename T>
__device__ __forceinline__ T lane_class_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o >= S; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The pair sums of one tile over columns [c0, c1), reduced over the block into `partial`. S lanes
// share each column (off-diagonal tiles only): lane class h = lane % S takes b rows
// [h * TB, (h + 1) * TB) of the tile.
// UPD: the rows are MoCo's updated rows at the rate `rate`, computed from Y (pa, pb) and J (the
// same row of R.b).
template <typename T, typename acc_t, int TA, int TB, bool DIAG, int V, int S = 1, bool UPD = false>
__device__ __forceinline__ void tile_partial(const Rows& R, double rate_d, const Tile& tl, int64_t c0, int64_t c1,
                                             int64_t head, int64_t items, int64_t item, acc_t* partial) {
  static_assert(S == 1 || (!DIAG && V == 1), "shared columns are for scalar off-diagonal tiles");
  static_assert(kWarp % S == 0 && kGramThreads % S == 0, "S must divide the warp");
  static_assert(!UPD || V == 1, "updated rows are read with scalar loads");
  using opmath_t = at::opmath_type<T>;
  const int h = static_cast<int>(threadIdx.x % S);
  const T* pa[TA];
  const T* pb[TB];
  const opmath_t rate = static_cast<opmath_t>(rate_d);
#pragma unroll
  for (int i = 0; i < TA; ++i) pa[i] = i < tl.na ? row_ptr<T>(R, tl.a0 + i) : nullptr;
#pragma unroll
  for (int j = 0; j < TB; ++j) pb[j] = h * TB + j < tl.nb ? row_ptr<T>(R, tl.b0 + h * TB + j) : nullptr;
  // row r's value at column c; in UPD mode J's row r lies at the same offset from R.b as Y's from
  // R.a, recomputed at each load rather than kept in registers
  auto value = [&](const T* p, int64_t r, int64_t c) -> acc_t {
    if constexpr (UPD) {
      return static_cast<acc_t>(moco_row_update(p[c], static_cast<const T*>(R.b)[r * R.ldb + c], rate));
    } else {
      return static_cast<acc_t>(p[c]);
    }
  };

  acc_t acc[TA][TB];
#pragma unroll
  for (int i = 0; i < TA; ++i)
#pragma unroll
    for (int j = 0; j < TB; ++j) acc[i][j] = acc_t(0);

  auto fma_column = [&](const acc_t* xa, const acc_t* xb) {
#pragma unroll
    for (int i = 0; i < TA; ++i)
#pragma unroll
      for (int j = 0; j < TB; ++j)
        if (!DIAG || j >= i) acc[i][j] += xa[i] * xb[j];
  };
  auto scalar_column = [&](int64_t c) {
    acc_t xa[TA], xb[TB];
#pragma unroll
    for (int i = 0; i < TA; ++i) xa[i] = pa[i] ? value(pa[i], tl.a0 + i, c) : acc_t(0);
    if (DIAG) {
#pragma unroll
      for (int j = 0; j < TB; ++j) xb[j] = xa[j < TA ? j : 0];
    } else {
#pragma unroll
      for (int j = 0; j < TB; ++j) xb[j] = pb[j] ? value(pb[j], tl.b0 + h * TB + j, c) : acc_t(0);
    }
    fma_column(xa, xb);
  };

  const int64_t tid = threadIdx.x / S;  // the block's column lane
  constexpr int64_t kLanes = kGramThreads / S;
  if (V > 1) {  // diagonal tiles only (TA == TB); packed from the block's head on (scalar if none)
    int64_t ca = c1, cb = c1;
    packed_split(head, V, c0, c1, &ca, &cb);
    for (int64_t c = c0 + tid; c < ca; c += kGramThreads) scalar_column(c);
    for (int64_t c = cb + tid; c < c1; c += kGramThreads) scalar_column(c);
    for (int64_t c = ca + tid * V; c < cb; c += static_cast<int64_t>(kGramThreads) * V) {
      Pack<T, V> la[TA];
#pragma unroll
      for (int i = 0; i < TA; ++i) {
        if (pa[i]) la[i] = load_pack<V>(pa[i] + c);
        else
#pragma unroll
          for (int v = 0; v < V; ++v) la[i].v[v] = T(0);
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc_t xa[TA];
#pragma unroll
        for (int i = 0; i < TA; ++i) xa[i] = static_cast<acc_t>(la[i].v[v]);
        fma_column(xa, xa);
      }
    }
  } else {
    for (int64_t c = c0 + tid; c < c1; c += kLanes) scalar_column(c);
  }

  constexpr int NB = TB * S;  // b rows of the tile
  __shared__ acc_t red[kGramWarps][TA * NB];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int i = 0; i < TA; ++i)
#pragma unroll
    for (int j = 0; j < TB; ++j) {
      if ((DIAG && j < i) || i >= tl.na || j >= tl.nb) continue;  // the same for the whole block
      const acc_t s = lane_class_sum<S>(acc[i][j]);
      if (lane < S && lane * TB + j < tl.nb) red[warp][i * NB + lane * TB + j] = s;
    }
  __syncthreads();
  for (int s = threadIdx.x; s < tl.na * tl.nb; s += kGramThreads) {
    const int i = s / tl.nb, j = s % tl.nb;
    if (DIAG && j < i) continue;
    acc_t tot = acc_t(0);
    for (int w = 0; w < kGramWarps; ++w) tot += red[w][i * NB + j];
    partial[(static_cast<int64_t>(tl.slot0) + s) * items + item] = tot;
  }
}

// One block per (item, tile), tile-fastest. TO = 0: diagonal tiles only, else off-diagonal tiles
// of TD x 2*TO rows; VD: pack width of the diagonal tiles (1: scalar loads).
template <typename T, typename acc_t, int TD, int TO, int VD, bool UPD>
__global__ void __launch_bounds__(kGramThreads)
    gram_partial_kernel(WorkTable tab, Update upd, int64_t n, TileList tiles, int ntiles, acc_t* partial) {
  const int64_t bid = blockIdx.x;
  const Tile tl = tiles.t[bid % ntiles];
  const int64_t item = bid / ntiles;
  const Item it = locate_item(tab, item);
  const Rows R = item_rows<T>(tab, it, upd, n);
  double rate = 0.0;  // MoCo's b = beta / (step + 1)^beta_sigma, from the device step counter
  if constexpr (UPD) {
    double unused = 0.0;
    moco_rates(*upd.step + 1, upd.beta, upd.beta_sigma, 0.0, 0.0, &rate, &unused);
  }
  if constexpr (TO > 0) {
    if (!tl.diag) {
      tile_partial<T, acc_t, TD, TO, false, 1, 2, UPD>(R, rate, tl, it.c0, it.c1, -1, tab.items, item, partial);
      return;
    }
  }
  tile_partial<T, acc_t, TD, TD, true, VD, 1, UPD>(R, rate, tl, it.c0, it.c1, VD > 1 ? tab.head[it.block] : -1,
                                                   tab.items, item, partial);
}

// One warp per (group, a <= b): ordered sum of the group's partials, mirrored.
template <typename acc_t>
__global__ void gram_finalize_kernel(const acc_t* partial, WorkTable tab, int64_t k, int64_t rows, TileList tiles,
                                     int ntiles, acc_t* out) {
  const int64_t npairs = rows * (rows + 1) / 2;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (w >= k * npairs) return;  // whole warps leave together
  const int64_t g = w / npairs;
  int64_t rem = w % npairs, a = 0;
  while (rem >= rows - a) { rem -= rows - a; ++a; }
  const int64_t b = a + rem;
  int t = 0;
  for (; t < ntiles; ++t) {
    const Tile tl = tiles.t[t];
    if (a >= tl.a0 && a < tl.a0 + tl.na && b >= tl.b0 && b < tl.b0 + tl.nb) break;
  }
  const Tile tl = tiles.t[t];
  const int64_t slot = tl.slot0 + (a - tl.a0) * tl.nb + (b - tl.b0);
  const int64_t* item_off = tab.group_item_off;
  acc_t s = acc_t(0);
  for (int64_t it = item_off[g] + lane; it < item_off[g + 1]; it += kWarp) s += partial[slot * tab.items + it];
  s = warp_sum(s);
  if (lane == 0) {
    out[(g * rows + a) * rows + b] = s;
    out[(g * rows + b) * rows + a] = s;
  }
}

struct Plan {
  WorkTable tab;
  Update upd;
  int64_t n;
  TileList tiles;
  int ntiles;
};

// UPD (MoCo's updated rows) runs in tiles of at most 8 rows: a 16-row tile of updated rows
// spills (ptxas: 80-96 bytes at 255 registers). Packs, and what ptxas (nvcc 13.0, sm_90) reports:
//   4 rows:  16-byte packs, 48-60 registers: 4 blocks of 256 threads per SM, 64 B in flight per
//            thread: 64 KB per SM;
//   8 rows:  16-byte packs (8-byte for 2-byte types: 16-byte ones spill 16 bytes in bfloat16),
//            112-128 registers: 2 blocks per SM, 64-128 B per thread: 32-64 KB per SM;
//   16 rows: 8-byte packs, 216-248 registers: 1 block per SM, 128 B per thread: 32 KB per SM
//            (scalar loads, as before: 16 KB, about 3 TB/s by Little's law at ~700 ns).
template <typename T, typename acc_t, int TD, int TO>
void run_tiles(const Plan& p, acc_t* partial) {
  constexpr int V = (TD == 16 || (TD == 8 && sizeof(T) == 2) ? 8 : 16) / static_cast<int>(sizeof(T));
  const dim3 grid(static_cast<unsigned>(p.tab.items * p.ntiles));
  auto go = [&](auto kernel) {
    launch("gram_partial_kernel", kernel, grid, kGramThreads, 0, p.tab, p.upd, p.n, p.tiles, p.ntiles, partial);
  };
  if constexpr (TD <= 8) {
    if (p.upd.y != nullptr) {  // MoCo's updated rows: scalar loads
      go(gram_partial_kernel<T, acc_t, TD, TO, 1, true>);
      return;
    }
  }
  TORCH_CHECK(p.upd.y == nullptr, "fusedjd: internal error: MoCo's first pass in tiles of ", TD, " rows");
  if constexpr (TO == 0) {  // packed loads in the blocks whose rows allow them
    go(gram_partial_kernel<T, acc_t, TD, TO, V, false>);
    return;
  }
  go(gram_partial_kernel<T, acc_t, TD, TO, 1, false>);
}

template <typename T>
at::Tensor gram_blocks_impl(const Blocks& B, const std::vector<int64_t>& group_off, const Update& upd) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t k = static_cast<int64_t>(group_off.size()) - 1, rows = B.m, n = B.n;
  const auto acc_type = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  // every entry is written by gram_finalize_kernel (a group without columns sums no partial): no fill
  at::Tensor out = at::empty({k, rows, rows}, at::TensorOptions().dtype(acc_type).device(B.device));
  if (rows == 0 || n == 0) return out.zero_();

  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t target_items = 4 * static_cast<int64_t>(sm_count());
  int64_t chunk = (n + target_items - 1) / target_items;
  chunk = std::min<int64_t>(65536, std::max<int64_t>(1024, (chunk + kGramThreads * V - 1) / (kGramThreads * V) *
                                                               (kGramThreads * V)));
  Plan p{};
  at::Tensor table;
  p.tab = work_table(B, group_off, chunk, &table);
  p.upd = upd;
  p.n = n;
  if (p.tab.items == 0) return out.zero_();

  // Diagonal tiles of BASE rows, off-diagonal tiles of BASE x 2*OFFB rows (two lanes per
  // column, BASE x OFFB sums each): float64 and MoCo's updated rows use smaller tiles so that the
  // register sums do not spill.
  const bool small_tiles = std::is_same_v<T, double> || upd.y != nullptr;
  const int BASE = small_tiles ? 8 : 16;
  constexpr int OFFB = 8;
  int slots = 0;
  auto add = [&](int a0, int b0, int na, int nb, bool diag) {
    p.tiles.t[p.ntiles++] = Tile{a0, b0, na, nb, slots, diag ? 1 : 0};
    slots += na * nb;
  };
  const int r = static_cast<int>(rows);
  if (r <= BASE) {
    add(0, 0, r, r, true);
  } else {
    const int nblk = (r + BASE - 1) / BASE;
    for (int t = 0; t < nblk; ++t) add(BASE * t, BASE * t, std::min(BASE, r - BASE * t), std::min(BASE, r - BASE * t), true);
    for (int ta = 0; ta < nblk; ++ta)
      for (int sub = BASE * (ta + 1); sub < r; sub += 2 * OFFB)
        add(BASE * ta, sub, BASE, std::min(2 * OFFB, r - sub), false);
  }
  at::Tensor partial = at::empty({static_cast<int64_t>(slots) * p.tab.items}, at::TensorOptions().dtype(acc_type).device(B.device));
  acc_t* part = partial.data_ptr<acc_t>();
  if (rows <= 4) run_tiles<T, acc_t, 4, 0>(p, part);
  else if (rows <= 8) run_tiles<T, acc_t, 8, 0>(p, part);
  else if (small_tiles) run_tiles<T, acc_t, 8, OFFB>(p, part);
  else if constexpr (!std::is_same_v<T, double>) {
    if (rows <= 16) run_tiles<T, acc_t, 16, 0>(p, part);
    else run_tiles<T, acc_t, 16, OFFB>(p, part);
  }
  const int64_t warps = k * rows * (rows + 1) / 2;
  const int64_t blocks = (warps * kWarp + kGramThreads - 1) / kGramThreads;
  launch("gram_finalize_kernel", gram_finalize_kernel<acc_t>, dim3(static_cast<unsigned>(blocks)), kGramThreads, 0,
         part, p.tab, k, rows, p.tiles, p.ntiles, out.data_ptr<acc_t>());
  return out;
}

}  // namespace

int64_t gram_rows_max(at::ScalarType dtype) { return max_rows(dtype); }

at::Tensor gram_blocks(const Blocks& B, const std::vector<int64_t>& group_off, const Update* upd) {
  TORCH_CHECK(B.m <= gram_rows_max(B.dtype), "fusedjd: the CUDA Gramian kernel takes at most ", gram_rows_max(B.dtype),
              " rows of ", B.dtype, ", got ", B.m);
  const Update none{nullptr, nullptr, 0.0, 0.0};
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_gram_blocks_cuda", [&] {
    out = gram_blocks_impl<scalar_t>(B, group_off, upd != nullptr ? *upd : none);
  });
  return out;
}

}  // namespace fusedjd::cuda
