// varlen_fwd_mma.cuh — tensor-core varlen forward, included by varlen_fwd_{bf16,f16}.cu.
//
// One CTA (4 warps) per (group of P queries of one (b, g), head tile of 16).
// The 16 MMA rows are (query m / HT, head jt*16 + m % HT), HT = min(h, 16)
// (plan_group.cu explains the packing). The CTA walks its group's refined
// union (pieces) in tiles of 64 keys; each tile's K and V rows are read in
// place from k[b][tok][g][:] / v[b][tok][g][:] with 16-byte cp.async into a
// two-stage shared-memory ring (no K/V copies). Warp w owns keys 16w..16w+15 of
// every tile and keeps its own online-softmax state (m, l, acc in f32); the
// four states are merged with the log-sum-exp rule at the end, in a fixed
// order, so the result is deterministic.
//
//   S (16x16 per warp) = Q (16 x DK, smem, ldmatrix) . K^T (ldmatrix)      mma m16n8k16
//   O (16 x DV)       += P (S accumulators repacked as A) . V (ldmatrix.trans)
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_internal.h"

namespace nsa_mma {

constexpr int kThreads = 128;
constexpr int kBN = 64;  // keys per tile (16 per warp)
// Groups with at most this many pieces search them in shared memory: 32 for
// one query tile (2 * n pieces for n <= 16), 64 for two. Kept small on
// purpose: at Dk = Dv = 128 one more KB of shared memory drops the kernel
// from 3 to 2 CTAs per SM, which cost 25-35 % on H100 (docs/PERF.md).
template <int QT> __host__ __device__ constexpr int piece_cache() { return QT == 1 ? 32 : 64; }

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float *c, const unsigned *a, unsigned b0, unsigned b1) {
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
  static __device__ __forceinline__ void store_plain(__nv_bfloat16 *p, float x) { *p = __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void store(__nv_bfloat16 *p, float x) {
    __nv_bfloat16 v = __float2bfloat16_rn(x);
    asm volatile("st.global.cs.b16 [%0], %1;\n" ::"l"(p), "h"(*reinterpret_cast<unsigned short *>(&v)));
  }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void mma(float *c, const unsigned *a, unsigned b0, unsigned b1) {
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
  static __device__ __forceinline__ void store_plain(__half *p, float x) { *p = __float2half_rn(x); }
  static __device__ __forceinline__ void store(__half *p, float x) {
    __half v = __float2half_rn(x);
    asm volatile("st.global.cs.b16 [%0], %1;\n" ::"l"(p), "h"(*reinterpret_cast<unsigned short *>(&v)));
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
// 16-byte async copy with an L2 cache policy; src_bytes = 0 zero-fills
// without reading src.
__device__ __forceinline__ void cp_async16(unsigned dst, const void *src, int src_bytes,
                                           unsigned long long pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
               "l"(src), "r"(src_bytes), "l"(pol));
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// L2 policies: K/V are re-read by many CTAs (keep them, evict_last); Q and O
// stream through once (evict_first), so at large h they do not push K/V out.
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

template <int DK, int DV, int QT, int NS> struct Smem {
  static constexpr int QS = DK + 8;  // padded row strides (elements): conflict-free ldmatrix
  static constexpr int KS = DK + 8;
  static constexpr int VS = DV + 8;
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + QT * 16 * QS * 2;
  static constexpr size_t v_off = k_off + NS * kBN * KS * 2;    // NS-stage K/V ring
  static constexpr size_t tok_off = v_off + NS * kBN * VS * 2;   // NS + 1 lookup buffers
  static constexpr size_t mask_off = tok_off + (NS + 1) * kBN * 4;
  static constexpr size_t pc_off = mask_off + (NS + 1) * kBN * 4;  // piece cache
  static constexpr size_t red_off = pc_off + piece_cache<QT>() * 16;  // m[4][16], l[4][16], M[16], L[16]
  static constexpr size_t bytes = red_off + (2 * 4 * 16 + 2 * 16) * 4;
  // The final merge reuses the K/V ring as acc[4 warps][16][DV] f32.
  static_assert(4 * 16 * DV * 4 <= NS * kBN * (KS + VS) * 2, "merge buffer fits in K/V ring");
};

// QT = number of 16-row MMA tiles (query tiles) per CTA. A group holds
// Pg = P * QT queries; tile mt has rows (query mt*P + m / HT, head m % HT).
// Each warp skips a query tile on the key tiles where none of its 16 keys
// belongs to that tile's queries (warp-uniform test), so random selections
// (whose union is ~Pg rows long) cost no more MMAs than QT = 1, while
// correlated ones load each K/V tile once for all Pg queries.
template <typename T, int DK, int DV, int QT, int NS>
__global__ void __launch_bounds__(kThreads)
    fwd_mma_kernel(nsa_cuda_attn_t a, int P, int HT, int njt, const nsa_cuda_piece_t *__restrict__ pieces,
                   const int2 *__restrict__ gcount, int64_t maxp, int hint) {
  using L = Smem<DK, DV, QT, NS>;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  T *sK = reinterpret_cast<T *>(smem + L::k_off);
  T *sV = reinterpret_cast<T *>(smem + L::v_off);
  int *sTok = reinterpret_cast<int *>(smem + L::tok_off);
  int *sMask = reinterpret_cast<int *>(smem + L::mask_off);
  nsa_cuda_piece_t *sPc = reinterpret_cast<nsa_cuda_piece_t *>(smem + L::pc_off);
  float *sRm = reinterpret_cast<float *>(smem + L::red_off);
  float *sRl = sRm + 64;
  float *sMt = sRl + 64;
  float *sLt = sMt + 16;

  // Bad selection (only reachable with sync=0, where the host never saw the
  // count): read nothing, write NaN so the caller cannot mistake it for a result.
  const bool bad = a.invalid != nullptr && *a.invalid > 0;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Pg = P * QT;
  const int64_t grp = blockIdx.x / njt;
  const int jt = blockIdx.x % njt;
  const int64_t ngt = (a.S + Pg - 1) / Pg;
  const int64_t g = grp % a.G, tg = (grp / a.G) % ngt, b = grp / (a.G * ngt);
  const int64_t t0 = tg * Pg;
  const int2 gc = gcount[grp];
  const int np = gc.x, Lg = bad ? 0 : gc.y;
  const nsa_cuda_piece_t *gp = pieces + grp * maxp;
  const unsigned long long pol_kv = policy_evict_last(), pol_q = policy_evict_first();
  // Short piece lists (always at h >= 16, where a group is one query) are
  // searched in shared memory: the lookup is on every tile's critical path.
  if (np <= piece_cache<QT>()) {
    for (int i = tid; i < np; i += kThreads) sPc[i] = gp[i];
    gp = sPc;
  }

  // Row m of query tile mt -> (query, head); -1 head when the row is padding.
  auto row_head = [&](int mt, int m, int64_t *t) -> int64_t {
    int q = mt * P + m / HT;
    int64_t j = (int64_t)jt * 16 + m % HT;
    *t = t0 + q;
    if (m >= P * HT || *t >= a.S || j >= a.h) return -1;
    return g * a.h + j;
  };

  // ---- Q tiles: QT x 16 rows x DK -> smem (zero rows for padding) ----
  {
    constexpr int CH = DK / 8;
    const T *q = reinterpret_cast<const T *>(a.q);
    for (int c = tid; c < QT * 16 * CH; c += kThreads) {
      int mr = c / CH, part = c % CH;
      int64_t t;
      int64_t head = row_head(mr / 16, mr % 16, &t);
      const T *src = q;
      int bytes = 0;
      if (head >= 0) {
        src = q + b * a.qs[0] + t * a.qs[1] + head * a.qs[2] + part * 8;
        bytes = 16;
      }
      if (hint) cp_async16(smem_u32(sQ + mr * L::QS + part * 8), src, bytes, pol_q);
      else cp_async16(smem_u32(sQ + mr * L::QS + part * 8), src, bytes);
    }
  }

  const T *kbase = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
  const T *vbase = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];

  // Union position u -> token and query mask (binary search over piece offsets).
  auto lookup = [&](int tile, int stg) {
    if (tid < kBN) {
      int u = tile * kBN + tid;
      int tok = -1, mask = 0;
      if (u < Lg) {
        int lo = 0, hi = np - 1;
        while (lo < hi) {
          int mid = (lo + hi + 1) >> 1;
          if (gp[mid].off <= u) lo = mid;
          else hi = mid - 1;
        }
        nsa_cuda_piece_t p = gp[lo];
        tok = p.start + (u - p.off);
        mask = p.mask;
      }
      sTok[stg * kBN + tid] = tok;
      sMask[stg * kBN + tid] = mask;
    }
  };
  auto issue = [&](int stg, int lb) {
    constexpr int CK = DK / 8, CV = DV / 8;
    for (int c = tid; c < kBN * CK; c += kThreads) {
      int kk = c / CK, part = c % CK;
      int tok = sTok[lb * kBN + kk];
      const T *src = tok >= 0 ? kbase + (int64_t)tok * a.ks[1] + part * 8 : kbase;
      if (hint) cp_async16(smem_u32(sK + (stg * kBN + kk) * L::KS + part * 8), src, tok >= 0 ? 16 : 0, pol_kv);
      else cp_async16(smem_u32(sK + (stg * kBN + kk) * L::KS + part * 8), src, tok >= 0 ? 16 : 0);
    }
    for (int c = tid; c < kBN * CV; c += kThreads) {
      int kk = c / CV, part = c % CV;
      int tok = sTok[lb * kBN + kk];
      const T *src = tok >= 0 ? vbase + (int64_t)tok * a.vs[1] + part * 8 : vbase;
      if (hint) cp_async16(smem_u32(sV + (stg * kBN + kk) * L::VS + part * 8), src, tok >= 0 ? 16 : 0, pol_kv);
      else cp_async16(smem_u32(sV + (stg * kBN + kk) * L::VS + part * 8), src, tok >= 0 ? 16 : 0);
    }
  };

  // This thread's two rows (lane/4 and lane/4+8) of each query tile, their
  // query bits, and each tile's query bits.
  const int r0 = lane >> 2, r1 = r0 + 8;
  unsigned bit0[QT], bit1[QT], tbits[QT];
#pragma unroll
  for (int mt = 0; mt < QT; mt++) {
    int64_t t;
    bit0[mt] = row_head(mt, r0, &t) >= 0 ? 1u << (mt * P + r0 / HT) : 0u;
    bit1[mt] = row_head(mt, r1, &t) >= 0 ? 1u << (mt * P + r1 / HT) : 0u;
    tbits[mt] = (P >= 32 ? 0xffffffffu : ((1u << P) - 1u)) << (mt * P);
  }
  const float c2 = a.scale * 1.4426950408889634f;  // scores in log2 units

  float acc[QT][DV / 8][4];
  float mrow[QT][2], lrow[QT][2];
#pragma unroll
  for (int mt = 0; mt < QT; mt++) {
#pragma unroll
    for (int i = 0; i < DV / 8; i++) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    mrow[mt][0] = mrow[mt][1] = -INFINITY;
    lrow[mt][0] = lrow[mt][1] = 0.f;
  }

  // Pipeline (NS stages): lookups run NS tiles ahead (NS + 1 buffers), K/V
  // loads NS - 1 tiles ahead, so neither the piece search nor the copy
  // latency sits between two tiles' MMAs. One commit group per tile (empty
  // at the tail), so wait_group<NS - 1> always means "tile it has landed".
  const int ntiles = (Lg + kBN - 1) / kBN;
  __syncthreads();  // piece cache
  for (int i = 0; i < NS && i < ntiles; i++) lookup(i, i);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NS - 1; i++) {
    if (i < ntiles) issue(i, i);
    cp_commit();  // group i (group 0 also holds Q)
  }

  for (int it = 0; it < ntiles; it++) {
    const int stg = it % NS, lb = it % (NS + 1);
    if (it + NS - 1 < ntiles) issue((it + NS - 1) % NS, (it + NS - 1) % (NS + 1));
    cp_commit();
    if (it + NS < ntiles) lookup(it + NS, (it + NS) % (NS + 1));
    cp_wait<NS - 1>();
    __syncthreads();

    const int *mk = sMask + lb * kBN + warp * 16;
    const int kmask = mk[lane & 15];
    bool act[QT];
    bool any = false;
#pragma unroll
    for (int mt = 0; mt < QT; mt++) {
      act[mt] = __any_sync(0xffffffffu, (kmask & tbits[mt]) != 0);
      any |= act[mt];
    }
    if (any) {
      // ---- S = Q K^T for this warp's 16 keys, each active query tile ----
      float s[QT][2][4];
#pragma unroll
      for (int mt = 0; mt < QT; mt++)
#pragma unroll
        for (int i = 0; i < 4; i++) s[mt][0][i] = s[mt][1][i] = 0.f;
      const T *kw = sK + (stg * kBN + warp * 16) * L::KS;
#pragma unroll
      for (int ks = 0; ks < DK / 16; ks++) {
        unsigned b0, b1, b2, b3;
        ldsm_x4(smem_u32(kw + ((lane & 7) + (lane >> 4) * 8) * L::KS + ks * 16 + ((lane >> 3) & 1) * 8),
                b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < QT; mt++) {
          if (!act[mt]) continue;
          unsigned af[4];
          ldsm_x4(smem_u32(sQ + (mt * 16 + (lane & 15)) * L::QS + ks * 16 + (lane >> 4) * 8), af[0],
                  af[1], af[2], af[3]);
          MmaOp<T>::mma(s[mt][0], af, b0, b1);
          MmaOp<T>::mma(s[mt][1], af, b2, b3);
        }
      }

      // ---- online softmax (per thread: rows r0, r1; 4 columns each) ----
      unsigned pa[QT][4];
#pragma unroll
      for (int mt = 0; mt < QT; mt++) {
        if (!act[mt]) continue;
        float p[2][4];
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
          const unsigned bit = rh ? bit1[mt] : bit0[mt];
          float x[4];
#pragma unroll
          for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
              int kc = nt * 8 + (lane & 3) * 2 + e;
              x[nt * 2 + e] = (mk[kc] & bit) ? s[mt][nt][rh * 2 + e] * c2 : -INFINITY;
            }
          float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float mnew = fmaxf(mrow[mt][rh], mx);
          const float muse = mnew == -INFINITY ? 0.f : mnew;
          const float alpha = ex2(mrow[mt][rh] - muse);
          float sum = 0.f;
#pragma unroll
          for (int i = 0; i < 4; i++) {
            float pv = ex2(x[i] - muse);
            sum += pv;
            p[i >> 1][rh * 2 + (i & 1)] = pv;
          }
          lrow[mt][rh] = lrow[mt][rh] * alpha + sum;
          mrow[mt][rh] = mnew;
#pragma unroll
          for (int i = 0; i < DV / 8; i++) {
            acc[mt][i][rh * 2] *= alpha;
            acc[mt][i][rh * 2 + 1] *= alpha;
          }
        }
        pa[mt][0] = MmaOp<T>::pack(p[0][0], p[0][1]);
        pa[mt][1] = MmaOp<T>::pack(p[0][2], p[0][3]);
        pa[mt][2] = MmaOp<T>::pack(p[1][0], p[1][1]);
        pa[mt][3] = MmaOp<T>::pack(p[1][2], p[1][3]);
      }

      // ---- O += P V ----
      const T *vw = sV + (stg * kBN + warp * 16) * L::VS;
#pragma unroll
      for (int nd = 0; nd < DV / 16; nd++) {
        unsigned b0, b1, b2, b3;
        ldsm_x4_t(smem_u32(vw + ((lane & 7) + ((lane >> 3) & 1) * 8) * L::VS + nd * 16 + (lane >> 4) * 8),
                  b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < QT; mt++) {
          if (!act[mt]) continue;
          MmaOp<T>::mma(acc[mt][2 * nd], pa[mt], b0, b1);
          MmaOp<T>::mma(acc[mt][2 * nd + 1], pa[mt], b2, b3);
        }
      }
    }
    __syncthreads();  // stage stg is refilled by the next iteration's issue
  }
  cp_wait<0>();

  // ---- per query tile: merge the four warps' states (fixed order) ----
  float *sAcc = reinterpret_cast<float *>(smem + L::k_off);  // [4][16][DV]
  T *o = reinterpret_cast<T *>(a.o);
#pragma unroll
  for (int mt = 0; mt < QT; mt++) {
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
      lrow[mt][rh] += __shfl_xor_sync(0xffffffffu, lrow[mt][rh], 1);
      lrow[mt][rh] += __shfl_xor_sync(0xffffffffu, lrow[mt][rh], 2);
    }
    __syncthreads();  // previous tile's sAcc / sMt readers are done
    if ((lane & 3) == 0) {
      sRm[warp * 16 + r0] = mrow[mt][0];
      sRm[warp * 16 + r1] = mrow[mt][1];
      sRl[warp * 16 + r0] = lrow[mt][0];
      sRl[warp * 16 + r1] = lrow[mt][1];
    }
    __syncthreads();
    if (tid < 16) {
      float M = -INFINITY;
      for (int w = 0; w < 4; w++) M = fmaxf(M, sRm[w * 16 + tid]);
      const float Mu = M == -INFINITY ? 0.f : M;
      float Lt = 0.f;
      for (int w = 0; w < 4; w++) Lt += sRl[w * 16 + tid] * ex2(sRm[w * 16 + tid] - Mu);
      sMt[tid] = M;
      sLt[tid] = Lt;
    }
    __syncthreads();
    {
      const float f0 = ex2(mrow[mt][0] - (sMt[r0] == -INFINITY ? 0.f : sMt[r0]));
      const float f1 = ex2(mrow[mt][1] - (sMt[r1] == -INFINITY ? 0.f : sMt[r1]));
      float *aw = sAcc + warp * 16 * DV;
#pragma unroll
      for (int i = 0; i < DV / 8; i++) {
        int col = i * 8 + (lane & 3) * 2;
        aw[r0 * DV + col] = acc[mt][i][0] * f0;
        aw[r0 * DV + col + 1] = acc[mt][i][1] * f0;
        aw[r1 * DV + col] = acc[mt][i][2] * f1;
        aw[r1 * DV + col + 1] = acc[mt][i][3] * f1;
      }
    }
    __syncthreads();
    for (int e = tid; e < 16 * DV; e += kThreads) {
      int m = e / DV, col = e % DV;
      int64_t t;
      int64_t head = row_head(mt, m, &t);
      if (head < 0) continue;
      float sum = sAcc[m * DV + col] + sAcc[(16 + m) * DV + col] + sAcc[(32 + m) * DV + col] +
                  sAcc[(48 + m) * DV + col];
      float Lt = sLt[m];
      float val = bad ? NAN : (Lt > 0.f ? sum / Lt : 0.f);
      MmaOp<T>::store(o + b * a.os[0] + t * a.os[1] + head * a.os[2] + col * a.os[3], val);
    }
    if (a.lse != nullptr && tid < 16) {
      int64_t t;
      int64_t head = row_head(mt, tid, &t);
      if (head >= 0) {
        float Lt = sLt[tid];
        float v = bad ? NAN : (Lt > 0.f ? (sMt[tid] + log2f(Lt)) * 0.6931471805599453f : -INFINITY);
        a.lse[b * a.ls[0] + t * a.ls[1] + head * a.ls[2]] = v;
      }
    }
  }
}

