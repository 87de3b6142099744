// Timestep-conditioned normalisation and residual kernels of a DiT block.
//
// bc_ln_modulate:       out = LN(x) * (1 + scale[f] + scale_bias) + shift[f] + shift_bias
//                       (LayerNorm without affine, eps; also the head modulation)
// bc_layer_norm_affine: out = LN(x) * weight + bias  (norm3 before cross-attention)
// bc_gated_residual:    x += delta * (gate[f] + gate_bias)   (or x += delta without gate)
//
// Layout: x (residual stream) f32 row-major [rows, x_stride]; out/delta bf16 row-major;
// per-frame vectors f32 [frames, frame_stride], row r uses frame r / tokens_per_frame.
// Statistics in f32 with a two-pass (mean, then squared deviations) reduction over the row.
// Thread layout: one block of NORM_ROW_THREADS per row for the norms, each thread walking pairs of
// columns; one thread per column pair for the residual.
// Checked by tests/kernels_emu.rs against blockcascade::cpu::ops::{ln_modulate,
// layer_norm_affine, gated_residual} on random data (bf16 tolerance).
#include "include/common.cuh"

namespace {
constexpr int NORM_ROW_THREADS = BC_ROW_THREADS;
constexpr int NORM_ELEM_THREADS = BC_ELEM_THREADS;
}  // namespace

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
        float2 v = *reinterpret_cast<const float2*>(x + d);
        float a = v.x - mean, b = v.y - mean;
        q += a * a + b * b;
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
        float2 v = *reinterpret_cast<const float2*>(x + d);
        float s0 = sh[d], s1 = sh[d + 1], c0 = sc[d], c1 = sc[d + 1];
        if (p.shift_bias) {
            s0 += p.shift_bias[d];
            s1 += p.shift_bias[d + 1];
        }
        if (p.scale_bias) {
            c0 += p.scale_bias[d];
            c1 += p.scale_bias[d + 1];
        }
        bc_store_bf162(out + d, (v.x - st.x) * st.y * (1.f + c0) + s0, (v.y - st.x) * st.y * (1.f + c1) + s1);
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
        bc_store_bf162(out + d, (v.x - st.x) * st.y * p.weight[d] + p.bias[d],
                       (v.y - st.x) * st.y * p.weight[d + 1] + p.bias[d + 1]);
    }
}
BC_EMU_ENTRY(bc_layer_norm_affine, BcLayerNormParams)

extern "C" __global__ void __launch_bounds__(NORM_ELEM_THREADS) bc_gated_residual(BcGatedResidualParams p) {
    const int half = p.dim / 2;
    const long long i = (long long)blockIdx.x * NORM_ELEM_THREADS + threadIdx.x;  // column pair index
    if (i >= (long long)p.rows * half) return;
    const int row = (int)(i / half), d = (int)(i % half) * 2;
    float2 delta = bc_load_bf162(p.delta + (size_t)row * p.delta_stride + d);
    float* x = p.x + (size_t)row * p.dim + d;
    float2 v = *reinterpret_cast<float2*>(x);
    if (p.gate) {
        const float* g = p.gate + (size_t)(row / p.tokens_per_frame) * p.frame_stride + d;
        float g0 = g[0], g1 = g[1];
        if (p.gate_bias) {
            g0 += p.gate_bias[d];
            g1 += p.gate_bias[d + 1];
        }
        v.x += delta.x * g0;
        v.y += delta.y * g1;
    } else {
        v.x += delta.x;
        v.y += delta.y;
    }
    *reinterpret_cast<float2*>(x) = v;
}
BC_EMU_ENTRY(bc_gated_residual, BcGatedResidualParams)
