// Shared device helpers of the blockcascade kernels. Every cuda/*.cu includes this first:
// under nvcc it pulls the CUDA headers, under host C++ (-DBC_EMU) the SIMT emulation layer
// (cuda/emu/emu.h), so kernel sources are identical in both builds.
#ifndef BC_COMMON_CUH
#define BC_COMMON_CUH

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
// Emulation-only hooks compile to nothing on the device.
#define BC_EMU_ENTRY(kernel, Params)
#define BC_EMU_CHECK(cond) ((void)0)
// `unsigned char* name`: the block's dynamic shared memory (the launch gives >= `bytes`).
#define BC_DYNAMIC_SMEM(name, bytes) extern __shared__ __align__(128) unsigned char name[]
#else
#ifndef BC_EMU
#define BC_EMU 1
#endif
#include "../emu/emu.h"
#endif

#include "params.h"

#define BC_FULL_MASK 0xffffffffu

/// Sum of `v` over the 32 lanes of a warp (every lane gets the sum).
__device__ __forceinline__ float bc_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(BC_FULL_MASK, v, o);
    return v;
}

/// Maximum of `v` over the 32 lanes of a warp (every lane gets it).
__device__ __forceinline__ float bc_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(BC_FULL_MASK, v, o));
    return v;
}

/// Sum of `v` over a block of NT threads (a multiple of 32, at most 1024); every thread gets
/// the sum. `scratch` holds NT/32 floats of shared memory; contains two barriers, so every
/// thread of the block must call it.
template <int NT>
__device__ __forceinline__ float bc_block_sum(float v, float* scratch) {
    static_assert(NT % 32 == 0 && NT <= 1024, "block size");
    v = bc_warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) s += scratch[w];
    __syncthreads();  // scratch may be reused right after
    return s;
}

/// GELU, tanh form: `0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))` (cpu::ops::gelu_tanh).
__device__ __forceinline__ float bc_gelu_tanh(float u) {
    const float c = 0.7978845608f;  // sqrt(2/pi)
    return 0.5f * u * (1.f + tanhf(c * (u + 0.044715f * u * u * u)));
}

/// Two bf16 values at `p` (4-byte aligned) as floats.
__device__ __forceinline__ float2 bc_load_bf162(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

/// Stores two floats as bf16 (round to nearest even) at `p` (4-byte aligned).
__device__ __forceinline__ void bc_store_bf162(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

#endif
