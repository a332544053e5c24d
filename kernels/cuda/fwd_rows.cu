// fwd_rows.cu — row-block forward and the backward's row-block dq (fwd_rows.h).
//
// The backward instance (kBwd, 10 rows, 4 ring slots) runs the same steps
// 1-3 (plus each row's dO next to its Q) and, per own tile, S = Q K^T,
// P = 2^(c2 S - lse log2 e) on the row's keys, dP = dO V^T, dS = P (dP -
// delta) rounded to the dtype, dQ += dS K (K's slot as the B operand that V
// is in the forward); dq = scale * dQ. No partials, no row batches. With
// pre_delta (fwd_rows.h) each warp is also the preprocess for its row: o is
// loaded with the row's other global loads, delta = rowsum(dO o) is summed
// against the staged dO in bwd_pre_vec_kernel's lanes and order, and delta
// and the lse copy are written for dk/dv.
//
// What the kernels share (tile constants, shared-memory layout, the
// swizzled products, span lists, a warp's walk over its ring steps) is in
// fwd_rows.cuh; the persistent forward, which the forward runs by default
// wherever the grouping's unions exist, is fwd_rows_persist.cu.
//
// fwd_rows_kernel: one CTA per (b, g, block of kRows rows: consecutive, or as the row
// grouping (group_rows_kernel, below) ordered them);
// kRows consumer warps (warp w = the row at position t0 + w, its 16 heads = the 16 rows of
// an m16n8k16 A tile) and one producer warp (warp kRows).
//   1. each consumer warp lists its row's distinct 64-key tiles and its
//      64-bit key mask in each (lane i takes span i; spans are sorted and
//      disjoint, so a tile is shared only by consecutive spans and its mask
//      is ORed), marks the tiles in a bitmap of the (b, g)'s tiles and loads
//      its Q rows (16 heads x Dk) into shared memory;
//   2. the producer turns the bitmap into the ascending union ut[0..U) of
//      the block's tiles (a warp scan over the bitmap's bytes, 32 per
//      round; pre[] = union steps before each 32-tile word); each
//      consumer lane j then maps its row's tile j to its union step and sets
//      the warp's bit in um[step] (the rows that use the step);
//   3. the producer (one lane) streams union tile u into ring slot u % kNS
//      by TMA: K and V of the tile's 64 keys, each as boxes of 64 keys x
//      64 dims (K: Dk / 64 of them, V: two; 128 bytes per key row, 128-byte swizzle: 16-byte chunk c of
//      key row kr sits at chunk c ^ (kr & 7), so ldmatrix reads are
//      conflict-free), keys past Skv zero-filled by the TMA unit, K's
//      boxes completing on full[slot] and V's on fullv[slot] (mbar.cuh), so
//      S = Q K^T starts before V has landed (H200: -1 % at 8k-64k h = 16). Before refilling a slot it
//      waits for empty[slot] (count kRows), writes the slot's tag (= u),
//      and arrives on empty[slot] for every row that does not use step u,
//      so only the step's own users hold the slot. A consumer visits only
//      its own steps: it spins until the slot's tag is u (a release store
//      after the producer's empty wait, read with acquire: then the slot's
//      previous fill has landed, so the parity wait on full[slot] names the
//      right phase), waits, computes, and arrives on empty[slot].
//      Measured on the way (H200, T = 16k h = 16 random, forward ms, every
//      warp then waiting for and releasing every step): one bulk copy per
//      256-byte K / V row 15.7 (the copy engine's per-request cost), 16-byte
//      cp.async from the producer warp 4.0 (~500 producer instructions per
//      tile), these TMA boxes 2.80; own steps only: 2.70 (docs/PERF.md);
//   4. per own tile (FlashAttention-2 fragments, as fwd_shared.cu):
//      S = Q K^T (16 heads x 64 keys), -inf outside the row's keys, running
//      max m (log2 units of scale * S), l, O rescaled when m moves,
//      O += P V with P rounded to the input dtype;
//   5. o = O / l, lse = (m + log2 l) ln 2 (empty row: o = 0, lse = -inf;
//      *invalid > 0, a device-counted invalid selection with sync = 0: NaN).
// Shared memory (Dk = Dv = 128, kRows = 11): ring 5 x 32 KB, Q 48 KB, lists
// ~8 KB: ~217 KB, one CTA of 12 warps per SM. Dk = 192 (forward only): K is
// three boxes, a slot 40 KB, Q 70 KB at 11 rows: 3 slots (4 at 9 rows).
//
// The backward's dq from dS (kDS; nsa_cuda_bwd_t::ds, after dk/dv): the
// same lists, union and ring, but a slot holds K only (12 slots of 16 KB),
// no Q / dO is staged, and per own tile j the warp runs dQ += dS K with
// dS's A fragments loaded from global memory (pair ds_pair_off[r] + j: the
// inversion numbers a row's pairs in the ascending tile order that is also
// this kernel's j), one tile ahead. Only rows of the launch's row batch
// [ds_row0, ds_row1) count; a CTA without any returns at once.
#include <stdlib.h>
#include <type_traits>
#include <string.h>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "fwd_rows.cuh"
#include "sel_slot.cuh"

using namespace nsa_rows;

namespace {

// keys per tile (64)
// Rows (consumer warps) per CTA: 11 (+ the producer: 12 warps, 3 per SM
// sub-partition, so 168 registers and no spills) or 15 (16 warps at 128
// registers, more rows sharing each loaded tile); NSA_CUDA_FWD_ROWS_R for A/B.
constexpr int kRowsDefault = 11;
// Backward dq (Q and dO in shared memory, 4 ring slots): 10 rows, 11 warps.
constexpr int kRowsBwd = 10;
// Backward dq from dS (K-only ring slots of 16 KB, 12 of them): 11 rows.
constexpr int kRowsDS = 11;

template <typename T, int kRows, int DK, int DV, bool kBwd, bool kDS, typename A>
__global__ void __launch_bounds__((kRows + 1) * 32, 1)
    fwd_rows_kernel(A a, const __grid_constant__ CUtensorMap tmk, const __grid_constant__ CUtensorMap tmv,
                    const int2 *__restrict__ spans, const int32_t *__restrict__ nspans, int n, int64_t NB, int nw, int gmaj,
                    float *__restrict__ pre_delta, float *__restrict__ pre_lsec, const int32_t *__restrict__ ord,
                    const unsigned *__restrict__ ubits) {
  using L = RowsSmem<kRows, DK, DV, kBwd, kDS>;
  constexpr int kThreads = L::kThreads, kNS = L::kNS;
  constexpr int CK = DK / 8;  // 16-byte pieces per Q row
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);  // the swizzle's alignment
  const unsigned ring = smem_u32(smem + L::ring_off);
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  unsigned long long *sMk = reinterpret_cast<unsigned long long *>(smem + L::mk_off);
  int *sRt = reinterpret_cast<int *>(smem + L::rt_off);
  int *sUt = reinterpret_cast<int *>(smem + L::ut_off);
  unsigned *sBm = reinterpret_cast<unsigned *>(smem + L::bm_off);
  int *sPre = reinterpret_cast<int *>(smem + L::pre_off);
  unsigned *sUm = reinterpret_cast<unsigned *>(smem + L::um_off);
  int *sTag = reinterpret_cast<int *>(smem + L::tag_off);
  int *sU = reinterpret_cast<int *>(smem + L::u_off);
  const unsigned full0 = smem_u32(smem + L::bar_off), empty0 = full0 + kNS * 8, fullv0 = empty0 + kNS * 8;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t g, tb, b;  // fwd_rows.h's index maps
  if (gmaj) {
    tb = NB - 1 - blockIdx.x % NB;
    const int64_t rest = blockIdx.x / NB;
    g = rest % a.G, b = rest / a.G;
  } else {
    g = blockIdx.x % a.G;
    const int64_t rest = blockIdx.x / a.G;
    tb = NB - 1 - rest % NB, b = rest / NB;
  }
  const int64_t t0 = tb * kRows;
  // This consumer warp's row (warp < kRows): position t0 + warp of the
  // (b, g)'s rows, in t order or, with ord (group_rows_kernel), its grouping.
  int64_t t = t0 + warp;
  bool row_ok = warp < kRows && t < a.S;
  if (ord != nullptr && row_ok) t = ord[(b * a.G + g) * a.S + t];
  if constexpr (kDS) {
    // One row batch [ds_row0, ds_row1) per launch (the inversion's rows):
    // a block with none of them leaves at once; rows outside it list no tile.
    const int64_t tl = min(t0 + kRows, (int64_t)a.S) - 1;
    if ((b * a.S + tl) * a.G + g < a.ds_row0 || (b * a.S + t0) * a.G + g >= a.ds_row1) return;
    const int64_t r = (b * a.S + t) * a.G + g;
    row_ok = row_ok && r >= a.ds_row0 && r < a.ds_row1;
  }
  const int r0 = lane >> 2, cq = lane & 3;  // fragment row (head r0, r0 + 8) and column quad

