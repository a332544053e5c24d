/*
 * test_cuda_plan.c — the v2 device planner builds the CPU planner's plan,
 * byte for byte (spans, nspans, row_len, row_off), with the same summary
 * (total, max_len, invalid count, length histogram), on every selection
 * shape the generators make, including invalid entries. Independently of
 * kernels/cpu, every row's spans must be sorted, non-empty, non-touching,
 * {0,0} past nspans, and cover exactly the float64 reference's key mask
 * (tests/common/ref.c), and the invalid count must equal the reference's.
 *
 * The device planner has three row kernels (kernels/cuda/plan_v2.cu): a
 * group of L = next_pow2(n) lanes per row for 1 <= n <= 32, one warp with K
 * slots per lane for 32 < n <= 128 (K = 2, 4), one thread per row otherwise;
 * the cases below cover every L (n = 1..32, powers of two and not), both K
 * (n = 33..128), the one-thread fallback (n = 129, 200), strided layouts on
 * all three, rows with every slot unused, many invalid entries of every kind,
 * and enough rows for many planner blocks and a multi-block scan.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_case.h"

enum {
  INJ_NONE = 0,
  INJ_FEW = 1,        /* 7 invalid entries */
  INJ_MANY = 2,       /* about a third of all entries invalid, every kind */
  INJ_ALL_UNUSED = 3, /* every slot unused (-1 / [0,0]) */
};

/* Makes entry i of sel_raw invalid, kind chosen by k. */
static void make_invalid(nsa_tu_case_t *c, const nsa_tu_case_cfg_t *cfg, int64_t i, int k) {
  const int64_t nblk = (cfg->Skv + cfg->block_size - 1) / cfg->block_size;
  if (cfg->ranges) {
    int32_t *p = c->sel_raw + 2 * i;
    switch (k % 6) {
      case 0: p[0] = 9; p[1] = 3; break;                 /* start > end */
      case 1: p[0] = -4; p[1] = 2; break;                /* negative start */
      case 2: p[0] = INT32_MIN; p[1] = 5; break;
      case 3: p[0] = INT32_MAX; p[1] = 0; break;
      case 4: p[0] = -1; p[1] = -1; break;
      default: p[0] = 1; p[1] = 0; break;
    }
  } else {
    switch (k % 6) {
      case 0: c->sel_raw[i] = (int32_t)nblk; break;      /* one past the end */
      case 1: c->sel_raw[i] = -2; break;                  /* below -1 */
      case 2: c->sel_raw[i] = INT32_MIN; break;
      case 3: c->sel_raw[i] = INT32_MAX; break;
      case 4: c->sel_raw[i] = (int32_t)nblk + 1000; break;
      default: c->sel_raw[i] = -1000; break;
    }
  }
}

/* The device plan against the reference's key masks (no kernels/cpu code). */
static void check_against_ref(const nsa_tu_case_t *c, const nsa_dims_t *d, const nsa_plan_t *gp) {
  unsigned char *mask = malloc((size_t)(d->Skv > 0 ? d->Skv : 1));
  unsigned char *got = malloc((size_t)(d->Skv > 0 ? d->Skv : 1));
  int64_t bad_rows = 0, first_bad = -1;
  for (int64_t r = 0; r < d->rows; r++) {
    const int64_t g = r % d->G, t = (r / d->G) % d->S, b = r / (d->G * d->S);
    int64_t lim = t + (d->Skv - d->S) + 1;
    if (lim > d->Skv) lim = d->Skv;
    const int64_t want = nsa_ref_row_mask(&c->ref, b, t, g, mask);
    memset(got, 0, (size_t)d->Skv);
    const int32_t *sp = gp->spans + r * d->n * 2;
    const int32_t ns = gp->nspans[r];
    int ok = ns >= 0 && ns <= d->n;
    int64_t len = 0, prev_end = -1;
    for (int64_t i = 0; ok && i < d->n; i++) {
      const int32_t s0 = sp[2 * i], s1 = sp[2 * i + 1];
      if (i >= ns) {
        ok = s0 == 0 && s1 == 0;
        continue;
      }
      /* non-empty, inside [0, lim), after the previous span with a gap */
      ok = s0 >= 0 && s0 < s1 && s1 <= lim && s0 > prev_end;
      prev_end = s1;
      for (int32_t s = s0; ok && s < s1; s++) got[s] = 1;
      len += s1 - s0;
    }
    ok = ok && len == want && gp->row_len[r] == len && memcmp(got, mask, (size_t)d->Skv) == 0;
    if (!ok && bad_rows++ == 0) first_bad = r;
  }
  cr_expect_eq(bad_rows, 0, "%lld rows differ from the reference key set (first: row %lld)",
               (long long)bad_rows, (long long)first_bad);
  free(mask);
  free(got);
}

static void check_plan(const nsa_tu_case_cfg_t *cfg, int inject) {
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, cfg), 0, "case init");
  const int64_t entries = c.nsel / (cfg->ranges ? 2 : 1);
  if (inject == INJ_FEW || inject == INJ_MANY) {
    nsa_tu_rng_t r;
    nsa_tu_rng_seed(&r, cfg->seed ^ 0xabcdef);
    const int64_t count = inject == INJ_FEW ? 7 : entries / 3;
    for (int64_t k = 0; k < count && entries > 2; k++)
      make_invalid(&c, cfg, nsa_tu_rng_int(&r, 0, entries - 1), (int)k);
  } else if (inject == INJ_ALL_UNUSED) {
    for (int64_t i = 0; i < c.nsel; i++) c.sel_raw[i] = cfg->ranges ? 0 : -1;
  }
  if (inject != INJ_NONE) nsa_tu_case_sync_sel(&c);
  const int64_t want_invalid = nsa_ref_count_invalid(&c.ref);
  if (inject == INJ_FEW || inject == INJ_MANY) cr_assert_gt(want_invalid, 0);
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
  cr_expect_eq(dp.invalid, want_invalid, "invalid %lld vs reference count %lld",
               (long long)dp.invalid, (long long)want_invalid);
  cr_expect_eq(memcmp(dp.len_hist, hp.len_hist, sizeof hp.len_hist), 0, "histogram differs");
  check_against_ref(&c, &d, &gp);
  if (inject == INJ_ALL_UNUSED) {
    cr_expect_eq(dp.total_len, 0);
    cr_expect_eq(dp.max_len, 0);
    cr_expect_eq(dp.len_hist[0], d.rows, "every row in the length-0 bucket");
  }

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
    check_plan(&cfg, INJ_NONE);
  }
}

