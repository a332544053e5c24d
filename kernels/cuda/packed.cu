// packed.cu — the `packed` path (DESIGN.md §3): rows in length buckets, each
// row's keys gathered into a padded slot of the workspace.
//
// Buckets (the CPU packed path's scheme): a row of length L > 0 goes to the
// smallest bucket b with Lpad_b = 16 << b >= L — 16, 32 and 64 are the dense
// fallback buckets for short rows, then powers of two; empty rows go to none.
// NSA_CUDA_PK_NB = 28 buckets cover every L < 2^31.
//
// Workspace index map (one "slot" = one key: Dk elements of kp, Dv of vp):
//   cnt_b   = rows in bucket b                       (summary->pk_cnt[b])
//   base_b  = sum_{b' < b} cnt_b' * Lpad_b'          (bucket b's region)
//   rank_r  = rows r' < r in the same bucket as r    (rows of a bucket in row order)
//   slot_r  = base_b + rank_r * Lpad_b               (row r's padded slot)
//   kp[(slot_r + i) * Dk + d] = k[b][key_i][g][d],  vp[(slot_r + i) * Dv + d] = v[b][key_i][g][d]
//   for i < L (key_i = the row's i-th key in span order). Slots slot_r + L ..
//   slot_r + Lpad_b - 1 are padding: never written, never read.
// Total slots = sum_b cnt_b * Lpad_b (nsa_cuda_pack_slots); the host reads
// cnt_b from the summary it already copies for the packed path.
//
// Synthetic plan (n = 1) over slot positions: spans[r] = {slot_r, slot_r + L},
// nspans[r] = (L > 0), row_len[r] = L, row_off = the original plan's. The
// verified attention kernels (forward and the backward's dq) then read the
// padded rows through it with K/V strides {0, Dk, 0, 1} / {0, Dv, 0, 1}, so
// "dense attention per bucket" is the varlen kernel over equal-length slots.
//
// Device flow, no host loop and no host read (nsa_cuda_launch_pack):
//   keys kernel:  key[r] = bucket of r (NB for an empty row), val[r] = r
//   CUB DeviceRadixSort::SortPairs on 5 key bits — stable, so the sorted rows
//                 are ordered by (bucket, row index): sorted position i of
//                 bucket b has rank i - start_b, start_b = sum_{b' < b} cnt_b'
//   slots kernel: writes the synthetic plan from (i, order[i], key[i])
//   gather:       one CTA per row copies its spans into its slot (16-byte
//                 loads when K/V rows allow it, else element by element).
#include <cub/device/device_radix_sort.cuh>

#include "cuda_internal.h"

namespace {

constexpr int kNB = NSA_CUDA_PK_NB;
constexpr int kKeyBits = 5;  // keys 0..kNB (kNB = empty) fit in 5 bits
static_assert(kNB < (1 << kKeyBits), "bucket keys must fit the sorted bits");

size_t a256(size_t x) { return (x + 255) & ~(size_t)255; }

// Smallest b with (16 << b) >= len, for len >= 1.
__device__ __forceinline__ int pk_bucket(int len) {
  return len <= 16 ? 0 : (32 - __clz(len - 1)) - 4;
}

__global__ void pack_hist_kernel(const int32_t *__restrict__ row_len, int64_t rows,
                                 nsa_cuda_summary_t *__restrict__ sum) {
  __shared__ unsigned int h[kNB];
  for (int i = threadIdx.x; i < kNB; i += blockDim.x) h[i] = 0;
  __syncthreads();
  for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < rows;
       r += (int64_t)gridDim.x * blockDim.x) {
    const int len = row_len[r];
    if (len > 0) atomicAdd(&h[pk_bucket(len)], 1u);
  }
  __syncthreads();
  // Integer sums: the counts are deterministic whatever the atomics' order.
  for (int i = threadIdx.x; i < kNB; i += blockDim.x)
    if (h[i]) atomicAdd((unsigned long long *)&sum->pk_cnt[i], (unsigned long long)h[i]);
}

__global__ void pack_keys_kernel(const int32_t *__restrict__ row_len, int64_t rows,
                                 uint8_t *__restrict__ key, int32_t *__restrict__ val) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int len = row_len[r];
  key[r] = (uint8_t)(len > 0 ? pk_bucket(len) : kNB);
  val[r] = (int32_t)r;  // the caller checked rows < 2^31
}

