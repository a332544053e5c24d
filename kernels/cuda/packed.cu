// packed.cu — the `packed` path's gather (DESIGN.md §3).
//
// Copies every row's keys into contiguous workspace buffers
//   kp[row_off[r] + i][0..Dk)   vp[row_off[r] + i][0..Dv)   i < row_len[r]
// (the seed's approach, kept as the MIN_L bypass and the varlen-off path),
// and writes a synthetic one-span-per-row plan over packed positions, so the
// same attention kernels then read the packed rows densely.
#include "cuda_internal.h"

namespace {

// One block per row; element-wise copy (any strides, 2- or 4-byte elements).
template <typename E>
__global__ void gather_kernel(const int2 *__restrict__ spans, const int32_t *__restrict__ nspans,
                              const int64_t *__restrict__ row_off, int64_t S, int64_t G, int64_t n,
                              const E *__restrict__ k, const E *__restrict__ v, nsa_tensor_t kt,
                              nsa_tensor_t vt, int64_t Dk, int64_t Dv, E *__restrict__ kp,
                              E *__restrict__ vp) {
  const int64_t r = blockIdx.x;
  const int64_t g = r % G, b = r / (G * S);
  const int nsp = nspans[r];
  int64_t pos = row_off[r];
  const E *kb = k + b * kt.stride[0] + g * kt.stride[2];
  const E *vb = v + b * vt.stride[0] + g * vt.stride[2];
  for (int si = 0; si < nsp; si++) {
    const int2 sp = spans[r * n + si];
    const int64_t len = sp.y - sp.x;
    for (int64_t e = threadIdx.x; e < len * Dk; e += blockDim.x) {
      const int64_t i = e / Dk, d = e % Dk;
      kp[(pos + i) * Dk + d] = kb[(sp.x + i) * kt.stride[1] + d * kt.stride[3]];
    }
    for (int64_t e = threadIdx.x; e < len * Dv; e += blockDim.x) {
      const int64_t i = e / Dv, d = e % Dv;
      vp[(pos + i) * Dv + d] = vb[(sp.x + i) * vt.stride[1] + d * vt.stride[3]];
    }
    pos += len;
  }
}

__global__ void packed_plan_kernel(const int64_t *__restrict__ row_off, const int32_t *__restrict__ row_len,
                                   int64_t rows, int2 *__restrict__ pspans, int32_t *__restrict__ pnsp,
                                   int32_t *__restrict__ plen, int64_t *__restrict__ poff) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r > rows) return;
  poff[r] = row_off[r];
  if (r == rows) return;
  const int len = row_len[r];
  const int off = (int)row_off[r];  // the caller checked total < 2^31
  pspans[r] = len > 0 ? make_int2(off, off + len) : make_int2(0, 0);
  pnsp[r] = len > 0 ? 1 : 0;
  plen[r] = len;
}

}  // namespace

extern "C" cudaError_t nsa_cuda_launch_pack(const nsa_plan_t *plan, int64_t B, int64_t S, int64_t G,
                                            const nsa_tensor_t *k, const nsa_tensor_t *v, int64_t Dk,
                                            int64_t Dv, void *kp, void *vp, nsa_plan_t *pplan,
                                            cudaStream_t st) {
  const int64_t rows = B * S * G;
  if (rows == 0) return cudaMemsetAsync(pplan->row_off, 0, sizeof(int64_t), st);
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int2 *sp = (const int2 *)plan->spans;
  if (nsa_dtype_size(k->dtype) == 2)
    gather_kernel<uint16_t><<<(unsigned)rows, 256, 0, st>>>(
        sp, plan->nspans, plan->row_off, S, G, plan->n, (const uint16_t *)k->data,
        (const uint16_t *)v->data, *k, *v, Dk, Dv, (uint16_t *)kp, (uint16_t *)vp);
  else
    gather_kernel<uint32_t><<<(unsigned)rows, 256, 0, st>>>(
        sp, plan->nspans, plan->row_off, S, G, plan->n, (const uint32_t *)k->data,
        (const uint32_t *)v->data, *k, *v, Dk, Dv, (uint32_t *)kp, (uint32_t *)vp);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t blocks = (rows + 1 + 255) / 256;
  packed_plan_kernel<<<(unsigned)blocks, 256, 0, st>>>(plan->row_off, plan->row_len, rows,
                                                       (int2 *)pplan->spans, pplan->nspans,
                                                       pplan->row_len, pplan->row_off);
  return cudaGetLastError();
}
