/*
 * test_cuda_fwd.c — every CUDA forward path vs the float64 reference.
 *
 * Inputs are fresh random values exactly representable in the dtype (the
 * reference sees what the kernel reads); outputs are NaN-poisoned on the
 * device before each run. f32 (generic kernel) must agree to <= 1e-5
 * relative (max-norm); bf16/f16 (tensor cores, P rounded to the dtype before
 * P.V, output rounded) within 1e-2 / 5e-3.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

#include "cuda_case.h"

static const nsa_path_t k_paths[] = {NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, NSA_PATH_PACKED};

static double tol_o(nsa_dtype_t dt) { return dt == NSA_F32 ? 1e-5 : dt == NSA_F16 ? 5e-3 : 1e-2; }
static double tol_l(nsa_dtype_t dt) { return dt == NSA_F32 ? 1e-5 : 1e-4; }

typedef struct {
  nsa_tu_case_t c;
  nsa_tc_dev_t dv;
  double *ro, *rl, *go, *gl;
  int64_t no, nl;
} fx_t;

static void fx_init(fx_t *f, const nsa_tu_case_cfg_t *cfg) {
  cr_assert_eq(nsa_tu_case_init(&f->c, cfg), 0, "case init");
  cr_assert_eq(nsa_tc_dev_init(&f->dv, &f->c), 0, "device copy");
  f->no = cfg->B * cfg->S * f->c.H * cfg->Dv;
  f->nl = cfg->B * cfg->S * f->c.H;
  f->ro = malloc(sizeof(double) * (size_t)(f->no + 1));
  f->rl = malloc(sizeof(double) * (size_t)(f->nl + 1));
  f->go = malloc(sizeof(double) * (size_t)(f->no + 1));
  f->gl = malloc(sizeof(double) * (size_t)(f->nl + 1));
  nsa_ref_fwd(&f->c.ref, f->ro, f->rl);
}

static void fx_free(fx_t *f) {
  free(f->ro);
  free(f->rl);
  free(f->go);
  free(f->gl);
  nsa_tc_dev_free(&f->dv);
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

/* Runs one path (sync) and compares with the reference; *info as returned. */
static void run_check_info(nsa_cuda_ctx_t *ctx, fx_t *f, nsa_path_t path, nsa_run_info_t *pinfo) {
  char msg[256], cs[256];
  nsa_tc_poison(&f->dv, &f->c);
  nsa_run_info_t info;
  nsa_cuda_exec_t ex = {.sync = 1};
  int rc = nsa_cuda_sel_fwd(ctx, &f->dv.fwd, NULL, path, &ex, &info, msg, sizeof msg);
  *pinfo = info;
  cr_assert_eq(rc, NSA_OK, "%s: rc %d: %s [%s]", nsa_path_name(path), rc, msg,
               cfg_str(&f->c.cfg, cs, sizeof cs));
  cr_expect_eq(info.path, path);
  cr_expect_eq(info.rows, f->c.cfg.B * f->c.cfg.S * f->c.cfg.G);
  nsa_tc_fetch(&f->dv, &f->c);
  nsa_tu_to_f64(&f->c.o.t, f->go);
  nsa_tu_to_f64(&f->c.lse.t, f->gl);
  double eo = nsa_tu_rel_err(f->go, f->ro, f->no), el = nsa_tu_rel_err(f->gl, f->rl, f->nl);
  cr_log_info("%s: o %.3g lse %.3g [%s]", nsa_path_name(path), eo, el, cfg_str(&f->c.cfg, cs, sizeof cs));
  cr_expect(eo <= tol_o(f->c.cfg.dtype), "%s o rel err %.3g [%s]", nsa_path_name(path), eo,
            cfg_str(&f->c.cfg, cs, sizeof cs));
  cr_expect(el <= tol_l(f->c.cfg.dtype), "%s lse rel err %.3g [%s]", nsa_path_name(path), el,
            cfg_str(&f->c.cfg, cs, sizeof cs));
}

static void run_check(nsa_cuda_ctx_t *ctx, fx_t *f, nsa_path_t path) {
  nsa_run_info_t info;
  run_check_info(ctx, f, path, &info);
}

static void check_paths(nsa_cuda_ctx_t *ctx, const nsa_tu_case_cfg_t *cfg) {
  fx_t f;
  fx_init(&f, cfg);
  for (size_t p = 0; p < 3; p++) run_check(ctx, &f, k_paths[p]);
  fx_free(&f);
}

static nsa_cuda_ctx_t *mkctx(size_t cap) {
  nsa_cuda_ctx_t *ctx = NULL;
  char msg[256];
  cr_assert_eq(nsa_cuda_ctx_create(0, cap, &ctx, msg, sizeof msg), NSA_OK, "%s", msg);
  return ctx;
}

static nsa_tu_case_cfg_t base(void) {
  return (nsa_tu_case_cfg_t){.B = 2, .S = 24, .Skv = 130, .G = 2, .h = 2, .Dk = 128, .Dv = 64,
                             .n = 5, .dtype = NSA_BF16, .block_size = 16,
                             .sel_flags = NSA_TU_SEL_ALL, .seed = 1};
}

/* The foundation matrix: h x dtype x path, (Dk, Dv) rotating over the
 * tensor-core sizes with Dk != Dv. */
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

Test(cuda_fwd, heads_bf16_blocks) { heads_matrix(NSA_BF16, 0, 100); }
Test(cuda_fwd, heads_f16_blocks) { heads_matrix(NSA_F16, 0, 200); }
Test(cuda_fwd, heads_f32_blocks) { heads_matrix(NSA_F32, 0, 300); }
Test(cuda_fwd, heads_bf16_ranges) { heads_matrix(NSA_BF16, 1, 400); }
Test(cuda_fwd, heads_f16_ranges) { heads_matrix(NSA_F16, 1, 500); }
Test(cuda_fwd, heads_f32_ranges) { heads_matrix(NSA_F32, 1, 600); }

