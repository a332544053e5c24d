// bwd_shared_dq.cu — dq of the query groups that share their key tiles (bwd_shared.h).
//
// bwd_shared_dq_kernel, per accepted group (b, g, queries t0 .. t0 + Q - 1):
//   MMA row m (0..63) = (query q = m / h, head j = m % h); warp w owns rows
//   16w .. 16w + 15 (FlashAttention-2 fragments, as fwd_shared.cu);
//   sQ [64][Dk], sO [64][Dv]  the rows' q and do, once (zero past S);
//   sL, sD [64]               the rows' lse (natural log) and delta (zero past S);
//   sMk[u][q]                 query q's keys inside union tile u (the select
//                             kernel's masks; 0 where it did not select the tile);
//   per union tile u, K and V through the forward's ring of three half-tile
//   buffers, V first (load 2u = V_u, load 2u + 1 = K_u, load i into buffer
//   i % 3), so every use of K_u falls in one step:
//     step 2u:     dP = dO V_u^T                                (16 x 64 per warp)
//     step 2u + 1: S = Q K_u^T, P = 2^(c S - c' lse) on the query's keys (else 0),
//                  dS = P (dP - delta), dQ += dS K_u    (dS rounded to the dtype,
//                  as in the dk/dv kernel; c = scale log2 e, c' = log2 e)
//   Step i waits for load i, passes one barrier, then issues load i + 2 into
//   the buffer step i - 1 read (finished by every warp at that barrier).
//   dq = scale * dQ, written once per row: no partials, no reduction.
#include <stdlib.h>

#include <type_traits>

#include "bwd_common.cuh"
#include "bwd_shared.h"

using namespace nsa_bwd;

