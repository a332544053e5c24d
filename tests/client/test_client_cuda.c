/*
 * test_client_cuda.c — two real processes on a GPU: this client allocates
 * with cudaMalloc, hands device pointers to libnsaclient (which makes and
 * registers the CUDA IPC handles), nsad --backend cuda runs the forward, and
 * the result is checked against the float64 reference; then the same with
 * sync=false, the client's stream waiting only on done_event.
 * ctest label gpu; skips cleanly without a GPU or without nsad's CUDA backend.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "ref.h"

TestSuite(client_cuda, .fini = th_fini, .timeout = 300);

enum { B = 2, S = 40, SKV = 300, G = 2, HG = 3, H = G * HG, D = 64, NS = 8, BS = 32 };

static uint64_t g_rng = 0x1234567;
static double urand(void) {
  g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
  return (double)(g_rng >> 11) * 0x1.0p-53;
}

typedef struct {
  float *q, *k, *v, *o, *lse; /* device */
  int32_t *sel;
  float *hq, *hk, *hv, *ho, *hl; /* host */
  int32_t *hs;
  double *qd, *kd, *vd, *od, *ld;
  size_t nq, nk, nl, ns;
} gprob_t;

static void gprob_init(gprob_t *p) {
  memset(p, 0, sizeof *p);
  p->nq = (size_t)B * S * H * D, p->nk = (size_t)B * SKV * G * D, p->nl = (size_t)B * S * H;
  p->ns = (size_t)B * S * G * NS;
  cr_assert_eq(cudaMalloc((void **)&p->q, p->nq * 4), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&p->k, p->nk * 4), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&p->v, p->nk * 4), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&p->o, p->nq * 4), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&p->lse, p->nl * 4), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&p->sel, p->ns * 4), cudaSuccess);
  p->hq = malloc(p->nq * 4), p->hk = malloc(p->nk * 4), p->hv = malloc(p->nk * 4);
  p->ho = malloc(p->nq * 4), p->hl = malloc(p->nl * 4), p->hs = malloc(p->ns * 4);
  p->qd = malloc(p->nq * 8), p->kd = malloc(p->nk * 8), p->vd = malloc(p->nk * 8);
  p->od = malloc(p->nq * 8), p->ld = malloc(p->nl * 8);
}

