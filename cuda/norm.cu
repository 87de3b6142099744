// Timestep-conditioned normalisation and residual kernels of a DiT block.
//
// bc_ln_modulate:       out = LN(x) * (1 + scale[f] + scale_bias) + shift[f] + shift_bias
//                       (LayerNorm without affine, eps; also the head modulation)
// bc_layer_norm_affine: out = LN(x) * weight + bias  (norm3 before cross-attention)
// bc_gated_residual:    x += delta * (gate[f] + gate_bias)   (or x += delta without gate)
// bc_residual_norm:     bc_gated_residual, then bc_ln_modulate (or with `affine`
//                       bc_layer_norm_affine) of the updated rows, in one pass: the row is read
//                       and written once and stays in registers for the statistics and the
//                       output (the unfused pair reads the f32 residual three times)
//
// Layout: x (residual stream) f32 row-major [rows, x_stride]; out/delta bf16 row-major;
// per-frame vectors f32 [frames, frame_stride], row r uses frame r / tokens_per_frame.
// Statistics in f32 with a two-pass (mean, then squared deviations) reduction over the row.
// Thread layout: one block of NORM_ROW_THREADS per row for the norms, each thread walking pairs of
// columns (d = 2*tid + k*2*NORM_ROW_THREADS); one thread per column pair for the residual. The
// fused kernel keeps its RESNORM_PAIRS column pairs per thread in registers, in the same order,
// and shares the arithmetic helpers below, so its results are bit-identical to the unfused pair.
// Checked by tests/kernels_emu.rs against blockcascade::cpu::ops::{ln_modulate,
// layer_norm_affine, gated_residual} on random data (bf16 tolerance), and bc_residual_norm
// bit for bit against bc_gated_residual + bc_ln_modulate / bc_layer_norm_affine.
#include "include/common.cuh"

namespace {
constexpr int NORM_ROW_THREADS = BC_ROW_THREADS;
constexpr int NORM_ELEM_THREADS = BC_ELEM_THREADS;
// Column pairs per thread of bc_residual_norm (its row lives in registers).
constexpr int RESNORM_PAIRS = BC_RESNORM_MAX_DIM / (2 * NORM_ROW_THREADS);
static_assert(RESNORM_PAIRS * 2 * NORM_ROW_THREADS == BC_RESNORM_MAX_DIM, "BC_RESNORM_MAX_DIM");
}  // namespace

/// `v + delta * (g + gate_bias)` for the column pair at `d` of a row whose frame's gate is `g`
/// (`g` null: `v + delta`). The gated residual's arithmetic, shared by both residual kernels.
__device__ __forceinline__ float2 bc_gate_add(float2 v, float2 delta, const float* g, const float* gate_bias,
                                              int d) {
    if (g) {
        float g0 = g[d], g1 = g[d + 1];
        if (gate_bias) {
            g0 += gate_bias[d];
            g1 += gate_bias[d + 1];
        }
        v.x = __fmaf_rn(delta.x, g0, v.x);
        v.y = __fmaf_rn(delta.y, g1, v.y);
    } else {
        v.x += delta.x;
        v.y += delta.y;
    }
    return v;
}

/// The shift `s` and scale `c` of the column pair at `d` of a frame's modulation `sh`/`sc`,
/// with the optional per-column biases added (shared by bc_ln_modulate and bc_residual_norm).
__device__ __forceinline__ void bc_mod_pair(const float* sh, const float* sc, const float* shift_bias,
                                            const float* scale_bias, int d, float2& s, float2& c) {
    s = make_float2(sh[d], sh[d + 1]);
    c = make_float2(sc[d], sc[d + 1]);
    if (shift_bias) {
        s.x += shift_bias[d];
        s.y += shift_bias[d + 1];
    }
    if (scale_bias) {
        c.x += scale_bias[d];
        c.y += scale_bias[d + 1];
    }
}