  // Output of this warp's row: heads r0 and r0 + 8.
  auto store_row = [&](const float (&o)[DV / 8][4], float i0, float i1, float lse0, float lse1) {
    if constexpr (!kBwd) {
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const int64_t j = r0 + half * 8;
        const float inv = half ? i1 : i0;
        T *orow = reinterpret_cast<T *>(a.o) + b * a.os[0] + t * a.os[1] + (g * 16 + j) * a.os[2];
        store_o_row<T, DV>(orow, a.os[3], o, half, inv, cq);
        if (a.lse != nullptr && cq == 0) a.lse[b * a.ls[0] + t * a.ls[1] + (g * 16 + j) * a.ls[2]] = half ? lse1 : lse0;
      }
    }
  };

  // Backward: dq of this warp's row (heads r0 and r0 + 8), scale * dQ.
  auto store_dq = [&](const float (&dq)[DK / 8][4], float mul) {
    if constexpr (kBwd) {
#pragma unroll
      for (int half = 0; half < 2; half++) {
        T *row = reinterpret_cast<T *>(a.dq) + b * a.dqs[0] + t * a.dqs[1] + (g * 16 + r0 + half * 8) * a.dqs[2];
        store_o_row<T, DK>(row, a.dqs[3], dq, half, mul, cq);
      }
    }
  };

  // ---- 0. global loads first: the invalid count, this row's Q (and dO)
  // by cp.async, its spans and span count; their latency runs under the
  // shared-memory setup below (H100, T = 16k h = 16: -1 % random, -2 %
  // corr against loading them after it, docs/PERF.md). A bad plan is
  // harmless here: spans are bounds-checked below, and with *invalid > 0
  // the block stores NaN right after the lists.
  const int invalid = a.invalid != nullptr ? *a.invalid : 0;
  int2 xr = make_int2(0, 0);
  int nsr = 0;
  int pb = 0;  // kDS: this row's first pair (its dS)
  if (row_ok) {
    const int64_t r = (b * a.S + t) * a.G + g;
    if constexpr (kDS) {
      pb = a.ds_pair_off[r - a.ds_row0];
    } else {
      T *q_s = sQ + warp * 16 * L::QS;
      const T *qrow = reinterpret_cast<const T *>(a.q) + b * a.qs[0] + t * a.qs[1] + g * 16 * a.qs[2];
      for (int c = lane; c < 16 * CK; c += 32) {
        const int j = c / CK, pt = c % CK;
        cp_async16(smem_u32(q_s + j * L::QS + pt * 8), qrow + j * a.qs[2] + pt * 8, 16);
      }
      if constexpr (kBwd) {  // dO rows (Dv = Dk = 128: the same pieces)
        T *do_s = reinterpret_cast<T *>(smem + L::do_off) + warp * 16 * L::QS;
        const T *drow = reinterpret_cast<const T *>(a.dout) + b * a.dos[0] + t * a.dos[1] + g * 16 * a.dos[2];
        for (int c = lane; c < 16 * CK; c += 32) {
          const int j = c / CK, pt = c % CK;
          cp_async16(smem_u32(do_s + j * L::QS + pt * 8), drow + j * a.dos[2] + pt * 8, 16);
        }
      }
    }
    cp_commit();
    if (lane < n) xr = spans[r * n + lane];  // slot lane < n is in bounds whatever nspans says
    nsr = nspans[r];
  }
  // Backward with pre_delta: this row's o for delta = rowsum(dO o), lane l
  // holding 16-byte chunk l & 15 of head 2i + (l >> 4) in ov[i] (the
  // preprocess's lanes, so the sums are bitwise its own).
  uint4 ov[8];
  if constexpr (kBwd) {
    if (pre_delta != nullptr && row_ok) {
      const T *orow = reinterpret_cast<const T *>(a.o) + b * a.os[0] + t * a.os[1] + (g * 16 + (lane >> 4)) * a.os[2];
#pragma unroll
      for (int i = 0; i < 8; i++) ov[i] = __ldg(reinterpret_cast<const uint4 *>(orow + 2 * i * a.os[2]) + (lane & 15));
    }
  }

  // Step u into ring slot u % kNS (the producer's lane 0): K's boxes on
  // full[slot], V's on fullv[slot]. For u >= kNS it first waits until the
  // slot's previous step has been released by all kRows rows.
  auto issue = [&](int u) {
    const int s = u % kNS, k = u / kNS;
    if (k > 0) nsa_mbar::wait(empty0 + 8 * s, (k - 1) & 1);
    const int k0 = sUt[u] * kT;
    const unsigned dst = ring + s * L::kSlotB, bar = full0 + 8 * s;
    nsa_mbar::flag_store(smem_u32(&sTag[s]), u);  // after the empty wait: releases what it acquired
    nsa_mbar::arrive_expect_tx(bar, L::kKB * kBox);
#pragma unroll
    for (int x = 0; x < L::kKB; x++) nsa_mbar::tma_load_4d(dst + x * kBox, &tmk, 64 * x, (int)g, k0, (int)b, bar);
    if constexpr (!kDS) {
      const unsigned barv = fullv0 + 8 * s, vs = dst + L::kKB * kBox;
      nsa_mbar::arrive_expect_tx(barv, 2 * kBox);
      nsa_mbar::tma_load_4d(vs, &tmv, 0, (int)g, k0, (int)b, barv);
      nsa_mbar::tma_load_4d(vs + kBox, &tmv, 64, (int)g, k0, (int)b, barv);
    }
  };
  auto init_bars = [&]() {
    for (int s = 0; s < kNS; s++) {
      nsa_mbar::init(full0 + 8 * s, 1);  // the producer's arrive_expect_tx (K)
      nsa_mbar::init(fullv0 + 8 * s, 1);  // (V)
      nsa_mbar::init(empty0 + 8 * s, kRows);
      sTag[s] = -1;
    }
    nsa_mbar::init_fence();
  };

  // ---- 1. lists, bitmap ----
  // With ubits (the row grouping's union of this block's tiles, written
  // beside ord), the producer warp does not wait for the lists: it loads
  // the union's nw <= 32 words (one per lane), builds the ascending union
  // from them and issues the first min(kNS, U) steps at once, so the first
  // tiles land while the consumer warps still load their rows and list
  // their tiles. (Each microsecond a CTA's first TMA starts later costs
  // kernel time one to one: H200, T = 16k h = 16 random, +44 us for 45
  // CTAs per SM; docs/PERF.md.)
  const bool hint = !kBwd && ubits != nullptr;  // kernel-uniform (the forward's only)
  int early = 0;                       // steps issued before the lists (hint)
  if (hint && warp == kRows) {
    const unsigned wv = lane < nw ? ubits[((b * a.G + g) * NB + tb) * nw + lane] : 0u;
    const int tot = union_from_words(wv, lane, lane < nw, sBm, sPre, sUt, kRows * kMaxT);
    early = invalid > 0 ? 0 : min(tot, kNS);  // (an invalid request's block reads no K / V)
    __syncwarp();                             // sUt of every lane
    if (lane == 0) {
      *sU = tot;
      init_bars();
      for (int e = 0; e < early; e++) issue(e);
    }
  } else if (!hint) {
    for (int i = tid; i < nw; i += kThreads) sBm[i] = 0u;
    if (tid == 0) init_bars();
  }
  for (int i = tid; i < kRows * kMaxT; i += kRows * 32) sUm[i] = 0u;  // (consumer threads)
  if (!hint) __syncthreads();  // the bitmap zeroed before the lists OR into it
  int cnt = 0;  // this row's tiles (warp-uniform)
  if (warp < kRows) {
    unsigned long long *mk = sMk + warp * kMaxT;
    int *rt = sRt + warp * kMaxT;
    mk[lane] = 0ull;  // kMaxT == 32: one entry per lane
    if (row_ok) {
      const SpanTiles st = span_tiles(xr, nsr, n, a.Skv, lane);
      cnt = st.cnt;
      __syncwarp();  // mk zeroed before the ORs
      if (st.ok) {
        int p = st.p0;
        for (int kt = st.first; kt <= st.last; kt++, p++)
          if (p < kMaxT) {
            atomicOr(&mk[p], tile_span_bits(xr.x, xr.y, kt));
            rt[p] = kt;  // a shared tile is written twice with the same id
            if (!hint) atomicOr(&sBm[kt >> 5], 1u << (kt & 31));
          }
      }
    }
  }
  __syncthreads();
  if (invalid > 0) {  // block-uniform: NaN outputs, as the other kernels (no K / V was read)
    cp_wait<0>();
    if (row_ok) {
      float o[DV / 8][4];
#pragma unroll
      for (int i = 0; i < DV / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
      if constexpr (kBwd) store_dq(o, NAN);
      else store_row(o, NAN, NAN, NAN, NAN);
    }
    return;
  }

  // ---- 2. union: ascending tiles of the bitmap (with ubits: built above) ----
  // Lane l takes byte c = 32i + l of the bitmap in round i (8 tiles), so
  // the bits spread over the lanes whatever the tile count. (A lane per
  // 8 whole words, in order, left the 16k-key union of ~150 tiles to lane 0
  // alone: H100, T = 16k h = 16 random forward 2.82 -> 2.67 ms this way.)
  if (!hint && warp == kRows) {
    const int nb = nw * 4;  // bytes of the bitmap
    int base = 0;           // union steps before this round
    for (int c0 = 0; c0 < nb; c0 += 32) {
      const int c = c0 + lane;
      unsigned m = c < nb ? (sBm[c >> 2] >> (8 * (c & 3))) & 0xffu : 0u;
      const int k = __popc(m);
      const int inc = warp_inclusive_sum(k, lane);
      int u = base + inc - k;
      if (c < nb && (c & 3) == 0) sPre[c >> 2] = u;
      while (m) {
        const int bit = __ffs(m) - 1;
        m &= m - 1;
        if (u < kRows * kMaxT) sUt[u] = c * 8 + bit;
        u++;
      }
      base += __shfl_sync(0xffffffffu, inc, 31);
    }
    if (lane == 0) *sU = min(base, kRows * kMaxT);
  }
  if (!hint) __syncthreads();
  const int U = *sU;
  // Each own tile's union step (lane j < cnt: tile j), and the rows of each
  // step. With ubits a tile missing from the union (the grouping lists a
  // row's tiles by the same rule, so only a corrupt workspace could do it)
  // leaves its row out of the ring: it walks no step and stores NaN.
  int mystep = 0x7fffffff;
  bool lost = false;
  if (warp < kRows) {
    bool in = true;
    if (lane < cnt) {
      const int kt = sRt[warp * kMaxT + lane];
      in = (sBm[kt >> 5] >> (kt & 31)) & 1u;
      mystep = sPre[kt >> 5] + __popc(sBm[kt >> 5] & ((1u << (kt & 31)) - 1u));
    }
    lost = hint && !__all_sync(0xffffffffu, in);
    if (lost) cnt = 0;
    if (lane < cnt) atomicOr(&sUm[mystep], 1u << warp);
  }
  __syncthreads();

  // ---- 3. producer ----
  if (warp == kRows) {
    if (lane == 0) {
      for (int u = 0; u < U; u++) {
        if (u >= early) issue(u);  // (steps below `early` went out before the lists)
        // The rows that do not use this step release the slot now (their
        // warps never touch it), so a busy warp holds only its own steps.
        const int idle = kRows - __popc(sUm[u]);
        if (idle > 0) nsa_mbar::arrive_n(empty0 + 8 * (u % kNS), (unsigned)idle);
      }
    }
    return;
  }

  // ---- 4. consumers ----
  const unsigned long long *mk = sMk + warp * kMaxT;
  if constexpr (kDS) {
    // dq from dS: per own tile j (pair pb + j), dQ += dS K with dS's A
    // fragments from global memory (nsa_cuda_bwd_t::ds; each read once, so
    // streamed), loaded one tile ahead so their latency runs under the
    // previous tile's products, and K's slot as the B operand.
    (void)mk;
    const uint4 *dsb = reinterpret_cast<const uint4 *>(a.ds) + lane;
    float dq[DK / 8][4];
#pragma unroll
    for (int i = 0; i < DK / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    uint4 nx[4];
    if (cnt > 0) {
#pragma unroll
      for (int kk = 0; kk < 4; kk++) nx[kk] = __ldcs(dsb + ((int64_t)pb * 4 + kk) * 32);
    }
    walk_steps<kNS, L::kSlotB>(cnt, mystep, sTag, ring, full0, empty0, lane, [&](int j, unsigned slot, int, int) {
      unsigned da[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; kk++) {
        da[kk][0] = nx[kk].x, da[kk][1] = nx[kk].y;
        da[kk][2] = nx[kk].z, da[kk][3] = nx[kk].w;
      }
      if (j + 1 < cnt) {
#pragma unroll
        for (int kk = 0; kk < 4; kk++) nx[kk] = __ldcs(dsb + ((int64_t)(pb + j + 1) * 4 + kk) * 32);
      }
      pv_sw<T>(da, slot, lane, dq);  // K rows as the B operand
    });
    if (row_ok) store_dq(dq, a.scale);  // (no cp.async was issued: nothing to wait for)
    return;
  } else if constexpr (kBwd) {
    // Per own tile: S = Q K^T, P = 2^(c2 S - lse log2 e) on the row's keys,
    // dP = dO V^T, dS = P (dP - delta) rounded to the dtype, dQ += dS K.
    const float c2 = a.scale * kLog2e;
    const T *q_s = sQ + warp * 16 * L::QS;
    const T *do_s = reinterpret_cast<const T *>(smem + L::do_off) + warp * 16 * L::QS;
    cp_wait<0>();
    __syncwarp();
    float l0 = 0.f, l1 = 0.f, d0 = 0.f, d1 = 0.f;  // heads r0, r0 + 8: lse (log2 units), delta
    if (row_ok) {
      const int64_t ri = ((b * a.S + t) * a.G + g) * 16;
      if (pre_delta != nullptr) {  // the preprocess, for this row (dO is in shared memory now)
#pragma unroll
        for (int i = 0; i < 8; i++) {
          const int j = 2 * i + (lane >> 4);
          float x = dot8<T>(ov[i], *reinterpret_cast<const uint4 *>(do_s + j * L::QS + (lane & 15) * 8));
#pragma unroll
          for (int w = 8; w > 0; w >>= 1) x += __shfl_xor_sync(0xffffffffu, x, w);
          const float x0 = __shfl_sync(0xffffffffu, x, 0), x1 = __shfl_sync(0xffffffffu, x, 16);
          if (r0 == 2 * i) d0 = x0;
          if (r0 == 2 * i + 1) d0 = x1;
          if (r0 + 8 == 2 * i) d1 = x0;
          if (r0 + 8 == 2 * i + 1) d1 = x1;
          if ((lane & 15) == 0) pre_delta[ri + j] = x;
        }
        const float *lrow = a.lse + b * a.ls[0] + t * a.ls[1] + g * 16 * a.ls[2];
        if (lane < 16) pre_lsec[ri + lane] = __ldg(lrow + lane * a.ls[2]);
        l0 = __ldg(lrow + r0 * a.ls[2]) * kLog2e, l1 = __ldg(lrow + (r0 + 8) * a.ls[2]) * kLog2e;
      } else {
        l0 = a.lsec[ri + r0] * kLog2e, l1 = a.lsec[ri + r0 + 8] * kLog2e;
        d0 = a.delta[ri + r0], d1 = a.delta[ri + r0 + 8];
      }
    }
    float dq[DK / 8][4];
#pragma unroll
    for (int i = 0; i < DK / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    walk_steps<kNS, L::kSlotB>(cnt, mystep, sTag, ring, full0, empty0, lane, [&](int j, unsigned slot, int s, int u) {
      float sc[8][4];
      qk_sw<T, L::QS>(q_s, slot, lane, sc);
      nsa_mbar::wait(fullv0 + 8 * s, (u / kNS) & 1);
      float dp[8][4];
      qk_sw<T, L::QS>(do_s, slot + 2 * kBox, lane, dp);
      ds_tile(sc, dp, mk[j], mk[j], cq, c2, l0, l1, d0, d1);
      unsigned da[4][4];
      p_to_a<T>(sc, da);
      pv_sw<T>(da, slot, lane, dq);  // K rows as the B operand, as V in the forward
    });
    if (row_ok) store_dq(dq, a.scale);
    return;
  } else {
    const float c2 = a.scale * kLog2e;
    float mr0 = -INFINITY, mr1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running max (log2 units), thread-partial l
    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    const T *q_s = sQ + warp * 16 * L::QS;
    cp_wait<0>();
    __syncwarp();  // every lane's Q pieces landed
    walk_steps<kNS, L::kSlotB>(cnt, mystep, sTag, ring, full0, empty0, lane, [&](int j, unsigned slot, int s, int u) {
      float sc[8][4];
      qk_sw<T, L::QS, DK>(q_s, slot, lane, sc);
      softmax_tile<DV>(sc, mk[j], mk[j], cq, c2, mr0, mr1, l0, l1, o);  // one row: the same mask for both halves
      unsigned pa[4][4];
      p_to_a<T>(sc, pa);
      nsa_mbar::wait(fullv0 + 8 * s, (u / kNS) & 1);  // V may land after K
      pv_sw<T>(pa, slot + L::kKB * kBox, lane, o);
    });
    if (!row_ok) return;
    if (lost) {
      store_row(o, NAN, NAN, NAN, NAN);
      return;
    }
    finish_row(l0, l1, mr0, mr1, [&](float i0, float i1, float s0, float s1) { store_row(o, i0, i1, s0, s1); });
  }
}

// One launch of the kernel: A = nsa_cuda_attn_t (forward, R rows per CTA)
// or nsa_cuda_bwd_t (kBwd: the backward's dq, R = kRowsBwd).
template <typename T, int R, bool kBwd, typename A, bool kDS = false, int DK = 128>
cudaError_t launch_rows(const A *a, const nsa_plan_t *plan, const nsa_cuda_fwd_rows_t *M, cudaStream_t st,
                        float *pre_delta = nullptr, float *pre_lsec = nullptr, const int32_t *ord = nullptr,
                        const unsigned *ubits = nullptr) {
  using L = RowsSmem<R, DK, 128, kBwd, kDS>;
  static unsigned long long set_on = 0;  // bwd_common.cuh: set once per device
  int dev = 0;
  cudaError_t e = set_smem_once(fwd_rows_kernel<T, R, DK, 128, kBwd, kDS, A>, (int)L::bytes, &set_on, &dev);
  if (e != cudaSuccess) return e;
  const int64_t NB = (a->S + R - 1) / R;
  const int64_t NT = (a->Skv + kT - 1) / kT;
  const int64_t grid = a->B * a->G * NB;
  fwd_rows_kernel<T, R, DK, 128, kBwd, kDS, A><<<(unsigned)grid, L::kThreads, L::bytes, st>>>(
      *a, M->k, M->v, (const int2 *)plan->spans, plan->nspans, (int)plan->n, NB, (int)((NT + 31) / 32), M->gmaj,
      pre_delta, pre_lsec, ord, ubits);
  return cudaGetLastError();
}

// ---- Row grouping (fwd_rows.h, nsa_cuda_fwd_rows_t::group) ----
// One warp per window of NBK row blocks (W = NBK * R positions, NBK = 8 or
// 16, R <= 16) of one (b, g). It deals the window's rows into its blocks
// greedily so that rows sharing tiles share a block (a CTA of the forward
// loads each tile of its rows' union once). Per block: the seed is the
// remaining row with the largest t (the most keys); then R - 1 times the
// remaining row with the fewest tiles outside the block's union so far
// (ties: larger t) joins and its tiles enter the union.
// ord[(b*G + g)*S + position] = t; every t of the window appears once
// whatever the spans (a bad span only lists fewer tiles). A window whose
// blocks in t order already share most tiles keeps t order (below).
//
// Index maps. Window row j (t = p0 + j, j < W <= 256); its tiles are a
// bitmask of NW words (NT <= 32 NW tiles) in shared memory. The greedy
// (step 3) holds the rows not placed yet densely in lanes: before each
// block, remaining row number i (of nrem) sits in lane i % 32, slot i / 32
// (< KW = NBK / 2), with its mask in registers and c = its tiles outside U,
// the union of the block being built (in every lane's registers too). A
// round: one warp min-reduction picks the row; its mask, broadcast from
// shared memory, enters U, and each lane recounts its live slots' c. No
// barrier. The slots in use shrink as the window fills (ceil(nrem / 32)).
// H200, 8-block windows, Nsight Compute (docs/PERF.md): 16k / 64k h = 16
// random 41 / 270 us, 16k corr (t-order exit) 18 us; 53 / 311 / 21 with a
// fixed slot per row, whatever was placed (session 23). A round is
// latency-bound, so 16-block windows take about twice as long (92 us).
// Shared memory: sm [W][NW] u32 the rows' masks; ub [NBK][NW] u32 the
// t-order blocks' unions (the t-order check); cnt [W] u8 tile counts; idx
// [W] u8 the remaining rows, packed (step 3).
constexpr int kGNT = 1024;  // tiles per (b, g) at most (NW <= 32)

__host__ __device__ constexpr size_t group_smem(int nw, int blocks, int w) {
  return ((size_t)w + blocks) * nw * 4 + 2 * (size_t)w;
}

template <int KW, int NW, bool kRecount = false, bool kSel = false>
__global__ void __launch_bounds__(32, 1) group_rows_kernel(const int2 *__restrict__ spans,
                                                          const int32_t *__restrict__ nspans, nsa_cuda_selview_t sel,
                                                          int n, int64_t S, int64_t G, int64_t Skv, int R,
                                                          int32_t *__restrict__ ord, unsigned *__restrict__ ubits,
                                                          int fnw, int *__restrict__ claim) {
  constexpr int NBK = 2 * KW;  // blocks per window
  constexpr unsigned kFull = 0xffffffffu;
  static_assert(NW % 4 == 0 && KW * NW <= 128, "masks in registers");
  extern __shared__ __align__(16) unsigned char gsm[];
  const int W = NBK * R;
  unsigned *sm = reinterpret_cast<unsigned *>(gsm);                         // [W][NW]
  unsigned *ub = sm + (size_t)W * NW;                                        // [NBK][NW]
  unsigned char *cnt = reinterpret_cast<unsigned char *>(ub + NBK * NW);     // [W]
  const int lane = threadIdx.x;
  const GroupWindow win(S, G, W, R, ord, ubits, fnw);  // this window (fwd_rows.cuh)
  const int64_t b = win.b, g = win.g, p0 = win.p0;
  const int Wn = win.Wn;
  int32_t *ow = win.ow;
  unsigned *uw = win.uw;
  for (int i = lane; i < (W + NBK) * NW / 4; i += 32) reinterpret_cast<uint4 *>(sm)[i] = make_uint4(0u, 0u, 0u, 0u);
  // The persistent forward's item counter, zeroed here (it runs after this
  // kernel on the same stream) rather than by a memset of its own.
  if (claim != nullptr && blockIdx.x == 0 && lane == 0) *claim = 0;
  __syncwarp();

  // 1. Lists, one row per lane: the row's bits in its mask (sm) and in its
  // t-order block's union (ub), as shared-memory reductions (no value
  // returned, so nothing waits on them). For a plan's spans, the tiles of
  // span_tiles: spans in use and inside [0, Skv), a tile shared with the
  // previous span listed once, at most kMaxT tiles (after an out-of-range
  // span the two may differ; that changes only which rows share a block). A lane's next row's nspans and first 16 spans are
  // loaded while it lists the current one (spans past nspans are {0, 0} in
  // the plan, and in-range: reading them is harmless).
  constexpr int kPre = 16;
  if constexpr (kSel) {
    // 1'. From the selection's slots instead (kSel: the planner may still be
    // running): sel_slot.cuh's validity and clipping, so a row lists exactly
    // the tiles of the spans the plan will hold (a tile of two slots once);
    // its count is its mask's popcount, read back after the warp's ORs.
    // A lane's next row's first 16 slots are loaded (and clipped to the
    // row's limit, so they fit in int) while it lists the current one.
    const int64_t nblk = sel.kind == NSA_SEL_BLOCK_INDICES ? (Skv + sel.block_size - 1) / sel.block_size : 0;
    auto slot = [&](int64_t t, int u, long long limit) {  // {lo, hi}; unused, invalid, clipped: empty
      long long l = 0, h = 0;
      const int k = nsa_sel::load_slot(sel, b, t, g, u, nblk, &l, &h);
      if (h > limit) h = limit;
      return k > 0 && l < h ? make_int2((int)l, (int)h) : make_int2(0, 0);
    };
    int2 nx[kPre];
    auto load_row = [&](int j) {
      const long long limit = nsa_sel::row_limit(p0 + j, S, Skv);
#pragma unroll
      for (int u = 0; u < kPre; u++) nx[u] = u < n ? slot(p0 + j, u, limit) : make_int2(0, 0);
    };
    if (lane < Wn) load_row(lane);
    for (int j = lane; j < Wn; j += 32) {
      const int64_t t = p0 + j;
      unsigned *mj = sm + j * NW, *uj = ub + (j / R) * NW;
      auto list = [&](int2 x) {  // the tiles of [x.x, x.y) (empty: none)
        for (int kt = x.x / kT; x.x < x.y && kt <= (x.y - 1) / kT; kt++) {
          const unsigned bt = 1u << (kt & 31);
          atomicOr(mj + (kt >> 5), bt);
          atomicOr(uj + (kt >> 5), bt);
        }
      };
      int2 cur[kPre];
#pragma unroll
      for (int u = 0; u < kPre; u++) cur[u] = nx[u];
      if (j + 32 < Wn) load_row(j + 32);
#pragma unroll
      for (int u = 0; u < kPre; u++) list(cur[u]);
      if (n > kPre) {  // n > 16: the rest one by one
        const long long limit = nsa_sel::row_limit(t, S, Skv);
        for (int u = kPre; u < n; u++) list(slot(t, u, limit));
      }
    }
    __syncwarp();
    for (int j = lane; j < Wn; j += 32) {
      int c = 0;
#pragma unroll
      for (int h = 0; h < NW / 4; h++) {
        const uint4 v = reinterpret_cast<const uint4 *>(sm + j * NW)[h];
        c += __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w);
      }
      cnt[j] = (unsigned char)min(c, 255);
    }
  } else {
    auto load_row = [&](int j, int2 (&x)[kPre], int &ns) {
      const int64_t r = (b * S + p0 + j) * G + g;
      ns = min(nspans[r], n);
#pragma unroll
      for (int u = 0; u < kPre; u++) x[u] = u < n ? spans[r * n + u] : make_int2(0, 0);
    };
    {
      int2 nx[kPre];
      int nsn = 0;
      if (lane < Wn) load_row(lane, nx, nsn);
      for (int j = lane; j < Wn; j += 32) {
        int2 cur[kPre];
        const int ns = nsn;
#pragma unroll
        for (int u = 0; u < kPre; u++) cur[u] = nx[u];
        if (j + 32 < Wn) load_row(j + 32, nx, nsn);
        unsigned *mj = sm + j * NW, *uj = ub + (j / R) * NW;
        int c = 0, last = -1;
        auto list = [&](int2 x) {
          if (!(x.y > x.x && x.x >= 0 && x.y <= Skv)) return;
          const int kl = (x.y - 1) / kT;
          for (int kt = x.x / kT == last ? last + 1 : x.x / kT; kt <= kl && c < kMaxT; kt++, c++) {
            const unsigned bt = 1u << (kt & 31);
            atomicOr(mj + (kt >> 5), bt);
            atomicOr(uj + (kt >> 5), bt);
          }
          last = kl;
        };
#pragma unroll
        for (int u = 0; u < kPre; u++)
          if (u < ns) list(cur[u]);
        if (ns > kPre) {  // n > 16: the rest one by one
          const int64_t r = (b * S + p0 + j) * G + g;
          for (int u = kPre; u < ns; u++) list(spans[r * n + u]);
        }
        cnt[j] = (unsigned char)c;
      }
    }
  }  // spans
  __syncwarp();

  // 2. Rows in t order that already share most tiles (a trained model's
  // neighbouring queries; the bench's corr) cannot gain: when the window's
  // blocks in t order have unions under 2.5x their largest row's tile count
  // in all, keep t order and skip the greedy.
  {
    int tm = 0, su = 0;
    if (lane < NBK)  // lane i: t-order block i's largest row
      for (int j = lane * R; j < lane * R + R && j < Wn; j++) tm = max(tm, (int)cnt[j]);
    for (int i = lane; i < NBK * NW; i += 32) su += __popc(ub[i]);
    tm = (int)__reduce_add_sync(kFull, (unsigned)tm);
    su = (int)__reduce_add_sync(kFull, (unsigned)su);
    if (2 * su <= 5 * tm) {
      for (int j = lane; j < Wn; j += 32) ow[j] = (int32_t)(p0 + j);
      if (uw != nullptr)
        for (int i = lane; i < (Wn + R - 1) / R * fnw; i += 32) uw[i] = ub[(i / fnw) * NW + i % fnw];
      return;
    }
  }

  // 3. The greedy, block by block, over the rows not placed yet, packed
  // densely: before block blk, the nrem remaining rows are idx[0 .. nrem)
  // (window row numbers j; block 0: idx[i] = i), and lane l holds the rows
  // idx[32 k + l] for k < kact = ceil(nrem / 32) (id[k] = j, rm[k] its
  // mask, c[k] its tiles outside U, the union of the block being built;
  // bit k of `live`: not placed yet). As the window fills, fewer slots are
  // live and each round recounts only those (the later blocks' rounds cost
  // a third of the first's). After the block, the live rows write their j
  // to idx at their rank (slot-major), so the next block starts packed.
  // A round: key = (tiles outside U) << 8 | (255 - j), whose warp minimum
  // is the fewest new tiles, then the largest j (= the largest t); for the
  // seed (m = 0) simply the largest j. The picked row's mask (broadcast
  // from shared memory) enters U.
  unsigned char *idx = cnt + W;  // [W]
  int nrem = Wn;
  for (int blk = 0; nrem > 0; blk++) {
    const int kact = (nrem + 31) / 32;
    unsigned rm[KW][NW];
    int c[KW], id[KW];
    unsigned live = 0u;
#pragma unroll
    for (int k = 0; k < KW; k++) {
      const int i = 32 * k + lane;
      const bool ex = k < kact && i < nrem;
      id[k] = ex ? (blk == 0 ? i : (int)idx[i]) : 0;
      c[k] = ex ? cnt[id[k]] : 0;
      if (ex) live |= 1u << k;
#pragma unroll
      for (int h = 0; h < NW / 4; h++) {
        const uint4 v = ex ? reinterpret_cast<const uint4 *>(sm + id[k] * NW)[h] : make_uint4(0u, 0u, 0u, 0u);
        rm[k][4 * h] = v.x, rm[k][4 * h + 1] = v.y, rm[k][4 * h + 2] = v.z, rm[k][4 * h + 3] = v.w;
      }
    }
    unsigned U[NW];
#pragma unroll
    for (int w = 0; w < NW; w++) U[w] = 0u;
    const int take = min(R, nrem);
    // The block's rounds, built for KA = the slots in use (kact rounded up
    // to 1, 2, 3, 4 or KW), so no round spends work or a branch on the
    // slots the window has emptied.
    auto rounds = [&](auto ka) {
      constexpr int KA = decltype(ka)::value;
      for (int m = 0; m < take; m++) {
        unsigned key = kFull;
#pragma unroll
        for (int k = 0; k < KA; k++) {
          const unsigned kk = ((unsigned)(m > 0 ? c[k] : 0) << 8) | (unsigned)(255 - id[k]);
          if ((live >> k) & 1u) key = min(key, kk);
        }
        key = __reduce_min_sync(kFull, key);
        const int js = 255 - (int)(key & 255u);
#pragma unroll
        for (int k = 0; k < KA; k++)
          if (id[k] == js) live &= ~(1u << k);
        if (lane == 0) ow[blk * R + m] = (int32_t)(p0 + js);
        const bool last = m + 1 == take;
        if (last && uw == nullptr) break;
        // The row's tiles enter U (a broadcast read of its mask); after the
        // block's last row only U is still needed.
        if constexpr (kRecount) {
          // Each live slot's tiles outside U counted afresh: NW popcounts
          // summed as a tree, no branch, no chain through the previous count.
#pragma unroll
          for (int h = 0; h < NW / 4; h++) {
            const uint4 v = reinterpret_cast<const uint4 *>(sm + js * NW)[h];
            U[4 * h] |= v.x, U[4 * h + 1] |= v.y, U[4 * h + 2] |= v.z, U[4 * h + 3] |= v.w;
          }
          if (last) break;
#pragma unroll
          for (int k = 0; k < KA; k++) {
            int q[NW];
#pragma unroll
            for (int w = 0; w < NW; w++) q[w] = __popc(rm[k][w] & ~U[w]);
#pragma unroll
            for (int st = 1; st < NW; st <<= 1)
#pragma unroll
              for (int w = 0; w + st < NW; w += 2 * st) q[w] += q[w + st];
            c[k] = q[0];
          }
        } else {
          // c[k] kept up to date: a pick's new tiles (d = its mask & ~U, the
          // same in every lane) are taken off, word by word where d has any.
#pragma unroll
          for (int h = 0; h < NW / 4; h++) {
            const uint4 v = reinterpret_cast<const uint4 *>(sm + js * NW)[h];
            const unsigned vw[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
              const int w = 4 * h + e;
              const unsigned d = vw[e] & ~U[w];
              U[w] |= vw[e];
              if (!last && d != 0u) {
#pragma unroll
                for (int k = 0; k < KA; k++) c[k] -= __popc(rm[k][w] & d);
              }
            }
          }
          if (last) break;
        }
      }
    };
    if (kact <= 1) rounds(std::integral_constant<int, 1>{});
    else if (kact == 2) rounds(std::integral_constant<int, KW < 2 ? KW : 2>{});
    else if (kact == 3) rounds(std::integral_constant<int, KW < 3 ? KW : 3>{});
    else if (kact == 4) rounds(std::integral_constant<int, KW < 4 ? KW : 4>{});
    else rounds(std::integral_constant<int, KW>{});
    if (uw != nullptr) {  // lane w stores word w of the block's union
#pragma unroll
      for (int w = 0; w < NW; w++)
        if (w == lane && w < fnw) uw[blk * fnw + w] = U[w];
    }
    // The live rows, packed for the next block: rank = live rows in the
    // slots before plus those of lower lanes in this slot.
    __syncwarp();
    int base = 0;
#pragma unroll
    for (int k = 0; k < KW; k++) {
      if (k >= kact) break;
      const unsigned bl = __ballot_sync(kFull, (live >> k) & 1u);
      if ((live >> k) & 1u) idx[base + __popc(bl & ((1u << lane) - 1u))] = (unsigned char)id[k];
      base += __popc(bl);
    }
    __syncwarp();
    nrem -= take;
  }
}

// Whether the grouping takes this size: `blocks` (8 or 16) row blocks of R
// <= 16 rows per window, at most 1024 tiles per (b, g), and 16-block windows
// only up to 512 tiles (their masks, KW * NW words per lane, stay within
// 128 registers).
// Mask words per row (the kernel's NW) for NT tiles: 8, 16 or 32.
int group_nw(int64_t NT) { return (NT + 31) / 32 <= 8 ? 8 : (NT + 31) / 32 <= 16 ? 16 : 32; }

bool group_ok(int64_t Skv, int R, int blocks) {
  const int64_t NT = (Skv + kT - 1) / kT;
  if (blocks >= 32) return group_wide_ok(NT, R, blocks);  // fwd_rows_group_wide.cu
  return (blocks == 8 || blocks == 16) && R >= 1 && R <= 16 && NT >= 1 && NT <= kGNT &&
         (blocks / 2) * group_nw(NT) <= 128;
}

// The forward's bitmap words per (b, g) row block: one bit per tile.
int64_t fwd_nw(int64_t Skv) { return ((Skv + kT - 1) / kT + 31) / 32; }

// The row blocks' unions (group_rows_kernel's ubits) in the grouping's
// workspace: after ord's B * G * S int32, 16-byte aligned.
unsigned *ubits_of(const nsa_cuda_attn_t *a, int32_t *ord) {
  const size_t off = ((size_t)a->B * (size_t)a->G * (size_t)a->S * sizeof(int32_t) + 15) & ~(size_t)15;
  return reinterpret_cast<unsigned *>(reinterpret_cast<char *>(ord) + off);
}

// The persistent forward's item counter: one int after the unions,
// 16-byte aligned (nsa_cuda_fwd_rows_ws_bytes).
size_t ubits_bytes(const nsa_cuda_attn_t *a, int R) {
  return (size_t)a->B * (size_t)a->G * (size_t)((a->S + R - 1) / R) * (size_t)fwd_nw(a->Skv) * 4;
}
int *claim_of(const nsa_cuda_attn_t *a, const nsa_cuda_fwd_rows_t *M, int32_t *ord) {
  const size_t off = (ubits_bytes(a, M->rows) + 15) & ~(size_t)15;
  return reinterpret_cast<int *>(reinterpret_cast<char *>(ubits_of(a, ord)) + off);
}

// The persistent forward's step orders (fwd_rows_order.cu): after the
// counter's 16 bytes, rows * kMaxT u16 per row block.
size_t sord_bytes(const nsa_cuda_attn_t *a, int R) {
  return (size_t)a->B * (size_t)a->G * (size_t)((a->S + R - 1) / R) * (size_t)R * kMaxT * 2;
}
unsigned short *sord_of(const nsa_cuda_attn_t *a, const nsa_cuda_fwd_rows_t *M, int32_t *ord) {
  return reinterpret_cast<unsigned short *>(reinterpret_cast<char *>(claim_of(a, M, ord)) + 16);
}

// Queues the grouping of the (b, g)'s rows into row blocks of R, `blocks`
// per window (ord: [B * G * S] i32; ubits, unless NULL: each block's union
// of tiles, [B * G][ceil(S / R)][fwd_nw] u32) on st; group_ok holds. The
// rows' tiles come from sel (its slots, by the planner's rules) when it is
// not NULL, else from the plan's spans. claim, unless NULL, is zeroed.
cudaError_t launch_group(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_selview_t *sel, int R,
                         int blocks, int32_t *ord, unsigned *ubits, int *claim, cudaStream_t st) {
  if (blocks >= 32) return launch_group_wide(a, plan, sel, R, blocks, ord, ubits, (int)fwd_nw(a->Skv), claim, st);
  const int nw = group_nw((a->Skv + kT - 1) / kT);
  const int64_t nwin = a->B * a->G * ((a->S + blocks * R - 1) / (blocks * R));
  static const int recount = [] {
    const char *e = getenv("NSA_CUDA_GROUP_RECOUNT");
    return e ? atoi(e) : 1;
  }();
  auto pick = [&](auto spans_kern, auto sel_kern) { return sel != nullptr ? sel_kern : spans_kern; };
  auto *kern = blocks == 16 ? (nw == 8 ? (recount ? pick(group_rows_kernel<8, 8, true>, group_rows_kernel<8, 8, true, true>)
                                                  : pick(group_rows_kernel<8, 8>, group_rows_kernel<8, 8, false, true>))
                                       : pick(group_rows_kernel<8, 16>, group_rows_kernel<8, 16, false, true>))
                            : (nw == 8    ? (recount ? pick(group_rows_kernel<4, 8, true>, group_rows_kernel<4, 8, true, true>)
                                                     : pick(group_rows_kernel<4, 8>, group_rows_kernel<4, 8, false, true>))
                               : nw == 16 ? pick(group_rows_kernel<4, 16>, group_rows_kernel<4, 16, false, true>)
                                          : pick(group_rows_kernel<4, 32>, group_rows_kernel<4, 32, false, true>));
  nsa_cuda_selview_t sv;
  memset(&sv, 0, sizeof sv);
  if (sel != nullptr) sv = *sel;
  const int n = sel != nullptr ? (int)a->n : (int)plan->n;
  kern<<<(unsigned)nwin, 32, group_smem(nw, blocks, blocks * R), st>>>(
      plan != nullptr ? (const int2 *)plan->spans : nullptr, plan != nullptr ? plan->nspans : nullptr, sv, n, a->S,
      a->G, a->Skv, R, ord, ubits, (int)fwd_nw(a->Skv), claim);
  return cudaGetLastError();
}

// The request dtype of a 16-bit element type.
inline nsa_dtype_t dtype_of(const __half *) { return NSA_F16; }
inline nsa_dtype_t dtype_of(const __nv_bfloat16 *) { return NSA_BF16; }

template <typename T>
cudaError_t launch_t(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_fwd_rows_t *M, int32_t *ord,
                     const nsa_cuda_selview_t *sel, cudaEvent_t plan_ready, cudaStream_t st) {
  if (ord != nullptr && !group_ok(a->Skv, M->rows, M->group)) ord = nullptr;  // (M->group 0: t order)
  unsigned *ub = nullptr;
  const bool persist = ord != nullptr && M->early && M->persist && M->rows == 11 && a->Dk == 128;
  // The persistent kernel's step orders (launch_step_order, after the plan).
  unsigned short *so = persist && M->order ? sord_of(a, M, ord) : nullptr;
  if (ord != nullptr) {
    ub = M->early ? ubits_of(a, ord) : nullptr;
    const cudaError_t e =
        launch_group(a, sel != nullptr ? nullptr : plan, sel, M->rows, M->group, ord, ub,
                     persist ? claim_of(a, M, ord) : nullptr, st);
    if (e != cudaSuccess) return e;
  }
  if (plan_ready != nullptr) {  // the planner ran beside the grouping (ctx.cu)
    const cudaError_t e = cudaStreamWaitEvent(st, plan_ready, 0);
    if (e != cudaSuccess) return e;
  }
  if (a->Dk == 192)
    return M->rows == 9
               ? launch_rows<T, 9, false, nsa_cuda_attn_t, false, 192>(a, plan, M, st, nullptr, nullptr, ord, ub)
               : launch_rows<T, 11, false, nsa_cuda_attn_t, false, 192>(a, plan, M, st, nullptr, nullptr, ord, ub);
  if (persist) {
    if (so != nullptr) {  // from the plan's spans (after plan_ready)
      const cudaError_t e = launch_step_order(a, plan, M->rows, ord, ub, so, st);
      if (e != cudaSuccess) return e;
    }
    return launch_fwd_rows_persist(a, dtype_of(static_cast<const T *>(nullptr)), plan, M, ord, ub, so,
                                   claim_of(a, M, ord), st);
  }
  return M->rows == 15 ? launch_rows<T, 15, false>(a, plan, M, st, nullptr, nullptr, ord, ub)
                       : launch_rows<T, 11, false>(a, plan, M, st, nullptr, nullptr, ord, ub);
}

// cuTensorMapEncodeTiled through the runtime's driver entry point, so no
// binary links libcuda itself (nsad and the tests start on machines without
// a GPU driver); NULL when the driver does not have it.
PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  PFN_cuTensorMapEncodeTiled_v12000 f = __atomic_load_n(&fn, __ATOMIC_ACQUIRE);
  if (f != nullptr) return f;
  void *p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess || p == nullptr) {
    cudaGetLastError();
    return nullptr;
  }
  f = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  __atomic_store_n(&fn, f, __ATOMIC_RELEASE);
  return f;
}

