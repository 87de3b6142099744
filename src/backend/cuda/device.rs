//! The device layer of the CUDA backend: probing the driver and cuBLASLt, one context and
//! stream, the kernel module loaded from the embedded fatbin, raw device buffers, kernel
//! launches with the `params.h` structs, cuBLASLt GEMMs and CUDA graphs.
//!
//! Everything goes through `cudarc`'s `result`/`sys` layers (driver API, dynamic loading):
//! cudarc panics when a library cannot be loaded, so [`probe`] must succeed before anything
//! else here is called.

use super::emu_device::{EmuDevice, EmuOp, GemmArgs};
use crate::kernels::{self, emu::Kernel};
use crate::{Error, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{result as drv, sys};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::time::Instant;

/// A device pointer.
pub type DevPtr = u64;

/// What [`probe`] found.
#[derive(Clone, Debug)]
pub struct ProbeInfo {
    /// Number of CUDA devices.
    pub devices: usize,
    /// Name of device 0.
    pub name: String,
    /// Compute capability of device 0.
    pub capability: (i32, i32),
    /// Total memory of device 0 in bytes.
    pub total_mem: usize,
}

/// Checks, without panicking, that libcuda and libcublasLt can be loaded, that the driver
/// initialises and that there is at least one device; returns what was found.
pub fn probe() -> Result<ProbeInfo> {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Device(
            "no CUDA driver found (libcuda.so): install the NVIDIA driver or add its folder to LD_LIBRARY_PATH".into(),
        ));
    }
    // SAFETY: as above.
    if !unsafe { ltsys::is_culib_present() } {
        return Err(Error::Device(
            "cuBLASLt not found (libcublasLt.so.13): install CUDA 13 or `pip install nvidia-cublas` and add its lib folder to LD_LIBRARY_PATH".into(),
        ));
    }
    drv::init().map_err(|e| Error::Device(format!("cuInit failed: {e}")))?;
    let n = drv::device::get_count()
        .map_err(|e| Error::Device(format!("cuDeviceGetCount failed: {e}")))?;
    if n <= 0 {
        return Err(Error::Device("no CUDA device found".into()));
    }
    let dev = drv::device::get(0).map_err(dev_err("cuDeviceGet"))?;
    let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
    // SAFETY: `dev` is a valid device handle.
    let (maj, min, total) = unsafe {
        (
            drv::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .unwrap_or(0),
            drv::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            )
            .unwrap_or(0),
            drv::device::total_mem(dev).unwrap_or(0),
        )
    };
    Ok(ProbeInfo {
        devices: n as usize,
        name,
        capability: (maj, min),
        total_mem: total,
    })
}

/// One CUDA device as [`list_devices`] reports it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Ordinal.
    pub ordinal: usize,
    /// Name.
    pub name: String,
    /// Total memory in bytes.
    pub total_mem: usize,
    /// Compute capability.
    pub capability: (i32, i32),
    /// PCI bus id (`cuDeviceGetPCIBusId`, e.g. `0000:3b:00.0`; empty when unknown).
    pub pci_bus_id: String,
}

/// Every CUDA device and, per ordered pair `(a, b)`, whether `a` can access `b`'s memory
/// (`cuDeviceCanAccessPeer`; the diagonal is `true`). A clean error without a driver.
pub fn list_devices() -> Result<(Vec<DeviceInfo>, Vec<Vec<bool>>)> {
    let info = probe()?;
    let mut devs = Vec::with_capacity(info.devices);
    let mut handles = Vec::with_capacity(info.devices);
    for i in 0..info.devices {
        let dev = drv::device::get(i as i32).map_err(dev_err("cuDeviceGet"))?;
        let attr = |a| {
            // SAFETY: valid device handle.
            unsafe { drv::device::get_attribute(dev, a) }.unwrap_or(0)
        };
        devs.push(DeviceInfo {
            ordinal: i,
            name: drv::device::get_name(dev).unwrap_or_else(|_| "unknown".into()),
            // SAFETY: valid device handle.
            total_mem: unsafe { drv::device::total_mem(dev) }.unwrap_or(0),
            capability: (
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            ),
            pci_bus_id: pci_bus_id(dev),
        });
        handles.push(dev);
    }
    let mut peer = vec![vec![true; handles.len()]; handles.len()];
    for (a, &da) in handles.iter().enumerate() {
        for (b, &db) in handles.iter().enumerate() {
            if a != b {
                let mut can = 0i32;
                // SAFETY: valid device handles and an out pointer.
                unsafe { sys::cuDeviceCanAccessPeer(&mut can, da, db) }
                    .result()
                    .map_err(dev_err("cuDeviceCanAccessPeer"))?;
                peer[a][b] = can != 0;
            }
        }
    }
    Ok((devs, peer))
}

