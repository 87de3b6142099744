// bc_wgmma_probe: the Hopper warpgroup-MMA layout probe (a test kernel, not used by the engine).
// Each of p.warpgroups warpgroups (BC_WGMMA_PROBE_THREADS = 128 threads each, grid (1)) computes
//   c[j][64][n] = a[64][K] . b[n][K]^T     (K = BC_WGMMA_PROBE_K = 64, n = 64, 128 or 256)
// with wgmma.mma_async.m64nNk16.f32.bf16.bf16 (../include/wgmma.cuh): a and b (row-major,
// K contiguous) are copied to shared memory in the K-major layout of p.swizzle (none, 128B,
// 64B, 32B; tiles at a 1024-byte boundary of the shared window, the layout of
// bc_wgmma_kmajor_offset; with p.b_mn_major B goes MN-major instead, [K][n] with n contiguous,
// the layout of bc_wgmma_mnmajor_offset, read by the imm-trans-b = 1 form: the V of P V), then
// K/16 mma steps accumulate into the f32 fragment (the first with
// scale-d 0 over NaN registers, so a scale-d that is not honoured shows), A from shared memory
// through descriptors or (p.a_regs) from registers, B from shared memory; one commit, one
// wait_group 0 (or, p.pipelined, one group per k-step with wait_group 1 in between), and the
// fragment is stored by the documented D layout (thread index within the warpgroup). p.fault breaks one thing
// on purpose (BC_WGMMA_FAULT_* in params.h): B's stride off by 16 bytes, (MN-major B) its
// leading offset off by 16 bytes or the K-major form reading it (the result must be wrong, on
// a GPU too), and, for the emulation only, D read before the wait, tiles off the
// swizzle period, no wait, one warp with another descriptor, or a cp.async'd chunk read without
// a barrier after its wait (the emulation must notice).
// Checked against a CPU f32 matmul on random bf16 inputs with c poisoned first: under the
// emulation by tests/wgmma_emu.rs (which checks the emulation's reading of the PTX ISA), and on
// a Hopper GPU by tests/cuda.rs (which checks that reading against the hardware; the GPU bundle
// runs it first, one PASS/FAIL line per layout). On sm_80 the kernel traps.
#include "../include/mma.cuh"
#include "../include/wgmma.cuh"

/// k-steps of the probe (16 columns each).
#define BC_WGMMA_PROBE_KSTEPS (BC_WGMMA_PROBE_K / BC_WGMMA_K)
/// Bytes of the A tile in shared memory (the B tile follows it).
#define BC_WGMMA_PROBE_A_BYTES (BC_WGMMA_M * BC_WGMMA_PROBE_K * 2)

#if BC_HAS_WGMMA
// AREGS: A from registers, BMN: B MN-major (template parameters, so that each path is
// straight-line wgmma code).
template <int N, bool AREGS, bool BMN>
__device__ __forceinline__ void bc_wgmma_probe_run(const BcWgmmaProbeParams& p, const unsigned char* as, unsigned sa,
                                                   unsigned sb) {
    const int t = threadIdx.x % BC_WGMMA_THREADS, w = t / 32, g = (t % 32) / 4, q = t % 4;
    float* c = p.c + threadIdx.x / BC_WGMMA_THREADS * BC_WGMMA_M * N;
    constexpr int R = N / 2;
    float d[R];
#pragma unroll
    for (int i = 0; i < R; ++i) d[i] = __int_as_float(0x7fc00000);  // NaN: the first step has scale-d 0
    // A fragments (a_regs) for every k-step, loaded before the fence that orders them.
    unsigned a[BC_WGMMA_PROBE_KSTEPS][4];
#pragma unroll
    for (int s = 0; s < BC_WGMMA_PROBE_KSTEPS; ++s)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const int row = 16 * w + g + 8 * (x & 1), k = BC_WGMMA_K * s + 2 * q + 8 * (x >> 1);
            a[s][x] = AREGS ? *reinterpret_cast<const unsigned*>(
                                     as + bc_wgmma_kmajor_offset(p.swizzle, BC_WGMMA_M, BC_WGMMA_PROBE_K, row, k))
                               : 0u;
        }
    bc_wgmma_fence_operand(d);
    bc_wgmma_fence();
