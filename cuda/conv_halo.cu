// Persistent, weight-resident, halo-tile Hopper (sm_90a) 3x3 convolution to 64 output channels:
// `bc_conv_halo_n64`, for TAEHV's 64 -> 64 and MemBlock 128 -> 64 (cat[x, past]) layers. The same
// function, parameters (BcConvParams) and output bits as `bc_conv_wgmma_n64`
// (cuda/conv_wgmma.cu, and so bc_conv):
//
//   out[m][n] = act(bias[n] + res[m][n] + sum_{s, dy, dx, c} x_s[shift(m, dy, dx)][c] * w[n][t_s][dy][dx][c0_s + c])
//
// for the launches it fits (launch::conv_halo_fits): plain (no parity form), 3x3, every source
// 64 channels and not upsampled, at most BC_CONV_HALO_MAX_KSTEPS / 9 = 2 sources, cout = 64, the
// 16-byte path (`vec`). Same K order: per source, per tap (dy, dx) row-major, 4 wgmma k16 over
// the tap's 64 channels in order, which is bc_conv_wgmma_n64's walk of k-steps of 64 along each
// source's (tap, channel) sequence when a source has 64 channels; same epilogue (cv_store_pair).
//
// Why: for these short-K, narrow layers every 128-pixel tile of bc_conv_wgmma_n64 re-reads all
// the weights (72 or 144 KB) and each input pixel once per tap (9 times), ~43 FLOP per L2 ->
// shared byte, and pays a pipeline fill and drain per tile. Here:
//   - the grid is persistent (launch::conv_halo: about one block per SM); block b walks the
//     pixel tiles b, b + gridDim.x, ... of all frames (frame-major, tiles row-major);
//   - each block copies the layer's whole packed weight matrix into shared memory once, k-step
//     j = s * 9 + tap at W + j * 8 KB: 64 channel rows of 128 bytes in the K-major 128B swizzle
//     of wgmma (row n at n * 128, 16-byte chunk c at c ^ (n % 8)): exactly the B tile
//     bc_conv_wgmma_n64 copies for that k-step, so the same descriptor (SBO 1024, +32 bytes per
//     k16) reads it;
//   - per (tile, source) "unit" it copies the input halo once: (TH + 2) x (TW + 2) pixels x 64
//     channels, halo pixel hp = hy * HW + hx at hp * 128, its 16-byte chunk c at c ^ (hp % 8)
//     (zero fill outside the frame: the conv padding), instead of 9 shifted copies;
//   - the two warpgroups (pixels 0..63 and 64..127 of the tile, tile pixel mt at row mt / TW,
//     column mt % TW) build wgmma's A operand in registers: per tap and k16, one ldmatrix.x4
//     whose lane l gives the row address of halo pixel hp0(mt) + dy * HW + dx (mt = 16 warp +
//     8 ((l / 8) & 1) + l % 8, chunk 2 ks + l / 16): matrices 0..3 = rows 0-7 / 8-15 x k 0-7 /
//     8-15, which is mma.sync's (and wgmma's register) A fragment. TW is a multiple of 8, so a
//     matrix's 8 rows are 8 consecutive halo pixels, 8 distinct swizzle phases: no bank
//     conflict. Then wgmma m64n64k16 with A from registers, B from the resident weights.
//     A fragments alternate between two register sets by k-step parity (a wgmma may read its
//     A registers until its group completes; wait_group 1 after each k-step's commit frees the
//     set the next k-step overwrites); a source starts on the parity its first k-step has in
//     the flat k sequence (9 taps: s & 1), the tile's epilogue waits for all groups. The one
//     or two sources are unrolled (ch_run<NS>): with a runtime source loop ptxas waited for the
//     in-flight wgmma group at the branch (its note C7517).
// Pipeline (cp.async groups and one __syncthreads per unit): the weights and unit 0's halo are
// one group; unit u: wait_group 0 (unit u's halo, issued during unit u - 1, landed),
// fence.proxy.async (the weights for wgmma's async proxy), __syncthreads (every thread's
// copies landed; every thread is done with its ldmatrix of unit u - 1, whose stage is refilled
// now); issue unit u + 1's halo into the other stage, commit; 9 k-steps on unit u's stage;
// after a tile's last source: wait_group 0, the epilogue (the next unit's copies in flight
// meanwhile), accumulators zeroed.
//
// Shared memory (BC_CONV_HALO_SMEM = 194560): 18 x 8 KB weights (147456; a 64-channel source
// uses 9 k-steps), 2 halo stages of 10 x 18 x 128 = 23040 bytes, 1024 bytes of alignment slack.
// One block of 256 threads per SM.
//
// Checked by src/kernels/emu/decode.rs under the SIMT emulation (ldmatrix lane addresses, wgmma
// with A from registers and the B descriptor's swizzle, cp.async landing only at wait_group):
// every TAEHV-shaped case that fits (64 -> 64 with bias + ReLU, the MemBlock's two sources with
// residual, masked edges and odd sizes, frame-batched launches, more tiles than blocks), with
// NaN-poisoned outputs, must give bc_conv_wgmma_n64's exact bits; tests/decode_cuda_emulated.rs
// decodes a synthetic TAEHV of widths 64, 32, 16, 16 with it (9 launches; the golden tiny
// TAEHV has no 64-channel layer) and must give bc_conv_wgmma's pixels. Not caught by the
// emulation (there a cp.async lands at its thread's next wait_group, and a wgmma reads its A
// registers when issued): a refill issued before the barrier, an A register set rewritten while
// its group runs; the order above rests on the reasoning. Never run on a GPU: opt-in
// (BC_CONV_HALO=1). Below sm_90a: a stub that traps.
#include "include/conv_gather.cuh"

