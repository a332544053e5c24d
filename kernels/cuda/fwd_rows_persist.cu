// fwd_rows_persist.cu — the persistent row-block forward (fwd_rows.cuh,
// launch_fwd_rows_persist; the default where the row grouping runs,
// NSA_CUDA_FWD_ROWS_PERSIST=0 turns it off).
//
// Why: each CTA of the per-block forward (fwd_rows.cu) starts with an
// empty ring. Its first tile lands only after the CTA has launched, loaded
// its block's union and issued the first TMA boxes, and every microsecond
// of that is kernel time (H200, T = 16k h = 16 random, 45 blocks per SM:
// a 1 us delay of the producer's start costs 35-45 us; docs/PERF.md).
//
// One CTA per SM (R = 11 consumer warps + a producer warp, the per-block
// kernel's shared-memory layout with two union sets) walks row blocks
// ("items"): the first is blockIdx.x, the rest are claimed from a counter
// (gridDim.x + atomicAdd), two items ahead, so a CTA that started late or
// drew wide blocks takes fewer. The ring's steps are numbered across items
// (global step gs: slot gs % kNS, tag gs, parity (gs / kNS) & 1), so the
// producer streams item k + 1's first kNS steps while item k's last users
// still compute.
//
// Per item `it` (union set it & 1):
//   producer: scans the item's union (the grouping's ubits, loaded one item
//     ahead) into the set (tiles sUt, bitmap sBm, steps before each word
//     sPre, rows per step sUm zeroed, first global step sBase, and the next
//     item's id sItem[set ^ 1]), arrives on uready[set], issues the first
//     min(U, kNS) steps, waits on listed[set] (every row has mapped its
//     tiles), arrives on the slots for the rows that do not use those steps,
//     then issues the rest as the per-block kernel does;
//   consumer warp w: loads the item's row at position w (ord), its Q and
//     spans, lists its tiles, waits on uready[set], maps its tiles to steps,
//     ORs its bit into sUm and arrives on listed[set]; then walks its steps
//     (fwd_rows.cuh walk_steps with global steps) and stores o and lse.
// With a step order (sord, fwd_rows_order.cu; loaded with the union word,
// one item ahead) the producer checks it is a permutation of the union
// (else keeps ascending), puts it in sUt and writes sPerm[ascending rank]
// = step; a consumer maps its tiles' ranks through sPerm and leaves the
// ring (as a lost row) if its steps are not increasing.
// Set reuse is safe: the producer writes set x for item it + 2 only after
// listed[it + 1], i.e. after every consumer has finished reading set x for
// item it; phases of uready / listed are it >> 1.
// A tile missing from the union (not possible with the grouping's lists)
// leaves its row out of the ring: it walks nothing and stores NaN. With
// *invalid > 0 the producer issues nothing and each warp stores NaN for
// its rows of items blockIdx.x, + gridDim.x, ... Before it exits, the
// producer waits for each slot's last step to land (no bulk copy into the
// shared memory of an exited CTA).
// Shared memory (11 rows): ring 5 x 32 KB, Q 47 KB, lists 4.1 KB, two
// union sets 8.6 KB (with the order's rank map): ~221 KB.
#include "fwd_rows.cuh"

using namespace nsa_rows;

