// Fused flash attention over a list of K/V segments, bf16 in/out, f32 accumulation: a
// FlashAttention-2-style tensor-core kernel (mma.sync m16n8k16 bf16 -> f32), 32 query rows
// per warp.
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
// kv_stride elements. head_dim: a multiple of 8, <= 64 (bc_attention_hd64*) or <= 128
// (bc_attention_hd128*); pointers 16-byte aligned, strides multiples of 8.
//
// Variants (tile sizes in params.h, AttCfg below; the backend picks the row tile by timing
// both on the session's own segment list, see src/backend/cuda/attention_tune.rs):
//   bc_attention_hd{64,128}       BQ = 64 query rows per block: 2 warps.
//   bc_attention_hd{64,128}_q128  BQ = 128 rows: 4 warps. A block reads 4 * hd bytes of K/V
//                                 per key from L2 and does 4 * BQ * hd FLOPs with them: BQ
//                                 FLOP per byte, so 128 rows halve the L2 traffic per FLOP.
// Each warp owns ATT_WM = 32 query rows (two m16 MMA tiles, the FlashAttention-2 layout), so
// every K and V fragment an ldmatrix brings into registers feeds two mma (one per m-tile).
// Key tiles: BK = 64 keys (hd64) or 32 keys (hd128). The register budget decides: per thread
// the hd128 output accumulators of 32 rows are 128 f32, the scores of a BK-key tile BK f32,
// so BK = 32 (as FlashAttention-2 uses for hd128 on sm_80) keeps the kernel under 255
// registers without a spill; hd128 also reads its Q fragments from shared memory at every
// k-step (holding them would cost 64 registers), hd64 holds them (32 registers).
// Both row tiles walk the same key tiles and give every warp the same 32 rows' work in the
// same order, so they differ only in how many warps share a block: their outputs are
// bit-identical (tests/kernels_emu.rs) and the tile the backend picks never changes numbers.
//   bc_attention_wgmma_hd{64,128} Hopper prototype (sm_90a; the sm_80 cubin traps), off by
//                                 default (BC_ATTN_WGMMA=1 on a 9.0 device, AttentionTile::
//                                 Wgmma64): warpgroups of 64 rows (4 warps x 16 rows, AttCfg
//                                 MT = 1, WG; hd64 one per block, hd128 two sharing the K/V
//                                 tiles), BK = 64, three cp.async stages. Same copies, swizzle
//                                 and softmax as above, but every product is a wgmma: S = Q K^T
//                                 m64n64k16 (A = the warpgroup's Q tile, B = the K tile, both by
//                                 descriptor: 128-byte rows with chunk c at c ^ (row % 8) are
//                                 wgmma's 128-byte swizzle once the tiles start on a 1024-byte
//                                 boundary: dynamic shared memory with 1024 bytes of slack; SBO
//                                 1024), and O += P V m64nHDMAXk16 with A = P from registers
//                                 (the S accumulator packed to bf16) and B = the V tile read
//                                 MN-major (imm-trans-b = 1, LBO 8 KB between 64-column blocks).
//                                 The warp's D fragment is the mma.sync C layout of its m16
//                                 tile, so the softmax reads it as is. Per tile: S of the next
//                                 tile and P V of this one issued together, wait_group 1, the
//                                 next tile's softmax (O's rescale deferred) while P V runs,
//                                 wait_group 0. cp.async'd and sign-flipped tiles are made
//                                 visible to wgmma by fence.proxy.async before the barrier.
//                                 hd128: each Q and K/V tile is stored as two 64-column blocks
//                                 [64 rows][64] of 128-byte rows (8 KB apart; the same chunk
//                                 swizzle inside each block), the 128B-swizzle K-major layout of
//                                 bc_wgmma_kmajor_offset; S k-step s in block s / 4 at + 32 (s %
//                                 4) bytes; O is 64 f32 registers per thread (16 rows x 128), S
//                                 32. Sums in another order: checked against the CPU, not for
//                                 the same bits. See docs/wgmma.md.
//   bc_attention_wgmma_hd128_{k128,pp,pp_k128}  its variants (AttCfg BK / PP; opt-in, also by
//                                 BC_ATTN_WGMMA_VARIANT): 128-key tiles (S m64n128k16, 3 stages of
//                                 64 KB), and ping-pong: the two warpgroups take turns issuing
//                                 their wgmma, ordered by named barriers (cuda/include/barrier.cuh),
//                                 with V copied one tile behind K and one all-thread named barrier
//                                 per tile instead of the block barriers (the PP loop below). The
//                                 ping-pong kernels must give the bits of their tile size without
//                                 it (same products, same order).
// Work split: grid (ceil(max group rows / BQ) x S, heads, groups), block NT = 32 * warps threads
// stacked along the query rows; warp w owns rows [32w, 32w + 32) of the block's BQ rows. Keys
// are walked one segment at a time in tiles of BK keys; a tile never crosses a segment end.
// Split-KV (BcAttentionParams::splits = S > 1, chosen per launch by the host's wave-fill model):
// split s of a (row tile, head, group) walks only the group's key tiles [s n / S, (s + 1) n / S)
// of its n (att_split_start; a split may be empty) and stores its un-normalised O and row
// statistics (att_store_partial) for bc_attention_combine (end of this file) to merge. S = 1:
// the whole walk and the store below, the same bits as without the option. docs/wgmma.md,
// "Split-KV".
// Per block:
//   1. Q [BQ x HDMAX] goes to shared memory by cp.async (hd128: its own region, read for the
//      whole kernel; hd64: the stage-1 K/V buffer, free at that point, and each warp then keeps
//      its Q rows as A fragments in registers) together with K/V tile 0 (stage 0).
//   2. Per tile: cp.async of the next tile (next segment when this one ends) into the other
//      stage, wait_group 1 for the current one (double buffering), then per warp (att_tile)
//      S = Q K^T (mma, K B-fragments by ldmatrix.x4 from the row-major K tile, each for both
//      m-tiles), online softmax in base 2 on the accumulator fragments (each lane holds rows
//      g = lane/4 and g+8 of each m-tile; row max through quad shuffles xor 1, 2; the row sum
//      stays per lane until the end), P re-packed from the accumulator fragments (n-tiles 2k,
//      2k+1) into the bf16 A fragment of k-step k, and O += P V (V B-fragments by
//      ldmatrix.x4.trans from the row-major V tile, each for both m-tiles).
//   3. O / rowsum (0 for rows without keys) stored as bf16; rows past the group end are never
//      stored (their Q rows are zeros), warps without a valid row skip the math.
// The inner loops are straight-line code: the head dimension they walk is the compile-time
// HDMAX (head_dim < HDMAX computes on zero-filled columns), a full tile of BK keys runs without
// any key test, and only the last tile of a segment (kn < BK keys) takes the masked copy of
// the tile code (keys past kn: zero-filled K/V rows, P = 0). Shared-memory addresses are 32-bit
// offsets computed once per thread (AttSmem): each ldmatrix / cp.async is a base register plus
// an immediate. The ldmatrix of fragment step i + 1 is issued before the mma of step i. The
// softmax scale is folded into log2(e) and into the exponent's FFMA (P = 2^(S * qscale - m) is
// one FFMA + one MUFU.EX2, ex2.approx.ftz); a negative scale flips the sign of Q in shared
// memory once (exact). O and the row sums are rescaled only in tiles where a row maximum of
// the m-tile grew (one warp vote; otherwise the factor is 2^0 = 1 and skipping is exact).
// Shared memory rows are HDMAX bf16 long; 16-byte chunk c of row r lives at chunk c ^ (r % 8)
// (XOR swizzle: conflict-free ldmatrix and cp.async). Everything a copy does not read (columns
// past head_dim, K/V rows past a segment end, Q rows past the group end) is zero-filled by the
// cp.async itself (src-size 0): finite zeros, since masked keys have P = 0 and 0 * garbage
// could be NaN on a GPU.
// FLOPs per launch: 4 * rows * keys * head_dim per head and group (2 for Q K^T, 2 for P V),
// i.e. sum over groups of 4 * q_rows * (keys of its segments) * head_dim * heads.
//
// Registers per thread (f32 accumulators + fragments), hd128: O 128 + S 32 + Q fragments of
// two k-steps 16 + two K or V fragments 8; hd64: O 64 + S 64 + Q 32 + 8. The build fails on
// any spill; docs/kernel-sass.md has the compiled numbers (scripts/sass-report.sh).
// Checked by tests/kernels_emu.rs against cpu::attention::attention under the SIMT emulation
// (emulated mma/ldmatrix/cp.async, see cuda/include/mma.cuh; cp.async lands only at its wait):
// head_dim 32/40/64/128, groups with different segment lists (ring-buffer wrap, sink + local
// window), many segments of odd lengths, row counts that are not multiples of the tile, empty
// groups and empty segments, scales other than 1/sqrt(hd) (negative and zero too), large
// logits (online rescaling), cross-attention with 512 keys; both row tiles bit-identical.
// Real-GPU speed and the hardware fragment layouts are checked by tests/cuda.rs / benches on a
// GPU only.
// (included once: cuda/attention_ws.cu includes it for the helpers below, and under the
// emulation, where every .cu is its own translation unit, with BC_ATTENTION_HELPERS_ONLY so
// that these kernels are defined once.)
#ifndef BC_ATTENTION_CU
#define BC_ATTENTION_CU
#include "include/barrier.cuh"
#include "include/mma.cuh"
#include "include/wgmma.cuh"

