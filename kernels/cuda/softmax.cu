// Causal scaled softmax of attention scores, between cuBLAS batched GEMMs (S = Q K^T, O = P V).
//   forward:  p[i, j] = softmax_j(scale * s[i, j]) over keys j <= i + (S - T); masked p = 0
//   backward: ds = scale * p * (dp - sum_j p * dp)
// s, p, dp: [BH, T, S] contiguous (queries are the last T of S positions). One block per row.
#include "common.cuh"

template <typename T>
__device__ void causal_softmax_fwd(const T* s, T* p, int T_, int S, float scale) {
  const size_t row = blockIdx.x, off = row * S;
  const int last = (int)(row % T_) + (S - T_); // last visible key
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, scale * to_f(s[off + j]));
  m = block_max(m);
  float z = 0.f;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) z += __expf(scale * to_f(s[off + j]) - m);
  const float inv = 1.f / block_sum(z);
  for (int j = threadIdx.x; j < S; j += blockDim.x)
    p[off + j] = from_f<T>(j <= last ? __expf(scale * to_f(s[off + j]) - m) * inv : 0.f);
}

template <typename T>
__device__ void causal_softmax_bwd(const T* p, const T* dp, T* ds, int S, float scale) {
  const size_t off = (size_t)blockIdx.x * S;
  float dot = 0.f;
  for (int j = threadIdx.x; j < S; j += blockDim.x) dot += to_f(p[off + j]) * to_f(dp[off + j]);
  dot = block_sum(dot);
  for (int j = threadIdx.x; j < S; j += blockDim.x) {
    const float pj = to_f(p[off + j]);
    ds[off + j] = from_f<T>(scale * pj * (to_f(dp[off + j]) - dot));
  }
}

HERD_INSTANTIATE(herd_causal_softmax_fwd, (const T* s, T* p, int T_, int S, float scale),
                 causal_softmax_fwd<T>(s, p, T_, S, scale))
HERD_INSTANTIATE(herd_causal_softmax_bwd, (const T* p, const T* dp, T* ds, int S, float scale),
                 causal_softmax_bwd<T>(p, dp, ds, S, scale))
