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

use super::dev_types::{DevPtr, Epilogue, GemmArgs, OutType};
use crate::kernels::emu::{dims, launch_raw};
use crate::kernels::Kernel;
use crate::{Error, Result};
use half::bf16;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// How an emulated machine orders the work of its streams. On a GPU each device's compute
/// stream and copy stream run concurrently, ordered only by the marks the backend records and
/// waits for ([`super::device::Mark`]); a backend that forgets a wait gets a race. The
/// emulation can run the streams in orders a GPU could choose, so a forgotten wait changes the
/// results instead of hiding: a test aid for multi-device ordering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamOrder {
    /// Every op runs when it is submitted (the default).
    Immediate,
    /// Ops are queued per stream and run only when the host waits for a stream (sync,
    /// download, a free); among the streams whose next op may run, compute streams first, so
    /// peer copies run as late as the marks they wait for allow.
    CopiesLate,
    /// As `CopiesLate`, but copy streams first: peer copies run as early as their marks allow.
    CopiesEarly,
    /// As `CopiesLate`, but the next op is drawn at random (this seed) among the streams
    /// whose next op may run.
    Random(u64),
}

/// Whether any stream order but `Immediate` is set (the fast path of every submission).
static DEFERRED: AtomicBool = AtomicBool::new(false);

/// The streams of every emulated device in the process, their queued ops, and the order.
static MACHINE: Mutex<Machine> = Mutex::new(Machine {
    order: StreamOrder::Immediate,
    rng: 0,
    streams: BTreeMap::new(),
    next_id: 0,
});

/// The machine. A panic while the lock was held (inside an op) leaves it consistent (an item
/// is popped and counted before it runs), so a poisoned lock is taken over, not fatal for
/// every later emulated device in the process.
fn machine() -> std::sync::MutexGuard<'static, Machine> {
    MACHINE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the order in which emulated streams run their work (a test aid, process-wide). Work
/// queued under the previous order runs first; an error is the first failure of that work.
pub fn set_stream_order(order: StreamOrder) -> Result<()> {
    let mut m = machine();
    m.drain_all();
    let r = match m.streams.values().find_map(|s| s.error.clone()) {
        Some(e) => Err(Error::Device(e)),
        None => Ok(()),
    };
    m.order = order;
    m.rng = match order {
        StreamOrder::Random(seed) => seed ^ 0x9E37_79B9_7F4A_7C15,
        _ => 0,
    };
    DEFERRED.store(order != StreamOrder::Immediate, Ordering::SeqCst);
    r
}

/// A queued item of a stream.
enum Item {
    /// Work: a kernel, GEMM, copy (a peer copy too: both sides are host memory) or memset.
    Op(EmuOp),
    /// Wait until `stream` has completed `upto` items (a mark).
    Wait { stream: usize, upto: u64 },
}

/// One stream: its queued items and how many it has completed.
struct Stream {
    /// A copy stream (`Gpu::send_to_peer`), not a compute stream.
    copy: bool,
    queue: VecDeque<Item>,
    done: u64,
    /// The first op of this stream that failed: reported by every later wait for the stream's
    /// device, like a CUDA context's sticky error (not by whichever device happened to run it).
    error: Option<String>,
}

impl Stream {
    /// The mark at the current end of the stream.
    fn end(&self) -> u64 {
        self.done + self.queue.len() as u64
    }
}

/// All emulated streams. Items are only pushed while the order is not `Immediate`; changing
/// the order runs everything queued first, so under `Immediate` every queue is empty.
struct Machine {
    order: StreamOrder,
    rng: u64,
    streams: BTreeMap<usize, Stream>,
    next_id: usize,
}

impl Machine {
    /// A stream that is gone (its device dropped after running everything) counts as done.
    fn reached(&self, stream: usize, upto: u64) -> bool {
        self.streams.get(&stream).is_none_or(|s| s.done >= upto)
    }

    fn runnable(&self, s: &Stream) -> bool {
        match s.queue.front() {
            None => false,
            Some(Item::Op(_)) => true,
            Some(Item::Wait { stream, upto }) => self.reached(*stream, *upto),
        }
    }

