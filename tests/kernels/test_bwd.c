/*
 * test_bwd.c — CPU backward: float64 reference vs central finite differences,
 * every path vs the float64 backward, determinism.
 *
 * The backward's o/lse inputs come from the CPU forward (varlen_v2) on the
 * same case; dq/dk/dv are NaN-poisoned before every run.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nsa/sel_attn.h"
#include "sel_case.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static const nsa_path_t k_paths[] = {NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, NSA_PATH_PACKED};

typedef struct {
  int64_t nq, nk, nv;
  double *q, *k, *v; /* gradients */
} grads_t;

static void grads_alloc(grads_t *g, const nsa_tu_case_t *c) {
  const nsa_tu_case_cfg_t *f = &c->cfg;
  g->nq = f->B * f->S * c->H * f->Dk;
  g->nk = f->B * f->Skv * f->G * f->Dk;
  g->nv = f->B * f->Skv * f->G * f->Dv;
  g->q = malloc(sizeof(double) * (size_t)(g->nq + 1));
  g->k = malloc(sizeof(double) * (size_t)(g->nk + 1));
  g->v = malloc(sizeof(double) * (size_t)(g->nv + 1));
}
static void grads_free(grads_t *g) {
  free(g->q);
  free(g->k);
  free(g->v);
}

/* L = sum(dout * o) with the float64 reference forward. */
static double ref_loss(const nsa_tu_case_t *c, double *obuf) {
  nsa_ref_fwd(&c->ref, obuf, NULL);
  int64_t no = c->cfg.B * c->cfg.S * c->H * c->cfg.Dv;
  double l = 0;
  for (int64_t i = 0; i < no; i++) l += c->dod[i] * obuf[i];
  return l;
}

/* Central differences of every input element into fd. */
static void finite_diff(nsa_tu_case_t *c, grads_t *fd) {
  double *obuf = malloc(sizeof(double) * (size_t)(c->cfg.B * c->cfg.S * c->H * c->cfg.Dv + 1));
  struct {
    double *x, *out;
    int64_t n;
  } in[3] = {{c->qd, fd->q, fd->nq}, {c->kd, fd->k, fd->nk}, {c->vd, fd->v, fd->nv}};
  const double eps = 1e-5;
  for (int a = 0; a < 3; a++)
    for (int64_t i = 0; i < in[a].n; i++) {
      double x0 = in[a].x[i];
      in[a].x[i] = x0 + eps;
      double lp = ref_loss(c, obuf);
      in[a].x[i] = x0 - eps;
      double lm = ref_loss(c, obuf);
      in[a].x[i] = x0;
      in[a].out[i] = (lp - lm) / (2 * eps);
    }
  free(obuf);
}

/* Runs the CPU forward (to get o, lse) then the backward on `path`. */
static void run_cpu_bwd(nsa_tu_case_t *c, nsa_path_t path, grads_t *got) {
  char msg[256];
  nsa_run_info_t info;
  nsa_tu_case_poison_outputs(c);
  cr_assert_eq(nsa_cpu_sel_fwd(&c->fwd, NULL, NSA_PATH_VARLEN_V2, &info, msg, sizeof msg), NSA_OK,
               "%s", msg);
  int rc = nsa_cpu_sel_bwd(&c->bwd, NULL, path, &info, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "%s: rc %d %s", nsa_path_name(path), rc, msg);
  cr_assert_eq(info.path, path);
  nsa_tu_to_f64(&c->dq.t, got->q);
  nsa_tu_to_f64(&c->dk.t, got->k);
  nsa_tu_to_f64(&c->dv.t, got->v);
}

static void expect_close(const grads_t *got, const grads_t *want, double tol, const char *what,
                         const nsa_tu_case_cfg_t *cfg) {
  double eq = nsa_tu_rel_err(got->q, want->q, got->nq);
  double ek = nsa_tu_rel_err(got->k, want->k, got->nk);
  double ev = nsa_tu_rel_err(got->v, want->v, got->nv);
  cr_log_info("%s: dq %.3g dk %.3g dv %.3g (h=%lld %s)", what, eq, ek, ev, (long long)cfg->h,
              nsa_dtype_name(cfg->dtype));
  cr_expect(eq <= tol && ek <= tol && ev <= tol,
            "%s: rel err dq %.3g dk %.3g dv %.3g > %.3g (h=%lld dtype=%s ranges=%d seed=%llu)",
            what, eq, ek, ev, tol, (long long)cfg->h, nsa_dtype_name(cfg->dtype), cfg->ranges,
            (unsigned long long)cfg->seed);
}

