// plan_v2.cu — the v2 planner on the device (DESIGN.md §3, sel_attn.h "plan").
//
// Row r = ((b*S)+t)*G+g. Per row: load the row's n selection slots, validate
// (count bad entries), turn each into a token span, clip to
// [0, min(p(t)+1, Skv)), sort by start, merge overlapping/touching spans,
// write the merged spans, {0,0} in the unused slots, nspans and row_len.
// Then an exclusive scan (CUB) of the lengths into row_off (i64, rows+1).
// Max length, total, invalid count and the length histogram are integer
// atomics into a device summary, so every value is deterministic.
// No host loop, no host synchronization: the whole planner is capturable.
//
// Three row kernels, all producing the canonical plan (sel_attn.h: the merged
// spans of a key set are unique, so any sort by start gives the same bytes as
// the CPU planner's (start, end) insertion sort). Validation, clipping and
// the invalid count are the CPU planner's (nsa_sel_entry, nsa_row_limit)
// entry by entry; every read is a slot (b, t, g, i < n) of the view, never
// an address taken from the selection's values.
//
//  * plan_rows_group_kernel (1 <= n <= 32, the NSA case): a group of L lanes
//    per row, L = n rounded up to a power of two (n = 16: two rows per warp).
//      lane j < n  loads slot j (the row's slots are contiguous in the usual
//                  layout, so a warp's loads are coalesced) and makes a sort
//                  key: the block id (block_indices) or start<<32 | end
//                  (ranges), already clipped; unused, invalid and clipped-away
//                  slots (and lanes j >= n) get the sentinel ~0, which sorts
//                  last;
//      bitonic sort of the L keys in registers (xor shuffles, width L);
//      after the sort the kept spans are lanes [0, c) in start order:
//        pm[j]    = max(end[0..j])                 (inclusive shuffle scan)
//        head[j]  = j < c and (j == 0 or start[j] > pm[j-1])
//                   (a head opens a merged span: nothing before reaches it)
//        H        = ballot of heads; nspans = popc(H)
//        head j's merged span = [start[j], pm[tail]), tail = next head - 1
//                   (or c - 1): pm[tail] is the max end of its members
//                   because every earlier end is < start[j] < end[j];
//      one store per lane j < n covers slots [0, n) exactly once: head j
//      writes its span to slot popc(H below j), non-head j writes {0,0} to
//      slot nspans + (non-heads below j) — there are n - nspans of them.
//    Each thread loads ITERS rows' slots up front, then processes them, so
//    several loads are in flight per warp; a block covers
//    (256 / L) * ITERS rows.
//
//  * plan_rows_warp_kernel (32 < n <= 128): one warp per row, K = 2 or 4
//    slots per lane, the same sort and merge over 32K elements (comment at
//    the kernel).
//
//  * plan_rows_thread_kernel (n > 128, n == 0): the original one thread per
//    row, insertion sort inside the row's own plan slots. Correct for any n,
//    slow (0.13 ms at 65 536 rows of n = 16 on an H100, which is why the
//    other two exist).
//
// NSA_CUDA_PLAN_LEGACY=1 (read once per process; a benchmark knob like
// NSA_CUDA_NO_PACK): every n on the one-thread-per-row kernel, so the old
// and new planners can be timed on the same card in one run.
#include <cub/device/device_scan.cuh>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"
#include "sel_slot.cuh"

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kGroupThreads = 256;

struct HistBounds {
  long long le[NSA_LEN_HIST_BUCKETS - 1];
};

__device__ __forceinline__ int hist_bucket(int len, const HistBounds &hb) {
  int bk = NSA_LEN_HIST_BUCKETS - 1;
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS - 1; i++)
    if ((long long)len <= hb.le[i]) {
      bk = i;
      break;
    }
  return bk;
}

// A query's key limit and a slot's span: sel_slot.cuh (the row grouping in
// fwd_rows.cu lists tiles by the same rules).
using nsa_sel::load_slot;
using nsa_sel::row_limit;

// ------------------------------------------------------ one thread per row --

