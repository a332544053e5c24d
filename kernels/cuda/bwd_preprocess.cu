// bwd_preprocess.cu — the backward's per-(row, head) scalars.
//
//   delta[r*h + j] = sum_d do[b][t][g*h+j][d] * o[b][t][g*h+j][d]   (f32)
//   lsec [r*h + j] = lse[b][t][g*h+j]
// r = ((b*S)+t)*G+g. delta is FlashAttention-2's D: dS = P ∘ (dP − D).
// lse is copied to a contiguous array so the dq and dk/dv kernels, which read
// it once per (row, head) per key tile, need no strided gathers.
// One warp per (row, head); fixed reduction order (deterministic).
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

}  // namespace

extern "C" cudaError_t nsa_cuda_launch_bwd_preprocess(const nsa_cuda_bwd_t *a, nsa_dtype_t dt,
                                                      float *delta, float *lsec, cudaStream_t st) {
  const int64_t pairs = a->B * a->S * a->G * a->h;
  if (pairs == 0) return cudaSuccess;
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
