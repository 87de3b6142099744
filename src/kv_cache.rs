//! The clean KV cache of self-attention: per layer, K and V of committed frames.
//!
//! Global attention keeps every committed frame. Local attention (`local_attn` frames, `sink`
//! of them pinned) keeps the sink frames plus a ring buffer of the `local_attn - sink` most
//! recent frames: memory stops growing once the ring is full, whatever the video length. A query block ending at frame
//! `e` sees committed frame `f < e` when `f >= e - (local_attn - sink)` or `f < sink`
//! (see docs/design.md); every frame it can see is still resident.

use crate::{Error, Result};

/// K/V storage of all layers.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    frame_len: usize,
    sink: usize,
    window: Option<usize>,
    committed: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers and frames of `frame_len` values (`tokens * dim`).
    /// With `local_attn = Some(l)` the ring holds `l - sink` frames; memory grows with the
    /// committed frames until the ring is full, then stays fixed.
    pub fn new(
        layers: usize,
        frame_len: usize,
        local_attn: Option<usize>,
        sink: usize,
    ) -> Result<Self> {
        let window = match local_attn {
            Some(l) if l <= sink => {
                return Err(Error::invalid(format!(
                    "local attention window ({l}) must exceed the sink ({sink})"
                )))
            }
            Some(l) => Some(l - sink),
            None => None,
        };
        // Slots are allocated as frames arrive (up to `window + sink` with local attention), so
        // a huge window on a short video costs only the frames it holds.
        let layers_v = vec![(Vec::new(), Vec::new()); layers];
        Ok(KvCache {
            layers: layers_v,
            frame_len,
            sink,
            window,
            committed: 0,
        })
    }

    /// An empty cache with the same geometry.
    pub fn empty_like(&self) -> Self {
        let mut c = self.clone();
        c.committed = 0;
        c
    }

    /// Frames `[0, committed)` have been committed.
    pub fn committed(&self) -> usize {
        self.committed
    }

    /// True when key frame `f` is admitted for a query block ending at `e_end` by the
    /// local/sink rule (always true with global attention).
    pub fn in_window(&self, f: usize, e_end: usize) -> bool {
        match self.window {
            None => true,
            Some(w) => f + w >= e_end || f < self.sink,
        }
    }

    /// The storage slot of `frame` (its index in the ring, or the frame itself when global).
    pub fn slot(&self, frame: usize) -> usize {
        match self.window {
            None => frame,
            Some(_) if frame < self.sink => frame,
            Some(w) => self.sink + (frame - self.sink) % w,
        }
    }

    /// True when committed frame `f` is still held.
    pub fn resident(&self, f: usize) -> bool {
        f < self.committed
            && match self.window {
                None => true,
                Some(w) => f < self.sink || f + w >= self.committed,
            }
    }

    /// The committed frames visible to a query block `[f0, e_end)`, in increasing order.
    pub fn visible(&self, f0: usize, e_end: usize) -> Vec<usize> {
        let mut v = Vec::new();
        self.visible_into(f0, e_end, &mut v);
        v
    }

    /// [`Self::visible`] into a reused list (cleared first).
    pub fn visible_into(&self, f0: usize, e_end: usize, v: &mut Vec<usize>) {
        let lo = match self.window {
            None => 0,
            Some(w) => e_end.saturating_sub(w),
        };
        v.clear();
        v.extend(0..self.sink.min(f0).min(self.committed));
        v.extend((lo.max(v.len())..f0.min(self.committed)).filter(|&f| self.resident(f)));
    }

    /// K and V of resident `frames` (increasing) of `layer`, as runs of adjacent slots, each
    /// run one slice of this cache's storage.
    pub fn frame_runs(&self, layer: usize, frames: &[usize]) -> Vec<(&[f32], &[f32])> {
        let mut runs = Vec::new();
        self.slot_runs_into(frames, &mut runs);
        runs.into_iter().map(|r| self.slot_run(layer, r)).collect()
    }

    /// The runs of adjacent slots `(first slot, slot count)` holding resident `frames`
    /// (increasing), into a reused list (cleared first): the same for every layer.
    pub fn slot_runs_into(&self, frames: &[usize], runs: &mut Vec<(usize, usize)>) {
        runs.clear();
        for &f in frames {
            let s = self.slot(f);
            match runs.last_mut() {
                Some((s0, n)) if *s0 + *n == s => *n += 1,
                _ => runs.push((s, 1)),
            }
        }
    }

    /// K and V of one run of [`Self::slot_runs_into`] in `layer`.
    ///
    /// # Panics
    /// When the run's slots have not been written in that layer.
    pub fn slot_run(&self, layer: usize, (s, n): (usize, usize)) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        let fl = self.frame_len;
        (&k[s * fl..(s + n) * fl], &v[s * fl..(s + n) * fl])
    }

    /// K and V of a resident frame in `layer`.
    pub fn frame(&self, layer: usize, f: usize) -> (&[f32], &[f32]) {
        let s = self.slot(f) * self.frame_len;
        let (k, v) = &self.layers[layer];
        (&k[s..s + self.frame_len], &v[s..s + self.frame_len])
    }

    /// Writes K and V of frame `f` of `layer` (new frames become visible after [`Self::commit`]).
    pub fn write(&mut self, layer: usize, f: usize, k: &[f32], v: &[f32]) {
        let s = self.slot(f) * self.frame_len;
        let fl = self.frame_len;
        let (kc, vc) = &mut self.layers[layer];
        if kc.len() < s + fl {
            kc.reserve_exact(s + fl - kc.len());
            vc.reserve_exact(s + fl - vc.len());
            // Slots are allocated in order as frames arrive (global: one per frame; local: until
            // the ring is full).
            kc.resize(s + fl, 0.0);
            vc.resize(s + fl, 0.0);
        }
        kc[s..s + fl].copy_from_slice(k);
        vc[s..s + fl].copy_from_slice(v);
    }

    /// Marks frames `[0, end)` committed.
    pub fn commit(&mut self, end: usize) {
        self.committed = self.committed.max(end);
    }

    /// Sets the committed frame count (used when a rebuilt cache replaces this one).
    pub(crate) fn set_committed(&mut self, end: usize) {
        self.committed = end;
    }

    /// Bytes held by the cache right now.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.capacity() + v.capacity()) * 4)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_sink_and_recent_frames_in_fixed_memory() {
        let mut c = KvCache::new(1, 2, Some(5), 1).unwrap();
        let mut sizes = Vec::new();
        for f in 0..40 {
            c.write(0, f, &[f as f32; 2], &[-(f as f32); 2]);
            c.commit(f + 1);
            sizes.push(c.bytes());
        }
        // Grows while the 1 sink + 4 ring slots fill, then stays fixed.
        assert!(sizes[0] < sizes[4]);
        assert!(sizes[4..].iter().all(|&b| b == sizes[4]), "{sizes:?}");
        // Query block [40, 43): sees sink frame 0 and frames >= 43 - 4 = 39.
        assert_eq!(c.visible(40, 43), vec![0, 39]);
        assert_eq!(c.frame(0, 39).0, &[39.0, 39.0]);
        // Frame 0 (slot 0) and frame 39 (slot 1 + 38 % 4 = 3) are not adjacent: two runs.
        assert_eq!(
            c.frame_runs(0, &c.visible(40, 43)),
            vec![
                (&[0.0f32, 0.0][..], &[-0.0f32, -0.0][..]),
                (&[39.0, 39.0][..], &[-39.0, -39.0][..])
            ]
        );
        assert_eq!(c.frame(0, 0).1, &[0.0, 0.0]);
        assert!(!c.resident(35));
        assert!(c.resident(36));
    }

    #[test]
    fn global_cache_sees_everything_before_the_block() {
        let mut c = KvCache::new(2, 3, None, 0).unwrap();
        for f in 0..6 {
            c.write(1, f, &[f as f32; 3], &[0.0; 3]);
        }
        c.commit(6);
        assert_eq!(c.visible(3, 6), vec![0, 1, 2]);
        assert_eq!(c.frame(1, 4).0, &[4.0; 3]);
    }
}
