// Emulation-only test kernels (never compiled by nvcc: they are deliberately wrong CUDA).
// Used by tests/kernels_emu.rs to check that the emulator reports, rather than hangs on,
// divergent barriers and bad warp-collective masks.
//
// bc_test_sync: data[i] = sum over the block of data (via shared memory and a barrier);
//   mode 0: correct; mode 1: thread `arg` returns before the barrier (divergent
//   __syncthreads); mode 2: odd threads wait at a different __syncthreads;
//   mode 3: __shfl_xor_sync with a mask that omits lane `arg`; mode 4: lane `arg` exits
//   before a full-mask shuffle.
#include "../include/common.cuh"

struct BcTestParams {
    float* data;
    int n;
    int mode;
    int arg;
    int _pad;
};

extern "C" __global__ void bc_test_sync(BcTestParams p) {
    __shared__ float s[1024];
    const int t = threadIdx.x;
    s[t] = p.data[blockIdx.x * blockDim.x + t];
    if (p.mode == 1 && t == p.arg) return;
    if (p.mode == 2 && (t & 1)) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    float v = 0.f;
    for (int i = 0; i < (int)blockDim.x; ++i) v += s[i];
    if (p.mode == 3) v = __shfl_xor_sync(~(1u << p.arg), v, 1);
    if (p.mode == 4) {
        if ((t & 31) == p.arg) return;
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    p.data[blockIdx.x * blockDim.x + t] = v;
}
BC_EMU_ENTRY(bc_test_sync, BcTestParams)
