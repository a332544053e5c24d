/*
 * daemon_bench.c — nsad overhead benchmark (issue 7, "Daemon overhead"; not a
 * test). One run prints one table:
 *
 *   1. ping: blocking round trips through libnsaclient (p50/p99/p99.9/mean
 *      after a warm-up) and pipelined pings over a raw msgpack-RPC connection
 *      (libnsaclient has no ping submit), as pings per second.
 *   2. forward through nsad vs the same kernel called in this process, median
 *      of --runs interleaved runs each (daemon, in-process, daemon, ...), and
 *      the overhead in us and %. The two outputs are also compared bitwise.
 *        cpu:  shm region, blocking nsa_client_forward vs nsa_cpu_sel_fwd
 *        cuda: cudaMalloc tensors through libnsaclient's device-pointer API,
 *              sync=false with wait_event/done_event (the client's stream
 *              waits on done_event, then the host waits on its stream) vs
 *              nsa_cuda_sel_fwd(sync=0) on a context here + stream sync;
 *              then five more variants in the same rounds that split the
 *              difference (host path, kernel inside nsad, events, the
 *              client's stream waiting on nsad's event; bench_fwd_cuda).
 *      The in-process runs use nsad's effective flags (flags.get), printed
 *      above the table, so both sides plan and choose the path alike.
 *   3. concurrency: K forked client processes, each sending M blocking
 *      forwards with its own random inputs, then checking every output
 *      bitwise against an in-process run of the same inputs; throughput of K
 *      clients vs one client (same M). Any lost request (error reply) or
 *      mismatch (wrong or misrouted result) makes the exit status 1.
 *
 *   nsa_bench_daemon [--socket PATH] [--nsad PATH] [--cuda] [--pings N]
 *       [--depth N] [--runs N] [--clients K] [--requests M] [--B N] [--S N]
 *       [--Skv N] [--G N] [--h N] [--D N] [--n N] [--block N]
 *       [--dtype f32|bf16|f16] [--conc-S N] [--no-conc] [--seed N]
 *
 * Without --socket it starts `nsad --backend cpu|cuda` (the binary next to
 * this one, or --nsad) on a private socket and stops it at the end. With
 * --cuda (only when built with NSA_HAVE_CUDA) and no usable GPU it prints a
 * skip line and exits 0. Shapes: q [B,S,G*h,D], k/v [B,Skv,G,D],
 * sel [B,S,G,n] block ids (own block first, then distinct random causal
 * blocks). Defaults: cpu B=1 S=16 Skv=4096 G=4 h=4 D=64 n=16 block 64 f32,
 * 100 runs, 8 clients x 64 requests; cuda S=Skv=16384 G=4 h=16 D=128 n=16
 * block 64 bf16, 30 runs, 8 clients x 256 requests. The concurrency phase
 * uses the forward's shape with S = min(S, --conc-S) (default 64), i.e.
 * decode-like requests against the same K/V length.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <msgpack.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "nsa/sel_attn.h"
#include "nsaclient.h"
#ifdef NSA_HAVE_CUDA
#include <cuda_runtime.h>

#include "nsa/sel_attn_cuda.h"
#endif

/* ------------------------------------------------------------ options --- */

typedef struct {
  const char *socket, *nsad;
  int cuda;
  int pings, depth, runs, clients, requests, conc, conc_S;
  int64_t B, S, Skv, G, h, D, n;
  int32_t bs;
  nsa_dtype_t dt;
  uint64_t seed;
} opts_t;

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}
/* Percentile of a sorted array (nearest rank). */
static double pct(const double *v, int n, double p) {
  int i = (int)ceil(p / 100.0 * n) - 1;
  return v[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}
static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_d);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static float frand(uint64_t *s) { return (float)((double)(splitmix(s) >> 11) * 0x1p-53 * 2 - 1); }

/* Random values (never zeros) in [-1, 1) of dtype dt. */
static void fill_rand(void *p, size_t count, nsa_dtype_t dt, uint64_t *s) {
  for (size_t i = 0; i < count; i++) {
    float x = frand(s);
    if (dt == NSA_F32) ((float *)p)[i] = x;
    else if (dt == NSA_BF16) ((uint16_t *)p)[i] = nsa_f32_to_bf16(x);
    else ((uint16_t *)p)[i] = nsa_f32_to_f16(x);
  }
}

/* sel[b][t][g][0..n): the query's own block, then distinct random causal
 * blocks, -1 where there are fewer causal blocks than slots (as NSA's top-n). */
static void fill_sel(int32_t *sel, int64_t B, int64_t S, int64_t Skv, int64_t G, int64_t n,
                     int32_t bs, uint64_t *s) {
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < S; t++)
      for (int64_t g = 0; g < G; g++) {
        int32_t *row = sel + ((b * S + t) * G + g) * n;
        int32_t own = (int32_t)((t + Skv - S) / bs);
        row[0] = own;
        for (int64_t i = 1; i < n; i++) {
          if (own + 1 <= i) {
            row[i] = -1;
            continue;
          }
          int32_t id;
          int dup;
          do {
            id = (int32_t)(splitmix(s) % (uint64_t)(own + 1));
            dup = 0;
            for (int64_t j = 0; j < i; j++) dup |= row[j] == id;
          } while (dup);
          row[i] = id;
        }
      }
}

/* One problem's sizes in elements and byte offsets (each tensor 256-byte
 * aligned) inside three blocks, so that requests can share K/V:
 *   kv block       k v
 *   request block  q o lse sel
 *   scratch block  o2 lse2        (the in-process run's outputs) */
typedef struct {
  int64_t B, S, Skv, G, h, H, D, n;
  int32_t bs;
  nsa_dtype_t dt;
  size_t nq, nk, no, nl, ns;           /* elements (nv = nk) */
  size_t ok, ov, kvbytes;              /* kv block */
  size_t oq, oo, ol, os, rqbytes;      /* request block */
  size_t oo2, ol2, scbytes;            /* scratch block */
} shape_t;

static size_t al256(size_t x) { return (x + 255) & ~(size_t)255; }

static void shape_init(shape_t *p, const opts_t *o, int64_t S) {
  memset(p, 0, sizeof *p);
  p->B = o->B, p->S = S, p->Skv = o->Skv, p->G = o->G, p->h = o->h, p->H = o->G * o->h;
  p->D = o->D, p->n = o->n, p->bs = o->bs, p->dt = o->dt;
  size_t es = nsa_dtype_size(o->dt);
  p->nq = (size_t)(p->B * S * p->H * p->D), p->nk = (size_t)(p->B * p->Skv * p->G * p->D);
  p->no = p->nq, p->nl = (size_t)(p->B * S * p->H), p->ns = (size_t)(p->B * S * p->G * p->n);
  p->ok = 0, p->ov = al256(p->nk * es), p->kvbytes = al256(p->ov + p->nk * es);
  p->oq = 0, p->oo = al256(p->nq * es), p->ol = al256(p->oo + p->no * es);
  p->os = al256(p->ol + p->nl * 4), p->rqbytes = al256(p->os + p->ns * 4);
  p->oo2 = 0, p->ol2 = al256(p->no * es), p->scbytes = al256(p->ol2 + p->nl * 4);
}

/* Random inputs into a kv block / a request block (outputs poisoned with
 * 0xFF bytes = NaN in every float dtype). */
static void fill_kv(const shape_t *p, char *kv, uint64_t *s) {
  fill_rand(kv + p->ok, p->nk, p->dt, s);
  fill_rand(kv + p->ov, p->nk, p->dt, s);
}
static void fill_rq(const shape_t *p, char *rq, uint64_t *s) {
  fill_rand(rq + p->oq, p->nq, p->dt, s);
  memset(rq + p->oo, 0xFF, p->os - p->oo);
  fill_sel((int32_t *)(rq + p->os), p->B, p->S, p->Skv, p->G, p->n, p->bs, s);
}

/* 1 when the request block's o/lse equal the scratch block's bit for bit. */
static int outputs_equal(const shape_t *p, const char *rq, const char *sc) {
  return !memcmp(rq + p->oo, sc + p->oo2, p->no * nsa_dtype_size(p->dt)) &&
         !memcmp(rq + p->ol, sc + p->ol2, p->nl * 4);
}

