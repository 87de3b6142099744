// Hopper warpgroup MMA building blocks (sm_90a): wgmma.mma_async m64nNk16 bf16 x bf16 -> f32
// for N = 64, 128, 256, with A from shared memory (bc_wgmma_ss) or from registers (bc_wgmma_rs)
// and B from shared memory; the 64-bit shared-memory matrix descriptor; wgmma.fence,
// commit_group, wait_group; fence.proxy.async (generic-proxy shared stores -> visible to wgmma).
// Written from the PTX ISA ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate", the
// sections on register fragments, shared-memory matrix layout, matrix descriptor); docs/wgmma.md
// says what comes from where and what only a GPU can confirm.
//
// A warpgroup is 4 consecutive warps (128 threads) whose first warp index is a multiple of 4;
// every wgmma op is .sync.aligned: all 128 threads execute it, with the same descriptors.
// K-major operands (imm-trans-a = imm-trans-b = 0): A is [M][K], B is [N][K] (K contiguous
// in both), so D = A . B^T (bc_wgmma_ss / bc_wgmma_rs); and B MN-major ("N-major",
// imm-trans-b = 1: B stored [K][N], N contiguous, bc_wgmma_ss_nmajor / bc_wgmma_rs_nmajor,
// layouts of bc_wgmma_mnmajor_offset), so D = A . B (P V with V as [keys][head_dim]). f32 accumulator D of m64nNk16, thread t of the warpgroup (warp
// w = t / 32, g = (t % 32) / 4, q = t % 4), register i in [0, N/2):
//   D[16w + g + 8 * ((i >> 1) & 1)][8 * (i >> 2) + 2q + (i & 1)]
// A from registers (4 x 32-bit, two bf16 each, low half = lower k), as mma.sync m16n8k16's A
// for the warp's 16 rows: a[0] = A[16w+g][2q..2q+1], a[1] = A[16w+g+8][2q..], a[2] =
// A[16w+g][2q+8..], a[3] = A[16w+g+8][2q+8..].
// Shared memory: 8 x 16-byte "core matrices" (8 rows of 8 bf16). K-major layouts:
//   none:  core matrix (row group r/8, k chunk k/8) at start + (r/8) SBO + (k/8) LBO, its 8
//          rows 16 bytes apart (128 contiguous bytes);
//   swizzled (W = 128, 64 or 32 bytes): rows W bytes apart, 8-row groups SBO apart (LBO
//          unused), and the 16-byte chunk index (address bits 4..6) XORed with address bits
//          7..9 (128B: 3 bits, 64B: 2, 32B: 1), i.e. a pattern that repeats every 8W bytes,
//          so tiles start on an 8W-byte boundary (then the descriptor's base offset is 0).
// The probe kernel cuda/test/wgmma_probe.cu checks all of it (tests/wgmma_emu.rs under the
// emulation, tests/cuda.rs on a Hopper GPU).
//
// Under the SIMT emulation (cuda/emu) each op is a warpgroup rendezvous (emu::wgmma_*): the
// mma is queued with its descriptors and lands (reads shared memory, writes D) only when a
// wait_group completes its group; until then D reads as NaN. Operands must be in dynamic
// shared memory there (bc_smem_window_addr fails otherwise).
#ifndef BC_WGMMA_CUH
#define BC_WGMMA_CUH

#include "common.cuh"

/// Threads of a warpgroup.
#define BC_WGMMA_THREADS 128
/// M and K of one wgmma (m64nNk16, bf16).
#define BC_WGMMA_M 64
#define BC_WGMMA_K 16
/// Swizzle modes, as the descriptor's bits 62-63 encode them.
#define BC_WGMMA_SWIZZLE_NONE 0
#define BC_WGMMA_SWIZZLE_128B 1
#define BC_WGMMA_SWIZZLE_64B 2
#define BC_WGMMA_SWIZZLE_32B 3
/// Bytes of one core matrix (8 rows of 16 bytes).
#define BC_WGMMA_CORE_BYTES 128

// wgmma exists on sm_90a only: elsewhere (sm_80 cubin, compute_80 PTX) kernels using it compile
// a stub (see BC_HAS_WGMMA). The emulation has it.
#if defined(BC_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define BC_HAS_WGMMA 1
#else
#define BC_HAS_WGMMA 0
#endif

