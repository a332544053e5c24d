// bwd_dkdv_wgmma.cu — dk/dv (and the key-centric dq partials) on Hopper's
// warpgroup MMA (wgmma, sm_90a): the same items, inputs and outputs as
// dkdv_mma_kernel in bwd_dkdv.cu, for bf16/f16 with Dk = Dv = 128, 4 <= h <= 32.
//
// Why a second kernel: the mma.sync kernel gives each warp 16 of the tile's
// 64 keys, so every warp re-reads the chunk's Q and dO fragments from shared
// memory for each of its four products (~165 TFLOP/s counting selected keys
// at h = 16 on an H200). A warpgroup's wgmma computes all 64 keys at once and
// reads each B operand once for the four warps.
//
// One CTA = one warpgroup (128 threads) per item (64-key tile x, segment of
// x's row list; bwd_invert_plan.cu), two CTAs per SM (~110 KB of shared
// memory each), so one CTA's exp / gather instructions overlap the other's
// MMAs (one CTA per SM with 64-column chunks issued 0.8 instructions per
// cycle, one warp per scheduler, and lost to mma.sync except at h = 16
// random). A chunk is 32 columns: Pk = 32 / h listed rows x h heads,
// column m = (listed row cb*Pk + m / h, head m % h).
// Per chunk (keys = the tile's 64 keys; K, V and the chunk's Q, dO in the
// SW128 layout of wgmma.cuh, sDS in its CM layout; either way one stored
// tile serves as K-major and MN-major operand):
//   S^T  [64 keys x 32 cols] = K . Q_c^T      A = sK, B = sQ   (K-major); in the
//        instance without dq, A = K's fragments in registers (KR, below)
//   dP^T [64 keys x 32 cols] = V . dO_c^T     A = sV, B = sO   (K-major)
//   P^T  = key in the row's set ? exp2(S^T*scale*log2e - lse*log2e) : 0
//   dS^T = P^T o (dP^T - delta)
//   dV [64 x 128] += P^T . dO_c               A = P^T (registers), B = sO (MN-major)
//   dK [64 x 128] += dS^T . Q_c               A = dS^T (registers), B = sQ (MN-major)
//   DQ: dQ_c^T [128 d x 32 cols] = K^T . dS^T A = sK (MN-major), B = dS^T staged
//       in sDS (MN-major); two 64-row halves of d; stored as the pairs' f32
//       partials (dq_reduce sums them per row in pair order).
// The accumulator of a 64 x N wgmma puts, in warp w, lane l, element 4i + e at
// row 16w + l/4 + 8*(e >= 2), column 8i + 2*(l%4) + (e & 1) (the m16n8 layout
// per warp), which is also the register A layout of the next product: P^T and
// dS^T go from S^T / dP^T registers to A fragments without shared memory.
// With a.ds (h = 16, the instance without dq) dS^T is also stored, as the
// row-block dq's A fragments of dS K (store_ds below, bwd_internal.h).
// Chunks arrive through a kST-stage pipeline (kPF in flight, one barrier
// per chunk) of cp.async, or of TMA boxes on a per-stage mbarrier in the
// instance without dq; without dq, chunk ch's exp work runs while chunk
// ch - 1's dV / dK are on the tensor cores (H200: -0.7 % at 16k h = 16).
// Fixed summation order: bitwise deterministic.
#include <stdlib.h>
#include <string.h>

#include "bwd_dkdv.cuh"
#include "fwd_rows.h"
#include "mbar.cuh"
#include "wgmma.cuh"

using namespace nsa_bwd;

