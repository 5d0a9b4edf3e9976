// CPU kernel of the dual_cone op: the right-hand sides spread over the threads, each solved by
// csrc/dual_cone.h in float64 (G checked for non-finite entries once, for all of them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common.h"
#include "../dual_cone.h"
#include "simd.h"

namespace fusedjd::cpu {
namespace {

// detail::chol_extend's factor (same contract, same pivot test) computed kRows rows of U at a time:
// the update of a block of rows by every row above it, U_T[:, cs..p) -= U[0..t, T]^T U[0..t, cs..p),
// runs in registers (kRows x 2 vectors of columns, one pass over the rows above per column tile),
// so each row above is read once per block instead of once per row; then the rows of the block
// update one another and take their pivots as in chol_extend. Rows [0, pos) are kept: a block of
// them gets only its new columns [pos, p). Writes below U's diagonal inside a block (unused).
struct BlockedFactor {
  using V = Simd<double>::V;
  static constexpr int kL = Simd<double>::L;
  static constexpr int kRows = kVecBytes == 64 ? 8 : 6;  // 2 kRows accumulators fit the registers

  // U[t + j][cs, p) -= sum over k < t of U[k][t + j] U[k][cs, p), for j < nr (nr <= kRows). The
  // last tile reads up to 2 kL - 1 doubles past column p - 1 of the rows above and stores only the
  // columns before p: past U's last row when m is small (t = pos = 1, m = 2), hence kPad more
  // doubles of scratch.
  template <bool kFull>
  static void update(double* U, int64_t m, int64_t t, int64_t nr_, int64_t cs, int64_t p) {
    const int64_t nr = kFull ? kRows : nr_;
    for (int64_t r = cs; r < p; r += 2 * kL) {
      V acc[kRows][2];
      for (int j = 0; j < kRows; ++j) {
        acc[j][0] = V{};
        acc[j][1] = V{};
      }
      for (int64_t k = 0; k < t; ++k) {
        const double* Uk = U + k * m;
        V b0, b1;
        std::memcpy(&b0, Uk + r, sizeof(V));
        std::memcpy(&b1, Uk + r + kL, sizeof(V));
        for (int j = 0; j < kRows; ++j) {
          const double a = j < nr ? Uk[t + j] : 0.0;
          acc[j][0] += a * b0;
          acc[j][1] += a * b1;
        }
      }
      const int64_t w = std::min<int64_t>(2 * kL, p - r);
      for (int64_t j = 0; j < nr; ++j) {
        double* Ut = U + (t + j) * m + r;
        double s[2 * kL];
        std::memcpy(s, &acc[j][0], sizeof(V));
        std::memcpy(s + kL, &acc[j][1], sizeof(V));
        for (int64_t q = 0; q < w; ++q) Ut[q] -= s[q];
      }
    }
  }
  static constexpr int64_t kPad = 2 * kL;

  bool operator()(const double* G, int64_t m, double* U, const int64_t* rows, int64_t pos, int64_t p) const {
    const double tiny = 4.0 * static_cast<double>(m) * 2.220446049250313e-16;
    for (int64_t t = 0, end = 0; t < p; t = end) {
      const bool kept = t < pos;
      end = std::min(t + kRows, kept ? pos : p);
      const int64_t nr = end - t, cs = kept ? pos : t;
      for (int64_t j = t; j < end; ++j) {
        const double* g = G + rows[j] * m;
        double* Uj = U + j * m;
        for (int64_t r = cs; r < p; ++r) Uj[r] = g[rows[r]];
      }
      if (t > 0 && nr == kRows) {
        update<true>(U, m, t, nr, cs, p);
      } else if (t > 0) {
        update<false>(U, m, t, nr, cs, p);
      }
      for (int64_t j = t; j < end; ++j) {  // the block's rows, in order, as chol_extend's
        double* Uj = U + j * m;
        const int64_t c0 = kept ? pos : j;
        for (int64_t i = t; i < j; ++i) {
          const double* Ui = U + i * m;
          const double a = Ui[j];
          for (int64_t r = c0; r < p; ++r) Uj[r] -= a * Ui[r];
        }
        if (!kept) {
          const double gjj = G[rows[j] * m + rows[j]];
          if (!(gjj > 0.0) || !(Uj[j] > tiny * gjj)) return false;
          Uj[j] = std::sqrt(Uj[j]);
        }
        const double inv = 1.0 / Uj[j];
        for (int64_t r = kept ? pos : j + 1; r < p; ++r) Uj[r] *= inv;
      }
    }
    return true;
  }
};

// Every right-hand side of p solved, V filled; paths[r] = dual_cone_solve's result (null: not kept).
void solve_all(const DualConeProblem& p, int64_t* paths) {
  const int64_t k = p.k, m = p.m;
  const double* g = p.G.data_ptr<double>();
  const double* u = p.U.data_ptr<double>();
  double* v = p.V.data_ptr<double>();
  bool finite = true;
  for (int64_t a = 0; a < m * m; ++a) finite = finite && std::isfinite(g[a]);
  // one right-hand side is a few factorisations of up to m x m: small problems stay on one thread
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, m * m));
  at::parallel_for(0, k, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> work(static_cast<size_t>(dual_cone_scratch(m) + BlockedFactor::kPad));
    std::vector<int64_t> idx(static_cast<size_t>(dual_cone_index_scratch(m)));
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t path = dual_cone_solve(g, m, u + r * m, v + r * m, work.data(), idx.data(), finite,
                                           BlockedFactor());
      if (paths != nullptr) paths[r] = path;
    }
  });
}

at::Tensor dual_cone_cpu(const at::Tensor& U, const at::Tensor& G) {
  const DualConeProblem p = dual_cone_problem(U, G);
  solve_all(p, nullptr);
  return p.finish(U, G);
}

at::Tensor dual_cone_paths_cpu(const at::Tensor& U, const at::Tensor& G) {
  const DualConeProblem p = dual_cone_problem(U, G);
  at::Tensor paths = at::zeros({p.k}, p.U.options().dtype(at::kLong));
  solve_all(p, paths.data_ptr<int64_t>());
  return paths;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("dual_cone", &dual_cone_cpu);
  m.impl("_dual_cone_paths", &dual_cone_paths_cpu);
}

}  // namespace fusedjd::cpu