/* Every (Dk, Dv) instantiation of the tensor-core kernel, both dtypes. */
Test(cuda_fwd, all_head_dims) {
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
        cfg.seed = 700 + k++;
        fx_t f;
        fx_init(&f, &cfg);
        run_check(ctx, &f, NSA_PATH_VARLEN_V2);
        fx_free(&f);
      }
  nsa_cuda_ctx_destroy(ctx);
}

/* The key-block-centric forward (kernels/cuda/fwd_key.cu) and the
 * query-centric one, each forced by NSA_CUDA_FWD_KEY on its own context, vs
 * the reference: every h (h = 16 and 20 take several head tiles), every
 * built (Dk, Dv), random and correlated selections, and long tile lists
 * (S = 640, h = 1: ~1000 rows per tile, cut into several CTA segments),
 * and row batches forced small by NSA_CUDA_FWD_KEY_BATCH_ROWS.
 * Partials in the input dtype (default, on v2) and f32 (v1 here). The forced
 * key context must report the partials in its workspace (rows * h * Dv * 2
 * bytes at least) beyond the query-centric one's. */
static nsa_cuda_ctx_t *mkctx_env(const char *fwd_key) {
  setenv("NSA_CUDA_FWD_KEY", fwd_key, 1);
  nsa_cuda_ctx_t *ctx = mkctx(0);
  unsetenv("NSA_CUDA_FWD_KEY");
  return ctx;
}

Test(cuda_fwd, key_vs_query_centric) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *kc = mkctx_env("1"), *qc = mkctx_env("0");
  const int64_t hs[] = {1, 2, 3, 4, 5, 8, 16, 20};
  const int64_t dks[] = {64, 128, 192, 256};
  const int64_t dvs[] = {64, 128};
  int k = 0;
  for (int dt = 0; dt < 2; dt++)
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
      nsa_tu_case_cfg_t cfg = base();
      cfg.dtype = dt ? NSA_F16 : NSA_BF16;
      cfg.h = hs[i];
      cfg.Dk = dks[k % 4];
      cfg.Dv = dvs[(k / 4) % 2];
      cfg.S = 40;
      cfg.Skv = 300;
      cfg.block_size = (k % 3) ? 64 : 32;
      cfg.n = 6;
      cfg.sel_flags = (k & 1) ? NSA_TU_SEL_CORRELATED : NSA_TU_SEL_ALL;
      cfg.seed = 1300 + k++;
      fx_t f;
      fx_init(&f, &cfg);
      nsa_run_info_t ik, iq, i1;
      run_check_info(kc, &f, NSA_PATH_VARLEN_V2, &ik);
      setenv("NSA_CUDA_FWD_KEY_F32", "1", 1); /* f32 partials (default: the input dtype) */
      run_check_info(kc, &f, NSA_PATH_VARLEN_V1, &i1);
      unsetenv("NSA_CUDA_FWD_KEY_F32");
      run_check_info(qc, &f, NSA_PATH_VARLEN_V2, &iq);
      /* the key-centric layout starts where the query-centric one ends */
      const size_t part = (size_t)(cfg.B * cfg.S * cfg.G * cfg.h * cfg.Dv * 2);
      cr_expect_geq(ik.workspace_bytes, iq.workspace_bytes + part,
                    "h=%lld: key-centric workspace %zu, query-centric %zu: key-centric kernel not run",
                    (long long)cfg.h, ik.workspace_bytes, iq.workspace_bytes);
      fx_free(&f);
    }
  for (int dt = 0; dt < 2; dt++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = dt ? NSA_F16 : NSA_BF16;
    cfg.B = 1;
    cfg.S = cfg.Skv = 640;
    cfg.G = 2;
    cfg.h = 1;
    cfg.Dk = cfg.Dv = 128;
    cfg.block_size = 64;
    cfg.n = 8;
    cfg.sel_flags = dt ? NSA_TU_SEL_CORRELATED : NSA_TU_SEL_ALL;
    cfg.seed = 1400 + dt;
    fx_t f;
    fx_init(&f, &cfg);
    run_check(kc, &f, NSA_PATH_VARLEN_V2);
    run_check(qc, &f, NSA_PATH_VARLEN_V2);
    /* row batches (normally sized by a 2 GiB partial budget): 7 rows per
     * batch, not a multiple of G, so batches split query positions */
    setenv("NSA_CUDA_FWD_KEY_BATCH_ROWS", dt ? "7" : "500", 1);
    run_check(kc, &f, NSA_PATH_VARLEN_V2);
    cfg.h = 5;
    cfg.S = 37;
    cfg.seed = 1410 + dt;
    fx_free(&f);
    fx_init(&f, &cfg);
    run_check(kc, &f, NSA_PATH_VARLEN_V2);
    unsetenv("NSA_CUDA_FWD_KEY_BATCH_ROWS");
    fx_free(&f);
  }
  nsa_cuda_ctx_destroy(kc);
  nsa_cuda_ctx_destroy(qc);
}

/* A workspace cap that holds the query-centric request but not the
 * key-centric one (inversion + partials): the request must still succeed,
 * on the query-centric kernel (same workspace as a query-centric context),
 * with correct outputs, instead of failing with busy. */