namespace {

constexpr int kT = NSA_BWD_TILE;  // 64 keys
constexpr int kD = 128;           // Dk = Dv
constexpr int kNC = 32;           // columns per chunk
constexpr int kST = 4;            // stages
constexpr int kPF = kST - 2;      // chunks in flight (see bwd_dkdv.cu: one barrier per chunk)
constexpr int kWin = 192;         // rows of a segment staged at a time
constexpr int kThreads = 128;     // one warpgroup

struct Smem {
  static constexpr int tile = kT * kD * 2;        // K or V: 64 x 128 bf16, SW128 layout
  static constexpr int ctile = kNC * kD * 2;      // a chunk's Q or dO: 32 x 128
  static constexpr size_t k_off = 0;
  static constexpr size_t v_off = k_off + tile;
  static constexpr size_t q_off = v_off + tile;   // [kST] chunk Q
  static constexpr size_t o_off = q_off + (size_t)kST * ctile;    // [kST] chunk dO
  static constexpr size_t ds_off = o_off + (size_t)kST * ctile;   // dS^T [64 keys][32 cols] CM
  static constexpr size_t mk_off = ds_off + kT * kNC * 2;         // [kST][32] u64 key masks
  static constexpr size_t l_off = mk_off + kST * kNC * 8;         // [kST][32] f32 lse
  static constexpr size_t d_off = l_off + kST * kNC * 4;          // [kST][32] f32 delta
  static constexpr size_t dm_off = d_off + kST * kNC * 4;         // [kST] u32: columns needing dq
  static constexpr size_t dq_off = dm_off + kST * 8;              // [kST][32] i64 column's dq partial offset
  static constexpr size_t wm_off = dq_off + kST * kNC * 8;        // [kWin] u64 window masks
  static constexpr size_t wv_off = wm_off + kWin * 8;             // [kWin] i32 rows
  static constexpr size_t wt_off = wv_off + kWin * 4;             // [kWin] i32 t (bit 31: shared-tile row)
  static constexpr size_t wp_off = wt_off + kWin * 4;             // [kWin] i32 pair index (dq slot)
  static constexpr size_t wq_off = wp_off + kWin * 4;             // [kWin] i64 row's Q element offset (head g*h)
  static constexpr size_t wo_off = wq_off + kWin * 8;             // [kWin] i64 row's dO element offset
  static constexpr size_t fb_off = wo_off + kWin * 8;             // [kST] u64 mbarriers: stage's Q / dO landed (TMA)
  static constexpr size_t bytes = fb_off + kST * 8 + 1024;  // + slack to align the base to 1024 (SW128)
};
// Two CTAs per SM: 2 x (bytes + 1 KB reserved per CTA) within the SM's 228 KB.
static_assert(2 * (Smem::bytes + 1024) <= 228 * 1024, "dkdv_wg_kernel: two CTAs per SM no longer fit");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// An 8 x 8 matrix of 16-bit elements transposed across the warp: lane l
// holds row l / 4, columns 2 (l % 4), + 1 in and out.
__device__ __forceinline__ unsigned movt(unsigned x) {
  unsigned y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Descriptors of an SW128 tile of R rows x 128 columns (K / V: R = 64, a
// chunk's Q / dO: R = 32) at shared address a, K-major (columns = K) and
// MN-major (rows = K), and their k16 step ks (wgmma.cuh; ks is a
// compile-time constant in the unrolled loops, so a step is one add).
__device__ __forceinline__ unsigned long long dk_base(unsigned a) { return nsa_wg::desc_sw(a, 16, 1024); }
template <int R> __device__ __forceinline__ unsigned long long dmn_base(unsigned a) {
  return nsa_wg::desc_sw(a, R * 128, 1024);
}
template <int R> __device__ __forceinline__ unsigned long long dk_major(unsigned long long d, int ks) {
  return nsa_wg::desc_adv(d, (ks >> 2) * R * 128 + (ks & 3) * 32);
}
__device__ __forceinline__ unsigned long long dmn_major(unsigned long long d, int ks) {
  return nsa_wg::desc_adv(d, ks * 2048);
}
#endif

// TMA: a chunk's Q / dO columns arrive as TMA boxes (tensor maps tq / tdo,
// nsa_cuda_tma_heads_map: one listed row's h heads x 64 dims per box) that
// lanes of warp 1 issue, instead of 16-byte cp.async by every thread; h is
// 8, 16 or 32, so every box starts 1024-byte aligned in the SW128 chunk tile
// and the TMA unit's 128-byte swizzle is the layout's. Only the instance
// without dq is launched with TMA (launch below).
template <typename T, bool DQ, bool TMA, bool KR = false>
__global__ void __launch_bounds__(kThreads, 2)
    dkdv_wg_kernel(nsa_cuda_bwd_t a, Inv iv, float *__restrict__ part, float *__restrict__ dqp, int Pk,
                   const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tdo) {
  static_assert(!(DQ && TMA), "the dq instance gathers by cp.async only (launch below)");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Smem;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // SW128 tiles need a 1024-byte aligned base (Smem::bytes has the slack).
  unsigned char *smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  unsigned char *sQb = smem + L::q_off, *sOb = smem + L::o_off;
  unsigned long long *sMk = reinterpret_cast<unsigned long long *>(smem + L::mk_off);
  float *sL = reinterpret_cast<float *>(smem + L::l_off);
  float *sD = reinterpret_cast<float *>(smem + L::d_off);
  unsigned *sDqm = reinterpret_cast<unsigned *>(smem + L::dm_off);
  long long *sDqo = reinterpret_cast<long long *>(smem + L::dq_off);
  unsigned long long *wMk = reinterpret_cast<unsigned long long *>(smem + L::wm_off);
  int *wRow = reinterpret_cast<int *>(smem + L::wv_off);
  int *wT = reinterpret_cast<int *>(smem + L::wt_off);
  int *wP = reinterpret_cast<int *>(smem + L::wp_off);
  long long *wQo = reinterpret_cast<long long *>(smem + L::wq_off);
  long long *wOo = reinterpret_cast<long long *>(smem + L::wo_off);
  const unsigned kA = smem_u32(smem + L::k_off), vA = smem_u32(smem + L::v_off);
  const unsigned qA0 = smem_u32(sQb), oA0 = smem_u32(sOb), dsA = smem_u32(smem + L::ds_off);
  const unsigned fullA = smem_u32(smem + L::fb_off);  // stage s's barrier at fullA + 8 s
  // Descriptors: K / V (K-major), K (MN-major, the dq), stage 0's Q / dO
  // (K-major and MN-major; stage stg is + stg * ctile bytes), sDS.
  const unsigned long long dK = dk_base(kA), dV = dk_base(vA), dKmn = dmn_base<kT>(kA);
  const unsigned long long dQk0 = dk_base(qA0), dOk0 = dk_base(oA0);
  const unsigned long long dQmn0 = dmn_base<kNC>(qA0), dOmn0 = dmn_base<kNC>(oA0);
  const unsigned long long dDS = nsa_wg::desc(dsA, 512, 128);

  int64_t x;
  int seg, nseg;
  if (!find_item(iv, blockIdx.x, &x, &seg, &nseg)) return;
  const bool bad = a.invalid != nullptr && *a.invalid > 0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t kt = x % iv.NT, bg = x / iv.NT, g = bg % a.G, b = bg / a.G;
  const int k0 = (int)(kt * kT);
  const int t1 = iv.tile_off[x + 1];
  const int lo = iv.tile_off[x] + seg * iv.seg_rows, hi = bad ? lo : min(t1, lo + iv.seg_rows);
  if (hi <= lo && !bad && iv.acc != nullptr) return;  // row batches: no rows here, nothing to add
  const float LOG2E = 1.4426950408889634f;
  const float c2 = a.scale * LOG2E;
  const int h = (int)a.h;
  const bool h_pow2 = (h & (h - 1)) == 0;
  const int h_lg = __ffs(h) - 1;

  // Plain cp.async here: with the L2 cache-hint form (cp_async16p) ptxas 13.0
  // emitted, for sm_90a, an LDGSTS whose policy operand sat in an odd uniform
  // register, which the H200 rejected as an illegal instruction.
  // Gathers (K / V rows, a chunk's Q / dO columns; 256 bytes each) into the
  // SW128 layout: copy rg of a thread is 16-byte piece pc of row rg * 8 + r8,
  // so a warp's 32 copies are one 128-byte half of 4 rows: 4 whole L2 lines
  // into 4 swizzled 128-byte shared rows (conflict-free; each sector lands in
  // one 32-byte piece, wgmma.cuh). The CM layout split every sector: one L2
  // request per 16-byte copy, L2 tag lookups 89 % of peak at 16k h = 16.
  const int r8 = ((warp & 1) << 2) + ((tid >> 3) & 3), pc = ((warp >> 1) << 3) + (tid & 7);
  if (hi > lo) {
    const T *kb = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
    const T *vb = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];
#pragma unroll
    for (int rg = 0; rg < kT / 8; rg++) {
      const int kk = rg * 8 + r8, tok = k0 + kk;
      const bool ok = tok < a.Skv;
      const int off = nsa_wg::sw_off(kk, pc, kT);
      cp_async16(kA + off, ok ? kb + (int64_t)tok * a.ks[1] + pc * 8 : kb, ok ? 16 : 0);
      cp_async16(vA + off, ok ? vb + (int64_t)tok * a.vs[1] + pc * 8 : vb, ok ? 16 : 0);
    }
  }

  float dk[64], dv[64];
#pragma unroll
  for (int i = 0; i < 64; i++) dk[i] = dv[i] = 0.f;
  const int kr0 = warp * 16 + (lane >> 2), cq = (lane & 3) * 2;  // accumulator row / column base

  // The gather's per-thread column constants (chunk-invariant): copy rg
  // takes column m = rg * 8 + r8 of every chunk, i.e. listed row ch * Pk +
  // cmq[rg] and head j, at element wQo / wOo + cjq / cjo[rg] (head j's
  // stride plus this thread's 16-byte piece). Computed per chunk they were
  // ~10 instructions per copy of a ~690-instruction chunk step (SASS, h = 16
  // instance); hoisted, H100 backward 16k h = 16 random 6.70 -> 6.58 ms,
  // 8k h = 8 random 2.417 -> 2.395 (docs/PERF.md).
  int cmq[kNC / 8];
  int64_t cjq[kNC / 8], cjo[kNC / 8];
#pragma unroll
  for (int rg = 0; rg < kNC / 8; rg++) {
    const int m = rg * 8 + r8;
    const int mq = h_pow2 ? m >> h_lg : m / h;
    const int j = m - mq * h;
    cmq[rg] = mq;
    cjq[rg] = (int64_t)j * a.qs[2] + pc * 8;
    cjo[rg] = (int64_t)j * a.dos[2] + pc * 8;
  }
  // Warp 0's column-data copy (one column per thread, tid < kNC): the same
  // split of column m = tid into listed row and head, also chunk-invariant.
  const int tmq = h_pow2 ? tid >> h_lg : tid / h, tj = tid - tmq * h;
  // TMA: stage s's barrier completes once per fill (count 1: the issuing
  // thread's arrive_expect_tx, plus the boxes' bytes); every thread waits
  // for each fill in order, so bit s of fph is the parity of stage s's next
  // phase. The window loop's first barrier publishes the init.
  unsigned fph = 0;
  // KR: K's A fragments of S^T in registers for the whole item (warp w: keys
  // 16w .. 16w + 15, the m16n8k16 A layout per k16 step: 32 registers),
  // loaded once by ldmatrix after the K / V gather, instead of read from
  // shared memory by every chunk's S^T: 16 KB of a chunk's ~80 KB of
  // shared-memory traffic (K, Q, V, dO as operands, Q / dO landing). H100,
  // same call: backward 16k h = 16 random -1.6 %, 64k -2 to -3 %; 220 -> 254
  // registers, no spill. In the dq instance it spilled (255 registers) and
  // was 1-2 % slower at h = 4 / 8 random, so there it is off (docs/PERF.md).
  unsigned kf[KR ? kD / 16 : 1][4];
  if constexpr (KR) {
    cp_commit();
    cp_wait<0>();
    __syncthreads();  // every thread's K pieces
#pragma unroll
    for (int ks = 0; ks < kD / 16; ks++)
      ldsm_x4(kA + nsa_wg::sw_off(warp * 16 + (lane & 15), 2 * ks + (lane >> 4), kT), kf[ks][0], kf[ks][1], kf[ks][2],
              kf[ks][3]);
  }
  if (TMA && tid == 0) {
#pragma unroll
    for (int s = 0; s < kST; s++) nsa_mbar::init(fullA + 8 * s, 1);
    nsa_mbar::init_fence();
  }
  for (int w0 = lo; w0 < hi; w0 += kWin) {
    const int w1 = min(hi, w0 + kWin);
    nsa_wg::wait<0>();  // the previous window's last products no longer read their stages
    __syncthreads();    // the previous window's rows are no longer read
    for (int i = tid; i < w1 - w0; i += kThreads) {
      const int r = iv.vals[w0 + i];
      wRow[i] = r;
      const bool sk = DQ && iv.skip != nullptr && iv.skip[r];
      const int64_t t = (r / (int)a.G) % (int)a.S;
      wT[i] = (int)((unsigned)t | (sk ? 0x80000000u : 0u));
      wMk[i] = iv.masks[w0 + i];
      if (DQ || a.ds != nullptr) wP[i] = iv.pidx[w0 + i];
      // once per row, not per gathered 16 bytes: the prep adds head * stride
      if constexpr (!TMA) {
        wQo[i] = b * a.qs[0] + t * a.qs[1] + g * a.h * a.qs[2];
        wOo[i] = b * a.dos[0] + t * a.dos[1] + g * a.h * a.dos[2];
      }
    }
    __syncthreads();
    const int nch = (w1 - w0 + Pk - 1) / Pk;

    auto prep = [&](int ch, int stg) {
      const T *q = reinterpret_cast<const T *>(a.q);
      const T *dout = reinterpret_cast<const T *>(a.dout);
      const unsigned qd = qA0 + stg * L::ctile, od = oA0 + stg * L::ctile;
      if constexpr (TMA) {
        // Listed row mq's h heads are columns mq * h .. mq * h + h - 1: per
        // 64-dim half hf one box at row mq * h of box hf of the SW128 tile.
        // Warp 1's lane 4 mq + 2 hf + (0: Q, 1: dO) issues one box (Pk <= 4
        // rows) after lane 0 announced the chunk's bytes. Rows past the
        // window load row S, outside the tensor: zero-filled (and counted),
        // as the cp.async path's src-size 0.
        if (warp == 1) {
          const unsigned bar = fullA + 8 * stg;
          if (lane == 0) nsa_mbar::arrive_expect_tx(bar, 2 * L::ctile);
          __syncwarp();
          if (lane < 4 * Pk) {
            const int mq = lane >> 2, hf = (lane >> 1) & 1, wi = ch * Pk + mq;
            const int t = w0 + wi < w1 ? (int)((unsigned)wT[wi] & 0x7fffffffu) : (int)a.S;
            const unsigned off = hf * (kNC * 128) + mq * h * 128;
            nsa_mbar::tma_load_4d(((lane & 1) ? od : qd) + off, (lane & 1) ? (const void *)&tdo : (const void *)&tq,
                                  hf * 64, (int)(g * h), t, (int)b, bar);
          }
        }
      } else {
#pragma unroll
        for (int rg = 0; rg < kNC / 8; rg++) {
          const int m = rg * 8 + r8;
          const int wi = ch * Pk + cmq[rg];
          const bool ok = cmq[rg] < Pk && w0 + wi < w1;
          const T *qs = q, *os = dout;
          if (ok) {
            qs = q + wQo[wi] + cjq[rg];
            os = dout + wOo[wi] + cjo[rg];
          }
          const int off = nsa_wg::sw_off(m, pc, kNC);
          cp_async16(qd + off, qs, ok ? 16 : 0);
          cp_async16(od + off, os, ok ? 16 : 0);
        }
      }
      if (tid < kNC) {  // column tid of the chunk: listed row ch * Pk + tmq, head tj
        const int wi = ch * Pk + tmq, j = tj;
        const bool ok = tmq < Pk && w0 + wi < w1;
        const int64_t idx = ok ? (int64_t)wRow[wi] * a.h + j : 0;
        sMk[stg * kNC + tid] = ok ? wMk[wi] : 0ull;
        cp_async4(smem_u32(sL + stg * kNC + tid), a.lsec + idx, ok ? 4 : 0);
        cp_async4(smem_u32(sD + stg * kNC + tid), a.delta + idx, ok ? 4 : 0);
        if (DQ) {  // bit m: column m needs its dq partial (warp 0), at element sDqo[m] of dqp
          const bool nd = ok && wT[wi] >= 0;
          const unsigned need = __ballot_sync(0xffffffffu, nd);
          if (lane == 0) sDqm[stg] = need;
          sDqo[stg * kNC + tid] = nd ? ((long long)wP[wi] * a.h + j) * kD : 0;
        }
      }
    };

    // S^T = K . Q_c^T and dP^T = V . dO_c^T of the chunk in stage stg (one
    // commit group; the caller waits).
    auto issue_sdp = [&](int stg, float(&s)[16], float(&dp)[16]) {
      const unsigned long long dQ = nsa_wg::desc_adv(dQk0, stg * L::ctile), dO = nsa_wg::desc_adv(dOk0, stg * L::ctile);
      nsa_wg::fence();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ks++) {
        if constexpr (KR) nsa_wg::rs_m64n32k16<0>((T *)nullptr, s, kf[ks], dk_major<kNC>(dQ, ks), ks > 0);
        else nsa_wg::ss_m64n32k16<0, 0>((T *)nullptr, s, dk_major<kT>(dK, ks), dk_major<kNC>(dQ, ks), ks > 0);
      }
#pragma unroll
      for (int ks = 0; ks < kD / 16; ks++)
        nsa_wg::ss_m64n32k16<0, 0>((T *)nullptr, dp, dk_major<kT>(dV, ks), dk_major<kNC>(dO, ks), ks > 0);
      nsa_wg::commit();
    };
    // A thread's column data of a chunk: its 8 columns 8i + cq + c (i < 4,
    // c < 2) and its keys kr0, kr0 + 8 as w = the column's key mask >> kr0
    // (bit 0: key kr0, bit 8: key kr0 + 8), l = lse * log2(e), d = delta,
    // in 16- and 8-byte loads (cq is even). The dq instance loads them right
    // after issuing S^T / dP^T, so they wait under the products (H100, T = 8k
    // h = 8 random backward 2.431 / 2.428 -> 2.417 / 2.409 ms, docs/PERF.md);
    // the instance without dq loads them after its wait: across its
    // pipelined products 24 more live registers made it slower (16k h = 16
    // random 6.72 -> 6.92).
    struct Cols {
      unsigned w[kNC / 8][2];
      float l[kNC / 8][2], d[kNC / 8][2];
    };
    auto load_cols = [&](int stg, Cols &cd) {
      const unsigned long long *mk = sMk + stg * kNC;
      const float *ls = sL + stg * kNC, *dl = sD + stg * kNC;
#pragma unroll
      for (int i = 0; i < kNC / 8; i++) {
        const ulonglong2 m2 = *reinterpret_cast<const ulonglong2 *>(mk + i * 8 + cq);
        const float2 l2 = *reinterpret_cast<const float2 *>(ls + i * 8 + cq);
        const float2 d2 = *reinterpret_cast<const float2 *>(dl + i * 8 + cq);
        cd.w[i][0] = (unsigned)(m2.x >> kr0);
        cd.w[i][1] = (unsigned)(m2.y >> kr0);
        cd.l[i][0] = l2.x * LOG2E;
        cd.l[i][1] = l2.y * LOG2E;
        cd.d[i][0] = d2.x;
        cd.d[i][1] = d2.y;
      }
    };
    // p = P^T, ds = dS^T from s = S^T, dp = dP^T (rows = keys kr0, kr0 + 8;
    // columns of the chunk). Not in place: an accumulator register written
    // while another product runs makes ptxas serialize all wgmma (C7515).
    // The caller has just retired the product that wrote s / dp.
    auto grads = [&](const Cols &cd, float(&s)[16], float(&dp)[16], float(&p)[16], float(&ds)[16]) {
      nsa_wg::reg_fence(s);
      nsa_wg::reg_fence(dp);
#pragma unroll
      for (int i = 0; i < kNC / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int c = e & 1;
          const bool in = (cd.w[i][c] >> ((e >> 1) * 8)) & 1u;
          const float pv = in ? ex2(fmaf(s[i * 4 + e], c2, -cd.l[i][c])) : 0.f;
          ds[i * 4 + e] = pv * (dp[i * 4 + e] - cd.d[i][c]);
          p[i * 4 + e] = pv;
        }
    };
    // P^T, dS^T -> the A fragments of dV / dK: n8 block i is half (i & 1) of
    // k-step i / 2. Written only while no product is in flight (an A register
    // written under a running wgmma makes ptxas serialize them all).
    auto pack = [&](const float(&p)[16], const float(&ds)[16], unsigned(&pa)[kNC / 16][4],
                    unsigned(&da)[kNC / 16][4]) {
#pragma unroll
      for (int i = 0; i < kNC / 8; i++)
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
          pa[i >> 1][(i & 1) * 2 + rh] = Mma<T>::pack(p[i * 4 + rh * 2], p[i * 4 + rh * 2 + 1]);
          da[i >> 1][(i & 1) * 2 + rh] = Mma<T>::pack(ds[i * 4 + rh * 2], ds[i * 4 + rh * 2 + 1]);
        }
    };
    // dV += P^T . dO_c, dK += dS^T . Q_c (one commit group).
    auto issue_dvdk = [&](int stg, const unsigned(&pa)[kNC / 16][4], const unsigned(&da)[kNC / 16][4]) {
      const unsigned long long dQ = nsa_wg::desc_adv(dQmn0, stg * L::ctile), dO = nsa_wg::desc_adv(dOmn0, stg * L::ctile);
      nsa_wg::fence();
#pragma unroll
      for (int kk = 0; kk < kNC / 16; kk++) nsa_wg::rs_m64n128k16<1>((T *)nullptr, dv, pa[kk], dmn_major(dO, kk), 1);
#pragma unroll
      for (int kk = 0; kk < kNC / 16; kk++) nsa_wg::rs_m64n128k16<1>((T *)nullptr, dk, da[kk], dmn_major(dQ, kk), 1);
      nsa_wg::commit();
    };

    // The row-block dq from dS (nsa_cuda_bwd_t::ds; h = 16, so a chunk is
    // listed rows 2 ch and 2 ch + 1, 16 heads each): this warp's keys
    // 16 warp .. 16 warp + 15 are k-step kk = warp of that dq's dS K. The
    // 8 x 8 block (i, rh) of dS^T in dt (keys 8 rh + (0..7), columns 8i ..
    // 8i + 7) transposed by movmatrix is, per lane, the A-fragment register
    // of head 8 (i & 1) + lane / 4 and keys 8 rh + 2 (lane % 4), + 1: a0 / a2
    // from i = 2 mr (heads 0..7), a1 / a3 from i = 2 mr + 1, rh = 0 / 1. One
    // 16-byte store per lane and listed row: 512 contiguous bytes per warp.
    auto store_ds = [&](int ch, const unsigned(&dt)[kNC / 16][4]) {
      uint4 *dsb = reinterpret_cast<uint4 *>(a.ds);
#pragma unroll
      for (int mr = 0; mr < kNC / 16; mr++) {
        const int wi = ch * (kNC / 16) + mr;
        if (w0 + wi < w1) {
          uint4 f;
          f.x = movt(dt[mr][0]);
          f.y = movt(dt[mr][2]);
          f.z = movt(dt[mr][1]);
          f.w = movt(dt[mr][3]);
          __stcs(dsb + ((int64_t)wP[wi] * 4 + warp) * 32 + lane, f);
        }
      }
    };

#pragma unroll
    for (int c = 0; c < kPF; c++) {
      if (c < nch) prep(c, c);
      cp_commit();
    }
    if constexpr (!DQ) {
      // Software pipeline (no dq): step ch issues chunk ch's S^T / dP^T and
      // then chunk ch - 1's dV / dK, so chunk ch's exp work (P^T, dS^T)
      // runs while the tensor cores do chunk ch - 1's dV / dK. ptxas
      // serializes every wgmma if a register that some wgmma reads (an A
      // fragment) or writes (an accumulator) is written by another
      // instruction while any wgmma is in flight (C7513 / C7515): so P^T /
      // dS^T are packed into pt / dt, and moved into the A fragments pa / da
      // (prmt, which ptxas cannot fold into the pack) once dV / dK retired.
      // Stages at step ch: ch - 1 (dV / dK), ch (S^T / dP^T), ch + 1
      // (landed or landing), ch + 2 (filled after the barrier, which every
      // thread passes only after retiring chunk ch - 2's dV / dK): kST = 4.
      unsigned pa[kNC / 16][4], da[kNC / 16][4];
      for (int ch = 0; ch < nch; ch++) {
        const int stg = ch % kST;
        cp_wait<kPF - 1>();     // chunk ch (prepped two steps back or in the prologue)
        nsa_wg::fence_proxy();  // this thread's cp.async data -> the tensor cores
        if constexpr (TMA) {
          nsa_mbar::wait(fullA + 8 * stg, (fph >> stg) & 1u);
          fph ^= 1u << stg;
        }
        __syncthreads();
        if (ch + kPF < nch) prep(ch + kPF, (ch + kPF) % kST);
        cp_commit();
        float s[16], dp[16];
        issue_sdp(stg, s, dp);
        if (ch > 0) {
          issue_dvdk((ch - 1) % kST, pa, da);
          nsa_wg::wait<1>();  // chunk ch's S^T / dP^T (chunk ch - 1's dV / dK run on)
        } else {
          nsa_wg::wait<0>();
        }
        Cols cd;
        load_cols(stg, cd);
        float p[16], ds[16];
        grads(cd, s, dp, p, ds);
        unsigned pt[kNC / 16][4], dt[kNC / 16][4];
        pack(p, ds, pt, dt);
        if (a.ds != nullptr) store_ds(ch, dt);
        nsa_wg::wait<0>();
#pragma unroll
        for (int i = 0; i < kNC / 16; i++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            asm volatile("prmt.b32 %0, %1, 0, 0x3210;\n" : "=r"(pa[i][e]) : "r"(pt[i][e]));
            asm volatile("prmt.b32 %0, %1, 0, 0x3210;\n" : "=r"(da[i][e]) : "r"(dt[i][e]));
          }
      }
      issue_dvdk((nch - 1) % kST, pa, da);  // retired at the next window's start or after the loop
    }
    if constexpr (DQ) for (int ch = 0; ch < nch; ch++) {
      const int stg = ch % kST;
      if (ch + kPF < nch) prep(ch + kPF, (ch + kPF) % kST);
      cp_commit();
      cp_wait<kPF>();
      nsa_wg::fence_proxy();  // this thread's cp.async data -> the tensor cores (no TMA here)
      __syncthreads();        // chunk ch visible to all; every thread is past chunk ch - 1

      float s[16], dp[16];
      issue_sdp(stg, s, dp);
      Cols cd;
      load_cols(stg, cd);
      nsa_wg::wait<0>();
      float p[16], ds[16];
      grads(cd, s, dp, p, ds);
      unsigned pa[kNC / 16][4], da[kNC / 16][4];
      pack(p, ds, pa, da);
      issue_dvdk(stg, pa, da);

      // CTA-uniform: 0 when every column is padding or a shared-tile row.
      const unsigned dqm = DQ ? sDqm[stg] : 0u;
      if (DQ && dqm != 0u) {
        // dS^T -> sDS [64 keys][32 cols] (rows = K of K^T . dS^T, columns =
        // its N) while dV / dK run; sDS was last read by chunk ch - 1's dQ,
        // retired before this chunk's barrier.
#pragma unroll
        for (int i = 0; i < kNC / 8; i++)
#pragma unroll
          for (int rh = 0; rh < 2; rh++)
            *reinterpret_cast<unsigned *>(smem + L::ds_off + nsa_wg::cm_off(kr0 + rh * 8, i * 8 + cq, kNC)) =
                da[i >> 1][(i & 1) * 2 + rh];
        nsa_wg::fence_proxy();
        __syncthreads();
      }
      if constexpr (DQ) {
        if (dqm != 0u) {
          // This thread's columns: 8i + cq + e (i < 4, e < 2) -> partial rows
          // (offsets resolved once per column by the prep).
          float *dst[kNC / 8][2];
#pragma unroll
          for (int i = 0; i < kNC / 8; i++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
              const int m = i * 8 + cq + e;
              dst[i][e] = ((dqm >> m) & 1u) ? dqp + sDqo[stg * kNC + m] : nullptr;
            }
          // Both 64-row halves of d are issued behind dV / dK (three groups
          // in flight); wait<1> retires dV / dK and half 0, wait<0> half 1.
          float q0[16], q1[16];
          nsa_wg::fence();
#pragma unroll
          for (int kk = 0; kk < kT / 16; kk++)
            nsa_wg::ss_m64n32k16<1, 1>((T *)nullptr, q0, dmn_major(dKmn, kk), nsa_wg::desc_adv(dDS, kk * 1024),
                                       kk > 0);
          nsa_wg::commit();
#pragma unroll
          for (int kk = 0; kk < kT / 16; kk++)
            // d = 64..127: K's second box
            nsa_wg::ss_m64n32k16<1, 1>((T *)nullptr, q1, dmn_major(nsa_wg::desc_adv(dKmn, kT * 128), kk),
                                       nsa_wg::desc_adv(dDS, kk * 1024), kk > 0);
          nsa_wg::commit();
          // rows = d hb*64 + kr0 (+8); columns = chunk columns 8i + cq + e
          auto store = [&](const float(&q)[16], int hb) {
#pragma unroll
            for (int i = 0; i < kNC / 8; i++)
#pragma unroll
              for (int e = 0; e < 4; e++) {
                float *p = dst[i][e & 1];
                if (p != nullptr) __stcs(p + hb * 64 + kr0 + (e >> 1) * 8, q[i * 4 + e]);
              }
          };
          nsa_wg::wait<1>();
          nsa_wg::reg_fence(q0);
          store(q0, 0);
          nsa_wg::wait<0>();
          nsa_wg::reg_fence(q1);
          store(q1, 1);
        }
      }
      // dV / dK (and dQ) retire before the next chunk's barrier: the stage
      // they read is refilled two chunks on, and sDS is rewritten next chunk.
      nsa_wg::wait<0>();
    }
    cp_wait<0>();
  }
  nsa_wg::wait<0>();
  nsa_wg::reg_fence(dk);
  nsa_wg::reg_fence(dv);
  cp_wait<0>();

