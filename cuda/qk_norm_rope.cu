// bc_qk_norm_rope: RMSNorm over the full row (f32 statistics, with weight) + 3D RoPE per
// head + store into contiguous rows or into KV-cache ring-buffer slots.
//
//   y = x / sqrt(mean(x^2) + eps) * w           (when norm_weight != NULL)
//   (y[2j], y[2j+1]) rotated by angle pos[axis(j)] * theta^(-2i/n)   (when rope != 0)
//   head_dim d splits into (d - 4*(d/6)) temporal, 2*(d/6) height, 2*(d/6) width channels;
//   pair j of a head belongs to the axis whose channel range holds 2j, i is the pair's index
//   inside that range, n the range's size. Positions: (frame_pos[lf] or first_frame + lf,
//   (r % tpf) / wp, r % wp) with lf = r / tpf. Angles come from the absolute integer position
//   (no table, no length limit) without any f64 instruction (f64 is slow on most GPUs, and its
//   sin/cos need local memory): see qkr_rotation. They match cpu::ops::rope_angles (f64) to
//   ~1e-6 in cos/sin at frame positions of 10^6 (bf16 output rounding is 2e-3).
//
// Layout: x bf16 [rows, x_stride]; out bf16, row r stored at
// (frame_slot[lf] * tpf + r % tpf) * out_stride with a slot list (the K/V cache: per layer,
// slots of [tokens_per_frame, dim]), or r * out_stride without. The same kernel writes v into
// the cache (norm_weight = NULL, rope = 0).
// Thread layout: one block of QKR_THREADS per row. The row's head_dim/2 rotations (the same
// for every head) are computed once per block into shared memory, then each thread walks
// column pairs.
// Checked by tests/kernels_emu.rs against cpu::ops::{rms_norm, rope_3d} including cache-slot
// scatter with a wrapped ring buffer and large absolute frame positions.
#include "include/common.cuh"

namespace {
constexpr int QKR_THREADS = BC_ROW_THREADS;
constexpr int QKR_TABLE = 256;  // pairs of the shared rotation table (head_dim <= 512)

// Double-float arithmetic (an unevaluated sum hi + lo of two floats, ~48 significant bits):
// the RoPE angle pos * theta^(-2i/n) of a frame position near 10^6 needs ~40 bits.
struct QkrDf {
    float hi, lo;
};
/// a + b for |a| >= |b| (or a == 0), exactly, as hi + lo.
__device__ __forceinline__ QkrDf qkr_fast_sum(float a, float b) {
    const float s = a + b;
    return {s, b - (s - a)};
}
__device__ __forceinline__ QkrDf qkr_mul(QkrDf a, QkrDf b) {
    const float p = a.hi * b.hi;
    const float e = fmaf(a.hi, b.hi, -p);  // a.hi * b.hi = p + e exactly
    return qkr_fast_sum(p, e + (a.hi * b.lo + a.lo * b.hi));
}
/// b^k, k >= 0, by squaring.
__device__ __forceinline__ QkrDf qkr_pow(QkrDf b, int k) {
    QkrDf r{1.f, 0.f};
    for (; k > 0; k >>= 1) {
        if (k & 1) r = qkr_mul(r, b);
        b = qkr_mul(b, b);
    }
    return r;
}
/// An integer as an exact double-float: hi = v rounded to float, lo = the (exact) rest.
__device__ __forceinline__ QkrDf qkr_int(int v) {
    const float hi = (float)v;
    return {hi, (float)((long long)v - (long long)hi)};
}

/// (cos, sin) of pos * theta^(-2i/n) (n even, 0 <= i < n/2) with f32 and integer arithmetic:
///   r = theta^(-2/n) from exp2f/log2f (~1e-7 relative), refined by one Newton step on
///   r^(n/2) * theta = 1 in double-float (~1e-12); the frequency r^i by squaring; the angle in
///   turns pos * r^i / (2 pi) in double-float from the exact integer position, reduced to
///   [-1/2, 1/2] exactly (hi and lo separately), then one __sincosf on [-pi, pi] (abs. error
///   ~5e-7). i = 0 (frequency 1) is exact up to the final reduction.
__device__ __forceinline__ float2 qkr_rotation(int pos, int i, int n, float theta) {
    const int m = n / 2;
    const float r0 = exp2f(-log2f(theta) / (float)m);
    // e = r0^m * theta - 1 (small: hi - 1 is exact), r = r0 * (1 - e/m) to first order.
    const QkrDf rm = qkr_mul(qkr_pow({r0, 0.f}, m), {theta, 0.f});
    const float e = (rm.hi - 1.f) + rm.lo;
    const QkrDf r = qkr_fast_sum(r0, -r0 * e / (float)m);
    const QkrDf inv_2pi{1.591549367e-01f, 6.420638243e-09f};  // 1/(2 pi) = hi + lo
    const QkrDf t = qkr_mul(qkr_int(pos), qkr_mul(qkr_pow(r, i), inv_2pi));
    float f = (t.hi - rintf(t.hi)) + (t.lo - rintf(t.lo));  // both differences exact
    f -= rintf(f);
    float s, c;
    __sincosf(f * 6.28318530717958648f, &s, &c);
    return make_float2(c, s);
}

/// Rotation of pair j (0 <= j < head_dim/2) of a head at positions (t, h, w): the pair's axis
/// (channels [0, nt) temporal, then 2*d6 height, 2*d6 width), index and range size.
__device__ __forceinline__ float2 qkr_pair_rotation(int j, int head_dim, int pos_t, int pos_h, int pos_w,
                                                    float theta) {
    const int d6 = head_dim / 6;
    const int nt = head_dim - 4 * d6;  // temporal channels
    if (j < nt / 2) return qkr_rotation(pos_t, j, nt, theta);
    if (j < nt / 2 + d6) return qkr_rotation(pos_h, j - nt / 2, 2 * d6, theta);
    return qkr_rotation(pos_w, j - nt / 2 - d6, 2 * d6, theta);
}
}  // namespace

