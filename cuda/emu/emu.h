// SIMT emulation layer: lets every cuda/*.cu compile as host C++17 (g++ -DBC_EMU) and run
// on the CPU with CUDA semantics, for testing kernels without a GPU.
//
// Model: a launch runs its blocks on a few OS threads (blocks of one OS thread run one
// after the other; the helper threads are a pool kept per launching thread, so their fiber
// stacks are made once); the threads of a block are cooperatively scheduled fibers (switched
// without a system call on x86-64, ucontext elsewhere). A fiber runs
// until it reaches a scheduling point — `__syncthreads`, a warp collective (`__shfl*_sync`,
// `__ballot_sync`, `__any_sync`, `__all_sync`, `__syncwarp`, `__match_any_sync`) — or exits.
// When no fiber can run, pending warp collectives whose whole mask has arrived are resolved,
// then a barrier is released if every thread of the block waits at the same `__syncthreads`
// (same source line). Threads run in increasing order between scheduling points in even
// rounds and in decreasing order in odd rounds, so shared-memory races from a missing barrier
// tend to show up as wrong results in the tests. Anything else is a deadlock on hardware and is reported as an error
// (returned through the launcher to Rust): a barrier that some threads exited without or
// reached at different lines, a collective whose mask names exited lanes, lanes outside the
// block, lanes that wait elsewhere, or disagrees between lanes, or whose mask omits the
// calling lane. `__trap()` and `BC_EMU_CHECK` failures are errors too, and so is a block that
// spends its step budget (a kernel looping forever through scheduling points or atomics, which
// never deadlocks: one step per thread resumption and per atomic, BC_EMU_STEP_LIMIT per thread
// of the block; emu.cpp, "the step budget").
//
// `__shared__` variables are `static thread_local`: one copy per OS thread, i.e. per block
// being run, shared by that block's fibers. `threadIdx`, `blockIdx`, `blockDim`, `gridDim`
// are per fiber / per OS thread. Atomics are real atomics (blocks run in parallel).
//
// Tensor-core instructions (mma.sync m16n8k16 bf16, ldmatrix, cp.async) are emulated behind the
// device functions of cuda/include/mma.cuh: an mma or ldmatrix is one warp exchange (one
// scheduling point, `warp_exchange`), and cp.async copies land only at the wait that completes
// their group (the destination reads as NaN before). The Hopper warpgroup MMA (wgmma, see
// cuda/include/wgmma.cuh) is emulated from the PTX ISA: each wgmma op is a warpgroup rendezvous
// (all 128 threads of the warpgroup, at the same op with the same descriptors); an mma is queued
// and lands (reads shared memory through its descriptors, writes D) when a wait_group completes
// its group, D reading as NaN until then; mma ops never waited for are an error at block exit.
// Descriptors hold shared-window addresses: dynamic shared memory starts at window address
// kSmemWindowBase (deliberately not 1024-byte aligned, like an unknown hardware offset, so a
// kernel must align swizzled tiles itself). The mbarrier and TMA tile loads are emulated in
// tma.h / tma.cpp (hooked into the scheduler); the other Hopper-only features are not. Named
// barriers (`bar.sync id, n` / `bar.arrive id, n`, ids 1..15, see named_barrier) count
// arrivals per phase and release the waiters when `n` threads arrived; their
// participants may call them from different source lines. A wgmma reading dynamic shared memory
// that a cp.async landed at its thread's wait_group is an error unless that thread had arrived at
// a barrier (__syncthreads, bar.sync, bar.arrive) since, before the wgmma was issued: the data is
// not visible to the other threads or the async proxy yet (an approximation: any later arrival of
// the copying thread counts, not only one the issuing warpgroup waited on; an mbarrier.arrive,
// which has release semantics, counts as an arrival too). cp.async.mbarrier.arrive(.noinc)
// (tma.cpp) lands the calling thread's prior copies later, released by its arrive-on; a wgmma
// may read such data only after each of its threads executed fence.proxy.async since the landing
// (generic-proxy writes read by the async proxy: the fence after the mbarrier wait).
// Asynchronous copies are also race-checked (async_write): a 16-byte chunk of dynamic shared
// memory is pending from the issue of a cp.async into it until the wait_group that lands it (a
// TMA box: until it lands). Errors ("race: ...", with the file:line of the reader): a wgmma whose
// descriptors read a pending chunk when it is issued (on hardware it may read its operands any
// time until its wait_group), a cp.async or TMA load issued into a chunk a wgmma reads after that
// wgmma was issued and before the wait_group that lands it (checked when it lands), and an ldmatrix
// of a pending chunk. So that the first is seen, the thread whose mbarrier.arrive completes a phase
// runs on only after every other thread has blocked (yield_last, cuda/emu/tma.h): the consumers
// released by the phase issue their wgmma before the producer reaches its next wait_group, so a
// stage published one wait_group too early still has its last arriver's copies pending
// (bc_test_sync modes 30-33, tests/tma_emu.rs; docs/wgmma.md). Plain loads and stores of shared
// memory are not checked.
#ifndef BC_EMU_EMU_H
#define BC_EMU_EMU_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "bf16.h"

