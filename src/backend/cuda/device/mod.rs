//! The device layer of the CUDA backend: probing the driver and cuBLASLt, one context and
//! stream, the kernel module loaded from the embedded fatbin, raw device buffers, kernel
//! launches with the `params.h` structs (`probe`, `gemm`, `streams`, `graph` hold the rest:
//! probing, cuBLASLt GEMMs, streams / events / peer copies, CUDA graphs).
//!
//! Everything goes through `cudarc`'s `result`/`sys` layers (driver API, dynamic loading):
//! cudarc panics when a library cannot be loaded, so [`probe`] must succeed before anything
//! else here is called.

use super::emu_device::{EmuDevice, EmuOp, GemmArgs};
use crate::kernels::{self, Kernel};
use crate::{Error, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{result as drv, sys};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::time::Instant;

mod gemm;
mod graph;
mod probe;
mod streams;

pub use super::dev_types::{DevPtr, Epilogue, OutType};
use gemm::{destroy_plan, GemmPlan};
pub use gemm::{unfused_gemm_shapes, GEMM_WORKSPACE};
pub use graph::{graph_replays, Graph};
pub use probe::{list_devices, probe, DeviceInfo, ProbeInfo};
pub use streams::{peer_copy_bytes, Event, Mark};

fn dev_err(what: &'static str) -> impl Fn(drv::DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

fn lt_err(what: &'static str) -> impl Fn(lt::CublasError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// Whether the environment variable `k` is set to something other than empty or `0` (how
/// every `BC_*` switch is read).
pub fn env_flag(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0")
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