namespace {
/// Tile configuration of one kernel variant: WARPS warps stacked along the query rows, MT m16
/// tiles (16 * MT query rows) per warp, BK keys per K/V tile, QREG: Q fragments held in
/// registers (else read from shared memory at each k-step). Shared memory: 2 stages x (K + V)
/// x BK x HDMAX bf16, then Q [BQ x HDMAX] (QREG: Q is staged in stage 1, so 2 * BK >= BQ).
/// WG: S = Q K^T by wgmma (one warpgroup, MT = 1: warp w owns rows 16w..16w+15 of the m64
/// tile), the tiles start on a 1024-byte boundary (ALIGN bytes of slack). PP (two
/// warpgroups): ping-pong, the warpgroups take turns on the tensor cores (named barriers, see
/// the PP loop of bc_attention_impl).
template <int HDMAX_, int WARPS, int BK_, bool QREG_, int MT_ = 2, bool WG_ = false, bool PP_ = false>
struct AttCfg {
    static constexpr int HDMAX = HDMAX_;
    static constexpr int NT = WARPS * 32;  // threads per block
    static constexpr int MT = MT_;         // m16 tiles per warp
    static constexpr int WM = 16 * MT;     // query rows per warp
    static constexpr int BQ = WARPS * WM;
    static constexpr int BK = BK_;
    static constexpr bool QREG = QREG_;
    static constexpr bool WG = WG_;
    static constexpr bool PP = PP_;
    static constexpr int ALIGN = WG ? 1024 : 0;
    // K/V stages: 2 (double buffering), 3 for wgmma (the next tile's K is read by the S wgmma
    // while this tile's V is read by P V, and the tile after next is in flight).
    static constexpr int STAGES = WG ? 3 : 2;
    static constexpr int KV_BYTES = STAGES * 2 * BK * HDMAX * 2;
    static constexpr int Q_OFF = QREG ? KV_BYTES / 2 : KV_BYTES;  // stage 1, or Q's own region
    static constexpr int SMEM_BYTES = KV_BYTES + (QREG ? 0 : BQ * HDMAX * 2) + ALIGN;
    static_assert(BK % 16 == 0 && (!QREG || (2 * BK >= BQ && STAGES == 2)), "QREG: Q is staged in K/V stage 1");
    static_assert(HDMAX % 64 == 0, "swizzle needs rows of >= 8 chunks");
    static_assert(!WG || ((HDMAX == 64 || HDMAX == 128) && NT % 128 == 0 && MT == 1 &&
                          (BK == 64 || (BK == 128 && BQ == 128)) && !QREG),
                  "wgmma: whole warpgroups of 64 rows (MT = 1), m64n64 or (two warpgroups) m64n128 S tiles, Q read "
                  "by descriptor; Q and K tiles stored as 64-column blocks of 128-byte rows (the 128B swizzle)");
    static_assert(!PP || (WG && NT == 256), "ping-pong: two warpgroups");
};
// The variants (params.h): 64 query rows per block (2 warps) and 128 rows (4 warps); hd64 with
// 64-key tiles and Q in registers (32 KB of static shared memory), hd128 with 32-key tiles and
// Q in shared memory (48 / 64 KB of dynamic shared memory).
using AttHd64 = AttCfg<64, BC_ATTN_THREADS / 32, BC_ATTN_HD64_BK, true>;
using AttHd64Wide = AttCfg<64, BC_ATTN_WIDE_THREADS / 32, BC_ATTN_HD64_BK, true>;
using AttHd128 = AttCfg<128, BC_ATTN_THREADS / 32, BC_ATTN_HD128_BK, false>;
using AttHd128Wide = AttCfg<128, BC_ATTN_WIDE_THREADS / 32, BC_ATTN_HD128_BK, false>;
static_assert(AttHd64::BQ == BC_ATTN_BQ && AttHd64Wide::BQ == BC_ATTN_WIDE_BQ, "params.h rows per block");
static_assert(AttHd128::BQ == BC_ATTN_BQ && AttHd128Wide::BQ == BC_ATTN_WIDE_BQ, "params.h rows per block");
static_assert(AttHd128::SMEM_BYTES == BC_ATTN_HD128_SMEM && AttHd128Wide::SMEM_BYTES == BC_ATTN_WIDE_HD128_SMEM,
              "params.h shared memory");
// The Hopper prototype: one warpgroup (4 warps x 16 rows), 64-key tiles, S by wgmma.
using AttWgHd64 = AttCfg<64, BC_ATTN_WGMMA_THREADS / 32, BC_ATTN_HD64_BK, false, 1, true>;
// hd128: two warpgroups (128 query rows) share each K/V tile.
using AttWgHd128 = AttCfg<128, BC_ATTN_WGMMA_HD128_THREADS / 32, BC_ATTN_HD64_BK, false, 1, true>;
static_assert(AttWgHd64::BQ == BC_ATTN_WGMMA_BQ && AttWgHd64::SMEM_BYTES == BC_ATTN_WGMMA_SMEM &&
                  AttWgHd128::BQ == BC_ATTN_WGMMA_HD128_BQ && AttWgHd128::SMEM_BYTES == BC_ATTN_WGMMA_HD128_SMEM,
              "params.h wgmma attention");
// Its variants (hd128, two warpgroups): 128-key tiles (S m64n128, 64 f32 registers per thread;
// 3 stages of 64 KB), and ping-pong scheduling with 64- or 128-key tiles.
using AttWgHd128K128 = AttCfg<128, BC_ATTN_WGMMA_HD128_THREADS / 32, BC_ATTN_WGMMA_K128_BK, false, 1, true>;
using AttWgHd128Pp = AttCfg<128, BC_ATTN_WGMMA_HD128_THREADS / 32, BC_ATTN_HD64_BK, false, 1, true, true>;
using AttWgHd128PpK128 = AttCfg<128, BC_ATTN_WGMMA_HD128_THREADS / 32, BC_ATTN_WGMMA_K128_BK, false, 1, true, true>;
static_assert(AttWgHd128K128::SMEM_BYTES == BC_ATTN_WGMMA_K128_SMEM && AttWgHd128Pp::SMEM_BYTES == BC_ATTN_WGMMA_HD128_SMEM &&
                  AttWgHd128PpK128::SMEM_BYTES == BC_ATTN_WGMMA_K128_SMEM,
              "params.h wgmma attention variants");
/// Named barriers of the ping-pong kernels (0 is __syncthreads'): ATT_BAR_TILE, all threads: a K/V
/// tile has landed (everyone's copies) and a stage may be refilled; ATT_BAR_SCHED + j: warpgroup j
/// may issue its wgmma (the other warpgroup has issued its own).
constexpr int ATT_BAR_TILE = 1;
constexpr int ATT_BAR_SCHED = 2;

/// Two floats as a bf16 pair in one register (low half = `lo`).
__device__ __forceinline__ unsigned att_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

/// From list entry `si` on, the first non-empty segment of `g` (into `si`, `seg`); false when
/// there is none.
__device__ __forceinline__ bool att_next_segment(const BcAttentionParams& p, const BcAttnGroup& g, int& si,
                                                 BcKvSegment& seg) {
    for (; si < g.seg_count; ++si) {
        seg = p.segments[p.seg_index[g.seg_begin + si]];
        if (seg.tokens > 0) return true;
    }
    return false;
}

/// A key tile of a group's walk: list entry `si`, its segment `seg`, first key `k0`; `have`
/// false past the end; `left`: tiles of the block's range from this one on (the split's end;
/// INT_MAX without a split).
struct AttCursor {
    int si, k0;
    BcKvSegment seg;
    bool have;
    int left;
};

/// The first key tile of split `s` of `splits` of group `g`'s walk: the group's key tiles (BK
/// keys, never crossing a segment end) are numbered 0..n-1 in walk order and split s takes
/// [s n / splits, (s + 1) n / splits) (`left` tiles; `have` false when that is empty). One split:
/// the whole walk (`left` INT_MAX), without counting.
__device__ __forceinline__ AttCursor att_split_start(const BcAttentionParams& p, const BcAttnGroup& g, int bk, int s,
                                                     int splits) {
    AttCursor c{0, 0, BcKvSegment{}, false, 0x7fffffff};
    c.have = att_next_segment(p, g, c.si, c.seg);
    if (splits <= 1 || !c.have) return c;
    int n = 0;
    for (int i = c.si; i < g.seg_count; ++i) n += (p.segments[p.seg_index[g.seg_begin + i]].tokens + bk - 1) / bk;
    const int t0 = (int)((long long)s * n / splits), t1 = (int)((long long)(s + 1) * n / splits);
    c.left = t1 - t0;
    if (c.left <= 0) {
        c.have = false;
        return c;
    }
    for (int skip = t0;;) {  // (t0 < n: the walk reaches tile t0)
        const int nt = (c.seg.tokens + bk - 1) / bk;
        if (skip < nt) {
            c.k0 = skip * bk;
            return c;
        }
        skip -= nt;
        ++c.si;
        att_next_segment(p, g, c.si, c.seg);
    }
}

/// Block x of a launch of `splits` key splits (grid.x = row tiles x splits, split-major: the
/// blocks of one split of a head walk the same K/V range at the same time, as the row tiles of
/// an unsplit launch do): row tile `rt` = x % `tiles`, split x / `tiles`.
struct AttSplitBlock {
    int splits, tiles, split, rt;
    /// Where the block's partial result goes (att_store_partial's `slot`).
    __device__ __forceinline__ int slot(const BcAttentionParams& p) const {
        return ((blockIdx.z * tiles + rt) * p.heads + blockIdx.y) * splits + split;
    }
};
__device__ __forceinline__ AttSplitBlock att_split_block(const BcAttentionParams& p) {
    const int splits = p.splits, tiles = gridDim.x / splits;
    return AttSplitBlock{splits, tiles, (int)(blockIdx.x / tiles), (int)(blockIdx.x % tiles)};
}

/// The tile after `c` (BK keys on, or the next non-empty segment; none past the split's end).
__device__ __forceinline__ AttCursor att_advance(const BcAttentionParams& p, const BcAttnGroup& g, AttCursor c, int bk) {
    if (!c.have) return c;
    if (--c.left == 0) {
        c.have = false;
        return c;
    }
    c.k0 += bk;
    if (c.k0 >= c.seg.tokens) {
        ++c.si;
        c.k0 = 0;
        c.have = att_next_segment(p, g, c.si, c.seg);
    }
    return c;
}
}  // namespace

