// Groups the rows of a batch by class with ATen ops that run on every device; the CPU and CUDA
// generate_prototypes kernels then reduce each group in the same (stable, sorted) row order.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"

namespace protomem {

struct ClassSegments {
  at::Tensor classes;  // [U] int64, sorted unique labels
  at::Tensor inverse;  // [B] int64, row -> index into classes
  at::Tensor order;    // [B] int64, rows sorted by class (stable)
  at::Tensor offsets;  // [U + 1] int64, rows of class u are order[offsets[u]:offsets[u+1]]
};

inline void check_generate_args(const at::Tensor& x, const at::Tensor& labels,
                                const c10::optional<at::Tensor>& weights) {
  check_dim(x, 2, "x");
  check_float_dtype(x, "x");
  check_dim(labels, 1, "labels");
  check_labels(labels, "labels");
  check_size(labels, 0, x.size(0), "labels", "x.size(0)");
  check_same_device(labels, x, "labels", "x");
  if (weights.has_value()) {
    check_dim(*weights, 1, "weights");
    check_float_dtype(*weights, "weights");
    check_size(*weights, 0, x.size(0), "weights", "x.size(0)");
    check_same_device(*weights, x, "weights", "x");
  }
}

// Segments padded to the batch: U = B, class u < (number of classes) as above, then class -1
// with an empty segment (offsets B). Shapes do not depend on the data: no host sync.
inline ClassSegments padded_class_segments(const at::Tensor& labels) {
  const int64_t B = labels.size(0);
  ClassSegments seg;
  auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& values = std::get<0>(sorted);
  seg.order = std::get<1>(sorted);
  auto starts = at::ones({B}, labels.options());
  if (B > 1) {
    starts.narrow(0, 1, B - 1).copy_(values.narrow(0, 1, B - 1).ne(values.narrow(0, 0, B - 1)));
  }
  auto class_of_sorted = at::cumsum(starts, 0).sub_(1);  // [B] class index of each sorted row
  seg.classes = at::full({B}, kEmptyKey, labels.options()).scatter_(0, class_of_sorted, values);
  seg.inverse = at::empty_like(labels).scatter_(0, seg.order, class_of_sorted);
  seg.offsets = at::full({B + 1}, B, labels.options())
                    .scatter_reduce_(0, class_of_sorted, at::arange(B, labels.options()), "amin");
  return seg;
}

// Validates generate_prototypes' inputs and groups rows by class. Costs one host sync on CUDA:
// the number of classes U is data dependent, and the same sync checks the values. padded: no
// sync and no check of the values (see padded_class_segments).
inline ClassSegments class_segments(const at::Tensor& x, const at::Tensor& labels,
                                    const c10::optional<at::Tensor>& weights, bool padded) {
  check_generate_args(x, labels, weights);
  if (padded) return padded_class_segments(labels);
  ClassSegments seg;
  auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  seg.order = std::get<1>(sorted);
  auto uc = at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/true,
                                   /*return_counts=*/true);
  seg.classes = std::get<0>(uc);
  seg.inverse = at::empty_like(labels).scatter_(0, seg.order, std::get<1>(uc));
  seg.offsets = at::zeros({seg.classes.size(0) + 1}, labels.options());
  seg.offsets.narrow(0, 1, seg.classes.size(0)).copy_(at::cumsum(std::get<2>(uc), 0));
  if (seg.classes.numel() > 0) {
    auto bad_weight = weights.has_value() ? weights->lt(0).any().to(at::kLong)
                                          : at::zeros({}, labels.options());
    auto flags = at::stack({seg.classes[0], bad_weight}).cpu();
    auto f = flags.accessor<int64_t, 1>();
    TORCH_CHECK_VALUE(f[0] >= 0, "labels must be non-negative class ids, got ", f[0]);
    TORCH_CHECK_VALUE(f[1] == 0, "weights must be non-negative");
  }
  return seg;
}

// Prototypes are float32 for half, bfloat16 and float32 inputs, float64 for float64 inputs.
inline at::ScalarType proto_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace protomem
