/* harness.c — real-nsad test harness (see harness.h). */
#define _GNU_SOURCE
#include "harness.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
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

#include "ref.h"

#ifndef NSAD_BIN
#error "NSAD_BIN must be defined by CMake"
#endif

static pid_t g_pids[32];
static int g_npids;

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void th_fini(void) {
  for (int i = 0; i < g_npids; i++)
    if (g_pids[i] > 0 && kill(g_pids[i], 0) == 0) {
      kill(g_pids[i], SIGKILL);
      waitpid(g_pids[i], NULL, 0);
    }
  g_npids = 0;
}

static void remember(pid_t p) {
  if (g_npids < 32) g_pids[g_npids++] = p;
}

static void forget(pid_t p) {
  for (int i = 0; i < g_npids; i++)
    if (g_pids[i] == p) g_pids[i] = g_pids[--g_npids];
}

int th_raw_connect(const char *sock) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

pid_t th_spawn(th_nsad_t *d, const char *sock, const char *const *extra, int wait_ready) {
  const char *argv[56];
  int n = 0;
  // NSAD_TEST_WRAPPER="compute-sanitizer --tool memcheck ..." runs nsad under
  // a tool (space-separated words, at most 15) while the test's own clients
  // run plain: compute-sanitizer with --target-processes all stalls on CUDA
  // IPC between instrumented processes, so the GPU IPC suite checks the
  // daemon alone this way (docs/GPU_VERIFICATION.md).
  static char wrap[512];
  const char *we = getenv("NSAD_TEST_WRAPPER");
  int wrapped = 0;
  if (we && we[0]) {
    snprintf(wrap, sizeof wrap, "%s", we);
    for (char *save = NULL, *w = strtok_r(wrap, " ", &save); w && n < 15; w = strtok_r(NULL, " ", &save))
      argv[n++] = w;
    wrapped = n > 0;
  }
  d->wrapped = wrapped;
  argv[n++] = NSAD_BIN;
  argv[n++] = "--socket";
  argv[n++] = sock;
  argv[n++] = "--log-level";
  argv[n++] = "debug";
  for (int i = 0; extra && extra[i] && n < 54; i++) argv[n++] = extra[i];
  argv[n] = NULL;
  pid_t pid = fork();
  if (pid == 0) {
    int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 2);
      close(fd);
    }
    if (wrapped) execvp(argv[0], (char *const *)argv);
    else execv(NSAD_BIN, (char *const *)argv);
    _exit(127);
  }
  if (pid < 0) return -1;
  remember(pid);
  if (!wait_ready) return pid;
  int64_t deadline = now_ms() + (wrapped ? 120000 : 15000);  // a tool starts slowly
  while (now_ms() < deadline) {
    int fd = th_raw_connect(sock);
    if (fd >= 0) {
      close(fd);
      return pid;
    }
    int st;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      forget(pid);
      return -1;
    }
    usleep(10000);
  }
  return -1;
}

int th_start(th_nsad_t *d, const char *const *extra) {
  memset(d, 0, sizeof *d);
  snprintf(d->dir, sizeof d->dir, "/tmp/nsad-test.XXXXXX");
  if (!mkdtemp(d->dir)) return -1;
  chmod(d->dir, 0755); /* other-uid tests connect through it */
  snprintf(d->sock, sizeof d->sock, "%s/nsad.sock", d->dir);
  snprintf(d->log, sizeof d->log, "%s/nsad.log", d->dir);
  d->pid = th_spawn(d, d->sock, extra, 1);
  if (d->pid < 0) th_dump_log(d);
  return d->pid > 0 ? 0 : -1;
}

int th_wait_exit(pid_t pid, int timeout_ms) {
  int64_t deadline = now_ms() + timeout_ms;
  for (;;) {
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) {
      forget(pid);
      if (WIFEXITED(st)) return WEXITSTATUS(st);
      if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
      return -1;
    }
    if (r < 0) return -1;
    if (now_ms() > deadline) return -1;
    usleep(5000);
  }
}

static void rm_rf(const char *dir) {
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) { /* best effort */
  }
}

