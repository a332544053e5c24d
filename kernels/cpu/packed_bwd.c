/*
 * packed_bwd.c — the `packed` path backward on the CPU.
 *
 * Same buckets and chunks as the packed forward: gather each row's keys into
 * padded kpt[i][Dk][Lp] (transposed), vp[i][Lp][Dv], then per row (all its heads in one
 * task) dense masked gradients into padded dkp[i][Lp][Dk], dvp[i][Lp][Dv]
 * and dq directly (formulas in varlen_bwd.c). The padded key gradients are
 * then scattered back through the plan into f32 accumulators
 * dk_acc[b*G+g][Skv][Dk] / dv_acc[...][Dv], one task per (b, g, tile of 256
 * keys) walking the chunk's rows in order: deterministic, no atomics. Finally the accumulators
 * are converted into dk/dv (every element written).
 */
#include <stdlib.h>

#include "cpu_internal.h"

#define NSA_CPU_SCATTER_TILE 256

/* kp is kpt[Dk][nsa_cpu_kld(Lp)] (transposed), vp/dkp/dvp are [Lp][D]. */
static void dense_row_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, int64_t r, int64_t len,
                          int64_t Lp, const float *kp, const float *vp, float *dkp, float *dvp,
                          float scale, float *w /* 2*Dk + 2*Dv + 2*Lp */) {
  int64_t b, t, g;
  nsa_row_decode(d, r, &b, &t, &g);
  const int64_t Dk = d->Dk, Dv = d->Dv;
  float *q = w, *dout = q + Dk, *o = dout + Dv, *dq = o + Dv, *p = dq + Dk, *ds = p + Lp;
  memset(dkp, 0, sizeof(float) * (size_t)(Lp * Dk));
  memset(dvp, 0, sizeof(float) * (size_t)(Lp * Dv));
  for (int64_t j = 0; j < d->h; j++) {
    const int64_t hd = g * d->h + j;
    nsa_load_vec(q, a->q.data, a->q.dtype, nsa_off3(&a->q, b, t, hd), a->q.stride[3], Dk);
    nsa_load_vec(dout, a->dout.data, a->dout.dtype, nsa_off3(&a->dout, b, t, hd),
                 a->dout.stride[3], Dv);
    nsa_load_vec(o, a->o.data, a->o.dtype, nsa_off3(&a->o, b, t, hd), a->o.stride[3], Dv);
    const float D = nsa_dot(dout, o, Dv);
    const float lse = ((const float *)a->lse.data)[nsa_off3(&a->lse, b, t, hd)];
    /* P = exp(scale * q K^T - lse) over the padded tile, 0 past len (mask) */
    for (int64_t c = 0; c < Lp; c++) p[c] = 0.0f;
    for (int64_t e = 0; e < Dk; e++) {
      const float qe = q[e], *ke = kp + e * nsa_cpu_kld(Lp);
      for (int64_t c = 0; c < Lp; c++) p[c] += qe * ke[c];
    }
    for (int64_t c = 0; c < Lp; c++) {
      p[c] = c < len ? expf(scale * p[c] - lse) : 0.0f;
      ds[c] = p[c] * (nsa_dot(dout, vp + c * Dv, Dv) - D) * scale;
      float *dkc = dkp + c * Dk, *dvc = dvp + c * Dv;
      for (int64_t e = 0; e < Dv; e++) dvc[e] += p[c] * dout[e];
      for (int64_t e = 0; e < Dk; e++) dkc[e] += ds[c] * q[e];
    }
    for (int64_t e = 0; e < Dk; e++) dq[e] = nsa_dot(ds, kp + e * nsa_cpu_kld(Lp), Lp);
    nsa_store_vec(a->dq.data, a->dq.dtype, nsa_off3(&a->dq, b, t, hd), a->dq.stride[3], dq, Dk);
  }
}

