/*
 * test_metrics.c — the telemetry registry (daemon/metrics.c): Prometheus
 * text validity (every line through prom_check), counters/histograms/gauges
 * moving with recorded traffic, exact totals under concurrent recording while
 * rendering, the msgpack map form, the validator itself rejecting bad text,
 * and the shadow helpers (daemon/shadow.c) against an independent reference.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <msgpack.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flags.h"
#include "metrics.h"
#include "ops_testutil.h"
#include "prom_check.h"
#include "shadow.h"

static char *render_checked(nsad_metrics_t *m) {
  size_t len = 0;
  char *t = nsad_metrics_prometheus(m, &len);
  cr_assert_not_null(t);
  cr_assert_eq(strlen(t), len);
  char msg[512];
  cr_assert_eq(prom_check(t, len, msg, sizeof msg), 0, "invalid exposition: %s\n%s", msg, t);
  return t;
}

static double val(const char *text, const char *series) {
  double v = NAN;
  cr_assert_eq(prom_value(text, series, &v), 0, "series %s missing", series);
  return v;
}

Test(metrics, empty_registry_is_valid_and_complete) {
  nsad_metrics_t *m = nsad_metrics_new();
  char *t = render_checked(m);
  const char *fams[] = {
      "# TYPE nsad_requests_total counter",
      "# TYPE nsad_errors_total counter",
      "# TYPE nsad_request_duration_seconds histogram",
      "# TYPE nsad_device_seconds histogram",
      "# TYPE nsad_row_keys histogram",
      "# TYPE nsad_rows_total counter",
      "# TYPE nsad_sessions gauge",
      "# TYPE nsad_regions gauge",
      "# TYPE nsad_mapped_bytes gauge",
      "# TYPE nsad_workspace_bytes gauge",
      "# TYPE nsad_queue_depth gauge",
      "# TYPE nsad_flags_epoch gauge",
      "# TYPE nsad_flag_value gauge",
      "# TYPE nsad_shadow_comparisons_total counter",
      "# TYPE nsad_shadow_max_abs_diff gauge",
      "# TYPE nsad_shadow_max_rel_diff gauge",
      "# HELP nsad_requests_total ",
  };
  for (size_t i = 0; i < sizeof fams / sizeof fams[0]; i++)
    cr_expect(strstr(t, fams[i]) != NULL, "missing '%s'", fams[i]);
  cr_expect_eq(val(t, "nsad_sessions"), 0);
  cr_expect_eq(val(t, "nsad_rows_total{path=\"varlen_v2\"}"), 0);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_count{path=\"packed\"}"), 0);
  free(t);
  nsad_metrics_free(m);
}

Test(metrics, counters_histograms_gauges_move) {
  nsad_metrics_t *m = nsad_metrics_new();
  for (int i = 0; i < 7; i++) nsad_metrics_request(m, NSA_M_PING, -1, NSA_E_OK, 30e-6);
  nsad_metrics_request(m, NSA_M_SEL_FORWARD, NSA_PATH_VARLEN_V2, NSA_E_OK, 3e-3);
  nsad_metrics_request(m, NSA_M_SEL_FORWARD, NSA_PATH_VARLEN_V2, NSA_E_OK, 0.2);
  nsad_metrics_request(m, NSA_M_SEL_FORWARD, -1, NSA_E_OUT_OF_BOUNDS, 1e-4);
  nsad_metrics_request(m, NSA_M_FLAGS_SET, -1, NSA_E_PERMISSION_DENIED, 1e-5);
  nsad_metrics_request(m, NSA_M_SEL_BACKWARD, NSA_PATH_PACKED, NSA_E_OK, 50.0); /* > last bound */

  nsa_run_info_t info;
  memset(&info, 0, sizeof info);
  info.path = NSA_PATH_VARLEN_V2;
  info.rows = 100;
  info.mean_len = 40.5;
  info.device_us = 1500; /* 1.5 ms */
  info.workspace_bytes = 1 << 20;
  /* rows by length bucket: 10 rows len<=0? no: 0 in bucket 0; 30 in <=16, 60 in <=64 */
  info.len_hist[1] = 30;
  info.len_hist[3] = 60;
  info.len_hist[NSA_LEN_HIST_BUCKETS - 1] = 10;
  nsad_metrics_kernel(m, NSA_PATH_VARLEN_V2, &info);

  nsad_metrics_gauge_set(m, NSAD_G_SESSIONS, 3);
  nsad_metrics_gauge_add(m, NSAD_G_SESSIONS, -1);
  nsad_metrics_gauge_add(m, NSAD_G_MAPPED_BYTES, 4096);
  nsad_metrics_gauge_add(m, NSAD_G_MAPPED_BYTES, 8192);
  nsad_metrics_gauge_set(m, NSAD_G_QUEUE_DEPTH, 5);
  nsad_metrics_flag_value(m, NSAD_FLAG_SEL_VARLEN_MIN_L, "NSA_SEL_VARLEN_MIN_L", 128);
  nsad_metrics_flag_value(m, NSAD_FLAG_SEL_SHADOW_RATE, "NSA_SEL_SHADOW_RATE", 0.25);
  nsad_metrics_shadow(m, NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, 1e-7, 2e-6);
  nsad_metrics_shadow(m, NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, 5e-8, 3e-6);
  nsad_metrics_shadow(m, NSA_PATH_VARLEN_V2, NSA_PATH_PACKED, NAN, 0);

  char *t = render_checked(m);
  cr_expect_eq(val(t, "nsad_requests_total{method=\"ping\",path=\"none\",code=\"ok\"}"), 7);
  cr_expect_eq(
      val(t, "nsad_requests_total{method=\"sel_attn.forward\",path=\"varlen_v2\",code=\"ok\"}"), 2);
  cr_expect_eq(val(t, "nsad_requests_total{method=\"sel_attn.forward\",path=\"none\",code=\"out_of_bounds\"}"), 1);
  cr_expect_eq(val(t, "nsad_errors_total{code=\"out_of_bounds\"}"), 1);
  cr_expect_eq(val(t, "nsad_errors_total{code=\"permission_denied\"}"), 1);
  cr_expect_eq(val(t, "nsad_errors_total{code=\"busy\"}"), 0);
  const char *fr[] = {"code=\"ok\"", NULL};
  cr_expect_eq(prom_sum(t, "nsad_requests_total", fr), 10);
  /* latency histogram of path none: 7 pings at 30us, 1 at 100us, 1 at 10us */
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"none\",le=\"2.5e-05\"}"), 1);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"none\",le=\"5e-05\"}"), 8);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"none\",le=\"0.0001\"}"), 9);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_count{path=\"none\"}"), 9);
  cr_expect_float_eq(val(t, "nsad_request_duration_seconds_sum{path=\"none\"}"),
                     7 * 30e-6 + 1e-4 + 1e-5, 1e-12);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"varlen_v2\",le=\"0.0025\"}"), 0);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"varlen_v2\",le=\"0.005\"}"), 1);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"varlen_v2\",le=\"0.25\"}"), 2);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"packed\",le=\"10\"}"), 0);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_bucket{path=\"packed\",le=\"+Inf\"}"), 1);
  /* device time */
  cr_expect_eq(val(t, "nsad_device_seconds_bucket{path=\"varlen_v2\",le=\"0.001\"}"), 0);
  cr_expect_eq(val(t, "nsad_device_seconds_bucket{path=\"varlen_v2\",le=\"0.0025\"}"), 1);
  cr_expect_float_eq(val(t, "nsad_device_seconds_sum{path=\"varlen_v2\"}"), 1.5e-3, 1e-12);
  /* rows and row keys */
  cr_expect_eq(val(t, "nsad_rows_total{path=\"varlen_v2\"}"), 100);
  cr_expect_eq(val(t, "nsad_row_keys_bucket{path=\"varlen_v2\",le=\"0\"}"), 0);
  cr_expect_eq(val(t, "nsad_row_keys_bucket{path=\"varlen_v2\",le=\"16\"}"), 30);
  cr_expect_eq(val(t, "nsad_row_keys_bucket{path=\"varlen_v2\",le=\"64\"}"), 90);
  cr_expect_eq(val(t, "nsad_row_keys_bucket{path=\"varlen_v2\",le=\"+Inf\"}"), 100);
  cr_expect_eq(val(t, "nsad_row_keys_count{path=\"varlen_v2\"}"), 100);
  cr_expect_eq(val(t, "nsad_row_keys_sum{path=\"varlen_v2\"}"), 4050);
  /* gauges */
  cr_expect_eq(val(t, "nsad_sessions"), 2);
  cr_expect_eq(val(t, "nsad_mapped_bytes"), 12288);
  cr_expect_eq(val(t, "nsad_queue_depth"), 5);
  cr_expect_eq(val(t, "nsad_workspace_peak_bytes"), 1 << 20);
  cr_expect_eq(val(t, "nsad_flag_value{flag=\"NSA_SEL_VARLEN_MIN_L\"}"), 128);
  cr_expect_eq(val(t, "nsad_flag_value{flag=\"NSA_SEL_SHADOW_RATE\"}"), 0.25);
  /* shadow */
  cr_expect_eq(val(t, "nsad_shadow_comparisons_total{primary=\"varlen_v2\",shadow=\"varlen_v1\"}"), 2);
  cr_expect_eq(val(t, "nsad_shadow_max_abs_diff{primary=\"varlen_v2\",shadow=\"varlen_v1\"}"), 1e-7);
  cr_expect_eq(val(t, "nsad_shadow_max_rel_diff{primary=\"varlen_v2\",shadow=\"varlen_v1\"}"), 3e-6);
  cr_expect(isinf(val(t, "nsad_shadow_max_abs_diff{primary=\"varlen_v2\",shadow=\"packed\"}")),
            "a NaN difference is reported as +Inf");
  cr_expect_eq(nsad_metrics_requests(m, NSA_M_PING, -2, -1), 7);
  cr_expect_eq(nsad_metrics_requests(m, -1, NSA_PATH_VARLEN_V2, NSA_E_OK), 2);
  free(t);
  nsad_metrics_free(m);
}