namespace {

template <int kRows>
struct PersistSmem {
  using L = RowsSmem<kRows, 128, 128>;
  static constexpr int kNS = L::kNS;
  static constexpr int kUT = kRows * kMaxT;                               // union steps per item at most
  static constexpr size_t ring_off = 0;
  static constexpr size_t q_off = (size_t)kNS * L::kSlotB;                // [kRows][16][QS]
  static constexpr size_t mk_off = q_off + (size_t)kRows * 16 * L::QS * 2;  // [kRows][kMaxT] u64
  static constexpr size_t rt_off = mk_off + (size_t)kRows * kMaxT * 8;    // [kRows][kMaxT] i32
  static constexpr size_t ut_off = rt_off + (size_t)kRows * kMaxT * 4;    // [2][kUT] i32 union tiles
  static constexpr size_t um_off = ut_off + 2 * (size_t)kUT * 4;          // [2][kUT] u32 rows per step
  static constexpr size_t bm_off = um_off + 2 * (size_t)kUT * 4;          // [2][32] u32 union bitmap
  static constexpr size_t pre_off = bm_off + 2 * 32 * 4;                  // [2][32] i32 steps before word
  static constexpr size_t perm_off = pre_off + 2 * 32 * 4;                // [2][kUT] i32 step of ascending rank
  static constexpr size_t tag_off = perm_off + 2 * (size_t)kUT * 4;       // [kNS] i32
  static constexpr size_t base_off = tag_off + kNS * 4;                   // [2] i32 first global step
  static constexpr size_t item_off = base_off + 8;                        // [2] i32 item of the set
  static constexpr size_t bar_off = (item_off + 8 + 7) & ~(size_t)7;      // full, empty, fullv [kNS], uready, listed [2]
  static constexpr size_t bytes = bar_off + (3 * kNS + 4) * 8 + 1024;
};

template <typename T, int kRows>
__global__ void __launch_bounds__((kRows + 1) * 32, 1)
    fwd_rows_persist_kernel(nsa_cuda_attn_t a, const __grid_constant__ CUtensorMap tmk,
                            const __grid_constant__ CUtensorMap tmv, const int2 *__restrict__ spans,
                            const int32_t *__restrict__ nspans, int n, int64_t NB, int nw, int gmaj,
                            const int32_t *__restrict__ ord, const unsigned *__restrict__ ubits,
                            const unsigned short *__restrict__ sord, int nitems, int *__restrict__ claim) {
  using L = RowsSmem<kRows, 128, 128>;
  using P = PersistSmem<kRows>;
  constexpr int kNS = P::kNS, kUT = P::kUT, DV = 128, CK = 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char *smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const unsigned ring = smem_u32(smem + P::ring_off);
  T *sQ = reinterpret_cast<T *>(smem + P::q_off);
  unsigned long long *sMk = reinterpret_cast<unsigned long long *>(smem + P::mk_off);
  int *sRt = reinterpret_cast<int *>(smem + P::rt_off);
  int *sUt = reinterpret_cast<int *>(smem + P::ut_off);
  unsigned *sUm = reinterpret_cast<unsigned *>(smem + P::um_off);
  unsigned *sBm = reinterpret_cast<unsigned *>(smem + P::bm_off);
  int *sPre = reinterpret_cast<int *>(smem + P::pre_off);
  int *sPerm = reinterpret_cast<int *>(smem + P::perm_off);
  int *sTag = reinterpret_cast<int *>(smem + P::tag_off);
  int *sBase = reinterpret_cast<int *>(smem + P::base_off);
  int *sItem = reinterpret_cast<int *>(smem + P::item_off);
  const unsigned full0 = smem_u32(smem + P::bar_off), empty0 = full0 + kNS * 8, fullv0 = empty0 + kNS * 8,
                 uready0 = fullv0 + kNS * 8, listed0 = uready0 + 16;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  auto item_at = [&](int64_t item, int64_t &b, int64_t &g, int64_t &tb) {  // fwd_rows_kernel's map
    if (gmaj) {
      tb = NB - 1 - item % NB;
      const int64_t rest = item / NB;
      g = rest % a.G, b = rest / a.G;
    } else {
      g = item % a.G;
      const int64_t rest = item / a.G;
      tb = NB - 1 - rest % NB, b = rest / NB;
    }
  };
  const int invalid = a.invalid != nullptr ? *a.invalid : 0;
  if (tid == 0) {
    for (int s = 0; s < kNS; s++) {
      nsa_mbar::init(full0 + 8 * s, 1);
      nsa_mbar::init(fullv0 + 8 * s, 1);
      nsa_mbar::init(empty0 + 8 * s, kRows);
      sTag[s] = -1;
    }
    for (int x = 0; x < 2; x++) {
      nsa_mbar::init(uready0 + 8 * x, 1);
      nsa_mbar::init(listed0 + 8 * x, kRows);
    }
    nsa_mbar::init_fence();
  }
  __syncthreads();

  if (warp == kRows) {  // ---- producer ----
    if (invalid > 0) return;  // (the consumers store NaN and touch no barrier)
    // Step gs into slot gs % kNS: K's boxes on full, V's on fullv, after the
    // slot's previous step has been released by all kRows rows.
    auto issue = [&](int gs, int tile, int64_t g, int64_t b) {
      const int s = gs % kNS, k = gs / kNS;
      if (k > 0) nsa_mbar::wait(empty0 + 8 * s, (k - 1) & 1);
      const int k0 = tile * kT;
      const unsigned dst = ring + s * L::kSlotB, bar = full0 + 8 * s, barv = fullv0 + 8 * s;
      nsa_mbar::flag_store(smem_u32(&sTag[s]), gs);
      nsa_mbar::arrive_expect_tx(bar, 2 * kBox);
      nsa_mbar::tma_load_4d(dst, &tmk, 0, (int)g, k0, (int)b, bar);
      nsa_mbar::tma_load_4d(dst + kBox, &tmk, 64, (int)g, k0, (int)b, bar);
      nsa_mbar::arrive_expect_tx(barv, 2 * kBox);
      nsa_mbar::tma_load_4d(dst + 2 * kBox, &tmv, 0, (int)g, k0, (int)b, barv);
      nsa_mbar::tma_load_4d(dst + 3 * kBox, &tmv, 64, (int)g, k0, (int)b, barv);
    };
    auto idle = [&](int set, int u, int gs) {  // the rows that do not use the step release it
      const int x = kRows - __popc(sUm[set * kUT + u]);
      if (x > 0) nsa_mbar::arrive_n(empty0 + 8 * (gs % kNS), (unsigned)x);
    };
    // Items after the first (blockIdx.x) are claimed from *claim (zeroed
    // by the grouping) as gridDim.x + ticket, two ahead, so neither the
    // atomic's nor the union's latency sits before an item's first steps.
    int gu = 0, it = 0;
    int item = blockIdx.x, nxt = nitems, nxt2 = nitems;
    int64_t b = 0, g = 0, tb = 0;
    if (lane == 0) nxt = (int)gridDim.x + atomicAdd(claim, 1);
    nxt = __shfl_sync(0xffffffffu, nxt, 0);
    item_at(item, b, g, tb);
    // The block's step order (sord; its entry lane + 32 k in on[k]),
    // loaded with the union word, one item ahead.
    constexpr int kOK = (kUT + 31) / 32;
    unsigned short on[kOK];
    auto load_order = [&](int64_t blk) {
#pragma unroll
      for (int k = 0; k < kOK; k++)
        on[k] = sord != nullptr && lane + 32 * k < kUT ? sord[blk * kUT + lane + 32 * k] : (unsigned short)0;
    };
    unsigned wv = lane < nw ? ubits[((b * a.G + g) * NB + tb) * nw + lane] : 0u;
    load_order((b * a.G + g) * NB + tb);
    for (; item < nitems; item = nxt, nxt = nxt2, it++) {
      const int set = it & 1;
      item_at(item, b, g, tb);
      const unsigned cur = wv;
      unsigned short co[kOK];
#pragma unroll
      for (int k = 0; k < kOK; k++) co[k] = on[k];
      nxt2 = nitems;
      if (nxt < nitems) {  // the next item's union, loaded under this one; the one after, claimed
        int64_t b2, g2, tb2;
        item_at(nxt, b2, g2, tb2);
        wv = lane < nw ? ubits[((b2 * a.G + g2) * NB + tb2) * nw + lane] : 0u;
        load_order((b2 * a.G + g2) * NB + tb2);
        if (lane == 0) nxt2 = (int)gridDim.x + atomicAdd(claim, 1);
      }
      const int U = union_from_words(cur, lane, true, sBm + set * 32, sPre + set * 32, sUt + set * kUT, kUT);
      for (int i = lane; i < kUT; i += 32) sUm[set * kUT + i] = 0u;
      if (sord != nullptr) {
        // Step v takes tile co[v]: sPerm[ascending rank of the tile] = v.
        // Checked to be a permutation of the union (else ascending).
        __syncwarp();
        bool ok = true;
#pragma unroll
        for (int k = 0; k < kOK; k++) {
          const int v = lane + 32 * k, x = co[k];
          if (v >= U) continue;
          const unsigned wb = x < 32 * 32 ? sBm[set * 32 + (x >> 5)] : 0u;
          if (!((wb >> (x & 31)) & 1u)) {
            ok = false;
            continue;
          }
          sPerm[set * kUT + sPre[set * 32 + (x >> 5)] + __popc(wb & ((1u << (x & 31)) - 1u))] = v;
        }
        __syncwarp();
#pragma unroll
        for (int k = 0; k < kOK; k++) {
          const int v = lane + 32 * k, x = co[k];
          if (v >= U || !ok) continue;
          const unsigned wb = sBm[set * 32 + (x >> 5)];
          ok = sPerm[set * kUT + sPre[set * 32 + (x >> 5)] + __popc(wb & ((1u << (x & 31)) - 1u))] == v;
        }
        ok = __all_sync(0xffffffffu, ok);
        __syncwarp();
#pragma unroll
        for (int k = 0; k < kOK; k++) {
          const int v = lane + 32 * k;
          if (v >= U) continue;
          if (ok) sUt[set * kUT + v] = co[k];  // (else sUt stays ascending)
          else sPerm[set * kUT + v] = v;
        }
      }
      if (lane == 0) sBase[set] = gu, sItem[set ^ 1] = min(nxt, nitems);  // (the consumers' next item)
      __syncwarp();
      if (lane == 0) {
        nsa_mbar::arrive(uready0 + 8 * set);  // releases the set's union to the consumers
        const int early = min(U, kNS);
        for (int v = 0; v < U; v++) {
          if (v == early) {  // the rows' steps are known: the first steps' idle rows
            nsa_mbar::wait(listed0 + 8 * set, (it >> 1) & 1);
            for (int e = 0; e < early; e++) idle(set, e, gu + e);
          }
          issue(gu + v, sUt[set * kUT + v], g, b);
          if (v >= early) idle(set, v, gu + v);
        }
        if (U <= kNS) {
          nsa_mbar::wait(listed0 + 8 * set, (it >> 1) & 1);
          for (int e = 0; e < U; e++) idle(set, e, gu + e);
        }
      }
      __syncwarp();
      gu += U;
      nxt2 = __shfl_sync(0xffffffffu, nxt2, 0);
    }
    // No bulk copy may be in flight when the CTA exits: wait for each
    // slot's last step to land.
    if (lane == 0)
      for (int s = 0; s < kNS && s < gu; s++) {
        const int x = gu - 1 - ((gu - 1 - s) % kNS);
        nsa_mbar::wait(full0 + 8 * s, (x / kNS) & 1);
        nsa_mbar::wait(fullv0 + 8 * s, (x / kNS) & 1);
      }
    return;
  }

  // ---- consumers: warp = the item's row position ----
  const int r0 = lane >> 2, cq = lane & 3;
  const float c2 = a.scale * kLog2e;
  T *q_s = sQ + warp * 16 * L::QS;
  unsigned long long *mk = sMk + warp * kMaxT;
  int *rt = sRt + warp * kMaxT;
  int it = 0, next = nitems;
  // Item it + 1 is sItem[(it + 1) & 1], written before uready of item it
  // (and not again before every row has listed item it + 1).
  for (int item = blockIdx.x; item < nitems; item = next, it++) {
    const int set = it & 1;
    int64_t b, g, tb;
    item_at(item, b, g, tb);
    int64_t t = tb * kRows + warp;
    const bool row_ok = t < a.S;
    if (row_ok) t = ord[(b * a.G + g) * a.S + t];
    auto store_row = [&](const float (&o)[DV / 8][4], float i0, float i1, float lse0, float lse1) {
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const int64_t j = r0 + half * 8;
        T *orow = reinterpret_cast<T *>(a.o) + b * a.os[0] + t * a.os[1] + (g * 16 + j) * a.os[2];
        store_o_row<T, DV>(orow, a.os[3], o, half, half ? i1 : i0, cq);
        if (a.lse != nullptr && cq == 0) a.lse[b * a.ls[0] + t * a.ls[1] + (g * 16 + j) * a.ls[2]] = half ? lse1 : lse0;
      }
    };
    float o[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    if (invalid > 0) {  // (no producer: the items in static strides)
      if (row_ok) store_row(o, NAN, NAN, NAN, NAN);
      next = item + (int)gridDim.x;
      continue;
    }
    int2 xr = make_int2(0, 0);
    int nsr = 0;
    if (row_ok) {
      const int64_t r = (b * a.S + t) * a.G + g;
      const T *qrow = reinterpret_cast<const T *>(a.q) + b * a.qs[0] + t * a.qs[1] + g * 16 * a.qs[2];
      for (int c = lane; c < 16 * CK; c += 32) {
        const int j = c / CK, pt = c % CK;
        cp_async16(smem_u32(q_s + j * L::QS + pt * 8), qrow + j * a.qs[2] + pt * 8, 16);
      }
      cp_commit();
      if (lane < n) xr = spans[r * n + lane];
      nsr = nspans[r];
    }
    mk[lane] = 0ull;
    int cnt = 0;
    if (row_ok) {
      const SpanTiles st = span_tiles(xr, nsr, n, a.Skv, lane);
      cnt = st.cnt;
      __syncwarp();
      if (st.ok) {
        int p = st.p0;
        for (int kt = st.first; kt <= st.last; kt++, p++)
          if (p < kMaxT) {
            atomicOr(&mk[p], tile_span_bits(xr.x, xr.y, kt));
            rt[p] = kt;
          }
      }
    }
    __syncwarp();
    nsa_mbar::wait(uready0 + 8 * set, (it >> 1) & 1);
    next = sItem[(it + 1) & 1];
    int mystep = 0x7fffffff;
    bool in = true;
    if (lane < cnt) {
      const int kt = rt[lane];
      const unsigned wbits = sBm[set * 32 + (kt >> 5)];
      in = (wbits >> (kt & 31)) & 1u;
      mystep = sPre[set * 32 + (kt >> 5)] + __popc(wbits & ((1u << (kt & 31)) - 1u));
      if (in && sord != nullptr) mystep = sPerm[set * kUT + mystep];
    }
    // A row walks its steps in its tiles' (ascending) order: the step
    // order must keep them ascending (launch_step_order's rule does).
    const int prevstep = __shfl_up_sync(0xffffffffu, mystep, 1);
    if (lane > 0 && lane < cnt && mystep <= prevstep) in = false;
    const bool lost = !__all_sync(0xffffffffu, in);
    if (lost) cnt = 0;
    if (lane < cnt) atomicOr(&sUm[set * kUT + mystep], 1u << warp);
    const int base = sBase[set];
    __syncwarp();
    if (lane == 0) nsa_mbar::arrive(listed0 + 8 * set);
    const int gstep = lane < cnt ? base + mystep : 0x7fffffff;
    float mr0 = -INFINITY, mr1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    cp_wait<0>();
    __syncwarp();
    walk_steps<kNS, L::kSlotB>(cnt, gstep, sTag, ring, full0, empty0, lane, [&](int j, unsigned slot, int s, int u) {
      float sc[8][4];
      qk_sw<T, L::QS, 128>(q_s, slot, lane, sc);
      softmax_tile<DV>(sc, mk[j], mk[j], cq, c2, mr0, mr1, l0, l1, o);
      unsigned pa[4][4];
      p_to_a<T>(sc, pa);
      nsa_mbar::wait(fullv0 + 8 * s, (u / kNS) & 1);
      pv_sw<T>(pa, slot + 2 * kBox, lane, o);
    });
    if (!row_ok) continue;
    if (lost) {
      store_row(o, NAN, NAN, NAN, NAN);
      continue;
    }
    finish_row(l0, l1, mr0, mr1, [&](float i0, float i1, float s0, float s1) { store_row(o, i0, i1, s0, s1); });
  }
}

template <typename T>
cudaError_t launch_t(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_fwd_rows_t *M,
                     const int32_t *ord, const unsigned *ubits, const unsigned short *sord, int *claim,
                     cudaStream_t st) {
  constexpr int R = 11;
  using P = PersistSmem<R>;
  static unsigned long long set_on = 0;  // bwd_common.cuh: set once per device
  int dev = 0;
  cudaError_t e = set_smem_once(fwd_rows_persist_kernel<T, R>, (int)P::bytes, &set_on, &dev);
  if (e != cudaSuccess) return e;
  int sms = 0;
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return e;
  const int64_t NB = (a->S + R - 1) / R, NT = (a->Skv + kT - 1) / kT;
  const int64_t nitems = a->B * a->G * NB;
  const int64_t want = M->persist > 1 ? M->persist : sms;
  const int64_t grid = nitems < want ? nitems : want;
  // Item ids and claims are int, and a CTA claims at most two past nitems,
  // so nitems + 2 * grid must stay below 2^31. This check covers nitems +
  // grid only; a request near either bound would hold ~2^31 rows' Q
  // (> 8 TB), past any device's memory.
  if (nitems >= 0x7fffffff - grid) return cudaErrorInvalidValue;
  // *claim is 0: the grouping, earlier on st, zeroed it (no memset node).
  fwd_rows_persist_kernel<T, R><<<(unsigned)grid, (R + 1) * 32, P::bytes, st>>>(
      *a, M->k, M->v, (const int2 *)plan->spans, plan->nspans, (int)plan->n, NB, (int)((NT + 31) / 32), M->gmaj, ord,
      ubits, sord, (int)nitems, claim);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nsa_rows::launch_fwd_rows_persist(const nsa_cuda_attn_t *a, nsa_dtype_t dt, const nsa_plan_t *plan,
                                              const nsa_cuda_fwd_rows_t *M, const int32_t *ord,
                                              const unsigned *ubits, const unsigned short *sord, int *claim,
                                              cudaStream_t st) {
  if (ord == nullptr || ubits == nullptr || claim == nullptr || a->Dk != 128 || a->Dv != 128 || M->rows != 11)
    return cudaErrorInvalidValue;
  switch (dt) {
    case NSA_BF16: return launch_t<__nv_bfloat16>(a, plan, M, ord, ubits, sord, claim, st);
    case NSA_F16: return launch_t<__half>(a, plan, M, ord, ubits, sord, claim, st);
    default: return cudaErrorInvalidValue;
  }
}
