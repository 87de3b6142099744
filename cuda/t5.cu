// Kernels of the umT5 text encoder on the GPU (host side: src/text/cuda.rs; the exact f32 CPU
// reference: src/text/umt5.rs). One encoder layer is
//   h = rms(x) -> qkv GEMM -> bc_t5_attention -> o GEMM -> x += ., h = rms(x) -> gate|fc1 GEMM
//   -> bc_t5_gated_gelu -> fc2 GEMM -> x += .
// with the residual adds fused into the next norm.
//
// bc_t5_rms_norm:   x += delta (optional, f32, written back to x), then
//                   out = x * rsqrt(mean(x^2) + eps) * weight: T5's RMS norm (no mean
//                   subtraction, no bias), f32 statistics; out bf16 (a GEMM input) or f32 (the
//                   final norm, the encoder's output). One block of T5_NORM_THREADS per row, each
//                   thread walking columns tid, tid + T5_NORM_THREADS, ... (it reads back only
//                   what it wrote: no barrier between the add and the scaling).
// bc_t5_gated_gelu: out = gelu_tanh(gate) * lin, f32 in (the two halves of one GEMM output),
//                   bf16 out; the GELU is the tanh form, as umt5.rs (and Wan's T5) use. One
//                   thread per element.
// bc_t5_attention:  out[i, h] = sum_j softmax_j(q_i . k_j + rel_bias[bucket[j - i], h]) v_j over
//                   ALL rows j: NO 1/sqrt(head_dim) scale (T5), the layer's own bias table
//                   [buckets, heads], bidirectional buckets from a host-made table indexed by
//                   key - query. Only the real tokens are computed (upstream's padded keys get
//                   softmax weight exactly 0), so there is no mask. q/k/v are f32 (GEMM outputs),
//                   scores and softmax f32 (expf), out bf16 (the o GEMM's input).
//
// Attention layout: grid (ceil(rows / T5_ATTN_ROWS), heads), block T5_ATTN_THREADS (4 warps). A
// block owns T5_ATTN_ROWS query rows of one head; warp w owns rows w + T5_ATTN_WARPS * i
// (i < T5_ATTN_ROWS_PER_WARP). Shared memory (static, 36992 bytes): the block's Q rows
// [T5_ATTN_ROWS][T5_ATTN_HD], their full score rows [T5_ATTN_ROWS][T5_ATTN_MAX_L] (hence
// rows <= BC_T5_ATTN_MAX_TOKENS) and one K or V tile [T5_ATTN_KEYS][T5_ATTN_HD + 1] (the extra
// float per key: lanes reading the same column of different keys hit different banks).
//   1. Scores: per K tile, lane j of every warp computes q_i . k_j + bias for the warp's rows.
//   2. Softmax of each row by its warp: max and sum through shuffles, P = exp(s - max) left
//      unnormalised in the score row.
//   3. O = P V: per V tile, lane owns head-dim columns lane + 32 c (c < T5_ATTN_COLS), P read as
//      a broadcast; the rows' 1 / sum scale the result at the store.
// The copy loops and the P V key loop are not unrolled (`#pragma unroll 1`): unrolled, the
// kernel was twice the code with 19 shared-window base reads (SR_CgaCtaId) on sm_90a instead
// of 10, for work that is not the encoder's bottleneck.
// Why SIMT f32 and not the tensor-core attention of attention.cu: attention is 4 L^2 dim_attn
// FLOP per layer, 0.1% of the encoder's GEMM FLOPs at L = 30 (0.35 of 278 GFLOP) and 2% at
// L = 512 (103 of 4740), and T5's unscaled logits are large, where f32 scores keep the softmax
// exact. Its speed is bound by shared-memory loads (3 per 2 FMA in the score loop): an estimate
// of ~10 TFLOP/s on an H100, i.e. ~0.04 ms per prompt at 30 tokens but ~10 ms at 512, about
// the GEMMs' time there (not measured; tensor cores or wider register tiles would be next).
//
// Checked by tests/text_kernels_emu.rs under the SIMT emulation against the CPU reference
// (umt5::attention, cpu::ops::{rms_norm, gelu_tanh}) on fresh random inputs with NaN-poisoned
// outputs: odd row counts (1, tiles not full), head dims 8 / 40 / 64 / 128, heads 1 / 3 / 5,
// 512 tokens, f32 and bf16 norm outputs with and without the residual add.
#include "include/common.cuh"