/* Client tensor refs into one shm region at byte offsets kv / rq. */
static void client_args_shm(nsa_client_fwd_t *a, const shape_t *p, uint64_t region, size_t kv,
                            size_t rq) {
  nsa_client_dtype_t cd = (nsa_client_dtype_t)p->dt;
  int64_t sq[4] = {p->B, p->S, p->H, p->D}, sk[4] = {p->B, p->Skv, p->G, p->D};
  int64_t sl[3] = {p->B, p->S, p->H}, ss[4] = {p->B, p->S, p->G, p->n};
  memset(a, 0, sizeof *a);
  nsa_client_tensor(&a->q, region, rq + p->oq, cd, 4, sq);
  nsa_client_tensor(&a->k, region, kv + p->ok, cd, 4, sk);
  nsa_client_tensor(&a->v, region, kv + p->ov, cd, 4, sk);
  nsa_client_tensor(&a->o, region, rq + p->oo, cd, 4, sq);
  nsa_client_tensor(&a->lse, region, rq + p->ol, NSA_CLIENT_F32, 3, sl);
  a->has_lse = 1;
  a->sel.kind = NSA_CLIENT_SEL_BLOCK_INDICES;
  a->sel.block_size = p->bs;
  nsa_client_tensor(&a->sel.t, region, rq + p->os, NSA_CLIENT_I32, 4, ss);
}

/* In-process kernel args over the blocks (host or device memory); the
 * outputs go to the scratch block sc. */
static void kernel_args(nsa_fwd_args_t *a, const shape_t *p, char *kv, char *rq, char *sc) {
  memset(a, 0, sizeof *a);
  nsa_tensor_t *ts[6] = {&a->q, &a->k, &a->v, &a->o, &a->lse, &a->sel.t};
  char *ptr[6] = {rq + p->oq, kv + p->ok, kv + p->ov, sc + p->oo2, sc + p->ol2, rq + p->os};
  int64_t shapes[6][4] = {{p->B, p->S, p->H, p->D}, {p->B, p->Skv, p->G, p->D},
                          {p->B, p->Skv, p->G, p->D}, {p->B, p->S, p->H, p->D},
                          {p->B, p->S, p->H, 0},      {p->B, p->S, p->G, p->n}};
  nsa_dtype_t dts[6] = {p->dt, p->dt, p->dt, p->dt, NSA_F32, NSA_I32};
  for (int i = 0; i < 6; i++) {
    ts[i]->data = ptr[i];
    ts[i]->dtype = dts[i];
    ts[i]->ndim = i == 4 ? 3 : 4;
    for (int d = 0; d < ts[i]->ndim; d++) ts[i]->shape[d] = shapes[i][d];
    nsa_tensor_set_contiguous(ts[i]);
  }
  a->sel.kind = NSA_SEL_BLOCK_INDICES;
  a->sel.block_size = p->bs;
  a->scale = 0;
}

static void die_client(nsa_client_t *c, const char *what) {
  fprintf(stderr, "nsa_bench_daemon: %s: %s: %s\n", what, nsa_client_error_code(c),
          nsa_client_error_message(c));
  exit(1);
}

/* ---------------------------------------------------- nsad management --- */

static pid_t g_nsad = -1;
static char g_dir[64], g_sock[128];

static void nsad_stop(void) {
  if (g_nsad > 0) {
    kill(g_nsad, SIGTERM);
    int st = 0;
    waitpid(g_nsad, &st, 0);
    g_nsad = -1;
  }
  if (g_sock[0]) unlink(g_sock);
  if (g_dir[0]) rmdir(g_dir);
}

static const char *nsad_start(const opts_t *o, const char *argv0) {
  static char exe[PATH_MAX];
  const char *bin = o->nsad;
  if (!bin) { /* the nsad next to this binary (build/bin) */
    ssize_t r = readlink("/proc/self/exe", exe, sizeof exe - 8);
    if (r <= 0) {
      snprintf(exe, sizeof exe, "%s", argv0);
      r = (ssize_t)strlen(exe);
    }
    exe[r] = 0;
    char *sl = strrchr(exe, '/');
    if (sl) strcpy(sl + 1, "nsad");
    else strcpy(exe, "nsad");
    bin = exe;
  }
  snprintf(g_dir, sizeof g_dir, "/tmp/nsa-bench-XXXXXX");
  if (!mkdtemp(g_dir)) {
    perror("mkdtemp");
    exit(1);
  }
  snprintf(g_sock, sizeof g_sock, "%s/nsad.sock", g_dir);
  g_nsad = fork();
  if (g_nsad == 0) {
    execl(bin, bin, "--socket", g_sock, "--backend", o->cuda ? "cuda" : "cpu", "--log-level",
          "warn", (char *)NULL);
    fprintf(stderr, "nsa_bench_daemon: exec %s: %s\n", bin, strerror(errno));
    _exit(127);
  }
  atexit(nsad_stop);
  for (int i = 0; i < 300; i++) { /* up to 30 s (CUDA start-up) */
    if (access(g_sock, F_OK) == 0) return g_sock;
    int st;
    if (waitpid(g_nsad, &st, WNOHANG) == g_nsad) {
      g_nsad = -1;
      fprintf(stderr, "nsa_bench_daemon: nsad (%s) exited during start-up\n", bin);
      exit(1);
    }
    usleep(100000);
  }
  fprintf(stderr, "nsa_bench_daemon: nsad's socket did not appear\n");
  exit(1);
}

static nsa_client_t *client_open(const char *sock, const char *name) {
  nsa_client_opts_t co = {.socket_path = sock, .name = name};
  nsa_client_t *c = NULL;
  if (nsa_client_open(&c, &co) != 0) {
    fprintf(stderr, "nsa_bench_daemon: cannot reach nsad: %s\n", nsa_client_open_error());
    exit(1);
  }
  return c;
}

/* ----------------------------------------------------------- 1. ping --- */

typedef struct {
  double p50, p99, p999, mean, pipe_rate;
  int pipe_depth;
  long pipe_errors;
} ping_res_t;

static int write_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    p += w, n -= (size_t)w;
  }
  return 0;
}

static void pack_str(msgpack_packer *pk, const char *s) {
  msgpack_pack_str(pk, strlen(s));
  msgpack_pack_str_body(pk, s, strlen(s));
}

/* Reads replies into u until one is complete; returns 0 with an error-free
 * response, 1 with an error response, -1 on I/O or framing trouble. */
static int raw_next_reply(int fd, msgpack_unpacker *u, msgpack_unpacked *res) {
  for (;;) {
    msgpack_unpack_return r = msgpack_unpacker_next(u, res);
    if (r == MSGPACK_UNPACK_SUCCESS) {
      msgpack_object *o = &res->data;
      if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 4) return -1;
      if (o->via.array.ptr[0].via.u64 != 1) continue; /* a notification */
      return o->via.array.ptr[2].type == MSGPACK_OBJECT_NIL ? 0 : 1;
    }
    if (r != MSGPACK_UNPACK_CONTINUE) return -1;
    if (!msgpack_unpacker_reserve_buffer(u, 65536)) return -1;
    ssize_t n = read(fd, msgpack_unpacker_buffer(u), msgpack_unpacker_buffer_capacity(u));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    msgpack_unpacker_buffer_consumed(u, (size_t)n);
  }
}

/* Pipelined pings on a raw connection: keep `depth` requests in flight,
 * refill as replies come, `total` pings. Returns pings/s (0 on failure). */
static double ping_pipelined(const char *sock, int depth, int total, long *errors) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    perror("nsa_bench_daemon: raw connect");
    if (fd >= 0) close(fd);
    return 0;
  }
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  /* [0, 0, "hello", {protocol: 1, client, pid, labels: {}}] */
  msgpack_pack_array(&pk, 4);
  msgpack_pack_uint32(&pk, 0);
  msgpack_pack_uint32(&pk, 0);
  pack_str(&pk, "hello");
  msgpack_pack_map(&pk, 4);
  pack_str(&pk, "protocol"), msgpack_pack_int(&pk, 1);
  pack_str(&pk, "client"), pack_str(&pk, "nsa_bench_daemon-raw");
  pack_str(&pk, "pid"), msgpack_pack_int(&pk, (int)getpid());
  pack_str(&pk, "labels"), msgpack_pack_map(&pk, 0);
  msgpack_unpacker u;
  msgpack_unpacked res;
  msgpack_unpacker_init(&u, 1 << 16);
  msgpack_unpacked_init(&res);
  double rate = 0;
  if (write_all(fd, sb.data, sb.size) != 0 || raw_next_reply(fd, &u, &res) != 0) {
    fprintf(stderr, "nsa_bench_daemon: raw hello failed\n");
    goto out;
  }
  uint32_t next_id = 1;
  int sent = 0, got = 0;
  double t0 = now_us();
  while (got < total) {
    int want = depth - (sent - got);
    if (want > total - sent) want = total - sent;
    if (want > 0) {
      msgpack_sbuffer_clear(&sb);
      for (int i = 0; i < want; i++) { /* [0, id, "ping", {}] */
        msgpack_pack_array(&pk, 4);
        msgpack_pack_uint32(&pk, 0);
        msgpack_pack_uint32(&pk, next_id++);
        pack_str(&pk, "ping");
        msgpack_pack_map(&pk, 0);
      }
      if (write_all(fd, sb.data, sb.size) != 0) break;
      sent += want;
    }
    int r = raw_next_reply(fd, &u, &res);
    if (r < 0) break;
    if (r > 0) (*errors)++;
    got++;
    /* drain whatever else is already buffered without blocking */
    while (got < sent && (r = msgpack_unpacker_next(&u, &res)) == MSGPACK_UNPACK_SUCCESS) {
      if (res.data.type == MSGPACK_OBJECT_ARRAY && res.data.via.array.size == 4 &&
          res.data.via.array.ptr[2].type != MSGPACK_OBJECT_NIL)
        (*errors)++;
      got++;
    }
  }
  double t1 = now_us();
  if (got == total) rate = total / ((t1 - t0) * 1e-6);
  else fprintf(stderr, "nsa_bench_daemon: pipelined pings: %d of %d replies\n", got, total);