__global__ void plan_rows_thread_kernel(nsa_cuda_selview_t sel, int64_t B, int64_t S,
                                        int64_t Skv, int64_t G, int64_t n,
                                        int2 *__restrict__ spans, int32_t *__restrict__ nspans,
                                        int32_t *__restrict__ row_len,
                                        int64_t *__restrict__ len64, nsa_cuda_summary_t *summary,
                                        HistBounds hb) {
  __shared__ unsigned long long s_hist[NSA_LEN_HIST_BUCKETS];
  __shared__ unsigned long long s_inv, s_tot;
  __shared__ int s_max;
  if (threadIdx.x < NSA_LEN_HIST_BUCKETS) s_hist[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    s_inv = 0;
    s_tot = 0;
    s_max = 0;
  }
  __syncthreads();

  const int64_t rows = B * S * G;
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r < rows) {
    const int64_t g = r % G, t = (r / G) % S, b = r / (G * S);
    const long long limit = row_limit(t, S, Skv);
    const int64_t nblk = sel.kind == NSA_SEL_BLOCK_INDICES
                             ? (Skv + sel.block_size - 1) / sel.block_size
                             : 0;
    int2 *row = spans + r * n;  // this thread's own n slots: sort in place
    int cnt = 0;
    unsigned inv = 0;
    for (int64_t i = 0; i < n; i++) {
      long long lo = 0, hi = 0;
      int k = load_slot(sel, b, t, g, i, nblk, &lo, &hi);
      if (k < 0) inv++;
      if (k <= 0) continue;
      if (lo < 0) lo = 0;
      if (hi > limit) hi = limit;
      if (lo >= hi) continue;
      int2 sp = make_int2((int)lo, (int)hi);
      int j = cnt++;
      while (j > 0) {  // insertion sort by start
        int2 prev = row[j - 1];
        if (prev.x <= sp.x) break;
        row[j] = prev;
        j--;
      }
      row[j] = sp;
    }
    // merge overlapping or touching spans (canonical plan)
    int w = 0;
    int len = 0;
    for (int i = 0; i < cnt; i++) {
      int2 sp = row[i];
      if (w > 0 && row[w - 1].y >= sp.x) {
        if (sp.y > row[w - 1].y) row[w - 1].y = sp.y;
      } else {
        row[w++] = sp;
      }
    }
    for (int i = 0; i < w; i++) len += row[i].y - row[i].x;
    for (int64_t i = w; i < n; i++) row[i] = make_int2(0, 0);
    nspans[r] = w;
    row_len[r] = len;
    len64[r] = len;
    if (r == rows - 1) len64[rows] = 0;

    atomicAdd(&s_hist[hist_bucket(len, hb)], 1ull);
    if (inv) atomicAdd(&s_inv, (unsigned long long)inv);
    if (len) {
      atomicAdd(&s_tot, (unsigned long long)len);
      atomicMax(&s_max, len);
    }
  }
  __syncthreads();
  if (threadIdx.x < NSA_LEN_HIST_BUCKETS && s_hist[threadIdx.x])
    atomicAdd((unsigned long long *)&summary->hist[threadIdx.x], s_hist[threadIdx.x]);
  if (threadIdx.x == 0) {
    if (s_inv) atomicAdd((unsigned long long *)&summary->invalid, s_inv);
    if (s_tot) atomicAdd((unsigned long long *)&summary->total, s_tot);
    if (s_max) atomicMax(&summary->max_len, s_max);
  }
}

// ------------------------------------------------------ L lanes per row ----

// Sort key of a kept span. block_indices: the block id (< 2^27, the span is
// rebuilt from it after the sort); ranges: start << 32 | clipped end (both
// < 2^27). ~0 = nothing (sorts after every kept span).
template <bool RANGES>
struct KeyOf {
  typedef unsigned type;
};
template <>
struct KeyOf<true> {
  typedef unsigned long long type;
};

// Row r's decode (32-bit divisions when the row count allows).
__device__ __forceinline__ void row_decode(int64_t r, int64_t S, int64_t G, bool small,
                                           int64_t *b, int64_t *t, int64_t *g) {
  if (small) {
    const unsigned ur = (unsigned)r, uG = (unsigned)G, uS = (unsigned)S;
    const unsigned bt = ur / uG, ub = bt / uS;
    *g = ur - bt * uG;
    *t = bt - ub * uS;
    *b = ub;
  } else {
    const int64_t bt = r / G, bb = bt / S;
    *g = r - bt * G;
    *t = bt - bb * S;
    *b = bb;
  }
}

