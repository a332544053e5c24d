/*
 * test_cuda_bwd.c — the CUDA backward (nsa_cuda_sel_bwd) on every path vs the
 * float64 reference backward (tests/common/ref.h).
 *
 * o and lse, inputs of the backward, come from the CPU forward on the same
 * host case (independent of the CUDA forward); inputs are fresh random values
 * exactly representable in the dtype; dq/dk/dv are NaN-poisoned on the device
 * before every run, so an element the kernels skip fails the comparison.
 * f32 (generic kernels) must agree to <= 1e-5 relative (max-norm), bf16/f16
 * (tensor cores: P and dS rounded to the dtype before their MMAs) within
 * 2e-2 / 5e-3. Without a GPU every test skips.
 *
 * NSA_BWD_BENCH=1 additionally times T=16k (h = 16 and h = 1) in
 * cuda_bwd/bench (skipped otherwise, so CI stays fast).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_case.h"

static const nsa_path_t k_paths[] = {NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, NSA_PATH_PACKED};

static double tol_g(nsa_dtype_t dt) { return dt == NSA_F32 ? 1e-5 : dt == NSA_F16 ? 5e-3 : 2e-2; }

typedef struct {
  nsa_tu_case_t c;
  void *q, *k, *v, *o, *lse, *sel, *dout, *dq, *dk, *dv;
  nsa_bwd_args_t bwd; /* device views */
  double *rq, *rk, *rv, *gq, *gk, *gv;
  int64_t nq, nk, nv;
} bx_t;

static nsa_tensor_t up(const nsa_tu_buf_t *b, void **d) { return nsa_tc_up(b, d); }

static void bx_poison(bx_t *f) {
  nsa_tu_poison(&f->c.dq);
  nsa_tu_poison(&f->c.dk);
  nsa_tu_poison(&f->c.dv);
  cudaMemcpy(f->dq, f->c.dq.mem, f->c.dq.bytes, cudaMemcpyHostToDevice);
  cudaMemcpy(f->dk, f->c.dk.mem, f->c.dk.bytes, cudaMemcpyHostToDevice);
  cudaMemcpy(f->dv, f->c.dv.mem, f->c.dv.bytes, cudaMemcpyHostToDevice);
}

static void bx_fetch(bx_t *f) {
  nsa_tc_down(&f->c.dq, f->dq);
  nsa_tc_down(&f->c.dk, f->dk);
  nsa_tc_down(&f->c.dv, f->dv);
  nsa_tu_to_f64(&f->c.dq.t, f->gq);
  nsa_tu_to_f64(&f->c.dk.t, f->gk);
  nsa_tu_to_f64(&f->c.dv.t, f->gv);
}

/* edit (may be NULL) changes sel_raw before the forward (pre) or after it
 * (post: the forward ran on the valid selection, for invalid-data tests). */
static void bx_init2(bx_t *f, const nsa_tu_case_cfg_t *cfg, void (*pre)(nsa_tu_case_t *),
                     void (*post)(nsa_tu_case_t *)) {
  memset(f, 0, sizeof(*f));
  cr_assert_eq(nsa_tu_case_init(&f->c, cfg), 0, "case init");
  char msg[256];
  nsa_run_info_t info;
  if (pre) {
    pre(&f->c);
    nsa_tu_case_sync_sel(&f->c);
  }
  cr_assert_eq(nsa_cpu_sel_fwd(&f->c.fwd, NULL, NSA_PATH_VARLEN_V2, &info, msg, sizeof msg), NSA_OK, "%s", msg);
  if (post) {
    post(&f->c);
    nsa_tu_case_sync_sel(&f->c);
  }
  f->bwd = f->c.bwd;
  f->bwd.q = up(&f->c.q, &f->q);
  f->bwd.k = up(&f->c.k, &f->k);
  f->bwd.v = up(&f->c.v, &f->v);
  f->bwd.o = up(&f->c.o, &f->o);
  f->bwd.lse = up(&f->c.lse, &f->lse);
  f->bwd.sel.t = up(&f->c.sel, &f->sel);
  f->bwd.dout = up(&f->c.dout, &f->dout);
  f->bwd.dq = up(&f->c.dq, &f->dq);
  f->bwd.dk = up(&f->c.dk, &f->dk);
  f->bwd.dv = up(&f->c.dv, &f->dv);
  cr_assert(f->q && f->k && f->v && f->o && f->lse && f->sel && f->dout && f->dq && f->dk && f->dv,
            "device allocation");
  f->nq = cfg->B * cfg->S * f->c.H * cfg->Dk;
  f->nk = cfg->B * cfg->Skv * cfg->G * cfg->Dk;
  f->nv = cfg->B * cfg->Skv * cfg->G * cfg->Dv;
  f->rq = malloc(sizeof(double) * (size_t)(f->nq + 1));
  f->rk = malloc(sizeof(double) * (size_t)(f->nk + 1));
  f->rv = malloc(sizeof(double) * (size_t)(f->nv + 1));
  f->gq = malloc(sizeof(double) * (size_t)(f->nq + 1));
  f->gk = malloc(sizeof(double) * (size_t)(f->nk + 1));
  f->gv = malloc(sizeof(double) * (size_t)(f->nv + 1));
  nsa_ref_bwd(&f->c.ref, f->c.dod, f->rq, f->rk, f->rv);
}

static void bx_init(bx_t *f, const nsa_tu_case_cfg_t *cfg, void (*pre)(nsa_tu_case_t *)) {
  bx_init2(f, cfg, pre, NULL);
}

/* Every row's slot 0 selects block 0 (block ids): tile 0's row list is all rows. */
static void force_block0(nsa_tu_case_t *c) {
  const int64_t rows = c->cfg.B * c->cfg.S * c->cfg.G;
  for (int64_t r = 0; r < rows; r++) c->sel_raw[r * c->cfg.n] = 0;
}

static void bx_free(bx_t *f) {
  void *d[] = {f->q, f->k, f->v, f->o, f->lse, f->sel, f->dout, f->dq, f->dk, f->dv};
  for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) cudaFree(d[i]);
  free(f->rq);
  free(f->rk);
  free(f->rv);
  free(f->gq);
  free(f->gk);
  free(f->gv);
  nsa_tu_case_teardown(&f->c);
}

static const char *cfg_str(const nsa_tu_case_cfg_t *c, char *buf, size_t len) {
  snprintf(buf, len, "B=%lld S=%lld Skv=%lld G=%lld h=%lld Dk=%lld Dv=%lld n=%lld %s %s bs=%d%s%s seed=%llu",
           (long long)c->B, (long long)c->S, (long long)c->Skv, (long long)c->G, (long long)c->h,
           (long long)c->Dk, (long long)c->Dv, (long long)c->n, nsa_dtype_name(c->dtype),
           c->ranges ? "ranges" : "blocks", c->block_size, c->gapped ? " gapped" : "",
           c->kv_bgsd ? " kv_bgsd" : "", (unsigned long long)c->seed);
  return buf;
}

static nsa_cuda_ctx_t *mkctx(size_t cap) {
  nsa_cuda_ctx_t *ctx = NULL;
  char msg[256];
  cr_assert_eq(nsa_cuda_ctx_create(0, cap, &ctx, msg, sizeof msg), NSA_OK, "%s", msg);
  return ctx;
}

