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
