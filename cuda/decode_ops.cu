// The small ops of the video decoders (TAEHV, Wan2.1 VAE) around the convolution (conv.cu),
// on NHWC bf16 frames `[H*W][C]` (one frame per launch):
//
// bc_dec_latent_in:  latents f32 `[C][H*W]` (the DiT's layout) -> NHWC bf16, with TAEHV's
//                    `tanh(z/3)*3` or the Wan VAE's `z / (1/std[c]) + mean[c]` on the way; a
//                    NaN/inf latent sets the caller's `nonfinite` flag (latents handed over on
//                    the device are checked here, since they never reach the host's check).
// bc_dec_rms_norm:   the Wan VAE's channel RMS norm `x / max(|x|_2, 1e-12) * sqrt(C) * gamma`
//                    (norm over the channels of a pixel, f32 math), optionally then SiLU.
// bc_dec_upsample2x: nearest 2x spatial upsample `[h][w][C]` -> `[2h][2w][C]`, written once or
//                    twice (`out2`: the same frame duplicated in time).
// bc_dec_to_pixels:  3 channels (f32 or bf16) -> `v = x * scale + shift` (TAEHV's `2x - 1`),
//                    clamped to [-1, 1] when asked (the Wan VAE), as f32 planar `[3][H*W]` and/or
//                    RGB8 `[H*W][3]` by `Video::to_rgb8`'s rule `(u8)(clamp(v,-1,1)*127.5+127.5)`
//                    (truncation; the multiply and add are separately rounded, never fused, so
//                    the bytes equal the host's).
// bc_dec_softmax:    row-wise softmax of f32 scores (scaled), bf16 probabilities: the Wan VAE's
//                    attention between its two GEMMs on bc_conv (S = Q K^T, O = P V).
// TAEHV's TGrow reshape and the Wan VAE's time_conv frame split are done by the conv
// epilogue (`out_split`); ReLU/SiLU after a conv are fused there too; standalone SiLU on bf16
// is `bc_activation`.
//
// Thread layout: one thread per element (latent_in, upsample) or per pixel (to_pixels),
// BC_ELEM_THREADS per block; rms_norm one warp per pixel, BC_DEC_NORM_PIXELS pixels per block.
// Checked by src/kernels/emu/decode.rs (tests) against src/decode (conv::rms_norm, upsample2x,
// video::to_rgb8) on random inputs with poisoned outputs.
#include "include/common.cuh"

namespace {
constexpr int DEC_THREADS = BC_ELEM_THREADS;
constexpr int DEC_NORM_PIXELS = BC_DEC_NORM_PIXELS;
constexpr float DEC_FLOAT_MAX = 3.40282347e38f;  // the largest finite f32
}  // namespace

extern "C" __global__ void __launch_bounds__(DEC_THREADS) bc_dec_latent_in(BcDecLatentInParams p) {
    const long long i = (long long)blockIdx.x * DEC_THREADS + threadIdx.x;  // index into [c][hw]
    if (i >= (long long)p.c * p.hw) return;
    const int ch = (int)(i / p.hw), px = (int)(i % p.hw);
    float v = p.z[i];
    // NaN fails the comparison too. Non-finite latents are rare: the atomic almost never runs.
    if (p.nonfinite && !(fabsf(v) <= DEC_FLOAT_MAX)) atomicOr(p.nonfinite, 1u);
    if (p.mode == 1) v = tanhf(v / 3.f) * 3.f;
    if (p.mode == 2) v = v / p.scale[ch] + p.mean[ch];
    p.out[(size_t)px * p.c + ch] = __float2bfloat16(v);
}
BC_EMU_ENTRY(bc_dec_latent_in, BcDecLatentInParams)

