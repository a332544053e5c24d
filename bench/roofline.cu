// roofline.cu — the GPU's measured ceilings for docs/PERF.md's "what limits
// it" analysis (issue 7): nsa_bench_roofline prints
//   hbm_copy_GBps   : read + write bytes / time of a 2 x 2 GiB copy kernel
//                     (16-byte loads/stores; larger than L2, so HBM-bound)
//   l2_read_GBps    : bytes / time of 132*8 CTAs re-reading a 16 MiB buffer
//                     (fits the 50 MB L2) many times
//   l2_read_per_sm  : the same reads by one 1024-thread CTA per SM (its
//                     shared memory keeps a second one off; four 16-byte
//                     loads in flight per thread), on all SMs and
//                     on half of them, as GB/s per SM: equal rates mean each
//                     SM's own L2 -> SM path is the limit, a higher rate on
//                     half the SMs means the shared L2 is
//   mma_bf16_TFLOPs : m16n8k16 bf16 mma.sync issued back to back from
//                     registers (8 independent accumulators per warp), the
//                     instruction the project's kernels use
//   cp_async_GBps   : 16-byte cp.async gathers of 256-byte rows (1 KB apart,
//                     as a token's D = 128 of one group) into shared memory,
//                     per destination layout: wgmma's core-matrix layout
//                     (a row's 16-byte pieces 128 bytes apart), the 128-byte
//                     swizzle, rows padded by 16 bytes (the mma.sync kernels'
//                     conflict-free ldmatrix stride), plain rows. A sector is
//                     fetched whole and coalesced only when both its 16-byte
//                     halves land in one 32-byte piece of shared memory
//                     (bwd_dkdv_wgmma.cu's gathers, docs/PERF.md)
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

// l2_read_kernel with four independent 16-byte loads in flight per thread
// (one 1024-thread CTA per SM then keeps 64 KB of reads in flight).
__global__ void l2_read4_kernel(const int4 *__restrict__ src, size_t n, int iters, int *__restrict__ sink) {
  int acc = 0;
  const size_t off = ((size_t)blockIdx.x * 4096) % n, q = n / 4;
  for (int it = 0; it < iters; it++)
    for (size_t i = threadIdx.x; i < q; i += blockDim.x) {
      int4 v[4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        size_t k = i + j * q + off;
        if (k >= n) k -= n;
        v[j] = __ldcg(src + k);
      }
#pragma unroll
      for (int j = 0; j < 4; j++) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
  if (acc == 0x7fffffff) *sink = acc;
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

// Each iteration: 32 rows x 256 bytes (16 pieces of 16 bytes) into shared
// memory, a warp copying one 128-byte half of 4 rows (whole L2 lines).
enum { kCM = 0, kSW128 = 1, kPad16 = 2, kPlain = 3 };
template <int LAYOUT>
__global__ void cp_async_kernel(const char *__restrict__ g, int groups, int iters, int *__restrict__ sink) {
  extern __shared__ __align__(1024) unsigned char sm[];
  const unsigned base = (unsigned)__cvta_generic_to_shared(sm);
  const int tid = threadIdx.x, warp = tid >> 5;
  const int r4 = ((warp & 1) << 2) + ((tid >> 3) & 3), pc = ((warp >> 1) << 3) + (tid & 7);
  int acc = 0;
  for (int it = 0; it < iters; it++) {
    const char *gb = g + (size_t)((blockIdx.x * iters + it) % groups) * 32 * 1024;
#pragma unroll
    for (int rg = 0; rg < 4; rg++) {
      const int r = rg * 8 + r4;
      unsigned off;
      if (LAYOUT == kCM) off = ((r >> 3) * 16 + pc) * 128 + (r & 7) * 16;
      else if (LAYOUT == kSW128) off = (pc >> 3) * 4096 + r * 128 + (((pc & 7) ^ (r & 7)) << 4);
      else if (LAYOUT == kPad16) off = r * 272 + pc * 16;
      else off = r * 256 + pc * 16;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(base + off), "l"(gb + (size_t)r * 1024 + pc * 16));
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
    __syncthreads();
    acc += sm[(tid * 37) & 8191];
    __syncthreads();
  }
  if (acc == 0x7fffffff) *sink = acc;
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

  // One CTA per SM (a 1024-thread CTA with 120 KB of dynamic shared memory
  // cannot share an SM), on all SMs and on half of them.
  CK(cudaFuncSetAttribute(l2_read4_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 120 << 10));
  std::printf("l2_read_per_sm_GBps");
  for (int part = 1; part <= 2; part++) {
    const int nc = sms / part;
    const float tp = median_ms([&] { l2_read4_kernel<<<nc, 1024, 120 << 10>>>(a, ns, iters, sink); });
    CK(cudaGetLastError());
    std::printf("  %d SMs %.1f", nc, (double)iters * small / (tp * 1e-3) / 1e9);
  }
  std::printf("  (each SM reads 16 x 16 MiB)\n");

  float *fs;
  CK(cudaMalloc(&fs, 4));
  const int mi = 4096, warps_per_cta = 8;
  const float tm = median_ms([&] { mma_kernel<<<sms * 4, warps_per_cta * 32>>>(mi, fs); });
  CK(cudaGetLastError());
  const double flops = (double)sms * 4 * warps_per_cta * mi * 8 * (2.0 * 16 * 8 * 16);
  std::printf("mma_bf16_TFLOPs %.0f  (m16n8k16 mma.sync, %d SMs x 32 warps)\n", flops / (tm * 1e-3) / 1e12, sms);

  // 4096 groups x 8 KB of rows (32 MB touched: L2-resident), 1056 CTAs.
  const int groups = 4096, ci = 64, cctas = sms * 8;
  const double cbytes = (double)cctas * ci * 32 * 256;
  const char *names[4] = {"core_matrices", "swizzle128", "padded16", "plain"};
  void (*kerns[4])(const char *, int, int, int *) = {cp_async_kernel<kCM>, cp_async_kernel<kSW128>,
                                                     cp_async_kernel<kPad16>, cp_async_kernel<kPlain>};
  std::printf("cp_async_GBps");
  for (int l = 0; l < 4; l++) {
    const float tcp = median_ms([&] { kerns[l]<<<cctas, 128, 16384>>>((const char *)a, groups, ci, sink); });
    CK(cudaGetLastError());
    std::printf("  %s %.0f", names[l], cbytes / (tcp * 1e-3) / 1e9);
  }
  std::printf("  (16-byte copies of 256-byte rows into shared memory, %d CTAs)\n", cctas);
  cudaFree(a);
  cudaFree(b);
  cudaFree(sink);
  cudaFree(fs);
  return 0;
}
