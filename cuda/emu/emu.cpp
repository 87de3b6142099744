// Runtime of the SIMT emulation layer (see emu.h): fibers, the per-block scheduler that
// resolves barriers and warp collectives, deadlock/divergence detection, and the launcher
// that spreads blocks over OS threads.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// After the standard headers: emu.h defines CUDA keywords (__noinline__, ...) as macros.
#include "emu.h"

// Fiber context switches. glibc's swapcontext saves and restores the signal mask, a system
// call per switch, and a block switches at every barrier and warp collective of every thread:
// on x86-64 a few instructions that swap the callee-saved registers and the stack pointer do
// the same job without one. Elsewhere (or with BC_EMU_UCONTEXT) ucontext is used.
#if defined(__x86_64__) && !defined(BC_EMU_UCONTEXT)
#define BC_EMU_FAST_SWITCH 1
extern "C" void bc_emu_switch(void** save_sp, void* load_sp);
// Pushes rbp, rbx, r12-r15 and the SSE/x87 control words, stores rsp in *save_sp, loads
// load_sp and pops the same from there. A fresh fiber's stack is laid out by ctx_make to look
// like one that called bc_emu_switch, with its entry function as the return address.
asm(R"(
    .pushsection .text
    .globl bc_emu_switch
    .hidden bc_emu_switch
    .type bc_emu_switch, @function
bc_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size bc_emu_switch, .-bc_emu_switch
    .popsection
)");
#else
#include <ucontext.h>
#endif

#include "../include/params.h"
#include "tma.h"

namespace emu {

namespace {
#ifdef BC_EMU_FAST_SWITCH
struct Ctx {
    void* sp = nullptr;
};

void ctx_switch(Ctx* from, Ctx* to) { bc_emu_switch(&from->sp, to->sp); }

// A context that starts `entry` (which never returns) on the stack [stack, stack + bytes).
void ctx_make(Ctx* c, char* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = (uintptr_t)(stack + bytes) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;           // entry's own return address: none (top - 8)
    *--sp = (void*)entry;      // bc_emu_switch returns here (top - 16, 16-byte aligned)
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
    uint32_t mxcsr;
    uint16_t fcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fcw));
    --sp;
    std::memcpy(sp, &mxcsr, 4);
    std::memcpy((char*)sp + 4, &fcw, 2);
    c->sp = sp;
}
#else
struct Ctx {
    ucontext_t uc;
};

void ctx_switch(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }

void ctx_make(Ctx* c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = bytes;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}
#endif

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;

// kAtWait: blocked in wait_until (an mbarrier wait, cuda/emu/tma.cpp) until its predicate holds.
// kDeferred: runnable, but only once no other thread can make progress (yield_last: the thread
// whose mbarrier.arrive completed a phase lets the threads it released run first).
enum State { kRunnable, kAtBarrier, kAtCollective, kAtWarpgroup, kAtNamedBar, kExited, kFailed, kAtWait, kDeferred };

const char* kind_name(int kind) {
    static const char* names[] = {"__shfl_sync",   "__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync",
                                  "__ballot_sync", "__syncwarp",      "__match_any_sync"};
    return (kind >= 0 && kind < 7) ? names[kind] : "?";
}
}  // namespace

struct Fiber {
    Ctx ctx;
    dim3 tid;
    int linear = 0;
    State state = kRunnable;
    State stopped = kRunnable;  // the state it last yielded to the scheduler in (for messages)
    const char* file = nullptr;
    int line = 0;
    // barrier
    int pred = 0;
    int bar_result = 0;
    // collective
    int kind = 0;
    unsigned mask = 0;
    uint64_t value = 0;
    int arg = 0;
    int width = 32;
    uint64_t result = 0;
    // warp_exchange buffer parity
    int xpar = 0;
    // the named barrier this thread waits at (kAtNamedBar)
    int nb_id = 0;
    // 16-byte chunks of dynamic shared memory this thread's cp.async landed (at its wait) that
    // it has not yet published by arriving at a barrier (Block::unpub)
    std::vector<size_t> landed;
    // setmaxnreg calls of this thread, in order: +count for .inc, -count for .dec (every warp of a
    // warpgroup must execute the same sequence)
    std::vector<int> nreg;
    // cp.async: pending copies (oldest first) and the end index of each committed group
    struct Copy {
        void* dst;
        unsigned char data[16];
        uint64_t seq;  // this thread's cp.async count at its issue (cp_async_track / land_tracked)
    };
    std::vector<Copy> cp_pending;
    std::vector<size_t> cp_groups;
    uint64_t cp_seq = 0;
    // Block::mbar_land_seq at this thread's last fence.proxy.async (a wgmma may read data that
    // cp.async.mbarrier.arrive landed only after the issuing threads fenced: Block::proxy_landed)
    uint64_t proxy_fenced = 0;
    // At a warpgroup op (kAtWarpgroup): its kind (WgKind), argument and, for an mma, operands.
    int wg_kind = 0;
    int wg_arg = 0;
    struct WgIssue {
        float* d = nullptr;
        int n = 0;
        uint64_t da = 0, db = 0;
        int scale_d = 0;
        bool a_regs = false;
        unsigned a[4] = {0, 0, 0, 0};
        int trans_b = 0;  // 1: B MN-major (imm-trans-b = 1)
    } wg;
    // At wait_until (kAtWait): the predicate, its argument and what is waited for.
    bool (*wait_ready)(void*) = nullptr;
    void* wait_ctx = nullptr;
    const char* wait_what = nullptr;
};

// One queued wgmma.mma_async of a warpgroup: operands of its 128 threads.
struct WgOp {
    int n = 0;
    uint64_t da = 0, db = 0;
    int scale_d = 0;
    bool a_regs = false;
    int trans_b = 0;
    const char* file = nullptr;
    int line = 0;
    float* d[128];
    unsigned a[128][4];
    std::vector<float> cin;  // [128][n/2]: D before the op (the input when scale_d != 0)
    bool chained[128];       // D's input comes from the previous queued op on the same registers
    std::vector<unsigned char> unpub;  // Block::unpub when the op was issued (its reads must be visible then)
    uint64_t issued_at = 0;  // Block::async_seq when the op was issued (see Block::async_stamp)
    uint64_t fenced = 0;     // the lowest Fiber::proxy_fenced of its 128 threads at issue
};

// The wgmma state of one warpgroup: queued mma ops, oldest first, and the queue lengths at
// each commit (like the cp.async groups).
struct Warpgroup {
    std::vector<WgOp> pending;
    std::vector<size_t> groups;
};

// One named barrier of a block (bar.sync / bar.arrive id, count): the phase in progress.
struct NamedBar {
    int count = 0;                  // threads the phase waits for (0: no arrival yet)
    int arrived = 0;                // arrivals so far
    const char* file = nullptr;     // where the phase's first arrival came from
    int line = 0;
    std::vector<unsigned char> in;  // per thread: arrived in this phase
};

struct Block {
    std::vector<Fiber> fibers;
    NamedBar nbars[kNamedBarriers];
    // setmaxnreg: per-thread registers the block's pool holds (released by .dec, taken by .inc)
    long nreg_free = 0;
    char* stacks = nullptr;
    size_t stacks_n = 0;
    Ctx sched;
    void (*body)(const void*) = nullptr;
    const void* arg = nullptr;
    int code = 0;
    std::string error;
    std::vector<uint64_t> smem;  // backing store of dynamic shared memory (see smem_base)
    unsigned char* smem_base = nullptr;  // dynamic shared memory, at kSmemWindowBase modulo 1024
    size_t smem_bytes = 0;
    // Per 16-byte chunk of dynamic shared memory: a cp.async landed there at its issuer's wait,
    // and the issuer has not arrived at a barrier since: other threads, and wgmma's async proxy,
    // may not see it yet (a wgmma reading it is an error).
    std::vector<unsigned char> unpub;
    // Per 16-byte chunk of dynamic shared memory: asynchronous writes into it issued and not yet
    // landed (cp.async before its wait_group, a TMA box before it lands), and the sequence
    // number (async_seq, counted per block) of the last one issued. A read through a wgmma
    // descriptor or ldmatrix of a chunk with a write pending is a race (the write lands at any
    // time before its wait on hardware), and so is a write issued into a chunk that a wgmma
    // issued before it reads before its wait_group completes (async_stamp > WgOp::issued_at).
    std::vector<uint32_t> async_pending;
    std::vector<uint64_t> async_stamp;
    uint64_t async_seq = 0;
    // Per 16-byte chunk: the landing number (mbar_land_seq) when a cp.async tracked by an
    // mbarrier (cp.async.mbarrier.arrive) landed there, 0 when its last write landed otherwise.
    // Such data reaches the readers through the mbarrier phase (release / acquire), not through
    // a fence of the copying thread: a wgmma may read it only once each of its threads executed
    // fence.proxy.async after the landing (in practice: after its mbarrier wait).
    std::vector<uint64_t> proxy_landed;
    uint64_t mbar_land_seq = 0;
    std::vector<Warpgroup> wgs;  // per warpgroup (128 threads) of the block
    std::vector<unsigned char> xbuf;  // warp_exchange slots: [warp][parity][lane][32 bytes]
    // Step budget of this launch's blocks (0: off; see run_block) and the launch's stop flag
    // (another block failed: this one stops at its next round).
    uint64_t step_budget = 0;
    uint64_t step_per_thread = 0;
    const std::atomic<bool>* stop = nullptr;

