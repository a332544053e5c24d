/*
 * test_plan.c — the plan format, v1 == v2 byte for byte, invalid selections,
 * path choice from flags, request checks.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsa/sel_attn.h"
#include "sel_case.h"

typedef struct {
  void *buf;
  size_t bytes;
  nsa_plan_t p;
} tplan_t;

/* Plans with v1 or v2 into a buffer pre-filled with a garbage byte, so any
 * byte a planner forgets to write shows up as a difference. */
static void make_plan(tplan_t *tp, const nsa_selection_t *sel, const nsa_dims_t *d, int v1,
                      unsigned char fill) {
  nsa_plan_layout_t lay;
  tp->bytes = nsa_plan_layout(d->rows, d->n, &lay);
  tp->buf = malloc(tp->bytes);
  cr_assert(tp->buf);
  memset(tp->buf, fill, tp->bytes);
  nsa_plan_bind(&tp->p, tp->buf, d->rows, d->n);
  int rc = v1 ? nsa_cpu_plan_v1(sel, d, &tp->p) : nsa_cpu_plan_v2(sel, d, &tp->p);
  cr_assert_eq(rc, NSA_OK);
}

/* Bytes of the plan arrays only (alignment padding between them excluded). */
static void assert_same_plan(const tplan_t *a, const tplan_t *b) {
  const nsa_plan_t *x = &a->p, *y = &b->p;
  int64_t rows = x->rows, n = x->n;
  cr_assert_eq(rows, y->rows);
  cr_assert_eq(memcmp(x->spans, y->spans, sizeof(int32_t) * (size_t)(rows * n * 2)), 0, "spans differ");
  cr_assert_eq(memcmp(x->nspans, y->nspans, sizeof(int32_t) * (size_t)rows), 0, "nspans differ");
  cr_assert_eq(memcmp(x->row_len, y->row_len, sizeof(int32_t) * (size_t)rows), 0, "row_len differ");
  cr_assert_eq(memcmp(x->row_off, y->row_off, sizeof(int64_t) * (size_t)(rows + 1)), 0,
               "row_off differ");
  cr_assert_eq(x->total_len, y->total_len);
  cr_assert_eq(x->max_len, y->max_len);
  cr_assert_eq(x->invalid, y->invalid);
  cr_assert_eq(memcmp(x->len_hist, y->len_hist, sizeof x->len_hist), 0, "histograms differ");
}

/* The plan is canonical and holds exactly the reference's key sets. */
static void assert_plan_matches_ref(const tplan_t *tp, const nsa_tu_case_t *c) {
  const nsa_plan_t *p = &tp->p;
  const int64_t Skv = c->cfg.Skv;
  unsigned char *mask = malloc((size_t)(Skv > 0 ? Skv : 1));
  int64_t acc = 0, hist[NSA_LEN_HIST_BUCKETS] = {0};
  int32_t mx = 0;
  for (int64_t r = 0; r < p->rows; r++) {
    int64_t g = r % c->cfg.G, t = (r / c->cfg.G) % c->cfg.S, b = r / c->cfg.G / c->cfg.S;
    int64_t want = nsa_ref_row_mask(&c->ref, b, t, g, mask);
    const int32_t *sp = p->spans + r * p->n * 2;
    int64_t got = 0;
    cr_assert(p->nspans[r] >= 0 && p->nspans[r] <= p->n);
    for (int32_t i = 0; i < p->nspans[r]; i++) {
      cr_assert(sp[2 * i] < sp[2 * i + 1], "row %lld span %d empty", (long long)r, i);
      if (i > 0) cr_assert(sp[2 * i - 1] < sp[2 * i], "row %lld spans %d not merged", (long long)r, i);
      for (int32_t s = sp[2 * i]; s < sp[2 * i + 1]; s++) {
        cr_assert(s >= 0 && s < Skv && mask[s], "row %lld key %d not in the key set", (long long)r, s);
        got++;
      }
    }
    for (int64_t i = p->nspans[r]; i < p->n; i++)
      cr_assert(sp[2 * i] == 0 && sp[2 * i + 1] == 0, "row %lld tail slot not zero", (long long)r);
    cr_assert_eq(got, want, "row %lld: %lld keys, reference %lld", (long long)r, (long long)got,
                 (long long)want);
    cr_assert_eq(p->row_len[r], want);
    cr_assert_eq(p->row_off[r], acc);
    acc += want;
    if (want > mx) mx = (int32_t)want;
    hist[nsa_len_hist_bucket(want)]++;
  }
  cr_assert_eq(p->row_off[p->rows], acc);
  cr_assert_eq(p->total_len, acc);
  cr_assert_eq(p->max_len, mx);
  cr_assert_eq(memcmp(p->len_hist, hist, sizeof hist), 0);
  free(mask);
}

