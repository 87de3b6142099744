// Implicit-GEMM convolution of the video decoders (TAEHV, Wan2.1 VAE): bf16 operands, f32
// accumulation, tensor cores (mma.sync m16n8k16 bf16 -> f32).
//
//   out[m][n] = act(bias[n] + res[m][n] + sum_{s, dy, dx, c} x_s[shift(m, dy, dx)][c] * w[n][t_s][dy][dx][c0_s + c])
//
// One launch computes one output frame (or `frames` of them, grid z, each exactly as its own
// launch would: TAEHV's block walk). Its inputs are up to BC_CONV_MAX_SOURCES *sources*
// (BcConvSource): frames that meet time tap t_s of the kernel and weight input channels
// [c0_s, c0_s + channels_s). So one kernel covers
//   - 3x3 (zero padding 1) and 1x1 conv2d: one source, kt = 1;
//   - the causal 3x3x3 conv3d (and the Wan VAE's causal (3,1,1) time_conv) as three temporal
//     taps over the frame cache: the two cached input frames meet taps 0 and 1, the current
//     frame tap 2, and a zero frame (before the stream began) is not passed at all;
//   - TAEHV's MemBlock conv over cat[x, past]: two sources, c0 = 0 and c0 = C;
//   - a conv reading through a nearest 2x upsample (`up`): pixel (y, x) reads (y/2, x/2), so
//     the upsampled frame is never materialised;
//   - the same 3x3 conv in the sub-pixel form (`parity`, grid z = the 4 output parities): each
//     parity is a 2x2 conv of the sources at their own size with summed weights, 16 taps per
//     output quad instead of 36 (cv_geo in include/conv.cuh holds the address math).
// Epilogue: + bias (f32), + residual (bf16, the Wan residual block's shortcut and TAEHV's
// MemBlock skip), then ReLU or SiLU; bf16 or f32 store. The output channel n lands in frame
// n / out_split (channel n % out_split): TAEHV's TGrow and the Wan VAE's time_conv write their
// frames straight from the epilogue, no reshape pass; `out_cstride` > 1 writes the output
// transposed (channel-major), which the Wan VAE's attention uses for V^T.
//
// Layout: activations NHWC bf16, one frame `[H*W][stride]`; weights bf16 `[cout][kt][kh][kw][cin]`
// (packed from PyTorch's `[cout][cin][kt][kh][kw]` at upload: a GEMM row of B is one output
// channel, K contiguous). The GEMM: M = H*W output pixels, N = cout, K = kt*kh*kw*cin, walked
// as k-steps of CV_BK channels of one (source, tap) at a time.
//
// Tiles (params.h): CV_BM = 128 pixels x CV_BN = 64 channels per block, 8 warps in a 4 x 2
// grid, each warp 32 x 32 (2 m16 x 4 n8 mma tiles, 32 f32 accumulators per thread): `bc_conv`.
// `bc_conv_n16` is the same code with 16 channels per block (8 x 1 warps of 16 x 16) for convs
// with at most 16 output channels (the RGB heads: 3 channels in a 64-wide tile waste 95% of the
// tensor-core work, in a 16-wide one 81% of a 4x smaller amount); the launcher picks it. A and B
// tiles go to shared memory (rows of CV_BK = 32 bf16 padded to 40: an 80-byte stride makes the
// 8 rows of every ldmatrix hit distinct 16-byte bank groups), double-buffered: the cp.async of
// k-step i + 1 is in flight while the mma of step i run. A fragments by ldmatrix.x4, B
// fragments by ldmatrix.x4 of the row-major weight tile (as K in cuda/attention.cu).
// The Wan VAE's attention runs on this kernel too: S = Q K^T is a 1x1 "conv" of Q with K as
// its weights (cout = pixels), O = P V one of P with V^T as weights (cin = pixels).
// Masked edges: pixels past H*W, taps outside the frame (the zero padding), channels past a
// source's count and output channels past cout are zero-filled by the copy itself (cp.async
// src-size 0), so any H, W, cin, cout is correct. When a channel count, stride or pointer is
// not 8-element aligned (`vec = 0`, e.g. TAEHV's 3-channel output or a test's odd channels),
// the tiles load element by element instead: same math, slower.
// Shared memory: 2 stages x (128 + 64) rows x 80 B = 30 KB (static; narrow: 22.5 KB).
// FLOPs per launch: 2 * H*W * cout * kh*kw * (sum of the sources' channels); parity form:
// 2 * H*W * cout * 4 * (sum of the channels).
//
// Hopper: cuda/conv_wgmma.cu (bc_conv_wgmma) is the same convolution on wgmma, opt-in; the
// source fields and the epilogue (cv_src, cv_store_pair) are shared through include/conv.cuh.
//
// Checked by src/kernels/emu/decode.rs (tests) against src/decode/conv.rs (the CPU decoders' conv)
// under the SIMT emulation: 3x3 and 1x1, three temporal taps, two channel sources, an
// upsampled source, odd H, W, cin and cout, residual, bias, ReLU/SiLU, f32 and bf16 output,
// split output, on random bf16-rounded inputs with the output poisoned first.
#include "include/conv.cuh"
#include "include/mma.cuh"

