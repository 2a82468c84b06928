// Sum of squares of the step's gradient, for the gradient norm, without an [n] temporary. Block
// b sums the grid-stride elements b·threads + t + k·(blocks·threads) and writes partial[b]; the
// caller adds the partials. No atomics: the order is fixed by the launch shape, so the norm,
// hence the clipping, is the same every run (resume stays bit-identical). herd_sum_squares reads
// a flat f32 buffer; herd_sum_squares_table_T the parameters' own gradients (grad_source.cuh),
// with the same partition, so both give the same partials.
#include "grad_source.cuh"

extern "C" __global__ void herd_sum_squares(const float* x, size_t n, float* partial) {
  float s = 0.f;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) s += x[i] * x[i];
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename T>
__device__ void sum_squares_table(const int64_t* ptrs, const uint64_t* starts, int P, size_t n,
                                  float* partial) {
  const TableGrad<T> grad{ptrs};
  float s = 0.f;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  int k = i < n ? param_of(starts, P, i) : 0;
  for (; i < n; i += stride) {
    while (starts[k + 1] <= i) ++k; // i only grows: walk forward instead of searching again
    const float v = grad.at(starts, k, i);
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

HERD_INSTANTIATE(herd_sum_squares_table,
                 (const int64_t* ptrs, const uint64_t* starts, int P, size_t n, float* partial),
                 sum_squares_table<T>(ptrs, starts, P, n, partial))
