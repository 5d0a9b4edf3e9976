// CPU kernel of the dual_cone op: the right-hand sides spread over the threads, each solved by
// csrc/dual_cone.h in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "../dual_cone.h"

namespace fusedjd::cpu {
namespace {

at::Tensor dual_cone_cpu(const at::Tensor& U, const at::Tensor& G) {
  check_dual_cone_args(U, G);
  const int64_t m = G.size(0);
  if (m == 0 || U.numel() == 0) return at::empty(U.sizes(), U.options().dtype(G.scalar_type()));
  const at::Tensor Gd = G.to(at::kDouble).contiguous();
  const at::Tensor Ud = U.reshape({-1, m}).to(at::kDouble).contiguous();
  const int64_t k = Ud.size(0);
  at::Tensor V = at::empty({k, m}, Ud.options());
  {
    const double* g = Gd.data_ptr<double>();
    const double* u = Ud.data_ptr<double>();
    double* v = V.data_ptr<double>();
    // one right-hand side is O(m^3) at most: small problems stay on one thread
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, m * m));
    at::parallel_for(0, k, grain, [&](int64_t lo, int64_t hi) {
      std::vector<double> work(static_cast<size_t>(dual_cone_scratch(m)));
      std::vector<int64_t> rows(static_cast<size_t>(m));
      for (int64_t r = lo; r < hi; ++r) dual_cone_solve(g, m, u + r * m, v + r * m, work.data(), rows.data());
    });
  }
  return V.to(G.scalar_type()).reshape(U.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) { m.impl("dual_cone", &dual_cone_cpu); }

}  // namespace fusedjd::cpu
