//! An emulated device for the CUDA backend: the same [`super::device::Gpu`] interface with host
//! memory, kernels run by the SIMT emulation layer (`cuda/emu`, the same kernel source as the
//! fatbin), GEMMs on the CPU with bf16 operands and f32 accumulation, and graphs recorded and
//! replayed op by op. It lets CI run the whole CUDA backend (buffers, tables, launches, graph
//! capture) on machines without a GPU; `BC_CUDA_EMULATE=1` selects it.
//!
//! Device pointers are host addresses. Fresh allocations are poisoned with 0xFF bytes (NaN in
//! bf16 and f32), so reading memory nobody wrote shows up in the results. As on a GPU, work
//! submitted during a capture is recorded, not run, and host copies during a capture are errors.
//! Copies, memsets, uploads, downloads and GEMM operands are checked against this device's
//! allocations (an out-of-range pointer is an error, not a stray host write); kernel launches
//! are `unsafe`, as on a GPU.

use super::device::{DevPtr, Epilogue, OutType};
use crate::kernels::emu::{dims, launch_raw, Kernel};
use crate::{Error, Result};
use half::bf16;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

static LAZY_PEER_COPIES: AtomicBool = AtomicBool::new(false);

/// Test aid: run emulated peer copies (the copy stream of `Gpu::send_to_peer`) as late as the
/// stream ordering allows, i.e. only when a stream waits for them, instead of at once. The
/// compute stream still runs at once, so a wait the backend forgot (a device reading peer rows
/// before their copy landed, or overwriting rows a copy has yet to read) changes the results.
pub fn set_lazy_peer_copies(lazy: bool) {
    LAZY_PEER_COPIES.store(lazy, Ordering::Relaxed);
}

/// Whether [`set_lazy_peer_copies`] is on.
pub fn lazy_peer_copies() -> bool {
    LAZY_PEER_COPIES.load(Ordering::Relaxed)
}

/// Peer copies an emulated device's copy stream has accepted but not yet run (lazy mode).
#[derive(Default, Debug)]
pub struct CopyQueue {
    /// Sequence number of the next copy.
    next: u64,
    /// (sequence number, dst, src, bytes), ranges checked when they were queued.
    pending: Vec<(u64, DevPtr, DevPtr, usize)>,
}

impl CopyQueue {
    /// Queues a checked copy; returns its sequence number.
    fn push(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.pending.push((seq, dst, src, bytes));
        seq
    }

    /// The sequence number the next queued copy will get (a mark at the current end).
    pub fn end(&self) -> u64 {
        self.next
    }

    /// Runs every queued copy with a sequence number below `upto`, in order.
    pub fn flush(&mut self, upto: u64) {
        let n = self.pending.partition_point(|c| c.0 < upto);
        for (_, dst, src, bytes) in self.pending.drain(..n) {
            // SAFETY: both ranges were checked against live allocations when queued, and the
            // devices outlive their queued copies (flushed by the backend before it returns).
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        }
    }
}

/// One recorded operation of a graph.
#[derive(Clone, Debug)]
pub enum EmuOp {
    /// A kernel launch with a copy of its params struct.
    Launch {
        /// Kernel.
        kernel: Kernel,
        /// Grid.
        grid: [u32; 3],
        /// Threads per block.
        block: u32,
        /// The params struct's bytes (16-byte aligned storage).
        params: Vec<u128>,
    },
    /// A GEMM.
    Gemm {
        /// Arguments as passed to [`EmuDevice::gemm`].
        args: GemmArgs,
    },
    /// A device-to-device copy.
    Copy {
        /// Destination.
        dst: DevPtr,
        /// Source.
        src: DevPtr,
        /// Bytes.
        bytes: usize,
    },
    /// A memset.
    Memset {
        /// Destination.
        dst: DevPtr,
        /// Byte value.
        value: u8,
        /// Bytes.
        bytes: usize,
    },
}

/// Arguments of a GEMM (see `Gpu::gemm`).
#[derive(Clone, Copy, Debug)]
pub struct GemmArgs {
    /// bf16 `[rows, inp]`.
    pub x: DevPtr,
    /// bf16 `[out, inp]`.
    pub w: DevPtr,
    /// f32 `[out]` or 0.
    pub bias: DevPtr,
    /// Output `[rows, out]`.
    pub d: DevPtr,
    /// Rows.
    pub rows: usize,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// Output type.
    pub ty: OutType,
    /// Epilogue.
    pub ep: Epilogue,
}

/// Host memory and the op recorder of an emulated device.
#[derive(Default)]
pub struct EmuDevice {
    allocs: Vec<Box<[u128]>>,
    capture: RefCell<Option<Vec<EmuOp>>>,
    /// The copy stream's queued peer copies (lazy mode, [`set_lazy_peer_copies`]).
    pub copies: Arc<Mutex<CopyQueue>>,
}

/// Memory an emulated device reports as its total (bytes).
pub const EMU_MEMORY: usize = 64 << 30;