    /// Runs one item of a stream chosen by the order; `false` when nothing is queued. Some
    /// stream can always go on: a wait names items queued before it, so the item queued
    /// first among all that are still queued never waits for anything still queued.
    fn step(&mut self) -> bool {
        let ready: Vec<(usize, bool)> = self
            .streams
            .iter()
            .filter(|(_, s)| self.runnable(s))
            .map(|(&id, s)| (id, s.copy))
            .collect();
        if ready.is_empty() {
            // A cycle is impossible by the argument above; if it happened, every stream left
            // with work fails (sticky) rather than spinning or losing the work silently.
            for s in self.streams.values_mut().filter(|s| !s.queue.is_empty()) {
                s.done += s.queue.len() as u64;
                s.queue.clear();
                s.error.get_or_insert_with(|| {
                    "emulated streams wait for each other in a cycle".into()
                });
            }
            return false;
        }
        let first = |copy: bool| ready.iter().find(|r| r.1 == copy).or(ready.first());
        let pick = match self.order {
            StreamOrder::Immediate | StreamOrder::CopiesLate => first(false),
            StreamOrder::CopiesEarly => first(true),
            StreamOrder::Random(_) => {
                // xorshift64*: a reproducible draw per seed.
                let mut x = self.rng.max(1);
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                self.rng = x;
                ready.get((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % ready.len())
            }
        };
        let Some(&(id, _)) = pick else {
            return false;
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        let item = s.queue.pop_front();
        s.done += 1;
        if let Some(Item::Op(op)) = item {
            if let Err(e) = run(&op) {
                s.error.get_or_insert_with(|| e.to_string());
            }
        }
        true
    }

    /// Runs items until `stream` has completed `upto` of them (other streams' items too, as
    /// the order picks them).
    fn run_until(&mut self, stream: usize, upto: u64) -> Result<()> {
        while !self.reached(stream, upto) {
            if !self.step() {
                return Err(Error::Internal(
                    "an emulated stream mark is never reached".into(),
                ));
            }
        }
        Ok(())
    }

    /// Runs everything queued (failures stay with their streams).
    fn drain_all(&mut self) {
        while self.step() {}
    }

    /// The sticky error of any of `streams`.
    fn error_of(&self, streams: &[usize]) -> Result<()> {
        match streams
            .iter()
            .find_map(|id| self.streams.get(id)?.error.clone())
        {
            Some(e) => Err(Error::Device(e)),
            None => Ok(()),
        }
    }

    fn push(&mut self, stream: usize, item: Item) -> Result<()> {
        self.streams
            .get_mut(&stream)
            .ok_or_else(|| Error::Internal("an emulated stream is gone".into()))?
            .queue
            .push_back(item);
        Ok(())
    }

    fn end(&self, stream: usize) -> u64 {
        self.streams.get(&stream).map_or(0, |s| s.end())
    }
}

/// A point on an emulated stream: the stream and the number of its items before the point.
/// `None` under `Immediate`, where every point is reached when it is made.
pub type EmuMark = Option<(usize, u64)>;

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
    /// A host-to-device copy (the bytes copied when it was submitted, as the driver stages
    /// them).
    Write {
        /// Destination.
        dst: DevPtr,
        /// The bytes (padding of the source type included, hence `MaybeUninit`).
        data: Vec<std::mem::MaybeUninit<u8>>,
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

/// Host memory, the op recorder and the two streams of an emulated device.
pub struct EmuDevice {
    allocs: Vec<Box<[u128]>>,
    capture: RefCell<Option<Vec<EmuOp>>>,
    /// Id of the compute stream in the emulated machine ([`StreamOrder`]).
    compute: usize,
    /// Id of the copy stream (peer copies of `Gpu::send_to_peer`).
    copies: usize,
}

impl Default for EmuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for EmuDevice {
    fn drop(&mut self) {
        // Queued work may still read or write this device's memory (its own streams, or a
        // peer's copy into it): run everything before the allocations go.
        let mut m = machine();
        m.drain_all();
        m.streams.remove(&self.compute);
        m.streams.remove(&self.copies);
    }
}

/// Memory an emulated device reports as its total (bytes).
pub const EMU_MEMORY: usize = 64 << 30;

impl EmuDevice {
    /// A device with no allocations.
    pub fn new() -> Self {
        let mut m = machine();
        let id = m.next_id;
        m.next_id += 2;
        for (i, copy) in [(id, false), (id + 1, true)] {
            m.streams.insert(
                i,
                Stream {
                    copy,
                    queue: VecDeque::new(),
                    done: 0,
                    error: None,
                },
            );
        }
        drop(m);
        let (compute, copies) = (id, id + 1);
        EmuDevice {
            allocs: Vec::new(),
            capture: RefCell::new(None),
            compute,
            copies,
        }
    }

    /// Runs `op` on `stream` now (`Immediate`) or queues it.
    fn enqueue(&self, stream: usize, op: EmuOp) -> Result<()> {
        if DEFERRED.load(Ordering::SeqCst) {
            let mut m = machine();
            if m.order != StreamOrder::Immediate {
                return m.push(stream, Item::Op(op));
            }
        }
        run(&op)
    }

    /// Waits until this device's compute stream (or copy stream) has run everything queued
    /// on it; then a failure of any op of this device's streams is the error (sticky).
    fn finish(&self, copy: bool) -> Result<()> {
        if !DEFERRED.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut m = machine();
        let id = if copy { self.copies } else { self.compute };
        let end = m.end(id);
        m.run_until(id, end)?;
        m.error_of(&[self.compute, self.copies])
    }

    /// A mark at the current end of the compute stream (or the copy stream).
    pub fn mark(&self, copy: bool) -> Result<EmuMark> {
        // The backend orders streams between graphs, never inside one (on a GPU a capture may
        // not wait for an event recorded outside it, and a mark recorded inside one would be a
        // graph node, not a point other streams can wait for).
        if self.capture.borrow().is_some() {
            return Err(Error::Device(
                "a stream mark during graph capture (the backend orders streams between graphs)"
                    .into(),
            ));
        }
        if !DEFERRED.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let m = machine();
        if m.order == StreamOrder::Immediate {
            return Ok(None);
        }
        let id = if copy { self.copies } else { self.compute };
        Ok(Some((id, m.end(id))))
    }

    /// Makes the compute stream (or the copy stream) wait for `mark` (of any device).
    pub fn wait(&self, copy: bool, mark: EmuMark) -> Result<()> {
        self.capturing("a wait for a stream mark")?;
        let Some((stream, upto)) = mark else {
            return Ok(());
        };
        let mut m = machine();
        if m.order == StreamOrder::Immediate || m.reached(stream, upto) {
            return Ok(());
        }
        let id = if copy { self.copies } else { self.compute };
        m.push(id, Item::Wait { stream, upto })
    }

    /// Waits for the copy stream.
    pub fn sync_copies(&self) -> Result<()> {
        self.finish(true)
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

    /// Frees the allocation that starts at `ptr` (an unknown pointer is an error). Under a
    /// deferred order, queued work of other devices that still uses the allocation (a copy,
    /// memset, upload or GEMM operand; kernel arguments are opaque) is an error: `cuMemFree`
    /// waits for this device's work, not for a peer's copy stream. Then all queued work runs
    /// (every device's, for memory safety) and this device's sticky error is reported.
    pub fn free(&mut self, ptr: DevPtr) -> Result<()> {
        let i = self
            .allocs
            .iter()
            .position(|a| a.as_ptr() as DevPtr == ptr)
            .ok_or_else(|| {
                Error::Device(format!("emulated device: free of unknown pointer {ptr:#x}"))
            })?;
        if DEFERRED.load(Ordering::SeqCst) {
            let mut m = machine();
            let range = (ptr, ptr + (self.allocs[i].len() * 16) as u64);
            let mine = [self.compute, self.copies];
            let in_use = m
                .streams
                .iter()
                .filter(|(id, _)| !mine.contains(id))
                .any(|(_, s)| {
                    s.queue.iter().any(|it| match it {
                        Item::Op(op) => op_ranges(op)
                            .iter()
                            .any(|&(p, n)| p < range.1 && p.saturating_add(n as u64) > range.0),
                        Item::Wait { .. } => false,
                    })
                });
            m.drain_all();
            m.error_of(&mine)?;
            if in_use {
                self.allocs.swap_remove(i);
                return Err(Error::Device(format!(
                    "emulated device: freeing {ptr:#x} while another device's queued work still uses it"
                )));
            }
        }
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
        op_ranges(op)
            .into_iter()
            .try_for_each(|(p, n)| self.check(p, n))
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
        self.enqueue(self.compute, op)
    }

    /// Host to device copy (`dst` checked against the allocations), in stream order: at once
    /// (`Immediate`), or queued on the compute stream with a copy of the bytes.
    pub fn upload<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        self.capturing("a host-to-device copy")?;
        let bytes = std::mem::size_of_val(src);
        self.check(dst, bytes)?;
        if DEFERRED.load(Ordering::SeqCst) {
            let mut data = vec![std::mem::MaybeUninit::<u8>::uninit(); bytes];
            // SAFETY: `src` is a live slice of `bytes` bytes; the destination is as long and
            // holds `MaybeUninit` bytes, so padding may be copied.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr() as *const std::mem::MaybeUninit<u8>,
                    data.as_mut_ptr(),
                    bytes,
                )
            };
            return self.enqueue(self.compute, EmuOp::Write { dst, data });
        }
        // SAFETY: `dst` lies inside one of our allocations (checked), `src` is a live slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    /// Device to host copy (`src` checked against the allocations; `T` is a plain numeric type).
    pub fn download<T: Copy>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        self.capturing("a device-to-host copy")?;
        let bytes = std::mem::size_of_val(dst);
        self.check(src, bytes)?;
        self.finish(false)?;
        // SAFETY: `src` lies inside one of our allocations (checked); `dst` is a live slice of
        // a plain numeric type (any bit pattern is a value).
        unsafe {
            std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr() as *mut u8, bytes)
        };
        Ok(())
    }

