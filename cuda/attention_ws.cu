// Warp-specialized Hopper flash attention, head_dim <= 128 (sm_90a; the sm_80 cubin traps):
// `bc_attention_wgmma_hd128_ws`, the same computation, parameters and outputs as
// `bc_attention_wgmma_hd128_pp_k128` (cuda/attention.cu):
//
//   out[n, h] = softmax(q[n, h] . K[:, h]^T * scale) . V[:, h]
//
// over the K/V segments listed for n's group (BcAttentionParams: segments, seg_index, groups;
// a group without keys gets zeros), bf16 in/out, f32 accumulation. Layout as attention.cu says:
// q/out [nq, stride] bf16, head h at columns h*head_dim, segment rows of kv_stride elements;
// head_dim a multiple of 8, <= 128; pointers 16-byte aligned, strides multiples of 8.
//
// What differs from pp_k128 is who does what. There, the 256 math threads also issue the
// cp.async copies of every K/V tile (16 per thread per tile, their addresses computed in the
// loop) and walk the segment list, and a MEMBAR + all-thread named barrier per tile makes the
// copies visible to wgmma, which couples the two warpgroups. Here (FlashAttention-3's split):
//   warpgroup 0, the producer (WS_PRODUCER_REGS registers after setmaxnreg.dec): walks the
//     group's segments and key tiles exactly as the other kernels do (a tile never crosses a
//     segment end; the last tile of a segment has kn < BK keys, its other rows zero-filled by
//     cp.async src-size 0; with split-KV only the block's split of them, att_split_start: an
//     empty split publishes the end marker at once) and copies tile j into stage
//     s = j % WS_STAGES: waits empty[s]
//     (the consumers are done with the tile that was there), writes the tile's key count kn
//     into a small shared ring next to the barriers (ring[s]), issues its share of the tile's
//     16-byte cp.async chunks (Q too with tile 0), commits a group; when the group has landed
//     (cp.async.wait_group), flips the sign of its Q chunks for a negative scale (tile 0), then
//     fence.proxy.async (its generic-proxy writes -> visible to wgmma's async proxy) and
//     mbarrier.arrive on full[s] (count: the 128 producer threads; the arrive releases the
//     copies and the ring entry). After the last tile it publishes one more stage with kn = 0,
//     the end marker. The first tiles need no empty wait: tile j-1 is published after tile j
//     is issued (two in flight). From tile WS_STAGES - 1 on, each tile is published as soon as
//     it lands, before the producer waits for the next stage: the consumers free tile t only
//     after tile t+1 is full (they issue S(t+1) with P(t) V(t)), so tile j+1's stage (that of
//     j-2) frees about when the consumers need tile j: publishing j only after issuing j+1
//     (wait_group 1) would hold it behind that wait, and only after issuing j+2 (wait_group
//     WS_STAGES - 1, the usual depth) deadlocks.
//   warpgroups 1 and 2, the consumers (WS_CONSUMER_REGS registers after setmaxnreg.inc),
//     64 query rows each: exactly the pp_k128 consumer math (the same wgmma sequence, softmax,
//     order of operations, and the same named-barrier ping-pong between the two warpgroups),
//     with the tile facts from the ring instead of their own segment walk: per tile t (stage
//     st), wait full[st+1] (tile t+1, or the end marker), read its kn, issue S(t+1) and
//     P(t) V(t), wait_group 1, softmax of S(t+1) (deferred O rescale), wait_group 0: every wgmma
//     that read stage st has completed, so each consumer warp's lane 0 arrives on empty[st]
//     (count: the 8 consumer warps, after a __syncwarp orders its lanes' ring reads), rescale
//     O, pack P(t+1). No all-thread barrier in the loop; the producer never waits for a
//     consumer except through empty[]. Then pp_k128's store, or with splits its partial store
//     (att_store_partial: the same slot and layout; a split without tiles stores m = -inf,
//     l = 0, O = 0) for bc_attention_combine.
// So the same inputs give the bits of pp_k128 (and of _k128), split or not (the same partials):
// tests/kernels_emu.rs checks it.
//
// `bc_attention_wgmma_hd128_ws_deep` (ws_kernel<true>, docs/wgmma.md "Deeper producer
// pipelining") is the same kernel with a deeper producer pipeline: per tile after the first, the
// producer waits empty[s], issues the copies and hands them to full[s] with
// cp.async.mbarrier.arrive.noinc (the arrive-on happens when they have landed), then thread 0
// writes ring[s] and releases it with a plain mbarrier.arrive (full[s] counts WS_WG + 1), and it
// goes on without any cp.async.wait_group: up to WS_STAGES tiles in flight, bounded by empty[]
// alone. Tile 0 (with Q) is published as above: the producer must see Q land to flip its sign.
// The consumers add fence.proxy.async after each full[] wait: no producer instruction runs after
// the copies land, so the reader orders them for wgmma's async proxy.
// Phases: the k-th use of stage s (tiles s, s + WS_STAGES, ...) is phase k of full[s] and of
// empty[s]; waits use parity k & 1 (the producer skips its first WS_STAGES waits).
//
// Shared memory (the pp_k128 layout, so the consumers' descriptors are unchanged): WS_STAGES
// stages of K, V tiles [BK keys][128] as two 64-column blocks of 128-byte rows (16-byte chunk
// c of row r at c ^ (r % 8): the 128B wgmma swizzle), then Q (128 rows, one 128-row tile of two
// 64-column blocks, warpgroup w's rows 8 KB into each), then full[WS_STAGES],
// empty[WS_STAGES] (mbarriers) and ring[WS_STAGES] (int), all after 1024 bytes of slack that
// align the tiles to the swizzle period. BC_ATTN_WS_SMEM bytes in all.
//
// Checked by tests/kernels_emu.rs under the SIMT emulation (cuda/emu: emulated cp.async,
// mbarrier, named barriers, wgmma, setmaxnreg with the block's register pool): every attention case of the
// wgmma variants (segments, masked last tiles, ragged groups of 1-130 rows, empty groups and
// segments, strides, negative / zero scales, large logits, 512-key cross-attention) against the
// CPU and for the bits of the _k128 kernel (= pp_k128); split-KV (S = 2, 3, 5, 7, empty splits)
// for pp_k128's partial and combined bits. Speed and the real register split only
// on a GPU (tests/cuda.rs, benches/gpu.rs).
#include "include/barrier.cuh"
#include "include/mma.cuh"
#include "include/tma.cuh"
#include "include/wgmma.cuh"
// The pp_k128 helpers (AttCfg, AttSmem, att_wg_s / att_wg_pv / att_wg_softmax, the segment walk):
// the nvcc build is one translation unit in which attention.cu came first (its guard makes this
// a no-op); the emulation compiles each .cu alone and takes only the helpers.
#ifdef BC_EMU
#define BC_ATTENTION_HELPERS_ONLY
#endif
#include "attention.cu"

