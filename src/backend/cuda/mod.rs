//! The CUDA backend: the same joint forward as [`Model::forward_partial`], op for op, on
//! NVIDIA GPUs (or on an emulated device, [`CudaOptions::emulate`]). docs/cuda.md describes the
//! kernels, the precision and the graphs; docs/multi-device.md the exchange between devices.
//!
//! Where things are:
//! - `options` ([`CudaOptions`]): what [`GenerateOptions`] does not carry, from code or `BC_*`.
//! - `weight_cache`: the weights on a device, and the process-wide cache that keeps a model's
//!   weights there between runs (keyed by [`Model::id`], ordinal and emulation; dropping the
//!   model drops them). [`weight_uploads`] and [`cached_weight_sets`] count.
//! - `memory`: the sizes that follow from the options and one list of per-run buffers that
//!   both the free-memory check and the allocation use; too little memory is an
//!   [`Error::OutOfMemory`] naming the bytes, before anything is allocated.
//! - `single` ([`CudaBackend`]): one logical device; opening it and running one tick.
//! - `tables`: per-tick data and attention tables, built on the host ([`window::visible`], the
//!   rule every backend shares) and uploaded before the tick's launches.
//! - `graphs`: one CUDA graph per window shape ([`ShapeKey`]) and part of a tick: eager the
//!   first time (warm-up), captured the second, replayed after.
//! - `enqueue`: the launches of one forward (embedding, each layer before and after the K/V
//!   exchange point, head), through [`ops`] (kernels and GEMMs) on [`device::Gpu`].
//! - `joint` ([`MultiCudaBackend`]) and `lagged`: several devices, K/V exchanged every layer
//!   or once per tick.
//! - `prompt_kv`: the prompts' cross-attention K/V, computed on the device when a prompt
//!   first needs a slot (keyed by [`PromptContext::id`]).
//! - `resident`: the denoising state on the device(s): each block's latents in a slot of the
//!   device it is placed on (moved device to device when the placement moves it), the flow
//!   step and renoise by `bc_flow_step`, only finished blocks downloaded.
//! - `relay`: finished blocks handed to a decoder on one of several devices, copied device to
//!   device when they finished on another one.
//! - `time_table`: each distinct timestep's time embedding uploaded once into a device table,
//!   gathered per frame every tick.
//! - [`device`]: probing, the context and streams, buffers, launches, cuBLASLt, graphs, the
//!   pinned staging of per-tick uploads;
//!   [`emu_device`]: the emulated device behind the same interface.
//!
//! cudarc panics when libcuda or cuBLASLt cannot be loaded, so [`device::probe`] checks both
//! first; absence is a clean [`Error::Device`], and a build without nvcc reports
//! [`crate::kernels::NOT_BUILT`].

pub mod attention_tune;
mod dev_types;
pub mod device;
pub mod emu_device;
mod enqueue;
mod graphs;
pub mod info;
mod joint;
mod lagged;
mod memory;
pub mod nvml;
pub mod nvtx;
pub mod ops;
mod options;
mod prompt_kv;
mod relay;
mod resident;
mod single;
mod tables;
mod time_table;
mod weight_cache;

pub use device::{graph_replays, peer_copy_bytes};
pub(crate) use graphs::note_capture_failure;
pub use graphs::{graph_capture_failures, ShapeKey};
pub use joint::MultiCudaBackend;
use options::OVERRIDE;
pub use options::{set_session_options, CudaOptions};
pub use relay::{deny_peer_handoff, handoff_relays};
pub use resident::{device_flow_steps, handoff_waits, latent_moves, DeviceLatents};
pub use single::CudaBackend;
pub use time_table::time_table_uploads;
pub use weight_cache::{cached_weight_sets, evict_model, weight_uploads};

use crate::backend::Backend;
use crate::config::GenerateOptions;
use crate::model::Model;
#[cfg(doc)]
use crate::model::PromptContext;
use crate::Result;
#[cfg(doc)]
use crate::{window, Error};
use std::sync::atomic::{AtomicUsize, Ordering};

static DOUBLE_KV_DEVICES: AtomicUsize = AtomicUsize::new(0);

/// Logical devices opened with double-buffered window K/V in this process
/// ([`CudaOptions::double_kv`]; lets tests check that the overlapped exchange really ran).
pub fn double_kv_devices() -> usize {
    DOUBLE_KV_DEVICES.load(Ordering::Relaxed)
}

/// The options [`open`] starts from: the session's ([`set_session_options`]), else the
/// environment's ([`CudaOptions::from_env`]).
pub(crate) fn session_options() -> CudaOptions {
    OVERRIDE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(CudaOptions::from_env)
}

/// The GPU ordinal of the DiT's first logical device for `device_ids` (`--devices 2,3`,
/// `bc_engine_options.devices`; empty: the session's or the environment's
/// [`CudaOptions::devices`] / [`CudaOptions::device`], `BC_CUDA_DEVICE`), as [`open`] picks
/// it. The text encoder and the video decoder open this one, so they share the DiT's GPU.
pub fn first_device(device_ids: &[usize]) -> usize {
    device_ids.first().copied().unwrap_or_else(|| {
        let co = session_options();
        co.devices.first().copied().unwrap_or(co.device)
    })
}

/// The GPU ordinals of the DiT's logical devices for `opts` (`opts.device_ids`, else the
/// session's or the environment's [`CudaOptions::devices`], else `opts.devices` from
/// [`CudaOptions::device`] on), as [`open`] picks them: a decoder on one of them can be handed
/// finished blocks on the device ([`crate::decode::DecodeDevice::beside_dit`]).
pub fn dit_devices(opts: &GenerateOptions) -> Vec<usize> {
    if !opts.device_ids.is_empty() {
        return opts.device_ids.clone();
    }
    let co = session_options();
    if !co.devices.is_empty() {
        return co.devices;
    }
    (0..opts.devices.max(1)).map(|i| co.device + i).collect()
}

/// Opens the CUDA backend for `model` with `opts` (what [`crate::backend::cuda_backend`] calls):
/// [`CudaBackend`] on one device, [`MultiCudaBackend`] with `opts.devices > 1`.
///
/// `frames`: the number of frames the run generates, when known. With global attention the
/// KV cache then holds exactly that many frames (a run too long for the GPU fails here, with
/// the bytes it needs, instead of part-way); unknown, it holds [`CudaOptions::cache_frames`].
pub fn open<'m>(
    model: &'m Model,
    opts: &GenerateOptions,
    frames: Option<usize>,
) -> Result<Box<dyn Backend + 'm>> {
    let mut co = session_options();
    if !opts.device_ids.is_empty() {
        co.devices = opts.device_ids.clone();
    }
    co.graphs &= opts.graphs;
    if let (None, Some(f)) = (opts.local_attn, frames) {
        co.cache_frames = f.max(1);
    }
    if opts.devices > 1 || co.devices.len() > 1 {
        return Ok(Box::new(MultiCudaBackend::new(model, opts, co)?));
    }
    Ok(Box::new(CudaBackend::new(model, opts, co)?))
}