/// Shared-memory geometry of one variant and the per-lane addresses of its copies and
/// fragment loads. Every address in the loops is a 32-bit shared offset computed here once:
/// a per-thread base plus compile-time immediates.
template <class Cfg>
struct AttSmem {
    static constexpr int HDMAX = Cfg::HDMAX, BK = Cfg::BK, NT = Cfg::NT;
    static constexpr int ROWB = HDMAX * 2;        // bytes per row (of all column blocks)
    // Row stride and the stride of the 64-column (128-byte) blocks of a row: rows of ROWB
    // bytes, or (WG) each tile stored as HDMAX / 64 column blocks [rows][64] of 128-byte rows,
    // the K-major 128B-swizzle layout of wgmma (bc_wgmma_kmajor_offset; Q and K/V tiles have
    // BK rows each). The swizzle is chunk c ^ (row % 8) within each 128 bytes either way.
    static constexpr int RS = Cfg::WG ? 128 : ROWB;
    static constexpr int CB = Cfg::WG ? BK * 128 : 128;
    static constexpr int CPR = HDMAX / 8;         // 16-byte chunks per row
    static constexpr int CPT = CPR / 8;           // chunks per thread and row: c, c + 8, ...
    static constexpr int TILEB = BK * ROWB;       // one K or V tile
    static constexpr int STAGEB = 2 * TILEB;      // K + V
    static constexpr int RP = NT / 8;             // rows per copy pass of the block
    static_assert(RP % 8 == 0 && BK % RP == 0 && Cfg::BQ % RP == 0,
                  "a thread copies the same chunks of rows that agree mod 8 (one swizzle)");
    // Q rows: 64-row tiles QTS bytes apart (WG: Q's column blocks are CB apart like K's, since
    // one descriptor step walks both; with 64-key tiles each warpgroup's m64 tile is a K-tile-like
    // [HDMAX / 64 column blocks][64 rows][128 bytes], with 128-key tiles the 128 Q rows are one
    // such tile of 128 rows, warpgroup 1's rows 8 KB into each block; otherwise plain rows,
    // QTS = 64 RS).
    static constexpr int QTS = Cfg::WG ? (BK == 128 ? 64 * RS : 64 * ROWB) : 64 * RS;
    static_assert(!Cfg::WG || 64 % RP == 0, "a copy pass stays inside one 64-row Q tile");
    /// Offset of Q row `row` (a multiple of RP: the pass's first row) from the Q region.
    __host__ __device__ static constexpr int q_row(int row) { return (row / 64) * QTS + (row % 64) * RS; }
    // Copies: thread tid moves chunks c + 8k (c = tid % 8, k < CPT) of rows tid / 8 + i * RP;
    // since RP % 8 == 0 its swizzled chunk (c + 8k) ^ (row % 8) = (c ^ (row % 8)) + 8k is the
    // same in every pass: offset dst + CB k.
    int c;            // first source chunk
    int r;            // first row
    unsigned dst;     // shared offset of (row r, chunk c) in a tile
    // Fragments: offsets (in a stage) for ldmatrix of k-step / n-tile pair index q % 4; the
    // index q / 4 adds CB bytes (chunk bit 3 is never swizzled), the key block 16 * RS.
    unsigned k_at[4];  // K B fragments of Q K^T: keys 8 * (lane / 16) + lane % 8, chunks 2q, 2q + 1
    unsigned v_at[4];  // V B fragments of P V (.trans): keys lane % 16, head dim 16q
    __device__ __forceinline__ AttSmem(int tid, int lane) {
        c = tid % 8;
        r = tid / 8;
        dst = r * RS + ((c ^ (r & 7)) * 16);
        const int x = lane % 8;  // row % 8 of the lane's fragment row: the swizzle
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            // chunk (2q + b) ^ x = (2q) ^ (b ^ x) for b in {0, 1}
            k_at[q] = (8 * (lane / 16) + x) * RS + (((2 * q) ^ (((lane / 8) % 2) ^ x)) * 16);
            v_at[q] = TILEB + (lane % 16) * RS + (((2 * q) ^ ((lane / 16) ^ x)) * 16);
        }
    }
    /// Offset of the K fragment of k-step kk, key block jj (relative to the stage).
    __device__ __forceinline__ unsigned k_frag(int kk, int jj) const {
        return k_at[kk % 4] + (kk / 4) * CB + jj * 16 * RS;
    }
    /// Offset of the V fragment of key block kk, head-dim n-tile pair nn (relative to the stage).
    __device__ __forceinline__ unsigned v_frag(int kk, int nn) const {
        return v_at[nn % 4] + (nn / 4) * CB + kk * 16 * RS;
    }
    /// Offset of the Q A-fragment of k-step kk, m-tile mt (relative to the warp's Q rows):
    /// rows lane % 16, chunks 2kk + lane / 16, the same lane pattern as the V fragments.
    __device__ __forceinline__ unsigned q_frag(int kk, int mt) const {
        return v_at[kk % 4] - TILEB + (kk / 4) * CB + mt * 16 * RS;
    }
};

/// One key tile of one warp (32 query rows, two m-tiles): S = Q K^T, online softmax (base 2),
/// O += P V. MASK: the tile has kn < BK keys (the last tile of a segment); the others run
/// without any key test. Fragment loads are software-pipelined: the ldmatrix of step i + 1 is
/// issued before the mma of step i, and the first V fragment before the softmax. `qw`: the
/// warp's Q rows in shared memory (read when !QREG), `qf`: its Q fragments (QREG).
template <class Cfg>
__device__ __forceinline__ void att_softmax_pv(const AttSmem<Cfg>& sm, bc_saddr stage, float (*s)[Cfg::BK / 8][4],
                                               float (*o)[Cfg::HDMAX / 8][4], float (*m)[2], float (*l)[2],
                                               float qscale, bool mask, int kn, int t);