out:
  msgpack_unpacked_destroy(&res);
  msgpack_unpacker_destroy(&u);
  msgpack_sbuffer_destroy(&sb);
  close(fd);
  return rate;
}

static void bench_ping(const opts_t *o, const char *sock, ping_res_t *r) {
  nsa_client_t *c = client_open(sock, "nsa_bench_daemon-ping");
  int warm = o->pings / 10 > 1000 ? o->pings / 10 : 1000;
  for (int i = 0; i < warm; i++)
    if (nsa_client_ping(c) != 0) die_client(c, "ping");
  double *t = malloc(sizeof(double) * (size_t)o->pings);
  double sum = 0;
  for (int i = 0; i < o->pings; i++) {
    double t0 = now_us();
    if (nsa_client_ping(c) != 0) die_client(c, "ping");
    t[i] = now_us() - t0;
    sum += t[i];
  }
  qsort(t, (size_t)o->pings, sizeof *t, cmp_d);
  r->p50 = pct(t, o->pings, 50), r->p99 = pct(t, o->pings, 99), r->p999 = pct(t, o->pings, 99.9);
  r->mean = sum / o->pings;
  free(t);
  nsa_client_close(c);
  r->pipe_depth = o->depth;
  r->pipe_errors = 0;
  ping_pipelined(sock, o->depth, 2000, &r->pipe_errors); /* warm-up */
  r->pipe_rate = ping_pipelined(sock, o->depth, o->pings * 5, &r->pipe_errors);
}

/* --------------------------------------------------- 2. forward (cpu) --- */

typedef struct {
  double nsad_us, inproc_us, device_us; /* medians */
  double outside_us; /* median of (nsad wall - nsad's device_us) per run */
  int bitwise_equal;
  char path[16];
  /* nsad's effective flags for this bench's session (flags.get), used for
   * the in-process runs too, so that both sides plan and choose alike */
  nsa_path_flags_t flags;
  double shadow_rate;
  int have_flags;
  /* --cuda only: where the overhead goes (medians; see bench_fwd_cuda) */
  int have_split;
  double reply_us;              /* A: submit -> reply of the sync=false request */
  double host_ev_us;            /* C: nsad sync=false, host waits on done_event */
  double sync_ev_us;            /* D: nsad sync=true + events */
  double sync_us, sync_dev_us;  /* E: nsad sync=true, no events: wall, nsad device_us */
  double in_sync_us, in_dev_us; /* F: in-process sync=1: wall, device_us */
  double in_ev_us;              /* G: in-process with the same events + stream waits */
  char c_err[96];               /* C's cudaEventSynchronize error, if any */
  double b_issue_us;            /* B: host time until nsa_cuda_sel_fwd(sync=0) returned */
  /* nsad's own per-phase host timing (metrics nsad_request_phase_seconds)
   * over the timed rounds: mean us per request, [sync][phase] (sync=0: A, C;
   * sync=1: D, E); have_phases = 0 for an nsad without that family */
  int have_phases;
  double ph_us[2][8];
  int64_t ph_n[2];
} fwd_res_t;

static const char *const k_phase[8] = {"decode", "submit", "queue", "backend",
                                       "post",   "complete", "reply", "total"};

/* Sums and counts of nsad_request_phase_seconds by [sync][phase]. 0 or -1. */
#ifdef NSA_HAVE_CUDA /* used by the --cuda phase table only */
static int phase_snapshot(nsa_client_t *c, double sum[2][8], int64_t cnt[2][8]) {
  nsa_client_value_t *v = NULL;
  memset(sum, 0, sizeof(double) * 16);
  memset(cnt, 0, sizeof(int64_t) * 16);
  if (nsa_client_metrics_get(c, &v) != 0) return -1;
  int n = nsa_client_value_len(v, "nsad_request_phase_seconds.samples"), found = 0;
  for (int k = 0; k < n; k++) {
    char path[128], sy[8] = "", ph[16] = "";
    snprintf(path, sizeof path, "nsad_request_phase_seconds.samples.%d.labels.sync", k);
    nsa_client_value_get_str(v, path, sy, sizeof sy);
    snprintf(path, sizeof path, "nsad_request_phase_seconds.samples.%d.labels.phase", k);
    nsa_client_value_get_str(v, path, ph, sizeof ph);
    int y = !strcmp(sy, "1") ? 1 : !strcmp(sy, "0") ? 0 : -1;
    for (int i = 0; i < 8 && y >= 0; i++)
      if (!strcmp(ph, k_phase[i])) {
        snprintf(path, sizeof path, "nsad_request_phase_seconds.samples.%d.sum", k);
        nsa_client_value_get_double(v, path, &sum[y][i]);
        snprintf(path, sizeof path, "nsad_request_phase_seconds.samples.%d.count", k);
        nsa_client_value_get_int(v, path, &cnt[y][i]);
        found++;
      }
  }
  nsa_client_value_free(v);
  return found == 16 ? 0 : -1;
}
#endif

/* nsad's effective flags for client c (flags.get "effective": bools and
 * MIN_L as integers, the rate as a double). 0, or -1 (r->flags = defaults). */
static int effective_flags(nsa_client_t *c, fwd_res_t *r) {
  nsa_path_flags_default(&r->flags);
  r->shadow_rate = 0;
  r->have_flags = 0;
  nsa_client_value_t *v = NULL;
  if (nsa_client_flags_get(c, &v) != 0) return -1;
  int64_t use = 0, v2 = 0, minl = 0;
  double rate = 0;
  int ok = !nsa_client_value_get_int(v, "effective.NSA_USE_SEL_VARLEN", &use) &&
           !nsa_client_value_get_int(v, "effective.NSA_SEL_VARLEN_V2", &v2) &&
           !nsa_client_value_get_int(v, "effective.NSA_SEL_VARLEN_MIN_L", &minl) &&
           !nsa_client_value_get_double(v, "effective.NSA_SEL_SHADOW_RATE", &rate);
  nsa_client_value_free(v);
  if (!ok) return -1;
  r->flags.use_sel_varlen = use != 0;
  r->flags.sel_varlen_v2 = v2 != 0;
  r->flags.sel_varlen_min_l = minl;
  r->shadow_rate = rate;
  r->have_flags = 1;
  return 0;
}

static void bench_fwd_cpu(const opts_t *o, const char *sock, fwd_res_t *r) {
  shape_t p;
  shape_init(&p, o, o->S);
  nsa_client_t *c = client_open(sock, "nsa_bench_daemon-fwd");
  effective_flags(c, r);
  nsa_client_shm_t *shm = NULL;
  if (nsa_client_shm_create(c, p.kvbytes + p.rqbytes + p.scbytes, &shm) != 0)
    die_client(c, "shm region");
  char *kv = shm->ptr, *rq = kv + p.kvbytes, *sc = rq + p.rqbytes;
  uint64_t s = o->seed;
  fill_kv(&p, kv, &s);
  fill_rq(&p, rq, &s);
  memset(sc, 0xFF, p.scbytes);
  nsa_client_fwd_t a;
  client_args_shm(&a, &p, shm->region, 0, p.kvbytes);
  nsa_fwd_args_t k;
  kernel_args(&k, &p, kv, rq, sc);
  int N = o->runs, W = N / 5 > 3 ? N / 5 : 3;
  double *tn = malloc(sizeof(double) * N), *ti = malloc(sizeof(double) * N),
         *td = malloc(sizeof(double) * N), *tx = malloc(sizeof(double) * N);
  char msg[256];
  nsa_run_info_t info;
  nsa_client_result_t res;
  for (int i = -W; i < N; i++) { /* interleaved: slow drift hits both sides */
    double t0 = now_us();
    if (nsa_client_forward(c, &a, &res) != 0) die_client(c, "sel_attn.forward");
    double t1 = now_us();
    if (nsa_cpu_sel_fwd(&k, &r->flags, NSA_PATH_AUTO, &info, msg, sizeof msg) != NSA_OK) {
      fprintf(stderr, "nsa_bench_daemon: nsa_cpu_sel_fwd: %s\n", msg);
      exit(1);
    }
    double t2 = now_us();
    if (i >= 0) tn[i] = t1 - t0, ti[i] = t2 - t1, td[i] = res.device_us, tx[i] = tn[i] - td[i];
  }
  r->nsad_us = median(tn, N), r->inproc_us = median(ti, N), r->device_us = median(td, N);
  r->outside_us = median(tx, N);
  snprintf(r->path, sizeof r->path, "%s", res.path);
  r->bitwise_equal = outputs_equal(&p, rq, sc);
  free(tn), free(ti), free(td), free(tx);
  nsa_client_shm_destroy(c, shm);
  nsa_client_close(c);
}

