// Tensor-core building blocks (sm_80+): mma.sync m16n8k16 bf16 -> f32, ldmatrix (x4, with
// and without .trans) and cp.async (commit, wait_group N, wait_all), as small device functions
// so kernels read the same under nvcc (inline PTX) and under the SIMT emulation (cuda/emu), where each is one warp exchange
// (emu::warp_exchange) with the fragment layouts of the PTX ISA:
//   g = lane / 4, t = lane % 4; every 32-bit register holds 2 bf16 (low half = lower column/k)
//   A 16x16 (row-major):  a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..]  a[2] = A[g][2t+8..]
//                         a[3] = A[g+8][2t+8..]
//   B 16x8 (k x n, "col"): b[0] = B[2t..2t+1][g]  b[1] = B[2t+8..2t+9][g]
//   C/D 16x8 f32:         d[0] = D[g][2t]  d[1] = D[g][2t+1]  d[2] = D[g+8][2t]  d[3] = D[g+8][2t+1]
//   ldmatrix x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; r[i] of lane l holds
//   matrix i's row l/4, columns 2(l%4)..+1 (.trans: rows 2(l%4), 2(l%4)+1 of column l/4).
// The `_at` forms and bc_cp_async16_zfill take a bc_saddr (32-bit shared offset from
// bc_smem_addr) so that a kernel converts its shared array once; bc_ex2 is ex2.approx.ftz.
// Checked by cuda/test_mma.cu + tests/kernels_emu.rs (emulation vs. a plain matmul); the
// emulated layouts still need the same test on a GPU. Hopper's wgmma is in wgmma.cuh (emulated
// too); TMA is not written.
#ifndef BC_MMA_CUH
#define BC_MMA_CUH

#include "common.cuh"

#ifdef __CUDACC__
__device__ __forceinline__ void bc_mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2],
                                                  const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
