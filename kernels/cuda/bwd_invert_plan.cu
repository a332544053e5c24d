// bwd_invert_plan.cu — the inverted plan of the backward (bwd_internal.h).
//
// For every 64-key tile x = (b*G + g)*NT + kt, the rows whose key set touches
// keys [kt*64, kt*64 + 64) of (b, g), as a CSR ordered by row ascending:
//   1. count_kernel: per row, the distinct tiles its merged spans touch
//      (spans are sorted and disjoint, so a tile repeats only across the
//      boundary of two consecutive spans: skip tiles <= the previous last);
//   2. exclusive scan (CUB) → pair_off; pads past the total get key = ntiles
//      (in write_kernel, below);
//   3. write_kernel (a warp per row): pairs in row order, pair p in [pair_off[r], pair_off[r+1])
//      has key = tile, row_of[p] = r and the row's 64-bit key mask inside
//      the tile (a tile shared by two consecutive spans ORs both);
//   4. CUB radix sort of (key, p). LSD radix sort is stable and p grows with
//      the row, so rows stay ascending within a tile: the dk/dv summation
//      order is fixed and the result deterministic, with no atomics at all.
//      The sorted p (pidx) also tells the key-centric dq where to write its
//      per-pair partial: dq of row r is then the sum of the contiguous
//      partials pair_off[r] .. pair_off[r+1] in order;
//   5. tile_off[x] = lower_bound(keys, x) (no atomics: from each sorted
//      pair's key and its predecessor's in mask_kernel, or by binary search
//      when there are more tiles than pairs), and per sorted pair its row
//      and mask gathered through pidx (so the dk/dv kernels read one word
//      instead of walking the row's spans);
//   6. segments: tile x with c rows gets max(1, ceil(c / seg_rows)) CTA items,
//      and, when that is > 1, as many f32 partial slots; two scans give the
//      item and partial offsets (one block for both below 65 536 tiles).
// Capacity `cap` is a host bound on the number of pairs (see bwd_request.cu);
// everything runs on the stream without a host synchronization.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "bwd_internal.h"

namespace {

constexpr int kT = NSA_BWD_TILE;

__global__ void count_kernel(const int2 *__restrict__ spans, const int32_t *__restrict__ nspans,
                             const unsigned char *__restrict__ skip, int64_t row0, int64_t rows, int64_t n,
                             int32_t *__restrict__ cnt) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r > rows) return;
  if (r == rows) {
    cnt[rows] = 0;
    return;
  }
  const int nsp = (skip != nullptr && skip[row0 + r]) ? 0 : nspans[row0 + r];  // skipped: no pairs
  int c = 0, prev = -1;
  for (int i = 0; i < nsp; i++) {
    const int2 sp = spans[(row0 + r) * n + i];
    if (sp.y <= sp.x) continue;
    int first = sp.x / kT, last = (sp.y - 1) / kT;
    if (first <= prev) first = prev + 1;
    if (last >= first) c += last - first + 1;
    if (last > prev) prev = last;
  }
  cnt[r] = c;
}

// The sort's values (idx[i] = i) and the pads past the last pair (key =
// pad, sorted last), grid-stride over [0, cap): total = pair_off[rows].
__device__ __forceinline__ void write_pads(int64_t total, int64_t cap, unsigned pad, unsigned *__restrict__ keys,
                                           int32_t *__restrict__ vals, int32_t *__restrict__ idx) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < cap; i += (int64_t)gridDim.x * blockDim.x) {
    idx[i] = (int32_t)i;
    if (i >= total) {
      keys[i] = pad;
      vals[i] = -1;
    }
  }
}

// rows == 0 (no write_kernel): only the pads; a grid of >= cap threads.
__global__ void pad_kernel(const int32_t *__restrict__ pair_off, int64_t rows, int64_t cap,
                           unsigned pad, unsigned *__restrict__ keys, int32_t *__restrict__ vals,
                           int32_t *__restrict__ idx) {
  write_pads(pair_off[rows], cap, pad, keys, vals, idx);
}