static void plan_case(const nsa_tu_case_cfg_t *cfg, int inject_invalid) {
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, cfg), 0);
  if (inject_invalid) {
    nsa_tu_rng_t r;
    nsa_tu_rng_seed(&r, cfg->seed ^ 0xabc);
    int64_t nblocks = (cfg->Skv + cfg->block_size - 1) / cfg->block_size;
    for (int64_t i = 0; i < c.nsel; i++) {
      if (nsa_tu_rng_int(&r, 0, 9)) continue;
      if (cfg->ranges) {
        int64_t e = i & ~(int64_t)1; /* entry start */
        if (nsa_tu_rng_int(&r, 0, 1)) c.sel_raw[e] = -(int32_t)nsa_tu_rng_int(&r, 1, 50);
        else { c.sel_raw[e] = 10; c.sel_raw[e + 1] = (int32_t)nsa_tu_rng_int(&r, 0, 9); }
      } else {
        c.sel_raw[i] = nsa_tu_rng_int(&r, 0, 1) ? (int32_t)(nblocks + nsa_tu_rng_int(&r, 0, 3))
                                               : -(int32_t)nsa_tu_rng_int(&r, 2, 100);
      }
    }
    nsa_tu_case_sync_sel(&c);
  }
  nsa_dims_t d;
  char msg[256];
  cr_assert_eq(nsa_fwd_check(&c.fwd, &d, msg, sizeof msg), NSA_OK, "%s", msg);
  tplan_t p1, p2;
  make_plan(&p1, &c.fwd.sel, &d, 1, 0xa5);
  make_plan(&p2, &c.fwd.sel, &d, 0, 0x3c);
  assert_same_plan(&p1, &p2);
  assert_plan_matches_ref(&p2, &c);
  cr_assert_eq(p2.p.invalid, nsa_ref_count_invalid(&c.ref));
  if (!inject_invalid) cr_assert_eq(p2.p.invalid, 0);
  free(p1.buf);
  free(p2.buf);
  nsa_tu_case_teardown(&c);
}

Test(plan, v1_equals_v2_randomized) {
  nsa_tu_rng_t r;
  nsa_tu_rng_seed(&r, 77);
  for (int i = 0; i < 64; i++) {
    nsa_tu_case_cfg_t cfg = {.dtype = NSA_F32, .Dk = 1, .Dv = 1, .seed = 5000 + (uint64_t)i};
    cfg.B = nsa_tu_rng_int(&r, 1, 3);
    cfg.Skv = nsa_tu_rng_int(&r, 1, 300);
    cfg.S = nsa_tu_rng_int(&r, 1, cfg.Skv < 40 ? cfg.Skv : 40);
    cfg.G = nsa_tu_rng_int(&r, 1, 4);
    cfg.h = 1;
    cfg.n = nsa_tu_rng_int(&r, 0, 20);
    cfg.block_size = (int32_t)nsa_tu_rng_int(&r, 1, 70);
    cfg.ranges = (int)nsa_tu_rng_int(&r, 0, 1);
    cfg.gapped = (int)nsa_tu_rng_int(&r, 0, 1);
    cfg.sel_flags = (unsigned)nsa_tu_rng_int(&r, 0, NSA_TU_SEL_ALL);
    plan_case(&cfg, i % 4 == 3);
  }
}

