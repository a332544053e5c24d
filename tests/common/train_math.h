/*
 * train_math.h — the host-side half of the issue-6 training loop, shared by
 * tests/daemon/test_train.c (CPU backend, shm regions) and the `train` mode of
 * tests/cuda/ipc_client.c (CUDA backend, device pointers). Only the attention
 * itself goes through nsad; everything here is plain double arithmetic.
 *
 * Model (all row-major; a row r = b·S + t of X is one token):
 *   X  [ROWS, DIN] fixed random inputs, ROWS = B·S
 *   Wq [DIN, H·Dk], Wk [DIN, G·Dk], Wv [DIN, G·Dv]  trained (SGD + momentum)
 *   q = X·Wq viewed as [B,S,H,Dk], k = X·Wk as [B,S,G,Dk], v = X·Wv as [B,S,G,Dv]
 *   o = sel_attn(q, k, v, sel)  (Skv = S, so p(t) = t)
 *   L = mean((o − O*)²) over the NO = B·S·H·Dv outputs
 * O* is the float64 reference forward (ref.c) of the same model with teacher
 * weights, so L can reach ~0.
 */
#ifndef NSA_TRAIN_MATH_H
#define NSA_TRAIN_MATH_H

#include <stddef.h>
#include <stdint.h>

#include "ref.h"

/* Sizes: small enough for seconds under ASan, with h > 1, G > 1, Dk ≠ Dv,
 * and several blocks per sequence. */
enum {
  NSA_TR_B = 2, NSA_TR_S = 64, NSA_TR_G = 2, NSA_TR_HG = 2, NSA_TR_H = NSA_TR_G * NSA_TR_HG,
  NSA_TR_DK = 16, NSA_TR_DV = 12, NSA_TR_DIN = 16, NSA_TR_NSEL = 4, NSA_TR_BS = 8
};
enum {
  NSA_TR_ROWS = NSA_TR_B * NSA_TR_S,
  NSA_TR_NQ = NSA_TR_ROWS * NSA_TR_H * NSA_TR_DK,   /* q, dq   [B,S,H,Dk] */
  NSA_TR_NK = NSA_TR_ROWS * NSA_TR_G * NSA_TR_DK,   /* k, dk   [B,S,G,Dk] */
  NSA_TR_NV = NSA_TR_ROWS * NSA_TR_G * NSA_TR_DV,   /* v, dv   [B,S,G,Dv] */
  NSA_TR_NO = NSA_TR_ROWS * NSA_TR_H * NSA_TR_DV,   /* o, do   [B,S,H,Dv] */
  NSA_TR_NL = NSA_TR_ROWS * NSA_TR_H,               /* lse     [B,S,H]    */
  NSA_TR_NS = NSA_TR_ROWS * NSA_TR_G * NSA_TR_NSEL  /* sel     [B,S,G,n]  */
};
#define NSA_TR_STEPS 200
#define NSA_TR_LR 2.0
#define NSA_TR_MOMENTUM 0.9
#define NSA_TR_SEED 0x7261696eull /* same for every path: the runs are comparable */

/* One training run's host state. m = 0, 1, 2 is q, k, v throughout. */
typedef struct {
  double *x;             /* [ROWS, DIN] */
  double *w[3];          /* [DIN, cols[m]] student weights */
  double *vel[3];        /* momentum buffers, same shapes */
  double *gw[3];         /* dW scratch, same shapes */
  double *qd, *kd, *vd;  /* current projections (float64) */
  double *target;        /* O* [B,S,H,Dv] */
  int32_t sel[NSA_TR_NS];
  int cols[3];           /* H·Dk, G·Dk, G·Dv */
} nsa_train_t;

/* Fresh state from seed: X, selection, teacher weights → O* (float64 ref),
 * then student weights. Returns 0, or -1 on out of memory. */
int nsa_train_init(nsa_train_t *t, uint64_t seed);
void nsa_train_free(nsa_train_t *t);

/* The reference problem over t->qd/kd/vd and t->sel. */
nsa_ref_problem_t nsa_train_ref(const nsa_train_t *t);

/* qd/kd/vd = X·W, and their f32 copies into q/k/v (any of them may be NULL). */
void nsa_train_project(nsa_train_t *t, float *q, float *k, float *v);

/* L = mean((o − O*)²) and dout = 2(o − O*)/NO (f32). NaN in o gives NaN. */
double nsa_train_loss(const nsa_train_t *t, const float *o, float *dout);

/* Gradients at the current f32 inputs q/k/v and dout, by the float64
 * reference backward; returns max over dq/dk/dv of the relative error
 * (max |got − ref| / max |ref|, +inf on NaN) of the given dq/dk/dv and stores
 * the three in err[3] when err is not NULL. Overwrites qd/kd/vd. */
double nsa_train_check_grads(nsa_train_t *t, const float *q, const float *k, const float *v,
                             const float *dout, const float *dq, const float *dk,
                             const float *dv, double err[3]);

/* Chain rule through the projections (dW = Xᵀ·dY) and one SGD+momentum step. */
void nsa_train_step(nsa_train_t *t, const float *dq, const float *dk, const float *dv);

#endif