// A 4-D tensor map over a [B][N2][N1][D] tensor (dims innermost first {D,
// N1, N2, B}, strides st = {b, n2, n1} in elements, the last dimension
// contiguous), box {64 elements, box1, box2, 1}, 128-byte swizzle. A
// dimension of size 1 gets the contiguous stride (its stride is never used;
// the encoder wants every stride a positive multiple of 16 bytes).
int encode4(CUtensorMap *m, CUtensorMapDataType dt, const void *base, const int64_t *st, int64_t B, int64_t N2,
            int64_t N1, int64_t D, unsigned box1, unsigned box2) {
  PFN_cuTensorMapEncodeTiled_v12000 enc = encoder();
  if (enc == nullptr) return 0;
  const int64_t s1 = N1 == 1 ? D * 2 : st[2] * 2;
  const int64_t s2 = N2 == 1 ? N1 * s1 : st[1] * 2;
  const int64_t sb = B == 1 ? N2 * s2 : st[0] * 2;
  const int64_t strides[3] = {s1, s2, sb};
  for (int i = 0; i < 3; i++)
    if (strides[i] <= 0 || strides[i] % 16 != 0 || strides[i] >= (1ll << 40)) return 0;
  if (((uintptr_t)base & 15) != 0 || B > 0xffffffffll || N2 > 0xffffffffll || N1 > 0xffffffffll) return 0;
  cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)N1, (cuuint64_t)N2, (cuuint64_t)B};
  cuuint64_t gs[3] = {(cuuint64_t)s1, (cuuint64_t)s2, (cuuint64_t)sb};
  cuuint32_t box[4] = {64, box1, box2, 1};
  cuuint32_t es[4] = {1, 1, 1, 1};
  return enc(m, dt, 4, const_cast<void *>(base), dims, gs, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tensor-map element type of a 16-bit dtype (callers admit only bf16 and f16).
CUtensorMapDataType tma_dtype(nsa_dtype_t dt) {
  return dt == NSA_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
}

// K or V [B][Skv][G][D]: box {64 dims, 1 head, 64 keys, 1}.
int encode_kv(CUtensorMap *m, CUtensorMapDataType dt, const void *base, const int64_t *st, int64_t B, int64_t Skv,
              int64_t G, int64_t D) {
  return encode4(m, dt, base, st, B, Skv, G, D, 1, (unsigned)kT);
}

}  // namespace

