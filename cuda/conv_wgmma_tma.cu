// Hopper (sm_90a) convolution with TMA operand loads: the function of bc_conv / bc_conv_wgmma
// (same BcConvParams inside BcConvTmaParams, same epilogue cv_store_pair), for plain
// (not upsampled) sources or upsampled ones in the sub-pixel parity form (grid z = 4
// parities; the pixel tiles then cover the sources' own pixels, each an output pixel of that
// parity, and the 2x2 taps' boxes start at the parity's offsets: cv_geo), with the copies
// taken off the math warps:
//
//   out[m][n] = act(bias[n] + res[m][n] + sum_{s, dy, dx, c} x_s[shift(m, dy, dx)][c] * w[n][t_s][dy][dx][c0_s + c])
//
// Tiles (params.h BC_CONV_TMA_*, BC_CONV_WG_BN / _BN_96): a block owns a rectangle of
// CT_TX x CT_TY = 8 x 16 output pixels (row r of the 128-row A tile is pixel (x0 + r % 8,
// y0 + r / 8)) and BN = 128 (bc_conv_wgmma_tma) or 96 (bc_conv_wgmma_tma_n96) output channels.
// Threads: warpgroups 0 and 1 consume (warpgroup j: rows 64j..64j+63, one m64nBN f32
// accumulator), warp 8 produces (lane 0 issues every TMA load; the others exit).
//
// K walk: per source, the flat sequence of (tap, 32-channel chunk) pairs, two chunks per
// k-step (a k-step may straddle two taps, as in bc_conv_wgmma: a 96-channel 3x3 source is 27
// chunks = 14 k-steps, not 18). Chunk (tap (dy, dx), c) of the A tile is ONE TMA box
// {32 channels, 8 x, 16 y} of the source (a 3-D tensor map {channels, w, h}, 64-byte swizzle)
// at (32 c, x0 + dx - kw/2, y0 + dy - kh/2): it lands as one 128-row column block (64-byte rows)
// of the K-major 64B-swizzled wgmma tile (bc_wgmma_kmajor_offset with K = 64: two column blocks
// of 8 KB, 8-row groups 512 bytes apart = SBO), and the zero padding of the frame edges and the
// channels past the source's are the TMA's out-of-bound zero fill (no edge code). Its B chunk is
// the box {32, BN} of the weights (a 2-D map {kt*kh*kw*cin, cout}) at
// ((t * taps + tap) * cin + c0 + 32 c, n0): weight columns past the source's channels belong to
// the next tap or source, but meet zero A columns; rows past cout are zero fill. An odd last
// chunk is paired with an A box wholly past the channels (all zero fill).
//
// Pipeline: CT_STAGES = 4 stages, each with a "full" mbarrier (1 arrival: the producer's
// arrive.expect_tx of the stage's A + B bytes, then the two loads complete them) and an
// "empty" one (2 arrivals: one thread per consumer warpgroup). The producer, for k-step k in
// stage s = k % 4, waits for use k / 4 - 1 of s to be released (empty parity (k / 4 + 1) & 1;
// the first round passes at once), then arms and loads (2 A and 2 B boxes). A consumer
// warpgroup waits for full parity (k / 4) & 1, issues 4 wgmma m64nBNk16 (descriptors: the
// stage's A rows 64j.., B; 16-channel step s in column block s / 2, 32 (s % 2) bytes in),
// commits, and after wait_group 1 (k-step k - 1's wgmma are done) releases
// stage (k - 1) % 4. So up to three stages of loads are in flight while one is multiplied.
//
// Checked by src/kernels/emu/decode.rs under the emulation (TMA boxes, mbarrier phases and
// wgmma from the PTX ISA, cuda/emu/tma.cpp): every conv case of bc_conv that fits (plain
// 8-aligned sources, > 16 output channels) runs through it against the CPU conv with
// NaN-poisoned outputs; tests/decode_cuda_emulated.rs decodes the tiny golden decoders with it.
// Never run on a GPU: the decoder uses it only with BC_CONV_WGMMA=1 and BC_CONV_TMA=1 on a
// compute capability 9.0 device. Below sm_90a: a stub that traps.
#include "include/conv.cuh"
#include "include/tma.cuh"
#include "include/wgmma.cuh"
#include "include/wgmma_conv.cuh"

