/*
 * test_fwd.c — every CPU path's forward vs the float64 reference.
 *
 * Inputs are fresh random values exactly representable in the dtype, so the
 * reference sees what the kernel reads; outputs are NaN-poisoned before each
 * run. f32 must agree to <= 1e-5 relative (max-norm); bf16/f16 within the
 * rounding of their output.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>

#include "nsa/sel_attn.h"
#include "sel_case.h"

static const nsa_path_t k_paths[] = {NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, NSA_PATH_PACKED};

static double tol_for(nsa_dtype_t dt) {
  return dt == NSA_F32 ? 1e-5 : dt == NSA_F16 ? 1e-3 : 5e-3;
}

static nsa_tu_case_cfg_t base_cfg(void) {
  return (nsa_tu_case_cfg_t){.B = 2, .S = 20, .Skv = 45, .G = 2, .h = 2, .Dk = 16, .Dv = 24,
                             .n = 4, .dtype = NSA_F32, .ranges = 0, .block_size = 16,
                             .sel_flags = NSA_TU_SEL_ALL, .seed = 1};
}

/* Runs all three paths on one case and compares o and lse with the reference. */
static void check_all_paths(const nsa_tu_case_cfg_t *cfg) {
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, cfg), 0, "case init");
  const int64_t no = cfg->B * cfg->S * c.H * cfg->Dv, nl = cfg->B * cfg->S * c.H;
  double *ro = malloc(sizeof(double) * (size_t)(no + 1)), *rl = malloc(sizeof(double) * (size_t)(nl + 1));
  double *go = malloc(sizeof(double) * (size_t)(no + 1)), *gl = malloc(sizeof(double) * (size_t)(nl + 1));
  nsa_ref_fwd(&c.ref, ro, rl);
  for (size_t pi = 0; pi < 3; pi++) {
    nsa_tu_case_poison_outputs(&c);
    nsa_run_info_t info;
    char msg[256];
    int rc = nsa_cpu_sel_fwd(&c.fwd, NULL, k_paths[pi], &info, msg, sizeof msg);
    cr_assert_eq(rc, NSA_OK, "%s: rc %d: %s", nsa_path_name(k_paths[pi]), rc, msg);
    cr_assert_eq(info.path, k_paths[pi]);
    cr_assert_eq(info.rows, cfg->B * cfg->S * cfg->G);
    nsa_tu_to_f64(&c.o.t, go);
    nsa_tu_to_f64(&c.lse.t, gl);
    double eo = nsa_tu_rel_err(go, ro, no), el = nsa_tu_rel_err(gl, rl, nl);
    cr_log_info("%s: o %.3g lse %.3g (h=%lld %s)", nsa_path_name(k_paths[pi]), eo, el,
                (long long)cfg->h, nsa_dtype_name(cfg->dtype));
    cr_expect(eo <= tol_for(cfg->dtype),
              "%s o rel err %.3g (h=%lld dtype=%s bs=%d ranges=%d seed=%llu)",
              nsa_path_name(k_paths[pi]), eo, (long long)cfg->h, nsa_dtype_name(cfg->dtype),
              cfg->block_size, cfg->ranges, (unsigned long long)cfg->seed);
    cr_expect(el <= 1e-5, "%s lse rel err %.3g (h=%lld dtype=%s)", nsa_path_name(k_paths[pi]), el,
              (long long)cfg->h, nsa_dtype_name(cfg->dtype));
  }
  free(ro);
  free(rl);
  free(go);
  free(gl);
  nsa_tu_case_teardown(&c);
}

Test(fwd, heads_sweep) {
  const int64_t hs[] = {1, 2, 3, 4, 8, 16};
  for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
    nsa_tu_case_cfg_t cfg = base_cfg();
    cfg.h = hs[i];
    cfg.seed = 100 + i;
    check_all_paths(&cfg);
  }
}

Test(fwd, heads_sweep_ranges) {
  const int64_t hs[] = {1, 2, 3, 4, 8, 16};
  for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
    nsa_tu_case_cfg_t cfg = base_cfg();
    cfg.h = hs[i];
    cfg.ranges = 1;
    cfg.n = 6;
    cfg.seed = 200 + i;
    check_all_paths(&cfg);
  }
}

Test(fwd, block_sizes) {
  const int32_t bss[] = {16, 32, 64, 48, 20};
  for (size_t i = 0; i < sizeof bss / sizeof bss[0]; i++) {
    nsa_tu_case_cfg_t cfg = base_cfg();
    cfg.block_size = bss[i];
    cfg.S = 24;
    cfg.Skv = 150; /* not a multiple of any block size: partial last block */
    cfg.h = 3;
    cfg.n = 5;
    cfg.seed = 300 + i;
    check_all_paths(&cfg);
  }
}

Test(fwd, decode_and_training_alignment) {
  nsa_tu_case_cfg_t cfg = base_cfg();
  cfg.S = 1; /* decode: one query at the end of the KV cache */
  cfg.Skv = 200;
  cfg.B = 3;
  cfg.h = 4;
  cfg.n = 6;
  cfg.seed = 401;
  check_all_paths(&cfg);
  cfg.S = 3;
  cfg.seed = 402;
  check_all_paths(&cfg);
  cfg.S = cfg.Skv = 70; /* training: S == Skv */
  cfg.seed = 403;
  check_all_paths(&cfg);
}

Test(fwd, long_rows_many_tiles) {
  /* rows longer than the key tile and the dense buckets (up to 256 keys) */
  nsa_tu_case_cfg_t cfg = base_cfg();
  cfg.S = 8;
  cfg.Skv = 300;
  cfg.block_size = 32;
  cfg.n = 10;
  cfg.h = 2;
  cfg.sel_flags = NSA_TU_SEL_CORRELATED | NSA_TU_SEL_DUP;
  cfg.seed = 450;
  check_all_paths(&cfg);
}