    ~Block() {
        if (stacks) munmap(stacks, stacks_n * (kStackBytes + kGuardBytes));
    }
    bool ensure_stacks(size_t n) {
        if (n <= stacks_n) return true;
        if (stacks) munmap(stacks, stacks_n * (kStackBytes + kGuardBytes));
        size_t per = kStackBytes + kGuardBytes;
        void* p = mmap(nullptr, n * per, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            stacks = nullptr;
            stacks_n = 0;
            return false;
        }
        stacks = static_cast<char*>(p);
        stacks_n = n;
        for (size_t i = 0; i < n; ++i) mprotect(stacks + i * per, kGuardBytes, PROT_NONE);  // overflow guard
        return true;
    }
    char* stack(size_t i) { return stacks + i * (kStackBytes + kGuardBytes) + kGuardBytes; }
};

thread_local Fiber* tls_fiber = nullptr;
thread_local dim3 tls_block_idx;
thread_local dim3 tls_block_dim;
thread_local dim3 tls_grid_dim;
static thread_local Block* tls_block = nullptr;
thread_local uint64_t tls_steps_left = UINT64_MAX;

const dim3& thread_idx() { return tls_fiber->tid; }
int lane_id() { return tls_fiber->linear & 31; }

static void set_error(Block* b, int code, const char* fmt, ...) {
    if (b->code) return;
    char buf[896];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    b->code = code;
    char where[96];
    snprintf(where, sizeof where, " (block %u,%u,%u)", tls_block_idx.x, tls_block_idx.y, tls_block_idx.z);
    b->error = std::string(buf) + where;
}

static void yield_to_scheduler() {
    Fiber* f = tls_fiber;
    ctx_switch(&f->ctx, &tls_block->sched);
}

static void fiber_main() {
    Block* b = tls_block;
    b->body(b->arg);
    tls_fiber->state = kExited;
    yield_to_scheduler();
    std::abort();  // an exited fiber is never resumed
}

void syncthreads(const char* file, int line) { (void)syncthreads_count(0, file, line); }

// A barrier arrival of `f` (__syncthreads, bar.sync, bar.arrive) publishes the cp.async data
// that landed at its waits before.
static void publish_landed(Block* b, Fiber* f) {
    for (size_t c : f->landed) b->unpub[c] = 0;
    f->landed.clear();
}

void publish_landed_self() { publish_landed(tls_block, tls_fiber); }

// Registers per thread a launch of `n` threads allocates when the kernel uses setmaxnreg: the
// most __launch_bounds__(n, 1) allows (65536 / n, down to the allocation granularity of 8, at
// most 256), which is the count ptxas gives such kernels.
static int launch_nreg(size_t n) { return (int)std::min<size_t>(256, 65536 / n / 8 * 8); }

struct NregWait {
    Block* b;
    long need;
};
static bool nreg_ready(void* p) {
    const NregWait* w = static_cast<const NregWait*>(p);
    return w->b->nreg_free >= w->need;
}

void setmaxnreg(bool inc, int count, const char* file, int line) {
    Block* b = tls_block;
    Fiber* f = tls_fiber;
    const char* op = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
    if (count < 24 || count > 256 || count % 8) {
        set_error(b, 1, "%s %d at %s:%d: the count must be a multiple of 8 in [24, 256]", op, count, file, line);
        f->state = kFailed;
        yield_to_scheduler();
        std::abort();
    }
    if (b->fibers.size() % 128) {
        set_error(b, 1, "%s at %s:%d: a block of %zu threads is not whole warpgroups", op, file, line, b->fibers.size());
        f->state = kFailed;
        yield_to_scheduler();
        std::abort();
    }
    // The previous setmaxnreg of this thread (if any) set its current maximum: .inc may only raise
    // it, .dec only lower it (the launch's own count is not known here).
    const int cur = f->nreg.empty() ? launch_nreg(b->fibers.size()) : std::abs(f->nreg.back());
    if (inc ? count < cur : count > cur) {
        set_error(b, 1, "%s %d at %s:%d (thread %d): the current maximum is %d", op, count, file, line, f->linear,
                  cur);
        f->state = kFailed;
        yield_to_scheduler();
        std::abort();
    }
    f->nreg.push_back(inc ? count : -count);
    // The block's pool holds what the launch allocated: .dec returns registers to it, .inc blocks
    // until it has the registers asked for (a wait that can never end is a reported deadlock,
    // e.g. roles whose counts add up to more than the launch allocation).
    if (inc) {
        // (every waiter whose need fits is woken at once: check again when this one runs, and
        // take the registers before the next scheduling point)
        NregWait w{b, (long)(count - cur)};
        while (!nreg_ready(&w))
            wait_until(nreg_ready, &w, "registers in the block's pool (setmaxnreg.inc)", file, line);
        b->nreg_free -= count - cur;
    } else {
        b->nreg_free += cur - count;
    }
}

int syncthreads_count(int pred, const char* file, int line) {
    Fiber* f = tls_fiber;
    publish_landed(tls_block, f);
    f->state = kAtBarrier;
    f->file = file;
    f->line = line;
    f->pred = pred ? 1 : 0;
    yield_to_scheduler();
    return f->bar_result;
}

uint64_t warp_collective(int kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Fiber* f = tls_fiber;
    f->state = kAtCollective;
    f->kind = kind;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->width = width;
    f->file = file;
    f->line = line;
    yield_to_scheduler();
    return f->result;
}

void fail(const char* what, const char* file, int line) {
    Fiber* f = tls_fiber;
    set_error(tls_block, 3, "%s at %s:%d, thread (%u,%u,%u)", what, file, line, f->tid.x, f->tid.y, f->tid.z);
    f->state = kFailed;
    yield_to_scheduler();
    std::abort();
}

void wait_until(bool (*ready)(void*), void* ctx, const char* what, const char* file, int line) {
    if (ready(ctx)) return;
    Fiber* f = tls_fiber;
    f->state = kAtWait;
    f->wait_ready = ready;
    f->wait_ctx = ctx;
    f->wait_what = what;
    f->file = file;
    f->line = line;
    yield_to_scheduler();
}

void yield_last() {
    Fiber* f = tls_fiber;
    f->state = kDeferred;
    yield_to_scheduler();
}

// Makes every thread at wait_until whose predicate now holds runnable; returns how many.
static int wake_waiters(Block* b) {
    int woken = 0;
    for (auto& f : b->fibers)
        if (f.state == kAtWait && f.wait_ready(f.wait_ctx)) {
            f.state = kRunnable;
            ++woken;
        }
    return woken;
}

unsigned activemask() {
    Block* b = tls_block;
    int base = tls_fiber->linear & ~31;
    unsigned m = 0;
    for (int i = 0; i < 32 && base + i < (int)b->fibers.size(); ++i)
        if (b->fibers[base + i].state != kExited) m |= 1u << i;
    return m;
}

void* dynamic_smem() { return tls_block->smem_base; }
size_t dynamic_smem_bytes() { return tls_block->smem_bytes; }

const unsigned char* warp_exchange(const void* data, size_t bytes, const char* file, int line) {
    Fiber* f = tls_fiber;
    if (bytes > 32) fail("warp_exchange of more than 32 bytes", file, line);
    const int warp = f->linear / 32, lane = f->linear % 32;
    unsigned char* base = tls_block->xbuf.data() + (size_t)(warp * 2 + f->xpar) * 32 * 32;
    std::memcpy(base + 32 * lane, data, bytes);
    f->xpar ^= 1;
    (void)warp_collective(5, 0xffffffffu, 0, 0, 32, file, line);
    return base;
}

void cp_async16(void* dst, const void* src, const char* file, int line) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16)
        fail("cp.async with an address that is not 16-byte aligned", file, line);
    Fiber::Copy c;
    c.dst = dst;
    c.seq = ++tls_fiber->cp_seq;
    std::memcpy(c.data, src, 16);
    std::memset(dst, 0xff, 16);
    tls_fiber->cp_pending.push_back(c);
    async_write(dst, 16, true);
}

// The 16-byte chunks [first, end) of dynamic shared memory that bytes [p, p + bytes) touch;
// false when they lie outside it (static __shared__ memory: not tracked).
static bool smem_chunks(const Block* b, const void* p, size_t bytes, size_t* first, size_t* end) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(b->smem_base);
    if (bytes == 0 || a < base || a - base >= b->smem_bytes) return false;
    *first = (a - base) / 16;
    *end = std::min((a - base + bytes + 15) / 16, b->async_pending.size());
    return true;
}

void async_write(const void* dst, size_t bytes, bool issue) {
    Block* b = tls_block;
    size_t c0, c1;
    if (!smem_chunks(b, dst, bytes, &c0, &c1)) return;
    if (issue) {
        const uint64_t seq = ++b->async_seq;
        for (size_t c = c0; c < c1; ++c) {
            ++b->async_pending[c];
            b->async_stamp[c] = seq;
            b->proxy_landed[c] = 0;
        }
    } else {
        for (size_t c = c0; c < c1; ++c)
            if (b->async_pending[c]) --b->async_pending[c];
    }
}

void check_async_read(const void* p, size_t bytes, const char* what, const char* file, int line) {
    const Block* b = tls_block;
    size_t c0, c1;
    if (!smem_chunks(b, p, bytes, &c0, &c1)) return;
    for (size_t c = c0; c < c1; ++c)
        if (b->async_pending[c]) {
            char msg[320];
            snprintf(msg, sizeof msg,
                     "race: %s reads shared address 0x%zx while an asynchronous copy into it (cp.async before its "
                     "wait_group, or a TMA load before it landed) is pending",
                     what, (size_t)kSmemWindowBase + 16 * c);
            fail(msg, file, line);
        }
}