Test(cuda_plan, ranges_equal_cpu) {
  NSA_REQUIRE_GPU();
  for (int i = 0; i < 4; i++) {
    nsa_tu_case_cfg_t cfg = cfg0();
    cfg.ranges = 1;
    cfg.n = 3 + 4 * i;
    cfg.seed = 40 + i;
    check_plan(&cfg, INJ_NONE);
  }
}

/* Every group width of the fast kernel: n = 1..32 (L = 1, 2, 4, 8, 16, 32,
 * with and without idle lanes), both selection kinds, also Skv = S. */
Test(cuda_plan, group_widths) {
  NSA_REQUIRE_GPU();
  const int64_t ns[] = {1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 24, 31, 32};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
    for (int ranges = 0; ranges < 2; ranges++) {
      nsa_tu_case_cfg_t cfg = cfg0();
      cfg.n = ns[i];
      cfg.ranges = ranges;
      cfg.block_size = (int32_t)(4 + 3 * i);
      cfg.Skv = (i % 3 == 2) ? cfg.S : 150 + 7 * (int64_t)i; /* Skv = S: prefill square */
      cfg.seed = 100 + 2 * i + (uint64_t)ranges;
      check_plan(&cfg, INJ_NONE);
    }
}

/* Strided (gapped) selection tensors on every kernel. */
Test(cuda_plan, gapped_layouts) {
  NSA_REQUIRE_GPU();
  const int64_t ns[] = {5, 16, 17, 32, 33, 100, 130};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
    for (int ranges = 0; ranges < 2; ranges++) {
      nsa_tu_case_cfg_t cfg = cfg0();
      cfg.n = ns[i];
      cfg.ranges = ranges;
      cfg.gapped = 1;
      cfg.Skv = 400;
      cfg.seed = 140 + 2 * i + (uint64_t)ranges;
      check_plan(&cfg, INJ_NONE);
    }
}

/* 32 < n <= 128: one warp per row, K = 2 or 4 slots per lane. */
Test(cuda_plan, warp_widths) {
  NSA_REQUIRE_GPU();
  const int64_t ns[] = {33, 48, 63, 64, 65, 100, 127, 128};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
    for (int ranges = 0; ranges < 2; ranges++) {
      nsa_tu_case_cfg_t cfg = cfg0();
      cfg.n = ns[i];
      cfg.ranges = ranges;
      cfg.block_size = (int32_t)(3 + 5 * i);
      cfg.Skv = (i % 3 == 2) ? cfg.S : 300 + 11 * (int64_t)i;
      cfg.seed = 240 + 2 * i + (uint64_t)ranges;
      check_plan(&cfg, INJ_NONE);
    }
}

