// The kernels declared in cos_lse_tiles.h, written once with ATen's Vectorized<T> and compiled
// per CPU capability: include with CPU_CAPABILITY defined (DEFAULT or AVX2), which also names the
// namespace they land in.
#pragma once
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // ATen's "#pragma unroll"
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cmath>
#include <limits>

#include "cos_lse_tiles.h"

namespace protomem {
namespace cos_lse {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Softmax weights need ~1e-6 relative accuracy: ATen's 20-ulp polynomial (0 below ln(FLT_MIN)).
inline Vectorized<float> vexp(const Vectorized<float>& t) { return t.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& t) { return t.exp(); }

template <typename T>
T hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (T e : buf) s += e;
  return s;
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc0(0), acc1(0);
  int64_t d = 0;
  for (; d + 2 * W <= n; d += 2 * W) {
    acc0 = at::vec::fmadd(V::loadu(a + d), V::loadu(b + d), acc0);
    acc1 = at::vec::fmadd(V::loadu(a + d + W), V::loadu(b + d + W), acc1);
  }
  T s = hsum(acc0 + acc1);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// fn(j, k, cos, w_inv_j, at) for each column j of the block and each of G vectors of lanes from
// r: cos = v * w_inv_j + bias_j, at points to those lanes of v.
template <typename T, int G, typename Fn>
inline void for_each_cos(const Block<T>& b, int64_t r, const Fn& fn) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t j = 0; j < b.c; ++j) {
    const V wv(b.w_inv[j]), bv(b.bias[j]);
    T* row = b.v + j * b.ld + r;
    for (int k = 0; k < G; ++k) {
      fn(j, k, at::vec::fmadd(V::loadu(row + k * W), wv, bv), wv, row + k * W);
    }
  }
}

// Pass 1 over G vectors of lanes from r: each lane's highest cosine in the block and its first
// column (as T: block columns are far below 2^24).
template <typename T, int G>
void block_max(const Block<T>& b, int64_t r, T* mx_out, T* first_out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V mx[G], first[G];
  for (int k = 0; k < G; ++k) {
    mx[k] = V(-std::numeric_limits<T>::infinity());
    first[k] = V(-1);
  }
  for_each_cos<T, G>(b, r, [&](int64_t j, int k, const V& cv, const V&, T*) {
    const V gt = cv > mx[k];
    mx[k] = V::blendv(mx[k], cv, gt);
    first[k] = V::blendv(first[k], V(static_cast<T>(j)), gt);
  });
  for (int k = 0; k < G; ++k) {
    mx[k].store(mx_out + k * W);
    first[k].store(first_out + k * W);
  }
}

// Pass 2: P = exp(s * cos - m) * w_inv_j in place, and each lane's sum of exp(s * cos - m).
template <typename T, int G>
void block_exp(const Block<T>& b, int64_t r, const T* neg_m, T* sum_out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V nm[G], sum[G];
  for (int k = 0; k < G; ++k) {
    nm[k] = V::loadu(neg_m + k * W);
    sum[k] = V(0);
  }
  const V sv(b.scale);
  for_each_cos<T, G>(b, r, [&](int64_t, int k, const V& cv, const V& wv, T* out) {
    const V p = vexp(at::vec::fmadd(cv, sv, nm[k]));
    sum[k] = sum[k] + p;
    (p * wv).store(out);
  });
  for (int k = 0; k < G; ++k) sum[k].store(sum_out + k * W);
}

template <typename T, int G>
void fwd_group(const Block<T>& b, int64_t r, const FwdState<T>& st) {
  constexpr int64_t N = G * Vectorized<T>::size();
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T mx[N], first[N], neg_m[N], sum[N];
  block_max<T, G>(b, r, mx, first);
  for (int64_t q = 0; q < N; ++q) {
    const int64_t i = r + q;
    if (mx[q] > st.best[i]) {  // strictly: an earlier block keeps a tie
      st.best[i] = mx[q];
      st.best_index[i] = st.j0 + static_cast<int64_t>(first[q]);
    }
    const T m_new = std::max(st.m[i], b.scale * mx[q]);
    if (m_new > st.m[i]) {
      if (st.m[i] > -kInf) {  // rows without earlier columns have l = 0 and direction = 0
        const T alpha = std::exp(st.m[i] - m_new);
        st.l[i] *= alpha;
        if (i < st.B) {
          T* d = st.direction + i * st.D;
          for (int64_t e = 0; e < st.D; ++e) d[e] *= alpha;
        }
      }
      st.m[i] = m_new;
    }
    neg_m[q] = m_new > -kInf ? -m_new : 0;  // no column yet: every cos is -inf, P = 0
  }
  block_exp<T, G>(b, r, neg_m, sum);
  for (int64_t q = 0; q < N; ++q) st.l[r + q] += sum[q];
}

template <typename T, int G>
void bwd_group(const Block<T>& b, int64_t r, const T* coef, const T* lse) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V cf[G], nl[G];
  for (int k = 0; k < G; ++k) {
    cf[k] = V::loadu(coef + r + k * W);
    nl[k] = V(0) - V::loadu(lse + r + k * W);
  }
  const V sv(b.scale);
  for_each_cos<T, G>(b, r, [&](int64_t, int k, const V& cv, const V&, T* out) {
    (cf[k] * vexp(at::vec::fmadd(cv, sv, nl[k]))).store(out);
  });
}

// Four vectors of lanes per pass keep the running values in registers (16 on AVX2).
constexpr int kGroup = 4;

template <typename T, typename Group4, typename Group1>
void for_groups(int64_t r0, int64_t r1, Group4 g4, Group1 g1) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t r = r0;
  for (; r + kGroup * W <= r1; r += kGroup * W) g4(r);
  for (; r < r1; r += W) g1(r);
}

template <typename T>
void fwd_rows(const Block<T>& b, int64_t r0, int64_t r1, const FwdState<T>& st) {
  for_groups<T>(
      r0, r1, [&](int64_t r) { fwd_group<T, kGroup>(b, r, st); },
      [&](int64_t r) { fwd_group<T, 1>(b, r, st); });
}

template <typename T>
void bwd_rows(const Block<T>& b, int64_t r0, int64_t r1, const T* coef, const T* lse) {
  for_groups<T>(
      r0, r1, [&](int64_t r) { bwd_group<T, kGroup>(b, r, coef, lse); },
      [&](int64_t r) { bwd_group<T, 1>(b, r, coef, lse); });
}

template <typename T>
void inv_norms(const T* w, int64_t c, int64_t D, T eps, T* w_inv) {
  for (int64_t j = 0; j < c; ++j) {
    const T* row = w + j * D;
    w_inv[j] = 1 / std::max(std::sqrt(dot(row, row, D)), eps);
  }
}

template <typename T>
void project(T* h, const T* w, const T* w_inv, int64_t c, int64_t D) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t j = 0; j < c; ++j) {
    T* hj = h + j * D;
    const T* wj = w + j * D;
    const T wi = w_inv[j];
    const T k = dot(hj, wj, D) * wi * wi;
    const V kv(k), wiv(wi);
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      ((V::loadu(hj + d) - kv * V::loadu(wj + d)) * wiv).store(hj + d);
    }
    for (; d < D; ++d) hj[d] = (hj[d] - k * wj[d]) * wi;
  }
}

template <typename T>
const Kernels<T>& table() {
  static const Kernels<T> k{Vectorized<T>::size(), &fwd_rows<T>, &bwd_rows<T>, &inv_norms<T>,
                            &project<T>};
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace cos_lse
}  // namespace protomem
