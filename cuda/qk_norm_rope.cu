// bc_qk_norm_rope: RMSNorm over the full row (f32 statistics, with weight) + 3D RoPE per
// head + store into contiguous rows or into KV-cache ring-buffer slots.
//
//   y = x / sqrt(mean(x^2) + eps) * w           (when norm_weight != NULL)
//   (y[2j], y[2j+1]) rotated by angle pos[axis(j)] * theta^(-2i/n)   (when rope != 0)
//   head_dim d splits into (d - 4*(d/6)) temporal, 2*(d/6) height, 2*(d/6) width channels;
//   pair j of a head belongs to the axis whose channel range holds 2j, i is the pair's index
//   inside that range, n the range's size. Positions: (frame_pos[lf] or first_frame + lf,
//   (r % tpf) / wp, r % wp) with lf = r / tpf. Angles are computed in f64 from the absolute
//   position (no table, no length limit), exactly like cpu::ops::rope_angles.
//
// Layout: x bf16 [rows, x_stride]; out bf16, row r stored at
// (frame_slot[lf] * tpf + r % tpf) * out_stride with a slot list (the K/V cache: per layer,
// slots of [tokens_per_frame, dim]), or r * out_stride without. The same kernel writes v into
// the cache (norm_weight = NULL, rope = 0).
// Thread layout: one block of QKR_THREADS per row, each thread walks column pairs.
// Checked by tests/kernels_emu.rs against cpu::ops::{rms_norm, rope_3d} including cache-slot
// scatter with a wrapped ring buffer and large absolute frame positions.
#include "include/common.cuh"

namespace {
constexpr int QKR_THREADS = BC_ROW_THREADS;
}  // namespace

extern "C" __global__ void __launch_bounds__(QKR_THREADS) bc_qk_norm_rope(BcQkNormRopeParams p) {
    __shared__ float scratch[QKR_THREADS / 32];
    const int row = blockIdx.x;
    const int dim = p.heads * p.head_dim;
    const __nv_bfloat16* x = p.x + (size_t)row * p.x_stride;

    float r = 1.f;
    if (p.norm_weight) {  // uniform over the block: every thread reaches the barriers
        float s = 0.f;
        for (int d = 2 * threadIdx.x; d < dim; d += 2 * QKR_THREADS) {
            float2 v = bc_load_bf162(x + d);
            s += v.x * v.x + v.y * v.y;
        }
        r = rsqrtf(bc_block_sum<QKR_THREADS>(s, scratch) / (float)dim + p.eps);
    }

    const int lf = row / p.tokens_per_frame;
    const int in_frame = row % p.tokens_per_frame;
    const double pos_t = (double)(p.frame_pos ? p.frame_pos[lf] : p.first_frame + lf);
    const double pos_h = (double)(in_frame / p.wp), pos_w = (double)(in_frame % p.wp);
    const size_t out_row = p.frame_slot ? (size_t)p.frame_slot[lf] * p.tokens_per_frame + in_frame : (size_t)row;
    __nv_bfloat16* out = p.out + out_row * p.out_stride;

    const int d6 = p.head_dim / 6;
    const int nt = p.head_dim - 4 * d6;  // temporal channels
    const double log_theta = log((double)p.theta);
    for (int d = 2 * threadIdx.x; d < dim; d += 2 * QKR_THREADS) {
        float2 v = bc_load_bf162(x + d);
        if (p.norm_weight) {
            v.x *= r * p.norm_weight[d];
            v.y *= r * p.norm_weight[d + 1];
        }
        if (p.rope) {
            const int j = (d % p.head_dim) / 2;  // pair index inside the head
            double pos;
            int i, n;
            if (j < nt / 2) {
                pos = pos_t, i = j, n = nt;
            } else if (j < nt / 2 + d6) {
                pos = pos_h, i = j - nt / 2, n = 2 * d6;
            } else {
                pos = pos_w, i = j - nt / 2 - d6, n = 2 * d6;
            }
            const double a = pos * exp(-2.0 * (double)i / (double)n * log_theta);
            const float c = (float)cos(a), s = (float)sin(a);
            v = make_float2(v.x * c - v.y * s, v.x * s + v.y * c);
        }
        bc_store_bf162(out + d, v.x, v.y);
    }
}
BC_EMU_ENTRY(bc_qk_norm_rope, BcQkNormRopeParams)
