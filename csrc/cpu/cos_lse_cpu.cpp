// cos_lse_fwd / cos_lse_bwd_w on CPU; their meaning is protomem/reference.py::cos_lse_fwd_ref and
// cos_lse_bwd_w_ref. W is read once per call, in blocks of columns. Per block: one GEMM for the
// dot products with the normalised rows of x, laid out [columns, rows] (W_b @ x_hat^T: MKL runs it
// faster than x_hat @ W_b^T here, and each column's values are scalars broadcast over a vector of
// rows), one fused vectorised pass (cos_lse_tiles.h), then a second GEMM on the same block of W:
// direction += P @ W_b (forward) or H = gamma^T @ x_hat written into grad_W (backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
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

// at::parallel_for whose workers run with the caller's thread-local state: the blocks call ATen
// ops (GEMMs, copies) and OpenMP's worker threads would otherwise see the defaults (grad mode on,
// no dispatch keys excluded), so an input that requires grad would reach autograd's kernels.
template <typename Fn>
void parallel_for_tls(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t a, int64_t b) {
    at::ThreadLocalStateGuard guard(state);
    fn(a, b);
  });
}

constexpr double kEps = 1e-12;
// One block of dot products (C columns x B rows): about one core's L2, so that the fused pass
// reads what the first GEMM wrote, and the second GEMM what the fused pass wrote, from cache
// (measured on a 2-core EPYC: 1 MB blocks cost ~1.04x the bare GEMMs, 4 MB ~1.14x, 8 MB ~1.19x).
constexpr int64_t kBlockBytes = int64_t{1} << 20;

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

// Everything the blocks of one call share, read-only while they run.
template <typename T>
struct Pass {
  const Kernels<T>& k;
  int64_t B, Bp, D, M, C;
  at::Tensor xh;        // [B, D] rows of x, normalised or not
  at::Tensor Wc;        // W, contiguous
  bool convert;         // W's blocks are copied into T first
  bool split;           // each thread runs whole blocks (single-threaded GEMMs) instead of
                        // all threads running each block
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
    const char* e = std::getenv("PROTOMEM_COS_LSE_SPLIT");
    split = e == nullptr || std::strcmp(e, "0") != 0;
    auto xf = x.to(dt);
    xh = (normalize_x ? xf / xf.norm(2, {1}, true).clamp_min(kEps) : xf).contiguous();
    const auto cols = col_labels.contiguous();
    const int64_t* cl = cols.data_ptr<int64_t>();
    bias.resize(M);
    for (int64_t j = 0; j < M; ++j) bias[j] = cl[j] < 0 ? -std::numeric_limits<T>::infinity() : 0;
  }

  int64_t workers() const { return split ? std::max<int64_t>(1, at::get_num_threads()) : 1; }

  Block<T> block(const at::Tensor& v, const T* w_inv, int64_t j0, double scale) const {
    return {v.data_ptr<T>(), v.size(0), Bp, w_inv, bias.data() + j0, static_cast<T>(scale)};
  }

  // fn(r0, r1) over lanes [0, Bp) (one chunk per thread when parallel), after masking the
  // same-label entries of those rows in the block [j0, j0 + c).
  template <typename Fn>
  void over_rows(bool parallel, T* v, int64_t j0, int64_t c, const Fn& fn) const {
    const int64_t lanes = k.lanes, units = Bp / lanes;
    auto chunk = [&](int64_t u0, int64_t u1) {
      for (int64_t i = u0 * lanes; i < std::min(u1 * lanes, B); ++i) {
        same.mask_block(v, Bp, j0, j0 + c, i);
      }
      fn(u0 * lanes, u1 * lanes);
    };
    if (!parallel) return chunk(0, units);
    const int64_t nt = at::get_num_threads();
    parallel_for_tls(0, units, std::max<int64_t>(1, (units + nt - 1) / nt), chunk);
  }

  // fn(a, b) over the c columns of a block (one chunk per thread when parallel).
  template <typename Fn>
  static void over_columns(bool parallel, int64_t c, const Fn& fn) {
    if (!parallel) return fn(0, c);
    const int64_t nt = at::get_num_threads();
    parallel_for_tls(0, c, std::max<int64_t>(64, (c + nt - 1) / nt), fn);
  }

  // Split: the blocks are cut into parts() runs of consecutive blocks; each thread takes the
  // next run as it finishes one (a thread on a busy core simply takes fewer) and the threads meet
  // once, at the end. A run's results do not depend on which thread ran it, so the forward is
  // deterministic. Otherwise one run, each block spread over all threads.
  int64_t parts() const {
    const int64_t blocks = (M + C - 1) / C;
    return split ? std::max<int64_t>(1, std::min(blocks, 8 * workers())) : 1;
  }

  // fn(worker, part, j0, c, parallel) for every block, in order within a part.
  template <typename Fn>
  void over_blocks(const Fn& fn) const {
    const int64_t blocks = (M + C - 1) / C, n = parts();
    auto run = [&](int64_t w, int64_t part, bool parallel) {
      for (int64_t b = part * blocks / n; b < (part + 1) * blocks / n; ++b) {
        fn(w, part, b * C, std::min(C, M - b * C), parallel);
      }
    };
    if (!split) return run(0, 0, true);
    std::atomic<int64_t> next{0};
    parallel_for_tls(0, workers(), 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        for (int64_t part = next++; part < n; part = next++) run(w, part, false);
      }
    });
  }
};