/* n > 128: the one-thread-per-row fallback. */
Test(cuda_plan, fallback_large_n) {
  NSA_REQUIRE_GPU();
  const int64_t ns[] = {129, 200};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
    for (int ranges = 0; ranges < 2; ranges++) {
      nsa_tu_case_cfg_t cfg = cfg0();
      cfg.n = ns[i];
      cfg.ranges = ranges;
      cfg.Skv = 2000;
      cfg.block_size = 32;
      cfg.seed = 160 + 2 * i + (uint64_t)ranges;
      check_plan(&cfg, INJ_NONE);
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
  check_plan(&cfg, INJ_NONE);
  cfg.ranges = 1;
  cfg.seed = 61;
  check_plan(&cfg, INJ_NONE);
  cfg.n = 16; /* decode on the group kernel */
  cfg.seed = 63;
  check_plan(&cfg, INJ_NONE);
  cfg.n = 160; /* and on the one-thread fallback */
  cfg.seed = 64;
  check_plan(&cfg, INJ_NONE);
  cfg = cfg0();
  cfg.S = 1000; /* many rows: several planner blocks and a multi-block scan */
  cfg.Skv = 1000;
  cfg.G = 4;
  cfg.n = 16;
  cfg.block_size = 64;
  cfg.seed = 62;
  check_plan(&cfg, INJ_NONE);
}

/* The benchmark's shape at a smaller T: 16 slots of block 64, G = 4, random
 * and correlated selections, row count not a multiple of a planner block. */
Test(cuda_plan, many_rows) {
  NSA_REQUIRE_GPU();
  for (int corr = 0; corr < 2; corr++) {
    nsa_tu_case_cfg_t cfg = cfg0();
    cfg.B = 1;
    cfg.S = 4093;
    cfg.Skv = 4093;
    cfg.G = 4;
    cfg.n = 16;
    cfg.block_size = 64;
    cfg.sel_flags = corr ? NSA_TU_SEL_CORRELATED : NSA_TU_SEL_DUP | NSA_TU_SEL_UNUSED;
    cfg.seed = 180 + (uint64_t)corr;
    check_plan(&cfg, INJ_NONE);
  }
}

Test(cuda_plan, invalid_entries_counted) {
  NSA_REQUIRE_GPU();
  nsa_tu_case_cfg_t cfg = cfg0();
  cfg.seed = 80;
  check_plan(&cfg, INJ_FEW);
  cfg.ranges = 1;
  cfg.seed = 81;
  check_plan(&cfg, INJ_FEW);
}

/* About a third of the entries invalid (every kind, INT32_MIN/MAX included),
 * on every kernel. */
Test(cuda_plan, many_invalid_entries) {
  NSA_REQUIRE_GPU();
  const int64_t ns[] = {1, 7, 16, 17, 32, 40, 128, 130};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
    for (int ranges = 0; ranges < 2; ranges++) {
      nsa_tu_case_cfg_t cfg = cfg0();
      cfg.n = ns[i];
      cfg.ranges = ranges;
      cfg.seed = 200 + 2 * i + (uint64_t)ranges;
      check_plan(&cfg, INJ_MANY);
    }
}

/* Every slot of every row unused: empty plan, all rows in bucket 0. */
Test(cuda_plan, all_rows_unused) {
  NSA_REQUIRE_GPU();
  const int64_t ns[] = {3, 16, 40, 130};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
    for (int ranges = 0; ranges < 2; ranges++) {
      nsa_tu_case_cfg_t cfg = cfg0();
      cfg.n = ns[i];
      cfg.ranges = ranges;
      cfg.seed = 220 + 2 * i + (uint64_t)ranges;
      check_plan(&cfg, INJ_ALL_UNUSED);
    }
}

/* Row grouping of the row-block forward (fwd_rows.h, nsa_cuda_fwd_rows_group).
 *
 * grouping_case: B = 2, G = 2, S = 300 rows per (b, g) in windows of
 * `blocks` blocks x 11 rows (8: three full windows of 88 positions and one
 * of 36; 16: one of 176 and one of 124), Skv = 1024 (16 tiles) or 64000
 * (1000 tiles; 32000 and 500 for 16-block windows), n = 4 span slots. Row
 * t of (b, g) is in class c and selects tiles t0 + 3c .. t0 + 2 + 3c (one
 * span); every 13th row also has an out-of-range second span, which lists
 * no tile. ord (poisoned first) must deal each window's t exactly once, and:
 *   mixed, c = (t + b + 3g) % 4: in t order every block of 11 rows mixes all
 *     four classes (12-tile unions); the greedy must give every block of a
 *     full window a single class (3 tiles; 22 or 44 rows per class);
 *   runs, c = (t / 22 + b + g) % 4: blocks in t order hold at most two
 *     classes (unions within 2.5x of a row's 3 tiles), so the window keeps t
 *     order: ord[p] = p.
 *
 * grouping_exact: the bench's kind of selections (block 0, the row's own
 * block clipped at t, random blocks below; some rows with a long span past
 * the 32-tile cap, some with out-of-range spans, some runs of rows sharing
 * their blocks so that windows take the t-order exit) at 256, 512 and
 * 1024 tiles, in windows of 8 and 16 blocks (one warp) and of 32, 64 and
 * 128 (fwd_rows_group_wide.cu, a CTA per window): ord must equal, position for position, group_ref's — an
 * independent host version of the same rule. In every case the grouping
 * also writes each row block's union of tiles (ubits, poisoned first),
 * which run_group checks word by word against the union of the block's
 * rows as ord placed them. row_grouping_refused: the
 * sizes it does not take (fwd_rows.h) fail with cudaErrorInvalidValue. */
#include "fwd_rows.h"

/* The grouping rule on the host, for the rows of one (b, g) (hs / hn: the
 * plan's spans and span counts, row r = (b*S + t)*G + g): windows of W =
 * blocks * R rows; a row's tiles are those of its in-use spans inside [0,
 * Skv) (a tile shared with the previous span once), at most 32; a window
 * keeps t order when 2 * (sum of its t-order blocks' union sizes) <= 5 *
 * (sum of their largest tile counts); else per block the largest remaining
 * t, then R - 1 times the remaining row with the fewest tiles outside the
 * union (ties: the larger t); wide windows (blocks >= 32) build their
 * blocks 16 at a time (wide_window). */
/* Row r's tiles as the grouping (and the kernel) list them: a bitmask of
 * 32 words; returns the tile count. */
static int row_tiles(const int32_t *hs, const int32_t *hn, int64_t n, int64_t r, int64_t Skv, uint32_t mask[32]) {
  const int64_t ns = hn[r] < n ? hn[r] : n;
  memset(mask, 0, 32 * sizeof(uint32_t));
  int c = 0, last = -1;
  for (int64_t s = 0; s < ns; s++) {
    const int64_t x = hs[(r * n + s) * 2], y = hs[(r * n + s) * 2 + 1];
    if (!(y > x && x >= 0 && y <= Skv)) continue;
    const int kl = (int)((y - 1) / 64);
    for (int kt = (int)(x / 64) == last ? last + 1 : (int)(x / 64); kt <= kl && c < 32; kt++, c++)
      mask[kt >> 5] |= 1u << (kt & 31);
    last = kl;
  }
  return c;
}

/* Whether a window of wn rows keeps t order: 2 * (sum of its t-order
 * blocks' union sizes) <= 5 * (sum of their largest tile counts). */
static int t_order_keeps(uint32_t (*mask)[32], const int *cnt, int wn, int R) {
  long su = 0, tm = 0;
  for (int j0 = 0; j0 < wn; j0 += R) {
    uint32_t u[32] = {0};
    int mx = 0;
    for (int j = j0; j < wn && j < j0 + R; j++) {
      for (int w = 0; w < 32; w++) u[w] |= mask[j][w];
      mx = cnt[j] > mx ? cnt[j] : mx;
    }
    for (int w = 0; w < 32; w++) su += __builtin_popcount(u[w]);
    tm += mx;
  }
  return 2 * su <= 5 * tm;
}

/* The remaining row (placed[j] == 0) with the fewest tiles outside u, ties
 * the larger j; with u NULL the largest remaining j. */
static int fewest_new(uint32_t (*mask)[32], const int *placed, int wn, const uint32_t *u) {
  int best = -1, bc = 0;
  for (int j = wn - 1; j >= 0; j--) {
    if (placed[j]) continue;
    int c = 0;
    for (int w = 0; u != NULL && w < 32; w++) c += __builtin_popcount(mask[j][w] & ~u[w]);
    if (best < 0 || c < bc) best = j, bc = c;
  }
  return best;
}

/* Wide windows (blocks >= 32, fwd_rows_group_wide.cu): the window's blocks
 * built 16 at a time. Block 16 k + w's seed is the (w + 1)-th largest
 * remaining t; then in rounds every block of the batch with room proposes
 * its fewest_new row (all against the rows remaining at the round's
 * start); a row proposed by several goes to the lowest block, the others
 * propose again next round. */
static void wide_window(uint32_t (*mask)[32], int *placed, int wn, int R, int64_t p0, int32_t *out) {
  enum { P = 16 };
  const int nbw = (wn + R - 1) / R;
  for (int bat = 0; bat * P < nbw; bat++) {
    const int nact = nbw - bat * P < P ? nbw - bat * P : P;
    uint32_t u[P][32];
    int cap[P], have[P], prop[P];
    for (int w = 0; w < nact; w++) {
      const int blk = bat * P + w;
      cap[w] = wn - blk * R < R ? wn - blk * R : R;
      const int s = fewest_new(mask, placed, wn, NULL);
      placed[s] = 1, have[w] = 1;
      out[p0 + blk * R] = (int32_t)(p0 + s);
      memcpy(u[w], mask[s], sizeof u[w]);
    }
    for (;;) {
      int any = 0;
      for (int w = 0; w < nact; w++) {
        prop[w] = have[w] < cap[w] ? fewest_new(mask, placed, wn, u[w]) : -1;
        any |= prop[w] >= 0;
      }
      if (!any) break;
      for (int w = 0; w < nact; w++) {
        int lost = prop[w] < 0;
        for (int v = 0; v < w && !lost; v++) lost = prop[v] == prop[w];
        if (lost) continue;
        placed[prop[w]] = 1;
        out[p0 + (bat * P + w) * R + have[w]++] = (int32_t)(p0 + prop[w]);
        for (int x = 0; x < 32; x++) u[w][x] |= mask[prop[w]][x];
      }
    }
  }
}

static void group_ref(const int32_t *hs, const int32_t *hn, int64_t n, int64_t S, int64_t G, int64_t b, int64_t g,
                      int64_t Skv, int R, int blocks, int32_t *out) {
  const int W = blocks * R;
  uint32_t(*mask)[32] = calloc((size_t)W, sizeof *mask);
  int *cnt = calloc((size_t)W, sizeof(int)), *placed = calloc((size_t)W, sizeof(int));
  cr_assert(mask && cnt && placed);
  for (int64_t p0 = 0; p0 < S; p0 += W) {
    const int wn = S - p0 < W ? (int)(S - p0) : W;
    for (int j = 0; j < wn; j++) {
      cnt[j] = row_tiles(hs, hn, n, (b * S + p0 + j) * G + g, Skv, mask[j]);
      placed[j] = 0;
    }
    if (t_order_keeps(mask, cnt, wn, R)) {
      for (int j = 0; j < wn; j++) out[p0 + j] = (int32_t)(p0 + j);
      continue;
    }
    if (blocks >= 32) {
      wide_window(mask, placed, wn, R, p0, out);
      continue;
    }
    for (int j0 = 0; j0 < wn; j0 += R) {
      uint32_t u[32] = {0};
      for (int m = 0; m < R && j0 + m < wn; m++) {
        const int best = fewest_new(mask, placed, wn, m > 0 ? u : NULL);
        placed[best] = 1;
        out[p0 + j0 + m] = (int32_t)(p0 + best);
        for (int w = 0; w < 32; w++) u[w] |= mask[best][w];
      }
    }
  }
  free(mask), free(cnt), free(placed);
}

/* The persistent forward's step order (fwd_rows_order.cu) on the host, for
 * one row block: lt[r] = row r's ascending tiles (cnt[r] of them, R <= 16
 * rows, tiles < 1024). A tile's depth: 0 when none of the rows listing it
 * has a later tile, else 1 + the largest depth of those rows' next tiles.
 * Steps: depth descending, then tile ascending. out[v] = the tile of step
 * v; returns the union's size. */
static int order_ref(int R, int (*lt)[32], const int *cnt, int *out) {
  static unsigned char has[16][1024];
  static int depth[1024];
  memset(has, 0, sizeof has);
  for (int r = 0; r < R; r++)
    for (int j = 0; j < cnt[r]; j++) has[r][lt[r][j]] = 1;
  int dn[16] = {0}, U = 0, maxd = 0;
  static int un[1024];
  for (int x = 1023; x >= 0; x--) {
    int d = -1;
    for (int r = 0; r < R; r++)
      if (has[r][x]) d = dn[r] > d ? dn[r] : d;
    depth[x] = d; /* -1: not in the union */
    if (d < 0) continue;
    un[U++] = x; /* (descending) */
    maxd = d > maxd ? d : maxd;
    for (int r = 0; r < R; r++)
      if (has[r][x]) dn[r] = d + 1;
  }
  int v = 0;
  for (int d = maxd; d >= 0; d--)
    for (int i = U - 1; i >= 0; i--) /* tiles ascending */
      if (depth[un[i]] == d) out[v++] = un[i];
  return U;
}

/* Blocks whose step order (checked by run_group) differs from ascending. */
static int64_t order_moved;

/* Runs nsa_cuda_fwd_rows_group on host spans (rows = B*S*G, n slots each)
 * into ho; returns its status. It also asks for the row blocks' unions
 * (ubits, poisoned first) and checks every word against the union of the
 * block's rows (ho) as row_tiles lists them. */
static cudaError_t run_group(const int32_t *hs, const int32_t *hn, int64_t B, int64_t S, int64_t G, int64_t n,
                             int64_t Skv, int R, int blocks, int32_t *ho) {
  const int64_t rows = B * S * G;
  const int64_t NB = (S + R - 1) / R, nw = ((Skv + 63) / 64 + 31) / 32;
  const size_t ubn = (size_t)(B * G * NB * nw);
  int32_t *ds = NULL, *dn = NULL, *dord = NULL;
  uint32_t *dub = NULL, *hub = malloc(ubn * sizeof(uint32_t));
  cr_assert(hub);
  cr_assert_eq(cudaMalloc((void **)&dub, ubn * sizeof(uint32_t)), cudaSuccess);
  cr_assert_eq(cudaMemset(dub, 0xa5, ubn * sizeof(uint32_t)), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&ds, sizeof(int32_t) * (size_t)(rows * n * 2)), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&dn, sizeof(int32_t) * (size_t)rows), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&dord, sizeof(int32_t) * (size_t)rows), cudaSuccess);
  cr_assert_eq(cudaMemcpy(ds, hs, sizeof(int32_t) * (size_t)(rows * n * 2), cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaMemcpy(dn, hn, sizeof(int32_t) * (size_t)rows, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaMemset(dord, 0xff, sizeof(int32_t) * (size_t)rows), cudaSuccess); /* poison: -1 */
  nsa_plan_t plan;
  memset(&plan, 0, sizeof plan);
  plan.rows = rows, plan.n = n, plan.spans = ds, plan.nspans = dn;
  nsa_cuda_attn_t a;
  memset(&a, 0, sizeof a);
  a.B = B, a.S = S, a.G = G, a.Skv = Skv, a.h = 16, a.Dk = a.Dv = 128, a.n = n;
  /* the step orders (R = 11): nsa_cuda_fwd_rows_step_order after the grouping */
  const int with_order = R == 11 && nw <= 32;
  const size_t son = (size_t)(B * G * NB * R * 32);
  unsigned short *dso = NULL;
  if (with_order) {
    cr_assert_eq(cudaMalloc((void **)&dso, son * sizeof(unsigned short)), cudaSuccess);
    cr_assert_eq(cudaMemset(dso, 0xa5, son * sizeof(unsigned short)), cudaSuccess);
  }
  const cudaError_t e = nsa_cuda_fwd_rows_group(&a, &plan, NULL, R, blocks, dord, dub, 0);
  if (e == cudaSuccess) {
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cr_assert_eq(cudaMemcpy(ho, dord, sizeof(int32_t) * (size_t)rows, cudaMemcpyDeviceToHost), cudaSuccess);
    cr_assert_eq(cudaMemcpy(hub, dub, ubn * sizeof(uint32_t), cudaMemcpyDeviceToHost), cudaSuccess);
    for (int64_t bg = 0; bg < B * G; bg++)
      for (int64_t p = 0; p < NB; p++) {
        uint32_t u[32] = {0}, m[32];
        for (int64_t q = p * R; q < S && q < p * R + R; q++) {
          const int64_t t = ho[bg * S + q];
          cr_assert(t >= 0 && t < S);
          row_tiles(hs, hn, n, ((bg / G) * S + t) * G + bg % G, Skv, m);
          for (int w = 0; w < 32; w++) u[w] |= m[w];
        }
        for (int64_t w = 0; w < nw; w++)
          cr_assert_eq(hub[(bg * NB + p) * nw + w], u[w], "(b, g) %lld block %lld word %lld: union %08x, expected %08x",
                       (long long)bg, (long long)p, (long long)w, hub[(bg * NB + p) * nw + w], u[w]);
      }
    if (with_order) { /* the step order of every block, against order_ref step for step */
      unsigned short *hso = malloc(son * sizeof(unsigned short));
      cr_assert(hso);
      cr_assert_eq(nsa_cuda_fwd_rows_step_order(&a, &plan, R, dord, dub, dso, 0), cudaSuccess);
      cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
      cr_assert_eq(cudaMemcpy(hso, dso, son * sizeof(unsigned short), cudaMemcpyDeviceToHost), cudaSuccess);
      for (int64_t bg = 0; bg < B * G; bg++)
        for (int64_t p = 0; p < NB; p++) {
          int lt[16][32], cnt[16] = {0}, ref[16 * 32];
          uint32_t m[32];
          for (int64_t q = p * R; q < S && q < p * R + R; q++) {
            row_tiles(hs, hn, n, ((bg / G) * S + ho[bg * S + q]) * G + bg % G, Skv, m);
            for (int k = 0; k < 32 * 32; k++)
              if ((m[k >> 5] >> (k & 31)) & 1u) lt[q - p * R][cnt[q - p * R]++] = k;
          }
          const int U = order_ref(R, lt, cnt, ref);
          const unsigned short *got = hso + (bg * NB + p) * R * 32;
          int asc = 1;
          for (int v = 0; v < U; v++) {
            cr_assert_eq(got[v], ref[v], "(b, g) %lld block %lld step %d: tile %d, reference %d", (long long)bg,
                         (long long)p, v, got[v], ref[v]);
            asc &= v == 0 || ref[v] > ref[v - 1];
          }
          order_moved += !asc;
        }
      free(hso);
    }
  }
  cudaFree(dso);
  cudaFree(ds), cudaFree(dn), cudaFree(dord), cudaFree(dub);
  free(hub);
  return e;
}

static void grouping_case(int runs, int64_t Skv, int64_t t0, int blocks) {
  const int64_t B = 2, G = 2, S = 300, n = 4, R = 11, W = blocks * R;
  const int64_t rows = B * S * G;
  int32_t *hs = calloc((size_t)(rows * n * 2), sizeof(int32_t)), *hn = calloc((size_t)rows, sizeof(int32_t));
  int32_t *ho = malloc(sizeof(int32_t) * (size_t)rows);
  cr_assert(hs && hn && ho);
#define CLASS(t, b, g) (runs ? ((t) / 22 + (b) + (g)) % 4 : ((t) + (b) + 3 * (g)) % 4)
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < S; t++)
      for (int64_t g = 0; g < G; g++) {
        const int64_t r = (b * S + t) * G + g, c = CLASS(t, b, g);
        hs[r * n * 2 + 0] = (int32_t)(64 * (t0 + 3 * c));
        hs[r * n * 2 + 1] = (int32_t)(64 * (t0 + 3 + 3 * c));
        hn[r] = 1;
        if (t % 13 == 0) {
          hs[r * n * 2 + 2] = (int32_t)(Skv + 10), hs[r * n * 2 + 3] = (int32_t)(Skv + 20);
          hn[r] = 2;
        }
      }
  cr_assert_eq(run_group(hs, hn, B, S, G, n, Skv, (int)R, blocks, ho), cudaSuccess);
  int pure = 0, kept = 0;
  for (int64_t b = 0; b < B; b++)
    for (int64_t g = 0; g < G; g++) {
      const int32_t *o = ho + (b * G + g) * S;
      for (int64_t w0 = 0; w0 < S; w0 += W) {
        const int64_t wn = S - w0 < W ? S - w0 : W;
        int seen[256] = {0};
        for (int64_t p = w0; p < w0 + wn; p++) {
          cr_assert(o[p] >= w0 && o[p] < w0 + wn, "(b %lld g %lld) position %lld: t = %d outside its window",
                    (long long)b, (long long)g, (long long)p, o[p]);
          cr_assert_eq(seen[o[p] - w0]++, 0, "(b %lld g %lld) t = %d placed twice", (long long)b, (long long)g,
                       o[p]);
          kept += o[p] == p;
        }
        if (wn < W || runs) continue;
        for (int64_t p = w0; p < w0 + wn; p += R) { /* every block of a full window: one class */
          const int64_t c0 = CLASS(o[p], b, g);
          for (int64_t m = 1; m < R; m++)
            cr_expect_eq(CLASS(o[p + m], b, g), c0, "(b %lld g %lld) block at %lld mixes classes", (long long)b,
                         (long long)g, (long long)p);
          pure++;
        }
      }
    }
#undef CLASS
  if (runs)
    cr_expect_eq(kept, rows, "runs: %d of %lld rows kept their t-order position", kept, (long long)rows);
  else
    cr_expect_eq(pure, B * G * (S / W) * blocks);
  free(hs), free(hn), free(ho);
}

