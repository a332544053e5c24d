// fwd_shared.cu — query groups that share their key tiles (fwd_shared.h).
//
// fwd_shared_kernel, per accepted group (b, g, queries t0 .. t0 + Q - 1):
//   MMA row m (0..63) = (query q = m / h, head j = m % h); warp w owns rows
//   16w .. 16w + 15 (FlashAttention-2 fragments, as in fwd_key.cu);
//   sQ [64][Dk]   the 64 query rows, once (cp.async, zero rows past S);
//   sMk[u][q]     query q's keys inside union tile u (64-bit mask, from the
//                 select kernel; a tile of the union the query did not select is 0);
//   per union tile u (K/V two stages: tile u + 1 loads while u computes):
//     S = Q K^T (16 x 64 per warp), -inf outside the query's keys,
//     running max m (log2 units of scale * S), l, O rescaled by 2^(m_old - m),
//     O += P V with P rounded to the input dtype (as every tensor-core path);
//   o = O / l, lse = (m + log2 l) ln 2 (empty query: o = 0, lse = -inf).
#include <stdlib.h>
#include <string.h>

#include "bwd_common.cuh"
#include "fwd_shared.h"

using namespace nsa_bwd;

namespace {

constexpr int kT = NSA_BWD_TILE;  // keys per tile (64)
constexpr int kNW = 4;            // warps per CTA: 64 MMA rows
constexpr int kUmax = NSA_FWD_SHARED_UMAX;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

constexpr int kSelThreads = 128;  // select kernel block: its lists fit 48 KB of static shared memory
constexpr int kSpanRegs = 16;     // spans per row prefetched into registers (one load latency)

// A segment of Q lanes per group (32 / Q groups per warp: Q = 4 at h = 16
// left 28 of 32 lanes idle with a warp per group); lane q of the segment
// follows query q (row r = ((b*S) + t)*G + g). Segment reductions: xor
// offsets < Q stay inside the segment.
//   1. each lane lists its row's distinct tiles and its key mask in each
//      (lst / lmk in shared memory, ascending; more than kUmax tiles rejects
//      the group: U >= own_q). Spans are sorted and disjoint, so a tile
//      repeats only as the last tile of one span and the first of the next
//      (its masks are ORed);
//   2. cheap rejection without the union: U <= ulim = 3 * sum own / (2 Q)
//      is required, and U >= own_0 + own_q - |tiles_0 ∩ tiles_q| for every
//      q (a merge of two sorted lists per lane). Independent random
//      selections fail here (own ~16, overlap ~2: U >= ~30 > ulim ~24);
//   3. the walk, in shared memory only: the union as the ascending sequence
//      of segment minima of the lanes' list heads, each query's mask per
//      union tile (0 where it did not select it). The loop runs until every
//      segment of the warp is done (shuffles need all lanes); a done segment
//      only idles.
// Spans outside [0, Skv) are skipped (the plan never has them; a bad one
// must not index past the tiles).
__global__ void __launch_bounds__(kSelThreads)
    fwd_shared_select_kernel(const int2 *__restrict__ spans, const int32_t *__restrict__ nspans, int64_t n,
                             int64_t S, int64_t Skv, int64_t G, int Q, int64_t NQ, int64_t ngroups,
                             const long long *__restrict__ invalid, unsigned char *__restrict__ skip,
                             int32_t *__restrict__ gcnt, int32_t *__restrict__ gtiles,
                             unsigned long long *__restrict__ gmask, unsigned long long *__restrict__ taken) {
  __shared__ int lst[kUmax * kSelThreads];                   // [k][tid]: conflict-free for equal k
  __shared__ unsigned long long lmk[kUmax * kSelThreads];    // [k][tid]
  const int tid = threadIdx.x, lane = tid & 31, q = lane & (Q - 1), seg0 = tid - q;
  const int64_t grp = (((int64_t)blockIdx.x * blockDim.x + tid) >> 5) * (32 / Q) + lane / Q;
  const bool live = grp < ngroups;  // segment-uniform
  const int64_t tq = live ? grp % NQ : 0, bg = live ? grp / NQ : 0, g = bg % G, b = bg / G;
  const int64_t t = tq * Q + q;
  const bool valid = live && t < S;
  const int64_t r = (b * S + t) * G + g;
  const int2 *sp = spans + (valid ? r * n : 0);
  const int nsp = valid ? nspans[r] : 0;
  const int skv = (int)Skv;

  // 1.
  int2 reg[kSpanRegs];
#pragma unroll
  for (int i = 0; i < kSpanRegs; i++) reg[i] = i < nsp ? sp[i] : make_int2(0, 0);
  int ownr = 0, prev = -1;
  auto add_span = [&](int2 x) {
    if (!(x.y > x.x && x.x >= 0 && x.y <= skv)) return;
    const int first = x.x / kT, last = (x.y - 1) / kT;
    if (first == prev && ownr >= 1 && ownr <= kUmax) lmk[(ownr - 1) * kSelThreads + tid] |= tile_span_bits(x.x, x.y, first);
    for (int kt = max(first, prev + 1); kt <= last; kt++, ownr++)
      if (ownr < kUmax) {
        lst[ownr * kSelThreads + tid] = kt;
        lmk[ownr * kSelThreads + tid] = tile_span_bits(x.x, x.y, kt);
      }
    prev = max(prev, last);
  };
#pragma unroll
  for (int i = 0; i < kSpanRegs; i++)
    if (i < nsp) add_span(reg[i]);
  for (int i = kSpanRegs; i < nsp; i++) add_span(sp[i]);
  __syncwarp();

  // 2.
  const int own0 = __shfl_sync(0xffffffffu, ownr, seg0 & 31);
  int lb = ownr;
  if (ownr <= kUmax && own0 <= kUmax) {
    int i = 0, j = 0, common = 0;
    while (i < own0 && j < ownr) {
      const int x = lst[i * kSelThreads + seg0], y = lst[j * kSelThreads + tid];
      common += x == y;
      i += x <= y;
      j += y <= x;
    }
    lb = own0 + ownr - common;
  }
  int own = ownr;
  for (int o = Q >> 1; o > 0; o >>= 1) {
    own += __shfl_xor_sync(0xffffffffu, own, o);
    lb = max(lb, __shfl_xor_sync(0xffffffffu, lb, o));
  }
  const int qv = live ? (int)(S - tq * Q < Q ? S - tq * Q : Q) : 1;
  const int ulim = min(kUmax, (3 * own) / (2 * qv));  // accepted groups have U <= ulim

  // 3.
  int U = 0, j = 0;
  bool done = !live || lb > ulim;  // segment-uniform
  if (live && lb > ulim) U = kUmax + 1;
  while (true) {
    int cur = (!done && j < ownr) ? lst[j * kSelThreads + tid] : 0x7fffffff;
    int m = cur;
    for (int o = Q >> 1; o > 0; o >>= 1) m = min(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (!done && m == 0x7fffffff) done = true;
    if (!done && U == ulim) {  // too wide for the shared path
      U = kUmax + 1;
      done = true;
    }
    if (__all_sync(0xffffffffu, done)) break;
    if (done) continue;
    if (q == 0) gtiles[grp * kUmax + U] = m;
    unsigned long long mk = 0ull;
    if (cur == m) mk = lmk[j++ * kSelThreads + tid];
    gmask[(grp * kUmax + U) * Q + q] = mk;
    U++;
  }
  if (!live) return;
  const bool bad = invalid != nullptr && *invalid > 0;  // the merge writes NaN for every row
  const bool take = !bad && U >= 1 && U <= kUmax && 2 * U * qv <= 3 * own;
  if (q == 0) gcnt[grp] = take ? U : 0;
  if (valid) skip[r] = take ? 1 : 0;
  if (take && q == 0) atomicAdd(taken, (unsigned long long)qv);  // integer sum: order-free
}

// Keeps the shared path only where it pays as a whole: its groups run after
// the key-centric kernels on the same stream, so even a few accepted groups
// (e.g. the first query blocks of an independent random selection, where a
// query's few earlier blocks are all selected) add the tail of one CTA
// walking its tiles alone (~25-70 us measured on an H200 at T = 16k). Below
// 1/8 of the rows every group goes back to the key-centric path.
__global__ void fwd_shared_gate_kernel(const unsigned long long *__restrict__ taken, int64_t rows, int64_t ngroups,
                                       unsigned char *__restrict__ skip, int32_t *__restrict__ gcnt) {
  if (*taken * 8 >= (unsigned long long)rows) return;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < rows) skip[i] = 0;
  if (i < ngroups) gcnt[i] = 0;
}

// Shared memory: Q rows, a ring of three K-or-V buffers (below), the union
// tiles and the masks ([U][Q] u64, sized for the launch's Q).
template <int DK, int DV> struct ShSmem {
  static constexpr int QS = DK + 8;                       // +16 bytes: conflict-free ldmatrix
  static constexpr int BS = (DK > DV ? DK : DV) + 8;      // ring buffer row stride
  static constexpr size_t q_off = 0;                      // [64][QS]
  static constexpr size_t b_off = q_off + (size_t)64 * QS * 2;  // [3][64][BS]
  static constexpr size_t tl_off = b_off + (size_t)3 * kT * BS * 2;  // [kUmax] i32
  static constexpr size_t mk_off = tl_off + (size_t)kUmax * 4;      // [U][Q] u64
  static size_t bytes(int Q) { return mk_off + (size_t)kUmax * Q * 8; }
  // CTAs per SM the launch bounds ask for: three where 3 x (bytes + 1 KB
  // reserved) fits 228 KB at Q <= 16 (Dk, Dv <= 128), else two.
  static constexpr int min_blocks = (mk_off + (size_t)kUmax * 16 * 8 + 1024) * 3 <= 228 * 1024 ? 3 : 2;
};

template <typename T, int DK, int DV>
__global__ void __launch_bounds__(kNW * 32, ShSmem<DK, DV>::min_blocks)
    fwd_shared_kernel(nsa_cuda_attn_t a, const int2 *__restrict__ spans, const int32_t *__restrict__ nspans,
                      int Q, int hlg, int64_t NQ, int64_t ngroups, const int32_t *__restrict__ gcnt,
                      const int32_t *__restrict__ gtiles, const unsigned long long *__restrict__ gmask,
                      const unsigned long long *__restrict__ taken) {
  using L = ShSmem<DK, DV>;
  constexpr int CK = DK / 8;  // 16-byte pieces per Q row
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem + L::q_off);
  T *sB = reinterpret_cast<T *>(smem + L::b_off);
  unsigned long long *sMk = reinterpret_cast<unsigned long long *>(smem + L::mk_off);
  int *sTl = reinterpret_cast<int *>(smem + L::tl_off);

