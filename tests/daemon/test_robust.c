/*
 * test_robust.c — nsad under abuse, load and lifecycle events, against a
 * real daemon: garbage bytes and oversize messages close only that
 * connection; 16 concurrent clients x 50 requests; a client SIGKILLed
 * mid-request; another session's region; a shrunk shm object; backpressure;
 * SIGTERM with requests in flight; a live nsad on the same socket refuses to
 * start; a stale socket file is replaced; registrations abandoned while
 * their region opens off the loop.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <fcntl.h>
#include <math.h>
#include <sys/mman.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

TestSuite(robust, .fini = th_fini, .timeout = 300);

/* A client with a small problem that checks one forward end to end. */
static int forward_ok(nsa_client_t *c, th_prob_t *p) {
  th_prob_fill(p);
  nsa_client_result_t r;
  if (nsa_client_forward(c, &p->fwd, &r) != 0) {
    fprintf(stderr, "forward: %s: %s\n", nsa_client_error_code(c), nsa_client_error_message(c));
    return 0;
  }
  double e = th_prob_check_fwd(p);
  if (!(e <= 1e-5)) fprintf(stderr, "forward rel err %g\n", e);
  return e <= 1e-5;
}

Test(robust, garbage_closes_only_that_connection) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *a = th_client(&d, "bystander");
  cr_assert_not_null(a);
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 1, 8, 64, 1, 2, 16, 3, 16, 0, 11), 0);
  cr_assert(forward_ok(a, &p));
  /* 0xc1 is never valid msgpack */
  int fd = th_raw_connect(d.sock);
  cr_assert_geq(fd, 0);
  const unsigned char junk[] = {0xc1, 0xc1, 0xff, 0x00, 'G', 'E', 'T', ' ', '/'};
  th_raw_send(fd, junk, sizeof junk);
  cr_expect(th_raw_wait_closed(fd, 5000), "garbage connection closed");
  close(fd);
  /* valid msgpack but not an RPC array */
  fd = th_raw_connect(d.sock);
  const unsigned char notrpc[] = {0x93, 0x07, 0x07, 0x07}; /* [7, 7, 7] */
  th_raw_send(fd, notrpc, sizeof notrpc);
  cr_expect(th_raw_wait_closed(fd, 5000), "non-RPC connection closed");
  close(fd);
  cr_expect(forward_ok(a, &p), "the other client keeps working");
  cr_expect_eq(nsa_client_ping(a), 0);
  th_prob_free(&p, a);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(robust, oversize_message_gets_error_then_close) {
  th_nsad_t d;
  const char *args[] = {"--max-message", "4096", NULL};
  cr_assert_eq(th_start(&d, args), 0);
  nsa_client_t *a = th_client(&d, "bystander");
  cr_assert_not_null(a);
  int fd = th_raw_connect(d.sock);
  cr_assert_geq(fd, 0);
  nsa_proto_decoder_t *dec = nsa_proto_decoder_new(1u << 20);
  uint32_t id;
  char code[32];
  th_raw_hello(fd, 1);
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  /* [0, 42, "ping", {"pad": <64 KiB string>}] */
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request_begin(&w, 42, "ping");
  msgpack_pack_map(&w.pk, 1);
  static char pad[65536];
  memset(pad, 'x', sizeof pad);
  nsa_proto_pack_str(&w.pk, "pad");
  msgpack_pack_str(&w.pk, sizeof pad);
  msgpack_pack_str_body(&w.pk, pad, sizeof pad);
  th_raw_send(fd, w.sbuf.data, w.sbuf.size);
  nsa_proto_writer_destroy(&w);
  int rc = th_raw_response(fd, dec, 5000, &id, code, sizeof code);
  cr_expect_eq(rc, 1, "an error response for the known msgid");
  if (rc == 1) {
    cr_expect_eq(id, 42);
    cr_expect_str_eq(code, "bad_request");
  }
  cr_expect(th_raw_wait_closed(fd, 5000), "then the connection is closed");
  nsa_proto_decoder_free(dec);
  close(fd);
  cr_expect_eq(nsa_client_ping(a), 0, "the other client keeps working");
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

typedef struct {
  const th_nsad_t *d;
  int index, ok, fail;
} worker_t;

static void *worker(void *arg) {
  worker_t *w = arg;
  char name[32], lab[16];
  snprintf(name, sizeof name, "w%d", w->index);
  snprintf(lab, sizeof lab, "%d", w->index);
  nsa_client_label_t labels[] = {{"rank", lab}};
  nsa_client_t *c = th_client_labels(w->d, name, labels, 1);
  if (!c) {
    w->fail = 50;
    return NULL;
  }
  th_prob_t p;
  if (th_prob_init(&p, c, 1, 6 + w->index % 5, 48, 1, 1 + w->index % 3, 8, 3, 8, w->index & 1,
                   1000 + (uint64_t)w->index) != 0) {
    w->fail = 50;
    nsa_client_close(c);
    return NULL;
  }
  for (int i = 0; i < 50; i++) {
    if (forward_ok(c, &p))
      w->ok++;
    else
      w->fail++;
  }
  th_prob_free(&p, c);
  nsa_client_close(c);
  return NULL;
}

Test(robust, sixteen_clients_fifty_requests_each) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  pthread_t t[16];
  worker_t w[16];
  for (int i = 0; i < 16; i++) {
    w[i] = (worker_t){.d = &d, .index = i};
    pthread_create(&t[i], NULL, worker, &w[i]);
  }
  int ok = 0;
  for (int i = 0; i < 16; i++) {
    pthread_join(t[i], NULL);
    cr_expect_eq(w[i].fail, 0, "client %d: %d failures", i, w[i].fail);
    ok += w[i].ok;
  }
  cr_expect_eq(ok, 16 * 50);
  nsa_client_t *c = th_client(&d, "check");
  nsa_client_value_t *m = NULL;
  cr_assert_eq(nsa_client_metrics_get(c, &m), 0);
  nsa_client_value_free(m);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(robust, client_killed_mid_request) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  for (int round = 0; round < 3; round++) {
    pid_t pid = fork();
    if (pid == 0) {
      nsa_client_t *c = th_client(&d, "victim");
      th_prob_t p;
      if (!c || th_prob_init(&p, c, 2, 64, 512, 2, 4, 64, 16, 32, 0, 3) != 0) _exit(1);
      th_prob_fill(&p);
      uint32_t t;
      for (int i = 0; i < 6; i++) nsa_client_forward_submit(c, &p.fwd, &t);
      nsa_client_ping(c); /* all six are read by nsad now */
      raise(SIGKILL);
      _exit(2);
    }
    int st;
    waitpid(pid, &st, 0);
    cr_expect(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
  }
  /* nsad keeps serving others correctly */
  nsa_client_t *a = th_client(&d, "survivor");
  cr_assert_not_null(a);
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 1, 8, 64, 1, 2, 16, 3, 16, 0, 21), 0);
  for (int i = 0; i < 5; i++) cr_expect(forward_ok(a, &p));
  /* the dead sessions' regions are released once their work ended */
  double regions = -1;
  for (int i = 0; i < 1000; i++) { /* up to 20 s (ASan, loaded CI) */
    regions = th_gauge(a, "nsad_regions");
    if (regions < 0) th_dump_log(&d);
    cr_assert_geq(regions, 0, "metrics.get: %s: %s", nsa_client_error_code(a),
                  nsa_client_error_message(a));
    if (regions == 1) break;
    usleep(20000);
  }
  cr_expect_eq(regions, 1, "only the survivor's region is left");
  th_prob_free(&p, a);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* region.register opens the region on libuv's thread pool and holds the
 * session meanwhile (dispatch.c). Sessions that send hello + a registration
 * and hang up at once end while their open is queued, running or done; a
 * pipelined metrics.get right behind a registration already sees it. */
