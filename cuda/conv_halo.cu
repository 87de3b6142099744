// Persistent, weight-resident, halo-tile Hopper (sm_90a) 3x3 convolution to 64 output channels:
// `bc_conv_halo_n64`, for TAEHV's 3x3 convs to 64 channels. The same function, parameters
// (BcConvParams) and output bits as `bc_conv_wgmma_n64` (cuda/conv_wgmma.cu, and so bc_conv):
//
//   out[m][n] = act(bias[n] + res[m][n] + sum_{s, dy, dx, c} x_s[shift(m, dy, dx)][c] * w[n][t_s][dy][dx][c0_s + c])
//
// for the launches it fits (launch::conv_halo_fits): 3x3, cout = 64, the 16-byte path (`vec`),
// at most BC_CONV_HALO_MAX_KSTEPS = 18 k-steps of 64 weights, all resident. Plain: one or two
// sources of 64 channels (64 -> 64; the MemBlock's cat[x, past]) or one of 128 (the 128 -> 64
// conv after an Upsample), each read as it is or through the nearest 2x upsample (`up`: output
// pixel (y, x) reads source pixel (y >> 1, x >> 1), zero outside the output frame, as
// cv_src_off). The parity form (`p.parity`, the default for the conv after an Upsample): one
// upsampled source of 64 channels, the GEMM grid the source's (h/2) x (w/2) pixels, each giving
// the 4 output pixels (2y + py, 2x + px) from parity 2 py + px's 2x2 taps (4 x 4 = 16 k-steps).
// Same K order: per source, per tap (dy, dx) row-major, per 64-channel chunk of the source, 4
// wgmma k16 over the chunk's channels in order, which is bc_conv_wgmma_n64's walk of k-steps of
// 64 along each source's (tap, channel) sequence when a source has 64 or 128 channels (in the
// parity form per parity, as its grid z); same epilogue (cv_store_pair).
//
// Why: for these short-K, narrow layers every 128-pixel tile of bc_conv_wgmma_n64 re-reads all
// the weights (72 or 144 KB) and each input pixel once per tap (9 times), ~43 FLOP per L2 ->
// shared byte, and pays a pipeline fill and drain per tile. Here:
//   - the grid is persistent (launch::conv_halo: about one block per SM) and the tiles are
//     claimed dynamically (Scheduling, below);
//   - each block copies the layer's whole packed weight matrix into shared memory once, k-step
//     j at W + j * 8 KB (the parity form: parity z's 4 taps at j = 4z..): 64 channel rows of 128 bytes in the K-major 128B swizzle of wgmma (row
//     n at n * 128, 16-byte chunk c at c ^ (n % 8)): exactly the B tile bc_conv_wgmma_n64
//     copies for that k-step, so the same descriptor (SBO 1024, +32 bytes per k16) reads it;
//   - tiles are TH x TW pixels of the GEMM grid (the output; the source grid in the parity form);
//   - per (tile, source) "unit" it copies the input halo once: (TH + 2) x (TW + 2) pixels x 64
//     channels per plane (a 128-channel source: two planes, channels 0-63 and 64-127), halo
//     pixel hp = hy * HW + hx at hp * 128 of its plane, its 16-byte chunk c at c ^ (hp % 8)
//     (zero fill outside the frame: the conv padding), instead of 9 shifted copies;
//   - the two warpgroups (pixels 0..63 and 64..127 of the tile, tile pixel mt at row mt / TW,
//     column mt % TW) build wgmma's A operand in registers: per k-step and k16, one ldmatrix.x4
//     whose lane l gives the row address of halo pixel hp0(mt) + dy * HW + dx of the k-step's
//     plane ((dy, dx) = (tap / 3, tap % 3); parity 2 py + px: (tap / 2 + py, tap % 2 + px), so
//     the 4 parities share one halo) (mt = 16 warp + 8 ((l / 8) & 1) + l % 8, chunk 2 ks + l / 16): matrices 0..3 = rows
//     0-7 / 8-15 x k 0-7 / 8-15, which is mma.sync's (and wgmma's register) A fragment. TW is a
//     multiple of 8, so a matrix's 8 rows are 8 consecutive halo pixels, 8 distinct swizzle
//     phases: no bank conflict. Then wgmma m64n64k16 with A from registers, B from the
//     resident weights. A fragments alternate between two register sets by k-step parity (a
//     wgmma may read its A registers until its group completes; wait_group 1 after each
//     k-step's commit frees the set the next k-step overwrites); a source starts on the
//     parity its first k-step has in the flat k sequence, the tile's epilogue waits for all
//     groups. The shapes are unrolled (ch_run<NS, KC, PAR>): with a runtime source loop ptxas
//     waited for the in-flight wgmma group at the branch (its note C7517). The parity form
//     walks its 4 parities in a runtime loop (unrolled it took 255 registers and spilled): per
//     parity 4 k-steps, wait_group 0, its epilogue (output pixels (2y + py, 2x + px)), so no
//     group is in flight at the back edge.
// Scheduling: a tile counter pair in device memory (p.tile_counter: [0] next tile, [1] blocks
// done; zero before the launch). Thread 0 claims a tile with one atomicAdd and hands it to the
// block through shared memory, one tile ahead: tile i + 1 is known (claimed during tile i - 1)
// when tile i begins, so its halo can be issued while tile i computes; thread 0 claims tile
// i + 2 right after tile i's first barrier into the slot tile i used (claim[i & 1], read by
// every thread before that barrier). A claim past the last tile ends the block's claims. So a
// block that starts late (the SMs shared with the DiT's kernels) takes fewer tiles instead of
// an equal share. Each tile is computed wholly by one block, so the output bits do not depend
// on which block takes it. At exit thread 0 fences (its claims before its "done") and adds 1 to
// [1]; the block that brings it to gridDim.x, the last, sets both back to 0: every launch on a
// stream, inside a CUDA graph too, finds the pair zero without a memset.
// Pipeline (cp.async groups and one __syncthreads per unit): the weights and the first unit's
// halo are one group; unit u: wait_group 0 (unit u's halo, issued during unit u - 1, landed),
// fence.proxy.async (the weights for wgmma's async proxy), __syncthreads (every thread's
// copies landed; every thread is done with its ldmatrix of unit u - 1, whose stage is refilled
// now); issue unit u + 1's halo into the other stage, commit; 9 k-steps on unit u's stage;
// after a tile's last source: wait_group 0, the epilogue (the next unit's copies in flight
// meanwhile), accumulators zeroed. A 128-channel source's unit fills both stages (its two
// planes), so it has no other stage to prefetch into: its 18 k-steps, a second __syncthreads
// (every ldmatrix done), the next tile's halo issued, then the epilogue while it lands (the
// copy overlaps the epilogue, not the math). The parity form prefetches as one 64-channel
// source; its tile has 4 epilogues.
//
// Shared memory (BC_CONV_HALO_SMEM = 194576): 18 x 8 KB weights (147456; a 64-channel source
// uses 9 k-steps, a 128-channel one 18, the parity form 16), 2 halo stages of 10 x 18 x 128 =
// 23040 bytes, 16 bytes for the claimed tiles (addressed from the pinned base: a static
// __shared__ array's address reads the window base at each use), 1024 bytes of alignment
// slack. One block of 256 threads per SM.
//
// Checked by src/kernels/emu/decode.rs under the SIMT emulation (ldmatrix lane addresses, wgmma
// with A from registers and the B descriptor's swizzle, cp.async landing only at wait_group,
// real atomics on the counters): every TAEHV-shaped case that fits (64 -> 64 with bias + ReLU,
// the MemBlock's two sources with residual, an upsampled 64- and an upsampled 128-channel
// source at odd source sizes (7 x 13 -> 14 x 26), the parity form (9 x 18 -> 18 x 36), masked
// edges, frame-batched launches, more tiles than blocks and more blocks than tiles), with
// NaN-poisoned outputs, must give bc_conv_wgmma_n64's exact bits (of the same form), and every launch must leave the counters at zero (the
// emulated tests share one pair, never reset by the host); tests/decode_cuda_emulated.rs
// decodes synthetic TAEHVs with it and must give bc_conv_wgmma's pixels. Not caught by the
// emulation (there a cp.async lands at its thread's next wait_group, a wgmma reads its A
// registers when issued; the blocks of a launch do race for tiles, on as many host threads as
// the machine has cores, but not with a GPU's timing): a refill issued before the barrier, an
// A register set rewritten while its group runs; the order above rests on the reasoning. Never run on a GPU: opt-in (BC_CONV_HALO=1). Below sm_90a: a stub that traps.
#include "include/conv_gather.cuh"