  if (a.invalid != nullptr && *a.invalid > 0) return;
  if (*taken * 8 < (unsigned long long)(a.B * a.S * a.G)) return;  // the gate dropped every group
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Groups round-robin over a grid of resident CTAs (not a CTA per group:
  // fewer launches when many groups stay key-centric).
  for (int64_t grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int U = gcnt[grp];
    if (U <= 0) continue;  // key-centric group (block-uniform)
    const int64_t tq = grp % NQ, bg = grp / NQ, g = bg % a.G, b = bg / a.G;
    const int64_t t0 = tq * Q;
    const int h = (int)a.h;

    // Union tiles, then (one cp.async group with the Q rows and tile 0) each
    // query's key mask inside them, sMk[u*Q + q] (the select kernel's).
    group_prologue<kNW * 32, kUmax>(gtiles, gmask, grp, U, Q, sTl, sMk, tid);
    // Q rows: row m = (query m >> hlg, head m & (h - 1)); rows past S zero.
    {
      const T *qb = reinterpret_cast<const T *>(a.q) + b * a.qs[0];
      for (int c = tid; c < 64 * CK; c += kNW * 32) {
        const int m = c / CK, pt = c % CK;
        const int64_t t = t0 + (m >> hlg);
        const int j = m & (h - 1);
        const bool ok = t < a.S;
        const T *src = ok ? qb + t * a.qs[1] + (g * a.h + j) * a.qs[2] + pt * 8 : qb;
        cp_async16(smem_u32(sQ + m * L::QS + pt * 8), src, ok ? 16 : 0);
      }
    }
    const T *kb = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
    const T *vb = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];
    // K/V ring: load i = (tile i / 2, K if i even else V) goes to buffer i % 3.
    // Step i (S = Q K^T for even i, O += P V for odd i) waits for load i,
    // passes a barrier, then issues load i + 2 into buffer (i - 1) % 3, which
    // step i - 1 (finished by every warp at that barrier) was reading: one
    // barrier per step, two loads in flight, and three half-tile buffers
    // instead of two K + V stages (~70 KB instead of ~87 at Dk = Dv = 128: 3
    // CTAs per SM instead of 2).
    auto load = [&](int i) {
      ring_load<T, DK, DV, L::BS, kNW * 32, true>(i, sTl, sB, kb, a.ks[1], vb, a.vs[1], a.Skv, tid);
    };
    load(0);
    cp_commit();  // group 0: masks, Q, K of tile 0
    load(1);
    cp_commit();  // group 1: V of tile 0

    const int r0 = lane >> 2, cq = lane & 3;
    const int qa = (warp * 16 + r0) >> hlg, qb8 = (warp * 16 + r0 + 8) >> hlg;  // queries of rows r0, r0 + 8
    const float c2 = a.scale * kLog2e;
    float mr0 = -INFINITY, mr1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running max (log2 units), thread-partial l
    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    const T *q_s = sQ + warp * 16 * L::QS;

    for (int u = 0; u < U; u++) {
      cp_wait<1>();  // groups <= 2u (committed: <= 2u + 1) landed: K of tile u
      __syncthreads();  // ... for every thread (at u = 0 also Q and the masks)
      if (2 * u + 2 < 2 * U) load(2 * u + 2);
      cp_commit();  // possibly empty, so the group count stays step-aligned
      const T *k_s = sB + ((2 * u) % 3) * kT * L::BS;
      const T *v_s = sB + ((2 * u + 1) % 3) * kT * L::BS;

      float s[8][4];
      qk_tile<T, DK, L::QS, L::BS>(q_s, k_s, lane, s);
      // Elements 0, 1: row r0, keys nt*8 + 2cq + e; elements 2, 3: row r0 + 8.
      softmax_tile<DV>(s, sMk[u * Q + qa], sMk[u * Q + qb8], cq, c2, mr0, mr1, l0, l1, o);
      unsigned pa[4][4];
      p_to_a<T>(s, pa);
      cp_wait<1>();  // groups <= 2u + 1 landed: V of tile u
      __syncthreads();  // every warp is past S of tile u: K's buffer (step 2u) is free
      if (2 * u + 3 < 2 * U) load(2 * u + 3);
      cp_commit();
      pv_tile<T, DV, L::BS>(pa, v_s, lane, o);
    }
    cp_wait<0>();

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int half = 0; half < 2; half++) {
      const int m = warp * 16 + r0 + half * 8;
      const int64_t t = t0 + (m >> hlg);
      if (t >= a.S) continue;
      const int j = m & (h - 1);
      const float inv = half ? i1 : i0;
      T *orow = reinterpret_cast<T *>(a.o) + b * a.os[0] + t * a.os[1] + (g * a.h + j) * a.os[2];
      store_o_row<T, DV>(orow, a.os[3], o, half, inv, cq);
      if (a.lse != nullptr && cq == 0) {
        const float l = half ? l1 : l0, mr = half ? mr1 : mr0;
        a.lse[b * a.ls[0] + t * a.ls[1] + (g * a.h + j) * a.ls[2]] = l > 0.f ? (mr + log2f(l)) * kLn2 : -INFINITY;
      }
    }
    __syncthreads();  // the next group's prologue refills the buffers, tiles and masks
  }
}

