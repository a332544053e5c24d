/*
 * fwd_rows.h — row-block forward (fwd_rows.cu): the v2 forward for h = 16
 * query heads per KV head without per-tile partials.
 *
 * The key-centric forward (fwd_key.h) pays a partial per (row, tile),
 * h * (2 Dv + 4) bytes written and read back: at h = 16 that traffic alone is
 * about half of the public kernel's time on random selections
 * (docs/PERF.md). The query-centric kernels pull every selected tile from L2
 * once per row. This kernel sits between: one CTA per block of kRows
 * rows of one (b, g) streams the *union* of the block's selected
 * 64-key tiles through shared memory once (a producer warp, TMA boxes,
 * mbarriers), and each of the kRows consumer warps owns one row (its 16
 * heads are one m16 MMA tile) and computes only the tiles its row selected,
 * with the online softmax in registers: no partials, no merge, no inversion,
 * no workspace beyond the plan and the row order (4 bytes per row).
 *
 * The cost of a CTA follows the size of its union, so which rows share a
 * block matters: the row grouping (nsa_cuda_fwd_rows_group) deals each
 * window of 8 (or 16) blocks' rows greedily by shared tiles first (ord).
 *
 * Index maps: row r = ((b*S) + t)*G + g; CTA c -> g = c % G, row block
 * tb = NB - 1 - (c / G) % NB (the last, widest blocks first), b = c / (G*NB),
 * positions p = tb*kRows + w for consumer warp w, row t = ord[(b*G + g)*S +
 * p] (ord NULL: t = p). When the K/V of all (b, g)
 * exceed L2 (gmaj): tb = NB - 1 - c % NB, g = (c / NB) % G, b = c / (NB*G).
 * Deterministic: each row's tiles are visited in ascending order by one warp.
 */
#ifndef NSA_CUDA_FWD_ROWS_H
#define NSA_CUDA_FWD_ROWS_H

#include <cuda.h>

#include "bwd_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What the launch needs: the TMA tensor maps of K and V (encoded on the
 * host for this request's pointers and strides) and the rows per CTA. */
typedef struct {
  CUtensorMap k, v;
  int rows; /* forward: 11 (default) or, for A/B (NSA_CUDA_FWD_ROWS_R), 15 at Dk = 128 / 9 at Dk = 192; backward dq: 10 */
  int gmaj; /* 1: row blocks of one (b, g) after another (K/V past L2), 0: g fastest */
  int group; /* forward: row blocks per window of the row grouping: 8 or 16 (group_rows_kernel, a warp per
               * window; 8 by default up to 512 tiles per (b, g)), 32, 64 or 128 (fwd_rows_group_wide.cu, a
               * CTA per window; 64 by default past 512 tiles); NSA_CUDA_FWD_ROWS_GROUP=N picks one where it
               * fits; 0 = rows in t order */
  int early; /* forward with the grouping: it also writes each row block's union of tiles, so the
              * kernel's producer streams before the rows are listed (NSA_CUDA_FWD_ROWS_EARLY=0: off) */
  int persist; /* forward, with early, Dk = 128 and 11 rows (the default): the persistent kernel
                * (fwd_rows_persist.cu), 1 = one CTA per SM, N > 1 = N CTAs; 0 = a CTA per row block
                * (NSA_CUDA_FWD_ROWS_PERSIST=N overrides) */
  int order; /* forward, persistent: each row block's tiles streamed in the step order of
              * fwd_rows_order.cu (rows spread over the ring) instead of ascending; same outputs bitwise
              * (NSA_CUDA_FWD_ROWS_ORDER=0|1 overrides) */
} nsa_cuda_fwd_rows_t;

/* 1 when this request can run on the row-block kernel: bf16/f16, h = 16,
 * Dk = 128 or 192 (three 64-dim K boxes per tile) and Dv = 128, q/k/v rows
 * 16-byte aligned (`aligned`), block-index
 * selections with at most 32 tiles per row (n * tiles per block) and n <= 32,
 * at most 8192 tiles per (b, g), a compute-capability >= 9.0 device, and K /
 * V strides a TMA tensor map accepts; fills *M. mode: 0 never, 1 wherever
 * it can run, -1 auto (the same, docs/PERF.md has the A/B);
 * NSA_CUDA_FWD_ROWS=0|1 overrides mode per request. */
int nsa_cuda_fwd_rows_plan(const nsa_cuda_attn_t *a, nsa_dtype_t dt, int sel_kind, int32_t block_size,
                           int aligned, int mode, nsa_cuda_fwd_rows_t *M);

/* Workspace of the row grouping: B * G * S int32 (the row order) and, with
 * M->early, 16-byte aligned after it, each row block's union of tiles
 * (B * G * ceil(S / rows) blocks of ceil(ceil(Skv / 64) / 32) u32 words:
 * at most 4 bytes per row, as the grouping takes at most 1024 tiles) and
 * the persistent kernel's item counter (16 bytes), then with M->order each
 * row block's step order (rows * 32 u16 per block: 64 bytes per row); 0
 * when M->group is 0. */
size_t nsa_cuda_fwd_rows_ws_bytes(const nsa_cuda_attn_t *a, const nsa_cuda_fwd_rows_t *M);