namespace {
constexpr int CH_TH = BC_CONV_HALO_TH;               // output rows per tile (8)
constexpr int CH_TW = BC_CONV_HALO_TW;               // output columns per tile (16)
constexpr int CH_HH = CH_TH + 2;                     // halo rows (3x3 taps)
constexpr int CH_HW = CH_TW + 2;                     // halo columns
constexpr int CH_HPX = CH_HH * CH_HW;                // halo pixels (180)
constexpr int CH_NT = BC_CONV_HALO_THREADS;          // two warpgroups
constexpr int CH_BN = BC_CONV_WG_BN_64;              // output channels (the N of m64n64k16)
constexpr int CH_STAGES = BC_CONV_HALO_STAGES;       // halo stages
constexpr int CH_MAXK = BC_CONV_HALO_MAX_KSTEPS;     // resident weight k-steps
constexpr int CH_TAPS = 9;                           // 3x3
constexpr int CH_WSTEP = CH_BN * CW_ROWB;            // 8 KB: one k-step of weights
constexpr int CH_W_BYTES = CH_MAXK * CH_WSTEP;       // 144 KB
constexpr int CH_STAGE = CH_HPX * CW_ROWB;           // 23040
constexpr int CH_CLAIM = CH_W_BYTES + CH_STAGES * CH_STAGE;  // the claimed tiles (2 ints), from the weights
constexpr int CH_SMEM = CH_CLAIM + 16 + 1024;
static_assert(CH_TH * CH_TW == CW_BM, "a tile is the 128 pixel rows of two m64 wgmma tiles");
static_assert(CH_TW % 8 == 0, "an ldmatrix's 8 rows in one tile row (distinct swizzle phases)");
static_assert(CH_NT == 2 * BC_WGMMA_THREADS, "one warpgroup per 64 tile pixels");
static_assert(CH_STAGES == 2, "the pipeline below refills the other stage");
static_assert(CH_WSTEP % 1024 == 0, "weight k-steps on the swizzle period");
static_assert(CH_STAGE % 128 == 0, "halo stages on 128-byte rows");
static_assert(CH_SMEM == BC_CONV_HALO_SMEM && CH_SMEM <= 232448, "params.h; 227 KB per block");
}  // namespace

