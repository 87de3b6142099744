// Emulation-only test kernels (never compiled by nvcc: they are deliberately wrong CUDA).
// Used by tests/kernels_emu.rs to check that the emulator reports, rather than hangs on,
// divergent barriers and bad warp-collective masks.
//
// bc_test_sync: data[i] = sum over the block of data (via shared memory and a barrier);
//   mode 0: correct; mode 1: thread `arg` returns before the barrier (divergent
//   __syncthreads); mode 2: odd threads wait at a different __syncthreads;
//   mode 3: __shfl_xor_sync with a mask that omits lane `arg`; mode 4: lane `arg` exits
//   before a full-mask shuffle.
//   Named barriers (cuda/include/barrier.cuh; a block of two halves of whole warps, n threads):
//   mode 5: correct: three rounds of a ping-pong (lower half writes, bar.arrive 1; upper half
//   bar.sync 1, reads the lower values, writes, bar.arrive 2; lower bar.sync 2, reads the upper
//   values; the value of round r is data + r): a lower thread gets 3 * (sum of the upper half)
//   + 3 * n/2, an upper one 3 * (sum of the lower half) + 3 * n/2; mode 6: the upper half waits
//   at barrier 3 instead of 1 (wrong id: deadlock); mode 7: the upper half gives count n/2;
//   mode 8: the upper half never arrives at 2 (missing arrive: deadlock); mode 9: an extra
//   bar.arrive nobody waits for before the exit; mode 10: barrier id 0; mode 11: the lower half
//   arrives at 1 twice per round.
#include "../include/barrier.cuh"
#include "../include/common.cuh"
#include "../include/mma.cuh"
#include "../include/tma.cuh"
#include "../include/wgmma.cuh"

struct BcTestParams {
    float* data;
    int n;
    int mode;
    int arg;
    int _pad;
};

// Modes 20-22: waits on the emulated mbarrier (cuda/emu/tma.cpp) as scheduling points, in
// blocks of 64 threads (the barrier in the launch's dynamic shared memory).
//   20: warp 1 (after a __syncwarp, so warp 0 gets there first) completes phase 0 (32
//       arrivals) that lane 0 of warp 0 waits for, while lanes 1-31 of warp 0 already wait
//       at a full-warp shuffle of lane 0's value: data = 42 in warp 0, 7 in warp 1;
//   21: every thread waits for a phase nobody arrives on (a reported deadlock);
//   22: thread 0 waits for a phase that thread 1 completes only after a __syncthreads that
//       thread 0 never reaches (a reported deadlock).
__device__ void bc_test_mbar(const BcTestParams& p) {
    BC_DYNAMIC_SMEM(smem, 8);
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    const int t = threadIdx.x, warp = t / 32;
    if (t == 0) bc_mbar_init(bar, p.mode == 20 ? 32 : 1);
    bc_mbar_init_fence();
    __syncthreads();
    float v = 7.f;
    if (p.mode == 20) {
        if (warp == 1) {
            __syncwarp();
            bc_mbar_arrive(bar);
        } else {
            if (t == 0) bc_mbar_wait(bar, 0);
            v = __shfl_sync(0xffffffffu, t == 0 ? 42.f : 0.f, 0);
        }
    } else if (p.mode == 21) {
        bc_mbar_wait(bar, 0);
    } else if (t == 0) {
        bc_mbar_wait(bar, 0);
    } else {
        __syncthreads();
        if (t == 1) bc_mbar_arrive(bar);
    }
    p.data[blockIdx.x * blockDim.x + t] = v;
}

