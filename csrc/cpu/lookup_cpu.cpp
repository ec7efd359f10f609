// lookup and rebuild_index_ on CPU: read and rebuild the label->slot index.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "hash_index_cpu.h"

namespace protomem {
namespace {

at::Tensor lookup_cpu(const at::Tensor& index_keys, const at::Tensor& index_vals,
                      const at::Tensor& labels_in) {
  check_index(index_keys, index_vals, /*M=*/-1);
  check_labels(labels_in, "labels");
  check_same_device(labels_in, index_keys, "labels", "index_keys");
  auto labels = labels_in.contiguous();
  auto out = at::empty_like(labels);
  const int64_t* lab = labels.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const HashIndexCPU index{index_keys.data_ptr<int64_t>(), index_vals.data_ptr<int64_t>(),
                           index_keys.size(0)};
  at::parallel_for(0, labels.numel(), 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t at = lab[i] >= 0 ? index.find(lab[i]) : -1;
      o[i] = at >= 0 ? index.vals[at] : -1;
    }
  });
  return out;
}

void rebuild_index_cpu(at::Tensor index_keys, at::Tensor index_vals, const at::Tensor& slot_labels) {
  check_dim(slot_labels, 1, "slot_labels");
  check_dtype(slot_labels, at::kLong, "slot_labels");
  check_index(index_keys, index_vals, slot_labels.size(0));
  check_same_device(slot_labels, index_keys, "slot_labels", "index_keys");
  auto L = slot_labels.contiguous();
  HashIndexCPU index{index_keys.data_ptr<int64_t>(), index_vals.data_ptr<int64_t>(),
                     index_keys.size(0)};
  index.rebuild(L.data_ptr<int64_t>(), L.size(0));
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CPU, m) {
  m.impl("lookup", &lookup_cpu);
  m.impl("rebuild_index_", &rebuild_index_cpu);
}

}  // namespace protomem
