/*
 * test_review.c — regression tests for defects found in the daemon/client
 * review (each one failed before its fix), against a real nsad process.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

TestSuite(review, .fini = th_fini, .timeout = 300);

static int alive(pid_t pid) {
  int st;
  return waitpid(pid, &st, WNOHANG) == 0;
}

/* A 4 KiB shm object /nsa-review-<tag>-<pid> (name in buf), registered
 * many times by the tests below to use up per-region daemon resources. */
static void small_shm(char *buf, size_t len, const char *tag) {
  snprintf(buf, len, "/nsa-review-%s-%d", tag, (int)getpid());
  int fd = shm_open(buf, O_RDWR | O_CREAT | O_EXCL, 0600);
  cr_assert_geq(fd, 0, "shm_open %s", buf);
  cr_assert_eq(ftruncate(fd, 4096), 0);
  close(fd);
}

/* The SIGBUS guard table has a fixed number of slots (16384) while four
 * sessions at the default per-session limit (4096) already fill it. A shm
 * region registered once the table is full used to be served WITHOUT the
 * guard ("served without it" warning): its owner truncating the object
 * under a running request then killed nsad with SIGBUS, for every client.
 * Now such a registration is refused with busy; once a slot is free again
 * the region is guarded and a truncation only fails that client's requests. */
Test(review, shm_guard_table_full_refuses_instead_of_serving_unguarded) {
  th_nsad_t d;
  const char *args[] = {"--workers", "1", NULL};
  cr_assert_eq(th_start(&d, args), 0);
  /* One small object, registered 4096 times by each of four sessions. */
  char name[64];
  small_shm(name, sizeof name, "fill");
  enum { NFILL = 4, PER = 4096 };
  nsa_client_t *fill[NFILL];
  uint64_t last = 0, id = 0;
  nsa_client_t *lastc = NULL; /* holder of region `last` */
  int full = 0;
  for (int i = 0; i < NFILL && !full; i++) {
    fill[i] = th_client(&d, "filler");
    cr_assert_not_null(fill[i]);
    for (int j = 0; j < PER; j++) {
      if (nsa_client_region_register_shm(fill[i], name, 4096, &id) != 0) {
        /* a table smaller than 16384 slots is fine too, as long as it says busy */
        cr_assert_str_eq(nsa_client_error_code(fill[i]), "busy", "%s",
                         nsa_client_error_message(fill[i]));
        full = 1;
        for (int k = i + 1; k < NFILL; k++) fill[k] = NULL;
        break;
      }
      last = id;
      lastc = fill[i];
    }
  }
  shm_unlink(name);
  nsa_client_t *a = th_client(&d, "truncator");
  cr_assert_not_null(a);
  th_prob_t p;
  int rc = th_prob_init(&p, a, 2, 64, 512, 2, 4, 64, 16, 32, 0, 77);
  if (rc == 0) {
    /* Registered although the table may be full: it must still be guarded.
     * (Before the fix this truncation killed nsad.) */
    cr_log_warn("region registered with a full guard table; checking it is guarded");
  } else {
    cr_expect_str_eq(nsa_client_error_code(a), "busy", "%s", nsa_client_error_message(a));
    /* Free one slot: the next registration gets it. */
    nsa_client_t *f = lastc;
    cr_assert_not_null(f);
    cr_assert_eq(nsa_client_region_unregister(f, last), 0, "%s", nsa_client_error_message(f));
    rc = th_prob_init(&p, a, 2, 64, 512, 2, 4, 64, 16, 32, 0, 77);
    cr_assert_eq(rc, 0, "%s: %s", nsa_client_error_code(a), nsa_client_error_message(a));
  }
  th_prob_fill(&p);
  enum { N = 6 };
  uint32_t t[N];
  for (int i = 0; i < N; i++) cr_assert_eq(nsa_client_forward_submit(a, &p.fwd, &t[i]), 0);
  cr_assert_eq(nsa_client_ping(a), 0); /* all N passed the dispatch-time size check */
  int fd = shm_open(p.shm->name, O_RDWR, 0);
  cr_assert_geq(fd, 0);
  cr_assert_eq(ftruncate(fd, 0), 0);
  close(fd);
  for (int i = 0; i < N; i++) {
    nsa_client_result_t r;
    if (nsa_client_wait(a, t[i], &r) != 0)
      cr_expect(!strcmp(nsa_client_error_code(a), "out_of_bounds"), "request %d: %s: %s", i,
                nsa_client_error_code(a), nsa_client_error_message(a));
  }
  usleep(100 * 1000);
  cr_expect(alive(d.pid), "nsad must survive a truncated shm object");
  nsa_client_t *b = th_client(&d, "bystander");
  cr_expect_not_null(b, "nsad still serves new clients");
  if (b) {
    cr_expect_eq(nsa_client_ping(b), 0);
    nsa_client_close(b);
  }
  th_prob_free(&p, NULL);
  nsa_client_close(a);
  for (int i = 0; i < NFILL; i++)
    if (fill[i]) nsa_client_close(fill[i]);
  if (alive(d.pid))
    cr_expect_eq(th_stop(&d, 1), 0);
  else {
    d.pid = 0;
    th_stop(&d, 1);
  }
}