Test(cuda_plan, row_grouping) {
  NSA_REQUIRE_GPU();
  for (int blocks = 8; blocks <= 16; blocks += 8) {
    /* 16-block windows take at most 512 tiles (fwd_rows.h) */
    const int64_t nt = blocks == 8 ? 1000 : 500;
    grouping_case(0, 1024, 1, blocks); /* 16 tiles */
    grouping_case(1, 1024, 1, blocks);
    grouping_case(0, 64 * nt, nt - 15, blocks); /* the classes in the last mask words */
    grouping_case(1, 64 * nt, nt - 15, blocks);
  }
}

/* One (b, g) = (0, 0 / 1) of the bench's kind, S = Skv = T rows (see above). */
static void exact_case(int64_t T, int R, int blocks, uint64_t seed) {
  const int64_t B = 1, G = 2, S = T, n = 16, rows = B * S * G;
  int32_t *hs = calloc((size_t)(rows * n * 2), sizeof(int32_t)), *hn = calloc((size_t)rows, sizeof(int32_t));
  int32_t *ho = malloc(sizeof(int32_t) * (size_t)rows), *ref = malloc(sizeof(int32_t) * (size_t)S);
  cr_assert(hs && hn && ho && ref);
  nsa_tu_rng_t rg;
  nsa_tu_rng_seed(&rg, seed);
  for (int64_t t = 0; t < S; t++)
    for (int64_t g = 0; g < G; g++) {
      const int64_t r = t * G + g, own = t / 64;
      int32_t *sp = hs + r * n * 2;
      int nb = 0;
      int64_t blk[16];
      if (t % 97 == 7 && own > 40) { /* one 40-tile span (past the 32-tile cap), then the own block */
        sp[0] = 0, sp[1] = 64 * 40;
        sp[2] = (int32_t)(64 * own), sp[3] = (int32_t)(t + 1);
        hn[r] = 2;
        continue;
      }
      blk[nb++] = 0;
      if (own > 0) blk[nb++] = own;
      /* In every other stretch of 1536 rows, the rows of one 48-row run
       * draw the same random blocks (below the run's first own block), so
       * those windows take the t-order exit; elsewhere random. */
      const int shared = ((t / 1536) + g) % 2 == 0;
      const int64_t top = shared ? (t / 48) * 48 / 64 : own;
      nsa_tu_rng_t rr;
      nsa_tu_rng_seed(&rr, shared ? seed * 1000003u + (uint64_t)(t / 48) * 7919u + (uint64_t)g : 0);
      nsa_tu_rng_t *pr = shared ? &rr : &rg;
      const int64_t avail = top + 1 + (own > top ? 1 : 0); /* distinct blocks there are to pick */
      while (nb < (avail < 16 ? avail : 16)) {
        const int64_t x = nsa_tu_rng_int(pr, 0, top);
        int dup = 0;
        for (int i = 0; i < nb; i++) dup |= blk[i] == x;
        if (!dup) blk[nb++] = x;
      }
      for (int i = 1; i < nb; i++) /* ascending */
        for (int k = i; k > 0 && blk[k - 1] > blk[k]; k--) {
          const int64_t y = blk[k];
          blk[k] = blk[k - 1], blk[k - 1] = y;
        }
      for (int i = 0; i < nb; i++) {
        sp[2 * i] = (int32_t)(64 * blk[i]);
        sp[2 * i + 1] = (int32_t)(64 * blk[i] + 64 < t + 1 ? 64 * blk[i] + 64 : t + 1);
      }
      hn[r] = nb;
      if (t % 101 == 3 && nb < 16) { /* an out-of-range span: lists no tile */
        sp[2 * nb] = (int32_t)(T + 64), sp[2 * nb + 1] = (int32_t)(T + 128);
        hn[r] = nb + 1;
      }
    }
  order_moved = 0;
  cr_assert_eq(run_group(hs, hn, B, S, G, n, T, R, blocks, ho), cudaSuccess);
  if (R == 11) /* the step order (run_group) is not ascending in most blocks */
    cr_assert_gt(order_moved, S / R / 2, "T %lld blocks %d: %lld blocks not in ascending order", (long long)T,
                 blocks, (long long)order_moved);
  for (int64_t g = 0; g < G; g++) {
    group_ref(hs, hn, n, S, G, 0, g, T, R, blocks, ref);
    int64_t moved = 0;
    for (int64_t p = 0; p < S; p++) {
      cr_assert_eq(ho[g * S + p], ref[p], "T %lld R %d blocks %d g %lld position %lld: ord %d, reference %d",
                   (long long)T, R, blocks, (long long)g, (long long)p, ho[g * S + p], ref[p]);
      moved += ref[p] != p;
    }
    cr_assert(moved > S / 4, "the greedy moved only %lld of %lld rows", (long long)moved, (long long)S);
  }
  free(hs), free(hn), free(ho), free(ref);
}

