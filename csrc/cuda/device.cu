// Per-device facts (cached for the life of the process) and the work tables of the kernels.
#include <map>
#include <mutex>
#include <tuple>
#include <vector>
#include <algorithm>

#include "cuda_common.cuh"

namespace fusedjd::cuda {

int sm_count() {
#if defined(FUSEDJD_SIMT)
  return ::simt::config().sm_count;
#else
  static int cache[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev] = v;
  return v;
#endif
}

namespace {

// The stream a call runs on, and the id of the CUDA-graph capture in progress on it (0: none).
std::pair<uint64_t, unsigned long long> stream_and_capture() {
#if defined(FUSEDJD_SIMT)
  return {0, 0};
#else
  const c10::cuda::CUDAStream s = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(s.stream(), &status, &id));
  return {static_cast<uint64_t>(s.id()), status == cudaStreamCaptureStatusActive ? id : 0ull};
#endif
}

}  // namespace

// How a work table reaches the device without a host sync, and stays valid:
//  - it is written into pinned host memory and copied by an asynchronous copy on the stream of
//    the call, so stream order puts the write before every kernel of the call that reads it; the
//    caching host allocator does not hand the pinned buffer out again before that copy has run;
//  - eagerly, each call makes its own table (it holds the blocks' addresses, which change from
//    call to call), and the caller keeps the device copy alive until its kernels are queued;
//  - during a CUDA-graph capture the copy runs only when the graph replays, so the table and its
//    pinned host copy must live as long as the graph: they are kept for the life of the process,
//    keyed by the capture's id and the table's content (a replay that needs them finds them; a
//    re-capture of the same call reuses them). Cost to know: a program that captures fusedjd ops
//    over new tensors many times grows by one table per capture (tens of bytes per block).
WorkTable work_table(const Blocks& B, const std::vector<int64_t>& group_off, int64_t chunk, at::Tensor* keep) {
  const int64_t k = static_cast<int64_t>(group_off.size()) - 1, nb = static_cast<int64_t>(B.J.size());
  // segments: the non-empty intersections of groups and blocks, in column order
  std::vector<int64_t> seg_group, seg_block, seg_col, seg_end, seg_gcol;
  for (int64_t g = 0, b = 0, c = 0; c < B.n;) {
    while (group_off[g + 1] <= c) ++g;
    while (B.off[b + 1] <= c) ++b;
    const int64_t e = std::min(group_off[g + 1], B.off[b + 1]);
    seg_group.push_back(g);
    seg_block.push_back(b);
    seg_col.push_back(c - B.off[b]);
    seg_end.push_back(e - B.off[b]);
    seg_gcol.push_back(c);
    c = e;
  }
  const int64_t S = static_cast<int64_t>(seg_group.size());
  const int64_t size = (S + 1) + 5 * S + (k + 1) + 2 * nb;
  std::vector<int64_t> h(static_cast<size_t>(size), 0);
  int64_t* item_off = h.data();
  int64_t* group_item_off = item_off + (S + 1) + 5 * S;
  for (int64_t s = 0; s < S; ++s) item_off[s + 1] = item_off[s] + (seg_end[s] - seg_col[s] + chunk - 1) / chunk;
  for (int64_t g = 0, s = 0; g < k; ++g) {  // the segments are in group order
    while (s < S && seg_group[s] == g) ++s;
    group_item_off[g + 1] = item_off[s];
  }
  std::copy(seg_group.begin(), seg_group.end(), h.begin() + (S + 1));
  std::copy(seg_block.begin(), seg_block.end(), h.begin() + (S + 1) + S);
  std::copy(seg_col.begin(), seg_col.end(), h.begin() + (S + 1) + 2 * S);
  std::copy(seg_end.begin(), seg_end.end(), h.begin() + (S + 1) + 3 * S);
  std::copy(seg_gcol.begin(), seg_gcol.end(), h.begin() + (S + 1) + 4 * S);
  int64_t* ptr = group_item_off + (k + 1);
  for (int64_t b = 0; b < nb; ++b) {
    ptr[b] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(B.J[b].data_ptr()));
    ptr[nb + b] = B.J[b].stride(0);
  }

  const auto [stream_id, capture_id] = stream_and_capture();
  using Key = std::tuple<int, uint64_t, unsigned long long, std::vector<int64_t>>;
  static std::mutex mu;
  static std::map<Key, std::pair<at::Tensor, at::Tensor>> captured;  // (host, device), never evicted
  std::unique_lock<std::mutex> lock(mu, std::defer_lock);
  Key key;
  if (capture_id != 0) {
    lock.lock();
    key = Key{B.device.index(), stream_id, capture_id, h};
    auto it = captured.find(key);
    if (it != captured.end()) *keep = it->second.second;
  }
  if (!keep->defined()) {
    at::TensorOptions host_options = at::TensorOptions().dtype(at::kLong);
#if !defined(FUSEDJD_SIMT)
    host_options = host_options.pinned_memory(true);  // an asynchronous copy a graph can capture
#endif
    at::Tensor host = at::empty({size}, host_options);
    std::copy(h.begin(), h.end(), host.data_ptr<int64_t>());
    *keep = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(B.device));
    keep->copy_(host, /*non_blocking=*/true);
    if (capture_id != 0) captured.emplace(std::move(key), std::make_pair(host, *keep));
  }
  const int64_t* d = keep->data_ptr<int64_t>();
  WorkTable t;
  t.item_off = d;
  t.group = d + (S + 1);
  t.block = t.group + S;
  t.col = t.block + S;
  t.end = t.col + S;
  t.gcol = t.end + S;
  t.group_item_off = t.gcol + S;
  t.ptr = t.group_item_off + (k + 1);
  t.ld = t.ptr + nb;
  t.segments = S;
  t.chunk = chunk;
  t.items = item_off[S];
  return t;
}

}  // namespace fusedjd::cuda
