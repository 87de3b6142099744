//! CUDA kernels: launch parameters shared with `cuda/include/params.h`, the embedded fatbin
//! and its resource report, the CPU (SIMT emulation) launcher, and the per-kernel launch
//! constructors ([`launch`]) that it and the CUDA backend share.
//!
//! `build.rs` compiles every `cuda/*.cu` twice: with nvcc (when found) into one fatbin
//! (sm_80 + sm_90a cubins, compute_80 PTX) embedded here, and always as host C++ against the
//! SIMT emulation layer `cuda/emu/`, callable through [`emu`].

#[allow(missing_docs, non_camel_case_types, clippy::all)]
pub mod params;

pub mod emu;

pub mod launch;

pub mod tma;

use params::*;
use std::fmt;

/// The message shown when the crate was built without nvcc.
pub const NOT_BUILT: &str = "kernels were not built: run scripts/install-cuda-toolchain.sh";

/// Names of the kernels in the fatbin (the `extern "C"` entry points).
pub const KERNEL_NAMES: &[&str] = &[
    "bc_ln_modulate",
    "bc_layer_norm_affine",
    "bc_gated_residual",
    "bc_residual_norm",
    "bc_qk_norm_rope",
    "bc_attention_hd64",
    "bc_attention_hd128",
    "bc_attention_hd64_q128",
    "bc_attention_hd128_q128",
    "bc_attention_combine",
    "bc_activation",
    "bc_time_embedding",
    "bc_flow_step",
    "bc_patchify",
    "bc_unpatchify",
    "bc_copy",
    "bc_t5_rms_norm",
    "bc_t5_gated_gelu",
    "bc_t5_attention",
    "bc_conv",
    "bc_conv_n16",
    "bc_dec_latent_in",
    "bc_dec_rms_norm",
    "bc_dec_upsample2x",
    "bc_dec_to_pixels",
    "bc_dec_softmax",
    "bc_test_mma",
    "bc_wgmma_probe",
    "bc_tma_probe",
    "bc_conv_wgmma_tma",
    "bc_conv_wgmma_tma_n96",
];

#[cfg(bc_fatbin)]
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);

#[cfg(bc_fatbin)]
static FATBIN: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/blockcascade.fatbin"
)));

/// The fatbin holding every kernel (16-byte aligned, for `cuModuleLoadData`), or `None`
/// when the crate was built without nvcc (see [`NOT_BUILT`]).
pub fn fatbin() -> Option<&'static [u8]> {
    #[cfg(bc_fatbin)]
    {
        Some(&FATBIN.0)
    }
    #[cfg(not(bc_fatbin))]
    {
        None
    }
}

/// Whether the CUDA kernels were compiled into this build.
pub fn built() -> bool {
    fatbin().is_some()
}

/// Per-kernel resource usage from `ptxas -v` (registers, shared memory, stack, spills) as a
/// text table, or [`NOT_BUILT`] when nvcc was not found at build time.
pub fn report() -> &'static str {
    include_str!(concat!(env!("OUT_DIR"), "/kernels_report.txt"))
}