// CTAs per SM that shared memory allows (228 KB per SM, 1 KB reserved per
// CTA on sm_90).
constexpr int ctas_per_sm(size_t bytes) { return (int)((228 * 1024) / (bytes + 1024)); }
// K/V ring depth: 3 stages only where that costs no CTA per SM (the kernel is
// latency-bound: resident CTAs matter more than a deeper ring), else 2.
template <int DK, int DV, int QT> constexpr int stages_for() {
  return ctas_per_sm(Smem<DK, DV, QT, 3>::bytes) >= ctas_per_sm(Smem<DK, DV, QT, 2>::bytes) ? 3 : 2;
}

template <typename T, int DK, int DV, int QT, int NS>
cudaError_t launch_ns(const nsa_cuda_attn_t *a, int P, const nsa_cuda_piece_t *pieces,
                      const int2 *gcount, int64_t maxp, cudaStream_t st) {
  using L = Smem<DK, DV, QT, NS>;
  const int HT = a->h >= 16 ? 16 : (int)a->h;
  const int njt = (int)((a->h + 15) / 16);
  const int64_t ngroups = nsa_cuda_num_groups(a->B, a->S, a->G, P * QT);
  const int64_t grid = ngroups * njt;
  if (grid == 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t e = cudaFuncSetAttribute(fwd_mma_kernel<T, DK, DV, QT, NS>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes);
  if (e == cudaSuccess)  // all of the unified L1/shared storage as shared memory
    e = cudaFuncSetAttribute(fwd_mma_kernel<T, DK, DV, QT, NS>,
                             cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  if (e != cudaSuccess) return e;
  static int said = 0;  // NSA_CUDA_VERBOSE=1: the configuration, once per instantiation
  if (!said) {
    said = 1;
    const char *vb = getenv("NSA_CUDA_VERBOSE");
    if (vb && vb[0] == '1') {
      int nb = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, fwd_mma_kernel<T, DK, DV, QT, NS>, kThreads, L::bytes);
      fprintf(stderr, "nsa_cuda fwd_mma: Dk=%d Dv=%d QT=%d NS=%d smem=%zu B, %d CTAs/SM\n", DK, DV, QT, NS,
              (size_t)L::bytes, nb);
    }
  }
  fwd_mma_kernel<T, DK, DV, QT, NS><<<(unsigned)grid, kThreads, L::bytes, st>>>(
      *a, P, HT, njt, pieces, gcount, maxp, a->l2hint);
  return cudaGetLastError();
}

template <typename T, int DK, int DV, int QT>
cudaError_t launch_qt(const nsa_cuda_attn_t *a, int P, const nsa_cuda_piece_t *pieces,
                      const int2 *gcount, int64_t maxp, cudaStream_t st) {
  constexpr int NS = stages_for<DK, DV, QT>();
  if constexpr (NS == 3) {
    if (a->stages_max >= 3) return launch_ns<T, DK, DV, QT, 3>(a, P, pieces, gcount, maxp, st);
  }
  return launch_ns<T, DK, DV, QT, 2>(a, P, pieces, gcount, maxp, st);
}

#include "varlen_fwd_mma_q1.cuh"

// P here is the queries per MMA tile; the group planner must have been run
// with P * nsa_cuda_qtiles(DK, DV, P, qt_max) queries per group.
template <typename T, int DK, int DV>
cudaError_t launch(const nsa_cuda_attn_t *a, int P, const nsa_cuda_piece_t *pieces,
                   const int2 *gcount, int64_t maxp, cudaStream_t st) {
  if constexpr (DV <= 128) {
    if (nsa_cuda_qtiles(DK, DV, P, a->qt_max) == 2) return launch_qt<T, DK, DV, 2>(a, P, pieces, gcount, maxp, st);
  }
  if (a->qt_max == 3)  // NSA_CUDA_QTILES=3 (benchmarks): the generalized kernel with one tile
    return launch_qt<T, DK, DV, 1>(a, P, pieces, gcount, maxp, st);
  return launch_q1<T, DK, DV>(a, P, pieces, gcount, maxp, st);
}

// Dispatch over the built (Dk, Dv) pairs.
template <typename T>
cudaError_t dispatch(const nsa_cuda_attn_t *a, int P, const nsa_cuda_piece_t *pieces,
                     const int2 *gcount, int64_t maxp, cudaStream_t st) {
#define NSA_MMA_CASE(dk, dv) \
  if (a->Dk == dk && a->Dv == dv) return launch<T, dk, dv>(a, P, pieces, gcount, maxp, st);
#define NSA_MMA_ROW(dk) \
  NSA_MMA_CASE(dk, 64) NSA_MMA_CASE(dk, 128) NSA_MMA_CASE(dk, 192) NSA_MMA_CASE(dk, 256)
  NSA_MMA_ROW(64)
  NSA_MMA_ROW(128)
  NSA_MMA_ROW(192)
  NSA_MMA_ROW(256)
#undef NSA_MMA_ROW
#undef NSA_MMA_CASE
  return cudaErrorInvalidValue;
}

}  // namespace nsa_mma
