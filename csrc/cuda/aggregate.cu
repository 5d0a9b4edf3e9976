// CUDA kernel of the aggregate op: GradVac or PCGrad in one call, the sequence of ../aggregate.h on
// the CUDA kernels' cores (kernels.cuh): at most 5 kernels (the Gramian's two, the loop's two, the
// combination) while m fits the Gramian engine (128 rows; 64 for float64; beyond, the Gramian is
// taken group by group), one host-to-device copy of the visit orders, no host synchronisation.
#include <torch/library.h>

#include "../aggregate.h"
#include "cuda_common.cuh"
#include "kernels.cuh"

namespace fusedjd::cuda {

FUSEDJD_CUDA_IMPL(m) {
  m.impl("aggregate", &fusedjd::aggregate<Cores>);
}

}  // namespace fusedjd::cuda