/* Under NSAD_TEST_WRAPPER the pid is the tool's: signal its children (nsad)
 * so the tool sees nsad exit, prints its report and exits with nsad's
 * status (or the tool's error exit code). */
static void term_children(pid_t pid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)pid, (int)pid);
  FILE *f = fopen(path, "r");
  int c, n = 0;
  while (f && fscanf(f, "%d", &c) == 1) {
    kill((pid_t)c, SIGTERM);
    n++;
  }
  if (f) fclose(f);
  if (n == 0) kill(pid, SIGTERM);
}

int th_stop(th_nsad_t *d, int rm_dir) {
  int rc = -1, had = d->pid > 0;
  if (d->pid > 0) {
    if (d->wrapped) term_children(d->pid);
    else kill(d->pid, SIGTERM);
    rc = th_wait_exit(d->pid, d->wrapped ? 120000 : 20000);
    if (rc < 0) {
      kill(d->pid, SIGKILL);
      th_wait_exit(d->pid, 5000);
    }
    d->pid = 0;
  }
  if (had && rc != 0) th_dump_log(d);
  if (rm_dir && d->dir[0]) rm_rf(d->dir);
  return rc;
}

void th_dump_log(const th_nsad_t *d) {
  FILE *f = fopen(d->log, "r");
  if (!f) return;
  fprintf(stderr, "---- %s ----\n", d->log);
  char line[1024];
  while (fgets(line, sizeof line, f)) fputs(line, stderr);
  fclose(f);
}

nsa_client_t *th_client_labels(const th_nsad_t *d, const char *name,
                               const nsa_client_label_t *labels, int nlabels) {
  nsa_client_opts_t o = {.socket_path = d->sock, .name = name, .labels = labels,
                         .nlabels = nlabels, .timeout_ms = 60000, .reconnect_attempts = 3};
  nsa_client_t *c = NULL;
  if (nsa_client_open(&c, &o) != 0) {
    fprintf(stderr, "th_client: %s\n", nsa_client_open_error());
    return NULL;
  }
  return c;
}

nsa_client_t *th_client(const th_nsad_t *d, const char *name) {
  return th_client_labels(d, name, NULL, 0);
}

/* --------------------------------------------------------------- raw --- */

int th_raw_send(int fd, const void *buf, size_t len) {
  const char *p = buf;
  while (len) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

int th_raw_request(int fd, uint32_t msgid, const char *method) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request_begin(&w, msgid, method);
  msgpack_pack_map(&w.pk, 0);
  int rc = th_raw_send(fd, w.sbuf.data, w.sbuf.size);
  nsa_proto_writer_destroy(&w);
  return rc;
}

int th_raw_hello(int fd, uint32_t msgid) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request_begin(&w, msgid, "hello");
  msgpack_pack_map(&w.pk, 3);
  nsa_proto_pack_kv_int(&w.pk, "protocol", 1);
  nsa_proto_pack_kv_str(&w.pk, "client", "raw");
  nsa_proto_pack_kv_int(&w.pk, "pid", getpid());
  int rc = th_raw_send(fd, w.sbuf.data, w.sbuf.size);
  nsa_proto_writer_destroy(&w);
  return rc;
}

int th_raw_register_shm(int fd, uint32_t msgid, const char *name, uint64_t size) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request_begin(&w, msgid, "region.register");
  msgpack_pack_map(&w.pk, 3);
  nsa_proto_pack_kv_str(&w.pk, "kind", "shm");
  nsa_proto_pack_kv_str(&w.pk, "name", name);
  nsa_proto_pack_kv_uint(&w.pk, "size", size);
  int rc = th_raw_send(fd, w.sbuf.data, w.sbuf.size);
  nsa_proto_writer_destroy(&w);
  return rc;
}

double th_gauge(nsa_client_t *c, const char *family) {
  nsa_client_value_t *m = NULL;
  double v = -1;
  if (nsa_client_metrics_get(c, &m) != 0) return -1;
  char path[128];
  snprintf(path, sizeof path, "%s.samples.0.value", family);
  if (nsa_client_value_get_double(m, path, &v) != 0) v = -1;
  nsa_client_value_free(m);
  return v;
}