/* ---- client: a refused hello must not leave a session-less connection ---- */

/* A fake nsad: connection 1 accepts hello, then drops the connection when
 * the next request arrives (a daemon that died). Every later connection
 * answers hello with protocol_version (an upgraded daemon) and keeps the
 * connection open, like nsad does. `violations` counts requests other than
 * hello arriving first on a connection: a client must never send those. */
typedef struct {
  int lfd;
  int violations;
  int connections;
} fake_t;

static int fake_next(int fd, nsa_proto_decoder_t *dec, nsa_proto_msg_t *m) {
  for (;;) {
    nsa_proto_err_t err;
    int known;
    uint32_t id;
    int rc = nsa_proto_decoder_next(dec, m, &err, &known, &id);
    if (rc != 0) return rc;
    size_t avail;
    char *buf = nsa_proto_decoder_buffer(dec, 4096, &avail);
    ssize_t n = read(fd, buf, avail);
    if (n <= 0) return 0;
    nsa_proto_decoder_commit(dec, (size_t)n);
  }
}

static void fake_reply(int fd, uint32_t msgid, nsa_proto_code_t code, int hello_ok) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  if (code != NSA_E_OK) {
    nsa_proto_write_error(&w, msgid, code, "fake daemon says no");
  } else {
    nsa_proto_write_result_begin(&w, msgid);
    if (hello_ok) {
      msgpack_pack_map(&w.pk, 2);
      nsa_proto_pack_kv_int(&w.pk, "protocol", 1);
      nsa_proto_pack_kv_uint(&w.pk, "session", 1);
    } else {
      msgpack_pack_nil(&w.pk);
    }
  }
  th_raw_send(fd, w.sbuf.data, w.sbuf.size);
  nsa_proto_writer_destroy(&w);
}

static void *fake_main(void *arg) {
  fake_t *f = arg;
  for (;;) {
    int fd = accept(f->lfd, NULL, NULL);
    if (fd < 0) return NULL;
    int conn = ++f->connections;
    nsa_proto_decoder_t *dec = nsa_proto_decoder_new(1u << 20);
    int said_hello = 0;
    nsa_proto_msg_t m;
    while (fake_next(fd, dec, &m) == 1) {
      int is_hello = m.method_len == 5 && !memcmp(m.method, "hello", 5);
      if (!said_hello && !is_hello) {
        f->violations++;
        fake_reply(fd, m.msgid, NSA_E_BAD_REQUEST, 0);
        continue;
      }
      if (conn == 1) {
        if (said_hello) break; /* dies with this request in flight */
        said_hello = 1;
        fake_reply(fd, m.msgid, NSA_E_OK, 1);
      } else {
        fake_reply(fd, m.msgid, NSA_E_PROTOCOL_VERSION, 0);
      }
    }
    nsa_proto_decoder_free(dec);
    close(fd);
  }
}

