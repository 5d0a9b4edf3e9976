// CPU kernels of the gradvac_loop and pcgrad_loop ops: the GradVac and PCGrad loops on a stack
// of Gramians. Every (group, row) pair is an independent chain; the chains
// run in parallel, each chain's steps run in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "../gradvac.h"
#include "kernels.h"

namespace fusedjd::cpu {
namespace {

// Whether every visit order names, for its row i, only rows in [0, m) other than i.
bool perms_valid(const at::Tensor& perms, int64_t m) {
  const int64_t* p = perms.data_ptr<int64_t>();
  const int64_t rows = perms.size(0) * m;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % m;
    for (int64_t s = 0; s + 1 < m; ++s) {
      const int64_t j = p[r * (m - 1) + s];
      if (j < 0 || j >= m || j == i) return false;
    }
  }
  return true;
}

// sum_a x[a] y[a] in 8 partial sums (vectorized: a chain step's cost at m = 32 was this sum's
// latency, one addition after another), added pairwise.
inline double dot(const double* x, const double* y, int64_t m) {
  double s[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t a = 0;
  for (; a + 8 <= m; a += 8)
    for (int l = 0; l < 8; ++l) s[l] += x[a + l] * y[a + l];
  for (int l = 0; a < m; ++a, ++l) s[l] += x[a] * y[a];
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

template <typename S, bool PCGRAD>
void run_chains(const S* G, const int64_t* perms, S* targets, S* weights, int64_t k, int64_t m,
                double beta, double eps) {
  const int64_t mm = m * m;
  std::vector<double> coef(static_cast<size_t>(k * mm), 0.0);
  const double floor = target_sine_floor<S>();
  const double precision = gramian_precision<S>();
  // a chain costs about m^2 operations (a microsecond at m = 32): chains of a few microseconds per
  // task, so that small problems stay on one thread (no wake-up cost) and m = 32 uses them all
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, mm));
  at::parallel_for(0, k * m, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> cG(static_cast<size_t>(m));
    for (int64_t chain = lo; chain < hi; ++chain) {
      const int64_t g = chain / m, i = chain % m;
      const S* Gg = G + g * mm;
      double* C = coef.data() + chain * m;
      const int64_t* order = perms + chain * (m - 1);
      C[i] = 1.0;
      for (int64_t a = 0; a < m; ++a) cG[a] = static_cast<double>(Gg[i * m + a]);
      // sum_a |C_a| |g_a|, kept up to date as C changes (one entry per step)
      double magnitude = std::sqrt(std::fmax(static_cast<double>(Gg[i * m + i]), 0.0));
      for (int64_t s = 0; s + 1 < m; ++s) {
        const int64_t j = order[s];
        const double norm_sq = dot(cG.data(), C, m);
        S* tgt = PCGRAD ? nullptr : targets + g * mm + i * m + j;
        const double t = PCGRAD ? 0.0 : static_cast<double>(*tgt);
        double c = 0.0;
        const double gjj = static_cast<double>(Gg[j * m + j]);
        const double w = gradvac_pair<PCGRAD>(norm_sq, cG[j], gjj, t, eps, floor, magnitude, precision, &c);
        if (w != 0.0) {
          if (!PCGRAD) magnitude += (std::fabs(C[j] + w) - std::fabs(C[j])) * std::sqrt(std::fmax(gjj, 0.0));
          C[j] += w;
          for (int64_t a = 0; a < m; ++a) cG[a] += w * static_cast<double>(Gg[j * m + a]);
        }
        if (!PCGRAD) *tgt = static_cast<S>((1.0 - beta) * t + beta * c);
      }
    }
  });
  // weights[g] = column sums of the coefficient rows of group g (ordered sum).
  for (int64_t g = 0; g < k; ++g)
    for (int64_t b = 0; b < m; ++b) {
      double s = 0.0;
      for (int64_t i = 0; i < m; ++i) s += coef[g * mm + i * m + b];
      weights[g * m + b] = static_cast<S>(s);
    }
}

template <bool PCGRAD>
at::Tensor loop_cpu(const at::Tensor& G_in, const at::Tensor& perms_in, at::Tensor* targets,
                    double beta, double eps) {
  const int64_t k = G_in.size(0), m = G_in.size(1);
  at::Tensor weights = at::empty({k, m}, G_in.options());
  if (k == 0 || m == 0) return weights;
  const at::Tensor G = G_in.contiguous();
  const at::Tensor perms = perms_in.contiguous();
  // A non-finite Gramian or an invalid visit order must not reach the targets: NaN weights,
  // state kept (the CUDA kernel cannot raise without a host sync, so neither backend does).
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "fusedjd_gradvac_finite_cpu", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    for (int64_t e = 0; e < G.numel(); ++e) finite &= std::isfinite(static_cast<double>(g[e]));
  });
  if (!finite || !perms_valid(perms, m)) return weights.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "fusedjd_gradvac_loop_cpu", [&] {
    run_chains<scalar_t, PCGRAD>(G.data_ptr<scalar_t>(), perms.data_ptr<int64_t>(),
                                 targets ? targets->data_ptr<scalar_t>() : nullptr, weights.data_ptr<scalar_t>(),
                                 k, m, beta, eps);
  });
  return weights;
}

at::Tensor gradvac_loop_cpu(const at::Tensor& G, const at::Tensor& perms, at::Tensor& targets, double beta,
                            double eps) {
  check_targets(G, targets);
  check_gradvac_hyper(beta, eps);
  check_loop_args(G, perms);
  return loop_cpu<false>(G, perms, &targets, beta, eps);
}

at::Tensor pcgrad_loop_cpu(const at::Tensor& G, const at::Tensor& perms) {
  check_loop_args(G, perms);
  return loop_cpu<true>(G, perms, nullptr, 0.0, 0.0);
}

}  // namespace

at::Tensor run_loop(const at::Tensor& G, const at::Tensor& perms, at::Tensor* targets, double beta, double eps) {
  return targets ? loop_cpu<false>(G, perms, targets, beta, eps) : loop_cpu<true>(G, perms, nullptr, 0.0, 0.0);
}

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("gradvac_loop", &gradvac_loop_cpu);
  m.impl("pcgrad_loop", &pcgrad_loop_cpu);
}

}  // namespace fusedjd::cpu