// The bits of tile kt that span [x, y) covers (keys kt*64 + bit).
__device__ __forceinline__ unsigned long long span_bits(int x, int y, int kt) {
  const int k0 = kt * kT;
  const int lo = max(x, k0) - k0, hi = min(y, k0 + kT) - k0;
  return (hi - lo == 64 ? ~0ull : ((1ull << (hi - lo)) - 1ull)) << lo;
}

// One warp per row (r local to the batch); lanes take the row's spans 32 at
// a time. Spans are sorted and disjoint, so lane i's tiles are
// [first_i, last_i] minus a first tile already written by an earlier span
// (first_i == the largest earlier last); an exclusive prefix sum of the
// lanes' tile counts gives each lane's output position, so a warp's stores go
// to consecutive pairs (a thread per row wrote 16 scattered streams: 51 us of
// 165 for the inversion at T = 16k on an H200). A span whose first tile was
// already written ORs its bits into that pair after a __syncwarp (atomicOr:
// several spans of one tile, e.g. block size 16, commute; the result is the
// same bits as a sequential OR).
__global__ void write_kernel(const int2 *__restrict__ spans, const int32_t *__restrict__ nspans,
                             const unsigned char *__restrict__ skip, int64_t row0, int64_t rows, int64_t n, int64_t S, int64_t G, int64_t NT,
                             int64_t cap, const int32_t *__restrict__ pair_off, unsigned *__restrict__ keys,
                             int32_t *__restrict__ vals, unsigned long long *__restrict__ mask_of, unsigned pad,
                             int32_t *__restrict__ idx) {
  write_pads(pair_off[rows], cap, pad, keys, vals, idx);  // pad_kernel's work, over this grid
  const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;  // local row
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;  // warp-uniform
  const int64_t gr = row0 + r;  // the plan's row
  const int64_t g = gr % G, b = gr / (G * S);
  const int64_t base = (b * G + g) * NT;
  const int nsp = (skip != nullptr && skip[gr]) ? 0 : nspans[gr];  // as count_kernel
  int64_t pos = pair_off[r];  // next pair of this row
  int prev = -1;              // last tile written for this row so far
  for (int i0 = 0; i0 < nsp; i0 += 32) {
    const int i = i0 + lane;
    const int2 sp = i < nsp ? spans[gr * n + i] : make_int2(0, 0);
    const bool ne = sp.y > sp.x;
    const int first = ne ? sp.x / kT : 0x7fffffff, last = ne ? (sp.y - 1) / kT : -1;
    int run = last;  // inclusive max-scan of last over the lanes
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, run, d);
      if (lane >= d) run = max(run, v);
    }
    int before = __shfl_up_sync(0xffffffffu, run, 1);  // largest last of the earlier spans
    before = max(lane == 0 ? -1 : before, prev);
    const int f2 = max(first, before + 1);
    const int cnt = ne && last >= f2 ? last - f2 + 1 : 0;
    int inc = cnt;  // inclusive prefix sum of the counts
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, inc, d);
      if (lane >= d) inc += v;
    }
    const int64_t my = pos + inc - cnt;
    for (int kt = f2; kt <= last; kt++) {
      const int64_t p = my + (kt - f2);
      if (p < cap) {  // never past the bound
        keys[p] = (unsigned)(base + kt);
        vals[p] = (int32_t)r;
        mask_of[p] = span_bits(sp.x, sp.y, kt);
      }
    }
    __syncwarp();
    if (ne && first <= before && my - 1 < cap)  // first tile written by an earlier span: pair my - 1
      atomicOr(&mask_of[my - 1], span_bits(sp.x, sp.y, first));
    __syncwarp();
    pos += __shfl_sync(0xffffffffu, inc, 31);
    prev = max(prev, __shfl_sync(0xffffffffu, run, 31));
  }
}

