// Residual add fused with RMSNorm (LlamaRMSNorm: statistics in f32).
//   forward:  h = x + r (rounded to T, it is the residual stream), y = h * rsqrt(mean(h^2) + eps) * w
//   backward: ds = gh + rinv * (gy*w - n * mean(gy*w*n)),  n = h * rinv;  dw partial = gy * n
// Layouts (contiguous): x, r: [rows, D]; w: [D]; out/grad: [2, rows, D] = (h | y) and (gh | gy).
// One block per row; rinv is recomputed in the backward from h rather than stored.
#include "common.cuh"

template <typename T>
__device__ void add_rms_norm_fwd(const T* x, const T* r, int has_r, const T* w, T* out, int rows,
                                 int D, float eps) {
  const size_t row = blockIdx.x, off = row * D;
  T* h = out + off;
  T* y = out + (size_t)rows * D + off;
  float ss = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float s = to_f(x[off + i]) + (has_r ? to_f(r[off + i]) : 0.f);
    T hs = from_f<T>(s);
    h[i] = hs;
    float hf = to_f(hs);
    ss += hf * hf;
  }
  const float rinv = rsqrtf(block_sum(ss) / D + eps);
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    y[i] = from_f<T>(to_f(h[i]) * rinv * to_f(w[i]));
  }
}

template <typename T>
__device__ void add_rms_norm_bwd(const T* res, const T* w, const T* g, T* out, int rows, int D,
                                 float eps) {
  const size_t row = blockIdx.x, off = row * D, plane = (size_t)rows * D;
  const T* h = res + off;
  const T* gh = g + off;
  const T* gy = g + plane + off;
  float ss = 0.f, dot = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float hf = to_f(h[i]);
    ss += hf * hf;
    dot += to_f(gy[i]) * to_f(w[i]) * hf;
  }
  const float rinv = rsqrtf(block_sum(ss) / D + eps);
  const float mean_dot = block_sum(dot) * rinv / D; // mean(gy*w*n)
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float n = to_f(h[i]) * rinv, gyi = to_f(gy[i]);
    out[off + i] = from_f<T>(to_f(gh[i]) + rinv * (gyi * to_f(w[i]) - n * mean_dot));
    out[plane + off + i] = from_f<T>(gyi * n);
  }
}

HERD_INSTANTIATE(herd_add_rms_norm_fwd,
                 (const T* x, const T* r, int has_r, const T* w, T* out, int rows, int D, float eps),
                 add_rms_norm_fwd<T>(x, r, has_r, w, out, rows, D, eps))
HERD_INSTANTIATE(herd_add_rms_norm_bwd,
                 (const T* res, const T* w, const T* g, T* out, int rows, int D, float eps),
                 add_rms_norm_bwd<T>(res, w, g, out, rows, D, eps))