/* Builds a plan from a hand-written selection of one batch/group. */
static void hand_plan(int ranges, int64_t S, int64_t Skv, int64_t n, int32_t bs, const int32_t *raw,
                      tplan_t *out, int64_t *invalid) {
  int64_t shape[5] = {1, S, 1, n, 2};
  nsa_tu_buf_t sb;
  cr_assert_eq(nsa_tu_buf_contig(&sb, NSA_I32, ranges ? 5 : 4, shape), 0);
  nsa_tu_from_i32(&sb.t, raw);
  nsa_selection_t sel = {.kind = ranges ? NSA_SEL_RANGES : NSA_SEL_BLOCK_INDICES, .t = sb.t,
                         .block_size = bs};
  nsa_dims_t d = {.B = 1, .S = S, .Skv = Skv, .G = 1, .h = 1, .H = 1, .Dk = 1, .Dv = 1, .n = n,
                  .rows = S, .dtype = NSA_F32};
  tplan_t other;
  make_plan(out, &sel, &d, 0, 0x77);
  make_plan(&other, &sel, &d, 1, 0x11);
  assert_same_plan(out, &other);
  free(other.buf);
  *invalid = out->p.invalid;
  nsa_tu_buf_free(&sb);
}

Test(plan, edge_empty_input) {
  nsa_dims_t d = {.B = 0, .S = 4, .Skv = 8, .G = 2, .h = 1, .H = 2, .Dk = 1, .Dv = 1, .n = 3,
                  .rows = 0};
  int64_t shape[4] = {0, 4, 2, 3};
  nsa_tu_buf_t sb;
  cr_assert_eq(nsa_tu_buf_contig(&sb, NSA_I32, 4, shape), 0);
  nsa_selection_t sel = {.kind = NSA_SEL_BLOCK_INDICES, .t = sb.t, .block_size = 4};
  tplan_t a, b;
  make_plan(&a, &sel, &d, 0, 0xee);
  make_plan(&b, &sel, &d, 1, 0x01);
  assert_same_plan(&a, &b);
  cr_assert_eq(a.p.row_off[0], 0);
  cr_assert_eq(a.p.total_len, 0);
  cr_assert_eq(a.p.max_len, 0);
  free(a.buf);
  free(b.buf);
  nsa_tu_buf_free(&sb);
}

Test(plan, edge_all_invalid) {
  /* every entry bad: counted, skipped, every row empty */
  const int32_t ids[2 * 3] = {-2, 9, 100, -7, 4, 2147483647};
  tplan_t p;
  int64_t bad;
  hand_plan(0, 2, 16, 3, 4, ids, &p, &bad); /* 4 blocks: ids 0..3 valid */
  cr_assert_eq(bad, 6);
  cr_assert_eq(p.p.total_len, 0);
  cr_assert_eq(p.p.nspans[0] + p.p.nspans[1], 0);
  free(p.buf);
  const int32_t rg[2 * 2 * 2] = {-1, 4, 5, 3, -10, -20, 7, 6};
  hand_plan(1, 2, 16, 2, 0, rg, &p, &bad);
  cr_assert_eq(bad, 4);
  cr_assert_eq(p.p.total_len, 0);
  free(p.buf);
}

