// Shared pieces of the decoders' convolution kernels (cuda/conv.cu: bc_conv, bc_conv_n16 by
// mma.sync; cuda/conv_wgmma.cu: bc_conv_wgmma by Hopper wgmma; cuda/conv_wgmma_tma.cu): the
// source fields of a BcConvParams, the GEMM geometry (plain or the sub-pixel parity form) and
// the epilogue (bias, residual, activation, split / transposed / bf16x2 store), so all tilings
// compute, address and store exactly the same way.
#ifndef BC_CONV_CUH
#define BC_CONV_CUH

#include "common.cuh"

/// The fields of one BcConvSource (picked with constant indices only: no local-memory copy of
/// the params).
struct CvSrc {
    const __nv_bfloat16* x;
    int channels, stride, c0, t, up;
};

/// The GEMM geometry of a launch. Plain: the rows are the output's h x w pixels, the taps the
/// kernel's (tap t at (t / kw - kh/2, t % kw - kw/2)), the weights `w`. Parity form
/// (`p.parity`, grid z = parity 2 py + px): the rows are the sources' (h/2) x (w/2) pixels, each
/// giving output pixel (2i + py, 2j + px), the taps the 2x2 at (t / 2 + py - 1, t % 2 + px - 1)
/// read at the sources' own size, the weights parity z's `[cout][2][2][cin]` block (w0 on).
struct CvGeo {
    int gh, gw;  // the grid of GEMM rows
    int kw;      // taps per tap row
    int taps;    // taps per source (kernel rows x kw)
    int oy, ox;  // offset of tap 0
    int z;       // the parity, -1 for a plain conv
    size_t w0;   // first weight element of this parity (0 for a plain conv)
    int f;       // the frame of a frame-batched launch (p.frames > 1; else 0)
    int fo;      // its first output frame: f * (cout / out_split)
};
/// The geometry of grid z index `bz` (the persistent bc_conv_halo_n64 walks its frames itself).
__device__ __forceinline__ CvGeo cv_geo_z(const BcConvParams& p, int bz) {
    if (p.parity) {
        const int z = bz & 3, f = bz >> 2;
        return CvGeo{p.h / 2, p.w_px / 2, 2, 4, (z >> 1) - 1, (z & 1) - 1, z, (size_t)z * p.cout * 4 * p.cin, f, f * (p.cout / p.out_split)};
    }
    return CvGeo{p.h, p.w_px, p.kw, p.kh * p.kw, -(p.kh / 2), -(p.kw / 2), -1, 0, bz, bz * (p.cout / p.out_split)};
}
__device__ __forceinline__ CvGeo cv_geo(const BcConvParams& p) { return cv_geo_z(p, (int)blockIdx.z); }

/// The fields of one BcConvSource (picked with constant indices only: no local-memory copy of
/// the params), its pointer moved to frame g.f of a frame-batched launch.
__device__ __forceinline__ CvSrc cv_src(const BcConvParams& p, const CvGeo& g, int s) {
#define CV_PICK(f) (s == 0 ? p.src[0].f : (s == 1 ? p.src[1].f : p.src[2].f))
    CvSrc r{CV_PICK(x), CV_PICK(channels), CV_PICK(stride), CV_PICK(c0), CV_PICK(t), CV_PICK(up)};
#undef CV_PICK
    const size_t px = r.up ? (size_t)(p.h / 2) * (p.w_px / 2) : (size_t)p.h * p.w_px;
    r.x += (size_t)g.f * px * r.stride;
    return r;
}

/// The output pixel of GEMM row m (< gh * gw): (s i + py) * w + s j + px for grid pixel
/// (i, j), with s = 2 and parity (py, px) in the parity form, s = 1 and (0, 0) (so m itself)
/// otherwise; computed the same way for both (no branch in the epilogues).
__device__ __forceinline__ int cv_out_pixel(const BcConvParams& p, const CvGeo& g, int m) {
    const unsigned par = g.z >= 0, z = par ? (unsigned)g.z : 0u;
    const unsigned i = (unsigned)m / (unsigned)g.gw, j = (unsigned)m - i * (unsigned)g.gw;
    return (int)((((i << par) + (z >> 1)) * (unsigned)p.w_px) + (j << par) + (z & 1));
}

/// The element offset of pixel (yy, xx) of the GEMM grid in source `s` (inside the grid: the
/// caller checked 0 <= yy < gh, 0 <= xx < gw): an upsampled source is read at (yy/2, xx/2),
/// except in the parity form, where the grid is the source's own.
__device__ __forceinline__ size_t cv_src_off(const BcConvParams& p, const CvGeo& g, const CvSrc& s, int yy, int xx) {
    const bool half = s.up && g.z < 0;
    const int sy = half ? yy >> 1 : yy, sx = half ? xx >> 1 : xx;
    const int sw = s.up ? p.w_px / 2 : p.w_px;
    return ((size_t)sy * sw + sx) * s.stride;
}

/// Grid coordinates of the GEMM rows m0 + i * step (i < N) a thread copies A rows for: a row
/// past gh*gw gets y = -2^20, so none of its taps is inside the grid (it reads nothing).
template <int N>
__device__ __forceinline__ void cv_rows(const CvGeo& g, int m0, int step, int (&py)[N], int (&px)[N]) {
    const int hw = g.gh * g.gw;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int m = m0 + i * step;
        py[i] = m < hw ? m / g.gw : -(1 << 20);
        px[i] = m < hw ? m % g.gw : 0;
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
__device__ __forceinline__ void cv_store_pair(const BcConvParams& p, const CvGeo& g, bool pairs, int m, int n, float a0,
                                              float a1) {
    float v[2] = {a0, a1};
    // Frame g.f of a frame-batched launch: its residual frame and first output frame.
    const size_t rm = (size_t)g.f * p.h * p.w_px + m;
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
        const int c = min(n + e1, p.cout - 1);
        if (p.bias) v[e1] += p.bias[c];
        if (p.res) v[e1] += __bfloat162float(p.res[rm * p.res_stride + c]);
        v[e1] = cv_act(v[e1], p.act);
    }
    if (pairs && n + 1 < p.cout) {
        bc_store_bf162(static_cast<__nv_bfloat16*>(p.out) + (size_t)g.fo * p.out_frame_stride + (size_t)m * p.out_stride + n,
                       v[0], v[1]);
        return;
    }
#pragma unroll
    for (int e1 = 0; e1 < 2; ++e1) {
        if (n + e1 >= p.cout) break;
        const int f = (n + e1) / p.out_split;
        const size_t o = (size_t)(g.fo + f) * p.out_frame_stride + (size_t)m * p.out_stride +
                         (size_t)(n + e1 - f * p.out_split) * p.out_cstride;
        if (p.out_f32)
            static_cast<float*>(p.out)[o] = v[e1];
        else
            static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16(v[e1]);
    }
}

#endif
