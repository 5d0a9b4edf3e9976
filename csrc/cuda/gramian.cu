// CUDA kernels of the matrix family: grouped Gramian (also MoCo's first pass) and the
// grouped combination of rows.
//
// Gramian of a short, very wide J: the columns are split into work items (one block each,
// enough of them to fill the GPU); each thread keeps a tile of row-pair sums in registers
// while it streams its columns (packed 16-byte loads where the rows are aligned), the block
// reduces them into a per-item partial, and a second kernel sums the partials of each
// group in a fixed order (deterministic). m <= 16 is one diagonal tile: J is read once.
// Larger m is covered by 16-row diagonal tiles and 16 x 8 off-diagonal tiles.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "../common.h"
#include "cuda_common.cuh"

namespace fusedjd::cuda {

int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev] = v;
  return v;
}

at::Tensor group_table(at::IntArrayRef group_sizes, int64_t chunk, const at::Device& device, int64_t* items) {
  using Key = std::tuple<int, int64_t, std::vector<int64_t>>;
  struct Entry {
    at::Tensor host, dev;
    int64_t items;
  };
  static std::mutex mu;
  static std::map<Key, Entry> cache;
  Key key{device.index(), chunk, group_sizes.vec()};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) {
    *items = it->second.items;
    return it->second.dev;
  }
  if (cache.size() >= 256) cache.clear();  // a run uses a handful of groupings
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::Tensor host = at::empty({2 * (k + 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  h[0] = 0;
  h[k + 1] = 0;
  for (int64_t g = 0; g < k; ++g) {
    h[g + 1] = h[g] + group_sizes[g];
    h[k + 2 + g] = h[k + 1 + g] + (group_sizes[g] + chunk - 1) / chunk;
  }
  at::Tensor dev = at::empty({2 * (k + 1)}, at::TensorOptions().dtype(at::kLong).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  *items = h[2 * k + 1];
  cache.emplace(key, Entry{host, dev, *items});
  return dev;
}

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kSlot = 16;          // partial slots per tile: kSlot x kSlot
constexpr int kMaxTiles = 64;      // covers up to 128 rows
// Rows the tiled kernel takes (its tile list fits kMaxTiles); beyond, cuBLAS.
inline int64_t max_rows(at::ScalarType t) { return t == at::kDouble ? 64 : 128; }

struct Tile {
  int a0, b0;
};
struct TileList {
  Tile t[kMaxTiles];
};

template <typename T>
__device__ __forceinline__ const T* row_ptr(const Rows& R, int64_t r) {
  return r < R.split ? static_cast<const T*>(R.a) + r * R.lda : static_cast<const T*>(R.b) + (r - R.split) * R.ldb;
}

// Locates the work item: its group g and column range [c0, c1).
__device__ __forceinline__ void locate(const int64_t* table, int64_t k, int64_t chunk, int64_t item, int64_t* c0,
                                       int64_t* c1) {
  const int64_t* col_off = table;
  const int64_t* item_off = table + k + 1;
  int64_t lo = 0, hi = k;  // largest g with item_off[g] <= item (a non-empty group)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (item_off[mid] <= item) lo = mid; else hi = mid;
  }
  *c0 = col_off[lo] + (item - item_off[lo]) * chunk;
  *c1 = min(col_off[lo + 1], *c0 + chunk);
}

template <typename T, typename acc_t, int TA, int TB, bool DIAG, int V>
__global__ void __launch_bounds__(kThreads) gram_partial_kernel(Rows R, int64_t rows, const int64_t* table, int64_t k,
                                                                int64_t chunk, int64_t items, TileList tiles,
                                                                int tile_base, acc_t* partial) {
  const int64_t item = blockIdx.x;
  const int tix = tile_base + static_cast<int>(blockIdx.y);
  const Tile tl = tiles.t[tix];
  int64_t c0, c1;
  locate(table, k, chunk, item, &c0, &c1);

  const T* pa[TA];
  const T* pb[TB];
#pragma unroll
  for (int i = 0; i < TA; ++i) pa[i] = (tl.a0 + i < rows) ? row_ptr<T>(R, tl.a0 + i) : nullptr;
#pragma unroll
  for (int j = 0; j < TB; ++j) pb[j] = (tl.b0 + j < rows) ? row_ptr<T>(R, tl.b0 + j) : nullptr;

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
    for (int i = 0; i < TA; ++i) xa[i] = pa[i] ? static_cast<acc_t>(pa[i][c]) : acc_t(0);
    if (DIAG) {
#pragma unroll
      for (int j = 0; j < TB; ++j) xb[j] = xa[j < TA ? j : 0];
    } else {
#pragma unroll
      for (int j = 0; j < TB; ++j) xb[j] = pb[j] ? static_cast<acc_t>(pb[j][c]) : acc_t(0);
    }
    fma_column(xa, xb);
  };

  const int64_t tid = threadIdx.x;
  if (V > 1) {
    const int64_t ca = min(c1, (c0 + V - 1) / V * V);
    const int64_t cb = max(ca, c1 / V * V);
    for (int64_t c = c0 + tid; c < ca; c += kThreads) scalar_column(c);
    for (int64_t c = cb + tid; c < c1; c += kThreads) scalar_column(c);
    for (int64_t c = ca + tid * V; c < cb; c += static_cast<int64_t>(kThreads) * V) {
      Pack<T, V> la[TA];
#pragma unroll
      for (int i = 0; i < TA; ++i) {
        if (pa[i]) la[i] = *reinterpret_cast<const Pack<T, V>*>(pa[i] + c);
        else
#pragma unroll
          for (int v = 0; v < V; ++v) la[i].v[v] = T(0);
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc_t xa[TA];
#pragma unroll
        for (int i = 0; i < TA; ++i) xa[i] = static_cast<acc_t>(la[i].v[v]);
        fma_column(xa, xa);  // V > 1 is only used for diagonal tiles (TA == TB)
      }
    }
  } else {
    for (int64_t c = c0 + tid; c < c1; c += kThreads) scalar_column(c);
  }

  __shared__ acc_t red[kWarps][TA * TB];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int i = 0; i < TA; ++i)
#pragma unroll
    for (int j = 0; j < TB; ++j) {
      if (DIAG && j < i) continue;
      const acc_t s = warp_sum(acc[i][j]);
      if (lane == 0) red[warp][i * TB + j] = s;
    }
  __syncthreads();
  for (int s = threadIdx.x; s < TA * TB; s += kThreads) {
    const int i = s / TB, j = s % TB;
    if (DIAG && j < i) continue;
    acc_t tot = acc_t(0);
    for (int w = 0; w < kWarps; ++w) tot += red[w][s];
    partial[(static_cast<int64_t>(tix) * kSlot * kSlot + i * kSlot + j) * items + item] = tot;
  }
}

