// Hopper (sm_90) asynchronous copies: the shared-memory mbarrier and the tensor memory
// accelerator's tile-mode loads (cp.async.bulk.tensor), written from the PTX ISA sections
// "mbarrier" (init, arrive, expect_tx, arrive.expect_tx, try_wait.parity; phases and the
// transaction count) and "cp.async.bulk.tensor" / "Tensor Access Modes" (tile mode, the tensor
// map, swizzle, out-of-bound fill). docs/wgmma.md ("TMA and mbarrier") says what comes from
// where and what only the GPU probe (cuda/test/tma_probe.cu) can confirm.
//
// Use: one thread inits a barrier with the number of arrivals per phase (bc_mbar_init), then
// bc_mbar_init_fence and a __syncthreads make it visible. A producer announces the bytes a
// phase waits for and arrives (bc_mbar_arrive_expect_tx), then issues the loads
// (bc_tma_load<RANK>: box `coords` of the tensor map into `dst`, completing its bytes on the
// barrier); consumers wait for the phase (bc_mbar_wait with its parity: phase k has parity
// k & 1) and then read the box. A tensor map is a BcTensorMap (params.h) inside the kernel's
// params, which the kernel takes as `const __grid_constant__` (its address must be the
// kernel-parameter one, not a local copy).
//
// Shared-memory layout of a box (rank r, box extents n_i = ceil(box_dim_i / element_stride_i),
// dimension 0 innermost): dense, element (j_0 .. j_{r-1}) at byte
// ((..(j_{r-1} n_{r-2} + j_{r-2}) ..) n_1 + j_1) * (n_0 * elem) + j_0 * elem, then, with a
// W-byte swizzle (W = 32, 64, 128; box rows of exactly W bytes here), the 16-byte chunk bits
// 4.. XOR the bits 7.. of the shared address (the wgmma swizzle: bc_wgmma_swizzle), so a box
// {64 bf16, R rows} with the 128-byte swizzle is exactly an R-row K-major 128B wgmma tile.
// Elements outside the tensor read as zero (and still count toward the bytes).
//
// Under the SIMT emulation (BC_EMU) these call cuda/emu/tma.h: loads land only when every
// thread of the block is blocked, the box reading NaN before; waits are scheduling points.
#ifndef BC_TMA_CUH
#define BC_TMA_CUH

#include "common.cuh"
#include "mma.cuh"

// TMA and mbarrier try_wait exist from sm_90 on (the emulation has them).
#if defined(BC_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define BC_HAS_TMA 1
#else
#define BC_HAS_TMA 0
#endif

#ifdef BC_EMU
#include "../emu/tma.h"
#define __grid_constant__
#endif

#if BC_HAS_TMA
#ifdef __CUDACC__
/// mbarrier.init: `count` arrivals per phase (phase 0 starts now).
__device__ __forceinline__ void bc_mbar_init(uint64_t* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bc_smem_addr(bar)), "r"(count) : "memory");
}
/// Makes initialised barriers visible to the async proxy (the TMA unit); a __syncthreads
/// after it makes them visible to the other threads.
__device__ __forceinline__ void bc_mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/// mbarrier.arrive: one arrival on the current phase.
__device__ __forceinline__ void bc_mbar_arrive(uint64_t* bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bc_smem_addr(bar)) : "memory");
}
/// cp.async.mbarrier.arrive.noinc: the barrier tracks every prior cp.async of this thread and
/// one arrive-on happens when they have all completed (PTX ISA, "cp.async.mbarrier.arrive"); .noinc:
/// the arrival counts against the init count (the pending count is not raised first). The
/// thread goes on at once (no cp.async.wait_group). The arrive-on releases the copies to the
/// phase's waiters, not this thread's ordinary stores (those need an mbarrier.arrive after them),
/// and a waiter reading them through wgmma executes fence.proxy.async after its wait.
__device__ __forceinline__ void bc_cp_async_mbar_arrive_noinc(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bc_smem_addr(bar)) : "memory");
}
/// cp.async.mbarrier.arrive: the same, the pending count raised by one first (the phase's count
/// of arrivals stays as it was: the arrive-on only delays the phase until the copies land).
__device__ __forceinline__ void bc_cp_async_mbar_arrive(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(bc_smem_addr(bar)) : "memory");
}
/// mbarrier.arrive.expect_tx: the current phase also waits for `bytes` more bytes of bulk
/// copies, and one arrival.
__device__ __forceinline__ void bc_mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(
                     bc_smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
/// Waits (try_wait.parity in a loop) until the phase of parity `parity` has completed.
__device__ __forceinline__ void bc_mbar_wait(uint64_t* bar, unsigned parity) {
    const unsigned a = bc_smem_addr(bar);
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(a), "r"(parity)
            : "memory");
    } while (!done);
}
/// cp.async.bulk.tensor tile-mode load of box `c` (innermost coordinate first; may lie partly
/// or wholly outside the tensor: zero fill) of `map` into `dst` (128-byte aligned; on the
/// swizzle's 8W-byte period when swizzled), completing its bytes on `bar`.
template <int RANK>
__device__ __forceinline__ void bc_tma_load(void* dst, const BcTensorMap* map, uint64_t* bar, const int (&c)[RANK]) {
    static_assert(RANK >= 1 && RANK <= 5, "tensor rank");
    const unsigned d = bc_smem_addr(dst), b = bc_smem_addr(bar);
    const unsigned long long m = reinterpret_cast<unsigned long long>(map);
    if constexpr (RANK == 1)
        asm volatile(
            "cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2}], [%3];\n" ::"r"(d),
            "l"(m), "r"(c[0]), "r"(b)
            : "memory");
    else if constexpr (RANK == 2)
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
                d),
            "l"(m), "r"(c[0]), "r"(c[1]), "r"(b)
            : "memory");
    else if constexpr (RANK == 3)
        asm volatile(
            "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
                d),
            "l"(m), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(b)
            : "memory");
    else if constexpr (RANK == 4)
        asm volatile(
            "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
            "[%6];\n" ::"r"(d),
            "l"(m), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(b)
            : "memory");
    else
        asm volatile(
            "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], "
            "[%7];\n" ::"r"(d),
            "l"(m), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(c[4]), "r"(b)
            : "memory");
}
#else
// Emulation (cuda/emu/tma.h).
inline void bc_mbar_init(uint64_t* bar, unsigned count) { ::emu::mbar_init(bar, count, __FILE__, __LINE__); }
inline void bc_mbar_init_fence() {}
inline void bc_mbar_arrive(uint64_t* bar) { ::emu::mbar_arrive(bar, 0, true, __FILE__, __LINE__); }
inline void bc_mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    ::emu::mbar_arrive(bar, bytes, true, __FILE__, __LINE__);
}
inline void bc_cp_async_mbar_arrive_noinc(uint64_t* bar) { ::emu::mbar_cp_arrive(bar, true, __FILE__, __LINE__); }
inline void bc_cp_async_mbar_arrive(uint64_t* bar) { ::emu::mbar_cp_arrive(bar, false, __FILE__, __LINE__); }
inline void bc_mbar_wait(uint64_t* bar, unsigned parity) { ::emu::mbar_wait(bar, parity, __FILE__, __LINE__); }
template <int RANK>
inline void bc_tma_load(void* dst, const BcTensorMap* map, uint64_t* bar, const int (&c)[RANK]) {
    static_assert(RANK >= 1 && RANK <= 5, "tensor rank");
    ::emu::tma_load(dst, map, bar, c, RANK, __FILE__, __LINE__);
}
#endif
#endif

#endif