Test(metrics, flags_attach_exports_values_and_epoch) {
  nsad_metrics_t *m = nsad_metrics_new();
  char msg[256];
  nsad_flags_t *f = nsad_flags_new(NULL, msg, sizeof msg);
  cr_assert_not_null(f);
  nsad_flags_attach_metrics(f, m);
  char *t = render_checked(m);
  cr_expect_eq(val(t, "nsad_flag_value{flag=\"NSA_SEL_VARLEN_V2\"}"), 1);
  cr_expect_eq(val(t, "nsad_flags_epoch"), (double)nsad_flags_epoch(f));
  free(t);
  const char *k[] = {"NSA_SEL_VARLEN_V2"};
  const char *v[] = {"0"};
  cr_assert_eq(nsad_flags_set_config(f, k, v, 1, msg, sizeof msg), 0);
  t = render_checked(m);
  cr_expect_eq(val(t, "nsad_flag_value{flag=\"NSA_SEL_VARLEN_V2\"}"), 0);
  cr_expect_eq(val(t, "nsad_flags_epoch"), (double)nsad_flags_epoch(f));
  free(t);
  nsad_flags_free(f);
  nsad_metrics_free(m);
}

typedef struct {
  nsad_metrics_t *m;
  int stop;
  int renders, bad;
  char msg[512];
} conc_t;