namespace {
constexpr int CH_TH = BC_CONV_HALO_TH;               // output rows per tile (8)
constexpr int CH_TW = BC_CONV_HALO_TW;               // output columns per tile (16)
constexpr int CH_HH = CH_TH + 2;                     // halo rows (3x3 taps)
constexpr int CH_HW = CH_TW + 2;                     // halo columns
constexpr int CH_HPX = CH_HH * CH_HW;                // halo pixels (180)
constexpr int CH_NT = BC_CONV_HALO_THREADS;          // two warpgroups
constexpr int CH_BN = BC_CONV_WG_BN_64;              // output channels (the N of m64n64k16)
constexpr int CH_STAGES = BC_CONV_HALO_STAGES;       // halo stages
constexpr int CH_MAXK = BC_CONV_HALO_MAX_KSTEPS;     // resident weight k-steps
constexpr int CH_TAPS = 9;                           // 3x3
constexpr int CH_WSTEP = CH_BN * CW_ROWB;            // 8 KB: one k-step of weights
constexpr int CH_W_BYTES = CH_MAXK * CH_WSTEP;       // 144 KB
constexpr int CH_STAGE = CH_HPX * CW_ROWB;           // 23040
constexpr int CH_SMEM = CH_W_BYTES + CH_STAGES * CH_STAGE + 1024;
static_assert(CH_TH * CH_TW == CW_BM, "a tile is the 128 pixel rows of two m64 wgmma tiles");
static_assert(CH_TW % 8 == 0, "an ldmatrix's 8 rows in one tile row (distinct swizzle phases)");
static_assert(CH_NT == 2 * BC_WGMMA_THREADS, "one warpgroup per 64 tile pixels");
static_assert(CH_STAGES == 2, "the pipeline below refills the other stage");
static_assert(CH_WSTEP % 1024 == 0, "weight k-steps on the swizzle period");
static_assert(CH_STAGE % 128 == 0, "halo stages on 128-byte rows");
static_assert(CH_SMEM == BC_CONV_HALO_SMEM && CH_SMEM <= 232448, "params.h; 227 KB per block");
}  // namespace

#if BC_HAS_WGMMA
/// Every weight k-step of the launch into the resident layout (cout rows zero-filled past cout).
__device__ __forceinline__ void ch_load_weights(const BcConvParams& p, bc_saddr wsm, int tid) {
    const CvGeo geo = cv_geo_z(p, 0);
    const long long ktot = (long long)p.kt * CH_TAPS * p.cin;
    for (int s = 0; s < p.num_src; ++s) {
        const CvSrc src = cv_src(p, geo, s);
        for (int i = tid; i < CH_TAPS * CH_BN * CW_CPR; i += CH_NT) {
            const int tap = i / (CH_BN * CW_CPR), n = i / CW_CPR % CH_BN, c = i % CW_CPR;
            const bool ok = n < p.cout;
            const __nv_bfloat16* wk = p.w + (long long)(src.t * CH_TAPS + tap) * p.cin + src.c0 + 8 * c + n * ktot;
            const unsigned dst = (unsigned)((s * CH_TAPS + tap) * CH_WSTEP + n * CW_ROWB + ((c ^ (n % 8)) << 4));
            bc_cp_async16_zfill(wsm + dst, ok ? wk : p.w, ok ? 16 : 0);
        }
    }
}