Test(robust, registrations_abandoned_mid_open_leave_nothing) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  char name[64];
  snprintf(name, sizeof name, "/nsa-robust-reg-%d", (int)getpid());
  int sfd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
  cr_assert_geq(sfd, 0);
  th_shm_unlink_at_exit(name);
  cr_assert_eq(ftruncate(sfd, 1 << 20), 0);
  nsa_client_t *a = th_client(&d, "watcher");
  cr_assert_not_null(a);
  /* Pipelined: the registration's reply, then metrics.get counting it. */
  int fd = th_raw_connect(d.sock);
  cr_assert_geq(fd, 0);
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request_begin(&w, 3, "metrics.get");
  msgpack_pack_map(&w.pk, 0);
  cr_assert_eq(th_raw_hello(fd, 1), 0);
  cr_assert_eq(th_raw_register_shm(fd, 2, name, 1 << 20), 0);
  cr_assert_eq(th_raw_send(fd, w.sbuf.data, w.sbuf.size), 0);
  nsa_proto_writer_destroy(&w);
  nsa_proto_decoder_t *dec = nsa_proto_decoder_new(1 << 20);
  for (uint32_t want = 1; want <= 3; want++) {
    uint32_t id = 0;
    char code[64];
    cr_assert_eq(th_raw_response(fd, dec, 10000, &id, code, sizeof code), 1);
    cr_expect_eq(id, want, "replies in request order");
    cr_expect_str_eq(code, "", "msgid %u: %s", id, code);
  }
  nsa_proto_decoder_free(dec);
  cr_expect_eq(th_gauge(a, "nsad_regions"), 1, "the raw session's region");
  close(fd);
  /* 60 sessions that hang up right behind their registration. */
  for (int i = 0; i < 60; i++) {
    int f = th_raw_connect(d.sock);
    cr_assert_geq(f, 0);
    cr_assert_eq(th_raw_hello(f, 1), 0);
    cr_assert_eq(th_raw_register_shm(f, 2, name, 1 << 20), 0);
    if (i % 2) shutdown(f, SHUT_WR); /* half of them wait for nothing but read no reply */
    close(f);
  }
  /* Every registration has been answered or discarded (each is counted
   * when its open is done) ... */
  const char *reg_ok = "nsad_requests_total{method=\"region.register\",path=\"none\",code=\"ok\"}";
  double opened = -1;
  for (int i = 0; i < 1000; i++) { /* up to 20 s (ASan, loaded CI) */
    opened = th_prom_value(a, reg_ok);
    if (opened >= 61) break;
    usleep(20000);
  }
  cr_expect_eq(opened, 61, "region.register counted %g times, not 1 + 60", opened);
  double regions = -1;
  for (int i = 0; i < 1000; i++) {
    regions = th_gauge(a, "nsad_regions");
    if (regions == 0) break;
    usleep(20000);
  }
  cr_expect_eq(regions, 0, "no abandoned registration is registered");
  /* ... and none is still mapped or open in nsad (a discarded entry that
   * was freed without its close would be). */
  int held = -1;
  for (int i = 0; i < 1000; i++) {
    held = th_shm_holds(d.pid, name);
    if (held == 0) break;
    usleep(20000);
  }
  cr_expect_eq(held, 0, "nsad still maps or holds %s %d times", name, held);
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 1, 8, 64, 1, 2, 16, 3, 16, 0, 5), 0);
  cr_expect(forward_ok(a, &p), "nsad still serves");
  th_prob_free(&p, a);
  nsa_client_close(a);
  close(sfd);
  shm_unlink(name);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(robust, another_sessions_region_cannot_be_named) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *a = th_client(&d, "a"), *b = th_client(&d, "b");
  cr_assert(a && b);
  th_prob_t pa, pb;
  cr_assert_eq(th_prob_init(&pa, a, 1, 8, 64, 1, 2, 16, 3, 16, 0, 1), 0);
  cr_assert_eq(th_prob_init(&pb, b, 1, 8, 64, 1, 2, 16, 3, 16, 0, 2), 0);
  th_prob_fill(&pa);
  /* b names a's region in its tensor refs */
  nsa_client_fwd_t stolen = pb.fwd;
  stolen.q.region = pa.shm->region;
  nsa_client_result_t r;
  cr_expect_eq(nsa_client_forward(b, &stolen, &r), -1);
  cr_expect_str_eq(nsa_client_error_code(b), "not_found");
  cr_expect_eq(nsa_client_forward(b, &pa.fwd, &r), -1);
  cr_expect_str_eq(nsa_client_error_code(b), "not_found");
  cr_expect_eq(nsa_client_region_unregister(b, pa.shm->region), -1);
  cr_expect_str_eq(nsa_client_error_code(b), "not_found");
  cr_expect(forward_ok(a, &pa), "a's region is untouched");
  th_prob_free(&pa, a);
  th_prob_free(&pb, b);
  nsa_client_close(a);
  nsa_client_close(b);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(robust, shrunk_shm_object_is_refused_not_a_crash) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *a = th_client(&d, "a");
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 1, 8, 64, 1, 2, 16, 3, 16, 0, 1), 0);
  th_prob_fill(&p);
  /* The client truncates its object after registering it. */
  int fd = shm_open(p.shm->name, O_RDWR, 0);
  cr_assert_geq(fd, 0);
  cr_assert_eq(ftruncate(fd, 64), 0);
  close(fd);
  nsa_client_result_t r;
  cr_expect_eq(nsa_client_forward(a, &p.fwd, &r), -1);
  cr_expect_str_eq(nsa_client_error_code(a), "out_of_bounds");
  cr_expect_eq(nsa_client_ping(a), 0);
  /* (the client's own mapping is now partly invalid too: unmap, never touch) */
  th_prob_free(&p, a);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(robust, backpressure_pipelined_requests_all_answered) {
  th_nsad_t d;
  const char *args[] = {"--max-inflight", "2", NULL};
  cr_assert_eq(th_start(&d, args), 0);
  nsa_client_t *a = th_client(&d, "a");
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 1, 16, 128, 2, 2, 16, 4, 16, 0, 8), 0);
  th_prob_fill(&p);
  uint32_t t[40];
  for (int i = 0; i < 40; i++) cr_assert_eq(nsa_client_forward_submit(a, &p.fwd, &t[i]), 0);
  /* wait in reverse order: replies come out of order and are kept */
  for (int i = 39; i >= 0; i--) {
    nsa_client_result_t r;
    cr_expect_eq(nsa_client_wait(a, t[i], &r), 0, "%d: %s", i, nsa_client_error_message(a));
  }
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  th_prob_free(&p, a);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(robust, sigterm_with_requests_in_flight_drains_and_exits_0) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *a = th_client(&d, "a");
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 2, 64, 512, 2, 4, 64, 16, 32, 0, 4), 0);
  th_prob_fill(&p);
  uint32_t t[6];
  for (int i = 0; i < 6; i++) cr_assert_eq(nsa_client_forward_submit(a, &p.fwd, &t[i]), 0);
  cr_assert_eq(nsa_client_ping(a), 0); /* every forward has been read: in flight */
  kill(d.pid, SIGTERM);
  for (int i = 0; i < 6; i++) {
    nsa_client_result_t r;
    cr_expect_eq(nsa_client_wait(a, t[i], &r), 0, "request %d: %s: %s", i,
                 nsa_client_error_code(a), nsa_client_error_message(a));
  }
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  int rc = th_wait_exit(d.pid, 20000);
  d.pid = 0;
  cr_expect_eq(rc, 0, "nsad exit status %d", rc);
  if (rc != 0) th_dump_log(&d);
  th_prob_free(&p, NULL);
  nsa_client_close(a);
  th_stop(&d, 1);
}

