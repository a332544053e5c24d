// fwd_key.cu — key-block-centric forward (fwd_key.h; KERNELS.md loop order 2).
//
// fwd_key_kernel: one CTA (8 warps) per item = (64-key tile x, segment of x's
// row list) of the inverted plan (bwd_invert_plan.cu). The CTA stages the
// tile's K [64][Dk] and V [64][Dv] in shared memory once, and the segment's
// rows, their pair indices and 64-bit key masks. The segment's (row, head)
// columns are cut into "chunks" of 16 MMA rows (the backward's mapping):
//   column m of chunk ch = (listed row (ch / njt) * Pk + m / HT, head (ch % njt) * 16 + m % HT)
// with HT = min(h, 16), Pk = 16 / HT, njt = ceil(h / 16): at h < 16 a chunk
// holds Pk different queries, so small h fills the MMA as well as h = 16.
// Warp w takes chunks w, w + 8, ...; per chunk (FlashAttention-2 fragments,
// one key tile, so no online rescaling):
//   Q (16 x Dk) ← cp.async gather of the 16 query rows (per-warp stages)
//   S = Q K^T (16 x 64)              m16n8k16, A = Q (ldmatrix), B = K rows (ldmatrix)
//   S ← -inf where the key is not in the row's key set; c = scale * log2(e)
//   m = c * rowmax S, P = 2^(c S - m) / l, l = rowsum 2^(c S - m)
//   O = P V (16 x Dv)                A = P from the S accumulators, B = V (ldmatrix.trans)
//   po[(p*h + j)*Dv + d] = O (in the input dtype by default, f32 with
//   NSA_CUDA_FWD_KEY_F32=1),  pl[p*h + j] = m + log2 l (f32)
// fwd_key_merge_kernel: one warp per (row, HPW heads) (HPW = 4 where h
// allows), per head the partials in pair order (lane i holds pair i's
// weight; the partial loads are unrolled):
//   M = max pl, w_p = 2^(pl_p - M), o = sum w_p po_p / sum w_p,
//   lse = (M + log2 sum w_p) * ln 2            (natural log of scaled scores)
// Same outputs as the query-centric kernels: empty row → o = 0, lse = -inf;
// *invalid > 0 (device-validated selection, sync=false) → NaN.
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "bwd_common.cuh"
#include "fwd_key.h"

using namespace nsa_bwd;

