/*
 * train_math.c — host-side math of the issue-6 training loop (see
 * train_math.h): data, teacher target, projections, loss, chain rule, SGD.
 * The random stream (x, then sel, then teacher Wq/Wk/Wv, then student) is
 * the one test_train.c always used, so its numbers did not change when this
 * was factored out.
 */
#include "train_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { B = NSA_TR_B, S = NSA_TR_S, G = NSA_TR_G, HG = NSA_TR_HG, H = NSA_TR_H, DK = NSA_TR_DK,
       DV = NSA_TR_DV, DIN = NSA_TR_DIN, NSEL = NSA_TR_NSEL, BS = NSA_TR_BS, ROWS = NSA_TR_ROWS };

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

void nsa_train_free(nsa_train_t *t) {
  free(t->x), free(t->qd), free(t->kd), free(t->vd), free(t->target);
  for (int m = 0; m < 3; m++) free(t->w[m]), free(t->vel[m]), free(t->gw[m]);
  memset(t, 0, sizeof *t);
}

nsa_ref_problem_t nsa_train_ref(const nsa_train_t *t) {
  nsa_ref_problem_t r = {.B = B, .S = S, .Skv = S, .G = G, .h = HG, .Dk = DK, .Dv = DV,
                         .n = NSEL, .q = t->qd, .k = t->kd, .v = t->vd,
                         .sel_kind = NSA_REF_BLOCKS, .sel = t->sel, .block_size = BS,
                         .scale = 0};
  return r;
}

int nsa_train_init(nsa_train_t *t, uint64_t seed) {
  memset(t, 0, sizeof *t);
  t->cols[0] = H * DK, t->cols[1] = G * DK, t->cols[2] = G * DV;
  t->x = malloc(sizeof(double) * ROWS * DIN);
  t->qd = malloc(sizeof(double) * NSA_TR_NQ), t->kd = malloc(sizeof(double) * NSA_TR_NK);
  t->vd = malloc(sizeof(double) * NSA_TR_NV), t->target = malloc(sizeof(double) * NSA_TR_NO);
  int ok = t->x && t->qd && t->kd && t->vd && t->target;
  for (int m = 0; m < 3; m++) {
    t->w[m] = malloc(sizeof(double) * DIN * t->cols[m]);
    t->vel[m] = calloc((size_t)DIN * t->cols[m], sizeof(double));
    t->gw[m] = malloc(sizeof(double) * DIN * t->cols[m]);
    ok = ok && t->w[m] && t->vel[m] && t->gw[m];
  }
  if (!ok) {
    nsa_train_free(t);
    return -1;
  }
  uint64_t rng = seed;
  for (int i = 0; i < ROWS * DIN; i++) t->x[i] = urand(&rng);
  make_sel(t->sel, &rng);
  /* Teacher with gain 2 on q/k: sharper attention than the student starts with. */
  init_w(t->w[0], t->cols[0], 2.0, &rng);
  init_w(t->w[1], t->cols[1], 2.0, &rng);
  init_w(t->w[2], t->cols[2], 1.0, &rng);
  nsa_train_project(t, NULL, NULL, NULL);
  nsa_ref_problem_t ref = nsa_train_ref(t);
  nsa_ref_fwd(&ref, t->target, NULL);
  /* Student: fresh weights from the same distribution (gain 1). */
  for (int m = 0; m < 3; m++) init_w(t->w[m], t->cols[m], 1.0, &rng);
  return 0;
}

void nsa_train_project(nsa_train_t *t, float *q, float *k, float *v) {
  project(t->x, t->w[0], t->cols[0], t->qd);
  project(t->x, t->w[1], t->cols[1], t->kd);
  project(t->x, t->w[2], t->cols[2], t->vd);
  if (q)
    for (int i = 0; i < NSA_TR_NQ; i++) q[i] = (float)t->qd[i];
  if (k)
    for (int i = 0; i < NSA_TR_NK; i++) k[i] = (float)t->kd[i];
  if (v)
    for (int i = 0; i < NSA_TR_NV; i++) v[i] = (float)t->vd[i];
}

double nsa_train_loss(const nsa_train_t *t, const float *o, float *dout) {
  double sum = 0;
  for (int i = 0; i < NSA_TR_NO; i++) {
    double e = (double)o[i] - t->target[i];
    sum += e * e;
    dout[i] = (float)(2.0 * e / NSA_TR_NO);
  }
  return sum / NSA_TR_NO;
}

double nsa_train_check_grads(nsa_train_t *t, const float *q, const float *k, const float *v,
                             const float *dout, const float *dq, const float *dk,
                             const float *dv, double err[3]) {
  double *dod = malloc(sizeof(double) * NSA_TR_NO), *dqr = malloc(sizeof(double) * NSA_TR_NQ);
  double *dkr = malloc(sizeof(double) * NSA_TR_NK), *dvr = malloc(sizeof(double) * NSA_TR_NV);
  double e[3] = {INFINITY, INFINITY, INFINITY};
  if (dod && dqr && dkr && dvr) {
    for (int i = 0; i < NSA_TR_NQ; i++) t->qd[i] = q[i];
    for (int i = 0; i < NSA_TR_NK; i++) t->kd[i] = k[i];
    for (int i = 0; i < NSA_TR_NV; i++) t->vd[i] = v[i];
    for (int i = 0; i < NSA_TR_NO; i++) dod[i] = dout[i];
    nsa_ref_problem_t ref = nsa_train_ref(t);
    nsa_ref_bwd(&ref, dod, dqr, dkr, dvr);
    e[0] = rel_err(dq, dqr, NSA_TR_NQ);
    e[1] = rel_err(dk, dkr, NSA_TR_NK);
    e[2] = rel_err(dv, dvr, NSA_TR_NV);
  }
  free(dod), free(dqr), free(dkr), free(dvr);
  if (err) err[0] = e[0], err[1] = e[1], err[2] = e[2];
  double m = e[0];
  if (!(e[1] <= m)) m = e[1];
  if (!(e[2] <= m)) m = e[2];
  return m;
}

void nsa_train_step(nsa_train_t *t, const float *dq, const float *dk, const float *dv) {
  grad_w(t->x, dq, t->cols[0], t->gw[0]);
  grad_w(t->x, dk, t->cols[1], t->gw[1]);
  grad_w(t->x, dv, t->cols[2], t->gw[2]);
  for (int m = 0; m < 3; m++)
    for (int i = 0; i < DIN * t->cols[m]; i++) {
      t->vel[m][i] = NSA_TR_MOMENTUM * t->vel[m][i] - NSA_TR_LR * t->gw[m][i];
      t->w[m][i] += t->vel[m][i];
    }
}
