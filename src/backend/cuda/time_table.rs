//! The time embeddings on the device: the MLP stays on the host (f32, cached per timestep,
//! [`CudaBackend::time_embedding`]); each distinct timestep's `e` (`dim`) and `e0` (`6 dim`)
//! go up once into an entry of a device table, already repeated for the frames of one block,
//! and every tick gathers the window's per-frame `e` / `e0` buffers from the table with two
//! device copies per member instead of uploading `7 dim` f32 per frame. The bytes are the
//! host's, so the forward sees exactly what the upload gave it.
//!
//! The table has room for every timestep of the schedule, the context timestep and a full
//! window more; an entry not used by the tick being prepared is replaced least recently used
//! first (a run with a changing context timestep or recaches never runs out). Copies and
//! uploads are queued on the compute stream, so a replaced entry is rewritten only after the
//! gathers queued before that read it.

use super::device::DevPtr;
use super::CudaBackend;
use crate::model::{Member, CHANNELS};
use crate::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

static TABLE_UPLOADS: AtomicUsize = AtomicUsize::new(0);

/// Time embeddings uploaded into a device's table in this process (one per distinct timestep
/// and device, plus replacements): lets tests check that a run uploads each timestep once.
pub fn time_table_uploads() -> usize {
    TABLE_UPLOADS.load(Ordering::Relaxed)
}

/// Entries of the table for a run of `steps` denoising steps and windows of `max_members`.
pub(super) fn entries(steps: usize, max_members: usize) -> usize {
    steps.saturating_add(1).saturating_add(max_members)
}

/// Which timestep each entry holds.
pub(super) struct TimeTable {
    /// `entries` entries of `7 * block_frames * dim` f32 each: `e` repeated per frame
    /// (`[block_frames, dim]`), then `e0` repeated per frame (`[block_frames, 6, dim]`).
    base: DevPtr,
    /// Per entry: (timestep bits, last tick that used it).
    held: Vec<Option<(u64, usize)>>,
    /// Ticks prepared so far (the use stamp).
    stamp: usize,
}

impl TimeTable {
    /// An empty table of `count` entries at `base`.
    pub(super) fn new(base: DevPtr, count: usize) -> Self {
        TimeTable {
            base,
            held: vec![None; count],
            stamp: 0,
        }
    }
}

impl CudaBackend<'_> {
    /// The window's per-frame time embeddings into `e` / `e0` (members in order, at their
    /// first frames): from the device table where [`super::CudaOptions::device_latents`] is
    /// on and a member has at most a block's frames, otherwise uploaded as a whole from
    /// the host.
    pub(super) fn load_time_embeddings(&mut self, members: &[Member]) -> Result<()> {
        let d = self.model.config().dim;
        let flen = CHANNELS * self.opts.height * self.opts.width;
        let bf = self.opts.block_frames;
        let frames: Vec<usize> = members.iter().map(|m| m.latents.len() / flen).collect();
        if !self.copts.device_latents || frames.iter().any(|&n| n > bf) {
            return self.upload_time_embeddings(members, &frames);
        }
        self.times.stamp += 1;
        let (f4, mut frame) = (4usize, 0usize);
        for (m, &nf) in members.iter().zip(&frames) {
            let entry = self.time_entry(m.timestep)?;
            let (e_src, e0_src) = (entry, entry + (bf * d * f4) as u64);
            self.gpu
                .copy(self.b.e + (frame * d * f4) as u64, e_src, nf * d * f4)?;
            self.gpu.copy(
                self.b.e0 + (frame * 6 * d * f4) as u64,
                e0_src,
                nf * 6 * d * f4,
            )?;
            frame += nf;
        }
        Ok(())
    }

    /// The table entry of timestep `t`, uploaded (replacing the least recently used entry
    /// this tick does not use) when the table does not hold it.
    fn time_entry(&mut self, t: f64) -> Result<DevPtr> {
        let (d, bf) = (self.model.config().dim, self.opts.block_frames);
        let entry_bytes = (bf * 7 * d * 4) as u64;
        let (key, stamp) = (t.to_bits(), self.times.stamp);
        let tt = &mut self.times;
        if let Some(i) = tt.held.iter().position(|h| h.is_some_and(|h| h.0 == key)) {
            tt.held[i] = Some((key, stamp));
            return Ok(tt.base + i as u64 * entry_bytes);
        }
        let i = (0..tt.held.len())
            .filter(|&i| tt.held[i].is_none_or(|h| h.1 != stamp))
            .min_by_key(|&i| tt.held[i].map_or(0, |h| h.1 + 1))
            .ok_or_else(|| {
                Error::Internal(
                    "more distinct timesteps in a window than time table entries".into(),
                )
            })?;
        let base = tt.base + i as u64 * entry_bytes;
        // Empty until written (a failed upload leaves it empty).
        tt.held[i] = None;
        let (e, e0) = self.time_embedding(t);
        let mut rep = Vec::with_capacity(bf * 7 * d);
        for _ in 0..bf {
            rep.extend_from_slice(&e);
        }
        for _ in 0..bf {
            rep.extend_from_slice(&e0);
        }
        self.gpu.upload_staged(base, &rep)?;
        TABLE_UPLOADS.fetch_add(1, Ordering::Relaxed);
        self.times.held[i] = Some((key, stamp));
        Ok(base)
    }

    /// The per-frame time embeddings built on the host and uploaded.
    fn upload_time_embeddings(&mut self, members: &[Member], frames: &[usize]) -> Result<()> {
        let d = self.model.config().dim;
        let nf: usize = frames.iter().sum();
        let mut e = Vec::with_capacity(nf * d);
        let mut e0 = Vec::with_capacity(nf * 6 * d);
        for (m, &n) in members.iter().zip(frames) {
            let (ei, e0i) = self.time_embedding(m.timestep);
            for _ in 0..n {
                e.extend_from_slice(&ei);
                e0.extend_from_slice(&e0i);
            }
        }
        self.gpu.upload_staged(self.b.e, &e)?;
        self.gpu.upload_staged(self.b.e0, &e0)
    }
}
