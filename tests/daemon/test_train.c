/*
 * test_train.c — nsad trains: a small attention model learns through a real
 * daemon on the CPU backend, once per path (varlen_v2, varlen_v1, packed,
 * chosen with flags.set through libnsaclient). Issue 6, last test bullet.
 *
 * Model (all row-major; a row r = b·S + t of X is one token):
 *   X  [B·S, Din]  fixed random inputs
 *   Wq [Din, H·Dk], Wk [Din, G·Dk], Wv [Din, G·Dv]  trained (SGD + momentum)
 *   q = X·Wq viewed as [B,S,H,Dk], k = X·Wk as [B,S,G,Dk], v = X·Wv as [B,S,G,Dv]
 *   o = sel_attn(q, k, v, sel)  through nsad (Skv = S, so p(t) = t)
 *   L = mean((o − O*)²) over the N = B·S·H·Dv outputs
 * The target O* is the float64 reference forward (tests/common/ref.c, no
 * daemon code) of the same model with "teacher" weights, so L can reach ~0.
 *
 * One step: write q/k/v (f32) into the shm region, poison o/lse/dq/dk/dv with
 * NaN, forward (with lse) → L and dO = 2(o − O*)/N in the test → backward →
 * dq, dk, dv → chain rule in the test (dWq = Xᵀ·dq viewed as [B·S, H·Dk],
 * same for k, v) → SGD step. Every reply must succeed and name the path.
 * The first step's dq/dk/dv are also checked against the float64 reference
 * backward, so a wrong gradient shows up as such and not only as "no
 * progress".
 *
 * Pass: after STEPS steps L ≤ 0.5 · L(step 0), and L is finite throughout.
 *
 * The host-side math (data, target, projections, loss, chain rule, SGD) is
 * tests/common/train_math.c, shared with the GPU variant (the `train` mode of
 * tests/cuda/ipc_client.c, run by tests/cuda/test_cuda_ipc.c).
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "ref.h"
#include "train_math.h"

TestSuite(train, .fini = th_fini, .timeout = 300);

enum { B = NSA_TR_B, S = NSA_TR_S, G = NSA_TR_G, H = NSA_TR_H, DK = NSA_TR_DK, DV = NSA_TR_DV,
       NSEL = NSA_TR_NSEL, BS = NSA_TR_BS };
enum { NQ = NSA_TR_NQ, NK = NSA_TR_NK, NV = NSA_TR_NV, NO = NSA_TR_NO, NL = NSA_TR_NL,
       NS = NSA_TR_NS };
#define STEPS NSA_TR_STEPS

/* shm layout (byte offsets, 64-aligned). */
typedef struct {
  size_t q, k, v, o, l, s, d, dq, dk, dv, total;
} layout_t;

static size_t al(size_t x) { return (x + 63) & ~(size_t)63; }

static layout_t make_layout(void) {
  layout_t L;
  L.q = 0;
  L.k = al(L.q + NQ * 4);
  L.v = al(L.k + NK * 4);
  L.o = al(L.v + NV * 4);
  L.l = al(L.o + NO * 4);
  L.s = al(L.l + NL * 4);
  L.d = al(L.s + NS * 4);
  L.dq = al(L.d + NO * 4);
  L.dk = al(L.dq + NQ * 4);
  L.dv = al(L.dk + NK * 4);
  L.total = al(L.dv + NV * 4);
  return L;
}