// One warp per (group, a <= b): ordered sum of the group's partials, mirrored.
template <typename acc_t>
__global__ void gram_finalize_kernel(const acc_t* partial, int64_t items, const int64_t* table, int64_t k,
                                     int64_t rows, TileList tiles, int ntiles, int tile_a, int tile_b, acc_t* out) {
  const int64_t npairs = rows * (rows + 1) / 2;
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (w >= k * npairs) return;
  const int64_t g = w / npairs;
  int64_t rem = w % npairs, a = 0;
  while (rem >= rows - a) { rem -= rows - a; ++a; }
  const int64_t b = a + rem;
  // the tile holding (a, b): diagonal tiles are tile_a x tile_a, off-diagonal tile_a x tile_b
  int t = 0;
  for (; t < ntiles; ++t) {
    const Tile tl = tiles.t[t];
    const int nb = (tl.a0 == tl.b0) ? tile_a : tile_b;
    if (a >= tl.a0 && a < tl.a0 + tile_a && b >= tl.b0 && b < tl.b0 + nb) break;
  }
  const int64_t slot = static_cast<int64_t>(t) * kSlot * kSlot + (a - tiles.t[t].a0) * kSlot + (b - tiles.t[t].b0);
  const int64_t* item_off = table + k + 1;
  acc_t s = acc_t(0);
  for (int64_t it = item_off[g] + lane; it < item_off[g + 1]; it += kWarp) s += partial[slot * items + it];
  s = warp_sum(s);
  if (lane == 0) {
    out[(g * rows + a) * rows + b] = s;
    out[(g * rows + b) * rows + a] = s;
  }
}

