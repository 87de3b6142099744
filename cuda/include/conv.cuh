// Shared pieces of the decoders' convolution kernels (cuda/conv.cu: bc_conv, bc_conv_n16 by
// mma.sync; cuda/conv_wgmma.cu: bc_conv_wgmma by Hopper wgmma): the source fields of a
// BcConvParams and the epilogue (bias, residual, activation, split / transposed / bf16x2 store),
// so both tilings compute and store exactly the same way.
#ifndef BC_CONV_CUH
#define BC_CONV_CUH

#include "common.cuh"

/// The fields of one BcConvSource (picked with constant indices only: no local-memory copy of
/// the params).
struct CvSrc {
    const __nv_bfloat16* x;
    int channels, stride, c0, t, up;
};
__device__ __forceinline__ CvSrc cv_src(const BcConvParams& p, int s) {
#define CV_PICK(f) (s == 0 ? p.src[0].f : (s == 1 ? p.src[1].f : p.src[2].f))
    return CvSrc{CV_PICK(x), CV_PICK(channels), CV_PICK(stride), CV_PICK(c0), CV_PICK(t), CV_PICK(up)};
#undef CV_PICK
}

/// Pixel coordinates of the output rows m0 + i * step (i < N) a thread copies A rows for: a
/// row past h*w gets y = -2^20, so none of its taps is inside the frame (it reads nothing).
template <int N>
__device__ __forceinline__ void cv_rows(const BcConvParams& p, int m0, int step, int (&py)[N], int (&px)[N]) {
    const int hw = p.h * p.w_px;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int m = m0 + i * step;
        py[i] = m < hw ? m / p.w_px : -(1 << 20);
        px[i] = m < hw ? m % p.w_px : 0;
    }
}

__device__ __forceinline__ float cv_act(float v, int act) {
    if (act == BC_ACT_RELU) return fmaxf(v, 0.f);
    if (act == BC_ACT_SILU) return v / (1.f + expf(-v));
    return v;
}

/// Whether the output is a plain bf16 NHWC frame (unsplit, even stride, 4-byte aligned), whose
/// column pairs cv_store_pair writes as one bf16x2.
__device__ __forceinline__ bool cv_pairs(const BcConvParams& p) {
    return !p.out_f32 && p.out_split == p.cout && p.out_cstride == 1 && p.out_stride % 2 == 0 &&
           (reinterpret_cast<uintptr_t>(p.out) & 3) == 0;
}

/// The epilogue of output pixel `m` (< h*w) and the column pair `n`, `n + 1` (n even, < cout;
/// a column past cout is computed, never stored): + bias, + residual, activation, then the
/// store (bf16x2 when `pairs`, else per element into frame n / out_split at out_cstride).
__device__ __forceinline__ void cv_store_pair(const BcConvParams& p, bool pairs, int m, int n, float a0, float a1) {
    float v[2] = {a0, a1};
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
        const int c = min(n + e1, p.cout - 1);
        if (p.bias) v[e1] += p.bias[c];
        if (p.res) v[e1] += __bfloat162float(p.res[(size_t)m * p.res_stride + c]);
        v[e1] = cv_act(v[e1], p.act);
    }
    if (pairs && n + 1 < p.cout) {
        bc_store_bf162(static_cast<__nv_bfloat16*>(p.out) + (size_t)m * p.out_stride + n, v[0], v[1]);
        return;
    }
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
        if (n + e1 >= p.cout) break;
        const int f = (n + e1) / p.out_split;
        const size_t o =
            (size_t)f * p.out_frame_stride + (size_t)m * p.out_stride + (size_t)(n + e1 - f * p.out_split) * p.out_cstride;
        if (p.out_f32)
            static_cast<float*>(p.out)[o] = v[e1];
        else
            static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16(v[e1]);
    }
}

#endif