/// Row width in bytes of a K-major swizzle atom (8 rows): 128, 64, 32; 16 (one core-matrix row)
/// without swizzle.
__host__ __device__ __forceinline__ unsigned bc_wgmma_row_bytes(int swizzle) {
    return swizzle == BC_WGMMA_SWIZZLE_128B ? 128u
           : swizzle == BC_WGMMA_SWIZZLE_64B ? 64u
           : swizzle == BC_WGMMA_SWIZZLE_32B ? 32u
                                             : 16u;
}

/// The swizzle of `off` (a byte offset from a tile start aligned to the pattern's 8W-byte
/// period): the 16-byte chunk bits 4.. XOR the 128-byte line bits 7..
__host__ __device__ __forceinline__ unsigned bc_wgmma_swizzle(unsigned off, int swizzle) {
    const unsigned mask = swizzle == BC_WGMMA_SWIZZLE_128B ? 7u
                          : swizzle == BC_WGMMA_SWIZZLE_64B ? 3u
                          : swizzle == BC_WGMMA_SWIZZLE_32B ? 1u
                                                            : 0u;
    return off ^ (((off >> 7) & mask) << 4);
}

/// Byte offset of element (r, k) in the K-major tile of `rows` (multiple of 8) x `kdim` bf16
/// (multiple of 16) that the bc_wgmma_kmajor_desc descriptors describe. Without swizzle: core
/// matrices row group by row group, the kdim/8 chunks of a group consecutive (LBO 128, SBO
/// kdim * 16). Swizzled (row width W, E = W/2 elements): kdim/E column blocks of rows * W bytes,
/// each a stack of 8-row atoms (SBO 8W), chunks swizzled in each atom.
__host__ __device__ __forceinline__ unsigned bc_wgmma_kmajor_offset(int swizzle, int rows, int kdim, int r, int k) {
    if (swizzle == BC_WGMMA_SWIZZLE_NONE)
        return (unsigned)((r / 8) * (kdim / 8) * BC_WGMMA_CORE_BYTES + (k / 8) * BC_WGMMA_CORE_BYTES + (r % 8) * 16 +
                          (k % 8) * 2);
    const unsigned w = bc_wgmma_row_bytes(swizzle), e = w / 2;
    const unsigned block = (unsigned)k / e * (unsigned)rows * w;
    return block + bc_wgmma_swizzle((unsigned)r * w + ((unsigned)k % e) * 2, swizzle);
}

/// The 64-bit matrix descriptor: start address, leading / stride dimension byte offsets (each
/// stored as (x & 0x3FFFF) >> 4 in bits 0-13, 16-29, 32-45), base offset 0 (bits 49-51: tiles
/// start on the pattern's boundary), swizzle mode in bits 62-63. `saddr` is a shared-window
/// address (bc_smem_window_addr); all three must be multiples of 16.
__host__ __device__ __forceinline__ uint64_t bc_wgmma_desc(unsigned saddr, unsigned lbo, unsigned sbo, int swizzle) {
    return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFFu) >> 4) << 32) | ((uint64_t)(swizzle & 3) << 62);
}

/// Descriptor of k-step `s` (elements 16s .. 16s+15) of the K-major tile at shared-window
/// address `saddr` laid out as bc_wgmma_kmajor_offset says. Swizzled: the step's 32 bytes start
/// (16s % E) * 2 bytes into the rows of column block 16s / E (the hardware applies the XOR to
/// the address it forms, so the start may sit inside a swizzled row); LBO is unused there
/// (set to 16, "assumed 1").
__host__ __device__ __forceinline__ uint64_t bc_wgmma_kmajor_desc(unsigned saddr, int swizzle, int rows, int kdim, int s) {
    if (swizzle == BC_WGMMA_SWIZZLE_NONE)
        return bc_wgmma_desc(saddr + (unsigned)s * 2 * BC_WGMMA_CORE_BYTES, BC_WGMMA_CORE_BYTES,
                             (unsigned)(kdim / 8) * BC_WGMMA_CORE_BYTES, swizzle);
    const unsigned w = bc_wgmma_row_bytes(swizzle), e = w / 2, k0 = 16u * (unsigned)s;
    return bc_wgmma_desc(saddr + k0 / e * (unsigned)rows * w + (k0 % e) * 2, 16, 8 * w, swizzle);
}

