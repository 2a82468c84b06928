// Host stand-in for the CUDA toolkit's cuda_bf16.h: the storage type and the two conversions
// herd's kernels use, with the toolkit's semantics (round to nearest even; NaN stays NaN).
#pragma once
#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) { // NaN: keep it a (quiet) NaN
    b.bits = (uint16_t)((u >> 16) | 0x40u);
    return b;
  }
  u += 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
  b.bits = (uint16_t)(u >> 16);
  return b;
}
