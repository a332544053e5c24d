/*
 * bwd_internal.h — the CUDA backward's internal interface (kernels/cuda/bwd_*.cu).
 *
 * Flow of nsa_cuda_sel_bwd (bwd_request.cu):
 *   plan (the forward's planners, v2 device / v1 host)
 *   → preprocess: delta[r*h + j] = rowsum(do ∘ o) and lse copied to lsec[r*h + j]
 *   → dq, query-centric (where the key-centric dq below does not run):
 *     each (row, head) walks its own key set (bwd_dq.cu)
 *   → per row batch: invert the plan: per 64-key tile of each (b, g), the CSR
 *     list of the batch's rows whose key set touches the tile, rows ascending
 *     (bwd_invert_plan.cu)
 *   → dk/dv, key-centric: one CTA per (tile, segment of its row list) sums over
 *     the listed rows in list order; tiles with several segments write f32
 *     partials that a second kernel adds up in segment order (bwd_dkdv.cu);
 *     with the key-centric dq the same kernel writes per-(pair, head) dq
 *     partials that dq_reduce sums per row. Several batches (to bound the dq
 *     partials) add dk/dv into an f32 accumulator written out at the end.
 *     Rows of query groups that share their key tiles (the forward's select,
 *     fwd_shared.h) get their dq on chip instead (bwd_shared.h): the dk/dv
 *     kernel and dq_reduce skip them.
 * No float atomics anywhere: two runs give bitwise identical dq, dk, dv.
 *
 * Index maps:
 *   row   r = ((b*S) + t)*G + g                      (sel_attn.h)
 *   tile  x = (b*G + g)*NT + kt, NT = ceil(Skv/64), keys [kt*64, kt*64+64)
 */
#ifndef NSA_CUDA_BWD_INTERNAL_H
#define NSA_CUDA_BWD_INTERNAL_H

#include "cuda_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NSA_BWD_TILE 64 /* keys per key tile of the inverted plan */

/* Everything the backward kernels read. Strides in elements; K/V addressed
 * k[b*ks[0] + tok*ks[1] + g*ks[2] + d*ks[3]]. */
typedef struct {
  const void *q, *k, *v, *o, *dout;
  const float *lse;
  void *dq, *dk, *dv;
  int64_t qs[4], ks[4], vs[4], os[4], dos[4], ls[3], dqs[4], dks[4], dvs[4];
  int64_t B, S, Skv, G, h, Dk, Dv, n;
  float scale;
  const long long *invalid; /* device; > 0: kernels write NaN, read nothing (sync=0 only) */
  const float *delta;       /* [rows*h] rowsum(do∘o), from the preprocess */
  const float *lsec;        /* [rows*h] lse, contiguous copy */
  /* The row-block dq from dS (bwd_request.cu choose_ds; h = 16), else all
   * zero: ds holds, per pair p of the inversion (row order), dS of the
   * row's 16 heads x the tile's 64 keys in the input dtype as the m16n8k16
   * A fragments of dq += dS K: uint4 ((p*4 + kk)*32 + lane) = lane's a0..a3
   * of k-step kk (keys 16kk .. 16kk + 15), 2 KB per pair. The wgmma dk/dv
   * kernel writes it; the dq reads it. Per row batch [ds_row0, ds_row1)
   * (the inversion's rows): row r's pairs start at ds_pair_off[r - ds_row0]
   * (the inversion's pair_off), and the dq writes only the batch's rows. */
  void *ds;
  const int32_t *ds_pair_off;
  int64_t ds_row0, ds_row1;
} nsa_cuda_bwd_t;

/* ---- bwd_preprocess.cu ---- */
cudaError_t nsa_cuda_launch_bwd_preprocess(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, float *delta,
                                           float *lsec, cudaStream_t st);
/* 1 when o and dO have the layout of the 16-byte preprocess (unit inner
 * strides, 16-byte aligned rows, Dv in {64, 128, 256}; NSA_BWD_PRE_GENERIC
 * unset): then the row-block dq may compute delta and the lse copy itself
 * (nsa_cuda_launch_bwd_dq_rows), bitwise as the preprocess would. */
