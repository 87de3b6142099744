/* Launch-parameter structs of every blockcascade kernel: the single contract between the
 * kernels (cuda/ *.cu files, compiled by nvcc or as host C++ under cuda/emu) and Rust
 * (src/kernels/params.rs is generated from this file by scripts/regen-params.sh; CI checks
 * that the committed twin is up to date).
 *
 * Plain C (no CUDA headers) so that bindgen can read it. Conventions:
 * - `bc_bf16` is a bfloat16 stored as its 16 raw bits; in kernels it is `__nv_bfloat16`.
 * - activations feeding GEMMs are bf16, row-major `[rows, dim]` with an explicit row stride
 *   (in elements); the residual stream, latents, per-frame conditioning, norm weights and
 *   biases are f32;
 * - per-frame conditioning is `[frames, ...]` with a frame stride (in elements), row `r` of
 *   the activations uses frame `r / tokens_per_frame`; so `e0 [frames, 6, dim]` can be passed
 *   directly as `shift = e0 + 0*dim`, `scale = e0 + 1*dim`, `frame_stride = 6*dim`;
 * - every pointer is a device pointer (a host pointer under emulation); pointers marked
 *   "optional" may be NULL;
 * - counts are int32 (all shapes of the model fit), pointers are 16-byte aligned and `dim`,
 *   `head_dim` are multiples of 8 unless said otherwise.
 */
#ifndef BLOCKCASCADE_PARAMS_H
#define BLOCKCASCADE_PARAMS_H

#ifdef __CUDACC__
#include <cuda_bf16.h>
typedef __nv_bfloat16 bc_bf16;
typedef long long bc_i64;
typedef int bc_i32;
#elif defined(BC_EMU)
#include "../emu/bf16.h"
typedef __nv_bfloat16 bc_bf16;
typedef long long bc_i64;
typedef int bc_i32;
#else
#include <stdint.h>
/** A bfloat16 value stored as its raw bits. */
typedef uint16_t bc_bf16;
/** 64-bit signed count. */
typedef int64_t bc_i64;
/** 32-bit signed count. */
typedef int32_t bc_i32;
#endif

/** Threads per block of the row-wise kernels (one block per row). */
#define BC_ROW_THREADS 256
/** Threads per block of the element-wise kernels. */
#define BC_ELEM_THREADS 256
/** Threads per block of the attention kernels: 2 warps of 32 query rows each. */
#define BC_ATTN_THREADS 64
/** Query rows per attention block (grid.x = ceil(max rows of a group / BC_ATTN_BQ)): 32 per
 * warp. */
#define BC_ATTN_BQ 64
/** Threads per block of the 128-row attention kernels (`bc_attention_hd64_q128`,
 * `bc_attention_hd128_q128`): 4 warps. */
#define BC_ATTN_WIDE_THREADS 128
/** Query rows per block of the 128-row attention kernels: 32 per warp. */
#define BC_ATTN_WIDE_BQ 128
/** Keys per attention tile of the hd64 kernels (both row tiles: they give bit-identical
 * outputs). */
#define BC_ATTN_HD64_BK 64
/** Keys per attention tile of the hd128 kernels (both row tiles). */
#define BC_ATTN_HD128_BK 32
/** Dynamic shared memory of `bc_attention_hd128` in bytes (2 stages x K, V x 32 keys x 128
 * bf16, then Q: 64 rows x 128 bf16; the hd64 kernels use static shared memory). */
#define BC_ATTN_HD128_SMEM 49152
/** Dynamic shared memory of `bc_attention_hd128_q128` in bytes (as BC_ATTN_HD128_SMEM with
 * 128 Q rows). */
#define BC_ATTN_WIDE_HD128_SMEM 65536
/** Threads per block of the Hopper wgmma attention prototype `bc_attention_wgmma_hd64`
 * (sm_90a only, off by default): one warpgroup, 4 warps of 16 query rows each. */
#define BC_ATTN_WGMMA_THREADS 128
/** Query rows per block of `bc_attention_wgmma_hd64`: one m64 wgmma tile. */
#define BC_ATTN_WGMMA_BQ 64
/** Dynamic shared memory of `bc_attention_wgmma_hd64` in bytes: 3 stages x K, V x 64 keys x
 * 64 bf16, then Q: 64 rows x 64 bf16, plus 1024 bytes to start the tiles on a 1024-byte
 * boundary of the shared window (the 128-byte swizzle period wgmma's descriptors need). */
#define BC_ATTN_WGMMA_SMEM 58368
/** Threads per block of `bc_attention_wgmma_hd128`: two warpgroups (8 warps of 16 query rows),
 * each its own m64 tile, sharing the K/V tiles. */
#define BC_ATTN_WGMMA_HD128_THREADS 256
/** Query rows per block of `bc_attention_wgmma_hd128`: two m64 wgmma tiles. */
#define BC_ATTN_WGMMA_HD128_BQ 128
/** Dynamic shared memory of `bc_attention_wgmma_hd128` in bytes: 3 stages x K, V x 64 keys x
 * 128 bf16, then Q: 128 rows x 128 bf16 (each 64-row tile two 64-column blocks of 128-byte
 * rows), plus the same 1024 bytes of alignment slack. */
#define BC_ATTN_WGMMA_HD128_SMEM 132096
/** Keys per tile of the 128-key variants `bc_attention_wgmma_hd128_k128` and
 * `bc_attention_wgmma_hd128_pp_k128` (threads and query rows as `bc_attention_wgmma_hd128`;
 * `bc_attention_wgmma_hd128_pp` has its 64-key tiles and shared memory). */
#define BC_ATTN_WGMMA_K128_BK 128
/** Dynamic shared memory of the 128-key variants in bytes: 3 stages x K, V x 128 keys x 128
 * bf16, then Q (128 rows x 128 bf16 as one 128-row tile of two 64-column blocks), plus the
 * 1024 bytes of alignment slack: 230400, under the 232448 an sm_90 block may opt into. */
#define BC_ATTN_WGMMA_K128_SMEM 230400
/** Threads per block of the warp-specialized variant `bc_attention_wgmma_hd128_ws`
 * (cuda/attention_ws.cu): a producer warpgroup (the K/V and Q copies) and two consumer
 * warpgroups of 64 query rows (BC_ATTN_WGMMA_HD128_BQ rows per block, 128-key tiles). */
#define BC_ATTN_WS_THREADS 384
/** Dynamic shared memory of `bc_attention_wgmma_hd128_ws` in bytes: the 128-key variants'
 * layout (3 stages x K, V x 128 keys x 128 bf16, then Q), then 3 "full" and 3 "empty"
 * mbarriers (8 bytes each) and the per-stage key counts (3 x 4 bytes, padded to 64 bytes),
 * plus the 1024 bytes of alignment slack: 230464 <= 232448. */
#define BC_ATTN_WS_SMEM 230464

/** Grid and block dimensions of one launch (used by the emulated launcher). */
typedef struct BcLaunchDims {
    /** Blocks per grid (x, y, z). */
    unsigned int grid[3];
    /** Threads per block (x, y, z). */
    unsigned int block[3];
    /** Dynamic shared memory in bytes. */
    unsigned int shared_bytes;
} BcLaunchDims;

/** `bc_ln_modulate`: `out = LN(x) * (1 + scale[f] + scale_bias) + shift[f] + shift_bias`,
 * LayerNorm without affine (f32 statistics). Grid (rows), block BC_ROW_THREADS.
 * The head modulation is this kernel with `shift = e`, `shift_bias = head.modulation[0]`,
 * `scale = e`, `scale_bias = head.modulation[1]`. */
