// bc_tma_probe: the TMA / mbarrier layout probe (a test kernel, not used by the engine). One
// warpgroup (BC_TMA_PROBE_THREADS = 128 threads), grid (1), BcTmaProbeParams (params.h).
//
// mode 0 (raw): thread 0 inits one mbarrier (1 arrival per phase), announces box_bytes and
// arrives (arrive.expect_tx), and loads box coords[0] of p.map (cp.async.bulk.tensor, rank
// p.rank) into shared memory at a 1024-byte boundary of the shared window; every thread waits
// for phase 0 (parity 0) and copies the box's shared bytes, as they are, to out[0 ..
// box_bytes); after a barrier the same with box coords[1] and phase 1 (parity 1) into
// out[box_bytes ..]. The test compares the bytes with its own model of the load (element
// order, swizzle, zero fill of every element outside the tensor: boxes hang over every edge)
// under the emulation, and on a GPU with the emulated load of the same boxes.
//
// mode 1 (wgmma): A = p.map and B = p.map_b, each [64][64] bf16 (K contiguous), are loaded as
// 64 / E boxes {E, 64} (E = 8 bf16 without swizzle, W / 2 with a W-byte swizzle), box j at
// tile + j * 64 * 2E bytes: with a swizzle that is the K-major layout of bc_wgmma_kmajor_offset
// (column blocks of 64 rows x W bytes, 8-row groups 8W apart); without one, box j is the
// k-chunk j of every core matrix (8-row groups 128 bytes apart, k chunks 1024 apart: LBO
// 1024, SBO 128). Then 4 wgmma m64n64k16 (A and B by descriptor, the layout's swizzle) give
// c = A . B^T, stored by the documented accumulator layout: the TMA's swizzle must be the one
// wgmma's descriptor reads.
//
// p.fault (BC_TMA_FAULT_*): no expect_tx, the wrong parity, no arrival (the emulation must show
// NaN or report a deadlock), or the boxes one row off (a wrong result, on a GPU too). Checked
// by tests/tma_emu.rs under the emulation and by tests/cuda.rs tma_layouts_match_the_hardware
// on a Hopper GPU. Below sm_90 the kernel traps.
#include "../include/tma.cuh"
#include "../include/wgmma.cuh"

namespace {
/// Threads of the probe.
constexpr int TP_NT = BC_TMA_PROBE_THREADS;
/// The wgmma mode's tiles: 64 rows x 64 bf16.
constexpr int TP_ROWS = 64, TP_K = 64, TP_TILE = TP_ROWS * TP_K * 2;
static_assert(2 * TP_TILE <= 2 * BC_TMA_PROBE_MAX_BOX, "tiles fit the shared memory");
}  // namespace

#if BC_HAS_TMA && BC_HAS_WGMMA
// The wgmma mode: A and B by TMA, then c = A . B^T by wgmma.
__device__ __forceinline__ void bc_tma_probe_wgmma(const BcTmaProbeParams& p, unsigned char* tiles, uint64_t* bar) {
    const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
    const int e = p.swizzle == BC_WGMMA_SWIZZLE_NONE ? 8 : (int)bc_wgmma_row_bytes(p.swizzle) / 2;
    const int boxes = TP_K / e, row0 = p.fault == BC_TMA_FAULT_COORD ? 1 : 0;
    if (t == 0) {
        bc_mbar_arrive_expect_tx(bar, 2 * TP_TILE);
        for (int j = 0; j < boxes; ++j) {
            const int c[2] = {j * e, row0};
            bc_tma_load<2>(tiles + j * TP_ROWS * 2 * e, &p.map, bar, c);
            bc_tma_load<2>(tiles + TP_TILE + j * TP_ROWS * 2 * e, &p.map_b, bar, c);
        }
    }
    bc_mbar_wait(bar, 0);
    const unsigned sa = bc_smem_window_addr(tiles), sb = sa + TP_TILE;
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    bc_wgmma_fence_operand(d);
    bc_wgmma_fence();
#pragma unroll
    for (int s = 0; s < TP_K / BC_WGMMA_K; ++s) {
        uint64_t da, db;
        if (p.swizzle == BC_WGMMA_SWIZZLE_NONE) {
            // k-step s = k chunks 2s, 2s + 1: LBO 1024 (chunk to chunk), SBO 128 (8 rows).
            da = bc_wgmma_desc(sa + 2 * s * TP_ROWS * 16, TP_ROWS * 16, 128, BC_WGMMA_SWIZZLE_NONE);
            db = bc_wgmma_desc(sb + 2 * s * TP_ROWS * 16, TP_ROWS * 16, 128, BC_WGMMA_SWIZZLE_NONE);
        } else {
            da = bc_wgmma_kmajor_desc(sa, p.swizzle, TP_ROWS, TP_K, s);
            db = bc_wgmma_kmajor_desc(sb, p.swizzle, TP_ROWS, TP_K, s);
        }
        bc_wgmma_ss<64>(d, da, db, 1);
    }
    bc_wgmma_commit();
    bc_wgmma_wait<0>();
    bc_wgmma_fence_operand(d);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
        const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
        p.c[row * TP_K + col] = d[i];
    }
}