namespace {

// What nsa_cuda_fwd_rows_plan and nsa_cuda_bwd_rows_plan share: the
// conditions, the tensor maps and the row-block order. env: the A/B knob
// (0 never, 1 wherever it can run). dk192: Dk = 192 is admitted (the
// forward's; the backward's dq instances are built for Dk = 128 only).
int rows_plan(int64_t h, int64_t Dk, int64_t Dv, int64_t n, int64_t B, int64_t S, int64_t G, int64_t Skv,
              const void *k, const int64_t *ks, const void *v, const int64_t *vs, nsa_dtype_t dt, int sel_kind,
              int32_t block_size, int aligned, int mode, const char *env, int dk192, nsa_cuda_fwd_rows_t *M) {
  memset(M, 0, sizeof(*M));
  const char *e = getenv(env);
  if (e && e[0] == '0') mode = 0;
  if (e && e[0] == '1') mode = 1;
  if (mode == 0 || !aligned || sel_kind != NSA_SEL_BLOCK_INDICES) return 0;
  if (dt != NSA_BF16 && dt != NSA_F16) return 0;
  if (h != 16 || !(Dk == 128 || (dk192 && Dk == 192)) || Dv != 128) return 0;
  if (n < 1 || n > 32 || B <= 0 || S <= 0 || G <= 0 || Skv <= 0) return 0;
  const int64_t NT = (Skv + kT - 1) / kT;
  if (NT > kNTmax || Skv > 0x7fffffff - kT) return 0;
  if (nsa_cuda_inv_row_bound_blocks(n, block_size, NT) > kMaxT) return 0;
  const int64_t NB = S;  // row blocks of at least one row
  if (B * G * NB > 0x7fffffffll || B * S * G * n > 0x7fffffffll) return 0;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (major < 9) return 0;
  const CUtensorMapDataType tdt = tma_dtype(dt);
  if (!encode_kv(&M->k, tdt, k, ks, B, Skv, G, Dk) || !encode_kv(&M->v, tdt, v, vs, B, Skv, G, Dv)) return 0;
  // Row-block order: while all (b, g)'s K and V fit in L2 (T = 16k, G = 4:
  // 34 MB), the widest row blocks of every (b, g) first (g fastest); past
  // L2, one (b, g) at a time (its K / V, 34 MB at T = 64k, stay in L2 while
  // its blocks run): H200, T = 64k h = 16 random 13.39 -> 13.10 ms, 16k
  // and 8k +0.2-0.6 % that way (docs/PERF.md). NSA_CUDA_FWD_ROWS_GMAJ=0|1
  // forces it (A/B).
  int l2 = 0;
  if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess) {
    cudaGetLastError();
    l2 = 0;
  }
  const double kv_bytes = (double)B * (double)G * (double)Skv * (double)(Dk + Dv) * 2.0;
  M->gmaj = l2 > 0 && kv_bytes > (double)l2;
  const char *ge = getenv("NSA_CUDA_FWD_ROWS_GMAJ");
  if (ge && (ge[0] == '0' || ge[0] == '1')) M->gmaj = ge[0] == '1';
  return 1;
}

}  // namespace

