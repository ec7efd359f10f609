// memory_update_ on CUDA: the phases of csrc/cpu/memory_update_cpu.cpp as kernels on one stream,
// with all state (head, step, counters) read and written on the device: no host sync.
//   resolve (warp per class)  -> ranks of the placed classes (cumsum)
//   mark    (thread per class) : free a hit's old slot (lru) / hold it (fifo)
//   assign  (thread per window position) : k-th placed class -> k-th position not held; evict
//   commit  (warp per class)  : write prototype, label, stamp, index entry
//   finish  (thread per class) : outputs, head, step, rebuild decision -> conditional rebuild
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "hash_index_cuda.cuh"

namespace protomem {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr float kEps = 1e-12f;

// Per-class scratch: each an int64 [U] row of one tensor.
struct Scratch {
  int64_t* valid;     // 1 if written this step
  int64_t* pos;       // index position of the class, -1 if absent
  int64_t* old;       // slot before the update, -1 if absent
  int64_t* slot;      // slot after the update
  int64_t* placed;    // 1 if it takes a window slot
  int64_t* placed_u;  // k -> class u, for the k-th placed class
  int64_t* misc;      // [0] = new head, [1] = rebuild flag
};

template <typename scalar_t>
__global__ void resolve_kernel(const scalar_t* __restrict__ P, const float* __restrict__ p,
                               const int64_t* __restrict__ classes, const int64_t* index_keys,
                               const int64_t* index_vals, int64_t capacity, int64_t U, int64_t D,
                               float momentum, bool lru, Scratch sc, float* __restrict__ fresh,
                               int64_t* counters) {
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
  const bool valid = c >= 0 && __all_sync(0xffffffffu, finite);
  if (lane == 0) {
    sc.valid[u] = valid;
    sc.pos[u] = pos;
    sc.old[u] = old;
    sc.placed[u] = valid && (lru || old < 0);
    atomic_add_i64(counters + (!valid ? kRejected : old >= 0 ? kHits : kMisses), 1);
  }
  if (!valid) return;
  const float a = old >= 0 ? momentum : 0.f;
  float ss = 0.f;
  for (int64_t d = lane; d < D; d += kWarp) {
    const float prev = old >= 0 ? static_cast<float>(P[old * D + d]) : 0.f;
    const float v = a * prev + (1.f - a) * pu[d];
    fresh[u * D + d] = v;
    ss += v * v;
  }
  const float inv = 1.f / fmaxf(sqrtf(warp_sum(ss)), kEps);
  for (int64_t d = lane; d < D; d += kWarp) fresh[u * D + d] *= inv;
}

__global__ void mark_kernel(int64_t* slot_labels, const int64_t* counters, int64_t M, int64_t U,
                            bool lru, Scratch sc, const int64_t* rank, int64_t* held) {
  const int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (u >= U) return;
  const int64_t old = sc.old[u];
  if (sc.valid[u] && old >= 0) {
    if (lru) {
      slot_labels[old] = -1;
    } else {
      sc.slot[u] = old;
      const int64_t r = (old - counters[kHead] + M) % M;
      if (r < U) held[r] = 1;
    }
  }
  if (sc.placed[u]) sc.placed_u[rank[u] - 1] = u;
}

__global__ void assign_kernel(int64_t* slot_labels, int64_t* index_keys, int64_t capacity,
                              int64_t* counters, int64_t M, int64_t U, Scratch sc,
                              const int64_t* rank, const int64_t* held, const int64_t* free_rank) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= U) return;
  if (held && held[r]) return;
  const int64_t n_placed = rank[U - 1];
  const int64_t k = (free_rank ? free_rank[r] : r + 1) - 1;
  if (k >= n_placed) return;
  const int64_t head = counters[kHead];
  const int64_t s = (head + r) % M;
  sc.slot[sc.placed_u[k]] = s;
  const int64_t occupant = slot_labels[s];
  if (occupant >= 0) {
    const int64_t at = index_find(index_keys, capacity, occupant);
    if (at >= 0) index_keys[at] = kTombKey;
    atomic_add_i64(counters + kEvictions, 1);
    atomic_add_i64(counters + kTombstones, 1);
  }
  if (k == n_placed - 1) sc.misc[0] = (head + r + 1) % M;
}