/* One path, sync; compares dq/dk/dv with the float64 backward. */
static void run_check(nsa_cuda_ctx_t *ctx, bx_t *f, nsa_path_t path) {
  char msg[256], cs[256];
  bx_poison(f);
  nsa_run_info_t info;
  nsa_cuda_exec_t ex = {.sync = 1};
  int rc = nsa_cuda_sel_bwd(ctx, &f->bwd, NULL, path, &ex, &info, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "%s: rc %d: %s [%s]", nsa_path_name(path), rc, msg, cfg_str(&f->c.cfg, cs, sizeof cs));
  cr_expect_eq(info.path, path);
  cr_expect_eq(info.rows, f->c.cfg.B * f->c.cfg.S * f->c.cfg.G);
  bx_fetch(f);
  const double eq = nsa_tu_rel_err(f->gq, f->rq, f->nq);
  const double ek = nsa_tu_rel_err(f->gk, f->rk, f->nk);
  const double ev = nsa_tu_rel_err(f->gv, f->rv, f->nv);
  const double tol = tol_g(f->c.cfg.dtype);
  cr_log_info("bwd %s: dq %.3g dk %.3g dv %.3g [%s]", nsa_path_name(path), eq, ek, ev,
              cfg_str(&f->c.cfg, cs, sizeof cs));
  cr_expect(eq <= tol && ek <= tol && ev <= tol, "%s: rel err dq %.3g dk %.3g dv %.3g > %.3g [%s]",
            nsa_path_name(path), eq, ek, ev, tol, cfg_str(&f->c.cfg, cs, sizeof cs));
}

/* Runs v2 with the knob `name` = a, then = b (each within tolerance of
 * float64 in run_check), and expects dq, dk and dv bitwise equal: two ways
 * of computing the same products. */
static void expect_knob_bitwise(nsa_cuda_ctx_t *ctx, bx_t *f, const char *name, const char *a, const char *b,
                                const char *what) {
  const nsa_tu_buf_t *g3[3] = {&f->c.dq, &f->c.dk, &f->c.dv};
  void *t3[3];
  setenv(name, a, 1);
  run_check(ctx, f, NSA_PATH_VARLEN_V2);
  for (int j = 0; j < 3; j++) {
    t3[j] = malloc(g3[j]->bytes);
    cr_assert(t3[j] != NULL);
    memcpy(t3[j], g3[j]->mem, g3[j]->bytes);
  }
  setenv(name, b, 1);
  run_check(ctx, f, NSA_PATH_VARLEN_V2);
  unsetenv(name);
  for (int j = 0; j < 3; j++) {
    cr_expect(memcmp(t3[j], g3[j]->mem, g3[j]->bytes) == 0, "%s: %s differs between %s=%s and %s", what,
              j == 0 ? "dq" : j == 1 ? "dk" : "dv", name, a, b);
    free(t3[j]);
  }
}

/* Keeps the outputs of the run_check just made, runs the same path again on
 * the same inputs and expects dq, dk, dv bitwise equal (no float atomics). */
static void expect_repeatable(nsa_cuda_ctx_t *ctx, bx_t *f, nsa_path_t path, const char *what) {
  void *a[3] = {malloc(f->c.dq.bytes), malloc(f->c.dk.bytes), malloc(f->c.dv.bytes)};
  memcpy(a[0], f->c.dq.mem, f->c.dq.bytes);
  memcpy(a[1], f->c.dk.mem, f->c.dk.bytes);
  memcpy(a[2], f->c.dv.mem, f->c.dv.bytes);
  run_check(ctx, f, path);
  cr_expect_eq(memcmp(a[0], f->c.dq.mem, f->c.dq.bytes), 0, "%s: dq differs between runs", what);
  cr_expect_eq(memcmp(a[1], f->c.dk.mem, f->c.dk.bytes), 0, "%s: dk differs between runs", what);
  cr_expect_eq(memcmp(a[2], f->c.dv.mem, f->c.dv.bytes), 0, "%s: dv differs between runs", what);
  for (int i = 0; i < 3; i++) free(a[i]);
}

static void check_paths(nsa_cuda_ctx_t *ctx, const nsa_tu_case_cfg_t *cfg) {
  bx_t f;
  bx_init(&f, cfg, NULL);
  for (size_t p = 0; p < 3; p++) run_check(ctx, &f, k_paths[p]);
  bx_free(&f);
}

static nsa_tu_case_cfg_t base(void) {
  return (nsa_tu_case_cfg_t){.B = 2, .S = 24, .Skv = 130, .G = 2, .h = 2, .Dk = 128, .Dv = 64,
                             .n = 5, .dtype = NSA_BF16, .block_size = 16,
                             .sel_flags = NSA_TU_SEL_ALL, .seed = 1};
}

/* h in {1,2,3,4,8,16} (and 20 > 16), every path, Dk != Dv rotating over the
 * tensor-core sizes; empty rows, duplicates, unused slots, future entries are
 * in NSA_TU_SEL_ALL. */
static void heads_matrix(nsa_dtype_t dt, int ranges, uint64_t seed0) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  const int64_t hs[] = {1, 2, 3, 4, 8, 16, 20};
  const int64_t dks[] = {128, 64, 192, 256, 128, 64, 256};
  const int64_t dvs[] = {64, 128, 256, 192, 128, 192, 64};
  for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = dt;
    cfg.h = hs[i];
    cfg.Dk = dks[i];
    cfg.Dv = dvs[i];
    cfg.ranges = ranges;
    cfg.n = ranges ? 6 : 5;
    cfg.seed = seed0 + i;
    check_paths(ctx, &cfg);
  }
  nsa_cuda_ctx_destroy(ctx);
}

Test(cuda_bwd, heads_bf16_blocks) { heads_matrix(NSA_BF16, 0, 2100); }
Test(cuda_bwd, heads_f16_blocks) { heads_matrix(NSA_F16, 0, 2200); }
Test(cuda_bwd, heads_f32_blocks) { heads_matrix(NSA_F32, 0, 2300); }
Test(cuda_bwd, heads_bf16_ranges) { heads_matrix(NSA_BF16, 1, 2400); }
Test(cuda_bwd, heads_f16_ranges) { heads_matrix(NSA_F16, 1, 2500); }
Test(cuda_bwd, heads_f32_ranges) { heads_matrix(NSA_F32, 1, 2600); }

/* Every (Dk, Dv) instantiation of the tensor-core kernels, both dtypes. */
Test(cuda_bwd, all_head_dims) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  const int64_t ds[] = {64, 128, 192, 256};
  int k = 0;
  for (int dt = 0; dt < 2; dt++)
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) {
        nsa_tu_case_cfg_t cfg = base();
        cfg.dtype = dt ? NSA_F16 : NSA_BF16;
        cfg.Dk = ds[i];
        cfg.Dv = ds[j];
        cfg.h = 1 + (k % 5);
        cfg.S = 9;
        cfg.seed = 2700 + k++;
        bx_t f;
        bx_init(&f, &cfg, NULL);
        run_check(ctx, &f, NSA_PATH_VARLEN_V2);
        bx_free(&f);
      }
  nsa_cuda_ctx_destroy(ctx);
}

/* Non-contiguous strides: K/V stored [B,G,Skv,D] (aligned: tensor cores),
 * every tensor gapped + padded (generic kernels), head dims the tensor-core
 * kernels do not build (generic kernels). */
Test(cuda_bwd, strides_and_fallbacks) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int dt = 0; dt < 3; dt++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = (nsa_dtype_t)dt;
    cfg.kv_bgsd = 1;
    cfg.h = 3;
    cfg.seed = 2800 + dt;
    check_paths(ctx, &cfg);
    cfg.kv_bgsd = 0;
    cfg.gapped = 1;
    cfg.seed = 2810 + dt;
    check_paths(ctx, &cfg);
    cfg.gapped = 0;
    cfg.Dk = 40;
    cfg.Dv = 24;
    cfg.seed = 2820 + dt;
    check_paths(ctx, &cfg);
  }
  nsa_cuda_ctx_destroy(ctx);
}

static void make_empty_rows(nsa_tu_case_t *c) {
  /* every row of t < 5 selects nothing; row (b=0,t=5,g=0) one block, 3 times */
  const int64_t n = c->cfg.n, G = c->cfg.G;
  for (int64_t b = 0; b < c->cfg.B; b++)
    for (int64_t t = 0; t < 5; t++)
      for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < n; i++) c->sel_raw[(((b * c->cfg.S) + t) * G + g) * n + i] = -1;
  int32_t *r = c->sel_raw + (5 * G) * n;
  for (int64_t i = 0; i < n; i++) r[i] = i < 3 ? 1 : -1;
}

