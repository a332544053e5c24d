/*
 * varlen_bwd.c — varlen selection attention backward over a plan (CPU).
 *
 * With o and lse from the forward and do the upstream gradient, per head j
 * of row (b,t,g) and key s of the row's key set:
 *
 *   D_j  = sum_c do_j[c] * o_j[c]                 (= sum_s P_s dP_s)
 *   P_s  = exp(scale * q_j.k_s - lse_j)
 *   dv[s] += P_s * do_j
 *   dP_s = do_j . v_s
 *   dS_s = P_s * (dP_s - D_j)
 *   dq_j += scale * dS_s * k_s
 *   dk[s] += scale * dS_s * q_j
 *
 * dk/dv sum over every (query, head) that selected the key. No atomics, and
 * every sum is taken in one fixed order: dq_j over the row's keys in span
 * order; dk[s]/dv[s] over t = 0..S-1, then heads j = 0..h-1. Two schedules
 * keep exactly that order, so they give bitwise identical results:
 *
 *  - by group (B*G >= threads): one task per (b, g) owns f32 accumulators for
 *    dk[b,:,g,:] / dv[b,:,g,:], walks t in order and updates dq, dk and dv in
 *    one pass (each K/V row loaded once per query);
 *  - by key tile (few groups, many threads): pass A computes dq, one task per
 *    row; pass B computes dk/dv, one task per (b, g, tile of NSA_CPU_BWD_TILE
 *    keys) walking t in order over the spans that meet its tile. P and dS are
 *    computed twice, in exchange for B*G*Skv/TILE independent tasks.
 */
#include <stdlib.h>

#include "cpu_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define NSA_CPU_BWD_TILE 64

typedef struct {
  float *dk, *dv;      /* [nkeys][Dk], [nkeys][Dv] accumulators */
  float *q, *dout, *o; /* [h][Dk], [h][Dv], [h][Dv] */
  float *dq;           /* [h][Dk] */
  float *D, *lse;      /* [h] */
  float *k, *v;        /* [Dk], [Dv] one key */
} bwd_scratch_t;

static float *bwd_scratch(const nsa_dims_t *d, int64_t nkeys, bwd_scratch_t *w) {
  size_t sk = (size_t)nkeys, h = (size_t)d->h, dk = (size_t)d->Dk, dv = (size_t)d->Dv;
  size_t total = sk * (dk + dv) + h * (2 * dk + 2 * dv + 2) + dk + dv;
  float *buf = malloc(sizeof(float) * (total ? total : 1));
  if (!buf) return NULL;
  w->dk = buf;
  w->dv = w->dk + sk * dk;
  w->q = w->dv + sk * dv;
  w->dout = w->q + h * dk;
  w->o = w->dout + h * dv;
  w->dq = w->o + h * dv;
  w->D = w->dq + h * dk;
  w->lse = w->D + h;
  w->k = w->lse + h;
  w->v = w->k + dk;
  return buf;
}

/* q, do, D = do.o and lse of every head of row (b, t, g). */
static void load_row(const nsa_bwd_args_t *a, const nsa_dims_t *d, int64_t b, int64_t t,
                     int64_t g, bwd_scratch_t *w) {
  const int64_t h = d->h, Dk = d->Dk, Dv = d->Dv;
  for (int64_t j = 0; j < h; j++) {
    const int64_t hd = g * h + j;
    /* q[b][t][g*h+j][:], do[b][t][g*h+j][:], o[b][t][g*h+j][:] */
    nsa_load_vec(w->q + j * Dk, a->q.data, a->q.dtype, nsa_off3(&a->q, b, t, hd), a->q.stride[3], Dk);
    nsa_load_vec(w->dout + j * Dv, a->dout.data, a->dout.dtype, nsa_off3(&a->dout, b, t, hd),
                 a->dout.stride[3], Dv);
    nsa_load_vec(w->o + j * Dv, a->o.data, a->o.dtype, nsa_off3(&a->o, b, t, hd), a->o.stride[3], Dv);
    w->D[j] = nsa_dot(w->dout + j * Dv, w->o + j * Dv, Dv);
    w->lse[j] = ((const float *)a->lse.data)[nsa_off3(&a->lse, b, t, hd)];
  }
}

