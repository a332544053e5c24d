// bwd_preprocess.cu — the backward's per-(row, head) scalars.
//
//   delta[r*h + j] = sum_d do[b][t][g*h+j][d] * o[b][t][g*h+j][d]   (f32)
//   lsec [r*h + j] = lse[b][t][g*h+j]
// r = ((b*S)+t)*G+g. delta is FlashAttention-2's D: dS = P ∘ (dP − D).
// lse is copied to a contiguous array so the dq and dk/dv kernels, which read
// it once per (row, head) per key tile, need no strided gathers.
// One warp per (row, head), or L = Dv/8 lanes with 16-byte loads where the
// layout allows (below); fixed reduction order (deterministic).
#include <stdint.h>
#include <stdlib.h>

#include "bwd_common.cuh"

namespace {

template <typename T>
__global__ void __launch_bounds__(128) bwd_pre_kernel(nsa_cuda_bwd_t a, float *__restrict__ delta,
                                                      float *__restrict__ lsec) {
  const int lane = threadIdx.x & 31;
  const int64_t pair = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int64_t rows = a.B * a.S * a.G;
  if (pair >= rows * a.h) return;
  const int64_t r = pair / a.h, j = pair % a.h;
  const int64_t g = r % a.G, t = (r / a.G) % a.S, b = r / (a.G * a.S);
  const int64_t head = g * a.h + j;
  const T *o = reinterpret_cast<const T *>(a.o) + b * a.os[0] + t * a.os[1] + head * a.os[2];
  const T *dout = reinterpret_cast<const T *>(a.dout) + b * a.dos[0] + t * a.dos[1] + head * a.dos[2];
  float s = 0.f;
  for (int64_t d = lane; d < a.Dv; d += 32) s = fmaf(nsa_bwd::ld(o + d * a.os[3]), nsa_bwd::ld(dout + d * a.dos[3]), s);
#pragma unroll
  for (int w = 16; w > 0; w >>= 1) s += __shfl_xor_sync(0xffffffffu, s, w);
  if (lane == 0) {
    delta[pair] = s;
    lsec[pair] = __ldg(a.lse + b * a.ls[0] + t * a.ls[1] + head * a.ls[2]);
  }
}

// 16-bit inputs with unit inner strides and 16-byte aligned rows (the
// usual layout): L = Dv / 8 lanes per (row, head), one 16-byte load of o and
// of do per lane (nsa_bwd::dot8), a shuffle reduction over the L lanes. The
// warp-per-pair kernel above issued 2-byte loads with 64-bit index math per
// element and ran at about a third of the copy rate (T = 64k, h = 8: 1.1 ms
// for 1.07 GB). The row-block dq computes the same delta in its own kernel
// (fwd_rows.cu), bitwise equal.

template <typename T, int DV>
__global__ void __launch_bounds__(128) bwd_pre_vec_kernel(nsa_cuda_bwd_t a, float *__restrict__ delta,
                                                          float *__restrict__ lsec) {
  constexpr int L = DV / 8;  // lanes per (row, head): a power of two <= 32, so a warp holds whole pairs
  const int64_t pair = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / L;
  const int sub = threadIdx.x & (L - 1);
  const bool live = pair < a.B * a.S * a.G * a.h;  // uniform over the pair's L lanes
  float s = 0.f;
  int64_t b = 0, t = 0, head = 0;
  if (live) {
    const int64_t r = pair / a.h, j = pair % a.h;
    const int64_t g = r % a.G;
    t = (r / a.G) % a.S, b = r / (a.G * a.S), head = g * a.h + j;
    const uint4 ov = __ldg(reinterpret_cast<const uint4 *>(reinterpret_cast<const T *>(a.o) + b * a.os[0] + t * a.os[1] +
                                                           head * a.os[2]) + sub);
    const uint4 dv = __ldg(reinterpret_cast<const uint4 *>(reinterpret_cast<const T *>(a.dout) + b * a.dos[0] +
                                                           t * a.dos[1] + head * a.dos[2]) + sub);
    s = nsa_bwd::dot8<T>(ov, dv);
  }
#pragma unroll
  for (int w = L / 2; w > 0; w >>= 1) s += __shfl_xor_sync(0xffffffffu, s, w);
  if (live && sub == 0) {
    delta[pair] = s;
    lsec[pair] = __ldg(a.lse + b * a.ls[0] + t * a.ls[1] + head * a.ls[2]);
  }
}

}  // namespace

extern "C" int nsa_cuda_bwd_pre_vec_ok(const nsa_cuda_bwd_t *a) {
  if (!(a->Dv == 64 || a->Dv == 128 || a->Dv == 256) || a->os[3] != 1 || a->dos[3] != 1) return 0;
  if ((((uintptr_t)a->o) | ((uintptr_t)a->dout)) & 15) return 0;
  for (int i = 0; i < 3; i++)
    if (a->os[i] % 8 != 0 || a->dos[i] % 8 != 0) return 0;
  return getenv("NSA_BWD_PRE_GENERIC") == nullptr;  // env: A/B runs
}

namespace {

template <typename T>
cudaError_t launch_vec(const nsa_cuda_bwd_t *a, float *delta, float *lsec, int64_t pairs, cudaStream_t st) {
  const int64_t blocks = (pairs * (a->Dv / 8) + 127) / 128;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (a->Dv) {
    case 64: bwd_pre_vec_kernel<T, 64><<<(unsigned)blocks, 128, 0, st>>>(*a, delta, lsec); break;
    case 128: bwd_pre_vec_kernel<T, 128><<<(unsigned)blocks, 128, 0, st>>>(*a, delta, lsec); break;
    default: bwd_pre_vec_kernel<T, 256><<<(unsigned)blocks, 128, 0, st>>>(*a, delta, lsec); break;
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t nsa_cuda_launch_bwd_preprocess(const nsa_cuda_bwd_t *a, nsa_dtype_t dt,
                                                      float *delta, float *lsec, cudaStream_t st) {
  const int64_t pairs = a->B * a->S * a->G * a->h;
  if (pairs == 0) return cudaSuccess;
  if (nsa_cuda_bwd_pre_vec_ok(a)) {
    if (dt == NSA_BF16) return launch_vec<__nv_bfloat16>(a, delta, lsec, pairs, st);
    if (dt == NSA_F16) return launch_vec<__half>(a, delta, lsec, pairs, st);
  }
  const int64_t blocks = (pairs * 32 + 127) / 128;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dt) {
    case NSA_F32: bwd_pre_kernel<float><<<(unsigned)blocks, 128, 0, st>>>(*a, delta, lsec); break;
    case NSA_F16: bwd_pre_kernel<__half><<<(unsigned)blocks, 128, 0, st>>>(*a, delta, lsec); break;
    case NSA_BF16: bwd_pre_kernel<__nv_bfloat16><<<(unsigned)blocks, 128, 0, st>>>(*a, delta, lsec); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
