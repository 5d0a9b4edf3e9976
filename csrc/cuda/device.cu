// Per-device facts and per-grouping device tables, cached for the life of the process.
#include <map>
#include <mutex>
#include <tuple>

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

// How the table cache stays safe without a host sync:
//  (a) CUDA-graph capture: a table made while the stream captures is written only when the graph
//      replays, so it is keyed by the capture's id: no eager call and no other capture is ever
//      handed it, and an eager call after the capture makes (and writes) its own.
//  (b) Nothing is ever evicted: a captured graph may replay at any later time and must find its
//      table (and the pinned host copy its copy node reads) alive. The cache grows by one entry
//      (2(k+1) int64 on the host and the device) per grouping, chunk, stream and capture seen.
//      Cost to know: a table made during a capture comes from that graph's private memory pool,
//      so it keeps one segment of that pool (up to 2 MiB) alive after the graph is destroyed;
//      a program that re-captures fusedjd ops many times grows by that much per capture.
//  (c) Streams: a table is written by an asynchronous copy on the stream of the call that made
//      it and is handed only to calls on that same stream (the stream is part of the key), so
//      stream order puts the write before every read.
at::Tensor group_table(at::IntArrayRef group_sizes, int64_t chunk, const at::Device& device, int64_t* items) {
  using Key = std::tuple<int, uint64_t, unsigned long long, int64_t, std::vector<int64_t>>;
  struct Entry {
    at::Tensor host, dev;
    int64_t items;
  };
  static std::mutex mu;
  static std::map<Key, Entry> cache;
  const auto [stream_id, capture_id] = stream_and_capture();
  Key key{device.index(), stream_id, capture_id, chunk, group_sizes.vec()};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) {
    *items = it->second.items;
    return it->second.dev;
  }
  const int64_t k = static_cast<int64_t>(group_sizes.size());
  at::TensorOptions host_options = at::TensorOptions().dtype(at::kLong);
#if !defined(FUSEDJD_SIMT)
  host_options = host_options.pinned_memory(true);  // an asynchronous copy a graph can capture
#endif
  at::Tensor host = at::empty({2 * (k + 1)}, host_options);
  int64_t* h = host.data_ptr<int64_t>();
  h[0] = 0;
  h[k + 1] = 0;
  for (int64_t g = 0; g < k; ++g) {
    h[g + 1] = h[g] + group_sizes[g];
    h[k + 2 + g] = h[k + 1 + g] + (group_sizes[g] + chunk - 1) / chunk;
  }
  at::Tensor dev = at::empty({2 * (k + 1)}, at::TensorOptions().dtype(at::kLong).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  *items = h[2 * k + 1];
  cache.emplace(std::move(key), Entry{host, dev, *items});
  return dev;
}

}  // namespace fusedjd::cuda