namespace {
// Thread layout: warpgroup 0 produces, warpgroups 1..WS_CONSUMERS consume.
constexpr int WS_NT = BC_ATTN_WS_THREADS;
constexpr int WS_WG = 128;                       // threads per warpgroup
constexpr int WS_CONSUMERS = WS_NT / WS_WG - 1;  // consumer warpgroups (64 query rows each)
constexpr int WS_CONSUMER_NT = WS_CONSUMERS * WS_WG;
// Registers per thread after setmaxnreg. The block's pool is what the launch allocated:
// __launch_bounds__(384, 1) gives every thread 65536 / 384 = 170, rounded down to the allocation
// granularity of 8: 168, i.e. 64512 registers; setmaxnreg.inc blocks until the pool has the
// registers it asks for, so the new counts must fit in those (not in the 65536 of the SM).
constexpr int WS_LAUNCH_REGS = (65536 / WS_NT) / 8 * 8;
constexpr int WS_PRODUCER_REGS = 40;
constexpr int WS_CONSUMER_REGS = 232;
static_assert(WS_WG * WS_PRODUCER_REGS + WS_CONSUMER_NT * WS_CONSUMER_REGS <= WS_NT * WS_LAUNCH_REGS,
              "setmaxnreg: the roles' registers must fit in the block's launch allocation");
// Tiles: the pp_k128 configuration (two warpgroups of 64 rows, 128-key tiles, 3 stages).
using WsCfg = AttWgHd128PpK128;
using WsSm = AttSmem<WsCfg>;
constexpr int WS_BK = WsCfg::BK;
constexpr int WS_HD = WsCfg::HDMAX;
constexpr int WS_STAGES = WsCfg::STAGES;
static_assert(WsCfg::BQ == WS_CONSUMERS * 64 && WsCfg::NT == WS_CONSUMER_NT && WS_STAGES >= 2,
              "one consumer warpgroup per m64 tile of the pp_k128 configuration");
// Producer copies: thread pt moves 16-byte chunks c, c + 8 (c = pt % 8) of rows pt / 8 + 16 i;
// rows of one thread agree mod 8, so chunk c's swizzled place c ^ (row % 8) is one offset.
constexpr int WS_RP = WS_WG / 8;  // rows per copy pass
static_assert(WsSm::RS == 128 && WsSm::CB == WS_BK * 128 && WsSm::CPT == 2 && WS_BK % WS_RP == 0 &&
                  WsCfg::BQ % WS_RP == 0 && 64 % WS_RP == 0 && WS_RP % 8 == 0,
              "the producer's copies assume the pp_k128 tile layout");
// Barriers and the key-count ring after Q.
constexpr int WS_BAR_OFF = WsCfg::Q_OFF + WsCfg::BQ * WS_HD * 2;
constexpr int WS_RING_OFF = WS_BAR_OFF + 2 * WS_STAGES * 8;
static_assert(WS_BAR_OFF % 8 == 0 && WS_RING_OFF + WS_STAGES * 4 <= WS_BAR_OFF + 64 &&
                  WS_BAR_OFF + 64 + WsCfg::ALIGN == BC_ATTN_WS_SMEM,
              "params.h: BC_ATTN_WS_SMEM");
// Named barriers of the consumers' ping-pong (0 is __syncthreads'): WS_BAR_SCHED + w, consumer
// warpgroup w may issue its wgmma.
constexpr int WS_BAR_SCHED = 1;
}  // namespace

