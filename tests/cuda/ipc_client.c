/*
 * ipc_client.c — the client half of tests/cuda/test_cuda_ipc.c: a separate
 * process (exec'd by the suite) that owns its tensors in device memory
 * (cudaMalloc), hands device pointers to libnsaclient (base + offset → cached
 * CUDA IPC handles) and checks nsad's answers against the float64 reference.
 *
 *   nsa_ipc_client --socket PATH --mode check|async|closes|hang|errors|train [--seed N]
 *
 *   check   forward + backward, sync=true, on every path (flags.set), f32,
 *           h = 3 (odd), Dk != Dv; ≤ 1e-5 relative to max |ref|
 *   async   sync=false forward and backward: the inputs are uploaded on the
 *           client's stream behind ~tens of ms of other work and announced
 *           with wait_event; the client's stream then waits only on each
 *           done_event before copying the outputs back. No host waits on the
 *           GPU in between (the replies come once nsad has queued the work).
 *   closes  unregisters the selection's allocation while a sync=false
 *           forward that reads it is still queued (behind ~128 GiB of
 *           memsets on the client's stream): the reply must come before the
 *           forward finishes, the forward must still be right, and the same
 *           allocation registered again right away must work
 *   hang    queues many large forwards, prints "SUBMITTED", then sleeps (the
 *           suite SIGKILLs it mid-request)
 *   errors  cuda_ipc size beyond the allocation → out_of_bounds; an unserved
 *           device → bad_request; the same IPC handle registered three times
 *           in one session shares one mapping (unregister one, use another);
 *           a bad selection → invalid_selection, then nsad keeps serving
 *   train   tests/daemon/test_train.c's loop on the GPU (issue 6): the same
 *           model, sizes, seed, teacher target and SGD (tests/common/
 *           train_math.c), with q/k/v/o/lse/do/dq/dk/dv in device memory;
 *           200 steps per path (all three, sync=true) plus varlen_v2 with
 *           sync=false + wait/done events; loss must halve, step-0 dq/dk/dv
 *           ≤ 1e-4 relative to the float64 reference backward
 *
 * Exit 0 = pass, 1 = a check failed, 2 = setup error. Messages on stderr.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nsaclient.h"
#include "ref.h"
#include "train_math.h"

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      fprintf(stderr, "ipc_client: %s:%d %s: %s\n", __FILE__, __LINE__, #x,                \
              cudaGetErrorString(e_));                                                     \
      exit(2);                                                                             \
    }                                                                                      \
  } while (0)

static int g_fail;
#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      fprintf(stderr, "ipc_client: FAIL: " __VA_ARGS__);  \
      fprintf(stderr, "\n");                               \
      g_fail = 1;                                          \
    }                                                      \
  } while (0)

static uint64_t g_rng;
static double urand(void) { /* splitmix64 → [0, 1) */
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}

static size_t al256(size_t x) { return (x + 255) & ~(size_t)255; }

/* One problem. All float tensors live in ONE cudaMalloc (so libnsaclient's
 * base + offset path is used), the selection in a second one. */
typedef struct {
  int64_t B, S, Skv, G, h, H, Dk, Dv, n;
  int32_t bs;
  size_t nq, nk, nv, no, nl, ns;
  char *dbase;
  size_t dbytes;
  int32_t *dsel;
  float *q, *k, *v, *o, *lse, *dout, *dq, *dk, *dv; /* device, inside dbase */
  float *hq, *hk, *hv, *ho, *hl, *hdo, *hdq, *hdk, *hdv; /* pinned host */
  int32_t *hs;
  double *qd, *kd, *vd, *dod, *od, *ld, *dqd, *dkd, *dvd;
} prob_t;

static void *pin(size_t bytes) {
  void *p = NULL;
  CK(cudaMallocHost(&p, bytes + 16));
  return p;
}

static void prob_init(prob_t *p, int64_t B, int64_t S, int64_t Skv, int64_t G, int64_t h,
                      int64_t Dk, int64_t Dv, int64_t n, int32_t bs) {
  memset(p, 0, sizeof *p);
  p->B = B, p->S = S, p->Skv = Skv, p->G = G, p->h = h, p->H = G * h, p->Dk = Dk, p->Dv = Dv;
  p->n = n, p->bs = bs;
  p->nq = (size_t)(B * S * p->H * Dk), p->nk = (size_t)(B * Skv * G * Dk);
  p->nv = (size_t)(B * Skv * G * Dv), p->no = (size_t)(B * S * p->H * Dv);
  p->nl = (size_t)(B * S * p->H), p->ns = (size_t)(B * S * G * n);
  size_t off[9], cnt[9] = {p->nq, p->nk, p->nv, p->no, p->nl, p->no, p->nq, p->nk, p->nv};
  size_t tot = 0;
  for (int i = 0; i < 9; i++) off[i] = tot, tot = al256(tot + cnt[i] * 4);
  p->dbytes = tot;
  CK(cudaMalloc((void **)&p->dbase, tot));
  CK(cudaMalloc((void **)&p->dsel, p->ns * 4));
  float **dp[9] = {&p->q, &p->k, &p->v, &p->o, &p->lse, &p->dout, &p->dq, &p->dk, &p->dv};
  float **hp[9] = {&p->hq, &p->hk, &p->hv, &p->ho, &p->hl, &p->hdo, &p->hdq, &p->hdk, &p->hdv};
  for (int i = 0; i < 9; i++) {
    *dp[i] = (float *)(p->dbase + off[i]);
    *hp[i] = pin(cnt[i] * 4);
  }
  p->hs = pin(p->ns * 4);
  p->qd = malloc(p->nq * 8), p->kd = malloc(p->nk * 8), p->vd = malloc(p->nv * 8);
  p->dod = malloc(p->no * 8), p->od = malloc(p->no * 8), p->ld = malloc(p->nl * 8);
  p->dqd = malloc(p->nq * 8), p->dkd = malloc(p->nk * 8), p->dvd = malloc(p->nv * 8);
  if (!p->qd || !p->kd || !p->vd || !p->dod || !p->od || !p->ld || !p->dqd || !p->dkd || !p->dvd) {
    fprintf(stderr, "ipc_client: out of host memory\n");
    exit(2);
  }
}

