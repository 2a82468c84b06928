// Residual add fused with RMSNorm (LlamaRMSNorm: statistics in f32).
//   forward:  h = x + r (rounded to T, it is the residual stream), y = h * rsqrt(mean(h^2) + eps) * w
//   backward: ds = gh + rinv * (gy*w - n * mean(gy*w*n)),  n = h * rinv;  dw partial = gy * n
// Layouts (contiguous): x, r: [rows, D]; w: [D]; out/grad: [2, rows, D] = (h | y) and (gh | gy).
// Without r (a plain RMSNorm: has_r = 0) h is x itself, so out is only y [rows, D] (no copy of x
// is made, or held by the graph); without gh (has_gh = 0, the plain norm's backward) grad is
// only gy [rows, D]. res: h first (the backward reads only h: x for a plain norm).
// One block per row; rinv is recomputed in the backward from h rather than stored.
#include "common.cuh"

template <typename T>
__device__ void add_rms_norm_fwd(const T* x, const T* r, int has_r, const T* w, T* out, int rows,
                                 int D, float eps) {
  const size_t row = blockIdx.x, off = row * D;
  // h: the residual stream, written (with r) or x itself (without).
  const T* h = has_r ? out + off : x + off;
  T* y = out + (has_r ? (size_t)rows * D : 0) + off;
  float ss = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    T hs = x[off + i];
    if (has_r) {
      hs = from_f<T>(to_f(hs) + to_f(r[off + i]));
      out[off + i] = hs;
    }
    float hf = to_f(hs);
    ss += hf * hf;
  }
  const float rinv = rsqrtf(block_sum(ss) / D + eps);
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    y[i] = from_f<T>(to_f(h[i]) * rinv * to_f(w[i]));
  }
}

template <typename T>
__device__ void add_rms_norm_bwd(const T* res, const T* w, const T* g, int has_gh, T* out,
                                 int rows, int D, float eps) {
  const size_t row = blockIdx.x, off = row * D, plane = (size_t)rows * D;
  const T* h = res + off;
  const T* gy = g + (has_gh ? plane : 0) + off;
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
    const float ghi = has_gh ? to_f(g[off + i]) : 0.f;
    out[off + i] = from_f<T>(ghi + rinv * (gyi * to_f(w[i]) - n * mean_dot));
    out[plane + off + i] = from_f<T>(gyi * n);
  }
}

HERD_INSTANTIATE(herd_add_rms_norm_fwd,
                 (const T* x, const T* r, int has_r, const T* w, T* out, int rows, int D, float eps),
                 add_rms_norm_fwd<T>(x, r, has_r, w, out, rows, D, eps))
HERD_INSTANTIATE(herd_add_rms_norm_bwd,
                 (const T* res, const T* w, const T* g, int has_gh, T* out, int rows, int D,
                  float eps),
                 add_rms_norm_bwd<T>(res, w, g, has_gh, out, rows, D, eps))
