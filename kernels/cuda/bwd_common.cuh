// bwd_common.cuh — device helpers shared by the backward's .cu files
// (dtype loads/stores, mma.sync / ldmatrix / cp.async wrappers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bwd_internal.h"

namespace nsa_bwd {

template <typename T> __device__ __forceinline__ float ld(const T *p);
template <> __device__ __forceinline__ float ld<float>(const float *p) { return __ldg(p); }
template <> __device__ __forceinline__ float ld<__half>(const __half *p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16 *p) {
  return __bfloat162float(*p);
}
template <typename T> __device__ __forceinline__ void st(T *p, float x);
template <> __device__ __forceinline__ void st<float>(float *p, float x) { *p = x; }
template <> __device__ __forceinline__ void st<__half>(__half *p, float x) { *p = __float2half_rn(x); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16 *p, float x) {
  *p = __float2bfloat16_rn(x);
}

// delta = rowsum(dO o)'s running sum over one 16-byte chunk of a 16-bit row:
// 8 elements of o (ov) and dO (dv), in element order. bwd_pre_vec_kernel and
// the row-block dq (fwd_rows.cu) both sum through this, each chunk's partial
// then reduced over the row's Dv / 8 lanes by xor shuffles (Dv / 16 first),
// so the two give bitwise the same delta.
template <typename T> __device__ __forceinline__ float2 to_f2(unsigned u);
template <> __device__ __forceinline__ float2 to_f2<__nv_bfloat16>(unsigned u) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
}
template <> __device__ __forceinline__ float2 to_f2<__half>(unsigned u) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&u));
}
template <typename T> __device__ __forceinline__ float dot8(uint4 ov, uint4 dv) {
  const unsigned ou[4] = {ov.x, ov.y, ov.z, ov.w}, du[4] = {dv.x, dv.y, dv.z, dv.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 x = to_f2<T>(ou[i]), y = to_f2<T>(du[i]);
    s = fmaf(x.x, y.x, s);
    s = fmaf(x.y, y.y, s);
  }
  return s;
}

// m16n8k16 with f32 accumulators; A row-major 16x16 (4 regs), B col 16x8 (2 regs).
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float *c, const unsigned *a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float x, float y) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<unsigned *>(&v);
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float *c, const unsigned *a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float x, float y) {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<unsigned *>(&v);
  }
};

