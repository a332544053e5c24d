// bwd_dkdv.cu — dk/dv, key-centric over the inverted plan (KERNELS.md loop order 2).
//
// For key s of (b, g), over the (row r, head j) pairs whose key set holds s:
//   dv_s = Σ p_rj,s do_rj
//   dk_s = scale * Σ p_rj,s (dp_rj,s − delta_rj) q_rj
// One CTA per item = (64-key tile x, segment of x's row list, bwd_invert_plan.cu).
// The CTA loads its K/V tile once and runs it against every listed row, in
// list order (rows ascending), so each K/V tile crosses L2 once per segment
// instead of once per query. Tiles whose list has one segment write dk/dv
// directly; longer lists (block 0 is selected by every query, say) are cut
// into segments so one CTA does not serialize the whole launch: each segment
// writes an f32 partial and reduce_kernel adds the partials in segment order.
// No float atomics: bitwise deterministic.
//
// Tensor-core kernel (bf16/f16): a "chunk" is 16 MMA columns =
// (listed row i0 + m / HT, head jt*16 + m % HT), HT = min(h, 16), so h < 16
// packs 16/h rows per chunk and small h fills the MMA as well as h = 16.
// Warp w owns keys 16(w%4)..+15 of the tile (warps w and w+4 split the output
// columns when Dk + Dv > 256, to keep the accumulators in registers):
//   S^T  (16 keys x 16 cols) = K_w . Q^T        (A = K rows, B = Q rows: ldmatrix)
//   dP^T (16 keys x 16 cols) = V_w . dO^T
//   P^T = exp2(S^T*scale*log2e − lse*log2e) where key ∈ row's key set, else 0
//   dS^T = P^T ∘ (dP^T − delta)
//   dV_w += P^T . dO    dK_w += dS^T . Q        (B = dO / Q rows: ldmatrix.trans)
// Chunks run through a 5-stage cp.async pipeline (3 in flight, one barrier per
// chunk); per column the row's membership
// of the 64 keys is the pair's 64-bit mask from the inversion.
#include <stdlib.h>

#include "bwd_dkdv.cuh"

using namespace nsa_bwd;

namespace {

constexpr int kT = NSA_BWD_TILE;
constexpr int kMaxD = NSA_CUDA_SIMPLE_MAX_D;

// ------------------------------------------------------------------ generic --
// 256 threads: thread = (key kk = tid/4, quarter c = tid%4); the quarter
// holds columns d ≡ c (mod 4) of the key's dk/dv; dot products are reduced
// over the 4 quarter lanes with shuffles. K/V tile and a batch of HB heads'
// q/do rows are staged in shared memory as f32.

constexpr int kGenThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kGenThreads)
    dkdv_simple_kernel(nsa_cuda_bwd_t a, Inv iv, float *__restrict__ part, int HB) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float *sm = reinterpret_cast<float *>(smem_raw);
  const int KS = (int)a.Dk + 1, VS = (int)a.Dv + 1;
  float *sK = sm;                       // [64][KS]
  float *sV = sK + kT * KS;             // [64][VS]
  float *sQ = sV + kT * VS;             // [HB][Dk]
  float *sO = sQ + HB * a.Dk;           // [HB][Dv]
  float *sL = sO + HB * a.Dv;           // [HB] lse
  float *sD = sL + HB;                  // [HB] delta

  int64_t x;
  int seg, nseg;
  if (!find_item(iv, blockIdx.x, &x, &seg, &nseg)) return;
  const bool bad = a.invalid != nullptr && *a.invalid > 0;
  const int64_t kt = x % iv.NT, bg = x / iv.NT, g = bg % a.G, b = bg / a.G;
  const int k0 = (int)(kt * kT);
  const int tid = threadIdx.x, kk = tid >> 2, c = tid & 3;
  const int tok = k0 + kk;
  const int t0 = iv.tile_off[x], t1 = iv.tile_off[x + 1];
  const int lo = t0 + seg * iv.seg_rows, hi = bad ? lo : min(t1, lo + iv.seg_rows);
  if (hi <= lo && !bad && iv.acc != nullptr) return;  // row batches: no rows here, nothing to add

  const T *kb = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
  const T *vb = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];
  if (hi > lo) {
    for (int e = tid; e < kT * a.Dk; e += kGenThreads) {
      const int i = e / (int)a.Dk, d = e % (int)a.Dk;
      sK[i * KS + d] = (k0 + i < a.Skv) ? ld(kb + (int64_t)(k0 + i) * a.ks[1] + d * a.ks[3]) : 0.f;
    }
    for (int e = tid; e < kT * a.Dv; e += kGenThreads) {
      const int i = e / (int)a.Dv, d = e % (int)a.Dv;
      sV[i * VS + d] = (k0 + i < a.Skv) ? ld(vb + (int64_t)(k0 + i) * a.vs[1] + d * a.vs[3]) : 0.f;
    }
  }
  float dk[kMaxD / 4], dv[kMaxD / 4];