static void *recorder(void *arg) {
  conc_t *c = arg;
  /* Start only once the renderer has rendered: then recording and
   * rendering overlap however the threads are scheduled (a loaded CI
   * machine could otherwise finish all recording before the first render). */
  while (__atomic_load_n(&c->renders, __ATOMIC_ACQUIRE) == 0) sched_yield();
  nsa_run_info_t info;
  memset(&info, 0, sizeof info);
  info.rows = 3;
  info.len_hist[2] = 3;
  info.mean_len = 20;
  info.device_us = 7;
  for (int i = 0; i < 40000; i++) {
    nsad_metrics_request(c->m, NSA_M_SEL_FORWARD, NSA_PATH_VARLEN_V1, NSA_E_OK, 1e-4);
    nsad_metrics_kernel(c->m, NSA_PATH_VARLEN_V1, &info);
    nsad_metrics_gauge_add(c->m, NSAD_G_QUEUE_DEPTH, 1);
    nsad_metrics_gauge_add(c->m, NSAD_G_QUEUE_DEPTH, -0.5);
    nsad_metrics_shadow(c->m, NSA_PATH_VARLEN_V1, NSA_PATH_PACKED, i * 1e-9, 0);
  }
  return NULL;
}

static void *renderer(void *arg) {
  conc_t *c = arg;
  while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
    size_t len;
    char *t = nsad_metrics_prometheus(c->m, &len);
    char msg[512];
    if (!t || prom_check(t, len, msg, sizeof msg) != 0) {
      if (!c->bad++) snprintf(c->msg, sizeof c->msg, "%s", t ? msg : "render failed");
    }
    free(t);
    __atomic_fetch_add(&c->renders, 1, __ATOMIC_RELEASE);
  }
  return NULL;
}

