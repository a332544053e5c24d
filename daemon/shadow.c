/*
 * shadow.c — shadow-run sampling and output comparison (shadow.h).
 */
#include "shadow.h"

#include <math.h>
#include <string.h>

static uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

nsa_path_t nsad_shadow_choose(double rate, nsa_path_t primary, uint64_t seq) {
  if (!(rate > 0.0) || primary < 0 || primary >= NSA_PATH_COUNT) return NSA_PATH_AUTO;
  uint64_t h = mix64(seq);
  if (rate < 1.0) {
    /* top 53 bits as a uniform double in [0,1) */
    double u = (double)(h >> 11) * (1.0 / 9007199254740992.0);
    if (u >= rate) return NSA_PATH_AUTO;
  }
  /* The two paths other than the primary, in enum order; alternate by an
   * independent hash bit so sampling and alternation do not correlate. */
  nsa_path_t other[2];
  int k = 0;
  for (int p = 0; p < NSA_PATH_COUNT; p++)
    if (p != (int)primary) other[k++] = (nsa_path_t)p;
  return other[mix64(seq ^ 0x5bd1e995u) & 1];
}

void nsad_shadow_diff_init(nsad_shadow_diff_t *d) { memset(d, 0, sizeof *d); }

double nsad_tensor_get(const nsa_tensor_t *t, const int64_t *idx) {
  int64_t off = 0;
  for (int i = 0; i < t->ndim; i++) off += idx[i] * t->stride[i];
  const char *base = t->data;
  switch (t->dtype) {
    case NSA_F32: {
      float v;
      memcpy(&v, base + off * 4, 4);
      return v;
    }
    case NSA_BF16: {
      uint16_t v;
      memcpy(&v, base + off * 2, 2);
      uint32_t u = (uint32_t)v << 16;
      float f;
      memcpy(&f, &u, 4);
      return f;
    }
    case NSA_F16: {
      uint16_t v;
      memcpy(&v, base + off * 2, 2);
      /* IEEE half → double, independent of the kernels' converter */
      int s = v >> 15, e = (v >> 10) & 31, m = v & 1023;
      double r;
      if (e == 0) r = ldexp((double)m, -24);
      else if (e == 31) r = m ? NAN : INFINITY;
      else r = ldexp((double)(m | 1024), e - 25);
      return s ? -r : r;
    }
    case NSA_I32: {
      int32_t v;
      memcpy(&v, base + off * 4, 4);
      return v;
    }
  }
  return NAN;
}

static void acc(nsad_shadow_diff_t *d, double p, double s) {
  d->count++;
  double diff, rel;
  if (isnan(p) || isnan(s)) {
    if (isnan(p) && isnan(s)) return;
    d->mismatch_nan++;
    diff = rel = INFINITY;
  } else if (p == s) { /* also equal infinities */
    return;
  } else {
    diff = fabs(p - s);
    double den = fmax(fmax(fabs(p), fabs(s)), NSAD_SHADOW_REL_FLOOR);
    rel = isinf(diff) ? INFINITY : diff / den;
  }
  if (diff > d->max_abs) d->max_abs = diff;
  if (rel > d->max_rel) d->max_rel = rel;
}

int nsad_shadow_compare(const nsa_tensor_t *a, const nsa_tensor_t *b, nsad_shadow_diff_t *d) {
  if (!a || !b || !d || !a->data || !b->data || a->ndim != b->ndim || a->ndim < 0 ||
      a->ndim > NSA_MAX_DIMS)
    return -1;
  int64_t total = 1;
  for (int i = 0; i < a->ndim; i++) {
    if (a->shape[i] != b->shape[i] || a->shape[i] < 0) return -1;
    total *= a->shape[i];
  }
  if (total == 0) return 0;
  int64_t idx[NSA_MAX_DIMS] = {0};
  for (int64_t n = 0; n < total; n++) {
    acc(d, nsad_tensor_get(a, idx), nsad_tensor_get(b, idx));
    for (int i = a->ndim - 1; i >= 0; i--) {
      if (++idx[i] < a->shape[i]) break;
      idx[i] = 0;
    }
  }
  return 0;
}