/// The halo of the tile at output pixel (y0, x0) of source `src` into the stage at `st`.
__device__ __forceinline__ void ch_load_halo(const BcConvParams& p, const CvSrc& src, int y0, int x0, bc_saddr st,
                                             int tid) {
    for (int i = tid; i < CH_HPX * CW_CPR; i += CH_NT) {
        const int hp = i / CW_CPR, c = i % CW_CPR;
        const int y = y0 - 1 + hp / CH_HW, x = x0 - 1 + hp % CH_HW;
        const bool ok = y >= 0 && y < p.h && x >= 0 && x < p.w_px;
        const __nv_bfloat16* a = ok ? src.x + ((size_t)y * p.w_px + x) * src.stride + 8 * c : src.x;
        bc_cp_async16_zfill(st + (unsigned)(hp * CW_ROWB + ((c ^ (hp % 8)) << 4)), a, ok ? 16 : 0);
    }
}

/// The 9 k-steps (taps) of one source on the halo stage `st`: this lane's ldmatrix row is halo
/// pixel hp0 + dy * HW + dx, chunk 2 ks + hi; B = the source's resident weights from `db`. P:
/// the register set of tap 0 (the source's first k-step's parity in the flat k sequence).
template <int P>
__device__ __forceinline__ void ch_taps(float (&acc)[CH_BN / 2], bc_saddr st, int hp0, int hi, uint64_t db) {
    unsigned a[2][CW_KSTEPS][4];
#pragma unroll
    for (int tap = 0; tap < CH_TAPS; ++tap) {
        const int b = (tap + P) & 1;
        const int hp = hp0 + (tap / 3) * CH_HW + tap % 3;
        const bc_saddr row = st + (unsigned)hp * CW_ROWB;
        const int ph = hp & 7;
#pragma unroll
        for (int ks = 0; ks < CW_KSTEPS; ++ks) bc_ldmatrix_x4_at(a[b][ks], row + (unsigned)(((2 * ks + hi) ^ ph) << 4));
        bc_wgmma_fence_operand(acc);
        bc_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < CW_KSTEPS; ++ks)
            bc_wgmma_rs<CH_BN>(acc, a[b][ks], db + (uint64_t)(tap * (CH_WSTEP >> 4) + 2 * ks), 1);
        bc_wgmma_commit();
        bc_wgmma_wait<1>();  // the previous k-step's group is complete: its A set may be rewritten
        bc_wgmma_fence_operand(acc);
    }
}

/// The epilogue of one warpgroup's 64 tile pixels (from tile pixel 64 wg) at output pixel
/// (y0, x0): register 4j + 2e2 + e1 is tile pixel 64 wg + 16 warp + g + 8 e2, channel
/// 8j + 2q + e1 (as cw_epilogue), column pairs to cv_store_pair.
__device__ __forceinline__ void ch_epilogue(const BcConvParams& p, const CvGeo& geo, const float (&acc)[CH_BN / 2],
                                            int y0, int x0, int wg, int warp, int g, int q) {
    const bool pairs = cv_pairs(p);
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
        const int mt = wg * CW_WM + 16 * warp + g + 8 * e2;
        const int y = y0 + mt / CH_TW, x = x0 + mt % CH_TW;
        if (y >= p.h || x >= p.w_px) continue;
        const int m = y * p.w_px + x;
#pragma unroll
        for (int j = 0; j < CH_BN / 8; ++j) {
            const int n = 8 * j + 2 * q;  // even
            if (n < p.cout) cv_store_pair(p, geo, pairs, m, n, acc[4 * j + 2 * e2], acc[4 * j + 2 * e2 + 1]);
        }
    }
}

