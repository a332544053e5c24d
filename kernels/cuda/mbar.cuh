// mbar.cuh — shared-memory mbarriers, sm_90.
//
// A producer/consumer ring in shared memory (fwd_rows.cu) uses two
// barriers per slot:
//   full[s]   count 1: the producer's arrive_expect_tx(bytes); the TMA
//             copies it then issues complete those bytes. The phase ends
//             when the arrival and every byte are in, and the slot's data is
//             visible to every thread that waited on the phase;
//   empty[s]  count = consumers: each consumer arrives when it has read the
//             slot; the producer waits for the phase before refilling it.
// Phase k of a barrier (its k-th completion, from 0) is waited for with
// parity k & 1. A wait is only exact when the barrier has finished phase
// k - 1: a thread must never wait for a phase more than one ahead.
// Every helper is a no-op below sm_90 (the host never launches the kernels
// that use them there).
#pragma once

#include <stdint.h>

namespace nsa_mbar {

__device__ __forceinline__ void init(unsigned bar, unsigned count) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
#endif
}
// Makes initialized barriers visible to the async proxy (TMA completion);
// the caller then passes a block barrier.
__device__ __forceinline__ void init_fence() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
#endif
}
__device__ __forceinline__ void arrive(unsigned bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// `count` arrivals at once (on behalf of threads that skip a phase).
__device__ __forceinline__ void arrive_n(unsigned bar, unsigned count) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// The producer's arrival, announcing `bytes` of bulk-tensor copies that
// complete on the same phase.
__device__ __forceinline__ void arrive_expect_tx(unsigned bar, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Blocks until the phase with parity `parity` has completed (acquire).
__device__ __forceinline__ void wait(unsigned bar, unsigned parity) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}
// TMA: the box at coordinates {c0, c1, c2, c3} (innermost first) of the
// 4-D tensor map at generic address `map` (a __grid_constant__ kernel
// parameter) into shared memory at `dst`, completing its bytes on `bar`.
// Elements outside the tensor are zero-filled and still counted.
__device__ __forceinline__ void tma_load_4d(unsigned dst, const void *map, int c0, int c1, int c2, int c3,
                                            unsigned bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#endif
}
// A shared-memory flag: the store releases this thread's earlier memory
// operations (and those it acquired, e.g. by waiting on a barrier); a load
// that reads the value acquires them.
__device__ __forceinline__ void flag_store(unsigned addr, int v) {
#if __CUDA_ARCH__ >= 900
  asm volatile("st.release.cta.shared::cta.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
#endif
}
__device__ __forceinline__ int flag_load(unsigned addr) {
  int v = 0;
#if __CUDA_ARCH__ >= 900
  asm volatile("ld.acquire.cta.shared::cta.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
#endif
  return v;
}


// ---- Clusters (nsa_bench_roofline's dsmem_push_per_sm) ----
// This CTA's rank in its cluster.
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r = 0;
#if __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
// Every thread of every CTA of the cluster: a block barrier across the
// cluster, releasing each thread's earlier shared-memory writes (and
// barrier inits, after init_fence) to the other CTAs' threads.
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
// The shared::cluster address of CTA `rank`'s copy of this CTA's shared
// address `addr` (the CTAs run one kernel, so their layouts match).
__device__ __forceinline__ unsigned map_rank(unsigned addr, unsigned rank) {
  unsigned r = 0;
#if __CUDA_ARCH__ >= 900
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
#endif
  return r;
}
// One arrival on another CTA's barrier (map_rank's address), releasing this
// thread's earlier memory operations at cluster scope.
__device__ __forceinline__ void arrive_remote(unsigned caddr) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(caddr) : "memory");
#endif
}
// wait() for a barrier that other CTAs arrive on: acquire at cluster scope.
__device__ __forceinline__ void wait_cluster(unsigned bar, unsigned parity) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAITC_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAITC_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}
// `bytes` (a multiple of 16) of this CTA's shared memory at `src` into
// another CTA's at `dst_c`, completing on that CTA's barrier `bar_c` (both
// map_rank addresses; the receiver arms the barrier with
// arrive_expect_tx). The source may be overwritten only once the receiver
// says the copy is in.
__device__ __forceinline__ void copy_to_rank(unsigned dst_c, unsigned src, unsigned bytes, unsigned bar_c) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   dst_c),
               "r"(src), "r"(bytes), "r"(bar_c)
               : "memory");
#endif
}

}  // namespace nsa_mbar
