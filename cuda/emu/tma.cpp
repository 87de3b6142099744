// Emulated mbarrier and TMA tile-mode loads (see tma.h for the model, docs/wgmma.md "TMA and
// mbarrier" for where each rule comes from). Per-block state lives in thread_local variables:
// a block runs on one OS thread from start to end, its fibers on that thread.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

// After the standard headers: emu.h defines CUDA keywords as macros.
#include "emu.h"
#include "tma.h"

#include "../include/params.h"

namespace emu {
namespace {

struct Mbar {
    unsigned expected = 0;  // arrivals per phase
    unsigned pending = 0;   // arrivals still missing in the current phase
    long long tx = 0;       // tx-count of the current phase (expected minus completed bytes)
    uint64_t phases = 0;    // completed phases (the current phase's parity is phases & 1)
};

// One in-flight bulk copy: the bytes (read at issue, already swizzled / zero-filled) and where
// they go.
struct Flight {
    unsigned char* dst;
    std::vector<unsigned char> data;
    size_t bar;  // index into BlockState::bars
    const char* file;
    int line;
};

// One cp.async.mbarrier.arrive whose copies have not landed: its thread's cp.async up to `upto`
// land, then one arrival on `bar`, when the scheduler finds every thread blocked (tma_progress).
struct CpArrive {
    size_t bar;
    int thread;
    uint64_t upto;
    const char* file;
    int line;
};

struct BlockState {
    std::vector<uintptr_t> addrs;  // shared address of each initialised barrier
    std::vector<Mbar> bars;
    std::vector<Flight> flights;
    std::vector<CpArrive> cp_arrives;
    std::string error;
};
thread_local BlockState st;

// The barrier at `bar` (8-byte aligned, in dynamic shared memory, initialised); fails otherwise.
size_t find_bar(void* bar, bool init, const char* file, int line) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(bar), base = reinterpret_cast<uintptr_t>(dynamic_smem());
    if (a % 8 || a < base || a + 8 > base + dynamic_smem_bytes())
        fail("mbarrier not 8-byte aligned in dynamic shared memory", file, line);
    for (size_t i = 0; i < st.addrs.size(); ++i)
        if (st.addrs[i] == a) return i;
    if (!init) fail("mbarrier used before mbarrier.init", file, line);
    st.addrs.push_back(a);
    st.bars.emplace_back();
    return st.bars.size() - 1;
}

// Completes the current phase of `m` when its arrivals and bytes are all in; true when it did.
bool maybe_complete(Mbar& m) {
    if (m.pending == 0 && m.tx == 0) {
        ++m.phases;
        m.pending = m.expected;
        return true;
    }
    return false;
}

struct WaitCtx {
    size_t bar;
    uint64_t target;  // ready once more than `target` phases completed
};
bool wait_ready(void* p) {
    const WaitCtx* w = static_cast<const WaitCtx*>(p);
    return st.bars[w->bar].phases > w->target;
}

const char* swizzle_name(unsigned s) { return s == 128 ? "128B" : s == 64 ? "64B" : s == 32 ? "32B" : "none"; }
}  // namespace

void mbar_init(void* bar, unsigned count, const char* file, int line) {
    if (count == 0 || count > (1u << 20) - 1) fail("mbarrier.init with a count outside [1, 2^20 - 1]", file, line);
    const size_t i = find_bar(bar, true, file, line);
    for (const Flight& f : st.flights)
        if (f.bar == i) fail("mbarrier.init of a barrier with bulk copies in flight", file, line);
    for (const CpArrive& a : st.cp_arrives)
        if (a.bar == i) fail("mbarrier.init of a barrier with cp.async.mbarrier.arrive copies in flight", file, line);
    Mbar& m = st.bars[i];
    m = Mbar();
    m.expected = m.pending = count;
    std::memset(bar, 0, 8);  // the object's bytes (opaque on the device)
}