Test(review, client_never_reuses_a_connection_whose_hello_was_refused) {
  char dir[] = "/tmp/nsa-review-XXXXXX";
  cr_assert_not_null(mkdtemp(dir));
  char path[96];
  snprintf(path, sizeof path, "%s/fake.sock", dir);
  fake_t f = {.lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  cr_assert_eq(bind(f.lfd, (struct sockaddr *)&sa, sizeof sa), 0);
  cr_assert_eq(listen(f.lfd, 8), 0);
  pthread_t th;
  cr_assert_eq(pthread_create(&th, NULL, fake_main, &f), 0);

  nsa_client_opts_t o = {.socket_path = path, .name = "t", .timeout_ms = 5000,
                         .reconnect_attempts = 2};
  nsa_client_t *c = NULL;
  cr_assert_eq(nsa_client_open(&c, &o), 0, "%s", nsa_client_open_error());
  cr_expect_eq(nsa_client_ping(c), -1, "in flight when the daemon died");
  cr_expect_str_eq(nsa_client_error_code(c), "disconnected");
  for (int i = 0; i < 3; i++) {
    cr_expect_eq(nsa_client_ping(c), -1);
    /* the daemon's own verdict every time, not a bad_request for a request
     * sent on a connection that never completed hello */
    cr_expect_str_eq(nsa_client_error_code(c), "protocol_version", "call %d: %s: %s", i,
                     nsa_client_error_code(c), nsa_client_error_message(c));
  }
  nsa_client_close(c);
  cr_expect_eq(f.violations, 0, "requests sent before hello on a connection");
  shutdown(f.lfd, SHUT_RDWR);
  close(f.lfd);
  pthread_join(th, NULL);
  unlink(path);
  rmdir(dir);
}

/* ---- nsactl --json: error messages are JSON-escaped ---- */

/* Runs nsactl with argv (NULL-terminated) and returns its stdout (static). */
static const char *run_nsactl(const char *const *argv) {
  static char out[8192];
  int p[2];
  out[0] = 0;
  if (pipe(p) != 0) return out;
  pid_t pid = fork();
  if (pid == 0) {
    dup2(p[1], 1);
    int dn = open("/dev/null", O_WRONLY);
    if (dn >= 0) dup2(dn, 2);
    close(p[0]);
    execv(NSACTL_BIN, (char *const *)argv);
    _exit(127);
  }
  close(p[1]);
  size_t n = 0;
  ssize_t r;
  while (n < sizeof out - 1 && (r = read(p[0], out + n, sizeof out - 1 - n)) > 0) n += (size_t)r;
  out[n] = 0;
  close(p[0]);
  waitpid(pid, NULL, 0);
  return out;
}

Test(review, nsactl_json_errors_are_valid_json) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  /* The daemon echoes the bad value, quote and backslash included. */
  const char *argv[] = {NSACTL_BIN, "--socket", d.sock, "--json", "flags", "set",
                        "NSA_SEL_VARLEN_V2=ma\"y\\be", NULL};
  const char *out = run_nsactl(argv);
  cr_expect(strstr(out, "\"code\":\"bad_request\"") != NULL, "%s", out);
  cr_expect(strstr(out, "ma\\\"y\\\\be") != NULL, "quote and backslash escaped: %s", out);
  cr_expect(strstr(out, "ma\"y") == NULL, "no raw quote inside a JSON string: %s", out);
  cr_expect_eq(th_stop(&d, 1), 0);
  /* Connection errors too (the socket path appears in the message). */
  char dir[] = "/tmp/nsa-q\"XXXXXX";
  cr_assert_not_null(mkdtemp(dir));
  char sock[128];
  snprintf(sock, sizeof sock, "%s/none.sock", dir);
  const char *argv2[] = {NSACTL_BIN, "--socket", sock, "--json", "ping", NULL};
  out = run_nsactl(argv2);
  cr_expect(strstr(out, "\"ok\":false") != NULL, "%s", out);
  cr_expect(strstr(out, "nsa-q\\\"") != NULL, "path quote escaped: %s", out);
  rmdir(dir);
}

/* ---- file descriptors: one client's shm registrations (nsad keeps one fd
 * per shm region) must not exhaust a low soft RLIMIT_NOFILE and lock every
 * other client out (accept fails with EMFILE). nsad raises its soft limit to
 * the hard limit at start, as daemons do. ---- */
Test(review, low_soft_fd_limit_is_raised_so_one_client_cannot_lock_out_others) {
  struct rlimit rl;
  cr_assert_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
  if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < 2048)
    cr_skip_test("hard RLIMIT_NOFILE %llu is too low for this test", (unsigned long long)rl.rlim_max);
  struct rlimit low = {.rlim_cur = 256, .rlim_max = rl.rlim_max};
  cr_assert_eq(setrlimit(RLIMIT_NOFILE, &low), 0); /* inherited by nsad */
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  char name[64];
  small_shm(name, sizeof name, "fd");
  nsa_client_t *a = th_client(&d, "hog");
  cr_assert_not_null(a);
  int ok = 0;
  for (int i = 0; i < 400; i++) {
    uint64_t id;
    if (nsa_client_region_register_shm(a, name, 4096, &id) != 0) {
      cr_log_error("registration %d: %s: %s", i, nsa_client_error_code(a),
                   nsa_client_error_message(a));
      break;
    }
    ok++;
  }
  shm_unlink(name);
  cr_expect_eq(ok, 400, "400 regions in one session (limit 4096)");
  nsa_client_t *b = th_client(&d, "other");
  cr_expect_not_null(b, "another client can still connect");
  if (b) {
    cr_expect_eq(nsa_client_ping(b), 0);
    nsa_client_close(b);
  }
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* ---- /metrics keeps working when nsad holds more than FD_SETSIZE fds ----
 * libmicrohttpd's default select() loop drops every connection whose fd is
 * >= FD_SETSIZE (1024); with a few clients' shm regions open (one fd each)
 * every scrape then failed. */