int nsa_cuda_bwd_pre_vec_ok(const nsa_cuda_bwd_t *a);

/* ---- bwd_invert_plan.cu ---- */

/* Sizes of the inversion for `rows` rows, `cap` pair capacity and `ntiles`
 * tiles (B*G*NT): byte offsets inside one workspace block. */
typedef struct {
  size_t cnt, pair_off, keys_in, vals_in, keys_out, vals_out, idx_in, rows_out, masks, masks_in, tile_off, nseg, item_off,
      part_off, temp, temp_bytes, total;
} nsa_cuda_inv_layout_t;
size_t nsa_cuda_inv_layout(int64_t rows, int64_t cap, int64_t ntiles, nsa_cuda_inv_layout_t *L);

/* Per-row bound on the distinct 64-key tiles a row's merged spans touch, for
 * a block-id selection of block size bs and n slots (capped at NT). */
int64_t nsa_cuda_inv_row_bound_blocks(int64_t n, int32_t bs, int64_t NT);

/* Builds the inverted plan of the plan's rows [row0, row0 + rows) into the
 * workspace `ws` laid out by L (for `rows` rows and pair capacity `cap`):
 *   tile_off [ntiles+1] i32: rows of tile x are vals_out[tile_off[x] .. tile_off[x+1])
 *   rows_out [cap]      i32: the plan's row ids, ascending within each tile
 *   vals_out [cap]      i32: the pair's index p in row order (pair_off[r - row0] <= p < pair_off[r - row0 + 1])
 *   pair_off [rows+1]   i32: the row-ordered pairs of each row of the batch
 *   masks    [cap]      u64: bit k = key tile*64 + k is in that row's key set
 *   item_off [ntiles+1] i32: CTA items (tile, segment) of tile x start at item_off[x]
 *   part_off [ntiles+1] i32: f32 partial slots of tile x (0 when it has one segment)
 * seg_rows: rows per segment. skip (may be NULL): rows r with skip[r] != 0
 * get no pairs (the forward's shared-tile groups, fwd_shared.h). Used whole (row0 = 0, all rows) or per row batch
 * (the key-centric forward, fwd_key.cu; the batched key-centric dq). No host
 * synchronization. */
cudaError_t nsa_cuda_launch_invert_rows(const nsa_plan_t *plan, int64_t B, int64_t S, int64_t G,
                                        int64_t NT, int64_t row0, int64_t rows, int64_t cap,
                                        int seg_rows, const unsigned char *skip, void *ws,
                                        const nsa_cuda_inv_layout_t *L, cudaStream_t st);

/* ---- bwd_dq.cu ---- */

/* Generic dq: any dtype, any strides, Dk, Dv <= 256; one warp per (row, head). */
cudaError_t nsa_cuda_launch_bwd_dq_simple(const nsa_cuda_bwd_t *a, nsa_dtype_t dt,
                                          const nsa_plan_t *plan, cudaStream_t st);
/* Tensor-core dq (bf16/f16, Dk/Dv in {64,128,192,256}, 16-byte aligned rows of
 * q, k, v, dout) over the forward's group plan (P queries per CTA). */
cudaError_t nsa_cuda_launch_bwd_dq_mma(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int P,
                                       const nsa_cuda_piece_t *pieces, const int2 *gcount,
                                       int64_t max_pieces, cudaStream_t st);

/* ---- bwd_dkdv.cu ---- */