// i = sorted position; order[i] = row; key[i] = its bucket (kNB: empty row,
// sorted last). Every row appears once, so every row's plan entry is written.
__global__ void pack_slots_kernel(const uint8_t *__restrict__ key, const int32_t *__restrict__ order,
                                  const int32_t *__restrict__ row_len, int64_t rows,
                                  const long long *__restrict__ cnt, int64_t slots,
                                  int2 *__restrict__ pspans,
                                  int32_t *__restrict__ pnsp, int32_t *__restrict__ plen) {
  __shared__ long long s_start[kNB], s_base[kNB];
  if (threadIdx.x == 0) {
    long long st = 0, ba = 0;
    for (int b = 0; b < kNB; b++) {
      s_start[b] = st;
      s_base[b] = ba;
      st += cnt[b];
      ba += cnt[b] * (16LL << b);
    }
  }
  __syncthreads();
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const int b = key[i];
  const int r = order[i];
  if (b >= kNB) {
    pspans[r] = make_int2(0, 0);
    pnsp[r] = 0;
    plen[r] = 0;
    return;
  }
  const int len = row_len[r];
  // < 2^31: the host checked slots = sum_b cnt_b * Lpad_b < 2^31 on these counts.
  const long long slot = s_base[b] + (i - s_start[b]) * (16LL << b);
  if (slot < 0 || slot + (16LL << b) > slots) {  // counts inconsistent with the plan:
    pspans[r] = make_int2(0, 0);                 // never write outside the workspace
    pnsp[r] = 0;
    plen[r] = 0;
    return;
  }
  pspans[r] = make_int2((int)slot, (int)(slot + len));
  pnsp[r] = 1;
  plen[r] = len;
}

// Strides (and row widths) in units of U.
struct UStr {
  int64_t s0, s1, s2, s3;
};

// One CTA per row r = ((b*S)+t)*G+g: its spans (the original plan, token
// order) are copied to slots slot_r, slot_r + 1, ... Consecutive threads take
// consecutive units of one key row (coalesced).
template <typename U>
__global__ void gather_kernel(const int2 *__restrict__ spans, const int32_t *__restrict__ nspans,
                              int64_t n, const int2 *__restrict__ pspans,
                              const int32_t *__restrict__ pnsp, int64_t S, int64_t G,
                              const U *__restrict__ k, const U *__restrict__ v, UStr ks, UStr vs,
                              int64_t Dk, int64_t Dv, U *__restrict__ kp, U *__restrict__ vp) {
  const int64_t r = blockIdx.x;
  const int64_t g = r % G, b = r / (G * S);
  const int nsp = pnsp[r] ? nspans[r] : 0;  // pnsp[r] == 0: empty row (or no slot)
  int64_t pos = pspans[r].x;  // slot_r (written by pack_slots_kernel)
  const U *kb = k + b * ks.s0 + g * ks.s2;
  const U *vb = v + b * vs.s0 + g * vs.s2;
  for (int si = 0; si < nsp; si++) {
    const int2 sp = spans[r * n + si];
    const int64_t len = sp.y - sp.x;
    for (int64_t e = threadIdx.x; e < len * Dk; e += blockDim.x) {
      const int64_t i = e / Dk, d = e % Dk;
      kp[(pos + i) * Dk + d] = kb[(sp.x + i) * ks.s1 + d * ks.s3];
    }
    for (int64_t e = threadIdx.x; e < len * Dv; e += blockDim.x) {
      const int64_t i = e / Dv, d = e % Dv;
      vp[(pos + i) * Dv + d] = vb[(sp.x + i) * vs.s1 + d * vs.s3];
    }
    pos += len;
  }
}

// div = elements per unit: 1 (element copy, any strides) or 16 / es (16-byte
// units: only where vec16_ok, so stride[3] == 1 and the unit stride is 1).
UStr ustr(const nsa_tensor_t *t, int64_t div) {
  return UStr{t->stride[0] / div, t->stride[1] / div, t->stride[2] / div, div == 1 ? t->stride[3] : 1};
}

// 16-byte units possible: contiguous rows of a multiple of 16 bytes, every
// stride and the base 16-byte aligned (kp / vp are 256-byte aligned).
int vec16_ok(const nsa_tensor_t *t, int64_t D, size_t es) {
  if (((uintptr_t)t->data & 15) != 0 || t->stride[3] != 1 || (D * (int64_t)es) % 16 != 0) return 0;
  for (int i = 0; i < 3; i++)
    if ((t->stride[i] * (int64_t)es) % 16 != 0) return 0;
  return 1;
}

int sort_temp_bytes(int64_t rows, size_t *bytes) {
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, (const uint8_t *)nullptr, (uint8_t *)nullptr,
                                         (const int32_t *)nullptr, (int32_t *)nullptr, (int)rows, 0,
                                         kKeyBits) == cudaSuccess;
}

}  // namespace

extern "C" long long nsa_cuda_pack_slots(const long long *cnt) {
  long long s = 0;
  for (int b = 0; b < kNB; b++) s += cnt[b] * (16LL << b);
  return s;
}

extern "C" size_t nsa_cuda_pack_scratch_bytes(int64_t rows) {
  if (rows <= 0 || rows > 0x7fffffff) return 256;
  size_t tb = 0;
  sort_temp_bytes(rows, &tb);
  return 2 * a256((size_t)rows) + 2 * a256((size_t)rows * 4) + a256(tb);
}