__device__ __forceinline__ unsigned smem_u32(const void *p) {
  return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned &r0, unsigned &r1, unsigned &r2,
                                        unsigned &r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned &r0, unsigned &r1, unsigned &r2,
                                          unsigned &r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
// 16-byte async copy; src_bytes = 0 zero-fills without reading src.
__device__ __forceinline__ void cp_async16(unsigned dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// Same with an L2 eviction policy (createpolicy below).
__device__ __forceinline__ void cp_async16p(unsigned dst, const void *src, int src_bytes, unsigned long long pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes), "l"(pol));
}
// 4-byte async copy (scalars gathered per column); src_bytes = 0 zero-fills.
__device__ __forceinline__ void cp_async4(unsigned dst, const void *src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// L2 policies: data re-read by many CTAs stays (evict_last); data read once
// streams (evict_first), so it does not push the re-read data out of L2.
__device__ __forceinline__ unsigned long long policy_evict_last() {
  unsigned long long p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
__device__ __forceinline__ unsigned long long policy_evict_first() {
  unsigned long long p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The bits of 64-key tile kt that span [x, y) covers (bit i = key kt*64 + i);
// 0 when they do not meet (fwd_shared.cu, fwd_rows.cu).
__device__ __forceinline__ unsigned long long tile_span_bits(int x, int y, int kt) {
  const int k0 = kt * NSA_BWD_TILE;
  const int lo = max(x, k0) - k0, hi = min(y, k0 + NSA_BWD_TILE) - k0;
  if (hi <= lo) return 0ull;
  return (hi - lo == 64 ? ~0ull : ((1ull << (hi - lo)) - 1ull)) << lo;
}

// CTA item `it` of the inverted plan (bwd_invert_plan.cu: item_off
// [ntiles+1] = first item of each tile) -> tile x and segment index within
// it; false past the real item count (the grid is an upper bound).
__device__ __forceinline__ bool inv_find_item(const int32_t *item_off, int64_t ntiles, int64_t it, int64_t *x,
                                              int *seg) {
  if (it >= item_off[ntiles]) return false;
  int64_t lo = 0, hi = ntiles - 1;  // last x with item_off[x] <= it
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (item_off[mid] <= it) lo = mid;
    else hi = mid - 1;
  }
  *x = lo;
  *seg = (int)(it - item_off[lo]);
  return true;
}

// The K/V tile of the 64 keys from k0 → shared memory sK [64][KS], sV
// [64][VS] (the key-centric kernels, fwd_key.cu and bwd_dkdv.cu): 16-byte
// cp.async pieces spread over nthreads threads, keys past Skv zero-filled
// (their mask bits are 0). kb/vb point at key 0 of the tile's (b, g); ks1/vs1
// are the token strides. With USE_POL the copies carry the L2 policy pol
// (the backward streams K/V with evict_first). The caller commits the group.
template <typename T, int DK, int DV, int KS, int VS, bool USE_POL>
__device__ __forceinline__ void load_kv_tile(const T *kb, int64_t ks1, const T *vb, int64_t vs1, int k0,
                                             int64_t Skv, T *sK, T *sV, int tid, int nthreads,
                                             unsigned long long pol) {
  constexpr int CK = DK / 8, CV = DV / 8;  // 16-byte pieces per K / V row
  for (int c = tid; c < NSA_BWD_TILE * (CK + CV); c += nthreads) {
    const bool isk = c < NSA_BWD_TILE * CK;
    const int cc = isk ? c : c - NSA_BWD_TILE * CK;
    const int CH = isk ? CK : CV;
    const int kk = cc / CH, pt = cc % CH;
    const int tok = k0 + kk;
    const bool ok = tok < Skv;
    const T *src = isk ? (ok ? kb + (int64_t)tok * ks1 + pt * 8 : kb) : (ok ? vb + (int64_t)tok * vs1 + pt * 8 : vb);
    T *dst = isk ? sK + kk * KS + pt * 8 : sV + kk * VS + pt * 8;
    if constexpr (USE_POL) cp_async16p(smem_u32(dst), src, ok ? 16 : 0, pol);
    else cp_async16(smem_u32(dst), src, ok ? 16 : 0);
  }
}

// One 64-key tile of K or V (D columns) into dst [64][SS] by NTH threads
// (the shared-tile kernels, fwd_shared.cu and bwd_shared_dq.cu), keys past
// Skv zero-filled. Where NTH threads cover whole rows (D in {64, 128} at 128
// threads) each thread keeps one 16-byte column and steps its source pointer
// by a fixed number of rows (per-piece index math was a large part of the
// forward kernel's instructions); else (D = 192) piece by piece. base points
// at key 0 of the (b, g); s1 is the token stride. The caller commits.
template <typename T, int D, int SS, int NTH>
__device__ __forceinline__ void load_tile_rows(const T *base, int64_t s1, int k0, int64_t Skv, T *dst, int tid) {
  constexpr int C = D / 8;  // 16-byte pieces per row
  if constexpr (NTH % C == 0) {
    constexpr int RP = NTH / C;  // rows per pass
    const int pc = tid % C, rr = tid / C;
    const T *src = base + (int64_t)(k0 + rr) * s1 + pc * 8;
    const unsigned d0 = smem_u32(dst + rr * SS + pc * 8);
#pragma unroll
    for (int i = 0; i < NSA_BWD_TILE / RP; i++) {
      const bool ok = k0 + rr + i * RP < Skv;
      cp_async16(d0 + i * RP * SS * 2, ok ? src : base, ok ? 16 : 0);
      src += RP * s1;
    }
  } else {
    for (int c = tid; c < NSA_BWD_TILE * C; c += NTH) {
      const int kk = c / C, pc = c % C;
      const bool ok = k0 + kk < Skv;
      cp_async16(smem_u32(dst + kk * SS + pc * 8), ok ? base + (int64_t)(k0 + kk) * s1 + pc * 8 : base, ok ? 16 : 0);
    }
  }
}

// The shared-tile kernels' K/V ring (fwd_shared.cu, bwd_shared_dq.cu): load
// i is tile sTl[i / 2]'s K or V half (V at odd i when KFIRST, at even i
// otherwise) into ring buffer i % 3 of sB [3][64][BS]. kb / vb point at key
// 0 of the group's (b, g); ks1 / vs1 are the token strides.
template <typename T, int DK, int DV, int BS, int NTH, bool KFIRST>
__device__ __forceinline__ void ring_load(int i, const int *sTl, T *sB, const T *kb, int64_t ks1, const T *vb,
                                          int64_t vs1, int64_t Skv, int tid) {
  const int k0 = sTl[i >> 1] * NSA_BWD_TILE;
  T *dst = sB + (i % 3) * NSA_BWD_TILE * BS;
  if (((i & 1) != 0) == KFIRST) load_tile_rows<T, DV, BS, NTH>(vb, vs1, k0, Skv, dst, tid);
  else load_tile_rows<T, DK, BS, NTH>(kb, ks1, k0, Skv, dst, tid);
}

// A shared-tile group's prologue: its U union tiles into sTl (then a
// barrier: the first ring loads read them) and its [U][Q] key masks into
// sMk by cp.async (16-byte pieces: Q is even; the caller commits them with
// the first loads). gtiles / gmask rows have UMAX tiles.
template <int NTH, int UMAX>
__device__ __forceinline__ void group_prologue(const int32_t *gtiles, const unsigned long long *gmask, int64_t grp,
                                               int U, int Q, int *sTl, unsigned long long *sMk, int tid) {
  for (int i = tid; i < U; i += NTH) sTl[i] = gtiles[grp * UMAX + i];
  __syncthreads();
  const unsigned long long *gm = gmask + grp * UMAX * Q;
  for (int i = tid; i < U * Q / 2; i += NTH) cp_async16(smem_u32(sMk + 2 * i), gm + 2 * i, 16);
}

// Chunk columns of the key-centric kernels (fwd_key.cu, bwd_dkdv.cu): a
// chunk is 16 MMA columns over a tile's listed rows, column m of chunk ch =
//   (listed row (ch / njt)*Pk + m / HT, head (ch % njt)*16 + m % HT),
// HT = min(h, 16), Pk = 16 / HT, njt = ceil(h / 16), so h < 16 packs Pk rows
// per chunk. Integer division costs ~20 instructions and this runs for every
// gathered piece: with ht_pow2 (HT a power of two: h in {1, 2, 4, 8} or
// >= 16) m / HT is m >> ht_lg, and njt == 1 (h <= 16) skips the chunk
// division. Returns false for the padding columns m >= Pk*HT; the caller
// checks wi and j against its row count and h.
__device__ __forceinline__ bool chunk_col(int ch, int m, int HT, int Pk, int njt, bool ht_pow2, int ht_lg,
                                          int *wi, int *j) {
  const int jt = njt == 1 ? 0 : ch % njt, cb = njt == 1 ? ch : ch / njt;
  const int mq = ht_pow2 ? m >> ht_lg : m / HT;
  *wi = cb * Pk + mq;
  *j = jt * 16 + (m - mq * HT);
  return m < Pk * HT;
}

// A fragment (16 x 16, row-major) from two m16n8 accumulator tiles c[0], c[1]
// (columns 0-7 and 8-15 of the same 16 rows): the accumulator layout of
// m16n8 equals the A layout of m16n8k16 half by half.
template <typename T>
__device__ __forceinline__ void acc_to_a(const float (&c)[2][4], unsigned *a) {
  a[0] = Mma<T>::pack(c[0][0], c[0][1]);
  a[1] = Mma<T>::pack(c[0][2], c[0][3]);
  a[2] = Mma<T>::pack(c[1][0], c[1][1]);
  a[3] = Mma<T>::pack(c[1][2], c[1][3]);
}

// S (16 x 64) = Q (16 rows x DK at q_s, row stride QS) . K^T (64 keys x DK
// at k_s, row stride KS), m16n8k16 over DK/16 k-steps, for the forward's
// key-tile kernels (fwd_key.cu, fwd_shared.cu). This thread gets rows
// lane/4 (elements 0, 1) and lane/4 + 8 (elements 2, 3) of n-tile nt, keys
// nt*8 + 2*(lane%4) + (e & 1).
template <typename T, int DK, int QS, int KS>
__device__ __forceinline__ void qk_tile(const T *q_s, const T *k_s, int lane, float (&s)[8][4]) {
#pragma unroll
  for (int i = 0; i < 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < DK / 16; ks++) {
    unsigned af[4];
    ldsm_x4(smem_u32(q_s + (lane & 15) * QS + ks * 16 + (lane >> 4) * 8), af[0], af[1], af[2], af[3]);
#pragma unroll
    for (int np = 0; np < 4; np++) {
      unsigned b0, b1, b2, b3;
      ldsm_x4(smem_u32(k_s + (np * 16 + (lane & 7) + (lane >> 4) * 8) * KS + ks * 16 + ((lane >> 3) & 1) * 8), b0,
              b1, b2, b3);
      Mma<T>::run(s[2 * np], af, b0, b1);
      Mma<T>::run(s[2 * np + 1], af, b2, b3);
    }
  }
}

// qk_tile's S with keys outside each row's set set to -inf, and this
// thread's part of the two row maxima (x0: row lane/4, x1: row lane/4 + 8;
// the caller reduces over the quad). mk0 / mk1 are the rows' 64-bit key
// masks already shifted right by 2*(lane%4), so each element tests a
// compile-time bit.
__device__ __forceinline__ void mask_rowmax(float (&s)[8][4], unsigned long long mk0, unsigned long long mk1,
                                            float &x0, float &x1) {
#pragma unroll
  for (int nt = 0; nt < 8; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int key = nt * 8 + (e & 1);
      const unsigned long long mk = e < 2 ? mk0 : mk1;
      const float v = ((mk >> key) & 1ull) ? s[nt][e] : -INFINITY;
      s[nt][e] = v;
      if (e < 2) x0 = fmaxf(x0, v);
      else x1 = fmaxf(x1, v);
    }
}

// dS of one key tile in the backward's dq kernels (bwd_shared_dq.cu and the
// row-block dq of fwd_rows.cu): S (qk_tile's layout: elements 0, 1 of row
// lane/4, keys nt*8 + 2cq + e; 2, 3 of row lane/4 + 8) becomes dS = P (dP -
// delta) with P = 2^(c2 S - l) on the rows' keys (masks fm0 / fm1, skipped
// when both hold the whole tile) and 0 elsewhere; l0 / l1 are the rows' lse
// in log2 units, d0 / d1 their delta.
__device__ __forceinline__ void ds_tile(float (&s)[8][4], const float (&dp)[8][4], unsigned long long fm0,
                                        unsigned long long fm1, int cq, float c2, float l0, float l1, float d0,
                                        float d1) {
  if ((fm0 & fm1) == ~0ull) {  // both rows hold the whole tile (the usual case): no masking
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float p = ex2(fmaf(s[nt][e], c2, -(e < 2 ? l0 : l1)));
        s[nt][e] = p * (dp[nt][e] - (e < 2 ? d0 : d1));
      }
  } else {
    const unsigned long long m0 = fm0 >> (2 * cq), m1 = fm1 >> (2 * cq);
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = nt * 8 + (e & 1);
        const bool in = (((e < 2 ? m0 : m1) >> key) & 1ull) != 0;
        // an empty row (lse = -inf) has no key bits: P = 0, never inf * 0
        const float p = in ? ex2(fmaf(s[nt][e], c2, -(e < 2 ? l0 : l1))) : 0.f;
        s[nt][e] = p * (dp[nt][e] - (e < 2 ? d0 : d1));
      }
  }
}

