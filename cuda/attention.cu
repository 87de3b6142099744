// Fused flash attention over a list of K/V segments, bf16 in/out, f32 accumulation,
// online softmax (base 2, scale folded into q).
//
//   out[n, h] = softmax(q[n, h] . K[:, h]^T * scale) . V[:, h]
//
// Keys/values are not one tensor: each query group (a window member: a run of query rows)
// lists the segments it sees (KV-cache ring-buffer slots, the current-tick K/V of window
// members, or the 512 text tokens for cross-attention), so per-member visibility (causal,
// bidirectional, sink + local window) is just which segment indices are in its list. A group
// with no keys gets zeros (like cpu::attention). All tables are read from device memory.
//
// Layout: q/out [nq, stride] bf16 with head h at columns h*head_dim; segment k/v rows of
// kv_stride elements. head_dim: a multiple of 8, <= 64 (bc_attention_hd64) or <= 128
// (bc_attention_hd128); pointers 16-byte aligned, strides multiples of 8.
// Grid (ceil(max group rows / BQ), heads, groups); block NT threads = WARPS warps; warp w owns
// query rows [w*RPW, (w+1)*RPW) of the tile. Per key tile of BK keys (staged in shared memory):
// lane j computes the scores of key j for the warp's rows, the row max is a warp reduction,
// probabilities go through shared memory, then lane l accumulates head-dim pairs
// l, l+32, ... of P.V. This version uses plain FMAs (no tensor cores). A tensor-core version
// needs: mma.sync m16n8k16 bf16 (S = Q K^T and O += P V with P re-packed from the
// accumulator fragment), ldmatrix(.trans) for the K/V fragments, cp.async double buffering
// of the K/V tiles, and emulated equivalents of those three in cuda/emu with the documented
// fragment layouts (not written yet).
// Checked by tests/kernels_emu.rs against cpu::attention::attention: head_dim 32/64/128,
// several groups with different segment lists (ring-buffer wrap, sink + local window), row
// counts and segment lengths that are not multiples of the tiles, cross-attention shape.
#include "include/common.cuh"

namespace {
constexpr int ATT_NT = BC_ATTN_THREADS;    // threads per block
constexpr int ATT_WARPS = ATT_NT / 32;     // warps per block
constexpr int ATT_BQ = BC_ATTN_BQ;         // query rows per block
constexpr int ATT_BK = BC_ATTN_BK;         // keys per tile (= lanes of a warp)
constexpr int ATT_RPW = ATT_BQ / ATT_WARPS;  // query rows per warp
constexpr int ATT_MIN_BLOCKS = 2;          // __launch_bounds__ occupancy hint (avoids spills)
static_assert(ATT_BK == 32, "one key per lane");
static_assert(ATT_BQ % ATT_WARPS == 0, "rows per warp");
}  // namespace