void cp_async_commit() {
    Fiber* f = tls_fiber;
    f->cp_groups.push_back(f->cp_pending.size());
}

// Lands the oldest `done` pending copies of `f`. At its own wait (`land` 0) a chunk is
// unpublished until the thread arrives at a barrier (Fiber::landed); tracked by an mbarrier
// (`land` = the landing number, cp.async.mbarrier.arrive) the arrive-on that follows releases it,
// and the readers' fence.proxy.async is checked instead (Block::proxy_landed).
static void cp_land(Block* b, Fiber* f, size_t done, uint64_t land) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(b->smem_base);
    for (size_t i = 0; i < done; ++i) {
        std::memcpy(f->cp_pending[i].dst, f->cp_pending[i].data, 16);
        const uintptr_t a = reinterpret_cast<uintptr_t>(f->cp_pending[i].dst);
        if (a >= base && a - base < b->smem_bytes) {
            const size_t c = (a - base) / 16;
            if (land) {
                b->unpub[c] = 0;
            } else {
                b->unpub[c] = 1;
                f->landed.push_back(c);
            }
            b->proxy_landed[c] = land;
            if (b->async_pending[c]) --b->async_pending[c];
        }
    }
    f->cp_pending.erase(f->cp_pending.begin(), f->cp_pending.begin() + (std::ptrdiff_t)done);
    size_t kept = 0;
    for (size_t g : f->cp_groups)
        if (g > done) f->cp_groups[kept++] = g - done;
    f->cp_groups.resize(kept);
}

void cp_async_wait(int n) {
    Fiber* f = tls_fiber;
    size_t done = f->cp_pending.size();  // wait_all
    if (n >= 0) {
        const size_t groups = f->cp_groups.size();
        if (groups <= (size_t)n) return;
        done = f->cp_groups[groups - 1 - (size_t)n];
    }
    cp_land(tls_block, f, done, 0);
}

bool cp_async_track(int* thread, uint64_t* upto) {
    Fiber* f = tls_fiber;
    *thread = f->linear;
    *upto = f->cp_seq;
    return !f->cp_pending.empty();
}

void cp_async_land_tracked(int thread, uint64_t upto) {
    Block* b = tls_block;
    Fiber* f = &b->fibers[(size_t)thread];
    size_t done = 0;
    while (done < f->cp_pending.size() && f->cp_pending[done].seq <= upto) ++done;
    cp_land(b, f, done, ++b->mbar_land_seq);
}

void fence_proxy_async() { tls_fiber->proxy_fenced = tls_block->mbar_land_seq; }

void report_error(const char* what) { set_error(tls_block, 3, "%s", what); }

void named_barrier(int id, int count, bool wait, const char* file, int line) {
    Block* b = tls_block;
    Fiber* f = tls_fiber;
    const int n = (int)b->fibers.size();
    const char* op = wait ? "bar.sync" : "bar.arrive";
    if (id <= 0 || id >= kNamedBarriers) {
        set_error(b, 1, "%s %d, %d at %s:%d (thread %d): named barrier ids are 1..%d here (0 is __syncthreads')", op,
                  id, count, file, line, f->linear, kNamedBarriers - 1);
        f->state = kFailed;
        yield_to_scheduler();
        std::abort();
    }
    if (count <= 0 || count % 32 || count > n) {
        set_error(b, 1, "%s %d, %d at %s:%d (thread %d): the thread count must be a multiple of 32 in [32, %d]", op, id,
                  count, file, line, f->linear, n);
        f->state = kFailed;
        yield_to_scheduler();
        std::abort();
    }
    publish_landed(b, f);
    NamedBar& nb = b->nbars[id];
    if (nb.in.size() != (size_t)n) nb.in.assign((size_t)n, 0);
    if (nb.arrived == 0) {
        nb.count = count;
        nb.file = file;
        nb.line = line;
    } else if (nb.count != count) {
        set_error(b, 1, "named barrier %d: thread %d arrives at %s:%d with count %d, the phase began with count %d at %s:%d",
                  id, f->linear, file, line, count, nb.count, nb.file, nb.line);
        f->state = kFailed;
        yield_to_scheduler();
        std::abort();
    }
    if (nb.in[(size_t)f->linear]) {
        set_error(b, 1, "named barrier %d: thread %d arrives twice in one phase (%s at %s:%d; %d of %d arrived)", id,
                  f->linear, op, file, line, nb.arrived, nb.count);
        f->state = kFailed;
        yield_to_scheduler();
        std::abort();
    }
    nb.in[(size_t)f->linear] = 1;
    if (++nb.arrived == nb.count) {
        // Phase complete: every warp that took part must have arrived whole (.aligned).
        for (int w = 0; w < n; w += 32) {
            int k = 0, lanes = std::min(32, n - w);
            for (int l = 0; l < lanes; ++l) k += nb.in[(size_t)(w + l)];
            if (k != 0 && k != lanes) {
                set_error(b, 1, "named barrier %d completed at %s:%d with %d of %d lanes of warp %d arrived (the "
                          "instruction is .aligned: whole warps)",
                          id, file, line, k, lanes, w / 32);
                f->state = kFailed;
                yield_to_scheduler();
                std::abort();
            }
        }
        for (auto& g : b->fibers)
            if (g.state == kAtNamedBar && g.nb_id == id) g.state = kRunnable;
        std::fill(nb.in.begin(), nb.in.end(), 0);
        nb.arrived = 0;
        nb.count = 0;
        return;
    }
    if (!wait) return;
    f->state = kAtNamedBar;
    f->nb_id = id;
    f->file = file;
    f->line = line;
    yield_to_scheduler();
}

// Describes the phase of named barrier `id` in progress (for deadlock messages), then any other
// barrier with a phase in progress.
static std::string named_barrier_state(const Block* b, int id) {
    std::string r;
    for (int k = 0; k < kNamedBarriers; ++k) {
        const int i = (id + k) % kNamedBarriers;
        const NamedBar& nb = b->nbars[i];
        if (k > 0 && nb.arrived == 0) continue;
        char buf[192];
        snprintf(buf, sizeof buf, "%snamed barrier %d: %d of %d threads arrived (first at %s:%d)", k ? "; " : "", i,
                 nb.arrived, nb.count, nb.file ? nb.file : "?", nb.line);
        r += buf;
    }
    return r;
}

// Resolves every warp collective whose mask has fully arrived. Returns the number resolved;
// sets an error for collectives that can never complete.
static int resolve_collectives(Block* b) {
    int n = (int)b->fibers.size();
    int resolved = 0;
    for (int i = 0; i < n && !b->code; ++i) {
        Fiber& f = b->fibers[i];
        if (f.state != kAtCollective) continue;
        int base = i & ~31, lane = i & 31;
        unsigned m = f.mask;
        if (!(m >> lane & 1u)) {
            set_error(b, 2, "%s at %s:%d: mask 0x%08x omits the calling lane %d (thread %d)", kind_name(f.kind), f.file,
                      f.line, m, lane, i);
            return resolved;
        }
        if (f.width <= 0 || f.width > 32 || (f.width & (f.width - 1))) {
            set_error(b, 2, "%s at %s:%d: width %d is not a power of two <= 32", kind_name(f.kind), f.file, f.line,
                      f.width);
            return resolved;
        }
        bool waiting = false;  // a lane of the mask is at wait_until: it may still arrive
        for (int l = 0; l < 32 && !waiting; ++l) {
            if (!(m >> l & 1u)) continue;
            int t = base + l;
            if (t >= n) {
                set_error(b, 2, "%s at %s:%d: mask 0x%08x names lane %d, which is outside the block", kind_name(f.kind),
                          f.file, f.line, m, l);
                return resolved;
            }
            const Fiber& g = b->fibers[t];
            if (g.state == kAtWait || g.state == kDeferred) {
                waiting = true;
                break;
            }
            if (g.state == kExited) {
                set_error(b, 2, "%s at %s:%d: mask 0x%08x names lane %d, which has exited", kind_name(f.kind), f.file,
                          f.line, m, l);
                return resolved;
            }
            if (g.state == kAtBarrier) {
                set_error(b, 2, "%s at %s:%d: mask 0x%08x names lane %d, which waits at __syncthreads at %s:%d (deadlock)",
                          kind_name(f.kind), f.file, f.line, m, l, g.file, g.line);
                return resolved;
            }
            if (g.state == kAtNamedBar) {
                set_error(b, 2, "%s at %s:%d: mask 0x%08x names lane %d, which waits at named barrier %d at %s:%d (deadlock)",
                          kind_name(f.kind), f.file, f.line, m, l, g.nb_id, g.file, g.line);
                return resolved;
            }
            if (g.state != kAtCollective || g.kind != f.kind || g.mask != m || g.width != f.width) {
                set_error(b, 2,
                          "warp collective mismatch: lane %d is at %s (mask 0x%08x) at %s:%d, lane %d at %s (mask 0x%08x) "
                          "at %s:%d",
                          lane, kind_name(f.kind), m, f.file, f.line, l, kind_name(g.kind), g.mask, g.file, g.line);
                return resolved;
            }
        }
        if (waiting) continue;
        // All lanes of the mask are here: compute every lane's result.
        unsigned ballot = 0;
        for (int l = 0; l < 32; ++l)
            if (m >> l & 1u && b->fibers[base + l].value) ballot |= 1u << l;
        for (int l = 0; l < 32; ++l) {
            if (!(m >> l & 1u)) continue;
            Fiber& g = b->fibers[base + l];
            int w = g.width, seg = l & ~(w - 1), src = l;
            switch (g.kind) {
                case 0:
                    src = seg + (g.arg & (w - 1));
                    break;
                case 1:
                    src = l ^ g.arg;
                    if (src < seg || src >= seg + w) src = l;
                    break;
                case 2:
                    src = l + g.arg;
                    if (src >= seg + w) src = l;
                    break;
                case 3:
                    src = l - g.arg;
                    if (src < seg) src = l;
                    break;
                default:
                    break;
            }
            if (g.kind <= 3) {
                if (src < 0 || src > 31 || !(m >> src & 1u)) {
                    set_error(b, 2, "%s at %s:%d: lane %d reads lane %d, which is not in mask 0x%08x", kind_name(g.kind),
                              g.file, g.line, l, src, m);
                    return resolved;
                }
                g.result = b->fibers[base + src].value;
            } else if (g.kind == 4) {
                g.result = ballot;
            } else if (g.kind == 6) {
                unsigned eq = 0;
                for (int k = 0; k < 32; ++k)
                    if (m >> k & 1u && b->fibers[base + k].value == g.value) eq |= 1u << k;
                g.result = eq;
            }
        }
        for (int l = 0; l < 32; ++l)
            if (m >> l & 1u) b->fibers[base + l].state = kRunnable;
        ++resolved;
    }
    return resolved;
}

