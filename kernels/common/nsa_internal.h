/*
 * nsa_internal.h — private helpers shared by kernels/common and kernels/cpu.
 *
 * Not installed, not part of the API: inline dtype conversions, strided
 * element loads/stores (all arithmetic in f32), and a monotonic clock.
 */
#ifndef NSA_INTERNAL_H
#define NSA_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "nsa/sel_attn.h"

/* ---- dtype conversions (bit-exact, round to nearest even) ---- */

static inline uint32_t nsa_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static inline float nsa_bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float nsa_bf16_to_f32_i(uint16_t x) { return nsa_bits_f32((uint32_t)x << 16); }

static inline uint16_t nsa_f32_to_bf16_i(float f) {
  uint32_t u = nsa_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
  /* RNE: add 0x7fff plus the lowest kept bit; a carry into the exponent is
   * the correct rounding (up to inf for the largest finite values). */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float nsa_f16_to_f32_i(uint16_t x) {
  uint32_t sign = (uint32_t)(x & 0x8000u) << 16;
  uint32_t e = (x >> 10) & 0x1fu, m = x & 0x3ffu;
  if (e == 0) {
    /* zero or subnormal: m * 2^-24, exact in f32 */
    float f = (float)m * 5.9604644775390625e-8f;
    return nsa_bits_f32(nsa_f32_bits(f) | sign);
  }
  if (e == 31) return nsa_bits_f32(sign | 0x7f800000u | (m << 13));
  return nsa_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t nsa_f32_to_f16_i(float f) {
  uint32_t u = nsa_f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) { /* inf or NaN */
    if (u == 0x7f800000u) return sign | 0x7c00u;
    return sign | 0x7e00u | (uint16_t)((u >> 13) & 0x3ffu);
  }
  if (u >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to inf */
  uint32_t e = u >> 23, mant = u & 0x7fffffu;
  if (e < 113) { /* result is subnormal (or zero): m = value / 2^-24 */
    if (u <= 0x33000000u) return sign; /* <= 2^-25: ties to even → 0 */
    uint32_t m24 = mant | 0x800000u;
    uint32_t shift = 126u - e; /* 14..24 */
    uint32_t m = m24 >> shift, rem = m24 & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (m & 1u))) m++;
    return sign | (uint16_t)m;
  }
  uint32_t h = ((e - 112u) << 10) | (mant >> 13), rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
  return sign | (uint16_t)h;
}

/* ---- strided loads/stores in f32 ---- */

/* dst[i] = (float) base[off + i*stride], i < n */
static inline void nsa_load_vec(float *dst, const void *base, nsa_dtype_t dt, int64_t off,
                                int64_t stride, int64_t n) {
  switch (dt) {
    case NSA_F32: {
      const float *p = (const float *)base + off;
      if (stride == 1) {
        memcpy(dst, p, (size_t)n * sizeof(float));
      } else {
        for (int64_t i = 0; i < n; i++) dst[i] = p[i * stride];
      }
      break;
    }
    case NSA_BF16: {
      const uint16_t *p = (const uint16_t *)base + off;
      for (int64_t i = 0; i < n; i++) dst[i] = nsa_bf16_to_f32_i(p[i * stride]);
      break;
    }
    case NSA_F16: {
      const uint16_t *p = (const uint16_t *)base + off;
      for (int64_t i = 0; i < n; i++) dst[i] = nsa_f16_to_f32_i(p[i * stride]);
      break;
    }
    default: break;
  }
}

static inline void nsa_store_vec(void *base, nsa_dtype_t dt, int64_t off, int64_t stride,
                                 const float *src, int64_t n) {
  switch (dt) {
    case NSA_F32: {
      float *p = (float *)base + off;
      for (int64_t i = 0; i < n; i++) p[i * stride] = src[i];
      break;
    }
    case NSA_BF16: {
      uint16_t *p = (uint16_t *)base + off;
      for (int64_t i = 0; i < n; i++) p[i * stride] = nsa_f32_to_bf16_i(src[i]);
      break;
    }
    case NSA_F16: {
      uint16_t *p = (uint16_t *)base + off;
      for (int64_t i = 0; i < n; i++) p[i * stride] = nsa_f32_to_f16_i(src[i]);
      break;
    }
    default: break;
  }
}

/* Stores n zeros. */
static inline void nsa_store_zero(void *base, nsa_dtype_t dt, int64_t off, int64_t stride,
                                  int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    switch (dt) {
      case NSA_F32: ((float *)base)[off + i * stride] = 0.0f; break;
      case NSA_BF16:
      case NSA_F16: ((uint16_t *)base)[off + i * stride] = 0; break;
      default: break;
    }
  }
}

/* Offset of element [i0, i1, i2] (first three dims) of a tensor. */
static inline int64_t nsa_off3(const nsa_tensor_t *t, int64_t i0, int64_t i1, int64_t i2) {
  return i0 * t->stride[0] + i1 * t->stride[1] + i2 * t->stride[2];
}

static inline double nsa_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

/* f32 dot product. The simd reduction lets the compiler split the sum into
 * vector lanes (a fixed order, so results stay run-to-run deterministic). */
static inline float nsa_dot(const float *restrict a, const float *restrict b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

/* Summarizes row_len into row_off, total_len, max_len and len_hist with a
 * plain sequential loop (shared by the v1 planner and tests). */
void nsa_plan_summarize_seq(nsa_plan_t *p);

#endif /* NSA_INTERNAL_H */