template <bool MASK, class Cfg>
__device__ __forceinline__ void att_tile(const AttSmem<Cfg>& sm, bc_saddr stage, bc_saddr qw,
                                         const unsigned (*qf)[Cfg::HDMAX / 16][4], float (*o)[Cfg::HDMAX / 8][4],
                                         float (*m)[2], float (*l)[2], float qscale, int kn, int t) {
    constexpr int ATT_MT = Cfg::MT;
    constexpr int BK = Cfg::BK;
    constexpr int KSTEPS = Cfg::HDMAX / 16;  // k16 steps of Q K^T = n-tile pairs of P V (head dim)
    constexpr int NS = BK / 8;               // n8 tiles of S (keys)
    constexpr int JB = BK / 16;              // 16-key blocks: K fragments per k-step, k-steps of P V
    constexpr int QK = KSTEPS * JB;          // ldmatrix steps
    // S = Q K^T: step i = (k-step i / JB, key block i % JB); each K fragment feeds 2 m-tiles x
    // 2 n-tiles. Without QREG the Q fragments of k-step kk are loaded with the K fragment of
    // the step before (kk, 0) into qa[kk % 2].
    float s[ATT_MT][NS][4];
#pragma unroll
    for (int mt = 0; mt < ATT_MT; ++mt)
#pragma unroll
        for (int j = 0; j < NS; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
    unsigned kb[2][4];
    unsigned qa[2][ATT_MT][4];
    if constexpr (!Cfg::QREG) {
#pragma unroll
        for (int mt = 0; mt < ATT_MT; ++mt) bc_ldmatrix_x4_at(qa[0][mt], qw + sm.q_frag(0, mt));
    }
    bc_ldmatrix_x4_at(kb[0], stage + sm.k_frag(0, 0));
#pragma unroll
    for (int i = 0; i < QK; ++i) {
        const int kk = i / JB, jj = i % JB;
        if (i + 1 < QK) {
            const int nk = (i + 1) / JB, nj = (i + 1) % JB;
            if constexpr (!Cfg::QREG) {
                if (nj == 0) {
#pragma unroll
                    for (int mt = 0; mt < ATT_MT; ++mt) bc_ldmatrix_x4_at(qa[nk % 2][mt], qw + sm.q_frag(nk, mt));
                }
            }
            bc_ldmatrix_x4_at(kb[(i + 1) % 2], stage + sm.k_frag(nk, nj));
        }
#pragma unroll
        for (int mt = 0; mt < ATT_MT; ++mt) {
            const unsigned* a = Cfg::QREG ? qf[mt][kk] : qa[kk % 2][mt];
            bc_mma_bf16_16816(s[mt][2 * jj], a, &kb[i % 2][0], s[mt][2 * jj]);
            bc_mma_bf16_16816(s[mt][2 * jj + 1], a, &kb[i % 2][2], s[mt][2 * jj + 1]);
        }
    }
    att_softmax_pv<Cfg>(sm, stage, s, o, m, l, qscale, MASK, kn, t);
}

/// Online softmax (base 2) of a key tile (per warp, Cfg::MT m-tiles): S becomes P in place, the
/// row maxima m and sums l are updated and O rescaled where a maximum grew. `MASK`: keys kn.. of
/// the tile are past the segment end (P = 0); a compile-time constant at every call (the
/// function is inlined into both copies of the tile code).
/// DEFER_O: O is not touched; the factors go to `alpha` (1 where no maximum grew) and the
/// return value says whether any grew (warp-uniform), for att_rescale_o later.
template <class Cfg, bool DEFER_O = false>
__device__ __forceinline__ bool att_softmax(float (*s)[Cfg::BK / 8][4], float (*o)[Cfg::HDMAX / 8][4], float (*m)[2],
                                            float (*l)[2], float qscale, bool MASK, int kn, int t,
                                            float (*alpha_o)[2] = nullptr) {
    constexpr int ATT_MT = Cfg::MT;
    constexpr int NS = Cfg::BK / 8;  // n8 tiles of S (keys)
    bool grew_any = false;
    // Online softmax (base 2) on the fragments: lane holds S[g][col], S[g+8][col] of each m-tile
    // for col = 8j + 2t, 8j + 2t + 1. qscale >= 0 (the kernel folds a negative scale into Q),
    // so the row max of S * qscale is qscale * (row max of S), and P = 2^(S * qscale - m) is one
    // FFMA and one MUFU.EX2. Every tile has a key in every row: the maxima are finite.
#pragma unroll
    for (int mt = 0; mt < ATT_MT; ++mt) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float v = MASK && 8 * j + 2 * t + (e & 1) >= kn ? -INFINITY : s[mt][j][e];
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        }
        float mn[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(BC_FULL_MASK, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(BC_FULL_MASK, mx[i], 2));
            mn[i] = fmaxf(m[mt][i], mx[i] * qscale);
        }
        // O and l are rescaled only when a row maximum of the m-tile grew (a warp-uniform
        // branch). Otherwise alpha = 2^0 = 1 for every row and skipping the multiplies changes
        // no bit; once the maxima settle, most tiles skip them (HDMAX / 2 FMUL per lane).
        const bool grew = __any_sync(BC_FULL_MASK, mn[0] > m[mt][0] || mn[1] > m[mt][1]);
        if (grew) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float alpha = bc_ex2(m[mt][i] - mn[i]);  // 0 on the first tile (m = -inf)
                l[mt][i] *= alpha;
                if constexpr (DEFER_O) {
                    alpha_o[mt][i] = alpha;
                } else {
#pragma unroll
                    for (int j = 0; j < Cfg::HDMAX / 8; ++j) {
                        o[mt][j][2 * i] *= alpha;
                        o[mt][j][2 * i + 1] *= alpha;
                    }
                }
            }
        } else if constexpr (DEFER_O) {
            alpha_o[mt][0] = alpha_o[mt][1] = 1.f;
        }
        grew_any |= grew;
        m[mt][0] = mn[0];
        m[mt][1] = mn[1];
#pragma unroll
        for (int j = 0; j < NS; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float pr = bc_ex2(fmaf(s[mt][j][e], qscale, -m[mt][e >> 1]));
                if (MASK && 8 * j + 2 * t + (e & 1) >= kn) pr = 0.f;
                s[mt][j][e] = pr;
                l[mt][e >> 1] += pr;
            }
        }
    }
    return grew_any;
}

/// O *= alpha per row (the rescale att_softmax<Cfg, true> deferred).
template <class Cfg>
__device__ __forceinline__ void att_rescale_o(float (*o)[Cfg::HDMAX / 8][4], float (*alpha)[2]) {
#pragma unroll
    for (int mt = 0; mt < Cfg::MT; ++mt)
#pragma unroll
        for (int j = 0; j < Cfg::HDMAX / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][j][e] *= alpha[mt][e >> 1];
}

/// P of key block kk (keys 16kk .. 16kk+15) of m-tile mt as the bf16 A fragment of an m16n8k16
/// (and of the warp's rows of a wgmma m64nNk16 with A from registers): accumulator n-tiles 2kk,
/// 2kk+1, rows g / g+8, columns 2t, 2t+1.
template <class Cfg>
__device__ __forceinline__ void att_p_frag(unsigned (&pa)[4], const float (*s)[Cfg::BK / 8][4], int mt, int kk) {
    pa[0] = att_pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
    pa[1] = att_pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
    pa[2] = att_pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
    pa[3] = att_pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
}

/// The end of a wgmma tile once P(t) V(t) has completed: O's deferred rescale where a row
/// maximum grew, then the next P's A fragments packed from the S accumulator `d`.
template <class Cfg>
__device__ __forceinline__ void att_wg_next_p(float (*o)[Cfg::HDMAX / 8][4], float (*alpha)[2], bool grew,
                                              unsigned (*pa)[4], const float* d) {
    if (grew) att_rescale_o<Cfg>(o, alpha);
#pragma unroll
    for (int kk = 0; kk < Cfg::BK / 16; ++kk)
        att_p_frag<Cfg>(pa[kk], reinterpret_cast<const float(*)[Cfg::BK / 8][4]>(d), 0, kk);
}

