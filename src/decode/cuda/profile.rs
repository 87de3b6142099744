//! Per-kernel device time of a decoder's work ([`super::CudaDecoder::set_profiling`]): a pair of
//! events around every launch, copy and memset of the eager walks, read back and summed per
//! kernel and grid. It says where a block's milliseconds go on a GPU without a profiler's
//! counters (the `DECODE profile` lines of the GPU bench): the convolutions by layer size, the
//! small ops, the causal caches' copies.
//!
//! The events stand between the launches, so a profiled block runs a little slower than an
//! unprofiled one, and never as a graph: the sums say how the time divides, the bench's
//! `decode` rows say how long a block takes.

use crate::backend::cuda::device::{Event, Gpu};
use crate::Result;

/// Device time of one kernel at one grid size, summed over the profiled launches.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's entry point (`copy` and `memset` for the stream's copies and fills).
    pub name: &'static str,
    /// Its grid (x, y, z); `[0, 0, 0]` for copies and memsets, and in [`by_kernel`]'s sums.
    pub grid: [u32; 3],
    /// Launches (or copies, memsets).
    pub launches: u64,
    /// Milliseconds between the events around each, summed.
    pub ms: f64,
}

/// The profiled kernels' times summed over grids: one entry per kernel, longest first.
pub fn by_kernel(times: &[KernelTime]) -> Vec<KernelTime> {
    sum_longest_first(times.iter().map(|t| KernelTime {
        grid: [0; 3],
        ..t.clone()
    }))
}

/// `times` summed per kernel and grid, longest first.
fn sum_longest_first(times: impl Iterator<Item = KernelTime>) -> Vec<KernelTime> {
    let mut out: Vec<KernelTime> = Vec::new();
    for t in times {
        match out
            .iter_mut()
            .find(|k| k.name == t.name && k.grid == t.grid)
        {
            Some(k) => {
                k.launches += t.launches;
                k.ms += t.ms;
            }
            None => out.push(t),
        }
    }
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    out
}

/// The events recorded since profiling started, not yet read.
#[derive(Default)]
pub(super) struct Recorder {
    open: Vec<(&'static str, [u32; 3], Event, Event)>,
}

impl Recorder {
    /// Runs `submit` (one piece of stream work) between two events recorded on `gpu`'s stream.
    pub(super) fn around(
        &mut self,
        gpu: &Gpu,
        name: &'static str,
        grid: [u32; 3],
        submit: impl FnOnce(&Gpu) -> Result<()>,
    ) -> Result<()> {
        let (start, end) = (gpu.event()?, gpu.event()?);
        gpu.record(&start)?;
        submit(gpu)?;
        gpu.record(&end)?;
        self.open.push((name, grid, start, end));
        Ok(())
    }

    /// Waits for the stream and sums the recorded work per kernel and grid, longest first;
    /// the recorder starts over.
    pub(super) fn read(&mut self, gpu: &Gpu) -> Result<Vec<KernelTime>> {
        gpu.sync()?;
        let times = self
            .open
            .drain(..)
            .map(|(name, grid, start, end)| {
                Ok(KernelTime {
                    name,
                    grid,
                    launches: 1,
                    ms: f64::from(gpu.elapsed_ms(&start, &end)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(sum_longest_first(times.into_iter()))
    }
}