__global__ void tile_off_kernel(const unsigned *__restrict__ keys, int64_t cap, int64_t ntiles,
                                int32_t *__restrict__ tile_off) {
  const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (x > ntiles) return;
  int64_t lo = 0, hi = cap;  // first i with keys[i] >= x
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if ((int64_t)keys[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  tile_off[x] = (int32_t)lo;
}

// Sorted pair i: its row (the plan's id) and key mask, gathered from the
// row-ordered arrays through pidx; and tile_off (first pair of each tile,
// the pads' key = pad = ntiles last): pair i is the first of every tile t
// in (keys[i - 1], keys[i]], the last pair also of the tiles after its key
// (none when pads follow). Every t in [0, ntiles] is written once: the
// tile_off kernel's binary searches (~11 us at T = 8k-16k on an H100) are
// one more load per pair here. Only where tiles <= pairs (tile_off NULL
// otherwise): a long run of empty tiles would be one thread's loop.
__global__ void mask_kernel(const unsigned *__restrict__ keys, const int32_t *__restrict__ pidx,
                            const int32_t *__restrict__ row_of, const unsigned long long *__restrict__ mask_of,
                            int64_t row0, int64_t cap, unsigned pad, int32_t *__restrict__ rows_out,
                            unsigned long long *__restrict__ masks, int32_t *__restrict__ tile_off) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= cap) return;
  const unsigned x = keys[i];
  if (tile_off != nullptr) {
    const int64_t before = i == 0 ? -1 : (int64_t)keys[i - 1];
    for (int64_t t = before + 1; t <= (int64_t)x; t++) tile_off[t] = (int32_t)i;
    if (i == cap - 1)
      for (int64_t t = (int64_t)x + 1; t <= (int64_t)pad; t++) tile_off[t] = (int32_t)cap;
  }
  if (x >= pad) {
    masks[i] = 0;
    rows_out[i] = -1;
    return;
  }
  const int32_t p = pidx[i];
  rows_out[i] = (int32_t)(row0 + row_of[p]);
  masks[i] = mask_of[p];
}

// CTA items of tile x (x < ntiles) with c rows: max(1, ceil(c / seg_rows)).
__device__ __forceinline__ int seg_count(const int32_t *__restrict__ tile_off, int64_t x, int seg_rows) {
  const int c = tile_off[x + 1] - tile_off[x];
  return c <= seg_rows ? 1 : (c + seg_rows - 1) / seg_rows;
}

__global__ void seg_kernel(const int32_t *__restrict__ tile_off, int64_t ntiles, int seg_rows,
                           int32_t *__restrict__ nitem, int32_t *__restrict__ npart) {
  const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (x > ntiles) return;
  if (x == ntiles) {
    nitem[x] = 0;
    npart[x] = 0;
    return;
  }
  const int ns = seg_count(tile_off, x, seg_rows);
  nitem[x] = ns;
  npart[x] = ns > 1 ? ns : 0;
}

// seg_kernel and the two exclusive scans of its counts in one block, for up
// to kSegScanMax tiles (the common case; five launches were ~16 us at T =
// 8k-16k on an H100): chunks of 1024 tiles, each tile's (items, partial
// slots) packed into one 64-bit value (items high, slots low: both totals
// stay below 2^31) and scanned with a running carry.
constexpr int kSegScanThreads = 1024;
constexpr int64_t kSegScanMax = 1 << 16;
__global__ void __launch_bounds__(kSegScanThreads)
    seg_scan_kernel(const int32_t *__restrict__ tile_off, int64_t ntiles, int seg_rows, int32_t *__restrict__ item_off,
                    int32_t *__restrict__ part_off) {
  using Scan = cub::BlockScan<unsigned long long, kSegScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  unsigned long long carry = 0;
  for (int64_t c0 = 0; c0 <= ntiles; c0 += kSegScanThreads) {
    const int64_t x = c0 + threadIdx.x;
    unsigned long long v = 0;
    if (x < ntiles) {
      const unsigned ns = (unsigned)seg_count(tile_off, x, seg_rows);
      v = ((unsigned long long)ns << 32) | (ns > 1 ? ns : 0u);
    }
    unsigned long long ex, tot;
    Scan(tmp).ExclusiveSum(v, ex, tot);
    if (x <= ntiles) {
      item_off[x] = (int32_t)((carry + ex) >> 32);
      part_off[x] = (int32_t)((carry + ex) & 0xffffffffull);
    }
    carry += tot;
    __syncthreads();  // tmp is reused by the next chunk
  }
}

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