/// The rest of a key tile after S (per warp, Cfg::MT m-tiles): online softmax (base 2) and
/// O += P V (mma.sync). `mask`: as att_softmax.
template <class Cfg>
__device__ __forceinline__ void att_softmax_pv(const AttSmem<Cfg>& sm, bc_saddr stage, float (*s)[Cfg::BK / 8][4],
                                               float (*o)[Cfg::HDMAX / 8][4], float (*m)[2], float (*l)[2],
                                               float qscale, bool MASK, int kn, int t) {
    constexpr int ATT_MT = Cfg::MT;
    constexpr int KSTEPS = Cfg::HDMAX / 16;  // n-tile pairs of P V (head dim)
    constexpr int JB = Cfg::BK / 16;         // k-steps of P V
    constexpr int PV = JB * KSTEPS;          // ldmatrix steps
    unsigned vb[2][4];
    bc_ldmatrix_x4_trans_at(vb[0], stage + sm.v_frag(0, 0));
    att_softmax<Cfg>(s, o, m, l, qscale, MASK, kn, t);
    // O += P V: A fragment of key block kk = accumulator n-tiles 2kk, 2kk+1 as bf16; B fragments
    // of head-dim n-tiles 2nn, 2nn+1 via ldmatrix.x4.trans. Step i = (key block i / KSTEPS,
    // n-tile pair i % KSTEPS); each V fragment feeds 2 m-tiles x 2 n-tiles. Keys past kn have
    // P = 0 and zero-filled V rows.
    unsigned pa[JB][ATT_MT][4];
#pragma unroll
    for (int kk = 0; kk < JB; ++kk) {
#pragma unroll
        for (int mt = 0; mt < ATT_MT; ++mt) att_p_frag<Cfg>(pa[kk][mt], s, mt, kk);
    }
#pragma unroll
    for (int i = 0; i < PV; ++i) {
        const int kk = i / KSTEPS, nn = i % KSTEPS;
        if (i + 1 < PV) bc_ldmatrix_x4_trans_at(vb[(i + 1) % 2], stage + sm.v_frag((i + 1) / KSTEPS, (i + 1) % KSTEPS));
#pragma unroll
        for (int mt = 0; mt < ATT_MT; ++mt) {
            bc_mma_bf16_16816(o[mt][2 * nn], pa[kk][mt], &vb[i % 2][0], o[mt][2 * nn]);
            bc_mma_bf16_16816(o[mt][2 * nn + 1], pa[kk][mt], &vb[i % 2][2], o[mt][2 * nn + 1]);
        }
    }
}

#if BC_HAS_WGMMA
/// The wgmma products of one warpgroup (64 query rows, warp w: rows 16w..16w+15), issued
/// asynchronously (bc_attention_impl's WG loop waits for them):
///   S = Q K^T (att_wg_s): HDMAX / 16 x m64n64k16, A = Q, B = the K tile (K-major), both read
///     by descriptor from the 128B-swizzled column blocks (`dq` / `dk`: the k-step-0
///     descriptors; k-step s starts in column block s / 4, 32 (s % 4) bytes into its rows), one
///     commit group. The D fragment of warp w (register 4j + e: row g + 8 (e >> 1), key 8j + 2t +
///     (e & 1)) is the mma.sync C layout of the warp's m16 tile, so the softmax reads it as is.
///   O += P V (att_wg_pv): BK / 16 x m64nHDMAXk16 with A = P from registers (att_p_frag: the
///     register-A fragment of key block kk is the S accumulator's n-tiles 2kk, 2kk+1 as bf16) and
///     B = the V tile MN-major (imm-trans-b = 1: V is [keys][head_dim], head_dim contiguous; its
///     128B-swizzled 64-column blocks are the MN-major canonical layout with SBO 1024 between
///     8-key groups and LBO BK * 128 between column blocks; `dv`: key block 0's descriptor, key
///     block kk at + 2048 kk bytes). O's registers are the m64nHDMAX accumulator (register 4j + e:
///     row g + 8 (e >> 1), column 8j + 2t + (e & 1), the layout of o[0][j][e]). One commit group.
/// The caller issues wgmma.fence before the first of a batch (after O was rescaled / P or S read).
template <class Cfg>
__device__ __forceinline__ void att_wg_s(uint64_t dq, uint64_t dk, float (&d)[Cfg::BK / 2]) {
    constexpr int KSTEPS = Cfg::HDMAX / 16;
#pragma unroll
    for (int k = 0; k < KSTEPS; ++k) {
        // k-step k: column block 16k / 64 (BK * 128 bytes each), 32 (k % 4) bytes into its rows
        // (bc_wgmma_kmajor_desc; Q and K tiles have BK rows), in descriptor units of 16 bytes.
        constexpr int KB = Cfg::BK * 128 / 16;
        const uint64_t step = (uint64_t)((k / 4) * KB + 2 * (k % 4));
        bc_wgmma_ss<Cfg::BK>(d, dq + step, dk + step, k > 0);
    }
    bc_wgmma_commit();
}

template <class Cfg>
__device__ __forceinline__ void att_wg_pv(uint64_t dv, const unsigned (&pa)[Cfg::BK / 16][4],
                                          float (&of)[Cfg::HDMAX / 2]) {
#pragma unroll
    for (int kk = 0; kk < Cfg::BK / 16; ++kk) {
        // key block kk: two 8-key groups (SBO 1024 bytes each) on, in descriptor units of 16 bytes
        bc_wgmma_rs_nmajor<Cfg::HDMAX>(of, pa[kk], dv + (uint64_t)(kk * 2 * 1024 / 16), 1);
    }
    bc_wgmma_commit();
}

/// The online softmax of a landed S tile `d` (in place: S becomes P, as f32), the rescale of O
/// deferred (`alpha`, returned true when a row maximum grew: O is still an operand of the
/// previous tile's P V in flight). MASK: keys kn.. are past the segment end.
template <class Cfg, bool MASK>
__device__ __forceinline__ bool att_wg_softmax(float (&d)[Cfg::BK / 2], float (*o)[Cfg::HDMAX / 8][4], float (*m)[2],
                                               float (*l)[2], float (*alpha)[2], float qscale, int kn, int t) {
    float(*s)[Cfg::BK / 8][4] = reinterpret_cast<float(*)[Cfg::BK / 8][4]>(&d[0]);
    return att_softmax<Cfg, true>(s, o, m, l, qscale, MASK, kn, t, alpha);
}
#endif


/// The partial result of one split block (`slot` = ((group * row tiles + row tile) * heads + head)
/// * splits + split, BQ * (head_dim + 2) floats of p.partial each): un-normalised O [BQ][head_dim]
/// f32, then per row its maximum m (base 2, of S * scale: the running maximum of the online
/// softmax) and sum l; rows past the group end are not written (the combine does not read them).
/// A split without keys writes m = -inf, l = 0, O = 0. bc_attention_combine merges the splits.
template <class Cfg>
__device__ __forceinline__ void att_store_partial(const BcAttentionParams& p, const BcAttnGroup& grp,
                                                  const float (*o)[Cfg::HDMAX / 8][4], const float (*m)[2],
                                                  const float (*l)[2], int slot, int r0, int warp, int g, int t) {
    const int hd = p.head_dim;
    float* po = p.partial + (size_t)slot * (Cfg::BQ * (hd + 2));
    float* pml = po + Cfg::BQ * hd;
#pragma unroll
    for (int mt = 0; mt < Cfg::MT; ++mt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float li = l[mt][i];
            li += __shfl_xor_sync(BC_FULL_MASK, li, 1);
            li += __shfl_xor_sync(BC_FULL_MASK, li, 2);
            const int row = warp * Cfg::WM + 16 * mt + g + 8 * i;  // in the block's tile
            if (r0 + row < grp.q_rows) {
                float* out = po + (size_t)row * hd;
#pragma unroll
                for (int j = 0; j < Cfg::HDMAX / 8; ++j)
                    if (8 * j < hd) *reinterpret_cast<float2*>(out + 8 * j + 2 * t) = make_float2(o[mt][j][2 * i], o[mt][j][2 * i + 1]);
                if (t == 0) *reinterpret_cast<float2*>(pml + 2 * row) = make_float2(m[mt][i], li);
            }
        }
    }
}

