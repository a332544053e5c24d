/*
 * packed_common.c — bucketing, chunking and gathering shared by the packed
 * forward and backward.
 */
#include <stdlib.h>

#include "cpu_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static int bucket_of(int32_t len) {
  int b = 0;
  while (b < NSA_CPU_PACKED_NB - 1 && nsa_cpu_bucket_lp(b) < len) b++;
  return b;
}

/* Counting sort of rows by bucket; stable, so rows inside a bucket stay in
 * row order (the backward's scatter order depends on it). */
int nsa_cpu_bucketize(const nsa_plan_t *plan, nsa_cpu_buckets_t *bk) {
  memset(bk, 0, sizeof(*bk));
  bk->order = malloc(sizeof(int64_t) * (size_t)(plan->rows > 0 ? plan->rows : 1));
  if (!bk->order) return NSA_ERR_INTERNAL;
  int64_t cnt[NSA_CPU_PACKED_NB] = {0};
  for (int64_t r = 0; r < plan->rows; r++) {
    if (plan->row_len[r] == 0)
      bk->n_empty++;
    else
      cnt[bucket_of(plan->row_len[r])]++;
  }
  int64_t pos[NSA_CPU_PACKED_NB];
  bk->start[0] = bk->n_empty;
  for (int b = 0; b < NSA_CPU_PACKED_NB; b++) {
    pos[b] = bk->start[b];
    bk->start[b + 1] = bk->start[b] + cnt[b];
  }
  int64_t pe = 0;
  for (int64_t r = 0; r < plan->rows; r++) {
    if (plan->row_len[r] == 0)
      bk->order[pe++] = r;
    else
      bk->order[pos[bucket_of(plan->row_len[r])]++] = r;
  }
  return NSA_OK;
}

void nsa_cpu_buckets_free(nsa_cpu_buckets_t *bk) {
  free(bk->order);
  bk->order = NULL;
}

int64_t nsa_cpu_chunk_rows(size_t per_row, int64_t count) {
  int64_t c = per_row ? (int64_t)(NSA_CPU_PACKED_WS_CAP / per_row) : count;
  if (c < 1) c = 1;
  return c < count ? c : count;
}

void nsa_cpu_gather_row(const nsa_tensor_t *k, const nsa_tensor_t *v, const nsa_dims_t *d,
                        const nsa_plan_t *plan, int64_t r, int64_t Lp, float *kpt, float *vp,
                        float *krow) {
  int64_t b, t, g;
  nsa_row_decode(d, r, &b, &t, &g);
  const int32_t *sp = plan->spans + r * plan->n * 2;
  const int64_t Dk = d->Dk, Dv = d->Dv, ld = nsa_cpu_kld(Lp);
  int64_t c = 0;
  for (int32_t si = 0; si < plan->nspans[r]; si++)
    for (int64_t pos = sp[2 * si]; pos < sp[2 * si + 1]; pos++, c++) {
      /* kpt[:][c] = k[b][pos][g][:], vp[c][:] = v[b][pos][g][:] */
      nsa_load_vec(krow, k->data, k->dtype, nsa_off3(k, b, pos, g), k->stride[3], Dk);
      for (int64_t e = 0; e < Dk; e++) kpt[e * ld + c] = krow[e];
      nsa_load_vec(vp + c * Dv, v->data, v->dtype, nsa_off3(v, b, pos, g), v->stride[3], Dv);
    }
  for (int64_t e = 0; e < Dk; e++) memset(kpt + e * ld + c, 0, sizeof(float) * (size_t)(ld - c));
  memset(vp + c * Dv, 0, sizeof(float) * (size_t)((Lp - c) * Dv));
}

int nsa_cpu_thread_id(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

float **nsa_cpu_thread_scratch(size_t floats, int *nthreads) {
  int nt = 1;
#ifdef _OPENMP
  nt = omp_get_max_threads();
#endif
  if (nt < 1) nt = 1;
  float **s = calloc((size_t)nt, sizeof(float *));
  if (!s) return NULL;
  for (int i = 0; i < nt; i++) {
    s[i] = malloc(sizeof(float) * (floats ? floats : 1));
    if (!s[i]) {
      nsa_cpu_thread_scratch_free(s, nt);
      return NULL;
    }
  }
  *nthreads = nt;
  return s;
}

void nsa_cpu_thread_scratch_free(float **s, int nthreads) {
  if (!s) return;
  for (int i = 0; i < nthreads; i++) free(s[i]);
  free(s);
}