int key_bits(int64_t ntiles) {
  int bits = 1;
  while (bits < 32 && ((int64_t)1 << bits) <= ntiles) bits++;  // pad key = ntiles fits
  return bits;
}

}  // namespace

extern "C" int64_t nsa_cuda_inv_row_bound_blocks(int64_t n, int32_t bs, int64_t NT) {
  if (bs <= 0) return NT;
  const int64_t per = (bs % kT == 0) ? bs / kT : (bs + kT - 1) / kT + 1;
  const int64_t b = n * per;
  return b < NT ? b : NT;
}

extern "C" size_t nsa_cuda_inv_layout(int64_t rows, int64_t cap, int64_t ntiles,
                                      nsa_cuda_inv_layout_t *L) {
  size_t o = 0;
  L->cnt = o;
  o = align256(o + (size_t)(rows + 1) * 4);
  L->pair_off = o;
  o = align256(o + (size_t)(rows + 1) * 4);
  L->keys_in = o;
  o = align256(o + (size_t)cap * 4);
  L->vals_in = o;
  o = align256(o + (size_t)cap * 4);
  L->keys_out = o;
  o = align256(o + (size_t)cap * 4);
  L->vals_out = o;
  o = align256(o + (size_t)cap * 4);
  L->idx_in = o;
  o = align256(o + (size_t)cap * 4);
  L->rows_out = o;
  o = align256(o + (size_t)cap * 4);
  L->masks = o;
  o = align256(o + (size_t)cap * 8);
  L->masks_in = o;
  o = align256(o + (size_t)cap * 8);
  L->tile_off = o;
  o = align256(o + (size_t)(ntiles + 1) * 4);
  L->nseg = o;  // nitem [ntiles+1], then npart [ntiles+1]
  o = align256(o + (size_t)(ntiles + 1) * 8);
  L->item_off = o;
  o = align256(o + (size_t)(ntiles + 1) * 4);
  L->part_off = o;
  o = align256(o + (size_t)(ntiles + 1) * 4);
  size_t t1 = 0, t2 = 0, t3 = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, t1, (const int32_t *)nullptr, (int32_t *)nullptr, (int)(rows + 1));
  cub::DeviceScan::ExclusiveSum(nullptr, t2, (const int32_t *)nullptr, (int32_t *)nullptr, (int)(ntiles + 1));
  cub::DeviceRadixSort::SortPairs(nullptr, t3, (const unsigned *)nullptr, (unsigned *)nullptr,
                                  (const int32_t *)nullptr, (int32_t *)nullptr, (int)(cap > 0 ? cap : 1),
                                  0, key_bits(ntiles));
  size_t t = t1 > t2 ? t1 : t2;
  if (t3 > t) t = t3;
  L->temp = o;
  L->temp_bytes = t;
  o = align256(o + t);
  L->total = o;
  return o;
}

#define NSA_CK(x)                       \
  do {                                  \
    cudaError_t e_ = (x);               \
    if (e_ != cudaSuccess) return e_;   \
  } while (0)

