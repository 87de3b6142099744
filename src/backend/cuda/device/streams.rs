//! Streams, marks (events) between them, peer copies between devices, and timing events.

use super::*;

/// Bytes copied between (logical) devices in this process.
pub(super) static PEER_COPY_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// How many bytes [`Gpu::copy_to_peer`] has copied between devices in this process (real or
/// emulated), so tests and benchmarks can see what an exchange moves.
pub fn peer_copy_bytes() -> usize {
    PEER_COPY_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

impl Gpu {
    /// Enables access from this device's context to `peer`'s memory where the topology
    /// allows it (`cuDeviceCanAccessPeer`); returns whether peer access is on. Same context
    /// (two logical devices on one GPU) or emulated devices: nothing to do, `true`.
    pub fn enable_peer_access(&self, peer: &Gpu) -> Result<bool> {
        if self.emu.is_some() || peer.emu.is_some() || self.ctx == peer.ctx {
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

    /// Copies `regions` (`(dst, src, bytes)`: `dst` in `dst_gpu`'s memory, `src` in this
    /// device's) to another (logical) device, ordered with events: the copy waits for the work
    /// already enqueued on both streams, and `dst_gpu`'s later work waits for the copy.
    /// `cuMemcpyPeerAsync` between contexts, a device-to-device copy within one context, a
    /// memcpy between emulated devices. Leaves this device's context current.
    pub fn copy_to_peer(&self, dst_gpu: &Gpu, regions: &[(DevPtr, DevPtr, usize)]) -> Result<()> {
        let bytes: usize = regions.iter().map(|r| r.2).sum();
        PEER_COPY_BYTES.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        match (&self.emu, &dst_gpu.emu) {
            (Some(e), Some(peer)) => return e.copy_to_peer(peer, regions),
            (None, None) => {}
            _ => {
                return Err(Error::Device(
                    "a copy between an emulated device and a GPU".into(),
                ))
            }
        }
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        // SAFETY: events are created in the context they are recorded in, waited on by the
        // other stream (allowed across contexts), and destroyed after use (the driver keeps
        // pending events alive); the regions are valid allocations (caller's contract).
        unsafe {
            dst_gpu.bind()?;
            let before = drv::event::create(flags).map_err(dev_err("cuEventCreate"))?;
            let r = drv::event::record(before, dst_gpu.stream).map_err(dev_err("cuEventRecord"));
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
            for &(dst, src, bytes) in regions {
                if self.ctx == dst_gpu.ctx {
                    drv::memcpy_dtod_async(dst, src, bytes, self.stream)
                        .map_err(dev_err("cuMemcpyDtoDAsync"))?;
                } else {
                    sys::cuMemcpyPeerAsync(dst, dst_gpu.ctx, src, self.ctx, bytes, self.stream)
                        .result()
                        .map_err(dev_err("cuMemcpyPeerAsync"))?;
                }
            }
            let after = drv::event::create(flags).map_err(dev_err("cuEventCreate"))?;
            let r = drv::event::record(after, self.stream)
                .map_err(dev_err("cuEventRecord"))
                .and_then(|_| {
                    drv::stream::wait_event(
                        dst_gpu.stream,
                        after,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .map_err(dev_err("cuStreamWaitEvent"))
                });
            let _ = drv::event::destroy(after);
            r
        }
    }

    /// A mark at the current end of the compute stream (for [`Gpu::compute_wait`] and
    /// [`Gpu::send_to_peer`] on this or another device).
    pub fn mark_compute(&self) -> Result<Mark> {
        if let Some(e) = &self.emu {
            return Ok(Mark {
                e: std::ptr::null_mut(),
                emu: e.mark(false)?,
            });
        }
        self.bind()?;
        self.mark_on(self.stream)
    }

    pub(super) fn mark_on(&self, stream: sys::CUstream) -> Result<Mark> {
        let e = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(dev_err("cuEventCreate"))?;
        let m = Mark { e, emu: None };
        // SAFETY: valid event and stream of the current context.
        unsafe { drv::event::record(m.e, stream) }.map_err(dev_err("cuEventRecord"))?;
        Ok(m)
    }

    /// Makes this device's compute stream wait until `m` (of any device) is reached.
    pub fn compute_wait(&self, m: &Mark) -> Result<()> {
        if let Some(e) = &self.emu {
            return e.wait(false, m.emu);
        }
        if m.e.is_null() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: valid stream and event (waiting on another context's event is allowed).
        unsafe {
            drv::stream::wait_event(
                self.stream,
                m.e,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(dev_err("cuStreamWaitEvent"))
    }

    /// Copies `regions` (dst on `dst_gpu`, src here, bytes) on this device's copy stream once
    /// every mark of `after` is reached, and returns a mark at the copies' end. The compute
    /// stream is not involved: the caller orders it with the returned mark
    /// ([`Gpu::compute_wait`]), on this device (before overwriting the sources) and on
    /// `dst_gpu` (before reading the destinations).
    pub fn send_to_peer(
        &self,
        dst_gpu: &Gpu,
        regions: &[(DevPtr, DevPtr, usize)],
        after: &[&Mark],
    ) -> Result<Mark> {
        let bytes: usize = regions.iter().map(|r| r.2).sum();
        PEER_COPY_BYTES.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        match (&self.emu, &dst_gpu.emu) {
            (Some(e), Some(peer)) => {
                for m in after {
                    e.wait(true, m.emu)?;
                }
                for &(dst, src, bytes) in regions {
                    e.queue_peer_copy(peer, dst, src, bytes)?;
                }
                return self.mark_copies();
            }
            (None, None) => {}
            _ => {
                return Err(Error::Device(
                    "a copy between an emulated device and a GPU".into(),
                ))
            }
        }
        self.bind()?;
        // SAFETY: valid streams and events; the regions are valid allocations of the two
        // devices (caller's contract).
        unsafe {
            for m in after.iter().filter(|m| !m.e.is_null()) {
                drv::stream::wait_event(
                    self.copy_stream,
                    m.e,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(dev_err("cuStreamWaitEvent"))?;
            }
            for &(dst, src, bytes) in regions {
                if self.ctx == dst_gpu.ctx {
                    drv::memcpy_dtod_async(dst, src, bytes, self.copy_stream)
                        .map_err(dev_err("cuMemcpyDtoDAsync"))?;
                } else {
                    sys::cuMemcpyPeerAsync(
                        dst,
                        dst_gpu.ctx,
                        src,
                        self.ctx,
                        bytes,
                        self.copy_stream,
                    )
                    .result()
                    .map_err(dev_err("cuMemcpyPeerAsync"))?;
                }
            }
        }
        self.mark_on(self.copy_stream)
    }

    /// A mark at the current end of the copy stream (after every copy queued so far).
    pub fn mark_copies(&self) -> Result<Mark> {
        if let Some(e) = &self.emu {
            return Ok(Mark {
                e: std::ptr::null_mut(),
                emu: e.mark(true)?,
            });
        }
        self.bind()?;
        self.mark_on(self.copy_stream)
    }

    /// Waits for every copy [`Gpu::send_to_peer`] queued.
    pub fn sync_copies(&self) -> Result<()> {
        if let Some(e) = &self.emu {
            return e.sync_copies();
        }
        self.bind()?;
        // SAFETY: valid stream.
        unsafe { drv::stream::synchronize(self.copy_stream) }
            .map_err(dev_err("peer copies failed (cuStreamSynchronize)"))
    }

    /// Waits for all work on the stream.
    pub fn sync(&self) -> Result<()> {
        if let Some(e) = &self.emu {
            return e.sync();
        }
        // SAFETY: valid stream.
        unsafe { drv::stream::synchronize(self.stream) }
            .map_err(dev_err("kernel execution failed (cuStreamSynchronize)"))
    }

    /// Creates a timing event.
    pub fn event(&self) -> Result<Event> {
        if self.emu.is_some() {
            return Ok(Event {
                e: std::ptr::null_mut(),
                at: Cell::new(None),
            });
        }
        drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(|e| Event {
                e,
                at: Cell::new(None),
            })
            .map_err(dev_err("cuEventCreate"))
    }

    /// Records `ev` on the stream.
    pub fn record(&self, ev: &Event) -> Result<()> {
        if self.emu.is_some() {
            ev.at.set(Some(Instant::now()));
            return Ok(());
        }
        // SAFETY: valid event and stream.
        unsafe { drv::event::record(ev.e, self.stream) }.map_err(dev_err("cuEventRecord"))
    }

    /// Milliseconds between two recorded events (waits for `end`).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        if self.emu.is_some() {
            return match (start.at.get(), end.at.get()) {
                (Some(a), Some(b)) => Ok((b - a).as_secs_f32() * 1e3),
                _ => Err(Error::Device(
                    "elapsed time of an event that was not recorded".into(),
                )),
            };
        }
        // SAFETY: valid events.
        unsafe {
            drv::event::synchronize(end.e).map_err(dev_err("cuEventSynchronize"))?;
            drv::event::elapsed(start.e, end.e).map_err(dev_err("cuEventElapsedTime"))
        }
    }
}

/// A point on a device's compute or copy stream that other streams (of any device) can wait
/// for: [`Gpu::mark_compute`], [`Gpu::send_to_peer`], [`Gpu::compute_wait`].
pub struct Mark {
    e: sys::CUevent,
    /// The point on an emulated stream (see `emu_device::StreamOrder`).
    emu: super::super::emu_device::EmuMark,
}

impl Drop for Mark {
    fn drop(&mut self) {
        if self.e.is_null() {
            return;
        }
        // SAFETY: created by Gpu::mark_on, destroyed once; a recorded event that has not
        // completed is released by the driver when it completes.
        unsafe {
            let _ = drv::event::destroy(self.e);
        }
    }
}

/// A timing event.
pub struct Event {
    e: sys::CUevent,
    /// When an emulated device recorded it.
    at: Cell<Option<Instant>>,
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.e.is_null() {
            return;
        }
        // SAFETY: created by Gpu::event, destroyed once.
        unsafe {
            let _ = drv::event::destroy(self.e);
        }
    }
}