namespace {

constexpr int kT = NSA_BWD_TILE;  // keys per tile (64)
constexpr int kNW = 8;            // warps per CTA
constexpr int kSegMax = 256;      // rows per item (all staged in shared memory)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Partials of one row batch (o in the input dtype or f32, + f32 lse per
// (pair, head)): 4 GiB, the backward's dq partial budget (bwd_request.cu),
// so a training step's workspace high-water mark does not grow, while every
// batch's fixed costs (inversion and its sort over the batch's pair bound,
// key-kernel and merge launches; ~90 us even when the shared-tile groups
// took every row) run half as often: T = 64k, h = 16 has 5 batches instead
// of 9 (docs/PERF.md has the A/B).
constexpr double kPartBudget = 4.0 * 1024 * 1024 * 1024;

struct KInv {
  const int32_t *tile_off, *rows, *pidx, *item_off;
  const unsigned long long *masks;  // per sorted pair: the row's keys inside the tile
  int64_t NT, ntiles;
  int seg_rows;
  int stage;  // 16-bit partials leave through shared memory in 16-byte stores
};

// N consecutive 16-bit partial values (N = 2 or 4, 4- or 8-byte aligned) as
// f32; streaming loads (each partial is read once).
__device__ __forceinline__ float2 pair_to_f2(unsigned u, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
}
__device__ __forceinline__ float2 pair_to_f2(unsigned u, __half) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&u));
}
template <typename T, int N> __device__ __forceinline__ void load16(const T *p, float *v) {
  static_assert(N == 2 || N == 4, "2 or 4 values");
  unsigned u[N / 2];
  if constexpr (N == 2) {
    u[0] = __ldcs(reinterpret_cast<const unsigned *>(p));
  } else {
    const uint2 w = __ldcs(reinterpret_cast<const uint2 *>(p));
    u[0] = w.x, u[1] = w.y;
  }
#pragma unroll
  for (int i = 0; i < N / 2; i++) {
    const float2 f = pair_to_f2(u[i], T());
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

template <int DK, int DV> struct FkSmem {
  static constexpr int ST = (DK + DV <= 256) ? 2 : 1;  // Q stages per warp (2 CTAs/SM either way)
  static constexpr int QS = DK + 8, KS = DK + 8, VS = DV + 8;
  static constexpr size_t k_off = 0;                                  // [64][KS]
  static constexpr size_t v_off = k_off + (size_t)kT * KS * 2;         // [64][VS]
  static constexpr size_t q_off = v_off + (size_t)kT * VS * 2;         // [kNW][ST][16][QS]
  static constexpr size_t mk_off = q_off + (size_t)kNW * ST * 16 * QS * 2;  // [kSegMax] u64
  static constexpr size_t t_off = mk_off + (size_t)kSegMax * 8;       // [kSegMax] i32 query position
  static constexpr size_t p_off = t_off + (size_t)kSegMax * 4;        // [kSegMax] i32 pair index
  static constexpr size_t bytes = p_off + (size_t)kSegMax * 4;
};

// P16: o partials stored in T (bf16/f16, half the traffic), else f32.
template <typename T, int DK, int DV, bool P16>
__global__ void __launch_bounds__(kNW * 32, 2)
    fwd_key_kernel(nsa_cuda_attn_t a, KInv iv, void *__restrict__ po_, float *__restrict__ pl, int Pk,
                   int HT, int njt, bool stage) {
  using L = FkSmem<DK, DV>;
  using PT = typename std::conditional<P16, T, float>::type;
  PT *po = reinterpret_cast<PT *>(po_);
  constexpr int CK = DK / 8;  // 16-byte pieces per Q (and K) row
  extern __shared__ __align__(16) unsigned char smem[];
  T *sK = reinterpret_cast<T *>(smem + L::k_off);
  T *sV = reinterpret_cast<T *>(smem + L::v_off);
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  unsigned long long *sMk = reinterpret_cast<unsigned long long *>(smem + L::mk_off);
  int *sT = reinterpret_cast<int *>(smem + L::t_off);
  int *sP = reinterpret_cast<int *>(smem + L::p_off);

  int64_t x;
  int seg;
  if (!inv_find_item(iv.item_off, iv.ntiles, blockIdx.x, &x, &seg)) return;
  if (a.invalid != nullptr && *a.invalid > 0) return;  // the merge writes NaN
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t kt = x % iv.NT, bg = x / iv.NT, g = bg % a.G, b = bg / a.G;
  const int k0 = (int)(kt * kT);
  const int lo = iv.tile_off[x] + seg * iv.seg_rows;
  const int hi = min(iv.tile_off[x + 1], lo + iv.seg_rows);
  if (hi <= lo) return;  // a tile no row selected (block-uniform)
  const int nrows = hi - lo;

  // K/V tile → shared memory (keys past Skv zero-filled; their mask bits are 0).
  load_kv_tile<T, DK, DV, L::KS, L::VS, false>(reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2],
                                               a.ks[1], reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2],
                                               a.vs[1], k0, a.Skv, sK, sV, tid, kNW * 32, 0ull);
  cp_commit();
  for (int i = tid; i < nrows; i += kNW * 32) {
    const int r = iv.rows[lo + i];
    sT[i] = (int)(((int64_t)r / a.G) % a.S);
    sP[i] = iv.pidx[lo + i];
    sMk[i] = iv.masks[lo + i];
  }
  cp_wait<0>();
  __syncthreads();  // the only block barrier: warps run their chunks independently

  const int nch = ((nrows + Pk - 1) / Pk) * njt;
  T *myQ = sQ + (size_t)warp * L::ST * 16 * L::QS;
  const T *qb = reinterpret_cast<const T *>(a.q) + b * a.qs[0];
  const float c2 = a.scale * kLog2e;

  // Column m of chunk ch → listed row wi, head j; false for padding columns
  // (chunk_col, bwd_common.cuh: shift division for power-of-two HT).
  const bool ht_pow2 = (HT & (HT - 1)) == 0;
  const int ht_lg = __ffs(HT) - 1;
  auto col_of = [&](int ch, int m, int *wi, int *j) -> bool {
    return chunk_col(ch, m, HT, Pk, njt, ht_pow2, ht_lg, wi, j) && *wi < nrows && *j < a.h;
  };
  // Gathers chunk ch's 16 query rows into stage stg (padding rows zero-filled).
  // Lane m < 16 computes row m's source address once per chunk; piece c =
  // lane + 32i (row c / CK, 16-byte piece c % CK) takes it by shuffle, so
  // consecutive lanes still copy consecutive pieces of one row (coalesced;
  // giving each lane a whole row instead measured slower on an H200).
  const int mrow = lane & 15;
  auto prep = [&](int ch, int stg) {
    int wi, j;
    const bool ok = col_of(ch, mrow, &wi, &j);
    const T *src = ok ? qb + (int64_t)sT[wi] * a.qs[1] + (g * a.h + j) * a.qs[2] : qb;
    const unsigned okm = __ballot_sync(0xffffffffu, ok);
    T *dst = myQ + stg * 16 * L::QS;
#pragma unroll
    for (int c = lane; c < 16 * CK; c += 32) {
      const int m = c / CK, pt = c % CK;
      const T *sm = reinterpret_cast<const T *>(__shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(src), m));
      cp_async16(smem_u32(dst + m * L::QS + pt * 8), sm + pt * 8, ((okm >> m) & 1u) ? 16 : 0);
    }
  };

  const int r0 = lane >> 2, cq = lane & 3;