// ---- keywords -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__ static
#define __shared__ static thread_local
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// g++ understands __restrict__ natively.

// ---- vector types ---------------------------------------------------------------------
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
typedef dim3 uint3;
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 __bfloat1622float2(__nv_bfloat162 p) { return float2{__bfloat162float(p.x), __bfloat162float(p.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }

// ---- built-in variables ----------------------------------------------------------------
namespace emu {
struct Fiber;
extern thread_local Fiber* tls_fiber;
extern thread_local dim3 tls_block_idx;
extern thread_local dim3 tls_block_dim;
extern thread_local dim3 tls_grid_dim;
const dim3& thread_idx();
/// Lane of the calling thread in its warp (linear thread index % 32).
int lane_id();
}  // namespace emu
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::tls_block_idx)
#define blockDim (::emu::tls_block_dim)
#define gridDim (::emu::tls_grid_dim)
#define warpSize 32

// ---- synchronisation (scheduling points) --------------------------------------------------
namespace emu {
void syncthreads(const char* file, int line);
int syncthreads_count(int pred, const char* file, int line);
// kind: 0 shfl idx, 1 shfl xor, 2 shfl down, 3 shfl up, 4 ballot, 5 syncwarp, 6 match_any
uint64_t warp_collective(int kind, unsigned mask, uint64_t value, int arg, int width, const char* file,
                         int line);
[[noreturn]] void fail(const char* what, const char* file, int line);
unsigned activemask();
void* dynamic_smem();
size_t dynamic_smem_bytes();
/// Warp data exchange behind the emulated tensor-core ops (cuda/include/mma.cuh): the calling
/// lane publishes `bytes` (<= 32) bytes and waits for its whole warp (a scheduling point, like
/// `__syncwarp()` with the full mask); returns the warp's 32 slots of 32 bytes (slot l: lane l's
/// data). The slots stay valid until the calling lane's next exchange (two buffers alternate,
/// and no lane can publish twice before every lane has passed the exchange in between).
const unsigned char* warp_exchange(const void* data, size_t bytes, const char* file, int line);
/// Emulated `cp.async` (16 bytes): the source is read now, the destination gets NaN bytes
/// (0xff) now and the data only when a wait completes the copy's group, so reading the
/// destination before the matching wait shows up as NaN. Both addresses must be 16-byte aligned.
void cp_async16(void* dst, const void* src, const char* file, int line);
/// Asynchronous shared-memory writes (cp.async, TMA loads) into dynamic shared memory: `issue`
/// true when one is issued into [dst, dst + bytes), false when it lands. Reads through wgmma
/// descriptors and ldmatrix of a 16-byte chunk with such a write pending are reported races.
void async_write(const void* dst, size_t bytes, bool issue);
/// Fails (a launch error naming `what` at file:line) when [p, p + bytes) overlaps a chunk of
/// dynamic shared memory with an asynchronous write pending (see async_write).
void check_async_read(const void* p, size_t bytes, const char* what, const char* file, int line);
/// `cp.async.commit_group`: the calling thread's uncommitted copies become a group.
void cp_async_commit();
/// `cp.async.wait_group n` (n >= 0): completes all but the newest n committed groups of the
/// calling thread; n < 0: `cp.async.wait_all` (every copy, committed or not).
void cp_async_wait(int n);
/// Shared-window address of dynamic shared memory byte 0 under the emulation (1536: 16-byte and
/// 512-byte aligned, not 1024-byte aligned).
constexpr unsigned kSmemWindowBase = 0x600;
/// Shared-window address of `p`, which must point into the block's dynamic shared memory.
unsigned smem_window_addr(const void* p, const char* file, int line);
/// The warpgroup ops other than the mma (`wgmma_sync` kinds); kWgMma is wgmma_mma's.
enum WgKind { kWgFence = 1, kWgCommit = 2, kWgWait = 3, kWgMma = 4 };
/// `wgmma.fence` / `wgmma.commit_group` / `wgmma.wait_group arg` of the calling thread's
/// warpgroup: a rendezvous of its 128 threads; a wait lands the completed groups' mma ops.
void wgmma_sync(int kind, int arg, const char* file, int line);
/// `wgmma.mma_async m64nNk16 .f32.bf16.bf16` (K-major A and B): D (n/2 floats at `d`) =
/// A . B^T (+ D when scale_d != 0); A from shared memory through `desc_a` when `a_regs` is
/// null, else the four registers at `a_regs`; B through `desc_b`. Queued until a wait.
void wgmma_mma(float* d, int n, uint64_t desc_a, const unsigned* a_regs, uint64_t desc_b, int scale_d,
               const char* file, int line);
/// The same with B's major-ness: `trans_b` 0 K-major (wgmma_mma), 1 MN-major (`imm-trans-b = 1`:
/// B is K x N with N contiguous, read through the descriptor's MN-major LBO / SBO roles).
void wgmma_mma_tb(float* d, int n, uint64_t desc_a, const unsigned* a_regs, uint64_t desc_b, int scale_d,
                  int trans_b, const char* file, int line);
/// Hardware named barriers per block (`bar.sync` / `bar.arrive` ids 0..15; 0 is `__syncthreads`').
constexpr int kNamedBarriers = 16;
/// Named barrier `id` (1..15) of `count` threads (a multiple of 32, at most the block): `wait`
/// true is `bar.sync id, count` (arrive, then wait until `count` threads have arrived in this
/// phase), false `bar.arrive id, count` (arrive and go on). A scheduling point only while it
/// waits. Errors (codes as `__syncthreads`'): id 0 or >= 16, a bad count, threads of one phase
/// giving different counts, a thread arriving twice in one phase, a phase completed with a warp
/// only partly arrived (the instruction is .aligned), a wait that can never complete
/// (deadlock), and arrivals still pending when the block exits.
void named_barrier(int id, int count, bool wait, const char* file, int line);
/// `setmaxnreg.{inc,dec}.sync.aligned.u32 count` (PTX ISA, "setmaxnreg"): no registers change
/// here, but the block's register pool is modelled (PTX ISA: ".inc blocks until enough registers
/// are available in the CTA's pool"): it starts empty, each thread owning the count a launch
/// gives a kernel with __launch_bounds__(block, 1) (65536 / threads down to a multiple of 8, as
/// ptxas does for setmaxnreg kernels); .dec returns the difference to the pool, .inc waits
/// until the pool has it (never: a reported deadlock). Checked: count a multiple of 8 in [24,
/// 256], a block of whole warpgroups, .inc never below and .dec never above the thread's
/// current count, and (at block exit) every thread of a warpgroup ran the same sequence.
void setmaxnreg(bool inc, int count, const char* file, int line);
/// Publishes the cp.async data that landed at the calling thread's waits (as a barrier arrival
/// does): the release of `mbarrier.arrive` (cuda/emu/tma.cpp).
void publish_landed_self();
/// cp.async.mbarrier.arrive (cuda/emu/tma.cpp): `thread` = the calling thread, `upto` = the
/// number of its cp.async issued so far (every prior one is tracked); false when none of them is
/// still pending (the arrive-on is then due at once).
bool cp_async_track(int* thread, uint64_t* upto);
/// Lands the pending cp.async of block thread `thread` issued up to `upto` (cp_async_track): the
/// data is written, released (the arrive-on that follows publishes it) and marked for the
/// readers' fence.proxy.async check. May run from the scheduler (no calling thread).
void cp_async_land_tracked(int thread, uint64_t upto);
/// `fence.proxy.async`: the calling thread's wgmma may read the data landed by tracked cp.async
/// so far (see cp_async_land_tracked).
void fence_proxy_async();
/// Reports a launch error for the running block without a calling thread (scheduler hooks).
void report_error(const char* what);
}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::emu::syncthreads_count((p), __FILE__, __LINE__)
#define __syncthreads_or(p) (::emu::syncthreads_count((p), __FILE__, __LINE__) != 0)
#define __syncthreads_and(p) (::emu::syncthreads_count(!(p), __FILE__, __LINE__) == 0)
#define __syncwarp(...) ((void)::emu::warp_collective(5, ::emu::syncwarp_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
#define __trap() ::emu::fail("__trap()", __FILE__, __LINE__)
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)
/// Emulation-only assertion: reported as a launch error (compiled out under nvcc).
#define BC_EMU_CHECK(cond)                                                       \
    do {                                                                         \
        if (!(cond)) ::emu::fail("BC_EMU_CHECK(" #cond ") failed", __FILE__, __LINE__); \
    } while (0)

namespace emu {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned m) { return m; }

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type larger than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
template <class T>
inline T shfl(int kind, unsigned mask, T v, int arg, int width, const char* f, int l) {
    return from_bits<T>(warp_collective(kind, mask, to_bits(v), arg, width, f, l));
}
}  // namespace emu

