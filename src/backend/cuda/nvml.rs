//! How CUDA devices are connected (NVLink or PCIe, and how far apart on PCIe), from NVML
//! (`libnvidia-ml.so.1`, part of the NVIDIA driver), loaded at run time like libcuda: a
//! machine without it gets [`LinkKind::Unknown`] and a reason, never a panic.
//!
//! Per pair of devices: `nvmlDeviceGetP2PStatus(.., NVLINK)` says whether they reach each
//! other over NVLink (directly or through NVSwitches); otherwise
//! `nvmlDeviceGetTopologyCommonAncestor` says where their PCIe paths meet. Devices are matched
//! by PCI bus id (CUDA ordinals and NVML indices may be ordered differently).

use std::ffi::{c_char, c_int, c_uint, c_void, CString};

/// Where two devices' PCIe paths meet (`nvmlGpuTopologyLevel_t`), nearest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcieLevel {
    /// Same board (multi-GPU card).
    Board,
    /// One PCIe switch.
    Switch,
    /// Several PCIe switches, no host bridge.
    Switches,
    /// The same host bridge.
    HostBridge,
    /// Host bridges of one NUMA node.
    Node,
    /// Across NUMA nodes (the CPUs' interconnect).
    System,
}

/// How two devices are connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// The same physical device (`--devices 0,0`).
    Same,
    /// NVLink (directly or through NVSwitches).
    NvLink,
    /// PCIe only.
    Pcie(PcieLevel),
    /// NVML could not tell (the reason).
    Unknown(String),
}

impl LinkKind {
    /// Short description for `info --devices`.
    pub fn describe(&self) -> String {
        match self {
            LinkKind::Same => "same GPU".into(),
            LinkKind::NvLink => "NVLink".into(),
            LinkKind::Pcie(l) => format!(
                "PCIe ({})",
                match l {
                    PcieLevel::Board => "same board",
                    PcieLevel::Switch => "one PCIe switch",
                    PcieLevel::Switches => "several PCIe switches",
                    PcieLevel::HostBridge => "same host bridge",
                    PcieLevel::Node => "same NUMA node, across host bridges",
                    PcieLevel::System => "across NUMA nodes",
                }
            ),
            LinkKind::Unknown(why) => format!("unknown ({why})"),
        }
    }
}

/// `nvmlGpuTopologyLevel_t` to [`PcieLevel`] (`None` for a value NVML added later).
pub fn pcie_level(nvml_level: c_int) -> Option<PcieLevel> {
    Some(match nvml_level {
        0 => PcieLevel::Board,
        10 => PcieLevel::Switch,
        20 => PcieLevel::Switches,
        30 => PcieLevel::HostBridge,
        40 => PcieLevel::Node,
        50 => PcieLevel::System,
        _ => return None,
    })
}

/// The link between two devices from what NVML reported: the NVLink P2P status (`0`: OK)
/// and the common PCIe ancestor level, each `None` when the query failed.
pub fn classify(nvlink_status: Option<c_int>, level: Option<c_int>) -> LinkKind {
    if nvlink_status == Some(0) {
        return LinkKind::NvLink;
    }
    match level {
        Some(l) => match pcie_level(l) {
            Some(p) => LinkKind::Pcie(p),
            None => LinkKind::Unknown(format!("NVML topology level {l}")),
        },
        None => LinkKind::Unknown("NVML topology query failed".into()),
    }
}

type Handle = *mut c_void;
type InitFn = unsafe extern "C" fn() -> c_int;
type ByBusIdFn = unsafe extern "C" fn(*const c_char, *mut Handle) -> c_int;
type AncestorFn = unsafe extern "C" fn(Handle, Handle, *mut c_int) -> c_int;
type P2pFn = unsafe extern "C" fn(Handle, Handle, c_int, *mut c_int) -> c_int;
type NvLinkStateFn = unsafe extern "C" fn(Handle, c_uint, *mut c_int) -> c_int;

/// `NVML_P2P_CAPS_INDEX_NVLINK`.
const P2P_CAPS_NVLINK: c_int = 2;
/// `NVML_NVLINK_MAX_LINKS` (Hopper: 18).
const MAX_NVLINKS: c_uint = 18;

/// An initialised NVML (shut down on drop).
pub struct Nvml {
    lib: libloading::Library,
    /// `nvmlInit_v2` succeeded (so `nvmlShutdown` is due on drop).
    initialised: bool,
}