/* -------------------------------------------------- 2. forward (cuda) --- */

#ifdef NSA_HAVE_CUDA
#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      fprintf(stderr, "nsa_bench_daemon: %s:%d %s: %s\n", __FILE__, __LINE__, #x,           \
              cudaGetErrorString(e_));                                                      \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)

/* Uploads host bytes to device memory at d. */
static void upload(char *d, const char *h, size_t n) {
  CK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
}

/* Tensor refs from device pointers (libnsaclient finds base + offset and
 * makes/caches the allocation's IPC handle). */
static void client_args_cuda(nsa_client_t *c, nsa_client_fwd_t *a, const shape_t *p, char *kv,
                             char *rq) {
  nsa_client_dtype_t cd = (nsa_client_dtype_t)p->dt;
  int64_t sq[4] = {p->B, p->S, p->H, p->D}, sk[4] = {p->B, p->Skv, p->G, p->D};
  int64_t sl[3] = {p->B, p->S, p->H}, ss[4] = {p->B, p->S, p->G, p->n};
  memset(a, 0, sizeof *a);
  if (nsa_client_cuda_tensor(c, rq + p->oq, cd, 4, sq, &a->q) ||
      nsa_client_cuda_tensor(c, kv + p->ok, cd, 4, sk, &a->k) ||
      nsa_client_cuda_tensor(c, kv + p->ov, cd, 4, sk, &a->v) ||
      nsa_client_cuda_tensor(c, rq + p->oo, cd, 4, sq, &a->o) ||
      nsa_client_cuda_tensor(c, rq + p->ol, NSA_CLIENT_F32, 3, sl, &a->lse) ||
      nsa_client_cuda_tensor(c, rq + p->os, NSA_CLIENT_I32, 4, ss, &a->sel.t))
    die_client(c, "cuda tensor");
  a->has_lse = 1;
  a->sel.kind = NSA_CLIENT_SEL_BLOCK_INDICES;
  a->sel.block_size = p->bs;
}

/* outputs_equal for device blocks. */
static int cuda_outputs_equal(const shape_t *p, const char *rq, const char *sc) {
  char *hr = malloc(p->rqbytes), *hs = malloc(p->scbytes);
  int eq = 0;
  if (hr && hs) {
    CK(cudaMemcpy(hr, rq, p->rqbytes, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hs, sc, p->scbytes, cudaMemcpyDeviceToHost));
    eq = outputs_equal(p, hr, hs);
  }
  free(hr);
  free(hs);
  return eq;
}

/* The CUDA forward, seven ways, interleaved in every round (so that clock
 * and thermal drift hit all of them alike); medians of --runs rounds after
 * warm-up rounds. A/B are the headline (issue 7: nsad with IPC, events and
 * sync=false vs the in-process call); C-G split A - B into its parts:
 *
 *   A  nsad, sync=false, wait_event + done_event; this process's stream
 *      waits on done_event (cudaStreamWaitEvent), the host on that stream.
 *      Also timed: submit -> reply. nsad replies once the work is queued, so
 *      a reply time near the kernel time means nsad waited on the host.
 *   B  in-process: nsa_cuda_sel_fwd(sync=0) with nsad's flags + stream sync.
 *   C  as A, but the host waits on done_event itself (cudaEventSynchronize)
 *      and this process queues nothing behind nsad's work: A - C is what a
 *      stream wait on another process's event costs while that work runs
 *      (GPU time-slicing between the two processes' contexts).
 *   D  nsad, sync=true + events: the reply comes after nsad's own stream
 *      sync, and this process's stream wait is then already satisfied.
 *   E  nsad, sync=true, no events: wall; nsad's device_us (its ev0 -> ev2);
 *      wall - device_us = socket + dispatch + worker hand-offs + reply.
 *   F  in-process sync=1: wall and device_us (same events as E, this
 *      process's context): E.device_us - F.device_us = the kernel itself
 *      running slower inside nsad.
 *   G  in-process with A's stream waits on interprocess events of the same
 *      kind (its own pair, never registered with nsad, so that no event is
 *      recorded by both processes): G - B = the event calls' cost alone.
 * Outputs: nsad writes the request block's o/lse, this process the scratch
 * block's; compared bitwise at the end (after a stream-ordered wait). */
enum { V_A, V_B, V_C, V_D, V_E, V_F, V_G, V_COUNT };

