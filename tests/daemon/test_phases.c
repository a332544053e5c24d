/*
 * test_phases.c — nsad's per-phase request timing (metrics.h nsad_phase_t,
 * docs/DAEMON.md "Forward overhead on the CUDA backend"), against a real nsad
 * on the CPU backend:
 *   - metrics.get has nsad_request_phase_seconds with every (sync, phase), in
 *     order, each counted once per sel_attn request of that sync flag, and
 *     the phase sums add up to the total (the phases tile the timeline);
 *   - the debug log has one "phases_us" line per request whose phases are
 *     non-negative (stamps in timeline order), add up to its total, and whose
 *     backend phase brackets the kernel's own time (device_us on cpu);
 *   - requests that are not sel_attn (ping) are not counted.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

TestSuite(phases, .fini = th_fini, .timeout = 300);

static const char *const k_phases[] = {"decode", "submit", "queue",    "backend",
                                       "post",   "complete", "reply", "total"};
#define NPHASE 8

static int forward_ok(nsa_client_t *c, th_prob_t *p) {
  th_prob_fill(p);
  nsa_client_result_t r;
  if (nsa_client_forward(c, &p->fwd, &r) != 0) {
    fprintf(stderr, "forward: %s: %s\n", nsa_client_error_code(c), nsa_client_error_message(c));
    return 0;
  }
  double e = th_prob_check_fwd(p);
  return e <= 1e-5;
}

/* One parsed "phases_us" log line. */
typedef struct {
  double v[NPHASE];
  double device_us, read_at;
  unsigned msgid;
} line_t;

static int parse_line(const char *l, line_t *o) {
  const char *p = strstr(l, "msgid ");
  if (!p || sscanf(p, "msgid %u", &o->msgid) != 1) return -1;
  if (!(p = strstr(l, "device_us=")) || sscanf(p, "device_us=%lf", &o->device_us) != 1) return -1;
  if (!(p = strstr(l, "phases_us "))) return -1;
  for (int i = 0; i < NPHASE; i++) {
    char key[32];
    snprintf(key, sizeof key, " %s=", k_phases[i]);
    const char *q = strstr(p, key);
    if (!q || sscanf(q + strlen(key), "%lf", &o->v[i]) != 1) return -1;
  }
  if (!(p = strstr(l, "read_at_us=")) || sscanf(p, "read_at_us=%lf", &o->read_at) != 1) return -1;
  return 0;
}

