// Shared helpers of herd's fused kernels. Every kernel computes in f32 whatever the storage type
// (f32 or bf16), so bf16 results differ from the f32 CPU reference only by the final rounding.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }

// Block-wide reductions; blockDim.x a multiple of 32 (<= 1024). Every thread gets the result.
// The leading __syncthreads lets a block call them back to back with the same shared buffer.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float sh[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float r = lane < nw ? sh[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  return r;
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float sh[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float r = lane < nw ? sh[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) r = fmaxf(r, __shfl_xor_sync(0xffffffffu, r, o));
  return r;
}

// One extern "C" entry point per storage type: NAME_f32 and NAME_bf16.
#define HERD_INSTANTIATE(NAME, ARGS, CALL)                                                     \
  namespace herd_f32 { typedef float T; extern "C" __global__ void NAME##_f32 ARGS { CALL; } }    \
  namespace herd_bf16 { typedef bf16 T; extern "C" __global__ void NAME##_bf16 ARGS { CALL; } }
