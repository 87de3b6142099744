// Patchify / unpatchify between latents and token rows (patch size (1, 2, 2)).
//
// bc_patchify:   latents f32 [frames, ch, h, w] -> rows bf16 [frames*(h/2)*(w/2), row_stride],
//                row (f, i, j) element c*4 + dh*2 + dw = lat[f, c, 2i+dh, 2j+dw]  (c, dh, dw order:
//                the Conv3d weight [dim, ch, 1, 2, 2] flattened, so the embedding is a GEMM)
// bc_unpatchify: rows bf16 (head output, element order (dh, dw, c)) -> latents f32,
//                lat[f, c, 2i+dh, 2j+dw] = row(f, i, j)[dh*2*ch + dw*ch + c]
//
// One thread per latent element (reads/writes of the latents are coalesced).
// Checked by tests/kernels_emu.rs against cpu::ops::{patchify, unpatchify}.
#include "include/common.cuh"

namespace {
constexpr int PATCH_THREADS = BC_ELEM_THREADS;
}  // namespace

/// Decomposes latent element `i` into the token row and the two in-patch offsets.
__device__ __forceinline__ void bc_patch_index(const BcPatchParams& p, long long i, size_t* row, int* c, int* dh,
                                               int* dw) {
    const int x = (int)(i % p.w);
    const int y = (int)(i / p.w % p.h);
    *c = (int)(i / ((long long)p.w * p.h) % p.ch);
    const int f = (int)(i / ((long long)p.w * p.h * p.ch));
    *dh = y & 1;
    *dw = x & 1;
    *row = ((size_t)f * (p.h / 2) + y / 2) * (p.w / 2) + x / 2;
}

extern "C" __global__ void __launch_bounds__(PATCH_THREADS) bc_patchify(BcPatchParams p) {
    const long long i = (long long)blockIdx.x * PATCH_THREADS + threadIdx.x;
    if (i >= (long long)p.frames * p.ch * p.h * p.w) return;
    size_t row;
    int c, dh, dw;
    bc_patch_index(p, i, &row, &c, &dh, &dw);
    p.rows[row * p.row_stride + c * 4 + dh * 2 + dw] = __float2bfloat16(p.latents[i]);
}
BC_EMU_ENTRY(bc_patchify, BcPatchParams)

extern "C" __global__ void __launch_bounds__(PATCH_THREADS) bc_unpatchify(BcPatchParams p) {
    const long long i = (long long)blockIdx.x * PATCH_THREADS + threadIdx.x;
    if (i >= (long long)p.frames * p.ch * p.h * p.w) return;
    size_t row;
    int c, dh, dw;
    bc_patch_index(p, i, &row, &c, &dh, &dw);
    p.latents[i] = __bfloat162float(p.rows[row * p.row_stride + dh * 2 * p.ch + dw * p.ch + c]);
}
BC_EMU_ENTRY(bc_unpatchify, BcPatchParams)
