// Rotary embedding as transformers' apply_rotary_pos_emb: y = x*cos + rotate_half(x)*sin with
// rotate_half(x) = (-x2, x1). cos/sin ([T, Dh], f32) repeat their halves, so the backward is the
// same map with sin negated: sign = +1 forward, -1 backward.
// x, y: [BH, T, Dh] contiguous; one thread per element.
#include "common.cuh"

template <typename T>
__device__ void rope(const T* x, const float* cos, const float* sin, T* y, size_t n, int T_,
                     int Dh, float sign) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int i = idx % Dh, half = Dh / 2;
  const size_t t = (idx / Dh) % T_;
  const float rot = i < half ? -to_f(x[idx + half]) : to_f(x[idx - half]);
  y[idx] = from_f<T>(to_f(x[idx]) * cos[t * Dh + i] + sign * rot * sin[t * Dh + i]);
}

HERD_INSTANTIATE(herd_rope,
                 (const T* x, const float* cos, const float* sin, T* y, size_t n, int T_, int Dh,
                  float sign),
                 rope<T>(x, cos, sin, y, n, T_, Dh, sign))
