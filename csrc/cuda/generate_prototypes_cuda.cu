// generate_prototypes on CUDA, balanced for any class sizes: a warp per row computes w_i / |x_i|,
// blocks of 16 sorted rows add each class's run of rows into its sum (float atomics where a class
// spans blocks, so its summation order may vary), then a warp per class normalises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../class_segments.h"
#include "cuda_utils.cuh"

namespace protomem {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kRowsPerChunk = 16;  // sorted rows summed by one block (per D tile)
constexpr double kEps = 1e-12;  // F.normalize's eps

// Warp per row i: scale_i = w_i / |x_i|; also zeroes the accumulators of class i (i < U).
template <typename scalar_t, typename acc_t>
__global__ void row_scale_kernel(const scalar_t* __restrict__ X, const acc_t* __restrict__ W,
                                 int64_t B, int64_t D, int64_t U, acc_t* __restrict__ scale,
                                 acc_t* __restrict__ P, acc_t* __restrict__ wsum) {
  const int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= B) return;
  acc_t ss = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t v = static_cast<acc_t>(X[i * D + d]);
    ss += v * v;
    if (i < U) P[i * D + d] = acc_t(0);
  }
  ss = warp_sum(ss);
  if (lane != 0) return;
  scale[i] = (W ? W[i] : acc_t(1)) / max(sqrt(ss), acc_t(kEps));
  if (i < U) wsum[i] = acc_t(0);
}

// Block (chunk c, D tile): sums scale_i * x_i over the chunk's sorted rows, one run per class,
// and adds each run to its class (a class may span chunks, so one huge class is spread over
// many blocks); thread 0 of the first D tile adds the runs' weights.
template <typename scalar_t, typename acc_t>
__global__ void chunk_sum_kernel(const scalar_t* __restrict__ X, const acc_t* __restrict__ W,
                                 const acc_t* __restrict__ scale, const int64_t* __restrict__ order,
                                 const int64_t* __restrict__ inverse, int64_t B, int64_t D,
                                 acc_t* __restrict__ P, acc_t* __restrict__ wsum) {
  const int64_t k0 = blockIdx.x * int64_t(kRowsPerChunk);
  const int64_t k1 = min(B, k0 + kRowsPerChunk);
  const int64_t d = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  const bool weights_here = blockIdx.y == 0 && threadIdx.x == 0;
  int64_t run = inverse[order[k0]];
  acc_t acc = 0, w_acc = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = order[k], u = inverse[i];
    if (u != run) {
      if (d < D) atomicAdd(P + run * D + d, acc);
      if (weights_here) atomicAdd(wsum + run, w_acc);
      acc = w_acc = 0;
      run = u;
    }
    if (d < D) acc += scale[i] * static_cast<acc_t>(X[i * D + d]);
    w_acc += W ? W[i] : acc_t(1);
  }
  if (d < D) atomicAdd(P + run * D + d, acc);
  if (weights_here) atomicAdd(wsum + run, w_acc);
}

// Warp per class: p = normalize(sum / wsum); padding (an empty segment) stays a zero row.
template <typename acc_t>
__global__ void normalize_kernel(const int64_t* __restrict__ offsets, const acc_t* __restrict__ wsum,
                                 int64_t U, int64_t D, acc_t* __restrict__ P) {
  const int64_t u = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (u >= U || offsets[u] == offsets[u + 1]) return;
  const acc_t inv_w = acc_t(1) / wsum[u];
  acc_t ss = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t v = P[u * D + d] * inv_w;
    P[u * D + d] = v;
    ss += v * v;
  }
  const acc_t inv = acc_t(1) / max(sqrt(warp_sum(ss)), acc_t(kEps));
  for (int64_t d = lane; d < D; d += kWarp) P[u * D + d] *= inv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> generate_prototypes_cuda(
    const at::Tensor& x_in, const at::Tensor& labels, const c10::optional<at::Tensor>& weights_in,
    bool padded) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto seg = class_segments(x_in, labels, weights_in, padded);
  auto x = x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(1), U = seg.classes.size(0);
  const auto pdt = proto_dtype(x);
  auto protos = at::empty({U, D}, x.options().dtype(pdt));
  if (U == 0) return {seg.classes, protos, seg.inverse};
  at::Tensor weights;
  if (weights_in.has_value()) weights = weights_in->to(pdt).contiguous();
  auto scratch = at::empty({B + U}, x.options().dtype(pdt));  // scale [B], wsum [U]
  auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "generate_prototypes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* W = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
    acc_t* scale = scratch.data_ptr<acc_t>();
    acc_t* wsum = scale + B;
    acc_t* P = protos.data_ptr<acc_t>();
    row_scale_kernel<scalar_t, acc_t><<<blocks_for(B, kWarpsPerBlock), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), W, B, D, U, scale, P, wsum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(blocks_for(B, kRowsPerChunk), blocks_for(D));
    chunk_sum_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), W, scale, seg.order.data_ptr<int64_t>(),
        seg.inverse.data_ptr<int64_t>(), B, D, P, wsum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<acc_t><<<blocks_for(U, kWarpsPerBlock), kThreads, 0, stream>>>(
        seg.offsets.data_ptr<int64_t>(), wsum, U, D, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {seg.classes, protos, seg.inverse};
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CUDA, m) { m.impl("generate_prototypes", &generate_prototypes_cuda); }

}  // namespace protomem