extern "C" int nsa_cuda_fwd_rows_plan(const nsa_cuda_attn_t *a, nsa_dtype_t dt, int sel_kind, int32_t block_size,
                                      int aligned, int mode, nsa_cuda_fwd_rows_t *M) {
  if (!rows_plan(a->h, a->Dk, a->Dv, a->n, a->B, a->S, a->G, a->Skv, a->k, a->ks, a->v, a->vs, dt, sel_kind,
                 block_size, aligned, mode, "NSA_CUDA_FWD_ROWS", 1, M))
    return 0;
  // A/B: rows per CTA, 11 or 15 (Dk = 128), 11 or 9 (Dk = 192)
  const char *re = getenv("NSA_CUDA_FWD_ROWS_R");
  const int r = re ? atoi(re) : 0;
  M->rows = r == (a->Dk == 192 ? 9 : 15) ? r : kRowsDefault;
  // Row grouping: windows of 8 row blocks (group_rows_kernel) up to 512
  // tiles per (b, g), of 64 blocks (fwd_rows_group_wide.cu) past that.
  // NSA_CUDA_FWD_ROWS_GROUP=0 (or not a number) turns it off, =8, 16, 32,
  // 64 or 128 takes that window where it fits (else 8). H200, h = 16 random, forward ms
  // (docs/PERF.md, session 25): 64k 11.54 (8 blocks) / 11.20 (64) / 11.70
  // (128: one CTA per SM, two waves); 16k 2.33 (8) / 2.84 (128).
  const char *ge = getenv("NSA_CUDA_FWD_ROWS_GROUP");
  const int64_t NT = (a->Skv + kT - 1) / kT;
  M->group = NT > 512 && group_ok(a->Skv, M->rows, 64) ? 64 : 8;
  if (ge != nullptr) {
    const int want = atoi(ge);
    M->group = want == 0 || group_ok(a->Skv, M->rows, want) ? want : 8;
  }
  if (M->group != 0 && !group_ok(a->Skv, M->rows, M->group)) M->group = 0;
  // With the grouping, its union per row block lets each CTA's producer
  // start streaming before the lists (fwd_rows_kernel, ubits);
  // NSA_CUDA_FWD_ROWS_EARLY=0 turns that off (A/B).
  const char *ee = getenv("NSA_CUDA_FWD_ROWS_EARLY");
  M->early = M->group != 0 && !(ee && ee[0] == '0');
  // With them, at Dk = 128 and 11 rows, the persistent forward
  // (fwd_rows_persist.cu; H200, T = 16k h = 16 random -3 %, corr -6 %,
  // docs/PERF.md). NSA_CUDA_FWD_ROWS_PERSIST=0 turns it off, =N > 1 runs N
  // CTAs (the tests: many row blocks per CTA).
  const char *pe = getenv("NSA_CUDA_FWD_ROWS_PERSIST");
  const int pn = pe ? atoi(pe) : 1;
  M->persist = M->early && a->Dk == 128 && M->rows == 11 && pn > 0 ? pn : 0;
  // With it, each block's tiles in the step order of fwd_rows_order.cu
  // (rows spread over the ring). NSA_CUDA_FWD_ROWS_ORDER=0|1 overrides.
  const char *oe = getenv("NSA_CUDA_FWD_ROWS_ORDER");
  M->order = M->persist && (oe ? oe[0] == '1' : NT > 512);
  return 1;
}