impl EmuDevice {
    /// A device with no allocations.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allocates `bytes` (16-byte aligned), poisoned with 0xFF.
    pub fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        let words = bytes.max(1).div_ceil(16);
        let mut v: Vec<u128> = Vec::new();
        v.try_reserve_exact(words)
            .map_err(|_| Error::OutOfMemory(format!("emulated device: {bytes} bytes")))?;
        v.resize(words, u128::MAX);
        let b = v.into_boxed_slice();
        let p = b.as_ptr() as DevPtr;
        self.allocs.push(b);
        Ok(p)
    }

    /// Frees the allocation that starts at `ptr` (an unknown pointer is an error).
    pub fn free(&mut self, ptr: DevPtr) -> Result<()> {
        let i = self
            .allocs
            .iter()
            .position(|a| a.as_ptr() as DevPtr == ptr)
            .ok_or_else(|| {
                Error::Device(format!("emulated device: free of unknown pointer {ptr:#x}"))
            })?;
        self.allocs.swap_remove(i);
        Ok(())
    }

    /// (free, total) memory: the emulated device claims [`EMU_MEMORY`].
    pub fn mem_info(&self) -> (usize, usize) {
        let used: usize = self.allocs.iter().map(|a| a.len() * 16).sum();
        (EMU_MEMORY.saturating_sub(used), EMU_MEMORY)
    }

    /// Checks that `[ptr, ptr + bytes)` lies inside one allocation of this device.
    pub fn check(&self, ptr: DevPtr, bytes: usize) -> Result<()> {
        let end = ptr.checked_add(bytes as u64);
        let inside = self.allocs.iter().any(|a| {
            let start = a.as_ptr() as u64;
            let stop = start + (a.len() * 16) as u64;
            ptr >= start && end.is_some_and(|e| e <= stop)
        });
        if inside || bytes == 0 {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "emulated device: [{ptr:#x}, +{bytes}) is not inside an allocation"
            )))
        }
    }

    fn check_op(&self, op: &EmuOp) -> Result<()> {
        match op {
            EmuOp::Launch { .. } => Ok(()),
            EmuOp::Copy { dst, src, bytes } => {
                self.check(*dst, *bytes)?;
                self.check(*src, *bytes)
            }
            EmuOp::Memset { dst, bytes, .. } => self.check(*dst, *bytes),
            EmuOp::Gemm { args: a } => {
                let out = match a.ty {
                    OutType::F32 => 4,
                    OutType::Bf16 => 2,
                };
                let n = |x: usize, y: usize, z: usize| x.saturating_mul(y).saturating_mul(z);
                self.check(a.x, n(a.rows, a.inp, 2))?;
                self.check(a.w, n(a.out, a.inp, 2))?;
                if a.bias != 0 {
                    self.check(a.bias, n(a.out, 4, 1))?;
                }
                self.check(a.d, n(a.rows, a.out, out))
            }
        }
    }

    fn capturing(&self, what: &str) -> Result<()> {
        if self.capture.borrow().is_some() {
            return Err(Error::Device(format!(
                "{what} during graph capture (not allowed on a GPU either)"
            )));
        }
        Ok(())
    }

    fn submit(&self, op: EmuOp) -> Result<()> {
        self.check_op(&op)?;
        if let Some(ops) = self.capture.borrow_mut().as_mut() {
            ops.push(op);
            return Ok(());
        }
        run(&op)
    }

    /// Host to device copy (`dst` checked against the allocations).
    pub fn upload<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        self.capturing("a host-to-device copy")?;
        let bytes = std::mem::size_of_val(src);
        self.check(dst, bytes)?;
        // SAFETY: `dst` lies inside one of our allocations (checked), `src` is a live slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    /// Device to host copy (`src` checked against the allocations; `T` is a plain numeric type).
    pub fn download<T: Copy>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        self.capturing("a device-to-host copy")?;
        let bytes = std::mem::size_of_val(dst);
        self.check(src, bytes)?;
        // SAFETY: `src` lies inside one of our allocations (checked); `dst` is a live slice of
        // a plain numeric type (any bit pattern is a value).
        unsafe {
            std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr() as *mut u8, bytes)
        };
        Ok(())
    }

    /// Copies `bytes` from this device's `src` to `dst` on `peer` (both checked).
    pub fn copy_to_peer(
        &self,
        peer: &EmuDevice,
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    ) -> Result<()> {
        self.check_peer_copy(peer, dst, src, bytes)?;
        // SAFETY: both ranges lie inside live allocations (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    /// A peer copy is allowed now (no capture open) and both ranges lie inside allocations.
    fn check_peer_copy(
        &self,
        peer: &EmuDevice,
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    ) -> Result<()> {
        self.capturing("a peer copy")?;
        self.check(src, bytes)?;
        peer.check(dst, bytes)
    }

    /// Memset.
    pub fn memset(&self, dst: DevPtr, value: u8, bytes: usize) -> Result<()> {
        self.submit(EmuOp::Memset { dst, value, bytes })
    }

    /// A peer copy on the copy stream: run now, or queued in lazy mode
    /// ([`set_lazy_peer_copies`]).
    pub fn queue_peer_copy(
        &self,
        peer: &EmuDevice,
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    ) -> Result<()> {
        if !lazy_peer_copies() {
            return self.copy_to_peer(peer, dst, src, bytes);
        }
        self.check_peer_copy(peer, dst, src, bytes)?;
        self.copies
            .lock()
            .map_err(|_| Error::Internal("emulated copy queue poisoned".into()))?
            .push(dst, src, bytes);
        Ok(())
    }

    /// Device to device copy.
    pub fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.submit(EmuOp::Copy { dst, src, bytes })
    }

    /// Waits for the stream: everything already ran.
    pub fn sync(&self) -> Result<()> {
        self.capturing("a stream synchronisation")
    }

    /// Launches (or records) a kernel.
    ///
    /// # Safety
    /// As `Gpu::launch`: `P` is the kernel's params struct with valid pointers.
    pub unsafe fn launch<P>(
        &self,
        kernel: Kernel,
        grid: [u32; 3],
        block: u32,
        p: &P,
    ) -> Result<()> {
        let n = std::mem::size_of::<P>().div_ceil(16);
        let mut params = vec![0u128; n];
        std::ptr::copy_nonoverlapping(
            p as *const P as *const u8,
            params.as_mut_ptr() as *mut u8,
            std::mem::size_of::<P>(),
        );
        self.submit(EmuOp::Launch {
            kernel,
            grid,
            block,
            params,
        })
    }

    /// Runs (or records) a GEMM.
    pub fn gemm(&self, args: GemmArgs) -> Result<()> {
        self.submit(EmuOp::Gemm { args })
    }

    /// Starts recording.
    pub fn begin_capture(&self) -> Result<()> {
        let mut c = self.capture.borrow_mut();
        if c.is_some() {
            return Err(Error::Device("a capture is already in progress".into()));
        }
        *c = Some(Vec::new());
        Ok(())
    }

    /// Stops recording and returns the ops.
    pub fn end_capture(&self) -> Result<Vec<EmuOp>> {
        self.capture
            .borrow_mut()
            .take()
            .ok_or_else(|| Error::Device("end_capture without begin_capture".into()))
    }

    /// Drops a capture in progress.
    pub fn abort_capture(&self) {
        self.capture.borrow_mut().take();
    }

    /// Replays recorded ops (copies, memsets and GEMMs are re-checked; the launches carry the
    /// contract of the `launch` calls that recorded them, as a GPU graph does).
    pub fn replay(&self, ops: &[EmuOp]) -> Result<()> {
        self.capturing("replaying a graph")?;
        ops.iter().try_for_each(|op| {
            self.check_op(op)?;
            run(op)
        })
    }
}

