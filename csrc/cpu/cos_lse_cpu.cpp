// cos_lse_fwd / cos_lse_bwd_w on CPU; their meaning is protomem/reference.py::cos_lse_fwd_ref and
// cos_lse_bwd_w_ref. W is read once per call, in blocks of columns. Per block: one GEMM for the
// dot products with the normalised rows of x, laid out [columns, rows] (W_b @ x_hat^T: MKL runs it
// faster than x_hat @ W_b^T here, and each column's values are scalars broadcast over a vector of
// rows), one fused vectorised pass (cos_lse_tiles.h), then a second GEMM on the same block of W:
// direction += P @ W_b (forward) or H = gamma^T @ x_hat written into grad_W (backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "cos_lse_same_label.h"
#include "cos_lse_tiles.h"

namespace protomem {
namespace {

using cos_lse::Block;
using cos_lse::FwdState;
using cos_lse::Kernels;
using cos_lse::SameLabel;

constexpr double kEps = 1e-12;
// One block of dot products: a quarter of this CPU's L3, so that the block and its columns of W
// stay cached between the two GEMMs and the fused pass.
constexpr int64_t kBlockBytes = int64_t{4} << 20;

// A 1-D tensor of n entries on x's device: int64 labels, or floats.
void check_vector(const at::Tensor& t, const at::Tensor& x, int64_t n, bool labels,
                  const char* name, const char* what) {
  check_dim(t, 1, name);
  if (labels) {
    check_labels(t, name);
  } else {
    check_float_dtype(t, name);
  }
  check_size(t, 0, n, name, what);
  check_same_device(t, x, name, "x");
}

void check_args(const at::Tensor& x, const at::Tensor& W, const at::Tensor& row_labels,
                const at::Tensor& col_labels, double scale, c10::string_view precision) {
  for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{&W, "W"}}) {
    check_dim(*t, 2, name);
    check_float_dtype(*t, name);
  }
  check_size(W, 1, x.size(1), "W", "x.size(1)");
  check_same_device(W, x, "W", "x");
  check_vector(row_labels, x, x.size(0), true, "row_labels", "x.size(0)");
  check_vector(col_labels, x, W.size(0), true, "col_labels", "W.size(0)");
  TORCH_CHECK_VALUE(scale > 0, "scale must be > 0, got ", scale);
  TORCH_CHECK_VALUE(precision == "default" || precision == "highest",
                    "precision must be 'default' or 'highest', got '", std::string(precision), "'");
}

// Everything one call shares between its blocks; the buffers are allocated here, once.
template <typename T>
struct Pass {
  const Kernels<T>& k;
  int64_t B, Bp, D, M, C;
  at::Tensor xh;    // [B, D] rows of x, normalised or not
  at::Tensor Wc;    // W, contiguous
  bool convert;     // W's blocks are copied into wbuf in T first
  at::Tensor wbuf;  // [C, D] T when convert
  at::Tensor vbuf;  // [C, Bp] T: dot products, then P or gamma
  std::vector<T> bias;  // [M] 0, or -inf for an empty column
  SameLabel same;

  Pass(const at::Tensor& x, const at::Tensor& W, const at::Tensor& row_labels,
       const at::Tensor& col_labels, bool normalize_x, at::ScalarType dt)
      : k(cos_lse::kernels<T>()),
        B(x.size(0)),
        Bp((x.size(0) + cos_lse::kLanePad - 1) / cos_lse::kLanePad * cos_lse::kLanePad),
        D(x.size(1)),
        M(W.size(0)),
        Wc(W.contiguous()),
        convert(W.scalar_type() != dt),
        same(row_labels.contiguous().data_ptr<int64_t>(), x.size(0),
             col_labels.contiguous().data_ptr<int64_t>(), W.size(0)) {
    C = std::clamp<int64_t>(kBlockBytes / (std::max<int64_t>(Bp, 1) * sizeof(T)), 256, 8192);
    if (const char* e = std::getenv("PROTOMEM_COS_LSE_BLOCK")) {  // tests: many blocks at small M
      C = std::max<int64_t>(1, std::atoll(e));
    }
    C = std::min(C, std::max<int64_t>(M, 1));
    auto xf = x.to(dt);
    xh = (normalize_x ? xf / xf.norm(2, {1}, true).clamp_min(kEps) : xf).contiguous();
    auto opts = xf.options();
    vbuf = at::zeros({C, Bp}, opts);  // the padding lanes stay finite
    if (convert) wbuf = at::empty({C, D}, opts);
    const auto cols = col_labels.contiguous();
    const int64_t* cl = cols.data_ptr<int64_t>();
    bias.resize(M);
    for (int64_t j = 0; j < M; ++j) bias[j] = cl[j] < 0 ? -std::numeric_limits<T>::infinity() : 0;
  }

