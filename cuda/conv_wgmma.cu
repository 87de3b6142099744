// Hopper (sm_90a) variant of the decoders' implicit-GEMM convolution: the same function as
// bc_conv (cuda/conv.cu; same BcConvParams, sources, taps, upsampled reads, the sub-pixel
// parity form with grid z = 4 parities, epilogue, all through include/conv.cuh), with the
// tensor-core work done by warpgroup MMA (wgmma.mma_async m64n128k16 bf16 -> f32) reading both
// operands from shared memory by descriptor.
//
//   out[m][n] = act(bias[n] + res[m][n] + sum_{s, dy, dx, c} x_s[shift(m, dy, dx)][c] * w[n][t_s][dy][dx][c0_s + c])
//
// Tiles (params.h, BC_CONV_WG_*): CW_BM = 128 output pixels x BN = 128 output channels per
// block of two warpgroups (256 threads); warpgroup j owns pixels 64j..64j+63 of the tile and all
// 128 channels (one m64n128 accumulator: 64 f32 per thread): `bc_conv_wgmma`.
// `bc_conv_wgmma_n96` is the same code with BN = 96 (m64n96k16, 48 f32 per thread) for the Wan
// VAE's 96- and 192-channel layers, which a 128-wide tile pads by 25%, and `bc_conv_wgmma_n64`
// with BN = 64 (m64n64k16 from wgmma.cuh, 32 f32 per thread) for TAEHV's 64-channel layers
// (padded by 1/3 on the 96 tile, 1/2 on the 128 one); the launcher picks the tile that pads
// cout least (ties: the wider one). K is walked per source as the flat
// sequence (tap, channel) of taps * channels values, CW_BK = 64 at a time: a k-step may cross
// from one tap into the next (each thread's 8-channel chunk has its own tap and channel), so a
// 96-channel source takes 13.5 -> 14 k-steps per 3x3 kernel instead of 2 per tap (18). Past the
// end of a source's K, the chunk is zero (the next source starts a fresh k-step).
//
// Layout: activations NHWC bf16, weights [cout][kt][kh][kw][cin] (as bc_conv). A tile = 128
// pixel rows, B tile = 128 output-channel rows, each row one k-step of 64 bf16 = 128 bytes, the
// K-major 128-byte swizzle layout of wgmma (bc_wgmma_kmajor_offset with K = 64): row r at r * 128,
// its 16-byte chunk c at chunk c ^ (r % 8); 8-row groups 1024 bytes apart (SBO), tiles on a
// 1024-byte boundary of the shared window. wgmma k-step s (16 channels) starts 32 s bytes into
// the rows. Written by cp.async with zero fill (src-size 0) exactly where bc_conv zero-fills:
// pixels past H*W, taps outside the frame (zero padding), chunks past a source's K, output
// channels past cout. Needs the 16-byte path of bc_conv (`vec`: channel counts, strides, c0 and
// cin multiples of 8, pointers 16-byte aligned); the launcher only picks it then.
//
// Pipeline: CW_STAGES = 3 shared stages; k-step k: wait for its cp.async, fence.proxy.async,
// barrier; issue the cp.async of k-step k + 1 (into the stage of k-step k - 2, whose wgmma
// are done: every thread passed wait_group 1 of iteration k - 1 before the barrier); fence, 4
// wgmma m64n128k16 on stage k, commit, wait_group 1 (k-step k - 1 has landed). So one wgmma
// group runs while the next one is issued and the copies of the one after are in flight.
// Epilogue: the accumulator register i of thread (warp w of its warpgroup, g = lane / 4,
// q = lane % 4) is pixel 16w + g + 8 ((i >> 1) & 1), channel 8 (i >> 2) + 2q + (i & 1): column
// pairs, handed to cv_store_pair (cuda/include/conv.cuh), the epilogue bc_conv uses.
// Shared memory: dynamic, BC_CONV_WG_SMEM = 3 x 32 KB + 1 KB (BC_CONV_WG_N96_SMEM = 3 x 28 KB +
// 1 KB, BC_CONV_WG_N64_SMEM = 3 x 24 KB + 1 KB; two blocks per SM on an H100).
// FLOPs per launch: 2 * H*W * cout * kh*kw * (sum of the sources' channels).
//
// Checked by src/kernels/emu/decode.rs (tests) against src/decode/conv.rs under the SIMT
// emulation (which decodes the descriptors' bits and applies the swizzle): every conv case of
// bc_conv that fits `vec` runs through this kernel too (3x3, 1x1, temporal taps, two sources,
// upsampled source, residual, masked edges, odd H/W, two channel tiles, split and f32 output),
// with NaN-poisoned outputs; tests/decode_cuda_emulated.rs decodes the tiny Wan VAE and TAEHV
// with it forced on. All three ran on an H200 (outputs identical to bc_conv's): the default on
// a compute capability 9.0 device (BC_CONV_WGMMA=0 turns it off). On sm_80 (and the compute_80 PTX) the kernel is a stub that
// traps.
#include "include/conv_gather.cuh"
#include "include/wgmma_conv.cuh"

