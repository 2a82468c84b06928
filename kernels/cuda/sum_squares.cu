// Sum of squares of x[0..n) (f32), for the gradient norm, without an [n] temporary. Block b sums
// the grid-stride elements b·threads + t + k·(blocks·threads) and writes partial[b]; the caller
// adds the partials. No atomics: the order is fixed by the launch shape, so the norm, hence the
// clipping, is the same every run (resume stays bit-identical).
#include "common.cuh"

extern "C" __global__ void herd_sum_squares(const float* x, size_t n, float* partial) {
  float s = 0.f;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) s += x[i] * x[i];
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
