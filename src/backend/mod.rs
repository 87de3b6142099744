//! Backends: what runs one tick's joint forward and holds the clean KV cache.
//!
//! The executor ([`crate::executor`]) owns the schedule (plan, noise, renoise, streaming) and is
//! the same for every backend; a backend only runs forwards over window members and keeps the
//! cache. [`cpu::CpuBackend`] is the exact reference (one device or several worker threads);
//! the CUDA backend implements the same trait.

pub mod cpu;
pub mod cuda;

use crate::model::Member;
use crate::{Error, Result};

/// One denoising member's flow step for [`Backend::step_resident`]: `x0 = x - sigma * v`, then
/// `x = (1 - sn) * x0 + sn * noise` with `next = Some((sn, noise))`, else the block is final
/// (`x = x0`).
#[derive(Clone, Copy, Debug)]
pub struct FlowStep<'a> {
    /// Sigma of the step the forward predicted.
    pub sigma: f32,
    /// Sigma of the next step and the block's renoise; `None` at the last step.
    pub next: Option<(f32, &'a [f32])>,
}

/// A tick executor with its own KV cache.
pub trait Backend {
    /// One joint forward over `members` (ordered by first frame); `blocks[i]` is member i's
    /// block index and `tick` the tick number. Returns each member's predicted flow; context
    /// members' K/V are written to the cache (visible after [`Backend::commit`]).
    fn forward(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        tick: usize,
    ) -> Result<Vec<Vec<f32>>>;
    /// Frames `[0, end)` are committed.
    fn commit(&mut self, end: usize);
    /// True when committed frame `f` is still held by the cache.
    fn resident(&self, f: usize) -> bool;
    /// Rebuilds the cache from scratch by running `members` (context members covering the
    /// resident frames) and keeps the committed frame count (LongLive recache).
    fn recache(&mut self, members: &[Member]) -> Result<()>;
    /// Bytes held by the KV cache (per device).
    fn cache_bytes(&self) -> usize;

    /// Whether this backend keeps the latents of the blocks being denoised itself (on its
    /// device): the executor then runs [`Backend::forward_resident`] and
    /// [`Backend::step_resident`] instead of [`Backend::forward`] and the host flow step, and
    /// only finished blocks come back. The default (the CPU backend): no.
    fn keeps_latents(&self) -> bool {
        false
    }

    /// [`Backend::forward`] that keeps the flows: a member whose block (`blocks[i]`) the
    /// backend holds starts from its held latents (`members[i].latents` gives only the shape),
    /// any other from `members[i].latents`, held from now on.
    fn forward_resident(
        &mut self,
        _members: &[Member],
        _blocks: &[usize],
        _tick: usize,
    ) -> Result<()> {
        Err(Error::Unsupported(
            "this backend does not keep latents".into(),
        ))
    }

    /// The flow step of every member of the last [`Backend::forward_resident`] (`steps[i]`,
    /// `None` for context members) on the held latents. Returns, per member, the latents of a
    /// block that became final (`next: None`).
    fn step_resident(&mut self, _steps: &[Option<FlowStep>]) -> Result<Vec<Option<Vec<f32>>>> {
        Err(Error::Unsupported(
            "this backend does not keep latents".into(),
        ))
    }

    /// Forgets the latents held for `block` (after its context pass, or when it is final and
    /// no context pass follows).
    fn release_latents(&mut self, _block: usize) {}

    /// For a decoder on this backend's device (GPU ordinal `decoder`; on one device the caller
    /// checked it is the backend's): from now on, blocks that become final in
    /// [`Backend::step_resident`] are also held there for [`Backend::take_handed`] (in place,
    /// or copied device to device from another of the backend's devices), and downloaded only
    /// when `download` (otherwise `step_resident` returns them empty). Returns whether the
    /// backend does this (CUDA devices with device latents); the default: no.
    fn hand_off_finals(&mut self, _download: bool, _decoder: usize) -> bool {
        false
    }

    /// Why some finished blocks still cross the host on their way to a decoder handed blocks
    /// off ([`Backend::hand_off_finals`]), e.g. a device without peer access to the
    /// decoder's; `None` when none do.
    fn handoff_note(&self) -> Option<String> {
        None
    }

    /// The device latents of `block`, final in the last [`Backend::step_resident`], when
    /// [`Backend::hand_off_finals`] is on.
    fn take_handed(&mut self, _block: usize) -> Option<cuda::DeviceLatents> {
        None
    }
}

/// Opens the CUDA backend for `model` with `opts` (see [`cuda`]; a clean error when the
/// kernels were not built, or no driver, cuBLASLt or device is found).
///
/// `frames`: the length of the run when known; with global attention the KV cache is sized
/// for it (otherwise for [`cuda::CudaOptions::cache_frames`]).
pub fn cuda_backend<'m>(
    model: &'m crate::model::Model,
    opts: &crate::config::GenerateOptions,
    frames: Option<usize>,
) -> Result<Box<dyn Backend + 'm>> {
    cuda::open(model, opts, frames)
}
