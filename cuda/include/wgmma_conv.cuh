// wgmma forms the decoders' convolution needs beyond wgmma.cuh's N = 64, 128, 256 (kept apart
// so that header stays as it is): m64n96k16 with A and B from shared memory, for channel tiles
// of 96 output channels (the Wan VAE's 96- and 192-channel layers fill them exactly). Same
// operand conventions as bc_wgmma_ss in wgmma.cuh (D = A . B^T, both K-major, f32 accumulators:
// register i of thread t holds D[16w + g + 8((i >> 1) & 1)][8(i >> 2) + 2q + (i & 1)]). The
// emulation's generic bc_wgmma_ss<N> covers every N (a multiple of 8), so only the device needs
// this specialization.
#ifndef BC_WGMMA_CONV_CUH
#define BC_WGMMA_CONV_CUH

#include "wgmma.cuh"

#if BC_HAS_WGMMA && defined(__CUDACC__)
template <>
__device__ __forceinline__ void bc_wgmma_ss<96>(float (&d)[48], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, %48, %49, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
        : "l"(da), "l"(db), "r"(scale_d));
}
#endif

#endif
