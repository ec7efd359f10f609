// queue_enqueue_ on CUDA: a warp per row writes the newest K rows at the ring head; a
// one-thread kernel then advances head and the counters (all on the device).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace protomem {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;

template <typename scalar_t>
__global__ void enqueue_kernel(scalar_t* __restrict__ Q, int64_t* queue_labels, int64_t* counters,
                               const float* __restrict__ keys, const int64_t* labels, int64_t N,
                               int64_t K, int64_t D) {
  const int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  bool finite = true;
  for (int64_t d = lane; d < D; d += kWarp) finite &= isfinite(keys[i * D + d]);
  const bool ok = labels[i] >= 0 && __all_sync(0xffffffffu, finite);
  if (lane == 0 && !ok) atomic_add_i64(counters + kQueueRejected, 1);
  if (i < N - K) return;  // overwritten within this call
  const int64_t s = (counters[kQueueHead] + i) % K;
  if (lane == 0) queue_labels[s] = ok ? labels[i] : -1;
  if (!ok) return;
  for (int64_t d = lane; d < D; d += kWarp) Q[s * D + d] = static_cast<scalar_t>(keys[i * D + d]);
}

__global__ void advance_kernel(int64_t* counters, int64_t N, int64_t K) {
  counters[kQueueHead] = (counters[kQueueHead] + N) % K;
  counters[kQueueTotal] += N;
}

void queue_enqueue_cuda(at::Tensor queue, at::Tensor queue_labels, at::Tensor counters,
                        const at::Tensor& keys_in, const at::Tensor& labels_in) {
  check_queue_args(queue, queue_labels, counters, keys_in, labels_in);
  const c10::cuda::CUDAGuard guard(queue.device());
  const int64_t K = queue.size(0), D = queue.size(1), N = keys_in.size(0);
  if (N == 0) return;
  auto keys = keys_in.to(at::kFloat).contiguous();
  auto labels = labels_in.contiguous();
  auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "queue_enqueue_cuda", [&] {
    enqueue_kernel<scalar_t><<<blocks_for(N, kWarpsPerBlock), kThreads, 0, stream>>>(
        queue.data_ptr<scalar_t>(), queue_labels.data_ptr<int64_t>(),
        counters.data_ptr<int64_t>(), keys.data_ptr<float>(), labels.data_ptr<int64_t>(), N, K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  advance_kernel<<<1, 1, 0, stream>>>(counters.data_ptr<int64_t>(), N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CUDA, m) { m.impl("queue_enqueue_", &queue_enqueue_cuda); }

}  // namespace protomem
