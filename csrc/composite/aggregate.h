// The aggregate op: GradVac or PCGrad in one call (draw_perms, gramian, the loop, combine), a
// composite of the other ops of its library, called through the dispatcher so that every
// backend's kernels serve it.
#pragma once

#include <torch/library.h>

namespace fusedjd {

// Registers `aggregate` for the library `ns` ("fusedjd"; the test-only emulation's "fusedjd_simt").
void register_aggregate(torch::Library& m, const char* ns);

}  // namespace fusedjd