Test(cuda_fwd, key_centric_falls_back_under_cap) {
  NSA_REQUIRE_GPU();
  nsa_tu_case_cfg_t cfg = base();
  cfg.h = 4;
  cfg.Dk = cfg.Dv = 128;
  cfg.S = 64;
  cfg.Skv = 512;
  cfg.block_size = 64;
  cfg.n = 6;
  cfg.seed = 1500;
  fx_t f;
  fx_init(&f, &cfg);
  nsa_cuda_ctx_t *qc = mkctx_env("0");
  nsa_run_info_t iq, ik;
  run_check_info(qc, &f, NSA_PATH_VARLEN_V2, &iq);
  nsa_cuda_ctx_destroy(qc);
  setenv("NSA_CUDA_FWD_KEY", "1", 1);
  nsa_cuda_ctx_t *capped = mkctx(iq.workspace_bytes);
  unsetenv("NSA_CUDA_FWD_KEY");
  run_check_info(capped, &f, NSA_PATH_VARLEN_V2, &ik);
  cr_expect_eq(ik.workspace_bytes, iq.workspace_bytes,
               "capped context used %zu bytes, the query-centric request %zu", ik.workspace_bytes,
               iq.workspace_bytes);
  nsa_cuda_ctx_destroy(capped);
  fx_free(&f);
}

/* Runs v2 on ctx twice, with the shared-tile groups (default) and with
 * NSA_CUDA_FWD_SHARED=0, each checked against the reference; returns how
 * many o / lse elements differ bitwise between the two runs. */
static int64_t shared_on_off_diff(nsa_cuda_ctx_t *ctx, fx_t *f) {
  run_check(ctx, f, NSA_PATH_VARLEN_V2);
  double *so = malloc(sizeof(double) * (size_t)f->no), *sl = malloc(sizeof(double) * (size_t)f->nl);
  cr_assert(so && sl);
  memcpy(so, f->go, sizeof(double) * (size_t)f->no);
  memcpy(sl, f->gl, sizeof(double) * (size_t)f->nl);
  setenv("NSA_CUDA_FWD_SHARED", "0", 1);
  run_check(ctx, f, NSA_PATH_VARLEN_V2);
  unsetenv("NSA_CUDA_FWD_SHARED");
  int64_t diff = 0;
  for (int64_t e = 0; e < f->no; e++) diff += memcmp(&so[e], &f->go[e], sizeof(double)) != 0;
  for (int64_t e = 0; e < f->nl; e++) diff += memcmp(&sl[e], &f->gl[e], sizeof(double)) != 0;
  free(so);
  free(sl);
  return diff;
}

/* Query groups sharing their tiles (fwd_shared.h): selections copied across
 * each query block (mostly: with UNUSED some rows change a slot, so groups
 * of both kinds occur), h in {2, 4, 8, 16}, S not a multiple of the group
 * size, empty rows, block sizes 64 and 32, both dtypes, several (Dk, Dv).
 * Each case runs with the shared groups and with NSA_CUDA_FWD_SHARED=0
 * (every row key-centric): both must match the float64 reference, and they
 * must differ somewhere bitwise (the shared kernel rounds P and O in its own
 * order), which shows the shared kernel wrote rows. */
Test(cuda_fwd, shared_tile_groups) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *kc = mkctx_env("1");
  const int64_t hs[] = {16, 8, 4, 2, 16, 8};
  const int64_t dks[] = {128, 192, 64, 64, 128, 128}; /* the shared kernel's (Dk, Dv) */
  const int64_t dvs[] = {128, 64, 64, 128, 64, 128};
  for (int k = 0; k < 12; k++) {
    const int i = k % 6;
    nsa_tu_case_cfg_t cfg = base();
    nsa_tc_blockwise_cfg(&cfg, k, hs[i], dks[i], dvs[i], 1700 + k);
    fx_t f;
    fx_init(&f, &cfg);
    cr_expect_gt(shared_on_off_diff(kc, &f), 0,
                 "h=%lld case %d: shared and key-centric outputs identical: shared kernel not run", (long long)cfg.h,
                 k);
    fx_free(&f);
  }
  /* Independent random selections: only groups of the first query blocks
   * (all their few earlier blocks selected) qualify, < 1/8 of the rows, so
   * the gate sends every row back to the key-centric path: bitwise the same
   * outputs as with NSA_CUDA_FWD_SHARED=0. */
  for (int k = 0; k < 2; k++) {
    nsa_tu_case_cfg_t cfg = base();
    nsa_tc_random_gate_cfg(&cfg, k, 1720 + k);
    fx_t f;
    fx_init(&f, &cfg);
    cr_expect_eq(shared_on_off_diff(kc, &f), 0, "h=%lld: outputs changed by groups the gate should drop",
                 (long long)cfg.h);
    fx_free(&f);
  }
  nsa_cuda_ctx_destroy(kc);
}

/* Runs `path` on ctx (checked against the reference) with the environment
 * variable `var` set to `val` for that request only; out/outl receive the
 * outputs (f64 copies, f->no / f->nl elements). */
static void run_env(nsa_cuda_ctx_t *ctx, fx_t *f, nsa_path_t path, const char *var, const char *val, double *out,
                    double *outl) {
  if (var) setenv(var, val, 1);
  run_check(ctx, f, path);
  if (var) unsetenv(var);
  memcpy(out, f->go, sizeof(double) * (size_t)f->no);
  memcpy(outl, f->gl, sizeof(double) * (size_t)f->nl);
}

static int issue_fwd_v2(nsa_cuda_ctx_t *ctx, void *arg, nsa_cuda_exec_t *ex, char *msg, size_t msglen) {
  nsa_run_info_t info;
  return nsa_cuda_sel_fwd(ctx, (const nsa_fwd_args_t *)arg, NULL, NSA_PATH_VARLEN_V2, ex, &info, msg, msglen);
}

/* The v2 request with sync = 0 (no summary to wait for: its planner runs
 * beside the row grouping, on the context's side stream) or, with graph,
 * captured in a CUDA graph and replayed; outputs (poisoned first) into
 * out / outl as run_env. */