Test(robust, live_nsad_on_the_same_socket_refuses_to_start) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  th_nsad_t d2 = d;
  snprintf(d2.log, sizeof d2.log, "%s/second.log", d.dir);
  pid_t p2 = th_spawn(&d2, d.sock, NULL, 0);
  cr_assert_gt(p2, 0);
  int rc = th_wait_exit(p2, 10000);
  cr_expect(rc > 0, "second nsad exits non-zero (got %d)", rc);
  FILE *f = fopen(d2.log, "r");
  char buf[4096] = "";
  if (f) {
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
  }
  cr_expect(strstr(buf, "already serving") != NULL, "clear message, log: %s", buf);
  nsa_client_t *a = th_client(&d, "a");
  cr_expect_not_null(a, "the first nsad still serves");
  cr_expect_eq(nsa_client_ping(a), 0);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(robust, stale_socket_file_is_replaced) {
  th_nsad_t d;
  memset(&d, 0, sizeof d);
  snprintf(d.dir, sizeof d.dir, "/tmp/nsad-test.XXXXXX");
  cr_assert_not_null(mkdtemp(d.dir));
  snprintf(d.sock, sizeof d.sock, "%s/nsad.sock", d.dir);
  snprintf(d.log, sizeof d.log, "%s/nsad.log", d.dir);
  /* a socket file nobody listens on (a crashed nsad leaves one) */
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  memcpy(sa.sun_path, d.sock, strlen(d.sock) + 1); /* < 108 bytes: /tmp/nsad-test.XXXXXX/nsad.sock */
  cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
  close(fd);
  cr_assert_eq(access(d.sock, F_OK), 0);
  d.pid = th_spawn(&d, d.sock, NULL, 1);
  cr_assert_gt(d.pid, 0, "nsad started over the stale file");
  nsa_client_t *a = th_client(&d, "a");
  cr_assert_not_null(a);
  cr_expect_eq(nsa_client_ping(a), 0);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 0), 0);
  cr_expect_neq(access(d.sock, F_OK), 0, "nsad removes its socket file at exit");
  th_stop(&d, 1);
}

