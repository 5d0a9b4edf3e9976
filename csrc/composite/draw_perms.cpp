// The draw_perms op, one kernel for every backend (CompositeExplicitAutograd): the visit orders of
// GradVac and PCGrad drawn on the host from the default CPU generator, exactly as torchjd draws
// them, then moved to the target device without a host sync.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../common.h"
#include "../draws.h"

namespace fusedjd {
namespace {

// Draws on the CPU (the generator torchjd draws from), then moves the orders to `device` without a
// host sync (draws.h). Under a CUDA-graph capture the draw and its copy would run once, at capture:
// every replay would reuse the captured orders while the CPU generator stays put. Such a capture
// is refused.
at::Tensor draw_perms(int64_t k, int64_t m, bool pcgrad, std::optional<at::Device> device) {
  TORCH_CHECK(k >= 0 && m >= 0, "fusedjd: draw_perms needs k >= 0 and m >= 0, got k=", k, ", m=", m);
  if (device.has_value()) check_host_draws_allowed(*device);
  return draw_perms_on(k, m, pcgrad, device.value_or(at::Device(at::kCPU)));
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
