// generate_prototypes on CUDA: a warp per row computes w_i / |x_i|, then a block per class sums
// its rows in the same sorted order as the CPU kernel and normalises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../class_segments.h"
#include "cuda_utils.cuh"

namespace protomem {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr double kEps = 1e-12;  // F.normalize's eps

template <typename scalar_t, typename acc_t>
__global__ void row_scale_kernel(const scalar_t* __restrict__ X, const acc_t* __restrict__ W,
                                 int64_t B, int64_t D, acc_t* __restrict__ scale) {
  const int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= B) return;
  acc_t ss = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t v = static_cast<acc_t>(X[i * D + d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) scale[i] = (W ? W[i] : acc_t(1)) / max(sqrt(ss), acc_t(kEps));
}

template <typename scalar_t, typename acc_t>
__global__ void class_mean_kernel(const scalar_t* __restrict__ X, const acc_t* __restrict__ W,
                                  const acc_t* __restrict__ scale, const int64_t* __restrict__ order,
                                  const int64_t* __restrict__ offsets, int64_t D,
                                  acc_t* __restrict__ P) {
  const int64_t u = blockIdx.x;
  const int64_t k0 = offsets[u], k1 = offsets[u + 1];
  if (k0 == k1) {  // padding: a zero row (uniform over the block, before any block_sum)
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) P[u * D + d] = acc_t(0);
    return;
  }
  acc_t wsum = 0;
  for (int64_t k = k0; k < k1; ++k) wsum += W ? W[order[k]] : acc_t(1);
  acc_t ss = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = order[k];
      acc += scale[i] * static_cast<acc_t>(X[i * D + d]);
    }
    acc /= wsum;
    P[u * D + d] = acc;
    ss += acc * acc;
  }
  const acc_t inv = acc_t(1) / max(sqrt(block_sum(ss)), acc_t(kEps));
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) P[u * D + d] *= inv;
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
  auto scale = at::empty({B}, x.options().dtype(pdt));
  auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "generate_prototypes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* W = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
    row_scale_kernel<scalar_t, acc_t><<<blocks_for(B, kWarpsPerBlock), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), W, B, D, scale.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    class_mean_kernel<scalar_t, acc_t><<<U, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), W, scale.data_ptr<acc_t>(), seg.order.data_ptr<int64_t>(),
        seg.offsets.data_ptr<int64_t>(), D, protos.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {seg.classes, protos, seg.inverse};
}

}  // namespace

TORCH_LIBRARY_IMPL(protomem, CUDA, m) { m.impl("generate_prototypes", &generate_prototypes_cuda); }

}  // namespace protomem