/// The kernels of the library (the `extern "C"` entry points of `cuda/*.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `bc_ln_modulate` ([`BcLnModulateParams`]).
    LnModulate,
    /// `bc_layer_norm_affine` ([`BcLayerNormParams`]).
    LayerNormAffine,
    /// `bc_gated_residual` ([`BcGatedResidualParams`]).
    GatedResidual,
    /// `bc_residual_norm` ([`BcResidualNormParams`]): the gated residual and the following
    /// LayerNorm in one pass.
    ResidualNorm,
    /// `bc_qk_norm_rope` ([`BcQkNormRopeParams`]).
    QkNormRope,
    /// `bc_attention_hd64` ([`BcAttentionParams`]).
    AttentionHd64,
    /// `bc_attention_hd128` ([`BcAttentionParams`]): dynamic shared memory.
    AttentionHd128,
    /// `bc_attention_hd64_q128` ([`BcAttentionParams`]): 128 query rows per block.
    AttentionHd64Q128,
    /// `bc_attention_hd128_q128` ([`BcAttentionParams`]): 128 query rows per block, dynamic
    /// shared memory.
    AttentionHd128Q128,
    /// `bc_attention_wgmma_hd64` ([`BcAttentionParams`]): the Hopper wgmma prototype (sm_90a
    /// only, it traps on sm_80; launched on 9.0 devices unless `BC_ATTN_WGMMA=0`), dynamic
    /// shared memory.
    AttentionWgmmaHd64,
    /// `bc_attention_wgmma_hd128` ([`BcAttentionParams`]): the same prototype for head_dim
    /// <= 128 (Wan's 12 x 128), dynamic shared memory.
    AttentionWgmmaHd128,
    /// `bc_attention_wgmma_hd128_k128` ([`BcAttentionParams`]): its 128-key-tile variant.
    AttentionWgmmaHd128K128,
    /// `bc_attention_wgmma_hd128_pp` ([`BcAttentionParams`]): its ping-pong variant (the two
    /// warpgroups take turns on the tensor cores).
    AttentionWgmmaHd128Pp,
    /// `bc_attention_wgmma_hd128_pp_k128` ([`BcAttentionParams`]): ping-pong with 128-key tiles.
    AttentionWgmmaHd128PpK128,
    /// `bc_attention_wgmma_hd128_ws` ([`BcAttentionParams`], `cuda/attention_ws.cu`): the
    /// warp-specialized variant (a producer warpgroup copies the K/V tiles, two consumer
    /// warpgroups compute as `pp_k128`; [`BC_ATTN_WS_THREADS`] threads).
    AttentionWgmmaHd128Ws,
    /// `bc_attention_wgmma_hd128_ws_deep` ([`BcAttentionParams`], `cuda/attention_ws.cu`): the
    /// warp-specialized variant whose producer hands its tiles over with
    /// `cp.async.mbarrier.arrive.noinc` (up to 3 in flight).
    AttentionWgmmaHd128WsDeep,
    /// `bc_attention_combine` ([`BcAttnCombineParams`]): merges the partial results of a
    /// split-KV attention launch (`BcAttentionParams::splits` > 1) into its output.
    AttentionCombine,
    /// `bc_activation` ([`BcActivationParams`]).
    Activation,
    /// `bc_time_embedding` ([`BcTimeEmbeddingParams`]).
    TimeEmbedding,
    /// `bc_flow_step` ([`BcFlowStepParams`]).
    FlowStep,
    /// `bc_patchify` ([`BcPatchParams`]).
    Patchify,
    /// `bc_unpatchify` ([`BcPatchParams`]).
    Unpatchify,
    /// `bc_copy` ([`BcCopyParams`]).
    Copy,
    /// `bc_t5_rms_norm` ([`BcT5RmsNormParams`]): the text encoder's norm and residual add.
    T5RmsNorm,
    /// `bc_t5_gated_gelu` ([`BcT5GatedGeluParams`]): the text encoder's FFN hidden layer.
    T5GatedGelu,
    /// `bc_t5_attention` ([`BcT5AttentionParams`]): the text encoder's attention.
    T5Attention,
    /// `bc_conv` ([`BcConvParams`]): the decoders' implicit-GEMM convolution.
    Conv,
    /// `bc_conv_n16` ([`BcConvParams`]): the same with 16-channel tiles (cout <= 16).
    ConvN16,
    /// `bc_conv_wgmma` ([`BcConvParams`]): the Hopper wgmma variant (sm_90a only, it traps on
    /// sm_80; launched on 9.0 devices unless `BC_CONV_WGMMA=0`), dynamic shared memory.
    ConvWgmma,
    /// `bc_conv_wgmma_n96` ([`BcConvParams`]): the same with 96-channel tiles.
    ConvWgmmaN96,
    /// `bc_conv_wgmma_n64` ([`BcConvParams`]): the same with 64-channel tiles.
    ConvWgmmaN64,
    /// `bc_conv_wgmma_ws` ([`BcConvParams`], `cuda/conv_ws.cu`): the warp-specialized wgmma
    /// convolution (a producer warpgroup gathers, two consumer warpgroups multiply;
    /// [`BC_CONV_WS_THREADS`] threads), 192-channel tiles; the same output bits as
    /// `bc_conv_wgmma`. sm_90a only; opt-in: `BC_CONV_WGMMA_VARIANT=ws`.
    ConvWgmmaWs,
    /// `bc_conv_wgmma_ws_n96` ([`BcConvParams`]): the same with 96-channel tiles.
    ConvWgmmaWsN96,
    /// `bc_conv_wgmma_ws_n64` ([`BcConvParams`]): the same with 64-channel tiles.
    ConvWgmmaWsN64,
    /// `bc_conv_halo_n64` ([`BcConvParams`], `cuda/conv_halo.cu`): the persistent,
    /// weight-resident, halo-tile 3x3 conv to 64 channels ([`launch::conv_halo`]); the same
    /// output bits as `bc_conv_wgmma_n64` where it fits. sm_90a only; opt-in: `BC_CONV_HALO=1`.
    ConvHaloN64,
    /// `bc_dec_latent_in` ([`BcDecLatentInParams`]).
    DecLatentIn,
    /// `bc_dec_rms_norm` ([`BcDecRmsNormParams`]).
    DecRmsNorm,
    /// `bc_dec_upsample2x` ([`BcDecUpsampleParams`]).
    DecUpsample2x,
    /// `bc_dec_to_pixels` ([`BcDecToPixelsParams`]).
    DecToPixels,
    /// `bc_dec_softmax` ([`BcDecSoftmaxParams`]).
    DecSoftmax,
    /// Emulation-only test kernel `bc_test_sync` (see `cuda/emu/test_kernels.cu`).
    TestSync,
    /// Tensor-core layout test kernel `bc_test_mma` (see `cuda/test/test_mma.cu`).
    TestMma,
    /// Hopper warpgroup-MMA layout probe `bc_wgmma_probe` ([`BcWgmmaProbeParams`], see
    /// `cuda/test/wgmma_probe.cu`): sm_90a only (it traps on sm_80).
    WgmmaProbe,
    /// Hopper TMA / mbarrier layout probe `bc_tma_probe` ([`BcTmaProbeParams`], see
    /// `cuda/test/tma_probe.cu`): sm_90a only (it traps below).
    TmaProbe,
    /// `bc_conv_wgmma_tma` ([`BcConvTmaParams`], `cuda/conv_wgmma_tma.cu`): the wgmma
    /// convolution with TMA operand loads from a producer warp; sm_90a only.
    ConvWgmmaTma,
    /// `bc_conv_wgmma_tma_n96`: the same with 96 output channels per block.
    ConvWgmmaTmaN96,
}

