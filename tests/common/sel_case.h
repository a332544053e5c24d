/*
 * sel_case.h — one randomized selection-attention problem for tests:
 * host buffers for every tensor (poisoned outputs, random inputs, optional
 * non-contiguous layouts), the raw selection, float64 copies of the inputs and
 * a ready nsa_ref_problem_t, plus nsa_fwd_args_t / nsa_bwd_args_t views.
 *
 * Usable by any backend's tests: CUDA suites copy the host buffers to the
 * device and compare with the reference the same way.
 */
#ifndef NSA_SEL_CASE_H
#define NSA_SEL_CASE_H

#include "ref.h"
#include "testutil.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int64_t B, S, Skv, G, h, Dk, Dv, n;
  nsa_dtype_t dtype;
  int ranges;          /* 0: block_indices, 1: ranges */
  int32_t block_size;  /* block_indices */
  unsigned sel_flags;  /* NSA_TU_SEL_* */
  int kv_bgsd;         /* store K/V as [B, G, Skv, D] (the seed's layout) */
  int gapped;          /* every tensor with gap 2 and padding (strides != contiguous) */
  float scale;         /* 0: default 1/sqrt(Dk) */
  uint64_t seed;
} nsa_tu_case_cfg_t;

typedef struct {
  nsa_tu_case_cfg_t cfg;
  nsa_tu_buf_t q, k, v, o, lse, sel, dout, dq, dk, dv;
  int32_t *sel_raw;           /* contiguous selection (the reference's input) */
  double *qd, *kd, *vd, *dod; /* float64 copies of the inputs (exact) */
  nsa_ref_problem_t ref;
  nsa_fwd_args_t fwd;
  nsa_bwd_args_t bwd;
  int64_t H, nsel;            /* nsel: number of i32 in sel_raw */
} nsa_tu_case_t;

/* Builds a case; returns 0 or -1 (out of memory). */
int nsa_tu_case_init(nsa_tu_case_t *c, const nsa_tu_case_cfg_t *cfg);
void nsa_tu_case_teardown(nsa_tu_case_t *c);
/* Copies sel_raw (after a test edited it) into the strided selection tensor. */
void nsa_tu_case_sync_sel(nsa_tu_case_t *c);
/* Poisons o, lse, dq, dk, dv. */
void nsa_tu_case_poison_outputs(nsa_tu_case_t *c);

#ifdef __cplusplus
}
#endif
#endif