extern "C" int nsa_cuda_bwd_rows_plan(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int sel_kind, int32_t block_size,
                                      int aligned, nsa_cuda_fwd_rows_t *M) {
  if (!rows_plan(a->h, a->Dk, a->Dv, a->n, a->B, a->S, a->G, a->Skv, a->k, a->ks, a->v, a->vs, dt, sel_kind,
                 block_size, aligned, -1, "NSA_CUDA_BWD_ROWS", 0, M))
    return 0;
  M->rows = kRowsBwd;
  return 1;
}

extern "C" cudaError_t nsa_cuda_fwd_rows_group(const nsa_cuda_attn_t *a, const nsa_plan_t *plan,
                                               const nsa_cuda_selview_t *sel, int rows, int blocks, int32_t *ord,
                                               unsigned *ubits, cudaStream_t st) {
  // The slots per row that the kernel reads: a->n of sel, plan->n of spans.
  const int64_t n = sel != nullptr ? a->n : plan != nullptr ? plan->n : 0;
  if (!group_ok(a->Skv, rows, blocks) || n < 1 || n > 32) return cudaErrorInvalidValue;
  if (sel != nullptr && (sel->data == nullptr || (sel->kind != NSA_SEL_BLOCK_INDICES && sel->kind != NSA_SEL_RANGES) ||
                         (sel->kind == NSA_SEL_BLOCK_INDICES && sel->block_size < 1)))
    return cudaErrorInvalidValue;
  return launch_group(a, sel != nullptr ? nullptr : plan, sel, rows, blocks, ord, ubits, nullptr, st);
}