static void run_async(nsa_cuda_ctx_t *ctx, fx_t *f, int graph, double *out, double *outl) {
  char msg[320];
  nsa_tc_poison(&f->dv, &f->c);
  if (graph) {
    cr_assert_eq(nsa_tc_graph_replay(ctx, issue_fwd_v2, &f->dv.fwd, msg, sizeof msg), 0, "%s", msg);
  } else {
    nsa_cuda_exec_t ex = {.sync = 0};
    cr_assert_eq(nsa_cuda_sel_fwd(ctx, &f->dv.fwd, NULL, NSA_PATH_VARLEN_V2, &ex, NULL, msg, sizeof msg), NSA_OK,
                 "%s", msg);
  }
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  nsa_tc_fetch(&f->dv, &f->c);
  nsa_tu_to_f64(&f->c.o.t, out);
  nsa_tu_to_f64(&f->c.lse.t, outl);
}

static int64_t bit_diff(const double *a, const double *b, int64_t n) {
  int64_t d = 0;
  for (int64_t e = 0; e < n; e++) d += memcmp(&a[e], &b[e], sizeof(double)) != 0;
  return d;
}

/* The row-block cases (nsa_tc_row_block_cfg) at Dk = dk: each run against
 * the float64 reference; the default rows per CTA (11) and `alt_rows`
 * (NSA_CUDA_FWD_ROWS_R) must agree bitwise (a row's tiles are visited in
 * the same order whatever the blocking), so must the row grouping's
 * windows of 8 blocks (default), of 16, of 32 (the wide grouping) and t order, the tiles streamed in
 * ascending and in the step order (NSA_CUDA_FWD_ROWS_ORDER), the producer starting
 * from the grouping's unions (default) or from the rows' lists
 * (NSA_CUDA_FWD_ROWS_EARLY=0), so must the v1 and v2 planners, and so
 * must sync = 0 (the planner beside the grouping, which then reads the
 * selection) run directly and in a CUDA graph,
 * and all must differ bitwise from NSA_CUDA_FWD_ROWS=0 (the key-centric
 * kernel rounds in another order), which shows the row-block kernel ran. */
static void row_block_cases(nsa_cuda_ctx_t *ctx, int64_t dk, const char *alt_rows, uint64_t seed0) {
  for (int k = 0; k < 9; k++) {
    nsa_tu_case_cfg_t cfg = base();
    nsa_tc_row_block_cfg(&cfg, k, NSA_TU_SEL_BLOCKWISE, seed0 + k);
    cfg.Dk = dk;
    fx_t f;
    fx_init(&f, &cfg);
    double *o1 = malloc(sizeof(double) * (size_t)f.no), *l1 = malloc(sizeof(double) * (size_t)f.nl);
    double *o2 = malloc(sizeof(double) * (size_t)f.no), *l2 = malloc(sizeof(double) * (size_t)f.nl);
    double *o3 = malloc(sizeof(double) * (size_t)f.no), *l3 = malloc(sizeof(double) * (size_t)f.nl);
    cr_assert(o1 && l1 && o2 && l2 && o3 && l3);
    run_env(ctx, &f, NSA_PATH_VARLEN_V2, NULL, NULL, o1, l1);
    for (int graph = 0; graph < 2; graph++) {
      run_async(ctx, &f, graph, o2, l2);
      cr_expect_eq(bit_diff(o1, o2, f.no) + bit_diff(l1, l2, f.nl), 0,
                   "Dk %lld case %d: sync = 0%s (planner beside the grouping) and sync = 1 differ", (long long)dk, k,
                   graph ? " in a CUDA graph" : "");
    }
    /* knob, value, what the two runs are: each must equal the default run bitwise */
    const char *knobs[][3] = {
        {"NSA_CUDA_FWD_ROWS_R", alt_rows, "11 and the other rows per CTA"},
        {"NSA_CUDA_FWD_ROWS_GROUP", "0", "rows grouped and in t order"},
        {"NSA_CUDA_FWD_ROWS_EARLY", "0", "streaming from the grouping's unions and from the lists"},
        {"NSA_CUDA_FWD_ROWS_PERSIST", "3", "persistent (3 CTAs) and one CTA per row block"},
        {"NSA_CUDA_FWD_ROWS_GROUP", "16", "rows grouped in windows of 8 and of 16 blocks"},
        {"NSA_CUDA_FWD_ROWS_GROUP", "32", "rows grouped in windows of 8 and of 32 blocks (a CTA per window)"},
        {"NSA_CUDA_FWD_ROWS_ORDER", "1", "tiles streamed in ascending and in the step order"},
        {"NSA_CUDA_FWD_ROWS_ORDER", "0", "tiles streamed in the default and in ascending order"},
    };
    for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++) {
      if (dk != 128 && (strcmp(knobs[i][0], "NSA_CUDA_FWD_ROWS_PERSIST") == 0 ||
                        strcmp(knobs[i][0], "NSA_CUDA_FWD_ROWS_ORDER") == 0))
        continue; /* Dk = 128 only (the persistent kernel) */
      run_env(ctx, &f, NSA_PATH_VARLEN_V2, knobs[i][0], knobs[i][1], o2, l2);
      cr_expect_eq(bit_diff(o1, o2, f.no) + bit_diff(l1, l2, f.nl), 0, "Dk %lld case %d: %s differ (%s=%s)",
                   (long long)dk, k, knobs[i][2], knobs[i][0], knobs[i][1]);
    }
    if (dk == 128) { /* the step order with 3 persistent CTAs (many blocks each: both union sets reused),
                      * then as the wide grouping writes it (windows of 32 blocks) */
      setenv("NSA_CUDA_FWD_ROWS_ORDER", "1", 1);
      run_env(ctx, &f, NSA_PATH_VARLEN_V2, "NSA_CUDA_FWD_ROWS_PERSIST", "3", o2, l2);
      cr_expect_eq(bit_diff(o1, o2, f.no) + bit_diff(l1, l2, f.nl), 0,
                   "Dk 128 case %d: the step order on 3 persistent CTAs differs", k);
      run_env(ctx, &f, NSA_PATH_VARLEN_V2, "NSA_CUDA_FWD_ROWS_GROUP", "32", o2, l2);
      cr_expect_eq(bit_diff(o1, o2, f.no) + bit_diff(l1, l2, f.nl), 0,
                   "Dk 128 case %d: the wide grouping's step order differs", k);
      unsetenv("NSA_CUDA_FWD_ROWS_ORDER");
    }
    run_env(ctx, &f, NSA_PATH_VARLEN_V1, NULL, NULL, o2, l2);
    cr_expect_eq(bit_diff(o1, o2, f.no) + bit_diff(l1, l2, f.nl), 0, "Dk %lld case %d: v1 and v2 planners differ",
                 (long long)dk, k);
    run_env(ctx, &f, NSA_PATH_VARLEN_V2, "NSA_CUDA_FWD_ROWS", "0", o3, l3);
    cr_expect_gt(bit_diff(o1, o3, f.no), 0, "Dk %lld case %d: row-block and key-centric outputs identical: not run",
                 (long long)dk, k);
    free(o1), free(l1), free(o2), free(l2), free(o3), free(l3);
    fx_free(&f);
  }
}