__device__ __forceinline__ void bc_ldmatrix_x4(unsigned r[4], const void* row) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void bc_ldmatrix_x4_trans(unsigned r[4], const void* row) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
/// Shared-memory address as an integer: the 32-bit shared-window offset on the device (a kernel
/// converts its shared array once and adds offsets, instead of a generic->shared conversion per
/// access, which on sm_90 reads the CTA's window base each time), the host address under the
/// emulation.
typedef unsigned bc_saddr;
__device__ __forceinline__ bc_saddr bc_smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
/// Pins `v` (a 32- or 64-bit integer) in a register for the loop that follows: an empty asm that
/// claims to change it, so ptxas cannot rematerialise it inside the loop. Without it ptxas
/// recomputed the shared-window base and the wgmma descriptors from SR_CgaCtaId in every k-step
/// of bc_conv_wgmma (2 S2UR and ~13 uniform instructions per k-step). A no-op under emulation.
template <class T>
__device__ __forceinline__ void bc_pin(T& v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "bc_pin: a 32- or 64-bit integer");
    if constexpr (sizeof(T) == 4)
        asm volatile("" : "+r"(v));
    else
        asm volatile("" : "+l"(v));
}
__device__ __forceinline__ void bc_ldmatrix_x4_at(unsigned r[4], bc_saddr a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void bc_ldmatrix_x4_trans_at(unsigned r[4], bc_saddr a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
/// 16-byte cp.async that reads `bytes` (0 or 16) from `gmem` and zero-fills the rest: a
/// predicated copy without a branch (`gmem` must stay a valid address).
__device__ __forceinline__ void bc_cp_async16_zfill(bc_saddr smem, const void* gmem, unsigned bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes));
}
/// 2^x by the hardware approximation (MUFU.EX2, ~2 ulp, subnormal results flushed to 0; -inf
/// gives 0): one instruction where exp2f adds range handling around it.
__device__ __forceinline__ float bc_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
/// 16-byte asynchronous global -> shared copy (both 16-byte aligned).
__device__ __forceinline__ void bc_cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void bc_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void bc_cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
/// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void bc_cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
inline float bc_emu_lo(unsigned w) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)(w & 0xffffu))); }
inline float bc_emu_hi(unsigned w) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)(w >> 16))); }
// Each op is one warp exchange (see emu.h): every lane publishes its operands (fragments or its
// row address), then computes its own result from the other lanes' slots.
inline void bc_mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    const unsigned mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const unsigned char* x = ::emu::warp_exchange(mine, sizeof mine, __FILE__, __LINE__);
    auto reg = [x](int l, int i) {  // register i (a0..a3, b0, b1) of lane l
        unsigned r;
        std::memcpy(&r, x + 32 * l + 4 * i, 4);
        return r;
    };
    auto dot = [](unsigned x0, unsigned x1, unsigned y0, unsigned y1) {
        return bc_emu_lo(x0) * bc_emu_lo(y0) + bc_emu_hi(x0) * bc_emu_hi(y0) + bc_emu_lo(x1) * bc_emu_lo(y1) +
               bc_emu_hi(x1) * bc_emu_hi(y1);
    };
    const int lane = ::emu::lane_id(), g = lane / 4, t = lane % 4;
    float acc[4] = {c[0], c[1], c[2], c[3]};
    for (int tp = 0; tp < 4; ++tp) {  // k pairs 2tp, 2tp+1 (a0/a1, b0) and 2tp+8, 2tp+9 (a2/a3, b1)
        const int la = 4 * g + tp, lb0 = 4 * (2 * t) + tp, lb1 = 4 * (2 * t + 1) + tp;  // row g; columns 2t, 2t+1
        acc[0] += dot(reg(la, 0), reg(la, 2), reg(lb0, 4), reg(lb0, 5));
        acc[1] += dot(reg(la, 0), reg(la, 2), reg(lb1, 4), reg(lb1, 5));
        acc[2] += dot(reg(la, 1), reg(la, 3), reg(lb0, 4), reg(lb0, 5));
        acc[3] += dot(reg(la, 1), reg(la, 3), reg(lb1, 4), reg(lb1, 5));
    }
    for (int i = 0; i < 4; ++i) d[i] = acc[i];
}
inline const char* bc_emu_row(const unsigned char* x, int l) {
    const char* p;
    std::memcpy(&p, x + 32 * l, sizeof p);
    return p;
}
// (file / line: the caller's, for the race report of check_async_read)
inline void bc_ldmatrix_x4(unsigned r[4], const void* row, const char* file = __builtin_FILE(),
                           int line = __builtin_LINE()) {
    if (reinterpret_cast<uintptr_t>(row) % 16) ::emu::fail("ldmatrix row address not 16-byte aligned", __FILE__, __LINE__);
    ::emu::check_async_read(row, 16, "ldmatrix", file, line);
    const unsigned char* x = ::emu::warp_exchange(&row, sizeof row, __FILE__, __LINE__);
    const int lane = ::emu::lane_id();
    for (int i = 0; i < 4; ++i) std::memcpy(&r[i], bc_emu_row(x, 8 * i + lane / 4) + 4 * (lane % 4), 4);
}
inline void bc_ldmatrix_x4_trans(unsigned r[4], const void* row, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
    if (reinterpret_cast<uintptr_t>(row) % 16) ::emu::fail("ldmatrix row address not 16-byte aligned", __FILE__, __LINE__);
    ::emu::check_async_read(row, 16, "ldmatrix", file, line);
    const unsigned char* x = ::emu::warp_exchange(&row, sizeof row, __FILE__, __LINE__);
    const int lane = ::emu::lane_id();
    for (int i = 0; i < 4; ++i) {
        unsigned short lo, hi;
        std::memcpy(&lo, bc_emu_row(x, 8 * i + 2 * (lane % 4)) + 2 * (lane / 4), 2);
        std::memcpy(&hi, bc_emu_row(x, 8 * i + 2 * (lane % 4) + 1) + 2 * (lane / 4), 2);
        r[i] = (unsigned)lo | ((unsigned)hi << 16);
    }
}
inline void bc_cp_async16(void* smem, const void* gmem) { ::emu::cp_async16(smem, gmem, __FILE__, __LINE__); }
typedef uintptr_t bc_saddr;
inline bc_saddr bc_smem_addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }
template <class T>
inline void bc_pin(T&) {}
inline void bc_ldmatrix_x4_at(unsigned r[4], bc_saddr a, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    bc_ldmatrix_x4(r, reinterpret_cast<const void*>(a), file, line);
}
inline void bc_ldmatrix_x4_trans_at(unsigned r[4], bc_saddr a, const char* file = __builtin_FILE(),
                                    int line = __builtin_LINE()) {
    bc_ldmatrix_x4_trans(r, reinterpret_cast<const void*>(a), file, line);
}
// The zero-fill is a copy from zeros: it lands at the wait like any other cp.async.
inline void bc_cp_async16_zfill(bc_saddr smem, const void* gmem, unsigned bytes) {
    alignas(16) static const unsigned char zeros[16] = {};
    if (bytes != 0 && bytes != 16) ::emu::fail("cp.async zero-fill: bytes must be 0 or 16", __FILE__, __LINE__);
    ::emu::cp_async16(reinterpret_cast<void*>(smem), bytes ? gmem : zeros, __FILE__, __LINE__);
}
inline float bc_ex2(float x) {
    const float y = std::exp2(x);
    return y < 1.17549435e-38f ? 0.f : y;  // ftz
}
inline void bc_cp_async_commit() { ::emu::cp_async_commit(); }
inline void bc_cp_async_wait_all() { ::emu::cp_async_wait(-1); }
template <int N>
inline void bc_cp_async_wait_group() {
    static_assert(N >= 0, "wait_group count");
    ::emu::cp_async_wait(N);
}
#endif

#endif
