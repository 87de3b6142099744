//! CUDA graphs: one per window shape and part of a tick, run eagerly the first time
//! (warm-up), captured the second, replayed after.

use super::device::Graph;
use super::CudaBackend;
use crate::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

static CAPTURE_FAILURES: AtomicUsize = AtomicUsize::new(0);
static LAST_CAPTURE_FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Graph captures that failed in this process (the session then ran eagerly), and the last
/// failure's error: what the GPU bundle's summary prints (`BC_CUDA_VERBOSE` also prints each
/// one as it happens).
pub fn graph_capture_failures() -> (usize, Option<String>) {
    let last = LAST_CAPTURE_FAILURE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    (CAPTURE_FAILURES.load(Ordering::Relaxed), last)
}

/// Counts a failed capture (the work then runs eagerly), keeps `reason` for
/// [`graph_capture_failures`] and prints it with `BC_CUDA_VERBOSE`: one place for the DiT's
/// graphs and the device decoders' (`decode::CudaDecoder`), so a failure is never silent.
pub(crate) fn note_capture_failure(reason: String) {
    CAPTURE_FAILURES.fetch_add(1, Ordering::Relaxed);
    if std::env::var_os("BC_CUDA_VERBOSE").is_some() {
        eprintln!("CUDA graph capture failed, running eagerly: {reason}");
    }
    *LAST_CAPTURE_FAILURE
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(reason);
}

/// What a captured graph depends on besides device-memory contents: per member (frames,
/// context), and the member runs that share a prompt in cross-attention.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShapeKey {
    pub(super) members: Vec<(usize, bool)>,
    pub(super) cross_runs: Vec<usize>,
}

/// A captured graph's identity: the window shape and which part of the work it holds. The
/// part is an enum so that two kinds of work with the same window shape (a whole one-device
/// tick or recache chunk, and part 0 of a multi-device tick) never share a graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct GraphKey {
    pub(super) shape: ShapeKey,
    pub(super) part: Part,
}

/// Which part of a tick a graph holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Part {
    /// A whole forward on one device (a one-device tick, or a recache chunk).
    Whole,
    /// Several devices, joint exchange: the work between K/V exchanges `i - 1` and `i`
    /// (0: embedding + layer 0's q/k/v; `i`: layer `i-1`'s attention and FFN + layer `i`'s
    /// q/k/v; the last one ends with the head).
    Joint(usize),
    /// Several devices, lagged exchange: the whole tick writing K/V generation `g` (its
    /// buffers are baked into the graph).
    Lagged(usize),
}

pub(super) enum GraphState {
    /// Seen once (ran eagerly as warm-up).
    Warm,
    /// Captured.
    Ready(Graph),
}

impl CudaBackend<'_> {
    /// Enqueues the work of `key` (`enqueue`): eagerly the first time a key is seen (warm-up:
    /// cuBLASLt heuristics, module load), captured into a graph and replayed the second time,
    /// replayed afterwards. With graphs off (or after a failed capture) always eagerly.
    pub(super) fn launch(
        &mut self,
        key: GraphKey,
        enqueue: &dyn Fn(&mut Self) -> Result<()>,
    ) -> Result<()> {
        if !self.graphs_ok {
            return enqueue(self);
        }
        match self.graphs.get(&key) {
            Some(GraphState::Ready(graph)) => self.gpu.replay(graph),
            Some(GraphState::Warm) => {
                // All uploads before this call are ordered before the capture's replay.
                self.gpu.begin_capture()?;
                let res = enqueue(self);
                match res.and_then(|_| self.gpu.end_capture()) {
                    Ok(graph) => {
                        self.gpu.replay(&graph)?;
                        self.graphs.insert(key, GraphState::Ready(graph));
                        Ok(())
                    }
                    Err(err) => {
                        self.gpu.abort_capture();
                        note_capture_failure(err.to_string());
                        self.graphs_ok = false;
                        self.graphs.clear();
                        enqueue(self)
                    }
                }
            }
            None => {
                enqueue(self)?;
                self.graphs.insert(key, GraphState::Warm);
                Ok(())
            }
        }
    }
}