  const bool final_ = nseg == 1;
  float *pp = final_ ? nullptr : part + (int64_t)(iv.part_off[x] + seg) * kT * (a.Dk + a.Dv);
  float *accx = acc_of(a, iv, x);
  if (final_ && accx != nullptr) {  // row batches: add into the tile's accumulator (Dk = Dv = 128)
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
      const int kk = kr0 + rh * 8;
      acc_add_pairs<16>(accx + kk * a.Dk + cq, [&](int i, int e) { return bad ? NAN : dk[i * 4 + rh * 2 + e]; });
      acc_add_pairs<16>(accx + kT * a.Dk + kk * a.Dv + cq,
                        [&](int i, int e) { return bad ? NAN : dv[i * 4 + rh * 2 + e]; });
    }
    return;
  }
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const int kk = kr0 + rh * 8, tok = k0 + kk;
#pragma unroll
    for (int i = 0; i < 16; i++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int col = i * 8 + cq + e;
        put<T>(a, final_, pp, accx, b, g, tok, kk, true, col, bad ? NAN : dk[i * 4 + rh * 2 + e]);
        put<T>(a, final_, pp, accx, b, g, tok, kk, false, col, bad ? NAN : dv[i * 4 + rh * 2 + e]);
      }
  }
#else
  __trap();  // built only for sm_90a (see kernels/cuda/CMakeLists.txt); the host checks the image