extern "C" cudaError_t nsa_cuda_launch_invert_rows(const nsa_plan_t *plan, int64_t B, int64_t S, int64_t G,
                                                   int64_t NT, int64_t row0, int64_t rows, int64_t cap,
                                                   int seg_rows, const unsigned char *skip, void *ws,
                                                   const nsa_cuda_inv_layout_t *L, cudaStream_t st) {
  const int64_t ntiles = B * G * NT;
  if (row0 < 0 || rows < 0 || row0 + rows > B * S * G) return cudaErrorInvalidValue;
  if (row0 + rows + 1 > 0x7fffffff || cap > 0x7fffffff || ntiles + 1 > 0x7fffffff)
    return cudaErrorInvalidConfiguration;
  char *w = (char *)ws;
  int32_t *cnt = (int32_t *)(w + L->cnt), *pair_off = (int32_t *)(w + L->pair_off);
  unsigned *kin = (unsigned *)(w + L->keys_in), *kout = (unsigned *)(w + L->keys_out);
  int32_t *vin = (int32_t *)(w + L->vals_in), *vout = (int32_t *)(w + L->vals_out);
  int32_t *iin = (int32_t *)(w + L->idx_in), *rout = (int32_t *)(w + L->rows_out);
  int32_t *tile_off = (int32_t *)(w + L->tile_off);
  int32_t *nitem = (int32_t *)(w + L->nseg), *npart = nitem + (ntiles + 1);
  int32_t *item_off = (int32_t *)(w + L->item_off), *part_off = (int32_t *)(w + L->part_off);
  void *temp = w + L->temp;
  const int th = 256;
  const int2 *sp = (const int2 *)plan->spans;

  count_kernel<<<(unsigned)((rows + 1 + th - 1) / th), th, 0, st>>>(sp, plan->nspans, skip, row0, rows, plan->n, cnt);
  NSA_CK(cudaGetLastError());
  size_t tb = L->temp_bytes;
  NSA_CK(cub::DeviceScan::ExclusiveSum(temp, tb, cnt, pair_off, (int)(rows + 1), st));
  if (rows > 0) {  // also the pads and the sort's values
    write_kernel<<<(unsigned)((rows * 32 + th - 1) / th), th, 0, st>>>(
        sp, plan->nspans, skip, row0, rows, plan->n, S, G, NT, cap, pair_off, kin, vin,
        (unsigned long long *)(w + L->masks_in), (unsigned)ntiles, iin);
    NSA_CK(cudaGetLastError());
  } else if (cap > 0) {
    pad_kernel<<<(unsigned)((cap + th - 1) / th), th, 0, st>>>(pair_off, rows, cap, (unsigned)ntiles, kin, vin, iin);
    NSA_CK(cudaGetLastError());
  }
  if (cap > 0) {
    tb = L->temp_bytes;
    NSA_CK(cub::DeviceRadixSort::SortPairs(temp, tb, kin, kout, iin, vout, (int)cap, 0, key_bits(ntiles), st));
  }
  const bool fused_off = cap > 0 && ntiles <= cap;
  if (cap > 0) {  // also tile_off where fused_off
    mask_kernel<<<(unsigned)((cap + th - 1) / th), th, 0, st>>>(kout, vout, vin,
                                                                (const unsigned long long *)(w + L->masks_in),
                                                                row0, cap, (unsigned)ntiles, rout,
                                                                (unsigned long long *)(w + L->masks),
                                                                fused_off ? tile_off : nullptr);
    NSA_CK(cudaGetLastError());
  }
  if (!fused_off) {
    tile_off_kernel<<<(unsigned)((ntiles + 1 + th - 1) / th), th, 0, st>>>(kout, cap, ntiles, tile_off);
    NSA_CK(cudaGetLastError());
  }
  if (ntiles < kSegScanMax) {
    seg_scan_kernel<<<1, kSegScanThreads, 0, st>>>(tile_off, ntiles, seg_rows, item_off, part_off);
    return cudaGetLastError();
  }
  seg_kernel<<<(unsigned)((ntiles + 1 + th - 1) / th), th, 0, st>>>(tile_off, ntiles, seg_rows, nitem, npart);
  NSA_CK(cudaGetLastError());
  tb = L->temp_bytes;
  NSA_CK(cub::DeviceScan::ExclusiveSum(temp, tb, nitem, item_off, (int)(ntiles + 1), st));
  tb = L->temp_bytes;
  NSA_CK(cub::DeviceScan::ExclusiveSum(temp, tb, npart, part_off, (int)(ntiles + 1), st));
  return cudaSuccess;
}