#if BC_HAS_WGMMA
/// Every weight k-step of the launch into the resident layout (cout rows zero-filled past cout):
/// source s's k-step j (tap j / kc, channels 64 (j % kc) on, kc = its channels / 64) in slot
/// (the k-steps of the sources before it) + j, as bc_conv_wgmma_n64 walks them; in the parity
/// form parity z's 4 taps in slots 4z.. (one 64-channel source).
__device__ __forceinline__ void ch_load_weights(const BcConvParams& p, bc_saddr wsm, int tid) {
    int slot0 = 0;
    for (int z = 0; z < (p.parity ? 4 : 1); ++z) {
        const CvGeo geo = cv_geo_z(p, z);  // the parity form: parity z's 2x2 taps at geo.w0
        const long long ktot = (long long)p.kt * geo.taps * p.cin;
        for (int s = 0; s < p.num_src; ++s) {
            const CvSrc src = cv_src(p, geo, s);
            const int kc = src.channels / CW_BK, steps = geo.taps * kc;
            for (int i = tid; i < steps * CH_BN * CW_CPR; i += CH_NT) {
                const int j = i / (CH_BN * CW_CPR), n = i / CW_CPR % CH_BN, c = i % CW_CPR;
                const int tap = j / kc, c0 = src.c0 + (j - tap * kc) * CW_BK;
                const bool ok = n < p.cout;
                const __nv_bfloat16* wk =
                    p.w + geo.w0 + (long long)(src.t * geo.taps + tap) * p.cin + c0 + 8 * c + n * ktot;
                const unsigned dst = (unsigned)((slot0 + j) * CH_WSTEP + n * CW_ROWB + ((c ^ (n % 8)) << 4));
                bc_cp_async16_zfill(wsm + dst, ok ? wk : p.w, ok ? 16 : 0);
            }
            slot0 += steps;
        }
    }
}

