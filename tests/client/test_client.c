/*
 * test_client.c — libnsaclient and nsactl against a real nsad: reconnect
 * after a daemon restart (regions re-registered, same ids), a request in
 * flight when the daemon dies fails, submit/wait, subscriptions, label
 * rollout rules seen by sessions, and every nsactl command with --json.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <time.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

TestSuite(client, .fini = th_fini, .timeout = 300);

Test(client, open_without_daemon_fails_cleanly) {
  nsa_client_opts_t o = {.socket_path = "/tmp/nsad-test-nobody-here.sock", .reconnect_attempts = 2};
  nsa_client_t *c = (nsa_client_t *)1;
  cr_expect_eq(nsa_client_open(&c, &o), -1);
  cr_expect_null(c);
  cr_expect(strstr(nsa_client_open_error(), "disconnected") != NULL, "%s", nsa_client_open_error());
}

Test(client, reconnects_after_restart_with_same_region_ids) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "trainer");
  cr_assert_not_null(c);
  th_prob_t p, extra;
  /* a second region first, so the restarted daemon hands out different ids */
  cr_assert_eq(th_prob_init(&extra, c, 1, 4, 32, 1, 1, 8, 2, 8, 0, 3), 0);
  cr_assert_eq(th_prob_init(&p, c, 1, 16, 96, 2, 2, 16, 4, 16, 0, 9), 0);
  uint64_t id = p.shm->region;
  th_prob_fill(&p);
  nsa_client_result_t r;
  cr_assert_eq(nsa_client_forward(c, &p.fwd, &r), 0);
  th_prob_free(&extra, c); /* unregistered: not re-registered later */
  cr_assert_eq(th_stop(&d, 0), 0);
  d.pid = th_spawn(&d, d.sock, NULL, 1);
  cr_assert_gt(d.pid, 0);
  th_prob_fill(&p);
  cr_expect_eq(nsa_client_forward(c, &p.fwd, &r), 0, "%s: %s", nsa_client_error_code(c),
               nsa_client_error_message(c));
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  cr_expect_eq(nsa_client_connections(c), 2);
  cr_expect_eq(p.shm->region, id, "the caller's region id did not change");
  cr_expect_eq(nsa_client_ping(c), 0);
  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(client, request_in_flight_when_daemon_dies_fails) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "trainer");
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, c, 2, 128, 1024, 2, 8, 64, 16, 32, 0, 5), 0);
  th_prob_fill(&p);
  uint32_t t[4];
  for (int i = 0; i < 4; i++) cr_assert_eq(nsa_client_forward_submit(c, &p.fwd, &t[i]), 0);
  cr_assert_eq(nsa_client_ping(c), 0);
  kill(d.pid, SIGKILL);
  cr_expect_eq(th_wait_exit(d.pid, 10000), 128 + SIGKILL);
  d.pid = 0;
  int failed = 0;
  for (int i = 0; i < 4; i++) {
    nsa_client_result_t r;
    if (nsa_client_wait(c, t[i], &r) != 0) {
      failed++;
      cr_expect_str_eq(nsa_client_error_code(c), "disconnected");
    }
  }
  cr_expect_gt(failed, 0, "at least the unfinished requests fail");
  /* the next call after a restart reconnects */
  d.pid = th_spawn(&d, d.sock, NULL, 1);
  cr_assert_gt(d.pid, 0);
  cr_expect_eq(nsa_client_ping(c), 0, "%s", nsa_client_error_message(c));
  th_prob_fill(&p);
  nsa_client_result_t r;
  cr_expect_eq(nsa_client_forward(c, &p.fwd, &r), 0, "%s", nsa_client_error_message(c));
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(client, subscribe_gets_metrics_notifications) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "watcher");
  cr_assert_eq(nsa_client_subscribe(c, 50), 0);
  for (int i = 0; i < 3; i++) {
    char method[32];
    nsa_client_value_t *v = NULL;
    cr_assert_eq(nsa_client_next_notification(c, 3000, method, &v), 0, "%s",
                 nsa_client_error_message(c));
    cr_expect_str_eq(method, "metrics");
    cr_expect_gt(nsa_client_value_len(v, "nsad_requests_total.samples"), 0);
    nsa_client_value_free(v);
  }
  cr_expect_eq(nsa_client_ping(c), 0, "replies still arrive between notifications");
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(client, subscription_survives_daemon_restart) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "watcher");
  cr_assert_not_null(c);
  cr_assert_eq(nsa_client_subscribe(c, 50), 0);
  char method[32];
  nsa_client_value_t *v = NULL;
  cr_assert_eq(nsa_client_next_notification(c, 3000, method, &v), 0, "%s",
               nsa_client_error_message(c));
  nsa_client_value_free(v);
  cr_assert_eq(th_stop(&d, 0), 0);
  d.pid = th_spawn(&d, d.sock, NULL, 1);
  cr_assert_gt(d.pid, 0);
  /* The next call reconnects; the new daemon must be streaming again. */
  cr_assert_eq(nsa_client_ping(c), 0, "%s", nsa_client_error_message(c));
  cr_expect_eq(nsa_client_connections(c), 2);
  v = NULL;
  cr_expect_eq(nsa_client_next_notification(c, 3000, method, &v), 0,
               "no metrics notification after the reconnect: %s", nsa_client_error_message(c));
  if (v) nsa_client_value_free(v);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(client, label_rule_selects_path_per_session) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *admin = th_client(&d, "admin");
  nsa_client_label_t match[] = {{"role", "canary"}};
  uint64_t epoch;
  cr_assert_eq(nsa_client_flags_set(admin, "NSA_SEL_VARLEN_V2", "0", -1, match, 1, &epoch), 0);
  nsa_client_label_t lc[] = {{"role", "canary"}}, lp[] = {{"role", "prod"}};
  nsa_client_t *canary = th_client_labels(&d, "c", lc, 1), *prod = th_client_labels(&d, "p", lp, 1);
  th_prob_t pc, pp;
  cr_assert_eq(th_prob_init(&pc, canary, 1, 8, 64, 1, 2, 16, 3, 16, 0, 1), 0);
  cr_assert_eq(th_prob_init(&pp, prod, 1, 8, 64, 1, 2, 16, 3, 16, 0, 2), 0);
  th_prob_fill(&pc);
  th_prob_fill(&pp);
  nsa_client_result_t rc, rp;
  cr_assert_eq(nsa_client_forward(canary, &pc.fwd, &rc), 0);
  cr_assert_eq(nsa_client_forward(prod, &pp.fwd, &rp), 0);
  cr_expect_str_eq(rc.path, "varlen_v1");
  cr_expect_str_eq(rp.path, "varlen_v2");
  cr_expect_eq(rc.flags_epoch, epoch);
  cr_expect_leq(th_prob_check_fwd(&pc), 1e-5);
  cr_expect_leq(th_prob_check_fwd(&pp), 1e-5);
  th_prob_free(&pc, canary);
  th_prob_free(&pp, prod);
  nsa_client_close(canary);
  nsa_client_close(prod);
  nsa_client_close(admin);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* Runs nsactl; returns its exit status and stdout (malloc'd). */
static int nsactl(const th_nsad_t *d, const char *args, char **out) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "%s --socket %s %s 2>/dev/null", NSACTL_BIN, d->sock, args);
  FILE *f = popen(cmd, "r");
  if (!f) return -1;
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  size_t r;
  while ((r = fread(buf + n, 1, cap - n - 1, f)) > 0) {
    n += r;
    if (n + 1 >= cap) buf = realloc(buf, cap *= 2);
  }
  buf[n] = 0;
  int st = pclose(f);
  if (out)
    *out = buf;
  else
    free(buf);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(client, nsactl_commands) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  char *o = NULL;
  cr_expect_eq(nsactl(&d, "--json ping", &o), 0);
  cr_expect(strstr(o, "\"ok\":true") && strstr(o, "rtt_ms"), "%s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "--json status", &o), 0);
  cr_expect(strstr(o, "\"backend\":\"cpu\"") && strstr(o, "\"flags_epoch\""), "%s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "status", &o), 0);
  cr_expect(strstr(o, "backend:") != NULL, "%s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "--json flags set NSA_SEL_VARLEN_MIN_L=64 --percent 30 --match team=a", &o), 0);
  cr_expect(strstr(o, "\"epoch\":") != NULL, "%s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "--json flags get", &o), 0);
  cr_expect(strstr(o, "\"NSA_SEL_VARLEN_MIN_L\":{\"value\":64") != NULL, "%s", o);
  cr_expect(strstr(o, "\"percent\":30") != NULL, "%s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "flags get", &o), 0);
  cr_expect(strstr(o, "NSA_SEL_VARLEN_MIN_L") && strstr(o, "runtime"), "%s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "flags set NSA_SEL_VARLEN_V2=perhaps", NULL), 1, "bad value: exit 1");
  cr_expect_eq(nsactl(&d, "flags reset NSA_SEL_VARLEN_MIN_L", &o), 0);
  free(o);
  cr_expect_eq(nsactl(&d, "metrics --prometheus", &o), 0);
  cr_expect(strstr(o, "# TYPE nsad_requests_total counter") != NULL, "%.400s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "--json metrics", &o), 0);
  cr_expect(o[0] == '{' && strstr(o, "\"nsad_sessions\"") != NULL, "%.400s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "metrics", &o), 0);
  cr_expect(strstr(o, "nsad_requests_total{") != NULL, "%.400s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "top --count 2 --interval 100", &o), 0);
  cr_expect(strstr(o, "varlen_v2") && strstr(o, "NSA_SEL_VARLEN_V2"), "%.600s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "--json top --count 2 --interval 100", &o), 0);
  cr_expect(strstr(o, "\"paths\"") != NULL, "%.600s", o);
  free(o);
  cr_expect_eq(nsactl(&d, "frobnicate", NULL), 2, "unknown command: usage, exit 2");
  cr_expect_eq(nsactl(&d, "--json shutdown", &o), 0);
  free(o);
  int rc = th_wait_exit(d.pid, 20000);
  d.pid = 0;
  cr_expect_eq(rc, 0, "nsad exits 0 after nsactl shutdown");
  th_stop(&d, 1);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

Test(client, close_after_daemon_death_is_quick_and_unlinks) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  nsa_client_shm_t *s;
  cr_assert_eq(nsa_client_shm_create(c, 4096, &s), 0);
  char path[128];
  snprintf(path, sizeof path, "/dev/shm%s", s->name);
  cr_assert_eq(access(path, F_OK), 0);
  kill(d.pid, SIGKILL);
  th_wait_exit(d.pid, 10000);
  d.pid = 0;
  double t0 = now_s();
  nsa_client_close(c);
  cr_expect_lt(now_s() - t0, 1.0, "no reconnect attempts just to unregister");
  cr_expect_neq(access(path, F_OK), 0, "the shm object is unlinked");
  th_stop(&d, 1);
}

Test(client, region_lost_across_restart_is_not_found_others_work) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  /* an object the caller owns and registers by name */
  char name[64];
  snprintf(name, sizeof name, "/nsa-test-own-%d", (int)getpid());
  int fd = shm_open(name, O_RDWR | O_CREAT | O_TRUNC, 0600);
  cr_assert_geq(fd, 0);
  cr_assert_eq(ftruncate(fd, 1 << 16), 0);
  close(fd);
  uint64_t own;
  cr_assert_eq(nsa_client_region_register_shm(c, name, 1 << 16, &own), 0);
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, c, 1, 8, 64, 1, 2, 16, 3, 16, 0, 6), 0);
  cr_assert_eq(th_stop(&d, 0), 0);
  shm_unlink(name); /* gone before the daemon comes back */
  d.pid = th_spawn(&d, d.sock, NULL, 1);
  cr_assert_gt(d.pid, 0);
  nsa_client_result_t r;
  th_prob_fill(&p);
  cr_expect_eq(nsa_client_forward(c, &p.fwd, &r), 0, "%s: %s", nsa_client_error_code(c),
               nsa_client_error_message(c));
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  nsa_client_fwd_t bad = p.fwd;
  bad.o.region = own;
  bad.o.offset = 0;
  cr_expect_eq(nsa_client_forward(c, &bad, &r), -1);
  cr_expect_str_eq(nsa_client_error_code(c), "not_found");
  th_prob_free(&p, c);
  nsa_client_region_unregister(c, own);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(client, cuda_registrations_and_exec_options_on_the_cpu_backend) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  if (strcmp(nsa_client_info(c)->backend, "cpu")) {
    nsa_client_close(c);
    th_stop(&d, 1);
    cr_skip_test("backend is %s", nsa_client_info(c)->backend);
  }
  uint8_t h[64];
  memset(h, 0x5a, sizeof h);
  uint64_t id;
  cr_expect_eq(nsa_client_region_register_cuda_ipc(c, 0, h, 1 << 20, &id), -1);
  cr_expect_str_eq(nsa_client_error_code(c), "unsupported");
  cr_expect_eq(nsa_client_event_register(c, 0, h, &id), -1);
  cr_expect_str_eq(nsa_client_error_code(c), "unsupported");
  /* sync=false is served synchronously by the cpu backend */
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, c, 1, 8, 64, 1, 2, 16, 3, 16, 0, 12), 0);
  th_prob_fill(&p);
  nsa_client_exec_t ex = {.async = 1};
  nsa_client_result_t r;
  uint32_t tk;
  cr_assert_eq(nsa_client_forward_submit_ex(c, &p.fwd, &ex, &tk), 0);
  cr_expect_eq(nsa_client_wait(c, tk, &r), 0, "%s", nsa_client_error_message(c));
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  /* an event id this session does not have */
  ex.has_wait_event = 1;
  ex.wait_event = 4242;
  cr_assert_eq(nsa_client_forward_submit_ex(c, &p.fwd, &ex, &tk), 0);
  cr_expect_eq(nsa_client_wait(c, tk, &r), -1);
  cr_expect_str_eq(nsa_client_error_code(c), "not_found");
  /* device pointers without a CUDA driver (or with one, a host pointer) fail cleanly */
  nsa_client_tensor_t t;
  int64_t shape[1] = {16};
  cr_expect_eq(nsa_client_cuda_tensor(c, p.q, NSA_CLIENT_F32, 1, shape, &t), -1);
  cr_expect(!strcmp(nsa_client_error_code(c), "unsupported") ||
                !strcmp(nsa_client_error_code(c), "invalid_argument"),
            "%s: %s", nsa_client_error_code(c), nsa_client_error_message(c));
  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* NSACLIENT_SPIN_US: replies and forwards work with the spin off, at its
 * maximum, and with values the client must clamp or ignore; a reply that
 * never comes still ends at the call's timeout, spin or not. */
Test(client, reply_spin_settings) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  const char *vals[] = {"0", "1", "10000", "999999", "-7", "abc"};
  for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
    setenv("NSACLIENT_SPIN_US", vals[i], 1);
    nsa_client_t *c = th_client(&d, "spinner");
    cr_assert_not_null(c, "open with NSACLIENT_SPIN_US=%s", vals[i]);
    for (int k = 0; k < 50; k++) cr_assert_eq(nsa_client_ping(c), 0, "%s", nsa_client_error_message(c));
    th_prob_t p;
    cr_assert_eq(th_prob_init(&p, c, 1, 32, 256, 2, 4, 64, 16, 8, 0, 40 + (int)i), 0);
    th_prob_fill(&p);
    nsa_client_result_t r;
    cr_expect_eq(nsa_client_forward(c, &p.fwd, &r), 0, "%s", nsa_client_error_message(c));
    cr_expect_leq(th_prob_check_fwd(&p), 1e-5, "NSACLIENT_SPIN_US=%s", vals[i]);
    th_prob_free(&p, c);
    nsa_client_close(c);
  }
  /* a stopped daemon never answers: the call must still time out */
  setenv("NSACLIENT_SPIN_US", "10000", 1);
  nsa_client_opts_t o = {.socket_path = d.sock, .name = "spinner", .timeout_ms = 300,
                         .reconnect_attempts = 1};
  nsa_client_t *c = NULL;
  cr_assert_eq(nsa_client_open(&c, &o), 0);
  kill(d.pid, SIGSTOP);
  const int rc = nsa_client_ping(c);
  kill(d.pid, SIGCONT);
  cr_expect_neq(rc, 0, "ping answered by a stopped daemon?");
  cr_expect_str_eq(nsa_client_error_code(c), "timeout");
  nsa_client_close(c);
  unsetenv("NSACLIENT_SPIN_US");
  cr_expect_eq(th_stop(&d, 1), 0);
}
