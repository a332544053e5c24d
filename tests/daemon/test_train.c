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

TestSuite(train, .fini = th_fini, .timeout = 300);

/* Sizes: small enough for seconds under ASan, with h > 1, G > 1, Dk ≠ Dv,
 * and several blocks per sequence. */
enum { B = 2, S = 64, G = 2, HG = 2, H = G * HG, DK = 16, DV = 12, DIN = 16, NSEL = 4, BS = 8 };
enum { ROWS = B * S, NQ = ROWS * H * DK, NK = ROWS * G * DK, NV = ROWS * G * DV, NO = ROWS * H * DV };
enum { NL = ROWS * H, NS = ROWS * G * NSEL };
#define STEPS 200
#define LR 2.0
#define MOMENTUM 0.9

/* splitmix64 → uniform in [-1, 1). */
static double urand(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (double)(z >> 11) * 0x1.0p-53 * 2.0 - 1.0;
}

/* W [DIN, cols] uniform with variance gain²/DIN, so X·W has O(gain) entries. */
static void init_w(double *w, int cols, double gain, uint64_t *s) {
  double a = gain * sqrt(3.0 / DIN);
  for (int i = 0; i < DIN * cols; i++) w[i] = a * urand(s);
}

/* out [ROWS, cols] = X [ROWS, DIN] · W [DIN, cols], in double. */
static void project(const double *x, const double *w, int cols, double *out) {
  for (int r = 0; r < ROWS; r++)
    for (int c = 0; c < cols; c++) {
      double acc = 0;
      for (int i = 0; i < DIN; i++) acc += x[r * DIN + i] * w[i * cols + c];
      out[r * cols + c] = acc;
    }
}

/* dW [DIN, cols] = Xᵀ · dY, dY [ROWS, cols] (f32 from the daemon). */
static void grad_w(const double *x, const float *dy, int cols, double *dw) {
  memset(dw, 0, sizeof(double) * DIN * cols);
  for (int r = 0; r < ROWS; r++)
    for (int i = 0; i < DIN; i++) {
      double xi = x[r * DIN + i];
      for (int c = 0; c < cols; c++) dw[i * cols + c] += xi * (double)dy[r * cols + c];
    }
}

/* Selection [B,S,G,NSEL]: the query's own block, block 0, a random earlier
 * (or same) block, and a random slot in [-1, nblocks) — so duplicates,
 * unused slots and future blocks (clipped to nothing, p(t) = t) all occur.
 * The own block keeps every key set non-empty (it holds key t). */
static void make_sel(int32_t *sel, uint64_t *s) {
  const int nb = (S + BS - 1) / BS;
  for (int b = 0; b < B; b++)
    for (int t = 0; t < S; t++)
      for (int g = 0; g < G; g++) {
        int32_t *row = sel + ((b * S + t) * G + g) * NSEL;
        int own = t / BS;
        row[0] = own;
        row[1] = 0;
        row[2] = (int32_t)((urand(s) + 1) * 0.5 * (own + 1));
        if (row[2] > own) row[2] = own;
        row[3] = (int32_t)((urand(s) + 1) * 0.5 * (nb + 1)) - 1;
        if (row[3] >= nb) row[3] = nb - 1;
      }
}

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