template <class Cfg>
__device__ __forceinline__ void bc_attention_impl(const BcAttentionParams& p, unsigned char* smem_raw) {
    constexpr int HDMAX = Cfg::HDMAX, BK = Cfg::BK, ATT_BQ = Cfg::BQ, ATT_MT = Cfg::MT, ATT_WM = Cfg::WM;
    constexpr int KSTEPS = HDMAX / 16;
    constexpr int NO = HDMAX / 8;  // n8 tiles of O (head dim)
    using Sm = AttSmem<Cfg>;
    // smem: [stage][K, V][key][HDMAX] bf16, swizzled 16-byte chunks; Q at Cfg::Q_OFF.

    BC_EMU_CHECK(p.head_dim > 0 && p.head_dim <= HDMAX && p.head_dim % 8 == 0 && p.splits >= 1);
    const BcAttnGroup grp = p.groups[blockIdx.z];
    const AttSplitBlock sb = att_split_block(p);  // (row tile, split) of this block
    const int r0 = sb.rt * ATT_BQ;
    if (r0 >= grp.q_rows) return;  // uniform for the whole block
    const int hd = p.head_dim, cpr = hd / 8;
    const int h = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    // warp-uniform: the warp has a valid row (wgmma: warpgroup-uniform, the warpgroup's 64 rows
    // have one; every warp of an active warpgroup takes part)
    const bool active = Cfg::WG ? r0 + 64 * (warp / 4) < grp.q_rows : r0 + warp * ATT_WM < grp.q_rows;
    // wgmma: the tiles start on the first 1024-byte boundary of the shared window.
    unsigned char* smem = smem_raw;
#if BC_HAS_WGMMA
    if constexpr (Cfg::WG) {
        const unsigned w = bc_smem_window_addr(smem_raw);
        smem += (1024u - w % 1024u) % 1024u;
    }
#endif
    const bc_saddr base = bc_smem_addr(smem);
    const Sm sm(tid, lane);

    // 1. Q and the first K/V tile (stage 0), zero-filled past the ends.
    {
        const int rows = grp.q_rows - r0;
        const __nv_bfloat16* q = p.q + (size_t)(grp.q_begin + r0 + sm.r) * p.q_stride + h * hd + 8 * sm.c;
#pragma unroll
        for (int i = 0; i < ATT_BQ / Sm::RP; ++i) {
#pragma unroll
            for (int k = 0; k < Sm::CPT; ++k) {
                const bool ok = sm.c + 8 * k < cpr && sm.r + i * Sm::RP < rows;
                bc_cp_async16_zfill(base + Cfg::Q_OFF + sm.dst + Sm::q_row(i * Sm::RP) + Sm::CB * k,
                                    ok ? q + (size_t)i * Sm::RP * p.q_stride + 64 * k : p.q, ok ? 16 : 0);
            }
        }
    }
    auto load_kv = [&](int stage, const BcKvSegment& seg, int k0, bool do_k = true, bool do_v = true) {
        const int kn = min(BK, seg.tokens - k0);
        const size_t off0 = (size_t)(k0 + sm.r) * p.kv_stride + h * hd + 8 * sm.c;
        const bc_saddr dst = base + stage * Sm::STAGEB + sm.dst;
#pragma unroll
        for (int i = 0; i < BK / Sm::RP; ++i) {
#pragma unroll
            for (int k = 0; k < Sm::CPT; ++k) {
                const bool ok = sm.c + 8 * k < cpr && sm.r + i * Sm::RP < kn;
                const size_t off = ok ? off0 + (size_t)i * Sm::RP * p.kv_stride + 64 * k : 0;
                const bc_saddr d = dst + i * Sm::RP * Sm::RS + Sm::CB * k;
                if (do_k) bc_cp_async16_zfill(d, seg.k + off, ok ? 16 : 0);
                if (do_v) bc_cp_async16_zfill(d + Sm::TILEB, seg.v + off, ok ? 16 : 0);
            }
        }
    };
    const AttCursor c0 = att_split_start(p, grp, BK, sb.split, sb.splits);
    bool have = c0.have;
    if (have) load_kv(0, c0.seg, c0.k0);
    bc_cp_async_commit();
    // wgmma: tile 1 goes to stage 1 at once (the loop keeps two tiles in flight ahead).
    AttCursor c1 = c0;
    (void)c1;
    if constexpr (Cfg::WG) {
        c1 = att_advance(p, grp, c1, BK);
        // (PP: V runs one tile behind K, tile 1's V comes with tile 2's K)
        if (c1.have) load_kv(1, c1.seg, c1.k0, true, !Cfg::PP);
        bc_cp_async_commit();
        bc_cp_async_wait_group<1>();  // Q and tile 0
    } else {
        bc_cp_async_wait_all();
    }

    // A negative scale is folded into Q (sign flip of this thread's own Q chunks, exact) so
    // that the softmax sees qscale >= 0.
    float qscale = p.scale * 1.4426950408889634f;  // softmax in base 2
    const unsigned qsign = qscale < 0.f ? 0x80008000u : 0u;
    qscale = fabsf(qscale);
    if (qsign) {
#pragma unroll
        for (int i = 0; i < ATT_BQ / Sm::RP; ++i) {
#pragma unroll
            for (int k = 0; k < Sm::CPT; ++k) {
                unsigned* w = reinterpret_cast<unsigned*>(smem + Cfg::Q_OFF + sm.dst + Sm::q_row(i * Sm::RP) + Sm::CB * k);
#pragma unroll
                for (int e = 0; e < 4; ++e) w[e] ^= qsign;
            }
        }
    }
#if BC_HAS_WGMMA
    if constexpr (Cfg::WG) bc_fence_proxy_async();  // Q (cp.async, sign flip) -> wgmma's reads
#endif
    __syncthreads();

    // The warp's Q rows: kept in shared memory (read per k-step), or as A fragments in registers
    // (QREG; matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 of each m-tile).
    const bc_saddr qw = base + Cfg::Q_OFF + warp * ATT_WM * Sm::RS;
    unsigned qf[ATT_MT][KSTEPS][4];
    if constexpr (Cfg::QREG) {
#pragma unroll
        for (int mt = 0; mt < ATT_MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) bc_ldmatrix_x4_at(qf[mt][kk], qw + sm.q_frag(kk, mt));
        __syncthreads();  // stage 1 is free for the prefetch of tile 1
    }

    float o[ATT_MT][NO][4];
#pragma unroll
    for (int mt = 0; mt < ATT_MT; ++mt)
#pragma unroll
        for (int j = 0; j < NO; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    // Per m-tile: rows g, g+8.
    float m[ATT_MT][2], l[ATT_MT][2];
#pragma unroll
    for (int mt = 0; mt < ATT_MT; ++mt) {
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.f;
    }

    // wgmma: descriptors of k-step 0 of the warpgroup's Q tile (64 rows) and of stage 0's K
    // tile (128B swizzle, 8-row groups 1024 bytes apart); stage 1's is STAGEB bytes on.
    // The V tile's (MN-major B of P V: BK keys x HDMAX) likewise, TILEB bytes after K.
    uint64_t dq = 0, dk0 = 0, dv0 = 0;
    float d[Cfg::WG ? BK / 2 : 1];
#if BC_HAS_WGMMA
    if constexpr (Cfg::WG) {
        const unsigned w = bc_smem_window_addr(smem);
        dq = bc_wgmma_kmajor_desc(w + Cfg::Q_OFF + (warp / 4) * Sm::QTS, BC_WGMMA_SWIZZLE_128B, 64, HDMAX, 0);
        dk0 = bc_wgmma_kmajor_desc(w, BC_WGMMA_SWIZZLE_128B, BK, HDMAX, 0);
        dv0 = bc_wgmma_mnmajor_desc(w + Sm::TILEB, BC_WGMMA_SWIZZLE_128B, BK, HDMAX, 0);
#pragma unroll
        for (int i = 0; i < BK / 2; ++i) d[i] = 0.f;
    }
#endif
    (void)dq, (void)dk0, (void)dv0, (void)d;

    // 2. Key tiles.
#if BC_HAS_WGMMA
    if constexpr (Cfg::WG) {
        // Three stages; per tile t (its P in pa, S(t) done): refill the stage of tile t-1 with
        // tile t+2, wait for tile t+1, then issue S(t+1) = Q K(t+1)^T and O += P(t) V(t) as two
        // commit groups; wait_group 1 lands S(t+1), whose softmax runs while P V(t) is still in
        // flight (O untouched: its rescale is deferred), wait_group 0, rescale O, pack P(t+1).
        // Block-uniform: the tile walk; warpgroup-uniform: active.
        float(&of)[HDMAX / 2] = *reinterpret_cast<float(*)[HDMAX / 2]>(&o[0][0][0]);
        unsigned pa[BK / 16][4];
        float alpha[1][2];
        constexpr uint64_t SB = Sm::STAGEB >> 4;  // a stage, in descriptor units
        // (PP: an inactive warpgroup runs the products too, so its P is defined: see the PP loop)
        if ((active || Cfg::PP) && have) {
            bc_wgmma_fence_operand(d);
            bc_wgmma_fence();
            att_wg_s<Cfg>(dq, dk0, d);
            bc_wgmma_wait<0>();
            bc_wgmma_fence_operand(d);
            const int kn = min(BK, c0.seg.tokens - c0.k0);
            const bool grew = kn == BK ? att_wg_softmax<Cfg, false>(d, o, m, l, alpha, qscale, kn, t)
                                       : att_wg_softmax<Cfg, true>(d, o, m, l, alpha, qscale, kn, t);
            att_wg_next_p<Cfg>(o, alpha, grew, pa, d);
        }
        if constexpr (Cfg::PP) {
            // Ping-pong (two warpgroups, no block-wide barrier in the loop). Per tile t, warpgroup
            // j: A. bar.sync SCHED + j (the other warpgroup has issued its wgmma: they reach the
            // tensor cores in turns), B. issue S(t+1) and P(t) V(t), C. bar.arrive SCHED + 1 - j
            // (the other may issue), D. wait_group 1, softmax of S(t+1) (deferred rescale),
            // wait_group 0, rescale O, pack P(t+1). Warpgroup 0's D overlaps warpgroup 1's
            // mma and the other way round. Warpgroup 1 arrives once at SCHED + 0 before the
            // loop (warpgroup 0 goes first), and warpgroup 0 waits once more after it (every
            // arrival is waited for). Both warpgroups run it whether or not their rows are active.
            // K/V: V runs one tile behind K (the stage of tile j holds K(j) and V(j), filled at
            // different times). refill() = R(j): wait for this thread's copies of K(j+1), V(j)
            // (issued by R(j-1)), fence.proxy.async, bar.sync TILE (everyone's have landed), then
            // copy K(j+2) into the stage of K(j-1) and V(j+1) into the stage of V(j-2). R(0) before
            // the loop; R(t+1) in tile t, warpgroup 0 after D(t), warpgroup 1 between C(t) and
            // D(t): both warpgroups are then past D(t-1), which waited for S(t) (the last reader of
            // K(t) = K(j-1)) and P(t-1) V(t-1) (V(j-2)); and B(t+1) of either warpgroup comes after
            // R(t+1), so K(t+2) and V(t+1) have landed for it.
            const int wg = warp / 4;
            AttCursor kc = att_advance(p, grp, c1, BK), vc = c1;  // the next K tile (2) and V tile (1)
            int kst = 2, vst = 1;                                 // their stages
            auto refill = [&]() {
                bc_cp_async_wait_group<0>();
                bc_fence_proxy_async();
                bc_bar_sync(ATT_BAR_TILE, Cfg::NT);
                if (kc.have) load_kv(kst, kc.seg, kc.k0, true, false);
                if (vc.have) load_kv(vst, vc.seg, vc.k0, false, true);
                bc_cp_async_commit();
                vc = kc;
                kc = att_advance(p, grp, kc, BK);
                vst = kst;
                kst = kst == 2 ? 0 : kst + 1;
            };
            if (have) {
                if (wg == 1) bc_bar_arrive(ATT_BAR_SCHED, Cfg::NT);
                refill();
            }
            int st = 0;  // stage of tile t
            // (every warpgroup computes, active or not: rows past the group end have zero Q, and
            // a wgmma or its wait under a condition makes ptxas serialize them, C7518 / C7520)
            for (AttCursor c = c0; c.have;) {
                const int st1 = st == 2 ? 0 : st + 1;
                bc_bar_sync(ATT_BAR_SCHED + wg, Cfg::NT);
                bc_wgmma_fence_operand(of);
                bc_wgmma_fence_operand(d);
                bc_wgmma_fence();
                att_wg_s<Cfg>(dq, dk0 + st1 * SB, d);  // (past the last tile: discarded)
                att_wg_pv<Cfg>(dv0 + st * SB, pa, of);
                bc_bar_arrive(ATT_BAR_SCHED + 1 - wg, Cfg::NT);
                if (wg == 1 && c1.have) refill();
                bc_wgmma_wait<1>();  // S(t+1); P(t) V(t) may still run
                bc_wgmma_fence_operand(d);
                bool grew = false;
                if (c1.have) {
                    const int kn = min(BK, c1.seg.tokens - c1.k0);
                    grew = kn == BK ? att_wg_softmax<Cfg, false>(d, o, m, l, alpha, qscale, kn, t)
                                    : att_wg_softmax<Cfg, true>(d, o, m, l, alpha, qscale, kn, t);
                }
                bc_wgmma_wait<0>();  // P(t) V(t): O and pa are free
                bc_wgmma_fence_operand(of);
                att_wg_next_p<Cfg>(o, alpha, grew, pa, d);
                if (wg == 0 && c1.have) refill();
                c = c1;
                c1 = att_advance(p, grp, c1, BK);
                st = st1;
            }
            // Warpgroup 1 arrived after its last tile too: warpgroup 0 takes that phase.
            if (have && wg == 0) bc_bar_sync(ATT_BAR_SCHED, Cfg::NT);
        } else {
            int st = 0;  // stage of tile t
            for (AttCursor c = c0; c.have;) {
                const AttCursor c2 = att_advance(p, grp, c1, BK);
                __syncthreads();  // every warpgroup is done with tile t-1: its stage takes tile t+2
                const int st1 = st == 2 ? 0 : st + 1, st2 = st1 == 2 ? 0 : st1 + 1;
                if (c2.have) load_kv(st2, c2.seg, c2.k0);
                bc_cp_async_commit();
                bc_cp_async_wait_group<1>();  // tile t+1 has landed (this thread's copies) ...
                bc_fence_proxy_async();       // (visible to wgmma's async proxy)
                __syncthreads();              // ... and everyone's
                if (active) {
                    bc_wgmma_fence_operand(of);
                    bc_wgmma_fence_operand(d);
                    bc_wgmma_fence();  // O rescaled, P packed, S read: before the mma use them
                    // S(t+1) is issued even past the last tile (a discarded product of whatever stage
                    // st1 holds): a wgmma under a condition makes ptxas serialize every wgmma of the
                    // kernel (C7520, "compiler-inserted WG.AR in divergent path").
                    att_wg_s<Cfg>(dq, dk0 + st1 * SB, d);
                    att_wg_pv<Cfg>(dv0 + st * SB, pa, of);
                    bc_wgmma_wait<1>();  // S(t+1); P(t) V(t) may still run
                    bc_wgmma_fence_operand(d);
                    bool grew = false;
                    if (c1.have) {
                        const int kn = min(BK, c1.seg.tokens - c1.k0);
                        grew = kn == BK ? att_wg_softmax<Cfg, false>(d, o, m, l, alpha, qscale, kn, t)
                                        : att_wg_softmax<Cfg, true>(d, o, m, l, alpha, qscale, kn, t);
                    }
                    bc_wgmma_wait<0>();  // P(t) V(t): O and pa are free
                    bc_wgmma_fence_operand(of);
                    att_wg_next_p<Cfg>(o, alpha, grew, pa, d);
                }
                c = c1;
                c1 = c2;
                st = st1;
            }
        }
        have = false;  // (the generic loop below is the mma.sync kernels')
    }
#endif
    int st = 0;
    for (AttCursor c = c0, n; have; c = n) {
        const int kn = min(BK, c.seg.tokens - c.k0);
        n = att_advance(p, grp, c, BK);
        if (n.have) load_kv(st ^ 1, n.seg, n.k0);
        bc_cp_async_commit();
        bc_cp_async_wait_group<1>();  // the current tile has landed (this thread's copies) ...
#if BC_HAS_WGMMA
        if constexpr (Cfg::WG) bc_fence_proxy_async();  // (visible to wgmma's async proxy)
#endif
        __syncthreads();              // ... and everyone's

        if (active) {
            const bc_saddr stage = base + st * Sm::STAGEB;
            if constexpr (!Cfg::WG) {
                if (kn == BK)
                    att_tile<false, Cfg>(sm, stage, qw, qf, o, m, l, qscale, kn, t);
                else
                    att_tile<true, Cfg>(sm, stage, qw, qf, o, m, l, qscale, kn, t);
            }
        }
        __syncthreads();  // stage st is consumed before the next iteration refills it
        have = n.have;
        st ^= 1;
    }

    // 3. Normalise and store; with splits, the block's partial result instead (att_store_partial).
    if (!active) return;
    if (sb.splits > 1) {
        att_store_partial<Cfg>(p, grp, o, m, l, sb.slot(p), r0, warp, g, t);
        return;
    }
#pragma unroll
    for (int mt = 0; mt < ATT_MT; ++mt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float li = l[mt][i];
            li += __shfl_xor_sync(BC_FULL_MASK, li, 1);
            li += __shfl_xor_sync(BC_FULL_MASK, li, 2);
            const float inv = li > 0.f ? 1.f / li : 0.f;
            const int row = r0 + warp * ATT_WM + 16 * mt + g + 8 * i;
            if (row < grp.q_rows) {
                __nv_bfloat16* out = p.out + (size_t)(grp.q_begin + row) * p.out_stride + h * hd;
#pragma unroll
                for (int j = 0; j < NO; ++j)
                    if (8 * j < hd) bc_store_bf162(out + 8 * j + 2 * t, o[mt][j][2 * i] * inv, o[mt][j][2 * i + 1] * inv);
            }
        }
    }
}

