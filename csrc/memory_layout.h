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
  kNumMemoryCounters = 8,
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

// The index is rebuilt once tombstones exceed a quarter of the table. Live keys never exceed
// M <= capacity / 2, so live + tombstones stays below 3/4 and every probe meets an empty key.
PM_HOST_DEVICE bool needs_rebuild(int64_t tombstones, int64_t capacity) {
  return tombstones * 4 > capacity;
}

}  // namespace protomem