namespace {

constexpr int kT = NSA_BWD_TILE;  // keys per tile (64)
constexpr int kNW = 4;            // warps per CTA: 64 MMA rows
constexpr int kUmax = NSA_FWD_SHARED_UMAX;
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory: q and do rows, the K/V ring, lse and delta, the union tiles
// and the masks ([U][Q] u64, sized for the launch's Q). At Dk = Dv = 128 and
// Q = 4 (h = 16) ~89 KB: two CTAs per SM.
template <int DK, int DV> struct DqSmem {
  static constexpr int QS = DK + 8, OS = DV + 8;       // +16 bytes: conflict-free ldmatrix
  static constexpr int BS = (DK > DV ? DK : DV) + 8;   // ring buffer row stride
  static constexpr size_t q_off = 0;                                 // [64][QS]
  static constexpr size_t o_off = q_off + (size_t)64 * QS * 2;       // [64][OS]
  static constexpr size_t b_off = o_off + (size_t)64 * OS * 2;       // [3][64][BS]
  static constexpr size_t l_off = b_off + (size_t)3 * kT * BS * 2;   // [64] f32 lse
  static constexpr size_t d_off = l_off + 64 * 4;                    // [64] f32 delta
  static constexpr size_t tl_off = d_off + 64 * 4;                   // [kUmax] i32
  static constexpr size_t mk_off = tl_off + (size_t)kUmax * 4;       // [U][Q] u64
  static size_t bytes(int Q) { return mk_off + (size_t)kUmax * Q * 8; }
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kNW * 32, 2)
    bwd_shared_dq_kernel(nsa_cuda_bwd_t a, int Q, int hlg, int64_t NQ, int64_t ngroups,
                         const int32_t *__restrict__ gcnt, const int32_t *__restrict__ gtiles,
                         const unsigned long long *__restrict__ gmask,
                         const unsigned long long *__restrict__ taken) {
  using L = DqSmem<DK, DV>;
  constexpr int CK = DK / 8, CO = DV / 8;  // 16-byte pieces per q / do row
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  T *sO = reinterpret_cast<T *>(smem + L::o_off);
  T *sB = reinterpret_cast<T *>(smem + L::b_off);
  float *sL = reinterpret_cast<float *>(smem + L::l_off);
  float *sD = reinterpret_cast<float *>(smem + L::d_off);
  int *sTl = reinterpret_cast<int *>(smem + L::tl_off);
  unsigned long long *sMk = reinterpret_cast<unsigned long long *>(smem + L::mk_off);

  if (a.invalid != nullptr && *a.invalid > 0) return;  // the select kernel accepted no group
  if (*taken * 8 < (unsigned long long)(a.B * a.S * a.G)) return;  // the gate dropped every group
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int h = (int)a.h;
  const float c2 = a.scale * kLog2e;
  for (int64_t grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int U = gcnt[grp];
    if (U <= 0) continue;  // key-centric group (block-uniform)
    const int64_t tq = grp % NQ, bg = grp / NQ, g = bg % a.G, b = bg / a.G;
    const int64_t t0 = tq * Q;

    group_prologue<kNW * 32, kUmax>(gtiles, gmask, grp, U, Q, sTl, sMk, tid);
    {  // q and do rows; row m = (query m >> hlg, head m & (h - 1)); rows past S zero
      // C 16-byte pieces per row from base (b's rows; strides s1 per token,
      // s2 per head) into dst [64][RS]
      auto rows = [&](const T *base, int64_t s1, int64_t s2, auto cc, T *dst, int RS) {
        constexpr int C = decltype(cc)::value;  // compile-time: the divisions below are shifts
        for (int c = tid; c < 64 * C; c += kNW * 32) {
          const int m = c / C, pt = c % C;
          const int64_t t = t0 + (m >> hlg);
          const bool ok = t < a.S;
          const T *src = ok ? base + t * s1 + (g * a.h + (m & (h - 1))) * s2 + pt * 8 : base;
          cp_async16(smem_u32(dst + m * RS + pt * 8), src, ok ? 16 : 0);
        }
      };
      rows(reinterpret_cast<const T *>(a.q) + b * a.qs[0], a.qs[1], a.qs[2], std::integral_constant<int, CK>(), sQ,
           L::QS);
      rows(reinterpret_cast<const T *>(a.dout) + b * a.dos[0], a.dos[1], a.dos[2], std::integral_constant<int, CO>(),
           sO, L::OS);
      if (tid < 64) {  // lse / delta of row m at [r * h + j], r = (b*S + t)*G + g
        const int64_t t = t0 + (tid >> hlg);
        const bool ok = t < a.S;
        const int64_t idx = ok ? ((b * a.S + t) * a.G + g) * a.h + (tid & (h - 1)) : 0;
        cp_async4(smem_u32(sL + tid), a.lsec + idx, ok ? 4 : 0);
        cp_async4(smem_u32(sD + tid), a.delta + idx, ok ? 4 : 0);
      }
    }
    const T *kb = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
    const T *vb = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];
    auto load = [&](int i) {  // V of tile i / 2 at even i, K at odd i
      ring_load<T, DK, DV, L::BS, kNW * 32, false>(i, sTl, sB, kb, a.ks[1], vb, a.vs[1], a.Skv, tid);
    };
    load(0);
    cp_commit();  // group 0: masks, q, do, lse, delta, V of tile 0
    load(1);
    cp_commit();  // group 1: K of tile 0

    const int r0 = lane >> 2, cq = lane & 3;
    const int ma = warp * 16 + r0, mb = ma + 8;  // this thread's two rows
    const int qa = ma >> hlg, qb8 = mb >> hlg;   // ... and their queries
    float l0 = 0.f, l1 = 0.f, d0 = 0.f, d1 = 0.f;  // lse (log2 units) and delta of rows ma, mb
    float dq[DK / 8][4];
#pragma unroll
    for (int i = 0; i < DK / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    const T *q_s = sQ + warp * 16 * L::QS;
    const T *o_s = sO + warp * 16 * L::OS;

    for (int u = 0; u < U; u++) {
      // step 2u: dP = dO V_u^T
      cp_wait<1>();     // groups <= 2u landed: V of tile u (at u = 0 also rows, masks, scalars)
      __syncthreads();  // ... for every thread
      if (2 * u + 2 < 2 * U) load(2 * u + 2);
      cp_commit();  // possibly empty, so the group count stays step-aligned
      if (u == 0) {
        l0 = sL[ma] * kLog2e, l1 = sL[mb] * kLog2e;
        d0 = sD[ma], d1 = sD[mb];
      }
      float dp[8][4];
      qk_tile<T, DV, L::OS, L::BS>(o_s, sB + ((2 * u) % 3) * kT * L::BS, lane, dp);

      // step 2u + 1: S, P, dS, dQ += dS K_u
      cp_wait<1>();     // groups <= 2u + 1 landed: K of tile u
      __syncthreads();  // every warp is past dP of tile u: V's buffer (step 2u) is free
      if (2 * u + 3 < 2 * U) load(2 * u + 3);
      cp_commit();
      const T *k_s = sB + ((2 * u + 1) % 3) * kT * L::BS;
      float s[8][4];
      qk_tile<T, DK, L::QS, L::BS>(q_s, k_s, lane, s);
      // Elements 0, 1: row ma, keys nt*8 + 2cq + e; elements 2, 3: row mb.
      const unsigned long long fm0 = sMk[u * Q + qa], fm1 = sMk[u * Q + qb8];
      ds_tile(s, dp, fm0, fm1, cq, c2, l0, l1, d0, d1);
      unsigned da[4][4];
      p_to_a<T>(s, da);                          // dS as the A fragments of dS . K
      pv_tile<T, DK, L::BS>(da, k_s, lane, dq);  // dQ += dS K_u
    }
    cp_wait<0>();

#pragma unroll
    for (int half = 0; half < 2; half++) {
      const int m = half ? mb : ma;
      const int64_t t = t0 + (m >> hlg);
      if (t >= a.S) continue;
      const int j = m & (h - 1);
      T *row = reinterpret_cast<T *>(a.dq) + b * a.dqs[0] + t * a.dqs[1] + (g * a.h + j) * a.dqs[2];
      if (a.dqs[3] == 1 && (reinterpret_cast<uintptr_t>(row) & 3) == 0) {  // column pairs as 4-byte stores
#pragma unroll
        for (int nt = 0; nt < DK / 8; nt++)
          *reinterpret_cast<unsigned *>(row + nt * 8 + 2 * cq) =
              Mma<T>::pack(dq[nt][2 * half] * a.scale, dq[nt][2 * half + 1] * a.scale);
      } else {
#pragma unroll
        for (int nt = 0; nt < DK / 8; nt++) {
          const int col = nt * 8 + 2 * cq;
          st(row + (int64_t)col * a.dqs[3], dq[nt][2 * half] * a.scale);
          st(row + (int64_t)(col + 1) * a.dqs[3], dq[nt][2 * half + 1] * a.scale);
        }
      }
    }
    __syncthreads();  // the next group's prologue refills rows, buffers, tiles and masks
  }
}

template <typename T, int DK, int DV>
cudaError_t launch_dk(const nsa_cuda_bwd_t *a, const nsa_cuda_fwd_shared_layout_t *L, const char *w,
                      cudaStream_t st) {
  using SL = DqSmem<DK, DV>;
  static unsigned long long set_on = 0;  // set once per device (bwd_common.cuh)
  int dev = 0;
  cudaError_t e = set_smem_once(bwd_shared_dq_kernel<T, DK, DV>, (int)SL::bytes(32), &set_on, &dev);  // largest Q
  if (e != cudaSuccess) return e;
  static int occ[64][4];  // CTAs per SM per (device, Q)
  const int qi = __builtin_ctz((unsigned)L->Q) - 2;  // Q in {4, 8, 16, 32}
  int64_t grid = 1;
  e = resident_grid(bwd_shared_dq_kernel<T, DK, DV>, kNW * 32, SL::bytes(L->Q), dev,
                    &occ[dev >= 0 && dev < 64 ? dev : 0][qi], L->ngroups, &grid);
  if (e != cudaSuccess) return e;
  const int hlg = __builtin_ctzll((unsigned long long)a->h);
  bwd_shared_dq_kernel<T, DK, DV><<<(unsigned)grid, kNW * 32, SL::bytes(L->Q), st>>>(
      *a, L->Q, hlg, L->NQ, L->ngroups, (const int32_t *)(w + L->gcnt), (const int32_t *)(w + L->gtiles),
      (const unsigned long long *)(w + L->gmask), (const unsigned long long *)(w + L->taken));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const nsa_cuda_bwd_t *a, const nsa_cuda_fwd_shared_layout_t *L, const char *w,
                     cudaStream_t st) {
#define NSA_BS(DK, DV) \
  if (a->Dk == DK && a->Dv == DV) return launch_dk<T, DK, DV>(a, L, w, st)
  NSA_BS(64, 64);
  NSA_BS(128, 64);
  NSA_BS(64, 128);
  NSA_BS(128, 128);
#undef NSA_BS
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" int nsa_cuda_bwd_shared_ok(nsa_dtype_t dt, int64_t h, int64_t Dk, int64_t Dv) {
  const char *e = getenv("NSA_CUDA_BWD_SHARED");  // A/B and tests: 0 = key-centric dq for every row
  if (e && e[0] == '0') return 0;
  if (dt != NSA_BF16 && dt != NSA_F16) return 0;
  if (!(h == 2 || h == 4 || h == 8 || h == 16)) return 0;
  return (Dk == 64 || Dk == 128) && (Dv == 64 || Dv == 128);
}

extern "C" cudaError_t nsa_cuda_launch_bwd_shared_dq(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, const void *ws,
                                                     const nsa_cuda_fwd_shared_layout_t *L, cudaStream_t st) {
  if (!L->on || L->ngroups <= 0) return cudaSuccess;
  const char *w = (const char *)ws;
  switch (dt) {
    case NSA_BF16: return launch_t<__nv_bfloat16>(a, L, w, st);
    case NSA_F16: return launch_t<__half>(a, L, w, st);
    default: return cudaErrorInvalidValue;
  }
}