namespace {
constexpr int CT_TX = BC_CONV_TMA_TX, CT_TY = BC_CONV_TMA_TY;
constexpr int CT_BM = CT_TX * CT_TY;                // 128 pixel rows
constexpr int CT_BK = 64;                           // channels per k-step
constexpr int CT_CH = 32;                           // channels per TMA box (a 64-byte row)
constexpr int CT_ROWB = CT_CH * 2;                  // 64: one 64B-swizzle row
constexpr int CT_A_BLOCK = CT_BM * CT_ROWB;         // 8 KB: one A box (column block)
constexpr int CT_A_BYTES = 2 * CT_A_BLOCK;          // 16 KB
constexpr int CT_STAGES = BC_CONV_TMA_STAGES;
constexpr int CT_NT = BC_CONV_TMA_THREADS;
constexpr int CT_CONSUMERS = 2 * BC_WGMMA_THREADS;  // threads of the two consumer warpgroups
constexpr int CT_WM = CT_BM / 2;                    // pixel rows per warpgroup (64)
constexpr int CT_KSTEPS = CT_BK / BC_WGMMA_K;       // wgmma per k-step (4)
static_assert(CT_BM == BC_CONV_WG_BM && CT_WM == BC_WGMMA_M, "two m64 tiles of 128 pixel rows");
static_assert(CT_NT == CT_CONSUMERS + 32, "two consumer warpgroups and one producer warp");
static_assert(CT_A_BLOCK % 512 == 0, "column blocks on the 64B swizzle period");

template <int BN_>
struct CtCfg {
    static constexpr int BN = BN_;
    static constexpr int B_BLOCK = BN * CT_ROWB;  // one B box (column block)
    static constexpr int B_BYTES = 2 * B_BLOCK;
    static constexpr int STAGE = CT_A_BYTES + B_BYTES;
    static constexpr int SMEM = CT_STAGES * STAGE + 1024 + 16 * CT_STAGES;
    static_assert(STAGE % 1024 == 0, "stages on the swizzle period");
};
using CtWide = CtCfg<BC_CONV_WG_BN>;
using CtN96 = CtCfg<BC_CONV_WG_BN_96>;
static_assert(CtWide::SMEM == BC_CONV_TMA_SMEM && CtN96::SMEM == BC_CONV_TMA_N96_SMEM, "params.h smem sizes");
}  // namespace

