// CPU kernel of the aggregate op: GradVac or PCGrad in one call, the sequence of ../aggregate.h on
// the CPU kernels' cores (kernels.h): the Gramians, the visit orders, the loop and the
// combination, with no temporary tensor beyond the rounded Gramians and the visit orders, which
// is what a step costs at small sizes (a few microseconds).
#include <torch/library.h>

#include "../aggregate.h"
#include "kernels.h"

namespace fusedjd::cpu {

TORCH_LIBRARY_IMPL(fusedjd, CPU, m) {
  m.impl("aggregate", &fusedjd::aggregate<Cores>);
}

}  // namespace fusedjd::cpu