#pragma unroll
  for (int s = 0; s < L::ST - 1; s++) {
    const int ch = warp + s * kNW;
    if (ch < nch) prep(ch, s);
    cp_commit();
  }
  int it = 0;
  for (int ch = warp; ch < nch; ch += kNW, it++) {
    const int stg = it % L::ST;
    {
      const int nx = ch + (L::ST - 1) * kNW;
      if (nx < nch) prep(nx, (it + L::ST - 1) % L::ST);
      cp_commit();  // possibly empty: wait_group<ST-1> then always means "chunk ch landed"
    }
    cp_wait<L::ST - 1>();
    __syncwarp();

    // S = Q K^T: rows = chunk columns, columns = the tile's 64 keys (8 n-tiles).
    const T *q_s = myQ + stg * 16 * L::QS;
    float s[8][4];
    qk_tile<T, DK, L::QS, L::KS>(q_s, sK, lane, s);

    // This thread holds MMA rows r0 (elements 0, 1) and r0 + 8 (elements 2, 3),
    // keys nt*8 + 2*cq + (e & 1).
    int wi0, j0, wi1, j1;
    const bool v0 = col_of(ch, r0, &wi0, &j0), v1 = col_of(ch, r0 + 8, &wi1, &j1);
    // Masks shifted by this thread's key offset 2*cq once, so each element
    // tests a compile-time bit (nt*8 + (e & 1)).
    const unsigned long long mk0 = v0 ? sMk[wi0] >> (2 * cq) : 0ull, mk1 = v1 ? sMk[wi1] >> (2 * cq) : 0ull;
    // Softmax of the scaled scores c2 * s over the row's keys. c2 > 0 (the
    // scale is resolved to a positive finite value, nsa_resolve_scale), so
    // the max of the raw s gives the row's max m of c2 * s and each element
    // costs one FFMA + EX2, no separate scaling pass; keys outside the row's
    // set are -inf and give p = 0.
    float x0 = -INFINITY, x1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    mask_rowmax(s, mk0, mk1, x0, x1);
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
    const float m0 = x0 == -INFINITY ? 0.f : x0 * c2, m1 = x1 == -INFINITY ? 0.f : x1 * c2;  // padding rows
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float p = ex2(fmaf(s[nt][e], c2, -(e < 2 ? m0 : m1)));  // 2^-inf = 0
        s[nt][e] = p;
        if (e < 2) l0 += p;
        else l1 += p;
      }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    // P / l rounded to T feeds the PV MMA, so O comes out normalized (32
    // multiplies per thread here instead of 64 on O).
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
      s[nt][0] *= i0, s[nt][1] *= i0;
      s[nt][2] *= i1, s[nt][3] *= i1;
    }

    unsigned pa[4][4];  // P as the A fragments of P V
    p_to_a<T>(s, pa);
    PT *o0 = v0 ? po + ((int64_t)sP[wi0] * a.h + j0) * DV : nullptr;
    PT *o1 = v1 ? po + ((int64_t)sP[wi1] * a.h + j1) * DV : nullptr;
    PT *om = nullptr;  // lanes 0..15: row mrow's partial (staged stores)
    if (stage) {
      int wim, jm;
      if (col_of(ch, mrow, &wim, &jm)) om = po + ((int64_t)sP[wim] * a.h + jm) * DV;
    }
    // O = P V in 64-column halves (32 accumulators live at a time).
