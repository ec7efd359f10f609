// Layout of the prototype-memory state shared by the CPU and CUDA kernels: the counters tensor,
// the label->slot open-addressing index, and the hash used to probe it.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define PM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PM_HOST_DEVICE inline
#endif

namespace protomem {

// Index keys: a class id >= 0, or one of these markers.
constexpr int64_t kEmptyKey = -1;
constexpr int64_t kTombKey = -2;

// Entries of the int64 `counters` tensor of a PrototypeMemory.
enum MemoryCounter : int64_t {
  kHead = 0,        // next ring slot to write
  kStep = 1,        // number of updates so far (the stamp of the next write)
  kHits = 2,        // classes found in memory and refreshed
  kMisses = 3,      // classes enqueued
  kEvictions = 4,   // classes dropped from memory to make room
  kRejected = 5,    // rows never written (non-finite prototype or negative class id)
  kTombstones = 6,  // deleted index entries not yet reused (internal: layout dependent)
  kRebuilds = 7,    // index rebuilds triggered by tombstones (internal: layout dependent)
  kLostInserts = 8, // index inserts that found no free entry (0 unless the state was corrupted)
  kNumMemoryCounters = 9,
};

// Entries of the int64 `counters` tensor of a ClassQueue.
enum QueueCounter : int64_t {
  kQueueHead = 0,      // next ring position to write
  kQueueTotal = 1,     // rows offered so far
  kQueueRejected = 2,  // rows stored as empty (non-finite key or negative label)
  kNumQueueCounters = 3,
};

// splitmix64 finaliser: spreads sequential and strided class ids over the table.
PM_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ULL;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return z;
}

PM_HOST_DEVICE int64_t probe_start(int64_t key, int64_t mask) {
  return static_cast<int64_t>(mix64(static_cast<uint64_t>(key)) & static_cast<uint64_t>(mask));
}

// Table position of `key` in an index of `capacity` (a power of two) entries, or -1. Linear
// probing from the key's hash; bounded by the capacity so a corrupted table cannot hang.
PM_HOST_DEVICE int64_t index_find(const int64_t* keys, int64_t capacity, int64_t key) {
  const int64_t mask = capacity - 1;
  int64_t p = probe_start(key, mask);
  for (int64_t n = 0; n < capacity; ++n, p = (p + 1) & mask) {
    const int64_t k = keys[p];
    if (k == key) return p;
    if (k == kEmptyKey) return -1;
  }
  return -1;
}

// Outcome of inserting an absent key.
enum InsertResult : int { kInsertedEmpty = 0, kInsertedTomb = 1, kInsertFailed = -1 };

// Live keys never exceed M <= capacity / 2. A step inserts its `inserts` new classes only when
// tombstones + inserts <= capacity / 4, so live + tombstones stays at or below 3/4 of the table
// and every probe meets an empty key; otherwise it writes no index entry and rebuilds the index
// from the slot labels instead (which also clears the tombstones).
PM_HOST_DEVICE bool index_rebuild_due(int64_t tombstones, int64_t inserts, int64_t capacity) {
  return (tombstones + inserts) * 4 > capacity;
}

// The ring head as the op uses it: a stored head outside [0, M) (a hand edit, a state from a
// memory of another size) is wrapped into range instead of indexing out of bounds.
PM_HOST_DEVICE int64_t ring_head(int64_t head, int64_t num_slots) {
  return ((head % num_slots) + num_slots) % num_slots;
}

// Scratch of the CUDA memory_update_ for U classes of dimension D, in int64 elements: six [U]
// rows, eight scalars and the [U, D] float32 refreshed prototypes. protomem/ops/memory_update.py
// mirrors this formula.
PM_HOST_DEVICE int64_t memory_workspace_numel(int64_t U, int64_t D) {
  return 6 * U + 8 + (U * D + 1) / 2;
}

}  // namespace protomem
