// margin_ce_fwd / margin_ce_bwd on CPU: the normalised-logit + margin + softmax cross-entropy over
// column chunks, never holding more than a [B, kChunk] block of cosines. Each block is one GEMM
// and one fused pass over its elements (at::parallel_for over rows): the forward keeps a running
// log-sum-exp per row (all columns, and target columns), the backward recomputes the block and
// turns it into d loss / d cos in place before the two GEMMs of the gradients.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"

namespace protomem {
namespace {

constexpr int64_t kChunk = 4096;
constexpr double kEps = 1e-12;
// d theta / d cos = -1 / sin(theta) is capped at sin(theta) >= kSinFloor (protomem.margins.SIN_FLOOR):
// a row lying on its target (a lone exemplar's own prototype) would otherwise multiply rounding
// noise by ~1e12.
constexpr double kSinFloor = 1e-3;

struct Margin {
  double s, m1, m2, m3;
  bool additive_only() const { return m1 == 1.0 && m2 == 0.0; }

  // cos(m1*theta + m2) - m3, or cos - m2*sin(m2) - m3 where m1*theta + m2 > pi.
  at::Tensor phi(const at::Tensor& c) const {
    if (additive_only()) return c - m3;
    auto angle = at::acos(c.clamp(-1, 1)) * m1 + m2;
    return at::where(angle <= M_PI, at::cos(angle), c - m2 * std::sin(m2)) - m3;
  }

  // d phi / d cos
  at::Tensor dphi(const at::Tensor& c) const {
    if (additive_only()) return at::ones_like(c);
    auto cc = c.clamp(-1, 1);
    auto theta = at::acos(cc);
    auto angle = theta * m1 + m2;
    auto sin_theta = at::sqrt(1 - cc * cc).clamp_min(kSinFloor);
    return at::where(angle <= M_PI, at::sin(angle) * m1 / sin_theta, at::ones_like(c));
  }

  // The same two functions on one cosine, for the fused loops below.
  template <typename T>
  T phi1(T c) const {
    if (additive_only()) return c - static_cast<T>(m3);
    const T cc = std::min<T>(std::max<T>(c, -1), 1);
    const T angle = std::acos(cc) * static_cast<T>(m1) + static_cast<T>(m2);
    return (angle <= static_cast<T>(M_PI) ? std::cos(angle) : c - static_cast<T>(m2 * std::sin(m2))) -
           static_cast<T>(m3);
  }