fn run(op: &EmuOp) -> Result<()> {
    match op {
        EmuOp::Launch {
            kernel,
            grid,
            block,
            params,
        } => {
            if grid.contains(&0) {
                return Ok(());
            }
            // SAFETY: the params were copied from the struct the caller passed to `launch`,
            // whose pointers address this device's (host) allocations.
            unsafe {
                launch_raw(
                    *kernel,
                    &dims(*kernel, *grid, [*block, 1, 1]),
                    params.as_ptr() as *const std::ffi::c_void,
                )
            }
            .map_err(|e| Error::Device(format!("emulated {e}")))
        }
        EmuOp::Copy { dst, src, bytes } => {
            // SAFETY: both address allocations of at least `bytes` bytes (caller's contract);
            // `copy` tolerates overlap.
            unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
            Ok(())
        }
        EmuOp::Memset { dst, value, bytes } => {
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(*dst as *mut u8, *value, *bytes) };
            Ok(())
        }
        EmuOp::Gemm { args } => gemm(args),
    }
}

fn gemm(a: &GemmArgs) -> Result<()> {
    if a.rows == 0 {
        return Ok(());
    }
    // SAFETY: the pointers address allocations of the documented sizes (caller's contract).
    let (x, w) = unsafe {
        (
            std::slice::from_raw_parts(a.x as *const bf16, a.rows * a.inp),
            std::slice::from_raw_parts(a.w as *const bf16, a.out * a.inp),
        )
    };
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let bias = (a.bias != 0).then(|| {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(a.bias as *const f32, a.out) }
    });
    let mut y = vec![0f32; a.rows * a.out];
    crate::cpu::gemm::linear(&xf, a.rows, a.inp, &wf, bias, &mut y);
    if a.ep == Epilogue::GeluBias {
        crate::cpu::ops::gelu_tanh(&mut y);
    }
    // SAFETY: d holds rows*out values of the output type.
    unsafe {
        match a.ty {
            OutType::F32 => std::ptr::copy_nonoverlapping(y.as_ptr(), a.d as *mut f32, y.len()),
            OutType::Bf16 => {
                let d = std::slice::from_raw_parts_mut(a.d as *mut bf16, y.len());
                d.iter_mut()
                    .zip(&y)
                    .for_each(|(o, v)| *o = bf16::from_f32(*v));
            }
        }
    }
    Ok(())
}
