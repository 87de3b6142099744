// Element-wise kernels.
//
// bc_activation:     out[i] = act(x[i] + bias[i % cols]) (bias optional), act = gelu_tanh(u) =
//                    0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), silu(u) = u / (1 + exp(-u))
//                    identity, or rounding to bf16 (an f32 value that bf16 storage would hold);
//                    f32 or bf16 data (f32 math), in place ok, or f32 in and bf16 out
//                    (BC_ACT_F32_TO_BF16: a GEMM's f32 bias converted for cuBLASLt, whose
//                    bias vector must have the bf16 output's type). With a bias it is
//                    the epilogue of a GEMM that cuBLASLt does not fuse.
// bc_time_embedding: out[f] = [cos(t_f w_i), sin(t_f w_i)] (i < half), w_i = 10000^(-i/half),
//                    in f64 like cpu::ops::sinusoidal; one block per frame.
// bc_flow_step:      x0 = x - sigma[f] v; x = (1 - sn) x0 + sn noise when sigma_next[f] >= 0,
//                    else x = x0; x0_out (optional) gets x0. f32 latents [frames, frame_elems].
//
// One thread per element, EW_THREADS per block.
// Checked by tests/kernels_emu.rs against cpu::ops::{gelu_tanh, silu, sinusoidal, flow_step}.
#include "include/common.cuh"

namespace {
constexpr int EW_THREADS = BC_ELEM_THREADS;
}  // namespace

__device__ __forceinline__ float bc_act(float u, int op) {
    if (op == BC_ACT_NONE) return u;
    if (op == BC_ACT_ROUND_BF16) return __bfloat162float(__float2bfloat16(u));
    if (op == BC_ACT_SILU) return u / (1.f + expf(-u));
    return bc_gelu_tanh(u);
}

extern "C" __global__ void __launch_bounds__(EW_THREADS) bc_activation(BcActivationParams p) {
    const long long i = (long long)blockIdx.x * EW_THREADS + threadIdx.x;
    if (i >= p.n) return;
    const float b = p.bias ? p.bias[i % p.cols] : 0.f;
    // Input bf16 only in mode 1; output bf16 in modes 1 and BC_ACT_F32_TO_BF16: one load, one
    // activation, one store.
    const float u = p.bf16 == 1 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.x)[i])
                                : static_cast<const float*>(p.x)[i];
    const float v = bc_act(u + b, p.op);
    if (p.bf16)
        static_cast<__nv_bfloat16*>(p.out)[i] = __float2bfloat16(v);
    else
        static_cast<float*>(p.out)[i] = v;
}
BC_EMU_ENTRY(bc_activation, BcActivationParams)

extern "C" __global__ void __launch_bounds__(EW_THREADS) bc_time_embedding(BcTimeEmbeddingParams p) {
    const int f = blockIdx.x;
    const int half = p.freq_dim / 2;
    const double t = (double)p.t[f];
    const double ln1e4 = 9.210340371976184;  // ln(10000)
    for (int i = threadIdx.x; i < half; i += EW_THREADS) {
        const double a = t * exp(-(double)i / (double)half * ln1e4);
        p.out[(size_t)f * p.freq_dim + i] = (float)cos(a);
        p.out[(size_t)f * p.freq_dim + half + i] = (float)sin(a);
    }
}
BC_EMU_ENTRY(bc_time_embedding, BcTimeEmbeddingParams)

extern "C" __global__ void __launch_bounds__(EW_THREADS) bc_flow_step(BcFlowStepParams p) {
    const long long i = (long long)blockIdx.x * EW_THREADS + threadIdx.x;
    if (i >= (long long)p.frames * p.frame_elems) return;
    const int f = (int)(i / p.frame_elems);
    const float x0 = p.x[i] - p.sigma[f] * p.v[i];
    if (p.x0_out) p.x0_out[i] = x0;
    const float sn = p.sigma_next ? p.sigma_next[f] : -1.f;
    p.x[i] = sn >= 0.f ? (1.f - sn) * x0 + sn * p.noise[i] : x0;
}
BC_EMU_ENTRY(bc_flow_step, BcFlowStepParams)