extern "C" __global__ void __launch_bounds__(QKR_THREADS) bc_qk_norm_rope(BcQkNormRopeParams p) {
    __shared__ float scratch[QKR_THREADS / 32];
    __shared__ float2 rot[QKR_TABLE];
    const int row = blockIdx.x;
    const int dim = p.heads * p.head_dim;
    const __nv_bfloat16* x = p.x + (size_t)row * p.x_stride;

    const int lf = row / p.tokens_per_frame;
    const int in_frame = row % p.tokens_per_frame;
    const int pos_t = p.frame_pos ? p.frame_pos[lf] : p.first_frame + lf;
    const int pos_h = in_frame / p.wp, pos_w = in_frame % p.wp;
    const size_t out_row = p.frame_slot ? (size_t)p.frame_slot[lf] * p.tokens_per_frame + in_frame : (size_t)row;
    __nv_bfloat16* out = p.out + out_row * p.out_stride;
    const int half = p.head_dim / 2;
    const bool table = p.rope && half <= QKR_TABLE;  // uniform over the block
    if (table) {
        for (int j = threadIdx.x; j < half; j += QKR_THREADS)
            rot[j] = qkr_pair_rotation(j, p.head_dim, pos_t, pos_h, pos_w, p.theta);
    }

    float r = 1.f;
    if (p.norm_weight) {  // uniform over the block: every thread reaches the barriers
        float s = 0.f;
        for (int d = 2 * threadIdx.x; d < dim; d += 2 * QKR_THREADS) {
            float2 v = bc_load_bf162(x + d);
            s += v.x * v.x + v.y * v.y;
        }
        r = rsqrtf(bc_block_sum<QKR_THREADS>(s, scratch) / (float)dim + p.eps);  // barriers: rot is ready
    } else {
        __syncthreads();  // rot is ready
    }

    for (int d = 2 * threadIdx.x; d < dim; d += 2 * QKR_THREADS) {
        float2 v = bc_load_bf162(x + d);
        if (p.norm_weight) {
            v.x *= r * p.norm_weight[d];
            v.y *= r * p.norm_weight[d + 1];
        }
        if (p.rope) {
            const int j = (d % p.head_dim) / 2;  // pair index inside the head
            const float2 cs = table ? rot[j] : qkr_pair_rotation(j, p.head_dim, pos_t, pos_h, pos_w, p.theta);
            v = make_float2(v.x * cs.x - v.y * cs.y, v.x * cs.y + v.y * cs.x);
        }
        bc_store_bf162(out + d, v.x, v.y);
    }
}
BC_EMU_ENTRY(bc_qk_norm_rope, BcQkNormRopeParams)
