// The aggregate op (composite/aggregate.h): the other ops of its library in turn, through the
// dispatcher. Compiled into the extension, and into the test-only emulation library (tests/simt,
// with FUSEDJD_SIMT), which registers it for its own namespace.
#include "aggregate.h"

#include "../common.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

namespace fusedjd {

void register_aggregate(torch::Library& m, const char* ns) {
  struct Ops {
    c10::TypedOperatorHandle<at::Tensor(at::TensorList, at::IntArrayRef)> gramian;
    c10::TypedOperatorHandle<at::Tensor(int64_t, int64_t, bool, std::optional<at::Device>)> draw;
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, double, double)> loop;
    c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&)> pcgrad;
    c10::TypedOperatorHandle<at::Tensor(at::TensorList, const at::Tensor&, at::IntArrayRef)> combine;
  };
  // looked up on first use (the library's other ops may be registered after this one)
  struct Lazy {
    std::once_flag once;
    std::optional<Ops> ops;
  };
  auto lazy = std::make_shared<Lazy>();
  const std::string lib(ns);
  m.impl("aggregate", [lib, lazy](at::TensorList J, at::IntArrayRef group_sizes,
                                  const std::optional<at::Tensor>& targets, double beta, double eps,
                                  bool pcgrad, const std::optional<at::Tensor>& given_perms)
                                      -> std::tuple<at::Tensor, at::Tensor> {
    std::call_once(lazy->once, [&] {
      auto& d = c10::Dispatcher::singleton();
      lazy->ops = Ops{d.findSchemaOrThrow((lib + "::gramian").c_str(), "")
                          .typed<at::Tensor(at::TensorList, at::IntArrayRef)>(),
                      d.findSchemaOrThrow("fusedjd::draw_perms", "")  // (one for every library: a CPU draw)
                          .typed<at::Tensor(int64_t, int64_t, bool, std::optional<at::Device>)>(),
                      d.findSchemaOrThrow((lib + "::gradvac_loop").c_str(), "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, double, double)>(),
                      d.findSchemaOrThrow((lib + "::pcgrad_loop").c_str(), "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>(),
                      d.findSchemaOrThrow((lib + "::combine").c_str(), "")
                          .typed<at::Tensor(at::TensorList, const at::Tensor&, at::IntArrayRef)>()};
    });
    const Ops* o = &*lazy->ops;
    TORCH_CHECK(pcgrad || targets.has_value(), "fusedjd: `targets` is required for GradVac (pcgrad=False), got None");
    // host draws under a CUDA-graph capture are refused by draw_perms: refused here first, before the
    // Gramian's kernels (and their work table) are captured for nothing
#if !defined(FUSEDJD_SIMT)  // (the emulation's tensors live on the CPU: no capture there)
    if (!given_perms.has_value() && !J.empty()) check_host_draws_allowed(J[0].device());
#endif
    const at::Tensor G = o->gramian.call(J, group_sizes);
    const at::Tensor perms =
        given_perms.has_value() ? *given_perms : o->draw.call(G.size(0), G.size(1), pcgrad, G.device());
    at::Tensor W;
    if (pcgrad) {
      W = o->pcgrad.call(G, perms);
    } else {
      at::Tensor T = *targets;
      W = o->loop.call(G, perms, T, beta, eps);
    }
    return {o->combine.call(J, W, group_sizes), W};
  });
}

}  // namespace fusedjd

#if !defined(FUSEDJD_SIMT)
TORCH_LIBRARY_IMPL(fusedjd, CompositeExplicitAutograd, m) { fusedjd::register_aggregate(m, "fusedjd"); }
#endif