  // Columns [j0, j0 + c) of W in T, [c, D] contiguous.
  at::Tensor block_w(int64_t j0, int64_t c) {
    auto w = Wc.narrow(0, j0, c);
    if (!convert) return w;
    return wbuf.narrow(0, 0, c).copy_(w);
  }

  // x_hat_i . W_j for the block, [c, B] with row stride Bp.
  at::Tensor dots(const at::Tensor& wb) {
    auto v = vbuf.narrow(0, 0, wb.size(0)).narrow(1, 0, B);
    at::mm_out(v, wb, xh.t());
    return v;
  }

  Block<T> block(const at::Tensor& v, const T* w_inv, int64_t j0, double scale) const {
    return {v.data_ptr<T>(), v.size(0), Bp, w_inv, bias.data() + j0, static_cast<T>(scale)};
  }

  // fn(r0, r1) over lanes [0, Bp) in one coarse chunk per thread, after masking the same-label
  // entries of those rows in the block [j0, j0 + c).
  template <typename Fn>
  void over_rows(T* v, int64_t j0, int64_t c, const Fn& fn) {
    const int64_t lanes = k.lanes, units = Bp / lanes;
    const int64_t grain = std::max<int64_t>(1, (units + at::get_num_threads() - 1) / at::get_num_threads());
    at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t i = u0 * lanes; i < std::min(u1 * lanes, B); ++i) {
        same.mask_block(v, Bp, j0, j0 + c, i);
      }
      fn(u0 * lanes, u1 * lanes);
    });
  }

  // fn(j0, j1) over the c columns of a block, one chunk per thread.
  template <typename Fn>
  static void over_columns(int64_t c, const Fn& fn) {
    const int64_t grain = std::max<int64_t>(64, (c + at::get_num_threads() - 1) / at::get_num_threads());
    at::parallel_for(0, c, grain, fn);
  }
};

