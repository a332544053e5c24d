/*
 * varlen_fwd.c — varlen selection attention forward over a plan (CPU).
 *
 * One task per row r = ((b*S)+t)*G+g; all h heads of group g share the row's
 * key set, so the loop is rows outer, heads inner: each tile of up to
 * NSA_CPU_KT keys is loaded once (K/V read in place through their strides,
 * converted to f32) and used by every head. Online softmax per head:
 *
 *   s_i  = scale * q_j . k_i  (q pre-scaled once per row)
 *   m'   = max(m, max_i s_i);  a = exp(m - m')
 *   l    = a*l + sum_i exp(s_i - m');   acc = a*acc + sum_i exp(s_i - m') v_i
 *
 * and at the end o = acc / l, lse = m + log(l) (natural log of the scaled
 * scores). An empty row writes o = 0 and lse = -inf.
 */
#include <stdlib.h>

#include "cpu_internal.h"

typedef struct {
  float *q;   /* [h][Dk] */
  float *acc; /* [h][Dv] */
  float *m;   /* [h] */
  float *l;   /* [h] */
  float *kt;  /* [Dk][KT] (transposed tile) */
  float *krow; /* [Dk] */
  float *vt;  /* [KT][Dv] */
  float *s;   /* [KT] */
} fwd_scratch_t;

static float *scratch_alloc(const nsa_dims_t *d, fwd_scratch_t *w) {
  size_t h = (size_t)d->h, dk = (size_t)d->Dk, dv = (size_t)d->Dv, kt = NSA_CPU_KT;
  size_t total = h * dk + h * dv + 2 * h + kt * dk + kt * dv + kt + dk;
  float *buf = malloc(total * sizeof(float));
  if (!buf) return NULL;
  w->q = buf;
  w->acc = w->q + h * dk;
  w->m = w->acc + h * dv;
  w->l = w->m + h;
  w->kt = w->l + h;
  w->vt = w->kt + kt * dk;
  w->s = w->vt + kt * dv;
  w->krow = w->s + kt;
  return buf;
}

/* Folds a tile of nk keys into every head's running softmax state. The K
 * tile is stored transposed (kt[c][i], c < Dk, i < KT) so the scores of all
 * keys of the tile accumulate as one vector loop over i. q is pre-scaled. */
static void fold_tile(const nsa_dims_t *d, fwd_scratch_t *w, int64_t nk) {
  const int64_t Dk = d->Dk, Dv = d->Dv;
  for (int64_t j = 0; j < d->h; j++) {
    const float *qj = w->q + j * Dk;
    float *s = w->s;
    for (int64_t i = 0; i < nk; i++) s[i] = 0.0f;
    for (int64_t c = 0; c < Dk; c++) {
      const float qc = qj[c], *kc = w->kt + c * NSA_CPU_KT;
      for (int64_t i = 0; i < nk; i++) s[i] += qc * kc[i];
    }
    float mt = -INFINITY;
    for (int64_t i = 0; i < nk; i++) mt = s[i] > mt ? s[i] : mt;
    float mnew = w->m[j] > mt ? w->m[j] : mt;
    float alpha = expf(w->m[j] - mnew); /* m = -inf on the first tile → 0 */
    float *acc = w->acc + j * Dv;
    float lsum = 0.0f;
    for (int64_t c = 0; c < Dv; c++) acc[c] *= alpha;
    for (int64_t i = 0; i < nk; i++) {
      float p = expf(s[i] - mnew);
      lsum += p;
      const float *vi = w->vt + i * Dv;
      for (int64_t c = 0; c < Dv; c++) acc[c] += p * vi[c];
    }
    w->l[j] = w->l[j] * alpha + lsum;
    w->m[j] = mnew;
  }
}

static void fwd_row(const nsa_fwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                    int64_t r, float scale, fwd_scratch_t *w) {
  int64_t b, t, g;
  nsa_row_decode(d, r, &b, &t, &g);
  const int64_t h = d->h, Dk = d->Dk, Dv = d->Dv;
  const nsa_tensor_t *q = &a->q, *k = &a->k, *v = &a->v, *o = &a->o;
  const int32_t *sp = plan->spans + r * plan->n * 2;
  const int32_t ns = plan->nspans[r];

  if (plan->row_len[r] == 0) {
    for (int64_t j = 0; j < h; j++) {
      nsa_store_zero(o->data, o->dtype, nsa_off3(o, b, t, g * h + j), o->stride[3], Dv);
      if (a->lse.data)
        ((float *)a->lse.data)[nsa_off3(&a->lse, b, t, g * h + j)] = -INFINITY;
    }
    return;
  }
  for (int64_t j = 0; j < h; j++) {
    /* q[b][t][g*h+j][:] */
    nsa_load_vec(w->q + j * Dk, q->data, q->dtype, nsa_off3(q, b, t, g * h + j), q->stride[3], Dk);
    for (int64_t c = 0; c < Dk; c++) w->q[j * Dk + c] *= scale;
    w->m[j] = -INFINITY;
    w->l[j] = 0.0f;
  }
  memset(w->acc, 0, sizeof(float) * (size_t)(h * Dv));

  int64_t nk = 0;
  for (int32_t si = 0; si < ns; si++) {
    for (int64_t pos = sp[2 * si]; pos < sp[2 * si + 1]; pos++) {
      /* k[b][pos][g][:], v[b][pos][g][:] */
      nsa_load_vec(w->krow, k->data, k->dtype, nsa_off3(k, b, pos, g), k->stride[3], Dk);
      for (int64_t c = 0; c < Dk; c++) w->kt[c * NSA_CPU_KT + nk] = w->krow[c];
      nsa_load_vec(w->vt + nk * Dv, v->data, v->dtype, nsa_off3(v, b, pos, g), v->stride[3], Dv);
      if (++nk == NSA_CPU_KT) {
        fold_tile(d, w, nk);
        nk = 0;
      }
    }
  }
  if (nk) fold_tile(d, w, nk);

  for (int64_t j = 0; j < h; j++) {
    float inv = 1.0f / w->l[j];
    float *acc = w->acc + j * Dv;
    for (int64_t c = 0; c < Dv; c++) acc[c] *= inv;
    nsa_store_vec(o->data, o->dtype, nsa_off3(o, b, t, g * h + j), o->stride[3], acc, Dv);
    if (a->lse.data)
      ((float *)a->lse.data)[nsa_off3(&a->lse, b, t, g * h + j)] = w->m[j] + logf(w->l[j]);
  }
}

int nsa_cpu_varlen_fwd(const nsa_fwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       char *msg, size_t msglen) {
  const float scale = nsa_resolve_scale(a->scale, d->Dk);
  int oom = 0;
#pragma omp parallel
  {
    fwd_scratch_t w = {0};
    float *buf = scratch_alloc(d, &w);
    if (!buf) {
#pragma omp atomic write
      oom = 1;
    }
#pragma omp for schedule(dynamic, 8)
    for (int64_t r = 0; r < d->rows; r++)
      if (buf) fwd_row(a, d, plan, r, scale, &w);
    free(buf);
  }
  if (oom) {
    if (msg && msglen) snprintf(msg, msglen, "varlen forward: out of host memory for scratch");
    return NSA_ERR_INTERNAL;
  }
  return NSA_OK;
}