/// The halo of the tile at grid pixel (y0, x0) of source `src` (KC x 64 channels) into the
/// stage at `st`, channels 64 k on at plane k (st + k CH_STAGE). The grid is the output (plain)
/// or the sources' own (h/2) x (w/2) pixels (the parity form). Halo pixel (y, x) of the plain
/// grid reads source pixel (y, x), or (y >> 1, x >> 1) of an upsampled source (the nearest 2x
/// upsample, as cv_src_off); of the parity grid, source pixel (y, x); zero outside the grid
/// (the padding).
template <int KC>
__device__ __forceinline__ void ch_load_halo(const BcConvParams& p, const CvSrc& src, int y0, int x0, bc_saddr st,
                                             int tid) {
    constexpr int CPP = CW_CPR * KC;  // 16-byte chunks per halo pixel
    const int par = p.parity ? 1 : 0, gh = p.h >> par, gw = p.w_px >> par;
    const int sw = src.up ? p.w_px >> 1 : p.w_px, sh = src.up && !par ? 1 : 0;
    for (int i = tid; i < CH_HPX * CPP; i += CH_NT) {
        const int hp = i / CPP, c = i % CPP;
        const int y = y0 - 1 + hp / CH_HW, x = x0 - 1 + hp % CH_HW;
        const bool ok = y >= 0 && y < gh && x >= 0 && x < gw;
        const __nv_bfloat16* a = ok ? src.x + ((size_t)(y >> sh) * sw + (x >> sh)) * src.stride + 8 * c : src.x;
        const unsigned dst = (unsigned)((c / CW_CPR) * CH_STAGE + hp * CW_ROWB + (((c % CW_CPR) ^ (hp % 8)) << 4));
        bc_cp_async16_zfill(st + dst, a, ok ? 16 : 0);
    }
}

/// The taps x KC k-steps of one source on the halo stage `st` (k-step j = KC tap + k: tap, then
/// the channel plane k): this lane's ldmatrix row is halo pixel hp0 + dy * HW + dx of plane k,
/// chunk 2 ks + hi; B = the source's resident weights from `db`, slot j. !PAR: the 9 taps of
/// the 3x3 (dy, dx = tap / 3, tap % 3 in the halo); PAR: parity z = 2 py + px of the parity
/// form, its 4 taps (dy, dx = tap / 2 + py, tap % 2 + px). P: the register set of its
/// k-step 0 (the source's first k-step's parity in the flat k sequence).
template <int P, int KC, bool PAR>
__device__ __forceinline__ void ch_taps(float (&acc)[CH_BN / 2], bc_saddr st, int hp0, int hi, uint64_t db, int z = 0) {
    constexpr int TAPS = PAR ? 4 : CH_TAPS;
    unsigned a[2][CW_KSTEPS][4];
#pragma unroll
    for (int j = 0; j < TAPS * KC; ++j) {
        const int tap = j / KC, b = (j + P) & 1;
        const int dy = PAR ? tap / 2 + (z >> 1) : tap / 3, dx = PAR ? tap % 2 + (z & 1) : tap % 3;
        const int hp = hp0 + dy * CH_HW + dx;
        const bc_saddr row = st + (unsigned)((j % KC) * CH_STAGE + hp * CW_ROWB);
        const int ph = hp & 7;
#pragma unroll
        for (int ks = 0; ks < CW_KSTEPS; ++ks) bc_ldmatrix_x4_at(a[b][ks], row + (unsigned)(((2 * ks + hi) ^ ph) << 4));
        bc_wgmma_fence_operand(acc);
        bc_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < CW_KSTEPS; ++ks)
            bc_wgmma_rs<CH_BN>(acc, a[b][ks], db + (uint64_t)(j * (CH_WSTEP >> 4) + 2 * ks), 1);
        bc_wgmma_commit();
        bc_wgmma_wait<1>();  // the previous k-step's group is complete: its A set may be rewritten
        bc_wgmma_fence_operand(acc);
    }
}

