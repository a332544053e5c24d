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
//   tma_ring_per_sm : the row-block kernels' loads alone (fwd_rows.cu): one
//                     CTA per SM, a ring of NS 32 KB slots, each step four
//                     TMA boxes of 64 keys x 64 dims (128-byte rows 1 KB
//                     apart, 128-byte swizzle) from random tiles of a
//                     16 MiB L2-resident [16384 keys][4 heads][128] bf16
//                     tensor; one thread waits for each slot and frees it.
//                     GB/s per SM for NS = 5 and 6, on all and half the SMs;
//                     variants: no L2 promotion, 256-byte-row boxes, tiles
//                     in order, the slot by one warp's 16-byte cp.async, K
//                     by TMA and V by cp.async (tma_ring_kernel's modes)
//   dsmem_push_per_sm : whether tiles shared between two CTAs of a cluster
//                     could come through distributed shared memory instead
//                     of the L2: clusters of 2 CTAs (one per SM) each run
//                     the ring above (4 slots, the kernels' boxes, random
//                     tiles), and every P-th landed tile is also pushed to
//                     the partner's 2 mirror slots by an SM -> SM bulk copy
//                     (cp.async.bulk.shared::cluster.shared::cta); GB/s per
//                     SM from the L2, pushed, and in all, for P = none, 8,
//                     4, 2, 1, on all and half the SMs
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
//                     (bwd_dkdv_wgmma.cu's gathers, docs/PERF.md); and the
//                     swizzle with each iteration's 8 KB group at random
//                     (the row-block kernels' random tiles)
// Median of 5 timed runs after a warm-up, CUDA events. No inputs beyond the
// device; prints "no CUDA device" and exits 0 without one.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "mbar.cuh"

#include <algorithm>
#include <string>
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

// 16-byte cp.async copies of a 64-key x 256-byte half slot (one head of a
// tile; src = the tile's first key row of that head, rows 1 KB apart) into
// the slot's two swizzled 64-dim boxes at dst, by the 32 lanes of a warp
// (lane l: 16-byte chunk l % 16 of keys l / 16 + 2 i), then an arrival on
// bar when they have landed (count the lanes in the barrier's init).
__device__ __forceinline__ void cp_async_half(unsigned dst, const char *src, int lane, unsigned bar) {
  const int c = lane & 15, k0 = lane >> 4;
#pragma unroll 8
  for (int i = 0; i < 32; i++) {
    const int key = k0 + 2 * i;
    const unsigned d = dst + (c >> 3) * 8192 + key * 128 + (((c & 7) ^ (key & 7)) << 4);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src + (size_t)key * 1024 + c * 16)
                 : "memory");
  }
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Step u's 64-key tile of CTA b: pseudo-random, or (in_order) the next one.
__device__ __forceinline__ int ring_tile(unsigned b, int u, int ntiles, bool in_order) {
  return in_order ? (int)((b + (unsigned)u) % (unsigned)ntiles)
                  : (int)((b * 7919u + (unsigned)u * 104729u) % (unsigned)ntiles);
}

