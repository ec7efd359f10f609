// memory_update_ on CUDA: the phases of csrc/cpu/memory_update_cpu.cpp in three kernels on one
// stream plus a rebuild kernel that returns at once unless due. All state (head, step, counters,
// the commit switch) is read and written on the device: no host sync, no allocation but the
// returned [3, U] tensor when the caller passes a workspace.
//   resolve (warp per class)   : index lookups, previous slot and stamp, refreshed prototype
//   plan    (one block, scans) : free hits' slots (lru) / hold them (fifo), place the written
//                                classes in the window, evict, counters, rebuild decision
//   commit  (warp per class)   : write prototype, label, stamp and index entry; or clear the
//                                index when a rebuild is due
//   fill    (grid stride)      : re-insert every slot's label, only when a rebuild is due
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "hash_index_cuda.cuh"

namespace protomem {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kPlanThreads = 1024;
constexpr float kEps = 1e-12f;

// The workspace (int64 elements, memory_workspace_numel(U, D)): six [U] rows, eight scalars,
// then the [U, D] float32 refreshed prototypes.
struct Workspace {
  int64_t* valid;     // 1 if the class is written this step
  int64_t* pos;       // index position of the class, -1 if absent
  int64_t* old;       // slot before the update, -1 if absent
  int64_t* slot;      // slot after the update (valid classes)
  int64_t* placed_u;  // k -> class u, for the k-th class placed in the window
  int64_t* held;      // fifo: window position r holds a hit of this step
  int64_t* misc;      // [0] stamp of this step's writes, [1] rebuild due
  float* fresh;       // [U, D]