impl Kernel {
    /// Every kernel of the library.
    pub const ALL: [Kernel; 46] = [
        Kernel::LnModulate,
        Kernel::LayerNormAffine,
        Kernel::GatedResidual,
        Kernel::ResidualNorm,
        Kernel::QkNormRope,
        Kernel::AttentionHd64,
        Kernel::AttentionHd128,
        Kernel::AttentionHd64Q128,
        Kernel::AttentionHd128Q128,
        Kernel::AttentionWgmmaHd64,
        Kernel::AttentionWgmmaHd128,
        Kernel::AttentionWgmmaHd128K128,
        Kernel::AttentionWgmmaHd128Pp,
        Kernel::AttentionWgmmaHd128PpK128,
        Kernel::AttentionWgmmaHd128Ws,
        Kernel::AttentionWgmmaHd128WsDeep,
        Kernel::AttentionCombine,
        Kernel::Activation,
        Kernel::TimeEmbedding,
        Kernel::FlowStep,
        Kernel::Patchify,
        Kernel::Unpatchify,
        Kernel::Copy,
        Kernel::T5RmsNorm,
        Kernel::T5GatedGelu,
        Kernel::T5Attention,
        Kernel::Conv,
        Kernel::ConvN16,
        Kernel::ConvWgmma,
        Kernel::ConvWgmmaN96,
        Kernel::ConvWgmmaN64,
        Kernel::ConvWgmmaWs,
        Kernel::ConvWgmmaWsN96,
        Kernel::ConvWgmmaWsN64,
        Kernel::ConvHaloN64,
        Kernel::DecLatentIn,
        Kernel::DecRmsNorm,
        Kernel::DecUpsample2x,
        Kernel::DecToPixels,
        Kernel::DecSoftmax,
        Kernel::TestSync,
        Kernel::TestMma,
        Kernel::WgmmaProbe,
        Kernel::TmaProbe,
        Kernel::ConvWgmmaTma,
        Kernel::ConvWgmmaTmaN96,
    ];

