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
#define NSA_CPU_PACKED_WS_CAP ((size_t)32 << 20)

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

/* ---- packed path (packed_common.c) ----
 *
 * Non-empty rows are bucketed by padded length Lp = max(16, next_pow2(len)):
 * the 16/32/64 buckets are the dense fallback buckets for short rows, the
 * rest double up to the longest row. Each bucket is processed in chunks of
 * rows whose padded K/V copies fit NSA_CPU_PACKED_WS_CAP. */
#define NSA_CPU_PACKED_MIN_L 16
#define NSA_CPU_PACKED_NB 32 /* bucket b has Lp = 16 << b */

typedef struct {
  int64_t *order;                       /* [rows]: empty rows first, then bucket by bucket */
  int64_t n_empty;                      /* order[0..n_empty) are the empty rows */
  int64_t start[NSA_CPU_PACKED_NB + 1]; /* bucket b is order[start[b]..start[b+1]) */
} nsa_cpu_buckets_t;

int nsa_cpu_bucketize(const nsa_plan_t *plan, nsa_cpu_buckets_t *bk);
void nsa_cpu_buckets_free(nsa_cpu_buckets_t *bk);
static inline int64_t nsa_cpu_bucket_lp(int b) { return (int64_t)NSA_CPU_PACKED_MIN_L << b; }
/* Row stride of the transposed K tile kpt[Dk][ld]: Lp plus 16 floats, so the
 * Dk rows of a power-of-two Lp do not alias the same cache sets (4 KiB). */
static inline int64_t nsa_cpu_kld(int64_t Lp) { return Lp + 16; }
/* f32 elements of one row's padded tiles: kpt[Dk][ld] + vp[Lp][Dv]. */
static inline size_t nsa_cpu_tile_floats(const nsa_dims_t *d, int64_t Lp) {
  return (size_t)(d->Dk * nsa_cpu_kld(Lp) + Lp * d->Dv);
}
/* Rows per chunk so that count rows of per_row bytes stay under the cap (>= 1). */
int64_t nsa_cpu_chunk_rows(size_t per_row, int64_t count);
/* Gathers row r's keys through the plan into kpt[Dk][ld = nsa_cpu_kld(Lp)] (K transposed, so
 * the scores of all Lp keys are one vector loop) and vp[Lp][Dv] (f32),
 * zero-padding positions >= row_len. */
void nsa_cpu_gather_row(const nsa_tensor_t *k, const nsa_tensor_t *v, const nsa_dims_t *d,
                        const nsa_plan_t *plan, int64_t r, int64_t Lp, float *kpt, float *vp,
                        float *krow /* [Dk] */);
/* Per-thread scratch: nthreads buffers of `floats` floats each. */
float **nsa_cpu_thread_scratch(size_t floats, int *nthreads);
void nsa_cpu_thread_scratch_free(float **s, int nthreads);
int nsa_cpu_thread_id(void);

#endif /* NSA_CPU_INTERNAL_H */
