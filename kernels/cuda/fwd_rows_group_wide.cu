// fwd_rows_group_wide.cu — the row grouping in wide windows (fwd_rows.h,
// nsa_cuda_fwd_rows_t::group = 32, 64 or 128 row blocks per window).
//
// Why: the forward's CTA loads the union of its rows' tiles, so its L2 ->
// shared-memory bytes follow the sum over row blocks of |union|. The
// one-warp grouping (group_rows_kernel, fwd_rows.cu) deals rows within
// windows of 8 blocks (88 rows): a row can only join rows whose t is within
// 88 of its own. At T = 64k with random selections (each row's 14 random
// tiles among up to 1 024), the greedy over 64-block windows (704 rows)
// finds rows sharing several tiles with a block's union where the 8-block
// window has none: 9.33 instead of 10.03 tiles loaded per row (9.13 over
// 128 blocks; bench/grouping_model.py --T 65536 --windows 8 64 128). H200, forward request ms (docs/PERF.md, session 25): 11.54
// with 8-block windows, 11.20 with 64 (the default past 512 tiles per
// (b, g)), 11.70 with 128 (whose 126 KB of shared memory leave one CTA per
// SM: two waves of windows at 64k, and the grouping costs more than the
// kernel saves). Nsight Compute, 128 blocks built one at a time: 9 % fewer
// L2 sectors read by the forward kernel.
//
// The rule. Windows of W = blocks * R positions of one (b, g); a window
// whose t-order blocks already share most tiles (2 * sum of their union
// sizes <= 5 * sum of their largest rows' tile counts) keeps t order, as in
// the one-warp grouping. Else the window's blocks (positions p0 + blk * R,
// blk < NBw = ceil(Wn / R), the last one possibly short) are built P = 16
// at a time (a batch: blk = 16 k + w for warp w): block 16 k + w's seed is
// the (w + 1)-th largest remaining t; then in rounds, every block of the
// batch that still has room proposes the remaining row with the fewest
// tiles outside its union (ties: the larger t); a row proposed by several
// blocks goes to the lowest, the others propose again next round. Built
// one block at a time (the one-warp rule, grouping_model.py --sequential)
// 128-block windows load 9.11 tiles per row instead of 9.13: building 16
// at once costs 0.2 % and cuts the rounds in a row from W to about
// NBw / 16 * R (test_cuda_plan.c wide_window is the host version the
// tests compare with, position for position).
//
// One CTA of kWT = 512 threads (P = 16 warps) per window. Shared memory (W
// rows, Wp = W rounded up to 128, MT = 16 or 32 tiles per row at most, NT
// <= 1024 tiles of the (b, g)):
//   lst   [W][MT] u16  window row j's distinct tiles (t = p0 + j)
//   inv   [W * MT] u16 the inverted index: tile k's rows are
//                      inv[toff[k] .. toff[k + 1])
//   toff  [kGNT + 1] i32, cur [kGNT] i32 (tile counts, then fill cursors)
//   cnt   [Wp] u8      row j's tile count
//   used  [Wp] u8      1: placed (and every j >= Wn)
//   sc    [P][Wp] u8   warp w's block: row j's score, its tiles outside
//                      the block's union (never below 0); | 0x80 once j
//                      is placed
//   prop  [P] i32      this round's proposals; seed [P] i32; red [2] i32;
//   wb    [P][32] u32  per-warp union words: the t-order check, then the
//                      union of the warp's block in the greedy
// W = 1 408, MT = 16: ~125 KB; MT = 32: ~215 KB. At W = 704, MT = 16
// (64-block windows from a selection of 16 blocks: the 64k default) 69 KB,
// and at most 40 registers (__launch_bounds__ minimum 3): three CTAs per
// SM, so T = 64k's 372 windows (G = 4) run in one wave on the H200's 132
// SMs instead of two (forward request 11.24 -> 11.06 ms, docs/PERF.md).
#include <cub/block/block_scan.cuh>

#include "fwd_rows.cuh"
#include "sel_slot.cuh"