#pragma unroll
    for (int s = 0; s < BC_WGMMA_PROBE_KSTEPS; ++s) {
        uint64_t db = BMN ? bc_wgmma_mnmajor_desc(sb, p.swizzle, BC_WGMMA_PROBE_K, N, s)
                          : bc_wgmma_kmajor_desc(sb, p.swizzle, N, BC_WGMMA_PROBE_K, s);
        if (p.fault == BC_WGMMA_FAULT_STRIDE) db += 1ull << 32;  // stride-dimension byte offset + 16
        if (p.fault == BC_WGMMA_FAULT_LBO) db += 1ull << 16;     // leading-dimension byte offset + 16
        if (p.fault == BC_WGMMA_FAULT_DIVERGENT && w == 3) db += 1;  // start address + 16
        const uint64_t da = bc_wgmma_kmajor_desc(sa, p.swizzle, BC_WGMMA_M, BC_WGMMA_PROBE_K, s);
        if (BMN && p.fault != BC_WGMMA_FAULT_NO_TRANS) {
            if (AREGS)
                bc_wgmma_rs_nmajor<N>(d, a[s], db, s > 0);
            else
                bc_wgmma_ss_nmajor<N>(d, da, db, s > 0);
        } else {
            if (AREGS)
                bc_wgmma_rs<N>(d, a[s], db, s > 0);
            else
                bc_wgmma_ss<N>(d, da, db, s > 0);
        }
        if (p.pipelined) {
            bc_wgmma_commit();
            if (s > 0) bc_wgmma_wait<1>();  // step s-1 done, step s in flight
        }
    }
    bc_wgmma_commit();
    if (p.fault != BC_WGMMA_FAULT_EARLY_READ && p.fault != BC_WGMMA_FAULT_NO_WAIT) bc_wgmma_wait<0>();
    bc_wgmma_fence_operand(d);
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
        c[row * N + col] = d[i];
    }
    if (p.fault == BC_WGMMA_FAULT_EARLY_READ) bc_wgmma_wait<0>();
}

template <bool BMN>
__device__ __forceinline__ void bc_wgmma_probe_n(const BcWgmmaProbeParams& p, const unsigned char* as, unsigned sa,
                                                 unsigned sb) {
    if (p.n == 64)
        p.a_regs ? bc_wgmma_probe_run<64, true, BMN>(p, as, sa, sb) : bc_wgmma_probe_run<64, false, BMN>(p, as, sa, sb);
    else if (p.n == 128)
        p.a_regs ? bc_wgmma_probe_run<128, true, BMN>(p, as, sa, sb)
                 : bc_wgmma_probe_run<128, false, BMN>(p, as, sa, sb);
    else
        p.a_regs ? bc_wgmma_probe_run<256, true, BMN>(p, as, sa, sb)
                 : bc_wgmma_probe_run<256, false, BMN>(p, as, sa, sb);
}
#endif

extern "C" __global__ void __launch_bounds__(BC_WGMMA_PROBE_THREADS* BC_WGMMA_PROBE_MAX_WARPGROUPS) bc_wgmma_probe(BcWgmmaProbeParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, BC_WGMMA_PROBE_SMEM);
    // Tiles at the first 1024-byte boundary of the shared window (the 128-byte swizzle period).
    const unsigned base = bc_smem_window_addr(smem),
                   pad = (1024u - base % 1024u) % 1024u + (p.fault == BC_WGMMA_FAULT_MISALIGNED && p.n < 256 ? 128u : 0u);
    unsigned char* as = smem + pad;
    unsigned char* bs = as + BC_WGMMA_PROBE_A_BYTES;
    const unsigned sa = base + pad, sb = sa + BC_WGMMA_PROBE_A_BYTES;
    const int t = threadIdx.x, n = p.n, nt = (int)blockDim.x;
    // Element by element (the inputs need no alignment), into the swizzled K-major tiles.
    for (int i = t; i < BC_WGMMA_M * BC_WGMMA_PROBE_K; i += nt) {
        const int r = i / BC_WGMMA_PROBE_K, k = i % BC_WGMMA_PROBE_K;
        *reinterpret_cast<__nv_bfloat16*>(as + bc_wgmma_kmajor_offset(p.swizzle, BC_WGMMA_M, BC_WGMMA_PROBE_K, r, k)) =
            p.a[i];
    }
    for (int i = t; i < n * BC_WGMMA_PROBE_K; i += nt) {
        const int r = i / BC_WGMMA_PROBE_K, k = i % BC_WGMMA_PROBE_K;
        const unsigned off = p.b_mn_major ? bc_wgmma_mnmajor_offset(p.swizzle, BC_WGMMA_PROBE_K, n, k, r)
                                          : bc_wgmma_kmajor_offset(p.swizzle, n, BC_WGMMA_PROBE_K, r, k);
        *reinterpret_cast<__nv_bfloat16*>(bs + off) = p.b[i];
    }
    bc_fence_proxy_async();
    __syncthreads();
    if (p.fault == BC_WGMMA_FAULT_UNPUBLISHED) {
        if (t == 0) bc_cp_async16_zfill(bc_smem_addr(bs), p.b, 0);
        bc_cp_async_commit();
        bc_cp_async_wait_group<0>();
    }
    if (p.b_mn_major)
        bc_wgmma_probe_n<true>(p, as, sa, sb);
    else
        bc_wgmma_probe_n<false>(p, as, sa, sb);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_wgmma_probe, BcWgmmaProbeParams)