Test(metrics, concurrent_recording_is_exact) {
  conc_t c = {.m = nsad_metrics_new()};
  pthread_t rec[4], ren;
  pthread_create(&ren, NULL, renderer, &c);
  for (int i = 0; i < 4; i++) pthread_create(&rec[i], NULL, recorder, &c);
  for (int i = 0; i < 4; i++) pthread_join(rec[i], NULL);
  __atomic_store_n(&c.stop, 1, __ATOMIC_RELEASE);
  pthread_join(ren, NULL);
  cr_expect_eq(c.bad, 0, "a render during recording was invalid: %s", c.msg);
  cr_expect_gt(c.renders, 0);
  char *t = render_checked(c.m);
  cr_expect_eq(val(t, "nsad_requests_total{method=\"sel_attn.forward\",path=\"varlen_v1\",code=\"ok\"}"),
               160000);
  cr_expect_eq(val(t, "nsad_request_duration_seconds_count{path=\"varlen_v1\"}"), 160000);
  cr_expect_eq(val(t, "nsad_rows_total{path=\"varlen_v1\"}"), 480000);
  cr_expect_eq(val(t, "nsad_row_keys_bucket{path=\"varlen_v1\",le=\"32\"}"), 480000);
  cr_expect_eq(val(t, "nsad_row_keys_sum{path=\"varlen_v1\"}"), 160000.0 * 60);
  cr_expect_eq(val(t, "nsad_queue_depth"), 80000);
  cr_expect_eq(val(t, "nsad_shadow_comparisons_total{primary=\"varlen_v1\",shadow=\"packed\"}"), 160000);
  cr_expect_float_eq(val(t, "nsad_shadow_max_abs_diff{primary=\"varlen_v1\",shadow=\"packed\"}"),
                     39999e-9, 1e-18);
  free(t);
  nsad_metrics_free(c.m);
}