/// A block's walk over its tiles (blockIdx.x + i gridDim.x of all frames' `total`; tw tiles per
/// tile row, tpf per frame), NS sources each: unit u = i NS + s, as the header says. The sources
/// are unrolled (NS = 1 or 2), so no accumulator of an in-flight wgmma group crosses a branch
/// (ptxas would wait for the group there).
template <int NS>
__device__ __forceinline__ void ch_run(const BcConvParams& p, bc_saddr base, unsigned wbase, int total, int tw,
                                       int tpf, int tid) {
    const int wg = tid / BC_WGMMA_THREADS, wt = tid % BC_WGMMA_THREADS, warp = wt / 32, lane = wt % 32;
    const int b0 = (int)blockIdx.x, nb = (int)gridDim.x;
    const int tiles = b0 < total ? (total - 1 - b0) / nb + 1 : 0, units = tiles * NS;
    const bc_saddr halo = base + CH_W_BYTES;
    auto load_unit = [&](int u) {
        const int i = u / NS, s = u - i * NS, t = b0 + i * nb, f = t / tpf, r = t - f * tpf;
        ch_load_halo(p, cv_src(p, cv_geo_z(p, f), s), r / tw * CH_TH, r % tw * CH_TW, halo + (u & 1) * CH_STAGE, tid);
    };
    // Unit u's halo landed (this thread's copies: wait_group 0; everyone's: the barrier, after
    // which unit u - 1's stage is free), the weights visible to wgmma's async proxy; then unit
    // u + 1's halo is issued into the other stage.
    auto begin_unit = [&](int u) {
        bc_cp_async_wait_group<0>();
        bc_fence_proxy_async();
        __syncthreads();
        if (u + 1 < units) load_unit(u + 1);
        bc_cp_async_commit();
    };
    ch_load_weights(p, base, tid);
    if (units > 0) load_unit(0);
    bc_cp_async_commit();

    uint64_t db0 = bc_wgmma_kmajor_desc(wbase, BC_WGMMA_SWIZZLE_128B, CH_BN, CW_BK, 0);
    bc_pin(db0);
    // This lane's ldmatrix row: tile pixel mt (matrix l / 8: rows +8 for matrices 1, 3; k chunk
    // +1 for 2, 3), its halo pixel at tap (0, 0) of the 3x3 (dy = dx = -1).
    const int mi = lane / 8, mt = wg * CW_WM + 16 * warp + (mi & 1) * 8 + lane % 8;
    const int hp0 = mt / CH_TW * CH_HW + mt % CH_TW, hi = mi >> 1;
    float acc[CH_BN / 2];
#pragma unroll
    for (int k = 0; k < CH_BN / 2; ++k) acc[k] = 0.f;
    for (int i = 0; i < tiles; ++i) {
        const int u = i * NS;
        begin_unit(u);
        ch_taps<0>(acc, halo + (u & 1) * CH_STAGE, hp0, hi, db0);
        if constexpr (NS == 2) {
            begin_unit(u + 1);
            ch_taps<1>(acc, halo + ((u + 1) & 1) * CH_STAGE, hp0, hi, db0 + (uint64_t)(CH_TAPS * (CH_WSTEP >> 4)));
        }
        bc_wgmma_wait<0>();
        bc_wgmma_fence_operand(acc);
        const int t = b0 + i * nb, f = t / tpf, r = t - f * tpf;
        ch_epilogue(p, cv_geo_z(p, f), acc, r / tw * CH_TH, r % tw * CH_TW, wg, warp, lane / 4, lane % 4);
#pragma unroll
        for (int k = 0; k < CH_BN / 2; ++k) acc[k] = 0.f;
    }
    bc_cp_async_wait_group<0>();
}

__device__ __forceinline__ void bc_conv_halo_impl(const BcConvParams& p, unsigned char* smem_raw) {
    BC_EMU_CHECK(p.num_src >= 1 && p.num_src * CH_TAPS <= CH_MAXK && p.kh == 3 && p.kw == 3 && !p.parity && p.vec &&
                 p.out_split > 0 && p.cout <= CH_BN && p.frames >= 1);
#ifndef __CUDACC__
    for (int s = 0; s < p.num_src; ++s) {
        const CvSrc src = cv_src(p, cv_geo_z(p, 0), s);
        BC_EMU_CHECK(src.channels == CW_BK && !src.up);
    }
#endif
    // The weights start on the first 1024-byte boundary of the shared window (the swizzle period).
    const unsigned w0 = bc_smem_window_addr(smem_raw), pad = (1024u - w0 % 1024u) % 1024u;
    bc_saddr base = bc_smem_addr(smem_raw + pad);
    bc_pin(base);
    // Tiles: tw per tile row, tpf per frame, over all frames.
    const int tw = (p.w_px + CH_TW - 1) / CH_TW, tpf = tw * ((p.h + CH_TH - 1) / CH_TH);
    if (p.num_src == 2)
        ch_run<2>(p, base, w0 + pad, tpf * p.frames, tw, tpf, (int)threadIdx.x);
    else
        ch_run<1>(p, base, w0 + pad, tpf * p.frames, tw, tpf, (int)threadIdx.x);
}
#endif

// 256 threads (two warpgroups), 8 x 16 output pixels x 64 channels per tile, a persistent grid
// (gridDim.x blocks walk all frames' tiles; y = z = 1), BC_CONV_HALO_SMEM bytes of dynamic shared
// memory. Opt-in: BC_CONV_HALO=1.
extern "C" __global__ void __launch_bounds__(CH_NT, 1) bc_conv_halo_n64(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CH_SMEM);
    bc_conv_halo_impl(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_halo_n64, BcConvParams)
