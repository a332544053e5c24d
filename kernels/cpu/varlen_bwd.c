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
 * dk/dv sum over every (query, head) that selected the key. To stay
 * deterministic without atomics the work is split over (b, g): one task owns
 * dk[b,:,g,:] and dv[b,:,g,:] (f32 accumulators [Skv][D]) and walks its rows
 * t = 0..S-1 in order, heads inner, so each K/V row is loaded once per query.
 */
#include <stdlib.h>

#include "cpu_internal.h"

typedef struct {
  float *dk, *dv;      /* [Skv][Dk], [Skv][Dv] accumulators of this (b, g) */
  float *q, *dout, *o; /* [h][Dk], [h][Dv], [h][Dv] */
  float *dq;           /* [h][Dk] */
  float *D, *lse;      /* [h] */
  float *k, *v;        /* [Dk], [Dv] one key */
} bwd_scratch_t;

static float *bwd_scratch(const nsa_dims_t *d, bwd_scratch_t *w) {
  size_t sk = (size_t)d->Skv, h = (size_t)d->h, dk = (size_t)d->Dk, dv = (size_t)d->Dv;
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

static void bwd_group(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                      int64_t b, int64_t g, float scale, bwd_scratch_t *w) {
  const int64_t h = d->h, Dk = d->Dk, Dv = d->Dv;
  const nsa_tensor_t *q = &a->q, *k = &a->k, *v = &a->v;
  memset(w->dk, 0, sizeof(float) * (size_t)(d->Skv * Dk));
  memset(w->dv, 0, sizeof(float) * (size_t)(d->Skv * Dv));

  for (int64_t t = 0; t < d->S; t++) {
    const int64_t r = (b * d->S + t) * d->G + g;
    if (plan->row_len[r] == 0) {
      for (int64_t j = 0; j < h; j++)
        nsa_store_zero(a->dq.data, a->dq.dtype, nsa_off3(&a->dq, b, t, g * h + j),
                       a->dq.stride[3], Dk);
      continue;
    }
    for (int64_t j = 0; j < h; j++) {
      const int64_t hd = g * h + j;
      nsa_load_vec(w->q + j * Dk, q->data, q->dtype, nsa_off3(q, b, t, hd), q->stride[3], Dk);
      nsa_load_vec(w->dout + j * Dv, a->dout.data, a->dout.dtype, nsa_off3(&a->dout, b, t, hd),
                   a->dout.stride[3], Dv);
      nsa_load_vec(w->o + j * Dv, a->o.data, a->o.dtype, nsa_off3(&a->o, b, t, hd),
                   a->o.stride[3], Dv);
      w->D[j] = nsa_dot(w->dout + j * Dv, w->o + j * Dv, Dv);
      w->lse[j] = ((const float *)a->lse.data)[nsa_off3(&a->lse, b, t, hd)];
    }
    memset(w->dq, 0, sizeof(float) * (size_t)(h * Dk));

    const int32_t *sp = plan->spans + r * plan->n * 2;
    for (int32_t si = 0; si < plan->nspans[r]; si++) {
      for (int64_t pos = sp[2 * si]; pos < sp[2 * si + 1]; pos++) {
        /* k[b][pos][g][:], v[b][pos][g][:] */
        nsa_load_vec(w->k, k->data, k->dtype, nsa_off3(k, b, pos, g), k->stride[3], Dk);
        nsa_load_vec(w->v, v->data, v->dtype, nsa_off3(v, b, pos, g), v->stride[3], Dv);
        float *dks = w->dk + pos * Dk, *dvs = w->dv + pos * Dv;
        for (int64_t j = 0; j < h; j++) {
          const float *qj = w->q + j * Dk, *doj = w->dout + j * Dv;
          float p = expf(scale * nsa_dot(qj, w->k, Dk) - w->lse[j]);
          float dp = nsa_dot(doj, w->v, Dv);
          float ds = p * (dp - w->D[j]) * scale;
          for (int64_t c = 0; c < Dv; c++) dvs[c] += p * doj[c];
          float *dqj = w->dq + j * Dk;
          for (int64_t c = 0; c < Dk; c++) {
            dqj[c] += ds * w->k[c];
            dks[c] += ds * qj[c];
          }
        }
      }
    }
    for (int64_t j = 0; j < h; j++)
      nsa_store_vec(a->dq.data, a->dq.dtype, nsa_off3(&a->dq, b, t, g * h + j), a->dq.stride[3],
                    w->dq + j * Dk, Dk);
  }
  /* every key of dk[b,:,g,:] / dv[b,:,g,:] is written (zeros where unselected) */
  for (int64_t s = 0; s < d->Skv; s++) {
    nsa_store_vec(a->dk.data, a->dk.dtype, nsa_off3(&a->dk, b, s, g), a->dk.stride[3],
                  w->dk + s * Dk, Dk);
    nsa_store_vec(a->dv.data, a->dv.dtype, nsa_off3(&a->dv, b, s, g), a->dv.stride[3],
                  w->dv + s * Dv, Dv);
  }
}

int nsa_cpu_varlen_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       char *msg, size_t msglen) {
  const float scale = nsa_resolve_scale(a->scale, d->Dk);
  int oom = 0;
#pragma omp parallel
  {
    bwd_scratch_t w = {0};
    float *buf = bwd_scratch(d, &w);
    if (!buf) {
#pragma omp atomic write
      oom = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t bg = 0; bg < d->B * d->G; bg++)
      if (buf) bwd_group(a, d, plan, bg / d->G, bg % d->G, scale, &w);
    free(buf);
  }
  if (oom) {
    if (msg && msglen) snprintf(msg, msglen, "varlen backward: out of host memory for scratch");
    return NSA_ERR_INTERNAL;
  }
  return NSA_OK;
}