  template <typename T>
  T dphi1(T c) const {
    if (additive_only()) return 1;
    const T cc = std::min<T>(std::max<T>(c, -1), 1);
    const T angle = std::acos(cc) * static_cast<T>(m1) + static_cast<T>(m2);
    const T sin_theta = std::max<T>(std::sqrt(1 - cc * cc), static_cast<T>(kSinFloor));
    return angle <= static_cast<T>(M_PI) ? std::sin(angle) * static_cast<T>(m1) / sin_theta : T(1);
  }

};

void check_margin_ce_args(const at::Tensor& x, const at::Tensor& W, const at::Tensor& row_labels,
                          const at::Tensor& col_labels, const c10::optional<at::Tensor>& pos_cos) {
  check_dim(x, 2, "x");
  check_float_dtype(x, "x");
  check_dim(W, 2, "W");
  check_float_dtype(W, "W");
  check_size(W, 1, x.size(1), "W", "x.size(1)");
  check_dim(row_labels, 1, "row_labels");
  check_labels(row_labels, "row_labels");
  check_size(row_labels, 0, x.size(0), "row_labels", "x.size(0)");
  check_dim(col_labels, 1, "col_labels");
  check_labels(col_labels, "col_labels");
  check_size(col_labels, 0, W.size(0), "col_labels", "W.size(0)");
  check_same_device(W, x, "W", "x");
  check_same_device(row_labels, x, "row_labels", "x");
  check_same_device(col_labels, x, "col_labels", "x");
  if (pos_cos.has_value()) {
    check_dim(*pos_cos, 1, "pos_cos");
    check_float_dtype(*pos_cos, "pos_cos");
    check_size(*pos_cos, 0, x.size(0), "pos_cos", "x.size(0)");
    check_same_device(*pos_cos, x, "pos_cos", "x");
  }
}

at::ScalarType acc_dtype(const at::Tensor& x, const at::Tensor& W) {
  return x.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Everything a block of columns needs, shared by forward and backward.
struct Setup {
  at::Tensor xh, x_inv_norm, w_inv_norm;  // [B, D] unit (or raw) rows, [B, 1], [M]
  at::ScalarType dt;
};

Setup prepare(const at::Tensor& x, const at::Tensor& W, bool normalize_x, bool normalize_w) {
  Setup st;
  st.dt = acc_dtype(x, W);
  auto xf = x.to(st.dt);
  st.x_inv_norm = normalize_x ? 1 / xf.norm(2, {1}, true).clamp_min(kEps)
                              : at::ones({x.size(0), 1}, xf.options());
  st.xh = xf * st.x_inv_norm;
  st.w_inv_norm = normalize_w ? 1 / W.to(st.dt).norm(2, {1}).clamp_min(kEps)
                              : at::ones({W.size(0)}, xf.options());
  return st;
}

// Unit rows of W's columns [j0, j1) and their cosines with every row of x: [C, D], [B, C].
std::pair<at::Tensor, at::Tensor> cos_block(const Setup& st, const at::Tensor& W, int64_t j0, int64_t j1) {
  auto wh = W.slice(0, j0, j1).to(st.dt) * st.w_inv_norm.slice(0, j0, j1).unsqueeze(1);
  return {wh, at::matmul(st.xh, wh.t()).contiguous()};
}

// Running statistics of one row over the columns seen so far: log-sum-exp of all logits and of
// the target logits as (max, sum of exp(logit - max)), and the best target / other cosine.
template <typename T>
struct RowStats {
  T m_all, s_all, m_t, s_t, best_t, best_o;
};

template <typename T>
inline void online_lse(T& m, T& s, T v) {
  if (v > m) {
    s = s * std::exp(m - v) + 1;
    m = v;
  } else {
    s += std::exp(v - m);
  }
}

// One pass over a [B, C] block of cosines: each element's logit (margin on targets, masked
// columns skipped) updates its row's statistics. Fused so the block is read once.
template <typename T>
void fwd_block(const T* cos, int64_t B, int64_t C, const int64_t* row_lab, const int64_t* col_lab,
               bool with_pos, const Margin& mg, RowStats<T>* stats) {
  const T s = static_cast<T>(mg.s);
  at::parallel_for(0, B, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      RowStats<T>& st = stats[i];
      const T* c = cos + i * C;
      const int64_t yi = row_lab[i];
      for (int64_t j = 0; j < C; ++j) {
        const int64_t l = col_lab[j];
        if (l < 0) continue;
        if (l != yi) {
          online_lse(st.m_all, st.s_all, s * c[j]);
          st.best_o = std::max(st.best_o, c[j]);
        } else if (!with_pos) {
          const T logit = s * mg.phi1(c[j]);
          online_lse(st.m_all, st.s_all, logit);
          online_lse(st.m_t, st.s_t, logit);
          st.best_t = std::max(st.best_t, c[j]);
        }
      }
    }
  });
}

// d loss / d cos of a [B, C] block, in place over `cos`: a_i * softmax_ij (+ b_i * target
// softmax_ij on targets, times d phi / d cos), times s; 0 on masked columns.
template <typename T>
void bwd_block(T* cos, int64_t B, int64_t C, const int64_t* row_lab, const int64_t* col_lab,
               bool with_pos, const Margin& mg, const T* lse, const T* target, const T* a, const T* b) {
  const T s = static_cast<T>(mg.s);
  at::parallel_for(0, B, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* c = cos + i * C;
      const int64_t yi = row_lab[i];
      for (int64_t j = 0; j < C; ++j) {
        const int64_t l = col_lab[j];
        if (l < 0 || (with_pos && l == yi)) {
          c[j] = 0;
        } else if (l != yi) {
          c[j] = a[i] * std::exp(s * c[j] - lse[i]) * s;
        } else {
          const T logit = s * mg.phi1(c[j]);
          const T d = a[i] * std::exp(logit - lse[i]) + b[i] * std::exp(logit - target[i]);
          c[j] = d * s * mg.dphi1(c[j]);
        }
      }
    }
  });
}