#pragma unroll
    for (int half = 0; half < DV / 64; half++) {
      float o[8][4];
#pragma unroll
      for (int i = 0; i < 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
      pv_tile<T, 64, L::VS>(pa, sV + half * 64, lane, o);
      if constexpr (P16) {
        if (stage) {
          // Through the chunk's Q stage (free since S = Q K^T): each row's 64
          // columns leave as 8 contiguous 16-byte stores (row pointers from
          // lanes 0..15 by shuffle) instead of 4-byte pieces from 4 lanes.
          // Quarter-warp per row: conflict-free.
          T *so = myQ + stg * 16 * L::QS;  // [16][72] T
#pragma unroll
          for (int nt = 0; nt < 8; nt++) {
            *reinterpret_cast<unsigned *>(so + r0 * 72 + nt * 8 + 2 * cq) = Mma<T>::pack(o[nt][0], o[nt][1]);
            *reinterpret_cast<unsigned *>(so + (r0 + 8) * 72 + nt * 8 + 2 * cq) =
                Mma<T>::pack(o[nt][2], o[nt][3]);
          }
          __syncwarp();
#pragma unroll
          for (int i = 0; i < 4; i++) {  // piece lane + 32i: row (lane + 32i) / 8, 16 bytes (lane % 8)
            const int m = (lane >> 3) + 4 * i, pt = lane & 7;
            PT *d = reinterpret_cast<PT *>(__shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(om), m));
            if (d)  // streaming store: read once, by the merge
              __stcs(reinterpret_cast<uint4 *>(d + half * 64 + pt * 8), *reinterpret_cast<const uint4 *>(so + m * 72 + pt * 8));
          }
          __syncwarp();  // the next half (or the next chunk's gather) reuses the stage
          continue;
        }
      }
#pragma unroll
      for (int nt = 0; nt < 8; nt++) {
        const int col = half * 64 + nt * 8 + 2 * cq;
        if constexpr (P16) {
          if (o0) *reinterpret_cast<unsigned *>(o0 + col) = Mma<T>::pack(o[nt][0], o[nt][1]);
          if (o1) *reinterpret_cast<unsigned *>(o1 + col) = Mma<T>::pack(o[nt][2], o[nt][3]);
        } else {
          if (o0) *reinterpret_cast<float2 *>(o0 + col) = make_float2(o[nt][0], o[nt][1]);
          if (o1) *reinterpret_cast<float2 *>(o1 + col) = make_float2(o[nt][2], o[nt][3]);
        }
      }
    }
    if (cq == 0) {
      if (v0) pl[(int64_t)sP[wi0] * a.h + j0] = m0 + log2f(l0);
      if (v1) pl[(int64_t)sP[wi1] * a.h + j1] = m1 + log2f(l1);
    }
    __syncwarp();  // stage stg is refilled by the next iteration's prefetch
  }
  cp_wait<0>();
}

