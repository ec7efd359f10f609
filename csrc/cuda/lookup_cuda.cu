// lookup and rebuild_index_ on CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "hash_index_cuda.cuh"

namespace protomem {
namespace {

__global__ void lookup_kernel(const int64_t* keys, const int64_t* vals, int64_t capacity,
                              const int64_t* labels, int64_t n, int64_t* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t at = labels[i] >= 0 ? index_find(keys, capacity, labels[i]) : -1;
  out[i] = at >= 0 ? vals[at] : -1;
}

at::Tensor lookup_cuda(const at::Tensor& index_keys, const at::Tensor& index_vals,
                       const at::Tensor& labels_in) {
  check_index(index_keys, index_vals, /*M=*/-1);
  check_labels(labels_in, "labels");
  check_same_device(labels_in, index_keys, "labels", "index_keys");
  const c10::cuda::CUDAGuard guard(index_keys.device());
  auto labels = labels_in.contiguous();
  auto out = at::empty_like(labels);
  const int64_t n = labels.numel();
  if (n == 0) return out;
  lookup_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
      index_keys.data_ptr<int64_t>(), index_vals.data_ptr<int64_t>(), index_keys.size(0),
      labels.data_ptr<int64_t>(), n, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void rebuild_index_cuda(at::Tensor index_keys, at::Tensor index_vals,
                        const at::Tensor& slot_labels) {
  check_dim(slot_labels, 1, "slot_labels");
  check_dtype(slot_labels, at::kLong, "slot_labels");
  check_index(index_keys, index_vals, slot_labels.size(0));
  check_same_device(slot_labels, index_keys, "slot_labels", "index_keys");
  const c10::cuda::CUDAGuard guard(index_keys.device());
  auto L = slot_labels.contiguous();
  launch_index_clear(index_keys.data_ptr<int64_t>(), index_keys.size(0), /*flag=*/nullptr);
  launch_index_fill(index_keys.data_ptr<int64_t>(), index_vals.data_ptr<int64_t>(),
                    index_keys.size(0), L.data_ptr<int64_t>(), L.size(0), /*flag=*/nullptr,
                    /*lost=*/nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CUDA, m) {
  m.impl("lookup", &lookup_cuda);
  m.impl("rebuild_index_", &rebuild_index_cuda);
}

}  // namespace protomem