#endif
}

template <typename T, bool DQ, bool TMA, bool KR = false>
cudaError_t launch_k(const nsa_cuda_bwd_t *a, const Inv &iv, float *part, float *dqp, int64_t grid, cudaStream_t st,
                     const CUtensorMap &tq, const CUtensorMap &tdo) {
  const int Pk = (int)(kNC / a->h);
  static unsigned long long set_on;
  int dev;
  cudaError_t e = set_smem_once(dkdv_wg_kernel<T, DQ, TMA, KR>, (int)Smem::bytes, &set_on, &dev);
  if (e != cudaSuccess) return e;
  dkdv_wg_kernel<T, DQ, TMA, KR><<<(unsigned)grid, kThreads, Smem::bytes, st>>>(*a, iv, part, dqp, Pk, tq, tdo);
  return cudaGetLastError();
}

// The TMA gather in the instance without dq (h = 16: the row-block dq) where
// h is 8, 16 or 32 (boxes 1024-byte aligned in the chunk tile) and both
// tensor maps encode; else the cp.async gather. The dq instance keeps
// cp.async: with TMA its 8-head boxes (1 KB) made the H100's 16k h = 8
// random backward 4.65 -> 4.75 ms (docs/PERF.md). NSA_CUDA_DKDV_TMA (per
// request): 0 always cp.async (A/B runs), 2 TMA required (a request whose
// dk/dv cannot take it fails: tests).
template <typename T, bool DQ>
cudaError_t launch(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const Inv &iv, float *part, float *dqp, int64_t grid,
                   cudaStream_t st) {
  if (a->ds != nullptr && (DQ || a->h != kNC / 2)) return cudaErrorInvalidValue;  // dS: two 16-head rows per chunk
  CUtensorMap tq, tdo;
  memset(&tq, 0, sizeof tq);
  memset(&tdo, 0, sizeof tdo);
  const char *e = getenv("NSA_CUDA_DKDV_TMA");
  const int h = (int)a->h;
  const bool tma = !DQ && !(e != nullptr && e[0] == '0') && (h == 8 || h == 16 || h == 32) && a->qs[3] == 1 &&
                   a->dos[3] == 1 && nsa_cuda_tma_heads_map(&tq, dt, a->q, a->qs, a->B, a->S, a->G * a->h, kD, h) &&
                   nsa_cuda_tma_heads_map(&tdo, dt, a->dout, a->dos, a->B, a->S, a->G * a->h, kD, h);
  if (!tma && e != nullptr && e[0] == '2') return cudaErrorNotSupported;  // 2: required (tests)
  // K's S^T fragments in registers (KR): on by default in the TMA instance;
  // NSA_CUDA_DKDV_KREG=0 turns it off there, 1 also turns it on in the dq
  // instance (A/B, tests).
  const char *kr = getenv("NSA_CUDA_DKDV_KREG");
  const bool kr_off = kr != nullptr && kr[0] == '0', kr_on = kr != nullptr && kr[0] == '1';
  if constexpr (DQ) {
    if (kr_on) return launch_k<T, true, false, true>(a, iv, part, dqp, grid, st, tq, tdo);
    return launch_k<T, true, false>(a, iv, part, dqp, grid, st, tq, tdo);
  }
  if (tma && !kr_off) return launch_k<T, false, true, true>(a, iv, part, dqp, grid, st, tq, tdo);
  return tma ? launch_k<T, false, true>(a, iv, part, dqp, grid, st, tq, tdo)
             : launch_k<T, false, false>(a, iv, part, dqp, grid, st, tq, tdo);
}

