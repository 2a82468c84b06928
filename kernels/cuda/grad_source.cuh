// Where the optimizer kernels read the step's gradient from: one flat f32 buffer (the sum of
// several micro-batches or ranks), or — when a step has one micro-batch on one rank — the P
// parameters' own gradients as backward left them, through a table of device pointers, so no
// [N] f32 sum has to exist. Both read element e of parameter k (starts[k] <= e < starts[k+1])
// as f32, widening bf16 exactly, so the two give the same step bit for bit.
#pragma once
#include "common.cuh"

// The last k with starts[k] <= e: parameter k holds element e.
__device__ __forceinline__ int param_of(const uint64_t* starts, int P, size_t e) {
  int lo = 0, hi = P - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= e) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct FlatGrad {
  const float* g;
  __device__ float at(const uint64_t*, int, size_t e) const { return g[e]; }
};

// ptrs[k]: parameter k's gradient (its elements contiguous, type T), 0 when it has none (reads 0,
// as the flat sum holds 0 for a parameter backward did not reach).
template <typename T> struct TableGrad {
  const int64_t* ptrs;
  __device__ float at(const uint64_t* starts, int k, size_t e) const {
    const T* g = (const T*)ptrs[k];
    return g ? to_f(g[e - starts[k]]) : 0.f;
  }
};
