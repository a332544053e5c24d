// bwd_dkdv.cuh — what the two dk/dv kernels share: the inverted plan as
// the kernels see it (Inv), CTA item lookup, and the per-key result store
// (final dk/dv, f32 segment partial, or row-batch accumulator). Used by
// bwd_dkdv.cu (mma.sync, generic) and bwd_dkdv_wgmma.cu (sm_90a wgmma).
#pragma once
#include "bwd_common.cuh"

namespace nsa_bwd {

struct Inv {
  const int32_t *tile_off, *vals, *item_off, *part_off;
  const unsigned long long *masks;  // per pair: the row's keys inside the tile
  const int32_t *pidx;              // per pair: its index in row order (dq partial slot)
  const unsigned char *skip;        // per row (may be null): dq comes from the shared-tile kernel (bwd_shared.h)
  float *acc;  // row batches (bwd_request.cu): f32 dk/dv accumulators [ntiles][slot], else null
  int64_t NT, ntiles;
  int seg_rows;
};

// CTA item -> tile x, segment and the tile's segment count.
__device__ __forceinline__ bool find_item(const Inv &iv, int64_t it, int64_t *x, int *seg, int *nseg) {
  if (!inv_find_item(iv.item_off, iv.ntiles, it, x, seg)) return false;
  *nseg = iv.item_off[*x + 1] - iv.item_off[*x];
  return true;
}

// Writes one key's results: final or f32 segment partial. Final values go to
// dk/dv (T, dk scaled) or, when the request runs in row batches, are added
// to the tile's f32 accumulator accx (unscaled; acc_store_kernel writes dk/dv
// after the last batch). Only one CTA (or the reduction) finalizes a tile per
// batch and batches run in stream order, so the += is race-free and ordered.
template <typename T>
__device__ __forceinline__ void put(const nsa_cuda_bwd_t &a, bool final_, float *part, float *accx, int64_t b,
                                    int64_t g, int tok, int kk, bool isk, int col, float val) {
  if (final_ && accx == nullptr) {
    if (tok >= a.Skv) return;
    if (isk)
      st(reinterpret_cast<T *>(a.dk) + b * a.dks[0] + (int64_t)tok * a.dks[1] + g * a.dks[2] + col * a.dks[3],
         val * a.scale);
    else
      st(reinterpret_cast<T *>(a.dv) + b * a.dvs[0] + (int64_t)tok * a.dvs[1] + g * a.dvs[2] + col * a.dvs[3],
         val);
  } else {
    float *dst = final_ ? accx : part;
    const int64_t e = isk ? (int64_t)kk * a.Dk + col : (int64_t)NSA_BWD_TILE * a.Dk + kk * a.Dv + col;
    if (final_) dst[e] += val;
    else dst[e] = val;
  }
}

// Row-batch mode, a tile's final values: adds N column pairs (c, c + 1) at
// row + 8i, i < N (a thread's mma / wgmma fragment columns of one key row)
// to the f32 accumulator. All N loads are issued before the first store:
// put()'s element-wise += paid a full memory round trip per element (each
// store may alias the next load), ~0.9 ms per extra row batch at T = 64k,
// h = 8 on an H200 (docs/PERF.md). val(i, e) is column 8i + e's value.
template <int N, typename F>
__device__ __forceinline__ void acc_add_pairs(float *row, F val) {
  float2 o[N];
#pragma unroll
  for (int i = 0; i < N; i++) o[i] = *reinterpret_cast<const float2 *>(row + 8 * i);
#pragma unroll
  for (int i = 0; i < N; i++) {
    o[i].x += val(i, 0);
    o[i].y += val(i, 1);
    *reinterpret_cast<float2 *>(row + 8 * i) = o[i];
  }
}

__device__ __forceinline__ float *acc_of(const nsa_cuda_bwd_t &a, const Inv &iv, int64_t x) {
  return iv.acc == nullptr ? nullptr : iv.acc + x * NSA_BWD_TILE * (a.Dk + a.Dv);
}

}  // namespace nsa_bwd

// bwd_dkdv_wgmma.cu (sm_90a): the launch (same items, partials and dq
// partials as the mma.sync kernel; nsa_cuda_dkdv_wgmma_ok in bwd_internal.h).
extern "C" cudaError_t nsa_cuda_launch_dkdv_wgmma(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const nsa_bwd::Inv *iv,
                                                  float *part, float *dqp, int64_t grid, cudaStream_t st);