Test(plan, edge_adjacent_merge_and_clamp) {
  /* S = Skv = 64, block 8; query t = 63 sees everything. Blocks 3,1,2 touch
   * → one span [8, 32); 5 and 5 again → [40, 48); -1 unused. */
  int32_t ids[64 * 6];
  for (int i = 0; i < 64 * 6; i++) ids[i] = -1;
  const int32_t last[6] = {3, 1, -1, 2, 5, 5};
  memcpy(ids + 63 * 6, last, sizeof last);
  /* query t = 20 (p = 20): block 2 = [16, 24) clamps to [16, 21); block 7 is
   * entirely in the future → dropped; block 1 touches block 2 → [8, 21). */
  const int32_t mid[6] = {7, 2, 1, -1, -1, -1};
  memcpy(ids + 20 * 6, mid, sizeof mid);
  tplan_t p;
  int64_t bad;
  hand_plan(0, 64, 64, 6, 8, ids, &p, &bad);
  cr_assert_eq(bad, 0);
  const int32_t *s63 = p.p.spans + 63 * 12, *s20 = p.p.spans + 20 * 12;
  cr_assert_eq(p.p.nspans[63], 2);
  cr_assert(s63[0] == 8 && s63[1] == 32 && s63[2] == 40 && s63[3] == 48);
  cr_assert_eq(p.p.row_len[63], 32);
  cr_assert_eq(p.p.nspans[20], 1);
  cr_assert(s20[0] == 8 && s20[1] == 21, "got [%d,%d)", s20[0], s20[1]);
  cr_assert_eq(p.p.row_len[20], 13);
  cr_assert_eq(p.p.nspans[0], 0);
  free(p.buf);

  /* ranges, decode alignment S=2, Skv=50: p(0)=48, p(1)=49.
   * row 0: [40,45) [45,60) [0,0) [30,31) → [30,31) [40,49)
   * row 1: [10,20) [12,15) [20,20) [49,80) → [10,20) [49,50)   */
  const int32_t rg[2 * 4 * 2] = {40, 45, 45, 60, 0, 0, 30, 31, 10, 20, 12, 15, 20, 20, 49, 80};
  hand_plan(1, 2, 50, 4, 0, rg, &p, &bad);
  cr_assert_eq(bad, 0);
  const int32_t w0[4] = {30, 31, 40, 49}, w1[4] = {10, 20, 49, 50};
  cr_assert_eq(p.p.nspans[0], 2);
  cr_assert_eq(memcmp(p.p.spans, w0, sizeof w0), 0);
  cr_assert_eq(p.p.nspans[1], 2);
  cr_assert_eq(memcmp(p.p.spans + 8, w1, sizeof w1), 0);
  cr_assert_eq(p.p.row_len[0], 10);
  cr_assert_eq(p.p.row_len[1], 11);
  cr_assert_eq(p.p.row_off[2], 21);
  cr_assert_eq(p.p.max_len, 11);
  free(p.buf);
}

/* ---- invalid selections through the full request ---- */

static void expect_invalid(nsa_tu_case_t *c, int64_t want) {
  const nsa_path_t paths[] = {NSA_PATH_AUTO, NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, NSA_PATH_PACKED};
  for (size_t i = 0; i < 4; i++) {
    nsa_tu_case_poison_outputs(c);
    nsa_run_info_t info;
    char msg[256], cnt[32];
    int rc = nsa_cpu_sel_fwd(&c->fwd, NULL, paths[i], &info, msg, sizeof msg);
    cr_assert_eq(rc, NSA_ERR_INVALID_SELECTION, "rc %d (%s)", rc, msg);
    cr_assert_eq(info.invalid, want, "counted %lld, want %lld", (long long)info.invalid,
                 (long long)want);
    snprintf(cnt, sizeof cnt, "%lld", (long long)want);
    cr_assert(strstr(msg, cnt), "message does not carry the count: %s", msg);
    cr_assert_str_eq(nsa_status_code_name(rc), "invalid_selection");
    cr_assert(nsa_tu_is_poisoned(&c->o) && nsa_tu_is_poisoned(&c->lse), "outputs touched");
  }
}

Test(invalid, block_ids_each_kind) {
  nsa_tu_case_cfg_t cfg = {.B = 2, .S = 6, .Skv = 70, .G = 2, .h = 2, .Dk = 8, .Dv = 8, .n = 4,
                           .dtype = NSA_F32, .block_size = 16, .seed = 31};
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0); /* 5 blocks: 0..4 */
  c.sel_raw[0] = -2;          /* id < -1 */
  c.sel_raw[5] = 5;           /* id == nblocks */
  c.sel_raw[9] = INT32_MAX;   /* huge id */
  c.sel_raw[17] = INT32_MIN;  /* very negative */
  c.sel_raw[c.nsel - 1] = 6;  /* last entry */
  nsa_tu_case_sync_sel(&c);
  expect_invalid(&c, 5);
  cr_assert_eq(nsa_ref_count_invalid(&c.ref), 5);
  /* the same data in the backward is refused too */
  nsa_run_info_t info;
  char msg[256];
  cr_assert_eq(nsa_cpu_sel_bwd(&c.bwd, NULL, NSA_PATH_AUTO, &info, msg, sizeof msg),
               NSA_ERR_INVALID_SELECTION, "%s", msg);
  cr_assert_eq(info.invalid, 5);
  nsa_tu_case_teardown(&c);
}

