// simple_fwd.cu — generic varlen forward: any dtype, any strides, Dk, Dv <= 256.
//
// The f32 parity path, and the fallback for bf16/f16 tensors whose rows are
// not 16-byte aligned (the tensor-core kernel needs cp.async 16-byte loads).
// One warp per (row r, head j): lane i scores key (chunk + i) of the row's
// merged spans (a full Dk dot product per lane), the warp does the online
// softmax over 32 keys at a time, then each lane accumulates Dv/32 output
// columns with the broadcast probabilities. f32 accumulation, accurate expf,
// fixed reduction order (deterministic). Reads K/V in place through the plan.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_internal.h"

namespace {

template <typename T> __device__ __forceinline__ float ld(const T *p);
template <> __device__ __forceinline__ float ld<float>(const float *p) { return __ldg(p); }
template <> __device__ __forceinline__ float ld<__half>(const __half *p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16 *p) {
  return __bfloat162float(*p);
}
template <typename T> __device__ __forceinline__ void st(T *p, float x);
template <> __device__ __forceinline__ void st<float>(float *p, float x) { *p = x; }
template <> __device__ __forceinline__ void st<__half>(__half *p, float x) { *p = __float2half_rn(x); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16 *p, float x) {
  *p = __float2bfloat16_rn(x);
}

constexpr int kWarps = 4;
constexpr int kMaxD = NSA_CUDA_SIMPLE_MAX_D;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    fwd_simple_kernel(nsa_cuda_attn_t a, const int2 *__restrict__ spans, const int32_t *__restrict__ nspans) {
  __shared__ float sq[kWarps][kMaxD];
  const bool bad = a.invalid != nullptr && *a.invalid > 0;  // sync=0 only: write NaN
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pair = (int64_t)blockIdx.x * kWarps + warp;
  const int64_t rows = a.B * a.S * a.G;
  if (pair >= rows * a.h) return;  // warp-uniform; no block barrier below
  const int64_t r = pair / a.h, j = pair % a.h;
  const int64_t g = r % a.G, t = (r / a.G) % a.S, b = r / (a.G * a.S);
  const int64_t head = g * a.h + j;

  const T *q = reinterpret_cast<const T *>(a.q) + b * a.qs[0] + t * a.qs[1] + head * a.qs[2];
  for (int d = lane; d < a.Dk; d += 32) sq[warp][d] = ld(q + d * a.qs[3]);
  __syncwarp();

  const T *kb = reinterpret_cast<const T *>(a.k) + b * a.ks[0] + g * a.ks[2];
  const T *vb = reinterpret_cast<const T *>(a.v) + b * a.vs[0] + g * a.vs[2];
  float m = -INFINITY, l = 0.f;
  float acc[kMaxD / 32];
#pragma unroll
  for (int i = 0; i < kMaxD / 32; i++) acc[i] = 0.f;

  const int nsp = bad ? 0 : nspans[r];
  const int2 *row = spans + r * a.n;
  for (int si = 0; si < nsp; si++) {
    const int2 sp = row[si];
    for (int base = sp.x; base < sp.y; base += 32) {
      const int tok = base + lane;
      const bool valid = tok < sp.y;
      float x = -INFINITY;
      if (valid) {
        const T *kr = kb + (int64_t)tok * a.ks[1];
        float dot = 0.f;
        for (int d = 0; d < a.Dk; d++) dot = fmaf(sq[warp][d], ld(kr + d * a.ks[3]), dot);
        x = dot * a.scale;
      }
      float cm = x;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
      const float mnew = fmaxf(m, cm);  // finite: lane 0 is always valid
      const float alpha = expf(m - mnew);
      const float p = valid ? expf(x - mnew) : 0.f;
      float ps = p;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
      l = l * alpha + ps;
#pragma unroll
      for (int i = 0; i < kMaxD / 32; i++) acc[i] *= alpha;
      const int cnt = min(32, sp.y - base);
      for (int kk = 0; kk < cnt; kk++) {
        const float pk = __shfl_sync(0xffffffffu, p, kk);
        const T *vr = vb + (int64_t)(base + kk) * a.vs[1];
#pragma unroll
        for (int i = 0; i < kMaxD / 32; i++) {
          const int d = lane + 32 * i;
          if (d < a.Dv) acc[i] = fmaf(pk, ld(vr + d * a.vs[3]), acc[i]);
        }
      }
      m = mnew;
    }
  }
  T *o = reinterpret_cast<T *>(a.o) + b * a.os[0] + t * a.os[1] + head * a.os[2];
  const float inv = bad ? NAN : (l > 0.f ? 1.f / l : 0.f);
#pragma unroll
  for (int i = 0; i < kMaxD / 32; i++) {
    const int d = lane + 32 * i;
    if (d < a.Dv) st(o + d * a.os[3], acc[i] * inv);
  }
  if (a.lse != nullptr && lane == 0)
    a.lse[b * a.ls[0] + t * a.ls[1] + head * a.ls[2]] = bad ? NAN : (l > 0.f ? m + logf(l) : -INFINITY);
}

}  // namespace

extern "C" cudaError_t nsa_cuda_launch_fwd_simple(const nsa_cuda_attn_t *a, nsa_dtype_t dt,
                                                  const nsa_plan_t *plan, cudaStream_t st) {
  if (a->Dk > kMaxD || a->Dv > kMaxD) return cudaErrorInvalidValue;
  const int64_t pairs = a->B * a->S * a->G * a->h;
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int2 *sp = (const int2 *)plan->spans;
  switch (dt) {
    case NSA_F32: fwd_simple_kernel<float><<<(unsigned)blocks, kWarps * 32, 0, st>>>(*a, sp, plan->nspans); break;
    case NSA_F16: fwd_simple_kernel<__half><<<(unsigned)blocks, kWarps * 32, 0, st>>>(*a, sp, plan->nspans); break;
    case NSA_BF16:
      fwd_simple_kernel<__nv_bfloat16><<<(unsigned)blocks, kWarps * 32, 0, st>>>(*a, sp, plan->nspans);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