extern "C" __global__ void __launch_bounds__(32 * DEC_NORM_PIXELS) bc_dec_rms_norm(BcDecRmsNormParams p) {
    const int px = blockIdx.x * DEC_NORM_PIXELS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (px >= p.pixels) return;  // uniform per warp
    const __nv_bfloat16* x = p.x + (size_t)px * p.c;
    float ss = 0.f;
    for (int c = lane; c < p.c; c += 32) {
        const float v = __bfloat162float(x[c]);
        ss += v * v;
    }
    ss = bc_warp_sum(ss);
    const float n = fmaxf(sqrtf(ss), 1e-12f), scale = sqrtf((float)p.c);
    __nv_bfloat16* out = p.out + (size_t)px * p.c;
    for (int c = lane; c < p.c; c += 32) {
        float y = __bfloat162float(x[c]) / n * scale * p.gamma[c];
        if (p.silu) y = y / (1.f + expf(-y));
        out[c] = __float2bfloat16(y);
    }
}
BC_EMU_ENTRY(bc_dec_rms_norm, BcDecRmsNormParams)

extern "C" __global__ void __launch_bounds__(DEC_THREADS) bc_dec_upsample2x(BcDecUpsampleParams p) {
    const long long i = (long long)blockIdx.x * DEC_THREADS + threadIdx.x;  // index into [2h][2w][c]
    const int w2 = 2 * p.w;
    if (i >= 4LL * p.h * p.w * p.c) return;
    const int ch = (int)(i % p.c);
    const long long px = i / p.c;
    const int y = (int)(px / w2), x = (int)(px % w2);
    const __nv_bfloat16 v = p.x[((size_t)(y / 2) * p.w + x / 2) * p.c + ch];
    p.out[i] = v;
    if (p.out2) p.out2[i] = v;
}
BC_EMU_ENTRY(bc_dec_upsample2x, BcDecUpsampleParams)

extern "C" __global__ void __launch_bounds__(DEC_THREADS) bc_dec_to_pixels(BcDecToPixelsParams p) {
    const int px = blockIdx.x * DEC_THREADS + threadIdx.x;
    if (px >= p.hw) return;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        const size_t at = (size_t)px * p.stride + c;
        const float x = p.in_f32 ? static_cast<const float*>(p.x)[at]
                                 : __bfloat162float(static_cast<const __nv_bfloat16*>(p.x)[at]);
        float v = __fadd_rn(__fmul_rn(x, p.scale), p.shift);
        const float cl = fminf(fmaxf(v, -1.f), 1.f);
        if (p.clamp) v = cl;
        if (p.out_f32) p.out_f32[(size_t)c * p.hw + px] = v;
        if (p.rgb) p.rgb[(size_t)px * 3 + c] = (unsigned char)__fadd_rn(__fmul_rn(cl, 127.5f), 127.5f);
    }
}
BC_EMU_ENTRY(bc_dec_to_pixels, BcDecToPixelsParams)

extern "C" __global__ void __launch_bounds__(BC_ROW_THREADS) bc_dec_softmax(BcDecSoftmaxParams p) {
    __shared__ float scratch[BC_ROW_THREADS / 32];
    const float* s = p.s + (size_t)blockIdx.x * p.n;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < p.n; j += BC_ROW_THREADS) mx = fmaxf(mx, s[j]);
    mx = bc_warp_max(mx);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = mx;
    __syncthreads();
    mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < BC_ROW_THREADS / 32; ++w) mx = fmaxf(mx, scratch[w]);
    __syncthreads();
    float sum = 0.f;
    for (int j = threadIdx.x; j < p.n; j += BC_ROW_THREADS) sum += expf((s[j] - mx) * p.scale);
    sum = bc_block_sum<BC_ROW_THREADS>(sum, scratch);
    const float inv = 1.f / sum;
    __nv_bfloat16* out = p.p + (size_t)blockIdx.x * p.n;
    for (int j = threadIdx.x; j < p.n; j += BC_ROW_THREADS) out[j] = __float2bfloat16(expf((s[j] - mx) * p.scale) * inv);
}
BC_EMU_ENTRY(bc_dec_softmax, BcDecSoftmaxParams)