/* Decode (S = 1), training alignment (S = Skv), all-empty rows and
 * duplicates, odd block sizes with a partial last tile, correlated
 * selections, explicit scale. */
Test(cuda_bwd, decode_empty_shapes) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int dt = 0; dt < 3; dt++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = (nsa_dtype_t)dt;
    cfg.S = 1;
    cfg.Skv = 333;
    cfg.B = 3;
    cfg.h = 4;
    cfg.n = 6;
    cfg.seed = 2900 + dt;
    check_paths(ctx, &cfg);
    cfg.S = cfg.Skv = 90;
    cfg.B = 2;
    cfg.h = 1;
    cfg.block_size = 20;
    cfg.seed = 2910 + dt;
    check_paths(ctx, &cfg);
    {
      bx_t f;
      cfg.seed = 2915 + dt;
      cfg.sel_flags = NSA_TU_SEL_DUP;
      bx_init(&f, &cfg, make_empty_rows);
      for (size_t p = 0; p < 3; p++) run_check(ctx, &f, k_paths[p]);
      bx_free(&f);
    }
    cfg.S = 17;
    cfg.Skv = 700;
    cfg.block_size = 48;
    cfg.n = 12;
    cfg.h = 2;
    cfg.sel_flags = NSA_TU_SEL_CORRELATED | NSA_TU_SEL_DUP;
    cfg.scale = 0.37f;
    cfg.seed = 2920 + dt;
    check_paths(ctx, &cfg);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* Long per-tile row lists: every query selects block 0, so tile 0's list
 * exceeds one segment (128 rows at h >= 16, 2048 / h below) and dk/dv of
 * that tile go through the f32 partials and the ordered reduction. */
Test(cuda_bwd, long_lists_segments) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int dt = 0; dt < 3; dt += 2) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = (nsa_dtype_t)dt;
    cfg.B = 1;
    cfg.G = 1;
    cfg.S = cfg.Skv = 400;
    cfg.h = 16;
    cfg.Dk = cfg.Dv = 64;
    cfg.block_size = 64;
    cfg.n = 3;
    cfg.sel_flags = NSA_TU_SEL_CORRELATED;
    cfg.seed = 3000 + dt;
    bx_t f;
    bx_init(&f, &cfg, force_block0);
    for (size_t p = 0; p < 3; p++) run_check(ctx, &f, k_paths[p]);
    bx_free(&f);
    cfg.S = cfg.Skv = 2300;
    cfg.h = 1;
    cfg.seed = 3010 + dt;
    bx_init(&f, &cfg, force_block0);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2); /* bf16: key-centric dq (small h) */
    setenv("NSA_BWD_DQ", "query", 1);       /* the query-centric dq on the same case */
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    unsetenv("NSA_BWD_DQ");
    bx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* Two runs on the same inputs are bitwise equal (every path, bf16 + f32,
 * including a multi-segment tile and the key-centric dq partials). */
Test(cuda_bwd, determinism) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int dt = 0; dt < 3; dt += 2) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = (nsa_dtype_t)dt;
    cfg.B = 1;
    cfg.S = cfg.Skv = 300;
    cfg.h = 16;
    cfg.Dk = 128;
    cfg.Dv = 64;
    cfg.block_size = 64;
    cfg.n = 4;
    cfg.sel_flags = NSA_TU_SEL_CORRELATED | NSA_TU_SEL_DUP;
    cfg.seed = 3100 + dt;
    if (dt == 0) cfg.h = 2; /* bf16: small h, key-centric dq with its partials */
    bx_t f;
    bx_init(&f, &cfg, force_block0);
    for (size_t p = 0; p < 3; p++) {
      run_check(ctx, &f, k_paths[p]);
      expect_repeatable(ctx, &f, k_paths[p], nsa_path_name(k_paths[p]));
    }
    bx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* The key-centric dq in row batches (NSA_BWD_DQ_BATCH_ROWS): the inversion,
 * dk/dv and dq partials run per batch of rows, dk/dv add up in the f32
 * accumulator. 300 rows per batch of 2 x 600 x 2 = 2400 rows → 8 batches, the
 * last one partial; every row selects block 0, so tile 0 has 300 rows per
 * batch: several segments (NSA_BWD_SEG=64) and the ordered reduction into the
 * accumulator. Checked against float64 for h = 1 / 4 / 16, Dk != Dv, and two
 * batched runs are bitwise equal: the first (NSA_BWD_TIMING=1) inverts every
 * batch on the one stream, the second inverts batch k + 1 on the side stream
 * while batch k's dk/dv run, in two alternating areas (bwd_request.cu), so
 * the comparison also checks that pipelining. */
Test(cuda_bwd, dq_key_row_batches) {
  NSA_REQUIRE_GPU();
  setenv("NSA_CUDA_BWD_ROWS", "0", 1); /* h = 16 would take the row-block dq (no partials) */
  nsa_cuda_ctx_t *ctx = mkctx(0);
  const int64_t hs[] = {1, 4, 16};
  for (size_t i = 0; i < 3; i++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.B = 2;
    cfg.G = 2;
    cfg.S = cfg.Skv = 600;
    cfg.h = hs[i];
    cfg.Dk = 128;
    cfg.Dv = i == 1 ? 64 : 128;
    cfg.block_size = 64;
    cfg.n = 4;
    cfg.sel_flags = i == 2 ? NSA_TU_SEL_CORRELATED : NSA_TU_SEL_ALL;
    cfg.seed = 3200 + i;
    bx_t f;
    bx_init(&f, &cfg, force_block0);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2); /* one batch */
    setenv("NSA_BWD_DQ_BATCH_ROWS", "300", 1);
    setenv("NSA_BWD_SEG", "64", 1);
    setenv("NSA_BWD_TIMING", "1", 1); /* stderr says "batches 8" */
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    unsetenv("NSA_BWD_TIMING");
    char what[32];
    snprintf(what, sizeof what, "h=%lld batched", (long long)cfg.h);
    expect_repeatable(ctx, &f, NSA_PATH_VARLEN_V2, what);
    unsetenv("NSA_BWD_DQ_BATCH_ROWS");
    unsetenv("NSA_BWD_SEG");
    bx_free(&f);
  }
  unsetenv("NSA_CUDA_BWD_ROWS");
  nsa_cuda_ctx_destroy(ctx);
}

/* One sync v2 backward with the knob `name` = val (name NULL: none set);
 * returns its workspace bytes. */