// The TMA ring alone (see the header): warp 0 lane 0 fills slot u % NS
// with step u's four boxes (heads 2 (u & 1) and 2 (u & 1) + 1, standing for
// K and V, of a pseudo-random 64-key tile), warp 1 lane 0 waits for the
// slot, reads a word of it and frees it.
// mode 0: boxes of 64 dims x 64 keys (the kernels' shape); 1: 128 dims x
// 32 keys (a map with 256-byte rows); 2: as 0 with the tiles in order;
// 3: both halves by cp.async (cp_async_half) from the producer warp's 32
// lanes; 4: K's half by TMA, V's by cp.async.
template <int NS>
__global__ void tma_ring_kernel(const __grid_constant__ CUtensorMap m, const char *__restrict__ kv, int steps,
                                int ntiles, int mode, int *__restrict__ sink) {
  extern __shared__ __align__(1024) unsigned char sm_raw[];
  unsigned char *sm = sm_raw + ((1024 - ((unsigned)__cvta_generic_to_shared(sm_raw) & 1023)) & 1023);
  const unsigned ring = (unsigned)__cvta_generic_to_shared(sm);
  const unsigned full0 = ring + NS * 32768, empty0 = full0 + NS * 8;
  const int tid = threadIdx.x;
  const unsigned fullc = mode == 3 ? 64 : mode == 4 ? 33 : 1;  // mode 3: two halves' arrivals per lane
  if (tid == 0) {
    for (int s = 0; s < NS; s++) nsa_mbar::init(full0 + 8 * s, fullc), nsa_mbar::init(empty0 + 8 * s, 1);
    nsa_mbar::init_fence();
  }
  __syncthreads();
  if (mode >= 3 && tid < 32) {
    for (int u = 0; u < steps; u++) {
      const int s = u % NS;
      if (u >= NS) nsa_mbar::wait(empty0 + 8 * s, ((u / NS) - 1) & 1);
      const int kt = ring_tile(blockIdx.x, u, ntiles, false);
      const int h = 2 * (u & 1);
      const unsigned dst = ring + s * 32768, bar = full0 + 8 * s;
      const char *tile = kv + (size_t)kt * 64 * 1024;
      if (mode == 4) {
        if (tid == 0) {
          nsa_mbar::arrive_expect_tx(bar, 16384);
          nsa_mbar::tma_load_4d(dst, &m, 0, h, kt * 64, 0, bar);
          nsa_mbar::tma_load_4d(dst + 8192, &m, 64, h, kt * 64, 0, bar);
        }
      } else {
        cp_async_half(dst, tile + h * 256, tid, bar);
      }
      cp_async_half(dst + 16384, tile + (h + 1) * 256, tid, bar);
    }
  } else if (tid == 0) {
    for (int u = 0; u < steps; u++) {
      const int s = u % NS;
      if (u >= NS) nsa_mbar::wait(empty0 + 8 * s, ((u / NS) - 1) & 1);
      const int kt = ring_tile(blockIdx.x, u, ntiles, mode == 2);
      const int h = 2 * (u & 1);
      const unsigned dst = ring + s * 32768, bar = full0 + 8 * s;
      nsa_mbar::arrive_expect_tx(bar, 32768);
      const int d1 = mode == 1 ? 0 : 64, k1 = mode == 1 ? 32 : 0;  // the second box of each half
      nsa_mbar::tma_load_4d(dst, &m, 0, h, kt * 64, 0, bar);
      nsa_mbar::tma_load_4d(dst + 8192, &m, d1, h, kt * 64 + k1, 0, bar);
      nsa_mbar::tma_load_4d(dst + 16384, &m, 0, h + 1, kt * 64, 0, bar);
      nsa_mbar::tma_load_4d(dst + 24576, &m, d1, h + 1, kt * 64 + k1, 0, bar);
    }
  } else if (tid == 32) {
    int acc = 0;
    for (int u = 0; u < steps; u++) {
      const int s = u % NS;
      nsa_mbar::wait(full0 + 8 * s, (u / NS) & 1);
      acc ^= *reinterpret_cast<volatile int *>(sm + s * 32768 + (u & 31) * 4);
      nsa_mbar::arrive(empty0 + 8 * s);
    }
    if (acc == 0x7fffffff) *sink = acc;
  }
}

