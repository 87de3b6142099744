//! CUDA graphs on the driver device: capture on the compute stream, instantiate, replay.

use super::driver::{dev_err, DriverDevice};
use crate::Result;
use cudarc::driver::{result as drv, sys};

/// Graph launches in this process (every device), so tests can tell that graphs are used.
pub(super) static GRAPH_REPLAYS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// How many captured graphs have been launched in this process, on every device (real or
/// emulated).
pub fn graph_replays() -> usize {
    GRAPH_REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
}

/// An instantiated CUDA graph, destroyed on drop.
pub(super) struct DriverGraph(sys::CUgraphExec);

impl Drop for DriverGraph {
    fn drop(&mut self) {
        // SAFETY: created by `DriverDevice::end_capture`, destroyed once.
        unsafe {
            let _ = drv::graph::exec_destroy(self.0);
        }
    }
}

impl DriverDevice {
    /// Begins capturing the compute stream into a graph.
    pub(super) fn begin_capture(&self) -> Result<()> {
        // SAFETY: valid stream.
        unsafe {
            drv::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(dev_err("cuStreamBeginCapture"))
    }

    /// Ends the capture and instantiates the graph.
    pub(super) fn end_capture(&self) -> Result<DriverGraph> {
        // SAFETY: the stream is capturing.
        unsafe {
            let g = drv::stream::end_capture(self.stream).map_err(dev_err("cuStreamEndCapture"))?;
            let exec = drv::graph::instantiate(g, sys::CUgraphInstantiate_flags(0));
            let _ = drv::graph::destroy(g);
            Ok(DriverGraph(exec.map_err(dev_err("cuGraphInstantiate"))?))
        }
    }

    /// Ends a capture that failed half-way (errors ignored).
    pub(super) fn abort_capture(&self) {
        // SAFETY: valid stream; a graph, if any, is destroyed.
        unsafe {
            if let Ok(g) = drv::stream::end_capture(self.stream) {
                if !g.is_null() {
                    let _ = drv::graph::destroy(g);
                }
            }
        }
    }

    /// Replays `graph` on the compute stream.
    pub(super) fn replay(&self, graph: &DriverGraph) -> Result<()> {
        // SAFETY: instantiated graph, valid stream.
        unsafe { drv::graph::launch(graph.0, self.stream) }.map_err(dev_err("cuGraphLaunch"))
    }
}