/// `q` plus the squared deviations of the pair `v` from `mean`, with explicit FMAs: nvcc
/// contracts `q += a * a + b * b` differently per kernel (a GPU run saw bc_gated_residual keep
/// FMUL + FADD where bc_residual_norm fused them), and the fused and unfused kernels must agree
/// bit for bit, as the emulation (which never contracts) does.
__device__ __forceinline__ float bc_sq_dev(float q, float2 v, float mean) {
    const float a = v.x - mean, b = v.y - mean;
    return __fmaf_rn(b, b, __fmaf_rn(a, a, q));
}

/// One normalised, scaled and shifted output value, `(v - mean) * rstd * c + s`, with one
/// explicit FMA (same reason as bc_sq_dev).
__device__ __forceinline__ float bc_norm_out(float v, float mean, float rstd, float c, float s) {
    return __fmaf_rn((v - mean) * rstd, c, s);
}

/// Mean and 1/sqrt(var + eps) of one f32 row, for every thread of the block.
__device__ __forceinline__ float2 bc_row_stats(const float* __restrict__ x, int dim, float eps, float* scratch) {
    float s = 0.f;
    for (int d = 2 * threadIdx.x; d < dim; d += 2 * NORM_ROW_THREADS) {
        float2 v = *reinterpret_cast<const float2*>(x + d);
        s += v.x + v.y;
    }
    const float mean = bc_block_sum<NORM_ROW_THREADS>(s, scratch) / (float)dim;
    float q = 0.f;
    for (int d = 2 * threadIdx.x; d < dim; d += 2 * NORM_ROW_THREADS) {
        q = bc_sq_dev(q, *reinterpret_cast<const float2*>(x + d), mean);
    }
    const float var = bc_block_sum<NORM_ROW_THREADS>(q, scratch) / (float)dim;
    return make_float2(mean, rsqrtf(var + eps));
}

extern "C" __global__ void __launch_bounds__(NORM_ROW_THREADS) bc_ln_modulate(BcLnModulateParams p) {
    __shared__ float scratch[NORM_ROW_THREADS / 32];
    const int row = blockIdx.x;
    const float* x = p.x + (size_t)row * p.x_stride;
    const float2 st = bc_row_stats(x, p.dim, p.eps, scratch);
    const int f = row / p.tokens_per_frame;
    const float* sh = p.shift + (size_t)f * p.frame_stride;
    const float* sc = p.scale + (size_t)f * p.frame_stride;
    __nv_bfloat16* out = p.out + (size_t)row * p.out_stride;
    for (int d = 2 * threadIdx.x; d < p.dim; d += 2 * NORM_ROW_THREADS) {
        const float2 v = *reinterpret_cast<const float2*>(x + d);
        float2 s, c;
        bc_mod_pair(sh, sc, p.shift_bias, p.scale_bias, d, s, c);
        bc_store_bf162(out + d, bc_norm_out(v.x, st.x, st.y, 1.f + c.x, s.x),
                       bc_norm_out(v.y, st.x, st.y, 1.f + c.y, s.y));
    }
}
BC_EMU_ENTRY(bc_ln_modulate, BcLnModulateParams)

extern "C" __global__ void __launch_bounds__(NORM_ROW_THREADS) bc_layer_norm_affine(BcLayerNormParams p) {
    __shared__ float scratch[NORM_ROW_THREADS / 32];
    const int row = blockIdx.x;
    const float* x = p.x + (size_t)row * p.x_stride;
    const float2 st = bc_row_stats(x, p.dim, p.eps, scratch);
    __nv_bfloat16* out = p.out + (size_t)row * p.out_stride;
    for (int d = 2 * threadIdx.x; d < p.dim; d += 2 * NORM_ROW_THREADS) {
        float2 v = *reinterpret_cast<const float2*>(x + d);
        bc_store_bf162(out + d, bc_norm_out(v.x, st.x, st.y, p.weight[d], p.bias[d]),
                       bc_norm_out(v.y, st.x, st.y, p.weight[d + 1], p.bias[d + 1]));
    }
}
BC_EMU_ENTRY(bc_layer_norm_affine, BcLayerNormParams)