at::ScalarType acc_dtype(const at::Tensor& x, const at::Tensor& W) {
  return x.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
void fwd_impl(Pass<T>& p, double scale, bool normalize_w, at::Tensor& lse, at::Tensor& best,
              at::Tensor& best_index, at::Tensor& direction, at::Tensor& w_inv_norm) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  std::vector<T> m(p.Bp, -kInf), l(p.Bp, 0), bst(p.Bp, -kInf);
  std::vector<int64_t> at_index(p.Bp, -1);
  T* dir = direction.data_ptr<T>();
  T* w_inv = w_inv_norm.data_ptr<T>();
  for (int64_t j0 = 0; j0 < p.M; j0 += p.C) {
    const int64_t c = std::min(p.C, p.M - j0);
    const at::Tensor wb = p.block_w(j0, c);
    if (normalize_w) {
      const T* w = wb.data_ptr<T>();
      Pass<T>::over_columns(c, [&](int64_t a, int64_t b) {
        p.k.inv_norms(w + a * p.D, b - a, p.D, static_cast<T>(kEps), w_inv + j0 + a);
      });
    }
    const at::Tensor v = p.dots(wb);
    const Block<T> blk = p.block(v, w_inv + j0, j0, scale);
    const FwdState<T> st{m.data(), l.data(), bst.data(), at_index.data(), dir, p.B, p.D, j0};
    p.over_rows(blk.v, j0, c, [&](int64_t r0, int64_t r1) { p.k.fwd_rows(blk, r0, r1, st); });
    direction.addmm_(v.t(), wb);
  }
  T* out_lse = lse.data_ptr<T>();
  T* out_best = best.data_ptr<T>();
  int64_t* out_index = best_index.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.B; ++i) {
    out_lse[i] = l[i] > 0 ? m[i] + std::log(l[i]) : -kInf;
    out_best[i] = bst[i];
    out_index[i] = at_index[i];
    if (l[i] > 0) {
      for (int64_t e = 0; e < p.D; ++e) dir[i * p.D + e] /= l[i];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cos_lse_fwd_cpu(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& row_labels,
    const at::Tensor& col_labels, double scale, bool normalize_x, bool normalize_w,
    c10::string_view precision) {
  check_args(x, W, row_labels, col_labels, scale, precision);
  const auto dt = acc_dtype(x, W);
  const auto opts = x.options().dtype(dt);
  const int64_t B = x.size(0), D = x.size(1), M = W.size(0);
  auto lse = at::empty({B}, opts), best = at::empty({B}, opts);
  auto best_index = at::empty({B}, x.options().dtype(at::kLong));
  auto direction = at::zeros({B, D}, opts);
  auto w_inv_norm = normalize_w ? at::empty({M}, opts) : at::ones({M}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "cos_lse_fwd_cpu", [&] {
    Pass<scalar_t> p(x, W, row_labels, col_labels, normalize_x, dt);
    fwd_impl<scalar_t>(p, scale, normalize_w, lse, best, best_index, direction, w_inv_norm);
  });
  return {lse, best, best_index, direction, w_inv_norm};
}

template <typename T>
void bwd_w_impl(Pass<T>& p, double scale, bool normalize_w, const at::Tensor& grad_lse,
                const at::Tensor& lse, const at::Tensor& w_inv_norm, at::Tensor& grad_W) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  // Rows without other columns (lse = +-inf) and the padding lanes give zeros: coef 0, lse +inf.
  std::vector<T> coef(p.Bp, 0), lse_eff(p.Bp, kInf);
  const at::Tensor g = grad_lse.to(p.xh.scalar_type()).contiguous();
  const at::Tensor lc = lse.to(p.xh.scalar_type()).contiguous();
  for (int64_t i = 0; i < p.B; ++i) {
    const T li = lc.data_ptr<T>()[i];
    if (std::isinf(li)) continue;
    coef[i] = g.data_ptr<T>()[i] * static_cast<T>(scale);
    lse_eff[i] = li;
  }
  const T* w_inv = w_inv_norm.data_ptr<T>();
  const bool direct = !p.convert;  // H goes straight into grad_W's block
  at::Tensor hbuf = direct ? at::Tensor() : at::empty({p.C, p.D}, p.xh.options());
  for (int64_t j0 = 0; j0 < p.M; j0 += p.C) {
    const int64_t c = std::min(p.C, p.M - j0);
    const at::Tensor wb = p.block_w(j0, c);
    const at::Tensor v = p.dots(wb);
    const Block<T> blk = p.block(v, w_inv + j0, j0, scale);
    p.over_rows(blk.v, j0, c, [&](int64_t r0, int64_t r1) {
      p.k.bwd_rows(blk, r0, r1, coef.data(), lse_eff.data());
    });
    at::Tensor h = direct ? grad_W.narrow(0, j0, c) : hbuf.narrow(0, 0, c);
    at::mm_out(h, v, p.xh);
    if (normalize_w) {
      T* hp = h.data_ptr<T>();
      const T* w = wb.data_ptr<T>();
      Pass<T>::over_columns(c, [&](int64_t a, int64_t b) {
        p.k.project(hp + a * p.D, w + a * p.D, w_inv + j0 + a, b - a, p.D);
      });
    }
    if (!direct) grad_W.narrow(0, j0, c).copy_(h);
  }
}

at::Tensor cos_lse_bwd_w_cpu(const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& W,
                             const at::Tensor& row_labels, const at::Tensor& col_labels,
                             const at::Tensor& lse, const at::Tensor& w_inv_norm, double scale,
                             bool normalize_x, bool normalize_w, c10::string_view precision) {
  check_args(x, W, row_labels, col_labels, scale, precision);
  const int64_t B = x.size(0), M = W.size(0);
  check_vector(grad_lse, x, B, false, "grad_lse", "x.size(0)");
  check_vector(lse, x, B, false, "lse", "x.size(0)");
  check_vector(w_inv_norm, x, M, false, "w_inv_norm", "W.size(0)");
  const auto dt = acc_dtype(x, W);
  auto grad_W = at::empty(W.sizes(), W.options().memory_format(at::MemoryFormat::Contiguous));
  auto w_inv = normalize_w ? w_inv_norm.to(dt).contiguous() : at::ones({M}, x.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "cos_lse_bwd_w_cpu", [&] {
    Pass<scalar_t> p(x, W, row_labels, col_labels, normalize_x, dt);
    bwd_w_impl<scalar_t>(p, scale, normalize_w, grad_lse, lse, w_inv, grad_W);
  });
  return grad_W;
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CPU, m) {
  m.impl("cos_lse_fwd", &cos_lse_fwd_cpu);
  m.impl("cos_lse_bwd_w", &cos_lse_bwd_w_cpu);
}

}  // namespace protomem
