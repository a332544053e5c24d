/*
 * test_nsad.c — flags, telemetry and systemd integration against real nsad
 * processes over real Unix sockets (CPU backend):
 *   flags through the protocol (precedence of sources, validation, epochs in
 *   replies), persistence across restart and kill -9 right after flags.set,
 *   SIGHUP reload, rollout determinism and proportion (checked against the
 *   library's bucket function), permission_denied for another uid and the
 *   admin group, audit lines in nsad's log, metrics.get (text + map),
 *   /metrics over HTTP, subscription cadence, shadow metrics from real
 *   forwards, READY/RELOADING/STOPPING/WATCHDOG on a NOTIFY_SOCKET, a
 *   socket handoff through systemd-socket-activate, and a flags.set or a
 *   SIGHUP reload whose state file cannot be written yet while other
 *   connections are served.
 * Skips (with a message) when nsad was not built.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "flags.h"
#include "metrics_http.h"
#include "ops_nsad.h"
#include "ops_testutil.h"
#include "prom_check.h"

#define NEED_NSAD()                                                      \
  do {                                                                   \
    if (!ops_nsad_bin()) cr_skip_test("nsad not built (NSAD_BIN unset)"); \
  } while (0)

static nsa_request_t g_req;

static nsa_request_t *req_of(nsa_method_t m) {
  memset(&g_req, 0, sizeof g_req);
  g_req.method = m;
  return &g_req;
}

static int flags_set(ops_client_t *c, const char *name, const char *value, double percent,
                     const char *match, uint64_t *epoch) {
  nsa_request_t *r = req_of(NSA_M_FLAGS_SET);
  snprintf(r->u.flags_set.name, sizeof r->u.flags_set.name, "%s", name);
  snprintf(r->u.flags_set.value, sizeof r->u.flags_set.value, "%s", value);
  if (percent >= 0) {
    r->u.flags_set.has_percent = 1;
    r->u.flags_set.percent = percent;
  }
  if (match) {
    const char *eq = strchr(match, '=');
    nsa_proto_label_t *l = &r->u.flags_set.match[r->u.flags_set.nmatch++];
    snprintf(l->key, sizeof l->key, "%.*s", (int)(eq - match), match);
    snprintf(l->value, sizeof l->value, "%s", eq + 1);
  }
  int rc = ops_call(c, r);
  if (rc == NSA_E_OK && epoch) *epoch = (uint64_t)ops_res_int(c, "epoch");
  return rc;
}

typedef struct {
  double value, effective;
  char source[16];
  int has_rollout;
  uint64_t epoch;
} fget_t;

static void flags_get(ops_client_t *c, const char *name, fget_t *o) {
  memset(o, 0, sizeof *o);
  cr_assert_eq(ops_call(c, req_of(NSA_M_FLAGS_GET)), NSA_E_OK, "flags.get: %s", c->err_msg);
  o->epoch = (uint64_t)ops_res_int(c, "epoch");
  const msgpack_object *e = ops_map_get(ops_res(c, "flags"), name);
  cr_assert_not_null(e, "flags.get lacks %s", name);
  o->value = ops_num(ops_map_get(e, "value"));
  const msgpack_object *s = ops_map_get(e, "source");
  cr_assert(s && s->type == MSGPACK_OBJECT_STR);
  snprintf(o->source, sizeof o->source, "%.*s", (int)s->via.str.size, s->via.str.ptr);
  const msgpack_object *ro = ops_map_get(e, "rollout");
  o->has_rollout = ro && ro->type == MSGPACK_OBJECT_MAP;
  o->effective = ops_num(ops_map_get(ops_res(c, "effective"), name));
}

static void connect_hello(ops_nsad_t *d, ops_client_t *c, const char *const *labels) {
  cr_assert_eq(ops_client_connect(c, d->sock), 0, "connect %s", d->sock);
  cr_assert_eq(ops_hello(c, "ops-test", labels), NSA_E_OK, "hello: %s", c->err_msg);
}

static void start_or_fail(ops_nsad_t *d, const char *const *args, const char *const *env) {
  if (ops_nsad_start(d, args, env) != 0) {
    char *log = ops_nsad_log(d);
    cr_assert_fail("nsad did not start; log:\n%s", log);
  }
}

/* A fresh nsad whose config file holds `conf`, started with env, and a
 * connection c that said hello: the start of the config / flags tests. */