/// The epilogue of one warpgroup's 64 tile pixels (from tile pixel 64 wg) at grid pixel
/// (y0, x0): register 4j + 2e2 + e1 is tile pixel 64 wg + 16 warp + g + 8 e2, channel
/// 8j + 2q + e1 (as cw_epilogue), column pairs to cv_store_pair; grid pixel (y, x) is output
/// pixel (y, x), or (2y + py, 2x + px) for parity geo.z = 2 py + px (as cv_out_pixel).
__device__ __forceinline__ void ch_epilogue(const BcConvParams& p, const CvGeo& geo, const float (&acc)[CH_BN / 2],
                                            int y0, int x0, int wg, int warp, int g, int q) {
    const bool pairs = cv_pairs(p);
    const int par = geo.z >= 0 ? 1 : 0, py = par ? geo.z >> 1 : 0, px = par ? geo.z & 1 : 0;
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
        const int mt = wg * CW_WM + 16 * warp + g + 8 * e2;
        const int y = y0 + mt / CH_TW, x = x0 + mt % CH_TW;
        if (y >= geo.gh || x >= geo.gw) continue;
        const int m = ((y << par) + py) * p.w_px + (x << par) + px;
#pragma unroll
        for (int j = 0; j < CH_BN / 8; ++j) {
            const int n = 8 * j + 2 * q;  // even
            if (n < p.cout) cv_store_pair(p, geo, pairs, m, n, acc[4 * j + 2 * e2], acc[4 * j + 2 * e2 + 1]);
        }
    }
}

/// A 32-bit load / store of shared memory at `a` (the claimed tiles, by shared address).
__device__ __forceinline__ int ch_lds(bc_saddr a) {
#ifdef __CUDACC__
    int v;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(a) : "memory");
    return v;
#else
    return *reinterpret_cast<const volatile int*>(a);
#endif
}
__device__ __forceinline__ void ch_sts(bc_saddr a, int v) {
#ifdef __CUDACC__
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(v) : "memory");
#else
    *reinterpret_cast<volatile int*>(a) = v;
#endif
}

/// Tile t of the launch (all frames' `total`, frame-major, tw tiles per tile row, tpf per
/// frame): its frame and first grid pixel; bz: the grid z index of the frame (of its parity 0
/// in the parity form) for cv_geo_z.
struct ChTile {
    int f, y0, x0, bz;
    __device__ __forceinline__ ChTile(const BcConvParams& p, int t, int tw, int tpf) {
        f = t / tpf;
        const int r = t - f * tpf;
        y0 = r / tw * CH_TH;
        x0 = r % tw * CH_TW;
        bz = p.parity ? 4 * f : f;
    }
};

/// Parity z of tile c in the parity form: its 4 k-steps on the halo stage `st` (weights from
/// `db`), all groups waited for, the epilogue into output pixels (2y + py, 2x + px), the
/// accumulators zeroed.
__device__ __forceinline__ void ch_parity(const BcConvParams& p, float (&acc)[CH_BN / 2], bc_saddr st, int hp0, int hi,
                                          uint64_t db, const ChTile& c, int z, int wg, int warp, int lane) {
    ch_taps<0, 1, true>(acc, st, hp0, hi, db, z);
    bc_wgmma_wait<0>();
    bc_wgmma_fence_operand(acc);
    ch_epilogue(p, cv_geo_z(p, c.bz + z), acc, c.y0, c.x0, wg, warp, lane / 4, lane % 4);
#pragma unroll
    for (int k = 0; k < CH_BN / 2; ++k) acc[k] = 0.f;
}