template <int L, bool RANGES, int ITERS>
__global__ void __launch_bounds__(kGroupThreads)
    plan_rows_group_kernel(nsa_cuda_selview_t sel, int64_t S, int64_t Skv, int64_t G, int n,
                           int64_t rows, int2 *__restrict__ spans,
                           int32_t *__restrict__ nspans, int32_t *__restrict__ row_len,
                           int64_t *__restrict__ len64, nsa_cuda_summary_t *summary,
                           HistBounds hb) {
  typedef typename KeyOf<RANGES>::type Key;
  constexpr Key kNone = ~(Key)0;
  constexpr int GPB = kGroupThreads / L;                      // rows per pass
  constexpr unsigned kGroupMask = (unsigned)((1ull << L) - 1ull);

  __shared__ unsigned s_hist[NSA_LEN_HIST_BUCKETS];
  __shared__ unsigned long long s_inv, s_tot;
  __shared__ int s_max;
  if (threadIdx.x < NSA_LEN_HIST_BUCKETS) s_hist[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    s_inv = 0;
    s_tot = 0;
    s_max = 0;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int p = lane & (L - 1);             // slot of this lane in its row
  const int gbase = lane & ~(L - 1) & 31;   // first lane of this row's group
  const int grp = threadIdx.x / L;          // row of this group in a pass
  const int warp_grp = (threadIdx.x & ~31) / L;  // the warp's first group
  const int64_t row0 = (int64_t)blockIdx.x * (GPB * ITERS);
  const bool small = rows <= 0x7fffffffLL;
  const int32_t bs = sel.block_size;
  const int64_t nblk = RANGES ? 0 : (Skv + bs - 1) / bs;

  // ---- load: key of slot p of each of this group's ITERS rows
  Key key[ITERS];
  int lim[ITERS];
  unsigned bad = 0;  // bit i: slot p of row i is invalid
#pragma unroll
  for (int i = 0; i < ITERS; i++) {
    key[i] = kNone;
    lim[i] = 0;
    const int64_t r = row0 + (int64_t)i * GPB + grp;
    if (r >= rows) continue;
    int64_t b, t, g;
    row_decode(r, S, G, small, &b, &t, &g);
    const int limit = row_limit(t, S, Skv);
    lim[i] = limit;
    if (p >= n) continue;
    const int32_t *ptr = sel.data + b * sel.st[0] + t * sel.st[1] + g * sel.st[2] + p * sel.st[3];
    if (!RANGES) {
      const int32_t id = __ldg(ptr);
      if (id == -1) continue;                       // unused
      if (id < -1 || (int64_t)id >= nblk) {         // invalid
        bad |= 1u << i;
        continue;
      }
      if ((long long)id * bs < limit) key[i] = (Key)id;  // else clipped away
    } else {
      const int32_t a = __ldg(ptr), e = __ldg(ptr + sel.st[4]);
      if (a == 0 && e == 0) continue;  // unused
      if (a < 0 || a > e) {            // invalid
        bad |= 1u << i;
        continue;
      }
      const int hi = e < limit ? e : limit;
      if (a < hi) key[i] = (Key)(((unsigned long long)(unsigned)a << 32) | (unsigned)hi);
    }
  }

  unsigned long long tot = 0;
  unsigned inv = 0;
  int mx = 0;
#pragma unroll
  for (int i = 0; i < ITERS; i++) {
    if (row0 + (int64_t)i * GPB + warp_grp >= rows) break;  // warp-uniform
    const int64_t r = row0 + (int64_t)i * GPB + grp;
    const bool active = r < rows;  // uniform in the group

    // bitonic sort of the group's L keys, ascending along p
    Key x = key[i];
#pragma unroll
    for (int k = 2; k <= L; k <<= 1) {
#pragma unroll
      for (int j = k >> 1; j > 0; j >>= 1) {
        const Key o = __shfl_xor_sync(kFull, x, j, L);
        const bool up = (p & k) == 0, lower = (p & j) == 0;
        x = (lower == up) ? (o < x ? o : x) : (o > x ? o : x);
      }
    }

    const bool valid = x != kNone;
    int lo = 0, hi = 0;
    if (valid) {
      if (RANGES) {
        lo = (int)((unsigned long long)x >> 32);
        hi = (int)(x & 0xffffffffu);
      } else {
        const long long l = (long long)x * bs, h = l + bs;
        lo = (int)l;  // < limit
        hi = h < lim[i] ? (int)h : lim[i];
      }
    }
    // inclusive prefix max of the ends (kept lanes first, then zeros)
    int pm = hi;
#pragma unroll
    for (int d = 1; d < L; d <<= 1) {
      const int o = __shfl_up_sync(kFull, pm, d, L);
      if (p >= d) pm = o > pm ? o : pm;
    }
    const int prev = __shfl_up_sync(kFull, pm, 1, L);
    const bool head = valid && (p == 0 || lo > prev);
    const unsigned H = (__ballot_sync(kFull, head) >> gbase) & kGroupMask;
    const unsigned V = (__ballot_sync(kFull, valid) >> gbase) & kGroupMask;
    const unsigned Bd = (__ballot_sync(kFull, (bad >> i) & 1u) >> gbase) & kGroupMask;
    const int nsp = __popc(H), cnt = __popc(V);
    const int below = __popc(H & ((1u << p) - 1u));  // heads before p
    const unsigned after = H & ~((2u << p) - 1u);     // heads after p (p = 31: none)
    int tail = after ? __ffs(after) - 2 : cnt - 1;
    if (tail < 0) tail = p;  // no kept span: the value is not used
    const int end = __shfl_sync(kFull, pm, tail, L);
    int len = head ? end - lo : 0;
#pragma unroll
    for (int o = L >> 1; o > 0; o >>= 1) len += __shfl_xor_sync(kFull, len, o, L);

    if (active) {
      if (p < n) {
        const int slot = head ? below : nsp + (p - below);
        spans[r * n + slot] = head ? make_int2(lo, end) : make_int2(0, 0);
      }
      if (p == 0) {
        nspans[r] = nsp;
        row_len[r] = len;
        len64[r] = len;
        if (r == rows - 1) len64[rows] = 0;
        atomicAdd(&s_hist[hist_bucket(len, hb)], 1u);
        inv += __popc(Bd);
        tot += (unsigned long long)len;
        mx = len > mx ? len : mx;
      }
    }
  }

  // block summary: warp sums, then one shared atomic per warp
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    tot += __shfl_xor_sync(kFull, tot, o);
    inv += __shfl_xor_sync(kFull, inv, o);
    const int m = __shfl_xor_sync(kFull, mx, o);
    mx = m > mx ? m : mx;
  }
  if (lane == 0) {
    if (inv) atomicAdd(&s_inv, (unsigned long long)inv);
    if (tot) atomicAdd(&s_tot, tot);
    if (mx) atomicMax(&s_max, mx);
  }
  __syncthreads();
  if (threadIdx.x < NSA_LEN_HIST_BUCKETS && s_hist[threadIdx.x])
    atomicAdd((unsigned long long *)&summary->hist[threadIdx.x],
              (unsigned long long)s_hist[threadIdx.x]);
  if (threadIdx.x == 0) {
    if (s_inv) atomicAdd((unsigned long long *)&summary->invalid, s_inv);
    if (s_tot) atomicAdd((unsigned long long *)&summary->total, s_tot);
    if (s_max) atomicMax(&summary->max_len, s_max);
  }
}

