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

}  // namespace nsa_mbar