/* Round-robin across sessions: a session with one request is served before
 * a busy session's long queue drains. Both times run from the moment the
 * small request is sent (so a test process starved between the busy
 * submissions and that send does not count against nsad): FIFO answers it
 * after the whole remaining queue (ratio ~1 however loaded the machine is),
 * round-robin after the request running (ratio ~1/N). An attempt whose
 * queue had mostly drained before the send (the test thread starved for
 * most of it) proves nothing either way and is repeated, up to 3 times. */
static double since(const struct timespec *a, const struct timespec *b) {
  return (b->tv_sec - a->tv_sec) + (b->tv_nsec - a->tv_nsec) * 1e-9;
}

Test(robust, fair_across_sessions) {
  th_nsad_t d;
  const char *args[] = {"--workers", "1", "--max-inflight", "64", NULL};
  cr_assert_eq(th_start(&d, args), 0);
  nsa_client_t *busy = th_client(&d, "busy"), *small = th_client(&d, "small");
  th_prob_t pb, ps;
  cr_assert_eq(th_prob_init(&pb, busy, 1, 64, 512, 2, 4, 64, 16, 32, 0, 1), 0);
  cr_assert_eq(th_prob_init(&ps, small, 1, 8, 64, 1, 2, 16, 3, 16, 0, 2), 0);
  th_prob_fill(&pb);
  th_prob_fill(&ps);
  enum { N = 24 };
  double t_small = 0, t_rest = 0, t_all = 0;
  int decided = 0;
  for (int attempt = 0; attempt < 3 && !decided; attempt++) {
    uint32_t t[N];
    struct timespec a, a2, b, e;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < N; i++) cr_assert_eq(nsa_client_forward_submit(busy, &pb.fwd, &t[i]), 0);
    cr_assert_eq(nsa_client_ping(busy), 0); /* all N are queued in nsad */
    nsa_client_result_t r;
    clock_gettime(CLOCK_MONOTONIC, &a2);
    cr_assert_eq(nsa_client_forward(small, &ps.fwd, &r), 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    for (int i = 0; i < N; i++) cr_expect_eq(nsa_client_wait(busy, t[i], &r), 0);
    clock_gettime(CLOCK_MONOTONIC, &e);
    t_small = since(&a2, &b);
    t_rest = since(&a2, &e);
    t_all = since(&a, &e);
    decided = t_rest >= 0.25 * t_all; /* most of the queue was still ahead of the small request */
    cr_log_info("attempt %d: small %.3fs, rest of the busy queue %.3fs, all %.3fs", attempt, t_small, t_rest,
                t_all);
  }
  cr_expect(decided, "the busy queue drained before the small request was sent, 3 times (starved test process)");
  cr_expect_lt(t_small, 0.5 * t_rest, "small request took %.3fs, the rest of the busy queue %.3fs", t_small, t_rest);
  cr_expect_leq(th_prob_check_fwd(&ps), 1e-5);
  th_prob_free(&pb, busy);
  th_prob_free(&ps, small);
  nsa_client_close(busy);
  nsa_client_close(small);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* A peer that shuts its sending side after its last request (as `nc -N`
 * does) still gets every reply, in-flight work included. */
Test(robust, half_closed_peer_still_gets_replies) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *a = th_client(&d, "a");
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 2, 64, 512, 2, 4, 64, 16, 32, 0, 31), 0);
  th_prob_fill(&p);
  uint32_t t[3];
  for (int i = 0; i < 3; i++) cr_assert_eq(nsa_client_forward_submit(a, &p.fwd, &t[i]), 0);
  cr_assert_eq(shutdown(nsa_client_fd(a), SHUT_WR), 0);
  for (int i = 0; i < 3; i++) {
    nsa_client_result_t r;
    cr_expect_eq(nsa_client_wait(a, t[i], &r), 0, "%d: %s: %s", i, nsa_client_error_code(a),
                 nsa_client_error_message(a));
  }
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  /* then nsad closes; the next call reconnects */
  cr_expect_eq(nsa_client_ping(a), 0, "%s", nsa_client_error_message(a));
  cr_expect_eq(nsa_client_connections(a), 2);
  th_prob_free(&p, a);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* The owner truncates its shm object while queued requests will read it:
 * nsad must not die of SIGBUS; those requests fail with out_of_bounds, the
 * region is refused afterwards, and other clients never notice. */