static void bench_fwd_cuda(const opts_t *o, const char *sock, fwd_res_t *r) {
  shape_t p;
  shape_init(&p, o, o->S);
  CK(cudaSetDevice(0));
  CK(cudaFree(0));
  /* one allocation [kv][rq][scratch], as a framework's caching allocator
   * would hand out */
  uint64_t s = o->seed;
  size_t tot = p.kvbytes + p.rqbytes + p.scbytes;
  char *h = malloc(tot), *d = NULL;
  if (!h) {
    fprintf(stderr, "nsa_bench_daemon: out of host memory\n");
    exit(1);
  }
  fill_kv(&p, h, &s);
  fill_rq(&p, h + p.kvbytes, &s);
  memset(h + p.kvbytes + p.rqbytes, 0xFF, p.scbytes);
  CK(cudaMalloc((void **)&d, tot));
  upload(d, h, tot);
  free(h);
  char *kv = d, *rq = d + p.kvbytes, *sc = rq + p.rqbytes;
  char msg[256];
  nsa_cuda_ctx_t *ctx = NULL;
  if (nsa_cuda_ctx_create(0, 0, &ctx, msg, sizeof msg) != NSA_OK) {
    fprintf(stderr, "nsa_bench_daemon: nsa_cuda_ctx_create: %s\n", msg);
    exit(1);
  }
  cudaStream_t cst = (cudaStream_t)nsa_cuda_ctx_stream(ctx), st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t ready, done;
  const unsigned fl = cudaEventInterprocess | cudaEventDisableTiming;
  CK(cudaEventCreateWithFlags(&ready, fl));
  CK(cudaEventCreateWithFlags(&done, fl));
  cudaEvent_t ready_l, done_l; /* G's: same kind, never shown to nsad */
  CK(cudaEventCreateWithFlags(&ready_l, fl));
  CK(cudaEventCreateWithFlags(&done_l, fl));

  nsa_client_t *c = client_open(sock, "nsa_bench_daemon-fwd-cuda");
  if (effective_flags(c, r) != 0)
    fprintf(stderr, "nsa_bench_daemon: flags.get failed; the in-process runs use the defaults\n");
  nsa_client_fwd_t a;
  client_args_cuda(c, &a, &p, kv, rq);
  nsa_client_exec_t ex = {.has_wait_event = 1, .has_done_event = 1, .async = 1};
  if (nsa_client_cuda_event(c, ready, &ex.wait_event) ||
      nsa_client_cuda_event(c, done, &ex.done_event))
    die_client(c, "cuda event");
  nsa_client_exec_t ex_sync = ex;
  ex_sync.async = 0;
  nsa_fwd_args_t k;
  kernel_args(&k, &p, kv, rq, sc);
  const nsa_path_flags_t *pf = &r->flags;
  nsa_cuda_exec_t kex = {.wait_event = NULL, .done_event = NULL, .sync = 0};
  nsa_cuda_exec_t kex_sync = {.wait_event = NULL, .done_event = NULL, .sync = 1};
  nsa_cuda_exec_t kex_ev = {.wait_event = ready_l, .done_event = done_l, .sync = 0};

  int N = o->runs, W = N / 5 > 3 ? N / 5 : 3;
  double *t[V_COUNT], *t_reply = malloc(sizeof(double) * N), *t_edev = malloc(sizeof(double) * N),
         *t_fdev = malloc(sizeof(double) * N), *t_eout = malloc(sizeof(double) * N);
  for (int v = 0; v < V_COUNT; v++) t[v] = malloc(sizeof(double) * N);
  double *t_bissue = malloc(sizeof(double) * N);
  double ph_sum0[2][8], ph_sum1[2][8];
  int64_t ph_cnt0[2][8], ph_cnt1[2][8];
  int ph_ok = 0;
  nsa_run_info_t info;
  nsa_client_result_t res, res_e;
  char path_a[16] = "";
  cudaError_t c_err = cudaSuccess; /* C's event sync failed: C not usable */
  for (int i = -W; i < N; i++) {
    double w[V_COUNT], reply = 0, bissue = 0;
    /* nsad's phase counters from here on cover exactly the timed rounds */
    if (i == 0) ph_ok = phase_snapshot(c, ph_sum0, ph_cnt0) == 0;
    uint32_t ticket;
    /* A: the caller's stream announces its inputs (ready), nsad queues the
     * work behind it and records done; the caller's stream waits on done;
     * the host waits on the caller's stream */
    double t0 = now_us();
    CK(cudaEventRecord(ready, st));
    if (nsa_client_forward_submit_ex(c, &a, &ex, &ticket) != 0 ||
        nsa_client_wait(c, ticket, &res) != 0)
      die_client(c, "sel_attn.forward (sync=false)");
    reply = now_us() - t0;
    CK(cudaStreamWaitEvent(st, done, 0));
    CK(cudaStreamSynchronize(st));
    w[V_A] = now_us() - t0;
    snprintf(path_a, sizeof path_a, "%s", res.path);
    /* B: the same kernel on this process's context */
    t0 = now_us();
    if (nsa_cuda_sel_fwd(ctx, &k, pf, NSA_PATH_AUTO, &kex, &info, msg, sizeof msg) != NSA_OK) {
      fprintf(stderr, "nsa_bench_daemon: nsa_cuda_sel_fwd: %s\n", msg);
      exit(1);
    }
    bissue = now_us() - t0; /* host time to queue it (compare: nsad's backend phase) */
    CK(cudaStreamSynchronize(cst));
    w[V_B] = now_us() - t0;
    /* C: as A, the host waits on done_event; no stream wait queued here */
    t0 = now_us();
    CK(cudaEventRecord(ready, st));
    if (nsa_client_forward_submit_ex(c, &a, &ex, &ticket) != 0 ||
        nsa_client_wait(c, ticket, &res) != 0)
      die_client(c, "sel_attn.forward (sync=false, host wait)");
    cudaError_t ce = cudaEventSynchronize(done); /* documented for either process */
    w[V_C] = now_us() - t0;
    if (ce != cudaSuccess && !c_err) {
      c_err = ce;
      cudaGetLastError();
    }
    /* unmeasured: should the event sync not have waited for nsad's record
     * (C then reads too low, see the table), D must not inherit C's work */
    CK(cudaStreamWaitEvent(st, done, 0));
    CK(cudaStreamSynchronize(st));
    /* D: sync=true with the events (the stream wait finds done complete) */
    t0 = now_us();
    CK(cudaEventRecord(ready, st));
    if (nsa_client_forward_submit_ex(c, &a, &ex_sync, &ticket) != 0 ||
        nsa_client_wait(c, ticket, &res) != 0)
      die_client(c, "sel_attn.forward (sync=true, events)");
    CK(cudaStreamWaitEvent(st, done, 0));
    CK(cudaStreamSynchronize(st));
    w[V_D] = now_us() - t0;
    /* E: a plain blocking request */
    t0 = now_us();
    if (nsa_client_forward(c, &a, &res_e) != 0) die_client(c, "sel_attn.forward (sync=true)");
    w[V_E] = now_us() - t0;
    /* F: in-process, synchronous (device_us from the context's events) */
    t0 = now_us();
    if (nsa_cuda_sel_fwd(ctx, &k, pf, NSA_PATH_AUTO, &kex_sync, &info, msg, sizeof msg) != NSA_OK) {
      fprintf(stderr, "nsa_bench_daemon: nsa_cuda_sel_fwd (sync): %s\n", msg);
      exit(1);
    }
    w[V_F] = now_us() - t0;
    double fdev = info.device_us;
    /* G: in-process with A's events and stream waits */
    t0 = now_us();
    CK(cudaEventRecord(ready_l, st));
    if (nsa_cuda_sel_fwd(ctx, &k, pf, NSA_PATH_AUTO, &kex_ev, &info, msg, sizeof msg) != NSA_OK) {
      fprintf(stderr, "nsa_bench_daemon: nsa_cuda_sel_fwd (events): %s\n", msg);
      exit(1);
    }
    CK(cudaStreamWaitEvent(st, done_l, 0));
    CK(cudaStreamSynchronize(st));
    w[V_G] = now_us() - t0;
    if (i < 0) continue;
    for (int v = 0; v < V_COUNT; v++) t[v][i] = w[v];
    t_reply[i] = reply;
    t_bissue[i] = bissue;
    t_edev[i] = res_e.device_us;
    t_eout[i] = w[V_E] - res_e.device_us;
    t_fdev[i] = fdev;
  }
  r->nsad_us = median(t[V_A], N), r->inproc_us = median(t[V_B], N);
  r->device_us = r->outside_us = NAN; /* sync=false replies come before the work ends */
  r->have_split = 1;
  r->reply_us = median(t_reply, N);
  r->host_ev_us = median(t[V_C], N);
  if (c_err) {
    snprintf(r->c_err, sizeof r->c_err, "%s", cudaGetErrorString(c_err));
    r->host_ev_us = NAN;
  }
  r->sync_ev_us = median(t[V_D], N);
  r->sync_us = median(t[V_E], N), r->sync_dev_us = median(t_edev, N);
  r->outside_us = median(t_eout, N); /* of E: a sync request's host path */
  r->in_sync_us = median(t[V_F], N), r->in_dev_us = median(t_fdev, N);
  r->in_ev_us = median(t[V_G], N);
  r->b_issue_us = median(t_bissue, N);
  free(t_bissue);
  if (ph_ok && phase_snapshot(c, ph_sum1, ph_cnt1) == 0) {
    r->have_phases = 1;
    for (int y = 0; y < 2; y++) {
      r->ph_n[y] = ph_cnt1[y][7] - ph_cnt0[y][7];
      for (int i = 0; i < 8; i++) {
        int64_t dn = ph_cnt1[y][i] - ph_cnt0[y][i];
        r->ph_us[y][i] = dn > 0 ? (ph_sum1[y][i] - ph_sum0[y][i]) * 1e6 / (double)dn : NAN;
      }
    }
  }
  snprintf(r->path, sizeof r->path, "%s", path_a);
  /* Every nsad request above ended with a wait on done_event or a
   * sync=true reply, so its outputs are complete here. */
  r->bitwise_equal = cuda_outputs_equal(&p, rq, sc);
  for (int v = 0; v < V_COUNT; v++) free(t[v]);
  free(t_reply), free(t_edev), free(t_fdev), free(t_eout);
  nsa_client_cuda_forget(c, d);
  nsa_client_cuda_forget(c, ready);
  nsa_client_cuda_forget(c, done);
  nsa_client_close(c);
  nsa_cuda_ctx_destroy(ctx);
  cudaEventDestroy(ready);
  cudaEventDestroy(done);
  cudaEventDestroy(ready_l);
  cudaEventDestroy(done_l);
  cudaStreamDestroy(st);
  cudaFree(d);
}
#endif

/* ------------------------------------------------------ 3. concurrency --- */

/* What one client process reports through the results pipe (< PIPE_BUF, so
 * each write is atomic). */
typedef struct {
  int client;
  int sent, ok, errors, mismatches, setup_failed;
  double t0, t1; /* CLOCK_MONOTONIC us, comparable across processes */
} conc_res_t;

/*
 * Client process body. Memory (one shm region, or one cudaMalloc): NKV K/V
 * blocks, then M request blocks (q o lse sel), then one scratch block. Request
 * i uses K/V block i % NKV and its own q, selection and output slot, so every
 * request of every client has distinct random inputs (each client seeds its
 * own generator). The client waits on `go` (a pipe the parent closes to start
 * everyone at once), sends M blocking forwards, then recomputes each request
 * in process into the scratch block and compares bit for bit.
 */
enum { NKV = 4 };

