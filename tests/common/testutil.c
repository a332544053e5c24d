/* testutil.c — see testutil.h. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void nsa_tu_rng_seed(nsa_tu_rng_t *r, uint64_t seed) { r->s = seed * 0x9e3779b97f4a7c15ull + 1; }

uint64_t nsa_tu_rng_u64(nsa_tu_rng_t *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double nsa_tu_rng_uniform(nsa_tu_rng_t *r) { return (double)(nsa_tu_rng_u64(r) >> 11) * 0x1p-53; }

int64_t nsa_tu_rng_int(nsa_tu_rng_t *r, int64_t lo, int64_t hi) {
  if (hi <= lo) return lo;
  return lo + (int64_t)(nsa_tu_rng_u64(r) % (uint64_t)(hi - lo + 1));
}

static size_t el_size(nsa_dtype_t dt) { return (dt == NSA_BF16 || dt == NSA_F16) ? 2 : 4; }

int64_t nsa_tu_numel(const nsa_tensor_t *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

int nsa_tu_buf_alloc(nsa_tu_buf_t *b, nsa_dtype_t dt, int ndim, const int64_t *shape,
                     const int *order, int64_t gap, int64_t pad) {
  memset(b, 0, sizeof(*b));
  b->t.dtype = dt;
  b->t.ndim = ndim;
  for (int i = 0; i < ndim; i++) b->t.shape[i] = shape[i];
  int64_t cur = gap < 1 ? 1 : gap;
  for (int i = ndim - 1; i >= 0; i--) {
    int dim = order ? order[i] : i;
    b->t.stride[dim] = cur;
    cur = cur * shape[dim] + pad;
  }
  if (cur < 1) cur = 1;
  b->bytes = (size_t)cur * el_size(dt);
  b->mem = malloc(b->bytes);
  if (!b->mem) return -1;
  b->t.data = b->mem;
  nsa_tu_poison(b);
  return 0;
}

int nsa_tu_buf_contig(nsa_tu_buf_t *b, nsa_dtype_t dt, int ndim, const int64_t *shape) {
  return nsa_tu_buf_alloc(b, dt, ndim, shape, NULL, 1, 0);
}

void nsa_tu_buf_free(nsa_tu_buf_t *b) {
  free(b->mem);
  memset(b, 0, sizeof(*b));
}

static const uint32_t k_poison32 = 0x7fc00000u, k_poison_i32 = 0x5a5a5a5au;
static const uint16_t k_poison_bf16 = 0x7fc0u, k_poison_f16 = 0x7e00u;

void nsa_tu_poison(nsa_tu_buf_t *b) {
  size_t es = el_size(b->t.dtype), n = b->bytes / es;
  for (size_t i = 0; i < n; i++) {
    switch (b->t.dtype) {
      case NSA_F32: memcpy((char *)b->mem + i * 4, &k_poison32, 4); break;
      case NSA_I32: memcpy((char *)b->mem + i * 4, &k_poison_i32, 4); break;
      case NSA_BF16: ((uint16_t *)b->mem)[i] = k_poison_bf16; break;
      case NSA_F16: ((uint16_t *)b->mem)[i] = k_poison_f16; break;
    }
  }
}

int nsa_tu_is_poisoned(const nsa_tu_buf_t *b) {
  size_t es = el_size(b->t.dtype), n = b->bytes / es;
  for (size_t i = 0; i < n; i++) {
    const char *p = (const char *)b->mem + i * es;
    switch (b->t.dtype) {
      case NSA_F32:
        if (memcmp(p, &k_poison32, 4)) return 0;
        break;
      case NSA_I32:
        if (memcmp(p, &k_poison_i32, 4)) return 0;
        break;
      case NSA_BF16:
        if (memcmp(p, &k_poison_bf16, 2)) return 0;
        break;
      case NSA_F16:
        if (memcmp(p, &k_poison_f16, 2)) return 0;
        break;
    }
  }
  return 1;
}

/* Offset of the li-th logical element (row-major over shape). */
static int64_t logical_off(const nsa_tensor_t *t, int64_t li) {
  int64_t off = 0;
  for (int i = t->ndim - 1; i >= 0; i--) {
    int64_t s = t->shape[i];
    off += (li % s) * t->stride[i];
    li /= s;
  }
  return off;
}

