// The visit orders of GradVac and PCGrad drawn on the host from the default CPU generator, exactly
// as torchjd draws them: the draw_perms op (composite/draw_perms.cpp) and the aggregate op
// (aggregate.h, every backend) both draw through draw_perms_on.
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace fusedjd {

// torch.randperm(n) on the CPU: identity, then a Fisher-Yates pass drawing
// generator->random() % (n - i) for i < n - 1 (the draws torch itself makes).
inline void randperm_into(at::CPUGeneratorImpl* gen, int64_t n, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t z = gen->random() % (n - i);
    std::swap(out[i], out[z + i]);
  }
}

// Visit orders [k, m, m-1] into `o`: GradVac draws randperm(m - 1) per row mapped onto the other
// rows, PCGrad randperm(m) per row with the row itself skipped, group by group, row by row.
inline void draw_perms_into(int64_t k, int64_t m, bool pcgrad, int64_t* o) {
  if (k == 0 || m == 0) return;
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
}

// The visit orders [k, m, m-1] (int64) drawn on the host, on `device`: for CUDA through pinned
// memory with a non-blocking copy, so that the caller's stream never waits on the host.
inline at::Tensor draw_perms_on(int64_t k, int64_t m, bool pcgrad, const at::Device& device) {
  at::Tensor out = at::empty({k, m, m > 0 ? m - 1 : 0}, at::TensorOptions().dtype(at::kLong));
  draw_perms_into(k, m, pcgrad, out.data_ptr<int64_t>());
  if (device.is_cpu()) return out;
  if (device.is_cuda()) out = out.pin_memory();
  return out.to(device, /*non_blocking=*/true);
}

}  // namespace fusedjd