template <typename scalar_t>
__global__ void commit_kernel(scalar_t* __restrict__ P, int64_t* slot_labels, int64_t* stamps,
                              int64_t* index_keys, int64_t* index_vals, int64_t capacity,
                              int64_t* counters, const int64_t* __restrict__ classes, int64_t U,
                              int64_t D, Scratch sc, const float* __restrict__ fresh) {
  const int64_t u = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (u >= U || !sc.valid[u]) return;
  const int64_t s = sc.slot[u];
  for (int64_t d = lane; d < D; d += kWarp) P[s * D + d] = static_cast<scalar_t>(fresh[u * D + d]);
  if (lane != 0) return;
  slot_labels[s] = classes[u];
  stamps[s] = counters[kStep];
  if (sc.pos[u] >= 0) {
    index_vals[sc.pos[u]] = s;
  } else if (index_insert(index_keys, index_vals, capacity, classes[u], s)) {
    atomic_add_i64(counters + kTombstones, -1);
  }
}

__global__ void finish_kernel(const int64_t* slot_labels, int64_t* counters, int64_t capacity,
                              const int64_t* classes, int64_t U, Scratch sc, const int64_t* rank,
                              int64_t* out) {
  const int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (u < U) {
    const int64_t old = sc.old[u];
    out[u] = sc.valid[u] ? sc.slot[u]
                         : (old >= 0 && slot_labels[old] == classes[u] ? old : -1);
  }
  if (u == 0) {
    if (rank[U - 1] > 0) counters[kHead] = sc.misc[0];
    counters[kStep] += 1;
    const bool rebuild = needs_rebuild(counters[kTombstones], capacity);
    sc.misc[1] = rebuild;
    if (rebuild) {
      counters[kTombstones] = 0;
      counters[kRebuilds] += 1;
    }
  }
}

at::Tensor memory_update_cuda(at::Tensor protos, at::Tensor slot_labels, at::Tensor stamps,
                              at::Tensor index_keys, at::Tensor index_vals, at::Tensor counters,
                              const at::Tensor& classes_in, const at::Tensor& new_protos,
                              double momentum, c10::string_view policy) {
  check_memory_update_args(protos, slot_labels, stamps, index_keys, index_vals, counters,
                           classes_in, new_protos, momentum, policy);
  const c10::cuda::CUDAGuard guard(protos.device());
  const int64_t M = protos.size(0), D = protos.size(1), U = classes_in.size(0);
  const int64_t T = index_keys.size(0);
  const bool lru = policy == "lru";
  auto out = at::empty({U}, classes_in.options());
  if (U == 0) {
    counters.select(0, kStep).add_(1);
    return out;
  }
  auto classes = classes_in.contiguous();
  auto p = new_protos.to(at::kFloat).contiguous();
  auto fresh = at::empty({U, D}, p.options());
  auto buf = at::empty({6 * U + 2}, classes.options());
  int64_t* b = buf.data_ptr<int64_t>();
  Scratch sc{b, b + U, b + 2 * U, b + 3 * U, b + 4 * U, b + 5 * U, b + 6 * U};
  int64_t* C = counters.data_ptr<int64_t>();
  int64_t* L = slot_labels.data_ptr<int64_t>();
  int64_t* keys = index_keys.data_ptr<int64_t>();
  int64_t* vals = index_vals.data_ptr<int64_t>();
  auto stream = current_stream();
  const int64_t warp_blocks = blocks_for(U, kWarpsPerBlock);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "memory_resolve", [&] {
    resolve_kernel<scalar_t><<<warp_blocks, kThreads, 0, stream>>>(
        protos.data_ptr<scalar_t>(), p.data_ptr<float>(), classes.data_ptr<int64_t>(), keys, vals,
        T, U, D, static_cast<float>(momentum), lru, sc, fresh.data_ptr<float>(), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto rank = at::cumsum(buf.narrow(0, 4 * U, U), 0);
  at::Tensor held, free_rank;
  if (!lru) held = at::zeros({U}, classes.options());
  mark_kernel<<<blocks_for(U), kThreads, 0, stream>>>(
      L, C, M, U, lru, sc, rank.data_ptr<int64_t>(), lru ? nullptr : held.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!lru) free_rank = at::cumsum(1 - held, 0);
  assign_kernel<<<blocks_for(U), kThreads, 0, stream>>>(
      L, keys, T, C, M, U, sc, rank.data_ptr<int64_t>(),
      lru ? nullptr : held.data_ptr<int64_t>(), lru ? nullptr : free_rank.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "memory_commit", [&] {
    commit_kernel<scalar_t><<<warp_blocks, kThreads, 0, stream>>>(
        protos.data_ptr<scalar_t>(), L, stamps.data_ptr<int64_t>(), keys, vals, T, C,
        classes.data_ptr<int64_t>(), U, D, sc, fresh.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_kernel<<<blocks_for(U), kThreads, 0, stream>>>(
      L, C, T, classes.data_ptr<int64_t>(), U, sc, rank.data_ptr<int64_t>(),
      out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_index_rebuild(keys, vals, T, L, M, sc.misc + 1);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CUDA, m) { m.impl("memory_update_", &memory_update_cuda); }

}  // namespace protomem