#define __shfl_sync(m, v, lane, ...) ::emu::shfl(0, (m), (v), (lane), ::emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(m, v, lm, ...) ::emu::shfl(1, (m), (v), (lm), ::emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(m, v, d, ...) ::emu::shfl(2, (m), (v), (d), ::emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(m, v, d, ...) ::emu::shfl(3, (m), (v), (d), ::emu::width_arg(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(m, p) ((unsigned)::emu::warp_collective(4, (m), (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(m, p) (__ballot_sync((m), (p)) != 0u)
#define __all_sync(m, p) (__ballot_sync((m), !(p)) == 0u)
#define __match_any_sync(m, v) ((unsigned)::emu::warp_collective(6, (m), ::emu::to_bits(v), 0, 32, __FILE__, __LINE__))
#define __activemask() ::emu::activemask()

namespace emu {
inline int width_arg() { return 32; }
inline int width_arg(int w) { return w; }
}  // namespace emu

// ---- the step budget (emu.cpp, "step budget") ---------------------------------------------
namespace emu {
/// Steps left to the block the calling OS thread runs before its launch fails as a kernel that
/// loops forever: the scheduler spends one each time it resumes a thread, every emulated atomic
/// one (a thread that spins on atomics never gets back to the scheduler). UINT64_MAX outside a
/// launch and with the budget off (BC_EMU_STEP_LIMIT=0).
extern thread_local uint64_t tls_steps_left;
/// Fails the launch (code 5, with where the block's threads are): called by `step` when the
/// running block has spent its budget at operation `what` at file:line (outside a launch: resets
/// the count and returns).
void step_budget_exceeded(const char* what, const char* file, int line);
inline void step(const char* what, const char* file, int line) {
    if (__builtin_expect(tls_steps_left-- == 0, 0)) step_budget_exceeded(what, file, line);
}
}  // namespace emu
// The call site of an atomic (for the step budget's message).
#define BC_EMU_SITE const char *site_file = __builtin_FILE(), int site_line = __builtin_LINE()
#define BC_EMU_STEP(what) ::emu::step(what, site_file, site_line)