static void fd_case(const nsa_tu_case_cfg_t *cfg, void (*edit)(nsa_tu_case_t *)) {
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, cfg), 0);
  if (edit) {
    edit(&c);
    nsa_tu_case_sync_sel(&c);
  }
  grads_t fd, ref, got;
  grads_alloc(&fd, &c);
  grads_alloc(&ref, &c);
  grads_alloc(&got, &c);
  finite_diff(&c, &fd);
  nsa_ref_bwd(&c.ref, c.dod, ref.q, ref.k, ref.v);
  expect_close(&ref, &fd, 1e-7, "float64 reference vs finite differences", cfg);
  for (size_t p = 0; p < 3; p++) {
    run_cpu_bwd(&c, k_paths[p], &got);
    expect_close(&got, &fd, 1e-5, nsa_path_name(k_paths[p]), cfg);
  }
  grads_free(&fd);
  grads_free(&ref);
  grads_free(&got);
  nsa_tu_case_teardown(&c);
}

static nsa_tu_case_cfg_t tiny(void) {
  return (nsa_tu_case_cfg_t){.B = 1, .S = 4, .Skv = 9, .G = 2, .h = 3, .Dk = 3, .Dv = 2, .n = 3,
                             .dtype = NSA_F32, .block_size = 2, .sel_flags = NSA_TU_SEL_FUTURE,
                             .seed = 11};
}

static void make_empty_and_dup(nsa_tu_case_t *c) {
  /* row 0 (t=0, g=0) empty; row 1 selects block 2 three times plus -1 */
  const int64_t n = c->cfg.n;
  for (int64_t i = 0; i < n; i++) c->sel_raw[i] = -1;
  c->sel_raw[n + 0] = 2;
  c->sel_raw[n + 1] = 2;
  c->sel_raw[n + 2] = 2;
}

Test(bwd_fd, empty_rows_and_duplicates) {
  nsa_tu_case_cfg_t cfg = tiny();
  fd_case(&cfg, make_empty_and_dup);
}

Test(bwd_fd, decode_alignment) {
  nsa_tu_case_cfg_t cfg = tiny();
  cfg.S = 1;
  cfg.Skv = 11;
  cfg.B = 2;
  cfg.sel_flags = NSA_TU_SEL_DUP | NSA_TU_SEL_UNUSED;
  cfg.seed = 12;
  fd_case(&cfg, NULL);
  cfg.S = 3;
  cfg.seed = 13;
  fd_case(&cfg, NULL);
}

Test(bwd_fd, ranges_h3) {
  nsa_tu_case_cfg_t cfg = tiny();
  cfg.ranges = 1;
  cfg.Skv = 12;
  cfg.S = 5;
  cfg.sel_flags = NSA_TU_SEL_ALL;
  cfg.seed = 14;
  fd_case(&cfg, NULL);
}

/* ---- every path vs the float64 backward ---- */

static void ref_case(const nsa_tu_case_cfg_t *cfg, double tol) {
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, cfg), 0);
  grads_t ref, got;
  grads_alloc(&ref, &c);
  grads_alloc(&got, &c);
  nsa_ref_bwd(&c.ref, c.dod, ref.q, ref.k, ref.v);
  for (size_t p = 0; p < 3; p++) {
    run_cpu_bwd(&c, k_paths[p], &got);
    expect_close(&got, &ref, tol, nsa_path_name(k_paths[p]), cfg);
  }
  grads_free(&ref);
  grads_free(&got);
  nsa_tu_case_teardown(&c);
}

static nsa_tu_case_cfg_t mid(void) {
  return (nsa_tu_case_cfg_t){.B = 2, .S = 16, .Skv = 40, .G = 2, .h = 2, .Dk = 16, .Dv = 12,
                             .n = 4, .dtype = NSA_F32, .block_size = 16,
                             .sel_flags = NSA_TU_SEL_ALL, .seed = 21};
}

Test(bwd_ref, heads_sweep) {
  const int64_t hs[] = {1, 2, 3, 4, 8, 16};
  for (size_t i = 0; i < 6; i++) {
    nsa_tu_case_cfg_t cfg = mid();
    cfg.h = hs[i];
    cfg.seed = 30 + i;
    ref_case(&cfg, 1e-5);
    cfg.ranges = 1;
    cfg.n = 5;
    cfg.seed = 40 + i;
    ref_case(&cfg, 1e-5);
  }
}

