// AdamW over all parameters in one launch, exactly torch.optim.AdamW's single-tensor formula in
// f32, on the gradient times grad_scale (1 / token count × the clipping coefficient, so the
// scaled gradient is never stored): g = grad * grad_scale; p *= 1 - lr*wd; m += (1-b1)(g - m); v = b2 v + (1-b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps).
// state: f32 [3, N] = (master weights | exp_avg | exp_avg_sq); grad: f32 [N];
// starts: [P+1] element offsets of the P parameters in the flat buffers; decay_mul: [P]
// (1 - lr*wd of the parameter's group). One thread per element; its parameter by binary search.
#include "common.cuh"

extern "C" __global__ void herd_adamw(float* state, const float* grad, const uint64_t* starts,
                                      const float* decay_mul, int P, size_t N, float lerp_w,
                                      float b2, float one_minus_b2, float step_size,
                                      float bc2_sqrt, float eps, float grad_scale) {
  const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= N) return;
  int lo = 0, hi = P - 1; // find the last k with starts[k] <= e
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= e) lo = mid; else hi = mid - 1;
  }
  float* p = state + e;
  float* m = state + N + e;
  float* v = state + 2 * N + e;
  const float g = grad[e] * grad_scale;
  float pv = *p * decay_mul[lo];
  float mv = *m + lerp_w * (g - *m);
  float vv = *v * b2 + one_minus_b2 * g * g;
  pv += -step_size * (mv / (sqrtf(vv) / bc2_sqrt + eps));
  *p = pv; *m = mv; *v = vv;
}