typedef struct BcLnModulateParams {
    /** Input rows `[rows, x_stride]`, f32 (the residual stream). */
    const float *x;
    /** Output rows `[rows, out_stride]`, bf16. */
    bc_bf16 *out;
    /** Per-frame shift `[frames, frame_stride]`, f32. */
    const float *shift;
    /** Per-frame scale `[frames, frame_stride]`, f32. */
    const float *scale;
    /** Optional `[dim]` f32 added to every frame's shift. */
    const float *shift_bias;
    /** Optional `[dim]` f32 added to every frame's scale. */
    const float *scale_bias;
    /** Number of rows. */
    bc_i32 rows;
    /** Row length. */
    bc_i32 dim;
    /** Row stride of `x` in elements. */
    bc_i32 x_stride;
    /** Row stride of `out` in elements. */
    bc_i32 out_stride;
    /** Elements between consecutive frames of `shift`/`scale`. */
    bc_i32 frame_stride;
    /** Rows per frame. */
    bc_i32 tokens_per_frame;
    /** LayerNorm epsilon. */
    float eps;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcLnModulateParams;

/** `bc_layer_norm_affine`: `out = LN(x) * weight + bias` (f32 in, bf16 out).
 * Grid (rows), block BC_ROW_THREADS. */
typedef struct BcLayerNormParams {
    /** Input rows, f32. */
    const float *x;
    /** Output rows, bf16. */
    bc_bf16 *out;
    /** `[dim]` f32. */
    const float *weight;
    /** `[dim]` f32. */
    const float *bias;
    /** Number of rows. */
    bc_i32 rows;
    /** Row length. */
    bc_i32 dim;
    /** Row stride of `x` in elements. */
    bc_i32 x_stride;
    /** Row stride of `out` in elements. */
    bc_i32 out_stride;
    /** LayerNorm epsilon. */
    float eps;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcLayerNormParams;

/** `bc_gated_residual`: `x += delta * (gate[f] + gate_bias)` (x f32, delta bf16);
 * `gate = NULL` means a plain residual add. Grid (ceil(rows*dim/2 / BC_ELEM_THREADS)),
 * block BC_ELEM_THREADS. */
typedef struct BcGatedResidualParams {
    /** Residual stream `[rows, dim]` f32 (contiguous), updated in place. */
    float *x;
    /** `[rows, delta_stride]` bf16. */
    const bc_bf16 *delta;
    /** Optional per-frame gate `[frames, frame_stride]` f32. */
    const float *gate;
    /** Optional `[dim]` f32 added to every frame's gate (only used with `gate`). */
    const float *gate_bias;
    /** Number of rows. */
    bc_i32 rows;
    /** Row length (even). */
    bc_i32 dim;
    /** Row stride of `delta` in elements. */
    bc_i32 delta_stride;
    /** Elements between consecutive frames of `gate`. */
    bc_i32 frame_stride;
    /** Rows per frame. */
    bc_i32 tokens_per_frame;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcGatedResidualParams;

/** Largest row length of `bc_residual_norm`: each of the BC_ROW_THREADS threads keeps its
 * `dim / (2 * BC_ROW_THREADS)` column pairs of the updated row in registers (12 pairs). */
#define BC_RESNORM_MAX_DIM 6144

/** `bc_residual_norm`: the gated residual add and the LayerNorm that reads its result, fused
 * (one read and one write of the f32 residual stream instead of three passes):
 * `x += delta * (gate[f] + gate_bias)` (no gate: `x += delta`), then
 * `out = LN(x) * (1 + scale[f] + scale_bias) + shift[f] + shift_bias` (`bc_ln_modulate`), or
 * with `affine = 1`: `out = LN(x) * scale[f] + shift[f]` (`bc_layer_norm_affine` with
 * `scale = weight`, `shift = bias`, `mod_stride = 0`). Bit-identical to `bc_gated_residual`
 * followed by `bc_ln_modulate` / `bc_layer_norm_affine`. `dim <= BC_RESNORM_MAX_DIM`. `out`
 * may be `delta` (a thread reads its columns of `delta` before it writes the same columns of
 * `out`). Grid (rows), block BC_ROW_THREADS. */
typedef struct BcResidualNormParams {
    /** Residual stream `[rows, dim]` f32 (contiguous), updated in place. */
    float *x;
    /** `[rows, delta_stride]` bf16. */
    const bc_bf16 *delta;
    /** Optional per-frame gate `[frames, gate_stride]` f32. */
    const float *gate;
    /** Optional `[dim]` f32 added to every frame's gate (only used with `gate`). */
    const float *gate_bias;
    /** Output rows `[rows, out_stride]`, bf16. */
    bc_bf16 *out;
    /** Per-frame shift `[frames, mod_stride]` f32 (the bias of an affine LayerNorm). */
    const float *shift;
    /** Per-frame scale `[frames, mod_stride]` f32 (the weight of an affine LayerNorm). */
    const float *scale;
    /** Optional `[dim]` f32 added to every frame's shift. */
    const float *shift_bias;
    /** Optional `[dim]` f32 added to every frame's scale. */
    const float *scale_bias;
    /** Number of rows. */
    bc_i32 rows;
    /** Row length (even, at most BC_RESNORM_MAX_DIM). */
    bc_i32 dim;
    /** Row stride of `delta` in elements. */
    bc_i32 delta_stride;
    /** Row stride of `out` in elements. */
    bc_i32 out_stride;
    /** Elements between consecutive frames of `gate`. */
    bc_i32 gate_stride;
    /** Elements between consecutive frames of `shift`/`scale` (0: one vector for all rows). */
    bc_i32 mod_stride;
    /** Rows per frame. */
    bc_i32 tokens_per_frame;
    /** 1: `LN(x) * scale + shift` (affine LayerNorm); 0: `LN(x) * (1 + scale) + shift`. */
    bc_i32 affine;
    /** LayerNorm epsilon. */
    float eps;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcResidualNormParams;

/** `bc_qk_norm_rope`: optional RMSNorm over the full row (f32 statistics, with weight),
 * then optional 3D RoPE per head, then a store either to contiguous rows or into KV-cache
 * ring-buffer slots. Used for q (norm + rope), k (norm + rope, to the cache) and v (copy to
 * the cache). Row `r` belongs to local frame `lf = r / tokens_per_frame` whose absolute frame
 * index (the temporal RoPE position) is `frame_pos[lf]` (or `first_frame + lf` without
 * `frame_pos`); its height/width positions are `(r % tpf) / wp`, `r % wp`. Output row:
 * `out + (slot * tokens_per_frame + r % tpf) * out_stride` with `slot = frame_slot[lf]`, or
 * `out + r * out_stride` without `frame_slot`. Can run in place (out == x, no slots).
 * Grid (rows), block BC_ROW_THREADS. */
typedef struct BcQkNormRopeParams {
    /** Input rows `[rows, x_stride]` bf16. */
    const bc_bf16 *x;
    /** Output base, bf16. */
    bc_bf16 *out;
    /** Optional RMSNorm weight `[heads*head_dim]` f32 (NULL: no norm). */
    const float *norm_weight;
    /** Optional `[frames]` absolute frame index of each local frame. */
    const bc_i32 *frame_pos;
    /** Optional `[frames]` cache slot of each local frame. */
    const bc_i32 *frame_slot;
    /** Number of rows. */
    bc_i32 rows;
    /** Heads per row. */
    bc_i32 heads;
    /** Head dimension (even). */
    bc_i32 head_dim;
    /** Row stride of `x` in elements. */
    bc_i32 x_stride;
    /** Row stride of `out` in elements. */
    bc_i32 out_stride;
    /** Rows per frame (= hp * wp). */
    bc_i32 tokens_per_frame;
    /** Patch columns per frame row. */
    bc_i32 wp;
    /** Temporal position of local frame 0 when `frame_pos` is NULL. */
    bc_i32 first_frame;
    /** 1: apply RoPE, 0: do not. */
    bc_i32 rope;
    /** Padding, keep 0. */
    bc_i32 _pad;
    /** RMSNorm epsilon. */
    float eps;
    /** RoPE theta (10000). */
    float theta;
} BcQkNormRopeParams;

/** One contiguous run of keys and values (e.g. one cache slot or one window member). */
typedef struct BcKvSegment {
    /** Keys: row 0 of the run, rows of `kv_stride` elements. */
    const bc_bf16 *k;
    /** Values: row 0 of the run, rows of `kv_stride` elements. */
    const bc_bf16 *v;
    /** Number of key rows. */
    bc_i32 tokens;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcKvSegment;

/** A run of query rows that all see the same key segments (one window member). */
typedef struct BcAttnGroup {
    /** First query row. */
    bc_i32 q_begin;
    /** Number of query rows. */
    bc_i32 q_rows;
    /** First entry of this group's list in `seg_index`. */
    bc_i32 seg_begin;
    /** Number of segments this group sees. */
    bc_i32 seg_count;
} BcAttnGroup;

/** `bc_attention_hd64` / `bc_attention_hd128` (head_dim <= 64 / <= 128, multiple of 8), and
 * their 128-row variants `bc_attention_hd64_q128` / `bc_attention_hd128_q128`:
 * `out[n, h] = softmax(q[n, h] . K[:, h]^T * scale) . V[:, h]` over the segments listed for
 * n's group, online softmax, f32 accumulation; a group without keys gets zeros.
 * Tables (`segments`, `seg_index`, `groups`) live in device memory so that one captured
 * graph can be replayed with new lengths. Grid (ceil(max q_rows / BC_ATTN_BQ), heads,
 * num_groups), block BC_ATTN_THREADS (the `_q128` variants: BC_ATTN_WIDE_BQ and
 * BC_ATTN_WIDE_THREADS; the hd128 kernels with BC_ATTN_HD128_SMEM / BC_ATTN_WIDE_HD128_SMEM
 * bytes of dynamic shared memory). Self- and cross-attention use the same kernel. */
typedef struct BcAttentionParams {
    /** Queries `[nq, q_stride]` bf16, head h at columns `h*head_dim`. */
    const bc_bf16 *q;
    /** Output `[nq, out_stride]` bf16. */
    bc_bf16 *out;
    /** Segment table. */
    const BcKvSegment *segments;
    /** Concatenated per-group lists of indices into `segments`. */
    const bc_i32 *seg_index;
    /** `[num_groups]` query groups. */
    const BcAttnGroup *groups;
    /** Number of groups (= grid.z). */
    bc_i32 num_groups;
    /** Number of heads. */
    bc_i32 heads;
    /** Head dimension. */
    bc_i32 head_dim;
    /** Row stride of `q` in elements. */
    bc_i32 q_stride;
    /** Row stride of keys and values in elements. */
    bc_i32 kv_stride;
    /** Row stride of `out` in elements. */
    bc_i32 out_stride;
    /** Softmax scale, usually `1/sqrt(head_dim)`. */
    float scale;
    /** Key splits S >= 1 (split-KV): grid.x = row tiles x S, split-major; block x of a launch
     * with T = grid.x / S row tiles takes row tile x % T and, of its group's key tiles (walk
     * order) 0..n-1, [s n / S, (s + 1) n / S) for s = x / T. S = 1: the whole walk, the output
     * written directly (`partial` unused). S > 1: `partial` gets the un-normalised result of
     * each block (slot ((group * T + row tile) * heads + head) * S + s, BQ * (head_dim + 2)
     * floats: O as BQ rows of head_dim, then per row (m, l): the row maximum in base 2 of S * scale and
     * the row sum) and `bc_attention_combine` writes `out`. */
    bc_i32 splits;
    /** S > 1: the partial results (16-byte aligned; see `splits`). */
    float *partial;
} BcAttentionParams;

/** Threads per block of `bc_attention_combine`. */
#define BC_ATTN_COMBINE_THREADS 128

/** `bc_attention_combine`: merges the S partial results of a split attention launch
 * (`BcAttentionParams::splits`) into `out`: per row `out = sum_s 2^(m_s - M) O_s / sum_s
 * 2^(m_s - M) l_s` with `M = max_s m_s` (bf16; zeros for a row no split saw a key of). Grid
 * (T row tiles, heads, num_groups): the attention's grid without the splits; block
 * BC_ATTN_COMBINE_THREADS. */
typedef struct BcAttnCombineParams {
    /** The attention launch's partial results. */
    const float *partial;
    /** Output `[nq, out_stride]` bf16, head h at columns `h*head_dim`. */
    bc_bf16 *out;
    /** `[num_groups]` query groups (the attention's table). */
    const BcAttnGroup *groups;
    /** Number of heads. */
    bc_i32 heads;
    /** Head dimension (a multiple of 8). */
    bc_i32 head_dim;
    /** Row stride of `out` in elements. */
    bc_i32 out_stride;
    /** Splits S of the attention launch (>= 2). */
    bc_i32 splits;
    /** Query rows per attention block (BQ of its kernel). */
    bc_i32 rows;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcAttnCombineParams;

/** Activation selector of `bc_activation`. */
#define BC_ACT_GELU_TANH 0
/** Activation selector of `bc_activation`. */
#define BC_ACT_SILU 1
/** Activation selector of `bc_activation`: identity (bias only). */
#define BC_ACT_NONE 2
/** Activation selector of `bc_activation`: round to bf16 and back (f32 data; the residual
 * precision experiment of `CudaOptions::round_residual_bf16`). */
#define BC_ACT_ROUND_BF16 3
/** `BcActivationParams::bf16` value for f32 input and bf16 output. */
#define BC_ACT_F32_TO_BF16 2

/** `bc_activation`: `out[i] = act(x[i] + bias[i % cols])` (no bias when `bias` is NULL),
 * bf16 (`bf16 = 1`) or f32 data, f32 math; may run in place. The bias add is the fallback
 * for a GEMM whose bias / GELU epilogue cuBLASLt does not fuse.
 * Grid (ceil(n / BC_ELEM_THREADS)), block BC_ELEM_THREADS. */
typedef struct BcActivationParams {
    /** Input, `n` values. */
    const void *x;
    /** Output, `n` values. */
    void *out;
    /** Number of values. */
    bc_i64 n;
    /** BC_ACT_GELU_TANH or BC_ACT_SILU. */
    bc_i32 op;
    /** 1: bf16 data, 0: f32 data, BC_ACT_F32_TO_BF16 (2): f32 `x`, bf16 `out` (with BC_ACT_NONE
     * and no bias: the conversion that gives cuBLASLt a bf16 bias vector). */
    bc_i32 bf16;
    /** `[cols]` f32 bias added before the activation, or NULL. */
    const float *bias;
    /** Row length of the data (the bias period); >= 1 when `bias` is set. */
    bc_i32 cols;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcActivationParams;

/** `bc_time_embedding`: `out[f] = [cos(t_f w_i), sin(t_f w_i)]`, `w_i = 10000^(-i/half)`,
 * computed in f64. Grid (frames), block BC_ELEM_THREADS. */
typedef struct BcTimeEmbeddingParams {
    /** `[frames]` timesteps. */
    const float *t;
    /** `[frames, freq_dim]` f32. */
    float *out;
    /** Number of frames. */
    bc_i32 frames;
    /** Embedding size (even). */
    bc_i32 freq_dim;
} BcTimeEmbeddingParams;

/** `bc_patchify` (latents f32 `[frames, ch, h, w]` to bf16 rows `[frames*(h/2)*(w/2), ch*4]`,
 * element order (c, dh, dw)) and `bc_unpatchify` (bf16 rows `[tokens, row_stride]`, element
 * order (dh, dw, c), to f32 latents). One thread per output element; grid
 * (ceil(frames*ch*h*w / BC_ELEM_THREADS)), block BC_ELEM_THREADS. */
typedef struct BcPatchParams {
    /** Latents `[frames, ch, h, w]` f32 (input of patchify, output of unpatchify). */
    float *latents;
    /** Patch rows bf16 (output of patchify, input of unpatchify). */
    bc_bf16 *rows;
    /** Number of frames. */
    bc_i32 frames;
    /** Channels (16). */
    bc_i32 ch;
    /** Latent height (even). */
    bc_i32 h;
    /** Latent width (even). */
    bc_i32 w;
    /** Row stride of `rows` in elements (>= ch*4). */
    bc_i32 row_stride;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcPatchParams;

/** `bc_flow_step`, per frame f (elements `[f*frame_elems, (f+1)*frame_elems)`):
 * `x0 = x - sigma[f] * v`; if `sigma_next` is given and `sigma_next[f] >= 0`:
 * `x = (1 - sn) * x0 + sn * noise`, else `x = x0`. `x0_out` (optional) receives x0.
 * Grid (ceil(frames*frame_elems / BC_ELEM_THREADS)), block BC_ELEM_THREADS. */
typedef struct BcFlowStepParams {
    /** Latents, f32, updated in place. */
    float *x;
    /** Flow prediction, f32. */
    const float *v;
    /** Optional renoise `[frames, frame_elems]` f32 (needed when renoising). */
    const float *noise;
    /** Optional x0 output, f32. */
    float *x0_out;
    /** `[frames]` sigma of the current step. */
    const float *sigma;
    /** Optional `[frames]` sigma of the next step, negative: no renoise for that frame. */
    const float *sigma_next;
    /** Number of frames. */
    bc_i32 frames;
    /** Elements per frame (ch*h*w). */
    bc_i32 frame_elems;
} BcFlowStepParams;

/** One copy of `bytes` bytes (peer copies of latents and K/V between devices). */
typedef struct BcCopyRegion {
    /** Source. */
    const void *src;
    /** Destination (may be on a peer device). */
    void *dst;
    /** Byte count. */
    bc_i64 bytes;
} BcCopyRegion;

/** `bc_copy`: every region copied, 16-byte vectors when both ends are 16-byte aligned.
 * Grid (blocks per region, num_regions), block BC_ELEM_THREADS. */
typedef struct BcCopyParams {
    /** `[num_regions]` regions, in device memory. */
    const BcCopyRegion *regions;
    /** Number of regions (= grid.y). */
    bc_i32 num_regions;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcCopyParams;

/** Threads per block of `bc_t5_rms_norm` (one block per row). */
#define BC_T5_NORM_THREADS 256
/** Threads per block of `bc_t5_attention` (4 warps). */
#define BC_T5_ATTN_THREADS 128
/** Query rows per block of `bc_t5_attention` (grid.x = ceil(rows / BC_T5_ATTN_ROWS)). */
#define BC_T5_ATTN_ROWS 8
/** Most tokens `bc_t5_attention` takes: a block keeps its rows' full score rows in shared
 * memory (umT5 is trained on 512). */
#define BC_T5_ATTN_MAX_TOKENS 512
/** Largest head dimension of `bc_t5_attention` (any value up to it; umT5-XXL: 64). */
#define BC_T5_ATTN_MAX_HEAD_DIM 128

/** `bc_t5_rms_norm`: T5's RMS norm of the f32 residual stream (no mean subtraction, no bias),
 * after an optional residual add: `x += delta` (written back to `x`), then
 * `out = x * rsqrt(mean(x^2) + eps) * weight`, f32 statistics. `out` is bf16 (the input of a
 * GEMM) or f32 (the encoder's output). Grid (rows), block BC_T5_NORM_THREADS. */
typedef struct BcT5RmsNormParams {
    /** Residual stream `[rows, dim]` f32 (contiguous); updated in place when `delta` is set. */
    float *x;
    /** Optional `[rows, dim]` f32 added to `x` first (a sublayer's output). */
    const float *delta;
    /** `[dim]` f32 norm weight. */
    const float *weight;
    /** Output `[rows, dim]` (contiguous), bf16 or f32 (`out_f32`). */
    void *out;
    /** Number of rows. */
    bc_i32 rows;
    /** Row length. */
    bc_i32 dim;
    /** 1: `out` is f32, 0: bf16. */
    bc_i32 out_f32;
    /** RMS norm epsilon. */
    float eps;
} BcT5RmsNormParams;

/** `bc_t5_gated_gelu`: `out[r, c] = gelu_tanh(gate[r, c]) * lin[r, c]` (tanh-form GELU, f32
 * math, bf16 out): the hidden layer of the gated-GELU FFN. `gate` and `lin` are f32 rows of
 * `in_stride` elements (e.g. the two halves of one GEMM output `[rows, 2 * cols]`); `out` is
 * `[rows, cols]` contiguous. Grid (ceil(rows * cols / BC_ELEM_THREADS)), block BC_ELEM_THREADS. */
typedef struct BcT5GatedGeluParams {
    /** GELU input, f32 rows of `in_stride`. */
    const float *gate;
    /** Linear input, f32 rows of `in_stride`. */
    const float *lin;
    /** Output `[rows, cols]` bf16. */
    bc_bf16 *out;
    /** Number of rows. */
    bc_i32 rows;
    /** Values per row. */
    bc_i32 cols;
    /** Row stride of `gate` and `lin` in elements. */
    bc_i32 in_stride;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcT5GatedGeluParams;

/** `bc_t5_attention`: T5 self-attention over all `rows` tokens with the layer's relative
 * position bias and NO `1/sqrt(head_dim)` scale:
 * `out[i, h] = sum_j softmax_j(q[i, h] . k[j, h] + rel_bias[bucket[j - i] * heads + h]) v[j, h]`,
 * f32 inputs, scores and softmax, bf16 out. Only real tokens exist: no padding, no mask.
 * `rows <= BC_T5_ATTN_MAX_TOKENS`, `head_dim <= BC_T5_ATTN_MAX_HEAD_DIM` (any value).
 * Grid (ceil(rows / BC_T5_ATTN_ROWS), heads), block BC_T5_ATTN_THREADS. */
typedef struct BcT5AttentionParams {
    /** Queries `[rows, qkv_stride]` f32, head h at columns `h * head_dim`. */
    const float *q;
    /** Keys, same layout as `q`. */
    const float *k;
    /** Values, same layout as `q`. */
    const float *v;
    /** The layer's bias table `[buckets, heads]` f32. */
    const float *rel_bias;
    /** Bucket of the relative position `d = key - query` at `bucket[d]` for
     * `d` in `[-(rows - 1), rows - 1]`: the pointer addresses the entry of `d = 0`. */
    const bc_i32 *bucket;
    /** Output `[rows, out_stride]` bf16, head h at columns `h * head_dim`. */
    bc_bf16 *out;
    /** Number of tokens (queries and keys). */
    bc_i32 rows;
    /** Number of heads (= grid.y). */
    bc_i32 heads;
    /** Head dimension. */
    bc_i32 head_dim;
    /** Row stride of `q`, `k`, `v` in elements. */
    bc_i32 qkv_stride;
    /** Row stride of `out` in elements. */
    bc_i32 out_stride;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcT5AttentionParams;

/* ---- Decoder kernels (cuda/conv.cu, cuda/decode_ops.cu) ----------------------------------
 * Activations of the video decoders are NHWC bf16 frames: pixel-major `[H*W][stride]`, the
 * channels of a pixel contiguous (`stride >= channels`). */

/** Output pixels (GEMM rows) per block of `bc_conv`. */
#define BC_CONV_BM 128
/** Output channels (GEMM columns) per block of `bc_conv`. */
#define BC_CONV_BN 64
/** Output channels per block of `bc_conv_n16` (convs with at most this many outputs). */
#define BC_CONV_BN_NARROW 16
/** Input channels per k-step of `bc_conv` (one kernel tap of one source at a time). */
#define BC_CONV_BK 32
/** Threads per block of `bc_conv` (8 warps, 4 along the pixels x 2 along the channels). */
#define BC_CONV_THREADS 256
/** Most input frames one `bc_conv` output frame sums over (3 temporal taps). */
#define BC_CONV_MAX_SOURCES 3
/** Output pixels per block of the Hopper wgmma convolution `bc_conv_wgmma` (two warpgroups,
 * one m64 wgmma tile each). */
#define BC_CONV_WG_BM 128
/** Output channels per block of `bc_conv_wgmma` (the N of its wgmma m64n128k16). */
#define BC_CONV_WG_BN 128
/** Output channels per block of `bc_conv_wgmma_n96` (wgmma m64n96k16: the 96- and 192-channel
 * layers fill it exactly). */
#define BC_CONV_WG_BN_96 96
/** Output channels per block of `bc_conv_wgmma_n64` (wgmma m64n64k16: TAEHV's 64-channel
 * layers fill it exactly). */
#define BC_CONV_WG_BN_64 64
/** Input channels per k-step of `bc_conv_wgmma`: one 128-byte swizzle row (64 bf16). */
#define BC_CONV_WG_BK 64
/** Threads per block of `bc_conv_wgmma` (two warpgroups). */
#define BC_CONV_WG_THREADS 256
/** Shared-memory stages of `bc_conv_wgmma` (cp.async one k-step ahead, one wgmma group in
 * flight, one stage being read). */
#define BC_CONV_WG_STAGES 3
/** Dynamic shared memory of `bc_conv_wgmma` in bytes: STAGES x (A 128 + B 128 rows) x 128 B,
 * plus 1024 bytes of slack to start the tiles on a 1024-byte boundary of the shared window. */
#define BC_CONV_WG_SMEM (BC_CONV_WG_STAGES * (BC_CONV_WG_BM + BC_CONV_WG_BN) * BC_CONV_WG_BK * 2 + 1024)
/** Dynamic shared memory of `bc_conv_wgmma_n96` (B tiles of 96 rows). */
#define BC_CONV_WG_N96_SMEM (BC_CONV_WG_STAGES * (BC_CONV_WG_BM + BC_CONV_WG_BN_96) * BC_CONV_WG_BK * 2 + 1024)
/** Dynamic shared memory of `bc_conv_wgmma_n64` (B tiles of 64 rows). */
#define BC_CONV_WG_N64_SMEM (BC_CONV_WG_STAGES * (BC_CONV_WG_BM + BC_CONV_WG_BN_64) * BC_CONV_WG_BK * 2 + 1024)
/** Threads per block of the warp-specialized wgmma convolution `bc_conv_wgmma_ws*`
 * (cuda/conv_ws.cu): a producer warpgroup (every cp.async gather) and two consumer warpgroups
 * (one m64 wgmma tile of the BC_CONV_WG_BM = 128 pixel rows each). */
#define BC_CONV_WS_THREADS 384
/** Output channels per block of `bc_conv_wgmma_ws` (wgmma m64n192k16: the Wan VAE's 384- and
 * 192-channel layers fill it exactly); `bc_conv_wgmma_ws_n96` and `bc_conv_wgmma_ws_n64` take
 * BC_CONV_WG_BN_96 and BC_CONV_WG_BN_64. */
#define BC_CONV_WS_BN 192
/** Shared-memory stages of `bc_conv_wgmma_ws` (40 KB each: as many as 227 KB hold). */
#define BC_CONV_WS_STAGES 5
/** Shared-memory stages of `bc_conv_wgmma_ws_n96` (28 KB each). */
#define BC_CONV_WS_N96_STAGES 8
/** Shared-memory stages of `bc_conv_wgmma_ws_n64` (24 KB each). */
#define BC_CONV_WS_N64_STAGES 9
/** Dynamic shared memory of `bc_conv_wgmma_ws` in bytes: STAGES x (A 128 + B 192 rows) x 128 B,
 * then a "full" and an "empty" mbarrier per stage (8 bytes each), plus the 1024 bytes of
 * alignment slack: 205904 <= 232448. */
#define BC_CONV_WS_SMEM (BC_CONV_WS_STAGES * ((BC_CONV_WG_BM + BC_CONV_WS_BN) * BC_CONV_WG_BK * 2 + 16) + 1024)
/** Dynamic shared memory of `bc_conv_wgmma_ws_n96` (B tiles of 96 rows): 230528. */
#define BC_CONV_WS_N96_SMEM (BC_CONV_WS_N96_STAGES * ((BC_CONV_WG_BM + BC_CONV_WG_BN_96) * BC_CONV_WG_BK * 2 + 16) + 1024)
/** Dynamic shared memory of `bc_conv_wgmma_ws_n64` (B tiles of 64 rows): 222352. */
#define BC_CONV_WS_N64_SMEM (BC_CONV_WS_N64_STAGES * ((BC_CONV_WG_BM + BC_CONV_WG_BN_64) * BC_CONV_WG_BK * 2 + 16) + 1024)
/** Output rows of a pixel tile of the persistent halo convolution `bc_conv_halo_n64`
 * (cuda/conv_halo.cu): tiles of BC_CONV_HALO_TH x BC_CONV_HALO_TW output pixels (128, one m64
 * wgmma tile per warpgroup), 64 output channels (wgmma m64n64k16). */
#define BC_CONV_HALO_TH 8
/** Output columns of a pixel tile of `bc_conv_halo_n64` (a multiple of 8: ldmatrix's 8 rows in
 * one tile row). */
#define BC_CONV_HALO_TW 16
/** Threads per block of `bc_conv_halo_n64` (two warpgroups). */
#define BC_CONV_HALO_THREADS 256
/** Most k-steps (64 weight values each: 64 channels of one tap) whose weights
 * `bc_conv_halo_n64` keeps resident: two 64-channel sources x 9 taps (TAEHV's MemBlock conv),
 * or one 128-channel source x 9 taps x 2. */
#define BC_CONV_HALO_MAX_KSTEPS 18
/** Halo stages of `bc_conv_halo_n64` (the next (tile, source) halo loads while one is read). */
#define BC_CONV_HALO_STAGES 2
/** Dynamic shared memory of `bc_conv_halo_n64` in bytes: the resident weights (MAX_KSTEPS x 64
 * rows x 128 B), STAGES halo tiles ((TH + 2) x (TW + 2) pixels x 128 B), 16 bytes for the
 * claimed tiles, 1024 bytes of alignment slack: 194576 <= 232448. */
#define BC_CONV_HALO_SMEM (BC_CONV_HALO_MAX_KSTEPS * BC_CONV_WG_BN_64 * BC_CONV_WG_BK * 2 + BC_CONV_HALO_STAGES * (BC_CONV_HALO_TH + 2) * (BC_CONV_HALO_TW + 2) * BC_CONV_WG_BK * 2 + 16 + 1024)
/** Epilogue activation of the decoder kernels: ReLU (`bc_conv`; the others use BC_ACT_NONE
 * and BC_ACT_SILU of `bc_activation`). */
#define BC_ACT_RELU 4
/** Pixels per block of `bc_dec_rms_norm` (one warp per pixel). */
#define BC_DEC_NORM_PIXELS 8

/** One input frame of a `bc_conv` output frame: it meets time tap `t` of the kernel and
 * weight input channels `[c0, c0 + channels)` (a causal conv3d is up to three sources, one per
 * cached or current frame; a concatenation along channels is two sources with different
 * `c0`). A zero frame (causal padding, no memory yet) is simply not a source. */
typedef struct BcConvSource {
    /** The frame, NHWC bf16 `[h*w][stride]` (`[(h/2)*(w/2)][stride]` when `up`). */
    const bc_bf16 *x;
    /** Channels of this frame. */
    bc_i32 channels;
    /** Elements per pixel of `x` (>= channels). */
    bc_i32 stride;
    /** First weight input channel of this frame. */
    bc_i32 c0;
    /** Time tap (0 .. kt-1). */
    bc_i32 t;
    /** 1: read through a nearest 2x spatial upsample (never materialised). */
    bc_i32 up;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcConvSource;

/** `bc_conv`: one output frame of a convolution with kernel `[kt, kh, kw]` (kh, kw in {1, 3},
 * spatial zero padding kh/2, kw/2) as an implicit GEMM, `out[m][n] = act(bias[n] + res[m][n] +
 * sum over sources, taps, channels of x[m shifted by the tap][c] * w[n][t][dy][dx][c0 + c])`.
 * Weights bf16 `[cout][kt][kh][kw][cin]` (pre-packed at upload), f32 accumulation. The output
 * channel `n` goes to frame `n / out_split`, channel `n % out_split`, at `out + frame *
 * out_frame_stride + m * out_stride + (n % out_split) * out_cstride` (TAEHV's TGrow and the Wan VAE's time_conv split their
 * channels into frames this way; `out_split = cout` for a plain conv).
 * Grid (ceil(h*w / BC_CONV_BM), ceil(cout / BC_CONV_BN)), block BC_CONV_THREADS; `bc_conv_n16`
 * (cout <= BC_CONV_BN_NARROW) the same with ceil(cout / BC_CONV_BN_NARROW); `bc_conv_wgmma`
 * (sm_90a, needs `vec`) grid (ceil(h*w / BC_CONV_WG_BM), ceil(cout / BC_CONV_WG_BN)), block
 * BC_CONV_WG_THREADS, BC_CONV_WG_SMEM bytes of dynamic shared memory. With `parity`, h*w in
 * the grids is (h/2)*(w/2) and the grid's z is 4; the grid's z is times `frames`. */
typedef struct BcConvParams {
    /** The sources (`num_src` used). */
    BcConvSource src[BC_CONV_MAX_SOURCES];
    /** Weights `[cout][kt][kh][kw][cin]` bf16. */
    const bc_bf16 *w;
    /** Optional `[cout]` f32 bias. */
    const float *bias;
    /** Optional residual `[h*w][res_stride]` bf16, added after the bias (needs out_split = cout). */
    const bc_bf16 *res;
    /** Output, bf16 or f32 (`out_f32`). */
    void *out;
    /** Elements between output frames of a split output. */
    bc_i64 out_frame_stride;
    /** Sources used (1..=BC_CONV_MAX_SOURCES). */
    bc_i32 num_src;
    /** Output height. */
    bc_i32 h;
    /** Output width. */
    bc_i32 w_px;
    /** Weight input channels (all sources together). */
    bc_i32 cin;
    /** Output channels. */
    bc_i32 cout;
    /** Temporal taps. */
    bc_i32 kt;
    /** Kernel height (1 or 3). */
    bc_i32 kh;
    /** Kernel width (1 or 3). */
    bc_i32 kw;
    /** Elements per pixel of `res`. */
    bc_i32 res_stride;
    /** Elements per pixel of `out`. */
    bc_i32 out_stride;
    /** Output channels per output frame (divides cout). */
    bc_i32 out_split;
    /** 1: f32 output, 0: bf16. */
    bc_i32 out_f32;
    /** BC_ACT_NONE, BC_ACT_RELU or BC_ACT_SILU, after bias and residual. */
    bc_i32 act;
    /** 1: every source's channels and stride and `cin` are multiples of 8 and every pointer is
     * 16-byte aligned, so tiles load with 16-byte cp.async; 0: element loads. */
    bc_i32 vec;
    /** Elements between consecutive output channels (1: NHWC; the pixel count: a transposed
     * `[channels][pixels]` output, as the attention's V^T). */
    bc_i32 out_cstride;
    /** 1: the sub-pixel (parity) form of a 3x3 conv2d (kh = kw = 3, kt = 1) whose sources are
     * all upsampled: output pixel (2i + py, 2j + px) is a 2x2 conv of the sources at their own
     * size, rows i + py - 1 + a, columns j + px - 1 + b (a, b in {0, 1}), with summed weights
     * `[4 parities][cout][2][2][cin]` (parity z = 2 py + px; `Conv::parity_packed_bf16`) in
     * `w`. The GEMM rows are the sources' (h/2) x (w/2) pixels and the grid's z the 4
     * parities: 16 taps per output quad instead of 36. 0: the plain conv (grid z = 1). */
    bc_i32 parity;
    /** Frames the launch covers (>= 1; grid z = frames, times 4 in the parity form, z = 4 f +
     * parity): frame f reads every source `f` frames on (a source's frames are contiguous,
     * `h*w*stride` elements apart, `(h/2)*(w/2)*stride` when `up`), the residual `f * h*w *
     * res_stride` elements on, and writes output frames `f * (cout / out_split) + n /
     * out_split` (`out_frame_stride` apart). Each frame's blocks are those of a one-frame launch,
     * so every output value is the same sum in the same order. Needs `out_cstride` = 1 when > 1. */
    bc_i32 frames;
    /** Padding, keep 0. */
    bc_i32 _pad;
    /** `bc_conv_halo_n64` only (NULL elsewhere): two u32 in device memory, zero before the
     * first launch that uses them: the first the next tile to claim (its blocks take their
     * tiles one atomicAdd at a time), the second the blocks done; the last block to finish
     * sets both back to 0, so the next launch on the same stream (or graph) finds them zero.
     * Launches that may run at the same time need their own pair. */
    unsigned int *tile_counter;
} BcConvParams;

/** `bc_dec_latent_in`: latents f32 `[c][h*w]` (one frame, as the DiT emits it) to NHWC bf16
 * `[h*w][c]`, with `mode` 0: as they are, 1: TAEHV's `tanh(z/3)*3`, 2: the Wan VAE's
 * un-normalisation `z / scale[c] + mean[c]` (`scale = 1/std`, divided as upstream does);
 * flags a non-finite latent in `nonfinite`. Grid (ceil(c*h*w / BC_ELEM_THREADS)), block BC_ELEM_THREADS. */
typedef struct BcDecLatentInParams {
    /** `[c][hw]` f32. */
    const float *z;
    /** `[hw][c]` bf16. */
    bc_bf16 *out;
    /** `[c]` mean (mode 2). */
    const float *mean;
    /** `[c]` 1/std (mode 2). */
    const float *scale;
    /** One u32 that gets bit 0 set (atomicOr) when a latent read is NaN or +-inf (the latents
     * handed over on the device are checked here, for nothing, instead of on the host); NULL:
     * not checked. The caller zeroes it and reads it back. */
    unsigned int *nonfinite;
    /** Channels. */
    bc_i32 c;
    /** Pixels. */
    bc_i32 hw;
    /** 0, 1 or 2 (see above). */
    bc_i32 mode;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcDecLatentInParams;

/** `bc_dec_rms_norm`: the Wan VAE's channel RMS norm of NHWC bf16 pixels, `y = x / max(|x|_2,
 * 1e-12) * sqrt(c) * gamma`, then SiLU when `silu`. One warp per pixel; grid (ceil(pixels /
 * BC_DEC_NORM_PIXELS)), block 32 * BC_DEC_NORM_PIXELS. */
typedef struct BcDecRmsNormParams {
    /** `[pixels][c]` bf16. */
    const bc_bf16 *x;
    /** `[pixels][c]` bf16 (may be `x`). */
    bc_bf16 *out;
    /** `[c]` f32. */
    const float *gamma;
    /** Pixels. */
    bc_i32 pixels;
    /** Channels. */
    bc_i32 c;
    /** 1: SiLU after the norm. */
    bc_i32 silu;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcDecRmsNormParams;

/** `bc_dec_upsample2x`: nearest 2x spatial upsample of an NHWC bf16 frame `[h][w][c]` to
 * `[2h][2w][c]`, written to `out` and, when `out2` is set, to `out2` too (a temporal
 * duplication of the frame). Grid (ceil(4*h*w*c / BC_ELEM_THREADS)), block BC_ELEM_THREADS. */
typedef struct BcDecUpsampleParams {
    /** `[h*w][c]` bf16. */
    const bc_bf16 *x;
    /** `[4*h*w][c]` bf16. */
    bc_bf16 *out;
    /** Optional second copy. */
    bc_bf16 *out2;
    /** Source height. */
    bc_i32 h;
    /** Source width. */
    bc_i32 w;
    /** Channels. */
    bc_i32 c;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcDecUpsampleParams;

/** `bc_dec_to_pixels`: the first 3 channels of an NHWC frame (f32 or bf16) to pixels: `v =
 * x * scale + shift`, clamped to [-1, 1] when `clamp`; written as f32 planar `[3][h*w]`
 * (optional) and as RGB8 `[h*w][3]` (optional) by `Video::to_rgb8`'s rule `(u8)(clamp(v, -1,
 * 1) * 127.5 + 127.5)` (truncation, unfused). Grid (ceil(hw / BC_ELEM_THREADS)), block
 * BC_ELEM_THREADS. */
typedef struct BcDecToPixelsParams {
    /** `[hw][stride]` f32 or bf16. */
    const void *x;
    /** Optional `[3][hw]` f32. */
    float *out_f32;
    /** Optional `[hw][3]` RGB8. */
    unsigned char *rgb;
    /** Multiplier. */
    float scale;
    /** Offset. */
    float shift;
    /** Pixels. */
    bc_i32 hw;
    /** Elements per pixel of `x` (>= 3). */
    bc_i32 stride;
    /** 1: `x` is f32, 0: bf16. */
    bc_i32 in_f32;
    /** 1: clamp the f32 output to [-1, 1] (the Wan VAE; TAEHV's is not clamped). */
    bc_i32 clamp;
} BcDecToPixelsParams;

/** `bc_dec_softmax`: row-wise softmax of f32 scores, `p[r][j] = exp(scale * (s[r][j] - max_j
 * s[r][j])) / sum` (scale >= 0), stored bf16: the probabilities of the Wan VAE's single-head
 * attention over the pixels of a frame. Grid (rows), block BC_ROW_THREADS. */
typedef struct BcDecSoftmaxParams {
    /** `[rows][n]` f32 scores. */
    const float *s;
    /** `[rows][n]` bf16 probabilities. */
    bc_bf16 *p;
    /** Rows. */
    bc_i32 rows;
    /** Columns. */
    bc_i32 n;
    /** Score scale (`1/sqrt(C)`), >= 0. */
    float scale;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcDecSoftmaxParams;

/** `bc_wgmma_probe`: the Hopper (sm_90a) warpgroup-MMA layout probe, a test kernel. Grid (1),
 * block `warpgroups` x BC_WGMMA_PROBE_THREADS; each warpgroup j computes `c[j][64][n] = a[64][k] .
 * b[n][k]^T` (k = BC_WGMMA_PROBE_K) with `wgmma.mma_async.m64nNk16.f32.bf16.bf16`: `a` and `b` go through
 * shared memory in the K-major layout of `swizzle` (B: MN-major with `b_mn_major`), then A from
 * shared memory (`a_regs` 0) or from registers (`a_regs` 1), B always from shared memory. `fault` != 0 breaks the kernel on
 * purpose (BC_WGMMA_FAULT_*: the result must then be wrong, or the emulation must report an
 * error). Dynamic shared memory BC_WGMMA_PROBE_SMEM. On sm_80 the kernel traps (wgmma needs
 * sm_90a). */
#define BC_WGMMA_PROBE_THREADS 128
/** K extent of the probe (4 k-steps of 16; one 128-byte swizzle row of bf16). */
#define BC_WGMMA_PROBE_K 64
/** Largest N of the probe. */
#define BC_WGMMA_PROBE_MAX_N 256
/** Most warpgroups of `bc_wgmma_probe`. */
#define BC_WGMMA_PROBE_MAX_WARPGROUPS 2
/** `fault` of `bc_wgmma_probe`: B's stride-dimension byte offset 16 bytes off (wrong result; the
 * GPU test's control). */
#define BC_WGMMA_FAULT_STRIDE 1
/** Emulation only (undefined on hardware): D stored before the wait (reads as NaN). */
#define BC_WGMMA_FAULT_EARLY_READ 2
/** Tiles 128 bytes past the 1024-byte boundary (n < 256 only): a swizzled descriptor's start is
 * then off its pattern period (the emulation reports it; hardware would need the base offset). */
#define BC_WGMMA_FAULT_MISALIGNED 3
/** Emulation only: no wait_group at all (the emulation reports the mma never waited for). */
#define BC_WGMMA_FAULT_NO_WAIT 4
/** Emulation only: the last warp's B descriptor differs (the instruction is .aligned). */
#define BC_WGMMA_FAULT_DIVERGENT 5
/** `b_mn_major` only: B's leading-dimension byte offset 16 bytes off (wrong result wherever the
 * MN-major layout uses it: no swizzle, or N wider than one swizzle atom). */
#define BC_WGMMA_FAULT_LBO 6
/** `b_mn_major` only: the MN-major B tile read with the K-major instruction form
 * (imm-trans-b = 0; wrong result). */
#define BC_WGMMA_FAULT_NO_TRANS 7
/** Emulation only: after the tiles are stored, thread 0 rewrites B's first 16 bytes by
 * cp.async and waits for it, with no barrier before the wgmma read them (the emulation reports
 * data the other threads and wgmma need not see yet). */
#define BC_WGMMA_FAULT_UNPUBLISHED 8
/** Dynamic shared memory of `bc_wgmma_probe`: A [64][K] and B [256][K] bf16, plus 1024 bytes
 * to align the tiles to the 1024-byte period of the 128-byte swizzle. */
#define BC_WGMMA_PROBE_SMEM ((64 + BC_WGMMA_PROBE_MAX_N) * BC_WGMMA_PROBE_K * 2 + 1024)
/** `bc_wgmma_probe` (cuda/test/wgmma_probe.cu): one 64 x n x BC_WGMMA_PROBE_K product by wgmma
 * per warpgroup in the given shared-memory layout, A source and B majorness, which the tests
 * compare with a plain matmul to check the fragment and descriptor layouts. */
typedef struct BcWgmmaProbeParams {
    /** `[64][BC_WGMMA_PROBE_K]` bf16, row-major. */
    const bc_bf16 *a;
    /** `[n][BC_WGMMA_PROBE_K]` bf16, row-major (B^T: K contiguous). */
    const bc_bf16 *b;
    /** `[warpgroups][64][n]` f32, row-major. */
    float *c;
    /** N of the instruction: 64, 128 or 256. */
    bc_i32 n;
    /** Shared-memory layout and descriptor swizzle: 0 none, 1 128-byte, 2 64-byte, 3 32-byte
     * (the PTX descriptor's encoding). */
    bc_i32 swizzle;
    /** 1: A from registers (the `wgmma ... {a0..a3}, descB` form), 0: A from shared memory. */
    bc_i32 a_regs;
    /** 0, or a deliberate fault BC_WGMMA_FAULT_* (tests that the checks can fail). */
    bc_i32 fault;
    /** 1: every k-step is its own commit group, waited for with wait_group 1 while the next is
     * in flight (wait_group 0 at the end); 0: one group for all k-steps. */
    bc_i32 pipelined;
    /** Warpgroups of the block (1 or 2): each computes the whole `c[j]`. */
    bc_i32 warpgroups;
    /** 1: B goes to shared memory MN-major (`[K][n]`, n contiguous: the layout of a V tile for
     * P V) and is read with imm-trans-b = 1 (`bc_wgmma_*_nmajor`); 0: K-major. */
    bc_i32 b_mn_major;
    /** Padding, keep 0. */
    bc_i32 _pad;
} BcWgmmaProbeParams;

/* ---- TMA (tensor memory accelerator) and mbarrier: tensor maps and the layout probe ---- */

/** A tensor map (the driver's `CUtensorMap`): 128 opaque bytes, 64-byte aligned, that a
 * `cp.async.bulk.tensor` reads. On a GPU the driver's cuTensorMapEncodeTiled fills it; under
 * the emulation it holds a BcEmuTensorMap. Kernels take it inside their params struct, declared
 * `const __grid_constant__` so that its address is the kernel-parameter one. */
typedef struct __attribute__((aligned(64))) BcTensorMap {
    /** Driver-defined bytes. */
    unsigned long long opaque[16];
} BcTensorMap;

/** `magic` of a BcEmuTensorMap ("TNSORMAP"): the emulation refuses anything else. */
#define BC_EMU_TENSOR_MAP_MAGIC 0x50414d524f534e54ull

/** The emulation's tensor map: the arguments of cuTensorMapEncodeTiled, as the host validated
 * them (src/kernels/tma.rs), in the 128 bytes of a BcTensorMap. Dimension 0 is the innermost
 * (contiguous) one. */
typedef struct BcEmuTensorMap {
    /** BC_EMU_TENSOR_MAP_MAGIC. */
    unsigned long long magic;
    /** Address of element (0, .., 0) (16-byte aligned). */
    unsigned long long global_address;
    /** Bytes between consecutive indices of dimensions 1 .. rank-1 (multiples of 16). */
    unsigned long long global_strides[4];
    /** Extent of each dimension (elements). */
    unsigned int global_dim[5];
    /** Box extent of each dimension (elements of the traversal, <= 256). */
    unsigned int box_dim[5];
    /** Traversal step of each dimension (1..8): every `element_strides[i]`-th element is loaded. */
    unsigned int element_strides[5];
    /** Dimensions (1..5). */
    unsigned int rank;
    /** Bytes per element (1, 2, 4, 8). */
    unsigned int elem_bytes;
    /** Swizzle span in bytes: 0 (none), 32, 64, 128. */
    unsigned int swizzle_bytes;
    /** Interleave (0: none; the only mode emulated). */
    unsigned int interleave;
    /** Out-of-bound fill (0: zeros; the only mode emulated). */
    unsigned int oob_fill;
} BcEmuTensorMap;

/** `bc_tma_probe` (cuda/test/tma_probe.cu): the TMA / mbarrier layout probe, one warpgroup
 * (BC_TMA_PROBE_THREADS) and grid (1). `mode` 0 (raw): loads box `coords[0]`, then box
 * `coords[1]` of `map` (rank `rank`) through one mbarrier (phases 0 and 1) and copies the
 * `box_bytes` of shared memory each box landed in to `out` as they are. `mode` 1 (wgmma): loads
 * A = `map` and B = `map_b` (both `[64][64]` bf16, row-major) as 64 / E boxes `{E, 64}` each
 * (E = 8 for swizzle none, W / 2 for a W-byte swizzle) into the K-major layout of `swizzle`
 * (BC_WGMMA_SWIZZLE_*), then `c[64][64] = A . B^T` by 4 wgmma m64n64k16. `fault` breaks one
 * thing on purpose (BC_TMA_FAULT_*). Dynamic shared memory BC_TMA_PROBE_SMEM. Traps below sm_90. */
#define BC_TMA_PROBE_THREADS 128
/** Largest box of the raw mode, bytes. */
#define BC_TMA_PROBE_MAX_BOX 16384
/** `fault`: arrive without expect_tx (emulation: the phase completes before the data). */
#define BC_TMA_FAULT_NO_EXPECT_TX 1
/** `fault`: the first wait waits for the wrong parity (passes at once: the data has not landed). */
#define BC_TMA_FAULT_PARITY 2
/** `fault`: nobody arrives (emulation: a reported deadlock). */
#define BC_TMA_FAULT_NO_ARRIVE 3
/** `fault`: the boxes start one row too low (a wrong box coordinate: wrong result, on a GPU too). */
#define BC_TMA_FAULT_COORD 4
/** Dynamic shared memory of `bc_tma_probe`: two boxes (or the A and B tiles), the 1024-byte
 * alignment slack and the mbarrier. */
#define BC_TMA_PROBE_SMEM (2 * BC_TMA_PROBE_MAX_BOX + 1024 + 16)
typedef struct BcTmaProbeParams {
    /** The tensor (raw mode) or A (wgmma mode). */
    BcTensorMap map;
    /** B (wgmma mode; `[n = 64][k = 64]`, K contiguous). */
    BcTensorMap map_b;
    /** Raw mode: start coordinates of the two boxes (innermost dimension first). */
    bc_i32 coords[2][5];
    /** Raw mode: rank of `map` (2..5). */
    bc_i32 rank;
    /** Raw mode: bytes one box lands in shared memory (<= BC_TMA_PROBE_MAX_BOX). */
    bc_i32 box_bytes;
    /** 0 raw, 1 wgmma. */
    bc_i32 mode;
    /** Wgmma mode: the layout (BC_WGMMA_SWIZZLE_*) the boxes and the descriptors use. */
    bc_i32 swizzle;
    /** BC_TMA_FAULT_* or 0. */
    bc_i32 fault;
    /** Raw mode: `2 * box_bytes` bytes. */
    unsigned char *out;
    /** Wgmma mode: `[64][64]` f32. */
    float *c;
    /** Raw mode: NULL (the loads read `map`, the kernel parameter's copy), or a copy of `map` in
     * global memory that the loads read instead: the first GPU run (H200) faulted on the
     * parameter's map, and this tells the tensor map's location from its contents. */
    const BcTensorMap *map_global;
} BcTmaProbeParams;

/** `bc_conv_wgmma_tma` / `bc_conv_wgmma_tma_n96` (cuda/conv_wgmma_tma.cu): bc_conv_wgmma with
 * the operand tiles loaded by TMA from a producer warp. Output tile: BC_CONV_TMA_TX x
 * BC_CONV_TMA_TY pixels (a rectangle of the frame: 128 rows of the wgmma A tile) x 128 (96)
 * output channels; k-step = two (tap, 32-channel chunk) pairs of a source: per pair, A = the box
 * {32 channels, TX, TY} of the source at the tap's offset (out-of-frame pixels and channels past
 * the source are the TMA's zero fill), B = the box {32, BN} of the weights, 64-byte swizzle.
 * Plain sources, or upsampled ones in the parity form (`conv.parity`: the tiles cover the
 * sources' own pixels, the 2x2 taps offset by the parity, grid z = 4). */
#define BC_CONV_TMA_TX 8
/** Pixel rows (y) of the output tile of `bc_conv_wgmma_tma`. */
#define BC_CONV_TMA_TY 16
/** Shared-memory stages of `bc_conv_wgmma_tma` (full / empty mbarrier pairs). */
#define BC_CONV_TMA_STAGES 4
/** Threads of `bc_conv_wgmma_tma`: two consumer warpgroups and one producer warp. */
#define BC_CONV_TMA_THREADS (2 * 128 + 32)
/** Dynamic shared memory of `bc_conv_wgmma_tma`: STAGES x (A 128 + B 128 rows of 128 bytes),
 * 1024 bytes of alignment slack, the 2 x STAGES mbarriers. */
#define BC_CONV_TMA_SMEM (BC_CONV_TMA_STAGES * (BC_CONV_WG_BM + BC_CONV_WG_BN) * 128 + 1024 + 16 * BC_CONV_TMA_STAGES)
/** Dynamic shared memory of `bc_conv_wgmma_tma_n96` (B tiles of 96 rows). */
#define BC_CONV_TMA_N96_SMEM (BC_CONV_TMA_STAGES * (BC_CONV_WG_BM + BC_CONV_WG_BN_96) * 128 + 1024 + 16 * BC_CONV_TMA_STAGES)
typedef struct BcConvTmaParams {
    /** Per source: the frame as a 3-D tensor {channels, w, h} (strides stride and w * stride
     * elements), box {32, TX, TY}, 64-byte swizzle. */
    BcTensorMap src_map[BC_CONV_MAX_SOURCES];
    /** The weights as a 2-D tensor {kt * kh * kw * cin, cout}, box {32, BN}, 64-byte swizzle
     * (parity form: {4 * cin, 4 * cout}, parity z's rows from z * cout). */
    BcTensorMap w_map;
    /** The convolution (sources, epilogue, output) as bc_conv_wgmma takes it. */
    BcConvParams conv;
    /** Output tiles along x: ceil(w / TX) (the grid's x is tiles_x * ceil(h / TY); parity
     * form: of the sources' w/2 and h/2). */
    bc_i32 tiles_x;
} BcConvTmaParams;

#endif /* BLOCKCASCADE_PARAMS_H */
