// bc_copy: copies a list of byte regions (peer copies of latents and K/V between devices over
// NVLink/PCIe with peer access enabled, or local gathers). Region r is handled by the blocks
// of grid row r (blockIdx.y), striding over it; 16-byte vectors when source, destination and
// length allow, bytes otherwise. The region table lives in device memory (graph-friendly).
// Checked by tests/kernels_emu.rs: aligned and unaligned regions of odd lengths.
#include "include/common.cuh"

namespace {
constexpr int COPY_THREADS = BC_ELEM_THREADS;
}  // namespace

extern "C" __global__ void __launch_bounds__(COPY_THREADS) bc_copy(BcCopyParams p) {
    if ((int)blockIdx.y >= p.num_regions) return;
    const BcCopyRegion reg = p.regions[blockIdx.y];
    const long long stride = (long long)gridDim.x * COPY_THREADS;
    const long long first = (long long)blockIdx.x * COPY_THREADS + threadIdx.x;
    const bool vec = ((reinterpret_cast<uintptr_t>(reg.src) | reinterpret_cast<uintptr_t>(reg.dst)) & 15) == 0;
    long long done = 0;
    if (vec) {
        const long long nv = reg.bytes / 16;
        const uint4* s = static_cast<const uint4*>(reg.src);
        uint4* d = static_cast<uint4*>(reg.dst);
        for (long long i = first; i < nv; i += stride) d[i] = s[i];
        done = nv * 16;
    }
    const unsigned char* s = static_cast<const unsigned char*>(reg.src);
    unsigned char* d = static_cast<unsigned char*>(reg.dst);
    for (long long i = done + first; i < reg.bytes; i += stride) d[i] = s[i];
}
BC_EMU_ENTRY(bc_copy, BcCopyParams)