/* max |got − want| / max |want|; inf on NaN. */
static double rel_err(const float *got, const double *want, size_t n) {
  double ma = 0, mr = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)got[i] - want[i]);
    if (!(d <= ma)) ma = isnan(d) ? INFINITY : d;
    if (fabs(want[i]) > mr) mr = fabs(want[i]);
  }
  return mr > 0 ? ma / mr : ma;
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
  uint64_t rng = 0x7261696eull; /* same for every path: the runs are comparable */
  static double x[ROWS * DIN];
  for (int i = 0; i < ROWS * DIN; i++) x[i] = urand(&rng);
  make_sel(sel, &rng);
  double *w[3], *vel[3], *gw[3];
  double *qd = malloc(sizeof(double) * NQ), *kd = malloc(sizeof(double) * NK);
  double *vd = malloc(sizeof(double) * NV), *target = malloc(sizeof(double) * NO);
  const int cols[3] = {H * DK, G * DK, G * DV};
  for (int m = 0; m < 3; m++) {
    w[m] = malloc(sizeof(double) * DIN * cols[m]);
    vel[m] = calloc((size_t)DIN * cols[m], sizeof(double));
    gw[m] = malloc(sizeof(double) * DIN * cols[m]);
  }
  /* Teacher with gain 2 on q/k: sharper attention than the student starts with. */
  init_w(w[0], cols[0], 2.0, &rng);
  init_w(w[1], cols[1], 2.0, &rng);
  init_w(w[2], cols[2], 1.0, &rng);
  project(x, w[0], cols[0], qd);
  project(x, w[1], cols[1], kd);
  project(x, w[2], cols[2], vd);
  nsa_ref_problem_t ref = {.B = B, .S = S, .Skv = S, .G = G, .h = HG, .Dk = DK, .Dv = DV,
                           .n = NSEL, .q = qd, .k = kd, .v = vd, .sel_kind = NSA_REF_BLOCKS,
                           .sel = sel, .block_size = BS, .scale = 0};
  nsa_ref_fwd(&ref, target, NULL);
  /* Student: fresh weights from the same distribution (gain 1). */
  for (int m = 0; m < 3; m++) init_w(w[m], cols[m], 1.0, &rng);

  double loss0 = NAN, loss = NAN, t0 = now_s();
  int halved_at = -1;
  for (int step = 0; step <= STEPS; step++) {
    project(x, w[0], cols[0], qd);
    project(x, w[1], cols[1], kd);
    project(x, w[2], cols[2], vd);
    for (int i = 0; i < NQ; i++) q[i] = (float)qd[i];
    for (int i = 0; i < NK; i++) k[i] = (float)kd[i];
    for (int i = 0; i < NV; i++) v[i] = (float)vd[i];
    for (int i = 0; i < NO; i++) o[i] = NAN;
    for (int i = 0; i < NL; i++) lse[i] = NAN;
    nsa_client_result_t res;
    cr_assert_eq(nsa_client_forward(c, &fa, &res), 0, "step %d forward: %s: %s", step,
                 nsa_client_error_code(c), nsa_client_error_message(c));
    cr_assert_str_eq(res.path, want_path, "step %d forward path", step);
    double sum = 0;
    for (int i = 0; i < NO; i++) {
      double e = (double)o[i] - target[i];
      sum += e * e;
      dout[i] = (float)(2.0 * e / NO);
    }
    loss = sum / NO;
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
      double *dod = malloc(sizeof(double) * NO), *dqr = malloc(sizeof(double) * NQ);
      double *dkr = malloc(sizeof(double) * NK), *dvr = malloc(sizeof(double) * NV);
      for (int i = 0; i < NQ; i++) qd[i] = q[i];
      for (int i = 0; i < NK; i++) kd[i] = k[i];
      for (int i = 0; i < NV; i++) vd[i] = v[i];
      for (int i = 0; i < NO; i++) dod[i] = dout[i];
      nsa_ref_bwd(&ref, dod, dqr, dkr, dvr);
      double eq = rel_err(dq, dqr, NQ), ek = rel_err(dk, dkr, NK), ev = rel_err(dv, dvr, NV);
      free(dod), free(dqr), free(dkr), free(dvr);
      cr_expect_leq(eq, 1e-4, "%s dq rel err %g", want_path, eq);
      cr_expect_leq(ek, 1e-4, "%s dk rel err %g", want_path, ek);
      cr_expect_leq(ev, 1e-4, "%s dv rel err %g", want_path, ev);
    }
    /* Chain rule through the projections, then SGD with momentum. */
    grad_w(x, dq, cols[0], gw[0]);
    grad_w(x, dk, cols[1], gw[1]);
    grad_w(x, dv, cols[2], gw[2]);
    for (int m = 0; m < 3; m++)
      for (int i = 0; i < DIN * cols[m]; i++) {
        vel[m][i] = MOMENTUM * vel[m][i] - LR * gw[m][i];
        w[m][i] += vel[m][i];
      }
  }
  double secs = now_s() - t0;
  fprintf(stderr, "train %s: loss %.6g -> %.6g after %d steps (halved at step %d), %.2f s\n",
          want_path, loss0, loss, STEPS, halved_at, secs);
  cr_expect(loss0 > 0 && isfinite(loss0), "initial loss %g", loss0);
  cr_expect(isfinite(loss), "final loss %g", loss);
  cr_expect_leq(loss, 0.5 * loss0, "%s: loss %g -> %g after %d steps, not halved", want_path,
                loss0, loss, STEPS);

  for (int m = 0; m < 3; m++) free(w[m]), free(vel[m]), free(gw[m]);
  free(qd), free(kd), free(vd), free(target);
  nsa_client_shm_destroy(c, shm);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(train, varlen_v2) { train(NULL, NULL, "varlen_v2"); }
Test(train, varlen_v1) { train("NSA_SEL_VARLEN_V2", "0", "varlen_v1"); }
Test(train, packed) { train("NSA_USE_SEL_VARLEN", "0", "packed"); }
