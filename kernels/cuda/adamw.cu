// AdamW over all parameters in one launch, exactly torch.optim.AdamW's single-tensor formula in
// f32, on the gradient times grad_scale (1 / token count × the clipping coefficient, so the
// scaled gradient is never stored): g = grad * grad_scale; p *= 1 - lr*wd; m += (1-b1)(g - m);
// v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v) / bc2_sqrt + eps).
//
// The f32 master weight p is kept as two 16-bit halves (src/master.rs says why and proves the
// code): its high half is the model's own bf16 weight, rounded to nearest with ties away from
// zero; its low half the i16 remainder. So the step reads and writes the bf16 weights in place
// and no separate f32 master or bf16 copy exists.
//
// state: f32 words [2N + ceil(N/2)] = (exp_avg [N] | exp_avg_sq [N] | low halves, int16 [N]);
// weights: [P] addresses of the parameters' bf16 weights (contiguous); the gradient: a flat f32
// [N] (herd_adamw) or a table of the parameters' own gradients (herd_adamw_table_T, see
// grad_source.cuh); starts: [P+1] element offsets of the P parameters in the flat buffers;
// decay_mul: [P] (1 - lr*wd of the parameter's group). One thread per element; its parameter by
// binary search.
#include <string.h>
#include "grad_source.cuh"

__device__ __forceinline__ float join_master(bf16 hi, int16_t lo) {
  uint16_t h;
  memcpy(&h, &hi, 2);
  const uint32_t b = ((uint32_t)h << 16) + (uint32_t)(int32_t)lo;
  float x;
  memcpy(&x, &b, 4);
  return x;
}

__device__ __forceinline__ void split_master(float x, bf16* hi, int16_t* lo) {
  uint32_t b;
  memcpy(&b, &x, 4);
  uint16_t h = (uint16_t)((b + 0x8000u) >> 16);
  int16_t l = (int16_t)(int32_t)(b - ((uint32_t)h << 16));
  if (x != x) { h = 0x7fc0; l = 0; } // NaN stays a NaN
  memcpy(hi, &h, 2);
  *lo = l;
}

template <class G>
__device__ void adamw(float* state, const int64_t* weights, G grad, const uint64_t* starts,
                      const float* decay_mul, int P, size_t N, float lerp_w, float b2,
                      float one_minus_b2, float step_size, float bc2_sqrt, float eps,
                      float grad_scale) {
  const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= N) return;
  const int k = param_of(starts, P, e);
  float* m = state + e;
  float* v = state + N + e;
  int16_t* lo = (int16_t*)(state + 2 * N) + e;
  bf16* hi = (bf16*)weights[k] + (e - starts[k]);
  const float g = grad.at(starts, k, e) * grad_scale;
  float pv = join_master(*hi, *lo) * decay_mul[k];
  float mv = *m + lerp_w * (g - *m);
  float vv = *v * b2 + one_minus_b2 * g * g;
  pv += -step_size * (mv / (sqrtf(vv) / bc2_sqrt + eps));
  *m = mv; *v = vv;
  split_master(pv, hi, lo);
}

extern "C" __global__ void herd_adamw(float* state, const int64_t* weights, const float* grad,
                                      const uint64_t* starts, const float* decay_mul, int P,
                                      size_t N, float lerp_w, float b2, float one_minus_b2,
                                      float step_size, float bc2_sqrt, float eps,
                                      float grad_scale) {
  adamw(state, weights, FlatGrad{grad}, starts, decay_mul, P, N, lerp_w, b2, one_minus_b2,
        step_size, bc2_sqrt, eps, grad_scale);
}

HERD_INSTANTIATE(herd_adamw_table,
                 (float* state, const int64_t* weights, const int64_t* ptrs,
                  const uint64_t* starts, const float* decay_mul, int P, size_t N,
                  float lerp_w, float b2, float one_minus_b2, float step_size, float bc2_sqrt,
                  float eps, float grad_scale),
                 adamw(state, weights, TableGrad<T>{ptrs}, starts, decay_mul, P, N, lerp_w, b2,
                       one_minus_b2, step_size, bc2_sqrt, eps, grad_scale))