#if BC_HAS_WGMMA
/// The producer warpgroup (thread pt = 0..127): Q, then every key tile of the block's split of
/// the group's walk, then the end marker, as the header says. DEEP (`_ws_deep`): tiles after
/// the first are handed to full[s] by cp.async.mbarrier.arrive.noinc, no wait_group.
template <bool DEEP>
__device__ __forceinline__ void ws_producer(const BcAttentionParams& p, const BcAttnGroup& grp, AttSplitBlock sb,
                                            int r0, unsigned char* smem, bc_saddr base, uint64_t* full,
                                            uint64_t* empty, int* ring, int pt) {
    const int hd = p.head_dim, cpr = hd / 8, h = blockIdx.y;
    const int c = pt % 8, r = pt / 8;
    const bc_saddr dst = base + r * WsSm::RS + ((c ^ (r & 7)) * 16);  // (row r, chunk c) of a tile
    const float qscale = p.scale * 1.4426950408889634f;
    const unsigned qsign = qscale < 0.f ? 0x80008000u : 0u;
    // Tile j's K and V (kn keys from k0 of seg) into stage s.
    auto load_kv = [&](int s, const BcKvSegment& seg, int k0, int kn) {
        const size_t off0 = (size_t)(k0 + r) * p.kv_stride + h * hd + 8 * c;
        const bc_saddr d0 = dst + s * WsSm::STAGEB;
        // (rolled: the producer has registers for one row's addresses, not 32 of them)
#pragma unroll 1
        for (int i = 0; i < WS_BK / WS_RP; ++i) {
#pragma unroll
            for (int k = 0; k < WsSm::CPT; ++k) {
                const bool ok = c + 8 * k < cpr && r + i * WS_RP < kn;
                const size_t off = ok ? off0 + (size_t)i * WS_RP * p.kv_stride + 64 * k : 0;
                const bc_saddr d = d0 + i * WS_RP * WsSm::RS + WsSm::CB * k;
                bc_cp_async16_zfill(d, seg.k + off, ok ? 16 : 0);
                bc_cp_async16_zfill(d + WsSm::TILEB, seg.v + off, ok ? 16 : 0);
            }
        }
    };
    // Q rows r0.., zero-filled past the group end and head_dim.
    auto load_q = [&]() {
        const int rows = grp.q_rows - r0;
        const __nv_bfloat16* q = p.q + (size_t)(grp.q_begin + r0 + r) * p.q_stride + h * hd + 8 * c;
#pragma unroll 1
        for (int i = 0; i < WsCfg::BQ / WS_RP; ++i) {
#pragma unroll
            for (int k = 0; k < WsSm::CPT; ++k) {
                const bool ok = c + 8 * k < cpr && r + i * WS_RP < rows;
                bc_cp_async16_zfill(dst + WsCfg::Q_OFF + WsSm::q_row(i * WS_RP) + WsSm::CB * k,
                                    ok ? q + (size_t)i * WS_RP * p.q_stride + 64 * k : p.q, ok ? 16 : 0);
            }
        }
    };
    // Tile j has landed (this thread's copies): publish it on full[s]. Tile 0 brought Q: a
    // negative scale flips the sign of this thread's Q chunks first (exact; the consumers'
    // softmax sees |scale|).
    auto publish = [&](int s, bool first) {
        if (first && qsign) {
#pragma unroll 1
            for (int i = 0; i < WsCfg::BQ / WS_RP; ++i) {
#pragma unroll
                for (int k = 0; k < WsSm::CPT; ++k) {
                    unsigned* w = reinterpret_cast<unsigned*>(smem + (dst - base) + WsCfg::Q_OFF + WsSm::q_row(i * WS_RP) +
                                                              WsSm::CB * k);
#pragma unroll
                    for (int e = 0; e < 4; ++e) w[e] ^= qsign;
                }
            }
        }
        bc_fence_proxy_async();  // the copies (and the flip) -> visible to wgmma's async proxy
        bc_mbar_arrive(&full[s]);
    };
    // The block's split of the group's walk (all of it with one split): att_advance stops at the
    // split's end (`left`), and the end marker follows; an empty split publishes only that.
    AttCursor cur = att_split_start(p, grp, WS_BK, sb.split, sb.splits);
    int s = 0;
    unsigned use = 0;  // uses of stage s so far
    if constexpr (DEEP) {
        // Per tile: wait for the stage, issue the copies, hand them to full[s] (the arrive-on
        // happens when they land), then thread 0 writes the ring entry and releases it with a
        // plain arrive (full[s] counts WS_WG + 1). Tile 0 (with Q) is published as in _ws, since
        // the producer must see Q land to flip its sign, but only after the next tile (or the
        // end marker) is issued and handed over: its copies are not committed, so the
        // wait_group for tile 0's group does not wait for them, and two tiles are in flight from
        // the start as in _ws. Then up to WS_STAGES tiles in flight, bounded by empty[] only.
        int first = -1;  // the stage of tile 0 while it waits to be published
        for (int j = 0;; ++j) {
            if (use > 0) bc_mbar_wait(&empty[s], (use - 1) & 1);  // its previous tile is consumed
            const int kn = cur.have ? min(WS_BK, cur.seg.tokens - cur.k0) : 0;
            if (cur.have) {
                if (j == 0) load_q();
                load_kv(s, cur.seg, cur.k0, kn);
            }
            if (pt == 0) ring[s] = kn;  // 0: the end marker
            if (j == 0 && cur.have) {
                bc_cp_async_commit();  // tile 0's group, waited for below
                first = s;
            } else {
                // Tracks every earlier copy of this thread (the end marker: nothing new).
                bc_cp_async_mbar_arrive_noinc(&full[s]);
                if (pt == 0) bc_mbar_arrive(&full[s]);  // releases the ring entry
                if (first >= 0) {
                    bc_cp_async_wait_group<0>();  // tile 0 and Q (committed) have landed
                    publish(first, true);
                    if (pt == 0) bc_mbar_arrive(&full[first]);
                    first = -1;
                }
            }
            if (!cur.have) {
                // No producer thread exits with copies in flight: the end marker's phase
                // completes only when every thread's earlier copies have landed.
                bc_mbar_wait(&full[s], use & 1);
                break;
            }
            cur = att_advance(p, grp, cur, WS_BK);
            if (++s == WS_STAGES) {
                s = 0;
                ++use;
            }
        }
    } else {
        int prev = 0;
        for (int j = 0;; ++j) {
            if (use > 0) bc_mbar_wait(&empty[s], (use - 1) & 1);  // its previous tile is consumed
            const int kn = cur.have ? min(WS_BK, cur.seg.tokens - cur.k0) : 0;
            if (pt == 0) ring[s] = kn;  // 0: the end marker
            if (cur.have) {
                if (j == 0) load_q();
                load_kv(s, cur.seg, cur.k0, kn);
            }
            bc_cp_async_commit();
            // Tiles 0 .. WS_STAGES-2 need no empty wait: the next copy is issued before this one is
            // waited for. From then on (and at the end marker) each tile is published as it lands.
            const bool lagging = j > 0 && j < WS_STAGES;  // tile j-1 is not published yet
            if (cur.have && j + 1 < WS_STAGES) {
                if (lagging) {
                    bc_cp_async_wait_group<1>();
                    publish(prev, j == 1);
                }
            } else {
                if (lagging) {
                    bc_cp_async_wait_group<1>();
                    publish(prev, j == 1);
                }
                bc_cp_async_wait_group<0>();
                publish(s, j == 0 && cur.have);
            }
            if (!cur.have) break;
            cur = att_advance(p, grp, cur, WS_BK);
            prev = s;
            if (++s == WS_STAGES) {
                s = 0;
                ++use;
            }
        }
    }
}

