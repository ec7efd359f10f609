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

  // Inserts a key that is not present; returns true when it reused a tombstone.
  bool insert(int64_t key, int64_t val) {
    const int64_t mask = capacity - 1;
    int64_t p = probe_start(key, mask);
    for (int64_t n = 0; n < capacity; ++n, p = (p + 1) & mask) {
      const int64_t k = keys[p];
      if (k == kEmptyKey || k == kTombKey) {
        keys[p] = key;
        vals[p] = val;
        return k == kTombKey;
      }
    }
    return false;
  }

  // Rebuilds from the slot labels: every slot s with label >= 0 maps label -> s.
  void rebuild(const int64_t* slot_labels, int64_t num_slots) {
    std::fill(keys, keys + capacity, kEmptyKey);
    for (int64_t s = 0; s < num_slots; ++s) {
      if (slot_labels[s] >= 0) insert(slot_labels[s], s);
    }
  }
};

}  // namespace protomem