// ------------------------------------------------ one warp per row, K slots --

// 32 < n <= 32*K: one warp per row, K slots per lane. Slot k*32 + lane is
// loaded into x[k] (coalesced); the sort treats x[k] of lane l as element
// e = l*K + k of a 32K-element bitonic network (the initial placement does
// not matter to a sort), so j < K steps compare inside a lane and j >= K
// steps are xor shuffles by j/K. After the sort, in element order:
//   pm[e]   = max(end[0..e])     (in-lane running max + warp scan of lane maxima)
//   head[e] = kept and (e == 0 or start[e] > pm[e-1])
//   tail[e] = kept and (e+1 is not kept or is a head): the last member
//   rank    = heads before e (warp scan of per-lane head counts)
// Stores: a head writes .x = start of slot rank, a tail writes .y = pm[e]
// of slot (heads up to e) - 1, and every non-head e < n writes {0,0} to slot
// nspans + (non-heads before e): together each of the n slots exactly once
// per field. row_len = sum(tail ends) - sum(head starts), mod 2^32 (exact:
// the true value is < 2^27).
template <int K, bool RANGES>
__global__ void __launch_bounds__(kGroupThreads)
    plan_rows_warp_kernel(nsa_cuda_selview_t sel, int64_t S, int64_t Skv, int64_t G, int n,
                          int64_t rows, int32_t *__restrict__ spans,
                          int32_t *__restrict__ nspans, int32_t *__restrict__ row_len,
                          int64_t *__restrict__ len64, nsa_cuda_summary_t *summary,
                          HistBounds hb) {
  typedef typename KeyOf<RANGES>::type Key;
  constexpr Key kNone = ~(Key)0;
  constexpr int N = 32 * K;

  __shared__ unsigned s_hist[NSA_LEN_HIST_BUCKETS];
  __shared__ unsigned long long s_inv, s_tot;
  __shared__ int s_max;
  if (threadIdx.x < NSA_LEN_HIST_BUCKETS) s_hist[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    s_inv = 0;
    s_tot = 0;
    s_max = 0;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t r = (int64_t)blockIdx.x * (kGroupThreads / 32) + threadIdx.x / 32;
  unsigned long long tot = 0;
  unsigned inv = 0;
  int mx = 0;
  if (r < rows) {  // warp-uniform
    const int32_t bs = sel.block_size;
    const int64_t nblk = RANGES ? 0 : (Skv + bs - 1) / bs;
    int64_t b, t, g;
    row_decode(r, S, G, rows <= 0x7fffffffLL, &b, &t, &g);
    const int limit = row_limit(t, S, Skv);
    const int32_t *row = sel.data + b * sel.st[0] + t * sel.st[1] + g * sel.st[2];

    Key x[K];
    unsigned bad = 0;
#pragma unroll
    for (int k = 0; k < K; k++) {
      x[k] = kNone;
      const int slot = k * 32 + lane;
      if (slot >= n) continue;
      const int32_t *ptr = row + (int64_t)slot * sel.st[3];
      if (!RANGES) {
        const int32_t id = __ldg(ptr);
        if (id == -1) continue;
        if (id < -1 || (int64_t)id >= nblk) {
          bad++;
          continue;
        }
        if ((long long)id * bs < limit) x[k] = (Key)id;
      } else {
        const int32_t a = __ldg(ptr), e = __ldg(ptr + sel.st[4]);
        if (a == 0 && e == 0) continue;
        if (a < 0 || a > e) {
          bad++;
          continue;
        }
        const int hi = e < limit ? e : limit;
        if (a < hi) x[k] = (Key)(((unsigned long long)(unsigned)a << 32) | (unsigned)hi);
      }
    }

    // bitonic sort, element e = lane*K + k ascending
#pragma unroll
    for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
      for (int j = size >> 1; j > 0; j >>= 1) {
        if (j < K) {
#pragma unroll
          for (int k = 0; k < K; k++) {
            if (k & j) continue;
            const bool up = ((lane * K + k) & size) == 0;
            const Key a = x[k], c = x[k | j];
            const Key mn = a < c ? a : c, mxk = a < c ? c : a;
            x[k] = up ? mn : mxk;
            x[k | j] = up ? mxk : mn;
          }
        } else {
          const int m = j / K;
          const bool lower = (lane & m) == 0;
#pragma unroll
          for (int k = 0; k < K; k++) {
            const Key o = __shfl_xor_sync(kFull, x[k], m);
            const bool up = ((lane * K + k) & size) == 0;
            x[k] = (lower == up) ? (o < x[k] ? o : x[k]) : (o > x[k] ? o : x[k]);
          }
        }
      }
    }

    int lo[K], hi[K], pm[K];
    bool valid[K], head[K];
    int run = 0;
#pragma unroll
    for (int k = 0; k < K; k++) {
      valid[k] = x[k] != kNone;
      lo[k] = hi[k] = 0;
      if (valid[k]) {
        if (RANGES) {
          lo[k] = (int)((unsigned long long)x[k] >> 32);
          hi[k] = (int)(x[k] & 0xffffffffu);
        } else {
          const long long l = (long long)x[k] * bs, h = l + bs;
          lo[k] = (int)l;
          hi[k] = h < limit ? (int)h : limit;
        }
      }
      run = hi[k] > run ? hi[k] : run;
      pm[k] = run;  // in-lane inclusive max
    }
    int sc = run;  // warp inclusive scan of the lane maxima
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int o = __shfl_up_sync(kFull, sc, d);
      if (lane >= d) sc = o > sc ? o : sc;
    }
    int excl = __shfl_up_sync(kFull, sc, 1);
    if (lane == 0) excl = -1;  // element 0 is a head when kept
    int hc = 0;
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int prev = k == 0 ? excl : (excl > pm[k - 1] ? excl : pm[k - 1]);
      head[k] = valid[k] && lo[k] > prev;
      hc += head[k];
    }
