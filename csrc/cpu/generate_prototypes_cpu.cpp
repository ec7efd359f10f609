// generate_prototypes on CPU: p_c = normalize(sum_i w_i normalize(x_i) / sum_i w_i) per class.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../class_segments.h"

namespace protomem {
namespace {

constexpr double kEps = 1e-12;  // F.normalize's eps

template <typename scalar_t, typename acc_t>
void generate_cpu_kernel(const at::Tensor& x, const at::Tensor& weights, const ClassSegments& seg,
                         at::Tensor& protos) {
  const int64_t B = x.size(0), D = x.size(1), U = seg.classes.size(0);
  const scalar_t* X = x.data_ptr<scalar_t>();
  const int64_t* order = seg.order.data_ptr<int64_t>();
  const int64_t* offsets = seg.offsets.data_ptr<int64_t>();
  acc_t* P = protos.data_ptr<acc_t>();
  const acc_t* W = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;

  // scale_i = w_i / max(|x_i|, eps)
  std::vector<acc_t> scale(B);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      acc_t ss = 0;
      for (int64_t d = 0; d < D; ++d) {
        acc_t v = static_cast<acc_t>(X[i * D + d]);
        ss += v * v;
      }
      scale[i] = (W ? W[i] : acc_t(1)) / std::max<acc_t>(std::sqrt(ss), acc_t(kEps));
    }
  });
  // Work items (class, 64-column tile), so that one huge class spreads over the threads too;
  // every element sums its class's rows in sorted order whatever the split.
  constexpr int64_t kTile = 64;
  const int64_t tiles = (D + kTile - 1) / kTile;
  at::parallel_for(0, U * tiles, 4, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t u = j / tiles, d0 = (j % tiles) * kTile, d1 = std::min(D, d0 + kTile);
      acc_t* p = P + u * D;
      std::fill(p + d0, p + d1, acc_t(0));
      if (offsets[u] == offsets[u + 1]) continue;  // padding: a zero row
      acc_t wsum = 0;
      for (int64_t k = offsets[u]; k < offsets[u + 1]; ++k) {
        const int64_t i = order[k];
        const acc_t s = scale[i];
        wsum += W ? W[i] : acc_t(1);
        for (int64_t d = d0; d < d1; ++d) p[d] += s * static_cast<acc_t>(X[i * D + d]);
      }
      for (int64_t d = d0; d < d1; ++d) p[d] /= wsum;
    }
  });
  at::parallel_for(0, U, 16, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (offsets[u] == offsets[u + 1]) continue;
      acc_t* p = P + u * D;
      acc_t ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += p[d] * p[d];
      const acc_t inv = acc_t(1) / std::max<acc_t>(std::sqrt(ss), acc_t(kEps));
      for (int64_t d = 0; d < D; ++d) p[d] *= inv;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> generate_prototypes_cpu(
    const at::Tensor& x_in, const at::Tensor& labels, const c10::optional<at::Tensor>& weights_in,
    bool padded) {
  auto seg = class_segments(x_in, labels, weights_in, padded);
  auto x = x_in.contiguous();
  const auto pdt = proto_dtype(x);
  auto protos = at::empty({seg.classes.size(0), x.size(1)}, x.options().dtype(pdt));
  at::Tensor weights;
  if (weights_in.has_value()) weights = weights_in->to(pdt).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "generate_prototypes_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    generate_cpu_kernel<scalar_t, acc_t>(x, weights, seg, protos);
  });
  return {seg.classes, protos, seg.inverse};
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CPU, m) { m.impl("generate_prototypes", &generate_prototypes_cpu); }

}  // namespace protomem