#pragma unroll
  for (int i = 0; i < kMaxD / 4; i++) dk[i] = dv[i] = 0.f;

  for (int li = lo; li < hi; li++) {
    const int64_t r = iv.vals[li];
    const int64_t t = (r / a.G) % a.S;
    const bool in = (iv.masks[li] >> kk) & 1ull;
    for (int j0 = 0; j0 < a.h; j0 += HB) {
      const int nh = (int)min((int64_t)HB, a.h - j0);
      __syncthreads();  // previous batch fully consumed (and K/V staged)
      for (int e = tid; e < nh * a.Dk; e += kGenThreads) {
        const int jj = e / (int)a.Dk, d = e % (int)a.Dk;
        const int64_t head = g * a.h + j0 + jj;
        sQ[jj * a.Dk + d] = ld(reinterpret_cast<const T *>(a.q) + b * a.qs[0] + t * a.qs[1] + head * a.qs[2] +
                               d * a.qs[3]);
      }
      for (int e = tid; e < nh * a.Dv; e += kGenThreads) {
        const int jj = e / (int)a.Dv, d = e % (int)a.Dv;
        const int64_t head = g * a.h + j0 + jj;
        sO[jj * a.Dv + d] = ld(reinterpret_cast<const T *>(a.dout) + b * a.dos[0] + t * a.dos[1] +
                               head * a.dos[2] + d * a.dos[3]);
      }
      if (tid < nh) {
        sL[tid] = a.lsec[r * a.h + j0 + tid];
        sD[tid] = a.delta[r * a.h + j0 + tid];
      }
      __syncthreads();
      for (int jj = 0; jj < nh; jj++) {
        const float *qv = sQ + jj * a.Dk, *ov = sO + jj * a.Dv;
        float s = 0.f, dp = 0.f;
        for (int d = c; d < a.Dk; d += 4) s = fmaf(qv[d], sK[kk * KS + d], s);
        for (int d = c; d < a.Dv; d += 4) dp = fmaf(ov[d], sV[kk * VS + d], dp);
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        dp += __shfl_xor_sync(0xffffffffu, dp, 1);
        dp += __shfl_xor_sync(0xffffffffu, dp, 2);
        const float p = in ? expf(s * a.scale - sL[jj]) : 0.f;
        const float ds = p * (dp - sD[jj]);
#pragma unroll
        for (int i = 0; i < kMaxD / 4; i++) {
          const int d = c + 4 * i;
          if (d < a.Dk) dk[i] = fmaf(ds, qv[d], dk[i]);
          if (d < a.Dv) dv[i] = fmaf(p, ov[d], dv[i]);
        }
      }
    }
  }
  const bool final_ = nseg == 1;
  float *pp = final_ ? nullptr : part + (int64_t)(iv.part_off[x] + seg) * kT * (a.Dk + a.Dv);
  float *accx = acc_of(a, iv, x);
#pragma unroll
  for (int i = 0; i < kMaxD / 4; i++) {
    const int d = c + 4 * i;
    if (d < a.Dk) put<T>(a, final_, pp, accx, b, g, tok, kk, true, d, bad ? NAN : dk[i]);
    if (d < a.Dv) put<T>(a, final_, pp, accx, b, g, tok, kk, false, d, bad ? NAN : dv[i]);
  }
}

// Tiles with several segments: dk/dv = Σ_seg partial[seg] in segment order
// (added to the tile's accumulator in row-batch mode). Block (x, y) takes
// tile x's 4-element groups in 256-wide strips y, y + kRedY, ...: one block per tile
// walked the 64 x (Dk + Dv) slot alone, ~90 us for block 0's 32 segments
// (selected by every query) at T = 16k on an H200.
constexpr int kRedY = 16;
template <typename T>
__global__ void reduce_kernel(nsa_cuda_bwd_t a, Inv iv, const float *__restrict__ part) {
  const int64_t x = blockIdx.x;
  const int p0 = iv.part_off[x], np = iv.part_off[x + 1] - p0;
  if (np == 0) return;
  float *accx = acc_of(a, iv, x);
  const int64_t kt = x % iv.NT, bg = x / iv.NT, g = bg % a.G, b = bg / a.G;
  const int k0 = (int)(kt * kT);
  // Four elements per thread in 16-byte loads (a slot is 64 (Dk + Dv)
  // floats at a 256-byte multiple), partials summed in segment order as
  // before, 8 loads in flight (scalar loads, a few in flight: ~41 us per
  // backward at T = 8k h = 16 on an H100).
  const int64_t slot = kT * (a.Dk + a.Dv), slot4 = slot / 4;
  const float4 *pp = reinterpret_cast<const float4 *>(part + (int64_t)p0 * slot);
  for (int64_t e4 = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; e4 < slot4;
       e4 += (int64_t)gridDim.y * blockDim.x) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
    for (int i = 0; i < np; i++) {
      const float4 v = pp[(int64_t)i * slot4 + e4];
      s[0] += v.x, s[1] += v.y, s[2] += v.z, s[3] += v.w;
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int64_t e = e4 * 4 + j;
      const bool isk = e < kT * a.Dk;
      const int64_t f = isk ? e : e - kT * a.Dk;
      const int D = (int)(isk ? a.Dk : a.Dv);
      const int kk = (int)(f / D), col = (int)(f % D);
      put<T>(a, true, nullptr, accx, b, g, k0 + kk, kk, isk, col, s[j]);
    }
  }
}