// ---- dsmem_push_per_sm (see the header; the cluster helpers are mbar.cuh's) ----
// Shared memory: ring [kDsNS][32 KB], mirror [kDsMS][32 KB], then barriers
// full[kDsNS] (TMA), empty[kDsNS] (count 2: the local reader, and either
// the reader again or, for a pushed tile, the partner once it has the copy),
// mfull[kDsMS] (the partner's push lands), mfree[kDsMS] (the partner's
// mirror slot is empty and armed). Thread 0: TMA producer; thread 32: reads
// each landed slot and pushes every P-th one; thread 64: receives the
// partner's pushes.
constexpr int kDsNS = 4, kDsMS = 2;
__global__ void __launch_bounds__(96, 1)
    dsmem_kernel(const __grid_constant__ CUtensorMap m, int steps, int P, int ntiles, int *__restrict__ sink) {
  extern __shared__ __align__(1024) unsigned char sm_raw[];
  unsigned char *sm = sm_raw + ((1024 - ((unsigned)__cvta_generic_to_shared(sm_raw) & 1023)) & 1023);
  const unsigned ring = (unsigned)__cvta_generic_to_shared(sm), mir = ring + kDsNS * 32768;
  const unsigned full0 = mir + kDsMS * 32768, empty0 = full0 + 8 * kDsNS;
  const unsigned mfull0 = empty0 + 8 * kDsNS, mfree0 = mfull0 + 8 * kDsMS;
  const int tid = threadIdx.x;
  const unsigned peer = nsa_mbar::cluster_rank() ^ 1u;
  if (tid == 0) {
    for (int s = 0; s < kDsNS; s++) nsa_mbar::init(full0 + 8 * s, 1), nsa_mbar::init(empty0 + 8 * s, 2);
    for (int s = 0; s < kDsMS; s++) nsa_mbar::init(mfull0 + 8 * s, 1), nsa_mbar::init(mfree0 + 8 * s, 1);
    nsa_mbar::init_fence();
  }
  __syncthreads();
  nsa_mbar::cluster_sync();  // both CTAs' barriers exist before any remote arrival
  const int npush = P > 0 ? (steps + P - 1) / P : 0;
  int acc = 0;
  if (tid == 0) {
    for (int u = 0; u < steps; u++) {
      const int s = u % kDsNS;
      // (cluster scope: the partner's arrival says its copy out of the slot is in)
      if (u >= kDsNS) nsa_mbar::wait_cluster(empty0 + 8 * s, ((u / kDsNS) - 1) & 1);
      const int kt = ring_tile(blockIdx.x, u, ntiles, false), h = 2 * (u & 1);
      const unsigned dst = ring + s * 32768, bar = full0 + 8 * s;
      nsa_mbar::arrive_expect_tx(bar, 32768);
      nsa_mbar::tma_load_4d(dst, &m, 0, h, kt * 64, 0, bar);
      nsa_mbar::tma_load_4d(dst + 8192, &m, 64, h, kt * 64, 0, bar);
      nsa_mbar::tma_load_4d(dst + 16384, &m, 0, h + 1, kt * 64, 0, bar);
      nsa_mbar::tma_load_4d(dst + 24576, &m, 64, h + 1, kt * 64, 0, bar);
    }
  } else if (tid == 32) {
    for (int u = 0, i = 0; u < steps; u++) {
      const int s = u % kDsNS;
      nsa_mbar::wait(full0 + 8 * s, (u / kDsNS) & 1);
      acc ^= *reinterpret_cast<volatile int *>(sm + s * 32768 + (u & 31) * 4);
      if (P > 0 && u % P == 0) {  // push i into the partner's mirror slot i % kDsMS
        const int mm = i % kDsMS;
        nsa_mbar::wait_cluster(mfree0 + 8 * mm, (i / kDsMS) & 1);
        const unsigned dst = nsa_mbar::map_rank(mir + mm * 32768, peer);
        nsa_mbar::copy_to_rank(dst, ring + s * 32768, 32768, nsa_mbar::map_rank(mfull0 + 8 * mm, peer));
        i++;
        nsa_mbar::arrive(empty0 + 8 * s);  // the partner's arrival frees the slot once the copy is in
      } else {
        nsa_mbar::arrive_n(empty0 + 8 * s, 2);
      }
    }
  } else if (tid == 64) {
    for (int i = 0; i < kDsMS && i < npush; i++) {  // arm the mirror slots, then offer them
      nsa_mbar::arrive_expect_tx(mfull0 + 8 * i, 32768);
      nsa_mbar::arrive_remote(nsa_mbar::map_rank(mfree0 + 8 * i, peer));
    }
    for (int i = 0; i < npush; i++) {
      const int mm = i % kDsMS;
      nsa_mbar::wait(mfull0 + 8 * mm, (i / kDsMS) & 1);
      acc ^= *reinterpret_cast<volatile int *>(sm + (kDsNS + mm) * 32768 + (i & 31) * 4);
      // The partner's source slot (its step i * P) is copied: that frees it.
      nsa_mbar::arrive_remote(nsa_mbar::map_rank(empty0 + 8 * ((i * P) % kDsNS), peer));
      if (i + kDsMS < npush) {
        nsa_mbar::arrive_expect_tx(mfull0 + 8 * mm, 32768);
        nsa_mbar::arrive_remote(nsa_mbar::map_rank(mfree0 + 8 * mm, peer));
      }
    }
  }
  if (acc == 0x7fffffff) *sink = acc;
  __syncthreads();
  nsa_mbar::cluster_sync();  // no CTA leaves while its partner may still arrive on its barriers
}