Test(metrics, map_form_shape_matches_text) {
  nsad_metrics_t *m = nsad_metrics_new();
  nsad_metrics_request(m, NSA_M_HELLO, -1, NSA_E_OK, 2e-4);
  nsa_run_info_t info;
  memset(&info, 0, sizeof info);
  info.rows = 5;
  info.len_hist[4] = 5;
  info.mean_len = 100;
  info.device_us = 30;
  nsad_metrics_kernel(m, NSA_PATH_PACKED, &info);
  nsad_metrics_gauge_set(m, NSAD_G_REGIONS, 9);

  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  nsad_metrics_pack_map(m, &pk);
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  size_t off = 0;
  cr_assert_eq(msgpack_unpack_next(&u, sb.data, sb.size, &off), MSGPACK_UNPACK_SUCCESS);
  cr_expect_eq(off, sb.size);
  const msgpack_object *root = &u.data;
  cr_assert_eq(root->type, MSGPACK_OBJECT_MAP);
  cr_expect_geq(root->via.map.size, 16);
  for (uint32_t i = 0; i < root->via.map.size; i++) {
    const msgpack_object *fam = &root->via.map.ptr[i].val;
    cr_assert_eq(root->via.map.ptr[i].key.type, MSGPACK_OBJECT_STR);
    cr_assert_eq(fam->type, MSGPACK_OBJECT_MAP);
    const msgpack_object *ty = ops_map_get(fam, "type"), *sa = ops_map_get(fam, "samples");
    cr_assert(ty && sa && ops_map_get(fam, "help"));
    cr_assert_eq(sa->type, MSGPACK_OBJECT_ARRAY);
    int hist = ty->via.str.size == 9 && !memcmp(ty->via.str.ptr, "histogram", 9);
    for (uint32_t j = 0; j < sa->via.array.size; j++) {
      const msgpack_object *s = &sa->via.array.ptr[j];
      cr_assert_eq(ops_map_get(s, "labels")->type, MSGPACK_OBJECT_MAP);
      if (hist) {
        const msgpack_object *le = ops_map_get(s, "le"), *cn = ops_map_get(s, "counts");
        cr_assert(le && cn && ops_map_get(s, "sum") && ops_map_get(s, "count"));
        cr_assert_eq(cn->via.array.size, le->via.array.size + 1);
        cr_expect_eq(ops_num(&cn->via.array.ptr[cn->via.array.size - 1]),
                     ops_num(ops_map_get(s, "count")));
      } else {
        cr_assert_not_null(ops_map_get(s, "value"));
      }
    }
  }
  const msgpack_object *rk = ops_map_get(root, "nsad_row_keys");
  cr_assert_not_null(rk);
  const msgpack_object *sa = ops_map_get(rk, "samples");
  int found = 0;
  for (uint32_t j = 0; j < sa->via.array.size; j++) {
    const msgpack_object *s = &sa->via.array.ptr[j];
    const msgpack_object *p = ops_map_get(ops_map_get(s, "labels"), "path");
    if (p && p->via.str.size == 6 && !memcmp(p->via.str.ptr, "packed", 6)) {
      found = 1;
      cr_expect_eq(ops_num(ops_map_get(s, "count")), 5);
      cr_expect_eq(ops_num(ops_map_get(s, "sum")), 500);
      const msgpack_object *le = ops_map_get(s, "le");
      cr_expect_eq(le->via.array.size, NSA_LEN_HIST_BUCKETS - 1);
      cr_expect_eq(ops_num(&le->via.array.ptr[4]), (double)nsa_len_hist_le[4]);
    }
  }
  cr_expect(found);
  const msgpack_object *rg = ops_map_get(ops_map_get(root, "nsad_regions"), "samples");
  cr_expect_eq(ops_num(ops_map_get(&rg->via.array.ptr[0], "value")), 9);
  msgpack_unpacked_destroy(&u);
  msgpack_sbuffer_destroy(&sb);
  nsad_metrics_free(m);
}