#pragma unroll
    for (int k = 0; k < K; k++) pm[k] = excl > pm[k] ? excl : pm[k];
    int hs = hc;  // warp inclusive scan of head counts
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int o = __shfl_up_sync(kFull, hs, d);
      if (lane >= d) hs += o;
    }
    const int nsp = __shfl_sync(kFull, hs, 31);
    // the next lane's first element (the last lane has none: e + 1 == N)
    const int nx_valid = __shfl_down_sync(kFull, (int)valid[0], 1);
    const int nx_head = __shfl_down_sync(kFull, (int)head[0], 1);
    int before = hs - hc;  // heads before this lane's element k
    unsigned len_u = 0;
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int e = lane * K + k;
      bool next_open;  // element e+1 is not kept, or opens a new span
      if (k < K - 1)
        next_open = !valid[k + 1] || head[k + 1];
      else
        next_open = lane == 31 || !nx_valid || nx_head;
      const bool tail = valid[k] && next_open;
      if (head[k]) {
        if (tail) {
          *(int2 *)(spans + 2 * (r * n + before)) = make_int2(lo[k], pm[k]);
        } else {
          spans[2 * (r * n + before)] = lo[k];
        }
        len_u -= (unsigned)lo[k];
      } else if (e < n) {
        *(int2 *)(spans + 2 * (r * n + nsp + (e - before))) = make_int2(0, 0);
      }
      before += head[k];  // now: heads up to e
      if (tail) {
        if (!head[k]) spans[2 * (r * n + before - 1) + 1] = pm[k];
        len_u += (unsigned)pm[k];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      len_u += __shfl_xor_sync(kFull, len_u, o);
      bad += __shfl_xor_sync(kFull, bad, o);
    }
    const int len = (int)len_u;
    if (lane == 0) {
      nspans[r] = nsp;
      row_len[r] = len;
      len64[r] = len;
      if (r == rows - 1) len64[rows] = 0;
      atomicAdd(&s_hist[hist_bucket(len, hb)], 1u);
      inv = bad;
      tot = (unsigned long long)len;
      mx = len;
    }
  }
  // block summary (only lane 0 of each warp holds values)
  if (lane == 0) {
    if (inv) atomicAdd(&s_inv, (unsigned long long)inv);
    if (tot) atomicAdd(&s_tot, tot);
    if (mx) atomicMax(&s_max, mx);
  }
  __syncthreads();
  if (threadIdx.x < NSA_LEN_HIST_BUCKETS && s_hist[threadIdx.x])
    atomicAdd((unsigned long long *)&summary->hist[threadIdx.x],
              (unsigned long long)s_hist[threadIdx.x]);
  if (threadIdx.x == 0) {
    if (s_inv) atomicAdd((unsigned long long *)&summary->invalid, s_inv);
    if (s_tot) atomicAdd((unsigned long long *)&summary->total, s_tot);
    if (s_max) atomicMax(&summary->max_len, s_max);
  }
}