/* Fresh random host inputs (never zeros), selection ids in [-1, nb) with
 * duplicates, plus their float64 copies. */
static void prob_fill_host(prob_t *p) {
  for (size_t i = 0; i < p->nq; i++) p->qd[i] = p->hq[i] = (float)(urand() * 2 - 1);
  for (size_t i = 0; i < p->nk; i++) p->kd[i] = p->hk[i] = (float)(urand() * 2 - 1);
  for (size_t i = 0; i < p->nv; i++) p->vd[i] = p->hv[i] = (float)(urand() * 2 - 1);
  for (size_t i = 0; i < p->no; i++) p->dod[i] = p->hdo[i] = (float)(urand() * 2 - 1);
  int nb = (int)((p->Skv + p->bs - 1) / p->bs);
  for (size_t i = 0; i < p->ns; i++) p->hs[i] = (int32_t)(urand() * (nb + 1)) - 1;
}

/* Synchronous upload; outputs poisoned with NaN (0xFF bytes). */
static void prob_upload(prob_t *p) {
  CK(cudaMemcpy(p->q, p->hq, p->nq * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->k, p->hk, p->nk * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->v, p->hv, p->nv * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->dout, p->hdo, p->no * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(p->dsel, p->hs, p->ns * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(p->o, 0xFF, p->no * 4));
  CK(cudaMemset(p->lse, 0xFF, p->nl * 4));
  CK(cudaMemset(p->dq, 0xFF, p->nq * 4));
  CK(cudaMemset(p->dk, 0xFF, p->nk * 4));
  CK(cudaMemset(p->dv, 0xFF, p->nv * 4));
  CK(cudaDeviceSynchronize());
}

static nsa_ref_problem_t prob_ref(const prob_t *p) {
  nsa_ref_problem_t r = {.B = p->B, .S = p->S, .Skv = p->Skv, .G = p->G, .h = p->h, .Dk = p->Dk,
                         .Dv = p->Dv, .n = p->n, .q = p->qd, .k = p->kd, .v = p->vd,
                         .sel_kind = NSA_REF_BLOCKS, .sel = p->hs, .block_size = p->bs,
                         .scale = 0};
  return r;
}

/* max |got - ref| / max |ref|; +inf on NaN. */
static double rel_err(const float *got, const double *ref, size_t n) {
  double ma = 0, mr = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)got[i] - ref[i]);
    if (isnan(d)) return INFINITY;
    if (d > ma) ma = d;
    if (fabs(ref[i]) > mr) mr = fabs(ref[i]);
  }
  return mr > 0 ? ma / mr : ma;
}

/* lse: -inf rows must match exactly, others relative to max(|ref|, 1). */
static double lse_err(const float *got, const double *ref, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) {
    if (isinf(ref[i])) {
      if (!(isinf(got[i]) && got[i] < 0)) return INFINITY;
      continue;
    }
    double d = fabs((double)got[i] - ref[i]) / fmax(fabs(ref[i]), 1.0);
    if (isnan(d)) return INFINITY;
    if (d > m) m = d;
  }
  return m;
}

static double check_fwd(prob_t *p) {
  nsa_ref_problem_t r = prob_ref(p);
  nsa_ref_fwd(&r, p->od, p->ld);
  double e = rel_err(p->ho, p->od, p->no), el = lse_err(p->hl, p->ld, p->nl);
  return e > el ? e : el;
}

static double check_bwd(prob_t *p) {
  nsa_ref_problem_t r = prob_ref(p);
  nsa_ref_bwd(&r, p->dod, p->dqd, p->dkd, p->dvd);
  double e = rel_err(p->hdq, p->dqd, p->nq);
  double e2 = rel_err(p->hdk, p->dkd, p->nk), e3 = rel_err(p->hdv, p->dvd, p->nv);
  if (e2 > e) e = e2;
  if (e3 > e) e = e3;
  return e;
}