/* Fresh inputs on the device, outputs poisoned (0xFF bytes = NaN). */
static void gprob_fill(gprob_t *p) {
  for (size_t i = 0; i < p->nq; i++) p->qd[i] = p->hq[i] = (float)(urand() * 2 - 1);
  for (size_t i = 0; i < p->nk; i++) p->kd[i] = p->hk[i] = (float)(urand() * 2 - 1);
  for (size_t i = 0; i < p->nk; i++) p->vd[i] = p->hv[i] = (float)(urand() * 2 - 1);
  int nb = (SKV + BS - 1) / BS;
  for (size_t i = 0; i < p->ns; i++) p->hs[i] = (int32_t)(urand() * (nb + 1)) - 1;
  cudaMemcpy(p->q, p->hq, p->nq * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(p->k, p->hk, p->nk * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(p->v, p->hv, p->nk * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(p->sel, p->hs, p->ns * 4, cudaMemcpyHostToDevice);
  cudaMemset(p->o, 0xFF, p->nq * 4);
  cudaMemset(p->lse, 0xFF, p->nl * 4);
  cudaDeviceSynchronize();
}

static double gprob_check(gprob_t *p) {
  nsa_ref_problem_t r = {.B = B, .S = S, .Skv = SKV, .G = G, .h = HG, .Dk = D, .Dv = D, .n = NS,
                         .q = p->qd, .k = p->kd, .v = p->vd, .sel_kind = NSA_REF_BLOCKS,
                         .sel = p->hs, .block_size = BS, .scale = 0};
  nsa_ref_fwd(&r, p->od, p->ld);
  double ma = 0, mr = 0;
  for (size_t i = 0; i < p->nq; i++) {
    double d = fabs((double)p->ho[i] - p->od[i]);
    if (!(d <= ma)) ma = isnan(d) ? INFINITY : d;
    if (fabs(p->od[i]) > mr) mr = fabs(p->od[i]);
  }
  for (size_t i = 0; i < p->nl; i++) {
    if (isinf(p->ld[i]) && isinf(p->hl[i]) && (p->ld[i] < 0) == (p->hl[i] < 0)) continue;
    double d = fabs((double)p->hl[i] - p->ld[i]) / fmax(fabs(p->ld[i]), 1.0);
    if (!(d <= ma / (mr > 0 ? mr : 1))) ma = isnan(d) ? INFINITY : d * (mr > 0 ? mr : 1);
  }
  return mr > 0 ? ma / mr : ma;
}

static void gprob_free(gprob_t *p) {
  cudaFree(p->q), cudaFree(p->k), cudaFree(p->v), cudaFree(p->o), cudaFree(p->lse), cudaFree(p->sel);
  free(p->hq), free(p->hk), free(p->hv), free(p->ho), free(p->hl), free(p->hs);
  free(p->qd), free(p->kd), free(p->vd), free(p->od), free(p->ld);
}

static nsa_client_t *start_cuda_nsad(th_nsad_t *d) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return NULL;
  const char *args[] = {"--backend", "cuda", NULL};
  if (th_start(d, args) != 0) return NULL; /* built without the CUDA backend */
  return th_client(d, "gpu-client");
}

static void fill_args(nsa_client_t *c, gprob_t *p, nsa_client_fwd_t *a) {
  const int64_t sq[4] = {B, S, H, D}, sk[4] = {B, SKV, G, D}, sl[3] = {B, S, H},
                ss[4] = {B, S, G, NS};
  memset(a, 0, sizeof *a);
  cr_assert_eq(nsa_client_cuda_tensor(c, p->q, NSA_CLIENT_F32, 4, sq, &a->q), 0, "%s: %s",
               nsa_client_error_code(c), nsa_client_error_message(c));
  cr_assert_eq(nsa_client_cuda_tensor(c, p->k, NSA_CLIENT_F32, 4, sk, &a->k), 0);
  cr_assert_eq(nsa_client_cuda_tensor(c, p->v, NSA_CLIENT_F32, 4, sk, &a->v), 0);
  cr_assert_eq(nsa_client_cuda_tensor(c, p->o, NSA_CLIENT_F32, 4, sq, &a->o), 0);
  cr_assert_eq(nsa_client_cuda_tensor(c, p->lse, NSA_CLIENT_F32, 3, sl, &a->lse), 0);
  a->has_lse = 1;
  a->sel.kind = NSA_CLIENT_SEL_BLOCK_INDICES;
  a->sel.block_size = BS;
  cr_assert_eq(nsa_client_cuda_tensor(c, p->sel, NSA_CLIENT_I32, 4, ss, &a->sel.t), 0);
}

Test(client_cuda, device_pointers_forward_sync) {
  th_nsad_t d;
  nsa_client_t *c = start_cuda_nsad(&d);
  if (!c) cr_skip_test("no GPU, or nsad was built without the CUDA backend");
  cr_expect_str_eq(nsa_client_info(c)->backend, "cuda");
  gprob_t p;
  gprob_init(&p);
  nsa_client_fwd_t a;
  fill_args(c, &p, &a);
  for (int it = 0; it < 3; it++) {
    gprob_fill(&p);
    nsa_client_result_t r;
    cr_assert_eq(nsa_client_forward(c, &a, &r), 0, "%s: %s", nsa_client_error_code(c),
                 nsa_client_error_message(c));
    cudaMemcpy(p.ho, p.o, p.nq * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(p.hl, p.lse, p.nl * 4, cudaMemcpyDeviceToHost);
    double e = gprob_check(&p);
    cr_expect_leq(e, 1e-5, "path %s: rel err %g", r.path, e);
  }
  gprob_free(&p);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(client_cuda, sync_false_with_done_event) {
  th_nsad_t d;
  nsa_client_t *c = start_cuda_nsad(&d);
  if (!c) cr_skip_test("no GPU, or nsad was built without the CUDA backend");
  gprob_t p;
  gprob_init(&p);
  nsa_client_fwd_t a;
  fill_args(c, &p, &a);
  cudaEvent_t done;
  cr_assert_eq(cudaEventCreateWithFlags(&done, cudaEventInterprocess | cudaEventDisableTiming),
               cudaSuccess);
  nsa_client_exec_t ex = {.async = 1, .has_done_event = 1};
  cr_assert_eq(nsa_client_cuda_event(c, done, &ex.done_event), 0, "%s",
               nsa_client_error_message(c));
  cudaStream_t st;
  cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  gprob_fill(&p);
  uint32_t t;
  cr_assert_eq(nsa_client_forward_submit_ex(c, &a, &ex, &t), 0);
  nsa_client_result_t r;
  cr_assert_eq(nsa_client_wait(c, t, &r), 0, "%s: %s", nsa_client_error_code(c),
               nsa_client_error_message(c));
  /* the host never waits for nsad's work: the stream waits on done_event */
  cudaStreamWaitEvent(st, done, 0);
  cudaMemcpyAsync(p.ho, p.o, p.nq * 4, cudaMemcpyDeviceToHost, st);
  cudaMemcpyAsync(p.hl, p.lse, p.nl * 4, cudaMemcpyDeviceToHost, st);
  cudaStreamSynchronize(st);
  double e = gprob_check(&p);
  cr_expect_leq(e, 1e-5, "sync=false on %s: rel err %g", r.path, e);
  cudaStreamDestroy(st);
  nsa_client_cuda_forget(c, done);
  cudaEventDestroy(done);
  gprob_free(&p);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}
