// Small helpers shared by the CUDA kernels.
#pragma once
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers, which a minimal
// CUDA toolkit (nvcc only) lacks, and costs compile time.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace protomem {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kWarp = 32;
constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n, int64_t per_block = kThreads) {
  return (n + per_block - 1) / per_block;
}

// Enough blocks for grid-stride loops over large arrays, without launching millions of blocks.
inline int64_t grid_stride_blocks(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(blocks_for(n), 4 * int64_t(sms)));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32); every thread gets the result.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total += partial[w];
  return total;
}

__device__ __forceinline__ void atomic_add_i64(int64_t* addr, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(v));
}

}  // namespace protomem