template <typename T, typename acc_t, int TA, int TB, bool DIAG, int V>
void launch_partial(const Rows& R, int64_t rows, const int64_t* table, int64_t k, int64_t chunk, int64_t items,
                    const TileList& tiles, int tile_base, int ntiles, acc_t* partial) {
  const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(ntiles));
  gram_partial_kernel<T, acc_t, TA, TB, DIAG, V><<<grid, kThreads, 0, stream()>>>(R, rows, table, k, chunk, items,
                                                                                   tiles, tile_base, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename acc_t, int TD>
void launch_diag(const Rows& R, bool aligned, int64_t rows, const int64_t* table, int64_t k, int64_t chunk,
                 int64_t items, const TileList& tiles, acc_t* partial) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (TD <= 8 && aligned) launch_partial<T, acc_t, TD, TD, true, V>(R, rows, table, k, chunk, items, tiles, 0, 1, partial);
  else launch_partial<T, acc_t, TD, TD, true, 1>(R, rows, table, k, chunk, items, tiles, 0, 1, partial);
}

template <typename T>
at::Tensor gram_rows_impl(const Rows& R, int64_t rows, at::IntArrayRef group_sizes, int64_t n,
                          const at::Device& device) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  const auto acc_type = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({k, rows, rows}, at::TensorOptions().dtype(acc_type).device(device));
  if (rows == 0 || n == 0) return out;

  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int64_t target_items = 4 * static_cast<int64_t>(sm_count());
  int64_t chunk = (n + target_items - 1) / target_items;
  chunk = std::min<int64_t>(65536, std::max<int64_t>(1024, (chunk + kThreads * V - 1) / (kThreads * V) * (kThreads * V)));
  int64_t items = 0;
  const at::Tensor table = group_table(group_sizes, chunk, device, &items);
  if (items == 0) return out;

  // Diagonal tiles of BASE rows, off-diagonal tiles of BASE x OFFB rows: float64 uses
  // smaller tiles so that the register sums do not spill.
  constexpr int BASE = std::is_same_v<T, double> ? 8 : 16;
  constexpr int OFFB = 8;
  TileList tiles{};
  int ndiag = 0, noff = 0, tile_a = 0, tile_b = 0;
  if (rows <= BASE) {
    tile_a = tile_b = rows <= 4 ? 4 : (rows <= 8 ? 8 : 16);
    tiles.t[0] = {0, 0};
    ndiag = 1;
  } else {
    tile_a = BASE;
    tile_b = OFFB;
    const int R = static_cast<int>((rows + BASE - 1) / BASE);
    for (int r = 0; r < R; ++r) tiles.t[ndiag++] = {BASE * r, BASE * r};
    for (int ta = 0; ta < R; ++ta)
      for (int tb = ta + 1; tb < R; ++tb)
        for (int sub = 0; sub < BASE; sub += OFFB)
          if (BASE * tb + sub < rows) tiles.t[ndiag + noff++] = {BASE * ta, BASE * tb + sub};
  }
  const int ntiles = ndiag + noff;
  at::Tensor partial = at::empty({static_cast<int64_t>(ntiles) * kSlot * kSlot * items},
                                 at::TensorOptions().dtype(acc_type).device(device));
  acc_t* p = partial.data_ptr<acc_t>();
  const int64_t* tab = table.data_ptr<int64_t>();
  // packed loads need every row start aligned to 16 bytes
  const bool aligned = reinterpret_cast<uintptr_t>(R.a) % 16 == 0 && reinterpret_cast<uintptr_t>(R.b) % 16 == 0 &&
                       (R.lda * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                       (R.ldb * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  if (rows <= 4) launch_diag<T, acc_t, 4>(R, aligned, rows, tab, k, chunk, items, tiles, p);
  else if (rows <= 8) launch_diag<T, acc_t, 8>(R, aligned, rows, tab, k, chunk, items, tiles, p);
  else if (rows <= BASE) launch_diag<T, acc_t, BASE>(R, aligned, rows, tab, k, chunk, items, tiles, p);
  else {
    launch_partial<T, acc_t, BASE, BASE, true, 1>(R, rows, tab, k, chunk, items, tiles, 0, ndiag, p);
    if (noff > 0) launch_partial<T, acc_t, BASE, OFFB, false, 1>(R, rows, tab, k, chunk, items, tiles, ndiag, noff, p);
  }
  const int64_t warps = k * rows * (rows + 1) / 2;
  const int64_t blocks = (warps * kWarp + kThreads - 1) / kThreads;
  gram_finalize_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream()>>>(
      p, items, tab, k, rows, tiles, ntiles, tile_a, tile_b, out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

int64_t gram_rows_max(at::ScalarType dtype) { return max_rows(dtype); }

at::Tensor gram_rows(const Rows& R, int64_t rows, at::IntArrayRef group_sizes, int64_t n, at::ScalarType dtype,
                     const at::Device& device) {
  TORCH_CHECK(rows <= gram_rows_max(dtype), "fusedjd: the CUDA Gramian kernel takes at most ", gram_rows_max(dtype),
              " rows of ", dtype, ", got ", rows);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedjd_gram_rows_cuda", [&] {
    out = gram_rows_impl<scalar_t>(R, rows, group_sizes, n, device);
  });
  return out;
}

namespace {

at::Tensor gramian_cuda(const at::Tensor& J, at::IntArrayRef group_sizes) {
  FUSEDJD_CHECK_DIM(J, 2);
  FUSEDJD_CHECK_FLOAT(J);
  const c10::cuda::CUDAGuard guard(J.device());
  const int64_t m = J.size(0), n = J.size(1);
  const std::vector<int64_t> off = group_offsets(group_sizes, n);
  const at::Tensor Jc = unit_col_stride(J);
  if (m > gram_rows_max(J.scalar_type())) {  // tall J: cuBLAS per group, in the accumulation dtype
    const int64_t k = static_cast<int64_t>(group_sizes.size());
    at::Tensor out = at::zeros({k, m, m}, J.options().dtype(acc_dtype(J.scalar_type())));
    for (int64_t g = 0; g < k; ++g) {
      const at::Tensor Jg = Jc.narrow(1, off[g], off[g + 1] - off[g]).to(out.scalar_type());
      at::Tensor og = out.select(0, g);
      at::mm_out(og, Jg, Jg.t());
    }
    return out;
  }
  const Rows R{Jc.data_ptr(), Jc.stride(0), Jc.data_ptr(), Jc.stride(0), m};
  return gram_rows(R, m, group_sizes, n, Jc.scalar_type(), J.device());
}

template <typename T, typename opmath_t, int V>
__global__ void combine_kernel(const T* J, int64_t ld, int64_t m, int64_t n, const double* W, const int64_t* col_off,
                               int64_t k, bool packed, T* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; c < n; c += stride) {
    const int nv = static_cast<int>((n - c < V ? n - c : static_cast<int64_t>(V)));
    int64_t lo = 0, hi = k;  // group of column c: largest g with col_off[g] <= c
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (col_off[mid] <= c) lo = mid; else hi = mid;
    }
    int64_t gv[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      while (lo + 1 < k && col_off[lo + 1] <= c + v) ++lo;
      gv[v] = lo;
    }
    opmath_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = opmath_t(0);
    for (int64_t i = 0; i < m; ++i) {
      const T* row = J + i * ld + c;
      T x[V];
      if (packed && nv == V) {
        const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(row);
#pragma unroll
        for (int v = 0; v < V; ++v) x[v] = p.v[v];
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) x[v] = v < nv ? row[v] : T(0);
      }
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += static_cast<opmath_t>(W[gv[v] * m + i]) * static_cast<opmath_t>(x[v]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (v < nv) out[c + v] = static_cast<T>(acc[v]);
  }
}

at::Tensor combine_cuda(const at::Tensor& J, const at::Tensor& weights, at::IntArrayRef group_sizes) {
  check_combine_args(J, weights, group_sizes);
  const c10::cuda::CUDAGuard guard(J.device());
  const int64_t m = J.size(0), n = J.size(1);
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::Tensor out = at::empty({n}, J.options());
  if (n == 0) return out;
  if (m == 0) return out.zero_();
  const at::Tensor Jc = unit_col_stride(J);
  const at::Tensor W = weights.to(at::kDouble).contiguous();
  int64_t items = 0;
  const at::Tensor table = group_table(group_sizes, /*chunk=*/1 << 30, J.device(), &items);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Jc.scalar_type(), "fusedjd_combine_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / static_cast<int>(sizeof(scalar_t));
    const bool packed = reinterpret_cast<uintptr_t>(Jc.data_ptr()) % 16 == 0 &&
                        (Jc.stride(0) * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
    const int threads = 256;
    const int64_t want = (n + static_cast<int64_t>(threads) * V - 1) / (static_cast<int64_t>(threads) * V);
    const int64_t blocks = std::min<int64_t>(want, 32 * static_cast<int64_t>(sm_count()));
    combine_kernel<scalar_t, opmath_t, V><<<static_cast<unsigned>(blocks), threads, 0, stream()>>>(
        Jc.data_ptr<scalar_t>(), Jc.stride(0), m, n, W.data_ptr<double>(), table.data_ptr<int64_t>(), k, packed,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CUDA, m) {
  m.impl("gramian", &gramian_cuda);
  m.impl("combine", &combine_cuda);
}

}  // namespace fusedjd::cuda
