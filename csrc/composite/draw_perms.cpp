// The draw_perms op, one kernel for every backend (CompositeExplicitAutograd): the visit orders of
// GradVac and PCGrad drawn on the host from the default CPU generator, exactly as torchjd draws
// them, then moved to the target device without a host sync.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "../common.h"

namespace fusedjd {
namespace {

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
  if (device.has_value()) check_host_draws_allowed(*device);
  at::Tensor out = draw_perms_cpu(k, m, pcgrad);
  if (!device.has_value() || device->is_cpu()) return out;
  if (device->is_cuda()) out = out.pin_memory();
  return out.to(*device, /*non_blocking=*/true);
}

}  // namespace

void check_host_draws_allowed(const at::Device& device) {
  TORCH_CHECK(!cuda_capture_active(device),
              "fusedjd: the visit orders of GradVac and PCGrad are drawn on the host from the default CPU "
              "generator (torchjd's draws), which a CUDA graph cannot replay: a captured step would reuse the "
              "orders drawn at capture forever. To capture GradVac, PCGrad or GroupedGradVac (CUDA graphs, "
              "torch.compile(mode=\"reduce-overhead\")), build them with draws=\"device\": orders drawn from the "
              "CUDA generator, graph-safe, but not torchjd's stream of draws");
}

TORCH_LIBRARY_IMPL(fusedjd, CompositeExplicitAutograd, m) {
  m.impl("draw_perms", &draw_perms);
}

}  // namespace fusedjd