template <int K, bool RANGES>
cudaError_t launch_warp(const nsa_cuda_selview_t &sel, int64_t S, int64_t Skv, int64_t G, int n,
                        int64_t rows, nsa_plan_t *plan, nsa_cuda_summary_t *summary,
                        int64_t *len64, const HistBounds &hb, cudaStream_t st) {
  constexpr int64_t per_block = kGroupThreads / 32;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  plan_rows_warp_kernel<K, RANGES><<<(unsigned)blocks, kGroupThreads, 0, st>>>(
      sel, S, Skv, G, n, rows, plan->spans, plan->nspans, plan->row_len, len64, summary, hb);
  return cudaGetLastError();
}

// Rows per thread: enough that a block covers 32..256 rows (fewer blocks and
// summary atomics, several loads in flight per thread).
template <int L>
constexpr int group_iters() {
  return L >= 8 ? 4 : (L >= 2 ? 2 : 1);
}

template <int L, bool RANGES>
cudaError_t launch_group(const nsa_cuda_selview_t &sel, int64_t S, int64_t Skv, int64_t G,
                         int n, int64_t rows, nsa_plan_t *plan, nsa_cuda_summary_t *summary,
                         int64_t *len64, const HistBounds &hb, cudaStream_t st) {
  constexpr int ITERS = group_iters<L>();
  constexpr int64_t per_block = (int64_t)(kGroupThreads / L) * ITERS;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  plan_rows_group_kernel<L, RANGES, ITERS><<<(unsigned)blocks, kGroupThreads, 0, st>>>(
      sel, S, Skv, G, n, rows, (int2 *)plan->spans, plan->nspans, plan->row_len, len64, summary,
      hb);
  return cudaGetLastError();
}

