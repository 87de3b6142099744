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

/// The message shown when the crate was built without nvcc.
pub const NOT_BUILT: &str = "kernels were not built: run scripts/install-cuda-toolchain.sh";

/// Names of the kernels in the fatbin (the `extern "C"` entry points).
pub const KERNEL_NAMES: &[&str] = &[
    "bc_ln_modulate",
    "bc_layer_norm_affine",
    "bc_gated_residual",
    "bc_qk_norm_rope",
    "bc_attention_hd64",
    "bc_attention_hd128",
    "bc_attention_hd64_q128",
    "bc_attention_hd128_q128",
    "bc_activation",
    "bc_time_embedding",
    "bc_flow_step",
    "bc_patchify",
    "bc_unpatchify",
    "bc_copy",
    "bc_test_mma",
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