// Row-batch mode, after the last batch: dk/dv of tile x from its accumulator.
template <typename T>
__global__ void acc_store_kernel(nsa_cuda_bwd_t a, int64_t NT, const float *__restrict__ acc) {
  const int64_t x = blockIdx.x;
  const int64_t kt = x % NT, bg = x / NT, g = bg % a.G, b = bg / a.G;
  const int k0 = (int)(kt * kT);
  const int64_t slot = kT * (a.Dk + a.Dv);
  for (int64_t e = threadIdx.x; e < slot; e += blockDim.x) {
    const bool isk = e < kT * a.Dk;
    const int64_t f = isk ? e : e - kT * a.Dk;
    const int D = (int)(isk ? a.Dk : a.Dv);
    const int kk = (int)(f / D), col = (int)(f % D);
    put<T>(a, true, nullptr, nullptr, b, g, k0 + kk, kk, isk, col, acc[x * slot + e]);
  }
}

// ------------------------------------------------------------- tensor cores --

constexpr int kWin = 1024;  // rows of a segment staged in shared memory at a time
// Chunk pipeline: kST stages, chunks ch+1 .. ch+kPF in flight while ch
// computes. kPF = kST - 2 lets one barrier per chunk do: the prep of
// iteration ch refills the stage chunk ch - 2 read, and every warp finished
// chunk ch - 2 before it passed iteration ch - 1's barrier. (kST = 4 with
// kPF = 3 needed a second barrier at the end of each chunk.)
constexpr int kST = 5;
constexpr int kPF = kST - 2;

template <int DK, int DV> struct KvSmem {
  static constexpr int DSPLIT = (DK + DV > 256) ? 2 : 1;
  static constexpr int NW = 4 * DSPLIT;
  static constexpr int QS = DK + 8, OS = DV + 8, KS = DK + 8, VS = DV + 8;
  static constexpr size_t k_off = 0;
  static constexpr size_t v_off = k_off + kT * KS * 2;
  static constexpr size_t q_off = v_off + kT * VS * 2;        // [kST][16][QS]
  static constexpr size_t o_off = q_off + kST * 16 * QS * 2;  // [kST][16][OS]
  static constexpr size_t mk_off = o_off + kST * 16 * OS * 2; // [kST][16] u64
  static constexpr size_t l_off = mk_off + kST * 16 * 8;      // [kST][16] f32 lse
  static constexpr size_t d_off = l_off + kST * 16 * 4;       // [kST][16] f32 delta
  static constexpr size_t wm_off = d_off + kST * 16 * 4;      // [kWin] u64 window masks
  static constexpr size_t wv_off = wm_off + kWin * 8;       // [kWin] i32 window rows
  static constexpr size_t wt_off = wv_off + kWin * 4;       // [kWin] i32 window query positions t
  static constexpr size_t wp_off = wt_off + kWin * 4;       // [kWin] i32 window pair indices (dq)
  static constexpr int DSS = 24;                             // dS^T row stride (conflict-free ldmatrix)
  static constexpr size_t ds_off = wp_off + kWin * 4;       // [64][DSS] T: dS^T of the chunk (dq)
  static constexpr size_t dm_off = ds_off + kT * DSS * 2;    // [kST] u32: chunk columns that need dq
  static constexpr size_t bytes = dm_off + kST * 4;
  // Key-centric dq: DQW warps split the DK dq columns, DKQ each, a multiple
  // of 16 (the MMA's n-pair): all NW warps where DK / NW allows it, else
  // half of them (DK = 192 with Dk + Dv > 256: 8 warps x 24 columns do not
  // tile, 4 x 48 do).
  static constexpr int DQW = (DK / NW) % 16 == 0 ? NW : NW / 2;
  static constexpr int DKQ = DK / DQW;
  static constexpr bool kDqOk = DK % DQW == 0 && DKQ % 16 == 0;
};

// The segment's rows (and their masks) are staged in shared memory a window
// at a time, and every per-chunk gather — Q/dO rows (16 B) and the lse/delta
// scalars (4 B) — is a cp.async whose address comes from shared memory: no
// thread waits on a global load between two chunks' MMAs. (Measured on an
// H200 before this: 4000 clocks per chunk at h = 16, most of it the chain
// row id → lse/delta loads in the prefetch of the next chunk.)
template <typename T, int DK, int DV, bool DQ>
__global__ void __launch_bounds__(KvSmem<DK, DV>::NW * 32)
    dkdv_mma_kernel(nsa_cuda_bwd_t a, Inv iv, float *__restrict__ part, float *__restrict__ dqp, int Pk, int HT,
                    int njt) {
  using L = KvSmem<DK, DV>;
  constexpr int NT_ = L::NW * 32;
  constexpr int DKW = DK / L::DSPLIT, DVW = DV / L::DSPLIT;  // output columns per warp
  extern __shared__ __align__(16) unsigned char smem[];
  T *sK = reinterpret_cast<T *>(smem + L::k_off);
  T *sV = reinterpret_cast<T *>(smem + L::v_off);
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  T *sO = reinterpret_cast<T *>(smem + L::o_off);
  unsigned long long *sMk = reinterpret_cast<unsigned long long *>(smem + L::mk_off);
  float *sL = reinterpret_cast<float *>(smem + L::l_off);
  float *sD = reinterpret_cast<float *>(smem + L::d_off);
  unsigned long long *wMk = reinterpret_cast<unsigned long long *>(smem + L::wm_off);
  int *wRow = reinterpret_cast<int *>(smem + L::wv_off);
  int *wP = reinterpret_cast<int *>(smem + L::wp_off);
  int *wT = reinterpret_cast<int *>(smem + L::wt_off);
  T *sDS = reinterpret_cast<T *>(smem + L::ds_off);
  unsigned *sDqm = reinterpret_cast<unsigned *>(smem + L::dm_off);

  int64_t x;
  int seg, nseg;
  if (!find_item(iv, blockIdx.x, &x, &seg, &nseg)) return;
  const bool bad = a.invalid != nullptr && *a.invalid > 0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kw = (warp & 3) * 16, hs = warp >> 2;
  const int64_t kt = x % iv.NT, bg = x / iv.NT, g = bg % a.G, b = bg / a.G;
  const int k0 = (int)(kt * kT);
  const int t1 = iv.tile_off[x + 1];
  const int lo = iv.tile_off[x] + seg * iv.seg_rows, hi = bad ? lo : min(t1, lo + iv.seg_rows);
  if (hi <= lo && !bad && iv.acc != nullptr) return;  // row batches: no rows here, nothing to add
  const float LOG2E = 1.4426950408889634f;
  const float c2 = a.scale * LOG2E;
  // K/V are read once per segment (stream them); Q/dO rows are re-read by
  // every tile their row selected (keep them in L2).
  const unsigned long long pol_kv = policy_evict_first(), pol_q = policy_evict_last();

  if (hi > lo)
    load_kv_tile<T, DK, DV, L::KS, L::VS, true>(reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2],
                                                a.ks[1], reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2],
                                                a.vs[1], k0, a.Skv, sK, sV, tid, NT_, pol_kv);

  const bool ht_pow2 = (HT & (HT - 1)) == 0;
  const int ht_lg = __ffs(HT) - 1;
  float dk[DKW / 8][4], dv[DVW / 8][4];