template <bool RANGES>
cudaError_t launch_group_n(const nsa_cuda_selview_t &sel, int64_t S, int64_t Skv, int64_t G,
                           int n, int64_t rows, nsa_plan_t *plan, nsa_cuda_summary_t *summary,
                           int64_t *len64, const HistBounds &hb, cudaStream_t st) {
  if (n <= 1) return launch_group<1, RANGES>(sel, S, Skv, G, n, rows, plan, summary, len64, hb, st);
  if (n <= 2) return launch_group<2, RANGES>(sel, S, Skv, G, n, rows, plan, summary, len64, hb, st);
  if (n <= 4) return launch_group<4, RANGES>(sel, S, Skv, G, n, rows, plan, summary, len64, hb, st);
  if (n <= 8) return launch_group<8, RANGES>(sel, S, Skv, G, n, rows, plan, summary, len64, hb, st);
  if (n <= 16)
    return launch_group<16, RANGES>(sel, S, Skv, G, n, rows, plan, summary, len64, hb, st);
  return launch_group<32, RANGES>(sel, S, Skv, G, n, rows, plan, summary, len64, hb, st);
}

bool plan_legacy() {
  static const bool on = [] {
    const char *e = getenv("NSA_CUDA_PLAN_LEGACY");
    return e && *e && strcmp(e, "0") != 0;
  }();
  return on;
}

}  // namespace

extern "C" size_t nsa_cuda_plan_v2_temp_bytes(int64_t rows) {
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, (const int64_t *)nullptr, (int64_t *)nullptr,
                                (int64_t)(rows + 1));
  return bytes;
}

extern "C" cudaError_t nsa_cuda_launch_plan_v2(const nsa_cuda_selview_t *sel, int64_t B, int64_t S,
                                               int64_t Skv, int64_t G, int64_t n, nsa_plan_t *plan,
                                               nsa_cuda_summary_t *summary, int64_t *len64,
                                               void *temp, size_t temp_bytes, int need_row_off,
                                               cudaStream_t st) {
  const int64_t rows = B * S * G;
  cudaError_t e = cudaMemsetAsync(summary, 0, sizeof(*summary), st);
  if (e != cudaSuccess) return e;
  if (rows == 0) return need_row_off ? cudaMemsetAsync(plan->row_off, 0, sizeof(int64_t), st) : cudaSuccess;
  HistBounds hb;
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS - 1; i++) hb.le[i] = nsa_len_hist_le[i];
  const bool rg = sel->kind == NSA_SEL_RANGES;
  const int ni = (int)n;
  const bool thread_rows = n < 1 || n > 128 || plan_legacy();
  if (!thread_rows && n <= 32) {
    e = rg ? launch_group_n<true>(*sel, S, Skv, G, ni, rows, plan, summary, len64, hb, st)
           : launch_group_n<false>(*sel, S, Skv, G, ni, rows, plan, summary, len64, hb, st);
  } else if (!thread_rows && n <= 64) {
    e = rg ? launch_warp<2, true>(*sel, S, Skv, G, ni, rows, plan, summary, len64, hb, st)
           : launch_warp<2, false>(*sel, S, Skv, G, ni, rows, plan, summary, len64, hb, st);
  } else if (!thread_rows) {  // 64 < n <= 128
    e = rg ? launch_warp<4, true>(*sel, S, Skv, G, ni, rows, plan, summary, len64, hb, st)
           : launch_warp<4, false>(*sel, S, Skv, G, ni, rows, plan, summary, len64, hb, st);
  } else {
    const int threads = 128;
    const int64_t blocks = (rows + threads - 1) / threads;
    plan_rows_thread_kernel<<<(unsigned)blocks, threads, 0, st>>>(
        *sel, B, S, Skv, G, n, (int2 *)plan->spans, plan->nspans, plan->row_len, len64, summary,
        hb);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess || !need_row_off) return e;
  size_t tb = temp_bytes;
  return cub::DeviceScan::ExclusiveSum(temp, tb, (const int64_t *)len64, plan->row_off,
                                       (int64_t)(rows + 1), st);
}
