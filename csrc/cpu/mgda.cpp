// CPU kernel of the mgda op (MGDA's weighting): torchjd's Frank-Wolfe iteration, csrc/mgda.h, in
// float64 on one thread (an m x m problem: O(m^2) per iteration).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "../mgda.h"

namespace fusedjd::cpu {
namespace {

at::Tensor mgda_cpu(const at::Tensor& G_in, double epsilon, int64_t max_iters) {
  check_mgda_args(G_in, epsilon, max_iters);
  const int64_t m = G_in.size(0);
  const at::Tensor G = G_in.to(at::kDouble).contiguous();
  const double* g = G.data_ptr<double>();
  bool finite = true;
  for (int64_t a = 0; a < m * m; ++a) finite = finite && std::isfinite(g[a]);
  if (!finite) return at::full({m}, NAN, G_in.options());
  at::Tensor alpha = at::empty({m}, G.options());
  double* al = alpha.data_ptr<double>();
  std::vector<double> Ga(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) al[i] = 1.0 / static_cast<double>(m);
  for (int64_t it = 0; it < max_iters && m > 0; ++it) {
    for (int64_t i = 0; i < m; ++i) Ga[i] = mgda_row(g, m, i, al);
    int64_t t = 0;
    const double gamma = mgda_gamma(g, m, al, Ga.data(), &t);
    for (int64_t i = 0; i < m; ++i) al[i] = mgda_update(al[i], i, t, gamma);
    if (gamma < epsilon) break;
  }
  return alpha.to(G_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) { m.impl("mgda", &mgda_cpu); }

}  // namespace fusedjd::cpu