#ifndef BC_ATTENTION_HELPERS_ONLY
// 64 query rows per block (2 warps; hd64: static shared memory; hd128: dynamic,
// BC_ATTN_HD128_SMEM bytes: the launcher sets the kernel's dynamic limit once after loading
// the module).
extern "C" __global__ void __launch_bounds__(AttHd64::NT, 4) bc_attention_hd64(BcAttentionParams p) {
    __shared__ __align__(128) unsigned char smem[AttHd64::SMEM_BYTES];
    bc_attention_impl<AttHd64>(p, smem);
}
BC_EMU_ENTRY(bc_attention_hd64, BcAttentionParams)

extern "C" __global__ void __launch_bounds__(AttHd128::NT, 4) bc_attention_hd128(BcAttentionParams p) {
    BC_DYNAMIC_SMEM(smem, AttHd128::SMEM_BYTES);
    bc_attention_impl<AttHd128>(p, smem);
}
BC_EMU_ENTRY(bc_attention_hd128, BcAttentionParams)

// 128 query rows per block (4 warps; hd128: BC_ATTN_WIDE_HD128_SMEM bytes, over the 48 KB
// static limit).
extern "C" __global__ void __launch_bounds__(AttHd64Wide::NT, 2) bc_attention_hd64_q128(BcAttentionParams p) {
    __shared__ __align__(128) unsigned char smem[AttHd64Wide::SMEM_BYTES];
    bc_attention_impl<AttHd64Wide>(p, smem);
}
BC_EMU_ENTRY(bc_attention_hd64_q128, BcAttentionParams)