Test(fwd, non_contiguous_strides) {
  nsa_tu_case_cfg_t cfg = base_cfg();
  cfg.kv_bgsd = 1; /* K/V stored [B, G, Skv, D] as in the seed */
  cfg.h = 3;
  cfg.seed = 501;
  check_all_paths(&cfg);
  cfg.gapped = 1; /* and every tensor with gaps and padding */
  cfg.seed = 502;
  check_all_paths(&cfg);
  cfg.ranges = 1;
  cfg.seed = 503;
  check_all_paths(&cfg);
}

Test(fwd, bf16_f16) {
  const nsa_dtype_t dts[] = {NSA_BF16, NSA_F16};
  for (size_t i = 0; i < 2; i++) {
    nsa_tu_case_cfg_t cfg = base_cfg();
    cfg.dtype = dts[i];
    cfg.h = 4;
    cfg.seed = 600 + i;
    check_all_paths(&cfg);
    cfg.kv_bgsd = 1;
    cfg.ranges = 1;
    cfg.h = 3;
    cfg.seed = 610 + i;
    check_all_paths(&cfg);
  }
}

Test(fwd, custom_scale) {
  nsa_tu_case_cfg_t cfg = base_cfg();
  cfg.scale = 0.37f;
  cfg.seed = 701;
  check_all_paths(&cfg);
}

Test(fwd, all_empty_rows) {
  nsa_tu_case_cfg_t cfg = base_cfg();
  cfg.seed = 801;
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
  for (int64_t i = 0; i < c.nsel; i++) c.sel_raw[i] = -1;
  nsa_tu_case_sync_sel(&c);
  const int64_t no = cfg.B * cfg.S * c.H * cfg.Dv, nl = cfg.B * cfg.S * c.H;
  double *go = malloc(sizeof(double) * (size_t)no), *gl = malloc(sizeof(double) * (size_t)nl);
  for (size_t pi = 0; pi < 3; pi++) {
    nsa_tu_case_poison_outputs(&c);
    nsa_run_info_t info;
    char msg[256];
    cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, NULL, k_paths[pi], &info, msg, sizeof msg), NSA_OK, "%s",
                 msg);
    cr_assert_eq(info.max_len, 0);
    cr_assert_eq(info.len_hist[0], cfg.B * cfg.S * cfg.G);
    nsa_tu_to_f64(&c.o.t, go);
    nsa_tu_to_f64(&c.lse.t, gl);
    for (int64_t i = 0; i < no; i++) cr_assert(go[i] == 0.0, "o[%lld] = %g", (long long)i, go[i]);
    for (int64_t i = 0; i < nl; i++) cr_assert(isinf(gl[i]) && gl[i] < 0, "lse[%lld]", (long long)i);
  }
  free(go);
  free(gl);
  nsa_tu_case_teardown(&c);
}

Test(fwd, zero_slots_and_no_lse) {
  /* n = 0: every row empty; and a request without lse */
  nsa_tu_case_cfg_t cfg = base_cfg();
  cfg.n = 0;
  cfg.seed = 901;
  check_all_paths(&cfg);
  cfg.n = 4;
  cfg.seed = 902;
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
  c.fwd.lse.data = NULL;
  const int64_t no = cfg.B * cfg.S * c.H * cfg.Dv;
  double *ro = malloc(sizeof(double) * (size_t)no), *go = malloc(sizeof(double) * (size_t)no);
  nsa_ref_fwd(&c.ref, ro, NULL);
  for (size_t pi = 0; pi < 3; pi++) {
    nsa_tu_case_poison_outputs(&c);
    char msg[256];
    cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, NULL, k_paths[pi], NULL, msg, sizeof msg), NSA_OK, "%s", msg);
    nsa_tu_to_f64(&c.o.t, go);
    cr_expect(nsa_tu_rel_err(go, ro, no) <= 1e-5);
    cr_expect(nsa_tu_is_poisoned(&c.lse), "lse written although not requested");
  }
  free(ro);
  free(go);
  nsa_tu_case_teardown(&c);
}

Test(fwd, randomized) {
  /* random shapes/formats/layouts: 24 cases */
  nsa_tu_rng_t r;
  nsa_tu_rng_seed(&r, 4242);
  for (int i = 0; i < 24; i++) {
    nsa_tu_case_cfg_t cfg = base_cfg();
    cfg.B = nsa_tu_rng_int(&r, 1, 2);
    cfg.Skv = nsa_tu_rng_int(&r, 1, 90);
    cfg.S = nsa_tu_rng_int(&r, 1, cfg.Skv < 12 ? cfg.Skv : 12);
    cfg.G = nsa_tu_rng_int(&r, 1, 3);
    cfg.h = nsa_tu_rng_int(&r, 1, 5);
    cfg.Dk = nsa_tu_rng_int(&r, 1, 20);
    cfg.Dv = nsa_tu_rng_int(&r, 1, 20);
    cfg.n = nsa_tu_rng_int(&r, 1, 8);
    cfg.block_size = (int32_t)nsa_tu_rng_int(&r, 1, 40);
    cfg.ranges = (int)nsa_tu_rng_int(&r, 0, 1);
    cfg.kv_bgsd = (int)nsa_tu_rng_int(&r, 0, 1);
    cfg.gapped = (int)nsa_tu_rng_int(&r, 0, 1);
    cfg.sel_flags = (unsigned)nsa_tu_rng_int(&r, 0, NSA_TU_SEL_ALL);
    cfg.seed = 1000 + (uint64_t)i;
    check_all_paths(&cfg);
  }
}