namespace {

using namespace nsa_rows;

constexpr int kWT = 512;           // threads per window
constexpr int kWarpsW = kWT / 32;  // warps per window
constexpr int kGNTw = 1024;        // tiles per (b, g) at most (32 union words)
static_assert(((kGroupWideRows + 127) & ~127) <= 2048, "the greedy's 16-bit keys hold j in 11 bits");

// The layout's byte offsets, 16-byte aligned (host and device).
struct WideLayout {
  size_t lst, inv, toff, cur, cnt, used, sc, prop, seed, red, wb, bytes;
  int Wp;
  __host__ __device__ WideLayout(int W, int MT) {
    auto up = [](size_t x) { return (x + 15) & ~(size_t)15; };
    Wp = (W + 127) & ~127;
    lst = 0;
    inv = up(lst + (size_t)W * MT * 2);
    toff = up(inv + (size_t)W * MT * 2);
    cur = up(toff + (size_t)(kGNTw + 1) * 4);
    cnt = up(cur + (size_t)kGNTw * 4);
    used = up(cnt + (size_t)Wp);
    sc = up(used + (size_t)Wp);
    prop = up(sc + (size_t)kWarpsW * Wp);
    seed = up(prop + kWarpsW * 4);
    red = up(seed + kWarpsW * 4);
    wb = up(red + 2 * 4);
    bytes = up(wb + (size_t)kWarpsW * 32 * 4);
  }
};

template <int MT, bool kSel>
__global__ void __launch_bounds__(kWT, 3)
    group_wide_kernel(const int2 *__restrict__ spans, const int32_t *__restrict__ nspans, nsa_cuda_selview_t sel,
                      int n, int64_t S, int64_t G, int64_t Skv, int R, int blocks, int32_t *__restrict__ ord,
                      unsigned *__restrict__ ubits, int fnw, int *__restrict__ claim) {
  constexpr unsigned kFull = 0xffffffffu;
  extern __shared__ __align__(16) unsigned char gsm[];
  const int W = blocks * R;
  const WideLayout L(W, MT);
  const int Wp = L.Wp;
  uint16_t *lst = reinterpret_cast<uint16_t *>(gsm + L.lst);
  uint16_t *inv = reinterpret_cast<uint16_t *>(gsm + L.inv);
  int *toff = reinterpret_cast<int *>(gsm + L.toff);
  int *cur = reinterpret_cast<int *>(gsm + L.cur);
  unsigned char *cnt = gsm + L.cnt;
  unsigned char *used = gsm + L.used;
  int *prop = reinterpret_cast<int *>(gsm + L.prop);
  int *seed = reinterpret_cast<int *>(gsm + L.seed);
  int *red = reinterpret_cast<int *>(gsm + L.red);
  unsigned *wb = reinterpret_cast<unsigned *>(gsm + L.wb) + (threadIdx.x / 32) * 32;  // this warp's words
  unsigned *sc4 = reinterpret_cast<unsigned *>(gsm + L.sc);  // every warp's scores, 4 rows per word

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int NT = (int)((Skv + kT - 1) / kT);
  const GroupWindow win(S, G, W, R, ord, ubits, fnw);  // this window (fwd_rows.cuh)
  const int64_t b = win.b, g = win.g, p0 = win.p0;
  const int Wn = win.Wn;
  int32_t *ow = win.ow;
  unsigned *uw = win.uw;
  if (claim != nullptr && blockIdx.x == 0 && tid == 0) *claim = 0;  // the persistent forward's item counter
  for (int i = tid; i < NT; i += kWT) cur[i] = 0;
  for (int j = tid; j < Wp; j += kWT) used[j] = j >= Wn, cnt[j] = 0;
  if (tid < 2) red[tid] = 0;
  __syncthreads();

  // 1. Lists, one row per thread: its distinct tiles (at most MT, in the
  // order the one-warp grouping lists them) and their counts per tile.
  for (int j = tid; j < Wn; j += kWT) {
    uint16_t *lj = lst + j * MT;
    int c = 0;
    auto add = [&](int kt) {
      for (int i = 0; i < c; i++)
        if (lj[i] == kt) return;
      lj[c++] = (uint16_t)kt;
      atomicAdd(&cur[kt], 1);
    };
    if constexpr (kSel) {
      // From the selection's slots, by the planner's rules (sel_slot.cuh).
      const int64_t nblk = sel.kind == NSA_SEL_BLOCK_INDICES ? (Skv + sel.block_size - 1) / sel.block_size : 0;
      const long long limit = nsa_sel::row_limit(p0 + j, S, Skv);
      for (int u = 0; u < n; u++) {
        long long l = 0, h = 0;
        const int k = nsa_sel::load_slot(sel, b, p0 + j, g, u, nblk, &l, &h);
        if (h > limit) h = limit;
        if (k <= 0 || l >= h) continue;
        for (int kt = (int)(l / kT); kt <= (int)((h - 1) / kT) && c < MT; kt++) add(kt);
      }
    } else {
      // From the plan's spans: in use and inside [0, Skv), at most MT tiles.
      const int64_t r = (b * S + p0 + j) * G + g;
      const int ns = min(nspans[r], n);
      for (int u = 0; u < ns && c < MT; u++) {
        const int2 x = spans[r * n + u];
        if (!(x.y > x.x && x.x >= 0 && x.y <= Skv)) continue;
        for (int kt = x.x / kT; kt <= (x.y - 1) / kT && c < MT; kt++) add(kt);
      }
    }
    cnt[j] = (unsigned char)c;
  }
  __syncthreads();

  // 2. The t-order exit: a warp per t-order block ORs its rows' tiles into
  // the warp's 32 words (wb), then sums the union's size and the block's
  // largest tile count. With `store`, it writes each block's union instead.
  auto t_order_blocks = [&](bool store) {
    int su = 0, tm = 0;
    for (int blk = warp; blk * R < Wn; blk += kWarpsW) {
      wb[lane] = 0u;
      __syncwarp();
      const int j0 = blk * R, j1 = min(Wn, j0 + R);
      int mx = 0;
      for (int j = j0; j < j1; j++) {
        const int c = cnt[j];
        mx = max(mx, c);
        for (int e = lane; e < c; e += 32) {
          const int kt = lst[j * MT + e];
          atomicOr(&wb[kt >> 5], 1u << (kt & 31));
        }
      }
      __syncwarp();
      const unsigned wv = wb[lane];
      if (store && lane < fnw) uw[blk * fnw + lane] = wv;
      su += __popc(wv);
      tm += lane == 0 ? mx : 0;
      __syncwarp();
    }
    return make_int2((int)__reduce_add_sync(kFull, (unsigned)su), (int)__reduce_add_sync(kFull, (unsigned)tm));
  };
  {
    const int2 st = t_order_blocks(false);
    if (lane == 0) atomicAdd(&red[0], st.x), atomicAdd(&red[1], st.y);
  }
  __syncthreads();
  if (2 * red[0] <= 5 * red[1]) {
    for (int j = tid; j < Wn; j += kWT) ow[j] = (int32_t)(p0 + j);
    if (uw != nullptr) t_order_blocks(true);
    return;
  }

  // 3. The inverted index: toff = exclusive scan of the tile counts (two
  // tiles per thread), then each row's entries placed at cur[k]++ (their
  // order within a tile does not matter: only counts are read).
  {
    using Scan = cub::BlockScan<int, kWT>;
    __shared__ typename Scan::TempStorage ts;
    int v[2], ex[2], total = 0;
#pragma unroll
    for (int i = 0; i < 2; i++) v[i] = 2 * tid + i < NT ? cur[2 * tid + i] : 0;
    Scan(ts).ExclusiveSum(v, ex, total);
    __syncthreads();  // every count read before cur is rewritten
#pragma unroll
    for (int i = 0; i < 2; i++)
      if (2 * tid + i < NT) toff[2 * tid + i] = cur[2 * tid + i] = ex[i];
    if (tid == 0) toff[NT] = total;
    __syncthreads();
    for (int j = tid; j < Wn; j += kWT)
      for (int e = 0; e < cnt[j]; e++) inv[atomicAdd(&cur[lst[j * MT + e]], 1)] = (uint16_t)j;
    __syncthreads();
  }

  // 4. The greedy, a batch of P blocks at a time. Warp w's block takes the
  // remaining row with the lowest score (its tiles outside the block's
  // union), ties to the largest j (= the largest t). The scores live in
  // bytes, four rows per word (sc4: warp w's words at w * nq), set from cnt
  // at the batch's start and taken down as tiles join the union; a placed
  // row's byte gets 0x80 in every warp's words (atomically, as other warps
  // may be taking it down in the same phase), so one load gives four rows'
  // keys. Rows j >= Wn are marked placed.
  const int NBw = (Wn + R - 1) / R;
  const int nq = Wp / 4;  // words of scores per warp
  const unsigned *cnt4 = reinterpret_cast<const unsigned *>(cnt);
  const unsigned *used4 = reinterpret_cast<const unsigned *>(used);
  unsigned *my4 = sc4 + warp * nq;
  for (int bat = 0; bat * kWarpsW < NBw; bat++) {
    const int blk = bat * kWarpsW + warp;
    const int cap = blk < NBw ? min(R, Wn - blk * R) : 0;  // this warp's block's rows
    const int nact = min(kWarpsW, NBw - bat * kWarpsW);   // blocks in the batch
    // Seeds: warp 0 lists the nact largest remaining j, from the top.
    if (warp == 0) {
      int got = 0;
      for (int j1 = Wn - 1; j1 >= 0 && got < nact; j1 -= 32) {
        const int j = j1 - lane;
        const bool fr = j >= 0 && !used[j];
        const unsigned fm = __ballot_sync(kFull, fr);
        const int rk = got + __popc(fm & ((1u << lane) - 1u));  // lanes below = larger j
        if (fr && rk < nact) seed[rk] = j;
        got += __popc(fm);
      }
      __syncwarp();
      if (lane < nact) used[seed[lane]] = 1;
    }
    __syncthreads();
    for (int q = lane; q < nq; q += 32) my4[q] = cnt4[q] | (used4[q] << 7);  // (cnt <= 32)
    wb[lane] = 0u;  // this warp's block's union (word i in wb[i])
    __syncwarp();
    int have = 0;  // rows placed in this warp's block
    // Row j enters this warp's block at position `have`: its new tiles join
    // the union and (while the block has room) take one off the scores of
    // the rows listing them. A row's tiles are distinct, so each new tile is
    // one lane's. A tile with few rows is walked by its lane; one with many
    // (every row may list block 0) by the whole warp. Two new tiles may
    // share rows: atomics.
    auto place = [&](int j) {
      if (lane == 0) ow[blk * R + have] = (int32_t)(p0 + j);
      have++;
      const int c = cnt[j];
      const int kt = lane < c ? lst[j * MT + lane] : 0;
      const bool isnew = lane < c && ((wb[kt >> 5] >> (kt & 31)) & 1u) == 0u;
      __syncwarp();  // every lane has read the union before it grows
      if (isnew) atomicOr(&wb[kt >> 5], 1u << (kt & 31));
      if (have < cap) {
        auto take = [&](int q) {  // one off the score of the index's q-th row
          const int r = inv[q];
          atomicSub(&my4[r >> 2], 1u << (8 * (r & 3)));
        };
        const int lo = isnew ? toff[kt] : 0, hi = isnew ? toff[kt + 1] : 0;
        const bool few = hi - lo <= 16;
        if (few)
          for (int q = lo; q < hi; q++) take(q);
        for (unsigned mb = __ballot_sync(kFull, !few); mb != 0u; mb &= mb - 1) {
          const int e = __ffs(mb) - 1;
          const int l = __shfl_sync(kFull, lo, e), h = __shfl_sync(kFull, hi, e);
          for (int q = l + lane; q < h; q += 32) take(q);
        }
      }
      __syncwarp();
    };
    if (cap > 0) place(seed[warp]);
    for (;;) {
      const bool want = have < cap;
      int js = -1;
      if (want) {
        if constexpr (MT == 16) {
          // Keys of 16 bits, two rows per word (even / odd bytes): score << 11
          // | (2047 - j), 0xffff once placed; min.u16x2 keeps the smaller.
          unsigned m = 0xffffffffu;
          unsigned je = (2047u - 4u * (unsigned)lane) * 0x10001u - 0x20000u;  // rows 4q, 4q + 2
          for (int q = lane; q < nq; q += 32, je -= 128u * 0x10001u) {
            const unsigned v = my4[q];
            const unsigned ke = ((v & 0x001f001fu) << 11) | je | (((v >> 7) & 0x00010001u) * 0xffffu);
            const unsigned ko =
                (((v >> 8) & 0x001f001fu) << 11) | (je - 0x10001u) | (((v >> 15) & 0x00010001u) * 0xffffu);
            unsigned t;
            asm("min.u16x2 %0, %1, %2;" : "=r"(t) : "r"(ke), "r"(ko));
            asm("min.u16x2 %0, %1, %2;" : "=r"(m) : "r"(m), "r"(t));
          }
          const unsigned key = __reduce_min_sync(kFull, min(m & 0xffffu, m >> 16));
          js = 2047 - (int)(key & 2047u);
        } else {
          unsigned key = kFull;  // score << 16 | (0xffff - j)
          for (int q = lane; q < nq; q += 32) {
            const unsigned v = my4[q];
#pragma unroll
            for (int i = 0; i < 4; i++) {
              const unsigned x = (v >> (8 * i)) & 255u;
              if (x < 0x80u) key = min(key, (x << 16) | (unsigned)(0xffff - (4 * q + i)));
            }
          }
          js = 0xffff - (int)(__reduce_min_sync(kFull, key) & 0xffffu);
        }
      }
      if (lane == 0) prop[warp] = js;
      __syncthreads();
      // A row proposed by a lower warp of the batch is that warp's.
      const bool lost = want && __any_sync(kFull, lane < warp && prop[lane] == js);
      if (want && !lost) {
        if (lane == 0) used[js] = 1;
        if (lane < kWarpsW) atomicOr(&sc4[lane * nq + (js >> 2)], 0x80u << (8 * (js & 3)));
        place(js);
      }
      if (!__syncthreads_or(have < cap)) break;
    }
    // The block's union.
    if (cap > 0 && uw != nullptr && lane < fnw) uw[blk * fnw + lane] = wb[lane];
    __syncthreads();
  }
}

}  // namespace

