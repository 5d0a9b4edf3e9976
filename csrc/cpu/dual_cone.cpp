// CPU kernel of the dual_cone op: the right-hand sides spread over the threads, each solved by
// csrc/dual_cone.h in float64 (G checked for non-finite entries once, for all of them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "../dual_cone.h"

namespace fusedjd::cpu {
namespace {

at::Tensor dual_cone_cpu(const at::Tensor& U, const at::Tensor& G) {
  const DualConeProblem p = dual_cone_problem(U, G);
  const int64_t k = p.k, m = p.m;
  const double* g = p.G.data_ptr<double>();
  const double* u = p.U.data_ptr<double>();
  double* v = p.V.data_ptr<double>();
  bool finite = true;
  for (int64_t a = 0; a < m * m; ++a) finite = finite && std::isfinite(g[a]);
  // one right-hand side is a few factorisations of up to m x m: small problems stay on one thread
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, m * m));
  at::parallel_for(0, k, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> work(static_cast<size_t>(dual_cone_scratch(m)));
    std::vector<int64_t> idx(static_cast<size_t>(dual_cone_index_scratch(m)));
    for (int64_t r = lo; r < hi; ++r) dual_cone_solve(g, m, u + r * m, v + r * m, work.data(), idx.data(), finite);
  });
  return p.finish(U, G);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) { m.impl("dual_cone", &dual_cone_cpu); }

}  // namespace fusedjd::cpu