static void load_key(const nsa_bwd_args_t *a, const nsa_dims_t *d, int64_t b, int64_t pos,
                     int64_t g, bwd_scratch_t *w) {
  /* k[b][pos][g][:], v[b][pos][g][:] */
  nsa_load_vec(w->k, a->k.data, a->k.dtype, nsa_off3(&a->k, b, pos, g), a->k.stride[3], d->Dk);
  nsa_load_vec(w->v, a->v.data, a->v.dtype, nsa_off3(&a->v, b, pos, g), a->v.stride[3], d->Dv);
}

/* The one place P and dS are computed (noinline: both schedules run the very
 * same machine code, so their results are bitwise equal). Any of dq/dk/dv may
 * be NULL. */
__attribute__((noinline)) static void head_key(const bwd_scratch_t *w, int64_t j, int64_t Dk,
                                               int64_t Dv, float scale, float *dqj, float *dks,
                                               float *dvs) {
  const float *qj = w->q + j * Dk, *doj = w->dout + j * Dv;
  float p = expf(scale * nsa_dot(qj, w->k, Dk) - w->lse[j]);
  float ds = p * (nsa_dot(doj, w->v, Dv) - w->D[j]) * scale;
  if (dvs)
    for (int64_t c = 0; c < Dv; c++) dvs[c] += p * doj[c];
  if (dqj)
    for (int64_t c = 0; c < Dk; c++) dqj[c] += ds * w->k[c];
  if (dks)
    for (int64_t c = 0; c < Dk; c++) dks[c] += ds * qj[c];
}

static void store_dq(const nsa_bwd_args_t *a, const nsa_dims_t *d, int64_t b, int64_t t,
                     int64_t g, const float *dq /* NULL: zeros */) {
  for (int64_t j = 0; j < d->h; j++) {
    int64_t off = nsa_off3(&a->dq, b, t, g * d->h + j);
    if (dq)
      nsa_store_vec(a->dq.data, a->dq.dtype, off, a->dq.stride[3], dq + j * d->Dk, d->Dk);
    else
      nsa_store_zero(a->dq.data, a->dq.dtype, off, a->dq.stride[3], d->Dk);
  }
}

/* dk/dv of keys [s0, s1) of group (b, g) from accumulators indexed s - s0. */
static void store_dkdv(const nsa_bwd_args_t *a, const nsa_dims_t *d, int64_t b, int64_t g,
                       int64_t s0, int64_t s1, const bwd_scratch_t *w) {
  for (int64_t s = s0; s < s1; s++) {
    nsa_store_vec(a->dk.data, a->dk.dtype, nsa_off3(&a->dk, b, s, g), a->dk.stride[3],
                  w->dk + (s - s0) * d->Dk, d->Dk);
    nsa_store_vec(a->dv.data, a->dv.dtype, nsa_off3(&a->dv, b, s, g), a->dv.stride[3],
                  w->dv + (s - s0) * d->Dv, d->Dv);
  }
}

/* ---- schedule 1: one task per (b, g) ---- */

static void bwd_group(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                      int64_t b, int64_t g, float scale, bwd_scratch_t *w) {
  const int64_t h = d->h, Dk = d->Dk, Dv = d->Dv;
  memset(w->dk, 0, sizeof(float) * (size_t)(d->Skv * Dk));
  memset(w->dv, 0, sizeof(float) * (size_t)(d->Skv * Dv));
  for (int64_t t = 0; t < d->S; t++) {
    const int64_t r = (b * d->S + t) * d->G + g;
    if (plan->row_len[r] == 0) {
      store_dq(a, d, b, t, g, NULL);
      continue;
    }
    load_row(a, d, b, t, g, w);
    memset(w->dq, 0, sizeof(float) * (size_t)(h * Dk));
    const int32_t *sp = plan->spans + r * plan->n * 2;
    for (int32_t si = 0; si < plan->nspans[r]; si++)
      for (int64_t pos = sp[2 * si]; pos < sp[2 * si + 1]; pos++) {
        load_key(a, d, b, pos, g, w);
        for (int64_t j = 0; j < h; j++)
          head_key(w, j, Dk, Dv, scale, w->dq + j * Dk, w->dk + pos * Dk, w->dv + pos * Dv);
      }
    store_dq(a, d, b, t, g, w->dq);
  }
  /* every key of dk[b,:,g,:] / dv[b,:,g,:] is written (zeros where unselected) */
  store_dkdv(a, d, b, g, 0, d->Skv, w);
}

/* ---- schedule 2: pass A (dq per row), pass B (dk/dv per key tile) ---- */