Test(cuda_plan, row_grouping_exact) {
  NSA_REQUIRE_GPU();
  exact_case(16384, 11, 16, 71); /* 256 tiles: masks of 8 words */
  exact_case(16384, 11, 8, 72);
  exact_case(16384, 15, 16, 73);
  exact_case(32768, 11, 16, 74); /* 512: 16 words */
  exact_case(65536, 11, 8, 75);  /* 1024: 32 words */
  exact_case(65536, 15, 8, 76);
  /* the wide windows (fwd_rows_group_wide.cu): a CTA per window, the
   * same rule; from the plan's spans, up to 32 tiles per row */
  exact_case(65536, 11, 128, 77); /* the forward's default past 512 tiles */
  exact_case(16384, 11, 64, 78);
  exact_case(32768, 15, 32, 79);
}

/* The grouping the forward runs: from the selection's slots (beside the
 * planner), against the grouping from the v2 planner's plan of the same
 * selection (checked above against group_ref and the unions): ord and
 * ubits must be equal word for word (both poisoned first). The selections
 * are the bench's kind (block 0, the row's own block, random blocks below
 * it) plus what the plan's clipping and validation remove: blocks past the
 * row's own (clipped away, or cut at t), duplicates, unused slots, invalid
 * ids of every kind; block sizes 64, 32, 48 (blocks over two tiles) and
 * 128; S = Skv and S < Skv (the queries the last S positions); B = G = 2;
 * contiguous and gapped selection tensors. */
