/*
 * cuda_internal.h — shared between the .cu files of the CUDA backend only.
 *
 * Every launcher here is extern "C", takes a cudaStream_t, enqueues work and
 * returns a cudaError_t from the launch (no host synchronization).
 */
#ifndef NSA_CUDA_INTERNAL_H
#define NSA_CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include <stdint.h>

#include "nsa/sel_attn.h"
#include "nsa/sel_attn_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Length buckets of the packed path (packed.cu): bucket b holds the rows of
 * length L > 0 with 16 << (b-1) < L <= 16 << b (b = 0: L <= 16); 28 buckets
 * cover every L < 2^31. */
#define NSA_CUDA_PK_NB 28

/* Planner summary as the device writes it (integer atomics only, so the
 * values are deterministic). Lives in the workspace; copied to pinned host
 * memory only when the host needs it. */
typedef struct {
  long long invalid;  /* invalid selection entries */
  long long total;    /* sum of row lengths */
  int max_len;
  int pad_;
  long long hist[NSA_LEN_HIST_BUCKETS];
  /* rows per packed-path bucket; written by nsa_cuda_launch_pack_hist only
   * (requests that may take the packed path), zero otherwise */
  long long pk_cnt[NSA_CUDA_PK_NB];
} nsa_cuda_summary_t;

/* Strided view of a selection tensor (device pointer). */
typedef struct {
  const int32_t *data;
  int kind;            /* NSA_SEL_BLOCK_INDICES / NSA_SEL_RANGES */
  int32_t block_size;
  int64_t st[5];       /* strides in elements: b, t, g, slot, (pair) */
} nsa_cuda_selview_t;

/* The view of a request's selection (its tensor's data pointer and strides). */
static inline nsa_cuda_selview_t nsa_cuda_selview_of(const nsa_selection_t *sel) {
  nsa_cuda_selview_t v = {(const int32_t *)sel->t.data, (int)sel->kind, sel->block_size, {0, 0, 0, 0, 0}};
  for (int i = 0; i < sel->t.ndim && i < 5; i++) v.st[i] = sel->t.stride[i];
  return v;
}

/* ---- plan_v2.cu ---- */

/* Bytes of CUB scan temp storage for `rows` rows. */
size_t nsa_cuda_plan_v2_temp_bytes(int64_t rows);

/* Row planner: validates, clips, sorts and merges each row's spans into the
 * bound plan; summary accumulated on the device; with need_row_off, row_off
 * by an exclusive scan (CUB). Only the packed path reads row_off (packed.cu):
 * requests that cannot take it skip the scan (two launches, ~7 µs on an
 * H200), and their plan's row_off is left unset. `summary` must not be NULL;
 * len64 is scratch [rows+1] i64; temp is the scan temp storage of
 * nsa_cuda_plan_v2_temp_bytes bytes. */
cudaError_t nsa_cuda_launch_plan_v2(const nsa_cuda_selview_t *sel, int64_t B, int64_t S,
                                    int64_t Skv, int64_t G, int64_t n, nsa_plan_t *plan,
                                    nsa_cuda_summary_t *summary, int64_t *len64, void *temp,
                                    size_t temp_bytes, int need_row_off, cudaStream_t st);

/* ---- plan_group.cu ---- */

/* A piece of a group's key union: tokens [start, end) at union positions
 * [off, off + end - start); bit q of mask set when query q of the group has
 * these keys. Pieces of a group are sorted, disjoint, non-empty. */
typedef struct {
  int32_t start, end, off, mask;
} nsa_cuda_piece_t;

/* Query packing: P consecutive queries of one (b, g) share the 16 MMA rows
 * when h < 16. Returns P (1 when h >= 16). */
int nsa_cuda_pack_queries(int64_t h);
/* Number of groups and the max pieces a group can have. */
int64_t nsa_cuda_num_groups(int64_t B, int64_t S, int64_t G, int P);
int64_t nsa_cuda_max_pieces(int64_t n, int P);

/* Group planner: one warp per group of P queries; a sweep over the queries'
 * span boundaries writes the refined union (pieces[grp][max_pieces]) and
 * gcount[grp] = {npieces, union length}. */
cudaError_t nsa_cuda_launch_plan_group(const nsa_plan_t *plan, int64_t B, int64_t S, int64_t G,
                                       int P, nsa_cuda_piece_t *pieces, int2 *gcount,
                                       cudaStream_t st);

/* ---- packed.cu ---- */

