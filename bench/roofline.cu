// roofline.cu — the GPU's measured ceilings for docs/PERF.md's "what limits
// it" analysis (issue 7): nsa_bench_roofline prints
//   hbm_copy_GBps   : read + write bytes / time of a 2 x 2 GiB copy kernel
//                     (16-byte loads/stores; larger than L2, so HBM-bound)
//   l2_read_GBps    : bytes / time of 132*8 CTAs re-reading a 16 MiB buffer
//                     (fits the 50 MB L2) many times
//   mma_bf16_TFLOPs : m16n8k16 bf16 mma.sync issued back to back from
//                     registers (8 independent accumulators per warp), the
//                     instruction the project's kernels use
// Median of 5 timed runs after a warm-up, CUDA events. No inputs beyond the
// device; prints "no CUDA device" and exits 0 without one.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)

__global__ void copy_kernel(const int4 *__restrict__ src, int4 *__restrict__ dst, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dst[i] = src[i];
}

// Each CTA reads the whole buffer `iters` times (offset by its id so CTAs do
// not march in lockstep); the xor keeps the loads alive.
__global__ void l2_read_kernel(const int4 *__restrict__ src, size_t n, int iters, int *__restrict__ sink) {
  int acc = 0;
  const size_t off = ((size_t)blockIdx.x * 4096) % n;
  for (int it = 0; it < iters; it++)
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
      size_t k = i + off;
      if (k >= n) k -= n;
      const int4 v = __ldcg(src + k);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  if (acc == 0x7fffffff) *sink = acc;  // practically never; defeats dead-code elimination
}

__global__ void mma_kernel(int iters, float *__restrict__ sink) {
  unsigned a[4] = {0x3f803f80u ^ threadIdx.x, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
  unsigned b0 = 0x3c003c00u ^ threadIdx.x, b1 = 0x3c003c00u;
  float c[8][4] = {};
  for (int it = 0; it < iters; it++)
#pragma unroll
    for (int k = 0; k < 8; k++)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[k][0]), "+f"(c[k][1]), "+f"(c[k][2]), "+f"(c[k][3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  float s = 0.f;
  for (int k = 0; k < 8; k++) s += c[k][0] + c[k][1] + c[k][2] + c[k][3];
  if (s == 1234.5f) *sink = s;
}

template <typename F> static float median_ms(F launch) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  launch();  // warm-up
  std::vector<float> t;
  for (int r = 0; r < 5; r++) {
    cudaEventRecord(e0);
    launch();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, e0, e1);
    t.push_back(ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("nsa_bench_roofline: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp p;
  CK(cudaGetDeviceProperties(&p, 0));
  const int sms = p.multiProcessorCount;
  std::printf("device: %s, %d SMs, L2 %d MiB\n", p.name, sms, p.l2CacheSize >> 20);

  const size_t big = (size_t)2 << 30;  // 2 GiB each way
  int4 *a, *b;
  CK(cudaMalloc(&a, big));
  CK(cudaMalloc(&b, big));
  CK(cudaMemset(a, 1, big));
  const size_t n = big / sizeof(int4);
  const float tc = median_ms([&] { copy_kernel<<<sms * 8, 512>>>(a, b, n); });
  CK(cudaGetLastError());
  std::printf("hbm_copy_GBps %.0f  (2 x %.1f GiB in %.3f ms)\n", 2.0 * big / (tc * 1e-3) / 1e9, big / 1073741824.0,
              tc);

  const size_t small = (size_t)16 << 20;  // 16 MiB: stays in L2
  const size_t ns = small / sizeof(int4);
  const int iters = 16, ctas = sms * 8;
  int *sink;
  CK(cudaMalloc(&sink, 4));
  const float tl = median_ms([&] { l2_read_kernel<<<ctas, 512>>>(a, ns, iters, sink); });
  CK(cudaGetLastError());
  std::printf("l2_read_GBps %.0f  (%d CTAs x %d x 16 MiB in %.3f ms)\n",
              (double)ctas * iters * small / (tl * 1e-3) / 1e9, ctas, iters, tl);

  float *fs;
  CK(cudaMalloc(&fs, 4));
  const int mi = 4096, warps_per_cta = 8;
  const float tm = median_ms([&] { mma_kernel<<<sms * 4, warps_per_cta * 32>>>(mi, fs); });
  CK(cudaGetLastError());
  const double flops = (double)sms * 4 * warps_per_cta * mi * 8 * (2.0 * 16 * 8 * 16);
  std::printf("mma_bf16_TFLOPs %.0f  (m16n8k16 mma.sync, %d SMs x 32 warps)\n", flops / (tm * 1e-3) / 1e12, sms);
  cudaFree(a);
  cudaFree(b);
  cudaFree(sink);
  cudaFree(fs);
  return 0;
}