/* Key-centric dk/dv over the inverted plan. `items_bound` is the grid (CTAs
 * beyond the real item count exit); `part` holds part_slots f32 partials of
 * 64 x (Dk + Dv). use_mma selects the tensor-core kernel (bf16/f16, built
 * Dk/Dv, aligned rows) over the generic one.
 * Row batches (the inversion of rows [row0, row0 + rows) only): acc != NULL
 * is an f32 accumulator [B*G*NT][64*(Dk+Dv)] (key kk's dk at kk*Dk + d, its
 * dv at 64*Dk + kk*Dv + d, zeroed before the first batch) that each batch
 * adds its per-tile sums to, in stream order; nsa_cuda_launch_bwd_acc_store
 * then writes dk (scaled) and dv from it. acc == NULL writes dk/dv directly
 * (one inversion of all rows). skip (may be NULL; used only with dqp): rows
 * r with skip[r] != 0 get no dq partials (their dq comes from the shared-tile
 * kernel, bwd_shared.h); their dk/dv terms are summed as every row's. */
cudaError_t nsa_cuda_launch_bwd_dkdv(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int use_mma, const void *inv_ws,
                                     const nsa_cuda_inv_layout_t *L, int64_t NT, int seg_rows,
                                     int64_t items_bound, float *part, float *dqp, float *acc,
                                     const unsigned char *skip, cudaStream_t st);
cudaError_t nsa_cuda_launch_bwd_acc_store(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int64_t NT,
                                          const float *acc, cudaStream_t st);

/* Whether the wgmma dk/dv kernel (bwd_dkdv_wgmma.cu: sm_90, bf16 / f16,
 * Dk = Dv = 128, 4 <= h <= 32) takes this request; the only one that
 * writes dS (nsa_cuda_bwd_t::ds). */
int nsa_cuda_dkdv_wgmma_ok(const nsa_cuda_bwd_t *a, nsa_dtype_t dt);

/* Key-centric dq: with dqp != NULL the tensor-core dk/dv kernel also
 * writes, per (pair p, head j), the f32 partial dqp[(p*h + j)*Dk + d] of dq
 * over the pair's 64-key tile (p local to the row batch the inversion was
 * built for); nsa_cuda_launch_bwd_dq_reduce then sums each row of the batch
 * [row0, row0 + rows) over its partials in pair order (deterministic),
 * except rows with skip[r] != 0 (skip may be NULL).
 * nsa_cuda_bwd_dq_key_ok says whether the tensor-core kernel of (dt, Dk, Dv)
 * supports it. */
int nsa_cuda_bwd_dq_key_ok(nsa_dtype_t dt, int64_t Dk, int64_t Dv);
cudaError_t nsa_cuda_launch_bwd_dq_reduce(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const void *inv_ws,
                                          const nsa_cuda_inv_layout_t *L, const float *dqp, int64_t row0,
                                          int64_t rows, const unsigned char *skip, cudaStream_t st);

/* ---- ctx.cu accessors for bwd_request.cu (added by helper cuda-bwd) ---- */
typedef struct {
  int device;
  cudaStream_t stream;
  nsa_cuda_summary_t *h_sum; /* pinned */
  cudaEvent_t ev0, ev1, ev2;
  cudaStream_t side;               /* the plan inversion's stream (bwd_request.cu) */
  cudaEvent_t fork_ev, join_ev, free_ev; /* no timing */
  int fatal;
} nsa_cuda_ctx_view_t;
void nsa_cuda_ctx_view(nsa_cuda_ctx_t *ctx, nsa_cuda_ctx_view_t *v);
/* arena_reserve + base pointer. */
int nsa_cuda_ctx_arena(nsa_cuda_ctx_t *ctx, size_t need, size_t keep, void **base, char *msg,
                       size_t msglen);
/* The forward's error mapping (sticky errors mark the context fatal). */
int nsa_cuda_ctx_fail(nsa_cuda_ctx_t *ctx, cudaError_t e, const char *what, char *msg, size_t msglen);
/* The forward's v1 host planner into a device plan buffer; fills *sum. */
int nsa_cuda_ctx_plan_v1(nsa_cuda_ctx_t *ctx, const nsa_selection_t *sel, const nsa_dims_t *d,
                         void *dplan_buf, nsa_cuda_summary_t *sum, char *msg, size_t msglen);

#ifdef __cplusplus
}
#endif
#endif /* NSA_CUDA_BWD_INTERNAL_H */
