// Warp-specialized Hopper (sm_90a) implicit-GEMM convolution for the video decoders:
// `bc_conv_wgmma_ws` (192 output channels per block), `bc_conv_wgmma_ws_n96` (96) and
// `bc_conv_wgmma_ws_n64` (64). The same function, parameters (BcConvParams) and output bits
// as `bc_conv_wgmma*` (cuda/conv_wgmma.cu, and so bc_conv):
//
//   out[m][n] = act(bias[n] + res[m][n] + sum_{s, dy, dx, c} x_s[shift(m, dy, dx)][c] * w[n][t_s][dy][dx][c0_s + c])
//
// with the same K sequence (k-steps of 64 along each source's (tap, channel) sequence), the
// same 4 wgmma k16 per k-step in the same order for every output element, and the same
// epilogue (cv_store_pair): the gathers, the k-step and the epilogue are the ones of
// include/conv_gather.cuh, which bc_conv_wgmma uses too. Only the tile width (which does not
// change an element's sum) and who does what differ.
//
// Layout: activations NHWC bf16, weights [cout][kt][kh][kw][cin]; a stage holds one k-step:
// the A tile (128 pixel rows) and the B tile (BN channel rows), 128-byte rows in the K-major
// 128B swizzle of wgmma (conv_gather.cuh), stages on 1024-byte boundaries; then full[STAGES]
// and empty[STAGES] mbarriers. Needs `vec` (16-byte copies), as bc_conv_wgmma.
//
// Why: bc_conv_wgmma's 256 threads both compute every chunk's address and issue its cp.async
// and multiply, with one __syncthreads per k-step and the copies only one k-step ahead (3
// stages): the gather latency is exposed and the two warpgroups are coupled. Here:
//   warpgroup 0, the producer (CS_PRODUCER_REGS registers after setmaxnreg.dec): every cp.async
//     of A and B, k-step k into stage k % STAGES: waits empty[s] (from k = STAGES on: the
//     consumers are done with k-step k - STAGES), issues its 8 A and BN/16 B chunks (16 rows
//     per pass; an A chunk's address is its row's offset in the source, kept in registers,
//     plus the tap's: conv_gather.cuh, ROWOFF), commits a group; then publishes k-step k - (INFLIGHT - 1) as it lands:
//     cp.async.wait_group INFLIGHT - 1, fence.proxy.async (its generic-proxy writes -> the
//     wgmma async proxy), mbarrier.arrive on full (count: the 128 producer threads). After the
//     last k-step: wait_group 0 and publish the rest. INFLIGHT = STAGES - 2 k-steps of copies
//     are in flight: before it waits for the stage of k - STAGES the producer has published up
//     to k - INFLIGHT = k - STAGES + 2, and the consumers release that stage after they issued
//     k - STAGES + 1 (see below), so they never wait for a copy the producer holds back
//     (INFLIGHT = STAGES - 1 would still be deadlock-free, with no slack; STAGES deadlocks).
//   warpgroups 1 and 2, the consumers (CS_CONSUMER_REGS registers after setmaxnreg.inc), pixel
//     rows 64 c .. 64 c + 63 of the tile and all BN channels (one m64nBN f32 accumulator): per
//     k-step k wait full[k % STAGES] (parity (k / STAGES) & 1), 4 wgmma m64nBNk16, commit,
//     wait_group 1 (k-step k - 1's wgmma are complete), then lane 0 of each consumer warp
//     arrives on empty[(k - 1) % STAGES] (count: the 8 consumer warps) if the producer will
//     refill it (k - 1 + STAGES < steps). No all-thread barrier in the loop.
// Phases: the j-th use of stage s is phase j of full[s] and of empty[s]; waits use parity j & 1.
//
// Tiles (params.h): BC_CONV_WS_BN = 192 (m64n192k16, wgmma_conv.cuh; 5 stages of 40 KB), 96
// (8 stages of 28 KB), 64 (9 stages of 24 KB): one block of 384 threads per SM. The launcher
// (launch::conv_ws) picks the tile that pads cout least: 384, 192 -> 192; 96 -> 96; 64 -> 64.
//
// Checked by src/kernels/emu/decode.rs under the SIMT emulation (cp.async landing only at
// wait_group, mbarrier phases, wgmma descriptors and swizzle, setmaxnreg as a register pool):
// every conv case bc_conv_wgmma runs, NaN-poisoned outputs, must give bc_conv_wgmma's exact
// bits; tests/decode_cuda_emulated.rs decodes the tiny golden Wan VAE and TAEHV with it
// (BC_CONV_WGMMA_VARIANT=ws). Not yet run on a GPU: opt-in. Below sm_90a: a stub that traps.
#include "include/barrier.cuh"
#include "include/conv_gather.cuh"
#include "include/tma.cuh"