Test(invalid, ranges_each_kind) {
  nsa_tu_case_cfg_t cfg = {.B = 1, .S = 5, .Skv = 40, .G = 3, .h = 1, .Dk = 8, .Dv = 4, .n = 3,
                           .dtype = NSA_BF16, .ranges = 1, .seed = 32};
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
  /* entry e occupies sel_raw[2e], sel_raw[2e+1] */
  c.sel_raw[0] = 9;  c.sel_raw[1] = 3;   /* start > end */
  c.sel_raw[6] = -1; c.sel_raw[7] = 4;   /* negative start */
  c.sel_raw[10] = -5; c.sel_raw[11] = -9; /* both: counted once */
  c.sel_raw[12] = 30; c.sel_raw[13] = 1000; /* end past Skv: valid (clipped) */
  c.sel_raw[14] = 7; c.sel_raw[15] = 7;   /* empty: valid */
  nsa_tu_case_sync_sel(&c);
  expect_invalid(&c, 3);
  nsa_tu_case_teardown(&c);
}

/* ---- path choice ---- */

Test(paths, choose_from_flags) {
  nsa_path_flags_t f;
  nsa_path_flags_default(&f);
  cr_assert_eq(nsa_choose_path(&f, 0), NSA_PATH_VARLEN_V2);
  cr_assert_eq(nsa_planner_for_flags(&f), NSA_PATH_VARLEN_V2);
  f.sel_varlen_min_l = 64;
  cr_assert_eq(nsa_choose_path(&f, 63), NSA_PATH_PACKED);
  cr_assert_eq(nsa_choose_path(&f, 64), NSA_PATH_VARLEN_V2);
  f.sel_varlen_v2 = 0;
  cr_assert_eq(nsa_choose_path(&f, 1), NSA_PATH_VARLEN_V1); /* MIN_L bypasses v2 only */
  cr_assert_eq(nsa_planner_for_flags(&f), NSA_PATH_VARLEN_V1);
  f.use_sel_varlen = 0;
  cr_assert_eq(nsa_choose_path(&f, 1000), NSA_PATH_PACKED);
  cr_assert_eq(nsa_planner_for_flags(&f), NSA_PATH_VARLEN_V2);
}

Test(paths, request_follows_flags) {
  nsa_tu_case_cfg_t cfg = {.B = 1, .S = 8, .Skv = 64, .G = 2, .h = 2, .Dk = 8, .Dv = 8, .n = 3,
                           .dtype = NSA_F32, .block_size = 16, .seed = 41};
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
  nsa_run_info_t info;
  char msg[256];
  nsa_path_flags_t f;
  nsa_path_flags_default(&f);
  cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, &f, NSA_PATH_AUTO, &info, msg, sizeof msg), NSA_OK);
  cr_assert_eq(info.path, NSA_PATH_VARLEN_V2);
  int32_t maxl = info.max_len;
  cr_assert(maxl > 0);
  cr_assert(info.mean_len > 0 && info.mean_len <= maxl);
  int64_t hs = 0;
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS; i++) hs += info.len_hist[i];
  cr_assert_eq(hs, info.rows);
  cr_assert(info.device_us >= info.plan_us && info.plan_us >= 0);
  cr_assert(info.workspace_bytes > 0);
  f.sel_varlen_min_l = maxl + 1;
  cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, &f, NSA_PATH_AUTO, &info, msg, sizeof msg), NSA_OK);
  cr_assert_eq(info.path, NSA_PATH_PACKED);
  f.sel_varlen_min_l = maxl;
  cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, &f, NSA_PATH_AUTO, &info, msg, sizeof msg), NSA_OK);
  cr_assert_eq(info.path, NSA_PATH_VARLEN_V2);
  f.sel_varlen_v2 = 0;
  cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, &f, NSA_PATH_AUTO, &info, msg, sizeof msg), NSA_OK);
  cr_assert_eq(info.path, NSA_PATH_VARLEN_V1);
  f.use_sel_varlen = 0;
  cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, &f, NSA_PATH_AUTO, &info, msg, sizeof msg), NSA_OK);
  cr_assert_eq(info.path, NSA_PATH_PACKED);
  /* force_path overrides the flags */
  cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, &f, NSA_PATH_VARLEN_V1, &info, msg, sizeof msg), NSA_OK);
  cr_assert_eq(info.path, NSA_PATH_VARLEN_V1);
  cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, &f, (nsa_path_t)7, &info, msg, sizeof msg),
               NSA_ERR_BAD_REQUEST);
  nsa_tu_case_teardown(&c);
}