void mbar_arrive(void* bar, unsigned tx, bool arrive, const char* file, int line) {
    Mbar& m = st.bars[find_bar(bar, false, file, line)];
    if (tx > (1u << 20) - 1) fail("mbarrier expect_tx of more than 2^20 - 1 bytes", file, line);
    m.tx += tx;
    if (!arrive) return;
    // mbarrier.arrive has .release semantics (PTX ISA, "mbarrier.arrive"): the cp.async data this
    // thread saw land is published to whoever acquires the phase (try_wait).
    publish_landed_self();
    if (m.pending == 0)
        fail("mbarrier.arrive on a phase that has all its arrivals (it waits for bytes only)", file, line);
    --m.pending;
    // The arrival that completes a phase lets the threads it released run first (yield_last):
    // a producer that published a stage before its cp.async copies landed (a wait_group too
    // early) still has them pending when the consumers issue their wgmma on it, which the
    // emulation reports as a race, instead of landing them at its next wait_group first.
    if (maybe_complete(m)) yield_last();
}

void mbar_cp_arrive(void* bar, bool noinc, const char* file, int line) {
    const size_t i = find_bar(bar, false, file, line);
    Mbar& m = st.bars[i];
    // Without .noinc the pending count is incremented first, so the arrive-on leaves the phase's
    // count as it was (PTX ISA, "cp.async.mbarrier.arrive").
    if (!noinc) ++m.pending;
    int thread = 0;
    uint64_t upto = 0;
    if (cp_async_track(&thread, &upto) && (m.phases & 1u) == 0) {
        // Even phase: the copies land (and the arrival counts) as late as possible, once every
        // thread of the block is blocked; a waiter that reads them without the phase sees NaN or
        // a reported race.
        st.cp_arrives.push_back(CpArrive{i, thread, upto, file, line});
        return;
    }
    // Nothing pending (the arrive-on is due now), or an odd phase: the copies land at once (the
    // fastest possible ones), so the thread's next arrival may complete the phase before it runs
    // on: a store it makes after its arrivals (unreleased) is then read stale.
    cp_async_land_tracked(thread, upto);
    if (m.pending == 0)
        fail("cp.async.mbarrier.arrive.noinc on a phase that has all its arrivals (more arrivals than the init count)",
             file, line);
    --m.pending;
    if (maybe_complete(m)) yield_last();
}

void mbar_wait(void* bar, unsigned parity, const char* file, int line) {
    const size_t i = find_bar(bar, false, file, line);
    const Mbar& m = st.bars[i];
    // try_wait.parity p succeeds once the phase of parity p has completed: at once when the
    // current (incomplete) phase has the other parity.
    if ((m.phases & 1u) != (parity & 1u)) return;
    WaitCtx w{i, m.phases};
    wait_until(wait_ready, &w, "an mbarrier phase", file, line);
}