extern "C" cudaError_t nsa_cuda_fwd_rows_step_order(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, int rows,
                                                    const int32_t *ord, const unsigned *ubits, unsigned short *sord,
                                                    cudaStream_t st) {
  return launch_step_order(a, plan, rows, ord, ubits, sord, st);
}

extern "C" size_t nsa_cuda_fwd_rows_ws_bytes(const nsa_cuda_attn_t *a, const nsa_cuda_fwd_rows_t *M) {
  if (!M->group) return 0;
  size_t bytes = (size_t)a->B * (size_t)a->G * (size_t)a->S * sizeof(int32_t);
  if (M->early) bytes = ((bytes + 15) & ~(size_t)15) + ((ubits_bytes(a, M->rows) + 15) & ~(size_t)15) + 16;
  if (M->early && M->order) bytes += sord_bytes(a, M->rows);
  return bytes;
}

extern "C" cudaError_t nsa_cuda_launch_fwd_rows(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                                const nsa_cuda_fwd_rows_t *M, int32_t *ord,
                                                const nsa_cuda_selview_t *sel, cudaEvent_t plan_ready,
                                                cudaStream_t st) {
  switch (dt) {
    case NSA_BF16: return launch_t<__nv_bfloat16>(a, plan, M, ord, sel, plan_ready, st);
    case NSA_F16: return launch_t<__half>(a, plan, M, ord, sel, plan_ready, st);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t nsa_cuda_launch_bwd_dq_rows(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                                   const nsa_cuda_fwd_rows_t *M, float *delta_out, float *lsec_out,
                                                   cudaStream_t st) {
  switch (dt) {
    case NSA_BF16:
      if (a->ds != nullptr) return launch_rows<__nv_bfloat16, kRowsDS, true, nsa_cuda_bwd_t, true>(a, plan, M, st);
      return launch_rows<__nv_bfloat16, kRowsBwd, true>(a, plan, M, st, delta_out, lsec_out);
    case NSA_F16:
      if (a->ds != nullptr) return launch_rows<__half, kRowsDS, true, nsa_cuda_bwd_t, true>(a, plan, M, st);
      return launch_rows<__half, kRowsBwd, true>(a, plan, M, st, delta_out, lsec_out);
    default: return cudaErrorInvalidValue;
  }
}

// fwd_rows.h: Q or dO [B][S][H][D] (strides st = {b, s, head} in elements),
// box {64 dims, `heads` heads, 1 row, 1}, 128-byte swizzle.
extern "C" int nsa_cuda_tma_heads_map(CUtensorMap *m, nsa_dtype_t dt, const void *base, const int64_t *st, int64_t B,
                                      int64_t S, int64_t H, int64_t D, int heads) {
  if ((dt != NSA_BF16 && dt != NSA_F16) || heads < 1 || heads > 256 || heads > H || D < 64) return 0;
  return encode4(m, tma_dtype(dt), base, st, B, S, H, D, (unsigned)heads, 1);
}
