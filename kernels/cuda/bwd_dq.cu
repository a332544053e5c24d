// bwd_dq.cu — dq, query-centric (DESIGN.md §2 backward, KERNELS.md loop order 1).
//
// For row (b, t, g) and head j (H index g*h + j), over the row's key set K_r:
//   p_s  = exp(scale * q·k_s − lse)            (lse from the forward)
//   dp_s = do · v_s
//   dq   = scale * Σ_{s in K_r} p_s (dp_s − delta) k_s,   delta = rowsum(do ∘ o)
// Each (row, head) sums only over its own keys, so dq needs no reduction
// across CTAs; the order of the sum is fixed (deterministic).
//
// Two kernels:
//  - generic (any dtype/strides/Dk,Dv <= 256): one warp per (row, head), the
//    layout of simple_fwd.cu (lane = key for the dot products, lane = column
//    for the accumulation), accurate expf. The f32 parity path.
//  - tensor cores (bf16/f16): the forward's CTA layout — 16 MMA rows =
//    (query m / HT, head jt*16 + m % HT) of a group of P queries, the group's
//    refined key union (plan_group.cu) walked in 64-key tiles read in place
//    through cp.async; warp w owns keys 16w..16w+15 of each tile:
//      S  = Q dO-free: Q (16 x DK) . K^T          mma m16n8k16 (ldmatrix)
//      dP = dO (16 x DV) . V^T
//      dS = P ∘ (dP − delta), P = exp2(S*scale*log2e − lse*log2e), masked by row
//      dQ_w += dS (16 x 16 keys) . K (16 keys x DK)   (ldmatrix.trans)
//    the 4 warps' dQ_w are added in warp order through shared memory.
//    K/V are re-read by every query that selected them: their loads carry the
//    L2 evict_last policy, the once-read Q/dO evict_first (measured on an
//    H200 without the hints: 2.9 TB/s, i.e. K/V fell out of L2 to HBM).
#include "bwd_common.cuh"

using namespace nsa_bwd;

namespace {

constexpr int kWarps = 4;
constexpr int kMaxD = NSA_CUDA_SIMPLE_MAX_D;

// ------------------------------------------------------------------ generic --

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    dq_simple_kernel(nsa_cuda_bwd_t a, const int2 *__restrict__ spans, const int32_t *__restrict__ nspans) {
  __shared__ float sq[kWarps][kMaxD];
  __shared__ float sdo[kWarps][kMaxD];
  const bool bad = a.invalid != nullptr && *a.invalid > 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pair = (int64_t)blockIdx.x * kWarps + warp;
  const int64_t rows = a.B * a.S * a.G;
  if (pair >= rows * a.h) return;  // warp-uniform; no block barrier below
  const int64_t r = pair / a.h, j = pair % a.h;
  const int64_t g = r % a.G, t = (r / a.G) % a.S, b = r / (a.G * a.S);
  const int64_t head = g * a.h + j;

  const T *q = reinterpret_cast<const T *>(a.q) + b * a.qs[0] + t * a.qs[1] + head * a.qs[2];
  const T *dout = reinterpret_cast<const T *>(a.dout) + b * a.dos[0] + t * a.dos[1] + head * a.dos[2];
  for (int d = lane; d < a.Dk; d += 32) sq[warp][d] = ld(q + d * a.qs[3]);
  for (int d = lane; d < a.Dv; d += 32) sdo[warp][d] = ld(dout + d * a.dos[3]);
  __syncwarp();
  const float lse = a.lsec[pair], delta = a.delta[pair];

  const T *kb = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
  const T *vb = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];
  float acc[kMaxD / 32];
#pragma unroll
  for (int i = 0; i < kMaxD / 32; i++) acc[i] = 0.f;

  const int nsp = bad ? 0 : nspans[r];
  const int2 *row = spans + r * a.n;
  for (int si = 0; si < nsp; si++) {
    const int2 sp = row[si];
    for (int base = sp.x; base < sp.y; base += 32) {
      const int tok = base + lane;
      float ds = 0.f;
      if (tok < sp.y) {
        const T *kr = kb + (int64_t)tok * a.ks[1];
        const T *vr = vb + (int64_t)tok * a.vs[1];
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < a.Dk; d++) s = fmaf(sq[warp][d], ld(kr + d * a.ks[3]), s);
        for (int d = 0; d < a.Dv; d++) dp = fmaf(sdo[warp][d], ld(vr + d * a.vs[3]), dp);
        const float p = expf(s * a.scale - lse);
        ds = p * (dp - delta);
      }
      const int cnt = min(32, sp.y - base);
      for (int kk = 0; kk < cnt; kk++) {
        const float dk = __shfl_sync(0xffffffffu, ds, kk);
        const T *kr = kb + (int64_t)(base + kk) * a.ks[1];
#pragma unroll
        for (int i = 0; i < kMaxD / 32; i++) {
          const int d = lane + 32 * i;
          if (d < a.Dk) acc[i] = fmaf(dk, ld(kr + d * a.ks[3]), acc[i]);
        }
      }
    }
  }
  T *dq = reinterpret_cast<T *>(a.dq) + b * a.dqs[0] + t * a.dqs[1] + head * a.dqs[2];