/* ---- request checks ---- */

static void expect_bad(nsa_fwd_args_t *a, const char *needle) {
  nsa_dims_t d;
  char msg[256] = "";
  int rc = nsa_fwd_check(a, &d, msg, sizeof msg);
  cr_assert_eq(rc, NSA_ERR_BAD_REQUEST, "accepted; wanted an error naming '%s'", needle);
  cr_assert(strstr(msg, needle), "message '%s' does not name '%s'", msg, needle);
  nsa_run_info_t info;
  cr_assert_eq(nsa_cpu_sel_fwd(a, NULL, NSA_PATH_AUTO, &info, msg, sizeof msg), NSA_ERR_BAD_REQUEST);
}

Test(check, bad_requests_name_the_tensor) {
  nsa_tu_case_cfg_t cfg = {.B = 2, .S = 4, .Skv = 8, .G = 2, .h = 3, .Dk = 4, .Dv = 5, .n = 2,
                           .dtype = NSA_F16, .block_size = 4, .seed = 51};
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
  nsa_dims_t d;
  char msg[256];
  cr_assert_eq(nsa_fwd_check(&c.fwd, &d, msg, sizeof msg), NSA_OK, "%s", msg);
  cr_assert(d.H == 6 && d.h == 3 && d.G == 2 && d.rows == 16 && d.Dv == 5 && d.n == 2);
  cr_assert_eq(nsa_bwd_check(&c.bwd, &d, msg, sizeof msg), NSA_OK, "%s", msg);

  nsa_fwd_args_t a;
  a = c.fwd; a.q.ndim = 3; expect_bad(&a, "q:");
  a = c.fwd; a.k.ndim = 5; expect_bad(&a, "k:");
  a = c.fwd; a.lse.ndim = 4; expect_bad(&a, "lse:");
  a = c.fwd; a.sel.t.ndim = 5; expect_bad(&a, "block_indices:");
  a = c.fwd; a.q.shape[2] = 5; a.o.shape[2] = 5; a.lse.shape[2] = 5; expect_bad(&a, "multiple of G");
  a = c.fwd; a.k.shape[1] = 3; a.v.shape[1] = 3; expect_bad(&a, "Skv");
  a = c.fwd; a.v.dtype = NSA_F32; expect_bad(&a, "v:");
  a = c.fwd; a.o.dtype = NSA_BF16; expect_bad(&a, "o:");
  a = c.fwd; a.lse.dtype = NSA_F16; expect_bad(&a, "lse:");
  a = c.fwd; a.sel.t.dtype = NSA_F32; expect_bad(&a, "block_indices:");
  a = c.fwd; a.sel.block_size = 0; expect_bad(&a, "block_size");
  a = c.fwd; a.k.shape[3] = 3; expect_bad(&a, "k:");
  a = c.fwd; a.v.shape[2] = 1; expect_bad(&a, "v:");
  a = c.fwd; a.o.shape[3] = 4; expect_bad(&a, "o:");
  a = c.fwd; a.sel.t.shape[1] = 3; expect_bad(&a, "block_indices:");
  a = c.fwd; a.o.stride[1] = 0; expect_bad(&a, "o:");
  a = c.fwd; a.q.stride[0] = -1; expect_bad(&a, "q:");
  a = c.fwd; a.q.shape[0] = -2; expect_bad(&a, "q:");
  a = c.fwd; a.q.data = NULL; expect_bad(&a, "q:");
  a = c.fwd; a.q.stride[0] = INT64_MAX / 2; expect_bad(&a, "q:");
  a = c.fwd; a.k.shape[1] = a.v.shape[1] = INT64_MAX / 4; a.k.shape[0] = 2; expect_bad(&a, "k:");
  a = c.fwd; a.sel.kind = NSA_SEL_RANGES; expect_bad(&a, "ranges"); /* 4-d given for ranges */

  nsa_bwd_args_t b;
  b = c.bwd; b.lse.data = NULL;
  cr_assert_eq(nsa_bwd_check(&b, &d, msg, sizeof msg), NSA_ERR_BAD_REQUEST);
  cr_assert(strstr(msg, "lse"), "%s", msg);
  b = c.bwd; b.dk.shape[1] = 7;
  cr_assert_eq(nsa_bwd_check(&b, &d, msg, sizeof msg), NSA_ERR_BAD_REQUEST);
  cr_assert(strstr(msg, "dk"), "%s", msg);
  b = c.bwd; b.dout.dtype = NSA_F32;
  cr_assert_eq(nsa_bwd_check(&b, &d, msg, sizeof msg), NSA_ERR_BAD_REQUEST);
  cr_assert(strstr(msg, "do"), "%s", msg);
  b = c.bwd; b.dq.stride[2] = 0;
  cr_assert_eq(nsa_bwd_check(&b, &d, msg, sizeof msg), NSA_ERR_BAD_REQUEST);
  cr_assert(strstr(msg, "dq"), "%s", msg);
  nsa_tu_case_teardown(&c);
}

