// bc_test_mma: one warp computes D = A . B + C (A 16x16 bf16 row-major, B 16x8 bf16 given both
// row-major [k][n] and transposed [n][k], C/D 16x8 f32 row-major) with the tensor-core
// building blocks of ../include/mma.cuh: A through cp.async + ldmatrix.x4, B once through
// ldmatrix.x4.trans on [k][n] (d1) and once read directly from [n][k] (d2).
// A test kernel (not used by the engine): tests/kernels_emu.rs checks the emulated layouts
// against a plain matmul; the same check on a GPU validates the emulation itself.
// Launch: grid (1), block (32).
#include "../include/mma.cuh"

struct BcTestMmaParams {
    const __nv_bfloat16* a;   // [16][16]
    const __nv_bfloat16* b;   // [16][8]  (k, n)
    const __nv_bfloat16* bt;  // [8][16]  (n, k)
    const float* c;           // [16][8]
    float* d1;                // [16][8]
    float* d2;                // [16][8]
};

extern "C" __global__ void __launch_bounds__(32) bc_test_mma(BcTestMmaParams p) {
    __shared__ __align__(16) __nv_bfloat16 as[16][16];
    __shared__ __align__(16) __nv_bfloat16 bs[16][8];
    __shared__ __align__(16) __nv_bfloat16 bts[8][16];
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    // 512 bytes of A = 32 chunks of 16 bytes: one per lane, asynchronously.
    bc_cp_async16(&as[lane / 2][8 * (lane % 2)], p.a + 8 * lane);
    bc_cp_async_commit();
    for (int i = lane; i < 128; i += 32) {
        bs[i / 8][i % 8] = p.b[i];
        bts[i / 16][i % 16] = p.bt[i];
    }
    bc_cp_async_wait_all();
    __syncwarp();

    unsigned a[4], bq[4], b1[2], b2[2];
    // matrix i = lane / 8: rows 8*(i & 1) .. +7, columns 8*(i >> 1) .. +7
    bc_ldmatrix_x4(a, &as[(lane % 8) + 8 * ((lane / 8) & 1)][8 * (lane / 16)]);
    // B [k][n] 16x8: matrices k 0-7 and k 8-15 (2 and 3 repeat them)
    bc_ldmatrix_x4_trans(bq, &bs[(lane % 8) + 8 * ((lane / 8) & 1)][0]);
    b1[0] = bq[0];
    b1[1] = bq[1];
    b2[0] = *reinterpret_cast<const unsigned*>(&bts[g][2 * t]);
    b2[1] = *reinterpret_cast<const unsigned*>(&bts[g][2 * t + 8]);
    float c[4] = {p.c[g * 8 + 2 * t], p.c[g * 8 + 2 * t + 1], p.c[(g + 8) * 8 + 2 * t], p.c[(g + 8) * 8 + 2 * t + 1]};
    float d[4];
    bc_mma_bf16_16816(d, a, b1, c);
    p.d1[g * 8 + 2 * t] = d[0];
    p.d1[g * 8 + 2 * t + 1] = d[1];
    p.d1[(g + 8) * 8 + 2 * t] = d[2];
    p.d1[(g + 8) * 8 + 2 * t + 1] = d[3];
    bc_mma_bf16_16816(d, a, b2, c);
    p.d2[g * 8 + 2 * t] = d[0];
    p.d2[g * 8 + 2 * t + 1] = d[1];
    p.d2[(g + 8) * 8 + 2 * t] = d[2];
    p.d2[(g + 8) * 8 + 2 * t + 1] = d[3];
}
BC_EMU_ENTRY(bc_test_mma, BcTestMmaParams)