template <typename T, int DK, int DV>
cudaError_t launch_dk(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_fwd_shared_layout_t *L,
                      const char *w, cudaStream_t st) {
  using SL = ShSmem<DK, DV>;
  static unsigned long long set_on = 0;  // bwd_common.cuh: set once per device
  int dev = 0;
  cudaError_t e = set_smem_once(fwd_shared_kernel<T, DK, DV>, (int)SL::bytes(32), &set_on, &dev);  // largest Q
  if (e != cudaSuccess) return e;
  const int hlg = __builtin_ctzll((unsigned long long)a->h);
  // Resident CTAs per SM for this Q's shared memory, cached per (device, Q).
  static int occ[64][4];
  const int qi = __builtin_ctz((unsigned)L->Q) - 2;  // Q in {4, 8, 16, 32}
  int64_t grid = 1;
  int *oc = &occ[dev >= 0 && dev < 64 ? dev : 0][qi];  // read only for dev < 64
  e = resident_grid(fwd_shared_kernel<T, DK, DV>, kNW * 32, SL::bytes(L->Q), dev, oc, L->ngroups, &grid);
  if (e != cudaSuccess) return e;
  fwd_shared_kernel<T, DK, DV><<<(unsigned)grid, kNW * 32, SL::bytes(L->Q), st>>>(
      *a, (const int2 *)plan->spans, plan->nspans, L->Q, hlg, L->NQ, L->ngroups, (const int32_t *)(w + L->gcnt),
      (const int32_t *)(w + L->gtiles), (const unsigned long long *)(w + L->gmask),
      (const unsigned long long *)(w + L->taken));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_fwd_shared_layout_t *L,
                     const char *w, cudaStream_t st) {
#define NSA_FS(DK, DV) \
  if (a->Dk == DK && a->Dv == DV) return launch_dk<T, DK, DV>(a, plan, L, w, st)
  NSA_FS(64, 64);
  NSA_FS(128, 64);
  NSA_FS(192, 64);
  NSA_FS(64, 128);
  NSA_FS(128, 128);
#undef NSA_FS
  return cudaErrorInvalidValue;
}

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

}  // namespace