static void start_with_conf(ops_nsad_t *d, const char *conf, const char *const *env, ops_client_t *c) {
  ops_nsad_prepare(d);
  ops_write_file(d->conf, conf);
  start_or_fail(d, NULL, env);
  connect_hello(d, c, NULL);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------- flags --- */

typedef struct {
  const char *name;
  int64_t v;
} ivset_t;

/* flags.set params with the value as a msgpack integer */
static void pack_int(msgpack_packer *pk, void *ud) {
  ivset_t *iv = ud;
  msgpack_pack_map(pk, 2);
  nsa_proto_pack_kv_str(pk, "name", iv->name);
  nsa_proto_pack_kv_int(pk, "value", iv->v);
}

Test(nsad, flags_over_protocol, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_client_t c;
  const char *env[] = {"NSA_USE_SEL_VARLEN=off", "NSA_SEL_VARLEN_V2=off", NULL};
  start_with_conf(&d, "NSA_SEL_VARLEN_MIN_L=64\nNSA_SEL_VARLEN_V2=on\n", env, &c);
  cr_expect_gt(c.hello_epoch, 0, "hello carries flags_epoch");

  fget_t g;
  flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
  cr_expect_eq(g.value, 64);
  cr_expect_str_eq(g.source, "config");
  cr_expect_eq(g.epoch, c.hello_epoch);
  flags_get(&c, "NSA_USE_SEL_VARLEN", &g);
  cr_expect_eq(g.effective, 0, "the daemon's environment sets a flag");
  cr_expect_str_eq(g.source, "config");
  flags_get(&c, "NSA_SEL_VARLEN_V2", &g);
  cr_expect_eq(g.effective, 0, "environment beats the config file");
  flags_get(&c, "NSA_SEL_SHADOW_RATE", &g);
  cr_expect_str_eq(g.source, "default");

  uint64_t e1 = 0, e2 = 0;
  cr_assert_eq(flags_set(&c, "NSA_SEL_VARLEN_V2", "ON", -1, NULL, &e1), NSA_E_OK, "%s", c.err_msg);
  cr_expect_gt(e1, c.hello_epoch);
  flags_get(&c, "NSA_SEL_VARLEN_V2", &g);
  cr_expect_eq(g.effective, 1, "runtime beats environment");
  cr_expect_str_eq(g.source, "runtime");
  cr_expect_eq(g.epoch, e1);

  cr_expect_eq(flags_set(&c, "NSA_SEL_VARLEN_V2", "maybe", -1, NULL, NULL), NSA_E_BAD_REQUEST);
  cr_expect(strstr(c.err_msg, "1/true/yes/on") != NULL, "%s", c.err_msg);
  cr_expect_eq(flags_set(&c, "NSA_SEL_NOPE", "1", -1, NULL, NULL), NSA_E_BAD_REQUEST);
  cr_expect(strstr(c.err_msg, "NSA_SEL_VARLEN_MIN_L") != NULL, "lists the flags: %s", c.err_msg);
  cr_expect_eq(flags_set(&c, "NSA_SEL_SHADOW_RATE", "2", -1, NULL, NULL), NSA_E_BAD_REQUEST);
  cr_expect_eq(flags_set(&c, "NSA_SEL_VARLEN_V2", "0", 120, NULL, NULL), NSA_E_BAD_REQUEST);

  /* value as a msgpack int */
  ivset_t iv = {"NSA_SEL_VARLEN_MIN_L", 128};
  cr_assert_eq(ops_call_raw(&c, "flags.set", pack_int, &iv), NSA_E_OK, "%s", c.err_msg);
  e2 = (uint64_t)ops_res_int(&c, "epoch");
  cr_expect_gt(e2, e1);
  flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
  cr_expect_eq(g.value, 128);

  nsa_request_t *r = req_of(NSA_M_FLAGS_RESET);
  snprintf(r->u.flag_name, sizeof r->u.flag_name, "NSA_SEL_VARLEN_MIN_L");
  cr_assert_eq(ops_call(&c, r), NSA_E_OK, "%s", c.err_msg);
  cr_expect_gt((uint64_t)ops_res_int(&c, "epoch"), e2);
  flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
  cr_expect_str_eq(g.source, "config");
  cr_expect_eq(g.value, 64);
  ops_client_close(&c);
  int st = ops_nsad_signal_wait(&d, SIGTERM, 15);
  cr_expect(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
  ops_nsad_cleanup(&d);
}

/* flags.set on connection a, from a thread (its reply comes only once the
 * state file is written). */
typedef struct {
  ops_client_t *c;
  int rc;
  char msg[256];
} slow_set_t;

static void *slow_set_main(void *arg) {
  slow_set_t *t = arg;
  nsa_request_t *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->method = NSA_M_FLAGS_SET;
  snprintf(r->u.flags_set.name, sizeof r->u.flags_set.name, "NSA_SEL_VARLEN_MIN_L");
  snprintf(r->u.flags_set.value, sizeof r->u.flags_set.value, "300");
  t->rc = ops_call(t->c, r);
  snprintf(t->msg, sizeof t->msg, "%s", t->c->err_msg);
  free(r);
  return NULL;
}

/* The persist-off-the-loop tests: nsad's temporary state file becomes a
 * FIFO, so its next persist blocks in open() until release_fifo reads it
 * (the write then fails: fsync on a FIFO is EINVAL). */
static void make_state_fifo(const ops_nsad_t *d, char *fifo, size_t n) {
  snprintf(fifo, n, "%s/flags.state.tmp", d->state);
  mkdir(d->state, 0700);
  cr_assert_eq(mkfifo(fifo, 0600), 0, "mkfifo %s: %s", fifo, strerror(errno));
}

/* While a persist is stuck: ping on b (5 s receive timeout; *dt its time),
 * then, if it answered, read NSA_SEL_VARLEN_MIN_L into *g. Returns the
 * ping's rc. */
static int ping_while_stuck(ops_client_t *b, double *dt, fget_t *g) {
  struct timeval tv = {.tv_sec = 5};
  setsockopt(b->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  double t0 = now_s();
  int prc = ops_call(b, req_of(NSA_M_PING));
  *dt = now_s() - t0;
  if (prc == NSA_E_OK) flags_get(b, "NSA_SEL_VARLEN_MIN_L", g);
  return prc;
}

static void release_fifo(const char *fifo) {
  int fd = open(fifo, O_RDONLY | O_CLOEXEC);
  char buf[4096];
  while (fd >= 0 && read(fd, buf, sizeof buf) > 0) {
  }
  if (fd >= 0) close(fd);
}

/* A flag change is persisted (write, fsync, rename) before it applies, and
 * the disk may be slow. Here nsad's temporary state file is a FIFO, so its
 * write blocks until this test reads it: meanwhile another connection must
 * be served (ping, and flags.get still showing the old value). Released, the
 * change fails cleanly (fsync on a FIFO: EINVAL), the flag is unchanged and
 * the next flags.set works. */
Test(nsad, flags_persist_off_the_loop, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  start_or_fail(&d, NULL, NULL);
  ops_client_t a, b;
  connect_hello(&d, &a, NULL);
  connect_hello(&d, &b, NULL);
  char fifo[400];
  make_state_fifo(&d, fifo, sizeof fifo);
  slow_set_t t = {.c = &a, .rc = -2};
  pthread_t th;
  cr_assert_eq(pthread_create(&th, NULL, slow_set_main, &t), 0);
  usleep(300 * 1000); /* nsad is inside open() of the FIFO by now */
  double dt = 0;
  fget_t g = {0};
  int prc = ping_while_stuck(&b, &dt, &g);
  release_fifo(fifo); /* whatever happened above */
  pthread_join(th, NULL);
  cr_expect_eq(prc, NSA_E_OK,
               "ping on another connection got no answer while flags.set was writing the "
               "state file (rc %d after %.1f s): the event loop waited on the disk",
               prc, dt);
  cr_expect_lt(dt, 1.0, "ping took %.2f s while flags.set was writing the state file", dt);
  if (prc == NSA_E_OK) {
    cr_expect_str_eq(g.source, "default", "the change showed before it was persisted");
    cr_expect_eq(g.value, 0);
  }
  cr_expect_eq(t.rc, NSA_E_INTERNAL, "flags.set with an unwritable state file: rc %d (%s)", t.rc,
               t.msg);
  cr_expect(strstr(t.msg, "not applied") != NULL, "%s", t.msg);
  flags_get(&a, "NSA_SEL_VARLEN_MIN_L", &g);
  cr_expect_str_eq(g.source, "default", "a change that was not persisted must not apply");
  uint64_t e = 0;
  cr_expect_eq(flags_set(&a, "NSA_SEL_VARLEN_MIN_L", "300", -1, NULL, &e), NSA_E_OK, "%s",
               a.err_msg);
  flags_get(&b, "NSA_SEL_VARLEN_MIN_L", &g);
  cr_expect_eq(g.value, 300);
  cr_expect_str_eq(g.source, "runtime");
  cr_expect_eq(g.epoch, e);
  ops_client_close(&a);
  ops_client_close(&b);
  int st = ops_nsad_signal_wait(&d, SIGTERM, 15);
  cr_expect(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
  ops_nsad_cleanup(&d);
}

/* SIGHUP persists a changed config layer too: while that write is stuck
 * (the temporary state file is a FIFO again), other connections must be
 * served and the new value must not show yet. A second SIGHUP meanwhile
 * waits for the first reload, which fails cleanly once released, then
 * reads the file again and applies it. */
Test(nsad, reload_persist_off_the_loop, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_client_t b;
  start_with_conf(&d, "NSA_SEL_VARLEN_MIN_L=64\n", NULL, &b);
  char fifo[400];
  make_state_fifo(&d, fifo, sizeof fifo);
  ops_write_file(d.conf, "NSA_SEL_VARLEN_MIN_L=96\n");
  kill(d.pid, SIGHUP);
  usleep(300 * 1000); /* nsad is inside open() of the FIFO by now */
  double dt = 0;
  fget_t g = {0};
  int prc = ping_while_stuck(&b, &dt, &g);
  kill(d.pid, SIGHUP); /* a second one while the first is stuck: runs after it */
  usleep(100 * 1000);
  release_fifo(fifo); /* whatever happened above */
  cr_expect_eq(prc, NSA_E_OK,
               "ping got no answer while a SIGHUP reload was writing the state file (rc %d after "
               "%.1f s): the event loop waited on the disk",
               prc, dt);
  cr_expect_lt(dt, 1.0, "ping took %.2f s while a SIGHUP reload was writing the state file", dt);
  if (prc == NSA_E_OK) cr_expect_eq(g.value, 64, "the reloaded value showed before it was persisted");
  /* The stuck reload fails cleanly; the SIGHUP that came meanwhile reads
   * the file again and applies it, with no further signal. */
  struct timeval tv = {.tv_sec = 10};
  setsockopt(b.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  const double t0 = now_s();
  do {
    usleep(50000);
    flags_get(&b, "NSA_SEL_VARLEN_MIN_L", &g);
  } while (g.value != 96 && now_s() - t0 < 10);
  cr_expect_eq(g.value, 96, "the SIGHUP queued behind the stuck reload did not apply the file");
  cr_expect_str_eq(g.source, "config");
  ops_client_close(&b);
  int st = ops_nsad_signal_wait(&d, SIGTERM, 15);
  cr_expect(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
  ops_nsad_cleanup(&d);
}

Test(nsad, persistence_restart_and_kill9, .timeout = 90) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  start_or_fail(&d, NULL, NULL);
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  uint64_t e1;
  cr_assert_eq(flags_set(&c, "NSA_SEL_VARLEN_MIN_L", "300", -1, NULL, &e1), NSA_E_OK);
  ops_client_close(&c);
  int st = ops_nsad_signal_wait(&d, SIGTERM, 15);
  cr_expect(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
  start_or_fail(&d, NULL, NULL);
  connect_hello(&d, &c, NULL);
  cr_expect_gt(c.hello_epoch, e1, "epoch never goes backwards across a restart");
  fget_t g;
  flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
  cr_expect_eq(g.value, 300);
  cr_expect_str_eq(g.source, "runtime");

  for (int round = 0; round < 3; round++) {
    char v[16];
    snprintf(v, sizeof v, "%d", 400 + round);
    uint64_t e;
    cr_assert_eq(flags_set(&c, "NSA_SEL_VARLEN_MIN_L", v, -1, NULL, &e), NSA_E_OK);
    kill(d.pid, SIGKILL); /* right after the reply */
    waitpid(d.pid, &st, 0);
    d.pid = -1;
    ops_client_close(&c);
    start_or_fail(&d, NULL, NULL);
    connect_hello(&d, &c, NULL);
    flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
    cr_expect_eq(g.value, 400 + round, "round %d: change lost by kill -9 after the reply", round);
    cr_expect_gt(g.epoch, e, "round %d: epoch went backwards", round);
  }
  ops_client_close(&c);
  ops_nsad_cleanup(&d);
}

Test(nsad, sighup_reloads_config_runtime_stays, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_client_t c;
  start_with_conf(&d, "NSA_SEL_VARLEN_MIN_L=64\n", NULL, &c);
  cr_assert_eq(flags_set(&c, "NSA_SEL_VARLEN_V2", "0", -1, NULL, NULL), NSA_E_OK);
  fget_t g;
  flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
  uint64_t e0 = g.epoch;
  ops_write_file(d.conf, "NSA_SEL_VARLEN_MIN_L=96\nNSA_SEL_VARLEN_V2=1\n");
  kill(d.pid, SIGHUP);
  double t0 = now_s();
  do {
    usleep(50000);
    flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
  } while (g.value != 96 && now_s() - t0 < 10);
  cr_expect_eq(g.value, 96, "SIGHUP re-read the config file");
  cr_expect_gt(g.epoch, e0);
  flags_get(&c, "NSA_SEL_VARLEN_V2", &g);
  cr_expect_eq(g.effective, 0, "runtime change stays on top after a reload");
  cr_expect_str_eq(g.source, "runtime");
  /* a broken config on SIGHUP: nsad keeps serving with the old values */
  ops_write_file(d.conf, "NSA_SEL_VARLEN_MIN_L=lots\n");
  kill(d.pid, SIGHUP);
  usleep(300000);
  cr_assert_eq(ops_call(&c, req_of(NSA_M_PING)), NSA_E_OK);
  flags_get(&c, "NSA_SEL_VARLEN_MIN_L", &g);
  cr_expect_eq(g.value, 96);
  ops_client_close(&c);
  ops_nsad_cleanup(&d);
}

Test(nsad, rollout_deterministic_and_proportional, .timeout = 120) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  start_or_fail(&d, NULL, NULL);
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  cr_assert_eq(flags_set(&c, "NSA_SEL_VARLEN_V2", "off", 30, NULL, NULL), NSA_E_OK);
  ops_client_close(&c);
  const int N = 300;
  int off = 0;
  for (int i = 0; i < N; i++) {
    char host[64], rank[32];
    snprintf(host, sizeof host, "host=node-%d", i / 4);
    snprintf(rank, sizeof rank, "rank=%d", i % 4);
    const char *labels[] = {host, rank, "job=grpo", NULL};
    int eff[2];
    for (int k = 0; k < 2; k++) { /* the same worker reconnecting */
      connect_hello(&d, &c, k ? (const char *[]){"job=grpo", rank, host, NULL} : labels);
      fget_t g;
      flags_get(&c, "NSA_SEL_VARLEN_V2", &g);
      eff[k] = (int)g.effective;
      ops_client_close(&c);
    }
    cr_assert_eq(eff[0], eff[1], "session %d changed value across a reconnect", i);
    /* the daemon agrees with the documented bucket function */
    nsa_proto_label_t l[3];
    memset(l, 0, sizeof l);
    snprintf(l[0].key, 64, "host");
    snprintf(l[0].value, 256, "%s", host + 5);
    snprintf(l[1].key, 64, "rank");
    snprintf(l[1].value, 256, "%s", rank + 5);
    snprintf(l[2].key, 64, "job");
    snprintf(l[2].value, 256, "grpo");
    int in = nsad_flags_rollout_bucket(l, 3, "NSA_SEL_VARLEN_V2") < 3000;
    cr_assert_eq(eff[0] == 0, in, "session %d: daemon and bucket function disagree", i);
    off += eff[0] == 0;
  }
  double frac = (double)off / N;
  cr_expect(frac > 0.22 && frac < 0.38, "30%% rule admitted %.3f of %d sessions", frac, N);
  ops_nsad_cleanup(&d);
}

/* ------------------------------------------------------- permissions --- */

/* Child: become uid/gid, connect, try admin methods; exit code bit i set when
 * check i failed. */
static int as_user(const char *sock, uid_t uid, gid_t gid, int expect_admin) {
  pid_t pid = fork();
  if (pid == 0) {
    if (setgroups(0, NULL) != 0 || setgid(gid) != 0 || setuid(uid) != 0) _exit(100);
    ops_client_t c;
    if (ops_client_connect(&c, sock) != 0) _exit(101);
    if (ops_hello(&c, "other-user", NULL) != NSA_E_OK) _exit(102);
    int bad = 0;
    int want = expect_admin ? NSA_E_OK : NSA_E_PERMISSION_DENIED;
    if (flags_set(&c, "NSA_SEL_VARLEN_V2", "0", -1, NULL, NULL) != want) bad |= 1;
    if (!expect_admin && !strstr(c.err_msg, "admin")) bad |= 2;
    nsa_request_t *r = req_of(NSA_M_FLAGS_RESET);
    snprintf(r->u.flag_name, sizeof r->u.flag_name, "NSA_SEL_VARLEN_V2");
    if (ops_call(&c, r) != want) bad |= 4;
    if (ops_call(&c, req_of(NSA_M_FLAGS_GET)) != NSA_E_OK) bad |= 8;
    if (!expect_admin && ops_call(&c, req_of(NSA_M_SHUTDOWN)) != NSA_E_PERMISSION_DENIED)
      bad |= 16;
    ops_client_close(&c);
    _exit(bad);
  }
  int st;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 200;
}

Test(nsad, admin_methods_need_admin, .timeout = 60) {
  NEED_NSAD();
  if (geteuid() != 0) cr_skip_test("needs root to act as another uid");
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  struct group *ng = getgrgid(65534);
  const char *args[] = {"--admin-group", ng ? ng->gr_name : "root", NULL};
  start_or_fail(&d, args, NULL);
  chmod(d.dir, 0711);
  chmod(d.sock, 0666); /* let the other uid reach the socket for this test */
  int rc = as_user(d.sock, 54321, 54321, 0);
  cr_expect_eq(rc, 0, "non-admin uid: failed checks mask %d (100+: setup)", rc);
  if (ng) {
    rc = as_user(d.sock, 54321, 65534, 1);
    cr_expect_eq(rc, 0, "admin group member: failed checks mask %d", rc);
  }
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  cr_expect_eq(ops_call(&c, req_of(NSA_M_PING)), NSA_E_OK, "the daemon still serves");
  ops_client_close(&c);
  char *log = ops_nsad_log(&d);
  if (ng)
    cr_expect(strstr(log, "audit") && strstr(log, "uid=54321"), "audit of the group member:\n%s",
              log);
  free(log);
  ops_nsad_cleanup(&d);
}

Test(nsad, audit_line_in_log, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  start_or_fail(&d, NULL, NULL);
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  uint64_t e;
  nsa_request_t *r = req_of(NSA_M_FLAGS_SET);
  snprintf(r->u.flags_set.name, 64, "NSA_SEL_SHADOW_RATE");
  snprintf(r->u.flags_set.value, 64, "0.5");
  r->u.flags_set.has_percent = 1;
  r->u.flags_set.percent = 25;
  r->u.flags_set.nmatch = 1;
  snprintf(r->u.flags_set.match[0].key, 64, "team");
  snprintf(r->u.flags_set.match[0].value, 64, "rl");
  cr_assert_eq(ops_call(&c, r), NSA_E_OK, "%s", c.err_msg);
  e = (uint64_t)ops_res_int(&c, "epoch");
  ops_client_close(&c);
  ops_nsad_signal_wait(&d, SIGTERM, 15);
  char *log = ops_nsad_log(&d);
  char *line = strstr(log, " audit ");
  cr_assert_not_null(line, "no audit line in:\n%s", log);
  char want_pid[32], want_epoch[48], want_uid[32];
  snprintf(want_pid, sizeof want_pid, "pid=%d ", (int)getpid());
  snprintf(want_epoch, sizeof want_epoch, "epoch=%llu", (unsigned long long)e);
  snprintf(want_uid, sizeof want_uid, "uid=%u ", (unsigned)geteuid());
  char *eol = strchr(line, '\n');
  if (eol) *eol = 0;
  const char *parts[] = {want_uid, want_pid, "client=\"ops-test\"", "flag=NSA_SEL_SHADOW_RATE",
                         "old=0(default)", "new=0.5(runtime)", "percent=25", "match:team=rl",
                         want_epoch};
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
    cr_expect(strstr(line, parts[i]) != NULL, "audit line lacks '%s': %s", parts[i], line);
  free(log);
  ops_nsad_cleanup(&d);
}

/* ----------------------------------------------------------- metrics --- */

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, (struct sockaddr *)&a, sizeof a);
  socklen_t l = sizeof a;
  getsockname(fd, (struct sockaddr *)&a, &l);
  close(fd);
  return ntohs(a.sin_port);
}

static char *http_get(int port, const char *path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return NULL;
  }
  char req[256];
  int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", path);
  if (write(fd, req, (size_t)n) != n) {
    close(fd);
    return NULL;
  }
  size_t cap = 1 << 16, len = 0;
  char *b = malloc(cap);
  ssize_t r;
  while ((r = read(fd, b + len, cap - len - 1)) > 0)
    if ((len += (size_t)r) + 1024 > cap) b = realloc(b, cap *= 2);
  close(fd);
  b[len] = 0;
  return b;
}

static char *metrics_text(ops_client_t *c) {
  nsa_request_t *r = req_of(NSA_M_METRICS_GET);
  r->u.metrics_get.prometheus = 1;
  cr_assert_eq(ops_call(c, r), NSA_E_OK, "%s", c->err_msg);
  const msgpack_object *t = ops_res(c, "text");
  cr_assert(t && t->type == MSGPACK_OBJECT_STR, "metrics.get format=prometheus: no text");
  char *s = strndup(t->via.str.ptr, t->via.str.size);
  char msg[512];
  cr_assert_eq(prom_check(s, strlen(s), msg, sizeof msg), 0, "invalid exposition: %s", msg);
  return s;
}

static double ping_count(const char *text) {
  double v = 0;
  prom_value(text, "nsad_requests_total{method=\"ping\",path=\"none\",code=\"ok\"}", &v);
  return v;
}

Test(nsad, metrics_text_map_and_http, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  int port = free_port();
  int have_http = nsad_metrics_http_available();
  char listen[64];
  snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
  const char *args[] = {"--metrics-listen", listen, NULL};
  start_or_fail(&d, have_http ? args : NULL, NULL);
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  char *t0 = metrics_text(&c);
  for (int i = 0; i < 25; i++) cr_assert_eq(ops_call(&c, req_of(NSA_M_PING)), NSA_E_OK);
  char *t1 = metrics_text(&c);
  cr_expect_eq(ping_count(t1) - ping_count(t0), 25, "ping counter moved by %g",
               ping_count(t1) - ping_count(t0));
  double v;
  cr_assert_eq(prom_value(t1, "nsad_sessions", &v), 0);
  cr_expect_geq(v, 1);
  cr_assert_eq(prom_value(t1, "nsad_flags_epoch", &v), 0);
  cr_expect_eq(v, (double)c.hello_epoch);

  /* map form */
  cr_assert_eq(ops_call(&c, req_of(NSA_M_METRICS_GET)), NSA_E_OK);
  const msgpack_object *m = ops_res(&c, "metrics");
  cr_assert(m && m->type == MSGPACK_OBJECT_MAP, "metrics.get: no metrics map");
  const msgpack_object *rq = ops_map_get(m, "nsad_requests_total");
  cr_assert_not_null(rq);
  cr_expect_not_null(ops_map_get(rq, "samples"));

  /* HTTP */
  if (!have_http) {
    cr_log_warn("built without libmicrohttpd: /metrics over HTTP not tested");
    free(t0);
    free(t1);
    ops_client_close(&c);
    ops_nsad_cleanup(&d);
    return;
  }
  char *h = http_get(port, "/metrics");
  cr_assert_not_null(h, "no HTTP server on %s", listen);
  cr_expect(strncmp(h, "HTTP/1.1 200", 12) == 0, "%.60s", h);
  char *body = strstr(h, "\r\n\r\n");
  cr_assert_not_null(body);
  body += 4;
  char msg[512];
  cr_expect_eq(prom_check(body, strlen(body), msg, sizeof msg), 0, "%s", msg);
  cr_expect_geq(ping_count(body), 25);
  free(h);
  h = http_get(port, "/other");
  cr_expect(h && strncmp(h, "HTTP/1.1 404", 12) == 0);
  free(h);
  free(t0);
  free(t1);
  ops_client_close(&c);
  ops_nsad_cleanup(&d);
}

/* Errors by code must include requests whose method name is unknown (the
 * daemon passes NSA_M_COUNT to nsad_metrics_request; they are counted as
 * method="unknown"). */
Test(nsad, unknown_method_counted_in_errors, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  start_or_fail(&d, NULL, NULL);
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  cr_assert_eq(ops_call_raw(&c, "no.such.method", NULL, NULL), NSA_E_UNKNOWN_METHOD);
  cr_assert_eq(ops_call_raw(&c, "flags.set", NULL, NULL), NSA_E_BAD_REQUEST); /* no name */
  char *t = metrics_text(&c);
  cr_expect_eq(prom_sum(t, "nsad_errors_total", (const char *const[]){"code=\"bad_request\"", NULL}), 1);
  cr_expect_eq(prom_sum(t, "nsad_errors_total", (const char *const[]){"code=\"unknown_method\"", NULL}), 1,
               "unknown_method errors are not counted (dispatch.c skips nsad_metrics_request "
               "when the method is unknown)");
  free(t);
  ops_client_close(&c);
  ops_nsad_cleanup(&d);
}

Test(nsad, subscription_cadence, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  start_or_fail(&d, NULL, NULL);
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  nsa_request_t *r = req_of(NSA_M_METRICS_SUBSCRIBE);
  r->u.metrics_subscribe.interval_ms = 100;
  cr_assert_eq(ops_call(&c, r), NSA_E_OK, "%s", c.err_msg);
  double t0 = now_s();
  int n = 0;
  while (now_s() - t0 < 1.5) {
    int got = ops_next_notification(&c, 300);
    cr_assert_geq(got, 0);
    if (!got) continue;
    n++;
    cr_assert_eq(c.msg.method_len, 7);
    cr_assert(!memcmp(c.msg.method, "metrics", 7));
    cr_assert_eq(c.msg.params.type, MSGPACK_OBJECT_MAP);
    cr_expect_not_null(ops_map_get(&c.msg.params, "nsad_requests_total"));
  }
  /* 1.5 s at 100 ms: 15 nominal */
  cr_expect(n >= 10 && n <= 17, "%d notifications in 1.5 s at 100 ms", n);
  ops_client_close(&c);
  ops_nsad_cleanup(&d);
}

/* ------------------------------------------------------------ shadow --- */

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static float frand(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static void tref(nsa_proto_tensor_t *t, uint64_t region, uint64_t off, nsa_dtype_t dt, int nd,
                 const int64_t *shape) {
  memset(t, 0, sizeof *t);
  t->region = region;
  t->offset = off;
  t->dtype = dt;
  t->ndim = nd;
  for (int i = 0; i < nd; i++) t->shape[i] = shape[i];
}

Test(nsad, shadow_metrics_appear_and_agree, .timeout = 120) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  start_or_fail(&d, NULL, NULL);
  ops_client_t c;
  connect_hello(&d, &c, NULL);
  uint64_t ep;
  cr_assert_eq(flags_set(&c, "NSA_SEL_SHADOW_RATE", "1", -1, NULL, &ep), NSA_E_OK, "%s",
               c.err_msg);

  /* q [1,S,H,D], k/v [1,Skv,G,D], o [1,S,H,D], lse [1,S,H], idx [1,S,G,n] */
  enum { S = 24, SKV = 64, G = 2, HH = 3, H = G * HH, D = 16, BS = 8, NI = 3 };
  const int64_t sq[4] = {1, S, H, D}, sk[4] = {1, SKV, G, D}, sl[3] = {1, S, H},
                si[4] = {1, S, G, NI};
  size_t nq = S * H * D, nk = SKV * G * D, nl = S * H, ni = S * G * NI;
  size_t oq = 0, ok_ = oq + nq * 4, ov = ok_ + nk * 4, oo = ov + nk * 4, ol = oo + nq * 4,
         oi = ol + nl * 4, total = oi + ni * 4;
  char name[64];
  snprintf(name, sizeof name, "/nsa-opstest-%d", (int)getpid());
  shm_unlink(name);
  int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
  cr_assert_geq(fd, 0);
  cr_assert_eq(ftruncate(fd, (off_t)total), 0);
  char *mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  cr_assert_neq(mem, MAP_FAILED);
  close(fd);
  float *q = (float *)(mem + oq), *k = (float *)(mem + ok_), *v = (float *)(mem + ov),
        *o = (float *)(mem + oo), *lse = (float *)(mem + ol);
  int32_t *idx = (int32_t *)(mem + oi);
  for (size_t i = 0; i < nq; i++) q[i] = frand();
  for (size_t i = 0; i < nk; i++) k[i] = frand(), v[i] = frand();
  for (size_t i = 0; i < ni; i++) {
    int x = (int)((frand() + 1.0f) * 4.5f) - 1; /* -1..7 */
    idx[i] = x < -1 ? -1 : x > 7 ? 7 : x;
  }

  nsa_request_t *r = req_of(NSA_M_REGION_REGISTER);
  r->u.region_register.kind = NSA_REGION_SHM;
  snprintf(r->u.region_register.name, sizeof r->u.region_register.name, "%s", name);
  r->u.region_register.size = total;
  cr_assert_eq(ops_call(&c, r), NSA_E_OK, "region.register: %s", c.err_msg);
  uint64_t region = (uint64_t)ops_res_int(&c, "region");

  const int NFWD = 12;
  for (int it = 0; it < NFWD; it++) {
    for (size_t i = 0; i < nq; i++) o[i] = NAN; /* poison */
    for (size_t i = 0; i < nl; i++) lse[i] = NAN;
    r = req_of(NSA_M_SEL_FORWARD);
    nsa_req_sel_attn_t *a = &r->u.sel_attn;
    tref(&a->q, region, oq, NSA_F32, 4, sq);
    tref(&a->k, region, ok_, NSA_F32, 4, sk);
    tref(&a->v, region, ov, NSA_F32, 4, sk);
    tref(&a->o, region, oo, NSA_F32, 4, sq);
    tref(&a->lse, region, ol, NSA_F32, 3, sl);
    a->has_lse = 1;
    a->sel.kind = NSA_SEL_BLOCK_INDICES;
    a->sel.block_size = BS;
    tref(&a->sel.t, region, oi, NSA_I32, 4, si);
    a->sync = 1;
    cr_assert_eq(ops_call(&c, r), NSA_E_OK, "forward: %s", c.err_msg);
    cr_expect_eq((uint64_t)ops_res_int(&c, "flags_epoch"), ep, "reply carries the flag epoch");
    const msgpack_object *p = ops_res(&c, "path");
    cr_assert(p && p->type == MSGPACK_OBJECT_STR);
    cr_expect(p->via.str.size == 9 && !memcmp(p->via.str.ptr, "varlen_v2", 9));
    int finite = 1;
    for (size_t i = 0; i < nq; i++) finite &= isfinite(o[i]);
    cr_expect(finite, "output written (no NaN poison left)");
  }
  char *t = metrics_text(&c);
  double cmp = prom_sum(t, "nsad_shadow_comparisons_total", NULL);
  cr_expect_eq(cmp, NFWD, "every forward was shadowed at rate 1 (got %g)", cmp);
  double v1 = prom_sum(t, "nsad_shadow_comparisons_total",
                       (const char *const[]){"shadow=\"varlen_v1\"", NULL});
  double pk = prom_sum(t, "nsad_shadow_comparisons_total",
                       (const char *const[]){"shadow=\"packed\"", NULL});
  cr_expect(v1 > 0 && pk > 0, "both pairs measured: v1 %g packed %g", v1, pk);
  const char *pairs[] = {"nsad_shadow_max_abs_diff{primary=\"varlen_v2\",shadow=\"varlen_v1\"}",
                         "nsad_shadow_max_abs_diff{primary=\"varlen_v2\",shadow=\"packed\"}",
                         "nsad_shadow_max_rel_diff{primary=\"varlen_v2\",shadow=\"varlen_v1\"}",
                         "nsad_shadow_max_rel_diff{primary=\"varlen_v2\",shadow=\"packed\"}"};
  for (int i = 0; i < 4; i++) {
    double x = NAN;
    cr_assert_eq(prom_value(t, pairs[i], &x), 0, "%s missing", pairs[i]);
    cr_expect(x >= 0 && x < 1e-4, "%s = %g over tolerance", pairs[i], x);
    cr_log_info("%s %g", pairs[i], x);
  }
  cr_expect_eq(prom_sum(t, "nsad_rows_total", (const char *const[]){"path=\"varlen_v2\"", NULL}),
               (double)NFWD * S * G);
  free(t);
  munmap(mem, total);
  shm_unlink(name);
  ops_client_close(&c);
  ops_nsad_cleanup(&d);
}

/* ----------------------------------------------------------- systemd --- */

static int notify_socket(const char *path) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  snprintf(a.sun_path, sizeof a.sun_path, "%.107s", path);
  cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  return fd;
}

/* Collects datagrams for up to `secs` or until one starts with `until`.
 * Appends them, '|'-separated, to buf. Returns 1 when `until` was seen. */
static int collect(int fd, double secs, const char *until, char *buf, size_t len) {
  double t0 = now_s();
  while (now_s() - t0 < secs) {
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char m[1024];
    ssize_t n = recv(fd, m, sizeof m - 1, 0);
    if (n <= 0) continue;
    m[n] = 0;
    size_t l = strlen(buf);
    snprintf(buf + l, len - l, "%s|", m);
    if (until && !strncmp(m, until, strlen(until))) return 1;
  }
  return 0;
}

static int count_of(const char *hay, const char *needle) {
  int n = 0;
  for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle)) n++;
  return n;
}