impl Nvml {
    /// Loads and initialises NVML from the driver (`libnvidia-ml.so.1`).
    pub fn load() -> Result<Nvml, String> {
        let mut last = String::new();
        for name in ["libnvidia-ml.so.1", "libnvidia-ml.so"] {
            match Nvml::load_from(name) {
                Ok(n) => return Ok(n),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Loads and initialises NVML from the library `path`.
    pub fn load_from(path: &str) -> Result<Nvml, String> {
        // SAFETY: loading the NVIDIA management library runs no initialisers with
        // preconditions; a wrong library fails the symbol lookups below.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("NVML not available ({path}: {e})"))?;
        let mut nvml = Nvml {
            lib,
            initialised: false,
        };
        // SAFETY: `nvmlInit_v2` takes no arguments.
        let rc = unsafe { nvml.sym::<InitFn>("nvmlInit_v2")?() };
        if rc != 0 {
            return Err(format!("nvmlInit_v2 failed (NVML error {rc})"));
        }
        nvml.initialised = true;
        Ok(nvml)
    }

    fn sym<T: Copy>(&self, name: &str) -> Result<T, String> {
        // SAFETY: each caller names the symbol with its documented C signature `T`.
        unsafe { self.lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("NVML has no {name}: {e}"))
    }

    fn handle(&self, bus_id: &str) -> Result<Handle, String> {
        let f = self.sym::<ByBusIdFn>("nvmlDeviceGetHandleByPciBusId_v2")?;
        let c = CString::new(bus_id).map_err(|_| format!("bad PCI bus id {bus_id:?}"))?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: a NUL-terminated string and an out pointer.
        let rc = unsafe { f(c.as_ptr(), &mut h) };
        if rc != 0 || h.is_null() {
            return Err(format!(
                "NVML does not know PCI device {bus_id} (error {rc})"
            ));
        }
        Ok(h)
    }

    /// Number of active NVLinks of the device at `bus_id` (0 without NVLink).
    pub fn active_nvlinks(&self, bus_id: &str) -> Result<u32, String> {
        let h = self.handle(bus_id)?;
        let f = self.sym::<NvLinkStateFn>("nvmlDeviceGetNvLinkState")?;
        let mut n = 0;
        for link in 0..MAX_NVLINKS {
            let mut on: c_int = 0;
            // SAFETY: a device handle from NVML and an out pointer; links past the device's
            // count return an error, which counts as inactive.
            if unsafe { f(h, link, &mut on) } == 0 && on == 1 {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The link between the devices at PCI bus ids `a` and `b`.
    pub fn link(&self, a: &str, b: &str) -> LinkKind {
        let (ha, hb) = match (self.handle(a), self.handle(b)) {
            (Ok(ha), Ok(hb)) => (ha, hb),
            (Err(e), _) | (_, Err(e)) => return LinkKind::Unknown(e),
        };
        if ha == hb {
            return LinkKind::Same;
        }
        let p2p = self
            .sym::<P2pFn>("nvmlDeviceGetP2PStatus")
            .ok()
            .and_then(|f| {
                let mut st: c_int = -1;
                // SAFETY: device handles from NVML and an out pointer.
                (unsafe { f(ha, hb, P2P_CAPS_NVLINK, &mut st) } == 0).then_some(st)
            });
        let level = self
            .sym::<AncestorFn>("nvmlDeviceGetTopologyCommonAncestor")
            .ok()
            .and_then(|f| {
                let mut l: c_int = -1;
                // SAFETY: device handles from NVML and an out pointer.
                (unsafe { f(ha, hb, &mut l) } == 0).then_some(l)
            });
        classify(p2p, level)
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        if !self.initialised {
            return;
        }
        if let Ok(f) = self.sym::<InitFn>("nvmlShutdown") {
            // SAFETY: NVML was initialised by `load_from`; `nvmlShutdown` takes no arguments.
            unsafe { f() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvlink_wins_over_pcie_and_levels_map_in_order() {
        assert_eq!(classify(Some(0), Some(50)), LinkKind::NvLink);
        assert_eq!(
            classify(Some(5), Some(10)),
            LinkKind::Pcie(PcieLevel::Switch)
        );
        assert_eq!(classify(None, Some(50)), LinkKind::Pcie(PcieLevel::System));
        assert!(matches!(classify(None, None), LinkKind::Unknown(_)));
        assert!(matches!(classify(Some(3), Some(35)), LinkKind::Unknown(_)));
        let levels: Vec<_> = [0, 10, 20, 30, 40, 50]
            .into_iter()
            .map(|l| pcie_level(l).unwrap())
            .collect();
        let mut sorted = levels.clone();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            6,
            "every NVML level maps to its own PcieLevel"
        );
        assert!(LinkKind::Pcie(PcieLevel::Node).describe().contains("NUMA"));
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        let err = Nvml::load_from("libnvidia-ml-does-not-exist.so.1")
            .err()
            .expect("loading a missing library must fail");
        assert!(err.contains("NVML not available"), "{err}");
    }
}