// One key tile of the forward's online softmax (fwd_shared.cu, fwd_rows.cu):
// qk_tile's S, masked by the rows' 64-bit key masks fm0 (row lane/4) and fm1
// (row lane/4 + 8) unless both hold the whole tile; the running maxima
// mr0 / mr1 (log2 units of c2 * S, c2 = scale * log2 e > 0), the
// thread-partial row sums l0 / l1, and O rescaled by 2^(m_old - m) when a
// maximum moved. S becomes P = 2^(c2 S - m) (0 for masked keys).
template <int DV>
__device__ __forceinline__ void softmax_tile(float (&s)[8][4], unsigned long long fm0, unsigned long long fm1,
                                             int cq, float c2, float &mr0, float &mr1, float &l0, float &l1,
                                             float (&o)[DV / 8][4]) {
  float x0 = -INFINITY, x1 = -INFINITY;
  if ((fm0 & fm1) == ~0ull) {  // both rows hold the whole tile (the usual case): no masking
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
      x0 = fmaxf(x0, fmaxf(s[nt][0], s[nt][1]));
      x1 = fmaxf(x1, fmaxf(s[nt][2], s[nt][3]));
    }
  } else {
    mask_rowmax(s, fm0 >> (2 * cq), fm1 >> (2 * cq), x0, x1);
  }
  x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
  x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
  x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
  x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
  // c2 > 0 (nsa_resolve_scale), so max(c2 * s) = c2 * max(s); -inf stays -inf.
  const float mn0 = fmaxf(mr0, x0 * c2), mn1 = fmaxf(mr1, x1 * c2);
  const float ms0 = mn0 == -INFINITY ? 0.f : mn0, ms1 = mn1 == -INFINITY ? 0.f : mn1;
  const float al0 = ex2(mr0 - ms0), al1 = ex2(mr1 - ms1);  // 2^-inf = 0 before the first key
  mr0 = mn0, mr1 = mn1;
  float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < 8; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const float p = ex2(fmaf(s[nt][e], c2, -(e < 2 ? ms0 : ms1)));
      s[nt][e] = p;
      if (e < 2) ps0 += p;
      else ps1 += p;
    }
  l0 = fmaf(l0, al0, ps0);
  l1 = fmaf(l1, al1, ps1);
  if (al0 != 1.f || al1 != 1.f) {  // the running max moved (mostly in the first tiles)
#pragma unroll
    for (int i = 0; i < DV / 8; i++) {
      o[i][0] *= al0, o[i][1] *= al0;
      o[i][2] *= al1, o[i][3] *= al1;
    }
  }
}

