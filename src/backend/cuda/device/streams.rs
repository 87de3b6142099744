//! Streams, events between them, peer copies between devices, and timing events on the driver
//! device.

use super::driver::{dev_err, DriverDevice};
use crate::backend::cuda::dev_types::DevPtr;
use crate::{Error, Result};
use cudarc::driver::{result as drv, sys};

/// Bytes copied between (logical) devices in this process.
pub(super) static PEER_COPY_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// How many bytes `Gpu::copy_to_peer` and `Gpu::send_to_peer` have copied between devices in
/// this process (real or emulated), so tests and benchmarks can see what an exchange moves.
pub fn peer_copy_bytes() -> usize {
    PEER_COPY_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// A CUDA event, destroyed on drop: a stream mark or a timing event.
pub(super) struct DriverEvent(pub(super) sys::CUevent);

impl Drop for DriverEvent {
    fn drop(&mut self) {
        // SAFETY: created by `DriverDevice::mark_on` or `DriverDevice::event`, destroyed once;
        // a recorded event that has not completed is released by the driver when it completes.
        unsafe {
            let _ = drv::event::destroy(self.0);
        }
    }
}

impl DriverDevice {
    /// Enables access from this device's context to `peer`'s memory where the topology
    /// allows it (`cuDeviceCanAccessPeer`); returns whether peer access is on. Same context
    /// (two logical devices on one GPU): nothing to do, `true`.
    pub(super) fn enable_peer_access(&self, peer: &DriverDevice) -> Result<bool> {
        if self.ctx == peer.ctx {
            return Ok(true);
        }
        let mut can = 0i32;
        // SAFETY: valid device handles and an out pointer.
        unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.dev, peer.dev) }
            .result()
            .map_err(dev_err("cuDeviceCanAccessPeer"))?;
        if can == 0 {
            return Ok(false);
        }
        self.bind()?;
        // SAFETY: peer.ctx is a retained context.
        match unsafe { sys::cuCtxEnablePeerAccess(peer.ctx, 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
                Ok(true)
            }
            e => Err(Error::Device(format!("cuCtxEnablePeerAccess: {e:?}"))),
        }
    }

    /// Copies `regions` (`(dst, src, bytes)`: `dst` in `dst_dev`'s memory, `src` in this
    /// device's) on the compute stream, ordered with events: the copy waits for the work
    /// already enqueued on both compute streams, and `dst_dev`'s later work waits for the
    /// copy. `cuMemcpyPeerAsync` between contexts, a device-to-device copy within one context.
    /// Leaves this device's context current.
    pub(super) fn copy_to_peer(
        &self,
        dst_dev: &DriverDevice,
        regions: &[(DevPtr, DevPtr, usize)],
    ) -> Result<()> {
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        // SAFETY: events are created in the context they are recorded in, waited on by the
        // other stream (allowed across contexts), and destroyed after use (the driver keeps
        // pending events alive); the regions are valid allocations (caller's contract).
        unsafe {
            dst_dev.bind()?;
            let before = drv::event::create(flags).map_err(dev_err("cuEventCreate"))?;
            let r = drv::event::record(before, dst_dev.stream).map_err(dev_err("cuEventRecord"));
            self.bind()?;
            let r = r.and_then(|_| {
                drv::stream::wait_event(
                    self.stream,
                    before,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(dev_err("cuStreamWaitEvent"))
            });
            let _ = drv::event::destroy(before);
            r?;
            self.copy_regions(dst_dev, regions, self.stream)?;
            let after = drv::event::create(flags).map_err(dev_err("cuEventCreate"))?;
            let r = drv::event::record(after, self.stream)
                .map_err(dev_err("cuEventRecord"))
                .and_then(|_| {
                    drv::stream::wait_event(
                        dst_dev.stream,
                        after,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .map_err(dev_err("cuStreamWaitEvent"))
                });
            let _ = drv::event::destroy(after);
            r
        }
    }

    /// Queues the copies of `regions` (dst on `dst_dev`, src here) on `stream` of this device:
    /// a device-to-device copy within one context, `cuMemcpyPeerAsync` between contexts.
    ///
    /// # Safety
    /// The regions are valid allocations of the two devices; this context is current.
    unsafe fn copy_regions(
        &self,
        dst_dev: &DriverDevice,
        regions: &[(DevPtr, DevPtr, usize)],
        stream: sys::CUstream,
    ) -> Result<()> {
        for &(dst, src, bytes) in regions {
            if self.ctx == dst_dev.ctx {
                drv::memcpy_dtod_async(dst, src, bytes, stream)
                    .map_err(dev_err("cuMemcpyDtoDAsync"))?;
            } else {
                sys::cuMemcpyPeerAsync(dst, dst_dev.ctx, src, self.ctx, bytes, stream)
                    .result()
                    .map_err(dev_err("cuMemcpyPeerAsync"))?;
            }
        }
        Ok(())
    }

    /// An event at the current end of the compute stream.
    pub(super) fn mark_compute(&self) -> Result<DriverEvent> {
        self.bind()?;
        self.mark_on(self.stream)
    }

    /// An event recorded at the current end of `stream` (of the current context).
    fn mark_on(&self, stream: sys::CUstream) -> Result<DriverEvent> {
        let e = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(dev_err("cuEventCreate"))?;
        let m = DriverEvent(e);
        // SAFETY: valid event and stream of the current context.
        unsafe { drv::event::record(m.0, stream) }.map_err(dev_err("cuEventRecord"))?;
        Ok(m)
    }

    /// Makes the compute stream wait until `m` (of any device) is reached.
    pub(super) fn compute_wait(&self, m: &DriverEvent) -> Result<()> {
        self.bind()?;
        // SAFETY: valid stream and event (waiting on another context's event is allowed).
        unsafe {
            drv::stream::wait_event(
                self.stream,
                m.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(dev_err("cuStreamWaitEvent"))
    }

    /// Copies `regions` on the copy stream once every event of `after` is reached; returns an
    /// event at the copies' end.
    pub(super) fn send_to_peer(
        &self,
        dst_dev: &DriverDevice,
        regions: &[(DevPtr, DevPtr, usize)],
        after: &[&DriverEvent],
    ) -> Result<DriverEvent> {
        self.bind()?;
        // SAFETY: valid streams and events; the regions are valid allocations of the two
        // devices (caller's contract).
        unsafe {
            for m in after {
                drv::stream::wait_event(
                    self.copy_stream,
                    m.0,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(dev_err("cuStreamWaitEvent"))?;
            }
            self.copy_regions(dst_dev, regions, self.copy_stream)?;
        }
        self.mark_on(self.copy_stream)
    }

    /// An event at the current end of the copy stream.
    pub(super) fn mark_copies(&self) -> Result<DriverEvent> {
        self.bind()?;
        self.mark_on(self.copy_stream)
    }

    /// Waits for every copy queued on the copy stream.
    pub(super) fn sync_copies(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: valid stream.
        unsafe { drv::stream::synchronize(self.copy_stream) }
            .map_err(dev_err("peer copies failed (cuStreamSynchronize)"))
    }

    /// Waits for all work on the compute stream.
    pub(super) fn sync(&self) -> Result<()> {
        // SAFETY: valid stream.
        unsafe { drv::stream::synchronize(self.stream) }
            .map_err(dev_err("kernel execution failed (cuStreamSynchronize)"))
    }

    /// Creates a timing event.
    pub(super) fn event(&self) -> Result<DriverEvent> {
        drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(DriverEvent)
            .map_err(dev_err("cuEventCreate"))
    }

    /// Records `ev` on the compute stream.
    pub(super) fn record(&self, ev: &DriverEvent) -> Result<()> {
        // SAFETY: valid event and stream.
        unsafe { drv::event::record(ev.0, self.stream) }.map_err(dev_err("cuEventRecord"))
    }

    /// Milliseconds between two recorded events (waits for `end`).
    pub(super) fn elapsed_ms(&self, start: &DriverEvent, end: &DriverEvent) -> Result<f32> {
        // SAFETY: valid events.
        unsafe {
            drv::event::synchronize(end.0).map_err(dev_err("cuEventSynchronize"))?;
            drv::event::elapsed(start.0, end.0).map_err(dev_err("cuEventElapsedTime"))
        }
    }
}