    /// Copies `regions` (`dst` on `peer`, `src` here) on this device's compute stream, after
    /// the work queued on both compute streams, and before `peer`'s later work (all checked
    /// first).
    pub fn copy_to_peer(
        &self,
        peer: &EmuDevice,
        regions: &[(DevPtr, DevPtr, usize)],
    ) -> Result<()> {
        for &(dst, src, bytes) in regions {
            self.check_peer_copy(peer, dst, src, bytes)?;
        }
        self.wait(false, peer.mark(false)?)?;
        for &(dst, src, bytes) in regions {
            self.enqueue(self.compute, EmuOp::Copy { dst, src, bytes })?;
        }
        peer.wait(false, self.mark(false)?)
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

    /// A peer copy on the copy stream (checked), ordered with other streams by marks only.
    pub fn queue_peer_copy(
        &self,
        peer: &EmuDevice,
        dst: DevPtr,
        src: DevPtr,
        bytes: usize,
    ) -> Result<()> {
        self.check_peer_copy(peer, dst, src, bytes)?;
        self.enqueue(self.copies, EmuOp::Copy { dst, src, bytes })
    }

    /// Device to device copy.
    pub fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.submit(EmuOp::Copy { dst, src, bytes })
    }

    /// Waits for the compute stream.
    pub fn sync(&self) -> Result<()> {
        self.capturing("a stream synchronisation")?;
        self.finish(false)
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
            self.enqueue(self.compute, op.clone())
        })
    }
}