int nsa_cpu_packed_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       size_t *workspace_bytes, char *msg, size_t msglen) {
  const float scale = nsa_resolve_scale(a->scale, d->Dk);
  const int64_t h = d->h, Dk = d->Dk, Dv = d->Dv, BG = d->B * d->G, Skv = d->Skv;
  const int64_t ntile = (Skv + NSA_CPU_SCATTER_TILE - 1) / NSA_CPU_SCATTER_TILE;
  if (workspace_bytes) *workspace_bytes = 0;
  nsa_cpu_buckets_t bk;
  if (nsa_cpu_bucketize(plan, &bk) != NSA_OK) goto oom0;

  size_t ws = 0;
  for (int bi = 0; bi < NSA_CPU_PACKED_NB; bi++) {
    int64_t cnt = bk.start[bi + 1] - bk.start[bi];
    if (!cnt) continue;
    int64_t Lp = nsa_cpu_bucket_lp(bi);
    /* kpt, vp + dkp, dvp */
    size_t per_row = sizeof(float) * (nsa_cpu_tile_floats(d, Lp) + (size_t)(Lp * (Dk + Dv)));
    int64_t ch = nsa_cpu_chunk_rows(per_row, cnt);
    if ((size_t)ch * per_row > ws) ws = (size_t)ch * per_row;
  }
  const size_t acc_floats = (size_t)BG * (size_t)Skv * (size_t)(Dk + Dv);
  float *buf = malloc(ws ? ws : 1);
  float *acc = calloc(acc_floats ? acc_floats : 1, sizeof(float));
  int nt = 0;
  int64_t lp_max = NSA_CPU_PACKED_MIN_L;
  for (int bi = 0; bi < NSA_CPU_PACKED_NB; bi++)
    if (bk.start[bi + 1] > bk.start[bi]) lp_max = nsa_cpu_bucket_lp(bi);
  float **scr = nsa_cpu_thread_scratch((size_t)(2 * Dk + 2 * Dv + 2 * lp_max), &nt);
  if (!buf || !acc || !scr) {
    free(buf);
    free(acc);
    nsa_cpu_thread_scratch_free(scr, nt);
    nsa_cpu_buckets_free(&bk);
    goto oom0;
  }
  float *dk_acc = acc, *dv_acc = acc + (size_t)BG * (size_t)Skv * (size_t)Dk;
  if (workspace_bytes)
    *workspace_bytes = ws + acc_floats * sizeof(float) + sizeof(int64_t) * (size_t)plan->rows +
                       (size_t)nt * sizeof(float) * (size_t)(2 * Dk + 2 * Dv + 2 * lp_max);

#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < bk.n_empty; i++) {
    int64_t b, t, g;
    nsa_row_decode(d, bk.order[i], &b, &t, &g);
    for (int64_t j = 0; j < h; j++)
      nsa_store_zero(a->dq.data, a->dq.dtype, nsa_off3(&a->dq, b, t, g * h + j), a->dq.stride[3], Dk);
  }

  for (int bi = 0; bi < NSA_CPU_PACKED_NB; bi++) {
    const int64_t b0 = bk.start[bi], cnt = bk.start[bi + 1] - b0;
    if (!cnt) continue;
    const int64_t Lp = nsa_cpu_bucket_lp(bi);
    const int64_t ch = nsa_cpu_chunk_rows(
        sizeof(float) * (nsa_cpu_tile_floats(d, Lp) + (size_t)(Lp * (Dk + Dv))), cnt);
    const int64_t kld = nsa_cpu_kld(Lp);
    /* kpt[ch][Dk][kld] vp[ch][Lp][Dv] dkp[ch][Lp][Dk] dvp[ch][Lp][Dv] */
    float *kp = buf, *vp = kp + ch * kld * Dk, *dkp = vp + ch * Lp * Dv, *dvp = dkp + ch * Lp * Dk;
    for (int64_t c0 = 0; c0 < cnt; c0 += ch) {
      const int64_t nrow = cnt - c0 < ch ? cnt - c0 : ch;
      const int64_t *rows = bk.order + b0 + c0;
#pragma omp parallel for schedule(dynamic, 2)
      for (int64_t i = 0; i < nrow; i++) {
        float *w = scr[nsa_cpu_thread_id()];
        nsa_cpu_gather_row(&a->k, &a->v, d, plan, rows[i], Lp, kp + i * kld * Dk, vp + i * Lp * Dv, w);
        dense_row_bwd(a, d, rows[i], plan->row_len[rows[i]], Lp, kp + i * kld * Dk,
                      vp + i * Lp * Dv, dkp + i * Lp * Dk, dvp + i * Lp * Dv, scale, w);
      }
      /* scatter: the task of (b, g, key tile) adds its rows' padded gradients
       * for keys in [s0, s1), rows in order — deterministic, no atomics */
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t task = 0; task < BG * ntile; task++) {
        const int64_t bg = task % BG, s0 = (task / BG) * NSA_CPU_SCATTER_TILE;
        const int64_t s1 = s0 + NSA_CPU_SCATTER_TILE < Skv ? s0 + NSA_CPU_SCATTER_TILE : Skv;
        for (int64_t i = 0; i < nrow; i++) {
          const int64_t r = rows[i];
          if ((r / (d->S * d->G)) * d->G + r % d->G != bg) continue;
          const int32_t *sp = plan->spans + r * plan->n * 2;
          int64_t c = 0; /* packed position of the span's first key */
          for (int32_t si = 0; si < plan->nspans[r]; c += sp[2 * si + 1] - sp[2 * si], si++) {
            int64_t lo = sp[2 * si] > s0 ? sp[2 * si] : s0;
            int64_t hi = sp[2 * si + 1] < s1 ? sp[2 * si + 1] : s1;
            for (int64_t pos = lo; pos < hi; pos++) {
              const int64_t cc = c + (pos - sp[2 * si]);
              float *dka = dk_acc + ((size_t)bg * (size_t)Skv + (size_t)pos) * (size_t)Dk;
              float *dva = dv_acc + ((size_t)bg * (size_t)Skv + (size_t)pos) * (size_t)Dv;
              const float *dks = dkp + (i * Lp + cc) * Dk, *dvs = dvp + (i * Lp + cc) * Dv;
              for (int64_t e = 0; e < Dk; e++) dka[e] += dks[e];
              for (int64_t e = 0; e < Dv; e++) dva[e] += dvs[e];
            }
          }
        }
      }
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t bs = 0; bs < BG * Skv; bs++) {
    const int64_t bg = bs / Skv, s = bs % Skv, b = bg / d->G, g = bg % d->G;
    nsa_store_vec(a->dk.data, a->dk.dtype, nsa_off3(&a->dk, b, s, g), a->dk.stride[3],
                  dk_acc + (size_t)bs * (size_t)Dk, Dk);
    nsa_store_vec(a->dv.data, a->dv.dtype, nsa_off3(&a->dv, b, s, g), a->dv.stride[3],
                  dv_acc + (size_t)bs * (size_t)Dv, Dv);
  }
  free(buf);
  free(acc);
  nsa_cpu_thread_scratch_free(scr, nt);
  nsa_cpu_buckets_free(&bk);
  return NSA_OK;

oom0:
  if (msg && msglen) snprintf(msg, msglen, "packed backward: out of host memory for workspace");
  return NSA_ERR_INTERNAL;
}
