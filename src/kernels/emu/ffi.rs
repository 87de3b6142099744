//! The entry points of the emulated kernel library: `build.rs` compiles every `cuda/*.cu` as
//! host C++ against the SIMT emulation layer (`cuda/emu/`) into a static library with one
//! `extern "C"` function per kernel (`bc_emu_<kernel>`), which runs the kernel's blocks with
//! CUDA semantics. [`launch_raw`] calls one with launch dimensions and a params struct.

use super::super::params::*;
use super::super::{Kernel, LaunchError, LaunchErrorKind, LaunchResult};
use std::ffi::{c_char, c_int, c_void, CStr};

type Entry = unsafe extern "C" fn(*const BcLaunchDims, *const c_void, *mut c_char, usize) -> c_int;

extern "C" {
    fn bc_emu_set_step_limit(limit: i64) -> i64;
    fn bc_emu_bc_ln_modulate(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_layer_norm_affine(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_gated_residual(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_residual_norm(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_qk_norm_rope(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_hd64(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_hd128(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_hd64_q128(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_hd128_q128(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_activation(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_time_embedding(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_flow_step(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_patchify(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_unpatchify(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_copy(d: *const BcLaunchDims, p: *const c_void, e: *mut c_char, n: usize) -> c_int;
    fn bc_emu_bc_t5_rms_norm(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_t5_gated_gelu(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_t5_attention(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv(d: *const BcLaunchDims, p: *const c_void, e: *mut c_char, n: usize) -> c_int;
    fn bc_emu_bc_dec_latent_in(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_dec_rms_norm(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_dec_upsample2x(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_dec_to_pixels(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_n16(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma_n96(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma_n64(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma_ws(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma_ws_n96(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma_ws_n64(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_halo_n64(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_dec_softmax(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_test_sync(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_test_mma(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_wgmma_hd64(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_wgmma_hd128(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_wgmma_hd128_k128(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_wgmma_hd128_pp(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_wgmma_hd128_pp_k128(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_wgmma_hd128_ws(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_wgmma_hd128_ws_deep(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_attention_combine(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_wgmma_probe(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_tma_probe(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma_tma(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
    fn bc_emu_bc_conv_wgmma_tma_n96(
        d: *const BcLaunchDims,
        p: *const c_void,
        e: *mut c_char,
        n: usize,
    ) -> c_int;
}

/// The emulated entry point of `kernel`.
fn entry(kernel: Kernel) -> Entry {
    match kernel {
        Kernel::LnModulate => bc_emu_bc_ln_modulate,
        Kernel::LayerNormAffine => bc_emu_bc_layer_norm_affine,
        Kernel::GatedResidual => bc_emu_bc_gated_residual,
        Kernel::ResidualNorm => bc_emu_bc_residual_norm,
        Kernel::QkNormRope => bc_emu_bc_qk_norm_rope,
        Kernel::AttentionHd64 => bc_emu_bc_attention_hd64,
        Kernel::AttentionHd128 => bc_emu_bc_attention_hd128,
        Kernel::AttentionHd64Q128 => bc_emu_bc_attention_hd64_q128,
        Kernel::AttentionHd128Q128 => bc_emu_bc_attention_hd128_q128,
        Kernel::AttentionWgmmaHd64 => bc_emu_bc_attention_wgmma_hd64,
        Kernel::AttentionWgmmaHd128 => bc_emu_bc_attention_wgmma_hd128,
        Kernel::AttentionWgmmaHd128K128 => bc_emu_bc_attention_wgmma_hd128_k128,
        Kernel::AttentionWgmmaHd128Pp => bc_emu_bc_attention_wgmma_hd128_pp,
        Kernel::AttentionWgmmaHd128PpK128 => bc_emu_bc_attention_wgmma_hd128_pp_k128,
        Kernel::AttentionWgmmaHd128Ws => bc_emu_bc_attention_wgmma_hd128_ws,
        Kernel::AttentionWgmmaHd128WsDeep => bc_emu_bc_attention_wgmma_hd128_ws_deep,
        Kernel::AttentionCombine => bc_emu_bc_attention_combine,
        Kernel::Activation => bc_emu_bc_activation,
        Kernel::TimeEmbedding => bc_emu_bc_time_embedding,
        Kernel::FlowStep => bc_emu_bc_flow_step,
        Kernel::Patchify => bc_emu_bc_patchify,
        Kernel::Unpatchify => bc_emu_bc_unpatchify,
        Kernel::Copy => bc_emu_bc_copy,
        Kernel::T5RmsNorm => bc_emu_bc_t5_rms_norm,
        Kernel::T5GatedGelu => bc_emu_bc_t5_gated_gelu,
        Kernel::T5Attention => bc_emu_bc_t5_attention,
        Kernel::Conv => bc_emu_bc_conv,
        Kernel::ConvN16 => bc_emu_bc_conv_n16,
        Kernel::ConvWgmma => bc_emu_bc_conv_wgmma,
        Kernel::ConvWgmmaN96 => bc_emu_bc_conv_wgmma_n96,
        Kernel::ConvWgmmaN64 => bc_emu_bc_conv_wgmma_n64,
        Kernel::ConvWgmmaWs => bc_emu_bc_conv_wgmma_ws,
        Kernel::ConvWgmmaWsN96 => bc_emu_bc_conv_wgmma_ws_n96,
        Kernel::ConvWgmmaWsN64 => bc_emu_bc_conv_wgmma_ws_n64,
        Kernel::ConvHaloN64 => bc_emu_bc_conv_halo_n64,
        Kernel::DecLatentIn => bc_emu_bc_dec_latent_in,
        Kernel::DecRmsNorm => bc_emu_bc_dec_rms_norm,
        Kernel::DecUpsample2x => bc_emu_bc_dec_upsample2x,
        Kernel::DecToPixels => bc_emu_bc_dec_to_pixels,
        Kernel::DecSoftmax => bc_emu_bc_dec_softmax,
        Kernel::TestSync => bc_emu_bc_test_sync,
        Kernel::TestMma => bc_emu_bc_test_mma,
        Kernel::WgmmaProbe => bc_emu_bc_wgmma_probe,
        Kernel::TmaProbe => bc_emu_bc_tma_probe,
        Kernel::ConvWgmmaTma => bc_emu_bc_conv_wgmma_tma,
        Kernel::ConvWgmmaTmaN96 => bc_emu_bc_conv_wgmma_tma_n96,
    }
}

/// Launch dimensions of `kernel` from grid and block sizes (with the kernel's dynamic shared
/// memory).
pub fn dims(kernel: Kernel, grid: [u32; 3], block: [u32; 3]) -> BcLaunchDims {
    BcLaunchDims {
        grid,
        block,
        shared_bytes: kernel.dynamic_smem_bytes(),
    }
}

/// Sets the emulation's step budget per thread of a block (`BC_EMU_STEP_LIMIT`, see
/// docs/wgmma.md; `Some(0)`: off) for the later launches of the calling thread only, or with
/// `None` goes back to the environment's; returns the calling thread's previous setting. A block
/// of `n` threads that resumes its threads and runs atomics more than `limit * n` times fails
/// with [`LaunchErrorKind::StepLimit`] (a kernel that loops forever).
pub fn set_step_limit(limit: Option<u64>) -> Option<u64> {
    let v = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
    // SAFETY: sets a thread-local of the emulation runtime; no pointers.
    let prev = unsafe { bc_emu_set_step_limit(v) };
    u64::try_from(prev).ok()
}

/// Runs `kernel` under emulation with `params`, blocking until every block has finished.
///
/// # Safety
/// `params` must point to the params struct `kernel` expects, and every pointer in it must be
/// valid for the accesses the kernel makes with the given dimensions (as on a GPU).
pub unsafe fn launch_raw(
    kernel: Kernel,
    dims: &BcLaunchDims,
    params: *const c_void,
) -> LaunchResult {
    let mut err = [0 as c_char; 1024];
    let code = (entry(kernel))(dims, params, err.as_mut_ptr(), err.len());
    if code == 0 {
        return Ok(());
    }
    let message = CStr::from_ptr(err.as_ptr()).to_string_lossy().into_owned();
    let kind = match code {
        1 => LaunchErrorKind::BarrierDivergence,
        2 => LaunchErrorKind::WarpCollective,
        3 => LaunchErrorKind::Trap,
        5 => LaunchErrorKind::StepLimit,
        _ => LaunchErrorKind::InvalidLaunch,
    };
    Err(LaunchError {
        kernel: kernel.name(),
        kind,
        message,
    })
}