namespace {
constexpr int CV_BM = BC_CONV_BM;
constexpr int CV_BK = BC_CONV_BK;
constexpr int CV_NT = BC_CONV_THREADS;
constexpr int CV_ROWB = (CV_BK + 8) * 2;      // shared row stride in bytes (80)
constexpr int CV_CPR = CV_BK / 8;             // 16-byte chunks per row
constexpr int CV_A_BYTES = CV_BM * CV_ROWB;
constexpr int CV_RP = CV_NT / CV_CPR;         // rows per copy pass (64)
constexpr int CV_A_PASSES = CV_BM / CV_RP;    // A chunks per thread (2)
static_assert(CV_BM % CV_RP == 0 && CV_BK % 16 == 0, "tile shapes");

/// A channel tiling: BN output channels per block, WARPS_M x WARPS_N warps (8 in all).
template <int BN_, int WARPS_M_>
struct CvCfg {
    static constexpr int BN = BN_;
    static constexpr int WARPS_M = WARPS_M_;               // warps along the pixels
    static constexpr int WARPS_N = CV_NT / 32 / WARPS_M_;  // warps along the output channels
    static constexpr int WM = CV_BM / WARPS_M;             // pixels per warp
    static constexpr int WN = BN / WARPS_N;                // channels per warp
    static constexpr int MT = WM / 16;                     // m16 tiles per warp
    static constexpr int NT8 = WN / 8;                     // n8 tiles per warp
    static constexpr int B_BYTES = BN * CV_ROWB;
    static constexpr int STAGE = CV_A_BYTES + B_BYTES;
    static_assert(WARPS_M * WARPS_N * 32 == CV_NT && WN % 16 == 0 && WM % 16 == 0, "warp grid");
    static_assert(BN <= CV_RP, "at most one B chunk per thread");
};
// The wide tile (64 channels, warps 4 x 2 of 32 x 32) and the narrow one for convs with at
// most 16 output channels (the decoders' RGB heads: 16 channels, warps 8 x 1 of 16 x 16).
using CvWide = CvCfg<BC_CONV_BN, 4>;
using CvNarrow = CvCfg<BC_CONV_BN_NARROW, 8>;

}  // namespace