static size_t bwd_ws(nsa_cuda_ctx_t *ctx, bx_t *f, const char *name, const char *val) {
  if (name) setenv(name, val, 1);
  nsa_cuda_exec_t ex = {.sync = 1};
  nsa_run_info_t info;
  char msg[256];
  const int rc = nsa_cuda_sel_bwd(ctx, &f->bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  if (name) unsetenv(name);
  cr_assert_eq(rc, NSA_OK, "%s", msg);
  return info.workspace_bytes;
}

/* The row-block dq (fwd_rows.h; h = 16, Dk = Dv = 128, block ids): random
 * and blockwise selections, S not a multiple of the 10-row block, Skv not a
 * multiple of the tile, block sizes 64 and 32, duplicates, unused slots,
 * empty rows and future entries, G = 1 and 2, B = 2, K/V [B,G,S,D], both
 * dtypes, a 2000-row case over many ring laps; dq / dk / dv against the
 * float64 backward. v1 and v2 planners must agree bitwise, and the
 * workspace must be far under NSA_CUDA_BWD_ROWS=0's (the key-centric dq's
 * per-tile partials), which shows the row-block dq ran (its dq may equal
 * the key-centric one bitwise on short rows: both add a row's tiles in
 * ascending order). */
Test(cuda_bwd, row_block_dq) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int k = 0; k < 9; k++) {
    nsa_tu_case_cfg_t cfg = base();
    nsa_tc_row_block_cfg(&cfg, k, NSA_TU_SEL_CORRELATED, 3600 + k);
    bx_t f;
    bx_init(&f, &cfg, NULL);
    const size_t ws[2] = {bwd_ws(ctx, &f, NULL, NULL), bwd_ws(ctx, &f, "NSA_CUDA_BWD_ROWS", "0")};
    cr_expect_lt(ws[0] * 2, ws[1], "case %d: workspace %zu B, key-centric dq %zu B: row-block dq not run", k, ws[0],
                 ws[1]);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    /* The row-block dq computes delta and the lse copy itself: bitwise the
     * preprocess kernel's (its dq, dk and dv with the kernel kept). On a
     * fresh context, so no earlier run's delta sits in the workspace: a row
     * the dq left unwritten shows in dk / dv. */
    nsa_cuda_ctx_t *fresh = mkctx(0);
    run_check(fresh, &f, NSA_PATH_VARLEN_V2);
    setenv("NSA_CUDA_BWD_ROWS_PRE", "0", 1);
    expect_repeatable(fresh, &f, NSA_PATH_VARLEN_V2, "row-block dq with the preprocess kernel");
    unsetenv("NSA_CUDA_BWD_ROWS_PRE");
    nsa_cuda_ctx_destroy(fresh);
    double *q1 = malloc(sizeof(double) * (size_t)f.nq);
    cr_assert(q1);
    memcpy(q1, f.gq, sizeof(double) * (size_t)f.nq);
    run_check(ctx, &f, NSA_PATH_VARLEN_V1);
    int64_t d = 0;
    for (int64_t e = 0; e < f.nq; e++) d += memcmp(&q1[e], &f.gq[e], sizeof(double)) != 0;
    cr_expect_eq(d, 0, "case %d: v1 and v2 planners' dq differ in %lld elements", k, (long long)d);
    setenv("NSA_CUDA_BWD_ROWS", "0", 1);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    unsetenv("NSA_CUDA_BWD_ROWS");
    d = 0;
    for (int64_t e = 0; e < f.nq; e++) d += memcmp(&q1[e], &f.gq[e], sizeof(double)) != 0;
    cr_log_info("case %d: workspace %zu B (key-centric dq %zu B), dq differs from the key-centric in %lld of %lld",
                k, ws[0], ws[1], (long long)d, (long long)f.nq);
    free(q1);
    bx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* The row-block dq from dS (bwd_request.cu choose_ds; the default for the
 * row-block dq on sm_90): the wgmma dk/dv kernel stores dS and the dq runs
 * dQ += dS K only. Same cases as row_block_dq. Each run is checked against
 * the float64 backward; the dq that recomputes dS (NSA_CUDA_BWD_DS=0) must
 * need at least 2 KB per row less workspace (dS of one tile per row: shows
 * dS was used); three row batches (NSA_BWD_DQ_BATCH_ROWS) must give the
 * one-batch dq bitwise (a row's dS and its sum do not depend on the batch)
 * and repeat bitwise. */
Test(cuda_bwd, row_block_dq_from_ds) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int k = 0; k < 9; k++) {
    nsa_tu_case_cfg_t cfg = base();
    nsa_tc_row_block_cfg(&cfg, k, NSA_TU_SEL_CORRELATED, 3700 + k);
    bx_t f;
    bx_init(&f, &cfg, NULL);
    const int64_t rows = cfg.B * cfg.S * cfg.G;
    const size_t ws[2] = {bwd_ws(ctx, &f, NULL, NULL), bwd_ws(ctx, &f, "NSA_CUDA_BWD_DS", "0")};
    setenv("NSA_CUDA_BWD_DS", "0", 1);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    unsetenv("NSA_CUDA_BWD_DS");
    cr_expect_geq(ws[0], ws[1] + (size_t)rows * 2048, "case %d: workspace %zu B, without dS %zu B: dS not used", k,
                  ws[0], ws[1]);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    void *q1 = malloc(f.c.dq.bytes);
    cr_assert(q1);
    memcpy(q1, f.c.dq.mem, f.c.dq.bytes);
    char nb[32];
    snprintf(nb, sizeof nb, "%lld", (long long)(rows / 3 + 1));
    setenv("NSA_BWD_DQ_BATCH_ROWS", nb, 1);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    cr_expect_eq(memcmp(q1, f.c.dq.mem, f.c.dq.bytes), 0, "case %d: dq from dS differs between 1 and 3 row batches",
                 k);
    expect_repeatable(ctx, &f, NSA_PATH_VARLEN_V2, "dq from dS, 3 row batches");
    unsetenv("NSA_BWD_DQ_BATCH_ROWS");
    free(q1);
    bx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* The workspace-cap tests' case: h = 16 over 1024 rows (B = 1, G = 2,
 * S = 512), 8 blocks of 64 per row, unused slots. */
static nsa_tu_case_cfg_t cap_cfg(uint64_t seed) {
  nsa_tu_case_cfg_t cfg = base();
  cfg.B = 1;
  cfg.G = 2;
  cfg.S = cfg.Skv = 512;
  cfg.h = 16;
  cfg.Dk = cfg.Dv = 128;
  cfg.block_size = 64;
  cfg.n = 8;
  cfg.sel_flags = NSA_TU_SEL_UNUSED;
  cfg.seed = seed;
  return cfg;
}

/* The dq from dS under a workspace cap: a cap that holds the dS of half the
 * rows but not of all halves its rows per batch (the run equals
 * NSA_BWD_DQ_BATCH_ROWS = rows / 2 bitwise, with its workspace); a cap at
 * NSA_CUDA_BWD_DS=0's workspace still runs, within it. Both within float64
 * tolerance. */
Test(cuda_bwd, ds_cap_halves_row_batches) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  const nsa_tu_case_cfg_t cfg = cap_cfg(3800);
  bx_t f;
  bx_init(&f, &cfg, force_block0);
  const size_t w1 = bwd_ws(ctx, &f, NULL, NULL);
  const size_t w0 = bwd_ws(ctx, &f, "NSA_CUDA_BWD_DS", "0");
  char half[32];
  snprintf(half, sizeof half, "%lld", (long long)(cfg.B * cfg.S * cfg.G / 2));
  setenv("NSA_BWD_DQ_BATCH_ROWS", half, 1);
  run_check(ctx, &f, NSA_PATH_VARLEN_V2);
  unsetenv("NSA_BWD_DQ_BATCH_ROWS");
  const size_t w2 = bwd_ws(ctx, &f, "NSA_BWD_DQ_BATCH_ROWS", half);
  bx_fetch(&f);
  const nsa_tu_buf_t *g3[3] = {&f.c.dq, &f.c.dk, &f.c.dv};
  void *a[3];
  for (int i = 0; i < 3; i++) {
    a[i] = malloc(g3[i]->bytes);
    cr_assert(a[i]);
    memcpy(a[i], g3[i]->mem, g3[i]->bytes);
  }
  cr_log_info("workspace: dS one batch %zu B, two batches %zu B, no dS %zu B", w1, w2, w0);
  cr_assert_lt(w2, w1, "two batches of dS should need less workspace than one");
  cr_assert_gt(w2, w0, "dS should need more workspace than the dq that recomputes it");

  nsa_cuda_ctx_t *capped = mkctx(w2);
  bx_poison(&f);
  const size_t wc = bwd_ws(capped, &f, NULL, NULL);
  cr_expect_eq(wc, w2, "capped run: workspace %zu B, two batches need %zu B", wc, w2);
  bx_fetch(&f);
  for (int i = 0; i < 3; i++)
    cr_expect_eq(memcmp(a[i], g3[i]->mem, g3[i]->bytes), 0, "capped output %d differs from the two-batch run", i);
  const double tol = tol_g(cfg.dtype);
  cr_expect(nsa_tu_rel_err(f.gq, f.rq, f.nq) <= tol && nsa_tu_rel_err(f.gk, f.rk, f.nk) <= tol &&
                nsa_tu_rel_err(f.gv, f.rv, f.nv) <= tol,
            "capped at two batches: outside tolerance");
  nsa_cuda_ctx_destroy(capped);

  /* At the workspace of the dq that recomputes dS the halving goes on: each
   * batch also shrinks the dk/dv segment partials (here ~2 KB per pair),
   * so dS in smaller batches fits beside them (H200: 10.2 MB against
   * 17.7 MB without dS). */
  capped = mkctx(w0);
  run_check(capped, &f, NSA_PATH_VARLEN_V2);
  const size_t wl = bwd_ws(capped, &f, NULL, NULL);
  cr_expect_leq(wl, w0, "capped at %zu B: workspace %zu B", w0, wl);
  cr_log_info("capped at %zu B: workspace %zu B", w0, wl);
  nsa_cuda_ctx_destroy(capped);
  for (int i = 0; i < 3; i++) free(a[i]);
  bx_free(&f);
  nsa_cuda_ctx_destroy(ctx);
}