/* Row-block forward (fwd_rows.h: h = 16, Dv = 128, block ids): random
 * and blockwise selections, S not a multiple of either row-block size,
 * Skv not a multiple of the 64-key tile (last tile zero-filled), block
 * sizes 64 and 32 (a block over two tiles), unused slots and empty rows,
 * G = 1 and 2, B = 2, K/V as [B, S, G, D] and [B, G, S, D], both dtypes,
 * v2 and v1 planners (row_block_cases): Dk = 128 with 11 and 15 rows per
 * CTA, Dk = 192 (three K boxes per tile) with 11 rows and 3 ring slots and
 * with 9 rows and 4. Then an invalid selection with sync = 0: every output
 * NaN. */
Test(cuda_fwd, row_block_kernel) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  row_block_cases(ctx, 128, "15", 2100);
  row_block_cases(ctx, 192, "9", 2200);
  /* invalid selection, sync = 0: queued, nothing read, NaN out */
  nsa_tu_case_cfg_t cfg = base();
  cfg.h = 16;
  cfg.Dk = cfg.Dv = 128;
  cfg.seed = 2120;
  fx_t f;
  fx_init(&f, &cfg);
  f.c.sel_raw[3] = 1 << 30;
  nsa_tc_sync_sel(&f.dv, &f.c);
  nsa_tc_poison(&f.dv, &f.c);
  nsa_run_info_t info;
  char msg[256];
  nsa_cuda_exec_t ex = {.sync = 0};
  cr_expect_eq(nsa_cuda_sel_fwd(ctx, &f.dv.fwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg), NSA_OK,
               "%s", msg);
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  nsa_tc_fetch(&f.dv, &f.c);
  nsa_tu_to_f64(&f.c.o.t, f.go);
  nsa_tu_to_f64(&f.c.lse.t, f.gl);
  int64_t nan = 0;
  for (int64_t i = 0; i < f.no; i++) nan += isnan(f.go[i]) != 0;
  for (int64_t i = 0; i < f.nl; i++) nan += isnan(f.gl[i]) != 0;
  cr_expect_eq(nan, f.no + f.nl, "async invalid: %lld of %lld outputs NaN", (long long)nan,
               (long long)(f.no + f.nl));
  fx_free(&f);
  nsa_cuda_ctx_destroy(ctx);
}

/* Layouts: K/V stored [B,G,Skv,D] (strided but aligned: tensor cores),
 * gapped + padded everything (generic kernel), head dims the tensor-core
 * kernel does not build (generic kernel). */
Test(cuda_fwd, layouts_and_fallbacks) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int dt = 0; dt < 3; dt++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = (nsa_dtype_t)dt;
    cfg.kv_bgsd = 1;
    cfg.h = 3;
    cfg.seed = 800 + dt;
    check_paths(ctx, &cfg);
    cfg.kv_bgsd = 0;
    cfg.gapped = 1;
    cfg.seed = 810 + dt;
    check_paths(ctx, &cfg);
    cfg.gapped = 0;
    cfg.Dk = 40;
    cfg.Dv = 24;
    cfg.seed = 820 + dt;
    check_paths(ctx, &cfg);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* Decode (S = 1), training alignment (S = Skv), B > 1, non-power-of-two
 * blocks with a partial last block, long rows over many key tiles,
 * correlated selections (query packing shares tiles), explicit scale. */