double th_prom_value(nsa_client_t *c, const char *series) {
  char *text = NULL;
  if (nsa_client_metrics_prometheus(c, &text) != 0 || !text) return -1;
  double v = -1;
  const size_t n = strlen(series);
  for (const char *p = text; (p = strstr(p, series)) != NULL; p += n)
    if ((p == text || p[-1] == '\n') && p[n] == ' ') {
      v = strtod(p + n + 1, NULL);
      break;
    }
  free(text);
  return v;
}

int th_shm_holds(pid_t pid, const char *name) {
  char path[64], want[300], line[1024];
  snprintf(want, sizeof want, "/dev/shm%s", name);
  snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  int n = 0;
  while (fgets(line, sizeof line, f))
    if (strstr(line, want)) n++;
  fclose(f);
  snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
  DIR *dir = opendir(path);
  if (!dir) return -1;
  for (struct dirent *e; (e = readdir(dir)) != NULL;) {
    char fp[320];
    snprintf(fp, sizeof fp, "%s/%s", path, e->d_name);
    ssize_t k = readlink(fp, line, sizeof line - 1);
    if (k <= 0) continue;
    line[k] = 0;
    if (strstr(line, want)) n++;
  }
  closedir(dir);
  return n;
}

static char g_unlink_names[4][256];
static void unlink_at_exit(void) {
  for (int i = 0; i < 4; i++)
    if (g_unlink_names[i][0]) shm_unlink(g_unlink_names[i]);
}

void th_shm_unlink_at_exit(const char *name) {
  static int registered;
  for (int i = 0; i < 4; i++)
    if (!g_unlink_names[i][0]) {
      snprintf(g_unlink_names[i], sizeof g_unlink_names[i], "%s", name);
      break;
    }
  if (!registered) registered = atexit(unlink_at_exit) == 0;
}

int th_raw_response(int fd, nsa_proto_decoder_t *dec, int timeout_ms, uint32_t *msgid,
                    char *code, size_t codelen) {
  int64_t deadline = now_ms() + timeout_ms;
  for (;;) {
    nsa_proto_msg_t m;
    nsa_proto_err_t err;
    int known;
    uint32_t id;
    int rc = nsa_proto_decoder_next(dec, &m, &err, &known, &id);
    if (rc < 0) return -1;
    if (rc == 1 && m.type == NSA_MSG_RESPONSE) {
      *msgid = m.msgid;
      code[0] = 0;
      if (m.error.type == MSGPACK_OBJECT_MAP) nsa_proto_get_str(&m.error, "code", code, codelen);
      return 1;
    }
    if (rc == 1) continue; /* notification */
    int left = (int)(deadline - now_ms());
    if (left <= 0) return -1;
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, left) <= 0) return -1;
    size_t avail;
    char *b = nsa_proto_decoder_buffer(dec, 65536, &avail);
    ssize_t n = read(fd, b, avail);
    if (n == 0) return 0;
    if (n < 0) return errno == ECONNRESET ? 0 : -1;
    nsa_proto_decoder_commit(dec, (size_t)n);
  }
}

int th_raw_wait_closed(int fd, int timeout_ms) {
  int64_t deadline = now_ms() + timeout_ms;
  char buf[4096];
  for (;;) {
    int left = (int)(deadline - now_ms());
    if (left <= 0) return 0;
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, left) <= 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return 1;
    if (n < 0) return 0;
  }
}

/* ------------------------------------------------------------ problems --- */

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static double rng_u(uint64_t *s) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; }
static size_t al(size_t x) { return (x + 63) & ~(size_t)63; }

