//! Pinned staging of the per-tick uploads on the driver device: the host data is copied into
//! page-locked memory and `cuMemcpyHtoDAsync` runs from there, so an upload returns at once
//! (from pageable memory the driver first waits for the stream) and the caller's vectors may
//! end right away. A batch of uploads ends with an event; the next batch waits for it before it
//! overwrites the buffer (by then long reached: it is the previous tick's uploads).

use super::driver::{dev_err, DriverDevice};
use super::streams::DriverEvent;
use crate::backend::cuda::dev_types::DevPtr;
use crate::{Error, Result};
use cudarc::driver::{result as drv, sys};
use std::ffi::c_void;

/// First size of the pinned buffer (it doubles when a batch needs more).
const INITIAL_BYTES: usize = 4 << 20;

/// Offsets in the buffer are multiples of this.
const ALIGN: usize = 256;

/// The pinned buffer, its size, how much the current batch used, and the event that ends the
/// previous batch's copies.
pub(super) struct Staging {
    ptr: *mut u8,
    cap: usize,
    used: usize,
    done: Option<DriverEvent>,
}

impl Default for Staging {
    fn default() -> Self {
        Staging {
            ptr: std::ptr::null_mut(),
            cap: 0,
            used: 0,
            done: None,
        }
    }
}

impl Staging {
    /// Frees the buffer (the caller makes sure no copy still reads it).
    pub(super) fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by cuMemHostAlloc below, freed once (the pointer is reset).
            let _ = unsafe { drv::free_host(self.ptr as *mut c_void) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

/// Waits for `ev` (the end of a batch's copies).
fn wait(ev: DriverEvent) -> Result<()> {
    // SAFETY: a valid event, recorded on this device's stream.
    unsafe { drv::event::synchronize(ev.0) }.map_err(dev_err("cuEventSynchronize"))
}

impl DriverDevice {
    /// Copies `src` to `dst` through the pinned buffer, asynchronously on the stream.
    pub(super) fn upload_staged<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        let mut s = self.staging.borrow_mut();
        if s.used == 0 {
            if let Some(ev) = s.done.take() {
                wait(ev)?;
            }
        }
        let mut off = s.used.next_multiple_of(ALIGN);
        if off + bytes > s.cap {
            // A larger buffer: the copies still reading the old one end first.
            self.sync()?;
            s.free();
            let cap = (off + bytes).next_power_of_two().max(INITIAL_BYTES);
            self.bind()?;
            // SAFETY: a plain page-locked allocation in this device's context.
            let p = unsafe { drv::malloc_host(cap, 0) }.map_err(|e| {
                Error::OutOfMemory(format!("cuMemHostAlloc of {cap} pinned bytes failed: {e}"))
            })?;
            s.ptr = p as *mut u8;
            s.cap = cap;
            s.done = None;
            off = 0;
        }
        // SAFETY: `off + bytes <= cap` and no pending copy reads this range (the previous
        // batch's end was waited for, this batch's earlier copies use lower offsets).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, s.ptr.add(off), bytes);
            sys::cuMemcpyHtoDAsync_v2(dst, s.ptr.add(off) as *const c_void, bytes, self.stream)
                .result()
                .map_err(dev_err("cuMemcpyHtoDAsync (pinned)"))?;
        }
        s.used = off + bytes;
        Ok(())
    }

    /// Ends a batch of [`Self::upload_staged`] copies: the next batch reuses the buffer once
    /// they are done (an event, not a host sync).
    pub(super) fn end_staged(&self) -> Result<()> {
        let mut s = self.staging.borrow_mut();
        if s.used > 0 {
            s.done = Some(self.mark_compute()?);
            s.used = 0;
        }
        Ok(())
    }
}
