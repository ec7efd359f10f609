// The vectorised inner loops of cos_lse_fwd / cos_lse_bwd_w on CPU (csrc/cpu/cos_lse_cpu.cpp).
// They are compiled twice, by cos_lse_tiles_avx2.cpp (AVX2 + FMA) and cos_lse_tiles_default.cpp
// (whatever the build flags give), and kernels<T>() picks one per call from the running CPU.
//
// A block holds the raw dot products of c columns of W with the B rows of x, transposed: row j of
// the block is column j0 + j of W, lane i is row i of x, the leading dimension ld is B rounded up
// to kLanePad (the padding lanes are phantom rows, computed and ignored).
#pragma once
#include <cstdint>

namespace protomem {
namespace cos_lse {

constexpr int64_t kLanePad = 8;

template <typename T>
struct Block {
  T* v;              // [c, ld] x_hat_i . W_j on entry; P (fwd) or gamma (bwd) on exit
  int64_t c, ld;
  const T* w_inv;    // [c] 1 / |W_j| (or ones)
  const T* bias;     // [c] 0, or -inf for an empty column; same-label entries of v are -inf
  T scale;
};

// The online softmax of each row over the columns seen so far; arrays of ld lanes.
template <typename T>
struct FwdState {
  T* m;                 // running max of s * cos (-inf before any other column)
  T* l;                 // sum of exp(s * cos - m)
  T* best;              // highest cosine
  int64_t* best_index;  // its smallest column, -1 before any
  T* direction;         // [B, D] sum of exp(s * cos - m) * w_hat_j, rescaled when m moves
  int64_t B, D, j0;     // j0: the block's first column
};

template <typename T>
struct Kernels {
  int64_t lanes;  // rows per vector; r0, r1 below are multiples of it
  // Lanes [r0, r1): cos = v * w_inv + bias; updates best / best_index / m / l, rescales those
  // rows of direction, and leaves P = exp(s * cos - m) * w_inv_j in v (0 on masked entries).
  void (*fwd_rows)(const Block<T>& blk, int64_t r0, int64_t r1, const FwdState<T>& st);
  // Lanes [r0, r1): v = coef_i * exp(s * cos - lse_i); a lane with lse_i = +inf gives zeros.
  void (*bwd_rows)(const Block<T>& blk, int64_t r0, int64_t r1, const T* coef, const T* lse);
  // w_inv[j] = 1 / max(|w_j|, eps) for the c rows of w [c, D].
  void (*inv_norms)(const T* w, int64_t c, int64_t D, T eps, T* w_inv);
  // h_j = w_inv_j * (h_j - <h_j, w_j> w_inv_j^2 w_j) in place for the c rows of h, w [c, D]:
  // the gradient through w_hat_j = w_j * w_inv_j.
  void (*project)(T* h, const T* w, const T* w_inv, int64_t c, int64_t D);
};

// The AVX2 kernels when this CPU has AVX2 and FMA and PROTOMEM_CPU_VEC is not "default".
template <typename T>
const Kernels<T>& kernels();

namespace DEFAULT {
template <typename T>
const Kernels<T>& kernels();
}
namespace AVX2 {
template <typename T>
const Kernels<T>* kernels();  // nullptr when not built for x86-64
}

}  // namespace cos_lse
}  // namespace protomem