#pragma unroll
  for (int i = 0; i < DKW / 8; i++) dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < DVW / 8; i++) dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  const int r0 = lane >> 2;

  for (int w0 = lo; w0 < hi; w0 += kWin) {
    const int w1 = min(hi, w0 + kWin);
    __syncthreads();  // the previous window's rows are no longer read
    for (int i = tid; i < w1 - w0; i += NT_) {
      const int r = iv.vals[w0 + i];
      wRow[i] = r;
      // once per row, not per gathered 16 bytes; bit 31: a shared-tile row
      // whose dq the shared kernel writes (t < S < 2^31)
      const bool sk = DQ && iv.skip != nullptr && iv.skip[r];
      wT[i] = (int)((unsigned)((r / (int)a.G) % (int)a.S) | (sk ? 0x80000000u : 0u));
      wMk[i] = iv.masks[w0 + i];
      if (DQ) wP[i] = iv.pidx[w0 + i];
    }
    __syncthreads();
    const int nch = ((w1 - w0 + Pk - 1) / Pk) * njt;

    // Column m of chunk ch -> window index wi and head j; false for padding.
    // (chunk_col, bwd_common.cuh: shift division for power-of-two HT.)
    auto col_of = [&](int ch, int m, int *wi, int64_t *j) -> bool {
      int jj;
      const bool ok = chunk_col(ch, m, HT, Pk, njt, ht_pow2, ht_lg, wi, &jj);
      *j = jj;
      return ok && w0 + *wi < w1 && jj < a.h;
    };
    // Chunk ch's 16 Q and dO rows → stage stg: TPR threads per row, each
    // resolving its row once (column → row, head, source addresses) and
    // copying every TPR-th 16-byte piece of the row's Q | dO, so consecutive
    // threads copy consecutive pieces (coalesced, conflict-free).
    auto prep = [&](int ch, int stg) {
      constexpr int CQ = DK / 8, CO = DV / 8, TPR = NT_ / 16;
      const T *q = reinterpret_cast<const T *>(a.q);
      const T *dout = reinterpret_cast<const T *>(a.dout);
      const int m = tid / TPR;
      int wi;
      int64_t j;
      const T *qsrc = q, *osrc = dout;
      const bool ok = col_of(ch, m, &wi, &j);
      if (ok) {
        const int64_t t = wT[wi] & 0x7fffffff, head = g * a.h + j;
        qsrc = q + b * a.qs[0] + t * a.qs[1] + head * a.qs[2];
        osrc = dout + b * a.dos[0] + t * a.dos[1] + head * a.dos[2];
      }
      const int bytes = ok ? 16 : 0;
      T *qdst = sQ + (stg * 16 + m) * L::QS, *odst = sO + (stg * 16 + m) * L::OS;
#pragma unroll
      for (int pt = tid % TPR; pt < CQ + CO; pt += TPR) {
        const bool isq = pt < CQ;
        const T *src = isq ? qsrc + pt * 8 : osrc + (pt - CQ) * 8;
        T *dst = isq ? qdst + pt * 8 : odst + (pt - CQ) * 8;
        cp_async16p(smem_u32(dst), ok ? src : q, bytes, pol_q);
      }
      if (tid < 16) {
        int wi;
        int64_t j;
        const bool ok = col_of(ch, tid, &wi, &j);
        const int64_t idx = ok ? (int64_t)wRow[wi] * a.h + j : 0;
        sMk[stg * 16 + tid] = ok ? wMk[wi] : 0ull;
        cp_async4(smem_u32(sL + stg * 16 + tid), a.lsec + idx, ok ? 4 : 0);
        cp_async4(smem_u32(sD + stg * 16 + tid), a.delta + idx, ok ? 4 : 0);
        if (DQ) {  // bit m: column m needs its dq partial (lanes 0..15 of warp 0)
          const unsigned need = __ballot_sync(0x0000ffffu, ok && wT[wi] >= 0);
          if (tid == 0) sDqm[stg] = need;
        }
      }
    };

    // Pipeline (kST, kPF above): one cp.async group per chunk (empty past
    // the end, so wait_group<kPF> always means "chunk ch has landed"); the
    // K/V tile rides in chunk 0's group of the first window. Stages 0 ..
    // kPF-1 are free here: every warp finished the previous window's chunks
    // before the window barrier above.
#pragma unroll
    for (int c = 0; c < kPF; c++) {
      if (c < nch) prep(c, c);
      cp_commit();
    }
    for (int ch = 0; ch < nch; ch++) {
      const int stg = ch % kST;
      if (ch + kPF < nch) prep(ch + kPF, (ch + kPF) % kST);
      cp_commit();
      cp_wait<kPF>();
      __syncthreads();  // chunk ch visible to all; every warp is past chunk ch - 1

      const T *q_s = sQ + stg * 16 * L::QS;
      const T *o_s = sO + stg * 16 * L::OS;
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      float s_[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // odd k-steps: two independent MMA chains
      float dp[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      float dp_[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks = 0; ks < DK / 16; ks++) {
        unsigned af[4], b0, b1, b2, b3;
        ldsm_x4(smem_u32(sK + (kw + (lane & 15)) * L::KS + ks * 16 + (lane >> 4) * 8), af[0], af[1], af[2],
                af[3]);
        ldsm_x4(smem_u32(q_s + ((lane & 7) + (lane >> 4) * 8) * L::QS + ks * 16 + ((lane >> 3) & 1) * 8), b0,
                b1, b2, b3);
        Mma<T>::run((ks & 1) ? s_[0] : s[0], af, b0, b1);
        Mma<T>::run((ks & 1) ? s_[1] : s[1], af, b2, b3);
      }
#pragma unroll
      for (int ks = 0; ks < DV / 16; ks++) {
        unsigned af[4], b0, b1, b2, b3;
        ldsm_x4(smem_u32(sV + (kw + (lane & 15)) * L::VS + ks * 16 + (lane >> 4) * 8), af[0], af[1], af[2],
                af[3]);
        ldsm_x4(smem_u32(o_s + ((lane & 7) + (lane >> 4) * 8) * L::OS + ks * 16 + ((lane >> 3) & 1) * 8), b0,
                b1, b2, b3);
        Mma<T>::run((ks & 1) ? dp_[0] : dp[0], af, b0, b1);
        Mma<T>::run((ks & 1) ? dp_[1] : dp[1], af, b2, b3);
      }
#pragma unroll
      for (int i = 0; i < 2; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          s[i][e] += s_[i][e];
          dp[i][e] += dp_[i][e];
        }
      // P^T and dS^T: rows = keys kw + r0 (+8), columns = chunk columns.
      float p[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int key = kw + r0 + (e >> 1) * 8;
          const int col = stg * 16 + nt * 8 + (lane & 3) * 2 + (e & 1);
          const bool in = (sMk[col] >> key) & 1ull;
          const float pv = in ? ex2(s[nt][e] * c2 - sL[col] * LOG2E) : 0.f;
          p[nt][e] = pv;
          s[nt][e] = pv * (dp[nt][e] - sD[col]);
        }
      unsigned pa[4], da[4];
      acc_to_a<T>(p, pa);
      acc_to_a<T>(s, da);
      // CTA-uniform (shared memory written before the last barrier): 0 when
      // every row of the chunk is a shared-tile row, whose dq is written by
      // the shared kernel — no dS store, barrier, MMAs or partial stores.
      if constexpr (DQ) {
        const unsigned dqm = sDqm[stg];
        if (dqm != 0u) {
          // Key-centric dq: this chunk's dQ (16 cols x DK) = dS (16 x 64 keys) . K,
          // warp w < DQW computing columns [w*DKQ, (w+1)*DKQ); written unscaled as the
          // f32 partial of pair p (reduced per row in pair order by dq_reduce).
#pragma unroll
          for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int rh = 0; rh < 2; rh++) {
              const int key = kw + r0 + rh * 8, col = nt * 8 + (lane & 3) * 2;
              *reinterpret_cast<unsigned *>(sDS + key * L::DSS + col) = Mma<T>::pack(s[nt][rh * 2], s[nt][rh * 2 + 1]);
            }
          __syncthreads();
          constexpr int DKQ = L::DKQ;
          const int d0 = warp * DKQ;
          if (warp < L::DQW) {
            float qa[DKQ / 8][4];
#pragma unroll
            for (int i = 0; i < DKQ / 8; i++) qa[i][0] = qa[i][1] = qa[i][2] = qa[i][3] = 0.f;
#pragma unroll
            for (int kb = 0; kb < kT / 16; kb++) {
              unsigned af[4];
              ldsm_x4_t(smem_u32(sDS + (kb * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * L::DSS + ((lane >> 3) & 1) * 8),
                        af[0], af[1], af[2], af[3]);
#pragma unroll
              for (int nd = 0; nd < DKQ / 16; nd++) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_t(smem_u32(sK + (kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * L::KS + d0 + nd * 16 +
                                   (lane >> 4) * 8),
                          b0, b1, b2, b3);
                Mma<T>::run(qa[2 * nd], af, b0, b1);
                Mma<T>::run(qa[2 * nd + 1], af, b2, b3);
              }
            }
#pragma unroll
            for (int rh = 0; rh < 2; rh++) {
              int wi;
              int64_t j;
              if (!((dqm >> (r0 + rh * 8)) & 1u) || !col_of(ch, r0 + rh * 8, &wi, &j)) continue;
              float *dst = dqp + ((int64_t)wP[wi] * a.h + j) * DK + d0 + (lane & 3) * 2;
#pragma unroll
              for (int i = 0; i < DKQ / 8; i++) __stcs(reinterpret_cast<float2 *>(dst + i * 8), make_float2(qa[i][rh * 2], qa[i][rh * 2 + 1]));
            }
          }
        }
      }
#pragma unroll
      for (int nd = 0; nd < DVW / 16; nd++) {
        unsigned b0, b1, b2, b3;
        ldsm_x4_t(
            smem_u32(o_s + ((lane & 7) + ((lane >> 3) & 1) * 8) * L::OS + hs * DVW + nd * 16 + (lane >> 4) * 8),
            b0, b1, b2, b3);
        Mma<T>::run(dv[2 * nd], pa, b0, b1);
        Mma<T>::run(dv[2 * nd + 1], pa, b2, b3);
      }
#pragma unroll
      for (int nd = 0; nd < DKW / 16; nd++) {
        unsigned b0, b1, b2, b3;
        ldsm_x4_t(
            smem_u32(q_s + ((lane & 7) + ((lane >> 3) & 1) * 8) * L::QS + hs * DKW + nd * 16 + (lane >> 4) * 8),
            b0, b1, b2, b3);
        Mma<T>::run(dk[2 * nd], da, b0, b1);
        Mma<T>::run(dk[2 * nd + 1], da, b2, b3);
      }
    }
    cp_wait<0>();
  }
  cp_wait<0>();

  const bool final_ = nseg == 1;
  float *pp = final_ ? nullptr : part + (int64_t)(iv.part_off[x] + seg) * kT * (a.Dk + a.Dv);
  float *accx = acc_of(a, iv, x);
  if (final_ && accx != nullptr) {  // row batches: add into the tile's accumulator
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
      const int kk = kw + r0 + rh * 8;
      acc_add_pairs<DKW / 8>(accx + kk * a.Dk + hs * DKW + (lane & 3) * 2,
                             [&](int i, int e) { return bad ? NAN : dk[i][rh * 2 + e]; });
      acc_add_pairs<DVW / 8>(accx + kT * a.Dk + kk * a.Dv + hs * DVW + (lane & 3) * 2,
                             [&](int i, int e) { return bad ? NAN : dv[i][rh * 2 + e]; });
    }
    return;
  }
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const int kk = kw + r0 + rh * 8;
    const int tok = k0 + kk;
#pragma unroll
    for (int i = 0; i < DKW / 8; i++)
#pragma unroll
      for (int e = 0; e < 2; e++)
        put<T>(a, final_, pp, accx, b, g, tok, kk, true, hs * DKW + i * 8 + (lane & 3) * 2 + e,
               bad ? NAN : dk[i][rh * 2 + e]);
#pragma unroll
    for (int i = 0; i < DVW / 8; i++)
#pragma unroll
      for (int e = 0; e < 2; e++)
        put<T>(a, final_, pp, accx, b, g, tok, kk, false, hs * DVW + i * 8 + (lane & 3) * 2 + e,
               bad ? NAN : dv[i][rh * 2 + e]);
  }
}

