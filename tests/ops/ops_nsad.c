/* ops_nsad.c — see ops_nsad.h. */
#define _GNU_SOURCE
#include "ops_nsad.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ops_testutil.h"

const char *ops_nsad_bin(void) {
  const char *b = getenv("NSAD_BIN");
  if (!b || !*b || access(b, X_OK) != 0) return NULL;
  return b;
}

void ops_nsad_prepare(ops_nsad_t *d) {
  memset(d, 0, sizeof *d);
  d->pid = -1;
  /* Short path: sun_path is 108 bytes. */
  char tmpl[] = "/tmp/nsad-opsp-XXXXXX";
  char *dir = mkdtemp(tmpl);
  if (!dir) abort();
  snprintf(d->dir, sizeof d->dir, "%s", dir);
  snprintf(d->sock, sizeof d->sock, "%s/s.sock", dir);
  snprintf(d->state, sizeof d->state, "%s/state", dir);
  snprintf(d->conf, sizeof d->conf, "%s/nsad.conf", dir);
  snprintf(d->log, sizeof d->log, "%s/nsad.log", dir);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int can_connect(const char *path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  snprintf(a.sun_path, sizeof a.sun_path, "%.107s", path);
  int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
  close(fd);
  return ok;
}

int ops_nsad_start(ops_nsad_t *d, const char *const *args, const char *const *env) {
  const char *bin = ops_nsad_bin();
  if (!bin) return -1;
  const char *argv[64];
  int n = 0;
  argv[n++] = bin;
  argv[n++] = "--backend";
  argv[n++] = "cpu";
  argv[n++] = "--workers";
  argv[n++] = "1";
  argv[n++] = "--socket";
  argv[n++] = d->sock;
  argv[n++] = "--state-dir";
  argv[n++] = d->state;
  if (access(d->conf, R_OK) == 0) {
    argv[n++] = "--config";
    argv[n++] = d->conf;
  }
  for (int i = 0; args && args[i] && n < 62; i++) argv[n++] = args[i];
  argv[n] = NULL;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    int lf = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (lf >= 0) {
      dup2(lf, 2);
      close(lf);
    }
    /* a clean flag environment: nothing from the test runner leaks in
     * (sanitizer options excepted) */
    static const char *keep[] = {"ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"};
    char *kept[3] = {0};
    for (int i = 0; i < 3; i++)
      if (getenv(keep[i])) kept[i] = strdup(getenv(keep[i]));
    clearenv();
    setenv("PATH", "/usr/bin:/bin", 1);
    for (int i = 0; i < 3; i++)
      if (kept[i]) setenv(keep[i], kept[i], 1);
    for (int i = 0; env && env[i]; i++) putenv((char *)env[i]);
    /* WATCHDOG_PID=self: the pid nsad will have (exec keeps it) */
    const char *wp = getenv("WATCHDOG_PID");
    if (wp && !strcmp(wp, "self")) {
      char b[32];
      snprintf(b, sizeof b, "%d", (int)getpid());
      setenv("WATCHDOG_PID", b, 1);
    }
    execv(bin, (char *const *)argv);
    _exit(127);
  }
  d->pid = pid;
  double t0 = now_s();
  while (now_s() - t0 < 20) {
    int st;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      d->pid = -1;
      return -1;
    }
    if (can_connect(d->sock)) return 0;
    usleep(20000);
  }
  return -1;
}

int ops_nsad_signal_wait(ops_nsad_t *d, int sig, double timeout_s) {
  if (d->pid <= 0) return -1;
  kill(d->pid, sig);
  double t0 = now_s();
  while (now_s() - t0 < timeout_s) {
    int st;
    pid_t r = waitpid(d->pid, &st, WNOHANG);
    if (r == d->pid) {
      d->pid = -1;
      return st;
    }
    usleep(10000);
  }
  kill(d->pid, SIGKILL);
  waitpid(d->pid, NULL, 0);
  d->pid = -1;
  return -1;
}

void ops_nsad_cleanup(ops_nsad_t *d) {
  if (d->pid > 0) ops_nsad_signal_wait(d, SIGTERM, 10);
  if (d->dir[0]) ops_rmtree(d->dir);
}

char *ops_nsad_log(ops_nsad_t *d) {
  char *t = ops_read_file(d->log, NULL);
  return t ? t : strdup("");
}

/* ------------------------------------------------------------- client --- */

int ops_client_connect(ops_client_t *c, const char *sock) {
  memset(c, 0, sizeof *c);
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  snprintf(a.sun_path, sizeof a.sun_path, "%.107s", sock);
  if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    return -1;
  }
  c->dec = nsa_proto_decoder_new(64u << 20);
  nsa_proto_writer_init(&c->w);
  c->next_id = 1;
  return 0;
}

