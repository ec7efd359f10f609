// Small helpers shared by the CUDA kernels.
#pragma once
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers, which a minimal
// CUDA toolkit (nvcc only) lacks, and costs compile time.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace protomem {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kWarp = 32;
constexpr int kThreads = 256;
// Kernels give each warp one row and reduce with full-warp shuffles (mask 0xffffffff).
static_assert(kThreads % kWarp == 0, "blocks must hold whole warps");

inline int64_t blocks_for(int64_t n, int64_t per_block = kThreads) {
  return (n + per_block - 1) / per_block;
}

// Number of SMs of the current device, queried once per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sms = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < kMaxDevices) cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Enough blocks for grid-stride loops over large arrays, without launching millions of blocks.
inline int64_t grid_stride_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(blocks_for(n), 4 * int64_t(sm_count())));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets it.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total += partial[w];
  return total;
}

// Sums each of v[0..N) over a block of blockDim.x threads (a multiple of 32, at most 1024) with
// one pair of barriers; every thread gets the totals in v.
template <int N, typename T>
__device__ void block_sum_each(T (&v)[N]) {
  __shared__ T partial[N][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = warp_sum(v[j]);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) partial[j][warp] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    v[j] = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) v[j] += partial[j][w];
  }
}

// Exclusive prefix sum of v over a block of blockDim.x threads (a multiple of 32, at most 1024),
// in thread order; *total gets the block's sum. Every thread of the block must call it.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* total) {
  __shared__ int64_t warp_totals[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  int64_t inclusive = v;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const int64_t n = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += n;
  }
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t t = lane < warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const int64_t n = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += n;
    }
    warp_totals[lane] = t;
  }
  __syncthreads();
  *total = warp_totals[warps - 1];
  return (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - v;
}

__device__ __forceinline__ void atomic_add_i64(int64_t* addr, int64_t v) {
  atomicAdd(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(v));
}

}  // namespace protomem