  Workspace(int64_t* w, int64_t U)
      : valid(w), pos(w + U), old(w + 2 * U), slot(w + 3 * U), placed_u(w + 4 * U),
        held(w + 5 * U), misc(w + 6 * U), fresh(reinterpret_cast<float*>(w + 6 * U + 8)) {}
};
constexpr int kMiscStamp = 0, kMiscRebuild = 1;

__device__ __forceinline__ bool committed(const bool* commit) { return commit == nullptr || *commit; }

// out rows: 0 slot after, 1 slot before, 2 stamp before (see the schema).
template <typename scalar_t>
__global__ void resolve_kernel(const scalar_t* __restrict__ P, const float* __restrict__ p,
                               const int64_t* __restrict__ classes, const int64_t* index_keys,
                               const int64_t* index_vals, const int64_t* stamps, int64_t capacity,
                               int64_t U, int64_t D, float momentum, const bool* commit,
                               Workspace ws, int64_t* out) {
  const int64_t u = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (u >= U) return;
  const int64_t c = classes[u];
  int64_t pos = -1, old = -1;
  if (lane == 0 && c >= 0) {
    pos = index_find(index_keys, capacity, c);
    old = pos >= 0 ? index_vals[pos] : -1;
  }
  pos = __shfl_sync(0xffffffffu, pos, 0);
  old = __shfl_sync(0xffffffffu, old, 0);
  const float* pu = p + u * D;
  bool finite = true;
  for (int64_t d = lane; d < D; d += kWarp) finite &= isfinite(pu[d]);
  const bool active = committed(commit);
  const bool valid = active && c >= 0 && __all_sync(0xffffffffu, finite);
  if (lane == 0) {
    ws.valid[u] = valid;
    ws.pos[u] = pos;
    ws.old[u] = old;
    out[U + u] = old;
    out[2 * U + u] = old >= 0 ? stamps[old] : -1;
    if (!active) out[u] = old;
  }
  if (!valid) return;
  const float a = old >= 0 ? momentum : 0.f;
  float ss = 0.f;
  for (int64_t d = lane; d < D; d += kWarp) {
    const float prev = old >= 0 ? static_cast<float>(P[old * D + d]) : 0.f;
    const float v = a * prev + (1.f - a) * pu[d];
    ws.fresh[u * D + d] = v;
    ss += v * v;
  }
  const float inv = 1.f / fmaxf(sqrtf(warp_sum(ss)), kEps);
  for (int64_t d = lane; d < D; d += kWarp) ws.fresh[u * D + d] *= inv;
}

// One block of kPlanThreads. Loops over classes (u) or window positions (r) stride blockDim.
__global__ void __launch_bounds__(kPlanThreads)
plan_kernel(int64_t* slot_labels, int64_t* index_keys, int64_t capacity, int64_t* counters,
            const int64_t* classes, int64_t M, int64_t U, bool lru, const bool* commit,
            Workspace ws, int64_t* out) {
  const int t = threadIdx.x, n = blockDim.x;
  if (!committed(commit)) {  // nothing changes; resolve wrote the outputs
    if (t == 0) ws.misc[kMiscRebuild] = 0;
    return;
  }
  const int64_t head = ring_head(counters[kHead], M);
  int64_t hits = 0, n_valid = 0, inserts = 0, padding = 0, evictions = 0;
  for (int64_t u = t; u < U; u += n) {
    const bool valid = ws.valid[u], hit = valid && ws.old[u] >= 0;
    padding += classes[u] == kEmptyKey;
    n_valid += valid;
    hits += hit;
    inserts += valid && ws.pos[u] < 0;
    if (!lru) ws.held[u] = 0;
    if (lru && hit) slot_labels[ws.old[u]] = -1;  // the class moves into the window
  }
  __syncthreads();
  if (!lru) {  // hits stay in place; window positions they occupy are skipped
    for (int64_t u = t; u < U; u += n) {
      if (!ws.valid[u] || ws.old[u] < 0) continue;
      ws.slot[u] = ws.old[u];
      const int64_t r = (ws.old[u] - head + M) % M;
      if (r < U) ws.held[r] = 1;
    }
    __syncthreads();
  }
  // k-th written class (lru: every valid one; fifo: the misses) -> its rank k
  int64_t n_placed = 0;
  for (int64_t base = 0; base < U; base += n) {
    const int64_t u = base + t;
    const bool placed = u < U && ws.valid[u] && (lru || ws.old[u] < 0);
    int64_t tile = 0;
    const int64_t k = n_placed + block_exclusive_scan(placed, &tile);
    if (placed) ws.placed_u[k] = u;
    n_placed += tile;
  }
  __syncthreads();
  // the k-th free window position r takes the k-th placed class, evicting the slot's occupant
  __shared__ int64_t new_head;
  if (t == 0) new_head = head;
  int64_t n_free = 0;
  for (int64_t base = 0; base < U && n_free < n_placed; base += n) {
    const int64_t r = base + t;
    const bool free = r < U && (lru || !ws.held[r]);
    int64_t tile = 0;
    const int64_t k = n_free + block_exclusive_scan(free, &tile);
    n_free += tile;
    if (!free || k >= n_placed) continue;
    const int64_t s = (head + r) % M;
    ws.slot[ws.placed_u[k]] = s;
    const int64_t occupant = slot_labels[s];
    if (occupant >= 0) {
      const int64_t at = index_find(index_keys, capacity, occupant);
      if (at >= 0) index_keys[at] = kTombKey;
      slot_labels[s] = -1;
      ++evictions;
    }
    if (k == n_placed - 1) new_head = (s + 1) % M;
  }
  __syncthreads();
  // a rejected class keeps its old slot unless this step evicted it
  for (int64_t u = t; u < U; u += n) {
    const int64_t old = ws.old[u];
    out[u] = ws.valid[u] ? ws.slot[u]
                         : (old >= 0 && slot_labels[old] == classes[u] ? old : -1);
  }
  int64_t sums[5] = {hits, n_valid, inserts, padding, evictions};
  block_sum_each(sums);
  hits = sums[0], n_valid = sums[1], inserts = sums[2], padding = sums[3], evictions = sums[4];
  if (t != 0) return;
  int64_t* C = counters;
  ws.misc[kMiscStamp] = C[kStep];
  if (n_placed > 0) C[kHead] = new_head;
  C[kStep] += 1;
  C[kHits] += hits;
  C[kMisses] += n_valid - hits;
  C[kEvictions] += evictions;
  C[kRejected] += U - n_valid - padding;
  C[kTombstones] += evictions;
  const bool rebuild = index_rebuild_due(C[kTombstones], inserts, capacity);
  ws.misc[kMiscRebuild] = rebuild;
  if (rebuild) {
    C[kTombstones] = 0;
    C[kRebuilds] += 1;
  }
}

// Grid: at least one warp per class, and enough threads to clear the table when due.
template <typename scalar_t>
__global__ void commit_kernel(scalar_t* __restrict__ P, int64_t* slot_labels, int64_t* stamps,
                              int64_t* index_keys, int64_t* index_vals, int64_t capacity,
                              int64_t* counters, const int64_t* __restrict__ classes, int64_t U,
                              int64_t D, Workspace ws) {
  const bool rebuild = ws.misc[kMiscRebuild] != 0;
  if (rebuild) {  // no index entry is written this step: the fill kernel rebuilds the table
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < capacity;
         i += int64_t(gridDim.x) * blockDim.x) {
      index_keys[i] = kEmptyKey;
    }
  }
  const int64_t u = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (u >= U || !ws.valid[u]) return;
  const int64_t s = ws.slot[u];
  for (int64_t d = lane; d < D; d += kWarp) P[s * D + d] = static_cast<scalar_t>(ws.fresh[u * D + d]);
  if (lane != 0) return;
  slot_labels[s] = classes[u];
  stamps[s] = ws.misc[kMiscStamp];
  if (rebuild) return;
  if (ws.pos[u] >= 0) {
    index_vals[ws.pos[u]] = s;
    return;
  }
  const InsertResult r = index_insert(index_keys, index_vals, capacity, classes[u], s);
  if (r == kInsertedTomb) atomic_add_i64(counters + kTombstones, -1);
  if (r == kInsertFailed) atomic_add_i64(counters + kLostInserts, 1);
}