/* A workspace cap that holds the key-centric dq's partials of half the rows
 * but not of all: the backward halves its rows per batch until they fit
 * instead of falling back to the query-centric dq. The capped run must use
 * the workspace of NSA_BWD_DQ_BATCH_ROWS = rows / 2 (the same two batches),
 * equal that run bitwise and match float64. */
Test(cuda_bwd, cap_halves_row_batches) {
  NSA_REQUIRE_GPU();
  setenv("NSA_CUDA_BWD_ROWS", "0", 1); /* the key-centric dq: h = 16 would take the row-block dq */
  nsa_cuda_ctx_t *ctx = mkctx(0);
  const nsa_tu_case_cfg_t cfg = cap_cfg(3500);
  bx_t f;
  bx_init(&f, &cfg, force_block0);
  nsa_cuda_exec_t ex = {.sync = 1};
  nsa_run_info_t info;
  char msg[256];
  int rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "%s", msg);
  const size_t w1 = info.workspace_bytes;
  char half[32];
  snprintf(half, sizeof half, "%lld", (long long)(cfg.B * cfg.S * cfg.G / 2));
  setenv("NSA_BWD_DQ_BATCH_ROWS", half, 1);
  run_check(ctx, &f, NSA_PATH_VARLEN_V2);
  rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  unsetenv("NSA_BWD_DQ_BATCH_ROWS");
  cr_assert_eq(rc, NSA_OK, "%s", msg);
  const size_t w2 = info.workspace_bytes;
  bx_fetch(&f);
  void *a[3] = {malloc(f.c.dq.bytes), malloc(f.c.dk.bytes), malloc(f.c.dv.bytes)};
  memcpy(a[0], f.c.dq.mem, f.c.dq.bytes);
  memcpy(a[1], f.c.dk.mem, f.c.dk.bytes);
  memcpy(a[2], f.c.dv.mem, f.c.dv.bytes);
  setenv("NSA_BWD_DQ", "query", 1);
  rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  unsetenv("NSA_BWD_DQ");
  cr_assert_eq(rc, NSA_OK, "%s", msg);
  const size_t wq = info.workspace_bytes;
  cr_log_info("workspace: one batch %zu B, two batches %zu B, query-centric dq %zu B", w1, w2, wq);
  cr_assert_lt(w2, w1, "two batches should need less workspace than one");
  cr_assert_gt(w2, wq, "the key-centric dq should need more workspace than the query-centric one");

  nsa_cuda_ctx_t *capped = mkctx(w2);
  bx_poison(&f);
  rc = nsa_cuda_sel_bwd(capped, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "capped at two batches' workspace: rc %d (%s)", rc, msg);
  cr_expect_eq(info.workspace_bytes, w2, "capped run: workspace %zu B, two batches need %zu B",
               info.workspace_bytes, w2);
  bx_fetch(&f);
  cr_expect_eq(memcmp(a[0], f.c.dq.mem, f.c.dq.bytes), 0, "capped dq differs from the two-batch run");
  cr_expect_eq(memcmp(a[1], f.c.dk.mem, f.c.dk.bytes), 0, "capped dk differs from the two-batch run");
  cr_expect_eq(memcmp(a[2], f.c.dv.mem, f.c.dv.bytes), 0, "capped dv differs from the two-batch run");
  const double eq = nsa_tu_rel_err(f.gq, f.rq, f.nq), ek = nsa_tu_rel_err(f.gk, f.rk, f.nk),
               ev = nsa_tu_rel_err(f.gv, f.rv, f.nv);
  cr_expect(eq <= tol_g(cfg.dtype) && ek <= tol_g(cfg.dtype) && ev <= tol_g(cfg.dtype),
            "capped: rel err dq %.3g dk %.3g dv %.3g", eq, ek, ev);
  for (int i = 0; i < 3; i++) free(a[i]);
  nsa_cuda_ctx_destroy(capped);
  bx_free(&f);
  unsetenv("NSA_CUDA_BWD_ROWS");
  nsa_cuda_ctx_destroy(ctx);
}

static int issue_bwd(nsa_cuda_ctx_t *ctx, void *arg, nsa_cuda_exec_t *ex, char *msg, size_t msglen) {
  nsa_run_info_t info;
  return nsa_cuda_sel_bwd(ctx, &((bx_t *)arg)->bwd, NULL, NSA_PATH_VARLEN_V2, ex, &info, msg, msglen);
}

/* Poisons the outputs, captures one sync=0 v2 request on the context's
 * stream into a CUDA graph, replays it and fetches dq/dk/dv. */
static void graph_replay(nsa_cuda_ctx_t *ctx, bx_t *f) {
  bx_poison(f);
  char msg[320];
  cr_assert_eq(nsa_tc_graph_replay(ctx, issue_bwd, f, msg, sizeof msg), 0, "%s", msg);
  bx_fetch(f);
}

/* Runs v2 (sync) with the shared-tile dq (default) and with
 * NSA_CUDA_BWD_SHARED=0 (every row's dq key-centric), each checked against
 * the float64 reference; *dq_diff counts dq elements that differ bitwise
 * between the two runs, *kv_diff dk / dv elements. */
static void shared_on_off(nsa_cuda_ctx_t *ctx, bx_t *f, int64_t *dq_diff, int64_t *kv_diff) {
  run_check(ctx, f, NSA_PATH_VARLEN_V2);
  double *sq = malloc(sizeof(double) * (size_t)f->nq), *sk = malloc(sizeof(double) * (size_t)f->nk),
         *sv = malloc(sizeof(double) * (size_t)f->nv);
  cr_assert(sq && sk && sv);
  memcpy(sq, f->gq, sizeof(double) * (size_t)f->nq);
  memcpy(sk, f->gk, sizeof(double) * (size_t)f->nk);
  memcpy(sv, f->gv, sizeof(double) * (size_t)f->nv);
  setenv("NSA_CUDA_BWD_SHARED", "0", 1);
  run_check(ctx, f, NSA_PATH_VARLEN_V2);
  unsetenv("NSA_CUDA_BWD_SHARED");
  *dq_diff = *kv_diff = 0;
  for (int64_t e = 0; e < f->nq; e++) *dq_diff += memcmp(&sq[e], &f->gq[e], sizeof(double)) != 0;
  for (int64_t e = 0; e < f->nk; e++) *kv_diff += memcmp(&sk[e], &f->gk[e], sizeof(double)) != 0;
  for (int64_t e = 0; e < f->nv; e++) *kv_diff += memcmp(&sv[e], &f->gv[e], sizeof(double)) != 0;
  free(sq);
  free(sk);
  free(sv);
}