static void dq_row(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                   int64_t r, float scale, bwd_scratch_t *w) {
  int64_t b, t, g;
  nsa_row_decode(d, r, &b, &t, &g);
  if (plan->row_len[r] == 0) {
    store_dq(a, d, b, t, g, NULL);
    return;
  }
  load_row(a, d, b, t, g, w);
  memset(w->dq, 0, sizeof(float) * (size_t)(d->h * d->Dk));
  const int32_t *sp = plan->spans + r * plan->n * 2;
  for (int32_t si = 0; si < plan->nspans[r]; si++)
    for (int64_t pos = sp[2 * si]; pos < sp[2 * si + 1]; pos++) {
      load_key(a, d, b, pos, g, w);
      for (int64_t j = 0; j < d->h; j++) head_key(w, j, d->Dk, d->Dv, scale, w->dq + j * d->Dk, NULL, NULL);
    }
  store_dq(a, d, b, t, g, w->dq);
}

static void dkdv_tile(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                      int64_t b, int64_t g, int64_t s0, int64_t s1, float scale,
                      bwd_scratch_t *w) {
  const int64_t Dk = d->Dk, Dv = d->Dv;
  memset(w->dk, 0, sizeof(float) * (size_t)((s1 - s0) * Dk));
  memset(w->dv, 0, sizeof(float) * (size_t)((s1 - s0) * Dv));
  /* rows with p(t) < s0 cannot reach the tile: start at the first t that can */
  int64_t t0 = s0 - (d->Skv - d->S);
  if (t0 < 0) t0 = 0;
  for (int64_t t = t0; t < d->S; t++) {
    const int64_t r = (b * d->S + t) * d->G + g;
    const int32_t *sp = plan->spans + r * plan->n * 2;
    int loaded = 0;
    for (int32_t si = 0; si < plan->nspans[r]; si++) {
      int64_t lo = sp[2 * si] > s0 ? sp[2 * si] : s0, hi = sp[2 * si + 1] < s1 ? sp[2 * si + 1] : s1;
      if (lo >= hi) continue;
      if (!loaded) {
        load_row(a, d, b, t, g, w);
        loaded = 1;
      }
      for (int64_t pos = lo; pos < hi; pos++) {
        load_key(a, d, b, pos, g, w);
        for (int64_t j = 0; j < d->h; j++)
          head_key(w, j, Dk, Dv, scale, NULL, w->dk + (pos - s0) * Dk, w->dv + (pos - s0) * Dv);
      }
    }
  }
  store_dkdv(a, d, b, g, s0, s1, w);
}

static int max_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int nsa_cpu_varlen_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       char *msg, size_t msglen) {
  const float scale = nsa_resolve_scale(a->scale, d->Dk);
  const int64_t BG = d->B * d->G;
  const int by_group = BG >= max_threads();
  const int64_t ntile = (d->Skv + NSA_CPU_BWD_TILE - 1) / NSA_CPU_BWD_TILE;
  int oom = 0;
#pragma omp parallel
  {
    bwd_scratch_t w = {0};
    float *buf = bwd_scratch(d, by_group ? d->Skv : NSA_CPU_BWD_TILE, &w);
    if (!buf) {
#pragma omp atomic write
      oom = 1;
    }
    if (by_group) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t bg = 0; bg < BG; bg++)
        if (buf) bwd_group(a, d, plan, bg / d->G, bg % d->G, scale, &w);
    } else {
#pragma omp for schedule(dynamic, 8)
      for (int64_t r = 0; r < d->rows; r++)
        if (buf) dq_row(a, d, plan, r, scale, &w);
      /* tiles late in the sequence see more rows: hand them out first */
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < BG * ntile; i++) {
        const int64_t bg = i % BG, tile = ntile - 1 - i / BG;
        const int64_t s0 = tile * NSA_CPU_BWD_TILE;
        const int64_t s1 = s0 + NSA_CPU_BWD_TILE < d->Skv ? s0 + NSA_CPU_BWD_TILE : d->Skv;
        if (buf) dkdv_tile(a, d, plan, bg / d->G, bg % d->G, s0, s1, scale, &w);
      }
    }
    free(buf);
  }
  if (oom) {
    if (msg && msglen) snprintf(msg, msglen, "varlen backward: out of host memory for scratch");
    return NSA_ERR_INTERNAL;
  }
  return NSA_OK;
}