/// The memory ranges `(start, bytes)` an op reads or writes (none for a kernel: its arguments
/// are an opaque params struct). Sizes saturate: an absurd GEMM shape fails the range check.
fn op_ranges(op: &EmuOp) -> Vec<(DevPtr, usize)> {
    match op {
        EmuOp::Launch { .. } => Vec::new(),
        EmuOp::Copy { dst, src, bytes } => vec![(*dst, *bytes), (*src, *bytes)],
        EmuOp::Memset { dst, bytes, .. } => vec![(*dst, *bytes)],
        EmuOp::Write { dst, data } => vec![(*dst, data.len())],
        EmuOp::Gemm { args: a } => {
            let out = match a.ty {
                OutType::F32 => 4,
                OutType::Bf16 => 2,
            };
            let n = |x: usize, y: usize, z: usize| x.saturating_mul(y).saturating_mul(z);
            let mut v = vec![(a.x, n(a.rows, a.inp, 2)), (a.w, n(a.out, a.inp, 2))];
            if a.bias != 0 {
                v.push((a.bias, n(a.out, 4, 1)));
            }
            v.push((a.d, n(a.rows, a.out, out)));
            v
        }
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
        EmuOp::Write { dst, data } => {
            // SAFETY: `dst` holds `data.len()` bytes (checked when submitted).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr() as *const u8,
                    *dst as *mut u8,
                    data.len(),
                )
            };
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
        let b = unsafe { std::slice::from_raw_parts(a.bias as *const f32, a.out) };
        // A bf16 output's fused bias is bf16 on the GPU (the driver device converts it, as
        // cuBLASLt refuses an f32 bias there): the same rounding here.
        match a.ty {
            OutType::Bf16 => b.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            OutType::F32 => b.to_vec(),
        }
    });
    let mut y = vec![0f32; a.rows * a.out];
    crate::backend::cpu::gemm::linear(&xf, a.rows, a.inp, &wf, bias.as_deref(), &mut y);
    if a.ep == Epilogue::GeluBias {
        crate::backend::cpu::ops::gelu_tanh(&mut y);
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