static void download(prob_t *p, int bwd) {
  CK(cudaMemcpy(p->ho, p->o, p->no * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(p->hl, p->lse, p->nl * 4, cudaMemcpyDeviceToHost));
  if (bwd) {
    CK(cudaMemcpy(p->hdq, p->dq, p->nq * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(p->hdk, p->dk, p->nk * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(p->hdv, p->dv, p->nv * 4, cudaMemcpyDeviceToHost));
  }
}

static void need(nsa_client_t *c, int rc, const char *what) {
  if (rc != 0) {
    fprintf(stderr, "ipc_client: %s: %s: %s\n", what, nsa_client_error_code(c),
            nsa_client_error_message(c));
    exit(2);
  }
}

/* Tensor refs from device pointers (libnsaclient finds base + offset). */
static void make_args(nsa_client_t *c, prob_t *p, nsa_client_fwd_t *f, nsa_client_bwd_t *b) {
  const int64_t sq[4] = {p->B, p->S, p->H, p->Dk}, sk[4] = {p->B, p->Skv, p->G, p->Dk},
                sv[4] = {p->B, p->Skv, p->G, p->Dv}, so[4] = {p->B, p->S, p->H, p->Dv},
                sl[3] = {p->B, p->S, p->H}, ss[4] = {p->B, p->S, p->G, p->n};
  memset(f, 0, sizeof *f);
  memset(b, 0, sizeof *b);
  need(c, nsa_client_cuda_tensor(c, p->q, NSA_CLIENT_F32, 4, sq, &f->q), "tensor q");
  need(c, nsa_client_cuda_tensor(c, p->k, NSA_CLIENT_F32, 4, sk, &f->k), "tensor k");
  need(c, nsa_client_cuda_tensor(c, p->v, NSA_CLIENT_F32, 4, sv, &f->v), "tensor v");
  need(c, nsa_client_cuda_tensor(c, p->o, NSA_CLIENT_F32, 4, so, &f->o), "tensor o");
  need(c, nsa_client_cuda_tensor(c, p->lse, NSA_CLIENT_F32, 3, sl, &f->lse), "tensor lse");
  f->has_lse = 1;
  f->sel.kind = NSA_CLIENT_SEL_BLOCK_INDICES;
  f->sel.block_size = p->bs;
  need(c, nsa_client_cuda_tensor(c, p->dsel, NSA_CLIENT_I32, 4, ss, &f->sel.t), "tensor sel");
  b->q = f->q, b->k = f->k, b->v = f->v, b->o = f->o, b->lse = f->lse, b->sel = f->sel;
  need(c, nsa_client_cuda_tensor(c, p->dout, NSA_CLIENT_F32, 4, so, &b->dout), "tensor do");
  need(c, nsa_client_cuda_tensor(c, p->dq, NSA_CLIENT_F32, 4, sq, &b->dq), "tensor dq");
  need(c, nsa_client_cuda_tensor(c, p->dk, NSA_CLIENT_F32, 4, sk, &b->dk), "tensor dk");
  need(c, nsa_client_cuda_tensor(c, p->dv, NSA_CLIENT_F32, 4, sv, &b->dv), "tensor dv");
}

static void set_flag(nsa_client_t *c, const char *name, const char *val) {
  uint64_t ep;
  need(c, nsa_client_flags_set(c, name, val, -1, NULL, 0, &ep), name);
}

/* ------------------------------------------------------------------ modes --- */

static int mode_check(nsa_client_t *c) {
  prob_t p;
  prob_init(&p, 2, 64, 384, 2, 3, 128, 64, 8, 32);
  nsa_client_fwd_t f;
  nsa_client_bwd_t b;
  make_args(c, &p, &f, &b);
  static const struct {
    const char *use, *v2, *path;
  } paths[] = {{"1", "1", "varlen_v2"}, {"1", "0", "varlen_v1"}, {"0", "1", "packed"}};
  for (int i = 0; i < 3; i++) {
    set_flag(c, "NSA_USE_SEL_VARLEN", paths[i].use);
    set_flag(c, "NSA_SEL_VARLEN_V2", paths[i].v2);
    prob_fill_host(&p);
    prob_upload(&p);
    nsa_client_result_t r;
    need(c, nsa_client_forward(c, &f, &r), "forward");
    download(&p, 0);
    double e = check_fwd(&p);
    EXPECT(!strcmp(r.path, paths[i].path), "forward served by %s, expected %s", r.path,
           paths[i].path);
    EXPECT(e <= 1e-5, "forward on %s: rel err %g", r.path, e);
    fprintf(stderr, "ipc_client: forward  %-9s rel err %.3g (%.1f us)\n", r.path, e, r.device_us);
    need(c, nsa_client_backward(c, &b, &r), "backward");
    download(&p, 1);
    e = check_bwd(&p);
    EXPECT(!strcmp(r.path, paths[i].path), "backward served by %s, expected %s", r.path,
           paths[i].path);
    EXPECT(e <= 1e-5, "backward on %s: rel err %g", r.path, e);
    fprintf(stderr, "ipc_client: backward %-9s rel err %.3g (%.1f us)\n", r.path, e, r.device_us);
  }
  uint64_t ep;
  nsa_client_flags_reset(c, "NSA_USE_SEL_VARLEN", &ep);
  nsa_client_flags_reset(c, "NSA_SEL_VARLEN_V2", &ep);
  return g_fail;
}

/* What the sync=false modes share: a non-blocking stream, n (<= 3)
 * interprocess events registered with nsad (ev[i] -> id[i]), and a 1 GiB
 * buffer whose memsets, queued ahead, hold the stream back. */
typedef struct {
  cudaStream_t st;
  cudaEvent_t ev[3];
  uint64_t id[3];
  int n;
  void *busy;
  size_t busy_bytes;
} rig_t;

static void rig_init(nsa_client_t *c, rig_t *r, int n) {
  r->n = n;
  CK(cudaStreamCreateWithFlags(&r->st, cudaStreamNonBlocking));
  for (int i = 0; i < n; i++) {
    CK(cudaEventCreateWithFlags(&r->ev[i], cudaEventInterprocess | cudaEventDisableTiming));
    need(c, nsa_client_cuda_event(c, r->ev[i], &r->id[i]), "register event");
  }
  r->busy_bytes = (size_t)1 << 30;
  r->busy = NULL;
  CK(cudaMalloc(&r->busy, r->busy_bytes));
}

static void rig_free(nsa_client_t *c, rig_t *r) {
  for (int i = 0; i < r->n; i++) need(c, nsa_client_cuda_forget(c, r->ev[i]), "forget event");
  CK(cudaStreamSynchronize(r->st));
  CK(cudaStreamDestroy(r->st));
  cudaFree(r->busy);
}

static int mode_async(nsa_client_t *c) {
  prob_t p;
  prob_init(&p, 2, 128, 1024, 2, 4, 64, 64, 16, 32);
  nsa_client_fwd_t f;
  nsa_client_bwd_t b;
  make_args(c, &p, &f, &b);
  rig_t R;
  rig_init(c, &R, 3);
  cudaStream_t st = R.st;
  cudaEvent_t ready = R.ev[0], done_f = R.ev[1], done_b = R.ev[2];
  const uint64_t ev_ready = R.id[0], ev_f = R.id[1], ev_b = R.id[2];
  /* Busy work ahead of the uploads on the client's stream (~1 GiB x 16 of
   * memsets), so that ignoring wait_event would read the NaN inputs. */
  void *busy = R.busy;
  const size_t busy_bytes = R.busy_bytes;
  for (int it = 0; it < 2; it++) {
    prob_fill_host(&p);
    /* Inputs AND outputs poisoned first, synchronously. */
    CK(cudaMemset(p.dbase, 0xFF, p.dbytes));
    CK(cudaMemset(p.dsel, 0xFF, p.ns * 4)); /* -1 everywhere: empty rows if read early */
    CK(cudaDeviceSynchronize());
    for (int i = 0; i < 16; i++) CK(cudaMemsetAsync(busy, i, busy_bytes, st));
    CK(cudaMemcpyAsync(p.q, p.hq, p.nq * 4, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(p.k, p.hk, p.nk * 4, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(p.v, p.hv, p.nv * 4, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(p.dout, p.hdo, p.no * 4, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(p.dsel, p.hs, p.ns * 4, cudaMemcpyHostToDevice, st));
    CK(cudaEventRecord(ready, st));
    nsa_client_exec_t exf = {.wait_event = ev_ready, .has_wait_event = 1, .done_event = ev_f,
                             .has_done_event = 1, .async = 1};
    nsa_client_exec_t exb = {.done_event = ev_b, .has_done_event = 1, .async = 1};
    uint32_t tf, tb;
    nsa_client_result_t rf, rb;
    need(c, nsa_client_forward_submit_ex(c, &f, &exf, &tf), "forward submit");
    need(c, nsa_client_wait(c, tf, &rf), "forward reply");
    /* The reply means "queued": the client's stream must still be busy. */
    cudaError_t q = cudaStreamQuery(st);
    if (q == cudaSuccess)
      fprintf(stderr, "ipc_client: note: the client's stream finished before the forward "
              "reply arrived; the wait_event check is weak this round\n");
    need(c, nsa_client_backward_submit_ex(c, &b, &exb, &tb), "backward submit");
    need(c, nsa_client_wait(c, tb, &rb), "backward reply");
    /* The stream waits only on done events; the host waits once, at the end. */
    CK(cudaStreamWaitEvent(st, done_f, 0));
    CK(cudaMemcpyAsync(p.ho, p.o, p.no * 4, cudaMemcpyDeviceToHost, st));
    CK(cudaMemcpyAsync(p.hl, p.lse, p.nl * 4, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamWaitEvent(st, done_b, 0));
    CK(cudaMemcpyAsync(p.hdq, p.dq, p.nq * 4, cudaMemcpyDeviceToHost, st));
    CK(cudaMemcpyAsync(p.hdk, p.dk, p.nk * 4, cudaMemcpyDeviceToHost, st));
    CK(cudaMemcpyAsync(p.hdv, p.dv, p.nv * 4, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamSynchronize(st));
    double ef = check_fwd(&p), eb = check_bwd(&p);
    EXPECT(ef <= 1e-5, "sync=false forward (%s), round %d: rel err %g", rf.path, it, ef);
    EXPECT(eb <= 1e-5, "sync=false backward (%s), round %d: rel err %g", rb.path, it, eb);
    fprintf(stderr, "ipc_client: async round %d: forward %s %.3g, backward %s %.3g\n", it, rf.path,
            ef, rb.path, eb);
  }
  rig_free(c, &R);
  return g_fail;
}

/* Closing a region that queued sync=false work still reads: nsad must
 * answer the unregister at once (the unmap waits on its closer thread, not
 * on the event loop) and must not unmap the memory under the kernels. The
 * forward waits (wait_event) behind ~128 GiB of memsets on this client's
 * stream, so the GPU work outlives the unregister by tens of milliseconds.
 * Then the same allocation is registered again while its close may still
 * be queued (nsad revives the mapping) and used again. */
static int mode_closes(nsa_client_t *c) {
  prob_t p;
  prob_init(&p, 2, 128, 1024, 2, 4, 64, 64, 16, 32);
  nsa_client_fwd_t f;
  nsa_client_bwd_t b;
  make_args(c, &p, &f, &b);
  rig_t R;
  rig_init(c, &R, 2);
  cudaStream_t st = R.st;
  cudaEvent_t ready = R.ev[0], done = R.ev[1];
  const uint64_t ev_ready = R.id[0], ev_done = R.id[1];
  void *busy = R.busy;
  const size_t busy_bytes = R.busy_bytes;
  prob_fill_host(&p);
  prob_upload(&p);
  /* Warm up first: nsad's first request on a fresh context loads modules and
   * grows its workspace arena, which may wait for the whole device (the
   * memsets below included) before the reply. */
  nsa_client_result_t r;
  need(c, nsa_client_forward(c, &f, &r), "warm-up forward");
  for (int i = 0; i < 128; i++) CK(cudaMemsetAsync(busy, i, busy_bytes, st));
  CK(cudaEventRecord(ready, st));
  nsa_client_exec_t ex = {.wait_event = ev_ready, .has_wait_event = 1, .done_event = ev_done,
                          .has_done_event = 1, .async = 1};
  uint32_t t;
  need(c, nsa_client_forward_submit_ex(c, &f, &ex, &t), "forward submit");
  need(c, nsa_client_wait(c, t, &r), "forward reply");
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  need(c, nsa_client_cuda_forget(c, p.dsel), "forget sel");
  need(c, nsa_client_ping(c), "ping");
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
  cudaError_t q = cudaEventQuery(done);
  EXPECT(q == cudaErrorNotReady,
         "unregister + ping took %.1f ms and came back after the queued forward had finished "
         "(cudaEventQuery: %s): nsad waited for the GPU before answering",
         ms, cudaGetErrorName(q));
  fprintf(stderr, "ipc_client: closes: unregister + ping %.2f ms, forward still queued: %s\n", ms,
          q == cudaErrorNotReady ? "yes" : "no");
  make_args(c, &p, &f, &b); /* registers sel again, maybe before its close ran */
  CK(cudaEventSynchronize(done));
  download(&p, 0);
  double e = check_fwd(&p);
  EXPECT(e <= 1e-5, "forward that read a region closed under it (%s): rel err %g", r.path, e);
  prob_fill_host(&p);
  prob_upload(&p);
  need(c, nsa_client_forward(c, &f, &r), "forward after re-registering");
  download(&p, 0);
  e = check_fwd(&p);
  EXPECT(e <= 1e-5, "forward through the re-registered region (%s): rel err %g", r.path, e);
  fprintf(stderr, "ipc_client: closes: forward %s after re-registering, rel err %.3g\n", r.path, e);
  need(c, nsa_client_cuda_forget(c, p.dsel), "forget sel again");
  rig_free(c, &R);
  return g_fail;
}

static int mode_hang(nsa_client_t *c) {
  prob_t p;
  prob_init(&p, 2, 2048, 4096, 2, 16, 128, 128, 16, 64);
  nsa_client_fwd_t f;
  nsa_client_bwd_t b;
  make_args(c, &p, &f, &b);
  prob_fill_host(&p);
  prob_upload(&p);
  uint32_t t;
  for (int i = 0; i < 24; i++) {
    need(c, nsa_client_forward_submit(c, &f, &t), "forward submit");
    need(c, nsa_client_backward_submit(c, &b, &t), "backward submit");
  }
  printf("SUBMITTED\n");
  fflush(stdout);
  sleep(120);
  return 0;
}

static int mode_errors(nsa_client_t *c) {
  prob_t p;
  prob_init(&p, 1, 32, 256, 2, 2, 64, 64, 4, 32);
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaIpcMemHandle_t h;
  CK(cudaIpcGetMemHandle(&h, p.dbase));
  uint64_t id1 = 0, id2 = 0, bad = 0;
  /* Size beyond the allocation's real extent. */
  int rc = nsa_client_region_register_cuda_ipc(c, dev, &h, p.dbytes + (64u << 20), &bad);
  EXPECT(rc != 0 && !strcmp(nsa_client_error_code(c), "out_of_bounds"),
         "oversized cuda_ipc region: rc %d code %s", rc, rc ? nsa_client_error_code(c) : "-");
  /* A device nsad does not serve. */
  rc = nsa_client_region_register_cuda_ipc(c, 99, &h, p.dbytes, &bad);
  EXPECT(rc != 0 && !strcmp(nsa_client_error_code(c), "bad_request"),
         "cuda_ipc on device 99: rc %d code %s", rc, rc ? nsa_client_error_code(c) : "-");
  /* The same handle three times (device-pointer cache + two raw). */
  nsa_client_fwd_t f;
  nsa_client_bwd_t b;
  make_args(c, &p, &f, &b);
  need(c, nsa_client_region_register_cuda_ipc(c, dev, &h, p.dbytes, &id1), "register #2");
  need(c, nsa_client_region_register_cuda_ipc(c, dev, &h, p.dbytes, &id2), "register #3");
  need(c, nsa_client_region_unregister(c, id1), "unregister #2");
  need(c, nsa_client_cuda_forget(c, p.dbase), "forget the cached one");
  /* Only id2 is left; point every float tensor at it (same offsets). */
  nsa_client_fwd_t f2 = f;
  f2.q.region = f2.k.region = f2.v.region = f2.o.region = f2.lse.region = id2;
  prob_fill_host(&p);
  prob_upload(&p);
  nsa_client_result_t r;
  need(c, nsa_client_forward(c, &f2, &r), "forward through the shared mapping");
  download(&p, 0);
  double e = check_fwd(&p);
  EXPECT(e <= 1e-5, "forward through the 3rd registration: rel err %g", e);
  /* A bad selection entry: reported, and nsad keeps serving. */
  int nb = (int)((p.Skv + p.bs - 1) / p.bs);
  p.hs[5] = nb + 3;
  CK(cudaMemcpy(p.dsel, p.hs, p.ns * 4, cudaMemcpyHostToDevice));
  rc = nsa_client_forward(c, &f2, &r);
  EXPECT(rc != 0 && !strcmp(nsa_client_error_code(c), "invalid_selection"),
         "bad selection: rc %d code %s", rc, rc ? nsa_client_error_code(c) : "-");
  prob_fill_host(&p);
  prob_upload(&p);
  need(c, nsa_client_forward(c, &f2, &r), "forward after the bad selection");
  download(&p, 0);
  e = check_fwd(&p);
  EXPECT(e <= 1e-5, "forward after invalid_selection: rel err %g", e);
  need(c, nsa_client_region_unregister(c, id2), "unregister #3");
  need(c, nsa_client_ping(c), "ping");
  return g_fail;
}

/* ------------------------------------------------------------- train mode --- */

/* Count of NaN/inf entries (the NaN poison shows up as NaN). */
static size_t nonfinite(const float *x, size_t n) {
  size_t bad = 0;
  for (size_t i = 0; i < n; i++) bad += !isfinite(x[i]);
  return bad;
}

/* One training run of tests/daemon/test_train.c's loop (shared math in
 * tests/common/train_math.c) through nsad --backend cuda, with every tensor
 * in device memory. p holds the buffers (sizes NSA_TR_*), f/b their refs.
 *   sync=true (st == NULL): each step uploads q/k/v with cudaMemcpy, poisons
 *     o/lse (then dq/dk/dv) with cudaMemset 0xFF, synchronizes the device,
 *     sends the request and copies the results back with cudaMemcpy.
 *   sync=false (st != NULL): the same uploads and poisoning are queued on the
 *     client's stream st and announced with wait_event (ready); each request
 *     has a done_event (done_f / done_b), and st waits on it before the copy
 *     back; the host only synchronizes st after that copy.
 * Returns 0 on pass, 1 on a failed check. */
static int train_run(nsa_client_t *c, prob_t *p, const nsa_client_fwd_t *f,
                     const nsa_client_bwd_t *b, const char *use, const char *v2,
                     const char *want, cudaStream_t st, cudaEvent_t ready, uint64_t ev_ready,
                     cudaEvent_t done_f, uint64_t ev_f, cudaEvent_t done_b, uint64_t ev_b) {
  const int async = st != NULL;
  const char *how = async ? "sync=false" : "sync=true";
  int fail = 0;
  set_flag(c, "NSA_USE_SEL_VARLEN", use);
  set_flag(c, "NSA_SEL_VARLEN_V2", v2);
  nsa_train_t tr;
  if (nsa_train_init(&tr, NSA_TR_SEED) != 0) {
    fprintf(stderr, "ipc_client: out of host memory\n");
    exit(2);
  }
  /* The selection is fixed: upload it once. */
  memcpy(p->hs, tr.sel, sizeof tr.sel);
  CK(cudaMemcpy(p->dsel, p->hs, p->ns * 4, cudaMemcpyHostToDevice));
  nsa_client_exec_t exf = {.wait_event = ev_ready, .has_wait_event = 1, .done_event = ev_f,
                           .has_done_event = 1, .async = 1};
  nsa_client_exec_t exb = {.wait_event = ev_ready, .has_wait_event = 1, .done_event = ev_b,
                           .has_done_event = 1, .async = 1};
  double loss0 = NAN, loss = NAN;
  int halved_at = -1;
  for (int step = 0; step <= NSA_TR_STEPS; step++) {
    nsa_client_result_t r;
    uint32_t tk;
    /* ---- forward: q/k/v in, o/lse poisoned, o/lse back ---- */
    nsa_train_project(&tr, p->hq, p->hk, p->hv);
    if (!async) {
      CK(cudaMemcpy(p->q, p->hq, p->nq * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(p->k, p->hk, p->nk * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(p->v, p->hv, p->nv * 4, cudaMemcpyHostToDevice));
      CK(cudaMemset(p->o, 0xFF, p->no * 4));
      CK(cudaMemset(p->lse, 0xFF, p->nl * 4));
      CK(cudaDeviceSynchronize());
      need(c, nsa_client_forward(c, f, &r), "train forward");
      CK(cudaMemcpy(p->ho, p->o, p->no * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(p->hl, p->lse, p->nl * 4, cudaMemcpyDeviceToHost));
    } else {
      CK(cudaMemcpyAsync(p->q, p->hq, p->nq * 4, cudaMemcpyHostToDevice, st));
      CK(cudaMemcpyAsync(p->k, p->hk, p->nk * 4, cudaMemcpyHostToDevice, st));
      CK(cudaMemcpyAsync(p->v, p->hv, p->nv * 4, cudaMemcpyHostToDevice, st));
      CK(cudaMemsetAsync(p->o, 0xFF, p->no * 4, st));
      CK(cudaMemsetAsync(p->lse, 0xFF, p->nl * 4, st));
      CK(cudaEventRecord(ready, st));
      need(c, nsa_client_forward_submit_ex(c, f, &exf, &tk), "train forward submit");
      need(c, nsa_client_wait(c, tk, &r), "train forward reply");
      CK(cudaStreamWaitEvent(st, done_f, 0));
      CK(cudaMemcpyAsync(p->ho, p->o, p->no * 4, cudaMemcpyDeviceToHost, st));
      CK(cudaMemcpyAsync(p->hl, p->lse, p->nl * 4, cudaMemcpyDeviceToHost, st));
      CK(cudaStreamSynchronize(st));
    }
    if (strcmp(r.path, want) != 0) {
      fprintf(stderr, "ipc_client: FAIL: train %s step %d forward served by %s, expected %s\n",
              how, step, r.path, want);
      fail = 1;
      break;
    }
    /* Every row's key set holds its own key, so lse is finite everywhere. */
    size_t bad = nonfinite(p->hl, p->nl);
    loss = nsa_train_loss(&tr, p->ho, p->hdo);
    if (bad || !isfinite(loss)) {
      fprintf(stderr, "ipc_client: FAIL: train %s %s step %d: loss %g, %zu non-finite lse\n",
              want, how, step, loss, bad);
      fail = 1;
      break;
    }
    if (step == 0) loss0 = loss;
    if (halved_at < 0 && loss <= 0.5 * loss0) halved_at = step;
    if (step == NSA_TR_STEPS) break; /* the last forward only measures */

    /* ---- backward: do in, dq/dk/dv poisoned, dq/dk/dv back ---- */
    if (!async) {
      CK(cudaMemcpy(p->dout, p->hdo, p->no * 4, cudaMemcpyHostToDevice));
      CK(cudaMemset(p->dq, 0xFF, p->nq * 4));
      CK(cudaMemset(p->dk, 0xFF, p->nk * 4));
      CK(cudaMemset(p->dv, 0xFF, p->nv * 4));
      CK(cudaDeviceSynchronize());
      need(c, nsa_client_backward(c, b, &r), "train backward");
      CK(cudaMemcpy(p->hdq, p->dq, p->nq * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(p->hdk, p->dk, p->nk * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(p->hdv, p->dv, p->nv * 4, cudaMemcpyDeviceToHost));
    } else {
      /* st finished the forward (synchronized above), so re-recording ready
       * cannot race the daemon's wait on its previous record. */
      CK(cudaMemcpyAsync(p->dout, p->hdo, p->no * 4, cudaMemcpyHostToDevice, st));
      CK(cudaMemsetAsync(p->dq, 0xFF, p->nq * 4, st));
      CK(cudaMemsetAsync(p->dk, 0xFF, p->nk * 4, st));
      CK(cudaMemsetAsync(p->dv, 0xFF, p->nv * 4, st));
      CK(cudaEventRecord(ready, st));
      need(c, nsa_client_backward_submit_ex(c, b, &exb, &tk), "train backward submit");
      need(c, nsa_client_wait(c, tk, &r), "train backward reply");
      CK(cudaStreamWaitEvent(st, done_b, 0));
      CK(cudaMemcpyAsync(p->hdq, p->dq, p->nq * 4, cudaMemcpyDeviceToHost, st));
      CK(cudaMemcpyAsync(p->hdk, p->dk, p->nk * 4, cudaMemcpyDeviceToHost, st));
      CK(cudaMemcpyAsync(p->hdv, p->dv, p->nv * 4, cudaMemcpyDeviceToHost, st));
      CK(cudaStreamSynchronize(st));
    }
    if (strcmp(r.path, want) != 0) {
      fprintf(stderr, "ipc_client: FAIL: train %s step %d backward served by %s, expected %s\n",
              how, step, r.path, want);
      fail = 1;
      break;
    }
    if (step == 0) {
      /* The model's gradients as they stand vs the float64 reference, with
       * the same f32 q/k/v and dO the daemon saw. */
      double e[3];
      nsa_train_check_grads(&tr, p->hq, p->hk, p->hv, p->hdo, p->hdq, p->hdk, p->hdv, e);
      fprintf(stderr, "ipc_client: train %-9s %s step 0 rel err dq %.3g dk %.3g dv %.3g\n",
              want, how, e[0], e[1], e[2]);
      for (int m = 0; m < 3; m++)
        if (!(e[m] <= 1e-4)) {
          fprintf(stderr, "ipc_client: FAIL: train %s %s step 0 d%c rel err %g > 1e-4\n", want,
                  how, "qkv"[m], e[m]);
          fail = 1;
        }
    } else if (nonfinite(p->hdq, p->nq) || nonfinite(p->hdk, p->nk) ||
               nonfinite(p->hdv, p->nv)) {
      fprintf(stderr, "ipc_client: FAIL: train %s %s step %d: non-finite dq/dk/dv\n", want, how,
              step);
      fail = 1;
      break;
    }
    /* Chain rule through the projections, then SGD with momentum. */
    nsa_train_step(&tr, p->hdq, p->hdk, p->hdv);
  }
  fprintf(stderr, "ipc_client: train %-9s %s: loss %.6g -> %.6g after %d steps (halved at %d)\n",
          want, how, loss0, loss, NSA_TR_STEPS, halved_at);
  if (!fail && !(loss0 > 0 && isfinite(loss0) && isfinite(loss) && loss <= 0.5 * loss0)) {
    fprintf(stderr, "ipc_client: FAIL: train %s %s: loss %g -> %g, not halved\n", want, how,
            loss0, loss);
    fail = 1;
  }
  nsa_train_free(&tr);
  return fail;
}

static int mode_train(nsa_client_t *c) {
  prob_t p;
  prob_init(&p, NSA_TR_B, NSA_TR_S, NSA_TR_S, NSA_TR_G, NSA_TR_HG, NSA_TR_DK, NSA_TR_DV,
            NSA_TR_NSEL, NSA_TR_BS);
  nsa_client_fwd_t f;
  nsa_client_bwd_t b;
  make_args(c, &p, &f, &b);
  /* Inputs poisoned too, once: nothing is read before it was written. */
  CK(cudaMemset(p.dbase, 0xFF, p.dbytes));
  CK(cudaDeviceSynchronize());
  static const struct {
    const char *use, *v2, *path;
  } paths[] = {{"1", "1", "varlen_v2"}, {"1", "0", "varlen_v1"}, {"0", "1", "packed"}};
  for (int i = 0; i < 3; i++)
    if (train_run(c, &p, &f, &b, paths[i].use, paths[i].v2, paths[i].path, NULL, NULL, 0, NULL,
                  0, NULL, 0))
      g_fail = 1;
  /* sync=false on varlen_v2: the client's stream orders everything. */
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t ready, done_f, done_b;
  const unsigned fl = cudaEventInterprocess | cudaEventDisableTiming;
  CK(cudaEventCreateWithFlags(&ready, fl));
  CK(cudaEventCreateWithFlags(&done_f, fl));
  CK(cudaEventCreateWithFlags(&done_b, fl));
  uint64_t ev_ready, ev_f, ev_b;
  need(c, nsa_client_cuda_event(c, ready, &ev_ready), "event ready");
  need(c, nsa_client_cuda_event(c, done_f, &ev_f), "event done_f");
  need(c, nsa_client_cuda_event(c, done_b, &ev_b), "event done_b");
  if (train_run(c, &p, &f, &b, "1", "1", "varlen_v2", st, ready, ev_ready, done_f, ev_f, done_b,
                ev_b))
    g_fail = 1;
  need(c, nsa_client_cuda_forget(c, ready), "forget");
  need(c, nsa_client_cuda_forget(c, done_f), "forget");
  need(c, nsa_client_cuda_forget(c, done_b), "forget");
  CK(cudaStreamDestroy(st));
  uint64_t ep;
  nsa_client_flags_reset(c, "NSA_USE_SEL_VARLEN", &ep);
  nsa_client_flags_reset(c, "NSA_SEL_VARLEN_V2", &ep);
  return g_fail;
}

int main(int argc, char **argv) {
  const char *sock = NULL, *mode = "check";
  g_rng = (uint64_t)getpid() * 7919u + 17;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--socket") && i + 1 < argc) sock = argv[++i];
    else if (!strcmp(argv[i], "--mode") && i + 1 < argc) mode = argv[++i];
    else if (!strcmp(argv[i], "--seed") && i + 1 < argc) g_rng = strtoull(argv[++i], NULL, 10);
    else {
      fprintf(stderr, "usage: nsa_ipc_client --socket PATH --mode check|async|closes|hang|errors|train "
              "[--seed N]\n");
      return 2;
    }
  }
  CK(cudaSetDevice(0));
  CK(cudaFree(0)); /* create the context: libnsaclient uses the current one */
  nsa_client_t *c = NULL;
  nsa_client_opts_t o = {.socket_path = sock, .name = "ipc-client", .timeout_ms = 120000};
  if (nsa_client_open(&c, &o) != 0) {
    fprintf(stderr, "ipc_client: open: %s\n", nsa_client_open_error());
    return 2;
  }
  if (strcmp(nsa_client_info(c)->backend, "cuda") != 0) {
    fprintf(stderr, "ipc_client: nsad runs the %s backend, not cuda\n", nsa_client_info(c)->backend);
    return 2;
  }
  int rc;
  if (!strcmp(mode, "check")) rc = mode_check(c);
  else if (!strcmp(mode, "async")) rc = mode_async(c);
  else if (!strcmp(mode, "hang")) rc = mode_hang(c);
  else if (!strcmp(mode, "closes")) rc = mode_closes(c);
  else if (!strcmp(mode, "errors")) rc = mode_errors(c);
  else if (!strcmp(mode, "train")) rc = mode_train(c);
  else {
    fprintf(stderr, "ipc_client: unknown mode %s\n", mode);
    rc = 2;
  }
  nsa_client_close(c);
  if (rc == 0) fprintf(stderr, "ipc_client: %s: PASS\n", mode);
  return rc;
}
