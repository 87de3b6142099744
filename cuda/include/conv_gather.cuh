// The operand gathers and the epilogue of the Hopper wgmma convolutions, shared by
// cuda/conv_wgmma.cu (`bc_conv_wgmma*`: two warpgroups that both copy and compute) and
// cuda/conv_ws.cu (`bc_conv_wgmma_ws*`: a producer warpgroup copies for two consumer
// warpgroups), so both walk K, fill the swizzled tiles and store exactly alike (the same
// output bits).
//
// K is walked per source as the flat sequence (tap, channel) of taps * channels values, CW_BK =
// 64 at a time (one k-step): a k-step may cross from one tap into the next (each copying
// thread's 8-channel chunk has its own tap and channel); past the end of a source's K the chunk
// is zero (the next source starts a fresh k-step). A k-step's A tile is CW_BM = 128 pixel rows,
// its B tile BN output-channel rows, each row 64 bf16 = 128 bytes in the K-major 128-byte
// swizzle layout of wgmma: row r at r * 128, its 16-byte chunk c at chunk c ^ (r % 8). The
// copies are cp.async with zero fill (src-size 0) exactly where bc_conv zero-fills: pixels past
// the grid, taps outside the frame, chunks past a source's K, channels past cout.
#ifndef BC_CONV_GATHER_CUH
#define BC_CONV_GATHER_CUH

#include "conv.cuh"
#include "mma.cuh"
#include "wgmma.cuh"
#include "wgmma_conv.cuh"

constexpr int CW_BM = BC_CONV_WG_BM;           // pixel rows per tile (128)
constexpr int CW_BK = BC_CONV_WG_BK;           // K values per k-step (64)
constexpr int CW_ROWB = CW_BK * 2;             // 128 bytes: one swizzle-atom row
constexpr int CW_A_BYTES = CW_BM * CW_ROWB;    // 16 KB
constexpr int CW_CPR = CW_ROWB / 16;           // 16-byte chunks per row (8)
constexpr int CW_WM = BC_WGMMA_M;              // pixel rows per warpgroup (64)
constexpr int CW_KSTEPS = CW_BK / BC_WGMMA_K;  // wgmma per k-step (4)
static_assert(CW_ROWB == 128, "one 128-byte swizzle row per k-step");
static_assert(CW_A_BYTES % 1024 == 0, "tiles on the swizzle period");

#if BC_HAS_WGMMA
/// The k-steps of a launch: per source ceil(taps * channels / CW_BK).
__device__ __forceinline__ int cw_steps(const BcConvParams& p, const CvGeo& geo) {
    int steps = 0;
    for (int i = 0; i < p.num_src; ++i) steps += (geo.taps * cv_src(p, geo, i).channels + CW_BK - 1) / CW_BK;
    return steps;
}

/// One of NT copying threads (t = 0..NT-1): it moves chunk cc = t % 8 (channels 8cc..8cc+7 of
/// each k-step) of the A and B rows ar + i * RP (ar = t / 8); all its rows have the swizzle
/// phase ar % 8, so the chunk lands at chunk cc ^ (ar % 8) of each. `load` fills one stage
/// with the next k-step and advances the cursor (source s, its k-steps still to load `left`,
/// the chunk's tap and channel ci). ROWOFF: the thread also keeps each A row's element offset
/// in the current source (`rbase`), so that a k-step's A address is that plus one offset of
/// the tap (the same address, modulo 2^64, with far fewer instructions per chunk; the
/// warp-specialized kernel's producer issues every chunk of the block); sources read through
/// the 2x upsample (outside the parity form) keep the per-chunk cv_src_off.
template <int NT, bool ROWOFF = false>
struct CwGather {
    static constexpr int RP = NT / CW_CPR;          // rows per copy pass
    static constexpr int A_PASSES = CW_BM / RP;     // A chunks per thread per k-step
    static_assert(RP % 8 == 0 && CW_BM % RP == 0, "a thread's rows share their swizzle phase");
    int cc, ar;
    unsigned dst;  // (row ar, chunk cc) in a tile
    int py[A_PASSES], px[A_PASSES];
    int s, tap, ci, left;
    CvSrc src;
    long long ktot;  // weight elements per output channel (per parity)
    size_t rbase[ROWOFF ? A_PASSES : 1];  // (py * gw + px) * stride of the current source

    /// With ROWOFF: rbase for the current source.
    __device__ __forceinline__ void set_rows(const CvGeo& geo) {
        if constexpr (ROWOFF) {
#pragma unroll
            for (int i = 0; i < A_PASSES; ++i) rbase[i] = (size_t)((long long)py[i] * geo.gw + px[i]) * (size_t)src.stride;
        }
    }

    __device__ __forceinline__ CwGather(const BcConvParams& p, const CvGeo& geo, int m0, int t)
        : cc(t % CW_CPR), ar(t / CW_CPR), s(0) {
        cv_rows(geo, m0 + ar, RP, py, px);
        dst = ar * CW_ROWB + ((cc ^ (ar % 8)) << 4);
        src = cv_src(p, geo, 0);
        tap = 8 * cc / src.channels;
        ci = 8 * cc % src.channels;
        left = (geo.taps * src.channels + CW_BK - 1) / CW_BK;
        ktot = (long long)p.kt * geo.taps * p.cin;
        set_rows(geo);
    }

