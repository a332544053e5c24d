/*
 * shadow.h — NSA_SEL_SHADOW_RATE support: which requests get a shadow run on
 * which second path, and how far the two outputs are apart.
 *
 * Worker flow (per sel_attn request, after the primary run succeeded):
 *   nsa_path_t sp = nsad_shadow_choose(snap.shadow_rate, info.path, seq);
 *   if (sp != NSA_PATH_AUTO) {
 *     run the same request with force_path = sp into daemon-owned scratch
 *     outputs (contiguous o/lse, or dq/dk/dv for backward);
 *     nsad_shadow_diff_t d; nsad_shadow_diff_init(&d);
 *     nsad_shadow_compare(&primary_o, &scratch_o, &d);   (each output tensor)
 *     nsad_metrics_shadow(m, info.path, sp, d.max_abs, d.max_rel);
 *   }
 * The client's reply carries only the primary result.
 */
#ifndef NSAD_SHADOW_H
#define NSAD_SHADOW_H

#include <stdint.h>

#include "nsa/sel_attn.h"

/* Relative differences use max(|p|, |s|, NSAD_SHADOW_REL_FLOOR) as the
 * denominator so outputs near zero do not report huge relative errors. */
#define NSAD_SHADOW_REL_FLOOR 1e-6

/* Whether request number `seq` (any per-process counter) gets a shadow run,
 * and on which path. Deterministic in seq: a hash of seq below rate*2^64
 * samples it; the shadow path alternates between the two other paths
 * (v2 primary: v1, packed, v1, ...; v1: v2, packed; packed: v2, v1), so
 * both "v2 vs v1" and "varlen vs packed" are measured. Returns NSA_PATH_AUTO
 * (-1) for no shadow run. rate <= 0 never, rate >= 1 always. */
nsa_path_t nsad_shadow_choose(double rate, nsa_path_t primary, uint64_t seq);

typedef struct {
  double max_abs;   /* max |p - s| */
  double max_rel;   /* max |p - s| / max(|p|, |s|, floor) */
  int64_t count;    /* elements compared */
  int64_t mismatch_nan; /* elements where exactly one side is NaN (counted as +inf diff) */
} nsad_shadow_diff_t;

void nsad_shadow_diff_init(nsad_shadow_diff_t *d);

/* Accumulates the element-wise difference of two HOST tensors of the same
 * shape (any strides; dtypes may differ, values are compared in double).
 * Returns 0, or -1 when shapes/ndim differ or data is NULL. For the CUDA
 * backend, copy both outputs to host first (or reduce on the device with the
 * same definition). */
int nsad_shadow_compare(const nsa_tensor_t *primary, const nsa_tensor_t *shadow,
                        nsad_shadow_diff_t *d);

/* Element i (row-major logical index over shape) of a host tensor as double. */
double nsad_tensor_get(const nsa_tensor_t *t, const int64_t *idx);

#endif
