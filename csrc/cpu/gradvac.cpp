// CPU kernels of the GradVac family: the GradVac and PCGrad loops on a stack
// of Gramians. Every (group, row) pair is an independent chain; the chains
// run in parallel, each chain's steps run in order.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "../common.h"
#include "../math.h"

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

// torch.randperm(n) on the CPU: identity, then a Fisher-Yates pass drawing
// generator->random() % (n - i) for i < n - 1 (the draws torch itself makes).
void randperm_into(at::CPUGeneratorImpl* gen, int64_t n, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t z = gen->random() % (n - i);
    std::swap(out[i], out[z + i]);
  }
}

at::Tensor draw_perms_cpu(int64_t k, int64_t m, bool pcgrad) {
  at::Tensor out = at::empty({k, m, m > 0 ? m - 1 : 0}, at::TensorOptions().dtype(at::kLong));
  if (k == 0 || m == 0) return out;
  int64_t* o = out.data_ptr<int64_t>();
  std::vector<int64_t> perm(static_cast<size_t>(m));
  at::Generator g = at::detail::getDefaultCPUGenerator();
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(g);
  std::lock_guard<std::mutex> lock(gen->mutex_);
  for (int64_t chain = 0; chain < k * m; ++chain) {
    const int64_t i = chain % m;
    int64_t* dst = o + chain * (m - 1);
    if (pcgrad) {  // randperm(m), skipping i
      randperm_into(gen, m, perm.data());
      int64_t s = 0;
      for (int64_t a = 0; a < m; ++a)
        if (perm[a] != i) dst[s++] = perm[a];
    } else {  // randperm(m - 1) mapped onto [0..i-1, i+1..m-1]
      randperm_into(gen, m - 1, perm.data());
      for (int64_t a = 0; a + 1 < m; ++a) dst[a] = perm[a] + (perm[a] >= i ? 1 : 0);
    }
  }
  return out;
}

// Draws on the CPU (the generator torchjd draws from), then moves the orders to `device`: through
// pinned memory with a non-blocking copy for CUDA, so the caller's stream never waits on the host.
// Under a CUDA-graph capture the draw and its copy would run once, at capture: every replay would
// reuse the captured orders while the CPU generator stays put. Such a capture is refused.
at::Tensor draw_perms(int64_t k, int64_t m, bool pcgrad, std::optional<at::Device> device) {
  TORCH_CHECK(k >= 0 && m >= 0, "fusedjd: draw_perms needs k >= 0 and m >= 0, got k=", k, ", m=", m);
  TORCH_CHECK(!(device.has_value() && cuda_capture_active(*device)),
              "fusedjd: the visit orders of GradVac and PCGrad are drawn on the host from the default CPU "
              "generator (torchjd's draws), which a CUDA graph cannot replay: a captured step would reuse the "
              "orders drawn at capture forever. To capture GradVac, PCGrad or GroupedGradVac (CUDA graphs, "
              "torch.compile(mode=\"reduce-overhead\")), build them with draws=\"device\": orders drawn from the "
              "CUDA generator, graph-safe, but not torchjd's stream of draws");
  at::Tensor out = draw_perms_cpu(k, m, pcgrad);
  if (!device.has_value() || device->is_cpu()) return out;
  if (device->is_cuda()) out = out.pin_memory();
  return out.to(*device, /*non_blocking=*/true);
}

template <typename S, bool PCGRAD>
void run_chains(const S* G, const int64_t* perms, S* targets, S* weights, int64_t k, int64_t m,
                double beta, double eps) {
  const int64_t mm = m * m;
  std::vector<double> coef(static_cast<size_t>(k * mm), 0.0);
  const double floor = target_sine_floor<S>();
  // a chain is ~m^2 flops: keep small problems on one thread (no wake-up cost)
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, mm));
  at::parallel_for(0, k * m, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> cG(static_cast<size_t>(m));
    for (int64_t chain = lo; chain < hi; ++chain) {
      const int64_t g = chain / m, i = chain % m;
      const S* Gg = G + g * mm;
      double* C = coef.data() + chain * m;
      const int64_t* order = perms + chain * (m - 1);
      C[i] = 1.0;
      for (int64_t a = 0; a < m; ++a) cG[a] = static_cast<double>(Gg[i * m + a]);
      for (int64_t s = 0; s + 1 < m; ++s) {
        const int64_t j = order[s];
        double norm_sq = 0.0;
        for (int64_t a = 0; a < m; ++a) norm_sq += cG[a] * C[a];
        S* tgt = PCGRAD ? nullptr : targets + g * mm + i * m + j;
        const double t = PCGRAD ? 0.0 : static_cast<double>(*tgt);
        double c = 0.0;
        const double w = gradvac_pair<PCGRAD>(norm_sq, cG[j], static_cast<double>(Gg[j * m + j]), t, eps,
                                              floor, &c);
        if (w != 0.0) {
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
  check_loop_args(G_in, perms_in);
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
  return loop_cpu<false>(G, perms, &targets, beta, eps);
}

at::Tensor pcgrad_loop_cpu(const at::Tensor& G, const at::Tensor& perms) {
  return loop_cpu<true>(G, perms, nullptr, 0.0, 0.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedjd, CompositeExplicitAutograd, m) {
  m.impl("draw_perms", &draw_perms);
}

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("gradvac_loop", &gradvac_loop_cpu);
  m.impl("pcgrad_loop", &pcgrad_loop_cpu);
}

}  // namespace fusedjd::cpu