template <typename T, int DK, int DV, bool DQ>
cudaError_t launch_mma_dq(const nsa_cuda_bwd_t *a, const Inv &iv, float *part, float *dqp, int64_t grid,
                          cudaStream_t st) {
  using L = KvSmem<DK, DV>;
  const int HT = a->h >= 16 ? 16 : (int)a->h;
  const int Pk = a->h >= 16 ? 1 : (int)(16 / a->h);
  const int njt = (int)((a->h + 15) / 16);
  cudaError_t e = cudaFuncSetAttribute(dkdv_mma_kernel<T, DK, DV, DQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)L::bytes);
  if (e != cudaSuccess) return e;
  dkdv_mma_kernel<T, DK, DV, DQ><<<(unsigned)grid, L::NW * 32, L::bytes, st>>>(*a, iv, part, dqp, Pk, HT, njt);
  return cudaGetLastError();
}

template <typename T, int DK, int DV>
cudaError_t launch_mma(const nsa_cuda_bwd_t *a, const Inv &iv, float *part, float *dqp, int64_t grid,
                       cudaStream_t st) {
  if constexpr (KvSmem<DK, DV>::kDqOk) {
    if (dqp) return launch_mma_dq<T, DK, DV, true>(a, iv, part, dqp, grid, st);
  } else {
    if (dqp) return cudaErrorInvalidValue;
  }
  return launch_mma_dq<T, DK, DV, false>(a, iv, part, nullptr, grid, st);
}