static void conc_child(const opts_t *o, const char *sock, int id, int go_fd, int go2_fd,
                       int ready_fd, int res_fd) {
  conc_res_t cr = {.client = id};
  shape_t p;
  shape_init(&p, o, o->S < o->conc_S ? o->S : o->conc_S);
  int M = o->requests;
  size_t rq0 = p.kvbytes * NKV, sc0 = rq0 + p.rqbytes * (size_t)M, total = sc0 + p.scbytes;
  uint64_t s = o->seed + 0x1000u * (uint64_t)(id + 1);
  char name[64];
  snprintf(name, sizeof name, "nsa_bench_daemon-c%d", id);
  nsa_client_t *c = client_open(sock, name);
  nsa_client_fwd_t *a = calloc((size_t)M, sizeof *a);
  char *host = NULL, *dev = NULL;
  nsa_client_shm_t *shm = NULL;
  (void)dev;
#ifdef NSA_HAVE_CUDA
  cudaStream_t cst = NULL;
  nsa_cuda_ctx_t *ctx = NULL;
  char msg0[256];
  if (o->cuda) {
    CK(cudaSetDevice(0));
    CK(cudaFree(0));
    host = malloc(total);
    if (!host) _exit(2);
    for (int j = 0; j < NKV; j++) fill_kv(&p, host + p.kvbytes * j, &s);
    for (int i = 0; i < M; i++) fill_rq(&p, host + rq0 + p.rqbytes * i, &s);
    memset(host + sc0, 0xFF, p.scbytes);
    CK(cudaMalloc((void **)&dev, total));
    upload(dev, host, total);
    /* one allocation: the first call makes and registers its IPC handle,
     * the others find it in libnsaclient's cache */
    for (int i = 0; i < M; i++)
      client_args_cuda(c, &a[i], &p, dev + p.kvbytes * (i % NKV), dev + rq0 + p.rqbytes * i);
    if (nsa_cuda_ctx_create(0, 0, &ctx, msg0, sizeof msg0) != NSA_OK) {
      fprintf(stderr, "nsa_bench_daemon: client %d: %s\n", id, msg0);
      cr.setup_failed = 1;
    } else {
      cst = (cudaStream_t)nsa_cuda_ctx_stream(ctx);
    }
  } else
#endif
  {
    if (nsa_client_shm_create(c, total, &shm) != 0) {
      fprintf(stderr, "nsa_bench_daemon: client %d: shm: %s\n", id, nsa_client_error_message(c));
      cr.setup_failed = 1;
    } else {
      host = shm->ptr;
      for (int j = 0; j < NKV; j++) fill_kv(&p, host + p.kvbytes * j, &s);
      for (int i = 0; i < M; i++) {
        fill_rq(&p, host + rq0 + p.rqbytes * i, &s);
        client_args_shm(&a[i], &p, shm->region, p.kvbytes * (i % NKV), rq0 + p.rqbytes * i);
      }
    }
  }
  char byte = 1, go;
  if (write(ready_fd, &byte, 1) != 1) _exit(2);
  while (read(go_fd, &go, 1) < 0 && errno == EINTR) {
  }
  if (!cr.setup_failed) {
    nsa_client_result_t res;
    cr.t0 = now_us();
    for (int i = 0; i < M; i++) {
      cr.sent++;
      if (nsa_client_forward(c, &a[i], &res) == 0) cr.ok++;
      else {
        cr.errors++;
        fprintf(stderr, "nsa_bench_daemon: client %d request %d: %s: %s\n", id, i,
                nsa_client_error_code(c), nsa_client_error_message(c));
      }
    }
    cr.t1 = now_us();
  }
  /* Timing first, then wait until every client has finished sending: the
   * in-process checks below must not compete with nsad for the CPU while
   * other clients are still being measured. */
  if (write(res_fd, &cr, sizeof cr) != (ssize_t)sizeof cr) _exit(2);
  while (read(go2_fd, &go, 1) < 0 && errno == EINTR) {
  }
  if (!cr.setup_failed) {
    /* verify: the same inputs in process into the scratch block, bitwise */
    char msg[256];
    nsa_run_info_t info;
    for (int i = 0; i < M; i++) {
      nsa_fwd_args_t k;
      int eq = 0;
#ifdef NSA_HAVE_CUDA
      if (o->cuda) {
        char *kv = dev + p.kvbytes * (i % NKV), *rq = dev + rq0 + p.rqbytes * i, *sc = dev + sc0;
        kernel_args(&k, &p, kv, rq, sc);
        nsa_cuda_exec_t kex = {.sync = 1};
        if (nsa_cuda_sel_fwd(ctx, &k, NULL, NSA_PATH_AUTO, &kex, &info, msg, sizeof msg) ==
            NSA_OK) {
          CK(cudaStreamSynchronize(cst));
          eq = cuda_outputs_equal(&p, rq, sc);
        } else {
          fprintf(stderr, "nsa_bench_daemon: client %d: in-process: %s\n", id, msg);
        }
      } else
#endif
      {
        char *kv = host + p.kvbytes * (i % NKV), *rq = host + rq0 + p.rqbytes * i,
             *sc = host + sc0;
        kernel_args(&k, &p, kv, rq, sc);
        memset(sc, 0xFF, p.scbytes);
        if (nsa_cpu_sel_fwd(&k, NULL, NSA_PATH_AUTO, &info, msg, sizeof msg) == NSA_OK)
          eq = outputs_equal(&p, rq, sc);
        else
          fprintf(stderr, "nsa_bench_daemon: client %d: in-process: %s\n", id, msg);
      }
      if (!eq) cr.mismatches++;
    }
  }
  if (write(res_fd, &cr, sizeof cr) != (ssize_t)sizeof cr) _exit(2);
#ifdef NSA_HAVE_CUDA
  if (ctx) nsa_cuda_ctx_destroy(ctx);
  if (o->cuda) {
    nsa_client_cuda_forget(c, dev);
    cudaFree(dev);
    free(host);
  }
#endif
  if (shm) nsa_client_shm_destroy(c, shm);
  nsa_client_close(c);
  free(a);
  _exit(0);
}

typedef struct {
  int K, sent, ok, errors, mismatches, failed;
  double span_us, rate; /* requests per second, all clients together */
} conc_sum_t;

/* Reads n bytes from fd while watching the clients: returns 0, or -1 when a
 * client that has not been reaped yet exited (it is reaped, its status kept
 * in st[]; the caller counts it as failed) or on EOF. Without this, a client
 * that died before writing would leave the parent waiting for ever (the
 * other clients keep the pipe open). */
static int read_watching(int fd, void *buf, size_t n, pid_t *pids, int *st, int K) {
  for (;;) {
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    int r = poll(&pf, 1, 500);
    if (r > 0) {
      ssize_t got = read(fd, buf, n);
      if (got < 0 && errno == EINTR) continue;
      return got == (ssize_t)n ? 0 : -1;
    }
    if (r < 0 && errno != EINTR) return -1;
    for (int i = 0; i < K; i++)
      if (pids[i] > 0 && waitpid(pids[i], &st[i], WNOHANG) == pids[i]) {
        pids[i] = -pids[i]; /* reaped */
        if (!WIFEXITED(st[i]) || WEXITSTATUS(st[i]) != 0) return -1;
      }
  }
}

