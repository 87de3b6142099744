//! The device layer of the CUDA backend: [`Gpu`], one logical device with a compute stream
//! and a copy stream, raw device buffers, kernel launches with the `params.h` structs, GEMMs,
//! marks between streams, peer copies and graphs.
//!
//! A [`Gpu`] is one of two implementations, chosen when it is opened, and every operation
//! dispatches to it once, here:
//! - the driver device (`driver`, with `gemm`, `streams` and `graph`: cuBLASLt GEMMs,
//!   streams / events / peer copies, CUDA graphs), through `cudarc`'s `result`/`sys` layers
//!   (driver API, dynamic loading). cudarc panics when a library cannot be loaded, so
//!   [`probe()`] must succeed before a driver device is opened;
//! - the emulated device ([`super::emu_device`]): host memory, kernels under the SIMT
//!   emulation layer, CPU GEMMs, recorded graphs.
//!
//! This module is the only one of the device layer that names the emulated device.

use super::emu_device::{EmuDevice, EmuMark, EmuOp};
use crate::kernels::Kernel;
use crate::{Error, Result};
use driver::DriverDevice;
use graph::{DriverGraph, GRAPH_REPLAYS};
use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::Instant;
use streams::{DriverEvent, PEER_COPY_BYTES};

mod driver;
mod gemm;
mod graph;
mod probe;
mod staging;
mod streams;
mod tma;

pub use super::dev_types::{DevPtr, Epilogue, GemmArgs, OutType};
pub use gemm::{unfused_gemm_shapes, BIAS_BF16_ELEMS, GEMM_WORKSPACE};
pub use graph::graph_replays;
pub use probe::{
    cublaslt_present, driver_version, libraries_report, list_devices, probe, probe_driver,
    DeviceInfo, ProbeInfo,
};
pub use streams::peer_copy_bytes;

static STAGED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static DOWNLOAD_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static DOWNLOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SYNCS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Host traffic of every device in this process, what the denoising state on the device saves
/// (measured in `tests/cuda_emulated.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTraffic {
    /// Bytes of per-tick uploads ([`Gpu::upload_staged`]).
    pub staged_bytes: usize,
    /// Bytes of [`Gpu::download`]s.
    pub download_bytes: usize,
    /// [`Gpu::download`]s (each waits for the stream).
    pub downloads: usize,
    /// [`Gpu::sync`]s (opening, weight and prompt uploads, ...).
    pub syncs: usize,
}

/// The [`HostTraffic`] so far.
pub fn host_traffic() -> HostTraffic {
    let l = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    HostTraffic {
        staged_bytes: l(&STAGED_BYTES),
        download_bytes: l(&DOWNLOAD_BYTES),
        downloads: l(&DOWNLOADS),
        syncs: l(&SYNCS),
    }
}

