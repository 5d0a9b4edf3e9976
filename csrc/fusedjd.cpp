// The fusedjd operator schemas and the Python module init.
//
// Ops are registered with TORCH_LIBRARY and called as torch.ops.fusedjd.*, so
// torch.compile traces them without graph breaks. Kernels live in
// csrc/cpu/<family>.cpp (TORCH_LIBRARY_IMPL(fusedjd, CPU)) and
// csrc/cuda/<family>.cu (TORCH_LIBRARY_IMPL(fusedjd, CUDA)); fake kernels are
// registered from Python (python/fusedjd/ops.py).
#include <torch/library.h>

#include "schemas.h"

#ifdef FUSEDJD_PYTHON_MODULE  // set by setup.py; the CMake build is a plain C++ library
#include <Python.h>

extern "C" {
// Importing fusedjd._C loads this shared library, which runs the static
// registrations below. The module itself carries nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fusedjd operator library (see torch.ops.fusedjd)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(fusedjd, m) { fusedjd::define_ops(m); }