Test(check, empty_batch_is_ok) {
  nsa_tu_case_cfg_t cfg = {.B = 0, .S = 4, .Skv = 8, .G = 2, .h = 2, .Dk = 4, .Dv = 4, .n = 2,
                           .dtype = NSA_F32, .block_size = 4, .seed = 52};
  nsa_tu_case_t c;
  cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0);
  nsa_run_info_t info;
  char msg[256];
  for (int p = 0; p < NSA_PATH_COUNT; p++) {
    cr_assert_eq(nsa_cpu_sel_fwd(&c.fwd, NULL, (nsa_path_t)p, &info, msg, sizeof msg), NSA_OK, "%s", msg);
    cr_assert_eq(info.rows, 0);
  }
  nsa_tu_case_teardown(&c);
}

/* One bad kind at a time, a random number of entries each: exact counts. */
Test(invalid, exact_count_per_kind) {
  nsa_tu_rng_t r;
  nsa_tu_rng_seed(&r, 909);
  for (int kind = 0; kind < 5; kind++) {
    nsa_tu_case_cfg_t cfg = {.B = 2, .S = 5, .Skv = 50, .G = 2, .h = 1, .Dk = 4, .Dv = 4, .n = 3,
                             .dtype = NSA_F32, .ranges = kind >= 2, .block_size = 8,
                             .sel_flags = NSA_TU_SEL_UNUSED, .seed = 910 + (uint64_t)kind};
    nsa_tu_case_t c;
    cr_assert_eq(nsa_tu_case_init(&c, &cfg), 0); /* 7 blocks: ids 0..6 */
    int64_t entries = cfg.B * cfg.S * cfg.G * cfg.n, want = 0;
    for (int64_t e = 0; e < entries; e++) {
      if (nsa_tu_rng_int(&r, 0, 2)) continue;
      want++;
      switch (kind) {
        case 0: c.sel_raw[e] = -(int32_t)nsa_tu_rng_int(&r, 2, 1000); break;    /* id < -1 */
        case 1: c.sel_raw[e] = (int32_t)nsa_tu_rng_int(&r, 7, 1 << 30); break;   /* id >= nblocks */
        case 2: c.sel_raw[2 * e] = 20; c.sel_raw[2 * e + 1] = 19; break;          /* start > end */
        case 3: c.sel_raw[2 * e] = -3; c.sel_raw[2 * e + 1] = 10; break;          /* start < 0 */
        case 4: c.sel_raw[2 * e] = -1; c.sel_raw[2 * e + 1] = 0; break;           /* start < 0, [-1,0) */
      }
    }
    nsa_tu_case_sync_sel(&c);
    cr_assert(want > 0);
    cr_assert_eq(nsa_ref_count_invalid(&c.ref), want);
    expect_invalid(&c, want);
    nsa_tu_case_teardown(&c);
  }
}