extern "C" int nsa_cuda_fwd_shared_plan(const nsa_cuda_attn_t *a, nsa_dtype_t dt, size_t base,
                                        nsa_cuda_fwd_shared_layout_t *L) {
  memset(L, 0, sizeof(*L));
  const char *e = getenv("NSA_CUDA_FWD_SHARED");  // A/B and tests: 0 = key-centric for every row
  if (e && e[0] == '0') return 0;
  if (dt != NSA_BF16 && dt != NSA_F16) return 0;
  if (!(a->h == 2 || a->h == 4 || a->h == 8 || a->h == 16)) return 0;
  // Head dims whose K/V stages, Q rows and masks fit two CTAs per SM (Dk + Dv
  // <= 256): at Dk = 192, Dv = 128 one CTA of 4 warps per SM ran the H200's
  // T = 16k h = 16 correlated forward in 10.5 ms against 4.66 key-centric.
  if (!((a->Dk == 64 && (a->Dv == 64 || a->Dv == 128)) || (a->Dk == 128 && (a->Dv == 64 || a->Dv == 128)) ||
        (a->Dk == 192 && a->Dv == 64)))
    return 0;
  const int64_t rows = a->B * a->S * a->G;
  if (rows <= 0 || rows > 0x7fffffffll * 256 || a->Skv <= 0 || a->Skv > 0x7fffffff - kT) return 0;
  L->Q = (int)(64 / a->h);
  L->NQ = (a->S + L->Q - 1) / L->Q;
  L->ngroups = a->B * a->G * L->NQ;
  if (L->ngroups <= 0 || L->ngroups > 0x7fffffff || L->ngroups * 32 > 0x7fffffffll * 256) return 0;
  size_t o = align256(base);
  L->skip = o;
  o = align256(o + (size_t)rows);
  L->gcnt = o;
  o = align256(o + (size_t)L->ngroups * 4);
  L->gtiles = o;
  o = align256(o + (size_t)L->ngroups * kUmax * 4);
  L->gmask = o;
  o = align256(o + (size_t)L->ngroups * kUmax * (size_t)L->Q * 8);
  L->taken = o;
  o = align256(o + 8);
  L->end = o;
  L->on = 1;
  return 1;
}