template <int HDMAX>
__device__ __forceinline__ void bc_attention_impl(const BcAttentionParams& p) {
    static_assert(HDMAX % 64 == 0, "head_dim bound");
    constexpr int HP = HDMAX / 2;         // head-dim pairs
    constexpr int NPAIR = HDMAX / 64;     // pairs per lane in P.V
    constexpr int KSTR = HP + 1;          // padded K row (in pairs): conflict-free column reads
    __shared__ float2 qs[ATT_BQ][HP];
    __shared__ __nv_bfloat162 ks[ATT_BK][KSTR];
    __shared__ __align__(16) __nv_bfloat162 vs[ATT_BK][HP];
    __shared__ float ps[ATT_WARPS][ATT_RPW][ATT_BK];

    BC_EMU_CHECK(p.head_dim > 0 && p.head_dim <= HDMAX && p.head_dim % 8 == 0);
    const BcAttnGroup grp = p.groups[blockIdx.z];
    const int r0 = blockIdx.x * ATT_BQ;
    if (r0 >= grp.q_rows) return;  // uniform for the whole block
    const int hd = p.head_dim, hp = hd / 2, chunks = hd / 8;
    const int h = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const float qscale = p.scale * 1.4426950408889634f;  // softmax in base 2

    for (int e = tid; e < ATT_BQ * hp; e += ATT_NT) {
        const int r = e / hp, c = e % hp;
        float2 v = make_float2(0.f, 0.f);
        if (r0 + r < grp.q_rows) v = bc_load_bf162(p.q + (size_t)(grp.q_begin + r0 + r) * p.q_stride + h * hd + 2 * c);
        qs[r][c] = make_float2(v.x * qscale, v.y * qscale);
    }

    float m[ATT_RPW], l[ATT_RPW];
    float2 acc[ATT_RPW][NPAIR];
#pragma unroll
    for (int r = 0; r < ATT_RPW; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int t = 0; t < NPAIR; ++t) acc[r][t] = make_float2(0.f, 0.f);
    }

    for (int si = 0; si < grp.seg_count; ++si) {
        const BcKvSegment seg = p.segments[p.seg_index[grp.seg_begin + si]];
        for (int k0 = 0; k0 < seg.tokens; k0 += ATT_BK) {
            const int kn = min(ATT_BK, seg.tokens - k0);
            __syncthreads();  // the previous tile is consumed (and q is staged)
            for (int e = tid; e < ATT_BK * chunks; e += ATT_NT) {
                const int r = e / chunks, c = e % chunks;
                uint4 kk = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
                if (r < kn) {  // masked keys get zero K and V (never NaN garbage)
                    const size_t off = (size_t)(k0 + r) * p.kv_stride + h * hd + 8 * c;
                    kk = *reinterpret_cast<const uint4*>(seg.k + off);
                    vv = *reinterpret_cast<const uint4*>(seg.v + off);
                }
                unsigned* kd = reinterpret_cast<unsigned*>(&ks[r][4 * c]);
                kd[0] = kk.x;
                kd[1] = kk.y;
                kd[2] = kk.z;
                kd[3] = kk.w;
                *reinterpret_cast<uint4*>(&vs[r][4 * c]) = vv;
            }
            __syncthreads();

            float s[ATT_RPW];
#pragma unroll
            for (int r = 0; r < ATT_RPW; ++r) s[r] = 0.f;
            for (int c = 0; c < hp; ++c) {
                const float2 k = __bfloat1622float2(ks[lane][c]);
#pragma unroll
                for (int r = 0; r < ATT_RPW; ++r) {
                    const float2 q = qs[warp * ATT_RPW + r][c];
                    s[r] = fmaf(q.x, k.x, fmaf(q.y, k.y, s[r]));
                }
            }
#pragma unroll
            for (int r = 0; r < ATT_RPW; ++r) {
                const float sr = lane < kn ? s[r] : -INFINITY;
                const float mn = fmaxf(m[r], bc_warp_max(sr));
                const float alpha = exp2f(m[r] - mn);
                const float pr = exp2f(sr - mn);
                l[r] = l[r] * alpha + pr;
                m[r] = mn;
#pragma unroll
                for (int t = 0; t < NPAIR; ++t) acc[r][t] = make_float2(acc[r][t].x * alpha, acc[r][t].y * alpha);
                ps[warp][r][lane] = pr;
            }
            __syncwarp();
            for (int j = 0; j < kn; ++j) {
#pragma unroll
                for (int t = 0; t < NPAIR; ++t) {
                    const int c = lane + 32 * t;
                    if (c < hp) {
                        const float2 v = __bfloat1622float2(vs[j][c]);
#pragma unroll
                        for (int r = 0; r < ATT_RPW; ++r) {
                            const float pj = ps[warp][r][j];
                            acc[r][t].x = fmaf(pj, v.x, acc[r][t].x);
                            acc[r][t].y = fmaf(pj, v.y, acc[r][t].y);
                        }
                    }
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_RPW; ++r) {
        const float lt = bc_warp_sum(l[r]);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int row = r0 + warp * ATT_RPW + r;
        if (row < grp.q_rows) {
            __nv_bfloat16* o = p.out + (size_t)(grp.q_begin + row) * p.out_stride + h * hd;
#pragma unroll
            for (int t = 0; t < NPAIR; ++t) {
                const int c = lane + 32 * t;
                if (c < hp) bc_store_bf162(o + 2 * c, acc[r][t].x * inv, acc[r][t].y * inv);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_NT, ATT_MIN_BLOCKS) bc_attention_hd64(BcAttentionParams p) {
    bc_attention_impl<64>(p);
}
BC_EMU_ENTRY(bc_attention_hd64, BcAttentionParams)

extern "C" __global__ void __launch_bounds__(ATT_NT, ATT_MIN_BLOCKS) bc_attention_hd128(BcAttentionParams p) {
    bc_attention_impl<128>(p);
}
BC_EMU_ENTRY(bc_attention_hd128, BcAttentionParams)
