// fwd_rows.cuh — what the row-block kernels share (fwd_rows.cu: the
// per-block forward, the backward's dq and the row grouping;
// fwd_rows_persist.cu: the persistent forward): tile constants, the
// shared-memory layout of a row-block CTA, the swizzled S = Q K^T and
// O += P V of one warp, a row's tile list from its spans and a consumer
// warp's walk over its ring steps. Device code, C++ only.
#pragma once

#include <cuda.h>

#include "bwd_common.cuh"
#include "fwd_rows.h"
#include "mbar.cuh"

namespace nsa_rows {
using namespace nsa_bwd;

constexpr int kT = NSA_BWD_TILE;      constexpr int kMaxT = 32;             // tiles per row (host-checked bound)
constexpr int kNTmax = 8192;          // tiles per (b, g): bitmap of kNTmax / 32 words
constexpr int kW = kNTmax / 32;       // bitmap words
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Ring slot: K then V, each as swizzled boxes [64 keys][64 dims] of 8 KB
// (d 0..63, then 64..127, ...: Dk / 64 for K, two for V); 1024-byte
// aligned (the swizzle's period).
constexpr int kBox = kT * 64 * 2;    // bytes per box

// kDS: the backward's dq from dS (nsa_cuda_bwd_t::ds), whose ring slots hold
// K only and which stages no Q / dO.
// The forward also takes Dk = 192 (three 64-dim K boxes; the NSA paper's
// Dk / Dv): with Q's 48 -> 70 KB at 11 rows and 40 KB slots, 3 slots fit
// (4 at 9 rows).
template <int kRows, int DK, int DV, bool kBwd = false, bool kDS = false> struct RowsSmem {
  static_assert((DK == 128 || (DK == 192 && !kBwd)) && DV == 128, "64-dim boxes: K 2 or 3, V 2");
  static_assert(kBwd || !kDS, "dS is the backward's");
  static constexpr int kKB = DK / 64;                                     // K boxes per tile (V: 2)
  static constexpr int kThreads = (kRows + 1) * 32;
  static constexpr int kSlotB = kDS ? 2 * kBox : (kKB + 2) * kBox;        // bytes per ring slot
  static constexpr int kNS = kDS ? 12 : kBwd ? 4 : DK == 192 ? (kRows <= 9 ? 4 : 3) : kRows <= 11 ? 5 : 4;  // ring slots that fit
  static constexpr int QS = DK + 8;                                       // +16 bytes: conflict-free ldmatrix
  static constexpr size_t ring_off = 0;                                   // [kNS][kSlotB] (1024-aligned base)
  static constexpr size_t q_off = ring_off + (size_t)kNS * kSlotB;        // [kRows][16][QS]
  static constexpr size_t do_off = q_off + (kDS ? 0 : (size_t)kRows * 16 * QS * 2);  // backward: [kRows][16][QS] dO
  // [kRows][kMaxT] u64 key masks
  static constexpr size_t mk_off = do_off + (kBwd && !kDS ? (size_t)kRows * 16 * QS * 2 : 0);
  static constexpr size_t rt_off = mk_off + (size_t)kRows * kMaxT * 8;    // [kRows][kMaxT] i32 own tiles
  static constexpr size_t ut_off = rt_off + (size_t)kRows * kMaxT * 4;    // [kRows * kMaxT] i32 union
  static constexpr size_t bm_off = ut_off + (size_t)kRows * kMaxT * 4;    // [kW] u32 tile bitmap
  static constexpr size_t pre_off = bm_off + (size_t)kW * 4;              // [kW] i32 union steps before word
  static constexpr size_t um_off = pre_off + (size_t)kW * 4;              // [kRows * kMaxT] u32 rows per step
  static constexpr size_t tag_off = um_off + (size_t)kRows * kMaxT * 4;   // [kNS] i32 step last put in a slot
  static constexpr size_t u_off = tag_off + (size_t)kNS * 4;              // i32 U
  static constexpr size_t bar_off = (u_off + 4 + 7) & ~(size_t)7;         // full[kNS] (K), empty[kNS], fullv[kNS] (V) u64
  static constexpr size_t bytes = bar_off + 3 * kNS * 8 + 1024;           // + alignment slack
};

// S (16 heads x 64 keys) = Q (16 x 128 at q_s, row stride QS) . K^T with K
// in a ring slot at shared address ks (two swizzled boxes): qk_tile of
// bwd_common.cuh with the swizzled B addresses. Key row kr = np*16 +
// (lane & 7) + (lane >> 4)*8 (so kr & 7 = lane & 7), 16-byte chunk
// c = 2*kstep + ((lane >> 3) & 1) of d: box c >> 3, chunk (c & 7) ^ (kr & 7).
template <typename T, int QS, int DK = 128>
__device__ __forceinline__ void qk_sw(const T *q_s, unsigned ks, int lane, float (&s)[8][4]) {
#pragma unroll
  for (int i = 0; i < 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
  const unsigned rowb = ks + ((lane & 7) + (lane >> 4) * 8) * 128;
#pragma unroll
  for (int kk = 0; kk < DK / 16; kk++) {
    unsigned af[4];
    ldsm_x4(smem_u32(q_s + (lane & 15) * QS + kk * 16 + (lane >> 4) * 8), af[0], af[1], af[2], af[3]);
    const int c = kk * 2 + ((lane >> 3) & 1);
    const unsigned cb = rowb + (c >> 3) * kBox + (((c & 7) ^ (lane & 7)) << 4);
#pragma unroll
    for (int np = 0; np < 4; np++) {
      unsigned b0, b1, b2, b3;
      ldsm_x4(cb + np * 16 * 128, b0, b1, b2, b3);
      Mma<T>::run(s[2 * np], af, b0, b1);
      Mma<T>::run(s[2 * np + 1], af, b2, b3);
    }
  }
}

// O (16 x 128) += P (16 x 64, p_to_a's fragments) . V with V in a ring slot
// at shared address vs (swizzled as K): pv_tile of bwd_common.cuh with the
// swizzled ldmatrix.trans addresses. Key row kr = kk*16 + (lane & 7) +
// ((lane >> 3) & 1)*8, chunk c = 2*dp + (lane >> 4) of d.
template <typename T>
__device__ __forceinline__ void pv_sw(const unsigned (&pa)[4][4], unsigned vs, int lane, float (&o)[16][4]) {
  const unsigned rowb = vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * 128;
#pragma unroll
  for (int kk = 0; kk < 4; kk++)
#pragma unroll
    for (int dp = 0; dp < 8; dp++) {
      const int c = dp * 2 + (lane >> 4);
      unsigned b0, b1, b2, b3;
      ldsm_x4_t(rowb + kk * 16 * 128 + (c >> 3) * kBox + (((c & 7) ^ (lane & 7)) << 4), b0, b1, b2, b3);
      Mma<T>::run(o[2 * dp], pa[kk], b0, b1);
      Mma<T>::run(o[2 * dp + 1], pa[kk], b2, b3);
    }
}

// Inclusive sum of x over lanes 0..lane of the (full) warp.
__device__ __forceinline__ int warp_inclusive_sum(int x, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += v;
  }
  return x;
}

// A row's distinct 64-key tiles from its spans, one span per lane (lane i
// holds span i, xr, of the row's nsr): spans are sorted and disjoint, so a
// tile is shared only by consecutive spans. Lane i's tiles are first..last
// (ok: the span is in use and inside [0, Skv): a bad one must not index past
// the tiles; the plan never has them), at positions p0, p0 + 1, ... of the
// row's ascending tile list (when the previous span listed the first tile
// already, p0 is that tile's position: it is written twice with one id);
// cnt = the row's tile count, at most kMaxT. Every lane must call it.
struct SpanTiles {
  int first, last, p0, cnt;
  bool ok;
};
__device__ __forceinline__ SpanTiles span_tiles(int2 xr, int nsr, int n, int64_t Skv, int lane) {
  SpanTiles r;
  const int nsp = min(nsr, n);
  r.ok = lane < nsp && xr.y > xr.x && xr.x >= 0 && xr.y <= Skv;
  r.first = r.ok ? xr.x / kT : -2, r.last = r.ok ? (xr.y - 1) / kT : -2;
  int plast = __shfl_up_sync(0xffffffffu, r.last, 1);
  if (lane == 0) plast = -3;
  const bool shr = r.ok && r.first == plast;  // first tile already listed by the previous span
  const int nnew = r.ok ? r.last - r.first + 1 - (shr ? 1 : 0) : 0;
  const int inc = warp_inclusive_sum(nnew, lane);
  r.cnt = min(__shfl_sync(0xffffffffu, inc, 31), kMaxT);
  r.p0 = inc - nnew - (shr ? 1 : 0);
  return r;
}

// A consumer warp's walk over its own steps (the ring protocol of step 3):
// for its j-th tile, union step u in ring slot s = u % kNS, it spins until
// the slot's tag is u (the producer has started filling the slot for step u,
// so the fill of step u - kNS has landed and the parity wait names the right
// phase), waits for K (full[s]), runs tile(j, slot address, s, u) (which
// waits for V, fullv[s], itself), and releases the slot (empty[s]).
// kPollNs (below): the sleep between two reads of the tag. A warp that polls takes
// issue slots from the warps computing on its sub-partition. At ~400 ns
// instead of 20 the persistent forward at 64k h16 random took 0.8 % less
// time (and 13 % fewer instructions), the Dk = 192 forward 0.7 % less, the
// backward's dq the same; 550 ns was 3.5 % slower at 64k, where a step
// takes ~560 ns per SM (docs/PERF.md, session 27).
template <int kNS, int kSlotB, typename F>
__device__ __forceinline__ void walk_steps(int cnt, int mystep, const int *sTag, unsigned ring, unsigned full0,
                                           unsigned empty0, int lane, F &&tile) {
  constexpr unsigned kPollNs = 400;
  int j = 0;
  int next = __shfl_sync(0xffffffffu, mystep, 0);
  for (int u = next; j < cnt; u = next) {
    const int s = u % kNS;
    while (nsa_mbar::flag_load(smem_u32(&sTag[s])) != u) __nanosleep(kPollNs);
    nsa_mbar::wait(full0 + 8 * s, (u / kNS) & 1);
    tile(j, ring + s * kSlotB, s, u);
    j++;
    next = __shfl_sync(0xffffffffu, mystep, j & 31);  // (unused once j == cnt)
    __syncwarp();  // every lane is done with the slot
    if (lane == 0) nsa_mbar::arrive(empty0 + 8 * s);
  }
}

// A consumer warp's row at the end (lane: heads r0 = lane / 4 and r0 + 8,
// thread-partial sums l0 / l1 of its quad, running maxima m0 / m1 in log2
// units): store(1 / l0, 1 / l1, lse0, lse1) with lse = (m + log2 l) ln 2;
// an empty row (l = 0) gets 0 and -inf.
template <typename F>
__device__ __forceinline__ void finish_row(float l0, float l1, float m0, float m1, F &&store) {
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  store(l0 > 0.f ? 1.f / l0 : 0.f, l1 > 0.f ? 1.f / l1 : 0.f, l0 > 0.f ? (m0 + log2f(l0)) * kLn2 : -INFINITY,
        l1 > 0.f ? (m1 + log2f(l1)) * kLn2 : -INFINITY);
}

// The persistent forward (fwd_rows_persist.cu) on `st`: the row blocks of
// the launch's order, walked by one CTA per SM (or M->persist CTAs when >
// 1), taking items from *claim (an int of the workspace that the grouping
// zeroed: group_rows_kernel's claim); ord and ubits from the grouping (both
// required); sord, unless NULL, each block's step order (launch_step_order;
// NULL: ascending). Dk = Dv = 128, 11 rows.
cudaError_t launch_fwd_rows_persist(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                    const nsa_cuda_fwd_rows_t *M, const int32_t *ord, const unsigned *ubits,
                                    const unsigned short *sord, int *claim, cudaStream_t st);

// The order of each row block's union steps for the persistent forward
// (fwd_rows_order.cu): sord[(b * G + g) * NB + tb][v] = the tile of step v
// (u16, R * kMaxT entries per block), each row's tiles ascending in it,
// from the plan's spans (its rows from ord) and the grouping's unions
// (ubits). R = 11, at most 1024 tiles per (b, g); cudaErrorInvalidValue
// otherwise.
cudaError_t launch_step_order(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, int R, const int32_t *ord,
                              const unsigned *ubits, unsigned short *sord, cudaStream_t st);

// The row grouping in wide windows (fwd_rows_group_wide.cu): `blocks` =
// 32, 64 or 128 row blocks of R <= 16 rows, at most kGroupWideRows rows per
// window and 1024 tiles per (b, g). launch_group_wide takes the one-warp
// grouping's arguments (fwd_rows.cu launch_group; fnw: the forward's
// bitmap words per row block) and its rule, except that a window's blocks
// are built 16 at a time; cudaErrorInvalidValue for sizes group_wide_ok
// refuses.
constexpr int kGroupWideRows = 1408;  // 128 blocks of 11 rows: ~216 KB of shared memory at 32 tiles per row
bool group_wide_ok(int64_t NT, int R, int blocks);
cudaError_t launch_group_wide(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_selview_t *sel, int R,
                              int blocks, int32_t *ord, unsigned *ubits, int fnw, int *claim, cudaStream_t st);

// A grouping window (both groupings: one per block of the launch): windows
// of W positions per (b, g), bg = b * G + g; this window's first position
// p0, its rows Wn (the last window may be short), its part of ord and of
// ubits ([B * G][ceil(S / R)][fnw] u32, each row block's union; the
// window's blocks start at p0 / R; NULL without ubits).
struct GroupWindow {
  int64_t bg, b, g, p0;
  int Wn;
  int32_t *ow;
  unsigned *uw;
  __device__ __forceinline__ GroupWindow(int64_t S, int64_t G, int W, int R, int32_t *ord, unsigned *ubits,
                                         int fnw) {
    const int64_t nwin = (S + W - 1) / W;
    bg = blockIdx.x / nwin, p0 = (blockIdx.x % nwin) * W;
    b = bg / G, g = bg % G;
    Wn = (int)min((int64_t)W, S - p0);
    ow = ord + bg * S + p0;
    uw = ubits != nullptr ? ubits + (bg * ((S + R - 1) / R) + p0 / R) * fnw : nullptr;
  }
};

// A row block's union from its bitmap words, by the producer warp: lane i
// holds word i (0 past the block's words). Each lane lists its word's tiles
// in ascending order into ut[u] for u < cap (u = the tiles of the lower
// words plus those before it in the word); lanes with `keep` store the word
// to bm[lane] and its prefix to pre[lane] (the consumers' bit lookups).
// Returns the union's size, at most cap, in every lane.
__device__ __forceinline__ int union_from_words(unsigned wv, int lane, bool keep, unsigned *bm, int *pre, int *ut,
                                                int cap) {
  const int k = __popc(wv);
  const int inc = warp_inclusive_sum(k, lane);
  int u = inc - k;
  if (keep) bm[lane] = wv, pre[lane] = u;
  for (unsigned m = wv; m != 0u; m &= m - 1, u++)
    if (u < cap) ut[u] = lane * 32 + __ffs(m) - 1;
  return min(__shfl_sync(0xffffffffu, inc, 31), cap);
}

}  // namespace nsa_rows