/* Packed path (index maps in packed.cu): rows in length buckets, each row's
 * keys gathered into a padded slot [slot_r, slot_r + Lpad_b) of the K/V
 * workspace buffers kp [slots][Dk] / vp [slots][Dv].
 *
 * nsa_cuda_launch_pack_hist: counts the plan's rows per bucket into
 * summary->pk_cnt (device); launched before the request's summary copy.
 * nsa_cuda_pack_slots: total slots sum_b cnt_b * (16 << b) of host counts.
 * nsa_cuda_pack_scratch_bytes: device scratch nsa_cuda_launch_pack needs.
 * nsa_cuda_launch_pack: from the plan and the device counts (no host read):
 * orders rows by (bucket, row), writes the synthetic plan pplan (n = 1, row r
 * = one span [slot_r, slot_r + row_len[r]) of slot positions, row_off copied)
 * and gathers K and V into their slots. kp / vp hold `slots` keys (the
 * host's nsa_cuda_pack_slots of the same counts) and are 16-byte aligned. */
cudaError_t nsa_cuda_launch_pack_hist(const nsa_plan_t *plan, nsa_cuda_summary_t *summary,
                                      cudaStream_t st);
long long nsa_cuda_pack_slots(const long long *cnt /* [NSA_CUDA_PK_NB] */);
size_t nsa_cuda_pack_scratch_bytes(int64_t rows);
cudaError_t nsa_cuda_launch_pack(const nsa_plan_t *plan, const nsa_cuda_summary_t *summary,
                                 int64_t B, int64_t S, int64_t G, const nsa_tensor_t *k,
                                 const nsa_tensor_t *v, int64_t Dk, int64_t Dv, void *scratch,
                                 size_t scratch_bytes, void *kp, void *vp, int64_t slots,
                                 nsa_plan_t *pplan, cudaStream_t st);

/* ---- varlen_fwd*.cu ---- */

/* Everything the attention kernels need. K/V are addressed as
 * k[b*ks[0] + tok*ks[1] + g*ks[2] + d*ks[3]]. */
typedef struct {
  const void *q, *k, *v;
  void *o;
  float *lse;                 /* may be NULL */
  int64_t qs[4], ks[4], vs[4], os[4], ls[3];
  int64_t B, S, Skv, G, h, Dk, Dv, n;
  float scale;
  const long long *invalid;   /* device; kernels exit when *invalid > 0 (may be NULL) */
  int qt_max;                 /* query-tile mode of nsa_cuda_qtiles (0 auto, 1, 2; 3 = one tile on the generalized kernel) */
  int stages_max;             /* K/V pipeline stages allowed (2 or 3) */
  int l2hint;                 /* 1: L2 evict_last for K/V, evict_first for Q */
} nsa_cuda_attn_t;

/* Query tiles (16 MMA rows each) per tensor-core CTA: 2 only where the f32
 * accumulators fit in registers (Dv <= 128) and the group (P * tiles queries)
 * fits the 32 lanes of the group planner's warp. qt_mode: 0 auto, 1 or 2
 * forced (NSA_CUDA_QTILES, benchmarks). The group planner runs with
 * P * nsa_cuda_qtiles(...) queries per group. */
static inline int nsa_cuda_qtiles(int64_t Dk, int64_t Dv, int P, int qt_mode) {
  if (Dv > 128 || 2 * P > 32 || qt_mode == 1 || qt_mode == 3) return 1;
  if (qt_mode == 2) return 2;
  /* auto: Dk + Dv <= 256 keeps 3 CTAs per SM with one tile (two tiles need
   * ~214 registers: 2 CTAs per SM); measured faster on random selections and
   * level on correlated ones. Larger Dk is at 2 CTAs per SM either way, and
   * there two tiles halve the K/V traffic of correlated selections. */
  return Dk + Dv <= 256 ? 1 : 2;
}

/* Tensor-core kernel (bf16/f16, Dk/Dv in {64,128,192,256}, 16-byte aligned
 * rows). Returns cudaErrorInvalidValue when the combination is not built. */
int nsa_cuda_mma_supported(nsa_dtype_t dt, int64_t Dk, int64_t Dv);
cudaError_t nsa_cuda_launch_fwd_mma(const nsa_cuda_attn_t *a, nsa_dtype_t dt, int P,
                                    const nsa_cuda_piece_t *pieces, const int2 *gcount,
                                    int64_t max_pieces, cudaStream_t st);
cudaError_t nsa_cuda_launch_fwd_mma_bf16(const nsa_cuda_attn_t *a, int P,
                                         const nsa_cuda_piece_t *pieces, const int2 *gcount,
                                         int64_t max_pieces, cudaStream_t st);
cudaError_t nsa_cuda_launch_fwd_mma_f16(const nsa_cuda_attn_t *a, int P,
                                        const nsa_cuda_piece_t *pieces, const int2 *gcount,
                                        int64_t max_pieces, cudaStream_t st);

/* Generic kernel: any dtype, any strides, Dk, Dv <= NSA_CUDA_SIMPLE_MAX_D; one
 * warp per (row, head), reading the row plan directly. The f32 parity path. */
#define NSA_CUDA_SIMPLE_MAX_D 256
cudaError_t nsa_cuda_launch_fwd_simple(const nsa_cuda_attn_t *a, nsa_dtype_t dt,
                                       const nsa_plan_t *plan, cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif /* NSA_CUDA_INTERNAL_H */