Test(cuda_fwd, shapes_and_blocks) {
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
    cfg.seed = 900 + dt;
    check_paths(ctx, &cfg);
    cfg.S = cfg.Skv = 90;
    cfg.B = 2;
    cfg.h = 1;
    cfg.block_size = 20;
    cfg.seed = 910 + dt;
    check_paths(ctx, &cfg);
    cfg.S = 17;
    cfg.Skv = 700;
    cfg.block_size = 48;
    cfg.n = 12;
    cfg.h = 2;
    cfg.sel_flags = NSA_TU_SEL_CORRELATED | NSA_TU_SEL_DUP;
    cfg.scale = 0.37f;
    cfg.seed = 920 + dt;
    check_paths(ctx, &cfg);
    cfg.block_size = 100;
    cfg.h = 16;
    cfg.sel_flags = NSA_TU_SEL_ALL;
    cfg.scale = 0;
    cfg.seed = 930 + dt;
    check_paths(ctx, &cfg);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* Bad selection data: each path reports invalid_selection with the count,
 * writes nothing (sync), and never reads out of bounds (run this suite under
 * compute-sanitizer memcheck). With sync=0 on v2 the call is only queued: the
 * kernels then write NaN instead of reading anything. */
Test(cuda_fwd, invalid_selection) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  for (int ranges = 0; ranges < 2; ranges++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.ranges = ranges;
    cfg.seed = 1000 + ranges;
    fx_t f;
    fx_init(&f, &cfg);
    /* huge ids / spans: an unchecked kernel would read far outside K/V */
    int32_t *s = f.c.sel_raw;
    if (ranges) {
      s[0] = 5, s[1] = 2;                    /* start > end */
      s[10] = -70000, s[11] = 1000000;       /* negative start */
      s[22] = 0x7ffffff0, s[23] = 0x7fffffff; /* valid, past Skv: clipped */
    } else {
      s[0] = 1 << 30;  /* id far past the end */
      s[7] = -5;       /* below -1 */
      s[13] = (int32_t)((cfg.Skv + cfg.block_size - 1) / cfg.block_size); /* one past */
    }
    nsa_tc_sync_sel(&f.dv, &f.c);
    const int64_t want = nsa_ref_count_invalid(&f.c.ref);
    cr_assert_gt(want, 0);
    for (size_t p = 0; p < 3; p++) {
      nsa_tc_poison(&f.dv, &f.c);
      nsa_run_info_t info;
      char msg[256];
      nsa_cuda_exec_t ex = {.sync = 1};
      int rc = nsa_cuda_sel_fwd(ctx, &f.dv.fwd, NULL, k_paths[p], &ex, &info, msg, sizeof msg);
      cr_expect_eq(rc, NSA_ERR_INVALID_SELECTION, "%s: rc %d (%s)", nsa_path_name(k_paths[p]), rc, msg);
      cr_expect_eq(info.invalid, want, "%s: invalid %lld want %lld", nsa_path_name(k_paths[p]),
                   (long long)info.invalid, (long long)want);
      nsa_tc_fetch(&f.dv, &f.c);
      cr_expect(nsa_tu_is_poisoned(&f.c.o), "%s wrote o on invalid selection", nsa_path_name(k_paths[p]));
    }
    /* sync = 0, v2: queued; no reads; NaN out */
    nsa_tc_poison(&f.dv, &f.c);
    cudaMemset(f.dv.o, 0, f.c.o.bytes);
    nsa_run_info_t info;
    char msg[256];
    nsa_cuda_exec_t ex = {.sync = 0};
    int rc = nsa_cuda_sel_fwd(ctx, &f.dv.fwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
    cr_expect_eq(rc, NSA_OK, "async v2: rc %d (%s)", rc, msg);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    nsa_tc_fetch(&f.dv, &f.c);
    nsa_tu_to_f64(&f.c.o.t, f.go);
    int64_t nan = 0;
    for (int64_t i = 0; i < f.no; i++) nan += isnan(f.go[i]) != 0;
    cr_expect_eq(nan, f.no, "async invalid: %lld of %lld outputs NaN", (long long)nan, (long long)f.no);
    /* the context stays usable: a valid request right after */
    fx_free(&f);
    fx_init(&f, &cfg);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2);
    fx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}

/* sync = 0 with wait/done events; CUDA graph capture of the v2 path;
 * determinism (bitwise equal reruns). */
Test(cuda_fwd, async_graph_determinism) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  nsa_tu_case_cfg_t cfg = base();
  cfg.h = 3;
  cfg.seed = 1100;
  fx_t f;
  fx_init(&f, &cfg);
  run_check(ctx, &f, NSA_PATH_VARLEN_V2); /* warm: arena at its high-water mark */
  void *first = malloc(f.c.o.bytes);
  memcpy(first, f.c.o.mem, f.c.o.bytes);

  cudaEvent_t wait_ev, done_ev;
  cudaStream_t user;
  cr_assert_eq(cudaStreamCreateWithFlags(&user, cudaStreamNonBlocking), cudaSuccess);
  cudaEventCreateWithFlags(&wait_ev, cudaEventDisableTiming);
  cudaEventCreateWithFlags(&done_ev, cudaEventDisableTiming);
  nsa_tc_poison(&f.dv, &f.c);
  cudaEventRecord(wait_ev, user);
  nsa_cuda_exec_t ex = {.wait_event = wait_ev, .done_event = done_ev, .sync = 0};
  nsa_run_info_t info;
  char msg[256];
  int rc = nsa_cuda_sel_fwd(ctx, &f.dv.fwd, NULL, NSA_PATH_AUTO, &ex, &info, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "async: %s", msg);
  cr_expect_eq(info.path, NSA_PATH_VARLEN_V2);
  cudaStreamWaitEvent(user, done_ev, 0);
  cr_assert_eq(cudaStreamSynchronize(user), cudaSuccess);
  nsa_tc_fetch(&f.dv, &f.c);
  cr_expect_eq(memcmp(first, f.c.o.mem, f.c.o.bytes), 0, "async result differs from sync result");

  /* graph capture of the whole v2 request (planner + kernels) */
  nsa_tc_poison(&f.dv, &f.c);
  char gmsg[320];
  cr_assert_eq(nsa_tc_graph_replay(ctx, issue_fwd_v2, &f.dv.fwd, gmsg, sizeof gmsg), 0, "%s", gmsg);
  nsa_tc_fetch(&f.dv, &f.c);
  cr_expect_eq(memcmp(first, f.c.o.mem, f.c.o.bytes), 0, "graph replay differs from direct run");

  cudaEventDestroy(wait_ev);
  cudaEventDestroy(done_ev);
  cudaStreamDestroy(user);
  free(first);
  fx_free(&f);
  nsa_cuda_ctx_destroy(ctx);
}