/// A block's walk over the tiles it claims (the header's "Scheduling" and "Pipeline"), NS
/// sources of KC x 64 channels each (NS = 1 or 2 with KC = 1: unit u = i NS + s, stage u & 1;
/// NS = 1 with KC = 2: one unit per tile over both stages, its channel planes). The sources
/// are unrolled, so no accumulator of an in-flight wgmma group crosses a branch (ptxas would
/// wait for the group there). PAR: the parity form (NS = KC = 1): per tile the 4 parities one
/// after the other on the same halo, 4 k-steps and an epilogue each. `claim`: two shared ints
/// (at claim and claim + 4), tile i's successor in int (i + 1) & 1.
template <int NS, int KC, bool PAR>
__device__ __forceinline__ void ch_run(const BcConvParams& p, bc_saddr base, unsigned wbase, int total, int tw,
                                       int tpf, int tid, bc_saddr claim) {
    static_assert((NS == 1 || NS == 2) && (KC == 1 || NS == 1) && (KC == 1 || KC == 2) && (!PAR || NS + KC == 2),
                  "the kernel's shapes");
    const int wg = tid / BC_WGMMA_THREADS, wt = tid % BC_WGMMA_THREADS, warp = wt / 32, lane = wt % 32;
    unsigned* const ctr = p.tile_counter;
    const bc_saddr halo = base + CH_W_BYTES;
    auto load = [&](int t, int s, int stage) {
        const ChTile c(p, t, tw, tpf);
        ch_load_halo<KC>(p, cv_src(p, cv_geo_z(p, c.bz), s), c.y0, c.x0, halo + stage * CH_STAGE, tid);
    };
    // The unit's halo landed (this thread's copies: wait_group 0; everyone's: the barrier,
    // after which the previous unit's stage is free), the weights visible to wgmma's async proxy.
    auto landed = [&] {
        bc_cp_async_wait_group<0>();
        bc_fence_proxy_async();
        __syncthreads();
    };
    // Thread 0 claims the block's first two tiles (past the last one: `total`, no more claims).
    if (tid == 0) {
        const int t0 = (int)atomicAdd(ctr, 1u);
        ch_sts(claim, t0);
        ch_sts(claim + 4, t0 < total ? (int)atomicAdd(ctr, 1u) : total);
    }
    ch_load_weights(p, base, tid);
    __syncthreads();
    int cur = ch_lds(claim);
    if (cur < total) load(cur, 0, 0);
    bc_cp_async_commit();

    uint64_t db0 = bc_wgmma_kmajor_desc(wbase, BC_WGMMA_SWIZZLE_128B, CH_BN, CW_BK, 0);
    bc_pin(db0);
    // This lane's ldmatrix row: tile pixel mt (matrix l / 8: rows +8 for matrices 1, 3; k chunk
    // +1 for 2, 3), its halo pixel at tap (0, 0) of the 3x3 (dy = dx = -1).
    const int mi = lane / 8, mt = wg * CW_WM + 16 * warp + (mi & 1) * 8 + lane % 8;
    const int hp0 = mt / CH_TW * CH_HW + mt % CH_TW, hi = mi >> 1;
    float acc[CH_BN / 2];
#pragma unroll
    for (int k = 0; k < CH_BN / 2; ++k) acc[k] = 0.f;
    for (int i = 0; cur < total; ++i) {
        const int u = i * NS;
        landed();
        // Tile i + 1 (thread 0 wrote it before this barrier). Thread 0 claims tile i + 2 and
        // stores it into the slot of tile i (which every thread read before this barrier)
        // before the next barrier. nvcc aggregates the atomic over the warp and shuffles its
        // result at once, so warp 0 waits for the round trip where the claim is issued: in the
        // parity form here (its tile is 4 parities of math, so the wait weighs little); else
        // after the tile's last wgmma is issued, where warp 0 waits for them to drain anyway.
        const int next = ch_lds(claim + 4 * ((i + 1) & 1));
        int claimed = total;
        if constexpr (PAR) {
            if (tid == 0 && next < total) claimed = (int)atomicAdd(ctr, 1u);
            if (next < total) load(next, 0, (u + 1) & 1);
            bc_cp_async_commit();
            const ChTile c(p, cur, tw, tpf);
            const bc_saddr st = halo + (u & 1) * CH_STAGE;
            constexpr uint64_t PSTEP = 4 * (CH_WSTEP >> 4);  // a parity's 4 weight slots
            // A runtime loop: every group is complete at its back edge (the epilogue waited).
#pragma unroll 1
            for (int z = 0; z < 4; ++z) ch_parity(p, acc, st, hp0, hi, db0 + z * PSTEP, c, z, wg, warp, lane);
            if (tid == 0) ch_sts(claim + 4 * (i & 1), claimed);
            cur = next;
            continue;
        } else if constexpr (KC == 2) {
            ch_taps<0, 2, false>(acc, halo, hp0, hi, db0);
            __syncthreads();  // every thread's ldmatrix of both planes done: refill them
            if (next < total) load(next, 0, 0);
            bc_cp_async_commit();
        } else {
            // Issue the next unit's halo into the other stage: this tile's second source, or
            // the next tile's first.
            if (NS == 2)
                load(cur, 1, (u + 1) & 1);
            else if (next < total)
                load(next, 0, (u + 1) & 1);
            bc_cp_async_commit();
            ch_taps<0, 1, false>(acc, halo + (u & 1) * CH_STAGE, hp0, hi, db0);
            if constexpr (NS == 2) {
                landed();
                if (next < total) load(next, 0, (u + 2) & 1);
                bc_cp_async_commit();
                ch_taps<1, 1, false>(acc, halo + ((u + 1) & 1) * CH_STAGE, hp0, hi,
                                  db0 + (uint64_t)(CH_TAPS * (CH_WSTEP >> 4)));
            }
        }
        if (tid == 0 && next < total) claimed = (int)atomicAdd(ctr, 1u);
        bc_wgmma_wait<0>();
        bc_wgmma_fence_operand(acc);
        const ChTile c(p, cur, tw, tpf);
        ch_epilogue(p, cv_geo_z(p, c.bz), acc, c.y0, c.x0, wg, warp, lane / 4, lane % 4);
#pragma unroll
        for (int k = 0; k < CH_BN / 2; ++k) acc[k] = 0.f;
        if (tid == 0) ch_sts(claim + 4 * (i & 1), claimed);
        cur = next;
    }
    bc_cp_async_wait_group<0>();
    // The last block done puts the counters back to 0 for the next launch (its claims, like
    // every block's, came before its "done"; the fence orders them).
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(ctr + 1, 1u) == gridDim.x - 1) {
            atomicExch(ctr, 0u);
            atomicExch(ctr + 1, 0u);
        }
    }
}