Test(metrics, validator_rejects_bad_text) {
  const char *bad[] = {
      "nsad_x 1",                                               /* no final newline */
      "9bad 1\n",                                               /* name */
      "nsad_x{a=b} 1\n",                                        /* unquoted */
      "nsad_x{a=\"b\\t\"} 1\n",                                 /* bad escape */
      "nsad_x{a=\"b\",a=\"c\"} 1\n",                            /* dup label */
      "nsad_x one\n",                                           /* value */
      "nsad_x 1 2 3\n",                                         /* junk */
      "# TYPE nsad_c counter\nnsad_c 1\n",                      /* no _total */
      "# TYPE nsad_x gauge\n# TYPE nsad_x gauge\nnsad_x 1\n",   /* dup TYPE */
      "nsad_x 1\n# TYPE nsad_x gauge\n",                        /* TYPE after */
      "# TYPE nsad_x gauge\nnsad_x{a=\"1\"} 1\nnsad_y 2\nnsad_x{a=\"2\"} 1\n", /* split */
      "nsad_x{a=\"1\"} 1\nnsad_x{a=\"1\"} 2\n",                 /* dup series */
      "# TYPE nsad_x wibble\n",                                 /* type */
      "# TYPE nsad_h histogram\nnsad_h_bucket{le=\"1\"} 2\nnsad_h_bucket{le=\"+Inf\"} 1\n"
      "nsad_h_sum 1\nnsad_h_count 1\n",                         /* not cumulative */
      "# TYPE nsad_h histogram\nnsad_h_bucket{le=\"1\"} 2\nnsad_h_sum 1\nnsad_h_count 2\n",
      "# TYPE nsad_h histogram\nnsad_h_bucket{le=\"2\"} 1\nnsad_h_bucket{le=\"1\"} 1\n"
      "nsad_h_bucket{le=\"+Inf\"} 1\nnsad_h_sum 1\nnsad_h_count 1\n", /* order */
      "# TYPE nsad_h histogram\nnsad_h_bucket{le=\"+Inf\"} 2\nnsad_h_sum 1\nnsad_h_count 3\n",
      "# TYPE nsad_h histogram\nnsad_h_bucket{le=\"+Inf\"} 2\nnsad_h_count 2\n", /* no sum */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char msg[256] = "";
    cr_expect_neq(prom_check(bad[i], strlen(bad[i]), msg, sizeof msg), 0, "accepted #%zu: %s", i,
                  bad[i]);
  }
  const char *good =
      "# some comment\n"
      "# HELP nsad_h A \\\\ help\\n text.\n"
      "# TYPE nsad_h histogram\n"
      "nsad_h_bucket{p=\"a\\\"b\",le=\"0.5\"} 1\n"
      "nsad_h_bucket{p=\"a\\\"b\",le=\"+Inf\"} 2\n"
      "nsad_h_sum{p=\"a\\\"b\"} 1.5e-3\n"
      "nsad_h_count{p=\"a\\\"b\"} 2\n"
      "\n"
      "nsad_u{x=\"1\",} NaN 1700000000000\n";
  char msg[256] = "";
  cr_expect_eq(prom_check(good, strlen(good), msg, sizeof msg), 0, "%s", msg);
}

/* ---------------------------------------------------------- shadow --- */

static uint64_t rng_state = 0x1234567887654321ULL;
static double urand(void) {
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(rng_state >> 11) / 9007199254740992.0;
}

Test(shadow, compare_matches_float64_reference_strided) {
  /* primary: contiguous [4][5][3] f32; shadow: the same logical tensor
   * stored transposed ([3][5][4] memory, strides {1,4,20}) with noise. */
  enum { A = 4, B = 5, C = 3, N = A * B * C };
  float *p = malloc(N * sizeof *p), *s = malloc(N * sizeof *s);
  double ref_abs = 0, ref_rel = 0;
  for (int a = 0; a < A; a++)
    for (int b = 0; b < B; b++)
      for (int c = 0; c < C; c++) {
        float pv = (float)(urand() * 4 - 2);
        float sv = pv + (float)((urand() - 0.5) * 1e-3);
        p[(a * B + b) * C + c] = pv;
        s[c * A * B + b * A + a] = sv;
        double d = fabs((double)pv - (double)sv);
        double den = fmax(fmax(fabs((double)pv), fabs((double)sv)), NSAD_SHADOW_REL_FLOOR);
        ref_abs = fmax(ref_abs, d);
        ref_rel = fmax(ref_rel, d / den);
      }
  nsa_tensor_t tp = {.data = p, .dtype = NSA_F32, .ndim = 3, .shape = {A, B, C},
                     .stride = {B * C, C, 1}};
  nsa_tensor_t ts = {.data = s, .dtype = NSA_F32, .ndim = 3, .shape = {A, B, C},
                     .stride = {1, A, A * B}};
  nsad_shadow_diff_t d;
  nsad_shadow_diff_init(&d);
  d.max_abs = d.max_rel = NAN; /* poison: init must reset */
  nsad_shadow_diff_init(&d);
  cr_assert_eq(nsad_shadow_compare(&tp, &ts, &d), 0);
  cr_expect_eq(d.count, N);
  cr_expect_gt(ref_abs, 0);
  cr_expect_eq(d.max_abs, ref_abs);
  cr_expect_float_eq(d.max_rel, ref_rel, 1e-15);
  /* identical → 0; one NaN → inf; shape mismatch → error */
  nsad_shadow_diff_init(&d);
  cr_assert_eq(nsad_shadow_compare(&tp, &tp, &d), 0);
  cr_expect_eq(d.max_abs, 0);
  s[7] = NAN;
  nsad_shadow_diff_init(&d);
  cr_assert_eq(nsad_shadow_compare(&tp, &ts, &d), 0);
  cr_expect(isinf(d.max_abs) && d.mismatch_nan == 1);
  ts.shape[0] = 3;
  cr_expect_neq(nsad_shadow_compare(&tp, &ts, &d), 0);
  free(p);
  free(s);
}

