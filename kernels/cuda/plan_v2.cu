// plan_v2.cu — the v2 planner on the device (DESIGN.md §3, sel_attn.h "plan").
//
// One thread per row r = ((b*S)+t)*G+g:
//   load the row's n selection slots, validate (count bad entries), turn each
//   into a token span, clip to [0, min(p(t)+1, Skv)), insertion-sort by start
//   in place inside the row's own plan slots, merge overlapping/touching spans,
//   zero the unused slots, write nspans and row_len.
// Then an exclusive scan (CUB) of the lengths into row_off (i64, rows+1).
// Max length, total, invalid count and the length histogram are integer
// atomics into a device summary, so every value is deterministic.
// No host loop, no host synchronization: the whole planner is capturable.
#include <cub/device/device_scan.cuh>

#include "cuda_internal.h"

namespace {

struct HistBounds {
  long long le[NSA_LEN_HIST_BUCKETS - 1];
};

// Slot i of row (b,t,g) as a token span in int64 (no overflow for any i32
// input). Returns 0 = unused, 1 = span, -1 = invalid.
__device__ __forceinline__ int load_slot(const nsa_cuda_selview_t &s, int64_t b, int64_t t,
                                         int64_t g, int64_t i, int64_t nblk, long long *lo,
                                         long long *hi) {
  const int32_t *p = s.data + b * s.st[0] + t * s.st[1] + g * s.st[2] + i * s.st[3];
  if (s.kind == NSA_SEL_BLOCK_INDICES) {
    int32_t id = __ldg(p);
    if (id == -1) return 0;
    if (id < -1 || (int64_t)id >= nblk) return -1;
    *lo = (long long)id * s.block_size;
    *hi = *lo + s.block_size;
    return 1;
  }
  int32_t a = __ldg(p), e = __ldg(p + s.st[4]);
  if (a == 0 && e == 0) return 0;
  if (a < 0 || a > e) return -1;
  *lo = a;
  *hi = e;
  return 1;
}

__global__ void plan_rows_kernel(nsa_cuda_selview_t sel, int64_t B, int64_t S, int64_t Skv,
                                 int64_t G, int64_t n, int2 *__restrict__ spans,
                                 int32_t *__restrict__ nspans, int32_t *__restrict__ row_len,
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
    long long limit = (long long)t + (Skv - S) + 1;  // p(t) + 1
    if (limit > Skv) limit = Skv;
    if (limit < 0) limit = 0;
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

    int bk = NSA_LEN_HIST_BUCKETS - 1;
    for (int i = 0; i < NSA_LEN_HIST_BUCKETS - 1; i++)
      if ((long long)len <= hb.le[i]) {
        bk = i;
        break;
      }
    atomicAdd(&s_hist[bk], 1ull);
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
                                               void *temp, size_t temp_bytes, cudaStream_t st) {
  const int64_t rows = B * S * G;
  cudaError_t e = cudaMemsetAsync(summary, 0, sizeof(*summary), st);
  if (e != cudaSuccess) return e;
  if (rows == 0) return cudaMemsetAsync(plan->row_off, 0, sizeof(int64_t), st);
  HistBounds hb;
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS - 1; i++) hb.le[i] = nsa_len_hist_le[i];
  const int threads = 128;
  const int64_t blocks = (rows + threads - 1) / threads;
  plan_rows_kernel<<<(unsigned)blocks, threads, 0, st>>>(*sel, B, S, Skv, G, n, (int2 *)plan->spans,
                                                         plan->nspans, plan->row_len, len64,
                                                         summary, hb);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  size_t tb = temp_bytes;
  return cub::DeviceScan::ExclusiveSum(temp, tb, (const int64_t *)len64, plan->row_off,
                                       (int64_t)(rows + 1), st);
}
