// wgmma.cuh — Hopper warpgroup MMA (sm_90a) helpers for the backward's dk/dv
// kernel (bwd_dkdv_wgmma.cu): shared-memory descriptors, fences, and the two
// tile layouts (CM below, for tiles written from registers; SW128 further
// down, for tiles gathered by cp.async).
//
// Layout ("CM layout"): an R x C bf16/f16 matrix (C contiguous in the
// source, row-major) is stored as (R/8) x (C/8) core matrices of 8 rows x 8
// elements (8 x 16 bytes = 128 contiguous bytes, row i of the core matrix at
// byte 16*i); core matrix (rb, cb) sits at byte (rb * C/8 + cb) * 128. So
//   element (r, c) -> byte ((r/8) * (C/8) + c/8) * 128 + (r%8) * 16 + (c%8) * 2.
// No swizzle: a core matrix is one 128-byte run, conflict-free for the tensor
// cores; 8 threads writing the 8 rows of one core matrix are conflict-free.
//
// The same stored tile is an operand either way round (PTX ISA,
// "asynchronous warpgroup-level matrix shared memory layout"; LBO is the
// byte step between core matrices along K, SBO along M/N, no swizzle):
//   rows = M/N, columns = K ("K-major"):   LBO = 128,        SBO = C * 16
//   rows = K, columns = M/N ("MN-major"):  LBO = C * 16,     SBO = 128
// (the transpose flag of the instruction says which). One k16 step is two
// core matrices along K: +256 bytes K-major, +2 * C * 16 bytes MN-major.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nsa_wg {

// Byte offset of element (r, c) of an R x C tile with C columns in CM layout.
__host__ __device__ constexpr int cm_off(int r, int c, int C) {
  return ((r >> 3) * (C >> 3) + (c >> 3)) * 128 + (r & 7) * 16 + (c & 7) * 2;
}

// Descriptor for a tile at shared address addr (16-byte aligned); lbo, sbo in bytes.
__device__ __forceinline__ unsigned long long desc(unsigned addr, unsigned lbo, unsigned sbo) {
  return (unsigned long long)((addr >> 4) & 0x3FFF) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32);
}

// "SW128 layout": an R x 128 bf16/f16 tile (rows of 256 source bytes, R a
// multiple of 8) as two boxes [R][64 elements], box 1 at R * 128 bytes; in a
// box row r is 128 bytes at r * 128 with its 16-byte chunk c at chunk
// c ^ (r % 8) (the 128-byte swizzle; the tile base is 1024-byte aligned, the
// swizzle's period, so the hardware's XOR of address bits 4-6 with 7-9
// matches). Why not the CM layout for gathered tiles: cp.async coalesces a
// 32-byte global sector only when its two 16-byte halves land in one 32-byte
// piece of shared memory; CM puts them 128 bytes apart, so every 16-byte copy
// became its own L2 request and read a whole sector (H200: 2.7 vs 12.5 TB/s).
// Byte offset of 16-byte chunk c16 (0..15, elements 8 c16 ..) of row r:
__host__ __device__ constexpr int sw_off(int r, int c16, int R) {
  return (c16 >> 3) * R * 128 + r * 128 + (((c16 & 7) ^ (r & 7)) << 4);
}
// Descriptors of SW128 tiles (checked against a float64 product on an H200
// in all three uses below):
//   rows = M/N, columns = K ("K-major"), k16 step ks: start + (ks / 4) box
//     + (ks % 4) * 32 bytes, SBO = 1024 (8 rows), LBO unused;
//   rows = K, columns = M/N ("MN-major"), k16 step kk: start + kk * 2048,
//     LBO = R * 128 (box to box along M/N), SBO = 1024 (8 rows along K).
__device__ __forceinline__ unsigned long long desc_sw(unsigned addr, unsigned lbo, unsigned sbo) {
  return desc(addr, lbo, sbo) | (1ull << 62);
}

// desc*(addr + bytes) == desc_adv(desc*(addr), bytes) for bytes a multiple of
// 16 with addr + bytes inside shared memory: the start field (bits 0-13)
// holds addr >> 4 < 2^14 and never carries. Kernels build one descriptor per
// tile and step it with compile-time offsets: rebuilding it per wgmma (shift,
// mask, or on the uniform datapath) was a third of all instructions of the
// dk/dv kernel (Nsight Compute, H200).
__device__ __forceinline__ unsigned long long desc_adv(unsigned long long d, unsigned bytes) {
  return d + (bytes >> 4);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ordinary / cp.async shared-memory writes become visible to the tensor
// cores' (async proxy) reads: each writing thread fences, then a barrier.
__device__ __forceinline__ void fence_proxy() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accumulator reads across wgmma.wait.
template <int N> __device__ __forceinline__ void reg_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

}  // namespace nsa_wg

#include "wgmma_ops.cuh"