namespace nsa_rows {

bool group_wide_ok(int64_t NT, int R, int blocks) {
  return (blocks == 32 || blocks == 64 || blocks == 128) && R >= 1 && R <= 16 && blocks * R <= kGroupWideRows &&
         NT >= 1 && NT <= kGNTw;
}

cudaError_t launch_group_wide(const nsa_cuda_attn_t *a, const nsa_plan_t *plan, const nsa_cuda_selview_t *sel, int R,
                              int blocks, int32_t *ord, unsigned *ubits, int fnw, int *claim, cudaStream_t st) {
  const int64_t NT = (a->Skv + kT - 1) / kT;
  if (!group_wide_ok(NT, R, blocks)) return cudaErrorInvalidValue;
  // Tiles per row at most: a plan's spans list up to kMaxT; a selection's
  // slots up to the forward's bound (n blocks of their tiles each), which
  // 16 covers for the usual n = 16 blocks of 64 keys.
  const int64_t bound =
      sel == nullptr || sel->kind != NSA_SEL_BLOCK_INDICES ? kMaxT
                                                            : nsa_cuda_inv_row_bound_blocks(a->n, sel->block_size, NT);
  const int MT = bound <= 16 ? 16 : 32;
  const int W = blocks * R;
  const size_t smem = WideLayout(W, MT).bytes;
  auto *kern = sel != nullptr ? (MT == 16 ? group_wide_kernel<16, true> : group_wide_kernel<32, true>)
                              : (MT == 16 ? group_wide_kernel<16, false> : group_wide_kernel<32, false>);
  static unsigned long long set_on[4];  // per instance: devices whose limit is set
  int dev = 0;
  const cudaError_t e = set_smem_once(kern, (int)WideLayout(kGroupWideRows, 32).bytes,
                                      &set_on[(sel != nullptr ? 2 : 0) + (MT == 16 ? 0 : 1)], &dev);
  if (e != cudaSuccess) return e;
  nsa_cuda_selview_t sv;
  memset(&sv, 0, sizeof sv);
  if (sel != nullptr) sv = *sel;
  const int n = sel != nullptr ? (int)a->n : (int)plan->n;
  const int64_t nwin = a->B * a->G * ((a->S + W - 1) / W);
  kern<<<(unsigned)nwin, kWT, smem, st>>>(plan != nullptr ? (const int2 *)plan->spans : nullptr,
                                           plan != nullptr ? plan->nspans : nullptr, sv, n, a->S, a->G, a->Skv, R,
                                           blocks, ord, ubits, fnw, claim);
  return cudaGetLastError();
}

}  // namespace nsa_rows