static int free_port(void) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0 ||
      getsockname(s, (struct sockaddr *)&a, &len) != 0) {
    if (s >= 0) close(s);
    return -1;
  }
  close(s);
  return ntohs(a.sin_port);
}

/* 1 when GET path answers 200 within 5 s. */
static int http_get_ok(int port, const char *path) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                          .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  struct timeval tv = {.tv_sec = 5};
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
    close(s);
    return 0;
  }
  char req[256];
  int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                   path);
  th_raw_send(s, req, (size_t)n);
  char buf[64] = "";
  ssize_t got = recv(s, buf, sizeof buf - 1, MSG_WAITALL);
  close(s);
  if (got <= 0) return 0;
  buf[got] = 0;
  return strncmp(buf, "HTTP/1.1 200", 12) == 0;
}

/* The first scrape may race nsad's HTTP listener start-up (nsad announces the
 * Unix socket first) on a loaded machine: retry for up to 5 s. */
static int http_get_ok_retry(int port, const char *path) {
  for (int i = 0; i < 50; i++) {
    if (http_get_ok(port, path)) return 1;
    usleep(100 * 1000);
  }
  return 0;
}

Test(review, metrics_http_serves_with_more_than_fd_setsize_fds) {
  int port = free_port();
  cr_assert_gt(port, 0);
  char listen[64];
  snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
  const char *args[] = {"--metrics-listen", listen, NULL};
  th_nsad_t d;
  if (th_start(&d, args) != 0) cr_skip_test("nsad without --metrics-listen support");
  cr_assert(http_get_ok_retry(port, "/metrics"), "scrape with few fds");
  char name[64];
  small_shm(name, sizeof name, "http");
  nsa_client_t *a = th_client(&d, "many-regions");
  cr_assert_not_null(a);
  int ok = 0;
  for (int i = 0; i < 1100; i++) {
    uint64_t id;
    if (nsa_client_region_register_shm(a, name, 4096, &id) != 0) break;
    ok++;
  }
  shm_unlink(name);
  if (ok < 1100) cr_skip_test("nsad could not open 1100 shm regions (fd limit?)");
  cr_expect(http_get_ok(port, "/metrics"), "scrape while nsad holds > 1024 fds");
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* ---- region lifetime: unregistering (or disconnecting) while requests that
 * read the region are queued or running. The jobs hold references, so the
 * mapping must stay until they are done: every request either completes
 * correctly or fails cleanly, and nsad keeps serving (ASan build: no
 * use-after-unmap). A guard for the refcount timing, not a bug found. ---- */
Test(review, unregister_and_disconnect_with_requests_in_flight) {
  th_nsad_t d;
  const char *args[] = {"--workers", "1", NULL};
  cr_assert_eq(th_start(&d, args), 0);
  nsa_client_t *a = th_client(&d, "a");
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, a, 2, 64, 512, 2, 4, 64, 16, 32, 0, 91), 0);
  th_prob_fill(&p);
  enum { N = 6 };
  uint32_t t[N];
  for (int i = 0; i < N; i++) cr_assert_eq(nsa_client_forward_submit(a, &p.fwd, &t[i]), 0);
  /* region.unregister is answered while the forwards are queued/running */
  cr_assert_eq(nsa_client_region_unregister(a, p.shm->region), 0, "%s",
               nsa_client_error_message(a));
  for (int i = 0; i < N; i++) {
    nsa_client_result_t r;
    cr_expect_eq(nsa_client_wait(a, t[i], &r), 0, "request %d: %s: %s", i,
                 nsa_client_error_code(a), nsa_client_error_message(a));
  }
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5, "results of requests queued before the unregister");
  nsa_client_result_t r;
  cr_expect_eq(nsa_client_forward(a, &p.fwd, &r), -1);
  cr_expect_str_eq(nsa_client_error_code(a), "not_found");
  /* A second session: re-register, queue work, then vanish. */
  nsa_client_t *b = th_client(&d, "b");
  uint64_t rb;
  cr_assert_eq(nsa_client_region_register_shm(b, p.shm->name, p.total, &rb), 0);
  nsa_client_fwd_t fb = p.fwd;
  fb.q.region = fb.k.region = fb.v.region = fb.o.region = fb.lse.region = fb.sel.t.region = rb;
  for (int i = 0; i < N; i++) cr_assert_eq(nsa_client_forward_submit(b, &fb, &t[i]), 0);
  cr_assert_eq(nsa_client_ping(b), 0); /* all read */
  nsa_client_close(b); /* its region is released once its jobs are done */
  nsa_client_t *c = th_client(&d, "c");
  cr_expect_not_null(c);
  if (c) {
    cr_expect_eq(nsa_client_ping(c), 0);
    nsa_client_close(c);
  }
  th_prob_free(&p, NULL);
  nsa_client_close(a);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* ---- log injection: peer-controlled strings (client name, labels, shm
 * names) reach nsad's log lines; a newline in them forged whole log records
 * (e.g. a fake "audit" line for a flag change that never happened). ---- */