/* The row grouping alone (the first launch of nsa_cuda_launch_fwd_rows with
 * ord; uses a->B, S, G, Skv): for each (b, g), windows of `blocks` (8 or
 * 16; or 32, 64 or 128 of at most 1408 positions in all, built 16 blocks
 * at a time, fwd_rows_group_wide.cu) row blocks of `rows` positions (rows
 * <= 16, at most 1024 tiles per (b, g)), each window's rows dealt greedily
 * into its blocks, rows sharing tiles together: ord[(b*G + g)*S +
 * position] = t, a permutation of each window's t. ubits, unless NULL: [B * G][ceil(S / rows)][nw] u32, nw =
 * ceil(ceil(Skv / 64) / 32), bit k of block p's words = tile k is listed
 * by a row at positions p * rows .. p * rows + rows - 1 (the union the
 * kernel streams). A row's tiles come from sel when it is not NULL (its
 * a->n slots, valid and clipped by the planner's rules, sel_slot.cuh: so
 * the grouping needs no plan and can run beside the planner), else from
 * plan's spans (tests: hand-made spans). For selections of at most 32
 * tiles per row (all the row-block forward takes) both give the same ord
 * and ubits. cudaErrorInvalidValue for sizes it does not take. */
cudaError_t nsa_cuda_fwd_rows_group(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_selview_t *sel,
                                    int rows, int blocks, int32_t *ord, unsigned *ubits, cudaStream_t st);

/* The persistent forward's step order (fwd_rows_order.cu; what M->order
 * runs before it): for each row block of `rows` = 11 positions (ord, the
 * grouping's) with union ubits (its words), sord[(b*G + g)*ceil(S/rows) +
 * block][v] = the tile the block streams at step v (u16, rows * 32 entries
 * per block, the union's size used): each row's tiles stay ascending, the
 * rows spread over the ring (depth order: a tile's depth is 0 when none of
 * its rows has a later tile, else 1 + the largest depth of its rows' next
 * tiles; depth descending, then tile ascending). A row's tiles come from
 * plan's spans. At most 1024 tiles per (b, g); cudaErrorInvalidValue
 * otherwise. */
cudaError_t nsa_cuda_fwd_rows_step_order(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, int rows,
                                         const int32_t *ord, const unsigned *ubits, unsigned short *sord,
                                         cudaStream_t st);

/* Enqueues the kernel on `st` (o and lse from the plan; no host
 * synchronization). ord: nsa_cuda_fwd_rows_ws_bytes of workspace for the
 * row grouping, which then runs first (from sel's slots when sel is not
 * NULL, else from the plan's spans); NULL: rows in t order. Either way
 * the outputs are bitwise the same (each row's tiles are visited in
 * ascending order by one warp); the grouping only changes which rows share
 * a CTA's tile loads. plan_ready, unless NULL, is waited for on st after
 * the grouping and before the kernel: the caller's planner ran on another
 * stream beside the grouping (which then must read sel). */
cudaError_t nsa_cuda_launch_fwd_rows(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                     const nsa_cuda_fwd_rows_t *M, int32_t *ord, const nsa_cuda_selview_t *sel,
                                     cudaEvent_t plan_ready, cudaStream_t st);

/* The backward's dq on the same kernel (fwd_rows.cu, kBwd): a CTA streams
 * the union of 10 rows' tiles; warp w computes row t0 + w's dq = scale *
 * sum over its tiles of dS K (S = Q K^T, P = exp(scale S - lse) on the row's
 * keys, dP = dO V^T, dS = P (dP - delta)): no partials, no row batches.
 * Same conditions as the forward's; NSA_CUDA_BWD_ROWS=0|1 overrides.
 * a: the backward's view. With delta_out == NULL the kernel reads the
 * preprocess's a->delta / a->lsec; else (nsa_cuda_bwd_pre_vec_ok) it is the
 * preprocess: each warp computes its row's delta = rowsum(dO o) and lse
 * copy and writes them to delta_out / lsec_out ([rows * 16], for dk/dv).
 * H100, T = 16k h = 16: the preprocess kernel took ~0.19 ms of the backward.
 * With a->ds != NULL (bwd_request.cu, after dk/dv) it is the dq from dS
 * instead: dQ += dS K only, dS read from a->ds (the wgmma dk/dv kernel's
 * store, bwd_internal.h), for the rows of the batch [a->ds_row0,
 * a->ds_row1) only; delta_out / lsec_out must then be NULL. */
int nsa_cuda_bwd_rows_plan(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int sel_kind, int32_t block_size, int aligned,
                           nsa_cuda_fwd_rows_t *M);
cudaError_t nsa_cuda_launch_bwd_dq_rows(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                        const nsa_cuda_fwd_rows_t *M, float *delta_out, float *lsec_out,
                                        cudaStream_t st);

/* The TMA tensor map of Q or dO ([B][S][H][D], strides st = {b, s, head}
 * in elements, the last dimension contiguous) with box {64 dims, `heads`
 * heads, 1 row, 1} and 128-byte swizzle: one row's `heads` consecutive
 * heads, one 64-dim half at a time (the wgmma dk/dv gather,
 * bwd_dkdv_wgmma.cu). 0 when the strides or base do not suit TMA or the
 * driver lacks the encoder. */
int nsa_cuda_tma_heads_map(CUtensorMap *m, nsa_dtype_t dt, const void *base, const int64_t *st, int64_t B, int64_t S,
                           int64_t H, int64_t D, int heads);

#ifdef __cplusplus
}
#endif
#endif /* NSA_CUDA_FWD_ROWS_H */