static void set_flag(nsa_client_t *c, const char *name, const char *value) {
  uint64_t e = 0;
  cr_assert_eq(nsa_client_flags_set(c, name, value, -1, NULL, 0, &e), 0, "flags.set %s=%s: %s: %s",
               name, value, nsa_client_error_code(c), nsa_client_error_message(c));
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Trains through nsad with the given flags set (NULL name: defaults) and
 * checks every reply names want_path. */
static void train(const char *flag, const char *value, const char *want_path) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0, "nsad did not start");
  nsa_client_t *c = th_client(&d, "train");
  cr_assert_not_null(c);
  if (flag) set_flag(c, flag, value);

  layout_t L = make_layout();
  nsa_client_shm_t *shm = NULL;
  cr_assert_eq(nsa_client_shm_create(c, L.total, &shm), 0, "%s", nsa_client_error_message(c));
  char *base = shm->ptr;
  float *q = (float *)(base + L.q), *k = (float *)(base + L.k), *v = (float *)(base + L.v);
  float *o = (float *)(base + L.o), *lse = (float *)(base + L.l), *dout = (float *)(base + L.d);
  float *dq = (float *)(base + L.dq), *dk = (float *)(base + L.dk), *dv = (float *)(base + L.dv);
  int32_t *sel = (int32_t *)(base + L.s);

  /* Tensor refs: q/o/do/dq [B,S,H,·], k/v/dk/dv [B,S,G,·], lse [B,S,H]. */
  const uint64_t r = shm->region;
  const int64_t sq[4] = {B, S, H, DK}, sk[4] = {B, S, G, DK}, sv[4] = {B, S, G, DV};
  const int64_t so[4] = {B, S, H, DV}, sl[3] = {B, S, H}, ss[4] = {B, S, G, NSEL};
  nsa_client_fwd_t fa;
  memset(&fa, 0, sizeof fa);
  nsa_client_tensor(&fa.q, r, L.q, NSA_CLIENT_F32, 4, sq);
  nsa_client_tensor(&fa.k, r, L.k, NSA_CLIENT_F32, 4, sk);
  nsa_client_tensor(&fa.v, r, L.v, NSA_CLIENT_F32, 4, sv);
  nsa_client_tensor(&fa.o, r, L.o, NSA_CLIENT_F32, 4, so);
  nsa_client_tensor(&fa.lse, r, L.l, NSA_CLIENT_F32, 3, sl);
  fa.has_lse = 1;
  fa.sel.kind = NSA_CLIENT_SEL_BLOCK_INDICES;
  fa.sel.block_size = BS;
  nsa_client_tensor(&fa.sel.t, r, L.s, NSA_CLIENT_I32, 4, ss);
  nsa_client_bwd_t ba;
  memset(&ba, 0, sizeof ba);
  ba.q = fa.q, ba.k = fa.k, ba.v = fa.v, ba.o = fa.o, ba.lse = fa.lse, ba.sel = fa.sel;
  nsa_client_tensor(&ba.dout, r, L.d, NSA_CLIENT_F32, 4, so);
  nsa_client_tensor(&ba.dq, r, L.dq, NSA_CLIENT_F32, 4, sq);
  nsa_client_tensor(&ba.dk, r, L.dk, NSA_CLIENT_F32, 4, sk);
  nsa_client_tensor(&ba.dv, r, L.dv, NSA_CLIENT_F32, 4, sv);

  /* Fixed data: inputs, selection, teacher weights → target (float64 ref). */
  nsa_train_t tr;
  cr_assert_eq(nsa_train_init(&tr, NSA_TR_SEED), 0, "out of memory");
  memcpy(sel, tr.sel, sizeof tr.sel);

  double loss0 = NAN, loss = NAN, t0 = now_s();
  int halved_at = -1;
  for (int step = 0; step <= STEPS; step++) {
    nsa_train_project(&tr, q, k, v);
    for (int i = 0; i < NO; i++) o[i] = NAN;
    for (int i = 0; i < NL; i++) lse[i] = NAN;
    nsa_client_result_t res;
    cr_assert_eq(nsa_client_forward(c, &fa, &res), 0, "step %d forward: %s: %s", step,
                 nsa_client_error_code(c), nsa_client_error_message(c));
    cr_assert_str_eq(res.path, want_path, "step %d forward path", step);
    loss = nsa_train_loss(&tr, o, dout);
    cr_assert(isfinite(loss), "step %d: loss %g", step, loss);
    if (step == 0) loss0 = loss;
    if (halved_at < 0 && loss <= 0.5 * loss0) halved_at = step;
    if (step == STEPS) break; /* the last forward only measures */

    for (int i = 0; i < NQ; i++) dq[i] = NAN;
    for (int i = 0; i < NK; i++) dk[i] = NAN;
    for (int i = 0; i < NV; i++) dv[i] = NAN;
    cr_assert_eq(nsa_client_backward(c, &ba, &res), 0, "step %d backward: %s: %s", step,
                 nsa_client_error_code(c), nsa_client_error_message(c));
    cr_assert_str_eq(res.path, want_path, "step %d backward path", step);
    if (step == 0) {
      /* Gradients of the model as it stands vs the float64 reference, with
       * the same f32 inputs and dO the daemon saw. */
      double e[3];
      nsa_train_check_grads(&tr, q, k, v, dout, dq, dk, dv, e);
      double eq = e[0], ek = e[1], ev = e[2];
      cr_expect_leq(eq, 1e-4, "%s dq rel err %g", want_path, eq);
      cr_expect_leq(ek, 1e-4, "%s dk rel err %g", want_path, ek);
      cr_expect_leq(ev, 1e-4, "%s dv rel err %g", want_path, ev);
    }
    /* Chain rule through the projections, then SGD with momentum. */
    nsa_train_step(&tr, dq, dk, dv);
  }
  double secs = now_s() - t0;
  fprintf(stderr, "train %s: loss %.6g -> %.6g after %d steps (halved at step %d), %.2f s\n",
          want_path, loss0, loss, STEPS, halved_at, secs);
  cr_expect(loss0 > 0 && isfinite(loss0), "initial loss %g", loss0);
  cr_expect(isfinite(loss), "final loss %g", loss);
  cr_expect_leq(loss, 0.5 * loss0, "%s: loss %g -> %g after %d steps, not halved", want_path,
                loss0, loss, STEPS);

  nsa_train_free(&tr);
  nsa_client_shm_destroy(c, shm);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(train, varlen_v2) { train(NULL, NULL, "varlen_v2"); }
Test(train, varlen_v1) { train("NSA_SEL_VARLEN_V2", "0", "varlen_v1"); }
Test(train, packed) { train("NSA_USE_SEL_VARLEN", "0", "packed"); }