static void run_clients(const opts_t *o, const char *sock, int K, conc_sum_t *sum) {
  int go[2], go2[2], ready[2], res[2];
  if (pipe(go) || pipe(go2) || pipe(ready) || pipe(res)) {
    perror("pipe");
    exit(1);
  }
  fflush(NULL);
  pid_t *pids = calloc((size_t)K, sizeof *pids);
  int *st = calloc((size_t)K, sizeof *st);
  for (int i = 0; i < K; i++) {
    pids[i] = fork();
    if (pids[i] == 0) {
      close(go[1]), close(go2[1]), close(ready[0]), close(res[0]);
      conc_child(o, sock, i, go[0], go2[0], ready[1], res[1]);
    }
  }
  close(go[0]), close(go2[0]), close(ready[1]), close(res[1]);
  memset(sum, 0, sizeof *sum);
  sum->K = K;
  int alive = K; /* clients still expected to write at each stage */
  char b;
  for (int i = 0; i < alive; i++)
    if (read_watching(ready[0], &b, 1, pids, st, K) != 0) {
      fprintf(stderr, "nsa_bench_daemon: a client died during set-up\n");
      sum->failed++, alive--, i--;
      if (alive <= 0) break;
    }
  close(go[1]); /* everyone starts now */
  double t0 = INFINITY, t1 = 0;
  conc_res_t cr;
  /* timing records (each client is done sending), then release the checks,
   * then the final records */
  int expect = alive;
  for (int got = 0; got < expect;) {
    if (read_watching(res[0], &cr, sizeof cr, pids, st, K) != 0) {
      fprintf(stderr, "nsa_bench_daemon: a client died while sending\n");
      sum->failed++, expect--;
      continue;
    }
    got++;
    if (cr.setup_failed) continue;
    if (cr.t0 < t0) t0 = cr.t0;
    if (cr.t1 > t1) t1 = cr.t1;
  }
  close(go2[1]);
  for (int got = 0; got < expect;) {
    if (read_watching(res[0], &cr, sizeof cr, pids, st, K) != 0) {
      fprintf(stderr, "nsa_bench_daemon: a client died while checking\n");
      sum->failed++, expect--;
      continue;
    }
    got++;
    sum->sent += cr.sent, sum->ok += cr.ok, sum->errors += cr.errors;
    sum->mismatches += cr.mismatches;
    if (cr.setup_failed) sum->failed++;
  }
  close(ready[0]), close(res[0]);
  for (int i = 0; i < K; i++) {
    if (pids[i] > 0) waitpid(pids[i], &st[i], 0);
    if (pids[i] > 0 && (!WIFEXITED(st[i]) || WEXITSTATUS(st[i]) != 0)) sum->failed++;
  }
  free(st);
  sum->span_us = t1 - t0;
  sum->rate = sum->ok > 0 && t1 > t0 ? sum->ok / (sum->span_us * 1e-6) : 0;
  free(pids);
}

/* ---------------------------------------------------------------- main --- */

static void usage(void) {
  fprintf(stderr,
          "usage: nsa_bench_daemon [--socket PATH] [--nsad PATH] [--cuda] [--pings N] [--depth N]\n"
          "       [--runs N] [--clients K] [--requests M] [--B N] [--S N] [--Skv N] [--G N]\n"
          "       [--h N] [--D N] [--n N] [--block N] [--dtype f32|bf16|f16] [--conc-S N]\n"
          "       [--no-conc] [--seed N]\n");
  exit(2);
}

int main(int argc, char **argv) {
  opts_t o = {.pings = 20000, .depth = 32, .runs = -1, .clients = 8, .requests = -1,
              .conc = 1, .conc_S = 64, .B = -1, .seed = 0x5eed};
  int64_t S = -1, Skv = -1, G = -1, h = -1, D = -1, n = -1, bs = -1;
  const char *dts = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NUM(flag, dst)                 \
  if (!strcmp(a, flag)) {              \
    if (!v) usage();                   \
    dst = atoll(v);                    \
    i++;                               \
    continue;                          \
  }
    NUM("--pings", o.pings) NUM("--depth", o.depth) NUM("--runs", o.runs)
    NUM("--clients", o.clients) NUM("--requests", o.requests) NUM("--B", o.B) NUM("--S", S)
    NUM("--Skv", Skv) NUM("--G", G) NUM("--h", h) NUM("--D", D) NUM("--n", n)
    NUM("--block", bs) NUM("--conc-S", o.conc_S) NUM("--seed", o.seed)
#undef NUM
    if (!strcmp(a, "--socket") && v) o.socket = argv[++i];
    else if (!strcmp(a, "--nsad") && v) o.nsad = argv[++i];
    else if (!strcmp(a, "--dtype") && v) dts = argv[++i];
    else if (!strcmp(a, "--cuda")) o.cuda = 1;
    else if (!strcmp(a, "--no-conc")) o.conc = 0;
    else usage();
  }
#ifndef NSA_HAVE_CUDA
  if (o.cuda) {
    printf("nsa_bench_daemon: SKIP --cuda: built without CUDA (NSA_HAVE_CUDA off)\n");
    return 0;
  }
#else
  if (o.cuda) {
    /* Ask in a child: the CUDA runtime must not be initialized here before
     * the concurrency phase forks its clients. */
    fflush(NULL);
    pid_t pc = fork();
    if (pc == 0) _exit(nsa_cuda_device_count() > 0 ? 0 : 1);
    int st = 0;
    waitpid(pc, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      printf("nsa_bench_daemon: SKIP --cuda: no usable CUDA device\n");
      return 0;
    }
  }
#endif
  /* Defaults: cpu = a small decode-like request (16 new queries against a
   * 4k cache; ~10 ms on 2 cores, so the run stays within minutes); cuda =
   * issue 7's T = 16k training forward (bf16, D = 128, h = 16). */
  if (o.cuda) {
    o.B = o.B > 0 ? o.B : 1, o.S = S > 0 ? S : 16384, o.Skv = Skv > 0 ? Skv : o.S;
    o.G = G > 0 ? G : 4, o.h = h > 0 ? h : 16, o.D = D > 0 ? D : 128;
    o.dt = NSA_BF16;
    if (o.runs < 0) o.runs = 30;
    if (o.requests < 0) o.requests = 256;
  } else {
    o.B = o.B > 0 ? o.B : 1, o.S = S > 0 ? S : 16, o.Skv = Skv > 0 ? Skv : 4096;
    o.G = G > 0 ? G : 4, o.h = h > 0 ? h : 4, o.D = D > 0 ? D : 64;
    o.dt = NSA_F32;
    if (o.runs < 0) o.runs = 100;
    if (o.requests < 0) o.requests = 64;
  }
  o.n = n > 0 ? n : 16, o.bs = (int32_t)(bs > 0 ? bs : 64);
  if (dts && (nsa_dtype_parse(dts, strlen(dts), &o.dt) != 0 || o.dt == NSA_I32)) usage();
  if (o.S > o.Skv || o.pings < 100 || o.runs < 1 || o.clients < 1 || o.requests < 1 ||
      o.depth < 1)
    usage();

  const char *sock = o.socket ? o.socket : nsad_start(&o, argv[0]);
  nsa_client_t *c = client_open(sock, "nsa_bench_daemon");
  const nsa_client_info_t *info = nsa_client_info(c);
  char server[64], backend[16], device[96];
  snprintf(server, sizeof server, "%s", info->server);
  snprintf(backend, sizeof backend, "%s", info->backend);
  snprintf(device, sizeof device, "%s", info->ndevices ? info->devices[0] : "?");
  nsa_client_close(c);
  if (strcmp(backend, o.cuda ? "cuda" : "cpu") != 0) {
    fprintf(stderr, "nsa_bench_daemon: nsad serves backend %s, this mode needs %s\n", backend,
            o.cuda ? "cuda" : "cpu");
    return 1;
  }
  printf("nsa_bench_daemon: nsad %s, backend %s (%s)%s\n", server, backend, device,
         o.socket ? "" : ", started by the bench");
  const char *wp = getenv("OMP_WAIT_POLICY");
  if (!o.cuda && !(wp && !strcasecmp(wp, "passive")))
    printf("note: OMP_WAIT_POLICY is not passive: nsad's and this process's OpenMP threads "
           "spin-wait against each other, which can slow the in-process side many times on "
           "a small machine (docs/PERF.md, Daemon overhead)\n");
  fflush(stdout);

  ping_res_t pr;
  bench_ping(&o, sock, &pr);
  printf("ping done\n");
  fflush(stdout);

  conc_sum_t one = {0}, many = {0};
  if (o.conc) {
    run_clients(&o, sock, 1, &one);
    run_clients(&o, sock, o.clients, &many);
    printf("concurrency done\n");
    fflush(stdout);
  }

  fwd_res_t fr;
  memset(&fr, 0, sizeof fr);
#ifdef NSA_HAVE_CUDA
  if (o.cuda) bench_fwd_cuda(&o, sock, &fr);
  else