namespace {
constexpr int CS_NT = BC_CONV_WS_THREADS;
constexpr int CS_WG = BC_WGMMA_THREADS;          // threads per warpgroup
constexpr int CS_CONSUMERS = CS_NT / CS_WG - 1;  // consumer warpgroups
constexpr int CS_CONSUMER_WARPS = CS_CONSUMERS * CS_WG / 32;
static_assert(CS_CONSUMERS * CW_WM == CW_BM, "one m64 wgmma tile per consumer warpgroup");
// Registers per thread after setmaxnreg; the block's pool is the launch allocation of
// __launch_bounds__(384, 1): 65536 / 384 = 170, down to the granularity of 8: 168 each.
constexpr int CS_LAUNCH_REGS = (65536 / CS_NT) / 8 * 8;
// The producer keeps its 8 rows' grid coordinates and source offsets (CwGather<128, true>):
// the n192 producer spills at 104; the consumers' m64n192 accumulator is 96 of their 192.
constexpr int CS_PRODUCER_REGS = 120;
constexpr int CS_CONSUMER_REGS = 192;
static_assert(CS_WG * CS_PRODUCER_REGS + CS_CONSUMERS * CS_WG * CS_CONSUMER_REGS <= CS_NT * CS_LAUNCH_REGS,
              "setmaxnreg: the roles' registers must fit in the block's launch allocation");

/// A channel tiling: BN output channels per block, STAGES shared stages.
template <int BN_, int STAGES_>
struct CsCfg {
    static constexpr int BN = BN_;
    static constexpr int STAGES = STAGES_;
    static constexpr int INFLIGHT = STAGES - 2;  // k-steps of copies in flight
    static constexpr int STAGE = CW_A_BYTES + BN * CW_ROWB;
    static constexpr int BAR_OFF = STAGES * STAGE;
    static constexpr int SMEM = BAR_OFF + 2 * STAGES * 8 + 1024;
    static_assert(STAGE % 1024 == 0, "stages on the swizzle period");
    static_assert(INFLIGHT >= 1, "at least three stages");
    static_assert(SMEM <= 232448, "227 KB of shared memory per block");
};
using CsWide = CsCfg<BC_CONV_WS_BN, BC_CONV_WS_STAGES>;
using CsN96 = CsCfg<BC_CONV_WG_BN_96, BC_CONV_WS_N96_STAGES>;
using CsN64 = CsCfg<BC_CONV_WG_BN_64, BC_CONV_WS_N64_STAGES>;
static_assert(CsWide::SMEM == BC_CONV_WS_SMEM && CsN96::SMEM == BC_CONV_WS_N96_SMEM &&
                  CsN64::SMEM == BC_CONV_WS_N64_SMEM,
              "params.h smem sizes");
}  // namespace

#if BC_HAS_WGMMA
/// The producer warpgroup (pt = 0..127): every k-step's A and B chunks, as the header says.
template <class Cfg>
__device__ __forceinline__ void cs_producer(const BcConvParams& p, const CvGeo& geo, int steps, bc_saddr base,
                                            uint64_t* full, uint64_t* empty, int pt) {
    constexpr int S = Cfg::STAGES, D = Cfg::INFLIGHT;
    const int m0 = blockIdx.x * CW_BM, n0 = blockIdx.y * Cfg::BN;
    CwGather<CS_WG, true> gather(p, geo, m0, pt);
    bc_pin(base);  // not recomputed from SR_CgaCtaId per k-step
    int s = 0, pub = 0;  // the stage of k-step k; the stage k-step k - D + 1 is in
    unsigned eph = 1;    // parity of the empty phase to wait for (flips per round)
    for (int k = 0; k < steps; ++k) {
        if (k >= S) bc_mbar_wait(&empty[s], eph);  // k-step k - S's wgmma are done
        gather.template load<Cfg::BN>(p, geo, n0, base + s * Cfg::STAGE);
        bc_cp_async_commit();
        if (k >= D - 1) {
            bc_cp_async_wait_group<D - 1>();  // k-step k - D + 1 has landed (this thread's copies)
            bc_fence_proxy_async();
            bc_mbar_arrive(&full[pub]);
            pub = pub == S - 1 ? 0 : pub + 1;
        }
        if (++s == S) {
            s = 0;
            eph ^= 1u;
        }
    }
    // The last D - 1 k-steps (all of them when there are fewer).
    bc_cp_async_wait_group<0>();
    bc_fence_proxy_async();
    for (int k = max(steps - D + 1, 0); k < steps; ++k) {
        bc_mbar_arrive(&full[pub]);
        pub = pub == S - 1 ? 0 : pub + 1;
    }
}

