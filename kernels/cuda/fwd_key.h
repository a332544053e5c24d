/*
 * fwd_key.h — key-block-centric forward (KERNELS.md loop order 2), fwd_key.cu.
 *
 * The query-centric tensor-core forward (varlen_fwd_mma*.cuh) pulls every
 * selected 64-key tile from L2 once per query group that selected it. Here the
 * plan is inverted first (bwd_invert_plan.cu: per 64-key tile of each (b, g),
 * the rows whose key set touches it, rows ascending), then:
 *   1. fwd_key_kernel: one CTA per (tile, segment of its row list) loads the
 *      tile's K/V once and runs it against every listed (row, head): per
 *      (pair p, head j) it writes the tile-local softmax partial
 *        po[(p*h + j)*Dv + d] = sum_k e^(s_k - m) v_k[d] / l
 *      (a convex combination of V rows, so it is stored in the input dtype:
 *      half the traffic of f32, rounding of the order of the output's own;
 *      NSA_CUDA_FWD_KEY_F32=1 keeps f32)
 *        pl[p*h + j]          = (m + log l) in log2 units of the scaled scores
 *      where p is the pair's index in row order (pair_off[r] <= p < pair_off[r+1]);
 *   2. fwd_key_merge_kernel: per (row, head) the log-sum-exp merge of its
 *      partials in pair order (deterministic, no atomics) → o, lse.
 * Groups of consecutive queries that select (nearly) the same tiles skip
 * both and run fwd_shared.h's on-chip kernel instead (chosen on the device
 * before the inversion; the inversion and the merge leave their rows out).
 * Each K/V tile crosses L2 → shared memory once per CTA item instead of once
 * per query that selected it; the price is the partials, (tiles per row) *
 * h * (2 Dv + 4) bytes per row written and read back once. Rows are
 * processed in batches (inversion, kernel, merge per batch, all on the
 * stream) so the partials of one batch stay within a fixed budget: the
 * workspace is bounded whatever T and h are.
 */
#ifndef NSA_CUDA_FWD_KEY_H
#define NSA_CUDA_FWD_KEY_H

#include "bwd_internal.h"
#include "fwd_shared.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  nsa_cuda_inv_layout_t il; /* the inversion of one row batch, at byte offset `inv` of the arena */
  int64_t batch_rows;       /* rows per batch: the partials of one batch fit the budget */
  int64_t cap;              /* bound on (row, tile) pairs of one batch */
  int64_t NT;               /* 64-key tiles per (b, g) */
  int64_t items_bound;      /* grid of fwd_key_kernel (CTAs past the real items exit) */
  int seg_rows;             /* rows per CTA item */
  int p16;                  /* o partials in the input dtype (default) instead of f32 */
  int stage;                /* 16-bit partials stored through shared memory (NSA_CUDA_FWD_KEY_STAGE=0: off) */
  size_t inv, part_o, part_l, end; /* arena byte offsets; end = total bytes used */
  nsa_cuda_fwd_shared_layout_t sh;  /* groups of queries sharing their tiles (fwd_shared.h); sh.on = 0: none */
} nsa_cuda_fwd_key_layout_t;

/* 1 when the key-centric kernel is built for (dt, Dk, Dv). */
int nsa_cuda_fwd_key_supported(nsa_dtype_t dt, int64_t Dk, int64_t Dv);

/* Whether the key-centric forward should run for this request, and its
 * workspace layout after byte offset `base`. mode: 0 never, 1 wherever
 * supported (tests, benchmarks), -1 auto (currently: wherever supported,
 * docs/PERF.md has the A/B). NSA_CUDA_FWD_KEY_BATCH_ROWS (tests) caps the
 * rows per batch.
 * Only block-index selections (their pair bound comes from n and the block
 * size without a host sync); `aligned` = q, k, v rows 16-byte aligned. */
int nsa_cuda_fwd_key_plan(const nsa_cuda_attn_t *a, nsa_dtype_t dt, int sel_kind, int32_t block_size,
                          int aligned, int mode, size_t base, nsa_cuda_fwd_key_layout_t *L);

/* Enqueues inversion, key-centric kernel and merge on `st`; `ws` is the arena
 * base the layout's offsets refer to. No host synchronization. */
cudaError_t nsa_cuda_launch_fwd_key(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                    void *ws, const nsa_cuda_fwd_key_layout_t *L, cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif /* NSA_CUDA_FWD_KEY_H */
