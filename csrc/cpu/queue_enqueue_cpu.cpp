// queue_enqueue_ on CPU: per-sample FIFO ring of keys and labels (DCQ), overwriting the oldest.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"

namespace protomem {
namespace {

void queue_enqueue_cpu(at::Tensor queue, at::Tensor queue_labels, at::Tensor counters,
                       const at::Tensor& keys_in, const at::Tensor& labels_in,
                       const c10::optional<at::Tensor>& /*done: CUDA only*/) {
  check_queue_args(queue, queue_labels, counters, keys_in, labels_in);
  const int64_t K = queue.size(0), D = queue.size(1), N = keys_in.size(0);
  auto keys = keys_in.to(at::kFloat).contiguous();
  auto labels = labels_in.contiguous();
  int64_t* C = counters.data_ptr<int64_t>();
  int64_t* QL = queue_labels.data_ptr<int64_t>();
  const float* k = keys.data_ptr<float>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t head = ring_head(C[kQueueHead], K);
  const int64_t first = std::max<int64_t>(0, N - K);  // only the newest K rows survive
  std::vector<uint8_t> ok(N);
  int64_t rejected = 0;
  for (int64_t i = 0; i < N; ++i) {
    ok[i] = lab[i] >= 0;
    for (int64_t d = 0; d < D && ok[i]; ++d) ok[i] = std::isfinite(k[i * D + d]);
    rejected += !ok[i];
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "queue_enqueue_cpu", [&] {
    scalar_t* Q = queue.data_ptr<scalar_t>();
    at::parallel_for(first, N, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = (head + i) % K;
        QL[s] = ok[i] ? lab[i] : -1;
        if (!ok[i]) continue;
        for (int64_t d = 0; d < D; ++d) Q[s * D + d] = static_cast<scalar_t>(k[i * D + d]);
      }
    });
  });
  C[kQueueHead] = (head + N) % K;
  C[kQueueTotal] += N;
  C[kQueueRejected] += rejected;
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CPU, m) { m.impl("queue_enqueue_", &queue_enqueue_cpu); }

}  // namespace protomem