// One output row of the forward's accumulators (fwd_shared.cu, fwd_rows.cu):
// MMA row r0 + 8*half of O (Dv columns; this thread holds columns
// nt*8 + 2*cq, +1) times inv into orow (column stride os3): column pairs as
// 4-byte stores where the row is contiguous and 4-byte aligned.
template <typename T, int DV>
__device__ __forceinline__ void store_o_row(T *orow, int64_t os3, const float (&o)[DV / 8][4], int half, float inv,
                                            int cq) {
  if (os3 == 1 && (reinterpret_cast<uintptr_t>(orow) & 3) == 0) {
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++)
      *reinterpret_cast<unsigned *>(orow + nt * 8 + 2 * cq) =
          Mma<T>::pack(o[nt][2 * half] * inv, o[nt][2 * half + 1] * inv);
  } else {
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++) {
      const int col = nt * 8 + 2 * cq;
      st(orow + (int64_t)col * os3, o[nt][2 * half] * inv);
      st(orow + (int64_t)(col + 1) * os3, o[nt][2 * half + 1] * inv);
    }
  }
}

// P (16 x 64, qk_tile's accumulator layout, already in probabilities) as the
// A fragments of P.V: k-step kk = keys 16kk..16kk+15 = n-tiles 2kk, 2kk+1.
template <typename T> __device__ __forceinline__ void p_to_a(const float (&s)[8][4], unsigned (&pa)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; kk++) acc_to_a<T>(*reinterpret_cast<const float(*)[2][4]>(&s[2 * kk]), pa[kk]);
}

