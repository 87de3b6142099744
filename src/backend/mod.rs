//! Backends: what runs one tick's joint forward and holds the clean KV cache.
//!
//! The executor ([`crate::executor`]) owns the schedule (plan, noise, renoise, streaming) and is
//! the same for every backend; a backend only runs forwards over window members and keeps the
//! cache. [`cpu::CpuBackend`] is the exact reference (one device or several worker threads);
//! the CUDA backend implements the same trait.

pub mod cpu;
pub mod cuda;

use crate::model::Member;
use crate::Result;

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
