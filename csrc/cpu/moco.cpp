// CPU kernel of the MoCo family: one in-place MoCo step in two passes over J and Y, with no
// m x n temporary (5 streams of m x n: read Y, J; read Y, J and write Y).
//   pass 1: the Gramian of the updated rows Yn = Y + b (J - Y), formed tile by tile in cache by
//           the streaming engine (gram_engine.h) and rounded to Y's dtype exactly as pass 2 will
//           store it; Y is not written -- a non-finite J shows as a non-finite Gramian (skipped
//           when the caller gives the Gramian; moco_gramian is this pass alone);
//   step:   step sizes, the weight update and the skip decision (moco.h);
//   pass 2: Y <- Yn in place and out = lam^T Yn, fused.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../moco.h"
#include "gram_engine.h"

namespace fusedjd::cpu {
namespace {

// The engine's row source for pass 1: the rows of Yn, computed tile by tile from Y (global
// columns) and J's blocks.
template <typename T>
struct UpdatedRows {
  using A = elem_t<T>;
  static constexpr bool kStaged = true;
  const T* y;  // [m, n] contiguous
  int64_t n;
  BlockRows<T> j;
  const std::vector<int64_t>& off;  // J's block offsets
  at::opmath_type<T> b;

  UpdatedRows(const T* y_, const Blocks& B, at::opmath_type<T> b_) : y(y_), n(B.n), j(B), off(B.off), b(b_) {}

  // The memory the tile of the columns [c0, c0 + len) (inside block blk) reads: a row of J and
  // a row of Y per row, added to `st`.
  void streams(int64_t R, int64_t blk, int64_t c0, int64_t len, Streams& st) const {
    j.streams(R, blk, c0, len, st);
    for (int64_t r = 0; r < R; ++r, ++st.count) {
      st.ptr[st.count] = reinterpret_cast<const char*>(y + r * n + c0);
      st.bytes[st.count] = len * static_cast<int64_t>(sizeof(T));
    }
  }

  int64_t tile(int64_t R, int64_t blk, int64_t c0, int64_t len, const A** x, A* stage, int64_t stride) const {
    constexpr int L = Simd<A>::L;
    const int64_t padded = (len + L - 1) / L * L;
    for (int64_t r = 0; r < R; ++r) {
      const T* yr = y + r * n + c0;
      const T* jr = j.base[blk] + r * j.ld[blk] + (c0 - off[blk]);
      A* dst = stage + r * stride;
      for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<A>(moco_row_update(yr[c], jr[c], b));
      for (int64_t c = len; c < padded; ++c) dst[c] = A(0);
      x[r] = dst;
    }
    return padded;
  }
};

// Pass 1: the Gramian (float64, m x m) of the updated rows Y + b (J - Y).
std::vector<double> updated_gram(const Blocks& B, const at::Tensor& Y, double b) {
  std::vector<double> gram(static_cast<size_t>(B.m * B.m), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_moco_gram_cpu", [&] {
    const UpdatedRows<scalar_t> rows(Y.data_ptr<scalar_t>(), B, static_cast<at::opmath_type<scalar_t>>(b));
    gram_groups(rows, B.m, {0, B.n}, gram.data());
  });
  return gram;
}

at::Tensor moco_gramian_cpu(at::TensorList J, const at::Tensor& Y, const at::Tensor& step, double beta,
                            double beta_sigma) {
  const Blocks B = check_moco_state(J, Y, step);
  at::Tensor out = at::zeros({B.m, B.m}, Y.options().dtype(acc_dtype(B.dtype)));
  if (B.m == 0) return out;
  double b = 0.0, c = 0.0;
  moco_rates(step.data_ptr<int64_t>()[0] + 1, beta, beta_sigma, 0.0, 0.0, &b, &c);
  const std::vector<double> gram = updated_gram(B, Y, b);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedjd_moco_gramian_out", [&] {
    std::copy(gram.begin(), gram.end(), out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moco_step_cpu(at::TensorList J, at::Tensor& Y, at::Tensor& lam, at::Tensor& step,
                                                 double beta, double beta_sigma, double gamma, double gamma_sigma,
                                                 double rho, bool projection, const c10::optional<at::Tensor>& given) {
  const Blocks B = check_moco_args(J, Y, lam, step, given);
  const int64_t m = B.m, n = B.n;
  at::Tensor weights = at::empty({m}, lam.options());
  at::Tensor out = at::empty({n}, Y.options());
  if (m == 0) {  // nothing to weigh: zeros, state untouched
    out.zero_();
    return {weights, out};
  }
  const int64_t k = step.data_ptr<int64_t>()[0] + 1;
  double b = 0.0, c = 0.0;
  moco_rates(k, beta, beta_sigma, gamma, gamma_sigma, &b, &c);

  std::vector<double> gram, lam_old(m), lam_new(m), scratch(m);
  if (given.has_value()) {
    const at::Tensor G = given->to(at::kDouble).contiguous();
    gram.assign(G.data_ptr<double>(), G.data_ptr<double>() + m * m);
  } else {
    gram = updated_gram(B, Y, b);
  }
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "fusedjd_moco_lam", [&] {
    for (int64_t r = 0; r < m; ++r) lam_old[r] = static_cast<double>(lam.data_ptr<scalar_t>()[r]);
  });

  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.dtype, "fusedjd_moco_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* y = Y.data_ptr<scalar_t>();
    const opmath_t br = static_cast<opmath_t>(b);
    const UpdatedRows<scalar_t> rows(y, B, br);
    ok = moco_lambda_update(gram.data(), lam_old.data(), lam_new.data(), m, c, rho, projection, scratch.data());
    if (!ok) return;
    scalar_t* o = out.data_ptr<scalar_t>();
    constexpr int64_t kChunk = 4096;
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<opmath_t> acc(kChunk);
      for (int64_t ch = lo; ch < hi; ++ch) {
        const int64_t c0 = ch * kChunk, len = std::min(n, c0 + kChunk) - c0;
        for (int64_t e = 0; e < len; ++e) acc[e] = opmath_t(0);
        for_each_segment(B.off, c0, c0 + len, [&](int64_t blk, int64_t q0, int64_t q1) {
          for (int64_t r = 0; r < m; ++r) {
            scalar_t* yr = y + r * n + q0;
            const scalar_t* jr = rows.j.base[blk] + r * rows.j.ld[blk] + (q0 - B.off[blk]);
            opmath_t* ar = acc.data() + (q0 - c0);
            const opmath_t lr = static_cast<opmath_t>(lam_new[r]);
            for (int64_t e = 0; e < q1 - q0; ++e) {
              const scalar_t ynew = moco_row_update(yr[e], jr[e], br);
              yr[e] = ynew;
              ar[e] += lr * static_cast<opmath_t>(ynew);
            }
          }
        });
        for (int64_t e = 0; e < len; ++e) o[c0 + e] = static_cast<scalar_t>(acc[e]);
      }
    });
  });
  if (!ok) {  // non-finite input: every piece of state stays as it was
    weights.fill_(std::numeric_limits<double>::quiet_NaN());
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    return {weights, out};
  }
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "fusedjd_moco_lam_out", [&] {
    scalar_t* l = lam.data_ptr<scalar_t>();
    scalar_t* wo = weights.data_ptr<scalar_t>();
    for (int64_t r = 0; r < m; ++r) l[r] = wo[r] = static_cast<scalar_t>(lam_new[r]);
  });
  step.data_ptr<int64_t>()[0] = k;
  return {weights, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("moco_step", &moco_step_cpu);
  m.impl("moco_gramian", &moco_gramian_cpu);
}

}  // namespace fusedjd::cpu