// Modes 30-33: the race check of asynchronous shared-memory copies (emu.h, async_write) in a
// block of 256 threads: warpgroup 0 produces a 64x16 A and a 64x16 B tile of bf16 ones (K-major,
// no swizzle; one 16-byte cp.async of each per thread) and publishes them on mbarrier `full`;
// warpgroup 1 waits for it, runs one wgmma m64n64k16 and stores D[0] of each thread (16) at
// data[128 + t]; then it releases the tiles on mbarrier `empty` and the producer copies into
// A again (a refill).
//   30: correct: wait_group 0, fence.proxy.async, arrive; the release after wgmma.wait_group;
//   31: the producer arrives on `full` before its wait_group (a stage published before its
//       copies landed): the wgmma is issued on pending copies, a reported race;
//   32: the consumers release the tiles before their wgmma.wait_group: the refill is issued
//       while the wgmma may still read A, a reported race;
//   33: warp 0 reads its own cp.async destination with ldmatrix before the wait_group.
// Modes 34-38: the same hand-over through cp.async.mbarrier.arrive (tma.h, mbar_cp_arrive): the
// producer issues its copies and hands them to `full` without any wait_group; the consumers
// fence the async proxy after their wait (the copies land when every thread is blocked, phase 0
// being even):
//   34: correct, .noinc (full counts the 128 asynchronous arrivals);
//   35: the consumers omit fence.proxy.async: a reported error;
//   36: correct, without .noinc (the asynchronous arrive raises the pending count, so each
//       producer thread also arrives itself);
//   37: the asynchronous arrive before the cp.async (nothing tracked: the phase completes at
//       once, the wgmma is issued on pending copies), a reported race;
//   38: the consumers fence before their wait instead of after it: a reported error.
__device__ void bc_test_race(const BcTestParams& p) {
    constexpr int TILE = BC_WGMMA_M * BC_WGMMA_K * 2;  // bytes of A (and of B: N = 64)
    BC_DYNAMIC_SMEM(smem, 2 * TILE + 16);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + 2 * TILE);
    uint64_t* empty = full + 1;
    const int t = threadIdx.x % BC_WGMMA_THREADS, wg = threadIdx.x / BC_WGMMA_THREADS;
    if (threadIdx.x == 0) {
        bc_mbar_init(full, BC_WGMMA_THREADS);
        bc_mbar_init(empty, BC_WGMMA_THREADS);
    }
    bc_mbar_init_fence();
    __syncthreads();
    // Thread t's chunk of each tile: row t / 2, columns 8 (t % 2) ..
    const int off = (int)bc_wgmma_kmajor_offset(BC_WGMMA_SWIZZLE_NONE, BC_WGMMA_M, BC_WGMMA_K, t / 2, 8 * (t % 2));
    alignas(16) static const unsigned ones[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
    if (p.mode == 33) {
        if (threadIdx.x < 32) {
            bc_cp_async16(smem + 16 * threadIdx.x, ones);
            bc_cp_async_commit();
            unsigned r[4];
            bc_ldmatrix_x4(r, smem + 16 * threadIdx.x);  // before the wait: a race
            bc_cp_async_wait_group<0>();
            p.data[threadIdx.x] = (float)r[0];
        }
        return;
    }
    if (wg == 0) {
        if (p.mode == 37) bc_cp_async_mbar_arrive_noinc(full);  // before the copies: tracks none
        bc_cp_async16(smem + off, ones);
        bc_cp_async16(smem + TILE + off, ones);
        bc_cp_async_commit();
        if (p.mode >= 34) {
            if (p.mode == 36) {
                bc_cp_async_mbar_arrive(full);
                bc_mbar_arrive(full);
            } else if (p.mode != 37) {
                bc_cp_async_mbar_arrive_noinc(full);
            }
        } else {
            if (p.mode == 31) bc_mbar_arrive(full);  // published one wait_group too early
            bc_cp_async_wait_group<0>();
            bc_fence_proxy_async();
            if (p.mode != 31) bc_mbar_arrive(full);
        }
        bc_mbar_wait(empty, 0);
        bc_cp_async16(smem + off, ones);  // the refill
        bc_cp_async_commit();
        bc_cp_async_wait_group<0>();
        return;
    }
    const unsigned sa = bc_smem_window_addr(smem);
    float d[BC_WGMMA_M / 2];
    if (p.mode == 38) bc_fence_proxy_async();  // too early: the copies land after it
    bc_mbar_wait(full, 0);
    if (p.mode >= 34 && p.mode != 35 && p.mode != 38) bc_fence_proxy_async();
    bc_wgmma_fence();
    bc_wgmma_ss<64>(d, bc_wgmma_kmajor_desc(sa, BC_WGMMA_SWIZZLE_NONE, BC_WGMMA_M, BC_WGMMA_K, 0),
                    bc_wgmma_kmajor_desc(sa + TILE, BC_WGMMA_SWIZZLE_NONE, BC_WGMMA_M, BC_WGMMA_K, 0), 0);
    bc_wgmma_commit();
    if (p.mode == 32) bc_mbar_arrive(empty);  // released before the wgmma completed
    bc_wgmma_wait<0>();
    if (p.mode != 32) bc_mbar_arrive(empty);
    p.data[blockIdx.x * blockDim.x + threadIdx.x] = d[0];
}