Test(shadow, compare_half_types) {
  /* bf16 and f16 bit patterns decoded independently here */
  uint16_t bf[4] = {0x3f80, 0xc000, 0x3f81, 0x0000}; /* 1, -2, 1.0078125, 0 */
  uint16_t hf[4] = {0x3c00, 0xc000, 0x3c08, 0x0000}; /* 1, -2, 1.0078125, 0 */
  float f[4] = {1.0f, -2.0f, 1.0f, 0.0f};
  nsa_tensor_t tb = {.data = bf, .dtype = NSA_BF16, .ndim = 1, .shape = {4}, .stride = {1}};
  nsa_tensor_t th = {.data = hf, .dtype = NSA_F16, .ndim = 1, .shape = {4}, .stride = {1}};
  nsa_tensor_t tf = {.data = f, .dtype = NSA_F32, .ndim = 1, .shape = {4}, .stride = {1}};
  nsad_shadow_diff_t d;
  nsad_shadow_diff_init(&d);
  cr_assert_eq(nsad_shadow_compare(&tb, &th, &d), 0);
  cr_expect_eq(d.max_abs, 0, "bf16 and f16 encode the same values");
  nsad_shadow_diff_init(&d);
  cr_assert_eq(nsad_shadow_compare(&tb, &tf, &d), 0);
  cr_expect_eq(d.max_abs, 0.0078125);
  cr_expect_float_eq(d.max_rel, 0.0078125 / 1.0078125, 1e-15);
}

Test(shadow, choose_rate_and_pairs) {
  int hits = 0, seen[NSA_PATH_COUNT] = {0};
  for (uint64_t i = 0; i < 20000; i++) {
    cr_assert_eq(nsad_shadow_choose(0.0, NSA_PATH_VARLEN_V2, i), NSA_PATH_AUTO);
    nsa_path_t a = nsad_shadow_choose(1.0, NSA_PATH_VARLEN_V2, i);
    cr_assert(a == NSA_PATH_VARLEN_V1 || a == NSA_PATH_PACKED, "shadow %d", a);
    seen[a]++;
    nsa_path_t b = nsad_shadow_choose(0.3, NSA_PATH_PACKED, i);
    cr_assert_eq(b, nsad_shadow_choose(0.3, NSA_PATH_PACKED, i), "deterministic in seq");
    if (b != NSA_PATH_AUTO) {
      hits++;
      cr_assert_neq(b, NSA_PATH_PACKED);
    }
  }
  cr_expect(seen[NSA_PATH_VARLEN_V1] > 9000 && seen[NSA_PATH_PACKED] > 9000,
            "alternation: v1 %d packed %d", seen[NSA_PATH_VARLEN_V1], seen[NSA_PATH_PACKED]);
  cr_expect(hits > 0.28 * 20000 && hits < 0.32 * 20000, "rate 0.3 sampled %d of 20000", hits);
  cr_expect_eq(nsad_shadow_choose(1.0, NSA_PATH_AUTO, 1), NSA_PATH_AUTO);
}

Test(metrics, unknown_method_counted) {
  nsad_metrics_t *m = nsad_metrics_new();
  nsad_metrics_request(m, NSA_M_COUNT, -1, NSA_E_UNKNOWN_METHOD, 1e-5);
  nsad_metrics_request(m, (nsa_method_t)-5, -1, NSA_E_UNKNOWN_METHOD, 1e-5);
  char *t = render_checked(m);
  cr_expect_eq(val(t, "nsad_requests_total{method=\"unknown\",path=\"none\",code=\"unknown_method\"}"), 2);
  cr_expect_eq(val(t, "nsad_errors_total{code=\"unknown_method\"}"), 2);
  free(t);
  nsad_metrics_free(m);
}