// cuTensorMapEncodeTiled through the runtime (no libcuda link), as fwd_rows.cu.
static PFN_cuTensorMapEncodeTiled_v12000 tma_encoder() {
  void *p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
}

// Each iteration: 32 rows x 256 bytes (16 pieces of 16 bytes) into shared
// memory, a warp copying one 128-byte half of 4 rows (whole L2 lines).
enum { kCM = 0, kSW128 = 1, kPad16 = 2, kPlain = 3 };
// RND: each iteration's group pseudo-random instead of the next one.
template <int LAYOUT, bool RND = false>
__global__ void cp_async_kernel(const char *__restrict__ g, int groups, int iters, int *__restrict__ sink) {
  extern __shared__ __align__(1024) unsigned char sm[];
  const unsigned base = (unsigned)__cvta_generic_to_shared(sm);
  const int tid = threadIdx.x, warp = tid >> 5;
  const int r4 = ((warp & 1) << 2) + ((tid >> 3) & 3), pc = ((warp >> 1) << 3) + (tid & 7);
  int acc = 0;
  for (int it = 0; it < iters; it++) {
    const unsigned grp = RND ? ((unsigned)blockIdx.x * 7919u + (unsigned)it * 104729u) % (unsigned)groups
                             : (unsigned)((blockIdx.x * iters + it) % groups);
    const char *gb = g + (size_t)grp * 32 * 1024;
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
  {
    const float tcp = median_ms([&] { cp_async_kernel<kSW128, true><<<cctas, 128, 16384>>>((const char *)a, groups, ci, sink); });
    CK(cudaGetLastError());
    std::printf("  swizzle128_random_groups %.0f", cbytes / (tcp * 1e-3) / 1e9);
  }
  std::printf("  (16-byte copies of 256-byte rows into shared memory, %d CTAs)\n", cctas);
  // The TMA ring over the first 16 MiB of a: [16384 keys][4 heads][128] bf16.
  PFN_cuTensorMapEncodeTiled_v12000 enc = tma_encoder();
  if (p.major < 9 || enc == nullptr) {
    std::printf("tma_ring_per_sm_GBps: no TMA on this device/driver\n");
  } else {
    struct {
      const char *name;
      int mode, box0, box2;
      CUtensorMapSwizzle sw;
      CUtensorMapL2promotion pr;
    } cf[6] = {{"64x64 sw128 (kernels)", 0, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B},
               {"cp.async, 32 lanes", 3, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B},
               {"K by TMA, V by cp.async", 4, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B},
               {"64x64 sw128 no promotion", 0, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE},
               {"128x32 no swizzle (256-byte rows)", 1, 128, 32, CU_TENSOR_MAP_SWIZZLE_NONE,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B},
               {"64x64 sw128 tiles in order", 2, 64, 64, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B}};
    const int steps = 4096;
    for (int c = 0; c < 6; c++) {
      CUtensorMap tmap;
      cuuint64_t dims[4] = {128, 4, 16384, 1}, gst[3] = {256, 1024, (cuuint64_t)16 << 20};
      cuuint32_t box[4] = {(cuuint32_t)cf[c].box0, 1, (cuuint32_t)cf[c].box2, 1}, es[4] = {1, 1, 1, 1};
      if (enc(&tmap, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, a, dims, gst, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
              cf[c].sw, cf[c].pr, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
        std::printf("tma_ring_per_sm_GBps %s: encode failed\n", cf[c].name);
        continue;
      }
      std::printf("tma_ring_per_sm_GBps %s:", cf[c].name);
      for (int ns = 5; ns <= 6; ns++) {
        const size_t bytes = (size_t)ns * 32768 + 2 * ns * 8 + 1024;
        void (*k)(const CUtensorMap, const char *, int, int, int, int *) =
            ns == 5 ? tma_ring_kernel<5> : tma_ring_kernel<6>;
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        for (int part = 1; part <= 2; part++) {
          const int nc = sms / part;
          const float tt = median_ms([&] { k<<<nc, 64, bytes>>>(tmap, (const char *)a, steps, 256, cf[c].mode, sink); });
          CK(cudaGetLastError());
          std::printf("  NS=%d %d SMs %.1f", ns, nc, (double)steps * 32768 / (tt * 1e-3) / 1e9);
        }
      }
      std::printf("  (%d steps of 32 KB per SM)\n", steps);
    }
  }
  if (p.major >= 9 && enc != nullptr) {
    CUtensorMap tmap;
    cuuint64_t dims[4] = {128, 4, 16384, 1}, gst[3] = {256, 1024, (cuuint64_t)16 << 20};
    cuuint32_t box[4] = {64, 1, 64, 1}, es[4] = {1, 1, 1, 1};
    const size_t bytes = (size_t)(kDsNS + kDsMS) * 32768 + 8 * (2 * kDsNS + 2 * kDsMS) + 1024;
    const int steps = 4096;
    if (enc(&tmap, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, a, dims, gst, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      std::printf("dsmem_push_per_sm_GBps: encode failed\n");
    } else {
      CK(cudaFuncSetAttribute(dsmem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
      std::printf("dsmem_push_per_sm_GBps (2-CTA clusters, %d-slot ring + %d mirror slots, %d steps of 32 KB per CTA; "
                  "GB/s per SM: L2 + pushed = in):\n", kDsNS, kDsMS, steps);
      for (int part = 1; part <= 2; part++) {
        const int nc = (sms / part) & ~1;
        for (int P : {0, 8, 4, 2, 1}) {
          cudaLaunchConfig_t lc = {};
          cudaLaunchAttribute at[1];
          at[0].id = cudaLaunchAttributeClusterDimension;
          at[0].val.clusterDim.x = 2, at[0].val.clusterDim.y = 1, at[0].val.clusterDim.z = 1;
          lc.gridDim = dim3(nc), lc.blockDim = dim3(96), lc.dynamicSmemBytes = bytes, lc.attrs = at, lc.numAttrs = 1;
          cudaError_t le = cudaSuccess;
          const float tt = median_ms([&] {
            const cudaError_t e = cudaLaunchKernelEx(&lc, dsmem_kernel, tmap, steps, P, 256, sink);
            if (e != cudaSuccess) le = e;
          });
          CK(le);
          CK(cudaGetLastError());
          const double l2 = (double)steps * 32768 / (tt * 1e-3) / 1e9;
          const double pu = P > 0 ? (double)((steps + P - 1) / P) * 32768 / (tt * 1e-3) / 1e9 : 0.0;
          std::printf("  %d SMs, push every %s: %.1f + %.1f = %.1f\n", nc, P ? std::to_string(P).c_str() : "none", l2,
                      pu, l2 + pu);
        }
      }
    }
  }
  cudaFree(a);
  cudaFree(b);
  cudaFree(sink);
  cudaFree(fs);
  return 0;
}
