/* sel_case.c — see sel_case.h. */
#include "sel_case.h"

#include <stdlib.h>
#include <string.h>

static int alloc_t(nsa_tu_buf_t *b, const nsa_tu_case_cfg_t *cfg, nsa_dtype_t dt, int nd,
                   const int64_t *shape, const int *order) {
  return nsa_tu_buf_alloc(b, dt, nd, shape, order, cfg->gapped ? 2 : 1, cfg->gapped ? 3 : 0);
}

int nsa_tu_case_init(nsa_tu_case_t *c, const nsa_tu_case_cfg_t *cfg) {
  memset(c, 0, sizeof(*c));
  c->cfg = *cfg;
  const int64_t B = cfg->B, S = cfg->S, Skv = cfg->Skv, G = cfg->G, H = cfg->G * cfg->h;
  const int64_t Dk = cfg->Dk, Dv = cfg->Dv, n = cfg->n;
  c->H = H;
  nsa_tu_rng_t rng;
  nsa_tu_rng_seed(&rng, cfg->seed);
  const int kv_order[4] = {0, 2, 1, 3}; /* [B, G, Skv, D] storage */
  const int *kvo = cfg->kv_bgsd ? kv_order : NULL;
  int64_t sq[4] = {B, S, H, Dk}, sk[4] = {B, Skv, G, Dk}, sv[4] = {B, Skv, G, Dv};
  int64_t so[4] = {B, S, H, Dv}, sl[3] = {B, S, H}, ss[5] = {B, S, G, n, 2};
  int rc = 0;
  rc |= alloc_t(&c->q, cfg, cfg->dtype, 4, sq, NULL);
  rc |= alloc_t(&c->k, cfg, cfg->dtype, 4, sk, kvo);
  rc |= alloc_t(&c->v, cfg, cfg->dtype, 4, sv, kvo);
  rc |= alloc_t(&c->o, cfg, cfg->dtype, 4, so, NULL);
  rc |= alloc_t(&c->lse, cfg, NSA_F32, 3, sl, NULL);
  rc |= alloc_t(&c->sel, cfg, NSA_I32, cfg->ranges ? 5 : 4, ss, NULL);
  rc |= alloc_t(&c->dout, cfg, cfg->dtype, 4, so, NULL);
  rc |= alloc_t(&c->dq, cfg, cfg->dtype, 4, sq, NULL);
  rc |= alloc_t(&c->dk, cfg, cfg->dtype, 4, sk, kvo);
  rc |= alloc_t(&c->dv, cfg, cfg->dtype, 4, sv, kvo);
  if (rc) return -1;
  c->nsel = B * S * G * n * (cfg->ranges ? 2 : 1);
  c->sel_raw = malloc(sizeof(int32_t) * (size_t)(c->nsel > 0 ? c->nsel : 1));
  c->qd = malloc(sizeof(double) * (size_t)(B * S * H * Dk + 1));
  c->kd = malloc(sizeof(double) * (size_t)(B * Skv * G * Dk + 1));
  c->vd = malloc(sizeof(double) * (size_t)(B * Skv * G * Dv + 1));
  c->dod = malloc(sizeof(double) * (size_t)(B * S * H * Dv + 1));
  if (!c->sel_raw || !c->qd || !c->kd || !c->vd || !c->dod) return -1;

  nsa_tu_fill_random(&c->q, &rng, -1.0, 1.0);
  nsa_tu_fill_random(&c->k, &rng, -1.0, 1.0);
  nsa_tu_fill_random(&c->v, &rng, -1.0, 1.0);
  nsa_tu_fill_random(&c->dout, &rng, -1.0, 1.0);
  nsa_tu_to_f64(&c->q.t, c->qd);
  nsa_tu_to_f64(&c->k.t, c->kd);
  nsa_tu_to_f64(&c->v.t, c->vd);
  nsa_tu_to_f64(&c->dout.t, c->dod);
  if (cfg->ranges)
    nsa_tu_sel_ranges(c->sel_raw, B, S, G, n, Skv, cfg->sel_flags, &rng);
  else
    nsa_tu_sel_blocks(c->sel_raw, B, S, G, n, Skv, cfg->block_size, cfg->sel_flags, &rng);
  nsa_tu_case_sync_sel(c);

  c->ref = (nsa_ref_problem_t){.B = B, .S = S, .Skv = Skv, .G = G, .h = cfg->h, .Dk = Dk,
                               .Dv = Dv, .n = n, .q = c->qd, .k = c->kd, .v = c->vd,
                               .sel_kind = cfg->ranges ? NSA_REF_RANGES : NSA_REF_BLOCKS,
                               .sel = c->sel_raw, .block_size = cfg->block_size,
                               .scale = cfg->scale};
  nsa_selection_t sel = {.kind = cfg->ranges ? NSA_SEL_RANGES : NSA_SEL_BLOCK_INDICES,
                         .t = c->sel.t, .block_size = cfg->block_size};
  c->fwd = (nsa_fwd_args_t){.q = c->q.t, .k = c->k.t, .v = c->v.t, .o = c->o.t, .lse = c->lse.t,
                            .sel = sel, .scale = cfg->scale};
  c->bwd = (nsa_bwd_args_t){.q = c->q.t, .k = c->k.t, .v = c->v.t, .o = c->o.t, .lse = c->lse.t,
                            .dout = c->dout.t, .dq = c->dq.t, .dk = c->dk.t, .dv = c->dv.t,
                            .sel = sel, .scale = cfg->scale};
  return 0;
}

void nsa_tu_case_sync_sel(nsa_tu_case_t *c) { nsa_tu_from_i32(&c->sel.t, c->sel_raw); }

void nsa_tu_case_poison_outputs(nsa_tu_case_t *c) {
  nsa_tu_poison(&c->o);
  nsa_tu_poison(&c->lse);
  nsa_tu_poison(&c->dq);
  nsa_tu_poison(&c->dk);
  nsa_tu_poison(&c->dv);
}

void nsa_tu_case_teardown(nsa_tu_case_t *c) {
  nsa_tu_buf_t *bufs[] = {&c->q, &c->k, &c->v, &c->o, &c->lse, &c->sel,
                          &c->dout, &c->dq, &c->dk, &c->dv};
  for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) nsa_tu_buf_free(bufs[i]);
  free(c->sel_raw);
  free(c->qd);
  free(c->kd);
  free(c->vd);
  free(c->dod);
  memset(c, 0, sizeof(*c));
}
