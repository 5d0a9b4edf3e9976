// The fusedjd operator library (TORCH_LIBRARY: the schemas of schemas.h) and the Python module.
//
// Ops are registered with TORCH_LIBRARY and called as torch.ops.fusedjd.*, so torch.compile
// traces them without graph breaks. Each op's kernels are named after it: csrc/cpu/<op>.cpp
// (TORCH_LIBRARY_IMPL(fusedjd, CPU)), csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL(fusedjd, CUDA)), and
// csrc/composite/<op>.cpp for the ops one kernel serves on every backend (draw_perms, aggregate);
// the fake kernels are registered from Python (python/fusedjd/_fake.py). The Python module `fusedjd._C` is a pybind11
// module carrying the build information only.
#include <torch/library.h>

#include "common.h"
#include "schemas.h"

#ifdef FUSEDJD_PYTHON_MODULE  // set by setup.py; the CMake build is a plain C++ library
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>
#include <vector>


#ifndef FUSEDJD_TORCH_VERSION
#define FUSEDJD_TORCH_VERSION "unknown"
#endif
#ifndef FUSEDJD_CUDA_ARCHS
#define FUSEDJD_CUDA_ARCHS ""
#endif

#ifndef FUSEDJD_CPU_LEVELS
#define FUSEDJD_CPU_LEVELS ""
#endif

namespace {

// The CPU kernels' instruction-set levels this CPU (and its OS) can run, best first: what
// fusedjd/_cpu.py chooses from. cpuid through libgcc, which also checks that the OS saves the
// AVX / AVX-512 registers.
pybind11::list cpu_supports() {
  pybind11::list levels;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16")) levels.append("avx512");
  if (__builtin_cpu_supports("x86-64-v3")) levels.append("avx2");
#endif
  levels.append("default");
  return levels;
}

// Typed entry points of the ops a step calls (aggregate, moco_step; gramian and combine): the same
// op, called through the C++ dispatcher (every dispatch key, profiler and Python mode included)
// with pybind11's typed arguments instead of torch.ops' generic parsing of the schema, which costs
// about 2 us of a small step's 9. fusedjd/ops.py takes them only where torch.ops would add
// nothing: plain tensors, no torch-function mode, not compiling. Errors are translated as torch's
// own bindings translate them (HANDLE_TH_ERRORS), after the GIL is taken back.
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor gramian(const std::vector<at::Tensor>& J, const std::vector<int64_t>& group_sizes) {
  HANDLE_TH_ERRORS
  static const auto op = handle<at::Tensor(at::TensorList, c10::SymIntArrayRef)>("fusedjd::gramian");
  pybind11::gil_scoped_release no_gil;
  return op.call(J, c10::fromIntArrayRefSlow(group_sizes));
  END_HANDLE_TH_ERRORS_PYBIND
}

at::Tensor combine(const std::vector<at::Tensor>& J, const at::Tensor& weights, const std::vector<int64_t>& group_sizes) {
  HANDLE_TH_ERRORS
  static const auto op =
      handle<at::Tensor(at::TensorList, const at::Tensor&, c10::SymIntArrayRef)>("fusedjd::combine");
  pybind11::gil_scoped_release no_gil;
  return op.call(J, weights, c10::fromIntArrayRefSlow(group_sizes));
  END_HANDLE_TH_ERRORS_PYBIND
}

std::tuple<at::Tensor, at::Tensor> aggregate(const std::vector<at::Tensor>& J, const std::vector<int64_t>& group_sizes,
                                             const std::optional<at::Tensor>& targets, double beta, double eps,
                                             bool pcgrad, const std::optional<at::Tensor>& perms) {
  HANDLE_TH_ERRORS
  static const auto op =
      handle<std::tuple<at::Tensor, at::Tensor>(at::TensorList, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
                                                double, double, bool, const std::optional<at::Tensor>&)>(
          "fusedjd::aggregate");
  pybind11::gil_scoped_release no_gil;
  return op.call(J, c10::fromIntArrayRefSlow(group_sizes), targets, beta, eps, pcgrad, perms);
  END_HANDLE_TH_ERRORS_PYBIND
}

std::tuple<at::Tensor, at::Tensor> moco_step(const std::vector<at::Tensor>& J, at::Tensor Y, at::Tensor lam,
                                             at::Tensor step, double beta, double beta_sigma, double gamma,
                                             double gamma_sigma, double rho, bool projection,
                                             const std::optional<at::Tensor>& gram) {
  HANDLE_TH_ERRORS
  static const auto op =
      handle<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::Tensor&, at::Tensor&, at::Tensor&, double, double,
                                                double, double, double, bool, const std::optional<at::Tensor>&)>(
          "fusedjd::moco_step");
  pybind11::gil_scoped_release no_gil;
  return op.call(J, Y, lam, step, beta, beta_sigma, gamma, gamma_sigma, rho, projection, gram);
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

// Importing fusedjd._C loads this shared library, which runs the static operator registrations
// below (the ops are reached through torch.ops.fusedjd). The module itself exposes only what is
// not an op: how this library was built.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedjd operator library (the ops are torch.ops.fusedjd.*) and its build information";
  m.def(
      "build_info",
      [] {
        pybind11::dict d;
#ifdef FUSEDJD_WITH_CUDA
        d["cuda"] = true;
#else
        d["cuda"] = false;
#endif
        d["cuda_archs"] = FUSEDJD_CUDA_ARCHS;
        d["torch_version"] = FUSEDJD_TORCH_VERSION;
        d["cpu_levels"] = FUSEDJD_CPU_LEVELS;  // the CPU kernels' levels built (fusedjd._cpu_<level>)
#ifdef _OPENMP
        d["openmp"] = true;
#else
        d["openmp"] = false;
#endif
        return d;
      },
      "How this library was built: CUDA kernels (bool), the CUDA archs they were compiled for, "
      "the torch version built against, the CPU kernels' instruction-set levels, OpenMP.");
  m.def("gramian", &gramian, "torch.ops.fusedjd.gramian through the C++ dispatcher (fusedjd.ops.gramian's eager path).");
  m.def("combine", &combine, "torch.ops.fusedjd.combine through the C++ dispatcher (fusedjd.ops.combine's eager path).");
  m.def("aggregate", &aggregate,
        "torch.ops.fusedjd.aggregate through the C++ dispatcher (fusedjd.ops.aggregate's eager path).");
  m.def("moco_step", &moco_step,
        "torch.ops.fusedjd.moco_step through the C++ dispatcher (fusedjd.ops.moco_step's eager path).");
  m.def("cpu_supports", &cpu_supports,
        "The CPU kernels' instruction-set levels this CPU can run, best first (cpuid).");
}
#endif

namespace fusedjd {
#ifdef FUSEDJD_WITH_CUDA
namespace cuda {
bool capture_active(const at::Device& device);  // csrc/cuda/work_table.cu
}
bool cuda_capture_active(const at::Device& device) { return device.is_cuda() && cuda::capture_active(device); }
#else
bool cuda_capture_active(const at::Device&) { return false; }
#endif
}  // namespace fusedjd

TORCH_LIBRARY(fusedjd, m) { fusedjd::define_ops(m); }
