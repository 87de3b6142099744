//! Pinned staging of the per-tick uploads on the driver device: the host data is copied into
//! page-locked memory and `cuMemcpyHtoDAsync` runs from there, so an upload returns at once
//! (from pageable memory the driver first waits for the stream) and the caller's vectors may
//! end right away. A batch of uploads ([`DriverDevice::end_staged`] ends it) goes through one
//! of two pinned buffers, taken in turn, and ends with an event; a batch waits only for the
//! event of the batch before the previous one, the last that used its buffer. A tick has two
//! batches when the latents stay on the device (the tables before the forward, the renoise
//! after it), so tick N+1's tables wait for tick N's tables (queued before tick N's forward)
//! and its renoise for tick N's renoise (queued before tick N's flow step): the host runs up
//! to a tick ahead of the GPU and never waits for the forward it just queued.

use super::driver::{dev_err, DriverDevice};
use super::streams::DriverEvent;
use crate::backend::cuda::dev_types::DevPtr;
use crate::{Error, Result};
use cudarc::driver::{result as drv, sys};
use std::ffi::c_void;

/// First size of a pinned buffer (it doubles when a batch needs more).
const INITIAL_BYTES: usize = 4 << 20;

/// Offsets in a buffer are multiples of this.
const ALIGN: usize = 256;

/// One pinned buffer: its size, how much the current batch used, and the event (`E`; a
/// [`DriverEvent`] but in tests) that ends the copies of the last batch that used it.
struct Buffer<E> {
    ptr: *mut u8,
    cap: usize,
    used: usize,
    done: Option<E>,
}

impl<E> Default for Buffer<E> {
    fn default() -> Self {
        Buffer {
            ptr: std::ptr::null_mut(),
            cap: 0,
            used: 0,
            done: None,
        }
    }
}

impl<E> Buffer<E> {
    /// Frees the buffer (the caller makes sure no copy still reads it).
    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by cuMemHostAlloc below, freed once (the pointer is reset).
            let _ = unsafe { drv::free_host(self.ptr as *mut c_void) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
        self.used = 0;
        self.done = None;
    }
}

/// The two pinned buffers and which one the current batch uses.
pub(super) struct Staging<E = DriverEvent> {
    bufs: [Buffer<E>; 2],
    cur: usize,
}

impl<E> Default for Staging<E> {
    fn default() -> Self {
        Staging {
            bufs: [Buffer::default(), Buffer::default()],
            cur: 0,
        }
    }
}

impl<E> Staging<E> {
    /// Frees both buffers (the caller makes sure no copy still reads them).
    pub(super) fn free(&mut self) {
        for b in &mut self.bufs {
            b.free();
        }
    }

    /// The current batch's buffer and, at the batch's first upload, the event to wait for
    /// before writing it (the end of the last batch that used it).
    fn start(&mut self) -> (&mut Buffer<E>, Option<E>) {
        let b = &mut self.bufs[self.cur];
        let wait = if b.used == 0 { b.done.take() } else { None };
        (b, wait)
    }

    /// Ends the current batch with the event `mark` records and turns to the other buffer;
    /// a batch that uploaded nothing records nothing and keeps its buffer.
    fn end(&mut self, mark: impl FnOnce() -> Result<E>) -> Result<()> {
        let b = &mut self.bufs[self.cur];
        if b.used > 0 {
            b.done = Some(mark()?);
            b.used = 0;
            self.cur = 1 - self.cur;
        }
        Ok(())
    }
}

/// Waits for `ev` (the end of a batch's copies).
fn wait(ev: DriverEvent) -> Result<()> {
    // SAFETY: a valid event, recorded on this device's stream.
    unsafe { drv::event::synchronize(ev.0) }.map_err(dev_err("cuEventSynchronize"))
}

impl DriverDevice {
    /// Copies `src` to `dst` through the current pinned buffer, asynchronously on the stream.
    pub(super) fn upload_staged<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        let mut st = self.staging.borrow_mut();
        let (s, before) = st.start();
        // The batch before the previous one used this buffer: its copies end first.
        if let Some(ev) = before {
            wait(ev)?;
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
                let what = format!("cuMemHostAlloc of {cap} pinned bytes failed: {e}");
                // Out of memory only when the driver says so (not a sticky kernel fault).
                if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                    Error::OutOfMemory(what)
                } else {
                    Error::Device(what)
                }
            })?;
            s.ptr = p as *mut u8;
            s.cap = cap;
            off = 0;
        }
        // SAFETY: `off + bytes <= cap` and no pending copy reads this range (the last batch
        // that used this buffer was waited for, this batch's earlier copies use lower offsets).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, s.ptr.add(off), bytes);
            sys::cuMemcpyHtoDAsync_v2(dst, s.ptr.add(off) as *const c_void, bytes, self.stream)
                .result()
                .map_err(dev_err("cuMemcpyHtoDAsync (pinned)"))?;
        }
        s.used = off + bytes;
        Ok(())
    }

    /// Ends a batch of [`Self::upload_staged`] copies with an event (not a host sync) and
    /// turns to the other buffer: the batch after next reuses this one once the event is
    /// reached.
    pub(super) fn end_staged(&self) -> Result<()> {
        self.staging.borrow_mut().end(|| self.mark_compute())
    }
}

#[cfg(test)]
mod tests {
    use super::Staging;

    /// Batch k waits for batch k - 2's event (not k - 1's, which may sit behind the forward
    /// queued between them), only at its first upload; an empty batch changes nothing.
    #[test]
    fn a_batch_waits_for_the_batch_before_the_previous_one() {
        let mut s = Staging::<usize>::default();
        let mut waited = Vec::new();
        for batch in 0..5 {
            let (b, w) = s.start();
            waited.push(w);
            b.used = 256;
            let (b, w) = s.start();
            assert_eq!(w, None, "batch {batch}: a second upload waited");
            b.used = 512;
            s.end(|| Ok(batch)).unwrap();
            s.end(|| panic!("an empty batch recorded an event"))
                .unwrap();
        }
        assert_eq!(waited, [None, None, Some(0), Some(1), Some(2)]);
        // An error recording the event leaves the batch open (its buffer still in use).
        s.start().0.used = 1;
        assert!(s.end(|| Err(crate::Error::Device("x".into()))).is_err());
        assert_eq!(s.start().1, None);
    }
}
