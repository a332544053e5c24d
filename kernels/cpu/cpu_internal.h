/*
 * cpu_internal.h — private helpers of the CPU backend.
 */
#ifndef NSA_CPU_INTERNAL_H
#define NSA_CPU_INTERNAL_H

#include <stdio.h>

#include "nsa_internal.h"

/* Key tile of the varlen kernels: keys are staged in f32 tiles of this many
 * rows so all h heads of a group reuse one K/V load (the GPU's shared-memory
 * tile). */
#define NSA_CPU_KT 32

/* Packed path: cap on the padded K/V workspace of one chunk of rows. */
#define NSA_CPU_PACKED_WS_CAP ((size_t)64 << 20)

/* Row r = ((b*S)+t)*G + g → (b, t, g). */
static inline void nsa_row_decode(const nsa_dims_t *d, int64_t r, int64_t *b, int64_t *t,
                                  int64_t *g) {
  *g = r % d->G;
  int64_t bt = r / d->G;
  *t = bt % d->S;
  *b = bt / d->S;
}

/* Exclusive key limit of query t: min(p(t)+1, Skv), p(t) = t + Skv - S. */
static inline int64_t nsa_row_limit(const nsa_dims_t *d, int64_t t) {
  int64_t lim = t + (d->Skv - d->S) + 1;
  return lim < d->Skv ? lim : d->Skv;
}

/* Raw entry i of row (b,t,g) as a half-open span [*lo, *hi) in int64.
 * Returns 1 for a usable entry, 0 for an unused slot (-1 id or [0,0]),
 * -1 for an invalid one (id < -1, id >= nblocks, start > end, start < 0). */
static inline int nsa_sel_entry(const nsa_selection_t *sel, const nsa_dims_t *d, int64_t b,
                                int64_t t, int64_t g, int64_t i, int64_t *lo, int64_t *hi) {
  const nsa_tensor_t *s = &sel->t;
  const int32_t *p = (const int32_t *)s->data;
  int64_t off = b * s->stride[0] + t * s->stride[1] + g * s->stride[2] + i * s->stride[3];
  if (sel->kind == NSA_SEL_BLOCK_INDICES) {
    int64_t id = p[off];
    int64_t bs = sel->block_size;
    int64_t nblocks = (d->Skv + bs - 1) / bs;
    if (id == -1) return 0;
    if (id < -1 || id >= nblocks) return -1;
    *lo = id * bs;
    *hi = *lo + bs;
    return 1;
  }
  int64_t st = p[off], en = p[off + s->stride[4]];
  if (st < 0 || st > en) return -1;
  if (st == 0 && en == 0) return 0;
  *lo = st;
  *hi = en;
  return 1;
}

#endif /* NSA_CPU_INTERNAL_H */
