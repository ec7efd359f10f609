// Serial operations on the label->slot open-addressing index (linear probing, tombstone
// deletion). The CUDA twin in csrc/cuda/hash_index_cuda.cuh keeps the same invariants.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../memory_layout.h"

namespace protomem {

struct HashIndexCPU {
  int64_t* keys;
  int64_t* vals;
  int64_t capacity;  // a power of two

  int64_t find(int64_t key) const { return index_find(keys, capacity, key); }

  // Inserts a key that is not present: into the first empty or deleted entry of its probe.
  InsertResult insert(int64_t key, int64_t val) {
    const int64_t mask = capacity - 1;
    int64_t p = probe_start(key, mask);
    for (int64_t n = 0; n < capacity; ++n, p = (p + 1) & mask) {
      const int64_t k = keys[p];
      if (k == kEmptyKey || k == kTombKey) {
        keys[p] = key;
        vals[p] = val;
        return k == kTombKey ? kInsertedTomb : kInsertedEmpty;
      }
    }
    return kInsertFailed;
  }

  // Rebuilds from the slot labels: every slot s with label >= 0 maps label -> s. Returns the
  // number of inserts that found no free entry (0 while num_slots <= capacity).
  int64_t rebuild(const int64_t* slot_labels, int64_t num_slots) {
    std::fill(keys, keys + capacity, kEmptyKey);
    int64_t lost = 0;
    for (int64_t s = 0; s < num_slots; ++s) {
      if (slot_labels[s] >= 0) lost += insert(slot_labels[s], s) == kInsertFailed;
    }
    return lost;
  }
};

}  // namespace protomem
