// SIMT emulation of the Hopper asynchronous-copy machinery, from the PTX ISA: the shared-memory
// mbarrier ("Parallel Synchronization and Communication Instructions: mbarrier": init,
// arrive, expect_tx, arrive.expect_tx, try_wait.parity, phases and the transaction count) and
// the tensor-memory-accelerator tile-mode loads ("cp.async.bulk.tensor", "Tensor Access
// Modes: Tiled", "Tensor Map", swizzle modes, out-of-bound fill). The device wrappers are in
// cuda/include/tma.cuh; docs/wgmma.md ("TMA and mbarrier") says what is modelled and how.
//
// The model:
// - an mbarrier is 8 bytes of dynamic shared memory whose state lives in a per-block side
//   table (expected arrivals, pending arrivals, tx-count, completed phases); a phase completes
//   when its pending arrivals reach 0 and its tx-count is 0, then the next phase starts with
//   the expected arrivals again;
// - a bulk tensor copy reads global memory when it is issued, fills its shared-memory box with
//   0xff bytes (NaN for bf16 / f32) at once, and stays in flight: only when no thread of the
//   block can run any more (every one waits somewhere) do the in-flight copies land (write
//   their bytes, then complete_tx their byte count on their mbarrier), so a thread that reads
//   the box without waiting for the phase reads NaN, and a phase that waits on bytes nobody
//   announced (a missing expect_tx) completes early or never;
// - waiting for a phase that can never complete (every thread blocked, nothing in flight) is
//   a reported deadlock; copies still in flight when the block exits are an error.
#ifndef BC_EMU_TMA_H
#define BC_EMU_TMA_H

#include <cstdint>

namespace emu {
/// Blocks the calling thread (a scheduling point) until `ready(ctx)` holds; the scheduler
/// re-checks it between rounds. `what` names the wait in the deadlock report. Defined in
/// emu.cpp (the scheduler); used by the mbarrier waits.
void wait_until(bool (*ready)(void*), void* ctx, const char* what, const char* file, int line);
/// A scheduling point after which the calling thread runs again only once no other thread of the
/// block can make progress (all blocked or exited); used by the arrival that completes an
/// mbarrier phase, so the threads it released run first. Defined in emu.cpp.
void yield_last();

/// `mbarrier.init.shared::cta.b64 [bar], count`: phase 0, `count` pending arrivals, tx-count 0.
void mbar_init(void* bar, unsigned count, const char* file, int line);
/// `mbarrier.expect_tx` (`tx` bytes more expected in the current phase) when `tx` > 0, then,
/// when `arrive`, `mbarrier.arrive` (one arrival): together `mbarrier.arrive.expect_tx`.
void mbar_arrive(void* bar, unsigned tx, bool arrive, const char* file, int line);
/// `cp.async.mbarrier.arrive{.noinc}.shared::cta.b64 [bar]` (PTX ISA, "cp.async.mbarrier.arrive"):
/// the barrier tracks every prior cp.async of the calling thread and an arrive-on happens when
/// they have all completed; without .noinc the pending count is raised by one first (the
/// arrival then does not count against the init count). Emulated: with none of them pending the
/// arrival happens now; otherwise the copies land (written, released by the arrival) and the
/// arrival counts at a point the emulation chooses: at once when the barrier is in an odd phase
/// (the fastest copies), when every thread of the block is blocked in an even one (the slowest).
/// A wgmma reading the landed data needs fence.proxy.async of its threads after the landing.
void mbar_cp_arrive(void* bar, bool noinc, const char* file, int line);
/// `mbarrier.try_wait.parity` in a loop: returns once the phase of parity `parity` has
/// completed (immediately when the barrier's current phase has the other parity).
void mbar_wait(void* bar, unsigned parity, const char* file, int line);
/// `cp.async.bulk.tensor.<rank>d.shared::cluster.global.mbarrier::complete_tx::bytes
/// [dst], [map, {coords}], [bar]` in tile mode; `map` points to a BcTensorMap holding a
/// BcEmuTensorMap (params.h).
void tma_load(void* dst, const void* map, void* bar, const int* coords, int rank, const char* file, int line);

/// Scheduler hooks (emu.cpp): a new block starts (no barriers, nothing in flight) ...
void tma_block_begin();
/// ... every thread is blocked: land the in-flight copies (TMA boxes, and the cp.async tracked by
/// cp.async.mbarrier.arrive, counting their arrivals); true when any landed ...
bool tma_progress();
/// ... every thread exited: null, or why that is an error (copies or tracked arrivals still in
/// flight).
const char* tma_block_end();
}  // namespace emu

#endif