// ---- atomics (real atomics: blocks run concurrently; each one a step of the budget) ----------
inline int atomicAdd(int* p, int v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicAdd");
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline unsigned atomicAdd(unsigned* p, unsigned v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicAdd");
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicAdd");
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicAdd");
    float old, nv;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        nv = old + v;
    } while (!__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicOr");
    return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
inline int atomicMax(int* p, int v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicMax");
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicMin(int* p, int v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicMin");
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicExch(int* p, int v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicExch");
    return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}
inline unsigned atomicExch(unsigned* p, unsigned v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicExch");
    return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}
inline int atomicCAS(int* p, int cmp, int v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicCAS");
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v, BC_EMU_SITE) {
    BC_EMU_STEP("atomicCAS");
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
#undef BC_EMU_SITE
#undef BC_EMU_STEP

// ---- math intrinsics --------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline void __sincosf(float x, float* s, float* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// Separately rounded multiply and add (never contracted into an FMA, on the device either).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline float __int_as_float(int x) { return bc_emu_detail::u2f(static_cast<uint32_t>(x)); }
inline int __float_as_int(float f) { return static_cast<int>(bc_emu_detail::f2u(f)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

// ---- launching ------------------------------------------------------------------------------
extern "C" {
struct BcLaunchDims;
}
namespace emu {
/// Runs `body(arg)` as a kernel (named `kernel`, for BC_EMU_STEP_STATS) over `dims`; returns 0
/// or an error code (message in `err`): 1 barrier, 2 warp collective, 3 trap / check / wgmma /
/// race, 4 invalid launch, 5 the step budget (a kernel that loops forever, see emu.cpp).
int launch(const BcLaunchDims* dims, void (*body)(const void*), const void* arg, char* err, size_t errlen,
           const char* kernel = nullptr);
}  // namespace emu

/// Defines `bc_emu_<kernel>`, the C entry point the Rust launcher calls for `kernel`.
// Dynamic shared memory of the running block; fails unless the launch gave >= `bytes`.
#define BC_DYNAMIC_SMEM(name, bytes)                                                                  \
    if (::emu::dynamic_smem_bytes() < (size_t)(bytes))                                            \
        ::emu::fail("launch gave too little dynamic shared memory", __FILE__, __LINE__);          \
    unsigned char* name = static_cast<unsigned char*>(::emu::dynamic_smem())

#define BC_EMU_ENTRY(kernel, Params)                                                                \
    extern "C" int bc_emu_##kernel(const BcLaunchDims* dims, const Params* p, char* err, size_t errlen) { \
        return ::emu::launch(dims, [](const void* a) { kernel(*static_cast<const Params*>(a)); }, p, err, \
                             errlen, #kernel);                                                        \
    }

#endif
