// The index's clear and fill kernels (a rebuild from the slot labels) and their launchers.
#include "hash_index_cuda.cuh"

namespace protomem {
namespace {

__global__ void index_clear_kernel(int64_t* keys, int64_t capacity, const int64_t* flag) {
  if (flag && *flag == 0) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < capacity;
       i += int64_t(gridDim.x) * blockDim.x) {
    keys[i] = kEmptyKey;
  }
}

__global__ void index_fill_kernel(int64_t* keys, int64_t* vals, int64_t capacity,
                                  const int64_t* slot_labels, int64_t num_slots,
                                  const int64_t* flag, int64_t* lost) {
  if (flag && *flag == 0) return;
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < num_slots;
       s += int64_t(gridDim.x) * blockDim.x) {
    if (slot_labels[s] < 0) continue;
    if (index_insert(keys, vals, capacity, slot_labels[s], s) == kInsertFailed && lost) {
      atomic_add_i64(lost, 1);
    }
  }
}

}  // namespace

void launch_index_clear(int64_t* keys, int64_t capacity, const int64_t* flag) {
  index_clear_kernel<<<grid_stride_blocks(capacity), kThreads, 0, current_stream()>>>(
      keys, capacity, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_index_fill(int64_t* keys, int64_t* vals, int64_t capacity, const int64_t* slot_labels,
                       int64_t num_slots, const int64_t* flag, int64_t* lost) {
  index_fill_kernel<<<grid_stride_blocks(num_slots), kThreads, 0, current_stream()>>>(
      keys, vals, capacity, slot_labels, num_slots, flag, lost);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace protomem