/// Byte offset of element (k, n) of the MN-major ("N-major": B with imm-trans-b = 1, N
/// contiguous) tile of `kdim` (multiple of 16) x `ncols` bf16 that the bc_wgmma_mnmajor_desc
/// descriptors describe. PTX ISA, "Canonical Layouts", MN-major (T = 8 bf16 per 16 bytes):
///   none:     ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)): a core matrix is 8 k-rows of 8 contiguous
///             n (16 bytes each, 128 contiguous bytes); n-chunks of 8 SBO apart, 8-row k
///             groups LBO apart. Here: the ncols/8 core matrices of a k group consecutive
///             (SBO 128), k groups LBO = ncols * 16 apart.
///   swizzled (row width W = 128, 64, 32 bytes, E = W/2 elements): ((T,W/16,m),(8,k)):
///             ((1,T,LBO),(W/16 T,SBO)): k-rows W bytes apart holding E contiguous n, 8-row
///             k groups SBO apart, n-atoms of E columns LBO apart; the same address swizzle as
///             K-major (16-byte chunk bits 4.. XOR bits 7..). Here: ncols/E column blocks of
///             kdim * W bytes (LBO), each a stack of 8-row atoms (SBO 8W).
/// A V tile [keys][head_dim] with 128-byte swizzled rows (head_dim split into 64-column
/// blocks) is this layout for P V's B (K = keys, N = head_dim).
__host__ __device__ __forceinline__ unsigned bc_wgmma_mnmajor_offset(int swizzle, int kdim, int ncols, int k, int n) {
    if (swizzle == BC_WGMMA_SWIZZLE_NONE)
        return (unsigned)((k / 8) * (ncols / 8) * BC_WGMMA_CORE_BYTES + (n / 8) * BC_WGMMA_CORE_BYTES + (k % 8) * 16 +
                          (n % 8) * 2);
    const unsigned w = bc_wgmma_row_bytes(swizzle), e = w / 2;
    const unsigned block = (unsigned)n / e * (unsigned)kdim * w;
    return block + bc_wgmma_swizzle((unsigned)k * w + ((unsigned)n % e) * 2, swizzle);
}

/// Descriptor of k-step `s` (k-rows 16s .. 16s+15) of the MN-major tile at shared-window address
/// `saddr` laid out as bc_wgmma_mnmajor_offset says: the step starts two 8-row k groups further
/// (2 LBO without swizzle, 2 SBO = 16 W swizzled, a multiple of the 8W-byte swizzle period).
/// LBO / SBO swap roles between the two cases (ISA, "Leading / Stride Dimension Byte Offset":
/// MN-major interleave: LBO = k group to k group, SBO = n-chunk to n-chunk; swizzled: LBO =
/// n-atom to n-atom, SBO = k group to k group).
__host__ __device__ __forceinline__ uint64_t bc_wgmma_mnmajor_desc(unsigned saddr, int swizzle, int kdim, int ncols, int s) {
    if (swizzle == BC_WGMMA_SWIZZLE_NONE) {
        const unsigned lbo = (unsigned)(ncols / 8) * BC_WGMMA_CORE_BYTES;
        return bc_wgmma_desc(saddr + (unsigned)s * 2 * lbo, lbo, BC_WGMMA_CORE_BYTES, swizzle);
    }
    const unsigned w = bc_wgmma_row_bytes(swizzle);
    return bc_wgmma_desc(saddr + (unsigned)s * 16 * w, (unsigned)kdim * w, 8 * w, swizzle);
}

