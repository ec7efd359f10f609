// Device operations on the label->slot open-addressing index (linear probing, tombstone
// deletion): the twin of csrc/cpu/hash_index_cpu.h. Inserts of distinct absent keys may run
// concurrently (atomicCAS claims an empty or deleted entry); deletions of distinct keys too.
#pragma once
#include <cstdint>

#include "../memory_layout.h"
#include "cuda_utils.cuh"

namespace protomem {

// Inserts a key that is not present; returns true when it reused a tombstone.
__device__ __forceinline__ bool index_insert(int64_t* keys, int64_t* vals, int64_t capacity,
                                             int64_t key, int64_t val) {
  using ull = unsigned long long;
  const int64_t mask = capacity - 1;
  int64_t p = probe_start(key, mask);
  for (int64_t n = 0; n < capacity; ++n, p = (p + 1) & mask) {
    int64_t k = keys[p];
    while (k == kEmptyKey || k == kTombKey) {
      const int64_t prev = static_cast<int64_t>(
          atomicCAS(reinterpret_cast<ull*>(keys + p), static_cast<ull>(k), static_cast<ull>(key)));
      if (prev == k) {
        vals[p] = val;
        return k == kTombKey;
      }
      k = prev;  // another insert claimed it (or it changed kind); look again
    }
  }
  return false;
}

// Clears the table when *flag is set (always when flag is null). Grid-stride over the table.
static __global__ void index_clear_kernel(int64_t* keys, int64_t capacity, const int64_t* flag) {
  if (flag && *flag == 0) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < capacity;
       i += int64_t(gridDim.x) * blockDim.x) {
    keys[i] = kEmptyKey;
  }
}

// Inserts every filled slot when *flag is set (always when flag is null).
static __global__ void index_fill_kernel(int64_t* keys, int64_t* vals, int64_t capacity,
                                  const int64_t* slot_labels, int64_t num_slots,
                                  const int64_t* flag) {
  if (flag && *flag == 0) return;
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < num_slots;
       s += int64_t(gridDim.x) * blockDim.x) {
    if (slot_labels[s] >= 0) index_insert(keys, vals, capacity, slot_labels[s], s);
  }
}

// Rebuilds index from slot_labels on the current stream (conditionally on *flag when given).
inline void launch_index_rebuild(int64_t* keys, int64_t* vals, int64_t capacity,
                                 const int64_t* slot_labels, int64_t num_slots,
                                 const int64_t* flag) {
  auto stream = current_stream();
  index_clear_kernel<<<grid_stride_blocks(capacity), kThreads, 0, stream>>>(keys, capacity, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  index_fill_kernel<<<grid_stride_blocks(num_slots), kThreads, 0, stream>>>(
      keys, vals, capacity, slot_labels, num_slots, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace protomem