at::Tensor workspace_for(const c10::optional<at::Tensor>& workspace, int64_t U, int64_t D,
                         const at::Tensor& protos) {
  const int64_t need = memory_workspace_numel(U, D);
  if (!workspace.has_value()) return at::empty({need}, protos.options().dtype(at::kLong));
  check_dtype(*workspace, at::kLong, "workspace");
  check_same_device(*workspace, protos, "workspace", "protos");
  check_contiguous(*workspace, "workspace");
  TORCH_CHECK_VALUE(workspace->numel() >= need, "workspace must hold at least ", need,
                    " int64 elements for ", U, " classes of dimension ", D, ", got ",
                    workspace->numel());
  return *workspace;
}

at::Tensor memory_update_cuda(at::Tensor protos, at::Tensor slot_labels, at::Tensor stamps,
                              at::Tensor index_keys, at::Tensor index_vals, at::Tensor counters,
                              const at::Tensor& classes_in, const at::Tensor& new_protos,
                              double momentum, c10::string_view policy,
                              const c10::optional<at::Tensor>& commit,
                              const c10::optional<at::Tensor>& workspace) {
  check_memory_update_args(protos, slot_labels, stamps, index_keys, index_vals, counters,
                           classes_in, new_protos, momentum, policy);
  check_commit(commit, protos);
  const c10::cuda::CUDAGuard guard(protos.device());
  if (debug_checks_enabled()) check_distinct_classes(classes_in);
  const int64_t M = protos.size(0), D = protos.size(1), U = classes_in.size(0);
  const int64_t T = index_keys.size(0);
  const bool lru = policy == "lru";
  auto classes = classes_in.contiguous();
  auto p = new_protos.to(at::kFloat).contiguous();
  auto out = at::empty({3, U}, classes.options());
  auto ws_tensor = workspace_for(workspace, U, D, protos);
  Workspace ws(ws_tensor.data_ptr<int64_t>(), U);
  const bool* flag = commit.has_value() ? commit->data_ptr<bool>() : nullptr;
  int64_t* C = counters.data_ptr<int64_t>();
  int64_t* L = slot_labels.data_ptr<int64_t>();
  int64_t* keys = index_keys.data_ptr<int64_t>();
  int64_t* vals = index_vals.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  auto stream = current_stream();
  const int64_t warp_blocks = blocks_for(U, kWarpsPerBlock);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "memory_update_cuda", [&] {
    if (U > 0) {
      resolve_kernel<scalar_t><<<warp_blocks, kThreads, 0, stream>>>(
          protos.data_ptr<scalar_t>(), p.data_ptr<float>(), classes.data_ptr<int64_t>(), keys,
          vals, stamps.data_ptr<int64_t>(), T, U, D, static_cast<float>(momentum), flag, ws, o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    plan_kernel<<<1, kPlanThreads, 0, stream>>>(L, keys, T, C, classes.data_ptr<int64_t>(), M, U,
                                                lru, flag, ws, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t commit_blocks = std::max<int64_t>(warp_blocks, sm_count());
    commit_kernel<scalar_t><<<commit_blocks, kThreads, 0, stream>>>(
        protos.data_ptr<scalar_t>(), L, stamps.data_ptr<int64_t>(), keys, vals, T, C,
        classes.data_ptr<int64_t>(), U, D, ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_index_fill(keys, vals, T, L, M, ws.misc + kMiscRebuild, C + kLostInserts);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CUDA, m) { m.impl("memory_update_", &memory_update_cuda); }

}  // namespace protomem