Test(phases, forward_phases_reported_and_ordered) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "phases");
  cr_assert_not_null(c);
  th_prob_t p;
  /* big enough that the kernel (backend phase) takes a measurable time */
  cr_assert_eq(th_prob_init(&p, c, 1, 64, 1024, 2, 4, 64, 8, 32, 0, 77), 0);
  enum { N = 6, NA = 2 }; /* N sync=true forwards, then NA sync=false */
  for (int i = 0; i < N; i++) {
    cr_assert(forward_ok(c, &p), "forward %d", i);
    cr_assert_eq(nsa_client_ping(c), 0); /* not a sel_attn request: not counted */
  }
  for (int i = 0; i < NA; i++) { /* the cpu backend runs these synchronously too */
    th_prob_fill(&p);
    nsa_client_exec_t ex = {.async = 1};
    uint32_t t;
    nsa_client_result_t r;
    cr_assert_eq(nsa_client_forward_submit_ex(c, &p.fwd, &ex, &t), 0);
    cr_assert_eq(nsa_client_wait(c, t, &r), 0, "sync=false forward: %s",
                 nsa_client_error_message(c));
    cr_assert(th_prob_check_fwd(&p) <= 1e-5);
  }

  nsa_client_value_t *m = NULL;
  cr_assert_eq(nsa_client_metrics_get(c, &m), 0, "metrics.get: %s", nsa_client_error_message(c));
  const char *fam = "nsad_request_phase_seconds";
  char path[160], buf[64];
  snprintf(path, sizeof path, "%s.samples", fam);
  cr_assert_eq(nsa_client_value_len(m, path), 2 * NPHASE, "one sample per (sync, phase)");
  snprintf(path, sizeof path, "%s.type", fam);
  cr_assert_eq(nsa_client_value_get_str(m, path, buf, sizeof buf), 0);
  cr_expect_str_eq(buf, "histogram");
  double sum[2][NPHASE];
  for (int sy = 0; sy < 2; sy++)
    for (int i = 0; i < NPHASE; i++) {
      int k = sy * NPHASE + i;
      snprintf(path, sizeof path, "%s.samples.%d.labels.phase", fam, k);
      cr_assert_eq(nsa_client_value_get_str(m, path, buf, sizeof buf), 0);
      cr_expect_str_eq(buf, k_phases[i], "phase %d in timeline order", i);
      snprintf(path, sizeof path, "%s.samples.%d.labels.sync", fam, k);
      cr_assert_eq(nsa_client_value_get_str(m, path, buf, sizeof buf), 0);
      cr_expect_str_eq(buf, sy ? "1" : "0");
      int64_t count = -1;
      snprintf(path, sizeof path, "%s.samples.%d.count", fam, k);
      cr_assert_eq(nsa_client_value_get_int(m, path, &count), 0);
      cr_expect_eq(count, sy ? N : NA, "sync=%d phase %s counted once per forward (no pings)",
                   sy, k_phases[i]);
      snprintf(path, sizeof path, "%s.samples.%d.sum", fam, k);
      cr_assert_eq(nsa_client_value_get_double(m, path, &sum[sy][i]), 0);
      cr_expect(sum[sy][i] >= 0, "phase %s sum %g", k_phases[i], sum[sy][i]);
    }
  nsa_client_value_free(m);
  for (int sy = 0; sy < 2; sy++) {
    double parts = 0;
    for (int i = 0; i < NPHASE - 1; i++) parts += sum[sy][i];
    /* sums are kept in integer ns: at most 0.5 ns of rounding per observation */
    cr_expect(fabs(parts - sum[sy][NPHASE - 1]) <= NPHASE * N * 1e-9,
              "sync=%d: phases add up to the total: %.9f vs %.9f s", sy, parts,
              sum[sy][NPHASE - 1]);
    cr_expect(sum[sy][3] > 0, "sync=%d: the backend phase took time", sy);
    cr_expect(sum[sy][NPHASE - 1] >= sum[sy][3], "total >= backend");
  }

  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_assert_eq(th_stop(&d, 0), 0);

  /* the debug log: one line per forward, in request order */
  FILE *f = fopen(d.log, "r");
  cr_assert_not_null(f);
  char l[4096];
  int n = 0;
  double prev_read = -1;
  while (fgets(l, sizeof l, f)) {
    if (!strstr(l, "sel_attn.forward") || !strstr(l, "phases_us")) continue;
    line_t x;
    cr_assert_eq(parse_line(l, &x), 0, "unparseable phase line: %s", l);
    double parts_us = 0;
    for (int i = 0; i < NPHASE; i++)
      cr_expect(x.v[i] >= 0, "msgid %u: phase %s = %.1f us", x.msgid, k_phases[i], x.v[i]);
    for (int i = 0; i < NPHASE - 1; i++) parts_us += x.v[i];
    /* each printed with %.1f: 7 roundings of <= 0.05 us, one of the total */
    cr_expect(fabs(parts_us - x.v[NPHASE - 1]) <= 0.45, "msgid %u: phases %.1f vs total %.1f",
              x.msgid, parts_us, x.v[NPHASE - 1]);
    cr_expect(x.v[3] + 0.1 >= x.device_us, "msgid %u: backend %.1f us < kernel %.1f us", x.msgid,
              x.v[3], x.device_us);
    cr_expect(x.read_at > prev_read, "read stamps increase from request to request");
    prev_read = x.read_at;
    n++;
  }
  fclose(f);
  cr_expect_eq(n, N + NA, "one phase line per forward");
  th_stop(&d, 1); /* removes the temp dir (the daemon is already gone) */
}

/* NSAD_SPIN_US (opt-in busy polling of the loop and the workers): requests
 * are served correctly and timed, and nsad still shuts down cleanly (the
 * workers' poll must see the stop, the loop's must notice it has no handles
 * left). A bad value is refused at start. */
Test(phases, spin_mode_serves_and_stops) {
  setenv("NSAD_SPIN_US", "20000", 1);
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "spin");
  cr_assert_not_null(c);
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, c, 1, 16, 512, 2, 2, 32, 4, 32, 0, 5), 0);
  for (int i = 0; i < 4; i++) {
    cr_assert(forward_ok(c, &p), "forward %d", i);
    if (i == 1) usleep(60000); /* past the window: the loop and worker sleep again */
  }
  nsa_client_value_t *m = NULL;
  cr_assert_eq(nsa_client_metrics_get(c, &m), 0);
  int64_t count = -1;
  cr_assert_eq(nsa_client_value_get_int(m, "nsad_request_phase_seconds.samples.15.count", &count),
               0);
  cr_expect_eq(count, 4, "sync=true total counted per forward");
  nsa_client_value_free(m);
  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 0), 0, "clean exit while spinning");
  FILE *f = fopen(d.log, "r");
  cr_assert_not_null(f);
  char l[4096];
  int said = 0;
  while (fgets(l, sizeof l, f)) said |= strstr(l, "busy-polling for 20000 us") != NULL;
  fclose(f);
  cr_expect(said, "the spin window is logged at start");
  th_stop(&d, 1);

  setenv("NSAD_SPIN_US", "soon", 1);
  th_nsad_t bad;
  cr_expect_neq(th_start(&bad, NULL), 0, "NSAD_SPIN_US=soon refused");
  th_stop(&bad, 1);
  unsetenv("NSAD_SPIN_US");
}
