/*
 * packed_fwd.c — the `packed` path forward on the CPU.
 *
 * Unlike varlen (which streams keys through spans with an online softmax),
 * packed first GATHERS each row's keys into a padded workspace
 *
 *   kpt[i][:][c] = k[b][key_c][g][:]  c < len(row), zero for len <= c < Lp
 *                                     (K transposed: scores are one vector loop)
 *   vp[i][c][:]  = v[b][key_c][g][:]
 *
 * for the rows i of one chunk of one length bucket, then runs plain dense
 * attention over the padded tile with a length mask (two-pass softmax:
 * max, then exp/sum), one task per (row, head). Empty rows never enter a
 * bucket: they get o = 0, lse = -inf directly.
 */
#include <stdlib.h>

#include "cpu_internal.h"

/* Dense masked attention of one (row, head) over a padded tile. */
static void dense_head(const nsa_fwd_args_t *a, const nsa_dims_t *d, int64_t r, int64_t j,
                       int64_t len, int64_t Lp, const float *kp, const float *vp, float scale,
                       float *s /*[Lp]*/, float *q /*[Dk]*/, float *acc /*[Dv]*/) {
  int64_t b, t, g;
  nsa_row_decode(d, r, &b, &t, &g);
  const int64_t Dk = d->Dk, Dv = d->Dv, hd = g * d->h + j;
  nsa_load_vec(q, a->q.data, a->q.dtype, nsa_off3(&a->q, b, t, hd), a->q.stride[3], Dk);
  for (int64_t c = 0; c < Lp; c++) s[c] = 0.0f;
  for (int64_t e = 0; e < Dk; e++) {
    const float qe = scale * q[e], *ke = kp + e * nsa_cpu_kld(Lp); /* kp is kpt[Dk][ld] */
    for (int64_t c = 0; c < Lp; c++) s[c] += qe * ke[c];
  }
  float mx = -INFINITY;
  for (int64_t c = 0; c < Lp; c++) {
    if (c >= len) s[c] = -INFINITY; /* length mask */
    if (s[c] > mx) mx = s[c];
  }
  float sum = 0.0f;
  for (int64_t c = 0; c < Lp; c++) {
    s[c] = c < len ? expf(s[c] - mx) : 0.0f;
    sum += s[c];
  }
  memset(acc, 0, sizeof(float) * (size_t)Dv);
  for (int64_t c = 0; c < Lp; c++) {
    const float *vc = vp + c * Dv;
    for (int64_t e = 0; e < Dv; e++) acc[e] += s[c] * vc[e];
  }
  float inv = 1.0f / sum;
  for (int64_t e = 0; e < Dv; e++) acc[e] *= inv;
  nsa_store_vec(a->o.data, a->o.dtype, nsa_off3(&a->o, b, t, hd), a->o.stride[3], acc, Dv);
  if (a->lse.data) ((float *)a->lse.data)[nsa_off3(&a->lse, b, t, hd)] = mx + logf(sum);
}

int nsa_cpu_packed_fwd(const nsa_fwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       size_t *workspace_bytes, char *msg, size_t msglen) {
  const float scale = nsa_resolve_scale(a->scale, d->Dk);
  const int64_t h = d->h, Dk = d->Dk, Dv = d->Dv;
  if (workspace_bytes) *workspace_bytes = 0;
  nsa_cpu_buckets_t bk;
  if (nsa_cpu_bucketize(plan, &bk) != NSA_OK) goto oom0;

  /* Size the one padded buffer for the largest chunk of any bucket. */
  size_t ws = 0;
  int64_t lp_max = NSA_CPU_PACKED_MIN_L;
  for (int bi = 0; bi < NSA_CPU_PACKED_NB; bi++) {
    int64_t cnt = bk.start[bi + 1] - bk.start[bi];
    if (!cnt) continue;
    int64_t Lp = nsa_cpu_bucket_lp(bi);
    size_t per_row = sizeof(float) * nsa_cpu_tile_floats(d, Lp);
    int64_t ch = nsa_cpu_chunk_rows(per_row, cnt);
    if ((size_t)ch * per_row > ws) ws = (size_t)ch * per_row;
    if (Lp > lp_max) lp_max = Lp;
  }
  float *kvbuf = malloc(ws ? ws : 1);
  int nt = 0;
  float **scr = nsa_cpu_thread_scratch((size_t)(lp_max + Dk + Dv + Dk), &nt);
  if (!kvbuf || !scr) {
    free(kvbuf);
    nsa_cpu_thread_scratch_free(scr, nt);
    nsa_cpu_buckets_free(&bk);
    goto oom0;
  }
  if (workspace_bytes)
    *workspace_bytes = ws + sizeof(int64_t) * (size_t)plan->rows +
                       (size_t)nt * sizeof(float) * (size_t)(lp_max + Dk + Dv + Dk);

  /* empty rows: o = 0, lse = -inf */
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < bk.n_empty; i++) {
    int64_t b, t, g, r = bk.order[i];
    nsa_row_decode(d, r, &b, &t, &g);
    for (int64_t j = 0; j < h; j++) {
      nsa_store_zero(a->o.data, a->o.dtype, nsa_off3(&a->o, b, t, g * h + j), a->o.stride[3], Dv);
      if (a->lse.data) ((float *)a->lse.data)[nsa_off3(&a->lse, b, t, g * h + j)] = -INFINITY;
    }
  }

  for (int bi = 0; bi < NSA_CPU_PACKED_NB; bi++) {
    const int64_t b0 = bk.start[bi], cnt = bk.start[bi + 1] - b0;
    if (!cnt) continue;
    const int64_t Lp = nsa_cpu_bucket_lp(bi);
    const int64_t ch = nsa_cpu_chunk_rows(sizeof(float) * nsa_cpu_tile_floats(d, Lp), cnt);
    const int64_t kld = nsa_cpu_kld(Lp);
    float *kp = kvbuf, *vp = kvbuf + ch * kld * Dk; /* kpt[ch][Dk][kld], vp[ch][Lp][Dv] */
    for (int64_t c0 = 0; c0 < cnt; c0 += ch) {
      const int64_t nrow = cnt - c0 < ch ? cnt - c0 : ch;
      const int64_t *rows = bk.order + b0 + c0;
#pragma omp parallel for schedule(dynamic, 4)
      for (int64_t i = 0; i < nrow; i++)
        nsa_cpu_gather_row(&a->k, &a->v, d, plan, rows[i], Lp, kp + i * kld * Dk, vp + i * Lp * Dv,
                           scr[nsa_cpu_thread_id()]);
#pragma omp parallel for schedule(dynamic, 4)
      for (int64_t ij = 0; ij < nrow * h; ij++) {
        const int64_t i = ij / h, j = ij % h;
        float *s = scr[nsa_cpu_thread_id()];
        dense_head(a, d, rows[i], j, plan->row_len[rows[i]], Lp, kp + i * kld * Dk,
                   vp + i * Lp * Dv, scale, s, s + Lp, s + Lp + Dk);
      }
    }
  }
  free(kvbuf);
  nsa_cpu_thread_scratch_free(scr, nt);
  nsa_cpu_buckets_free(&bk);
  return NSA_OK;

oom0:
  if (msg && msglen) snprintf(msg, msglen, "packed forward: out of host memory for workspace");
  return NSA_ERR_INTERNAL;
}
