//! The options of the CUDA backend that [`GenerateOptions`] does not carry, from code or the
//! environment.

use super::device;
#[cfg(doc)]
use super::{attention_tune, open, MultiCudaBackend};
#[cfg(doc)]
use crate::config::GenerateOptions;
use crate::kernels::launch::AttentionTile;
#[cfg(doc)]
use crate::model::PromptContext;
use crate::tune::apply::TuningSource;
use crate::{Error, Result};
use std::sync::Mutex;

/// Options of the CUDA backend that [`GenerateOptions`] does not carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Device ordinals of the logical devices of a multi-device run (`--devices 0,1`;
    /// `0,0` runs two logical devices on GPU 0). Empty: `device`, `device + 1`, ... for
    /// [`GenerateOptions::devices`]. With `emulate` every logical device is its own emulated
    /// device.
    pub devices: Vec<usize>,
    /// Capture and replay CUDA graphs, one per window shape and part of the tick (see
    /// [`MultiCudaBackend`] for the parts with several devices; `BC_NO_GRAPHS=1` turns it off).
    pub graphs: bool,
    /// Frames the KV cache holds with global attention when the run's length is not known
    /// (`BC_CUDA_CACHE_FRAMES`, default 21, the Self-Forcing video length); a
    /// [`crate::Generator`] run sizes it for its own frames. Local attention always uses its
    /// ring of `local_attn`.
    pub cache_frames: usize,
    /// Run on an emulated device instead of a GPU (`BC_CUDA_EMULATE=1`): the kernels under the
    /// SIMT emulation layer and GEMMs on the CPU, for testing the backend without a GPU.
    pub emulate: bool,
    /// Compute the prompts' cross-attention K/V on the CPU ([`PromptContext::kv`], f32) and
    /// upload them, instead of on the device (`BC_HOST_PROMPT_CONTEXT=1`; for debugging: about
    /// 150 GFLOP per prompt for Wan-1.3B).
    pub host_prompt_context: bool,
    /// Fuse the bias (and GELU) into cuBLASLt's GEMM epilogue where it has an algorithm for it
    /// (`BC_NO_GEMM_EPILOGUE=1` turns it off: plain GEMMs, then the activation kernel).
    pub fuse_bias: bool,
    /// Measurement aid for the residual-stream precision: round the f32 residual
    /// stream to bf16 after every residual add, as bf16 storage of it would. Not faster (the
    /// kernels still move f32); off by default, see docs/cuda.md for the measured error.
    pub round_residual_bf16: bool,
    /// Fuse the GELU of `ffn.0` into cuBLASLt's epilogue (`BC_NO_GELU_EPILOGUE=1` turns it
    /// off: bias epilogue, then the activation kernel).
    pub fuse_gelu: bool,
    /// The attention kernel's tile; `None` (the default) times both on the device on each
    /// window shape's real self-attention list at its first tick and keeps the faster (see
    /// [`attention_tune`]; an emulated device uses [`AttentionTile::Rows128`]).
    /// `BC_ATTENTION_TILE=rows64|rows128|auto`.
    pub attention_tile: Option<AttentionTile>,
    /// Key splits of the self-attention (split-KV, `cuda/attention.cu`): `None` (the default)
    /// lets `BC_ATTN_SPLIT` decide (`1`: never split, `N`: N splits), else the wave-fill model
    /// ([`crate::kernels::launch::attention_splits`]); `Some(n)` forces n. Either way a launch
    /// splits only as far as the session's scratch holds its partial results.
    pub attention_split: Option<usize>,
    /// Multi-device joint exchange: a second pair of window K/V buffers for odd layers, so
    /// the peer copies of one layer overlap the next layer's compute (default; off: single
    /// buffering, each device waits for its outgoing copies before its next layer).
    pub double_kv: bool,
    /// The latents of the blocks being denoised stay on the device(s) (flow step and renoise
    /// there, only finished blocks are downloaded; with several devices each block on the
    /// device it is placed on); off (`BC_HOST_LATENTS=1`): the flows come back every tick and
    /// the executor steps on the host, as the CPU backend does. Both give the same bits.
    pub device_latents: bool,
    /// Where the tuned kernel choices come from (`blockcascade tune`, [`crate::tune`]): by
    /// default the tuning file of a real device (`BC_TUNING=off` turns it off); options above
    /// and environment variables that pick a variant win over it.
    pub tuning: TuningSource,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            devices: Vec::new(),
            graphs: true,
            cache_frames: 21,
            emulate: false,
            host_prompt_context: false,
            fuse_bias: true,
            fuse_gelu: true,
            round_residual_bf16: false,
            attention_tile: None,
            attention_split: None,
            double_kv: true,
            device_latents: true,
            tuning: TuningSource::Auto,
        }
    }
}

impl CudaOptions {
    /// Defaults overridden by `BC_CUDA_DEVICE`, `BC_NO_GRAPHS=1`, `BC_CUDA_CACHE_FRAMES`,
    /// `BC_CUDA_EMULATE=1`, `BC_NO_GEMM_EPILOGUE=1`, `BC_NO_GELU_EPILOGUE=1`,
    /// `BC_HOST_PROMPT_CONTEXT=1`, `BC_HOST_LATENTS=1`, `BC_TUNING=off`.
    pub fn from_env() -> Self {
        let mut o = CudaOptions::default();
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        if let Some(d) = num("BC_CUDA_DEVICE") {
            o.device = d;
        }
        if device::env_flag("BC_NO_GRAPHS") {
            o.graphs = false;
        }
        if device::env_flag("BC_CUDA_EMULATE") {
            o.emulate = true;
        }
        if device::env_flag("BC_HOST_PROMPT_CONTEXT") {
            o.host_prompt_context = true;
        }
        if let Some(f) = num("BC_CUDA_CACHE_FRAMES") {
            o.cache_frames = f.max(1);
        }
        if device::env_flag("BC_NO_GEMM_EPILOGUE") {
            o.fuse_bias = false;
        }
        if device::env_flag("BC_NO_GELU_EPILOGUE") {
            o.fuse_gelu = false;
        }
        if device::env_flag("BC_HOST_LATENTS") {
            o.device_latents = false;
        }
        o.tuning = TuningSource::from_env();
        // An unknown value is an error at open (`env_attention_tile`).
        o.attention_tile = env_attention_tile().ok().flatten();
        o
    }
}

/// `BC_ATTENTION_TILE`: `Ok(None)` when unset or `auto`, an error for an unknown value.
pub(super) fn env_attention_tile() -> Result<Option<AttentionTile>> {
    match std::env::var("BC_ATTENTION_TILE") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() || v.trim() == "auto" => Ok(None),
        Ok(v) => AttentionTile::parse(&v).map(Some).ok_or_else(|| {
            Error::invalid(format!(
                "BC_ATTENTION_TILE={v:?} is not one of rows64, rows128, auto"
            ))
        }),
    }
}

pub(super) static OVERRIDE: Mutex<Option<CudaOptions>> = Mutex::new(None);

/// Sets the options that [`open`] (and so `--backend cuda` through the executor) uses instead
/// of [`CudaOptions::from_env`]; `None` restores the environment. For tests and benchmarks.
pub fn set_session_options(o: Option<CudaOptions>) {
    *OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()) = o;
}