double nsa_tu_bf16_value(uint16_t bits) {
  uint32_t u = (uint32_t)bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return (double)f;
}

double nsa_tu_f16_value(uint16_t bits) {
  int sign = bits >> 15, e = (bits >> 10) & 31, m = bits & 1023;
  double v;
  if (e == 0)
    v = ldexp((double)m, -24);
  else if (e == 31)
    v = m ? NAN : INFINITY;
  else
    v = ldexp(1024.0 + m, e - 25);
  return sign ? -v : v;
}

/* Encodes an f16-representable double (normal range) exactly. */
static uint16_t f16_encode_exact(double x) {
  uint16_t sign = x < 0 ? 0x8000u : 0;
  double a = fabs(x);
  if (a == 0) return sign;
  int e;
  double m = frexp(a, &e); /* a = m * 2^e, m in [0.5, 1) */
  int E = e - 1 + 15;      /* biased exponent of 1.f * 2^(e-1) */
  uint16_t mant = (uint16_t)((m * 2.0 - 1.0) * 1024.0);
  return sign | (uint16_t)(E << 10) | mant;
}

void nsa_tu_fill_random(nsa_tu_buf_t *b, nsa_tu_rng_t *r, double lo, double hi) {
  nsa_tensor_t *t = &b->t;
  int64_t n = nsa_tu_numel(t);
  for (int64_t li = 0; li < n; li++) {
    double x = lo + (hi - lo) * nsa_tu_rng_uniform(r);
    int64_t off = logical_off(t, li);
    switch (t->dtype) {
      case NSA_F32: ((float *)t->data)[off] = (float)x; break;
      case NSA_BF16: {
        float f = (float)x;
        uint32_t u;
        memcpy(&u, &f, 4);
        ((uint16_t *)t->data)[off] = (uint16_t)(u >> 16); /* truncate: exact value */
        break;
      }
      case NSA_F16: {
        double a = fabs(x);
        if (a < 0x1p-14) a = 0x1p-14;       /* stay normal */
        if (a > 65504.0) a = 65504.0;
        int e;
        double m = frexp(a, &e);
        m = floor(m * 2048.0) / 2048.0;     /* 11 significant bits */
        double v = ldexp(m, e);
        ((uint16_t *)t->data)[off] = f16_encode_exact(x < 0 ? -v : v);
        break;
      }
      case NSA_I32: ((int32_t *)t->data)[off] = (int32_t)x; break;
    }
  }
}

void nsa_tu_to_f64(const nsa_tensor_t *t, double *out) {
  int64_t n = nsa_tu_numel(t);
  for (int64_t li = 0; li < n; li++) {
    int64_t off = logical_off(t, li);
    switch (t->dtype) {
      case NSA_F32: out[li] = ((const float *)t->data)[off]; break;
      case NSA_BF16: out[li] = nsa_tu_bf16_value(((const uint16_t *)t->data)[off]); break;
      case NSA_F16: out[li] = nsa_tu_f16_value(((const uint16_t *)t->data)[off]); break;
      case NSA_I32: out[li] = ((const int32_t *)t->data)[off]; break;
    }
  }
}

void nsa_tu_from_i32(nsa_tensor_t *t, const int32_t *src) {
  int64_t n = nsa_tu_numel(t);
  for (int64_t li = 0; li < n; li++) ((int32_t *)t->data)[logical_off(t, li)] = src[li];
}

double nsa_tu_rel_err(const double *got, const double *want, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; i++) {
    if (isnan(got[i]) || isnan(want[i])) return INFINITY;
    if (isinf(want[i]) || isinf(got[i])) {
      if (got[i] != want[i]) return INFINITY;
      continue;
    }
    double e = fabs(got[i] - want[i]);
    if (e > num) num = e;
    if (fabs(want[i]) > den) den = fabs(want[i]);
  }
  return num / (den > 1e-30 ? den : 1e-30);
}

/* ---- selections ---- */