/* Flags: AUTO follows them; MIN_L bypasses v2 for short rows. */
Test(cuda_fwd, flags_choose_path) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  nsa_tu_case_cfg_t cfg = base();
  cfg.seed = 1200;
  fx_t f;
  fx_init(&f, &cfg);
  struct {
    nsa_path_flags_t fl;
    nsa_path_t want;
  } cases[] = {
      {{1, 1, 0}, NSA_PATH_VARLEN_V2},
      {{1, 0, 0}, NSA_PATH_VARLEN_V1},
      {{0, 1, 0}, NSA_PATH_PACKED},
      {{1, 1, 1 << 20}, NSA_PATH_PACKED},
      {{1, 1, 1}, NSA_PATH_VARLEN_V2},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    for (int sync = 0; sync < 2; sync++) {
      nsa_tc_poison(&f.dv, &f.c);
      nsa_cuda_exec_t ex = {.sync = sync};
      nsa_run_info_t info;
      char msg[256];
      int rc = nsa_cuda_sel_fwd(ctx, &f.dv.fwd, &cases[i].fl, NSA_PATH_AUTO, &ex, &info, msg, sizeof msg);
      cr_assert_eq(rc, NSA_OK, "%s", msg);
      cr_expect_eq(info.path, cases[i].want, "case %zu sync %d: path %s", i, sync, nsa_path_name(info.path));
      cudaDeviceSynchronize();
      nsa_tc_fetch(&f.dv, &f.c);
      nsa_tu_to_f64(&f.c.o.t, f.go);
      double eo = nsa_tu_rel_err(f.go, f.ro, f.no);
      cr_expect(eo <= tol_o(cfg.dtype), "case %zu sync %d: o rel err %.3g", i, sync, eo);
    }
  fx_free(&f);
  nsa_cuda_ctx_destroy(ctx);
}

/* Limits: workspace cap → busy; head dims over the limit → unsupported,
 * naming it; a bad request shape → bad_request. */
Test(cuda_fwd, limits) {
  NSA_REQUIRE_GPU();
  nsa_tu_case_cfg_t cfg = base();
  cfg.seed = 1300;
  fx_t f;
  fx_init(&f, &cfg);
  char msg[256];
  nsa_cuda_exec_t ex = {.sync = 1};
  nsa_run_info_t info;
  nsa_cuda_ctx_t *small = mkctx(1024);
  int rc = nsa_cuda_sel_fwd(small, &f.dv.fwd, NULL, NSA_PATH_VARLEN_V2, &ex, &info, msg, sizeof msg);
  cr_expect_eq(rc, NSA_ERR_BUSY, "rc %d (%s)", rc, msg);
  nsa_cuda_ctx_destroy(small);
  fx_free(&f);

  nsa_cuda_ctx_t *ctx = mkctx(0);
  cfg.Dk = 320;
  cfg.Dv = 64;
  cfg.S = 4;
  fx_init(&f, &cfg);
  rc = nsa_cuda_sel_fwd(ctx, &f.dv.fwd, NULL, NSA_PATH_AUTO, &ex, &info, msg, sizeof msg);
  cr_expect_eq(rc, NSA_ERR_UNSUPPORTED, "rc %d (%s)", rc, msg);
  cr_expect(strstr(msg, "256") != NULL, "message names the limit: %s", msg);
  fx_free(&f);
  cfg.Dk = 64;
  fx_init(&f, &cfg);
  nsa_fwd_args_t bad = f.dv.fwd;
  bad.q.shape[2] = 3; /* H not a multiple of G */
  rc = nsa_cuda_sel_fwd(ctx, &bad, NULL, NSA_PATH_AUTO, &ex, &info, msg, sizeof msg);
  cr_expect_eq(rc, NSA_ERR_BAD_REQUEST, "rc %d (%s)", rc, msg);
  fx_free(&f);
  nsa_cuda_ctx_destroy(ctx);
}

/* Writes span i of row r (ranges, contiguous sel_raw); an empty span is the
 * unused marker [0, 0]. */
static void set_span(int32_t *sel, int64_t n, int64_t r, int64_t i, int32_t start, int32_t end) {
  if (end <= start) start = end = 0;
  sel[(r * n + i) * 2] = start;
  sel[(r * n + i) * 2 + 1] = end;
}

/* Smallest packed bucket 16 << b >= len (the DESIGN's bucket scheme). */
static int64_t packed_lpad(int32_t len) {
  int64_t lp = 16;
  while (lp < len) lp *= 2;
  return lp;
}

/* Packed path's length buckets: rows of lengths 0..600 as 2-3 spans (one
 * gap, one duplicate), so they fill the 16, 32, 64, ..., 1024 buckets.
 * info.workspace_bytes must equal sum_b rows_b * Lpad_b * (Dk + Dv) * es with
 * the buckets computed here from the CPU plan's row lengths; results match
 * the reference (contiguous K/V: 16-byte gather; gapped: element gather);
 * flag-driven packed with sync = 0 too; reruns are bitwise equal; a cap of
 * exactly the padded K/V bytes (the arena needs the plan as well) is busy. */
