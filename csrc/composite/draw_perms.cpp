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

at::Tensor draw_perms_cpu(int64_t k, int64_t m, bool pcgrad) {
  at::Tensor out = at::empty({k, m, m > 0 ? m - 1 : 0}, at::TensorOptions().dtype(at::kLong));
  draw_perms_into(k, m, pcgrad, out.data_ptr<int64_t>());
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