Test(bwd_ref, block_sizes_layouts_decode) {
  const int32_t bss[] = {16, 32, 64, 20};
  for (size_t i = 0; i < 4; i++) {
    nsa_tu_case_cfg_t cfg = mid();
    cfg.block_size = bss[i];
    cfg.Skv = 130;
    cfg.S = 6;
    cfg.h = 3;
    cfg.kv_bgsd = (int)(i & 1);
    cfg.gapped = (int)(i >> 1);
    cfg.seed = 50 + i;
    ref_case(&cfg, 1e-5);
  }
  nsa_tu_case_cfg_t cfg = mid();
  cfg.S = 1;
  cfg.Skv = 90;
  cfg.B = 3;
  cfg.seed = 60;
  ref_case(&cfg, 1e-5);
}

Test(bwd_ref, bf16_f16) {
  nsa_tu_case_cfg_t cfg = mid();
  cfg.h = 3;
  cfg.dtype = NSA_BF16;
  cfg.seed = 70;
  ref_case(&cfg, 1e-2);
  cfg.dtype = NSA_F16;
  cfg.kv_bgsd = 1;
  cfg.seed = 71;
  ref_case(&cfg, 2e-3);
}

Test(bwd_ref, deterministic) {
  nsa_tu_case_cfg_t cfg = mid();
  cfg.h = 4;
  cfg.S = 40;
  cfg.sel_flags = NSA_TU_SEL_CORRELATED | NSA_TU_SEL_DUP;
  cfg.seed = 80;
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
  grads_t a, b;
  grads_alloc(&a, &c);
  grads_alloc(&b, &c);
  for (size_t p = 0; p < 3; p++) {
    run_cpu_bwd(&c, k_paths[p], &a);
    run_cpu_bwd(&c, k_paths[p], &b);
    cr_assert(memcmp(a.q, b.q, sizeof(double) * (size_t)a.nq) == 0 &&
                  memcmp(a.k, b.k, sizeof(double) * (size_t)a.nk) == 0 &&
                  memcmp(a.v, b.v, sizeof(double) * (size_t)a.nv) == 0,
              "%s: two runs differ", nsa_path_name(k_paths[p]));
  }
  grads_free(&a);
  grads_free(&b);
  nsa_tu_case_teardown(&c);
}

/* The varlen backward has two schedules (per (b,g) group when B*G >= threads,
 * per key tile otherwise) that must agree bit for bit; the tile schedule is
 * also checked against the float64 backward. */
Test(bwd_ref, varlen_schedules_agree) {
#ifndef _OPENMP
  cr_skip_test("built without OpenMP: one schedule only");
#else
  const int saved = omp_get_max_threads();
  const int64_t hs[] = {1, 3, 16};
  for (size_t i = 0; i < 3; i++) {
    nsa_tu_case_cfg_t cfg = mid();
    cfg.h = hs[i];
    cfg.B = 1;
    cfg.Skv = 150; /* 3 key tiles, the last partial */
    cfg.S = i == 2 ? 1 : 37;
    cfg.ranges = (int)(i & 1);
    cfg.seed = 90 + i;
    nsa_tu_case_t c;
    cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
    grads_t ref, g1, g2;
    grads_alloc(&ref, &c);
    grads_alloc(&g1, &c);
    grads_alloc(&g2, &c);
    nsa_ref_bwd(&c.ref, c.dod, ref.q, ref.k, ref.v);
    omp_set_num_threads(1); /* B*G = 2 >= 1: group schedule */
    run_cpu_bwd(&c, NSA_PATH_VARLEN_V2, &g1);
    omp_set_num_threads(4); /* B*G = 2 < 4: key-tile schedule */
    run_cpu_bwd(&c, NSA_PATH_VARLEN_V2, &g2);
    omp_set_num_threads(saved);
    expect_close(&g2, &ref, 1e-5, "varlen tile schedule", &cfg);
    cr_expect(memcmp(g1.q, g2.q, sizeof(double) * (size_t)g1.nq) == 0 &&
                  memcmp(g1.k, g2.k, sizeof(double) * (size_t)g1.nk) == 0 &&
                  memcmp(g1.v, g2.v, sizeof(double) * (size_t)g1.nv) == 0,
              "group and tile schedules differ (h=%lld)", (long long)cfg.h);
    grads_free(&ref);
    grads_free(&g1);
    grads_free(&g2);
    nsa_tu_case_teardown(&c);
  }
#endif
}
