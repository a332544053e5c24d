/*
 * test_cuda_plan.c — the v2 device planner builds the CPU planner's plan,
 * byte for byte (spans, nspans, row_len, row_off), with the same summary
 * (total, max_len, invalid count, length histogram), on every selection
 * shape the generators make, including invalid entries.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_case.h"

static void check_plan(const nsa_tu_case_cfg_t *cfg, int inject_invalid) {
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, cfg), 0, "case init");
  int64_t want_invalid = 0;
  if (inject_invalid) {
    nsa_tu_rng_t r;
    nsa_tu_rng_seed(&r, cfg->seed ^ 0xabcdef);
    const int64_t nblk = (cfg->Skv + cfg->block_size - 1) / cfg->block_size;
    for (int k = 0; k < 7 && c.nsel > 2; k++) {
      int64_t i = nsa_tu_rng_int(&r, 0, c.nsel / (cfg->ranges ? 2 : 1) - 1);
      if (cfg->ranges) {
        int32_t *p = c.sel_raw + 2 * i;
        if (k & 1) { p[0] = 9; p[1] = 3; } /* start > end */
        else { p[0] = -4; p[1] = 2; }      /* negative start */
      } else {
        c.sel_raw[i] = (k & 1) ? (int32_t)nblk : -2 - k; /* past the end / below -1 */
      }
    }
    nsa_tu_case_sync_sel(&c);
    want_invalid = nsa_ref_count_invalid(&c.ref);
    cr_assert_gt(want_invalid, 0);
  }
  nsa_dims_t d;
  char msg[256];
  cr_assert_eq(nsa_fwd_check(&c.fwd, &d, msg, sizeof msg), NSA_OK, "%s", msg);

  /* CPU plan */
  nsa_plan_layout_t lay;
  size_t bytes = nsa_plan_layout(d.rows, d.n, &lay);
  void *hbuf = malloc(bytes), *gbuf = malloc(bytes);
  memset(hbuf, 0x5a, bytes);
  nsa_plan_t hp, gp;
  nsa_plan_bind(&hp, hbuf, d.rows, d.n);
  cr_assert_eq(nsa_cpu_plan_v2(&c.fwd.sel, &d, &hp), NSA_OK);

  /* GPU plan into a poisoned device buffer */
  nsa_tc_dev_t dv;
  cr_assert_eq(nsa_tc_dev_init(&dv, &c), 0);
  void *dbuf = NULL;
  cr_assert_eq(cudaMalloc(&dbuf, bytes), cudaSuccess);
  cudaMemset(dbuf, 0xa5, bytes);
  nsa_cuda_ctx_t *ctx;
  cr_assert_eq(nsa_cuda_ctx_create(0, 0, &ctx, msg, sizeof msg), NSA_OK, "%s", msg);
  nsa_plan_t dp;
  nsa_plan_bind(&dp, dbuf, d.rows, d.n);
  int rc = nsa_cuda_plan_v2(ctx, &dv.fwd.sel, &d, &dp, 1, msg, sizeof msg);
  cr_assert_eq(rc, NSA_OK, "plan_v2: %d %s", rc, msg);
  cr_assert_eq(cudaMemcpy(gbuf, dbuf, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  nsa_plan_bind(&gp, gbuf, d.rows, d.n);

  /* the plan arrays (padding between them is not part of the plan) */
  cr_expect_eq(memcmp(hp.spans, gp.spans, (size_t)(d.rows * d.n * 2 * 4)), 0, "spans differ");
  cr_expect_eq(memcmp(hp.nspans, gp.nspans, (size_t)d.rows * 4), 0, "nspans differ");
  cr_expect_eq(memcmp(hp.row_len, gp.row_len, (size_t)d.rows * 4), 0, "row_len differ");
  cr_expect_eq(memcmp(hp.row_off, gp.row_off, (size_t)(d.rows + 1) * 8), 0, "row_off differ");
  cr_expect_eq(dp.total_len, hp.total_len, "total %lld vs %lld", (long long)dp.total_len,
               (long long)hp.total_len);
  cr_expect_eq(dp.max_len, hp.max_len, "max_len %d vs %d", dp.max_len, hp.max_len);
  cr_expect_eq(dp.invalid, hp.invalid, "invalid %lld vs %lld", (long long)dp.invalid,
               (long long)hp.invalid);
  cr_expect_eq(dp.invalid, want_invalid, "invalid vs reference count");
  cr_expect_eq(memcmp(dp.len_hist, hp.len_hist, sizeof hp.len_hist), 0, "histogram differs");

  nsa_cuda_ctx_destroy(ctx);
  cudaFree(dbuf);
  nsa_tc_dev_free(&dv);
  free(hbuf);
  free(gbuf);
  nsa_tu_case_teardown(&c);
}

static nsa_tu_case_cfg_t cfg0(void) {
  return (nsa_tu_case_cfg_t){.B = 2, .S = 37, .Skv = 150, .G = 3, .h = 1, .Dk = 8, .Dv = 8,
                             .n = 7, .dtype = NSA_F32, .block_size = 16,
                             .sel_flags = NSA_TU_SEL_ALL, .seed = 11};
}

Test(cuda_plan, blocks_equal_cpu) {
  NSA_REQUIRE_GPU();
  const int32_t bss[] = {16, 48, 20, 64, 1, 100};
  for (size_t i = 0; i < sizeof bss / sizeof bss[0]; i++) {
    nsa_tu_case_cfg_t cfg = cfg0();
    cfg.block_size = bss[i];
    cfg.seed = 20 + i;
    check_plan(&cfg, 0);
  }
}

Test(cuda_plan, ranges_equal_cpu) {
  NSA_REQUIRE_GPU();
  for (int i = 0; i < 4; i++) {
    nsa_tu_case_cfg_t cfg = cfg0();
    cfg.ranges = 1;
    cfg.n = 3 + 4 * i;
    cfg.seed = 40 + i;
    check_plan(&cfg, 0);
  }
}

Test(cuda_plan, decode_large_n_gapped) {
  NSA_REQUIRE_GPU();
  nsa_tu_case_cfg_t cfg = cfg0();
  cfg.S = 1;
  cfg.Skv = 3000;
  cfg.n = 40;
  cfg.B = 5;
  cfg.gapped = 1;
  cfg.seed = 60;
  check_plan(&cfg, 0);
  cfg.ranges = 1;
  cfg.seed = 61;
  check_plan(&cfg, 0);
  cfg = cfg0();
  cfg.S = 1000; /* many rows: several planner blocks and a multi-block scan */
  cfg.Skv = 1000;
  cfg.G = 4;
  cfg.n = 16;
  cfg.block_size = 64;
  cfg.seed = 62;
  check_plan(&cfg, 0);
}

Test(cuda_plan, invalid_entries_counted) {
  NSA_REQUIRE_GPU();
  nsa_tu_case_cfg_t cfg = cfg0();
  cfg.seed = 80;
  check_plan(&cfg, 1);
  cfg.ranges = 1;
  cfg.seed = 81;
  check_plan(&cfg, 1);
}
