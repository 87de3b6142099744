//! CUDA facts for the front ends (the CLI and the C ABI): whether the driver and cuBLASLt can
//! be loaded, the devices, peer access and the links between them. Nothing here opens a
//! device for compute.

pub use super::device::{
    cublaslt_present, libraries_report, list_devices, probe, probe_driver, DeviceInfo, ProbeInfo,
};
pub use super::nvml::{LinkKind, Nvml};
use crate::Result;

/// A report of the CUDA libraries loaded and their versions ([`libraries_report`]), then the
/// devices, one line each (name, memory, compute capability, PCI bus, active NVLinks from NVML
/// when the driver has it), then peer access (`cuDeviceCanAccessPeer`) and the link type
/// between every ordered pair. What `blockcascade info --devices` prints.
pub fn devices_report() -> Result<String> {
    let (devs, peer) = list_devices()?;
    let nvml = Nvml::load();
    let mut out = libraries_report();
    for d in &devs {
        let nvlinks = match &nvml {
            Ok(n) => match n.active_nvlinks(&d.pci_bus_id) {
                Ok(0) => ", no active NVLink".to_string(),
                Ok(k) => format!(", {k} active NVLinks"),
                Err(_) => String::new(),
            },
            Err(_) => String::new(),
        };
        out.push(format!(
            "device {}: {}, {:.1} GiB, compute capability {}.{}, PCI {}{nvlinks}",
            d.ordinal,
            d.name,
            d.total_mem as f64 / (1u64 << 30) as f64,
            d.capability.0,
            d.capability.1,
            if d.pci_bus_id.is_empty() {
                "unknown"
            } else {
                &d.pci_bus_id
            },
        ));
    }
    if let Err(e) = &nvml {
        out.push(format!("link types unknown: {e}"));
    }
    for (a, row) in peer.iter().enumerate() {
        for (b, &can) in row.iter().enumerate().filter(|&(b, _)| b != a) {
            let link = match &nvml {
                Ok(n) => n.link(&devs[a].pci_bus_id, &devs[b].pci_bus_id),
                Err(_) => LinkKind::Unknown("no NVML".into()),
            };
            out.push(format!(
                "peer access {a} -> {b}: {}, link: {}",
                if can { "yes" } else { "no" },
                link.describe()
            ));
        }
    }
    if devs.len() == 1 {
        out.push("one device: `--devices 0,0` runs two logical devices on it".into());
    }
    Ok(out.into_iter().map(|l| l + "\n").collect())
}