    /// The kernel's entry-point name in the fatbin.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::LnModulate => "bc_ln_modulate",
            Kernel::LayerNormAffine => "bc_layer_norm_affine",
            Kernel::GatedResidual => "bc_gated_residual",
            Kernel::ResidualNorm => "bc_residual_norm",
            Kernel::QkNormRope => "bc_qk_norm_rope",
            Kernel::AttentionHd64 => "bc_attention_hd64",
            Kernel::AttentionHd128 => "bc_attention_hd128",
            Kernel::AttentionHd64Q128 => "bc_attention_hd64_q128",
            Kernel::AttentionHd128Q128 => "bc_attention_hd128_q128",
            Kernel::AttentionWgmmaHd64 => "bc_attention_wgmma_hd64",
            Kernel::AttentionWgmmaHd128 => "bc_attention_wgmma_hd128",
            Kernel::AttentionWgmmaHd128K128 => "bc_attention_wgmma_hd128_k128",
            Kernel::AttentionWgmmaHd128Pp => "bc_attention_wgmma_hd128_pp",
            Kernel::AttentionWgmmaHd128PpK128 => "bc_attention_wgmma_hd128_pp_k128",
            Kernel::AttentionWgmmaHd128Ws => "bc_attention_wgmma_hd128_ws",
            Kernel::AttentionWgmmaHd128WsDeep => "bc_attention_wgmma_hd128_ws_deep",
            Kernel::AttentionCombine => "bc_attention_combine",
            Kernel::Activation => "bc_activation",
            Kernel::TimeEmbedding => "bc_time_embedding",
            Kernel::FlowStep => "bc_flow_step",
            Kernel::Patchify => "bc_patchify",
            Kernel::Unpatchify => "bc_unpatchify",
            Kernel::Copy => "bc_copy",
            Kernel::T5RmsNorm => "bc_t5_rms_norm",
            Kernel::T5GatedGelu => "bc_t5_gated_gelu",
            Kernel::T5Attention => "bc_t5_attention",
            Kernel::Conv => "bc_conv",
            Kernel::ConvN16 => "bc_conv_n16",
            Kernel::ConvWgmma => "bc_conv_wgmma",
            Kernel::ConvWgmmaN96 => "bc_conv_wgmma_n96",
            Kernel::ConvWgmmaN64 => "bc_conv_wgmma_n64",
            Kernel::ConvWgmmaWs => "bc_conv_wgmma_ws",
            Kernel::ConvWgmmaWsN96 => "bc_conv_wgmma_ws_n96",
            Kernel::ConvWgmmaWsN64 => "bc_conv_wgmma_ws_n64",
            Kernel::ConvHaloN64 => "bc_conv_halo_n64",
            Kernel::DecLatentIn => "bc_dec_latent_in",
            Kernel::DecRmsNorm => "bc_dec_rms_norm",
            Kernel::DecUpsample2x => "bc_dec_upsample2x",
            Kernel::DecToPixels => "bc_dec_to_pixels",
            Kernel::DecSoftmax => "bc_dec_softmax",
            Kernel::TestSync => "bc_test_sync",
            Kernel::TestMma => "bc_test_mma",
            Kernel::WgmmaProbe => "bc_wgmma_probe",
            Kernel::TmaProbe => "bc_tma_probe",
            Kernel::ConvWgmmaTma => "bc_conv_wgmma_tma",
            Kernel::ConvWgmmaTmaN96 => "bc_conv_wgmma_tma_n96",
        }
    }

    /// Dynamic shared memory every launch of the kernel gets, in bytes (0: static only).
    pub fn dynamic_smem_bytes(self) -> u32 {
        match self {
            Kernel::AttentionHd128 => BC_ATTN_HD128_SMEM,
            Kernel::AttentionHd128Q128 => BC_ATTN_WIDE_HD128_SMEM,
            Kernel::AttentionWgmmaHd64 => BC_ATTN_WGMMA_SMEM,
            Kernel::AttentionWgmmaHd128 | Kernel::AttentionWgmmaHd128Pp => BC_ATTN_WGMMA_HD128_SMEM,
            Kernel::AttentionWgmmaHd128K128 | Kernel::AttentionWgmmaHd128PpK128 => {
                BC_ATTN_WGMMA_K128_SMEM
            }
            Kernel::AttentionWgmmaHd128Ws | Kernel::AttentionWgmmaHd128WsDeep => BC_ATTN_WS_SMEM,
            Kernel::WgmmaProbe => BC_WGMMA_PROBE_SMEM,
            Kernel::TmaProbe => BC_TMA_PROBE_SMEM,
            // Its mbarrier modes keep the barrier in dynamic shared memory, its race modes two
            // 2 KB wgmma tiles and two barriers.
            Kernel::TestSync => 4112,
            Kernel::ConvWgmmaTma => BC_CONV_TMA_SMEM,
            Kernel::ConvWgmmaTmaN96 => BC_CONV_TMA_N96_SMEM,
            Kernel::ConvWgmma => BC_CONV_WG_SMEM,
            Kernel::ConvWgmmaN96 => BC_CONV_WG_N96_SMEM,
            Kernel::ConvWgmmaN64 => BC_CONV_WG_N64_SMEM,
            Kernel::ConvWgmmaWs => BC_CONV_WS_SMEM,
            Kernel::ConvWgmmaWsN96 => BC_CONV_WS_N96_SMEM,
            Kernel::ConvWgmmaWsN64 => BC_CONV_WS_N64_SMEM,
            Kernel::ConvHaloN64 => BC_CONV_HALO_SMEM,
            _ => 0,
        }
    }

    /// Kernels with real code only in the sm_90a cubin (Hopper wgmma; elsewhere a stub that
    /// traps), launched only on a compute capability 9.0 device: loading the module elsewhere
    /// may leave them without their shared-memory opt-in.
    pub fn sm90a_only(self) -> bool {
        matches!(
            self,
            Kernel::AttentionWgmmaHd64
                | Kernel::AttentionWgmmaHd128
                | Kernel::AttentionWgmmaHd128K128
                | Kernel::AttentionWgmmaHd128Pp
                | Kernel::AttentionWgmmaHd128PpK128
                | Kernel::AttentionWgmmaHd128Ws
                | Kernel::AttentionWgmmaHd128WsDeep
                | Kernel::WgmmaProbe
                | Kernel::TmaProbe
                | Kernel::ConvWgmmaTma
                | Kernel::ConvWgmmaTmaN96
                | Kernel::ConvWgmmaWs
                | Kernel::ConvWgmmaWsN96
                | Kernel::ConvWgmmaWsN64
                | Kernel::ConvHaloN64
        )
    }
}