// Modes 40-41: kernels that loop forever while still reaching emulated operations (they never
// deadlock): the step budget of the emulation (emu.cpp) must fail the launch, not hang. The loop
// conditions are data that never changes (data[0] is never 12345, a shared flag nobody sets).
//   40: every thread loops on a shared atomicAdd, __syncwarp and __syncthreads;
//   41: thread 0 spins on atomicAdd(flag, 0) while the others wait at a __syncthreads: the
//       scheduler never runs again, only the atomics count.
__device__ void bc_test_loop(const BcTestParams& p) {
    __shared__ int flag;
    __shared__ unsigned count;
    const int t = threadIdx.x;
    if (t == 0) {
        flag = 0;
        count = 0;
    }
    __syncthreads();
    if (p.mode == 40) {
        while (p.data[0] != 12345.f) {
            atomicAdd(&count, 1u);
            __syncwarp();
            __syncthreads();
        }
    } else if (t == 0) {
        while (atomicAdd(&flag, 0) == 0) {
        }
    }
    __syncthreads();
    p.data[blockIdx.x * blockDim.x + t] = (float)count;
}

extern "C" __global__ void bc_test_sync(BcTestParams p) {
    if (p.mode >= 40) {
        bc_test_loop(p);
        return;
    }
    if (p.mode >= 30) {
        bc_test_race(p);
        return;
    }
    if (p.mode >= 20) {
        bc_test_mbar(p);
        return;
    }
    __shared__ float s[1024];
    const int t = threadIdx.x;
    s[t] = p.data[blockIdx.x * blockDim.x + t];
    if (p.mode == 1 && t == p.arg) return;
    if (p.mode == 2 && (t & 1)) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    float v = 0.f;
    if (p.mode >= 5) {
        // Named barriers: the halves take turns (lower writes, arrives at 1; upper waits at 1,
        // reads the lower values, writes, arrives at 2; lower waits at 2, reads the upper ones).
        __shared__ float buf[1024];
        const int n = blockDim.x, h = n / 2;
        if (p.mode == 10) bc_bar_sync(0, n);
        for (int r = 0; r < 3; ++r) {
            if (t < h) {
                buf[t] = s[t] + (float)r;
                bc_bar_arrive(1, n);
                if (p.mode == 11) bc_bar_arrive(1, n);
                bc_bar_sync(2, n);
                for (int i = h; i < n; ++i) v += buf[i];
            } else {
                bc_bar_sync(p.mode == 6 ? 3 : 1, p.mode == 7 ? h : n);
                for (int i = 0; i < h; ++i) v += buf[i];
                buf[t] = s[t] + (float)r;
                if (p.mode != 8) bc_bar_arrive(2, n);
            }
        }
        if (p.mode == 9 && t >= h) bc_bar_arrive(4, n);
        p.data[blockIdx.x * blockDim.x + t] = v;
        return;
    }
    for (int i = 0; i < (int)blockDim.x; ++i) v += s[i];
    if (p.mode == 3) v = __shfl_xor_sync(~(1u << p.arg), v, 1);
    if (p.mode == 4) {
        if ((t & 31) == p.arg) return;
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    p.data[blockIdx.x * blockDim.x + t] = v;
}
BC_EMU_ENTRY(bc_test_sync, BcTestParams)