/// A consumer warpgroup (cw = 0, 1: query rows r0 + 64 cw ..; ctid = 0..255 over both): the
/// pp_k128 loop with the tiles from the producer; then the pp_k128 store (or, with splits, its
/// partial store). DEEP: a proxy fence after each full[] wait of a tile the producer handed over
/// with cp.async.mbarrier.arrive (no producer instruction runs after those copies land).
template <bool DEEP>
__device__ __forceinline__ void ws_consumer(const BcAttentionParams& p, const BcAttnGroup& grp, AttSplitBlock sb,
                                            int r0, unsigned w, uint64_t* full, uint64_t* empty,
                                            const int* ring, int ctid) {
    constexpr int HDMAX = WS_HD, BK = WS_BK, NO = HDMAX / 8;
    using Cfg = WsCfg;
    const int hd = p.head_dim, h = blockIdx.y;
    const int cw = ctid / WS_WG, warp = ctid / 32, lane = ctid % 32, g = lane / 4, t = lane % 4;
    const float qscale = fabsf(p.scale * 1.4426950408889634f);  // base 2; the sign is in Q
    const uint64_t dq = bc_wgmma_kmajor_desc(w + Cfg::Q_OFF + cw * WsSm::QTS, BC_WGMMA_SWIZZLE_128B, 64, HDMAX, 0);
    const uint64_t dk0 = bc_wgmma_kmajor_desc(w, BC_WGMMA_SWIZZLE_128B, BK, HDMAX, 0);
    const uint64_t dv0 = bc_wgmma_mnmajor_desc(w + WsSm::TILEB, BC_WGMMA_SWIZZLE_128B, BK, HDMAX, 0);
    constexpr uint64_t SB = WsSm::STAGEB >> 4;  // a stage, in descriptor units
    float o[1][NO][4];
#pragma unroll
    for (int j = 0; j < NO; ++j) o[0][j][0] = o[0][j][1] = o[0][j][2] = o[0][j][3] = 0.f;
    float m[1][2] = {{-INFINITY, -INFINITY}}, l[1][2] = {{0.f, 0.f}};
    float d[BK / 2];
#pragma unroll
    for (int i = 0; i < BK / 2; ++i) d[i] = 0.f;
    float(&of)[HDMAX / 2] = *reinterpret_cast<float(*)[HDMAX / 2]>(&o[0][0][0]);
    unsigned pa[BK / 16][4];
    float alpha[1][2];

    // Tile 0 (stage 0, phase 0): S(0), its softmax, P(0).
    bc_mbar_wait(&full[0], 0);
    int kn = ring[0];
    const bool have = kn > 0;
    if (have) {
        bc_wgmma_fence_operand(d);
        bc_wgmma_fence();
        att_wg_s<Cfg>(dq, dk0, d);
        bc_wgmma_wait<0>();
        bc_wgmma_fence_operand(d);
        const bool grew = kn == BK ? att_wg_softmax<Cfg, false>(d, o, m, l, alpha, qscale, kn, t)
                                   : att_wg_softmax<Cfg, true>(d, o, m, l, alpha, qscale, kn, t);
        att_wg_next_p<Cfg>(o, alpha, grew, pa, d);
        // Ping-pong as in pp_k128: consumer 0 issues first; consumer 1 lets it.
        if (cw == 1) bc_bar_arrive(WS_BAR_SCHED, WS_CONSUMER_NT);
    }
    int st = 0;
    unsigned ph = 0;  // stage and full-phase parity of tile t
    while (kn > 0) {
        const int st1 = st == WS_STAGES - 1 ? 0 : st + 1;
        const unsigned ph1 = st1 == 0 ? ph ^ 1u : ph;
        bc_mbar_wait(&full[st1], ph1);  // tile t+1 (or the end marker) is in stage st1
        if constexpr (DEEP) bc_fence_proxy_async();  // its cp.async data -> wgmma's async proxy
        const int kn1 = ring[st1];
        bc_bar_sync(WS_BAR_SCHED + cw, WS_CONSUMER_NT);
        bc_wgmma_fence_operand(of);
        bc_wgmma_fence_operand(d);
        bc_wgmma_fence();
        att_wg_s<Cfg>(dq, dk0 + st1 * SB, d);  // (past the last tile: discarded)
        att_wg_pv<Cfg>(dv0 + st * SB, pa, of);
        bc_bar_arrive(WS_BAR_SCHED + 1 - cw, WS_CONSUMER_NT);
        bc_wgmma_wait<1>();  // S(t+1); P(t) V(t) may still run
        bc_wgmma_fence_operand(d);
        bool grew = false;
        if (kn1 > 0)
            grew = kn1 == BK ? att_wg_softmax<Cfg, false>(d, o, m, l, alpha, qscale, kn1, t)
                             : att_wg_softmax<Cfg, true>(d, o, m, l, alpha, qscale, kn1, t);
        bc_wgmma_wait<0>();  // P(t) V(t): O and pa are free, and stage st is read
        bc_wgmma_fence_operand(of);
        __syncwarp();  // (the warp's ring reads come before its release)
        if (lane == 0) bc_mbar_arrive(&empty[st]);
        att_wg_next_p<Cfg>(o, alpha, grew, pa, d);
        st = st1;
        ph = ph1;
        kn = kn1;
    }
    // Consumer 1 arrived after its last tile too: consumer 0 takes that phase.
    if (have && cw == 0) bc_bar_sync(WS_BAR_SCHED, WS_CONSUMER_NT);

    // O / rowsum (0 for rows without keys) as bf16; rows past the group end are not stored.
    // With splits, the un-normalised partial result instead (a split without tiles: m = -inf,
    // l = 0, O = 0), in pp_k128's slot and layout (warp = the consumers' warp 0..7).
    if (r0 + 64 * cw >= grp.q_rows) return;
    if (sb.splits > 1) {
        att_store_partial<Cfg>(p, grp, o, m, l, sb.slot(p), r0, warp, g, t);
        return;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float li = l[0][i];
        li += __shfl_xor_sync(BC_FULL_MASK, li, 1);
        li += __shfl_xor_sync(BC_FULL_MASK, li, 2);
        const float inv = li > 0.f ? 1.f / li : 0.f;
        const int row = r0 + warp * 16 + g + 8 * i;
        if (row < grp.q_rows) {
            __nv_bfloat16* out = p.out + (size_t)(grp.q_begin + row) * p.out_stride + h * hd;
#pragma unroll
            for (int j = 0; j < NO; ++j)
                if (8 * j < hd) bc_store_bf162(out + 8 * j + 2 * t, o[0][j][2 * i] * inv, o[0][j][2 * i + 1] * inv);
        }
    }
}
#endif