template <class Cfg>
__device__ __forceinline__ void bc_conv_impl(const BcConvParams& p, unsigned char* smem) {
    constexpr int CV_BN = Cfg::BN, CV_WARPS_M = Cfg::WARPS_M, CV_WM = Cfg::WM, CV_WN = Cfg::WN;
    constexpr int CV_MT = Cfg::MT, CV_NT8 = Cfg::NT8, CV_STAGE = Cfg::STAGE;
    BC_EMU_CHECK(p.num_src >= 1 && p.num_src <= BC_CONV_MAX_SOURCES && p.out_split > 0);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int wm = warp % CV_WARPS_M, wn = warp / CV_WARPS_M;
    const CvGeo geo = cv_geo(p);
    const int hw = geo.gh * geo.gw;
    const int m0 = blockIdx.x * CV_BM, n0 = blockIdx.y * CV_BN;
    const int taps = geo.taps;
    const long long ktot = (long long)p.kt * taps * p.cin;
    const bc_saddr base = bc_smem_addr(smem);

    // Copy geometry: this thread moves chunk cc (channels 8cc..8cc+7 of the k-step) of A rows
    // ar + i * CV_RP and of B row ar.
    const int cc = tid % CV_CPR, ar = tid / CV_CPR;
    int py[CV_A_PASSES], px[CV_A_PASSES];
    cv_rows(geo, m0 + ar, CV_RP, py, px);
    const int bn = n0 + ar;
    const unsigned a_dst = ar * CV_ROWB + cc * 16, b_dst = CV_A_BYTES + ar * CV_ROWB + cc * 16;

    // The k-step cursor of the loads: source s, tap, first channel ci0.
    int s = 0, tap = 0, ci0 = 0;
    CvSrc src = cv_src(p, geo, 0);
    int steps = 0;
    for (int i = 0; i < p.num_src; ++i) steps += taps * ((cv_src(p, geo, i).channels + CV_BK - 1) / CV_BK);

    auto load = [&](int stage) {
        const int dy = tap / geo.kw + geo.oy, dx = tap % geo.kw + geo.ox;
        const int ci = ci0 + 8 * cc;
        const bc_saddr st = base + stage * CV_STAGE;
        const long long kidx = (long long)(src.t * taps + tap) * p.cin + src.c0 + ci;
        const __nv_bfloat16* wrow = p.w + geo.w0 + (size_t)bn * ktot + kidx;
        const bool bok = bn < p.cout && ar < CV_BN;
        if (p.vec) {
#pragma unroll
            for (int i = 0; i < CV_A_PASSES; ++i) {
                const int yy = py[i] + dy, xx = px[i] + dx;
                const bool ok = ci < src.channels && yy >= 0 && yy < geo.gh && xx >= 0 && xx < geo.gw;
                const __nv_bfloat16* a = ok ? src.x + cv_src_off(p, geo, src, yy, xx) + ci : src.x;
                bc_cp_async16_zfill(st + a_dst + i * CV_RP * CV_ROWB, a, ok ? 16 : 0);
            }
            const bool ok = bok && ci < src.channels;
            if (ar < CV_BN) bc_cp_async16_zfill(st + b_dst, ok ? wrow : p.w, ok ? 16 : 0);
        } else {
            unsigned char* sp = smem + stage * CV_STAGE;
#pragma unroll
            for (int i = 0; i < CV_A_PASSES; ++i) {
                const int yy = py[i] + dy, xx = px[i] + dx;
                const bool ok = yy >= 0 && yy < geo.gh && xx >= 0 && xx < geo.gw;
                __nv_bfloat16* d = reinterpret_cast<__nv_bfloat16*>(sp + a_dst + i * CV_RP * CV_ROWB);
                const size_t off = cv_src_off(p, geo, src, yy, xx);
                for (int e = 0; e < 8; ++e)
                    d[e] = ok && ci + e < src.channels ? src.x[off + ci + e] : __float2bfloat16(0.f);
            }
            __nv_bfloat16* d = reinterpret_cast<__nv_bfloat16*>(sp + b_dst);
            if (ar < CV_BN)
                for (int e = 0; e < 8; ++e) d[e] = bok && ci + e < src.channels ? wrow[e] : __float2bfloat16(0.f);
        }
        // Advance the cursor: channels, then taps, then sources.
        ci0 += CV_BK;
        if (ci0 >= src.channels) {
            ci0 = 0;
            if (++tap == taps) {
                tap = 0;
                if (++s < p.num_src) src = cv_src(p, geo, s);
            }
        }
    };

    float acc[CV_MT][CV_NT8][4];
#pragma unroll
    for (int i = 0; i < CV_MT; ++i)
#pragma unroll
        for (int j = 0; j < CV_NT8; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

    // Fragment addresses (per lane, relative to a stage): A rows wm*32 + lane%16, chunk lane/16;
    // B rows (output channels) wn*32 + 8*(lane/16) + lane%8, chunk (lane/8)%2.
    const unsigned a_frag = (wm * CV_WM + lane % 16) * CV_ROWB + (lane / 16) * 16;
    const unsigned b_frag = CV_A_BYTES + (wn * CV_WN + 8 * (lane / 16) + lane % 8) * CV_ROWB + ((lane / 8) % 2) * 16;

    if (steps > 0) load(0);
    bc_cp_async_commit();
    for (int k = 0; k < steps; ++k) {
        if (k + 1 < steps) load((k + 1) & 1);
        bc_cp_async_commit();
        bc_cp_async_wait_group<1>();  // step k has landed (this thread's copies) ...
        __syncthreads();              // ... and everyone's (and the element stores)
        const bc_saddr st = base + (k & 1) * CV_STAGE;
#pragma unroll
        for (int kk = 0; kk < CV_BK / 16; ++kk) {
            unsigned af[CV_MT][4], bf[CV_NT8 / 2][4];
#pragma unroll
            for (int i = 0; i < CV_MT; ++i) bc_ldmatrix_x4_at(af[i], st + a_frag + i * 16 * CV_ROWB + kk * 32);
#pragma unroll
            for (int j = 0; j < CV_NT8 / 2; ++j) bc_ldmatrix_x4_at(bf[j], st + b_frag + j * 16 * CV_ROWB + kk * 32);
#pragma unroll
            for (int i = 0; i < CV_MT; ++i)
#pragma unroll
                for (int j = 0; j < CV_NT8; ++j) bc_mma_bf16_16816(acc[i][j], af[i], &bf[j / 2][2 * (j % 2)], acc[i][j]);
        }
        __syncthreads();  // stage k & 1 is consumed before step k + 2 refills it
    }

    // Epilogue: lane holds rows g, g + 8 and columns 2t, 2t + 1 of each mma tile. A plain bf16
    // NHWC output (unsplit, even stride, 4-byte aligned) stores each column pair as one bf16x2.
    const bool pairs = cv_pairs(p);
#pragma unroll
    for (int i = 0; i < CV_MT; ++i) {
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
            const int m = m0 + wm * CV_WM + i * 16 + g + 8 * e2;
            if (m >= hw) continue;
#pragma unroll
            for (int j = 0; j < CV_NT8; ++j) {
                const int n = n0 + wn * CV_WN + j * 8 + 2 * t;  // even
                if (n < p.cout) cv_store_pair(p, geo, pairs, cv_out_pixel(p, geo, m), n, acc[i][j][2 * e2], acc[i][j][2 * e2 + 1]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(CV_NT, 2) bc_conv(BcConvParams p) {
    __shared__ __align__(128) unsigned char smem[2 * CvWide::STAGE];
    bc_conv_impl<CvWide>(p, smem);
}
BC_EMU_ENTRY(bc_conv, BcConvParams)

extern "C" __global__ void __launch_bounds__(CV_NT, 2) bc_conv_n16(BcConvParams p) {
    __shared__ __align__(128) unsigned char smem[2 * CvNarrow::STAGE];
    bc_conv_impl<CvNarrow>(p, smem);
}
BC_EMU_ENTRY(bc_conv_n16, BcConvParams)