void ops_client_close(ops_client_t *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  if (c->dec) nsa_proto_decoder_free(c->dec);
  c->dec = NULL;
  nsa_proto_writer_destroy(&c->w);
}

static int send_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Reads until a message is decoded or timeout: 1 message, 0 timeout, -1 error. */
static int read_msg(ops_client_t *c, int timeout_ms) {
  double t0 = now_s();
  for (;;) {
    nsa_proto_err_t e;
    int known;
    uint32_t id;
    int r = nsa_proto_decoder_next(c->dec, &c->msg, &e, &known, &id);
    if (r == 1) return 1;
    if (r < 0) return -1;
    int left = timeout_ms - (int)((now_s() - t0) * 1000);
    if (left <= 0) return 0;
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    int pr = poll(&p, 1, left);
    if (pr < 0 && errno == EINTR) continue;
    if (pr <= 0) return pr;
    size_t avail;
    char *buf = nsa_proto_decoder_buffer(c->dec, 65536, &avail);
    if (!buf) return -1;
    ssize_t n = recv(c->fd, buf, avail, 0);
    if (n <= 0) return -1;
    nsa_proto_decoder_commit(c->dec, (size_t)n);
  }
}

static int wait_response(ops_client_t *c, uint32_t id) {
  for (;;) {
    int r = read_msg(c, 30000);
    if (r <= 0) return -1;
    if (c->msg.type != NSA_MSG_RESPONSE || c->msg.msgid != id) continue;
    c->err_code[0] = c->err_msg[0] = 0;
    if (c->msg.error.type == MSGPACK_OBJECT_NIL) return NSA_E_OK;
    nsa_proto_get_str(&c->msg.error, "code", c->err_code, sizeof c->err_code);
    nsa_proto_get_str(&c->msg.error, "message", c->err_msg, sizeof c->err_msg);
    int code = (int)nsa_proto_code_parse(c->err_code, strlen(c->err_code));
    return code == NSA_E_OK ? NSA_E_INTERNAL : code;
  }
}

int ops_call(ops_client_t *c, nsa_request_t *req) {
  uint32_t id = c->next_id++;
  nsa_proto_writer_reset(&c->w);
  nsa_proto_write_request(&c->w, id, req);
  if (send_all(c->fd, c->w.sbuf.data, c->w.sbuf.size) != 0) return -1;
  return wait_response(c, id);
}

int ops_call_raw(ops_client_t *c, const char *method, void (*fn)(msgpack_packer *, void *),
                 void *ud) {
  uint32_t id = c->next_id++;
  nsa_proto_writer_reset(&c->w);
  nsa_proto_write_request_begin(&c->w, id, method);
  if (fn)
    fn(&c->w.pk, ud);
  else
    msgpack_pack_map(&c->w.pk, 0);
  if (send_all(c->fd, c->w.sbuf.data, c->w.sbuf.size) != 0) return -1;
  return wait_response(c, id);
}

int ops_hello(ops_client_t *c, const char *client, const char *const *labels) {
  static nsa_request_t req;
  memset(&req, 0, sizeof req);
  req.method = NSA_M_HELLO;
  req.u.hello.protocol = NSA_PROTO_VERSION;
  snprintf(req.u.hello.client, sizeof req.u.hello.client, "%s", client);
  req.u.hello.pid = getpid();
  for (int i = 0; labels && labels[i] && i < NSA_PROTO_MAX_LABELS; i++) {
    const char *eq = strchr(labels[i], '=');
    nsa_proto_label_t *l = &req.u.hello.labels[req.u.hello.nlabels++];
    snprintf(l->key, sizeof l->key, "%.*s", (int)(eq - labels[i]), labels[i]);
    snprintf(l->value, sizeof l->value, "%s", eq + 1);
  }
  int rc = ops_call(c, &req);
  if (rc == NSA_E_OK) {
    c->session = (uint64_t)ops_res_int(c, "session");
    c->hello_epoch = (uint64_t)ops_res_int(c, "flags_epoch");
  }
  return rc;
}

int ops_next_notification(ops_client_t *c, int timeout_ms) {
  double t0 = now_s();
  for (;;) {
    int left = timeout_ms - (int)((now_s() - t0) * 1000);
    if (left <= 0) return 0;
    int r = read_msg(c, left);
    if (r <= 0) return r;
    if (c->msg.type == NSA_MSG_NOTIFICATION) return 1;
  }
}

const msgpack_object *ops_res(ops_client_t *c, const char *key) {
  return ops_map_get(&c->msg.result, key);
}

int64_t ops_res_int(ops_client_t *c, const char *key) {
  double v = ops_num(ops_res(c, key));
  return isnan(v) ? -1 : (int64_t)v;
}