/// A consumer warpgroup (ct = 0..255 over both; warpgroup cw = ct / 128 owns pixel rows
/// 64 cw..): the k-steps from the producer, then the epilogue.
template <class Cfg>
__device__ __forceinline__ void cs_consumer(const BcConvParams& p, const CvGeo& geo, int steps, unsigned wbase,
                                            uint64_t* full, uint64_t* empty, int ct) {
    constexpr int BN = Cfg::BN, S = Cfg::STAGES;
    const int cw = ct / CS_WG, warp = ct % CS_WG / 32, lane = ct % 32;
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
    // Descriptors of stage 0: A = this warpgroup's 64 pixel rows, B = the BN channel rows.
    const uint64_t da0 = bc_wgmma_kmajor_desc(wbase + cw * CW_WM * CW_ROWB, BC_WGMMA_SWIZZLE_128B, CW_WM, CW_BK, 0);
    const uint64_t db0 = bc_wgmma_kmajor_desc(wbase + CW_A_BYTES, BC_WGMMA_SWIZZLE_128B, BN, CW_BK, 0);
    int st = 0, prev = S - 1;
    unsigned ph = 0;
    for (int k = 0; k < steps; ++k) {
        bc_mbar_wait(&full[st], ph);  // k-step k is in stage st
        cw_kstep<BN>(acc, da0, db0, (uint64_t)(st * (Cfg::STAGE >> 4)));
        // k-step k - 1's wgmma are done: its stage may be refilled (if the producer will).
        if (k >= 1 && k - 1 + S < steps && lane == 0) bc_mbar_arrive(&empty[prev]);
        prev = st;
        if (++st == S) {
            st = 0;
            ph ^= 1u;
        }
    }
    bc_wgmma_wait<0>();
    bc_wgmma_fence_operand(acc);
    cw_epilogue<BN>(p, geo, acc, blockIdx.x * CW_BM + cw * CW_WM, blockIdx.y * BN, warp, lane / 4, lane % 4);
}

template <class Cfg>
__device__ __forceinline__ void bc_conv_ws_impl(const BcConvParams& p, unsigned char* smem_raw) {
    BC_EMU_CHECK(p.num_src >= 1 && p.num_src <= BC_CONV_MAX_SOURCES && p.out_split > 0 && p.vec);
    // The tiles start on the first 1024-byte boundary of the shared window (the swizzle period).
    const unsigned w0 = bc_smem_window_addr(smem_raw), pad = (1024u - w0 % 1024u) % 1024u;
    unsigned char* smem = smem_raw + pad;
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + Cfg::BAR_OFF);
    uint64_t* empty = full + Cfg::STAGES;
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < Cfg::STAGES; ++s) {
            bc_mbar_init(&full[s], CS_WG);               // the producer's threads
            bc_mbar_init(&empty[s], CS_CONSUMER_WARPS);  // lane 0 of each consumer warp
        }
        bc_mbar_init_fence();
    }
    __syncthreads();
    const CvGeo geo = cv_geo(p);
    const int steps = cw_steps(p, geo);
    if (tid < CS_WG) {
        bc_setmaxnreg<false, CS_PRODUCER_REGS>();
        cs_producer<Cfg>(p, geo, steps, bc_smem_addr(smem), full, empty, tid);
    } else {
        bc_setmaxnreg<true, CS_CONSUMER_REGS>();
        cs_consumer<Cfg>(p, geo, steps, w0 + pad, full, empty, tid - CS_WG);
    }
}
#endif

// 384 threads (a producer and two consumer warpgroups), 128 pixels x 192 output channels per
// block; grid (ceil(rows / 128), ceil(cout / 192), z as bc_conv_wgmma), BC_CONV_WS_SMEM bytes of
// dynamic shared memory. Opt-in: BC_CONV_WGMMA_VARIANT=ws.
extern "C" __global__ void __launch_bounds__(CS_NT, 1) bc_conv_wgmma_ws(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CsWide::SMEM);
    bc_conv_ws_impl<CsWide>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma_ws, BcConvParams)

// The same with 96 output channels per block (the Wan VAE's 96-channel layers).
extern "C" __global__ void __launch_bounds__(CS_NT, 1) bc_conv_wgmma_ws_n96(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CsN96::SMEM);
    bc_conv_ws_impl<CsN96>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma_ws_n96, BcConvParams)

// The same with 64 output channels per block (TAEHV's 64-channel layers).
extern "C" __global__ void __launch_bounds__(CS_NT, 1) bc_conv_wgmma_ws_n64(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CsN64::SMEM);
    bc_conv_ws_impl<CsN64>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma_ws_n64, BcConvParams)