// ---- wgmma (Hopper warpgroup MMA), from the PTX ISA ---------------------------------------

unsigned smem_window_addr(const void* p, const char* file, int line) {
    const Block* b = tls_block;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(b->smem_base);
    if (a < base || a > base + b->smem_bytes)
        fail("shared-window address of a pointer outside dynamic shared memory (the emulated wgmma reads "
             "dynamic shared memory only)",
             file, line);
    return kSmemWindowBase + (unsigned)(a - base);
}

void wgmma_sync(int kind, int arg, const char* file, int line) {
    Fiber* f = tls_fiber;
    f->state = kAtWarpgroup;
    f->wg_kind = kind;
    f->wg_arg = arg;
    f->file = file;
    f->line = line;
    yield_to_scheduler();
}

void wgmma_mma(float* d, int n, uint64_t desc_a, const unsigned* a_regs, uint64_t desc_b, int scale_d,
               const char* file, int line) {
    wgmma_mma_tb(d, n, desc_a, a_regs, desc_b, scale_d, 0, file, line);
}

void wgmma_mma_tb(float* d, int n, uint64_t desc_a, const unsigned* a_regs, uint64_t desc_b, int scale_d,
                  int trans_b, const char* file, int line) {
    Fiber::WgIssue& w = tls_fiber->wg;
    w.trans_b = trans_b ? 1 : 0;
    w.d = d;
    w.n = n;
    w.da = a_regs ? 0 : desc_a;
    w.db = desc_b;
    w.scale_d = scale_d ? 1 : 0;
    w.a_regs = a_regs != nullptr;
    for (int i = 0; i < 4; ++i) w.a[i] = a_regs ? a_regs[i] : 0;
    wgmma_sync(kWgMma, 0, file, line);
}

static const char* wg_kind_name(int k) {
    switch (k) {
        case kWgFence:
            return "wgmma.fence";
        case kWgCommit:
            return "wgmma.commit_group";
        case kWgWait:
            return "wgmma.wait_group";
        default:
            return "wgmma.mma_async";
    }
}

// Matrix descriptor fields (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address,
// 16-29 leading dimension byte offset, 32-45 stride dimension byte offset (each >> 4), 49-51
// base offset, 62-63 swizzle (0 none, 1 128B, 2 64B, 3 32B); the rest is reserved (0).
struct WgDesc {
    unsigned start, lbo, sbo, base_offset;
    int swizzle;
};

static WgDesc wg_decode(uint64_t d) {
    WgDesc r;
    r.start = (unsigned)(d & 0x3FFFu) << 4;
    r.lbo = (unsigned)((d >> 16) & 0x3FFFu) << 4;
    r.sbo = (unsigned)((d >> 32) & 0x3FFFu) << 4;
    r.base_offset = (unsigned)((d >> 49) & 7u);
    r.swizzle = (int)(d >> 62);
    return r;
}

// Reads the 16-column K-major operand of `rows` rows that descriptor `desc` describes into
// out[rows][16] (floats). The hardware model: the address of element (row, k) is formed from
// the descriptor (no swizzle: 8x16-byte core matrices, row groups SBO apart, k chunks LBO apart;
// swizzled with row width W: rows W bytes apart in 8-row groups SBO apart, LBO unused), then the
// swizzle XORs address bits 4.. (the 16-byte chunk) with bits 7.. (128B: 3 bits, 64B: 2, 32B: 1).
// Returns false (error set) on a descriptor the emulation refuses or an address outside
// dynamic shared memory.
// The checks every descriptor passes: no reserved bits, base offset 0 (not emulated).
static bool wg_desc_ok(Block* b, const WgOp& op, uint64_t desc, const char* what) {
    if ((desc >> 14 & 3u) || (desc >> 30 & 3u) || (desc >> 46 & 7u) || (desc >> 52 & 0x3FFu)) {
        set_error(b, 3, "wgmma at %s:%d: %s descriptor 0x%016llx has reserved bits set", op.file, op.line, what,
                  (unsigned long long)desc);
        return false;
    }
    if (wg_decode(desc).base_offset) {
        set_error(b, 3, "wgmma at %s:%d: %s descriptor base offset %u (not emulated: align tiles instead)", op.file,
                  op.line, what, wg_decode(desc).base_offset);
        return false;
    }
    return true;
}

// Reads the bf16 at shared-window address `a` into `out`; false (error set) outside dynamic
// shared memory.
static bool wg_load(Block* b, const WgOp& op, unsigned a, const char* what, int r, int k, float* out) {
    if (a < kSmemWindowBase || a - kSmemWindowBase + 2 > b->smem_bytes) {
        set_error(b, 3, "wgmma at %s:%d: %s element (%d, %d) at shared address 0x%x is outside dynamic shared "
                  "memory [0x%x, 0x%zx)", op.file, op.line, what, r, k, a, kSmemWindowBase,
                  kSmemWindowBase + b->smem_bytes);
        return false;
    }
    if (b->async_stamp[(a - kSmemWindowBase) / 16] > op.issued_at) {
        set_error(b, 3, "race: wgmma at %s:%d: %s element (%d, %d) at shared address 0x%x: an asynchronous copy "
                  "(cp.async or TMA load) into it was issued after the wgmma and before the wgmma.wait_group that "
                  "completed it (the wgmma may read its operands until then)", op.file, op.line, what, r, k, a);
        return false;
    }
    if (op.unpub[(a - kSmemWindowBase) / 16]) {
        set_error(b, 3, "wgmma at %s:%d: %s element (%d, %d) at shared address 0x%x was written by a cp.async "
                  "whose thread had not arrived at a barrier after its wait_group when the wgmma was issued (not "
                  "visible to the other threads nor to wgmma)", op.file, op.line, what, r, k, a);
        return false;
    }
    uint16_t v;
    std::memcpy(&v, b->smem_base + (a - kSmemWindowBase), 2);
    *out = __bfloat162float(__ushort_as_bfloat16(v));
    return true;
}

// At issue (out == null in wg_read_kmajor / wg_read_mnmajor): the element at `a` (its 16-byte
// chunk) must have no asynchronous copy pending: on hardware the wgmma may read it at any time
// until its wait_group, and the copy may land at any time until the copying thread's wait.
static bool wg_check_pending(Block* b, const WgOp& op, unsigned a, const char* what, int r, int k) {
    if (a < kSmemWindowBase || a - kSmemWindowBase + 2 > b->smem_bytes) return true;  // reported at landing
    if (b->async_pending[(a - kSmemWindowBase) / 16]) {
        set_error(b, 3, "race: wgmma at %s:%d: %s element (%d, %d) at shared address 0x%x has an asynchronous copy "
                  "pending when the wgmma is issued (a cp.async its thread has not waited for, or a TMA load not "
                  "landed: e.g. a stage published before its copies landed)", op.file, op.line, what, r, k, a);
        return false;
    }
    if (b->proxy_landed[(a - kSmemWindowBase) / 16] > op.fenced) {
        set_error(b, 3, "wgmma at %s:%d: %s element (%d, %d) at shared address 0x%x was landed by a cp.async tracked "
                  "by an mbarrier (cp.async.mbarrier.arrive) and a thread of the warpgroup has not executed "
                  "fence.proxy.async since (generic-proxy data read by wgmma's async proxy: fence after the mbarrier "
                  "wait)", op.file, op.line, what, r, k, a);
        return false;
    }
    return true;
}