    /// The A chunks of this k-step (tap offset dy, dx), the source offset of row i at grid pixel
    /// (yy, xx) given by off(i, yy, xx).
    template <class Off>
    __device__ __forceinline__ void load_a(const CvGeo& geo, bool kok, int dy, int dx, bc_saddr st, Off off) {
#pragma unroll
        for (int i = 0; i < A_PASSES; ++i) {
            const int yy = py[i] + dy, xx = px[i] + dx;
            const bool ok = kok && yy >= 0 && yy < geo.gh && xx >= 0 && xx < geo.gw;
            const __nv_bfloat16* a = ok ? src.x + off(i, yy, xx) + ci : src.x;
            bc_cp_async16_zfill(st + dst + i * RP * CW_ROWB, a, ok ? 16 : 0);
        }
    }

    /// The next k-step into the stage at `st`: A (CW_A_BYTES) then BN B rows from channel n0.
    template <int BN>
    __device__ __forceinline__ void load(const BcConvParams& p, const CvGeo& geo, int n0, bc_saddr st) {
        static_assert(BN % RP == 0, "B copy passes");
        const int taps = geo.taps;
        const bool kok = tap < taps;
        const int dy = tap / geo.kw + geo.oy, dx = tap % geo.kw + geo.ox;
        if (ROWOFF && !(src.up && geo.z < 0)) {
            // (yy * gw + xx) * stride = rbase + (dy * gw + dx) * stride, modulo 2^64 as cv_src_off
            const size_t toff = (size_t)((long long)dy * geo.gw + dx) * (size_t)src.stride;
            load_a(geo, kok, dy, dx, st, [&](int i, int, int) { return rbase[ROWOFF ? i : 0] + toff; });
        } else {
            load_a(geo, kok, dy, dx, st, [&](int, int yy, int xx) { return cv_src_off(p, geo, src, yy, xx); });
        }
        const __nv_bfloat16* wk = p.w + geo.w0 + (long long)(src.t * taps + tap) * p.cin + src.c0 + ci;
#pragma unroll
        for (int i = 0; i < BN / RP; ++i) {
            const int n = n0 + ar + i * RP;
            const bool ok = kok && n < p.cout;
            bc_cp_async16_zfill(st + CW_A_BYTES + dst + i * RP * CW_ROWB, ok ? wk + n * ktot : p.w, ok ? 16 : 0);
        }
        // Advance: 64 values along this source's (tap, channel) sequence, or the next source.
        if (--left == 0) {
            if (++s < p.num_src) {
                src = cv_src(p, geo, s);
                left = (taps * src.channels + CW_BK - 1) / CW_BK;
                set_rows(geo);
            }
            tap = 8 * cc / src.channels;
            ci = 8 * cc % src.channels;
        } else {
            ci += CW_BK;
            while (ci >= src.channels) {
                ci -= src.channels;
                ++tap;
            }
        }
    }
};

/// One k-step of a warpgroup's wgmma (its operands in shared memory, landed and visible to the
/// async proxy): CW_KSTEPS m64nBNk16 at the descriptors da0, db0 moved `off` (descriptor units:
/// the stage), 16 channels (32 bytes) apart, committed as one group; then wait_group 1, so the
/// previous k-step's group is complete (its stage may be refilled) while this one runs.
template <int BN>
__device__ __forceinline__ void cw_kstep(float (&acc)[BN / 2], uint64_t da0, uint64_t db0, uint64_t off) {
    bc_wgmma_fence_operand(acc);
    bc_wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < CW_KSTEPS; ++ks) bc_wgmma_ss<BN>(acc, da0 + off + 2 * ks, db0 + off + 2 * ks, 1);
    bc_wgmma_commit();
    bc_wgmma_wait<1>();
    bc_wgmma_fence_operand(acc);
}

/// The epilogue of one warpgroup's m64 x BN accumulator (rows from pixel m0, channels from
/// n0; warp of the warpgroup, g = lane / 4, q = lane % 4): register 4j + 2e2 + e1 is pixel
/// m0 + 16 warp + g + 8 e2, channel n0 + 8j + 2q + e1; column pairs go to cv_store_pair.
template <int BN>
__device__ __forceinline__ void cw_epilogue(const BcConvParams& p, const CvGeo& geo, const float (&acc)[BN / 2], int m0,
                                            int n0, int warp, int g, int q) {
    const int hw = geo.gh * geo.gw;
    const bool pairs = cv_pairs(p);
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
        const int m = m0 + 16 * warp + g + 8 * e2;
        if (m >= hw) continue;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int n = n0 + 8 * j + 2 * q;  // even
            if (n < p.cout) cv_store_pair(p, geo, pairs, cv_out_pixel(p, geo, m), n, acc[4 * j + 2 * e2], acc[4 * j + 2 * e2 + 1]);
        }
    }
}
#endif

#endif
