// Dropout with a regenerated mask (LoRA's lora_dropout): y = x * keep where element j of
// position s survives, else 0. The mask is never stored: the backward calls this again on dy.
// Survival is a pure function of (seeds[s], j): the (j + 1)-th SplitMix64 output of seeds[s],
// cut to 53 bits, is >= threshold = ceil(p * 2^53), which is exactly the host's
// `next_f64() >= p` (herd-model's SplitMix64), in integers. One thread per element.
#include "common.cuh"

__device__ __forceinline__ uint64_t splitmix64(uint64_t seed, uint64_t nth) {
  uint64_t z = seed + nth * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout_mul(const T* x, const int64_t* seeds, T* y, size_t n, int d,
                            uint64_t threshold, float keep) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t z = splitmix64((uint64_t)seeds[i / d], i % d + 1);
  y[i] = from_f<T>((z >> 11) >= threshold ? to_f(x[i]) * keep : 0.f);
}

HERD_INSTANTIATE(herd_dropout_mul,
                 (const T* x, const int64_t* seeds, T* y, size_t n, int d, uint64_t threshold,
                  float keep),
                 dropout_mul<T>(x, seeds, y, n, d, threshold, keep))