#endif
    bench_fwd_cpu(&o, sock, &fr);

  /* ---- the table ---- */
  int64_t cS = o.S < o.conc_S ? o.S : o.conc_S;
  printf("\nshape: B=%lld S=%lld Skv=%lld G=%lld h=%lld D=%lld n=%lld block=%d %s; "
         "concurrency S=%lld; forward runs=%d; pings=%d\n",
         (long long)o.B, (long long)o.S, (long long)o.Skv, (long long)o.G, (long long)o.h,
         (long long)o.D, (long long)o.n, o.bs, nsa_dtype_name(o.dt), (long long)cS, o.runs,
         o.pings);
  if (fr.have_flags) {
    /* ctx.cu: with sync=false the host waits for the planner summary only
     * when packed may be chosen (varlen off, or v2 with MIN_L > 0) or the
     * v1 host planner runs */
    const nsa_path_flags_t *f = &fr.flags;
    int v1 = f->use_sel_varlen && !f->sel_varlen_v2;
    int maybe_packed = !f->use_sel_varlen || (f->sel_varlen_v2 && f->sel_varlen_min_l > 0);
    printf("nsad's flags for this session (also used in-process): NSA_USE_SEL_VARLEN=%d "
           "NSA_SEL_VARLEN_V2=%d NSA_SEL_VARLEN_MIN_L=%lld NSA_SEL_SHADOW_RATE=%g; "
           "host wait for the planner summary on the GPU path: %s\n",
           f->use_sel_varlen, f->sel_varlen_v2, (long long)f->sel_varlen_min_l, fr.shadow_rate,
           v1 ? "yes (v1 host planner)" : maybe_packed ? "yes (packed may be chosen)" : "no");
    if (fr.shadow_rate > 0)
      printf("note: NSA_SEL_SHADOW_RATE > 0: nsad shadows sampled sync=true/CPU requests "
             "before replying, which inflates their times\n");
  } else {
    printf("nsad's flags: unknown (flags.get failed); in-process runs used the defaults\n");
  }
  printf("| measurement | value | issue 7 target | met |\n|---|---|---|---|\n");
  printf("| ping p50 (blocking, libnsaclient) | %.1f us | <= 20 us | %s |\n", pr.p50,
         pr.p50 <= 20 ? "yes" : "no");
  printf("| ping p99 | %.1f us | <= 100 us | %s |\n", pr.p99, pr.p99 <= 100 ? "yes" : "no");
  printf("| ping p99.9 | %.1f us | | |\n", pr.p999);
  printf("| ping mean | %.1f us | | |\n", pr.mean);
  printf("| ping pipelined (raw socket, depth %d) | %.0f /s%s | | |\n", pr.pipe_depth,
         pr.pipe_rate, pr.pipe_errors ? " (ERRORS)" : "");
  double ov = fr.nsad_us - fr.inproc_us, ovp = 100.0 * ov / fr.inproc_us;
  printf("| forward through nsad (%s%s), median | %.1f us | | |\n", o.cuda ? "sync=false, events, " : "",
         fr.path, fr.nsad_us);
  printf("| forward in-process, median | %.1f us | | |\n", fr.inproc_us);
  if (!isnan(fr.device_us))
    printf("| nsad's device_us (kernel inside nsad), median | %.1f us | | |\n"
           "| nsad wall - device_us (IPC + dispatch), median | %.1f us | | |\n",
           fr.device_us, fr.outside_us);
  printf("| forward overhead | %+.1f us (%+.1f %%) | <= 3 %% (T = 16k) | %s |\n", ov, ovp,
         o.cuda ? (ovp <= 3 ? "yes" : "no") : "n/a (not the T = 16k GPU case)");
  printf("| nsad vs in-process output | %s | bitwise | %s |\n",
         fr.bitwise_equal ? "identical" : "DIFFERENT", fr.bitwise_equal ? "yes" : "no");
  int bad = !fr.bitwise_equal || pr.pipe_errors || pr.pipe_rate <= 0;
  if (o.conc) {
    double ratio = one.rate > 0 ? many.rate / one.rate : 0;
    printf("| forwards/s, 1 client x %d | %.0f /s | | |\n", o.requests, one.rate);
    printf("| forwards/s, %d clients x %d | %.0f /s | | |\n", o.clients, o.requests, many.rate);
    printf("| %d clients vs 1 | %.1f %% | >= 90 %% | %s |\n", o.clients, 100 * ratio,
           ratio >= 0.9 ? "yes" : "no");
    int lost = (one.sent - one.ok) + (many.sent - many.ok) + one.failed + many.failed;
    int mism = one.mismatches + many.mismatches;
    int expect = o.requests * (1 + o.clients);
    printf("| requests answered / sent / expected | %d / %d / %d | none lost | %s |\n",
           one.ok + many.ok, one.sent + many.sent, expect,
           lost == 0 && one.sent + many.sent == expect ? "yes" : "NO");
    printf("| outputs != in-process run (bitwise) | %d of %d | 0 (none misrouted) | %s |\n", mism,
           one.sent + many.sent, mism == 0 ? "yes" : "NO");
    bad |= lost != 0 || mism != 0 || one.sent + many.sent != expect;
  }
  if (fr.have_split) {
    /* bench_fwd_cuda's header comment says what A..G are */
    double b = fr.inproc_us;
#define ROW(what, x) printf("| %s | %.1f us | %+.1f us (%+.1f %%) |\n", what, x, (x) - b, 100.0 * ((x) - b) / b)
    printf("\nforward overhead, split (medians of the same interleaved rounds; vs B)\n");
    printf("| variant | wall | vs in-process (B) |\n|---|---|---|\n");
    ROW("A nsad sync=false, events, stream waits on done_event (headline)", fr.nsad_us);
    ROW("B in-process sync=0 + stream sync (baseline)", fr.inproc_us);
    ROW("C nsad sync=false, events, host waits on done_event (no stream wait queued)", fr.host_ev_us);
    ROW("D nsad sync=true + events", fr.sync_ev_us);
    ROW("E nsad sync=true, no events", fr.sync_us);
    ROW("F in-process sync=1", fr.in_sync_us);
    ROW("G in-process with A's events and stream waits", fr.in_ev_us);
#undef ROW
    int c_ok = !fr.c_err[0] && fr.host_ev_us >= 0.9 * fr.in_dev_us;
    printf("| A: submit -> reply (nsad replies once queued; ~kernel time = nsad waited) | %.1f us | |\n",
           fr.reply_us);
    printf("| E: nsad device_us (its kernel, its events) | %.1f us | |\n", fr.sync_dev_us);
    printf("| F: in-process device_us (same events, this context) | %.1f us | |\n", fr.in_dev_us);
    printf("\nwhere A - B goes (each a difference of medians; they need not add up exactly)\n");
    printf("| part | us |\n|---|---|\n");
    printf("| host path of a sync request: E wall - E device_us (socket, dispatch, worker, reply) | %.1f |\n",
           fr.outside_us);
    printf("| kernel slower inside nsad: E device_us - F device_us | %+.1f |\n",
           fr.sync_dev_us - fr.in_dev_us);
    printf("| interprocess events in one process: G - B | %+.1f |\n", fr.in_ev_us - fr.inproc_us);
    if (c_ok)
      printf("| this process's stream waiting on nsad's event during the kernel: A - C | %+.1f |\n",
             fr.nsad_us - fr.host_ev_us);
    else if (fr.c_err[0])
      printf("| A - C | n/a: cudaEventSynchronize on done_event failed here: %s |\n", fr.c_err);
    else
      printf("| A - C | n/a: C (%.1f us) is shorter than the kernel (%.1f us), so "
             "cudaEventSynchronize here did not wait for nsad's record |\n",
             fr.host_ev_us, fr.in_dev_us);
    printf("| sync=false vs sync=true with events: A - D | %+.1f |\n", fr.nsad_us - fr.sync_ev_us);
    printf("| B: in-process host time to queue the forward (nsa_cuda_sel_fwd sync=0 returns), "
           "median | %.1f |\n", fr.b_issue_us);
    if (fr.have_phases) {
      /* docs/DAEMON.md: what each phase is; per-request lines are in nsad's
       * debug log ("phases_us") */
      printf("\nnsad's own host timeline per request (metrics nsad_request_phase_seconds, "
             "mean us over the timed rounds)\n");
      printf("| requests | n |");
      for (int i = 0; i < 8; i++) printf(" %s |", k_phase[i]);
      printf("\n|---|---|");
      for (int i = 0; i < 8; i++) printf("---|");
      printf("\n");
      for (int y = 0; y < 2; y++) {
        printf("| %s | %lld |", y ? "sync=true (D, E)" : "sync=false (A, C)",
               (long long)fr.ph_n[y]);
        for (int i = 0; i < 8; i++) printf(" %.1f |", fr.ph_us[y][i]);
        printf("\n");
      }
      printf("| outside nsad's timeline for E (socket both ways, nsad's epoll wake-up before "
             "its read, the client's wake-up): E wall - sync=true total, approx. | %.1f |\n",
             fr.sync_us - fr.ph_us[1][7]);
      printf("| host time inside nsad's CUDA call around E's device time (before ev0, after "
             "ev2): sync=true backend - E device_us, approx. | %.1f |\n",
             fr.ph_us[1][3] - fr.sync_dev_us);
      printf("| nsad backend phase (sync=false) - B's host queue time: the same call run "
             "slower in nsad's worker | %+.1f |\n", fr.ph_us[0][3] - fr.b_issue_us);
    } else {
      printf("(nsad has no nsad_request_phase_seconds metric: no per-phase split)\n");
    }
  }
  fflush(stdout);
  nsad_stop();
  return bad ? 1 : 0;
}
