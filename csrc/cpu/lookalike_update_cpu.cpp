// lookalike_update_ on CPU: the doppelganger lists' update from a step's (row class, closest
// other class, cosine) pairs; the rule is protomem/reference.py::lookalike_update_ref, float for
// float. A host op: the lists live in host memory whatever the device of the training.
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../checks.h"

namespace protomem {
namespace {

struct Pair {
  int64_t a, b;
  float ev;
};

struct Cand {
  int64_t id;
  float score;
};

void lookalike_update_cpu(at::Tensor others, at::Tensor scores, const at::Tensor& rows_in,
                          const at::Tensor& other_in, const at::Tensor& cos_in, double decay,
                          bool symmetric) {
  check_dtype(others, at::kInt, "others");
  check_dtype(scores, at::kHalf, "scores");
  check_dim(others, 2, "others");
  TORCH_CHECK_VALUE(scores.sizes() == others.sizes(), "scores must have the shape of others ",
                    others.sizes(), ", got ", scores.sizes());
  TORCH_CHECK_VALUE(others.is_contiguous() && scores.is_contiguous(),
                    "others and scores must be contiguous (they are updated in place)");
  check_dtype(rows_in, at::kLong, "rows");
  check_dtype(other_in, at::kLong, "other_classes");
  check_dtype(cos_in, at::kFloat, "cos");
  TORCH_CHECK_VALUE(rows_in.dim() == 1 && other_in.sizes() == rows_in.sizes() &&
                        cos_in.sizes() == rows_in.sizes(),
                    "rows, other_classes and cos must be 1-d of one length, got ", rows_in.sizes(),
                    ", ", other_in.sizes(), ", ", cos_in.sizes());
  TORCH_CHECK_VALUE(decay > 0.0 && decay <= 1.0, "decay must be in (0, 1], got ", decay);
  const int64_t C = others.size(0), K = others.size(1), n = rows_in.size(0);
  auto rows_t = rows_in.contiguous(), other_t = other_in.contiguous(), cos_t = cos_in.contiguous();
  const int64_t* ra = rows_t.data_ptr<int64_t>();
  const int64_t* rb = other_t.data_ptr<int64_t>();
  const float* rc = cos_t.data_ptr<float>();

  std::vector<Pair> pairs;
  pairs.reserve(symmetric ? 2 * n : n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = ra[i], b = rb[i];
    const float c = rc[i];
    if (a < 0 || a >= C || b < 0 || b >= C || a == b || !std::isfinite(c)) continue;
    const float ev = std::min(std::max((1.0f + c) / 2.0f, 0.0f), 1.0f);
    pairs.push_back({a, b, ev});
  }
  if (symmetric) {
    const size_t m = pairs.size();
    for (size_t i = 0; i < m; ++i) pairs.push_back({pairs[i].b, pairs[i].a, pairs[i].ev});
  }
  if (pairs.empty()) return;
  // group by (a, b), keeping the order of appearance within a group: the sums add in that order
  std::vector<size_t> order(pairs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t i, size_t j) {
    return pairs[i].a != pairs[j].a ? pairs[i].a < pairs[j].a : pairs[i].b < pairs[j].b;
  });
  int32_t* O = others.data_ptr<int32_t>();
  c10::Half* S = scores.data_ptr<c10::Half>();
  const float fdecay = static_cast<float>(decay);
  std::vector<Cand> cand;
  size_t g = 0;
  while (g < order.size()) {  // one updated class at a time
    const int64_t a = pairs[order[g]].a;
    cand.clear();
    for (int64_t j = 0; j < K; ++j) {
      const int32_t id = O[a * K + j];
      if (id >= 0) cand.push_back({id, static_cast<float>(S[a * K + j]) * fdecay});
    }
    const size_t n_old = cand.size();
    while (g < order.size() && pairs[order[g]].a == a) {
      const int64_t b = pairs[order[g]].b;
      float sum = 0.0f;
      for (; g < order.size() && pairs[order[g]].a == a && pairs[order[g]].b == b; ++g)
        sum += pairs[order[g]].ev;
      size_t j = 0;
      while (j < n_old && cand[j].id != b) ++j;
      if (j < n_old) {
        cand[j].score = sum + cand[j].score;
      } else {
        cand.push_back({b, sum});
      }
    }
    const size_t keep = std::min<size_t>(K, cand.size());
    std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), [](const Cand& x, const Cand& y) {
      return x.score != y.score ? x.score > y.score : x.id < y.id;
    });
    for (int64_t j = 0; j < K; ++j) {
      const bool have = static_cast<size_t>(j) < keep;
      O[a * K + j] = have ? static_cast<int32_t>(cand[j].id) : -1;
      S[a * K + j] = c10::Half(have ? cand[j].score : 0.0f);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CPU, m) { m.impl("lookalike_update_", &lookalike_update_cpu); }

}  // namespace protomem