/// What went wrong in a launch: the launch constructors ([`launch`]) refuse their
/// arguments, or the emulator reports a kernel fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchErrorKind {
    /// A `__syncthreads` that not every thread reached (some exited, or they wait at
    /// different barriers).
    BarrierDivergence,
    /// A warp collective with a bad mask (exited/absent lanes, lanes elsewhere, mismatched masks).
    WarpCollective,
    /// `__trap()` or a failed `BC_EMU_CHECK`.
    Trap,
    /// A launch configuration the hardware would refuse.
    InvalidLaunch,
    /// A block spent the emulation's step budget (`BC_EMU_STEP_LIMIT`): a kernel that loops
    /// forever while still reaching barriers, warp collectives or atomics (it never deadlocks).
    StepLimit,
    /// The safe wrapper refused its arguments (sizes, alignment).
    InvalidArgument,
}

/// A launch that failed (refused, or faulted under emulation).
#[derive(Clone, Debug)]
pub struct LaunchError {
    /// The kernel.
    pub kernel: &'static str,
    /// The kind of failure.
    pub kind: LaunchErrorKind,
    /// What the emulator (or the wrapper) reported.
    pub message: String,
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            LaunchErrorKind::InvalidArgument => {
                write!(f, "kernel {}: {}", self.kernel, self.message)
            }
            _ => write!(f, "emulated kernel {}: {}", self.kernel, self.message),
        }
    }
}

impl std::error::Error for LaunchError {}

impl From<LaunchError> for crate::Error {
    fn from(e: LaunchError) -> Self {
        match e.kind {
            LaunchErrorKind::InvalidArgument => crate::Error::InvalidArgument(e.to_string()),
            _ => crate::Error::Device(e.to_string()),
        }
    }
}

/// Result of a launch.
pub type LaunchResult<T = ()> = Result<T, LaunchError>;

/// An [`LaunchErrorKind::InvalidArgument`] error of `kernel`.
pub(crate) fn invalid(kernel: Kernel, msg: impl Into<String>) -> LaunchError {
    LaunchError {
        kernel: kernel.name(),
        kind: LaunchErrorKind::InvalidArgument,
        message: msg.into(),
    }
}