void nsa_tu_sel_blocks(int32_t *ids, int64_t B, int64_t S, int64_t G, int64_t n, int64_t Skv,
                       int32_t block_size, unsigned flags, nsa_tu_rng_t *r) {
  int64_t nblocks = (Skv + block_size - 1) / block_size;
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < S; t++) {
      int64_t pos = t + Skv - S, own = pos / block_size; /* the query's own block */
      for (int64_t g = 0; g < G; g++) {
        int32_t *row = ids + ((b * S + t) * G + g) * n;
        if ((flags & NSA_TU_SEL_BLOCKWISE) && t > 0 && (pos - 1) / block_size == own) {
          memcpy(row, row - G * n, sizeof(int32_t) * (size_t)n); /* the previous query's */
          if ((flags & NSA_TU_SEL_UNUSED) && nsa_tu_rng_int(r, 0, 7) == 0)
            row[nsa_tu_rng_int(r, 0, n - 1)] = (int32_t)nsa_tu_rng_int(r, 0, own);
          continue;
        }
        int empty = (flags & NSA_TU_SEL_EMPTY_ROWS) && nsa_tu_rng_int(r, 0, 5) == 0;
        for (int64_t i = 0; i < n; i++) {
          int64_t id;
          int64_t hi = (flags & NSA_TU_SEL_FUTURE) ? nblocks - 1 : own;
          if ((flags & NSA_TU_SEL_CORRELATED) && i == 0)
            id = own; /* NSA always keeps the local block */
          else if ((flags & NSA_TU_SEL_CORRELATED) && nsa_tu_rng_int(r, 0, 1))
            id = (i * 7 + g * 3) % (own + 1); /* shared across nearby t */
          else
            id = nsa_tu_rng_int(r, 0, hi);
          if ((flags & NSA_TU_SEL_DUP) && i > 0 && nsa_tu_rng_int(r, 0, 3) == 0)
            id = row[nsa_tu_rng_int(r, 0, i - 1)];
          if ((flags & NSA_TU_SEL_UNUSED) && nsa_tu_rng_int(r, 0, 4) == 0) id = -1;
          if (empty) id = -1;
          if (id < -1) id = -1;
          row[i] = (int32_t)id;
        }
      }
    }
}

void nsa_tu_sel_ranges(int32_t *sp, int64_t B, int64_t S, int64_t G, int64_t n, int64_t Skv,
                       unsigned flags, nsa_tu_rng_t *r) {
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < S; t++) {
      int64_t pos = t + Skv - S;
      for (int64_t g = 0; g < G; g++) {
        int32_t *row = sp + ((b * S + t) * G + g) * n * 2;
        int empty = (flags & NSA_TU_SEL_EMPTY_ROWS) && nsa_tu_rng_int(r, 0, 5) == 0;
        for (int64_t i = 0; i < n; i++) {
          int64_t hi = (flags & NSA_TU_SEL_FUTURE) ? Skv + 8 : pos + 1;
          int64_t s = nsa_tu_rng_int(r, 0, hi > 0 ? hi - 1 : 0);
          int64_t len = nsa_tu_rng_int(r, 0, 24);
          int kind = (int)nsa_tu_rng_int(r, 0, 7);
          if (i > 0 && kind == 0) { /* touching the previous span */
            s = row[2 * (i - 1) + 1];
          } else if (i > 0 && kind == 1) { /* overlapping the previous span */
            s = row[2 * (i - 1)] + (row[2 * (i - 1) + 1] - row[2 * (i - 1)]) / 2;
          } else if (kind == 2) {
            len = 0; /* empty [s, s) */
          }
          int64_t e = s + len;
          if ((flags & NSA_TU_SEL_DUP) && i > 0 && nsa_tu_rng_int(r, 0, 3) == 0) {
            int64_t j = nsa_tu_rng_int(r, 0, i - 1);
            s = row[2 * j];
            e = row[2 * j + 1];
          }
          if (((flags & NSA_TU_SEL_UNUSED) && nsa_tu_rng_int(r, 0, 4) == 0) || empty) s = e = 0;
          row[2 * i] = (int32_t)s;
          row[2 * i + 1] = (int32_t)e;
        }
      }
    }
}