#pragma unroll
  for (int i = 0; i < kMaxD / 32; i++) {
    const int d = lane + 32 * i;
    if (d < a.Dk) st(dq + d * a.dqs[3], bad ? NAN : acc[i] * a.scale);
  }
}

// ------------------------------------------------------------- tensor cores --

constexpr int kThreads = 128;
constexpr int kBN = 64;
constexpr int kPieceCache = 64;

template <int DK, int DV> struct DqSmem {
  static constexpr int QS = DK + 8;  // padded row strides (elements): conflict-free ldmatrix
  static constexpr int OS = DV + 8;
  static constexpr int KS = DK + 8;
  static constexpr int VS = DV + 8;
  static constexpr size_t q_off = 0;
  static constexpr size_t do_off = q_off + 16 * QS * 2;
  static constexpr size_t k_off = do_off + 16 * OS * 2;
  static constexpr size_t v_off = k_off + 2 * kBN * KS * 2;
  static constexpr size_t tok_off = v_off + 2 * kBN * VS * 2;
  static constexpr size_t mask_off = tok_off + 3 * kBN * 4;
  static constexpr size_t pc_off = mask_off + 3 * kBN * 4;
  static constexpr size_t bytes = pc_off + kPieceCache * 16;
  static_assert(4 * 16 * DK * 4 <= 2 * kBN * (KS + VS) * 2, "dq merge buffer fits in the K/V ring");
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads)
    dq_mma_kernel(nsa_cuda_bwd_t a, int P, int HT, int njt, const nsa_cuda_piece_t *__restrict__ pieces,
                  const int2 *__restrict__ gcount, int64_t maxp) {
  using L = DqSmem<DK, DV>;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  T *sO = reinterpret_cast<T *>(smem + L::do_off);
  T *sK = reinterpret_cast<T *>(smem + L::k_off);
  T *sV = reinterpret_cast<T *>(smem + L::v_off);
  int *sTok = reinterpret_cast<int *>(smem + L::tok_off);
  int *sMask = reinterpret_cast<int *>(smem + L::mask_off);
  nsa_cuda_piece_t *sPc = reinterpret_cast<nsa_cuda_piece_t *>(smem + L::pc_off);

  const bool bad = a.invalid != nullptr && *a.invalid > 0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned long long pol_kv = policy_evict_last(), pol_q = policy_evict_first();
  const int64_t grp = blockIdx.x / njt;
  const int jt = blockIdx.x % njt;
  const int64_t ngt = (a.S + P - 1) / P;
  const int64_t g = grp % a.G, tg = (grp / a.G) % ngt, b = grp / (a.G * ngt);
  const int64_t t0 = tg * P;
  const int2 gc = gcount[grp];
  const int np = gc.x, Lg = bad ? 0 : gc.y;
  const nsa_cuda_piece_t *gp = pieces + grp * maxp;
  if (np <= kPieceCache) {
    for (int i = tid; i < np; i += kThreads) sPc[i] = gp[i];
    gp = sPc;
  }

  // MMA row m -> (query t, head); -1 when the row is padding.
  auto row_head = [&](int m, int64_t *t) -> int64_t {
    int qi = m / HT;
    int64_t j = (int64_t)jt * 16 + m % HT;
    *t = t0 + qi;
    if (m >= P * HT || *t >= a.S || j >= a.h) return -1;
    return g * a.h + j;
  };

  // Q and dO tiles: 16 rows -> smem (zero rows for padding).
  {
    const T *q = reinterpret_cast<const T *>(a.q);
    const T *dout = reinterpret_cast<const T *>(a.dout);
    constexpr int CQ = DK / 8, CO = DV / 8;
    for (int c = tid; c < 16 * (CQ + CO); c += kThreads) {
      const bool isq = c < 16 * CQ;
      const int cc = isq ? c : c - 16 * CQ;
      const int CH = isq ? CQ : CO;
      const int m = cc / CH, part = cc % CH;
      int64_t t;
      const int64_t head = row_head(m, &t);
      const T *src = q;
      int bytes = 0;
      if (head >= 0) {
        src = isq ? q + b * a.qs[0] + t * a.qs[1] + head * a.qs[2] + part * 8
                  : dout + b * a.dos[0] + t * a.dos[1] + head * a.dos[2] + part * 8;
        bytes = 16;
      }
      T *dst = isq ? sQ + m * L::QS + part * 8 : sO + m * L::OS + part * 8;
      cp_async16p(smem_u32(dst), src, bytes, pol_q);
    }
  }

  const T *kbase = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
  const T *vbase = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];

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
      cp_async16p(smem_u32(sK + (stg * kBN + kk) * L::KS + part * 8), src, tok >= 0 ? 16 : 0, pol_kv);
    }
    for (int c = tid; c < kBN * CV; c += kThreads) {
      int kk = c / CV, part = c % CV;
      int tok = sTok[lb * kBN + kk];
      const T *src = tok >= 0 ? vbase + (int64_t)tok * a.vs[1] + part * 8 : vbase;
      cp_async16p(smem_u32(sV + (stg * kBN + kk) * L::VS + part * 8), src, tok >= 0 ? 16 : 0, pol_kv);
    }
  };

  // This thread's two MMA rows, their query bits, lse (log2 units) and delta.
  const int r0 = lane >> 2, r1 = r0 + 8;
  unsigned bit[2] = {0u, 0u};
  float l2[2] = {0.f, 0.f}, dl[2] = {0.f, 0.f};
  const float LOG2E = 1.4426950408889634f;
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const int m = rh ? r1 : r0;
    int64_t t;
    const int64_t head = row_head(m, &t);
    if (head >= 0) {
      bit[rh] = 1u << (m / HT);
      const int64_t idx = (((b * a.S) + t) * a.G + g) * a.h + (head - g * a.h);
      l2[rh] = a.lsec[idx] * LOG2E;
      dl[rh] = a.delta[idx];
    }
  }
  const float c2 = a.scale * LOG2E;

  float acc[DK / 8][4];
