//! CUDA graphs: capture on the compute stream, instantiate, replay.

use super::*;

/// Graph launches in this process (every device), so tests can tell that graphs are used.
pub(super) static GRAPH_REPLAYS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// How many captured graphs have been launched in this process, on every device (real or
/// emulated).
pub fn graph_replays() -> usize {
    GRAPH_REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
}

impl Gpu {
    /// Begins capturing the stream into a graph.
    pub fn begin_capture(&self) -> Result<()> {
        if let Some(e) = &self.emu {
            return e.begin_capture();
        }
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
    pub fn end_capture(&self) -> Result<Graph> {
        if let Some(e) = &self.emu {
            return Ok(Graph {
                exec: std::ptr::null_mut(),
                emu_ops: Some(e.end_capture()?),
            });
        }
        // SAFETY: the stream is capturing.
        unsafe {
            let g = drv::stream::end_capture(self.stream).map_err(dev_err("cuStreamEndCapture"))?;
            let exec = drv::graph::instantiate(g, sys::CUgraphInstantiate_flags(0));
            let _ = drv::graph::destroy(g);
            let exec = exec.map_err(dev_err("cuGraphInstantiate"))?;
            Ok(Graph {
                exec,
                emu_ops: None,
            })
        }
    }

    /// Ends a capture that failed half-way (errors ignored).
    pub fn abort_capture(&self) {
        if let Some(e) = &self.emu {
            return e.abort_capture();
        }
        // SAFETY: valid stream; a graph, if any, is destroyed.
        unsafe {
            if let Ok(g) = drv::stream::end_capture(self.stream) {
                if !g.is_null() {
                    let _ = drv::graph::destroy(g);
                }
            }
        }
    }

    /// Replays `graph` on the stream (counted in [`graph_replays`]).
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        GRAPH_REPLAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(e) = &self.emu {
            let ops = graph.emu_ops.as_deref().ok_or_else(|| {
                Error::Device("a GPU graph replayed on an emulated device".into())
            })?;
            return e.replay(ops);
        }
        // SAFETY: instantiated graph, valid stream.
        unsafe { drv::graph::launch(graph.exec, self.stream) }.map_err(dev_err("cuGraphLaunch"))
    }
}

/// An instantiated CUDA graph.
pub struct Graph {
    exec: sys::CUgraphExec,
    /// The recorded ops of a graph captured on an emulated device.
    emu_ops: Option<Vec<EmuOp>>,
}

impl Drop for Graph {
    fn drop(&mut self) {
        if self.exec.is_null() {
            return;
        }
        // SAFETY: created by end_capture, destroyed once.
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
        }
    }
}
