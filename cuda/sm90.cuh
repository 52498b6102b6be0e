// Hopper (sm_90a) building blocks, header-free: mbarriers, TMA tile loads (cp.async.bulk.tensor
// completing on an mbarrier), wgmma shared-memory descriptors and ordering, register
// reallocation between warpgroups. Only translation units compiled for sm_90a include this.
#pragma once

typedef unsigned long long u64;

// A CUtensorMap as the driver encodes it (cuTensorMapEncodeTiled on the host): passed inside a
// __grid_constant__ kernel parameter, read by the TMA unit through its generic address.
struct alignas(64) TmaMap {
  u64 opaque[16];
};

__device__ __forceinline__ void mbar_init(u64 *bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes barrier initialisation visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(u64 *bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// One arrival that also announces `bytes` of TMA traffic completing on this barrier.
__device__ __forceinline__ void mbar_arrive_tx(u64 *bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u64 *bar, u32 parity) {
  const u32 addr = smem_addr(bar);
  u32 done;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(addr), "r"(parity)
                 : "memory");
  } while (!done);
}

// TMA: box of a 4-d tensor map at coordinates (c0 innermost .. c3) into shared memory, completing
// on `bar` (which must expect the box's bytes). Coordinates past the tensor's extent read zeros.
__device__ __forceinline__ void tma_load_4d(void *dst, const TmaMap *map, u64 *bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes "
               "[%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(smem_addr(dst)),
               "l"((u64)map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

// TMA: box of a 3-d tensor map (no swizzle) at coordinates (c0 innermost .. c2).
__device__ __forceinline__ void tma_load_3d(void *dst, const TmaMap *map, u64 *bar, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes "
               "[%0], [%1, {%3, %4, %5}], [%2];" ::"r"(smem_addr(dst)),
               "l"((u64)map), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// wgmma descriptor of a shared-memory tile in TMA's 128-byte swizzle: rows of 128 bytes (64
// 16-bit elements), 8-row atoms 1024 bytes apart, atoms 1024-byte aligned. K-major operands
// advance along K by adding 32 bytes per 16 elements; an MN-major (transposed) operand spans
// 64-element column blocks `lbo` bytes apart.
__device__ __forceinline__ u64 sw128_desc(u32 saddr, u32 lbo) {
  return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) |
         ((u64)(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads or writes of wgmma accumulators across the wait (the
// hardware writes them asynchronously).
template <int N> __device__ __forceinline__ void fence_regs(float *r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Register reallocation between warpgroups (needs a register cap at entry: __launch_bounds__
// with a minimum of one block).
template <int R> __device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R> __device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}

// Barrier among `threads` threads (a multiple of 32) under id (1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Arrives at that barrier without waiting for it.
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

#include "sm90_wgmma.cuh"