// O (16 x D) += P (16 x 64: p_to_a's A fragments, keys 16kk .. 16kk + 15)
// . V (64 keys x D at v_s, row stride VS; v_s may point at a column offset),
// m16n8k16 with V through ldmatrix.trans: the forward's O += P V (fwd_key.cu,
// fwd_shared.cu) and the shared-tile dq's dQ += dS K (bwd_shared_dq.cu).
template <typename T, int D, int VS>
__device__ __forceinline__ void pv_tile(const unsigned (&pa)[4][4], const T *v_s, int lane, float (&o)[D / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; kk++)
#pragma unroll
    for (int dp = 0; dp < D / 16; dp++) {
      unsigned b0, b1, b2, b3;
      ldsm_x4_t(smem_u32(v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VS + dp * 16 + (lane >> 4) * 8), b0,
                b1, b2, b3);
      Mma<T>::run(o[2 * dp], pa[kk], b0, b1);
      Mma<T>::run(o[2 * dp + 1], pa[kk], b2, b3);
    }
}

// ---- host launch helpers ----
// A kernel's dynamic shared memory limit belongs to the function in the
// device's primary context and stays set (nothing here resets a device): set
// it once per device (bit d of *set_on) instead of on every launch, which
// took a runtime call per launch. Devices >= 64 set it every launch. Racing
// first launches on one device both set it, which is harmless. *dev gets the
// current device.
template <typename K>
inline cudaError_t set_smem_once(K kernel, int bytes, unsigned long long *set_on, int *dev) {
  cudaError_t e = cudaGetDevice(dev);
  if (e != cudaSuccess) return e;
  const unsigned long long bit = *dev >= 0 && *dev < 64 ? 1ull << *dev : 0ull;
  if (bit && (__atomic_load_n(set_on, __ATOMIC_ACQUIRE) & bit)) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  if (bit) __atomic_fetch_or(set_on, bit, __ATOMIC_RELEASE);
  return cudaSuccess;
}