/* dq of query groups sharing their tiles (bwd_shared.h): selections copied
 * across each query block (with UNUSED some rows change a slot, so groups of
 * both kinds occur), h in {2, 4, 8, 16}, S not a multiple of the group size,
 * empty rows, block sizes 64 and 32, both dtypes, the four (Dk, Dv) of the
 * kernel, one and several row batches (NSA_BWD_DQ_BATCH_ROWS). Each case runs
 * with the shared dq and with NSA_CUDA_BWD_SHARED=0: both must match the
 * float64 reference; dq must differ somewhere bitwise (the shared kernel sums
 * over tiles in registers, the key-centric dq through per-tile partials),
 * which shows the shared kernel wrote rows, and dk / dv must be bitwise the
 * same (the skipped rows still feed dk / dv through the same kernel). Then a
 * graph-captured run with the shared dq must equal the direct run bitwise;
 * independent random selections: the gate drops every group, so dq too is
 * bitwise the same with the path on and off. */
Test(cuda_bwd, shared_tile_groups) {
  NSA_REQUIRE_GPU();
  setenv("NSA_CUDA_BWD_ROWS", "0", 1); /* h = 16 would take the row-block dq, which needs no shared-tile dq */
  nsa_cuda_ctx_t *ctx = mkctx(0);
  const int64_t hs[] = {16, 8, 4, 2, 16, 8};
  const int64_t dks[] = {128, 64, 64, 128, 128, 64};
  const int64_t dvs[] = {128, 64, 128, 64, 64, 128};
  for (int k = 0; k < 12; k++) {
    const int i = k % 6;
    nsa_tu_case_cfg_t cfg = base();
    nsa_tc_blockwise_cfg(&cfg, k, hs[i], dks[i], dvs[i], 3600 + k);
    bx_t f;
    bx_init(&f, &cfg, NULL);
    if (k % 3 == 2) setenv("NSA_BWD_DQ_BATCH_ROWS", "97", 1); /* several row batches */
    int64_t dq_diff = 0, kv_diff = 0;
    shared_on_off(ctx, &f, &dq_diff, &kv_diff);
    unsetenv("NSA_BWD_DQ_BATCH_ROWS");
    cr_expect_gt(dq_diff, 0, "h=%lld case %d: dq identical with the shared dq on and off: shared kernel not run",
                 (long long)cfg.h, k);
    cr_expect_eq(kv_diff, 0, "h=%lld case %d: dk/dv changed by the shared dq (%lld elements)", (long long)cfg.h, k,
                 (long long)kv_diff);
    if (k == 0 || k == 7) {
      run_check(ctx, &f, NSA_PATH_VARLEN_V2);
      void *d0[3] = {malloc(f.c.dq.bytes), malloc(f.c.dk.bytes), malloc(f.c.dv.bytes)};
      memcpy(d0[0], f.c.dq.mem, f.c.dq.bytes);
      memcpy(d0[1], f.c.dk.mem, f.c.dk.bytes);
      memcpy(d0[2], f.c.dv.mem, f.c.dv.bytes);
      graph_replay(ctx, &f);
      cr_expect_eq(memcmp(d0[0], f.c.dq.mem, f.c.dq.bytes), 0, "case %d: graph replay dq differs", k);
      cr_expect_eq(memcmp(d0[1], f.c.dk.mem, f.c.dk.bytes), 0, "case %d: graph replay dk differs", k);
      cr_expect_eq(memcmp(d0[2], f.c.dv.mem, f.c.dv.bytes), 0, "case %d: graph replay dv differs", k);
      for (int x = 0; x < 3; x++) free(d0[x]);
    }
    bx_free(&f);
  }
  for (int k = 0; k < 2; k++) {
    nsa_tu_case_cfg_t cfg = base();
    nsa_tc_random_gate_cfg(&cfg, k, 3620 + k);
    bx_t f;
    bx_init(&f, &cfg, NULL);
    int64_t dq_diff = 0, kv_diff = 0;
    shared_on_off(ctx, &f, &dq_diff, &kv_diff);
    cr_expect_eq(dq_diff + kv_diff, 0, "h=%lld: outputs changed by groups the gate should drop", (long long)cfg.h);
    bx_free(&f);
  }
  unsetenv("NSA_CUDA_BWD_ROWS");
  nsa_cuda_ctx_destroy(ctx);
}

/* The sm_90a wgmma dk/dv kernel (bwd_dkdv_wgmma.cu: Dk = Dv = 128, 4 <= h
 * <= 32, bf16 / f16) against the float64 reference over h with whole and
 * partial chunks (h = 5, 6, 12, 20: 32 % h != 0), long lists cut into
 * segments, row batches (key-centric dq partials and the f32 accumulators),
 * shared-tile rows, bf16 and f16; then the same case with
 * NSA_CUDA_BWD_WGMMA=0 (the mma.sync kernel), also checked: on an sm_90 GPU
 * dk must differ bitwise between the two (else the wgmma kernel did not
 * run), and must not for h = 40 (outside its range: both runs use mma.sync). */
Test(cuda_bwd, wgmma_dkdv) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  int dev = 0, major = 0, minor = 0;
  cr_assert_eq(cudaGetDevice(&dev), cudaSuccess);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  const int hopper = major == 9 && minor == 0;
  const int64_t hs[] = {4, 5, 6, 8, 12, 16, 20, 32, 40};
  for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = i % 2 ? NSA_F16 : NSA_BF16;
    cfg.B = 1 + (int64_t)(i % 2);
    cfg.G = 2;
    cfg.S = cfg.Skv = 520 + 17 * (int64_t)i;
    cfg.h = hs[i];
    cfg.Dk = cfg.Dv = 128;
    cfg.block_size = 64;
    cfg.n = 4;
    cfg.sel_flags = i % 3 == 1 ? NSA_TU_SEL_CORRELATED : NSA_TU_SEL_ALL;
    cfg.seed = 3700 + i;
    bx_t f;
    bx_init(&f, &cfg, force_block0);
    if (i % 3 == 2) setenv("NSA_BWD_SEG", "64", 1);          /* many segments: partials + reduction */
    if (i % 4 == 3) setenv("NSA_BWD_DQ_BATCH_ROWS", "150", 1); /* row batches: accumulators */
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    void *k0 = malloc(f.c.dk.bytes);
    cr_assert(k0 != NULL);
    memcpy(k0, f.c.dk.mem, f.c.dk.bytes);
    char what[48];
    snprintf(what, sizeof what, "wgmma h=%lld", (long long)cfg.h);
    expect_repeatable(ctx, &f, NSA_PATH_VARLEN_V2, what);
    /* K's S^T operand from registers (NSA_CUDA_DKDV_KREG=1) or from shared
     * memory (0): the same products. */
    if (hopper && cfg.h <= 32) expect_knob_bitwise(ctx, &f, "NSA_CUDA_DKDV_KREG", "1", "0", what);
    /* h = 16 (row-block dq, dk/dv without dq): the chunk gather by TMA boxes
     * (2: required, a request that cannot take it fails) and by cp.async (0)
     * load the same bytes. */
    if (hopper && cfg.h == 16) expect_knob_bitwise(ctx, &f, "NSA_CUDA_DKDV_TMA", "2", "0", what);
    setenv("NSA_CUDA_BWD_WGMMA", "0", 1);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    unsetenv("NSA_CUDA_BWD_WGMMA");
    unsetenv("NSA_BWD_SEG");
    unsetenv("NSA_BWD_DQ_BATCH_ROWS");
    const int differ = memcmp(k0, f.c.dk.mem, f.c.dk.bytes) != 0;
    if (hopper && cfg.h <= 32)
      cr_expect(differ, "h=%lld: dk bitwise equal with the wgmma kernel on and off: it did not run", (long long)cfg.h);
    if (cfg.h > 32) cr_expect(!differ, "h=%lld: dk changed by NSA_CUDA_BWD_WGMMA outside its range", (long long)cfg.h);
    free(k0);
    bx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}

