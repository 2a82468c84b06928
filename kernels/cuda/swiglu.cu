// SwiGLU: y = silu(g) * u, silu(a) = a * sigmoid(a).
// backward: dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))), du = dy * silu(g);
// out: [2, n] = (dg | du). One thread per element.
#include "common.cuh"

__device__ __forceinline__ float sigmoidf(float a) { return 1.f / (1.f + __expf(-a)); }

template <typename T> __device__ void swiglu_fwd(const T* g, const T* u, T* y, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float a = to_f(g[i]);
  y[i] = from_f<T>(a * sigmoidf(a) * to_f(u[i]));
}

template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* out, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float a = to_f(g[i]), s = sigmoidf(a), d = to_f(dy[i]);
  out[i] = from_f<T>(d * to_f(u[i]) * s * (1.f + a * (1.f - s)));
  out[n + i] = from_f<T>(d * a * s);
}

HERD_INSTANTIATE(herd_swiglu_fwd, (const T* g, const T* u, T* y, size_t n), swiglu_fwd<T>(g, u, y, n))
HERD_INSTANTIATE(herd_swiglu_bwd, (const T* g, const T* u, const T* dy, T* out, size_t n),
                 swiglu_bwd<T>(g, u, dy, out, n))