// Grid of resident CTAs for a kernel that strides over its work: SMs x CTAs
// per SM at (threads, bytes), both cached per device (*occ: the caller's
// cache of CTAs per SM for this kernel and size, 0 = unknown), clamped to
// [1, work].
template <typename K>
inline cudaError_t resident_grid(K kernel, int threads, size_t bytes, int dev, int *occ, int64_t work,
                                 int64_t *grid) {
  static int sms_of[64];
  int per_sm = dev >= 0 && dev < 64 ? __atomic_load_n(occ, __ATOMIC_RELAXED) : 0;
  if (per_sm <= 0) {
    cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes);
    if (e != cudaSuccess) return e;
    if (per_sm < 1) per_sm = 1;
    if (dev >= 0 && dev < 64) __atomic_store_n(occ, per_sm, __ATOMIC_RELAXED);
  }
  int sms = dev >= 0 && dev < 64 ? __atomic_load_n(&sms_of[dev], __ATOMIC_RELAXED) : 0;
  if (sms <= 0) {
    cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    if (dev >= 0 && dev < 64) __atomic_store_n(&sms_of[dev], sms, __ATOMIC_RELAXED);
  }
  int64_t g = (int64_t)sms * per_sm;
  if (g > work) g = work;
  *grid = g < 1 ? 1 : g;
  return cudaSuccess;
}

}  // namespace nsa_bwd
