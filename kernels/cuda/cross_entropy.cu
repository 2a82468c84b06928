// One chunk of the fused lm_head cross-entropy: logits [n, V] (T) of n rows -> out f32
// [n*V + n]: d(loss_row)/d(logits) = softmax - onehot(label) in the first n*V entries, the row
// loss lse - logit[label] in the last n. label < 0 (the -100 ignore index) gives loss 0 and a
// zero gradient row. The caller multiplies the chunk's gradient into dW and dh right away, so
// only one chunk of logits ever exists. One block per row.
#include "common.cuh"

template <typename T>
__device__ void ce_chunk(const T* logits, const int64_t* labels, float* out, int n, int V) {
  const size_t row = blockIdx.x, off = row * V;
  float* grad = out + off;
  const int64_t label = labels[row];
  if (label < 0) {
    for (int j = threadIdx.x; j < V; j += blockDim.x) grad[j] = 0.f;
    if (threadIdx.x == 0) out[(size_t)n * V + row] = 0.f;
    return;
  }
  float m = -INFINITY;
  for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, to_f(logits[off + j]));
  m = block_max(m);
  float z = 0.f;
  for (int j = threadIdx.x; j < V; j += blockDim.x) z += __expf(to_f(logits[off + j]) - m);
  z = block_sum(z);
  const float lse = m + __logf(z), inv = 1.f / z;
  for (int j = threadIdx.x; j < V; j += blockDim.x)
    grad[j] = __expf(to_f(logits[off + j]) - m) * inv - (j == label ? 1.f : 0.f);
  if (threadIdx.x == 0) out[(size_t)n * V + row] = lse - to_f(logits[off + label]);
}

HERD_INSTANTIATE(herd_ce_chunk, (const T* logits, const int64_t* labels, float* out, int n, int V),
                 ce_chunk<T>(logits, labels, out, n, V))
