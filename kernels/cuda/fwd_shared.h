/*
 * fwd_shared.h — query groups whose queries share their key tiles
 * (fwd_shared.cu), the key-centric forward's path for correlated selections.
 *
 * The key-centric forward (fwd_key.h) loads each K/V tile once per segment of
 * its row list but pays a partial (h * (2 Dv + 4) bytes) per (row, tile),
 * written and read back; at h = 16 those partials alone are about half of
 * the public kernel's time (docs/PERF.md). When neighbouring queries select
 * the same blocks (trained models mostly do; issue 7's `corr` pattern) a
 * FlashAttention-style CTA over a *group* of Q consecutive queries can load
 * each tile of the group's union once and keep the online softmax on chip:
 * no partials, no merge. Per request:
 *   1. fwd_shared_select_kernel (Q lanes per group): the union of the group's
 *      distinct 64-key tiles (lane q walks query q's spans; the union is the
 *      ascending sequence of lane minima). The group takes the shared path
 *      when the union has at most kUmax tiles and the masked work it adds is
 *      small: 2 * U * Q <= 3 * sum over the queries of their own tiles (each
 *      query runs against all U tiles, keys outside its set masked). Writes
 *      gcnt[grp] (U, or 0 = key-centric), gtiles[grp][0..U), the queries'
 *      64-bit key masks inside those tiles gmask[grp][u][q], and skip[r] = 1
 *      for the group's rows, so the inversion gives them no pairs and the
 *      merge leaves their outputs alone; a gate kernel then drops every
 *      group unless they hold >= 1/8 of the rows (a few groups would only
 *      add the shared kernel's tail after the key-centric ones);
 *   2. (the key-centric forward for the other rows)
 *   3. fwd_shared_kernel: one CTA (4 warps, 64 MMA rows = Q queries x h
 *      heads) per accepted group: the group's Q rows once in shared memory,
 *      then per union tile K/V (double-buffered cp.async), S = Q K^T masked
 *      to each query's keys, online softmax, O += P V; o and lse written as
 *      the merge would (empty row: o = 0, lse = -inf).
 * Index maps: row r = ((b*S) + t)*G + g; group grp = (b*G + g)*NQ + t / Q,
 * NQ = ceil(S / Q), Q = 64 / h (h in {2, 4, 8, 16}: Q <= 32 lanes).
 * Deterministic: fixed tile order, no atomics.
 */
#ifndef NSA_CUDA_FWD_SHARED_H
#define NSA_CUDA_FWD_SHARED_H

#include "bwd_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  int on;          /* groups may take the shared path */
  int Q;           /* queries per group (64 / h) */
  int64_t NQ;      /* groups per (b, g) */
  int64_t ngroups; /* B * G * NQ */
  size_t skip, gcnt, gtiles, gmask, taken, end; /* arena offsets: skip [rows] u8, gcnt [ngroups] i32,
                                                   gtiles [ngroups][NSA_FWD_SHARED_UMAX] i32,
                                                   gmask [ngroups][NSA_FWD_SHARED_UMAX][Q] u64,
                                                   taken: u64 queries accepted; end = bytes used */
} nsa_cuda_fwd_shared_layout_t;

#define NSA_FWD_SHARED_UMAX 32 /* union tiles per group at most */

/* Whether the shared path can run for this request (bf16/f16 key-centric
 * request, h in {2, 4, 8, 16}, Dk + Dv <= 256 (Dk in {64, 128, 192}, Dv in
 * {64, 128}), NSA_CUDA_FWD_SHARED != 0), and its workspace
 * after byte offset `base`. */
int nsa_cuda_fwd_shared_plan(const nsa_cuda_attn_t *a, nsa_dtype_t dt, size_t base,
                             nsa_cuda_fwd_shared_layout_t *L);

/* Step 1: chooses the groups (before the key-centric inversion). */
cudaError_t nsa_cuda_launch_fwd_shared_select(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, void *ws,
                                              const nsa_cuda_fwd_shared_layout_t *L, cudaStream_t st);

/* Step 3: the accepted groups' attention (after the key-centric merge). */
cudaError_t nsa_cuda_launch_fwd_shared(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                       void *ws, const nsa_cuda_fwd_shared_layout_t *L, cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif /* NSA_CUDA_FWD_SHARED_H */
