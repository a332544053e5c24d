/*
 * bwd_shared.h — dq of the query groups whose queries share their key tiles
 * (bwd_shared_dq.cu), the backward's side of fwd_shared.h.
 *
 * The key-centric dq (bwd_dkdv.cu) writes an f32 partial of h * Dk * 4
 * bytes per (row, tile) and dq_reduce reads them back: at h = 8 / 16 that
 * traffic is most of the backward (docs/PERF.md). For the groups the
 * forward's select kernel accepts (fwd_shared.h: Q = 64 / h consecutive
 * queries whose union of 64-key tiles is small), dq is computed on chip
 * instead, FlashAttention-2 style with the forward's lse (no online
 * softmax): per union tile u,
 *   dP = dO V_u^T, S = Q K_u^T (keys outside the query's set: P = 0),
 *   P = exp(scale S - lse), dS = P (dP - delta), dQ += dS K_u,
 * and dq = scale * dQ. The accepted rows keep their pairs in the inversion
 * (dk/dv need every row) but the dk/dv kernel skips their dq partials and
 * dq_reduce skips the rows. Per request (bwd_request.cu):
 *   select + gate (the forward's kernels, same skip / gcnt / gtiles / gmask)
 *   → bwd_shared_dq_kernel (accepted groups; exits when the gate dropped all)
 *   → per row batch: inversion (all rows), dk/dv (+ dq partials of the other
 *     rows), dq_reduce (other rows).
 * Index maps as fwd_shared.h: row r = ((b*S) + t)*G + g, group grp =
 * (b*G + g)*NQ + t / Q; MMA row m = (query m / h, head m % h).
 * Deterministic: fixed tile order, no atomics.
 */
#ifndef NSA_CUDA_BWD_SHARED_H
#define NSA_CUDA_BWD_SHARED_H

#include "fwd_shared.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Whether the shared dq kernel is built for (dt, h, Dk, Dv): bf16/f16,
 * h in {2, 4, 8, 16}, Dk and Dv in {64, 128}; and NSA_CUDA_BWD_SHARED != 0
 * (A/B runs and tests turn it off). */
int nsa_cuda_bwd_shared_ok(nsa_dtype_t dt, int64_t h, int64_t Dk, int64_t Dv);

/* The accepted groups' dq (after nsa_cuda_launch_fwd_shared_select on the
 * same stream; L from nsa_cuda_fwd_shared_plan). */
cudaError_t nsa_cuda_launch_bwd_shared_dq(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const void *ws,
                                          const nsa_cuda_fwd_shared_layout_t *L, cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif /* NSA_CUDA_BWD_SHARED_H */
