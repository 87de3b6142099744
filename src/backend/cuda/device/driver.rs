//! The driver device: one context, two streams, the kernel module loaded from the embedded
//! fatbin, a cuBLASLt handle and workspace, raw device buffers and kernel launches.

use super::gemm::{destroy_plan, GemmPlan, BIAS_BF16_ELEMS, GEMM_WORKSPACE};
use super::probe::{cublaslt_present, probe, probe_driver};
use crate::backend::cuda::dev_types::{DevPtr, Epilogue, OutType};
use crate::kernels::{self, Kernel};
use crate::{Error, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{result as drv, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};

/// A driver error as an [`Error::Device`] naming the call.
pub(super) fn dev_err(what: &'static str) -> impl Fn(drv::DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// A cuBLASLt error as an [`Error::Device`] naming the call.
pub(super) fn lt_err(what: &'static str) -> impl Fn(lt::CublasError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// One GPU: context, streams, kernels, cuBLASLt handle and workspace, allocations.
pub(super) struct DriverDevice {
    pub(super) ctx: sys::CUcontext,
    pub(super) dev: sys::CUdevice,
    /// The stream every launch goes to.
    pub(super) stream: sys::CUstream,
    /// The stream peer copies go to (`Gpu::send_to_peer`), so they overlap the compute
    /// stream; ordered with it by marks only.
    pub(super) copy_stream: sys::CUstream,
    module: sys::CUmodule,
    funcs: HashMap<&'static str, sys::CUfunction>,
    /// Null when the device was opened for kernels only without cuBLASLt
    /// ([`DriverDevice::open`] with `need_gemm = false`): every GEMM is then an error.
    pub(super) lt: ltsys::cublasLtHandle_t,
    pub(super) workspace: DevPtr,
    /// [`BIAS_BF16_ELEMS`] bf16 values: the bias of a fused bf16-output GEMM, converted from
    /// its f32 vector right before the GEMM (cuBLASLt wants the bias in the output's type).
    pub(super) bias_bf16: DevPtr,
    /// cuBLASLt plans by (rows, inp, out, output type, fused epilogue); `None`: cuBLASLt has
    /// no algorithm for that epilogue (the bias / GELU then run as a kernel).
    pub(super) plans: HashMap<(usize, usize, usize, OutType, Epilogue), Option<GemmPlan>>,
    allocs: Vec<DevPtr>,
    /// Pinned memory the per-tick uploads go through ([`DriverDevice::upload_staged`]).
    pub(super) staging: Box<std::cell::RefCell<super::staging::Staging>>,
}

// SAFETY: a `DriverDevice` owns its handles (retained primary context, streams, module,
// cuBLASLt handle, allocations) and none of them is tied to the thread that created it: every
// method that talks to the driver runs in this device's context, which `open` makes current
// and callers re-establish with `Gpu::bind` before using the device on a thread (the CUDA
// backend binds whenever it takes a cached device and before each forward); `Drop` makes the
// context current itself. It is not `Sync`, so moving it to another thread (the process-wide
// weight cache) never shares it between threads.
unsafe impl Send for DriverDevice {}

impl DriverDevice {
    /// Opens device `ordinal`: probes, creates the context and streams, loads the fatbin.
    /// Returns the device and its name. `need_gemm`: cuBLASLt must load (else it is used when
    /// present, and GEMMs fail cleanly without it: kernels alone do not need it).
    pub(super) fn open(ordinal: usize, need_gemm: bool) -> Result<(DriverDevice, String)> {
        let fatbin =
            kernels::fatbin().ok_or_else(|| Error::Unsupported(kernels::NOT_BUILT.into()))?;
        let info = if need_gemm { probe()? } else { probe_driver()? };
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
        // From here on `d` owns every handle: Drop releases what was created if a later step
        // fails (it skips the null ones).
        let mut d = DriverDevice {
            ctx,
            dev,
            stream: std::ptr::null_mut(),
            copy_stream: std::ptr::null_mut(),
            module: std::ptr::null_mut(),
            funcs: HashMap::new(),
            lt: std::ptr::null_mut(),
            workspace: 0,
            bias_bf16: 0,
            plans: HashMap::new(),
            allocs: Vec::new(),
            staging: Default::default(),
        };
        // SAFETY: ctx was just retained.
        unsafe { drv::ctx::set_current(ctx) }.map_err(dev_err("cuCtxSetCurrent"))?;
        d.copy_stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(dev_err("cuStreamCreate"))?;
        d.stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(dev_err("cuStreamCreate"))?;
        d.load_kernels(fatbin)?;
        // cudarc panics when it cannot load cuBLASLt: create the handle only when it loads.
        if need_gemm || cublaslt_present() {
            d.lt = lt::create_handle().map_err(lt_err("cublasLtCreate"))?;
            d.workspace = d.alloc(GEMM_WORKSPACE)?;
            d.bias_bf16 = d.alloc(BIAS_BF16_ELEMS * 2)?;
        }
        Ok((d, name))
    }

    /// Loads the fatbin and looks up every kernel of the library but the emulation-only test
    /// kernel, opting in to large dynamic shared memory where a kernel needs it.
    fn load_kernels(&mut self, fatbin: &'static [u8]) -> Result<()> {
        // SAFETY: the fatbin is 16-byte aligned and lives for the whole program.
        self.module = unsafe { drv::module::load_data(fatbin.as_ptr() as *const c_void) }
            .map_err(|e| {
                Error::Device(format!(
                    "cuModuleLoadData: {e} (the fatbin holds sm_80/sm_90a cubins and compute_80 PTX; an older driver may reject CUDA 13 PTX)"
                ))
            })?;
        for k in Kernel::ALL.into_iter().filter(|&k| k != Kernel::TestSync) {
            let cname = CString::new(k.name())
                .map_err(|_| Error::Internal(format!("kernel name {}", k.name())))?;
            // SAFETY: module is loaded.
            let f = unsafe { drv::module::get_function(self.module, cname) }.map_err(|e| {
                Error::Device(format!("kernel {} not in the fatbin: {e}", k.name()))
            })?;
            let dyn_smem = k.dynamic_smem_bytes();
            if dyn_smem > 0 {
                // Above 48 KB of dynamic shared memory a kernel must opt in.
                // SAFETY: f was just loaded.
                let opt_in = unsafe {
                    drv::function::set_function_attribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dyn_smem as i32,
                    )
                };
                match opt_in {
                    Ok(_) => {}
                    // The sm_90a-only kernels trap elsewhere and are never launched off a
                    // compute capability 9.0 device, where they may want more shared memory
                    // than the device has (sm_86 / sm_89 allow 99 KB): they stay without it.
                    Err(_) if k.sm90a_only() => {
                        self.funcs.insert(k.name(), f);
                        continue;
                    }
                    Err(e) => {
                        return Err(Error::Device(format!(
                            "{} needs {dyn_smem} bytes of shared memory, more than this device allows: {e}",
                            k.name()
                        )))
                    }
                }
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
            self.funcs.insert(k.name(), f);
        }
        Ok(())
    }

    /// Makes this device's context current on the calling thread.
    pub(super) fn bind(&self) -> Result<()> {
        // SAFETY: ctx is retained for the lifetime of self.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(dev_err("cuCtxSetCurrent"))
    }

    /// Debug builds: panics unless this device's context is current on the calling thread.
    /// Launches and GEMMs go to this device's streams, which belong to its context: with
    /// another context current (several devices driven from one thread, a device used on a
    /// thread that never bound it) the driver refuses them or, worse, resolves pointers in the
    /// wrong context. Every launch and GEMM checks this first; release builds skip it.
    pub(super) fn debug_assert_current(&self, what: &str) {
        if cfg!(debug_assertions) {
            let cur = drv::ctx::get_current().ok().flatten();
            assert!(
                cur == Some(self.ctx),
                "{what} on device {} while another CUDA context ({cur:?}) is current: bind() first",
                self.dev
            );
        }
    }

    /// (free, total) device memory in bytes.
    pub(super) fn mem_info(&self) -> Result<(usize, usize)> {
        // This device's numbers, whatever context the caller left current.
        self.bind()?;
        drv::mem_get_info().map_err(dev_err("cuMemGetInfo"))
    }

    /// Allocates `bytes` of device memory, freed with the device.
    pub(super) fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        // On this device, whatever context the caller left current (several devices are
        // driven from one thread).
        self.bind()?;
        // SAFETY: plain allocation in this device's context.
        let p = unsafe { drv::malloc_sync(bytes) }.map_err(|e| {
            // Only the driver's out-of-memory is one: after a kernel fault the context is
            // broken and every call fails with the fault's sticky error (the first GPU run saw
            // an illegal instruction reported as "out of memory", 0 bytes free).
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let free = self.mem_info().map(|m| m.0).unwrap_or(0);
                Error::OutOfMemory(format!(
                    "cuMemAlloc of {bytes} bytes failed ({e}); {free} bytes free on the device"
                ))
            } else {
                Error::Device(format!(
                    "cuMemAlloc of {bytes} bytes failed: {e} (an earlier kernel fault leaves the context unusable)"
                ))
            }
        })?;
        self.allocs.push(p);
        Ok(p)
    }

    /// Frees an allocation made by [`DriverDevice::alloc`] (an unknown pointer is an error).
    pub(super) fn free(&mut self, ptr: DevPtr) -> Result<()> {
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

    /// Copies `src` to device memory at `dst`, asynchronously on the stream.
    pub(super) fn upload<T: Copy>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        // SAFETY: dst was allocated with at least src's size by the caller.
        unsafe { drv::memcpy_htod_async(dst, src, self.stream) }
            .map_err(dev_err("cuMemcpyHtoDAsync"))
    }

    /// Copies device memory at `src` into `dst` and waits for it.
    pub(super) fn download<T: Copy>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        // SAFETY: src holds at least dst's size (caller's contract); synchronised below.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream) }
            .map_err(dev_err("cuMemcpyDtoHAsync"))?;
        self.sync()
    }

    /// Sets `bytes` bytes at `dst` to `value`.
    pub(super) fn memset(&self, dst: DevPtr, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: dst holds `bytes` bytes (caller's contract).
        unsafe { drv::memset_d8_async(dst, value, bytes, self.stream) }
            .map_err(dev_err("cuMemsetD8Async"))
    }

    /// Device-to-device copy of `bytes` bytes.
    pub(super) fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        // SAFETY: both hold `bytes` bytes (caller's contract).
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }
            .map_err(dev_err("cuMemcpyDtoDAsync"))
    }

    /// Launches `kernel` with a params struct passed by value.
    ///
    /// # Safety
    /// As `Gpu::launch`.
    pub(super) unsafe fn launch<P>(
        &self,
        kernel: Kernel,
        grid: [u32; 3],
        block: u32,
        p: &P,
    ) -> Result<()> {
        self.debug_assert_current(kernel.name());
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

    /// The device's compute capability (major, minor), e.g. (9, 0) on a Hopper GPU; (0, 0)
    /// when the driver does not say.
    pub(super) fn compute_capability(&self) -> (i32, i32) {
        use sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
        };
        // SAFETY: valid device.
        let get = |a| unsafe { drv::device::get_attribute(self.dev, a).unwrap_or(0) };
        (get(MAJOR), get(MINOR))
    }

    /// Blocks of `kernel` (with `block` threads and its dynamic shared memory) one SM holds at
    /// once (the driver's occupancy calculator); 0 when the driver does not say. Not a stream
    /// operation: safe inside a graph capture.
    pub(super) fn blocks_per_sm(&self, kernel: Kernel, block: u32) -> i32 {
        let Some(&f) = self.funcs.get(kernel.name()) else {
            return 0;
        };
        // SAFETY: f is a loaded function of this context.
        unsafe {
            drv::occupancy::max_active_block_per_multiprocessor(
                f,
                block as i32,
                kernel.dynamic_smem_bytes() as usize,
            )
        }
        .unwrap_or(0)
    }

    /// Number of streaming multiprocessors (what sizes a persistent grid); 0 when the driver
    /// does not say.
    pub(super) fn sm_count(&self) -> i32 {
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

impl Drop for DriverDevice {
    fn drop(&mut self) {
        // SAFETY: every handle below was created by this struct and is destroyed once; null
        // ones (an `open` that failed part-way) are skipped.
        unsafe {
            let _ = drv::ctx::set_current(self.ctx);
            for s in [self.copy_stream, self.stream] {
                if !s.is_null() {
                    let _ = drv::stream::synchronize(s);
                }
            }
            self.staging.get_mut().free();
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