Test(robust, shm_truncated_under_running_requests) {
  th_nsad_t d;
  const char *args[] = {"--workers", "1", NULL};
  cr_assert_eq(th_start(&d, args), 0);
  nsa_client_t *a = th_client(&d, "truncator"), *b = th_client(&d, "bystander");
  th_prob_t p, pb;
  cr_assert_eq(th_prob_init(&p, a, 2, 64, 512, 2, 4, 64, 16, 32, 0, 41), 0);
  cr_assert_eq(th_prob_init(&pb, b, 1, 8, 64, 1, 2, 16, 3, 16, 0, 42), 0);
  th_prob_fill(&p);
  enum { N = 8 };
  uint32_t t[N];
  for (int i = 0; i < N; i++) cr_assert_eq(nsa_client_forward_submit(a, &p.fwd, &t[i]), 0);
  cr_assert_eq(nsa_client_ping(a), 0); /* all N passed the dispatch-time size check */
  int fd = shm_open(p.shm->name, O_RDWR, 0);
  cr_assert_geq(fd, 0);
  cr_assert_eq(ftruncate(fd, 0), 0);
  close(fd);
  int ok = 0, oob = 0;
  for (int i = 0; i < N; i++) {
    nsa_client_result_t r;
    if (nsa_client_wait(a, t[i], &r) == 0)
      ok++;
    else if (!strcmp(nsa_client_error_code(a), "out_of_bounds"))
      oob++;
    else
      cr_expect(0, "request %d: %s: %s", i, nsa_client_error_code(a), nsa_client_error_message(a));
  }
  cr_expect_eq(ok + oob, N);
  cr_expect_gt(oob, 0, "requests that ran after the truncation fail (ok %d)", ok);
  nsa_client_result_t r;
  cr_expect_eq(nsa_client_forward(a, &p.fwd, &r), -1, "the region is refused from now on");
  cr_expect_str_eq(nsa_client_error_code(a), "out_of_bounds");
  cr_expect(forward_ok(b, &pb), "another client is unaffected");
  th_prob_free(&p, a);
  th_prob_free(&pb, b);
  nsa_client_close(a);
  nsa_client_close(b);
  cr_expect_eq(th_stop(&d, 1), 0, "nsad survived and exits 0");
}
