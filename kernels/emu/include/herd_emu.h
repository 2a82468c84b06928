// The CUDA builtins herd's kernels use, for the host. Force-included before every kernels/cuda/*.cu.
//
// Execution model (src/runtime.cpp): one launch at a time per process; a launch runs its blocks
// one after another; the threads of a
// block are real OS threads, so __syncthreads is a barrier and __shared__ variables (function
// statics here) are shared by exactly the threads of the running block. Warp shuffles exchange
// through a per-block slot array between two warp barriers. A thread that returns leaves the
// barriers, as an exited GPU thread does. A barrier that waits too long aborts with a message
// (a __syncthreads in divergent code deadlocks on the GPU too).
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
};
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
