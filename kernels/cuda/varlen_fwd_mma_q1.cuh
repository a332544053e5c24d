// varlen_fwd_mma_q1.cuh — the one-query-tile tensor-core forward (included by
// varlen_fwd_mma.cuh inside namespace nsa_mma).
//
// This is the first kernel of this backend (commit 356ca75), kept as the
// one-tile path: one 16-row query tile per CTA, pieces searched in global
// memory one tile ahead, a 2-stage K/V ring, plain stores. On the same H100 it
// measured 8-10 % faster than the generalized kernel run with one query tile
// (same occupancy, 3 CTAs/SM at Dk = Dv = 128), so the generalized kernel is
// only used for two query tiles (docs/PERF.md has the A/B numbers).
template <int DK, int DV> struct SmemQ1 {
  static constexpr int QS = DK + 8;  // padded row strides (elements): conflict-free ldmatrix
  static constexpr int KS = DK + 8;
  static constexpr int VS = DV + 8;
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + 16 * QS * 2;
  static constexpr size_t v_off = k_off + 2 * kBN * KS * 2;
  static constexpr size_t tok_off = v_off + 2 * kBN * VS * 2;
  static constexpr size_t mask_off = tok_off + 2 * kBN * 4;
  static constexpr size_t red_off = mask_off + 2 * kBN * 4;  // m[4][16], l[4][16], M[16], L[16]
  static constexpr size_t bytes = red_off + (2 * 4 * 16 + 2 * 16) * 4;
  // The final merge reuses the K/V ring as acc[4 warps][16][DV] f32.
  static_assert(4 * 16 * DV * 4 <= 2 * kBN * (KS + VS) * 2, "merge buffer fits in K/V ring");
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kThreads)
    fwd_mma_q1_kernel(nsa_cuda_attn_t a, int P, int HT, int njt, const nsa_cuda_piece_t *__restrict__ pieces,
                   const int2 *__restrict__ gcount, int64_t maxp) {
  using L = SmemQ1<DK, DV>;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  T *sK = reinterpret_cast<T *>(smem + L::k_off);
  T *sV = reinterpret_cast<T *>(smem + L::v_off);
  int *sTok = reinterpret_cast<int *>(smem + L::tok_off);
  int *sMask = reinterpret_cast<int *>(smem + L::mask_off);
  float *sRm = reinterpret_cast<float *>(smem + L::red_off);
  float *sRl = sRm + 64;
  float *sMt = sRl + 64;
  float *sLt = sMt + 16;

  // Bad selection (only reachable with sync=0, where the host never saw the
  // count): read nothing, write NaN so the caller cannot mistake it for a result.
  const bool bad = a.invalid != nullptr && *a.invalid > 0;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t grp = blockIdx.x / njt;
  const int jt = blockIdx.x % njt;
  const int64_t ngt = (a.S + P - 1) / P;
  const int64_t g = grp % a.G, tg = (grp / a.G) % ngt, b = grp / (a.G * ngt);
  const int64_t t0 = tg * P;
  const int2 gc = gcount[grp];
  const int np = gc.x, Lg = bad ? 0 : gc.y;
  const nsa_cuda_piece_t *gp = pieces + grp * maxp;

  // MMA row m -> (query, head); -1 head when the row is padding.
  auto row_head = [&](int m, int64_t *t) -> int64_t {
    int q = m / HT;
    int64_t j = (int64_t)jt * 16 + m % HT;
    *t = t0 + q;
    if (m >= P * HT || *t >= a.S || j >= a.h) return -1;
    return g * a.h + j;
  };

  // ---- Q tile: 16 rows x DK -> smem (zero rows for padding) ----
  {
    constexpr int CH = DK / 8;
    const T *q = reinterpret_cast<const T *>(a.q);
    for (int c = tid; c < 16 * CH; c += kThreads) {
      int m = c / CH, part = c % CH;
      int64_t t;
      int64_t head = row_head(m, &t);
      const T *src = q;
      int bytes = 0;
      if (head >= 0) {
        src = q + b * a.qs[0] + t * a.qs[1] + head * a.qs[2] + part * 8;
        bytes = 16;
      }
      cp_async16(smem_u32(sQ + m * L::QS + part * 8), src, bytes);
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
  auto issue = [&](int stg) {
    constexpr int CK = DK / 8, CV = DV / 8;
    for (int c = tid; c < kBN * CK; c += kThreads) {
      int kk = c / CK, part = c % CK;
      int tok = sTok[stg * kBN + kk];
      const T *src = tok >= 0 ? kbase + (int64_t)tok * a.ks[1] + part * 8 : kbase;
      cp_async16(smem_u32(sK + (stg * kBN + kk) * L::KS + part * 8), src, tok >= 0 ? 16 : 0);
    }
    for (int c = tid; c < kBN * CV; c += kThreads) {
      int kk = c / CV, part = c % CV;
      int tok = sTok[stg * kBN + kk];
      const T *src = tok >= 0 ? vbase + (int64_t)tok * a.vs[1] + part * 8 : vbase;
      cp_async16(smem_u32(sV + (stg * kBN + kk) * L::VS + part * 8), src, tok >= 0 ? 16 : 0);
    }
  };

  // This thread's two rows (lane/4 and lane/4+8) and their query bits.
  const int r0 = lane >> 2, r1 = r0 + 8;
  unsigned bit0 = 0, bit1 = 0;
  {
    int64_t t;
    if (row_head(r0, &t) >= 0) bit0 = 1u << (r0 / HT);
    if (row_head(r1, &t) >= 0) bit1 = 1u << (r1 / HT);
  }
  const float c2 = a.scale * 1.4426950408889634f;  // scores in log2 units

  float acc[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DV / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};

  const int ntiles = (Lg + kBN - 1) / kBN;
  if (ntiles > 0) {
    lookup(0, 0);
    __syncthreads();
    issue(0);
  }
  cp_commit();  // Q (+ tile 0)

  for (int it = 0; it < ntiles; it++) {
    const int stg = it & 1;
    if (it + 1 < ntiles) {
      lookup(it + 1, stg ^ 1);
      __syncthreads();
      issue(stg ^ 1);
      cp_commit();
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();

    // ---- S = Q K^T for this warp's 16 keys ----
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const T *kw = sK + (stg * kBN + warp * 16) * L::KS;
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++) {
      unsigned af[4], b0, b1, b2, b3;
      ldsm_x4(smem_u32(sQ + (lane & 15) * L::QS + ks * 16 + (lane >> 4) * 8), af[0], af[1], af[2],
              af[3]);
      ldsm_x4(smem_u32(kw + ((lane & 7) + (lane >> 4) * 8) * L::KS + ks * 16 + ((lane >> 3) & 1) * 8),
              b0, b1, b2, b3);
      MmaOp<T>::mma(s[0], af, b0, b1);
      MmaOp<T>::mma(s[1], af, b2, b3);
    }

    // ---- online softmax (per thread: rows r0, r1; 4 columns each) ----
    const int *mk = sMask + stg * kBN + warp * 16;
    float p[2][4];
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
      const unsigned bit = rh ? bit1 : bit0;
      float x[4];
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          int kc = nt * 8 + (lane & 3) * 2 + e;
          x[nt * 2 + e] = (mk[kc] & bit) ? s[nt][rh * 2 + e] * c2 : -INFINITY;
        }
      float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(mrow[rh], mx);
      const float muse = mnew == -INFINITY ? 0.f : mnew;
      const float alpha = ex2(mrow[rh] - muse);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < 4; i++) {
        float pv = ex2(x[i] - muse);
        sum += pv;
        p[i >> 1][rh * 2 + (i & 1)] = pv;
      }
      lrow[rh] = lrow[rh] * alpha + sum;
      mrow[rh] = mnew;
#pragma unroll
      for (int i = 0; i < DV / 8; i++) {
        acc[i][rh * 2] *= alpha;
        acc[i][rh * 2 + 1] *= alpha;
      }
    }

    // ---- O += P V ----
    unsigned pa[4];
    pa[0] = MmaOp<T>::pack(p[0][0], p[0][1]);
    pa[1] = MmaOp<T>::pack(p[0][2], p[0][3]);
    pa[2] = MmaOp<T>::pack(p[1][0], p[1][1]);
    pa[3] = MmaOp<T>::pack(p[1][2], p[1][3]);
    const T *vw = sV + (stg * kBN + warp * 16) * L::VS;
#pragma unroll
    for (int nd = 0; nd < DV / 16; nd++) {
      unsigned b0, b1, b2, b3;
      ldsm_x4_t(smem_u32(vw + ((lane & 7) + ((lane >> 3) & 1) * 8) * L::VS + nd * 16 + (lane >> 4) * 8),
                b0, b1, b2, b3);
      MmaOp<T>::mma(acc[2 * nd], pa, b0, b1);
      MmaOp<T>::mma(acc[2 * nd + 1], pa, b2, b3);
    }
    __syncthreads();  // stage stg is refilled by the next iteration's issue
  }

  // ---- merge the four warps' states (fixed order: deterministic) ----
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    lrow[rh] += __shfl_xor_sync(0xffffffffu, lrow[rh], 1);
    lrow[rh] += __shfl_xor_sync(0xffffffffu, lrow[rh], 2);
  }
  if ((lane & 3) == 0) {
    sRm[warp * 16 + r0] = mrow[0];
    sRm[warp * 16 + r1] = mrow[1];
    sRl[warp * 16 + r0] = lrow[0];
    sRl[warp * 16 + r1] = lrow[1];
  }
  cp_wait<0>();
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
  float *sAcc = reinterpret_cast<float *>(smem + L::k_off);  // [4][16][DV]
  {
    const float f0 = ex2(mrow[0] - (sMt[r0] == -INFINITY ? 0.f : sMt[r0]));
    const float f1 = ex2(mrow[1] - (sMt[r1] == -INFINITY ? 0.f : sMt[r1]));
    float *aw = sAcc + warp * 16 * DV;
#pragma unroll
    for (int i = 0; i < DV / 8; i++) {
      int col = i * 8 + (lane & 3) * 2;
      aw[r0 * DV + col] = acc[i][0] * f0;
      aw[r0 * DV + col + 1] = acc[i][1] * f0;
      aw[r1 * DV + col] = acc[i][2] * f1;
      aw[r1 * DV + col + 1] = acc[i][3] * f1;
    }
  }
  __syncthreads();
  T *o = reinterpret_cast<T *>(a.o);
  for (int e = tid; e < 16 * DV; e += kThreads) {
    int m = e / DV, col = e % DV;
    int64_t t;
    int64_t head = row_head(m, &t);
    if (head < 0) continue;
    float sum = sAcc[m * DV + col] + sAcc[(16 + m) * DV + col] + sAcc[(32 + m) * DV + col] +
                sAcc[(48 + m) * DV + col];
    float Lt = sLt[m];
    float val = bad ? NAN : (Lt > 0.f ? sum / Lt : 0.f);
    MmaOp<T>::store_plain(o + b * a.os[0] + t * a.os[1] + head * a.os[2] + col * a.os[3], val);
  }
  if (a.lse != nullptr && tid < 16) {
    int64_t t;
    int64_t head = row_head(tid, &t);
    if (head >= 0) {
      float Lt = sLt[tid];
      float v = bad ? NAN : (Lt > 0.f ? (sMt[tid] + log2f(Lt)) * 0.6931471805599453f : -INFINITY);
      a.lse[b * a.ls[0] + t * a.ls[1] + head * a.ls[2]] = v;
    }
  }
}

template <typename T, int DK, int DV>
cudaError_t launch_q1(const nsa_cuda_attn_t *a, int P, const nsa_cuda_piece_t *pieces,
                   const int2 *gcount, int64_t maxp, cudaStream_t st) {
  using L = SmemQ1<DK, DV>;
  const int HT = a->h >= 16 ? 16 : (int)a->h;
  const int njt = (int)((a->h + 15) / 16);
  const int64_t ngroups = nsa_cuda_num_groups(a->B, a->S, a->G, P);
  const int64_t grid = ngroups * njt;
  if (grid == 0) return cudaSuccess;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t e = cudaFuncSetAttribute(fwd_mma_q1_kernel<T, DK, DV>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes);
  if (e != cudaSuccess) return e;
  fwd_mma_q1_kernel<T, DK, DV><<<(unsigned)grid, kThreads, L::bytes, st>>>(*a, P, HT, njt, pieces,
                                                                        gcount, maxp);
  return cudaGetLastError();
}