Test(cuda_fwd, packed_buckets) {
  NSA_REQUIRE_GPU();
  nsa_cuda_ctx_t *ctx = mkctx(0);
  static const int32_t lens[] = {0,   1,   7,   16,  17,  31,  32,  33,  63,  64,  65,  100,
                                 128, 129, 200, 256, 257, 380, 512, 513, 600, 3,   45,  300};
  const int64_t nl = (int64_t)(sizeof lens / sizeof lens[0]);
  for (int dt = 0; dt < 3; dt++) {
    nsa_tu_case_cfg_t cfg = base();
    cfg.dtype = (nsa_dtype_t)dt;
    cfg.ranges = 1;
    cfg.n = 3;
    cfg.S = 24;
    cfg.Skv = 700; /* p(t) = t + 676: every row may hold up to 677 keys */
    cfg.h = dt == 1 ? 3 : 2;
    cfg.gapped = dt == 1;
    cfg.seed = 1400 + dt;
    fx_t f;
    fx_init(&f, &cfg);
    const int64_t rows = cfg.B * cfg.S * cfg.G, n = cfg.n;
    for (int64_t r = 0; r < rows; r++) {
      const int32_t L = lens[r % nl], h2 = L / 2;
      const int32_t s0 = (int32_t)((r * 37) % (672 - L)); /* s0 + L + 5 <= 677 */
      set_span(f.c.sel_raw, n, r, 0, s0, s0 + h2);
      set_span(f.c.sel_raw, n, r, 1, s0 + h2 + 5, s0 + L + 5); /* gap of 5: 2 spans */
      set_span(f.c.sel_raw, n, r, 2, s0, s0 + L / 4);          /* inside span 0 */
    }
    nsa_tc_sync_sel(&f.dv, &f.c);
    nsa_ref_fwd(&f.c.ref, f.ro, f.rl);

    /* the bucket formula from the CPU plan */
    nsa_dims_t d;
    char msg[256];
    cr_assert_eq(nsa_fwd_check(&f.c.fwd, &d, msg, sizeof msg), NSA_OK, "%s", msg);
    nsa_plan_layout_t lay;
    void *hbuf = malloc(nsa_plan_layout(d.rows, d.n, &lay));
    nsa_plan_t hp;
    nsa_plan_bind(&hp, hbuf, d.rows, d.n);
    cr_assert_eq(nsa_cpu_plan_v2(&f.c.fwd.sel, &d, &hp), NSA_OK);
    int64_t slots = 0, per_lp[16] = {0};
    for (int64_t r = 0; r < rows; r++) {
      cr_assert_eq(hp.row_len[r], lens[r % nl], "row %lld: len %d want %d", (long long)r, hp.row_len[r],
                   lens[r % nl]);
      if (hp.row_len[r] == 0) continue;
      const int64_t lp = packed_lpad(hp.row_len[r]);
      slots += lp;
      for (int b = 0; b < 16; b++)
        if ((16LL << b) == lp) per_lp[b]++;
    }
    int nbuckets = 0;
    for (int b = 0; b < 16; b++) nbuckets += per_lp[b] > 0;
    cr_assert_eq(nbuckets, 7, "buckets 16..1024 all used (%d)", nbuckets);
    free(hbuf);
    const size_t want = (size_t)slots * (size_t)(cfg.Dk + cfg.Dv) * nsa_dtype_size(cfg.dtype);

    nsa_run_info_t info;
    run_check_info(ctx, &f, NSA_PATH_PACKED, &info);
    cr_expect_eq(info.workspace_bytes, want, "%s: workspace %zu want %zu (slots %lld)",
                 nsa_dtype_name(cfg.dtype), info.workspace_bytes, want, (long long)slots);
    cr_expect_eq(info.max_len, 600);
    run_check(ctx, &f, NSA_PATH_VARLEN_V2); /* same case, the varlen path */

    /* two packed runs: bitwise equal */
    double *o1 = malloc(sizeof(double) * (size_t)f.no);
    nsa_tc_poison(&f.dv, &f.c);
    nsa_cuda_exec_t ex1 = {.sync = 1};
    int rc;
    rc = nsa_cuda_sel_fwd(ctx, &f.dv.fwd, NULL, NSA_PATH_PACKED, &ex1, &info, msg, sizeof msg);
    cr_assert_eq(rc, NSA_OK, "%s", msg);
    nsa_tc_fetch(&f.dv, &f.c);
    nsa_tu_to_f64(&f.c.o.t, o1);
    nsa_tc_poison(&f.dv, &f.c);
    rc = nsa_cuda_sel_fwd(ctx, &f.dv.fwd, NULL, NSA_PATH_PACKED, &ex1, &info, msg, sizeof msg);
    cr_assert_eq(rc, NSA_OK, "%s", msg);
    nsa_tc_fetch(&f.dv, &f.c);
    nsa_tu_to_f64(&f.c.o.t, f.go);
    cr_expect(memcmp(o1, f.go, sizeof(double) * (size_t)f.no) == 0, "packed rerun not bitwise equal");
    free(o1);

    /* flags pick packed, sync = 0 (the summary copy still sizes the buckets) */
    nsa_path_flags_t fl = {0, 1, 0};
    nsa_tc_poison(&f.dv, &f.c);
    nsa_cuda_exec_t ex0 = {.sync = 0};
    cr_assert_eq(nsa_cuda_sel_fwd(ctx, &f.dv.fwd, &fl, NSA_PATH_AUTO, &ex0, &info, msg, sizeof msg), NSA_OK,
                 "%s", msg);
    cr_expect_eq(info.path, NSA_PATH_PACKED);
    cr_expect_eq(info.workspace_bytes, want);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    nsa_tc_fetch(&f.dv, &f.c);
    nsa_tu_to_f64(&f.c.o.t, f.go);
    const double eo = nsa_tu_rel_err(f.go, f.ro, f.no);
    cr_expect(eo <= tol_o(cfg.dtype), "async packed: o rel err %.3g", eo);

    /* cap = the padded K/V alone: the arena needs more (plan, scratch) → busy */
    nsa_cuda_ctx_t *small = mkctx(want);
    rc = nsa_cuda_sel_fwd(small, &f.dv.fwd, NULL, NSA_PATH_PACKED, &ex1, &info, msg, sizeof msg);
    cr_expect_eq(rc, NSA_ERR_BUSY, "cap %zu: rc %d (%s)", want, rc, msg);
    nsa_cuda_ctx_destroy(small);
    fx_free(&f);
  }
  nsa_cuda_ctx_destroy(ctx);
}
