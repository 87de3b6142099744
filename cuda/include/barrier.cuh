// Named barriers: `bar.sync id, n` / `bar.arrive id, n` (PTX ISA, "Parallel Synchronization and
// Communication Instructions: bar, barrier"). A block has 16 hardware barriers; id 0 is the one
// __syncthreads uses (all threads), ids 1..15 take `n` threads (a multiple of 32): `bar.sync`
// arrives and waits until `n` threads have arrived in the barrier's current phase, `bar.arrive`
// arrives without waiting (a producer signalling consumers, or one warpgroup handing the tensor
// cores to the other). Both are .aligned: every thread of a warp executes them together. When a
// phase completes, the memory accesses its participants made before arriving are visible to the
// ones that waited.
//
// Under the SIMT emulation (cuda/emu, emu::named_barrier) the same semantics with errors for
// what hangs or is undefined on hardware: ids outside 1..15 (0 is __syncthreads' there), counts
// not a multiple of 32 or over the block size, participants of one phase giving different
// counts, a thread arriving twice in one phase, partly arrived warps, waits that can never
// complete (deadlock), arrivals still pending at block exit. The macros carry the caller's source
// line into those messages.
#ifndef BC_BARRIER_CUH
#define BC_BARRIER_CUH

#include "common.cuh"

#ifdef __CUDACC__
/// `bar.sync id, n`: arrive at named barrier `id` and wait for `n` threads (this one included).
__device__ __forceinline__ void bc_bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
/// `bar.arrive id, n`: arrive at named barrier `id` (of `n` threads) without waiting.
__device__ __forceinline__ void bc_bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
#else
#define bc_bar_sync(id, n) ::emu::named_barrier((id), (n), true, __FILE__, __LINE__)
#define bc_bar_arrive(id, n) ::emu::named_barrier((id), (n), false, __FILE__, __LINE__)
#endif

/// `setmaxnreg.{inc,dec}.sync.aligned.u32 N`: this warpgroup's per-thread register maximum
/// becomes N (PTX ISA, "setmaxnreg"; every warp of the warpgroup executes it; sm_90a). The
/// warp-specialized kernels (cuda/attention_ws.cu, cuda/conv_ws.cu) hand their producer's
/// registers to the consumers this way; the emulation keeps the block's register pool and
/// reports an .inc that can never be satisfied as a deadlock.
template <bool INC, int N>
__device__ __forceinline__ void bc_setmaxnreg() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg count");
#ifdef __CUDACC__
    if constexpr (INC)
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
    else
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#else
    ::emu::setmaxnreg(INC, N, __FILE__, __LINE__);
#endif
}

#endif