// One warp per (row r, head j): log-sum-exp merge of the row's partials in
// pair order. Lane handles Dv/32 consecutive output columns.
template <typename T, int DV, bool P16, int HPW>
__global__ void __launch_bounds__(256) fwd_key_merge_kernel(nsa_cuda_attn_t a, int64_t row0, int64_t rows,
                                                            const int32_t *__restrict__ pair_off,
                                                            const void *__restrict__ po_,
                                                            const float *__restrict__ pl,
                                                            const unsigned char *__restrict__ skip,
                                                            bool hpow2, int hlg) {
  constexpr int PER = DV / 32;
  using PT = typename std::conditional<P16, T, float>::type;
  const PT *po = reinterpret_cast<const PT *>(po_);
  const int lane = threadIdx.x & 31;
  const bool bad = a.invalid != nullptr && *a.invalid > 0;
  // This warp's HPW heads j0 .. j0 + HPW - 1 of one row (HPW divides h),
  // power-of-two h by shift; a row of a shared-tile group (fwd_shared.cu
  // writes it) leaves before the other index math.
  const int64_t w = (((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * HPW;
  if (w >= rows * a.h) return;  // warp-uniform
  const int64_t lr = hpow2 ? w >> hlg : w / a.h, j0 = hpow2 ? w & (a.h - 1) : w % a.h;  // batch-local row, head
  const int64_t r = row0 + lr;
  if (skip != nullptr && skip[r] && !bad) return;
  const int64_t g = r % a.G, t = (r / a.G) % a.S, b = r / (a.G * a.S);
  const int p0 = bad ? 0 : pair_off[lr], p1 = bad ? 0 : pair_off[lr + 1];
  for (int jj = 0; jj < HPW; jj++) {
  const int64_t j = j0 + jj;
  float W = 0.f, M = -INFINITY;
  float acc[PER];
#pragma unroll
  for (int i = 0; i < PER; i++) acc[i] = 0.f;
  // Adds partial p (weight wgt) to this lane's columns.
  auto add = [&](int p, float wgt) {
    const PT *src = po + ((int64_t)p * a.h + j) * DV + lane * PER;
    if constexpr (P16) {
      float v[PER];
      load16<T, PER>(src, v);
#pragma unroll
      for (int i = 0; i < PER; i++) acc[i] = fmaf(wgt, v[i], acc[i]);
    } else if constexpr (PER == 4) {
      const float4 v = *reinterpret_cast<const float4 *>(src);
      acc[0] = fmaf(wgt, v.x, acc[0]);
      acc[1] = fmaf(wgt, v.y, acc[1]);
      acc[2] = fmaf(wgt, v.z, acc[2]);
      acc[3] = fmaf(wgt, v.w, acc[3]);
    } else {
      const float2 v = *reinterpret_cast<const float2 *>(src);
      acc[0] = fmaf(wgt, v.x, acc[0]);
      acc[1] = fmaf(wgt, v.y, acc[1]);
    }
  };
  if (p1 - p0 <= 32) {
    // The usual case (a row touches <= 32 tiles): lane i holds pair p0 + i's
    // lse and weight, and the partial loads (independent of the shuffled
    // weights) are unrolled so several are in flight per warp.
    const int np = p1 - p0;
    const float lv = lane < np ? pl[(int64_t)(p0 + lane) * a.h + j] : -INFINITY;
    M = lv;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float wl = (lane < np && M != -INFINITY) ? ex2(lv - M) : 0.f;
    W = wl;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) W += __shfl_xor_sync(0xffffffffu, W, o);
    W = __shfl_sync(0xffffffffu, W, 0);  // one value for every lane's columns
#pragma unroll 8
    for (int i = 0; i < np; i++) add(p0 + i, __shfl_sync(0xffffffffu, wl, i));
  } else {
    for (int p = p0 + lane; p < p1; p += 32) M = fmaxf(M, pl[(int64_t)p * a.h + j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    for (int p = p0; p < p1; p++) {
      const float wgt = ex2(pl[(int64_t)p * a.h + j] - M);
      W += wgt;  // every lane adds the same values in the same order
      add(p, wgt);
    }
  }
  const float inv = bad ? NAN : (W > 0.f ? 1.f / W : 0.f);
  T *o = reinterpret_cast<T *>(a.o) + b * a.os[0] + t * a.os[1] + (g * a.h + j) * a.os[2];
#pragma unroll
  for (int i = 0; i < PER; i++) st(o + (int64_t)(lane * PER + i) * a.os[3], acc[i] * inv);
  if (a.lse != nullptr && lane == 0)
    a.lse[b * a.ls[0] + t * a.ls[1] + (g * a.h + j) * a.ls[2]] =
        bad ? NAN : (W > 0.f ? (M + log2f(W)) * kLn2 : -INFINITY);
  }
}

template <typename T, int DK, int DV, bool P16>
cudaError_t launch_dk(const nsa_cuda_attn_t *a, const KInv &iv, void *po, float *pl, const int32_t *pair_off,
                      const unsigned char *skip, int64_t row0, int64_t rows, int64_t items, int Pk, int HT,
                      int njt, cudaStream_t st) {
  using L = FkSmem<DK, DV>;
  static unsigned long long set_on = 0;  // bwd_common.cuh: set once per device
  int dev = 0;
  cudaError_t e = set_smem_once(fwd_key_kernel<T, DK, DV, P16>, (int)L::bytes, &set_on, &dev);
  if (e != cudaSuccess) return e;
  fwd_key_kernel<T, DK, DV, P16><<<(unsigned)items, kNW * 32, L::bytes, st>>>(*a, iv, po, pl, Pk, HT, njt,
                                                                                 iv.stage != 0);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  // Heads per merge warp: 4 where h allows. A warp then checks a row's skip
  // flag once for 4 heads and a shared-tile row costs a quarter of the CTA
  // launches; H200, T = 16k (docs/PERF.md): correlated h = 16 2.405 -> 2.327
  // ms, 64k 9.673 -> 9.401, random unchanged (4.288 / 4.275). A/B:
  // NSA_CUDA_MERGE_HPW = 1, 2 or 4.
  int hpw = a->h % 4 == 0 ? 4 : a->h % 2 == 0 ? 2 : 1;
  const char *he = getenv("NSA_CUDA_MERGE_HPW");
  if (he && (atoi(he) == 1 || atoi(he) == 2 || atoi(he) == 4) && a->h % atoi(he) == 0) hpw = atoi(he);
  const int64_t warps = rows * a->h / hpw;
  const int64_t blocks = (warps + 7) / 8;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const bool hpow2 = (a->h & (a->h - 1)) == 0;
  const int hlg = __builtin_ctzll((unsigned long long)a->h);
  if (blocks > 0) {
    if (hpw == 4)
      fwd_key_merge_kernel<T, DV, P16, 4><<<(unsigned)blocks, 256, 0, st>>>(*a, row0, rows, pair_off, po, pl, skip, hpow2, hlg);
    else if (hpw == 2)
      fwd_key_merge_kernel<T, DV, P16, 2><<<(unsigned)blocks, 256, 0, st>>>(*a, row0, rows, pair_off, po, pl, skip, hpow2, hlg);
    else
      fwd_key_merge_kernel<T, DV, P16, 1><<<(unsigned)blocks, 256, 0, st>>>(*a, row0, rows, pair_off, po, pl, skip, hpow2, hlg);
  }
  return cudaGetLastError();
}

template <typename T, bool P16>
cudaError_t launch_t(const nsa_cuda_attn_t *a, const KInv &iv, void *po, float *pl, const int32_t *pair_off,
                     const unsigned char *skip, int64_t row0, int64_t rows, int64_t items, int Pk, int HT,
                     int njt, cudaStream_t st) {
#define NSA_FK(DK, DV)                                                                                   \
  if (a->Dk == DK && a->Dv == DV)                                                                        \
  return launch_dk<T, DK, DV, P16>(a, iv, po, pl, pair_off, skip, row0, rows, items, Pk, HT, njt, st)
  NSA_FK(64, 64);
  NSA_FK(128, 64);
  NSA_FK(192, 64);
  NSA_FK(256, 64);
  NSA_FK(64, 128);
  NSA_FK(128, 128);
  NSA_FK(192, 128);
  NSA_FK(256, 128);
#undef NSA_FK
  return cudaErrorInvalidValue;
}

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

}  // namespace

extern "C" int nsa_cuda_fwd_key_supported(nsa_dtype_t dt, int64_t Dk, int64_t Dv) {
  if (dt != NSA_BF16 && dt != NSA_F16) return 0;
  return (Dk == 64 || Dk == 128 || Dk == 192 || Dk == 256) && (Dv == 64 || Dv == 128);
}

extern "C" int nsa_cuda_fwd_key_plan(const nsa_cuda_attn_t *a, nsa_dtype_t dt, int sel_kind, int32_t block_size,
                                     int aligned, int mode, size_t base, nsa_cuda_fwd_key_layout_t *L) {
  memset(L, 0, sizeof(*L));
  if (mode == 0 || !aligned || sel_kind != NSA_SEL_BLOCK_INDICES) return 0;
  if (!nsa_cuda_fwd_key_supported(dt, a->Dk, a->Dv)) return 0;
  const int64_t rows = a->B * a->S * a->G;
  if (rows <= 0 || a->h <= 0) return 0;
  L->NT = (a->Skv + kT - 1) / kT;
  const int64_t ntiles = a->B * a->G * L->NT;
  const int64_t bound = nsa_cuda_inv_row_bound_blocks(a->n, block_size, L->NT);  // pairs per row
  if (ntiles <= 0 || bound <= 0 || ntiles + 1 > 0x7fffffff || rows + 1 > 0x7fffffff) return 0;
  // o partials in the input dtype (half the bytes) unless NSA_CUDA_FWD_KEY_F32=1
  const char *fe = getenv("NSA_CUDA_FWD_KEY_F32");
  L->p16 = !(fe && fe[0] == '1');
  const char *se = getenv("NSA_CUDA_FWD_KEY_STAGE");  // A/B: 0 = 4-byte stores straight from registers
  L->stage = !(se && se[0] == '0');
  const double pbytes = L->p16 ? 2.0 : 4.0;
  const double per_row = (double)bound * (double)a->h * ((double)a->Dv * pbytes + 4.0);
  int64_t br = (int64_t)(kPartBudget / per_row);
  const char *be = getenv("NSA_CUDA_FWD_KEY_BATCH_ROWS");  // tests: force several batches
  if (be && atoll(be) > 0 && atoll(be) < br) br = atoll(be);
  if (br < 1) br = 1;
  if (br > rows) br = rows;
  if (br * bound >= 0x7fffffff) br = 0x7ffffffe / bound;
  if (br < 1) return 0;
  L->batch_rows = br;
  L->cap = br * bound;
  const int HT = a->h < 16 ? (int)a->h : 16;
  const int Pk = 16 / HT;
  const int64_t njt = (a->h + 15) / 16;
  // Chunks per CTA item: each item pays a prologue (K/V tile, row metadata,
  // first Q gathers) that its chunks amortize. NSA_CUDA_FWD_KEY_CHUNKS
  // overrides (A/B runs); rows per item are capped by kSegMax.
  int64_t chunks = 128;  // H200, T = 16k: h = 16 5.95 / 5.67 / 5.55 ms at 32 / 64 / 128 (docs/PERF.md)
  const char *ce = getenv("NSA_CUDA_FWD_KEY_CHUNKS");
  if (ce && atoll(ce) > 0) chunks = atoll(ce);
  int64_t seg = chunks * (int64_t)Pk / njt;
  if (seg < 1) seg = 1;
  if (seg > kSegMax) seg = kSegMax;
  L->seg_rows = (int)seg;
  L->items_bound = ntiles + L->cap / seg + 1;
  if (L->items_bound > 0x7fffffff) return 0;
  size_t o = align256(base);
  L->inv = o;
  o = align256(o + nsa_cuda_inv_layout(br, L->cap, ntiles, &L->il));
  L->part_o = o;
  o = align256(o + (size_t)L->cap * (size_t)a->h * (size_t)a->Dv * (L->p16 ? 2 : 4));
  L->part_l = o;
  o = align256(o + (size_t)L->cap * (size_t)a->h * 4);
  if (nsa_cuda_fwd_shared_plan(a, dt, o, &L->sh)) o = L->sh.end;
  L->end = o;
  return 1;
}

extern "C" cudaError_t nsa_cuda_launch_fwd_key(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                               void *ws, const nsa_cuda_fwd_key_layout_t *L, cudaStream_t st) {
  char *w = (char *)ws;
  char *inv = w + L->inv;
  KInv iv;
  iv.tile_off = (const int32_t *)(inv + L->il.tile_off);
  iv.rows = (const int32_t *)(inv + L->il.rows_out);
  iv.pidx = (const int32_t *)(inv + L->il.vals_out);
  iv.item_off = (const int32_t *)(inv + L->il.item_off);
  iv.masks = (const unsigned long long *)(inv + L->il.masks);
  iv.NT = L->NT;
  iv.ntiles = a->B * a->G * L->NT;
  iv.seg_rows = L->seg_rows;
  iv.stage = L->stage;
  const int32_t *pair_off = (const int32_t *)(inv + L->il.pair_off);
  void *po = w + L->part_o;
  float *pl = (float *)(w + L->part_l);
  const int HT = a->h < 16 ? (int)a->h : 16;
  const int Pk = 16 / HT;
  const int njt = (int)((a->h + 15) / 16);
  const int64_t rows = a->B * a->S * a->G;
  const unsigned char *skip = nullptr;
  if (L->sh.on) {  // groups sharing their tiles leave the inversion and the merge
    cudaError_t e = nsa_cuda_launch_fwd_shared_select(a, plan, ws, &L->sh, st);
    if (e != cudaSuccess) return e;
    skip = (const unsigned char *)(w + L->sh.skip);
  }
  // Row batches run one after the other on the stream and reuse the same
  // inversion and partial buffers (stream order makes that safe).
  for (int64_t row0 = 0; row0 < rows; row0 += L->batch_rows) {
    const int64_t nb = rows - row0 < L->batch_rows ? rows - row0 : L->batch_rows;
    const int64_t cap = nb * (L->cap / L->batch_rows);
    cudaError_t e = nsa_cuda_launch_invert_rows(plan, a->B, a->S, a->G, L->NT, row0, nb, cap, L->seg_rows, skip,
                                                inv, &L->il, st);
    if (e != cudaSuccess) return e;
    const int64_t items = iv.ntiles + cap / L->seg_rows + 1;
    switch (dt) {
      case NSA_BF16:
        e = L->p16 ? launch_t<__nv_bfloat16, true>(a, iv, po, pl, pair_off, skip, row0, nb, items, Pk, HT, njt, st)
                   : launch_t<__nv_bfloat16, false>(a, iv, po, pl, pair_off, skip, row0, nb, items, Pk, HT, njt, st);
        break;
      case NSA_F16:
        e = L->p16 ? launch_t<__half, true>(a, iv, po, pl, pair_off, skip, row0, nb, items, Pk, HT, njt, st)
                   : launch_t<__half, false>(a, iv, po, pl, pair_off, skip, row0, nb, items, Pk, HT, njt, st);
        break;
      default: return cudaErrorInvalidValue;
    }
    if (e != cudaSuccess) return e;
  }
  if (L->sh.on) return nsa_cuda_launch_fwd_shared(a, dt, plan, ws, &L->sh, st);
  return cudaSuccess;
}