template <typename T>
T finish_lse(T m, T s) {
  return s > 0 ? m + std::log(s) : -std::numeric_limits<T>::infinity();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_fwd_cpu(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& row_labels,
    const at::Tensor& col_labels, const c10::optional<at::Tensor>& pos_cos, double scale,
    double m1, double m2, double m3, bool normalize_x, bool normalize_w) {
  check_margin_ce_args(x, W, row_labels, col_labels, pos_cos);
  const Margin mg{scale, m1, m2, m3};
  const auto st = prepare(x, W, normalize_x, normalize_w);
  const int64_t B = x.size(0), M = W.size(0);
  auto opts = st.xh.options();
  auto lse = at::empty({B}, opts), target = at::empty({B}, opts);
  auto best_target = at::empty({B}, opts), best_other = at::empty({B}, opts);
  const bool with_pos = pos_cos.has_value();
  const auto rows = row_labels.contiguous(), cols = col_labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES(st.dt, "margin_ce_fwd_cpu", [&] {
    using T = scalar_t;
    const T inf = std::numeric_limits<T>::infinity();
    std::vector<RowStats<T>> stats(B, RowStats<T>{-inf, 0, -inf, 0, -inf, -inf});
    for (int64_t j0 = 0; j0 < M; j0 += kChunk) {
      const int64_t j1 = std::min(M, j0 + kChunk);
      const auto cos = cos_block(st, W, j0, j1).second;
      fwd_block<T>(cos.data_ptr<T>(), B, j1 - j0, rows.data_ptr<int64_t>(),
                   cols.data_ptr<int64_t>() + j0, with_pos, mg, stats.data());
    }
    auto* l = lse.data_ptr<T>();
    auto* t = target.data_ptr<T>();
    auto* bt = best_target.data_ptr<T>();
    auto* bo = best_other.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      l[i] = finish_lse(stats[i].m_all, stats[i].s_all);
      t[i] = finish_lse(stats[i].m_t, stats[i].s_t);
      bt[i] = stats[i].best_t;
      bo[i] = stats[i].best_o;
    }
  });
  if (with_pos) {
    auto pos = pos_cos->to(st.dt);
    target = mg.phi(pos) * scale;
    lse = at::logaddexp(lse, target);
    best_target = pos.clone();  // an output must not alias the pos_cos input
  }
  return {lse, target, best_target, best_other};
}

std::tuple<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>> margin_ce_bwd_cpu(
    const at::Tensor& grad_lse, const at::Tensor& grad_target, const at::Tensor& x,
    const at::Tensor& W, const at::Tensor& row_labels, const at::Tensor& col_labels,
    const c10::optional<at::Tensor>& pos_cos, const at::Tensor& lse, const at::Tensor& target,
    double scale, double m1, double m2, double m3, bool normalize_x, bool normalize_w,
    bool need_grad_w) {
  check_margin_ce_args(x, W, row_labels, col_labels, pos_cos);
  const Margin mg{scale, m1, m2, m3};
  const auto st = prepare(x, W, normalize_x, normalize_w);
  const int64_t B = x.size(0), M = W.size(0);
  const bool with_pos = pos_cos.has_value();
  auto a = grad_lse.to(st.dt).contiguous();
  // Rows without a target have target = -inf: their target softmax is taken as 0.
  auto b_row = grad_target.to(st.dt).masked_fill(target.isinf(), 0).contiguous();
  auto lse_c = lse.to(st.dt).contiguous();
  auto target_c = target.to(st.dt).masked_fill(target.isinf(), 0).contiguous();
  const auto rows = row_labels.contiguous(), cols = col_labels.contiguous();
  auto G = at::zeros_like(st.xh);
  at::Tensor grad_w = need_grad_w ? at::empty(W.sizes(), st.xh.options()) : at::Tensor();
  for (int64_t j0 = 0; j0 < M; j0 += kChunk) {
    const int64_t j1 = std::min(M, j0 + kChunk);
    auto [wh, dcos] = cos_block(st, W, j0, j1);
    AT_DISPATCH_FLOATING_TYPES(st.dt, "margin_ce_bwd_cpu", [&] {
      bwd_block<scalar_t>(dcos.data_ptr<scalar_t>(), B, j1 - j0, rows.data_ptr<int64_t>(),
                          cols.data_ptr<int64_t>() + j0, with_pos, mg, lse_c.data_ptr<scalar_t>(),
                          target_c.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b_row.data_ptr<scalar_t>());
    });
    G.add_(at::matmul(dcos, wh));
    if (need_grad_w) {
      auto H = at::matmul(dcos.t(), st.xh);
      auto gw = normalize_w ? (H - wh * (H * wh).sum(1, true)) * st.w_inv_norm.slice(0, j0, j1).unsqueeze(1) : H;
      grad_w.slice(0, j0, j1).copy_(gw);
    }
  }
  auto grad_x = normalize_x ? (G - st.xh * (G * st.xh).sum(1, true)) * st.x_inv_norm : G;
  c10::optional<at::Tensor> grad_pos, grad_W;
  if (with_pos) {
    auto pos = pos_cos->to(st.dt);
    auto d_target = a * at::exp(target.to(st.dt) - lse_c) + b_row;
    grad_pos = (d_target * mg.dphi(pos) * scale).to(pos_cos->scalar_type());
  }
  if (need_grad_w) grad_W = grad_w.to(W.scalar_type());
  return {grad_x.to(x.scalar_type()), grad_W, grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CPU, m) {
  m.impl("margin_ce_fwd", &margin_ce_fwd_cpu);
  m.impl("margin_ce_bwd", &margin_ce_bwd_cpu);
}

}  // namespace protomem