namespace {
constexpr int CW_NT = BC_CONV_WG_THREADS;
constexpr int CW_STAGES = BC_CONV_WG_STAGES;
constexpr int CW_WGS = CW_NT / BC_WGMMA_THREADS;  // warpgroups (2)
static_assert(CW_BM / CW_WGS == CW_WM, "one m64 wgmma tile per warpgroup");
static_assert(CW_STAGES >= 3, "the refilled stage must be two k-steps old");

/// A channel tiling: BN output channels per block (the N of the wgmma).
template <int BN_>
struct CwCfg {
    static constexpr int BN = BN_;
    static constexpr int B_BYTES = BN * CW_ROWB;
    static constexpr int STAGE = CW_A_BYTES + B_BYTES;
    static constexpr int SMEM = CW_STAGES * STAGE + 1024;
    static_assert(STAGE % 1024 == 0, "stages on the swizzle period");
};
// 128 output channels (wgmma m64n128k16), 96 (m64n96k16: 96- and 192-channel layers) and 64
// (m64n64k16: 64-channel layers).
using CwWide = CwCfg<BC_CONV_WG_BN>;
using CwN96 = CwCfg<BC_CONV_WG_BN_96>;
using CwN64 = CwCfg<BC_CONV_WG_BN_64>;
static_assert(CwWide::SMEM == BC_CONV_WG_SMEM && CwN96::SMEM == BC_CONV_WG_N96_SMEM &&
                  CwN64::SMEM == BC_CONV_WG_N64_SMEM,
              "params.h smem sizes");
}  // namespace

#if BC_HAS_WGMMA
template <class Cfg>
__device__ __forceinline__ void bc_conv_wgmma_impl(const BcConvParams& p, unsigned char* smem_raw) {
    constexpr int CW_BN = Cfg::BN, CW_STAGE = Cfg::STAGE;
    BC_EMU_CHECK(p.num_src >= 1 && p.num_src <= BC_CONV_MAX_SOURCES && p.out_split > 0 && p.vec);
    const int tid = threadIdx.x, wg = tid / BC_WGMMA_THREADS, wt = tid % BC_WGMMA_THREADS;
    const int warp = wt / 32, lane = wt % 32;
    const CvGeo geo = cv_geo(p);
    const int m0 = blockIdx.x * CW_BM, n0 = blockIdx.y * CW_BN;

    // The tiles start on the first 1024-byte boundary of the shared window (the swizzle period).
    unsigned char* smem = smem_raw;
    {
        const unsigned w = bc_smem_window_addr(smem_raw);
        smem += (1024u - w % 1024u) % 1024u;
    }
    bc_saddr base = bc_smem_addr(smem);

    // Every thread copies (include/conv_gather.cuh): its chunk of A and B rows of each k-step.
    CwGather<CW_NT> gather(p, geo, m0, tid);
    const int steps = cw_steps(p, geo);

    float acc[CW_BN / 2];
#pragma unroll
    for (int i = 0; i < CW_BN / 2; ++i) acc[i] = 0.f;

    // Descriptors of wgmma k-step 0 of stage 0: A = this warpgroup's 64 pixel rows, B = the BN
    // channel rows (128B swizzle, SBO 1024); stage t is t * CW_STAGE bytes on.
    const unsigned wbase = bc_smem_window_addr(smem);
    uint64_t da0 = bc_wgmma_kmajor_desc(wbase + wg * CW_WM * CW_ROWB, BC_WGMMA_SWIZZLE_128B, CW_WM, CW_BK, 0);
    uint64_t db0 = bc_wgmma_kmajor_desc(wbase + CW_A_BYTES, BC_WGMMA_SWIZZLE_128B, CW_BN, CW_BK, 0);
    // Kept in registers through the k loop (ptxas would recompute them there: 372 -> 387
    // instructions per k-step; pinned: 367).
    bc_pin(base);
    bc_pin(da0);
    bc_pin(db0);

#pragma unroll
    for (int k = 0; k < CW_STAGES - 2; ++k) {
        if (k < steps) gather.template load<CW_BN>(p, geo, n0, base + k * CW_STAGE);
        bc_cp_async_commit();
    }
    for (int k = 0; k < steps; ++k) {
        bc_cp_async_wait_group<CW_STAGES - 3>();  // k-step k has landed (this thread's copies) ...
        bc_fence_proxy_async();                   // (visible to wgmma's async proxy)
        __syncthreads();                          // ... and everyone's; k-step k - 2's wgmma are done
        if (k + CW_STAGES - 2 < steps)
            gather.template load<CW_BN>(p, geo, n0, base + ((k + CW_STAGES - 2) % CW_STAGES) * CW_STAGE);
        bc_cp_async_commit();
        cw_kstep<CW_BN>(acc, da0, db0, (uint64_t)((k % CW_STAGES) * (CW_STAGE >> 4)));
    }
    bc_wgmma_wait<0>();
    bc_wgmma_fence_operand(acc);
    cw_epilogue<CW_BN>(p, geo, acc, m0 + wg * CW_WM, n0, warp, lane / 4, lane % 4);
}
#endif

extern "C" __global__ void __launch_bounds__(CW_NT, 2) bc_conv_wgmma(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CwWide::SMEM);
    bc_conv_wgmma_impl<CwWide>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma, BcConvParams)

// The same with 96 output channels per block (the launcher picks the tile that pads cout least).
extern "C" __global__ void __launch_bounds__(CW_NT, 2) bc_conv_wgmma_n96(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CwN96::SMEM);
    bc_conv_wgmma_impl<CwN96>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma_n96, BcConvParams)

// The same with 64 output channels per block (TAEHV's 64-channel layers).
extern "C" __global__ void __launch_bounds__(CW_NT, 2) bc_conv_wgmma_n64(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CwN64::SMEM);
    bc_conv_wgmma_impl<CwN64>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_wgmma_n64, BcConvParams)