static int g_ranges_edit;
static void make_invalid(nsa_tu_case_t *c) {
  int32_t *s = c->sel_raw;
  if (g_ranges_edit) {
    s[0] = 5, s[1] = 2;                     /* start > end */
    s[10] = -70000, s[11] = 1000000;        /* negative start */
    s[22] = 0x7ffffff0, s[23] = 0x7fffffff; /* valid, past Skv: clipped */
  } else {
    s[0] = 1 << 30; /* id far past the end */
    s[7] = -5;      /* below -1 */
    s[13] = (int32_t)((c->cfg.Skv + c->cfg.block_size - 1) / c->cfg.block_size); /* one past */
  }
}

/* Bad selection data: every path reports invalid_selection with the count and
 * writes nothing (sync); with sync = 0 on v2 (block ids: no host wait) the
 * call is queued and the kernels write NaN instead of reading anything (also
 * at h = 8, Dk = Dv = 128: the wgmma dk/dv kernel). Run
 * under compute-sanitizer memcheck for the "never out of bounds" half. */
Test(cuda_bwd, invalid_selection) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int k = 0; k < 4; k++) {
    const int ranges = k == 1;
    nsa_tu_case_cfg_t cfg = base();
    if (k >= 2) { /* the wgmma dk/dv kernel's NaN path (bwd_dkdv_wgmma.cu); h = 16: the row-block dq's */
      cfg.h = k == 2 ? 8 : 16;
      cfg.Dv = 128;
    }
    cfg.ranges = ranges;
    cfg.seed = 3200 + k;
    g_ranges_edit = ranges;
    bx_t f;
    bx_init2(&f, &cfg, NULL, make_invalid);
    const int64_t want = nsa_ref_count_invalid(&f.c.ref);
    cr_assert_gt(want, 0);
    for (size_t p = 0; p < 3; p++) {
      bx_poison(&f);
      nsa_run_info_t info;
      char msg[256];
      nsa_cuda_exec_t ex = {.sync = 1};
      int rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, k_paths[p], &ex, &info, msg, sizeof msg);
      cr_expect_eq(rc, NSA_ERR_INVALID_SELECTION, "%s: rc %d (%s)", nsa_path_name(k_paths[p]), rc, msg);
      cr_expect_eq(info.invalid, want, "%s: invalid %lld want %lld", nsa_path_name(k_paths[p]),
                   (long long)info.invalid, (long long)want);
      bx_fetch(&f);
      cr_expect(nsa_tu_is_poisoned(&f.c.dq) && nsa_tu_is_poisoned(&f.c.dk) && nsa_tu_is_poisoned(&f.c.dv),
                "%s wrote gradients on an invalid selection", nsa_path_name(k_paths[p]));
    }
    if (!ranges) {
      cudaMemset(f.dq, 0, f.c.dq.bytes);
      cudaMemset(f.dk, 0, f.c.dk.bytes);
      cudaMemset(f.dv, 0, f.c.dv.bytes);
      nsa_run_info_t info;
      char msg[256];
      nsa_cuda_exec_t ex = {.sync = 0};
      int rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
      cr_expect_eq(rc, NSA_OK, "async v2: rc %d (%s)", rc, msg);
      cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
      bx_fetch(&f);
      int64_t nan = 0;
      for (int64_t i = 0; i < f.nq; i++) nan += isnan(f.gq[i]) != 0;
      for (int64_t i = 0; i < f.nk; i++) nan += isnan(f.gk[i]) != 0;
      for (int64_t i = 0; i < f.nv; i++) nan += isnan(f.gv[i]) != 0;
      cr_expect_eq(nan, f.nq + f.nk + f.nv, "async invalid: %lld of %lld gradients NaN", (long long)nan,
                   (long long)(f.nq + f.nk + f.nv));
    }
    bx_free(&f);
    /* the context stays usable */
    bx_init(&f, &cfg, NULL);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    bx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* sync = 0 with events, and CUDA graph capture of the whole v2 backward
 * (block ids: no host synchronization inside). */
Test(cuda_bwd, async_and_graph) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  nsa_tu_case_cfg_t cfg = base();
  cfg.h = 3;
  cfg.seed = 3300;
  bx_t f;
  bx_init(&f, &cfg, NULL);
  run_check(ctx, &f, NSA_PATH_VARLEN_V2); /* warm: arena at its high-water mark */
  void *first = malloc(f.c.dk.bytes);
  memcpy(first, f.c.dk.mem, f.c.dk.bytes);

  cudaEvent_t wait_ev, done_ev;
  cudaStream_t user;
  cr_assert_eq(cudaStreamCreateWithFlags(&user, cudaStreamNonBlocking), cudaSuccess);
  cudaEventCreateWithFlags(&wait_ev, cudaEventDisableTiming);
  cudaEventCreateWithFlags(&done_ev, cudaEventDisableTiming);
  bx_poison(&f);
  cudaEventRecord(wait_ev, user);
  nsa_cuda_exec_t ex = {.wait_event = wait_ev, .done_event = done_ev, .sync = 0};
  nsa_run_info_t info;
  char msg[256];
  int rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, NSA_PATH_AUTO, &ex, &info, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "async: %s", msg);
  cr_expect_eq(info.path, NSA_PATH_VARLEN_V2);
  cudaStreamWaitEvent(user, done_ev, 0);
  cr_assert_eq(cudaStreamSynchronize(user), cudaSuccess);
  bx_fetch(&f);
  cr_expect_eq(memcmp(first, f.c.dk.mem, f.c.dk.bytes), 0, "async dk differs from sync dk");

  graph_replay(ctx, &f);
  cr_expect_eq(memcmp(first, f.c.dk.mem, f.c.dk.bytes), 0, "graph replay dk differs from direct run");
  const double eq = nsa_tu_rel_err(f.gq, f.rq, f.nq);
  cr_expect(eq <= tol_g(cfg.dtype), "graph replay dq rel err %.3g", eq);
  cudaEventDestroy(wait_ev);
  cudaEventDestroy(done_ev);
  cudaStreamDestroy(user);
  free(first);
  bx_free(&f);
  nsa_cuda_ctx_destroy(ctx);
}

/* AUTO follows the flags; a workspace cap gives busy, or the query-centric dq
 * where only the key-centric dq's partials are over it. */
