// Per-device facts (cached for the life of the process) and the work tables of the kernels.
#include <algorithm>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

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

#if !defined(FUSEDJD_SIMT)
bool capture_active(const at::Device& device) {
  const c10::cuda::CUDAStream s = c10::cuda::getCurrentCUDAStream(device.index());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(s.stream(), &status));
  return status == cudaStreamCaptureStatusActive;
}
#endif

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
//  - its values travel as the parameters of a small kernel that writes them into device memory
//    (write_table_kernel, 480 values a launch): no pinned host buffer, no copy, nothing a CUDA
//    graph cannot capture (a captured launch keeps its parameters: each replay writes the same
//    table), and stream order puts the write before every kernel of the call that reads it;
//  - the device copies are cached, keyed by the device, the stream and the table's content (the
//    blocks' addresses included): a training loop that calls with the same layout, whose tensors
//    the caching allocator places at the same addresses step after step, finds its table on the
//    device and launches nothing for it. At most kEagerTables tables are kept; the oldest is
//    dropped first (its device memory returns to the caching allocator, stream-ordered after the
//    kernels already queued on that stream, the only stream that reads it);
//  - a table used by a CUDA-graph capture must live as long as the graph: it is kept for the life
//    of the process. One first made during a capture is written only when that graph replays, so
//    it is keyed by the capture too: an eager call or another capture never takes it unwritten. Cost to know: a program that captures fusedjd ops over new tensors many
//    times grows by one table per capture (tens of bytes per block).
constexpr int kTablePiece = 480;  // 3840 bytes: with the other parameters, under the 4 KiB limit
struct TablePiece {
  int64_t v[kTablePiece];
};

__global__ void write_table_kernel(TablePiece piece, int64_t count, int64_t* dst) {
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) dst[i] = piece.v[i];
}

namespace {

constexpr size_t kEagerTables = 64;
int64_t g_table_writes = 0;  // work tables written to the device so far

// `capture`: 0 for a table written eagerly; the capture's id for one first made during a capture,
// whose write kernels run only when that graph replays: no other call may take it before then (an
// eager call, another capture, or a retry after the capture was abandoned).
struct TableKey {
  int device;
  uint64_t stream;
  unsigned long long capture;
  std::vector<int64_t> content;
  bool operator==(const TableKey& o) const {
    return device == o.device && stream == o.stream && capture == o.capture && content == o.content;
  }
};

struct TableKeyHash {
  size_t operator()(const TableKey& k) const {
    uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(k.device) ^ (k.stream * 0x9E3779B97F4A7C15ull) ^
                 (static_cast<uint64_t>(k.capture) * 0xC2B2AE3D27D4EB4Full);
    for (const int64_t v : k.content) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

struct CachedTable {
  at::Tensor device;
  bool permanent = false;   // used by a capture: never dropped
  uint64_t last_use = 0;
};

std::mutex g_tables_mu;
std::unordered_map<TableKey, CachedTable, TableKeyHash> g_tables;
uint64_t g_table_clock = 0;
size_t g_eager_tables = 0;

// Drops the least recently used non-permanent table while more than kEagerTables are kept.
void evict_tables() {
  while (g_eager_tables > kEagerTables) {
    auto oldest = g_tables.end();
    for (auto it = g_tables.begin(); it != g_tables.end(); ++it)
      if (!it->second.permanent && (oldest == g_tables.end() || it->second.last_use < oldest->second.last_use))
        oldest = it;
    if (oldest == g_tables.end()) return;
    g_tables.erase(oldest);
    --g_eager_tables;
  }
}

}  // namespace

int64_t work_table_writes() {
  const std::lock_guard<std::mutex> lock(g_tables_mu);
  return g_table_writes;
}

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
  const int64_t size = (S + 1) + 5 * S + (k + 1) + 3 * nb;
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
    ptr[2 * nb + b] = packed_head(B.J[b]);
  }
  const int64_t items = item_off[S];

  const auto [stream_id, capture_id] = stream_and_capture();
  const std::lock_guard<std::mutex> lock(g_tables_mu);
  // an eagerly written table serves every call on its stream, captures included; one made during a
  // capture serves that capture only
  TableKey key{static_cast<int>(B.device.index()), stream_id, 0ull, std::move(h)};
  auto it = g_tables.find(key);
  if (it == g_tables.end() && capture_id != 0) {
    key.capture = capture_id;
    it = g_tables.find(key);
  }
  if (it == g_tables.end()) {
    CachedTable entry;
    entry.device = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(B.device));
    int64_t* dst = entry.device.data_ptr<int64_t>();
    for (int64_t pos = 0; pos < size; pos += kTablePiece) {
      TablePiece piece;
      const int64_t count = std::min<int64_t>(kTablePiece, size - pos);
      std::copy(key.content.begin() + pos, key.content.begin() + pos + count, piece.v);
      launch("write_table_kernel", write_table_kernel, dim3(1), dim3(128), 0, piece, count, dst + pos);
    }
    ++g_table_writes;
    ++g_eager_tables;
    it = g_tables.emplace(std::move(key), std::move(entry)).first;
  }
  CachedTable& entry = it->second;
  entry.last_use = ++g_table_clock;
  if (capture_id != 0 && !entry.permanent) {
    entry.permanent = true;
    --g_eager_tables;
  }
  *keep = entry.device;
  evict_tables();
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
  t.head = t.ld + nb;
  t.segments = S;
  t.chunk = chunk;
  t.items = items;
  return t;
}

}  // namespace fusedjd::cuda
