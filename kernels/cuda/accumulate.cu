// acc[i] += g[i]: one micro-batch's gradient of one parameter (T: f32 or bf16, widened exactly)
// added into the step's flat f32 gradient sum, in place. The caller passes acc already offset to
// the parameter's span, so no [N] temporary (cast, flatten, concatenation) is ever made.
// One thread per element.
#include "common.cuh"

template <typename T> __device__ void accumulate(float* acc, const T* g, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc[i] += to_f(g[i]);
}

HERD_INSTANTIATE(herd_accumulate, (float* acc, const T* g, size_t n), accumulate<T>(acc, g, n))