#pragma unroll
  for (int i = 0; i < DK / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  const int ntiles = (Lg + kBN - 1) / kBN;
  __syncthreads();  // piece cache
  if (ntiles > 0) lookup(0, 0);
  if (ntiles > 1) lookup(1, 1);
  __syncthreads();
  if (ntiles > 0) issue(0, 0);
  cp_commit();

  for (int it = 0; it < ntiles; it++) {
    const int stg = it & 1, lb = it % 3;
    if (it + 1 < ntiles) {
      issue(stg ^ 1, (it + 1) % 3);
      cp_commit();
      if (it + 2 < ntiles) lookup(it + 2, (it + 2) % 3);
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();

    const T *kw = sK + (stg * kBN + warp * 16) * L::KS;
    const T *vw = sV + (stg * kBN + warp * 16) * L::VS;
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float s_[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // odd k-steps: two independent MMA chains
    float dp[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float dp_[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++) {
      unsigned af[4], b0, b1, b2, b3;
      ldsm_x4(smem_u32(sQ + (lane & 15) * L::QS + ks * 16 + (lane >> 4) * 8), af[0], af[1], af[2], af[3]);
      ldsm_x4(smem_u32(kw + ((lane & 7) + (lane >> 4) * 8) * L::KS + ks * 16 + ((lane >> 3) & 1) * 8), b0,
              b1, b2, b3);
      Mma<T>::run((ks & 1) ? s_[0] : s[0], af, b0, b1);
      Mma<T>::run((ks & 1) ? s_[1] : s[1], af, b2, b3);
    }
#pragma unroll
    for (int ks = 0; ks < DV / 16; ks++) {
      unsigned af[4], b0, b1, b2, b3;
      ldsm_x4(smem_u32(sO + (lane & 15) * L::OS + ks * 16 + (lane >> 4) * 8), af[0], af[1], af[2], af[3]);
      ldsm_x4(smem_u32(vw + ((lane & 7) + (lane >> 4) * 8) * L::VS + ks * 16 + ((lane >> 3) & 1) * 8), b0,
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
    // dS = P ∘ (dP − delta), masked per row by the piece's query bits.
    const int *mk = sMask + lb * kBN + warp * 16;
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int rh = e >> 1;
        const int kc = nt * 8 + (lane & 3) * 2 + (e & 1);
        const float p = (mk[kc] & bit[rh]) ? ex2(s[nt][e] * c2 - l2[rh]) : 0.f;
        s[nt][e] = p * (dp[nt][e] - dl[rh]);
      }
    unsigned da[4];
    acc_to_a<T>(s, da);
#pragma unroll
    for (int nd = 0; nd < DK / 16; nd++) {
      unsigned b0, b1, b2, b3;
      ldsm_x4_t(smem_u32(kw + ((lane & 7) + ((lane >> 3) & 1) * 8) * L::KS + nd * 16 + (lane >> 4) * 8), b0,
                b1, b2, b3);
      Mma<T>::run(acc[2 * nd], da, b0, b1);
      Mma<T>::run(acc[2 * nd + 1], da, b2, b3);
    }
    __syncthreads();  // stage stg is refilled by the next iteration's issue
  }

  // ---- add the four warps' dQ in warp order (deterministic) ----
  cp_wait<0>();
  __syncthreads();
  float *sAcc = reinterpret_cast<float *>(smem + L::k_off);  // [4][16][DK]
  {
    float *aw = sAcc + warp * 16 * DK;
#pragma unroll
    for (int i = 0; i < DK / 8; i++) {
      const int col = i * 8 + (lane & 3) * 2;
      aw[r0 * DK + col] = acc[i][0];
      aw[r0 * DK + col + 1] = acc[i][1];
      aw[r1 * DK + col] = acc[i][2];
      aw[r1 * DK + col + 1] = acc[i][3];
    }
  }
  __syncthreads();
  T *dq = reinterpret_cast<T *>(a.dq);
  for (int e = tid; e < 16 * DK; e += kThreads) {
    const int m = e / DK, col = e % DK;
    int64_t t;
    const int64_t head = row_head(m, &t);
    if (head < 0) continue;
    const float sum = ((sAcc[m * DK + col] + sAcc[(16 + m) * DK + col]) + sAcc[(32 + m) * DK + col]) +
                      sAcc[(48 + m) * DK + col];
    st(dq + b * a.dqs[0] + t * a.dqs[1] + head * a.dqs[2] + col * a.dqs[3], bad ? NAN : sum * a.scale);
  }
}

template <typename T, int DK, int DV>
cudaError_t launch_mma(const nsa_cuda_bwd_t *a, int P, const nsa_cuda_piece_t *pieces, const int2 *gcount,
                       int64_t maxp, cudaStream_t st) {
  using L = DqSmem<DK, DV>;
  const int HT = a->h >= 16 ? 16 : (int)a->h;
  const int njt = (int)((a->h + 15) / 16);
  const int64_t grid = nsa_cuda_num_groups(a->B, a->S, a->G, P) * njt;
  if (grid == 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t e = cudaFuncSetAttribute(dq_mma_kernel<T, DK, DV>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)L::bytes);
  if (e != cudaSuccess) return e;
  dq_mma_kernel<T, DK, DV><<<(unsigned)grid, kThreads, L::bytes, st>>>(*a, P, HT, njt, pieces, gcount, maxp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_mma(const nsa_cuda_bwd_t *a, int P, const nsa_cuda_piece_t *pieces, const int2 *gcount,
                         int64_t maxp, cudaStream_t st) {
#define NSA_DQ_CASE(dk, dv) \
  if (a->Dk == dk && a->Dv == dv) return launch_mma<T, dk, dv>(a, P, pieces, gcount, maxp, st);
#define NSA_DQ_ROW(dk) NSA_DQ_CASE(dk, 64) NSA_DQ_CASE(dk, 128) NSA_DQ_CASE(dk, 192) NSA_DQ_CASE(dk, 256)
  NSA_DQ_ROW(64)
  NSA_DQ_ROW(128)
  NSA_DQ_ROW(192)
  NSA_DQ_ROW(256)
#undef NSA_DQ_ROW
#undef NSA_DQ_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" cudaError_t nsa_cuda_launch_bwd_dq_simple(const nsa_cuda_bwd_t *a, nsa_dtype_t dt,
                                                     const nsa_plan_t *plan, cudaStream_t st) {
  if (a->Dk > kMaxD || a->Dv > kMaxD) return cudaErrorInvalidValue;
  const int64_t pairs = a->B * a->S * a->G * a->h;
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int2 *sp = (const int2 *)plan->spans;
  switch (dt) {
    case NSA_F32: dq_simple_kernel<float><<<(unsigned)blocks, kWarps * 32, 0, st>>>(*a, sp, plan->nspans); break;
    case NSA_F16: dq_simple_kernel<__half><<<(unsigned)blocks, kWarps * 32, 0, st>>>(*a, sp, plan->nspans); break;
    case NSA_BF16:
      dq_simple_kernel<__nv_bfloat16><<<(unsigned)blocks, kWarps * 32, 0, st>>>(*a, sp, plan->nspans);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t nsa_cuda_launch_bwd_dq_mma(const nsa_cuda_bwd_t *a, nsa_dtype_t dt, int P,
                                                  const nsa_cuda_piece_t *pieces, const int2 *gcount,
                                                  int64_t max_pieces, cudaStream_t st) {
  if (dt == NSA_BF16) return dispatch_mma<__nv_bfloat16>(a, P, pieces, gcount, max_pieces, st);
  if (dt == NSA_F16) return dispatch_mma<__half>(a, P, pieces, gcount, max_pieces, st);
  return cudaErrorInvalidValue;
}
