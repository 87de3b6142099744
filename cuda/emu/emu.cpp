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

enum State { kRunnable, kAtBarrier, kAtCollective, kExited, kFailed };

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
    // cp.async: pending copies (oldest first) and the end index of each committed group
    struct Copy {
        void* dst;
        unsigned char data[16];
    };
    std::vector<Copy> cp_pending;
    std::vector<size_t> cp_groups;
};

struct Block {
    std::vector<Fiber> fibers;
    char* stacks = nullptr;
    size_t stacks_n = 0;
    Ctx sched;
    void (*body)(const void*) = nullptr;
    const void* arg = nullptr;
    int code = 0;
    std::string error;
    std::vector<uint64_t> smem;  // dynamic shared memory (operator new: 16-byte aligned)
    size_t smem_bytes = 0;
    std::vector<unsigned char> xbuf;  // warp_exchange slots: [warp][parity][lane][32 bytes]

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

const dim3& thread_idx() { return tls_fiber->tid; }
int lane_id() { return tls_fiber->linear & 31; }

static void set_error(Block* b, int code, const char* fmt, ...) {
    if (b->code) return;
    char buf[512];
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

int syncthreads_count(int pred, const char* file, int line) {
    Fiber* f = tls_fiber;
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

unsigned activemask() {
    Block* b = tls_block;
    int base = tls_fiber->linear & ~31;
    unsigned m = 0;
    for (int i = 0; i < 32 && base + i < (int)b->fibers.size(); ++i)
        if (b->fibers[base + i].state != kExited) m |= 1u << i;
    return m;
}

void* dynamic_smem() { return tls_block->smem.data(); }
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
    std::memcpy(c.data, src, 16);
    std::memset(dst, 0xff, 16);
    tls_fiber->cp_pending.push_back(c);
}

void cp_async_commit() {
    Fiber* f = tls_fiber;
    f->cp_groups.push_back(f->cp_pending.size());
}

void cp_async_wait(int n) {
    Fiber* f = tls_fiber;
    size_t done = f->cp_pending.size();  // wait_all
    if (n >= 0) {
        const size_t groups = f->cp_groups.size();
        if (groups <= (size_t)n) return;
        done = f->cp_groups[groups - 1 - (size_t)n];
    }
    for (size_t i = 0; i < done; ++i) std::memcpy(f->cp_pending[i].dst, f->cp_pending[i].data, 16);
    f->cp_pending.erase(f->cp_pending.begin(), f->cp_pending.begin() + (std::ptrdiff_t)done);
    size_t kept = 0;
    for (size_t g : f->cp_groups)
        if (g > done) f->cp_groups[kept++] = g - done;
    f->cp_groups.resize(kept);
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
        for (int l = 0; l < 32; ++l) {
            if (!(m >> l & 1u)) continue;
            int t = base + l;
            if (t >= n) {
                set_error(b, 2, "%s at %s:%d: mask 0x%08x names lane %d, which is outside the block", kind_name(f.kind),
                          f.file, f.line, m, l);
                return resolved;
            }
            const Fiber& g = b->fibers[t];
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
            if (g.state != kAtCollective || g.kind != f.kind || g.mask != m || g.width != f.width) {
                set_error(b, 2,
                          "warp collective mismatch: lane %d is at %s (mask 0x%08x) at %s:%d, lane %d at %s (mask 0x%08x) "
                          "at %s:%d",
                          lane, kind_name(f.kind), m, f.file, f.line, l, kind_name(g.kind), g.mask, g.file, g.line);
                return resolved;
            }
        }
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

// Runs one block to completion; returns 0 or an error code (message in b->error).
static int run_block(Block* b) {
    int n = (int)b->fibers.size();
    for (int i = 0; i < n; ++i) {
        Fiber& f = b->fibers[i];
        f.state = kRunnable;
        f.result = 0;
        f.xpar = 0;
        f.cp_pending.clear();
        f.cp_groups.clear();
        ctx_make(&f.ctx, b->stack(i), kStackBytes, fiber_main);
    }
    // Uninitialised shared memory: poison dynamic shared memory with NaNs.
    std::fill(b->smem.begin(), b->smem.end(), 0x7fc07fc07fc07fc0ull);
    for (unsigned round = 0;; ++round) {
        // Alternate the order threads run in between scheduling points (forward, backward), so
        // a missing barrier shows up whichever side of the race the kernel got wrong.
        for (int k = 0; k < n; ++k) {
            const int i = (round & 1) ? n - 1 - k : k;
            Fiber& f = b->fibers[i];
            if (f.state != kRunnable) continue;
            tls_fiber = &f;
            ctx_switch(&b->sched, &f.ctx);
            tls_fiber = nullptr;
            if (b->code) return b->code;
        }
        int exited = 0, at_bar = 0, at_coll = 0;
        for (auto& f : b->fibers) {
            exited += f.state == kExited;
            at_bar += f.state == kAtBarrier;
            at_coll += f.state == kAtCollective;
        }
        if (exited == n) return 0;
        if (at_coll) {
            int r = resolve_collectives(b);
            if (b->code) return b->code;
            if (r) continue;
            set_error(b, 2, "unresolvable warp collective");
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
    b->smem.assign((d->shared_bytes + 15) / 16 * 2, 0);
    b->smem_bytes = d->shared_bytes;
    b->xbuf.assign((size_t)(n + 31) / 32 * 2 * 32 * 32, 0);
    b->body = s->body;
    b->arg = s->arg;
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
        if (run_block(b)) {
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
}  // namespace

int launch(const BcLaunchDims* dims, void (*body)(const void*), const void* arg, char* err, size_t errlen) {
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