#if BC_HAS_WGMMA
#ifdef __CUDACC__
/// Shared-window address of a shared-memory pointer (what descriptors hold).
__device__ __forceinline__ unsigned bc_smem_window_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
/// Makes this thread's generic-proxy shared-memory stores visible to the async proxy (wgmma
/// operand reads); then a barrier makes every thread's visible.
__device__ __forceinline__ void bc_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/// wgmma.fence: orders this warpgroup's register accesses (accumulators, A fragments) before
/// the following wgmma.mma_async; needed before the first mma and after touching D or A.
__device__ __forceinline__ void bc_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
/// Commits the uncommitted wgmma.mma_async of the warpgroup as one group.
__device__ __forceinline__ void bc_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/// Waits until at most N committed groups are pending (their D and shared reads are done).
template <int N>
__device__ __forceinline__ void bc_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/// Keeps the compiler from moving accesses of `d` across a wgmma fence / wait (the asm
/// statements above do not name the accumulators).
template <int R>
__device__ __forceinline__ void bc_wgmma_fence_operand(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
/// D (+)= A . B^T, m64nNk16: A and B from shared memory (descriptors), D += when scale_d != 0,
/// D = when 0 (D's old value is then ignored).
template <int N>
__device__ __forceinline__ void bc_wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d);
/// The same with A from registers (the fragment layout above).
template <int N>
__device__ __forceinline__ void bc_wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], uint64_t db, int scale_d);

template <>
__device__ __forceinline__ void bc_wgmma_ss<64>(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_rs<64>(float (&d)[32], const unsigned (&a)[4], uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_ss<128>(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_rs<128>(float (&d)[64], const unsigned (&a)[4], uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_ss<256>(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_rs<256>(float (&d)[128], const unsigned (&a)[4], uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
/// D (+)= A . B with B MN-major ("N-major", imm-trans-b = 1: B stored K x N, N contiguous, the
/// bc_wgmma_mnmajor_offset layouts), A K-major from shared memory (imm-trans-a = 0).
template <int N>
__device__ __forceinline__ void bc_wgmma_ss_nmajor(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d);
/// The same with A from registers (P V: A = P, B = V [keys][head_dim]).
template <int N>
__device__ __forceinline__ void bc_wgmma_rs_nmajor(float (&d)[N / 2], const unsigned (&a)[4], uint64_t db, int scale_d);
template <>
__device__ __forceinline__ void bc_wgmma_ss_nmajor<64>(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_rs_nmajor<64>(float (&d)[32], const unsigned (&a)[4], uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_ss_nmajor<128>(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_rs_nmajor<128>(float (&d)[64], const unsigned (&a)[4], uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_ss_nmajor<256>(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void bc_wgmma_rs_nmajor<256>(float (&d)[128], const unsigned (&a)[4], uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
#else
// Emulation (cuda/emu/emu.h, emu::wgmma_*): every op is a warpgroup rendezvous. The mma ops
// report their caller's file and line (__builtin_FILE / __builtin_LINE) in launch errors.
inline unsigned bc_smem_window_addr(const void* p) { return ::emu::smem_window_addr(p, __FILE__, __LINE__); }
inline void bc_fence_proxy_async() { ::emu::fence_proxy_async(); }
inline void bc_wgmma_fence() { ::emu::wgmma_sync(::emu::kWgFence, 0, __FILE__, __LINE__); }
inline void bc_wgmma_commit() { ::emu::wgmma_sync(::emu::kWgCommit, 0, __FILE__, __LINE__); }
template <int N>
inline void bc_wgmma_wait() {
    static_assert(N >= 0, "wait_group count");
    ::emu::wgmma_sync(::emu::kWgWait, N, __FILE__, __LINE__);
}
template <int R>
inline void bc_wgmma_fence_operand(float (&)[R]) {}
template <int N>
inline void bc_wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
    ::emu::wgmma_mma(d, N, da, nullptr, db, scale_d, file, line);
}
template <int N>
inline void bc_wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], uint64_t db, int scale_d,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
    ::emu::wgmma_mma(d, N, 0, a, db, scale_d, file, line);
}
template <int N>
inline void bc_wgmma_ss_nmajor(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d,
                               const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
    ::emu::wgmma_mma_tb(d, N, da, nullptr, db, scale_d, 1, file, line);
}
template <int N>
inline void bc_wgmma_rs_nmajor(float (&d)[N / 2], const unsigned (&a)[4], uint64_t db, int scale_d,
                               const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
    ::emu::wgmma_mma_tb(d, N, 0, a, db, scale_d, 1, file, line);
}
#endif
#endif

#endif