// One thread's buffers: the block of dot products [C, Bp] (zeroed: the padding lanes stay
// finite) and, when W is not in T, the block of W [C, D].
template <typename T>
struct Buffers {
  at::Tensor v, w;

  Buffers(const Pass<T>& p, const at::TensorOptions& opts)
      : v(at::zeros({p.C, p.Bp}, opts)), w(p.convert ? at::empty({p.C, p.D}, opts) : at::Tensor()) {}

  // Columns [j0, j0 + c) of W in T, [c, D] contiguous.
  at::Tensor block_w(const Pass<T>& p, int64_t j0, int64_t c) {
    auto src = p.Wc.narrow(0, j0, c);
    return p.convert ? w.narrow(0, 0, c).copy_(src) : src;
  }

  // x_hat_i . W_j for the block, [c, B] with row stride Bp.
  at::Tensor dots(const Pass<T>& p, const at::Tensor& wb) {
    auto out = v.narrow(0, 0, wb.size(0)).narrow(1, 0, p.B);
    at::mm_out(out, wb, p.xh.t());
    return out;
  }
};

at::ScalarType acc_dtype(const at::Tensor& x, const at::Tensor& W) {
  return x.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The online softmax of one run of blocks (see Pass::parts).
template <typename T>
struct Partial {
  std::vector<T> m, l, best;
  std::vector<int64_t> index;
  at::Tensor direction;  // [B, D]

  Partial(const Pass<T>& p, const at::TensorOptions& opts)
      : m(p.Bp, -std::numeric_limits<T>::infinity()),
        l(p.Bp, 0),
        best(p.Bp, -std::numeric_limits<T>::infinity()),
        index(p.Bp, -1),
        direction(at::zeros({p.B, p.D}, opts)) {}
};

// Combines the runs' online softmaxes row by row, in order, into the outputs.
template <typename T>
void merge_rows(const Pass<T>& p, const std::vector<Partial<T>>& parts, at::Tensor& lse,
                at::Tensor& best, at::Tensor& best_index, at::Tensor& direction) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T* out_lse = lse.data_ptr<T>();
  T* out_best = best.data_ptr<T>();
  int64_t* out_index = best_index.data_ptr<int64_t>();
  T* dir = direction.data_ptr<T>();
  for (int64_t i = 0; i < p.B; ++i) {
    T m = -kInf, l = 0, b = -kInf;
    int64_t idx = -1;
    for (const auto& w : parts) {
      m = std::max(m, w.m[i]);
      if (w.best[i] > b || (w.best[i] == b && w.index[i] >= 0 && w.index[i] < idx)) {
        b = w.best[i];
        idx = w.index[i];
      }
    }
    T* d = dir + i * p.D;
    for (const auto& w : parts) {
      if (w.l[i] == 0) continue;
      const T f = std::exp(w.m[i] - m);
      l += w.l[i] * f;
      const T* wd = w.direction.template data_ptr<T>() + i * p.D;
      for (int64_t e = 0; e < p.D; ++e) d[e] += wd[e] * f;
    }
    out_lse[i] = l > 0 ? m + std::log(l) : -kInf;
    out_best[i] = b;
    out_index[i] = idx;
    if (l > 0) {
      for (int64_t e = 0; e < p.D; ++e) d[e] /= l;
    }
  }
}