static void sel_grouping_case(int64_t S, int64_t Skv, int32_t bs, int gapped, int blocks, uint64_t seed) {
  const int R = 11;
  nsa_tu_case_cfg_t cfg = {.B = 2, .S = S, .Skv = Skv, .G = 2, .h = 1, .Dk = 8, .Dv = 8, .n = 16,
                           .dtype = NSA_F32, .block_size = bs, .sel_flags = NSA_TU_SEL_ALL, .gapped = gapped,
                           .seed = seed};
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0, "case init");
  const int64_t nblk = (Skv + bs - 1) / bs, n = cfg.n, rows = cfg.B * S * cfg.G;
  nsa_tu_rng_t rg;
  nsa_tu_rng_seed(&rg, seed);
  for (int64_t r = 0; r < rows; r++) { /* sel_raw: [B][S][G][n], r = (b*S + t)*G + g */
    const int64_t t = (r / cfg.G) % S, own = (t + (Skv - S)) / bs;
    int32_t *row = c.sel_raw + r * n;
    for (int64_t i = 0; i < n; i++) {
      const int64_t u = nsa_tu_rng_int(&rg, 0, 99);
      row[i] = i == 0 ? 0
               : i == 1 ? (int32_t)own
               : u < 8  ? -1                                              /* unused */
               : u < 14 ? row[nsa_tu_rng_int(&rg, 0, i - 1)]              /* a duplicate */
               : u < 20 ? (int32_t)nsa_tu_rng_int(&rg, own, nblk - 1)     /* at or past t: clipped */
                        : (int32_t)nsa_tu_rng_int(&rg, 0, own);           /* below: the bench's kind */
    }
    if (r % 37 == 5) make_invalid(&c, &cfg, r * n + nsa_tu_rng_int(&rg, 2, n - 1), (int)(r / 37));
  }
  nsa_tu_case_sync_sel(&c);
  nsa_tc_dev_t dv;
  cr_assert_eq(nsa_tc_dev_init(&dv, &c), 0);
  nsa_dims_t d;
  char msg[256];
  cr_assert_eq(nsa_fwd_check(&c.fwd, &d, msg, sizeof msg), NSA_OK, "%s", msg);
  nsa_plan_layout_t lay;
  const size_t pbytes = nsa_plan_layout(d.rows, d.n, &lay);
  void *dbuf = NULL;
  cr_assert_eq(cudaMalloc(&dbuf, pbytes), cudaSuccess);
  nsa_cuda_ctx_t *ctx;
  cr_assert_eq(nsa_cuda_ctx_create(0, 0, &ctx, msg, sizeof msg), NSA_OK, "%s", msg);
  nsa_plan_t dp;
  nsa_plan_bind(&dp, dbuf, d.rows, d.n);
  cr_assert_eq(nsa_cuda_plan_v2(ctx, &dv.fwd.sel, &d, &dp, 1, msg, sizeof msg), NSA_OK, "%s", msg);
  cr_assert_gt(dp.invalid, 0, "the case has invalid entries");
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);

  const nsa_cuda_selview_t sv = nsa_cuda_selview_of(&dv.fwd.sel);
  nsa_cuda_attn_t a;
  memset(&a, 0, sizeof a);
  a.B = cfg.B, a.S = S, a.G = cfg.G, a.Skv = Skv, a.h = 16, a.Dk = a.Dv = 128, a.n = n;
  const int64_t NB = (S + R - 1) / R, nw = ((Skv + 63) / 64 + 31) / 32;
  const size_t ob = sizeof(int32_t) * (size_t)rows, ubb = sizeof(uint32_t) * (size_t)(cfg.B * cfg.G * NB * nw);
  int32_t *dord[2];
  uint32_t *dub[2];
  int32_t *ho[2];
  uint32_t *hub[2];

  for (int k = 0; k < 2; k++) { /* k = 0: from the plan, 1: from the selection */
    cr_assert_eq(cudaMalloc((void **)&dord[k], ob), cudaSuccess);
    cr_assert_eq(cudaMalloc((void **)&dub[k], ubb), cudaSuccess);
    cr_assert_eq(cudaMemset(dord[k], 0xff, ob), cudaSuccess);
    cr_assert_eq(cudaMemset(dub[k], 0xa5, ubb), cudaSuccess);
    cr_assert_eq(nsa_cuda_fwd_rows_group(&a, k ? NULL : &dp, k ? &sv : NULL, R, blocks, dord[k], dub[k], 0),
                 cudaSuccess);
    ho[k] = malloc(ob), hub[k] = malloc(ubb);
    cr_assert(ho[k] && hub[k]);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cr_assert_eq(cudaMemcpy(ho[k], dord[k], ob, cudaMemcpyDeviceToHost), cudaSuccess);
    cr_assert_eq(cudaMemcpy(hub[k], dub[k], ubb, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  int64_t moved = 0;
  for (int64_t i = 0; i < rows; i++) {
    cr_assert_eq(ho[1][i], ho[0][i], "S %lld Skv %lld bs %d: ord[%lld] from the selection %d, from the plan %d",
                 (long long)S, (long long)Skv, bs, (long long)i, ho[1][i], ho[0][i]);
    moved += ho[0][i] != i % S;
  }
  cr_assert_gt(moved, 0, "the greedy moved no row");
  for (size_t w = 0; w < ubb / 4; w++)
    cr_assert_eq(hub[1][w], hub[0][w], "S %lld Skv %lld bs %d: union word %zu from the selection %08x, plan %08x",
                 (long long)S, (long long)Skv, bs, w, hub[1][w], hub[0][w]);
  for (int k = 0; k < 2; k++) cudaFree(dord[k]), cudaFree(dub[k]), free(ho[k]), free(hub[k]);
  nsa_cuda_ctx_destroy(ctx);
  cudaFree(dbuf);
  nsa_tc_dev_free(&dv);
  nsa_tu_case_teardown(&c);
}

Test(cuda_plan, row_grouping_from_selection) {
  NSA_REQUIRE_GPU();
  /* enough tiles per (b, g) that most windows run the greedy (fewer take
   * the t-order exit: the unions of 11 random rows cover most tiles) */
  sel_grouping_case(4000, 4000, 64, 0, 8, 81);
  sel_grouping_case(1500, 4100, 32, 1, 8, 82); /* queries the last 1500 of 4100 positions */
  sel_grouping_case(6000, 6000, 48, 0, 16, 83);
  sel_grouping_case(8192, 8192, 128, 1, 8, 84);
  sel_grouping_case(4096, 16384, 64, 0, 8, 85); /* 256 tiles: 8-word masks */
  /* wide windows: from the selection at most 16 tiles per row (blocks of
   * 64 keys), then 32 (blocks of 48 over two tiles); from the plan 32 */
  sel_grouping_case(8192, 8192, 64, 0, 64, 86);
  sel_grouping_case(6000, 6000, 48, 1, 32, 87);
  sel_grouping_case(3000, 20000, 64, 0, 128, 88);
}

/* Sizes the grouping does not take are refused, not run. */
Test(cuda_plan, row_grouping_refused) {
  NSA_REQUIRE_GPU();
  int32_t hs[2 * 4] = {0, 64}, hn[1] = {1}, ho[1];
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64, 11, 12, ho), cudaErrorInvalidValue);       /* blocks 8 or 16 */
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64, 17, 8, ho), cudaErrorInvalidValue);        /* R <= 16 */
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64 * 1025, 11, 8, ho), cudaErrorInvalidValue); /* <= 1024 tiles */
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64 * 513, 11, 16, ho), cudaErrorInvalidValue); /* 16 blocks: <= 512 */
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64 * 512, 11, 16, ho), cudaSuccess);
  cr_expect_eq(ho[0], 0);
  /* wide windows: 32, 64 or 128 blocks, at most 1408 rows, 1024 tiles */
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64, 11, 256, ho), cudaErrorInvalidValue);
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64, 11, 96, ho), cudaErrorInvalidValue);
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64, 12, 128, ho), cudaErrorInvalidValue);        /* 1536 rows */
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64 * 1025, 11, 128, ho), cudaErrorInvalidValue); /* <= 1024 tiles */
  ho[0] = -1;
  cr_expect_eq(run_group(hs, hn, 1, 1, 1, 4, 64 * 1024, 11, 128, ho), cudaSuccess);
  cr_expect_eq(ho[0], 0);
}