static bool wg_read_kmajor(Block* b, const WgOp& op, uint64_t desc, int rows, float* out, const char* what) {
    const WgDesc d = wg_decode(desc);
    if (!wg_desc_ok(b, op, desc, what)) return false;
    const unsigned w = d.swizzle == 1 ? 128u : d.swizzle == 2 ? 64u : d.swizzle == 3 ? 32u : 16u;
    const unsigned mask = d.swizzle == 1 ? 7u : d.swizzle == 2 ? 3u : d.swizzle == 3 ? 1u : 0u;
    if (d.swizzle) {
        // The 16 columns (32 bytes) stay in one swizzled row, and the start lies in the first row
        // of the pattern's 8W-byte period (otherwise the base offset would be needed).
        if (d.start % w + 32 > w || d.start % (8 * w) >= w) {
            set_error(b, 3,
                      "wgmma at %s:%d: %s descriptor start 0x%x is not in the first %u-byte row of a %u-byte swizzle "
                      "period (tiles must be %u-byte aligned)",
                      op.file, op.line, what, d.start, w, 8 * w, 8 * w);
            return false;
        }
    }
    const int step = out ? 1 : 8;  // the check at issue: one element per 16-byte chunk
    for (int r = 0; r < rows; ++r) {
        for (int k = 0; k < 16; k += step) {
            unsigned a;
            if (d.swizzle == 0) {
                a = d.start + (unsigned)(r / 8) * d.sbo + (unsigned)(k / 8) * d.lbo + (unsigned)(r % 8) * 16 +
                    (unsigned)(k % 8) * 2;
            } else {
                a = d.start + (unsigned)(r / 8) * d.sbo + (unsigned)(r % 8) * w + (unsigned)k * 2;
                a ^= ((a >> 7) & mask) << 4;
            }
            if (!(out ? wg_load(b, op, a, what, r, k, &out[r * 16 + k]) : wg_check_pending(b, op, a, what, r, k)))
                return false;
        }
    }
    return true;
}

// Reads the MN-major ("N-major", imm-trans-b = 1) B operand of N = `cols` columns x 16 k-rows
// that descriptor `desc` describes into out[cols][16] (the same [n][k] order as
// wg_read_kmajor). PTX ISA "Canonical Layouts", MN-major, T = 8 bf16 per 16 bytes:
//   no swizzle ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)): element (k, n) at start + (n/8) SBO +
//     (k/8) LBO + (k%8) 16 + (n%8) 2 (core matrices of 8 k-rows x 8 contiguous n);
//   swizzled, row width W, E = W/2 ((T,W/16,m),(8,k)):((1,T,LBO),(W/16 T,SBO)): at start +
//     (n/E) LBO + (k/8) SBO + (k%8) W + (n%E) 2, then the address swizzle (bits 4.. XOR bits 7..).
// LBO and SBO swap roles against K-major ("Leading / Stride Dimension Byte Offset"). Swizzled,
// the start must lie in the first W-byte row of its 8W-byte period and an atom's E columns
// (or all N when fewer) must stay inside that row.
static bool wg_read_mnmajor(Block* b, const WgOp& op, uint64_t desc, int cols, float* out, const char* what) {
    const WgDesc d = wg_decode(desc);
    if (!wg_desc_ok(b, op, desc, what)) return false;
    const unsigned w = d.swizzle == 1 ? 128u : d.swizzle == 2 ? 64u : d.swizzle == 3 ? 32u : 16u;
    const unsigned mask = d.swizzle == 1 ? 7u : d.swizzle == 2 ? 3u : d.swizzle == 3 ? 1u : 0u, e = w / 2;
    if (d.swizzle) {
        const unsigned span = 2 * std::min(e, (unsigned)cols);
        if (d.start % w + span > w || d.start % (8 * w) >= w) {
            set_error(b, 3,
                      "wgmma at %s:%d: %s MN-major descriptor start 0x%x: its %u-byte rows leave the first %u-byte "
                      "row of a %u-byte swizzle period (tiles must be %u-byte aligned)",
                      op.file, op.line, what, d.start, span, w, 8 * w, 8 * w);
            return false;
        }
    }
    const int step = out ? 1 : 8;  // the check at issue: one element per 16-byte chunk
    for (int n = 0; n < cols; n += step) {
        for (int k = 0; k < 16; ++k) {
            unsigned a;
            if (d.swizzle == 0) {
                a = d.start + (unsigned)(n / 8) * d.sbo + (unsigned)(k / 8) * d.lbo + (unsigned)(k % 8) * 16 +
                    (unsigned)(n % 8) * 2;
            } else {
                a = d.start + (unsigned)n / e * d.lbo + (unsigned)(k / 8) * d.sbo + (unsigned)(k % 8) * w +
                    (unsigned)n % e * 2;
                a ^= ((a >> 7) & mask) << 4;
            }
            if (!(out ? wg_load(b, op, a, what, k, n, &out[n * 16 + k]) : wg_check_pending(b, op, a, what, k, n)))
                return false;
        }
    }
    return true;
}

static float wg_bf16(unsigned reg, int hi) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)(hi ? reg >> 16 : reg & 0xffffu)));
}

// Executes queued op `op` of warpgroup `wg` (index j in its queue): reads A and B now, computes
// every thread's D fragment (m64nNk16 f32 layout: thread t, warp w = t/32, g = (t%32)/4,
// q = t%4, register i holds D[16w + g + 8((i>>1)&1)][8(i>>2) + 2q + (i&1)]) and writes it to the
// thread's registers, or hands it to the next queued op on the same registers.
static bool wg_land(Block* b, Warpgroup& wg, size_t j) {
    WgOp& op = wg.pending[j];
    const int n = op.n, r = n / 2;
    std::vector<float> fa(64 * 16), fb((size_t)n * 16);
    if (op.a_regs) {
        // A fragment: register x of lane l (g = l/4, q = l%4) holds row g + 8(x&1), columns
        // 2q + 8(x>>1) and +1 (low half first), of the warp's 16 rows.
        for (int row = 0; row < 64; ++row)
            for (int k = 0; k < 16; ++k) {
                const int w = row / 16, rl = row % 16;
                const int lane = 4 * (rl % 8) + (k % 8) / 2, x = rl / 8 + 2 * (k / 8);
                fa[row * 16 + k] = wg_bf16(op.a[32 * w + lane][x], k & 1);
            }
    } else if (!wg_read_kmajor(b, op, op.da, 64, fa.data(), "A")) {
        return false;
    }
    if (!(op.trans_b ? wg_read_mnmajor(b, op, op.db, n, fb.data(), "B")
                     : wg_read_kmajor(b, op, op.db, n, fb.data(), "B")))
        return false;
    std::vector<float> res((size_t)r);
    for (int t = 0; t < 128; ++t) {
        const int w = t / 32, g = (t % 32) / 4, q = t % 4;
        for (int i = 0; i < r; ++i) {
            const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
            float s = 0.f;
            for (int k = 0; k < 16; ++k) s += fa[row * 16 + k] * fb[col * 16 + k];
            res[i] = op.scale_d ? op.cin[(size_t)t * r + i] + s : s;
        }
        if (op.scale_d && op.chained[t]) {  // the op before it on these registers never landed
            set_error(b, 3, "wgmma at %s:%d: emulation error: chained accumulators without their input", op.file,
                      op.line);
            return false;
        }
        WgOp* next = nullptr;
        for (size_t m = j + 1; m < wg.pending.size() && !next; ++m)
            if (wg.pending[m].d[t] == op.d[t]) next = &wg.pending[m];
        if (next) {
            if (next->n != n) {
                set_error(b, 3, "wgmma at %s:%d: accumulators of an m64n%dk16 op reused by a queued m64n%dk16 op",
                          op.file, op.line, n, next->n);
                return false;
            }
            next->chained[t] = false;
            std::memcpy(&next->cin[(size_t)t * r], res.data(), sizeof(float) * (size_t)r);
        } else {
            std::memcpy(op.d[t], res.data(), sizeof(float) * (size_t)r);
        }
    }
    return true;
}