Test(review, peer_strings_cannot_forge_log_lines) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  const char *evil = "x\n2001-01-01T00:00:00.000Z audit [nsad] flags.set uid=0 FORGED\rY";
  nsa_client_t *c = th_client(&d, evil);
  cr_assert_not_null(c);
  cr_expect_eq(nsa_client_ping(c), 0);
  uint64_t id;
  cr_expect_eq(nsa_client_region_register_shm(c, "/nsa-review-no\nsuch", 64, &id), -1);
  nsa_client_close(c);
  char log[256];
  snprintf(log, sizeof log, "%s", d.log);
  cr_expect_eq(th_stop(&d, 0), 0);
  FILE *f = fopen(log, "r");
  cr_assert_not_null(f);
  char line[4096];
  int forged = 0, seen = 0;
  while (fgets(line, sizeof line, f)) {
    if (!strncmp(line, "2001-01-01", 10) || !strncmp(line, "such", 4)) forged++;
    if (strstr(line, "FORGED")) seen++;
  }
  fclose(f);
  cr_expect_eq(forged, 0, "log lines that start with peer-controlled text");
  cr_expect_gt(seen, 0, "the client name is still logged (escaped)");
  th_stop(&d, 1);
}

/* ---- session limit: a connection already refused (over the limit, waiting
 * for its first request to answer busy) must not count as a live session,
 * or it keeps a legitimate client out after a slot frees up. ---- */
Test(review, refused_connections_do_not_hold_session_slots) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  cr_assert_eq(th_stop(&d, 0), 0);
  char cfg[256];
  snprintf(cfg, sizeof cfg, "%s/nsad.conf", d.dir);
  FILE *f = fopen(cfg, "w");
  cr_assert_not_null(f);
  fprintf(f, "NSAD_MAX_SESSIONS=1\n");
  fclose(f);
  const char *args[] = {"--config", cfg, NULL};
  d.pid = th_spawn(&d, d.sock, args, 1);
  cr_assert_gt(d.pid, 0);
  /* (the readiness probe's connection may still be closing: retry) */
  nsa_client_opts_t oa = {.socket_path = d.sock, .name = "a", .reconnect_attempts = 1};
  nsa_client_t *a = NULL;
  for (int i = 0; i < 100 && nsa_client_open(&a, &oa) != 0; i++) usleep(20000);
  cr_assert_not_null(a, "%s", nsa_client_open_error());
  /* B connects while A holds the only slot, and says nothing yet. */
  int b = th_raw_connect(d.sock);
  cr_assert_geq(b, 0);
  cr_assert_eq(nsa_client_ping(a), 0); /* B has been accepted by now */
  nsa_client_close(a);
  usleep(100000);
  /* The slot is free: C gets it, although B (refused) is still connected. */
  nsa_client_opts_t o = {.socket_path = d.sock, .name = "c", .reconnect_attempts = 1};
  nsa_client_t *c = NULL;
  cr_expect_eq(nsa_client_open(&c, &o), 0, "%s", nsa_client_open_error());
  if (c) {
    cr_expect_eq(nsa_client_ping(c), 0);
    nsa_client_close(c);
  }
  /* B is still told busy on its first request. */
  nsa_proto_decoder_t *dec = nsa_proto_decoder_new(1u << 20);
  uint32_t id;
  char code[32];
  cr_assert_eq(th_raw_hello(b, 7), 0);
  cr_expect_eq(th_raw_response(b, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_str_eq(code, "busy");
  nsa_proto_decoder_free(dec);
  close(b);
  cr_expect_eq(th_stop(&d, 1), 0);
}