extern "C" __global__ void __launch_bounds__(NORM_ELEM_THREADS) bc_gated_residual(BcGatedResidualParams p) {
    const int half = p.dim / 2;
    const long long i = (long long)blockIdx.x * NORM_ELEM_THREADS + threadIdx.x;  // column pair index
    if (i >= (long long)p.rows * half) return;
    const int row = (int)(i / half), d = (int)(i % half) * 2;
    const float2 delta = bc_load_bf162(p.delta + (size_t)row * p.delta_stride + d);
    float* x = p.x + (size_t)row * p.dim + d;
    const float* g = p.gate ? p.gate + (size_t)(row / p.tokens_per_frame) * p.frame_stride : nullptr;
    *reinterpret_cast<float2*>(x) = bc_gate_add(*reinterpret_cast<float2*>(x), delta, g, p.gate_bias, d);
}
BC_EMU_ENTRY(bc_gated_residual, BcGatedResidualParams)

extern "C" __global__ void __launch_bounds__(NORM_ROW_THREADS) bc_residual_norm(BcResidualNormParams p) {
    __shared__ float scratch[NORM_ROW_THREADS / 32];
    BC_EMU_CHECK(p.dim <= BC_RESNORM_MAX_DIM);
    const int row = blockIdx.x;
    const int f = row / p.tokens_per_frame;
    float* x = p.x + (size_t)row * p.dim;
    const __nv_bfloat16* delta = p.delta + (size_t)row * p.delta_stride;
    const float* g = p.gate ? p.gate + (size_t)f * p.gate_stride : nullptr;
    // The residual add; the updated pairs stay in registers (same columns, same order as
    // bc_row_stats walks them).
    float2 v[RESNORM_PAIRS];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < RESNORM_PAIRS; ++k) {
        const int d = 2 * threadIdx.x + k * 2 * NORM_ROW_THREADS;
        v[k] = make_float2(0.f, 0.f);
        if (d < p.dim) {
            v[k] = bc_gate_add(*reinterpret_cast<const float2*>(x + d), bc_load_bf162(delta + d), g, p.gate_bias, d);
            *reinterpret_cast<float2*>(x + d) = v[k];
            s += v[k].x + v[k].y;
        }
    }
    const float mean = bc_block_sum<NORM_ROW_THREADS>(s, scratch) / (float)p.dim;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < RESNORM_PAIRS; ++k) {
        const int d = 2 * threadIdx.x + k * 2 * NORM_ROW_THREADS;
        if (d < p.dim) {
            q = bc_sq_dev(q, v[k], mean);
        }
    }
    const float var = bc_block_sum<NORM_ROW_THREADS>(q, scratch) / (float)p.dim;
    const float rstd = rsqrtf(var + p.eps);
    // The LayerNorm output, modulated (1 + scale) or affine (scale = weight).
    const float* sh = p.shift + (size_t)f * p.mod_stride;
    const float* sc = p.scale + (size_t)f * p.mod_stride;
    __nv_bfloat16* out = p.out + (size_t)row * p.out_stride;
#pragma unroll
    for (int k = 0; k < RESNORM_PAIRS; ++k) {
        const int d = 2 * threadIdx.x + k * 2 * NORM_ROW_THREADS;
        if (d < p.dim) {
            float2 s, c;
            bc_mod_pair(sh, sc, p.shift_bias, p.scale_bias, d, s, c);
            if (!p.affine) c = make_float2(1.f + c.x, 1.f + c.y);
            bc_store_bf162(out + d, bc_norm_out(v[k].x, mean, rstd, c.x, s.x),
                           bc_norm_out(v[k].y, mean, rstd, c.y, s.y));
        }
    }
}
BC_EMU_ENTRY(bc_residual_norm, BcResidualNormParams)