int th_prob_init(th_prob_t *p, nsa_client_t *c, int64_t B, int64_t S, int64_t Skv, int64_t G,
                 int64_t h, int64_t D, int64_t n, int32_t bs, int ranges, uint64_t seed) {
  memset(p, 0, sizeof *p);
  p->B = B, p->S = S, p->Skv = Skv, p->G = G, p->h = h, p->H = G * h, p->Dk = D, p->Dv = D;
  p->n = n, p->bs = bs, p->ranges = ranges, p->rng = seed;
  size_t nq = (size_t)(B * S * p->H * D), nk = (size_t)(B * Skv * G * D), nl = (size_t)(B * S * p->H);
  size_t ns = (size_t)(B * S * G * n) * (ranges ? 2 : 1);
  p->off_q = 0;
  p->off_k = al(p->off_q + nq * 4);
  p->off_v = al(p->off_k + nk * 4);
  p->off_o = al(p->off_v + nk * 4);
  p->off_l = al(p->off_o + nq * 4);
  p->off_s = al(p->off_l + nl * 4);
  p->off_do = al(p->off_s + ns * 4);
  p->off_dq = al(p->off_do + nq * 4);
  p->off_dk = al(p->off_dq + nq * 4);
  p->off_dv = al(p->off_dk + nk * 4);
  p->total = al(p->off_dv + nk * 4);
  if (nsa_client_shm_create(c, p->total, &p->shm) != 0) return -1;
  char *b = p->shm->ptr;
  p->q = (float *)(b + p->off_q), p->k = (float *)(b + p->off_k), p->v = (float *)(b + p->off_v);
  p->o = (float *)(b + p->off_o), p->lse = (float *)(b + p->off_l), p->sel = (int32_t *)(b + p->off_s);
  p->dout = (float *)(b + p->off_do), p->dq = (float *)(b + p->off_dq);
  p->dk = (float *)(b + p->off_dk), p->dv = (float *)(b + p->off_dv);
  p->qd = malloc(nq * 8), p->kd = malloc(nk * 8), p->vd = malloc(nk * 8), p->dod = malloc(nq * 8);
  p->od = malloc(nq * 8), p->ld = malloc(nl * 8), p->dqd = malloc(nq * 8);
  p->dkd = malloc(nk * 8), p->dvd = malloc(nk * 8);
  const int64_t sq[4] = {B, S, p->H, D}, sk[4] = {B, Skv, G, D}, sl[3] = {B, S, p->H};
  const int64_t ss[5] = {B, S, G, n, 2};
  uint64_t r = p->shm->region;
  nsa_client_fwd_t *f = &p->fwd;
  nsa_client_tensor(&f->q, r, p->off_q, NSA_CLIENT_F32, 4, sq);
  nsa_client_tensor(&f->k, r, p->off_k, NSA_CLIENT_F32, 4, sk);
  nsa_client_tensor(&f->v, r, p->off_v, NSA_CLIENT_F32, 4, sk);
  nsa_client_tensor(&f->o, r, p->off_o, NSA_CLIENT_F32, 4, sq);
  nsa_client_tensor(&f->lse, r, p->off_l, NSA_CLIENT_F32, 3, sl);
  f->has_lse = 1;
  f->sel.kind = ranges ? NSA_CLIENT_SEL_RANGES : NSA_CLIENT_SEL_BLOCK_INDICES;
  f->sel.block_size = bs;
  nsa_client_tensor(&f->sel.t, r, p->off_s, NSA_CLIENT_I32, ranges ? 5 : 4, ss);
  nsa_client_bwd_t *w = &p->bwd;
  w->q = f->q, w->k = f->k, w->v = f->v, w->o = f->o, w->lse = f->lse, w->sel = f->sel;
  nsa_client_tensor(&w->dout, r, p->off_do, NSA_CLIENT_F32, 4, sq);
  nsa_client_tensor(&w->dq, r, p->off_dq, NSA_CLIENT_F32, 4, sq);
  nsa_client_tensor(&w->dk, r, p->off_dk, NSA_CLIENT_F32, 4, sk);
  nsa_client_tensor(&w->dv, r, p->off_dv, NSA_CLIENT_F32, 4, sk);
  return 0;
}