// Runs the warpgroup op that all 128 threads of the warpgroup starting at fiber `base` reached.
static bool wg_perform(Block* b, int base) {
    const Fiber& f0 = b->fibers[base];
    Warpgroup& wg = b->wgs[(size_t)base / 128];
    switch (f0.wg_kind) {
        case kWgFence:
            return true;
        case kWgCommit:
            wg.groups.push_back(wg.pending.size());
            return true;
        case kWgWait: {
            const size_t groups = wg.groups.size(), keep = (size_t)f0.wg_arg;
            if (groups <= keep) return true;
            const size_t done = wg.groups[groups - 1 - keep];
            for (size_t j = 0; j < done; ++j)
                if (!wg_land(b, wg, j)) return false;
            wg.pending.erase(wg.pending.begin(), wg.pending.begin() + (std::ptrdiff_t)done);
            size_t kept = 0;
            for (size_t g : wg.groups)
                if (g > done) wg.groups[kept++] = g - done;
            wg.groups.resize(kept);
            return true;
        }
        default:
            break;
    }
    const Fiber::WgIssue& i0 = f0.wg;
    if (i0.n < 8 || i0.n > 256 || i0.n % 8) {
        set_error(b, 3, "wgmma at %s:%d: N = %d is not a multiple of 8 in [8, 256]", f0.file, f0.line, i0.n);
        return false;
    }
    for (int t = 0; t < 128; ++t) {
        const Fiber::WgIssue& it = b->fibers[base + t].wg;
        if (it.n != i0.n || it.da != i0.da || it.db != i0.db || it.scale_d != i0.scale_d || it.a_regs != i0.a_regs ||
            it.trans_b != i0.trans_b) {
            set_error(b, 3,
                      "wgmma.mma_async at %s:%d: threads %d and %d of a warpgroup disagree (N %d/%d, descriptors "
                      "0x%llx/0x%llx and 0x%llx/0x%llx, scale-d %d/%d): the instruction is .aligned",
                      f0.file, f0.line, base, base + t, i0.n, it.n, (unsigned long long)i0.da,
                      (unsigned long long)it.da, (unsigned long long)i0.db, (unsigned long long)it.db, i0.scale_d,
                      it.scale_d);
            return false;
        }
    }
    WgOp op;
    op.n = i0.n;
    op.da = i0.da;
    op.db = i0.db;
    op.scale_d = i0.scale_d;
    op.a_regs = i0.a_regs;
    op.trans_b = i0.trans_b;
    op.file = f0.file;
    op.line = f0.line;
    op.unpub = b->unpub;
    op.issued_at = b->async_seq;
    op.fenced = b->fibers[base].proxy_fenced;
    for (int t = 1; t < 128; ++t) op.fenced = std::min(op.fenced, b->fibers[base + t].proxy_fenced);
    // The operands in shared memory must have no asynchronous copy pending now (and none may be
    // issued into them until the op lands: checked by wg_load).
    if (!op.a_regs && !wg_read_kmajor(b, op, op.da, 64, nullptr, "A")) return false;
    if (!(op.trans_b ? wg_read_mnmajor(b, op, op.db, op.n, nullptr, "B")
                     : wg_read_kmajor(b, op, op.db, op.n, nullptr, "B")))
        return false;
    const int r = op.n / 2;
    op.cin.assign((size_t)128 * r, 0.f);
    for (int t = 0; t < 128; ++t) {
        const Fiber::WgIssue& it = b->fibers[base + t].wg;
        op.d[t] = it.d;
        std::memcpy(op.a[t], it.a, sizeof it.a);
        bool queued = false;
        for (const WgOp& p : wg.pending) queued |= p.d[t] == it.d;
        op.chained[t] = queued;
        // D's current value is the input unless a queued op on the same registers will
        // provide it; then D reads as NaN until the op lands.
        if (!queued) std::memcpy(&op.cin[(size_t)t * r], it.d, sizeof(float) * (size_t)r);
        for (int i = 0; i < r; ++i) it.d[i] = std::nanf("");
    }
    wg.pending.push_back(std::move(op));
    return true;
}

// Resolves every warpgroup whose 128 threads all wait at the same wgmma op. Returns the number
// resolved; sets an error for ops that can never complete (or that the warpgroup disagrees on).
static int resolve_warpgroups(Block* b) {
    const int n = (int)b->fibers.size();
    int resolved = 0;
    for (int base = 0; base < n && !b->code; base += 128) {
        const Fiber* first = nullptr;
        for (int t = base; t < base + 128 && t < n && !first; ++t)
            if (b->fibers[t].state == kAtWarpgroup) first = &b->fibers[t];
        if (!first) continue;
        if (base + 128 > n) {
            set_error(b, 3, "%s at %s:%d in a block of %d threads: its warpgroup (threads %d..%d) is incomplete",
                      wg_kind_name(first->wg_kind), first->file, first->line, n, base, base + 127);
            return resolved;
        }
        bool ready = true;
        for (int t = base; t < base + 128; ++t) {
            const Fiber& g = b->fibers[t];
            if (g.state == kAtCollective || g.state == kAtNamedBar || g.state == kAtWait || g.state == kDeferred) {
                ready = false;  // may still arrive once its warp collective / named barrier / wait resolves
                continue;
            }
            if (g.state == kExited || g.state == kAtBarrier) {
                set_error(b, 3, "%s at %s:%d: thread %d of the warpgroup %s (deadlock)", wg_kind_name(first->wg_kind),
                          first->file, first->line, t, g.state == kExited ? "has exited" : "waits at __syncthreads");
                return resolved;
            }
            if (g.state == kAtWarpgroup &&
                (g.wg_kind != first->wg_kind || g.wg_arg != first->wg_arg || g.line != first->line ||
                 std::strcmp(g.file, first->file) != 0)) {
                set_error(b, 3, "divergent warpgroup: thread %d is at %s at %s:%d, thread %d at %s at %s:%d",
                          first->linear, wg_kind_name(first->wg_kind), first->file, first->line, t,
                          wg_kind_name(g.wg_kind), g.file, g.line);
                return resolved;
            }
        }
        if (!ready) continue;
        if (!wg_perform(b, base)) return resolved;
        for (int t = base; t < base + 128; ++t) b->fibers[t].state = kRunnable;
        ++resolved;
    }
    return resolved;
}

// ---- the step budget -----------------------------------------------------------------------
// A kernel that loops forever through scheduling points (a barrier, a warp collective, a wgmma
// op in every iteration) never deadlocks: the scheduler always has a thread to resume. So each
// block gets a budget of steps (tls_steps_left): one per resumption of a thread by the
// scheduler and one per emulated atomic (a thread spinning on atomics alone never yields).
// It is per thread of the block (BC_EMU_STEP_LIMIT, default kDefaultStepLimit, 0: off) times
// the block's threads; a block that spends it fails the launch with code 5 (LaunchErrorKind::
// StepLimit) and where its threads are. The count depends only on the block's own execution,
// so it is deterministic unless blocks share work dynamically (a persistent kernel claiming
// tiles through atomics: a block's count then depends on how many tiles it won).

// Steps per thread of a block when BC_EMU_STEP_LIMIT is not set: ~350x the most a test's block
// used when it was chosen (3018 per thread, bc_attention_hd128 in cross_attention_512_text_tokens;
// docs/wgmma.md, "The step budget"); the halo conv looping forever fails after ~1 minute.
constexpr uint64_t kDefaultStepLimit = uint64_t{1} << 20;

// What a thread waits at, or last waited at when it is runnable (for the step budget's message).
static const char* state_label(const Fiber& f) {
    switch (f.state == kRunnable && f.file ? f.stopped : f.state) {
        case kAtBarrier:
            return "__syncthreads";
        case kAtCollective:
            return kind_name(f.kind);
        case kAtWarpgroup:
            return wg_kind_name(f.wg_kind);
        case kAtNamedBar:
            return "bar.sync";
        case kAtWait:
            return f.wait_what ? f.wait_what : "a wait";
        case kDeferred:
            return "mbarrier.arrive";
        case kFailed:
            return "failed";
        case kRunnable:
            return f.file ? "runnable (yielded)" : "runnable (not started)";
        default:
            return "?";
    }
}

// Where the block's threads are, grouped by place ("256 at __syncthreads at f.cu:12; ..."; at
// most four places). `self` (if not null) is at `what` at file:line instead of its last place.
static std::string thread_places(const Block* b, const Fiber* self, const char* what, const char* file, int line) {
    struct Place {
        const char* label;
        const char* file;
        int line;
        int count;
        int first;
    };
    std::vector<Place> places;
    int exited = 0;
    for (const Fiber& f : b->fibers) {
        if (f.state == kExited) {
            ++exited;
            continue;
        }
        const bool me = &f == self;
        const char* l = me ? what : state_label(f);
        const char* fl = me ? file : f.file;
        const int ln = me ? line : f.line;
        bool found = false;
        for (Place& p : places)
            if (p.label == l && p.line == ln && (p.file == fl || (p.file && fl && !std::strcmp(p.file, fl)))) {
                ++p.count;
                found = true;
                break;
            }
        if (!found) places.push_back(Place{l, fl, ln, 1, f.linear});
    }
    std::string r;
    char buf[320];
    for (size_t i = 0; i < places.size() && i < 4; ++i) {
        const Place& p = places[i];
        if (p.count == 1)
            snprintf(buf, sizeof buf, "%sthread %d at %s at %s:%d", i ? "; " : "", p.first, p.label,
                     p.file ? p.file : "?", p.line);
        else
            snprintf(buf, sizeof buf, "%s%d threads (first %d) at %s at %s:%d", i ? "; " : "", p.count, p.first,
                     p.label, p.file ? p.file : "?", p.line);
        r += buf;
    }
    if (places.size() > 4) r += "; " + std::to_string(places.size() - 4) + " more places";
    if (exited) r += "; " + std::to_string(exited) + " exited";
    return r;
}

static void set_step_error(Block* b, const Fiber* self, const char* what, const char* file, int line) {
    set_error(b, 5,
              "step budget exceeded: %llu steps (thread resumptions and atomics) in one block, %llu per thread x %zu "
              "threads (BC_EMU_STEP_LIMIT: raise it, or 0 for off, if the kernel really runs this long): a kernel "
              "that loops forever? %s",
              (unsigned long long)b->step_budget, (unsigned long long)b->step_per_thread, b->fibers.size(),
              thread_places(b, self, what, file, line).c_str());
}

void step_budget_exceeded(const char* what, const char* file, int line) {
    Block* b = tls_block;
    Fiber* f = tls_fiber;
    if (!b || !f || !b->step_budget) {  // not in a launch (or off): no budget to exceed
        tls_steps_left = UINT64_MAX;
        return;
    }
    tls_steps_left = 0;
    set_step_error(b, f, what, file, line);
    f->state = kFailed;
    yield_to_scheduler();
    std::abort();  // a failed fiber is never resumed
}

// BC_EMU_STEP_STATS=1: the largest step count per thread of a block seen so far in the process,
// printed to stderr whenever it grows (to size the budget).
static bool step_stats_on() {
    static const bool on = [] {
        const char* e = std::getenv("BC_EMU_STEP_STATS");
        return e && *e && std::strcmp(e, "0") != 0;
    }();
    return on;
}

