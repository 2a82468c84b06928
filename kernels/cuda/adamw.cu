// AdamW over all parameters in one launch, exactly torch.optim.AdamW's single-tensor formula in
// f32, on the gradient times grad_scale (1 / token count × the clipping coefficient, so the
// scaled gradient is never stored): g = grad * grad_scale; p *= 1 - lr*wd; m += (1-b1)(g - m); v = b2 v + (1-b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps).
// state: f32 [3, N] = (master weights | exp_avg | exp_avg_sq); the gradient: a flat f32 [N]
// (herd_adamw) or a table of the parameters' own gradients (herd_adamw_table_T, see
// grad_source.cuh); starts: [P+1] element offsets of the P parameters in the flat buffers;
// decay_mul: [P] (1 - lr*wd of the parameter's group). One thread per element; its parameter
// by binary search.
#include "grad_source.cuh"

template <class G>
__device__ void adamw(float* state, G grad, const uint64_t* starts, const float* decay_mul, int P,
                      size_t N, float lerp_w, float b2, float one_minus_b2, float step_size,
                      float bc2_sqrt, float eps, float grad_scale) {
  const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= N) return;
  const int k = param_of(starts, P, e);
  float* p = state + e;
  float* m = state + N + e;
  float* v = state + 2 * N + e;
  const float g = grad.at(starts, k, e) * grad_scale;
  float pv = *p * decay_mul[k];
  float mv = *m + lerp_w * (g - *m);
  float vv = *v * b2 + one_minus_b2 * g * g;
  pv += -step_size * (mv / (sqrtf(vv) / bc2_sqrt + eps));
  *p = pv; *m = mv; *v = vv;
}

extern "C" __global__ void herd_adamw(float* state, const float* grad, const uint64_t* starts,
                                      const float* decay_mul, int P, size_t N, float lerp_w,
                                      float b2, float one_minus_b2, float step_size,
                                      float bc2_sqrt, float eps, float grad_scale) {
  adamw(state, FlatGrad{grad}, starts, decay_mul, P, N, lerp_w, b2, one_minus_b2, step_size,
        bc2_sqrt, eps, grad_scale);
}

HERD_INSTANTIATE(herd_adamw_table,
                 (float* state, const int64_t* ptrs, const uint64_t* starts,
                  const float* decay_mul, int P, size_t N, float lerp_w, float b2,
                  float one_minus_b2, float step_size, float bc2_sqrt, float eps,
                  float grad_scale),
                 adamw(state, TableGrad<T>{ptrs}, starts, decay_mul, P, N, lerp_w, b2,
                       one_minus_b2, step_size, bc2_sqrt, eps, grad_scale))