// The kernels exist for sm_90a only: on any other device (or a build without
// them) cudaFuncGetAttributes fails and the caller keeps the mma.sync kernel.
bool image_ok() {
  static int dev_ok[64];  // 0 unknown, 1 yes, 2 no (per device); atomics: requests may come from several threads
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  int known = __atomic_load_n(&dev_ok[dev], __ATOMIC_ACQUIRE);
  if (known == 0) {
    cudaFuncAttributes fa;
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    const bool ok = major == 9 && minor == 0 &&
                    cudaFuncGetAttributes(&fa, dkdv_wg_kernel<__nv_bfloat16, false, false>) == cudaSuccess;
    cudaGetLastError();
    known = ok ? 1 : 2;  // two threads asking at once compute the same answer
    __atomic_store_n(&dev_ok[dev], known, __ATOMIC_RELEASE);
  }
  return known == 1;
}

}  // namespace

// bwd_dkdv.cuh: whether the wgmma kernel takes this request (Dk = Dv = 128,
// bf16 / f16, 4 <= h <= 32, an sm_90 device; NSA_CUDA_BWD_WGMMA=0 turns it off).
extern "C" int nsa_cuda_dkdv_wgmma_ok(const nsa_cuda_bwd_t *a, nsa_dtype_t dt) {
  const char *e = getenv("NSA_CUDA_BWD_WGMMA");  // per request, like the other NSA_CUDA_BWD_* knobs
  const int env = (e != nullptr && e[0] == '0') ? 0 : 1;
  // h < 4: a 32-column chunk holds 8+ rows whose padding at segment ends the
  // 16-column mma.sync chunks avoid; that kernel was faster there (H200,
  // T = 16k, h = 1: 0.97 vs 1.06 ms backward).
  if (!env || (dt != NSA_BF16 && dt != NSA_F16) || a->Dk != kD || a->Dv != kD || a->h < 4 || a->h > kNC) return 0;
  return image_ok() ? 1 : 0;
}

extern "C" cudaError_t nsa_cuda_launch_dkdv_wgmma(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const Inv *iv,
                                                  float *part, float *dqp, int64_t grid, cudaStream_t st) {
  if (dt == NSA_BF16)
    return dqp ? launch<__nv_bfloat16, true>(a, dt, *iv, part, dqp, grid, st)
               : launch<__nv_bfloat16, false>(a, dt, *iv, part, dqp, grid, st);
  if (dt == NSA_F16)
    return dqp ? launch<__half, true>(a, dt, *iv, part, dqp, grid, st)
               : launch<__half, false>(a, dt, *iv, part, dqp, grid, st);
  return cudaErrorInvalidValue;
}