namespace {
constexpr int T5_NORM_THREADS = BC_T5_NORM_THREADS;
constexpr int T5_EW_THREADS = BC_ELEM_THREADS;
constexpr int T5_ATTN_THREADS = BC_T5_ATTN_THREADS;
constexpr int T5_ATTN_WARPS = T5_ATTN_THREADS / 32;
constexpr int T5_ATTN_ROWS = BC_T5_ATTN_ROWS;
constexpr int T5_ATTN_ROWS_PER_WARP = T5_ATTN_ROWS / T5_ATTN_WARPS;
constexpr int T5_ATTN_KEYS = 32;  // keys per K/V tile: one per lane in the score phase
constexpr int T5_ATTN_MAX_L = BC_T5_ATTN_MAX_TOKENS;
constexpr int T5_ATTN_HD = BC_T5_ATTN_MAX_HEAD_DIM;
constexpr int T5_ATTN_COLS = T5_ATTN_HD / 32;  // head-dim columns per lane in O = P V
constexpr int T5_KV_PITCH = T5_ATTN_HD + 1;    // floats per K/V tile row (bank-conflict padding)
static_assert(T5_ATTN_THREADS % 32 == 0 && T5_ATTN_ROWS % T5_ATTN_WARPS == 0, "rows split over warps");
static_assert(T5_ATTN_KEYS == 32, "one key per lane in the score phase");
static_assert(T5_ATTN_HD % 32 == 0, "head-dim columns split over lanes");
static_assert((T5_ATTN_ROWS * (T5_ATTN_HD + T5_ATTN_MAX_L) + T5_ATTN_KEYS * T5_KV_PITCH) * 4 <= 48 * 1024,
              "static shared memory");

/// Loads keys (or values) k0 .. k0 + kn - 1 of one head into `tile` (rows past kn: zeros).
__device__ __forceinline__ void t5_load_tile(float (*tile)[T5_KV_PITCH], const float* __restrict__ src,
                                             int stride, size_t col, int k0, int kn, int hd) {
#pragma unroll 1
    for (int e = threadIdx.x; e < T5_ATTN_KEYS * hd; e += T5_ATTN_THREADS) {
        const int j = e / hd, d = e % hd;
        tile[j][d] = j < kn ? src[(size_t)(k0 + j) * stride + col + d] : 0.f;
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(T5_NORM_THREADS) bc_t5_rms_norm(BcT5RmsNormParams p) {
    __shared__ float scratch[T5_NORM_THREADS / 32];
    const size_t row = blockIdx.x;
    float* x = p.x + row * p.dim;
    const float* delta = p.delta ? p.delta + row * p.dim : nullptr;
    float ss = 0.f;
    for (int d = threadIdx.x; d < p.dim; d += T5_NORM_THREADS) {
        float v = x[d];
        if (delta) {
            v += delta[d];
            x[d] = v;
        }
        ss += v * v;
    }
    const float r = rsqrtf(bc_block_sum<T5_NORM_THREADS>(ss, scratch) / (float)p.dim + p.eps);
    for (int d = threadIdx.x; d < p.dim; d += T5_NORM_THREADS) {
        const float y = x[d] * r * p.weight[d];
        if (p.out_f32)
            static_cast<float*>(p.out)[row * p.dim + d] = y;
        else
            static_cast<__nv_bfloat16*>(p.out)[row * p.dim + d] = __float2bfloat16(y);
    }
}
BC_EMU_ENTRY(bc_t5_rms_norm, BcT5RmsNormParams)

extern "C" __global__ void __launch_bounds__(T5_EW_THREADS) bc_t5_gated_gelu(BcT5GatedGeluParams p) {
    const long long i = (long long)blockIdx.x * T5_EW_THREADS + threadIdx.x;
    if (i >= (long long)p.rows * p.cols) return;
    const size_t at = (size_t)(i / p.cols) * p.in_stride + (size_t)(i % p.cols);
    p.out[i] = __float2bfloat16(bc_gelu_tanh(p.gate[at]) * p.lin[at]);
}
BC_EMU_ENTRY(bc_t5_gated_gelu, BcT5GatedGeluParams)

extern "C" __global__ void __launch_bounds__(T5_ATTN_THREADS) bc_t5_attention(BcT5AttentionParams p) {
    __shared__ float qs[T5_ATTN_ROWS][T5_ATTN_HD];
    __shared__ float sc[T5_ATTN_ROWS][T5_ATTN_MAX_L];
    __shared__ float tile[T5_ATTN_KEYS][T5_KV_PITCH];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int h = blockIdx.y, r0 = blockIdx.x * T5_ATTN_ROWS;
    const int n = p.rows, hd = p.head_dim;
    const size_t col = (size_t)h * hd;
    // The block's Q rows (zeros past the last row: their scores are computed, never used).
#pragma unroll 1
    for (int e = tid; e < T5_ATTN_ROWS * hd; e += T5_ATTN_THREADS) {
        const int r = e / hd, d = e % hd;
        qs[r][d] = r0 + r < n ? p.q[(size_t)(r0 + r) * p.qkv_stride + col + d] : 0.f;
    }
    // 1. Scores of the warp's rows against key k0 + lane.
    for (int k0 = 0; k0 < n; k0 += T5_ATTN_KEYS) {
        const int kn = min(T5_ATTN_KEYS, n - k0);
        __syncthreads();  // Q is stored and the previous tile consumed
        t5_load_tile(tile, p.k, p.qkv_stride, col, k0, kn, hd);
        __syncthreads();
        float s[T5_ATTN_ROWS_PER_WARP];
#pragma unroll
        for (int i = 0; i < T5_ATTN_ROWS_PER_WARP; ++i) s[i] = 0.f;
        for (int d = 0; d < hd; ++d) {
            const float kd = tile[lane][d];
#pragma unroll
            for (int i = 0; i < T5_ATTN_ROWS_PER_WARP; ++i) s[i] = fmaf(qs[warp + T5_ATTN_WARPS * i][d], kd, s[i]);
        }
        const int j = k0 + lane;
#pragma unroll
        for (int i = 0; i < T5_ATTN_ROWS_PER_WARP; ++i) {
            const int r = warp + T5_ATTN_WARPS * i, row = r0 + r;
            // Rows past the end get zeros: O = P V reads them (never stores them), and reads
            // only initialised shared memory.
            if (lane < kn) sc[r][j] = row < n ? s[i] + p.rel_bias[(size_t)p.bucket[j - row] * p.heads + h] : 0.f;
        }
    }
    __syncwarp();  // the warp's score rows are complete (each row is only touched by its warp)
    // 2. Softmax of each row, unnormalised; inv = 1 / sum (0 for rows past the end).
    float inv[T5_ATTN_ROWS_PER_WARP];
#pragma unroll
    for (int i = 0; i < T5_ATTN_ROWS_PER_WARP; ++i) {
        const int r = warp + T5_ATTN_WARPS * i;
        inv[i] = 0.f;
        if (r0 + r >= n) continue;  // warp-uniform
        float m = -INFINITY;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, sc[r][j]);
        m = bc_warp_max(m);
        float z = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float e = expf(sc[r][j] - m);
            sc[r][j] = e;
            z += e;
        }
        inv[i] = 1.f / bc_warp_sum(z);
    }
    __syncwarp();  // P written by every lane before any lane reads a whole row
    // 3. O = P V.
    float o[T5_ATTN_ROWS_PER_WARP][T5_ATTN_COLS];
#pragma unroll
    for (int i = 0; i < T5_ATTN_ROWS_PER_WARP; ++i)
#pragma unroll
        for (int c = 0; c < T5_ATTN_COLS; ++c) o[i][c] = 0.f;
    for (int k0 = 0; k0 < n; k0 += T5_ATTN_KEYS) {
        const int kn = min(T5_ATTN_KEYS, n - k0);
        __syncthreads();  // the previous tile is consumed
        t5_load_tile(tile, p.v, p.qkv_stride, col, k0, kn, hd);
        __syncthreads();
#pragma unroll 1
        for (int j = 0; j < kn; ++j) {
#pragma unroll
            for (int i = 0; i < T5_ATTN_ROWS_PER_WARP; ++i) {
                const float pr = sc[warp + T5_ATTN_WARPS * i][k0 + j];
#pragma unroll
                for (int c = 0; c < T5_ATTN_COLS; ++c)  // columns the tile holds (< head_dim)
                    if (lane + 32 * c < hd) o[i][c] = fmaf(pr, tile[j][lane + 32 * c], o[i][c]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < T5_ATTN_ROWS_PER_WARP; ++i) {
        const int row = r0 + warp + T5_ATTN_WARPS * i;
        if (row >= n) continue;
        __nv_bfloat16* out = p.out + (size_t)row * p.out_stride + col;
#pragma unroll
        for (int c = 0; c < T5_ATTN_COLS; ++c) {
            const int d = lane + 32 * c;
            if (d < hd) out[d] = __float2bfloat16(o[i][c] * inv[i]);
        }
    }
}
BC_EMU_ENTRY(bc_t5_attention, BcT5AttentionParams)