#if BC_HAS_WGMMA && BC_HAS_TMA
template <class Cfg>
__device__ __forceinline__ void bc_conv_tma_impl(const BcConvTmaParams& pt, unsigned char* smem_raw) {
    constexpr int BN = Cfg::BN, STAGE = Cfg::STAGE;
    const BcConvParams& p = pt.conv;
    BC_EMU_CHECK(p.num_src >= 1 && p.num_src <= BC_CONV_MAX_SOURCES && p.vec && pt.tiles_x > 0);
    const int tid = threadIdx.x;
    const int x0 = (int)(blockIdx.x % (unsigned)pt.tiles_x) * CT_TX, y0 = (int)(blockIdx.x / (unsigned)pt.tiles_x) * CT_TY;
    const int n0 = blockIdx.y * BN;
    const CvGeo geo = cv_geo(p);
    const int taps = geo.taps;

    unsigned char* smem = smem_raw + (1024u - bc_smem_window_addr(smem_raw) % 1024u) % 1024u;
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + CT_STAGES * STAGE);
    uint64_t* empty = full + CT_STAGES;
    int steps = 0;
    for (int s = 0; s < p.num_src; ++s) steps += (taps * ((cv_src(p, geo, s).channels + CT_CH - 1) / CT_CH) + 1) / 2;

    if (tid == 0) {
        for (int s = 0; s < CT_STAGES; ++s) {
            bc_mbar_init(&full[s], 1);
            bc_mbar_init(&empty[s], 2);
        }
    }
    bc_mbar_init_fence();
    __syncthreads();

    if (tid >= CT_CONSUMERS) {
        // The producer: lane 0 of warp 8 walks (source, tap, chunk).
        if (tid != CT_CONSUMERS) return;
        int k = 0;
        for (int s = 0; s < p.num_src; ++s) {
            const CvSrc src = cv_src(p, geo, s);
            const int cpt = (src.channels + CT_CH - 1) / CT_CH, chunks = taps * cpt;
            for (int i = 0; i < chunks; i += 2, ++k) {
                const int st = k % CT_STAGES;
                bc_mbar_wait(&empty[st], (unsigned)((k / CT_STAGES + 1) & 1));
                unsigned char* a = smem + st * STAGE;
                bc_mbar_arrive_expect_tx(&full[st], STAGE);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    // Chunk i + h; past the last one: tap 0, channels cpt * 32.. (all zero fill).
                    const bool in = i + h < chunks;
                    const int tap = in ? (i + h) / cpt : 0, c = in ? (i + h) % cpt : cpt;
                    const int ca[3] = {c * CT_CH, x0 + tap % geo.kw + geo.ox, y0 + tap / geo.kw + geo.oy};
                    bc_tma_load<3>(a + h * CT_A_BLOCK, &pt.src_map[s], &full[st], ca);
                    // Parity form: the weight map stacks the 4 parities' rows (cout each).
                    const int cb[2] = {(src.t * taps + tap) * p.cin + src.c0 + c * CT_CH, n0 + max(geo.z, 0) * p.cout};
                    bc_tma_load<2>(a + CT_A_BYTES + h * Cfg::B_BLOCK, &pt.w_map, &full[st], cb);
                }
            }
        }
        return;
    }

    // The consumers.
    const int wg = tid / BC_WGMMA_THREADS, wt = tid % BC_WGMMA_THREADS;
    const int warp = wt / 32, lane = wt % 32, g = lane / 4, q = lane % 4;
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
    const unsigned wbase = bc_smem_window_addr(smem);
    // 64B swizzle, K = 64: 16-channel step ks in column block ks / 2 (A blocks CT_A_BLOCK apart,
    // B blocks B_BLOCK apart), 32 (ks % 2) bytes into its rows.
    const uint64_t da0 = bc_wgmma_kmajor_desc(wbase + wg * CT_WM * CT_ROWB, BC_WGMMA_SWIZZLE_64B, CT_BM, CT_BK, 0);
    const uint64_t db0 = bc_wgmma_kmajor_desc(wbase + CT_A_BYTES, BC_WGMMA_SWIZZLE_64B, BN, CT_BK, 0);
    for (int k = 0; k < steps; ++k) {
        const int st = k % CT_STAGES;
        bc_mbar_wait(&full[st], (unsigned)((k / CT_STAGES) & 1));
        const uint64_t off = (uint64_t)(st * (STAGE >> 4));
        bc_wgmma_fence_operand(acc);
        bc_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < CT_KSTEPS; ++ks)
            bc_wgmma_ss<BN>(acc, da0 + off + (ks / 2) * (CT_A_BLOCK >> 4) + 2 * (ks % 2),
                            db0 + off + (ks / 2) * (Cfg::B_BLOCK >> 4) + 2 * (ks % 2), 1);
        bc_wgmma_commit();
        bc_wgmma_wait<1>();
        bc_wgmma_fence_operand(acc);
        // k-step k - 1's wgmma are done: its stage may be refilled.
        if (k > 0 && wt == 0) bc_mbar_arrive(&empty[(k - 1) % CT_STAGES]);
    }
    bc_wgmma_wait<0>();
    bc_wgmma_fence_operand(acc);

    // Epilogue: register 4j + 2e2 + e1 is tile row 64 wg + 16 warp + g + 8 e2, channel
    // n0 + 8j + 2q + e1; tile row r is pixel (x0 + r % 8, y0 + r / 8).
    const bool pairs = cv_pairs(p);
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
        const int r = wg * CT_WM + 16 * warp + g + 8 * e2;
        const int x = x0 + r % CT_TX, y = y0 + r / CT_TX;
        if (x >= geo.gw || y >= geo.gh) continue;
        const int m = cv_out_pixel(p, geo, y * geo.gw + x);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int n = n0 + 8 * j + 2 * q;
            if (n < p.cout) cv_store_pair(p, geo, pairs, m, n, acc[4 * j + 2 * e2], acc[4 * j + 2 * e2 + 1]);
        }
    }
}
#endif

extern "C" __global__ void __launch_bounds__(CT_NT, 1) bc_conv_wgmma_tma(const __grid_constant__ BcConvTmaParams p) {
#if BC_HAS_WGMMA && BC_HAS_TMA
    BC_DYNAMIC_SMEM(smem, CtWide::SMEM);
    bc_conv_tma_impl<CtWide>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma_tma, BcConvTmaParams)

// The same with 96 output channels per block.
extern "C" __global__ void __launch_bounds__(CT_NT, 1) bc_conv_wgmma_tma_n96(const __grid_constant__ BcConvTmaParams p) {
#if BC_HAS_WGMMA && BC_HAS_TMA
    BC_DYNAMIC_SMEM(smem, CtN96::SMEM);
    bc_conv_tma_impl<CtN96>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma_tma_n96, BcConvTmaParams)