void tma_load(void* dst, const void* map, void* bar, const int* coords, int rank, const char* file, int line) {
    const size_t bi = find_bar(bar, false, file, line);
    const BcEmuTensorMap* t = static_cast<const BcEmuTensorMap*>(map);
    if (reinterpret_cast<uintptr_t>(map) % 64) fail("tensor map not 64-byte aligned", file, line);
    if (t->magic != BC_EMU_TENSOR_MAP_MAGIC) fail("not an emulation tensor map (BcEmuTensorMap magic)", file, line);
    if ((int)t->rank != rank) fail("cp.async.bulk.tensor rank differs from the tensor map's", file, line);
    if (t->interleave || t->oob_fill) fail("tensor map interleave / NaN fill: not emulated", file, line);
    const unsigned eb = t->elem_bytes, sw = t->swizzle_bytes;
    unsigned n[5] = {1, 1, 1, 1, 1};
    size_t bytes = eb;
    for (int i = 0; i < rank; ++i) {
        n[i] = (t->box_dim[i] + t->element_strides[i] - 1) / t->element_strides[i];
        bytes *= n[i];
    }
    const size_t row = (size_t)n[0] * eb;  // bytes of one box row in shared memory
    if (sw && row != sw) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "TMA box rows of %zu bytes with the %s swizzle: only rows of exactly the swizzle span are emulated",
                 row, swizzle_name(sw));
        fail(msg, file, line);
    }
    // Shared destination: 128-byte aligned (the ISA's rule), and, swizzled, on the pattern's
    // 8 * span period (the swizzle is taken on address bits 4.. and 7.., as wgmma's).
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), base = reinterpret_cast<uintptr_t>(dynamic_smem());
    if (d < base || d + bytes > base + dynamic_smem_bytes())
        fail("TMA destination box outside dynamic shared memory", file, line);
    const unsigned win = kSmemWindowBase + (unsigned)(d - base);
    if (win % 128) fail("TMA destination not 128-byte aligned", file, line);
    if (sw && win % (8 * sw)) {
        char msg[160];
        snprintf(msg, sizeof msg, "TMA destination 0x%x not on the %u-byte period of the %s swizzle", win, 8 * sw,
                 swizzle_name(sw));
        fail(msg, file, line);
    }
    const unsigned mask = sw == 128 ? 7u : sw == 64 ? 3u : sw == 32 ? 1u : 0u;
    Flight f;
    f.dst = static_cast<unsigned char*>(dst);
    f.data.assign(bytes, 0);
    f.bar = bi;
    f.file = file;
    f.line = line;
    const unsigned char* g = reinterpret_cast<const unsigned char*>(t->global_address);
    size_t off = 0;  // linear offset of the box element (dense, dimension 0 innermost)
    for (unsigned j4 = 0; j4 < n[4]; ++j4)
        for (unsigned j3 = 0; j3 < n[3]; ++j3)
            for (unsigned j2 = 0; j2 < n[2]; ++j2)
                for (unsigned j1 = 0; j1 < n[1]; ++j1)
                    for (unsigned j0 = 0; j0 < n[0]; ++j0, off += eb) {
                        const unsigned j[5] = {j0, j1, j2, j3, j4};
                        bool in = true;
                        size_t src = 0;
                        for (int i = 0; i < rank; ++i) {
                            const long long c = (long long)coords[i] + (long long)j[i] * t->element_strides[i];
                            if (c < 0 || c >= (long long)t->global_dim[i]) in = false;
                            src += (size_t)c * (i == 0 ? eb : t->global_strides[i - 1]);
                        }
                        const size_t o = off ^ (((off >> 7) & mask) << 4);
                        if (in)
                            std::memcpy(&f.data[o], g + src, eb);  // OOB elements stay zero
                    }
    std::memset(dst, 0xff, bytes);  // NaN until the copy lands
    async_write(dst, bytes, true);   // reading the box before it lands is a race (emu.cpp)
    st.flights.push_back(std::move(f));
}

void tma_block_begin() {
    st.addrs.clear();
    st.bars.clear();
    st.flights.clear();
    st.cp_arrives.clear();
}

bool tma_progress() {
    if (st.flights.empty() && st.cp_arrives.empty()) return false;
    // The tracked cp.async land, then their arrive-on counts (on the phase current now).
    for (const CpArrive& a : st.cp_arrives) {
        cp_async_land_tracked(a.thread, a.upto);
        Mbar& m = st.bars[a.bar];
        if (m.pending == 0) {
            char msg[240];
            snprintf(msg, sizeof msg,
                     "cp.async.mbarrier.arrive.noinc at %s:%d (thread %d): its arrive-on found a phase that has all its "
                     "arrivals (more arrivals than the init count)", a.file, a.line, a.thread);
            report_error(msg);
            break;
        }
        --m.pending;
        maybe_complete(m);
    }
    st.cp_arrives.clear();
    for (Flight& f : st.flights) {
        std::memcpy(f.dst, f.data.data(), f.data.size());
        async_write(f.dst, f.data.size(), false);
        Mbar& m = st.bars[f.bar];
        m.tx -= (long long)f.data.size();
        maybe_complete(m);
    }
    st.flights.clear();
    return true;
}

const char* tma_block_end() {
    if (!st.cp_arrives.empty()) {
        char msg[200];
        snprintf(msg, sizeof msg, "cp.async.mbarrier.arrive at %s:%d: its copies still in flight when the block exited "
                 "(nobody waited for its mbarrier phase)", st.cp_arrives[0].file, st.cp_arrives[0].line);
        st.error = msg;
        return st.error.c_str();
    }
    if (st.flights.empty()) return nullptr;
    char msg[200];
    snprintf(msg, sizeof msg, "cp.async.bulk.tensor at %s:%d still in flight when the block exited (nobody waited for "
             "its mbarrier phase)", st.flights[0].file, st.flights[0].line);
    st.error = msg;
    return st.error.c_str();
}

}  // namespace emu