// The raw mode's load of box `c` (rank p.rank), from `map` (the parameter's, or p.map_global).
__device__ __forceinline__ void bc_tma_probe_load(const BcTmaProbeParams& p, const BcTensorMap* map,
                                                  unsigned char* box, uint64_t* bar, const int (&c)[5]) {
    switch (p.rank) {
        case 2: {
            const int cc[2] = {c[0], c[1]};
            bc_tma_load<2>(box, map, bar, cc);
            break;
        }
        case 3: {
            const int cc[3] = {c[0], c[1], c[2]};
            bc_tma_load<3>(box, map, bar, cc);
            break;
        }
        case 4: {
            const int cc[4] = {c[0], c[1], c[2], c[3]};
            bc_tma_load<4>(box, map, bar, cc);
            break;
        }
        default:
            bc_tma_load<5>(box, map, bar, c);
            break;
    }
}
#endif

extern "C" __global__ void __launch_bounds__(TP_NT) bc_tma_probe(const __grid_constant__ BcTmaProbeParams p) {
#if BC_HAS_TMA && BC_HAS_WGMMA
    BC_DYNAMIC_SMEM(smem, BC_TMA_PROBE_SMEM);
    // Boxes / tiles at the first 1024-byte boundary of the shared window; the mbarrier after them.
    unsigned char* tiles = smem + (1024u - bc_smem_window_addr(smem) % 1024u) % 1024u;
    uint64_t* bar = reinterpret_cast<uint64_t*>(tiles + 2 * BC_TMA_PROBE_MAX_BOX);
    const int t = threadIdx.x;
    if (t == 0) bc_mbar_init(bar, 1);
    bc_mbar_init_fence();
    __syncthreads();
    if (p.mode == 1) {
        bc_tma_probe_wgmma(p, tiles, bar);
        return;
    }
    for (int b = 0; b < 2; ++b) {
        if (t == 0) {
            int c[5] = {p.coords[b][0], p.coords[b][1], p.coords[b][2], p.coords[b][3], p.coords[b][4]};
            if (p.fault == BC_TMA_FAULT_COORD) ++c[1];
            if (p.fault == BC_TMA_FAULT_NO_EXPECT_TX)
                bc_mbar_arrive(bar);
            else if (p.fault != BC_TMA_FAULT_NO_ARRIVE)
                bc_mbar_arrive_expect_tx(bar, (unsigned)p.box_bytes);
            bc_tma_probe_load(p, p.map_global ? p.map_global : &p.map, tiles + b * BC_TMA_PROBE_MAX_BOX, bar, c);
        }
        bc_mbar_wait(bar, (unsigned)(p.fault == BC_TMA_FAULT_PARITY ? b ^ 1 : b));
        const unsigned char* box = tiles + b * BC_TMA_PROBE_MAX_BOX;
        for (int i = 4 * t; i < p.box_bytes; i += 4 * TP_NT)
            *reinterpret_cast<unsigned*>(p.out + b * p.box_bytes + i) = *reinterpret_cast<const unsigned*>(box + i);
        __syncthreads();
    }
#else
    __trap();
#endif
}
BC_EMU_ENTRY(bc_tma_probe, BcTmaProbeParams)