static void step_stats(const Block* b, uint64_t used, const char* kernel) {
    static std::atomic<uint64_t> max_per_thread{0};
    const uint64_t n = b->fibers.size(), per = (used + n - 1) / n;
    uint64_t cur = max_per_thread.load(std::memory_order_relaxed);
    while (per > cur && !max_per_thread.compare_exchange_weak(cur, per, std::memory_order_relaxed)) {
    }
    if (per > cur)
        fprintf(stderr, "bc_emu step stats: new max %llu steps per thread (%llu in a block of %llu threads, %s)\n",
                (unsigned long long)per, (unsigned long long)used, (unsigned long long)n, kernel ? kernel : "?");
}

// Runs one block to completion; returns 0 or an error code (message in b->error).
static int run_block(Block* b, const char* kernel) {
    int n = (int)b->fibers.size();
    for (int i = 0; i < n; ++i) {
        Fiber& f = b->fibers[i];
        f.state = kRunnable;
        f.stopped = kRunnable;
        f.file = nullptr;
        f.result = 0;
        f.xpar = 0;
        f.cp_pending.clear();
        f.cp_groups.clear();
        f.cp_seq = 0;
        f.proxy_fenced = 0;
        f.wg_kind = 0;
        f.nb_id = 0;
        f.landed.clear();
        f.nreg.clear();
        ctx_make(&f.ctx, b->stack(i), kStackBytes, fiber_main);
    }
    b->wgs.assign((size_t)(n + 127) / 128, Warpgroup());
    for (auto& nb : b->nbars) {
        nb.count = nb.arrived = 0;
        nb.file = nullptr;
        nb.line = 0;
        nb.in.assign((size_t)n, 0);
    }
    // Uninitialised shared memory: poison dynamic shared memory with NaNs.
    std::fill(b->smem.begin(), b->smem.end(), 0x7fc07fc07fc07fc0ull);
    b->unpub.assign(b->smem_bytes / 16 + 1, 0);
    b->async_pending.assign(b->smem_bytes / 16 + 1, 0);
    b->async_stamp.assign(b->smem_bytes / 16 + 1, 0);
    b->async_seq = 0;
    b->proxy_landed.assign(b->smem_bytes / 16 + 1, 0);
    b->mbar_land_seq = 0;
    b->nreg_free = 0;
    tma_block_begin();
    const uint64_t budget = b->step_budget ? b->step_budget : UINT64_MAX;
    tls_steps_left = budget;
    for (unsigned round = 0;; ++round) {
        if (b->stop->load(std::memory_order_relaxed)) {
            set_error(b, 4, "stopped: another block of the launch failed");  // (not reported)
            return b->code;
        }
        // Alternate the order threads run in between scheduling points (forward, backward), so
        // a missing barrier shows up whichever side of the race the kernel got wrong.
        for (int k = 0; k < n; ++k) {
            const int i = (round & 1) ? n - 1 - k : k;
            Fiber& f = b->fibers[i];
            if (f.state != kRunnable) continue;
            if (tls_steps_left-- == 0) {
                tls_steps_left = 0;
                set_step_error(b, nullptr, nullptr, nullptr, 0);
                return b->code;
            }
            tls_fiber = &f;
            ctx_switch(&b->sched, &f.ctx);
            tls_fiber = nullptr;
            f.stopped = f.state;
            if (b->code) return b->code;
        }
        int exited = 0, at_bar = 0, at_coll = 0, at_wg = 0, at_nb = 0, at_wait = 0, runnable = 0, deferred = 0;
        for (auto& f : b->fibers) {
            deferred += f.state == kDeferred;
            runnable += f.state == kRunnable;  // released by a named barrier after its turn
            at_nb += f.state == kAtNamedBar;
            exited += f.state == kExited;
            at_bar += f.state == kAtBarrier;
            at_coll += f.state == kAtCollective;
            at_wg += f.state == kAtWarpgroup;
            at_wait += f.state == kAtWait;
        }
        if (runnable) continue;
        if (exited == n) {
            if (const char* e = tma_block_end()) {
                set_error(b, 3, "%s", e);
                return b->code;
            }
            // setmaxnreg is .aligned per warpgroup: every thread of one ran the same sequence.
            for (int i = 0; i < n; ++i)
                if (b->fibers[i].nreg != b->fibers[(size_t)(i & ~127)].nreg) {
                    set_error(b, 1,
                              "setmaxnreg: thread %d ran %zu setmaxnreg, thread %d of its warpgroup %zu (or other "
                              "counts): the same setmaxnreg must be executed by all warps of a warpgroup",
                              i, b->fibers[i].nreg.size(), i & ~127, b->fibers[(size_t)(i & ~127)].nreg.size());
                    return b->code;
                }
            for (auto& w : b->wgs)
                if (!w.pending.empty()) {
                    set_error(b, 3, "wgmma.mma_async at %s:%d never waited for (no wgmma.wait_group completed it)",
                              w.pending[0].file, w.pending[0].line);
                    return b->code;
                }
            for (int id = 1; id < kNamedBarriers; ++id)
                if (b->nbars[id].arrived) {
                    set_error(b, 1, "%s when the block exits (arrivals nobody waited for)",
                              named_barrier_state(b, id).c_str());
                    return b->code;
                }
            if (step_stats_on()) step_stats(b, budget - tls_steps_left, kernel);
            return 0;
        }
        // Threads at an mbarrier wait whose phase has completed run at once, before the warp
        // collectives and wgmma ops of the others resolve: a thread released by an mbarrier runs
        // ahead into whatever the arriving threads do next, so an arrival that comes too early
        // (a stage released while a wgmma still has to read it) shows up as wrong data.
        if (at_wait && wake_waiters(b)) continue;
        if (at_coll || at_wg) {
            int r = at_coll ? resolve_collectives(b) : 0;
            if (b->code) return b->code;
            if (at_wg) r += resolve_warpgroups(b);
            if (b->code) return b->code;
            if (r) continue;
        }
        // A thread whose mbarrier.arrive completed a phase (yield_last) runs on only now that the
        // others are blocked: the threads it released have run (issued their wgmma, reached their
        // next wait) before it goes on to its next cp.async.wait_group, so a phase published
        // before its copies landed still has them pending when the consumers read the stage.
        if (deferred) {
            for (auto& f : b->fibers)
                if (f.state == kDeferred) f.state = kRunnable;
            continue;
        }
        if (at_coll || at_wg) {
            if (!at_wait) {
                if (at_nb) {
                    for (auto& f : b->fibers)
                        if (f.state == kAtNamedBar) {
                            set_error(b, 1, "deadlock: thread %d waits at %s:%d, %s; the other threads wait at warp "
                                      "collectives / wgmma ops that cannot complete",
                                      f.linear, f.file, f.line, named_barrier_state(b, f.nb_id).c_str());
                            break;
                        }
                    return b->code;
                }
                set_error(b, 2, at_coll ? "unresolvable warp collective" : "unresolvable wgmma warpgroup op");
                return b->code;
            }
        }
        if (at_wait) {
            // Threads at an mbarrier wait: wake those whose phase completed; when none did, every
            // thread is blocked, so the in-flight bulk copies land now (as late as possible).
            if (wake_waiters(b)) continue;
            if (tma_progress() && wake_waiters(b)) continue;
            // (name a setmaxnreg.inc waiter if there is one: the others usually wait for it)
            const Fiber* w = nullptr;
            for (auto& f : b->fibers)
                if (f.state == kAtWait && (!w || (!std::strncmp(f.wait_what, "registers", 9) &&
                                                  std::strncmp(w->wait_what, "registers", 9))))
                    w = &f;
            if (w) {
                set_error(b, 2, "deadlock: thread %d waits for %s at %s:%d, which can never complete (%d threads "
                          "at __syncthreads, %d exited)", w->linear, w->wait_what, w->file, w->line, at_bar, exited);
                return b->code;
            }
        }
        if (at_nb) {
            // Nothing can run: the waiters of a named barrier wait for threads that exited or wait
            // at __syncthreads (or at another named barrier).
            const Fiber* w = nullptr;
            for (auto& f : b->fibers)
                if (f.state == kAtNamedBar) {
                    w = &f;
                    break;
                }
            const Fiber* other = nullptr;
            for (auto& f : b->fibers)
                if (f.state == kAtBarrier) {
                    other = &f;
                    break;
                }
            if (other)
                set_error(b, 1, "deadlock: thread %d waits at %s:%d, %s; thread %d waits at __syncthreads at %s:%d", w->linear,
                          w->file, w->line, named_barrier_state(b, w->nb_id).c_str(), other->linear, other->file,
                          other->line);
            else
                set_error(b, 1, "deadlock: thread %d waits at %s:%d, %s; %d threads exited, %d wait at named barriers",
                          w->linear, w->file, w->line, named_barrier_state(b, w->nb_id).c_str(), exited, at_nb);
            return b->code;
        }
        // Only barrier waiters and exited threads remain.
        const Fiber* first = nullptr;
        const Fiber* other = nullptr;
        for (auto& f : b->fibers) {
            if (f.state != kAtBarrier) continue;
            if (!first)
                first = &f;
            else if (!other && (f.line != first->line || std::strcmp(f.file, first->file) != 0))
                other = &f;
        }
        if (exited) {
            set_error(b, 1, "divergent __syncthreads: %d of %d threads wait at %s:%d but %d threads exited without reaching it",
                      at_bar, n, first->file, first->line, exited);
            return b->code;
        }
        if (other) {
            set_error(b, 1, "divergent __syncthreads: thread %d waits at %s:%d, thread %d at %s:%d", first->linear,
                      first->file, first->line, other->linear, other->file, other->line);
            return b->code;
        }
        int count = 0;
        for (auto& f : b->fibers) count += f.pred;
        for (auto& f : b->fibers) {
            f.bar_result = count;
            f.state = kRunnable;
        }
    }
}