__device__ __forceinline__ void bc_conv_halo_impl(const BcConvParams& p, unsigned char* smem_raw) {
    BC_EMU_CHECK(p.num_src >= 1 && p.kh == 3 && p.kw == 3 && p.vec && p.out_split > 0 && p.cout <= CH_BN &&
                 p.frames >= 1 && p.tile_counter != nullptr);
#ifndef __CUDACC__
    int steps = 0;
    for (int s = 0; s < p.num_src; ++s) {
        const CvSrc src = cv_src(p, cv_geo_z(p, 0), s);
        BC_EMU_CHECK(src.channels == CW_BK || (src.channels == 2 * CW_BK && p.num_src == 1));
        BC_EMU_CHECK(!p.parity || (src.up && src.channels == CW_BK && p.num_src == 1));
        steps += (p.parity ? 16 : CH_TAPS) * src.channels / CW_BK;
    }
    BC_EMU_CHECK(steps <= CH_MAXK);
#endif
    // The weights start on the first 1024-byte boundary of the shared window (the swizzle period).
    const unsigned w0 = bc_smem_window_addr(smem_raw), pad = (1024u - w0 % 1024u) % 1024u;
    bc_saddr base = bc_smem_addr(smem_raw + pad);
    bc_pin(base);
    // Tiles of the grid (the output, or the sources' (h/2) x (w/2) in the parity form): tw per
    // tile row, tpf per frame, over all frames.
    const int par = p.parity ? 1 : 0, gh = p.h >> par, gw = p.w_px >> par;
    const int tw = (gw + CH_TW - 1) / CH_TW, tpf = tw * ((gh + CH_TH - 1) / CH_TH);
    const int total = tpf * p.frames, tid = (int)threadIdx.x;
    if (par)
        ch_run<1, 1, true>(p, base, w0 + pad, total, tw, tpf, tid, base + CH_CLAIM);
    else if (p.num_src == 2)
        ch_run<2, 1, false>(p, base, w0 + pad, total, tw, tpf, tid, base + CH_CLAIM);
    else if (p.src[0].channels == 2 * CW_BK)
        ch_run<1, 2, false>(p, base, w0 + pad, total, tw, tpf, tid, base + CH_CLAIM);
    else
        ch_run<1, 1, false>(p, base, w0 + pad, total, tw, tpf, tid, base + CH_CLAIM);
}
#endif

// 256 threads (two warpgroups), 8 x 16 output pixels x 64 channels per tile, a persistent grid
// (gridDim.x blocks walk all frames' tiles; y = z = 1), BC_CONV_HALO_SMEM bytes of dynamic shared
// memory. Opt-in: BC_CONV_HALO=1.
extern "C" __global__ void __launch_bounds__(CH_NT, 1) bc_conv_halo_n64(BcConvParams p) {
#if BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, CH_SMEM);
    bc_conv_halo_impl(p, smem);
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_conv_halo_n64, BcConvParams)