Test(nsad, notify_ready_reload_watchdog_stopping, .timeout = 60) {
  NEED_NSAD();
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  char np[300], e1[330];
  snprintf(np, sizeof np, "%s/notify", d.dir);
  int fd = notify_socket(np);
  snprintf(e1, sizeof e1, "NOTIFY_SOCKET=%s", np);
  const char *env[] = {e1, "WATCHDOG_USEC=300000", "WATCHDOG_PID=self", NULL};
  start_or_fail(&d, NULL, env);
  static char got[65536];
  got[0] = 0;
  cr_expect(collect(fd, 5, "READY=1", got, sizeof got), "no READY=1: %s", got);
  cr_expect(strstr(got, "STATUS=") != NULL, "no STATUS= line: %s", got);
  got[0] = 0;
  collect(fd, 1.0, NULL, got, sizeof got);
  int wd = count_of(got, "WATCHDOG=1");
  cr_expect(wd >= 4 && wd <= 12, "%d WATCHDOG=1 in 1 s at WatchdogSec=0.3s: %s", wd, got);
  got[0] = 0;
  kill(d.pid, SIGHUP);
  cr_expect(collect(fd, 5, "READY=1", got, sizeof got), "no READY=1 after reload: %s", got);
  cr_expect(strstr(got, "RELOADING=1") != NULL, "no RELOADING=1: %s", got);
  got[0] = 0;
  kill(d.pid, SIGTERM);
  cr_expect(collect(fd, 10, "STOPPING=1", got, sizeof got), "no STOPPING=1: %s", got);
  int st = ops_nsad_signal_wait(&d, 0, 15);
  cr_expect(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
  close(fd);
  ops_nsad_cleanup(&d);
}

Test(nsad, systemd_socket_activate_handoff, .timeout = 60) {
  NEED_NSAD();
  const char *ssa = access("/usr/bin/systemd-socket-activate", X_OK) == 0
                        ? "/usr/bin/systemd-socket-activate"
                        : access("/bin/systemd-socket-activate", X_OK) == 0
                              ? "/bin/systemd-socket-activate"
                              : NULL;
  if (!ssa) cr_skip_test("systemd-socket-activate not installed");
  ops_nsad_t d;
  ops_nsad_prepare(&d);
  pid_t pid = fork();
  if (pid == 0) {
    int lf = open(d.log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    dup2(lf, 2);
    dup2(lf, 1);
    execl(ssa, ssa, "-l", d.sock, ops_nsad_bin(), "--backend", "cpu", "--workers", "1",
          "--state-dir", d.state, "--socket", d.sock, (char *)NULL);
    _exit(127);
  }
  d.pid = pid;
  double t0 = now_s();
  while (access(d.sock, F_OK) != 0 && now_s() - t0 < 10) usleep(20000);
  ops_client_t c;
  /* the first connection makes systemd-socket-activate exec nsad with the
   * listening socket (LISTEN_FDS=1); nsad adopts it and answers */
  connect_hello(&d, &c, NULL);
  cr_expect_eq(ops_call(&c, req_of(NSA_M_PING)), NSA_E_OK);
  ops_client_close(&c);
  ops_client_t c2;
  connect_hello(&d, &c2, NULL); /* still listening on the inherited socket */
  ops_client_close(&c2);
  char *log = ops_nsad_log(&d);
  cr_expect(strstr(log, "passed by systemd") != NULL, "nsad did not adopt the socket:\n%s", log);
  free(log);
  int st = ops_nsad_signal_wait(&d, SIGTERM, 15);
  cr_expect(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
  ops_nsad_cleanup(&d);
}