namespace {
struct Shared {
    const BcLaunchDims* dims;
    void (*body)(const void*);
    const void* arg;
    const char* kernel = nullptr;
    uint64_t step_budget = 0;      // per block (0: off)
    uint64_t step_per_thread = 0;  // BC_EMU_STEP_LIMIT (or the launching thread's override)
    std::atomic<uint64_t> next{0};
    std::atomic<bool> stop{false};
    std::mutex mu;
    int code = 0;
    std::string error;
};

void worker(Shared* s) {
    static thread_local Block block;  // reused by later launches on this thread, freed at its exit
    Block* b = &block;
    const BcLaunchDims* d = s->dims;
    int n = (int)(d->block[0] * d->block[1] * d->block[2]);
    if (!b->ensure_stacks((size_t)n)) {
        std::lock_guard<std::mutex> g(s->mu);
        if (!s->code) {
            s->code = 4;
            s->error = "emulation: cannot allocate fiber stacks";
        }
        s->stop = true;
        return;
    }
    b->fibers.assign((size_t)n, Fiber());
    for (int i = 0; i < n; ++i) {
        Fiber& f = b->fibers[i];
        f.linear = i;
        f.tid.x = (unsigned)i % d->block[0];
        f.tid.y = ((unsigned)i / d->block[0]) % d->block[1];
        f.tid.z = (unsigned)i / (d->block[0] * d->block[1]);
    }
    // 16-byte units, so the base is 16-byte aligned like a GPU's (ldmatrix, cp.async need it).
    // 1024 spare bytes place the base at kSmemWindowBase modulo 1024 (so that the emulated
    // window address and the host address agree in the bits the wgmma swizzles read).
    b->smem.assign((d->shared_bytes + 15) / 16 * 2 + 1024 / 8, 0);
    {
        uintptr_t p = reinterpret_cast<uintptr_t>(b->smem.data());
        const uintptr_t want = kSmemWindowBase % 1024;
        p += (want + 1024 - p % 1024) % 1024;
        b->smem_base = reinterpret_cast<unsigned char*>(p);
    }
    b->smem_bytes = d->shared_bytes;
    b->xbuf.assign((size_t)(n + 31) / 32 * 2 * 32 * 32, 0);
    b->body = s->body;
    b->arg = s->arg;
    b->step_budget = s->step_budget;
    b->step_per_thread = s->step_per_thread;
    b->stop = &s->stop;
    tls_block = b;
    tls_block_dim = dim3{d->block[0], d->block[1], d->block[2]};
    tls_grid_dim = dim3{d->grid[0], d->grid[1], d->grid[2]};
    uint64_t total = (uint64_t)d->grid[0] * d->grid[1] * d->grid[2];
    for (;;) {
        if (s->stop.load(std::memory_order_relaxed)) break;
        uint64_t idx = s->next.fetch_add(1);
        if (idx >= total) break;
        tls_block_idx = dim3{(unsigned)(idx % d->grid[0]), (unsigned)(idx / d->grid[0] % d->grid[1]),
                             (unsigned)(idx / ((uint64_t)d->grid[0] * d->grid[1]))};
        b->code = 0;
        b->error.clear();
        if (run_block(b, s->kernel)) {
            std::lock_guard<std::mutex> g(s->mu);
            if (!s->code) {
                s->code = b->code;
                s->error = b->error;
            }
            s->stop = true;
            break;
        }
    }
    tls_block = nullptr;
    tls_steps_left = UINT64_MAX;
}

// Helper threads that run `worker` for the launches of one launching thread.
class Pool {
  public:
    // Up to n helpers: a thread that cannot be started (resource limits) means fewer
    // helpers, not an exception escaping into Rust.
    explicit Pool(int n) {
        for (int i = 0; i < n; ++i) {
            try {
                threads_.emplace_back([this] { loop(); });
            } catch (...) {
                break;
            }
        }
    }
    ~Pool() {
        {
            std::lock_guard<std::mutex> g(mu_);
            quit_ = true;
        }
        wake_.notify_all();
        for (auto& t : threads_) t.join();
    }
    int size() const { return (int)threads_.size(); }

    // Runs `worker(s)` on `helpers` pool threads and the caller; returns when all are done.
    void run(Shared* s, int helpers) {
        {
            std::lock_guard<std::mutex> g(mu_);
            job_ = s;
            tickets_ = helpers;
            busy_ = helpers;
        }
        wake_.notify_all();
        worker(s);
        std::unique_lock<std::mutex> l(mu_);
        done_.wait(l, [this] { return busy_ == 0; });
        job_ = nullptr;
    }

  private:
    void loop() {
        for (;;) {
            Shared* s;
            {
                std::unique_lock<std::mutex> l(mu_);
                wake_.wait(l, [this] { return quit_ || tickets_ > 0; });
                if (quit_) return;
                --tickets_;
                s = job_;
            }
            worker(s);
            std::lock_guard<std::mutex> g(mu_);
            if (--busy_ == 0) done_.notify_all();
        }
    }

    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable wake_, done_;
    Shared* job_ = nullptr;
    int tickets_ = 0;
    int busy_ = 0;
    bool quit_ = false;
};

int worker_count(uint64_t blocks) {
    static int configured = [] {
        const char* e = std::getenv("BC_EMU_THREADS");
        int v = e ? std::atoi(e) : 0;
        if (v <= 0) v = (int)std::max(1u, std::thread::hardware_concurrency());
        return v;
    }();
    return (int)std::min<uint64_t>((uint64_t)configured, blocks);
}


// The step budget per thread of a block: BC_EMU_STEP_LIMIT (0: off; unset or not a number:
// kDefaultStepLimit), read once.
uint64_t env_step_limit() {
    static const uint64_t v = [] {
        const char* e = std::getenv("BC_EMU_STEP_LIMIT");
        if (!e || !*e) return kDefaultStepLimit;
        char* end = nullptr;
        const unsigned long long x = std::strtoull(e, &end, 10);
        const char* first = e;
        while (*first == ' ' || *first == '\t') ++first;
        if (end == e || *end || *first == '-' || x == ULLONG_MAX) {
            fprintf(stderr, "bc_emu: BC_EMU_STEP_LIMIT=%s is not a number: the default %llu applies\n", e,
                    (unsigned long long)kDefaultStepLimit);
            return kDefaultStepLimit;
        }
        return (uint64_t)x;
    }();
    return v;
}

// The calling thread's override of BC_EMU_STEP_LIMIT (bc_emu_set_step_limit; -1: none).
thread_local int64_t tl_step_limit = -1;
}  // namespace

int launch(const BcLaunchDims* dims, void (*body)(const void*), const void* arg, char* err, size_t errlen,
           const char* kernel) {
    auto report = [&](int code, const std::string& msg) {
        if (err && errlen) snprintf(err, errlen, "%s", msg.c_str());
        return code;
    };
    uint64_t threads = (uint64_t)dims->block[0] * dims->block[1] * dims->block[2];
    uint64_t blocks = (uint64_t)dims->grid[0] * dims->grid[1] * dims->grid[2];
    if (threads == 0 || threads > (uint64_t)kMaxThreads)
        return report(4, "invalid launch: " + std::to_string(threads) + " threads per block");
    if (dims->grid[1] > 65535 || dims->grid[2] > 65535) return report(4, "invalid launch: grid.y/z above 65535");
    if (dims->shared_bytes > 227 * 1024) return report(4, "invalid launch: too much dynamic shared memory");
    if (blocks == 0) return report(0, "");
    Shared s;
    s.dims = dims;
    s.body = body;
    s.arg = arg;
    s.kernel = kernel;
    s.step_per_thread = tl_step_limit >= 0 ? (uint64_t)tl_step_limit : env_step_limit();
    if (s.step_per_thread)
        s.step_budget = s.step_per_thread > (UINT64_MAX - 1) / threads ? UINT64_MAX - 1 : s.step_per_thread * threads;
    int nw = worker_count(blocks);
    if (nw > 1) {
        // One pool per launching thread, kept for its later launches (threads, fiber stacks
        // and block state are made once, not per launch); joined when that thread exits.
        thread_local std::unique_ptr<Pool> pool;
        if (!pool || pool->size() < nw - 1) pool.reset(new Pool(nw - 1));
        pool->run(&s, std::min(nw - 1, pool->size()));
    } else {
        worker(&s);
    }
    return report(s.code, s.error);
}

}  // namespace emu

// Sets the step budget per thread of the calling thread's later launches (overriding
// BC_EMU_STEP_LIMIT; 0: off), or removes the override (limit < 0); returns the previous
// override (-1: none). For tests: other threads' launches keep theirs.
extern "C" int64_t bc_emu_set_step_limit(int64_t limit) {
    const int64_t prev = emu::tl_step_limit;
    emu::tl_step_limit = limit < 0 ? -1 : limit;
    return prev;
}