// 384 threads (one producer and two consumer warpgroups), 128 query rows and 128-key tiles per
// block; grid and BcAttentionParams as bc_attention_wgmma_hd128_pp_k128 (split-KV included:
// grid.x = row tiles x splits, split-major, the partials in its slots), BC_ATTN_WS_SMEM bytes of
// dynamic shared memory. Opt-in: BC_ATTN_WGMMA_VARIANT=ws (DEEP false) or ws_deep (DEEP true).
template <bool DEEP>
__device__ __forceinline__ void ws_kernel(const BcAttentionParams& p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem_raw, BC_ATTN_WS_SMEM);
    BC_EMU_CHECK(p.head_dim > 0 && p.head_dim <= WS_HD && p.head_dim % 8 == 0 && p.splits >= 1);
    const BcAttnGroup grp = p.groups[blockIdx.z];
    const AttSplitBlock sb = att_split_block(p);  // (row tile, split) of this block
    const int r0 = sb.rt * WsCfg::BQ;
    if (r0 >= grp.q_rows) return;  // uniform for the whole block
    // The tiles start on the first 1024-byte boundary of the shared window.
    // (shared addresses computed once, here: `base` for the copies, `w` for the descriptors)
    const unsigned w0 = bc_smem_window_addr(smem_raw), pad = (1024u - w0 % 1024u) % 1024u;
    unsigned char* smem = smem_raw + pad;
    const bc_saddr base = bc_smem_addr(smem);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + WS_BAR_OFF);
    uint64_t* empty = full + WS_STAGES;
    int* ring = reinterpret_cast<int*>(smem + WS_RING_OFF);
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < WS_STAGES; ++s) {
            // the producer's threads (DEEP: and thread 0's release of the ring entry)
            bc_mbar_init(&full[s], WS_WG + (DEEP ? 1 : 0));
            bc_mbar_init(&empty[s], WS_CONSUMER_NT / 32);  // lane 0 of each consumer warp
        }
        bc_mbar_init_fence();
    }
    __syncthreads();
    if (tid < WS_WG) {
        bc_setmaxnreg<false, WS_PRODUCER_REGS>();
        ws_producer<DEEP>(p, grp, sb, r0, smem, base, full, empty, ring, tid);
    } else {
        bc_setmaxnreg<true, WS_CONSUMER_REGS>();
        ws_consumer<DEEP>(p, grp, sb, r0, w0 + pad, full, empty, ring, tid - WS_WG);
    }
#else
    (void)p;
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(WS_NT, 1) bc_attention_wgmma_hd128_ws(BcAttentionParams p) {
    ws_kernel<false>(p);
}
BC_EMU_ENTRY(bc_attention_wgmma_hd128_ws, BcAttentionParams)

// The deeper-pipelined twin (docs/wgmma.md, "Deeper producer pipelining"): the producer hands
// each tile after the first to full[s] with cp.async.mbarrier.arrive.noinc and never waits for
// its copies; the consumers fence the async proxy after each full[] wait. Opt-in:
// BC_ATTN_WGMMA_VARIANT=ws_deep.
extern "C" __global__ void __launch_bounds__(WS_NT, 1) bc_attention_wgmma_hd128_ws_deep(BcAttentionParams p) {
    ws_kernel<true>(p);
}
BC_EMU_ENTRY(bc_attention_wgmma_hd128_ws_deep, BcAttentionParams)
