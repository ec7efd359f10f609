// Device operations on the label->slot open-addressing index (linear probing, tombstone
// deletion): the twin of csrc/cpu/hash_index_cpu.h. Inserts of distinct absent keys may run
// concurrently (atomicCAS claims an empty or deleted entry); deletions of distinct keys too.
// The clear and fill kernels live in hash_index_cuda.cu, behind the launchers declared here.
#pragma once
#include <cstdint>

#include "../memory_layout.h"
#include "cuda_utils.cuh"

namespace protomem {

// Inserts a key that is not present into the first empty or deleted entry of its probe.
__device__ __forceinline__ InsertResult index_insert(int64_t* keys, int64_t* vals,
                                                     int64_t capacity, int64_t key, int64_t val) {
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
        return k == kTombKey ? kInsertedTomb : kInsertedEmpty;
      }
      k = prev;  // another insert claimed it (or it changed kind); look again
    }
  }
  return kInsertFailed;
}

// Sets every key of the table to empty (grid-stride); with `flag`, only when *flag != 0.
void launch_index_clear(int64_t* keys, int64_t capacity, const int64_t* flag);

// Inserts slot s -> slot_labels[s] for every filled slot of a cleared table; with `flag`, only
// when *flag != 0. Inserts that find no free entry are added to *lost when lost is not null.
void launch_index_fill(int64_t* keys, int64_t* vals, int64_t capacity, const int64_t* slot_labels,
                       int64_t num_slots, const int64_t* flag, int64_t* lost);

}  // namespace protomem