extern "C" cudaError_t nsa_cuda_launch_pack_hist(const nsa_plan_t *plan, nsa_cuda_summary_t *summary,
                                                 cudaStream_t st) {
  cudaError_t e = cudaMemsetAsync(summary->pk_cnt, 0, sizeof(summary->pk_cnt), st);
  if (e != cudaSuccess || plan->rows == 0) return e;
  int64_t blocks = (plan->rows + 255) / 256;
  if (blocks > 1024) blocks = 1024;  // grid-stride beyond
  pack_hist_kernel<<<(unsigned)blocks, 256, 0, st>>>(plan->row_len, plan->rows, summary);
  return cudaGetLastError();
}

extern "C" cudaError_t nsa_cuda_launch_pack(const nsa_plan_t *plan, const nsa_cuda_summary_t *summary,
                                            int64_t B, int64_t S, int64_t G, const nsa_tensor_t *k,
                                            const nsa_tensor_t *v, int64_t Dk, int64_t Dv, void *scratch,
                                            size_t scratch_bytes, void *kp, void *vp, int64_t slots,
                                            nsa_plan_t *pplan, cudaStream_t st) {
  const int64_t rows = B * S * G;
  if (rows == 0) return cudaMemsetAsync(pplan->row_off, 0, sizeof(int64_t), st);
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t e = cudaMemcpyAsync(pplan->row_off, plan->row_off, (size_t)(rows + 1) * sizeof(int64_t),
                                  cudaMemcpyDeviceToDevice, st);
  if (e != cudaSuccess) return e;

  // Scratch: key_in[rows] u8 | key_out[rows] u8 | val_in[rows] i32 | val_out[rows] i32 | sort temp.
  size_t tb = 0;
  if (!sort_temp_bytes(rows, &tb)) return cudaErrorInvalidValue;
  char *s = (char *)scratch;
  uint8_t *key_in = (uint8_t *)s;
  uint8_t *key_out = (uint8_t *)(s + a256((size_t)rows));
  int32_t *val_in = (int32_t *)(s + 2 * a256((size_t)rows));
  int32_t *val_out = (int32_t *)(s + 2 * a256((size_t)rows) + a256((size_t)rows * 4));
  void *temp = s + 2 * a256((size_t)rows) + 2 * a256((size_t)rows * 4);
  if (2 * a256((size_t)rows) + 2 * a256((size_t)rows * 4) + tb > scratch_bytes) return cudaErrorInvalidValue;

  const unsigned blocks = (unsigned)((rows + 255) / 256);
  pack_keys_kernel<<<blocks, 256, 0, st>>>(plan->row_len, rows, key_in, val_in);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  e = cub::DeviceRadixSort::SortPairs(temp, tb, (const uint8_t *)key_in, key_out, (const int32_t *)val_in,
                                      val_out, (int)rows, 0, kKeyBits, st);
  if (e != cudaSuccess) return e;
  const int2 *pspans = (const int2 *)pplan->spans;
  pack_slots_kernel<<<blocks, 256, 0, st>>>(key_out, val_out, plan->row_len, rows, summary->pk_cnt,
                                            slots, (int2 *)pplan->spans, pplan->nspans, pplan->row_len);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;

  const int2 *sp = (const int2 *)plan->spans;
  const size_t es = nsa_dtype_size(k->dtype);
  if (vec16_ok(k, Dk, es) && vec16_ok(v, Dv, es)) {
    const int64_t du = 16 / (int64_t)es;  // elements per 16-byte unit
    gather_kernel<uint4><<<(unsigned)rows, 256, 0, st>>>(
        sp, plan->nspans, plan->n, pspans, pplan->nspans, S, G, (const uint4 *)k->data,
        (const uint4 *)v->data, ustr(k, du), ustr(v, du), Dk / du, Dv / du, (uint4 *)kp, (uint4 *)vp);
  } else if (es == 2) {
    gather_kernel<uint16_t><<<(unsigned)rows, 256, 0, st>>>(
        sp, plan->nspans, plan->n, pspans, pplan->nspans, S, G, (const uint16_t *)k->data,
        (const uint16_t *)v->data, ustr(k, 1), ustr(v, 1), Dk, Dv, (uint16_t *)kp, (uint16_t *)vp);
  } else {
    gather_kernel<uint32_t><<<(unsigned)rows, 256, 0, st>>>(
        sp, plan->nspans, plan->n, pspans, pplan->nspans, S, G, (const uint32_t *)k->data,
        (const uint32_t *)v->data, ustr(k, 1), ustr(v, 1), Dk, Dv, (uint32_t *)kp, (uint32_t *)vp);
  }
  return cudaGetLastError();
}