/// The PCI bus id of `dev` (empty when the driver does not say).
fn pci_bus_id(dev: sys::CUdevice) -> String {
    let mut buf = [0 as std::ffi::c_char; 64];
    // SAFETY: a buffer of the length passed and a valid device handle.
    let rc = unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev) };
    if rc != sys::CUresult::CUDA_SUCCESS {
        return String::new();
    }
    // SAFETY: the driver wrote a NUL-terminated string into `buf` (its last byte stays 0).
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn dev_err(what: &'static str) -> impl Fn(drv::DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

fn lt_err(what: &'static str) -> impl Fn(lt::CublasError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// Output type of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    /// bf16 output.
    Bf16,
    /// f32 output.
    F32,
}

/// Epilogue of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `y = x W^T` (the bias pointer is ignored).
    None,
    /// `y = x W^T + b`.
    Bias,
    /// `y = GELU_tanh(x W^T + b)`.
    GeluBias,
}

struct GemmPlan {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    d: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

/// Whether the environment variable `k` is set to something other than empty or `0` (how
/// every `BC_*` switch is read).
pub fn env_flag(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Destroys a plan's cuBLASLt handles (null ones skipped).
fn destroy_plan(p: &GemmPlan) {
    // SAFETY: every non-null handle was created for this plan and is destroyed once (plans
    // are destroyed when dropped from `Gpu::plans` or when their construction fails).
    unsafe {
        for l in [p.a, p.b, p.d] {
            if !l.is_null() {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
        if !p.desc.is_null() {
            let _ = lt::destroy_matmul_desc(p.desc);
        }
    }
}

/// Size of the cuBLASLt workspace.
pub const GEMM_WORKSPACE: usize = 32 << 20;

/// GEMM shapes whose fused cuBLASLt epilogue had no algorithm (bias / GELU run as a kernel).
static UNFUSED_GEMM_SHAPES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times (per device and GEMM shape, in this process) a fused cuBLASLt epilogue
/// could not be planned (no algorithm, or the bias type / epilogue refused), so that shape runs
/// its bias and/or GELU as a separate kernel.
pub fn unfused_gemm_shapes() -> usize {
    UNFUSED_GEMM_SHAPES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Bytes copied between (logical) devices in this process.
static PEER_COPY_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many bytes [`Gpu::copy_to_peer`] has copied between devices in this process (real or
/// emulated), so tests and benchmarks can see what an exchange moves.
pub fn peer_copy_bytes() -> usize {
    PEER_COPY_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Graph launches in this process (every device), so tests can tell that graphs are used.
static GRAPH_REPLAYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many captured graphs have been launched in this process, on every device (real or
/// emulated).
pub fn graph_replays() -> usize {
    GRAPH_REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
}

/// One device: context, stream, kernels, cuBLASLt handle and workspace.
pub struct Gpu {
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
    /// The stream every launch goes to.
    pub stream: sys::CUstream,
    /// The stream peer copies go to ([`Gpu::send_to_peer`]), so they overlap the compute
    /// stream; ordered with it by [`Mark`]s only.
    copy_stream: sys::CUstream,
    module: sys::CUmodule,
    funcs: HashMap<&'static str, sys::CUfunction>,
    lt: ltsys::cublasLtHandle_t,
    workspace: DevPtr,
    /// cuBLASLt plans by (rows, inp, out, output type, fused epilogue); `None`: cuBLASLt has
    /// no algorithm for that epilogue (the bias / GELU then run as a kernel).
    plans: HashMap<(usize, usize, usize, OutType, Epilogue), Option<GemmPlan>>,
    /// The device's name.
    pub name: String,
    /// Whether cuBLASLt's GELU epilogue is used (`BC_NO_GELU_EPILOGUE=1`: bias epilogue, then
    /// the activation kernel).
    pub gelu_epilogue: bool,
    /// Whether GEMM epilogues are fused at all (`BC_NO_GEMM_EPILOGUE=1`: plain GEMMs, bias
    /// and GELU by the activation kernel; also what happens per shape when cuBLASLt has no
    /// algorithm for the fused epilogue).
    pub fused_epilogues: bool,
    allocs: Vec<DevPtr>,
    /// Set on an emulated device (every method then runs on the host, see `emu_device`).
    emu: Option<Box<EmuDevice>>,
}

// SAFETY: a `Gpu` owns its handles (retained primary context, stream, module, cuBLASLt
// handle, allocations) and none of them is tied to the thread that created it: every method
// that talks to the driver runs in this device's context, which `Gpu::open` makes current and
// callers re-establish with `Gpu::bind` before using the device on a thread (the CUDA backend
// binds whenever it takes a cached device and before each forward); `Drop` makes the context
// current itself. The emulated device's `RefCell` is only borrowed through `&self` methods,
// and `Gpu` is not `Sync`, so moving a `Gpu` to another thread (the process-wide weight cache
// of `super`) never shares it between threads.
unsafe impl Send for Gpu {}

impl Gpu {
    /// An emulated device: host memory, kernels under the SIMT emulation layer, CPU GEMMs,
    /// recorded graphs. No driver or GPU needed.
    pub fn open_emulated() -> Result<Gpu> {
        Ok(Gpu {
            ctx: std::ptr::null_mut(),
            dev: 0,
            stream: std::ptr::null_mut(),
            copy_stream: std::ptr::null_mut(),
            module: std::ptr::null_mut(),
            funcs: HashMap::new(),
            lt: std::ptr::null_mut(),
            workspace: 0,
            plans: HashMap::new(),
            name: "emulated device (SIMT emulation on the CPU)".into(),
            gelu_epilogue: !env_flag("BC_NO_GELU_EPILOGUE"),
            fused_epilogues: !env_flag("BC_NO_GEMM_EPILOGUE"),
            allocs: Vec::new(),
            emu: Some(Box::new(EmuDevice::new())),
        })
    }

    /// True for an emulated device.
    pub fn is_emulated(&self) -> bool {
        self.emu.is_some()
    }

    /// Opens device `ordinal`: probes, creates the context and stream, loads the fatbin.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let fatbin =
            kernels::fatbin().ok_or_else(|| Error::Unsupported(kernels::NOT_BUILT.into()))?;
        let info = probe()?;
        if ordinal >= info.devices {
            return Err(Error::Device(format!(
                "device {ordinal} requested but only {} CUDA device(s) found",
                info.devices
            )));
        }
        let dev = drv::device::get(ordinal as i32).map_err(dev_err("cuDeviceGet"))?;
        let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
        // SAFETY: valid device; the primary context is released in Drop.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(dev_err("cuDevicePrimaryCtxRetain"))?;
        // From here on `gpu` owns every handle: Drop releases what was created if a later
        // step fails (it skips the null ones).
        let mut gpu = Gpu {
            ctx,
            dev,
            stream: std::ptr::null_mut(),
            copy_stream: std::ptr::null_mut(),
            module: std::ptr::null_mut(),
            funcs: HashMap::new(),
            lt: std::ptr::null_mut(),
            workspace: 0,
            plans: HashMap::new(),
            name,
            gelu_epilogue: !env_flag("BC_NO_GELU_EPILOGUE"),
            fused_epilogues: !env_flag("BC_NO_GEMM_EPILOGUE"),
            allocs: Vec::new(),
            emu: None,
        };
        // SAFETY: ctx was just retained.
        unsafe { drv::ctx::set_current(ctx) }.map_err(dev_err("cuCtxSetCurrent"))?;
        gpu.copy_stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(dev_err("cuStreamCreate"))?;
        gpu.stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(dev_err("cuStreamCreate"))?;
        // SAFETY: the fatbin is 16-byte aligned and lives for the whole program.
        gpu.module = unsafe { drv::module::load_data(fatbin.as_ptr() as *const c_void) }
            .map_err(|e| {
                Error::Device(format!(
                    "cuModuleLoadData: {e} (the fatbin holds sm_80/sm_90a cubins and compute_80 PTX; an older driver may reject CUDA 13 PTX)"
                ))
            })?;
        // Every kernel of the library but the emulation-only test kernel.
        for k in Kernel::ALL.into_iter().filter(|&k| k != Kernel::TestSync) {
            let cname = CString::new(k.name())
                .map_err(|_| Error::Internal(format!("kernel name {}", k.name())))?;
            // SAFETY: module is loaded.
            let f = unsafe { drv::module::get_function(gpu.module, cname) }.map_err(|e| {
                Error::Device(format!("kernel {} not in the fatbin: {e}", k.name()))
            })?;
            let dyn_smem = k.dynamic_smem_bytes();
            if dyn_smem > 0 {
                // Above 48 KB of dynamic shared memory a kernel must opt in.
                // SAFETY: f was just loaded.
                unsafe {
                    drv::function::set_function_attribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dyn_smem as i32,
                    )
                }
                .map_err(|e| {
                    Error::Device(format!(
                        "{} needs {dyn_smem} bytes of shared memory, more than this device allows: {e}",
                        k.name()
                    ))
                })?;
                // Prefer the largest shared-memory carveout, so that two such blocks fit on an
                // SM where the chip allows it (a hint: the driver may still choose otherwise).
                // SAFETY: as above.
                let _ = unsafe {
                    drv::function::set_function_attribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                        100,
                    )
                };
            }
            gpu.funcs.insert(k.name(), f);
        }
        gpu.lt = lt::create_handle().map_err(lt_err("cublasLtCreate"))?;
        gpu.workspace = gpu.alloc(GEMM_WORKSPACE)?;
        Ok(gpu)
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        if self.emu.is_some() {
            return Ok(());
        }
        // SAFETY: ctx is retained for the lifetime of self.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(dev_err("cuCtxSetCurrent"))
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        if let Some(e) = &self.emu {
            return Ok(e.mem_info());
        }
        // This device's numbers, whatever context the caller left current.
        self.bind()?;
        drv::mem_get_info().map_err(dev_err("cuMemGetInfo"))
    }

    /// Allocates `bytes` (rounded up to 256) of device memory, freed with the device.
    pub fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        let bytes = bytes.max(1).div_ceil(256) * 256;
        if let Some(e) = &mut self.emu {
            return e.alloc(bytes);
        }
        // On this device, whatever context the caller left current (several devices are
        // driven from one thread).
        self.bind()?;
        // SAFETY: plain allocation in this device's context.
        let p = unsafe { drv::malloc_sync(bytes) }.map_err(|e| {
            let free = self.mem_info().map(|m| m.0).unwrap_or(0);
            Error::OutOfMemory(format!(
                "cuMemAlloc of {bytes} bytes failed ({e}); {free} bytes free on the device"
            ))
        })?;
        self.allocs.push(p);
        Ok(p)
    }

    /// Frees an allocation made by [`Gpu::alloc`] (the caller makes sure no work still in
    /// flight uses it, e.g. by [`Gpu::sync`], and that no graph that captured it is replayed
    /// again). An unknown pointer is an error and frees nothing.
    pub fn free(&mut self, ptr: DevPtr) -> Result<()> {
        if let Some(e) = &mut self.emu {
            return e.free(ptr);
        }
        let i =
            self.allocs.iter().position(|&p| p == ptr).ok_or_else(|| {
                Error::Internal(format!("free of unknown device pointer {ptr:#x}"))
            })?;
        self.allocs.swap_remove(i);
        self.bind()?;
        // SAFETY: `ptr` came from cuMemAlloc on this context (it was in `allocs`, removed
        // above, so it is freed exactly once).
        unsafe { drv::free_sync(ptr) }.map_err(dev_err("cuMemFree"))
    }

    /// Copies `src` to device memory at `dst` (asynchronous on the stream; `src` must stay
    /// alive until the next [`Gpu::sync`]).
    pub fn upload<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        if let Some(e) = &self.emu {
            return e.upload(dst, src);
        }
        // SAFETY: dst was allocated with at least src's size by the caller.
        unsafe { drv::memcpy_htod_async(dst, src, self.stream) }
            .map_err(dev_err("cuMemcpyHtoDAsync"))
    }

    /// Copies device memory at `src` into `dst` and waits for it.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        if let Some(e) = &self.emu {
            return e.download(dst, src);
        }
        // SAFETY: src holds at least dst's size (caller's contract); synchronised below.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream) }
            .map_err(dev_err("cuMemcpyDtoHAsync"))?;
        self.sync()
    }

    /// Sets `bytes` bytes at `dst` to `value`.
    pub fn memset(&self, dst: DevPtr, value: u8, bytes: usize) -> Result<()> {
        if let Some(e) = &self.emu {
            return e.memset(dst, value, bytes);
        }
        // SAFETY: dst holds `bytes` bytes (caller's contract).
        unsafe { drv::memset_d8_async(dst, value, bytes, self.stream) }
            .map_err(dev_err("cuMemsetD8Async"))
    }

    /// Device-to-device copy of `bytes` bytes.
    pub fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        if let Some(e) = &self.emu {
            return e.copy(dst, src, bytes);
        }
        // SAFETY: both hold `bytes` bytes (caller's contract).
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }
            .map_err(dev_err("cuMemcpyDtoDAsync"))
    }

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

    fn mark_on(&self, stream: sys::CUstream) -> Result<Mark> {
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
        if let Some(e) = &self.emu {
            return e.launch(kernel, grid, block, p);
        }
        let f = *self
            .funcs
            .get(kernel.name())
            .ok_or_else(|| Error::Internal(format!("kernel {} was not loaded", kernel.name())))?;
        let mut args = [p as *const P as *mut c_void];
        drv::launch_kernel(
            f,
            (grid[0], grid[1], grid[2]),
            (block, 1, 1),
            kernel.dynamic_smem_bytes(),
            self.stream,
            &mut args,
        )
        .map_err(|e| Error::Device(format!("launching {}: {e}", kernel.name())))
    }

    /// `d[rows, out] = epilogue(x[rows, inp] . w[out, inp]^T + bias[out])`, x and w bf16
    /// row-major, bias f32, f32 accumulation; d bf16 or f32 with row stride `out`.
    ///
    /// The bias (and GELU) are fused into cuBLASLt's epilogue where it has an algorithm for
    /// it; otherwise (or with `BC_NO_GEMM_EPILOGUE=1` / `BC_NO_GELU_EPILOGUE=1`) the GEMM runs
    /// plain and `bc_activation` adds the bias and applies the GELU in place, so a missing
    /// cuBLASLt feature costs one pass over `d`, not the run. A shape whose fused plan fails
    /// is remembered (counted in [`unfused_gemm_shapes`]); plans are made on the first call of
    /// a shape, which is always an eager warm-up launch, never inside a graph capture.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
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
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let gelu = ep == Epilogue::GeluBias;
        let mut fused = match ep {
            _ if !self.fused_epilogues => Epilogue::None,
            Epilogue::GeluBias if !self.gelu_epilogue => Epilogue::Bias,
            e => e,
        };
        // Without an algorithm for GELU+bias try bias alone, then a plain GEMM.
        while fused != Epilogue::None
            && self.emu.is_none()
            && self.plan_for(rows, inp, out, ty, fused)?.is_none()
        {
            fused = match fused {
                Epilogue::GeluBias => Epilogue::Bias,
                _ => Epilogue::None,
            };
        }
        self.matmul(GemmArgs {
            x,
            w,
            bias,
            d,
            rows,
            inp,
            out,
            ty,
            ep: fused,
        })?;
        let add_bias = fused == Epilogue::None && ep != Epilogue::None;
        let act = gelu && fused != Epilogue::GeluBias;
        if add_bias || act {
            let op = if act {
                crate::kernels::params::BC_ACT_GELU_TANH
            } else {
                crate::kernels::params::BC_ACT_NONE
            };
            let b = if add_bias { bias } else { 0 };
            super::ops::bias_activation(self, d, b, out, rows * out, op, ty == OutType::Bf16)?;
        }
        Ok(())
    }

    /// The plan of a GEMM shape with a fused epilogue (made on first use; `None` when
    /// cuBLASLt has no algorithm for it). Plain GEMMs (`Epilogue::None`) must have one.
    fn plan_for(
        &mut self,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        ep: Epilogue,
    ) -> Result<Option<&GemmPlan>> {
        let key = (rows, inp, out, ty, ep);
        if !self.plans.contains_key(&key) {
            let plan = match self.plan(rows, inp, out, ty, ep) {
                Ok(p) => Some(p),
                Err(e) if ep != Epilogue::None => {
                    UNFUSED_GEMM_SHAPES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if std::env::var_os("BC_CUDA_VERBOSE").is_some() {
                        eprintln!("{e}; running the epilogue as a kernel");
                    }
                    None
                }
                Err(e) => return Err(e),
            };
            self.plans.insert(key, plan);
        }
        Ok(self.plans.get(&key).and_then(Option::as_ref))
    }

    /// One cuBLASLt matmul with epilogue `a.ep` (its plan must exist for a fused epilogue),
    /// or the emulated GEMM.
    fn matmul(&mut self, a: GemmArgs) -> Result<()> {
        let bias = if a.ep == Epilogue::None { 0 } else { a.bias };
        if let Some(e) = &self.emu {
            return e.gemm(GemmArgs { bias, ..a });
        }
        let GemmArgs {
            x,
            w,
            d,
            rows,
            inp,
            out,
            ty,
            ep,
            ..
        } = a;
        if (x | w | d) % 16 != 0 {
            return Err(Error::Internal(format!(
                "GEMM operands must be 16-byte aligned (x {x:#x}, w {w:#x}, d {d:#x})"
            )));
        }
        let (lt_handle, workspace, stream) = (self.lt, self.workspace, self.stream);
        let p = self.plan_for(rows, inp, out, ty, ep)?.ok_or_else(|| {
            Error::Internal(format!(
                "no cuBLASLt plan for [{rows}x{inp}]x[{inp}x{out}] {ep:?}"
            ))
        })?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the layouts describe x, w, d as the caller promised; the bias pointer is
        // set per call.
        unsafe {
            if ep != Epilogue::None {
                let bp = bias as *const c_void;
                lt::set_matmul_desc_attribute(
                    p.desc,
                    ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bp as *const _ as *const c_void,
                    std::mem::size_of::<*const c_void>(),
                )
                .map_err(lt_err("cublasLtMatmulDescSetAttribute(bias)"))?;
            }
            lt::matmul(
                lt_handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                p.a,
                x as *const c_void,
                p.b,
                d as *const c_void,
                p.d,
                d as *mut c_void,
                p.d,
                &p.algo,
                workspace as *mut c_void,
                GEMM_WORKSPACE,
                stream as ltsys::cudaStream_t,
            )
            .map_err(|e| Error::Device(format!("cublasLtMatmul [{rows}x{inp}]x[{inp}x{out}]: {e}")))
        }
    }

    fn plan(
        &self,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        ep: Epilogue,
    ) -> Result<GemmPlan> {
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        use ltsys::cudaDataType_t as T;
        let dt = match ty {
            OutType::Bf16 => T::CUDA_R_16BF,
            OutType::F32 => T::CUDA_R_32F,
        };
        // Column-major view: D[out, rows] = W^T(op T of [inp, out]) . X[inp, rows].
        let desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            T::CUDA_R_32F,
        )
        .map_err(lt_err("cublasLtMatmulDescCreate"))?;
        // From here on the handles are owned by `plan` and destroyed by `destroy_plan` on
        // every error path.
        let mut plan = GemmPlan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: ltsys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let res = (|| -> Result<()> {
            plan.a = lt::create_matrix_layout(T::CUDA_R_16BF, inp as u64, out as u64, inp as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            plan.b = lt::create_matrix_layout(T::CUDA_R_16BF, inp as u64, rows as u64, inp as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            plan.d = lt::create_matrix_layout(dt, out as u64, rows as u64, out as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
            let trans: i32 = 1; // CUBLAS_OP_T
            let epi = match ep {
                Epilogue::None => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
                Epilogue::Bias => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                Epilogue::GeluBias => ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
            };
            let bias_ty = T::CUDA_R_32F;
            // SAFETY: valid descriptors, attribute buffers of the documented sizes.
            unsafe {
                let set = |attr: A, p: *const c_void, n: usize| {
                    lt::set_matmul_desc_attribute(desc, attr, p, n)
                        .map_err(lt_err("cublasLtMatmulDescSetAttribute"))
                };
                set(
                    A::CUBLASLT_MATMUL_DESC_TRANSA,
                    &trans as *const i32 as *const c_void,
                    4,
                )?;
                set(
                    A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const _ as *const c_void,
                    std::mem::size_of_val(&epi),
                )?;
                if ep != Epilogue::None {
                    set(
                        A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                        &bias_ty as *const _ as *const c_void,
                        std::mem::size_of_val(&bias_ty),
                    )?;
                }
                let pref =
                    lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
                let ws = GEMM_WORKSPACE as u64;
                let h = lt::set_matmul_pref_attribute(
                    pref,
                    ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )
                .map_err(lt_err("cublasLtMatmulPreferenceSetAttribute"))
                .and_then(|_| {
                    // Operands are row ranges of larger buffers: 16-byte aligned (rows of a
                    // multiple of 8 bf16), not the 256 bytes cuBLASLt assumes by default.
                    use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
                    let align: u32 = 16;
                    for attr in [
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    ] {
                        lt::set_matmul_pref_attribute(
                            pref,
                            attr,
                            &align as *const u32 as *const c_void,
                            4,
                        )
                        .map_err(lt_err("cublasLtMatmulPreferenceSetAttribute(alignment)"))?;
                    }
                    Ok(())
                })
                .and_then(|_| {
                    lt::get_matmul_algo_heuristic(self.lt, desc, plan.a, plan.b, plan.d, plan.d, pref)
                        .map_err(|e| {
                            Error::Device(format!(
                                "cuBLASLt has no algorithm for bf16 [{rows}x{inp}]x[{inp}x{out}] -> {ty:?} with {ep:?} epilogue: {e}"
                            ))
                        })
                });
                let _ = lt::destroy_matmul_pref(pref);
                plan.algo = h?.algo;
            }
            Ok(())
        })();
        match res {
            Ok(()) => Ok(plan),
            Err(e) => {
                destroy_plan(&plan);
                Err(e)
            }
        }
    }

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

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> i32 {
        if self.emu.is_some() {
            return 1;
        }
        // SAFETY: valid device.
        unsafe {
            drv::device::get_attribute(
                self.dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(0)
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.emu.is_some() {
            return; // host memory is freed with the EmuDevice
        }
        // SAFETY: every handle below was created by this struct and is destroyed once; null
        // ones (an `open` that failed part-way) are skipped.
        unsafe {
            let _ = drv::ctx::set_current(self.ctx);
            for s in [self.copy_stream, self.stream] {
                if !s.is_null() {
                    let _ = drv::stream::synchronize(s);
                }
            }
            for (_, p) in self.plans.drain() {
                if let Some(p) = p {
                    destroy_plan(&p);
                }
            }
            if !self.lt.is_null() {
                let _ = lt::destroy_handle(self.lt);
            }
            for p in self.allocs.drain(..) {
                let _ = drv::free_sync(p);
            }
            if !self.module.is_null() {
                let _ = drv::module::unload(self.module);
            }
            for s in [self.copy_stream, self.stream] {
                if !s.is_null() {
                    let _ = drv::stream::destroy(s);
                }
            }
            let _ = drv::primary_ctx::release(self.dev);
        }
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

/// A point on a device's compute or copy stream that other streams (of any device) can wait
/// for: [`Gpu::mark_compute`], [`Gpu::send_to_peer`], [`Gpu::compute_wait`].
pub struct Mark {
    e: sys::CUevent,
    /// The point on an emulated stream (see `emu_device::StreamOrder`).
    emu: super::emu_device::EmuMark,
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