extern "C" __global__ void __launch_bounds__(AttHd128Wide::NT, 2) bc_attention_hd128_q128(BcAttentionParams p) {
    BC_DYNAMIC_SMEM(smem, AttHd128Wide::SMEM_BYTES);
    bc_attention_impl<AttHd128Wide>(p, smem);
}
BC_EMU_ENTRY(bc_attention_hd128_q128, BcAttentionParams)

// The Hopper wgmma prototype (sm_90a; the sm_80 cubin and the compute_80 PTX trap): hd64, one
// warpgroup of 64 query rows per block, S = Q K^T by wgmma, softmax and P V as the kernels
// above. Off by default: the backend launches it only on sm_90 with BC_ATTN_WGMMA=1.
extern "C" __global__ void __launch_bounds__(AttWgHd64::NT, 2) bc_attention_wgmma_hd64(BcAttentionParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, AttWgHd64::SMEM_BYTES);
    bc_attention_impl<AttWgHd64>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_attention_wgmma_hd64, BcAttentionParams)

// The same for head_dim <= 128 (Wan's 12 x 128): two warpgroups per block (128 query rows,
// each warpgroup its own m64 tile; the K/V tiles are shared, so a block moves half the K/V bytes
// per FLOP of one warpgroup), 8 wgmma k-steps per key tile (two 64-column blocks of the Q and K
// tiles), O 64 f32 registers per thread, BC_ATTN_WGMMA_HD128_SMEM bytes.
extern "C" __global__ void __launch_bounds__(AttWgHd128::NT, 1) bc_attention_wgmma_hd128(BcAttentionParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, AttWgHd128::SMEM_BYTES);
    bc_attention_impl<AttWgHd128>(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_attention_wgmma_hd128, BcAttentionParams)

// Variants of bc_attention_wgmma_hd128 (same launch: 256 threads, 128 query rows per block;
// opt-in through BC_ATTN_WGMMA_VARIANT, docs/wgmma.md):
//   _k128     128-key tiles: S = Q K^T m64n128k16 (64 f32 registers per thread), P V 8 x
//             m64n128k16 per tile; 3 stages of 64 KB (BC_ATTN_WGMMA_K128_SMEM).
//   _pp       ping-pong: the two warpgroups take turns issuing their wgmma (named barriers), so
//             one's softmax runs while the other's products do; 64-key tiles.
//   _pp_k128  both.
#define BC_ATT_WG_KERNEL(name, Cfg)                                                     \
    extern "C" __global__ void __launch_bounds__(Cfg::NT, 1) name(BcAttentionParams p) { \
        BC_ATT_WG_BODY(Cfg)                                                             \
    }                                                                                   \
    BC_EMU_ENTRY(name, BcAttentionParams)
#if BC_HAS_WGMMA
#define BC_ATT_WG_BODY(Cfg)                   \
    BC_DYNAMIC_SMEM(smem, Cfg::SMEM_BYTES);   \
    bc_attention_impl<Cfg>(p, smem);
#else
#define BC_ATT_WG_BODY(Cfg) __trap();
#endif
BC_ATT_WG_KERNEL(bc_attention_wgmma_hd128_k128, AttWgHd128K128)
BC_ATT_WG_KERNEL(bc_attention_wgmma_hd128_pp, AttWgHd128Pp)
BC_ATT_WG_KERNEL(bc_attention_wgmma_hd128_pp_k128, AttWgHd128PpK128)
#undef BC_ATT_WG_KERNEL
#undef BC_ATT_WG_BODY

// Split-KV combine (BcAttnCombineParams): one block per (row tile, head, group) of the attention
// launch it follows; thread i takes 4 consecutive columns of a row (head_dim / 4 threads per row,
// rows strided by the block). Per row: M = max over the splits of m (base 2), weights
// w_s = 2^(m_s - M) (0 for a split without keys, m_s = -inf), out = sum w_s O_s / sum w_s l_s.
extern "C" __global__ void __launch_bounds__(BC_ATTN_COMBINE_THREADS) bc_attention_combine(BcAttnCombineParams p) {
    BC_EMU_CHECK(p.splits >= 1 && p.head_dim > 0 && p.head_dim % 8 == 0 && p.rows > 0);
    const BcAttnGroup grp = p.groups[blockIdx.z];
    const int r0 = blockIdx.x * p.rows;
    const int rows = min(p.rows, grp.q_rows - r0);
    if (rows <= 0) return;
    const int hd = p.head_dim, c4 = hd / 4, S = p.splits;
    const size_t slot = (size_t)p.rows * (hd + 2);
    const float* base = p.partial + ((size_t)(blockIdx.z * gridDim.x + blockIdx.x) * p.heads + blockIdx.y) * S * slot;
    const float* ml = base + (size_t)p.rows * hd;
    for (int idx = threadIdx.x; idx < rows * c4; idx += blockDim.x) {
        const int r = idx / c4, c = idx % c4;
        float mx = -INFINITY;
        for (int s = 0; s < S; ++s) mx = fmaxf(mx, ml[s * slot + 2 * r]);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        float sum = 0.f;
        if (mx > -INFINITY) {
            for (int s = 0; s < S; ++s) {
                const float2 st = *reinterpret_cast<const float2*>(ml + s * slot + 2 * r);
                const float w = exp2f(st.x - mx);  // 0 for a split without keys (m = -inf)
                const float4 v = *reinterpret_cast<const float4*>(base + s * slot + (size_t)r * hd + 4 * c);
                sum += w * st.y;
                acc.x += w * v.x;
                acc.y += w * v.y;
                acc.z += w * v.z;
                acc.w += w * v.w;
            }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        __nv_bfloat16* out = p.out + (size_t)(grp.q_begin + r0 + r) * p.out_stride + blockIdx.y * hd + 4 * c;
        bc_store_bf162(out, acc.x * inv, acc.y * inv);
        bc_store_bf162(out + 2, acc.z * inv, acc.w * inv);
    }
}
BC_EMU_ENTRY(bc_attention_combine, BcAttnCombineParams)
#endif  // BC_ATTENTION_HELPERS_ONLY
#endif  // BC_ATTENTION_CU