/// Whether the environment variable `k` is set to something other than empty or `0` (how
/// every `BC_*` switch is read).
pub fn env_flag(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// One logical device: a GPU through the driver, or an emulated device.
pub struct Gpu {
    /// The device's name.
    pub name: String,
    /// Whether cuBLASLt's GELU epilogue is used (`BC_NO_GELU_EPILOGUE=1`: bias epilogue, then
    /// the activation kernel).
    pub gelu_epilogue: bool,
    /// Whether GEMM epilogues are fused at all (`BC_NO_GEMM_EPILOGUE=1`: plain GEMMs, bias
    /// and GELU by the activation kernel; also what happens per shape when cuBLASLt has no
    /// algorithm for the fused epilogue).
    pub fused_epilogues: bool,
    imp: DeviceImpl,
}

/// The implementation behind a [`Gpu`].
enum DeviceImpl {
    /// A GPU: context, streams, kernels, cuBLASLt.
    Driver(DriverDevice),
    /// Host memory and the SIMT emulation (no driver or GPU needed).
    Emulated(Box<EmuDevice>),
}

use DeviceImpl::{Driver, Emulated};

/// A point on a device's compute or copy stream that other streams (of any device) can wait
/// for: [`Gpu::mark_compute`], [`Gpu::send_to_peer`], [`Gpu::compute_wait`].
pub struct Mark(MarkImpl);

enum MarkImpl {
    Driver(DriverEvent),
    Emulated(EmuMark),
}

impl Mark {
    /// The point on an emulated stream (none for a driver mark).
    fn emulated(&self) -> EmuMark {
        match &self.0 {
            MarkImpl::Emulated(m) => *m,
            MarkImpl::Driver(_) => None,
        }
    }

    /// The event of a driver mark.
    fn driver(&self) -> Option<&DriverEvent> {
        match &self.0 {
            MarkImpl::Driver(e) => Some(e),
            MarkImpl::Emulated(_) => None,
        }
    }
}

/// A timing event ([`Gpu::event`], [`Gpu::record`], [`Gpu::elapsed_ms`]).
pub struct Event(EventImpl);

enum EventImpl {
    Driver(DriverEvent),
    /// When an emulated device recorded it.
    Emulated(Cell<Option<Instant>>),
}

/// A captured graph, replayed with [`Gpu::replay`].
pub struct Graph(GraphImpl);

enum GraphImpl {
    /// An instantiated CUDA graph.
    Driver(DriverGraph),
    /// The recorded ops of a graph captured on an emulated device.
    Emulated(Vec<EmuOp>),
}

fn mixed(what: &str) -> Error {
    Error::Device(format!("{what} between an emulated device and a GPU"))
}

impl Gpu {
    /// An emulated device: host memory, kernels under the SIMT emulation layer, CPU GEMMs,
    /// recorded graphs. No driver or GPU needed.
    pub fn open_emulated() -> Result<Gpu> {
        Ok(Self::with(
            "emulated device (SIMT emulation on the CPU)".into(),
            Emulated(Box::default()),
        ))
    }

    /// Opens GPU `ordinal`: probes, creates the context and streams, loads the fatbin, opens
    /// cuBLASLt (a clean error without it).
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let (d, name) = DriverDevice::open(ordinal, true)?;
        Ok(Self::with(name, Driver(d)))
    }

    /// [`Gpu::open`] for kernels: without cuBLASLt the device still opens and launches
    /// kernels, and only [`Gpu::gemm_fused`] fails ([`Gpu::has_gemm`] says which). So the
    /// kernel tests of the GPU bundle run where cuBLASLt is missing or broken.
    pub fn open_kernels(ordinal: usize) -> Result<Gpu> {
        let (d, name) = DriverDevice::open(ordinal, false)?;
        Ok(Self::with(name, Driver(d)))
    }

    /// Whether GEMMs can run (cuBLASLt loaded; always on an emulated device).
    pub fn has_gemm(&self) -> bool {
        match &self.imp {
            Driver(d) => !d.lt.is_null(),
            Emulated(_) => true,
        }
    }

    fn with(name: String, imp: DeviceImpl) -> Gpu {
        Gpu {
            name,
            gelu_epilogue: !env_flag("BC_NO_GELU_EPILOGUE"),
            fused_epilogues: !env_flag("BC_NO_GEMM_EPILOGUE"),
            imp,
        }
    }

    /// True for an emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.imp, Emulated(_))
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        match &self.imp {
            Driver(d) => d.bind(),
            Emulated(_) => Ok(()),
        }
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        match &self.imp {
            Driver(d) => d.mem_info(),
            Emulated(e) => Ok(e.mem_info()),
        }
    }

    /// Allocates `bytes` (rounded up to 256) of device memory, freed with the device.
    pub fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        let bytes = bytes.max(1).div_ceil(256) * 256;
        match &mut self.imp {
            Driver(d) => d.alloc(bytes),
            Emulated(e) => e.alloc(bytes),
        }
    }

    /// Frees an allocation made by [`Gpu::alloc`] (the caller makes sure no work still in
    /// flight uses it, e.g. by [`Gpu::sync`], and that no graph that captured it is replayed
    /// again). An unknown pointer is an error and frees nothing.
    pub fn free(&mut self, ptr: DevPtr) -> Result<()> {
        match &mut self.imp {
            Driver(d) => d.free(ptr),
            Emulated(e) => e.free(ptr),
        }
    }

    /// Copies `src` to device memory at `dst` (asynchronous on the stream; `src` must stay
    /// alive until the next [`Gpu::sync`]).
    pub fn upload<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        match &self.imp {
            Driver(d) => d.upload(dst, src),
            Emulated(e) => e.upload(dst, src),
        }
    }

    /// [`Gpu::upload`] through pinned memory (on a GPU): `src` is copied before this returns,
    /// so it may end right away, and the device copy runs asynchronously. A batch of these
    /// ends with [`Gpu::end_staged`]; no host sync is needed between ticks.
    pub fn upload_staged<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        STAGED_BYTES.fetch_add(std::mem::size_of_val(src), Ordering::Relaxed);
        match &self.imp {
            Driver(d) => d.upload_staged(dst, src),
            // The emulated device copies the data when the upload is queued.
            Emulated(e) => e.upload(dst, src),
        }
    }

    /// Ends a batch of [`Gpu::upload_staged`] copies with an event. Two pinned buffers take
    /// turns, so the batch after next waits for it before reusing its memory, and a tick's
    /// uploads never wait for the forward queued just before them.
    pub fn end_staged(&self) -> Result<()> {
        match &self.imp {
            Driver(d) => d.end_staged(),
            Emulated(_) => Ok(()),
        }
    }

    /// Copies device memory at `src` into `dst` and waits for it.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        DOWNLOAD_BYTES.fetch_add(std::mem::size_of_val(dst), Ordering::Relaxed);
        DOWNLOADS.fetch_add(1, Ordering::Relaxed);
        match &self.imp {
            Driver(d) => d.download(dst, src),
            Emulated(e) => e.download(dst, src),
        }
    }

    /// Sets `bytes` bytes at `dst` to `value`.
    pub fn memset(&self, dst: DevPtr, value: u8, bytes: usize) -> Result<()> {
        match &self.imp {
            Driver(d) => d.memset(dst, value, bytes),
            Emulated(e) => e.memset(dst, value, bytes),
        }
    }

    /// Device-to-device copy of `bytes` bytes.
    pub fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        match &self.imp {
            Driver(d) => d.copy(dst, src, bytes),
            Emulated(e) => e.copy(dst, src, bytes),
        }
    }

    /// Launches `kernel` with a params struct passed by value.
    ///
    /// # Safety
    /// `P` must be the params struct of `kernel` and its pointers valid device pointers for
    /// the accesses the kernel makes with this grid.
    pub unsafe fn launch<P>(
        &self,
        kernel: Kernel,
        grid: [u32; 3],
        block: u32,
        p: &P,
    ) -> Result<()> {
        if grid.contains(&0) {
            return Ok(());
        }
        match &self.imp {
            // SAFETY: the caller's contract, forwarded.
            Driver(d) => unsafe { d.launch(kernel, grid, block, p) },
            // SAFETY: as above.
            Emulated(e) => unsafe { e.launch(kernel, grid, block, p) },
        }
    }

    /// Compute capability (major, minor) of the device, `None` when emulated: kernels that
    /// need one architecture (the sm_90a wgmma probe) check it before launching.
    pub fn compute_capability(&self) -> Option<(i32, i32)> {
        match &self.imp {
            Driver(d) => Some(d.compute_capability()),
            Emulated(_) => None,
        }
    }

    /// Blocks of `kernel` with `block` threads one SM holds at once (the driver's occupancy
    /// calculator, 0 when it does not say; 1 on an emulated device).
    pub fn blocks_per_sm(&self, kernel: Kernel, block: u32) -> i32 {
        match &self.imp {
            Driver(d) => d.blocks_per_sm(kernel, block),
            Emulated(_) => 1,
        }
    }

    /// Number of streaming multiprocessors (1 on an emulated device).
    pub fn sm_count(&self) -> i32 {
        match &self.imp {
            Driver(d) => d.sm_count(),
            Emulated(_) => 1,
        }
    }

    /// `d[rows, out] = x[rows, inp] . w[out, inp]^T` with as much of `ep` (bias, GELU) fused
    /// into cuBLASLt's epilogue as it has an algorithm for; x and w bf16 row-major, bias f32,
    /// f32 accumulation; d bf16 or f32 with row stride `out`. Returns the epilogue that ran:
    /// the rest (bias, GELU) is the caller's, see [`crate::backend::cuda::ops::gemm`]
    /// (`BC_NO_GEMM_EPILOGUE=1` / `BC_NO_GELU_EPILOGUE=1` fuse less). The emulated device
    /// runs every epilogue it is asked for, except a bf16-output bias wider than the GPU's
    /// bf16 bias scratch, which the GPU too leaves to the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_fused(
        &mut self,
        x: DevPtr,
        w: DevPtr,
        bias: DevPtr,
        d: DevPtr,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        ep: Epilogue,
    ) -> Result<Epilogue> {
        if rows == 0 {
            return Ok(ep);
        }
        let ep = match ep {
            _ if !self.fused_epilogues => Epilogue::None,
            Epilogue::GeluBias if !self.gelu_epilogue => Epilogue::Bias,
            e => e,
        };
        let args = GemmArgs {
            x,
            w,
            bias,
            d,
            rows,
            inp,
            out,
            ty,
            ep,
        };
        match &mut self.imp {
            Driver(dev) => dev.gemm(args),
            Emulated(e) => {
                // The GPU's rule for a bias too wide for its bf16 scratch (the epilogue then
                // runs as a kernel); a plan cuBLASLt refuses cannot be known here.
                let ep = if gemm::bias_too_wide(ty, ep, out) {
                    Epilogue::None
                } else {
                    ep
                };
                e.gemm(GemmArgs { ep, ..args }.bias_if_used()).map(|()| ep)
            }
        }
    }

    /// Enables access from this device's context to `peer`'s memory where the topology
    /// allows it (`cuDeviceCanAccessPeer`); returns whether peer access is on. Same context
    /// (two logical devices on one GPU) or an emulated device: nothing to do, `true`.
    pub fn enable_peer_access(&self, peer: &Gpu) -> Result<bool> {
        match (&self.imp, &peer.imp) {
            (Driver(d), Driver(p)) => d.enable_peer_access(p),
            _ => Ok(true),
        }
    }

    /// Copies `regions` (`(dst, src, bytes)`: `dst` in `dst_gpu`'s memory, `src` in this
    /// device's) to another (logical) device, ordered with the compute streams: the copy waits
    /// for the work already enqueued on both, and `dst_gpu`'s later work waits for the copy.
    /// `cuMemcpyPeerAsync` between contexts, a device-to-device copy within one context, a
    /// memcpy between emulated devices. Leaves this device's context current.
    pub fn copy_to_peer(&self, dst_gpu: &Gpu, regions: &[(DevPtr, DevPtr, usize)]) -> Result<()> {
        let bytes: usize = regions.iter().map(|r| r.2).sum();
        PEER_COPY_BYTES.fetch_add(bytes, Ordering::Relaxed);
        match (&self.imp, &dst_gpu.imp) {
            (Driver(d), Driver(p)) => d.copy_to_peer(p, regions),
            (Emulated(e), Emulated(p)) => e.copy_to_peer(p, regions),
            _ => Err(mixed("a copy")),
        }
    }

    /// A mark at the current end of the compute stream (for [`Gpu::compute_wait`] and
    /// [`Gpu::send_to_peer`] on this or another device).
    pub fn mark_compute(&self) -> Result<Mark> {
        Ok(Mark(match &self.imp {
            Driver(d) => MarkImpl::Driver(d.mark_compute()?),
            Emulated(e) => MarkImpl::Emulated(e.mark(false)?),
        }))
    }

    /// Makes this device's compute stream wait until `m` (of any device) is reached.
    pub fn compute_wait(&self, m: &Mark) -> Result<()> {
        match &self.imp {
            Driver(d) => m.driver().map_or(Ok(()), |ev| d.compute_wait(ev)),
            Emulated(e) => e.wait(false, m.emulated()),
        }
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
        PEER_COPY_BYTES.fetch_add(bytes, Ordering::Relaxed);
        match (&self.imp, &dst_gpu.imp) {
            (Driver(d), Driver(p)) => {
                let after: Vec<&DriverEvent> = after.iter().filter_map(|m| m.driver()).collect();
                Ok(Mark(MarkImpl::Driver(d.send_to_peer(p, regions, &after)?)))
            }
            (Emulated(e), Emulated(p)) => {
                for m in after {
                    e.wait(true, m.emulated())?;
                }
                for &(dst, src, bytes) in regions {
                    e.queue_peer_copy(p, dst, src, bytes)?;
                }
                self.mark_copies()
            }
            _ => Err(mixed("a copy")),
        }
    }

    /// A mark at the current end of the copy stream (after every copy queued so far).
    pub fn mark_copies(&self) -> Result<Mark> {
        Ok(Mark(match &self.imp {
            Driver(d) => MarkImpl::Driver(d.mark_copies()?),
            Emulated(e) => MarkImpl::Emulated(e.mark(true)?),
        }))
    }

    /// Waits for every copy [`Gpu::send_to_peer`] queued.
    pub fn sync_copies(&self) -> Result<()> {
        match &self.imp {
            Driver(d) => d.sync_copies(),
            Emulated(e) => e.sync_copies(),
        }
    }

    /// Waits for all work on the stream.
    pub fn sync(&self) -> Result<()> {
        SYNCS.fetch_add(1, Ordering::Relaxed);
        match &self.imp {
            Driver(d) => d.sync(),
            Emulated(e) => e.sync(),
        }
    }

    /// Creates a timing event.
    pub fn event(&self) -> Result<Event> {
        Ok(Event(match &self.imp {
            Driver(d) => EventImpl::Driver(d.event()?),
            Emulated(_) => EventImpl::Emulated(Cell::new(None)),
        }))
    }

    /// Records `ev` on the stream.
    pub fn record(&self, ev: &Event) -> Result<()> {
        match (&self.imp, &ev.0) {
            (Driver(d), EventImpl::Driver(e)) => d.record(e),
            (Emulated(_), EventImpl::Emulated(at)) => {
                at.set(Some(Instant::now()));
                Ok(())
            }
            _ => Err(mixed("an event")),
        }
    }

    /// Milliseconds between two recorded events (waits for `end`).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        match (&self.imp, &start.0, &end.0) {
            (Driver(d), EventImpl::Driver(a), EventImpl::Driver(b)) => d.elapsed_ms(a, b),
            (Emulated(_), EventImpl::Emulated(a), EventImpl::Emulated(b)) => {
                match (a.get(), b.get()) {
                    (Some(a), Some(b)) => Ok((b - a).as_secs_f32() * 1e3),
                    _ => Err(Error::Device(
                        "elapsed time of an event that was not recorded".into(),
                    )),
                }
            }
            _ => Err(mixed("an event")),
        }
    }

    /// Begins capturing the stream into a graph.
    pub fn begin_capture(&self) -> Result<()> {
        match &self.imp {
            Driver(d) => d.begin_capture(),
            Emulated(e) => e.begin_capture(),
        }
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<Graph> {
        Ok(Graph(match &self.imp {
            Driver(d) => GraphImpl::Driver(d.end_capture()?),
            Emulated(e) => GraphImpl::Emulated(e.end_capture()?),
        }))
    }

    /// Ends a capture that failed half-way (errors ignored).
    pub fn abort_capture(&self) {
        match &self.imp {
            Driver(d) => d.abort_capture(),
            Emulated(e) => e.abort_capture(),
        }
    }

    /// Replays `graph` on the stream (counted in [`graph_replays`]).
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        GRAPH_REPLAYS.fetch_add(1, Ordering::Relaxed);
        match (&self.imp, &graph.0) {
            (Driver(d), GraphImpl::Driver(g)) => d.replay(g),
            (Emulated(e), GraphImpl::Emulated(ops)) => e.replay(ops),
            _ => Err(mixed("a graph replay")),
        }
    }
}