extern "C" cudaError_t nsa_cuda_launch_fwd_shared_select(const nsa_cuda_attn_t *a, const nsa_plan_t *plan,
                                                         void *ws, const nsa_cuda_fwd_shared_layout_t *L,
                                                         cudaStream_t st) {
  char *w = (char *)ws;
  const int th = kSelThreads;
  const int64_t warps = (L->ngroups + (32 / L->Q) - 1) / (32 / L->Q);  // 32 / Q groups per warp
  const int64_t blocks = (warps * 32 + th - 1) / th;
  unsigned long long *taken = (unsigned long long *)(w + L->taken);
  cudaError_t e = cudaMemsetAsync(taken, 0, sizeof(*taken), st);
  if (e != cudaSuccess) return e;
  fwd_shared_select_kernel<<<(unsigned)blocks, th, 0, st>>>(
      (const int2 *)plan->spans, plan->nspans, plan->n, a->S, a->Skv, a->G, L->Q, L->NQ, L->ngroups, a->invalid,
      (unsigned char *)(w + L->skip), (int32_t *)(w + L->gcnt), (int32_t *)(w + L->gtiles),
      (unsigned long long *)(w + L->gmask), taken);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t rows = a->B * a->S * a->G, m = rows > L->ngroups ? rows : L->ngroups;
  fwd_shared_gate_kernel<<<(unsigned)((m + th - 1) / th), th, 0, st>>>(taken, rows, L->ngroups,
                                                                       (unsigned char *)(w + L->skip),
                                                                       (int32_t *)(w + L->gcnt));
  return cudaGetLastError();
}

extern "C" cudaError_t nsa_cuda_launch_fwd_shared(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                                  void *ws, const nsa_cuda_fwd_shared_layout_t *L,
                                                  cudaStream_t st) {
  const char *w = (const char *)ws;
  switch (dt) {
    case NSA_BF16: return launch_t<__nv_bfloat16>(a, plan, L, w, st);
    case NSA_F16: return launch_t<__half>(a, plan, L, w, st);
    default: return cudaErrorInvalidValue;
  }
}
