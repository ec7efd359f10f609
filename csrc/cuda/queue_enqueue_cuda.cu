// queue_enqueue_ on CUDA: a warp per row writes the newest K rows at the ring head, and the last
// row to finish advances head and the counters (all on the device, one kernel when given the
// `done` ticket; a second one-thread kernel otherwise).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace protomem {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;

// Warp per row. Every warp reads the head first; the warp that finishes last (the N-th to take
// a ticket from `done`) advances head and total and puts `done` back to zero.
template <typename scalar_t>
__global__ void enqueue_kernel(scalar_t* __restrict__ Q, int64_t* queue_labels, int64_t* counters,
                               const float* __restrict__ keys, const int64_t* labels, int64_t N,
                               int64_t K, int64_t D, unsigned long long* done) {
  const int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  const int64_t head = ring_head(counters[kQueueHead], K);
  bool finite = true;
  for (int64_t d = lane; d < D; d += kWarp) finite &= isfinite(keys[i * D + d]);
  const bool ok = labels[i] >= 0 && __all_sync(0xffffffffu, finite);
  if (lane == 0 && !ok) atomic_add_i64(counters + kQueueRejected, 1);
  if (i >= N - K) {  // rows before N - K are overwritten within this call
    const int64_t s = (head + i) % K;
    if (lane == 0) queue_labels[s] = ok ? labels[i] : -1;
    if (ok) {
      for (int64_t d = lane; d < D; d += kWarp) Q[s * D + d] = static_cast<scalar_t>(keys[i * D + d]);
    }
  }
  if (lane != 0 || done == nullptr) return;
  __threadfence();  // this warp's read of the head happens before its ticket
  if (atomicAdd(done, 1ull) == static_cast<unsigned long long>(N - 1)) {
    counters[kQueueHead] = (head + N) % K;
    counters[kQueueTotal] += N;
    *done = 0;
  }
}

__global__ void advance_kernel(int64_t* counters, int64_t N, int64_t K) {
  counters[kQueueHead] = (ring_head(counters[kQueueHead], K) + N) % K;
  counters[kQueueTotal] += N;
}

void queue_enqueue_cuda(at::Tensor queue, at::Tensor queue_labels, at::Tensor counters,
                        const at::Tensor& keys_in, const at::Tensor& labels_in,
                        const c10::optional<at::Tensor>& done) {
  check_queue_args(queue, queue_labels, counters, keys_in, labels_in);
  if (done.has_value()) {
    check_dtype(*done, at::kLong, "done");
    TORCH_CHECK_VALUE(done->numel() == 1, "done must hold one element, got shape ", done->sizes());
    check_same_device(*done, queue, "done", "queue");
  }
  const c10::cuda::CUDAGuard guard(queue.device());
  const int64_t K = queue.size(0), D = queue.size(1), N = keys_in.size(0);
  if (N == 0) return;
  auto keys = keys_in.to(at::kFloat).contiguous();
  auto labels = labels_in.contiguous();
  auto stream = current_stream();
  auto* ticket = done.has_value() ? reinterpret_cast<unsigned long long*>(done->data_ptr<int64_t>())
                                  : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "queue_enqueue_cuda", [&] {
    enqueue_kernel<scalar_t><<<blocks_for(N, kWarpsPerBlock), kThreads, 0, stream>>>(
        queue.data_ptr<scalar_t>(), queue_labels.data_ptr<int64_t>(),
        counters.data_ptr<int64_t>(), keys.data_ptr<float>(), labels.data_ptr<int64_t>(), N, K, D,
        ticket);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (ticket == nullptr) {  // no ticket: a second kernel advances the ring after every read
    advance_kernel<<<1, 1, 0, stream>>>(counters.data_ptr<int64_t>(), N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CUDA, m) { m.impl("queue_enqueue_", &queue_enqueue_cuda); }

}  // namespace protomem
