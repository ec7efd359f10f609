// margin_ce_fwd / margin_ce_bwd on CPU: the normalised-logit + margin + softmax cross-entropy over
// column chunks, never holding more than a [B, kChunk] block of logits. Forward keeps a running
// log-sum-exp per row (all columns, and target columns); backward recomputes each block.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

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

  // `other` with f(cos) where `same` is set. Targets are about one per row, so an angular
  // margin's acos/cos runs on those entries only, not on the whole [B, C] block.
  template <typename F>
  at::Tensor on_targets(const at::Tensor& cos, const at::Tensor& same, const at::Tensor& other,
                        F f) const {
    if (additive_only()) return at::where(same, f(cos), other);
    auto out = other.clone();
    auto idx = same.nonzero();
    if (idx.size(0) > 0) {
      auto r = idx.select(1, 0), c = idx.select(1, 1);
      out.index_put_({r, c}, f(cos.index({r, c})));
    }
    return out;
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

struct Block {
  at::Tensor wh, cos, logits, same;  // [C, D] unit rows, [B, C], [B, C] (-inf where masked), [B, C]
};

Block block(const Setup& st, const at::Tensor& W, const at::Tensor& row_labels,
            const at::Tensor& col_labels, bool with_pos, const Margin& mg, int64_t j0, int64_t j1) {
  Block b;
  b.wh = W.slice(0, j0, j1).to(st.dt) * st.w_inv_norm.slice(0, j0, j1).unsqueeze(1);
  b.cos = at::matmul(st.xh, b.wh.t());
  auto lab = col_labels.slice(0, j0, j1).unsqueeze(0);
  auto live = lab.ge(0);
  b.same = row_labels.unsqueeze(1).eq(lab).logical_and(live);
  const double inf = std::numeric_limits<double>::infinity();
  if (with_pos) {
    b.logits = (b.cos * mg.s).masked_fill(b.same.logical_or(live.logical_not()), -inf);
  } else {
    auto phi = [&](const at::Tensor& c) { return mg.phi(c); };
    b.logits = mg.on_targets(b.cos, b.same, b.cos, phi).mul_(mg.s).masked_fill(live.logical_not(), -inf);
  }
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_fwd_cpu(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& row_labels,
    const at::Tensor& col_labels, const c10::optional<at::Tensor>& pos_cos, double scale,
    double m1, double m2, double m3, bool normalize_x, bool normalize_w) {
  check_margin_ce_args(x, W, row_labels, col_labels, pos_cos);
  const Margin mg{scale, m1, m2, m3};
  const auto st = prepare(x, W, normalize_x, normalize_w);
  const int64_t B = x.size(0), M = W.size(0);
  const double inf = std::numeric_limits<double>::infinity();
  auto opts = st.xh.options();
  auto lse = at::full({B}, -inf, opts), target = at::full({B}, -inf, opts);
  auto best_target = at::full({B}, -inf, opts), best_other = at::full({B}, -inf, opts);
  const bool with_pos = pos_cos.has_value();
  for (int64_t j0 = 0; j0 < M; j0 += kChunk) {
    const auto b = block(st, W, row_labels, col_labels, with_pos, mg, j0, std::min(M, j0 + kChunk));
    lse = at::logaddexp(lse, at::logsumexp(b.logits, {1}));
    auto other = b.cos.masked_fill(b.same.logical_or(b.logits.isinf()), -inf);
    best_other = at::maximum(best_other, std::get<0>(other.max(1)));
    if (!with_pos) {
      target = at::logaddexp(target, at::logsumexp(b.logits.masked_fill(b.same.logical_not(), -inf), {1}));
      best_target = at::maximum(best_target, std::get<0>(b.cos.masked_fill(b.same.logical_not(), -inf).max(1)));
    }
  }
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
  const int64_t M = W.size(0);
  const bool with_pos = pos_cos.has_value();
  auto a = grad_lse.to(st.dt).unsqueeze(1);
  // Rows without a target have target = -inf: their target softmax is taken as 0.
  auto b_row = grad_target.to(st.dt).masked_fill(target.isinf(), 0).unsqueeze(1);
  auto lse_c = lse.unsqueeze(1), target_c = target.masked_fill(target.isinf(), 0).unsqueeze(1);
  auto G = at::zeros_like(st.xh);
  at::Tensor grad_w = need_grad_w ? at::empty(W.sizes(), st.xh.options()) : at::Tensor();
  for (int64_t j0 = 0; j0 < M; j0 += kChunk) {
    const int64_t j1 = std::min(M, j0 + kChunk);
    const auto b = block(st, W, row_labels, col_labels, with_pos, mg, j0, j1);
    auto dlogit = at::exp(b.logits - lse_c) * a;
    if (!with_pos) dlogit += at::exp(b.logits - target_c).masked_fill(b.same.logical_not(), 0) * b_row;
    auto dphi = [&](const at::Tensor& c) { return mg.dphi(c); };
    auto dcos = with_pos || mg.additive_only()
                    ? dlogit * scale
                    : dlogit * mg.on_targets(b.cos, b.same, at::ones_like(b.cos), dphi) * scale;
    G.add_(at::matmul(dcos, b.wh));
    if (need_grad_w) {
      auto H = at::matmul(dcos.t(), st.xh);
      auto gw = normalize_w ? (H - b.wh * (H * b.wh).sum(1, true)) * st.w_inv_norm.slice(0, j0, j1).unsqueeze(1) : H;
      grad_w.slice(0, j0, j1).copy_(gw);
    }
  }
  auto grad_x = normalize_x ? (G - st.xh * (G * st.xh).sum(1, true)) * st.x_inv_norm : G;
  c10::optional<at::Tensor> grad_pos, grad_W;
  if (with_pos) {
    auto pos = pos_cos->to(st.dt);
    auto d_target = a.squeeze(1) * at::exp(target - lse) + b_row.squeeze(1);
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