Test(cuda_bwd, flags_and_limits) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  nsa_tu_case_cfg_t cfg = base();
  cfg.seed = 3400;
  bx_t f;
  bx_init(&f, &cfg, NULL);
  struct {
    nsa_path_flags_t fl;
    nsa_path_t want;
  } cases[] = {
      {{1, 1, 0}, NSA_PATH_VARLEN_V2},
      {{1, 0, 0}, NSA_PATH_VARLEN_V1},
      {{0, 1, 0}, NSA_PATH_PACKED},
      {{1, 1, 1 << 20}, NSA_PATH_PACKED},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    bx_poison(&f);
    nsa_cuda_exec_t ex = {.sync = 1};
    nsa_run_info_t info;
    char msg[256];
    int rc = nsa_cuda_sel_bwd(ctx, &f.bwd, &cases[i].fl, NSA_PATH_AUTO, &ex, &info, msg, sizeof msg);
    cr_assert_eq(rc, NSA_OK, "%s", msg);
    cr_expect_eq(info.path, cases[i].want, "case %zu: path %s", i, nsa_path_name(info.path));
    bx_fetch(&f);
    const double ek = nsa_tu_rel_err(f.gk, f.rk, f.nk);
    cr_expect(ek <= tol_g(cfg.dtype), "case %zu: dk rel err %.3g", i, ek);
  }
  nsa_cuda_ctx_t *small = mkctx(1024);
  nsa_cuda_exec_t ex = {.sync = 1};
  nsa_run_info_t info;
  char msg[256];
  int rc = nsa_cuda_sel_bwd(small, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  cr_expect_eq(rc, NSA_ERR_BUSY, "rc %d (%s)", rc, msg);
  nsa_cuda_ctx_destroy(small);

  /* A cap that fits the query-centric dq but not the key-centric dq's
   * partials: the request falls back instead of failing with busy. */
  size_t wq = 0, wk = 0;
  setenv("NSA_BWD_DQ", "query", 1);
  rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  unsetenv("NSA_BWD_DQ");
  cr_assert_eq(rc, NSA_OK, "%s", msg);
  wq = info.workspace_bytes;
  rc = nsa_cuda_sel_bwd(ctx, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "%s", msg);
  wk = info.workspace_bytes;
  cr_log_info("workspace: query-centric dq %zu B, key-centric dq %zu B", wq, wk);
  cr_expect_gt(wk, wq, "h=%lld bf16 should take the key-centric dq (more workspace)", (long long)cfg.h);
  nsa_cuda_ctx_t *mid = mkctx(wq);
  bx_poison(&f);
  rc = nsa_cuda_sel_bwd(mid, &f.bwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  cr_expect_eq(rc, NSA_OK, "capped at the query-centric workspace: rc %d (%s)", rc, msg);
  cr_expect_leq(info.workspace_bytes, wq);
  bx_fetch(&f);
  const double eq = nsa_tu_rel_err(f.gq, f.rq, f.nq);
  cr_expect(eq <= tol_g(cfg.dtype), "fallback dq rel err %.3g", eq);
  nsa_cuda_ctx_destroy(mid);
  bx_free(&f);
  nsa_cuda_ctx_destroy(ctx);
}

/* ---- timing (NSA_BWD_BENCH=1): one sequence, G = 4, D = 128, block 64,
 * n = 16 random blocks incl. block 0 and the query's own, bf16; o/lse from
 * the CUDA forward. Median of 10 synchronous runs (device_us). ---- */
static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static int cmpd(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}
static void bench_one(nsa_cuda_ctx_t *ctx, int64_t T, int64_t h) {
  const int64_t G = 4, D = 128, n = 16, bs = 64, H = G * h, nb = (T + bs - 1) / bs;
  uint64_t seed = 77 + (uint64_t)h;
  size_t nq = (size_t)(T * H * D), nk = (size_t)(T * G * D);
  uint16_t *hq = malloc(nq * 2), *hk = malloc(nk * 2);
  int32_t *hs = malloc(sizeof(int32_t) * (size_t)(T * G * n));
  for (size_t i = 0; i < nq; i++) hq[i] = nsa_f32_to_bf16((float)((double)(rng_next(&seed) >> 11) / 9007199254740992.0 - 0.5));
  for (size_t i = 0; i < nk; i++) hk[i] = nsa_f32_to_bf16((float)((double)(rng_next(&seed) >> 11) / 9007199254740992.0 - 0.5));
  for (int64_t t = 0; t < T; t++)
    for (int64_t g = 0; g < G; g++) {
      int32_t *r = hs + (t * G + g) * n;
      const int64_t own = t / bs;
      r[0] = 0;
      r[1] = (int32_t)own;
      for (int64_t i = 2; i < n; i++) r[i] = own > 0 ? (int32_t)(rng_next(&seed) % (uint64_t)(own + 1)) : -1;
    }
  (void)nb;
  void *dq_, *dk_, *dv_, *dqq, *dkk, *dvv, *dout, *o, *lse, *sel;
  cudaMalloc(&dq_, nq * 2), cudaMalloc(&dk_, nk * 2), cudaMalloc(&dv_, nk * 2);
  cudaMalloc(&dqq, nq * 2), cudaMalloc(&dkk, nk * 2), cudaMalloc(&dvv, nk * 2);
  cudaMalloc(&dout, nq * 2), cudaMalloc(&o, nq * 2), cudaMalloc(&lse, (size_t)(T * H) * 4);
  cudaMalloc(&sel, sizeof(int32_t) * (size_t)(T * G * n));
  cudaMemcpy(dq_, hq, nq * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dout, hq, nq * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk_, hk, nk * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dv_, hk, nk * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(sel, hs, sizeof(int32_t) * (size_t)(T * G * n), cudaMemcpyHostToDevice);
  nsa_tensor_t tq = {.data = dq_, .dtype = NSA_BF16, .ndim = 4, .shape = {1, T, H, D}};
  nsa_tensor_set_contiguous(&tq);
  nsa_tensor_t tk = {.data = dk_, .dtype = NSA_BF16, .ndim = 4, .shape = {1, T, G, D}};
  nsa_tensor_set_contiguous(&tk);
  nsa_tensor_t tv = tk, to = tq, tdo = tq, tdq = tq, tdk = tk, tdv = tk;
  tv.data = dv_, to.data = o, tdo.data = dout, tdq.data = dqq, tdk.data = dkk, tdv.data = dvv;
  nsa_tensor_t tl = {.data = lse, .dtype = NSA_F32, .ndim = 3, .shape = {1, T, H}};
  nsa_tensor_set_contiguous(&tl);
  nsa_selection_t s = {.kind = NSA_SEL_BLOCK_INDICES, .block_size = (int32_t)bs};
  s.t = (nsa_tensor_t){.data = sel, .dtype = NSA_I32, .ndim = 4, .shape = {1, T, G, n}};
  nsa_tensor_set_contiguous(&s.t);
  nsa_fwd_args_t fa = {.q = tq, .k = tk, .v = tv, .o = to, .lse = tl, .sel = s};
  nsa_bwd_args_t ba = {.q = tq, .k = tk, .v = tv, .o = to, .lse = tl, .dout = tdo,
                       .dq = tdq, .dk = tdk, .dv = tdv, .sel = s};
  char msg[256];
  nsa_run_info_t info;
  nsa_cuda_exec_t ex = {.sync = 1};
  cr_assert_eq(nsa_cuda_sel_fwd(ctx, &fa, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg), NSA_OK, "%s", msg);
  const double fwd_us = info.device_us;
  double us[10];
  for (int it = 0; it < 12; it++) {
    int rc = nsa_cuda_sel_bwd(ctx, &ba, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
    cr_assert_eq(rc, NSA_OK, "%s", msg);
    if (it >= 2) us[it - 2] = info.device_us;
  }
  qsort(us, 10, sizeof us[0], cmpd);
  char name[64];
  nsa_cuda_device_name(0, name, sizeof name);
  const double flops = 4.0 * (double)h * G * D * (double)T * info.mean_len * 3.5; /* 7 matmuls */
  printf("BENCH bwd %s T=%lld G=4 h=%lld D=128 n=16 bf16 v2: bwd median %.3f ms (min %.3f, max %.3f), "
         "%.1f TFLOP/s effective (7-matmul count), fwd %.3f ms, plan %.1f us, ws %.1f MiB, mean_len %.1f\n",
         name, (long long)T, (long long)h, us[5] / 1e3, us[0] / 1e3, us[9] / 1e3, flops / (us[5] * 1e-6) / 1e12,
         fwd_us / 1e3, info.plan_us, info.workspace_bytes / 1048576.0, info.mean_len);
  fflush(stdout);
  void *fr[] = {dq_, dk_, dv_, dqq, dkk, dvv, dout, o, lse, sel};
  for (int i = 0; i < 10; i++) cudaFree(fr[i]);
  free(hq);
  free(hk);
  free(hs);
}

Test(cuda_bwd, bench, .timeout = 300) {
  NSA_REQUIRE_GPU();
  const char *e = getenv("NSA_BWD_BENCH");
  if (!e || e[0] != '1') cr_skip_test("set NSA_BWD_BENCH=1 to time the backward");
  nsa_cuda_ctx_t *ctx = mkctx(0);
  /* NSA_BWD_BENCH_H="16,1": the head counts to time (default 16,1,4) */
  const char *hl = getenv("NSA_BWD_BENCH_H");
  if (!hl || !*hl) hl = "16,1,4";
  for (const char *p = hl; *p;) {
    char *end;
    long h = strtol(p, &end, 10);
    if (end == p) break;
    if (h > 0) bench_one(ctx, 16384, h);
    p = *end ? end + 1 : end;
  }
  nsa_cuda_ctx_destroy(ctx);
}