template <typename T>
cudaError_t dispatch_mma(const nsa_cuda_bwd_t *a, const Inv &iv, float *part, float *dqp, int64_t grid,
                         cudaStream_t st) {
#define NSA_KV_CASE(dk, dv) \
  if (a->Dk == dk && a->Dv == dv) return launch_mma<T, dk, dv>(a, iv, part, dqp, grid, st);
#define NSA_KV_ROW(dk) NSA_KV_CASE(dk, 64) NSA_KV_CASE(dk, 128) NSA_KV_CASE(dk, 192) NSA_KV_CASE(dk, 256)
  NSA_KV_ROW(64)
  NSA_KV_ROW(128)
  NSA_KV_ROW(192)
  NSA_KV_ROW(256)
#undef NSA_KV_ROW
#undef NSA_KV_CASE
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_simple(const nsa_cuda_bwd_t *a, const Inv &iv, float *part, int64_t grid, cudaStream_t st) {
  int HB = (int)(a->h < 8 ? a->h : 8);
  if (HB < 1) HB = 1;
  const size_t bytes = sizeof(float) * ((size_t)kT * (a->Dk + 1 + a->Dv + 1) + (size_t)HB * (a->Dk + a->Dv) + 2 * HB);
  cudaError_t e = cudaFuncSetAttribute(dkdv_simple_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e != cudaSuccess) return e;
  dkdv_simple_kernel<T><<<(unsigned)grid, kGenThreads, bytes, st>>>(*a, iv, part, HB);
  return cudaGetLastError();
}

// Tensor-core requests go to the wgmma kernel (bwd_dkdv_wgmma.cu) where it
// takes them (sm_90, Dk = Dv = 128, 4 <= h <= 32), else to dkdv_mma_kernel.
template <typename T>
cudaError_t launch_all(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int use_mma, const Inv &iv, float *part, float *dqp,
                       int64_t grid, cudaStream_t st) {
  if (dqp && !use_mma) return cudaErrorInvalidValue;
  if (a->ds != nullptr && !(use_mma && nsa_cuda_dkdv_wgmma_ok(a, dt))) return cudaErrorInvalidValue;  // dS: wgmma only
  cudaError_t e = !use_mma                           ? launch_simple<T>(a, iv, part, grid, st)
                  : nsa_cuda_dkdv_wgmma_ok(a, dt) ? nsa_cuda_launch_dkdv_wgmma(a, dt, &iv, part, dqp, grid, st)
                                                    : dispatch_mma<T>(a, iv, part, dqp, grid, st);
  if (e != cudaSuccess) return e;
  reduce_kernel<T><<<dim3((unsigned)iv.ntiles, kRedY), 256, 0, st>>>(*a, iv, part);
  return cudaGetLastError();
}

template <>
cudaError_t launch_all<float>(const nsa_cuda_bwd_t *a, nsa_dtype_t, int, const Inv &iv, float *part, float *dqp,
                              int64_t grid, cudaStream_t st) {
  if (dqp || a->ds != nullptr) return cudaErrorInvalidValue;
  cudaError_t e = launch_simple<float>(a, iv, part, grid, st);
  if (e != cudaSuccess) return e;
  reduce_kernel<float><<<dim3((unsigned)iv.ntiles, kRedY), 256, 0, st>>>(*a, iv, part);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t nsa_cuda_launch_bwd_dkdv(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int use_mma, const void *inv_ws,
                                                const nsa_cuda_inv_layout_t *L, int64_t NT, int seg_rows,
                                                int64_t items_bound, float *part, float *dqp, float *acc,
                                                const unsigned char *skip, cudaStream_t st) {
  Inv iv;
  const char *w = (const char *)inv_ws;
  iv.tile_off = (const int32_t *)(w + L->tile_off);
  iv.vals = (const int32_t *)(w + L->rows_out);
  iv.pidx = (const int32_t *)(w + L->vals_out);
  iv.skip = dqp != nullptr ? skip : nullptr;
  iv.masks = (const unsigned long long *)(w + L->masks);
  iv.item_off = (const int32_t *)(w + L->item_off);
  iv.part_off = (const int32_t *)(w + L->part_off);
  iv.acc = acc;
  iv.NT = NT;
  iv.ntiles = a->B * a->G * NT;
  iv.seg_rows = seg_rows;
  if (iv.ntiles == 0 || items_bound <= 0) return cudaSuccess;
  if (items_bound > 0x7fffffff || iv.ntiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (a->Dk > kMaxD || a->Dv > kMaxD) return cudaErrorInvalidValue;
  switch (dt) {
    case NSA_F32: return launch_all<float>(a, dt, 0, iv, part, dqp, items_bound, st);
    case NSA_F16: return launch_all<__half>(a, dt, use_mma, iv, part, dqp, items_bound, st);
    case NSA_BF16: return launch_all<__nv_bfloat16>(a, dt, use_mma, iv, part, dqp, items_bound, st);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t nsa_cuda_launch_bwd_acc_store(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int64_t NT,
                                                    const float *acc, cudaStream_t st) {
  const int64_t ntiles = a->B * a->G * NT;
  if (ntiles == 0) return cudaSuccess;
  if (ntiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dt) {
    case NSA_F32: acc_store_kernel<float><<<(unsigned)ntiles, 256, 0, st>>>(*a, NT, acc); break;
    case NSA_F16: acc_store_kernel<__half><<<(unsigned)ntiles, 256, 0, st>>>(*a, NT, acc); break;
    case NSA_BF16: acc_store_kernel<__nv_bfloat16><<<(unsigned)ntiles, 256, 0, st>>>(*a, NT, acc); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// ---- key-centric dq: dq[r][j] = scale * sum of pair partials, pairs of row r in order ----
// Rows [row0, row0 + rows) of one row batch: pair_off and the partials are
// batch-local (pair_off[r - row0]).
namespace {
// One warp per (row, hpw of its heads); lane owns DK/32 consecutive columns
// (float2 loads), partials summed in pair order with the loads unrolled so
// several are in flight per warp (the reduction streams cap*h*Dk*4 bytes).
// A shared-tile row (skip) leaves at once: with several heads per warp the
// launch has hpw times fewer warps to retire when most rows are shared.
template <typename T, int DK>
__global__ void __launch_bounds__(128) dq_reduce_kernel(nsa_cuda_bwd_t a, int64_t row0, int64_t rows,
                                                        const int32_t *__restrict__ pair_off,
                                                        const float *__restrict__ dqp,
                                                        const unsigned char *__restrict__ skip, int hpw) {
  constexpr int PER = DK / 32;
  const int lane = threadIdx.x & 31;
  const int64_t pr = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // (row, head group)
  const int64_t hg = a.h / hpw;
  if (pr >= rows * hg) return;
  const bool bad = a.invalid != nullptr && *a.invalid > 0;
  const int64_t lr = pr / hg, r = row0 + lr;
  if (skip != nullptr && skip[r]) return;  // written by the shared-tile dq (bwd_shared.h); warp-uniform
  const int64_t g = r % a.G, t = (r / a.G) % a.S, b = r / (a.G * a.S);
  const int p0 = pair_off[lr], p1 = pair_off[lr + 1];
  for (int64_t j = (pr % hg) * hpw, je = j + hpw; j < je; j++) {
    float acc[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) acc[i] = 0.f;
#pragma unroll 4
    for (int p = p0; p < p1; p++) {
      const float2 *src = reinterpret_cast<const float2 *>(dqp + ((int64_t)p * a.h + j) * DK + lane * PER);
#pragma unroll
      for (int i = 0; i < PER / 2; i++) {
        const float2 v = __ldcs(src + i);
        acc[2 * i] += v.x;
        acc[2 * i + 1] += v.y;
      }
    }
    T *dq = reinterpret_cast<T *>(a.dq) + b * a.dqs[0] + t * a.dqs[1] + (g * a.h + j) * a.dqs[2];
#pragma unroll
    for (int i = 0; i < PER; i++) st(dq + (int64_t)(lane * PER + i) * a.dqs[3], bad ? NAN : acc[i] * a.scale);
  }
}

template <typename T>
cudaError_t launch_dq_reduce(const nsa_cuda_bwd_t *a, int64_t row0, int64_t rows, const int32_t *po,
                             const float *dqp, const unsigned char *skip, int hpw, unsigned blocks,
                             cudaStream_t st) {
  switch (a->Dk) {
    case 64: dq_reduce_kernel<T, 64><<<blocks, 128, 0, st>>>(*a, row0, rows, po, dqp, skip, hpw); break;
    case 128: dq_reduce_kernel<T, 128><<<blocks, 128, 0, st>>>(*a, row0, rows, po, dqp, skip, hpw); break;
    case 192: dq_reduce_kernel<T, 192><<<blocks, 128, 0, st>>>(*a, row0, rows, po, dqp, skip, hpw); break;
    case 256: dq_reduce_kernel<T, 256><<<blocks, 128, 0, st>>>(*a, row0, rows, po, dqp, skip, hpw); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
}  // namespace

extern "C" int nsa_cuda_bwd_dq_key_ok(nsa_dtype_t dt, int64_t Dk, int64_t Dv) {
  if (!nsa_cuda_mma_supported(dt, Dk, Dv)) return 0;
  const int64_t nw = (Dk + Dv > 256) ? 8 : 4;  // KvSmem::NW, DQW, DKQ
  const int64_t dqw = (Dk / nw) % 16 == 0 ? nw : nw / 2;
  return Dk % dqw == 0 && (Dk / dqw) % 16 == 0;
}

extern "C" cudaError_t nsa_cuda_launch_bwd_dq_reduce(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const void *inv_ws,
                                                     const nsa_cuda_inv_layout_t *L, const float *dqp,
                                                     int64_t row0, int64_t rows, const unsigned char *skip,
                                                     cudaStream_t st) {
  // Heads per warp: 4 where shared-tile rows may be skipped and h allows
  // (NSA_BWD_DQR_HPW = 1, 2, 4, 8 or 16 dividing h for A/B runs), else 1.
  int hpw = skip != nullptr && a->h % 4 == 0 ? 4 : 1;
  const char *he = getenv("NSA_BWD_DQR_HPW");
  if (he && atoi(he) >= 1 && atoi(he) <= 16 && a->h % atoi(he) == 0) hpw = atoi(he);
  const int64_t pairs = rows * (a->h / hpw);
  if (pairs <= 0) return cudaSuccess;
  const int64_t blocks = (pairs * 32 + 127) / 128;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int32_t *po = (const int32_t *)((const char *)inv_ws + L->pair_off);
  switch (dt) {
    case NSA_F16: return launch_dq_reduce<__half>(a, row0, rows, po, dqp, skip, hpw, (unsigned)blocks, st);
    case NSA_BF16: return launch_dq_reduce<__nv_bfloat16>(a, row0, rows, po, dqp, skip, hpw, (unsigned)blocks, st);
    default: return cudaErrorInvalidValue;
  }
}