template <typename T>
void fwd_impl(const Pass<T>& p, double scale, bool normalize_w, at::Tensor& lse, at::Tensor& best,
              at::Tensor& best_index, at::Tensor& direction, at::Tensor& w_inv_norm) {
  std::vector<Buffers<T>> ws;
  for (int64_t w = 0; w < p.workers(); ++w) ws.emplace_back(p, p.xh.options());
  std::vector<Partial<T>> parts;
  for (int64_t r = 0; r < p.parts(); ++r) parts.emplace_back(p, p.xh.options());
  T* w_inv = w_inv_norm.data_ptr<T>();
  p.over_blocks([&](int64_t w, int64_t part, int64_t j0, int64_t c, bool parallel) {
    Partial<T>& pt = parts[part];
    const at::Tensor wb = ws[w].block_w(p, j0, c);
    if (normalize_w) {
      const T* wp = wb.data_ptr<T>();
      Pass<T>::over_columns(parallel, c, [&](int64_t a, int64_t b) {
        p.k.inv_norms(wp + a * p.D, b - a, p.D, static_cast<T>(kEps), w_inv + j0 + a);
      });
    }
    const at::Tensor v = ws[w].dots(p, wb);
    const Block<T> blk = p.block(v, w_inv + j0, j0, scale);
    const FwdState<T> st{pt.m.data(), pt.l.data(), pt.best.data(), pt.index.data(),
                         pt.direction.template data_ptr<T>(), p.B, p.D, j0};
    p.over_rows(parallel, blk.v, j0, c, [&](int64_t r0, int64_t r1) { p.k.fwd_rows(blk, r0, r1, st); });
    pt.direction.addmm_(v.t(), wb);
  });
  merge_rows(p, parts, lse, best, best_index, direction);
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
    const Pass<scalar_t> p(x, W, row_labels, col_labels, normalize_x, dt);
    fwd_impl<scalar_t>(p, scale, normalize_w, lse, best, best_index, direction, w_inv_norm);
  });
  return {lse, best, best_index, direction, w_inv_norm};
}

template <typename T>
void bwd_w_impl(const Pass<T>& p, double scale, bool normalize_w, const at::Tensor& grad_lse,
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
  // H = gamma^T x_hat goes straight into grad_W's block when W is in T, else through h.
  std::vector<Buffers<T>> ws;
  std::vector<at::Tensor> hs;
  for (int64_t w = 0; w < p.workers(); ++w) {
    ws.emplace_back(p, p.xh.options());
    hs.push_back(p.convert ? at::empty({p.C, p.D}, p.xh.options()) : at::Tensor());
  }
  p.over_blocks([&](int64_t w, int64_t, int64_t j0, int64_t c, bool parallel) {
    const at::Tensor wb = ws[w].block_w(p, j0, c);
    const at::Tensor v = ws[w].dots(p, wb);
    const Block<T> blk = p.block(v, w_inv + j0, j0, scale);
    p.over_rows(parallel, blk.v, j0, c, [&](int64_t r0, int64_t r1) {
      p.k.bwd_rows(blk, r0, r1, coef.data(), lse_eff.data());
    });
    at::Tensor h = p.convert ? hs[w].narrow(0, 0, c) : grad_W.narrow(0, j0, c);
    at::mm_out(h, v, p.xh);
    if (normalize_w) {
      T* hp = h.data_ptr<T>();
      const T* wp = wb.data_ptr<T>();
      Pass<T>::over_columns(parallel, c, [&](int64_t a, int64_t b) {
        p.k.project(hp + a * p.D, wp + a * p.D, w_inv + j0 + a, b - a, p.D);
      });
    }
    if (p.convert) grad_W.narrow(0, j0, c).copy_(h);
  });
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
    const Pass<scalar_t> p(x, W, row_labels, col_labels, normalize_x, dt);
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