void th_prob_fill(th_prob_t *p) {
  size_t nq = (size_t)(p->B * p->S * p->H * p->Dk), nk = (size_t)(p->B * p->Skv * p->G * p->Dk);
  size_t nl = (size_t)(p->B * p->S * p->H), rows = (size_t)(p->B * p->S * p->G);
  for (size_t i = 0; i < nq; i++) p->qd[i] = p->q[i] = (float)(rng_u(&p->rng) * 2 - 1);
  for (size_t i = 0; i < nq; i++) p->dod[i] = p->dout[i] = (float)(rng_u(&p->rng) * 2 - 1);
  for (size_t i = 0; i < nk; i++) p->kd[i] = p->k[i] = (float)(rng_u(&p->rng) * 2 - 1);
  for (size_t i = 0; i < nk; i++) p->vd[i] = p->v[i] = (float)(rng_u(&p->rng) * 2 - 1);
  int64_t nblocks = (p->Skv + p->bs - 1) / p->bs;
  for (size_t r = 0; r < rows; r++)
    for (int64_t j = 0; j < p->n; j++) {
      if (p->ranges) {
        int32_t a = (int32_t)(rng_next(&p->rng) % (uint64_t)p->Skv);
        int32_t len = (int32_t)(rng_next(&p->rng) % 40);
        p->sel[(r * p->n + j) * 2] = a;
        p->sel[(r * p->n + j) * 2 + 1] = a + len > p->Skv ? (int32_t)p->Skv : a + len;
      } else {
        p->sel[r * p->n + j] = (int32_t)(rng_next(&p->rng) % (uint64_t)(nblocks + 1)) - 1;
      }
    }
  for (size_t i = 0; i < nq; i++) p->o[i] = p->dq[i] = NAN;
  for (size_t i = 0; i < nl; i++) p->lse[i] = NAN;
  for (size_t i = 0; i < nk; i++) p->dk[i] = p->dv[i] = NAN;
}

static nsa_ref_problem_t ref_of(const th_prob_t *p) {
  nsa_ref_problem_t r = {.B = p->B, .S = p->S, .Skv = p->Skv, .G = p->G, .h = p->h, .Dk = p->Dk,
                         .Dv = p->Dv, .n = p->n, .q = p->qd, .k = p->kd, .v = p->vd,
                         .sel_kind = p->ranges ? NSA_REF_RANGES : NSA_REF_BLOCKS, .sel = p->sel,
                         .block_size = p->bs, .scale = 0};
  return r;
}

/* max |got - want| / max |want| over n values; inf when got has NaN. */
static double rel_err(const float *got, const double *want, size_t n, int skip_inf) {
  double ma = 0, mr = 0;
  for (size_t i = 0; i < n; i++) {
    if (skip_inf && isinf(want[i]) && isinf(got[i]) && (want[i] < 0) == (got[i] < 0)) continue;
    double d = fabs((double)got[i] - want[i]);
    if (!(d <= ma)) ma = isnan(d) ? INFINITY : d;
    if (isfinite(want[i]) && fabs(want[i]) > mr) mr = fabs(want[i]);
  }
  return mr > 0 ? ma / mr : ma;
}

double th_prob_check_fwd(th_prob_t *p) {
  nsa_ref_problem_t r = ref_of(p);
  nsa_ref_fwd(&r, p->od, p->ld);
  size_t nq = (size_t)(p->B * p->S * p->H * p->Dv), nl = (size_t)(p->B * p->S * p->H);
  double a = rel_err(p->o, p->od, nq, 0), b = rel_err(p->lse, p->ld, nl, 1);
  return a > b ? a : b;
}

double th_prob_check_bwd(th_prob_t *p) {
  nsa_ref_problem_t r = ref_of(p);
  nsa_ref_bwd(&r, p->dod, p->dqd, p->dkd, p->dvd);
  size_t nq = (size_t)(p->B * p->S * p->H * p->Dk), nk = (size_t)(p->B * p->Skv * p->G * p->Dk);
  double a = rel_err(p->dq, p->dqd, nq, 0), b = rel_err(p->dk, p->dkd, nk, 0),
         c = rel_err(p->dv, p->dvd, nk, 0);
  double m = a > b ? a : b;
  return m > c ? m : c;
}

void th_prob_free(th_prob_t *p, nsa_client_t *c) {
  if (p->shm && c) nsa_client_shm_destroy(c, p->shm);
  free(p->qd), free(p->kd), free(p->vd), free(p->dod), free(p->od), free(p->ld);
  free(p->dqd), free(p->dkd), free(p->dvd);
  memset(p, 0, sizeof *p);
}
