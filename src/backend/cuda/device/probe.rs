//! Probing the driver and cuBLASLt, and listing the devices (without opening them).

use super::driver::dev_err;
use crate::{Error, Result};
use cudarc::cublaslt::sys as ltsys;
use cudarc::driver::{result as drv, sys};

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
/// initialises and that there is at least one device; returns what was found. What the CUDA
/// backend needs ([`probe_driver`] is enough for kernels alone).
pub fn probe() -> Result<ProbeInfo> {
    let info = probe_driver()?;
    if !cublaslt_present() {
        return Err(Error::Device(
            "cuBLASLt not found (libcublasLt.so.13): install CUDA 13 or `pip install nvidia-cublas` and add its lib folder to LD_LIBRARY_PATH".into(),
        ));
    }
    Ok(info)
}

/// Whether libcublasLt can be loaded (without panicking). Only GEMMs need it: kernels launch
/// without it ([`super::Gpu::open_kernels`]).
pub fn cublaslt_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { ltsys::is_culib_present() }
}

/// [`probe`] without cuBLASLt: libcuda loads, the driver initialises, a device exists.
pub fn probe_driver() -> Result<ProbeInfo> {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Device(
            "no CUDA driver found (libcuda.so): install the NVIDIA driver or add its folder to LD_LIBRARY_PATH".into(),
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

/// The driver's CUDA version (`cuDriverGetVersion`: 13000 for 13.0), after [`probe_driver`].
pub fn driver_version() -> Result<i32> {
    probe_driver()?;
    let mut driver = 0i32;
    // SAFETY: an out pointer; the driver library is loaded (probe_driver succeeded).
    unsafe { sys::cuDriverGetVersion(&mut driver) }
        .result()
        .map_err(|e| Error::Device(format!("cuDriverGetVersion failed: {e}")))?;
    Ok(driver)
}

/// The CUDA libraries this process loaded: per library (libcuda, then cuBLASLt) a line with
/// the file the loader mapped (from `/proc/self/maps`, after [`probe_driver`] and, when
/// present, a cuBLASLt call have loaded them) and its version (`cuDriverGetVersion`,
/// `cublasLtGetVersion`), or why it is missing. What the GPU bundle's summary shows, so that a
/// run against the wrong cuBLASLt (not `.so.13`) is visible.
pub fn libraries_report() -> Vec<String> {
    let mut out = Vec::new();
    let cuda = match driver_version() {
        Ok(driver) => format!("driver API {}.{}", driver / 1000, driver % 1000 / 10),
        Err(e) => e.to_string(),
    };
    let lt = if cublaslt_present() {
        // SAFETY: the library loads (checked above); a plain query without arguments.
        let v = unsafe { ltsys::cublasLtGetVersion() };
        format!("version {}.{}.{}", v / 10000, v % 10000 / 100, v % 100)
    } else {
        "not found: GEMMs and the backend need it, kernel tests run without it".into()
    };
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for (name, what, info) in [
        ("libcuda", "libcuda.so", cuda),
        ("cuBLASLt", "libcublasLt.so", lt),
    ] {
        let mut paths: Vec<&str> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with(what)))
            .collect();
        paths.dedup();
        let path = if paths.is_empty() {
            "not loaded".to_string()
        } else {
            paths.join(", ")
        };
        out.push(format!("{name}: {path} ({info})"));
    }
    out
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
    let info = probe_driver()?;
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
pub(super) fn pci_bus_id(dev: sys::CUdevice) -> String {
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
