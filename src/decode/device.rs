//! Where a decoder runs: the one choice every front end (the CLI, the Rust streams, the C ABI,
//! the web server) makes the same way. By default the decoder runs where the DiT runs: with the
//! CUDA backend on the DiT's first GPU (as the text encoder does), so that only RGB8 frames
//! cross to the host; [`DecodeDevice::Cpu`] keeps the GPU's memory for the DiT.
//!
//! [`super::BackgroundDecoder::spawn_on`] starts a decode thread on either device.
//!
//! A decoder's weights go to a device once: [`Decoder::weights_on`] uploads them for the first
//! stream on that device and hands the same [`DeviceWeights`] to every later stream, session or
//! generation that decodes with the same [`Decoder`] there (the server's, a C ABI engine's, or
//! one a Rust caller shares between streams). Each stream still opens its own device handle
//! (streams, activation pool, causal state).

use super::{CudaDecoder, Decoder, DeviceWeights};
use crate::backend::cuda::device::Gpu;
use crate::config::BackendKind;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A decoder's weights on devices, one [`DeviceWeights`] per device, and how many uploads were
/// made (what the sharing saves, counted for tests and reports).
#[derive(Default)]
pub(super) struct OnDevices {
    weights: Mutex<Vec<Arc<DeviceWeights>>>,
    uploads: AtomicUsize,
}

impl Decoder {
    /// The decoder's weights on `device` (`None` for the CPU): uploaded by the first call for
    /// that device (concurrent first calls wait for the one upload), then the same
    /// [`DeviceWeights`] for every call, until [`Decoder::release_devices`]. Weights that do not
    /// fit are one [`Error::OutOfMemory`] naming the CPU option; a device that cannot be opened
    /// is one [`Error::Device`].
    pub fn weights_on(&self, device: DecodeDevice) -> Result<Option<Arc<DeviceWeights>>> {
        if device == DecodeDevice::Cpu {
            return Ok(None);
        }
        let mut on = self
            .on_devices
            .weights
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(w) = on.iter().find(|w| w.device() == Some(device)) {
            return Ok(Some(w.clone()));
        }
        let Some(gpu) = device.open()? else {
            return Ok(None);
        };
        let what = format!(
            "the {} decoder's weights do not fit on {}",
            self.kind(),
            gpu.name
        );
        let w = Arc::new(DeviceWeights::upload(self, device, gpu).map_err(|e| no_room(e, &what))?);
        self.on_devices.uploads.fetch_add(1, Ordering::Relaxed);
        on.push(w.clone());
        Ok(Some(w))
    }

    /// How many times the weights were uploaded to a device by [`Decoder::weights_on`] (once
    /// per device, however many streams decode there).
    pub fn device_uploads(&self) -> usize {
        self.on_devices.uploads.load(Ordering::Relaxed)
    }

    /// Lets go of the device copies of the weights (each is freed when the last stream using it
    /// ends); the next stream on a device uploads again. For a long-lived decoder whose
    /// device memory is wanted back.
    pub fn release_devices(&self) {
        self.on_devices
            .weights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Decoders loaded for an engine, one per weight file (and the built-in one), so that its
/// sessions share one [`Decoder`], and so its device weights ([`Decoder::weights_on`]). Cheap to
/// clone (the clones share the set).
#[derive(Clone, Default)]
pub struct DecoderSet(Arc<Mutex<Vec<Loaded>>>);

/// A decoder and the file it came from (canonical; `None`: the built-in one).
type Loaded = (Option<PathBuf>, Arc<Decoder>);

impl DecoderSet {
    /// The decoder of the weight file at `path` (`None`: [`Decoder::tiny_taehv`]`(0)`): loaded
    /// by the first call for that file, then shared. A file that cannot be loaded is that
    /// load's error, and nothing is kept.
    pub fn get(&self, path: Option<&Path>) -> Result<Arc<Decoder>> {
        // The same file under another name is the same decoder.
        let key = path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, d)) = set.iter().find(|(k, _)| *k == key) {
            return Ok(d.clone());
        }
        let d = Arc::new(match path {
            Some(p) => Decoder::load(p, None)?,
            None => Decoder::tiny_taehv(0),
        });
        set.push((key, d.clone()));
        Ok(d)
    }
}

/// What every device error says, so that a user without a (big enough) GPU knows the way out.
const CPU_HINT: &str = "decode on the CPU instead: --decoder-device cpu, \
     bc_engine_options.decoder_device = \"cpu\", or DecodeDevice::Cpu";

/// Where a decoder runs its layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeDevice {
    /// The CPU decoders (f32; no GPU memory).
    #[default]
    Cpu,
    /// The device decoder ([`CudaDecoder`]: bf16 kernels, its own streams, RGB8 back to the
    /// host) on CUDA device `ordinal`, or on the emulated device when `emulate`.
    Cuda {
        /// The GPU's ordinal.
        ordinal: usize,
        /// Run on the emulated device (CI without a GPU) instead of GPU `ordinal`.
        emulate: bool,
    },
}

impl DecodeDevice {
    /// The CUDA device beside a DiT on `device_ids` (`--devices`, `bc_engine_options.devices`;
    /// empty: `BC_CUDA_DEVICE` or the session's CUDA options): the DiT's first GPU, emulated
    /// when the CUDA backend is ([`crate::backend::cuda::CudaOptions::emulate`]).
    pub fn cuda_beside(device_ids: &[usize]) -> Self {
        DecodeDevice::Cuda {
            ordinal: crate::backend::cuda::first_device(device_ids),
            emulate: crate::backend::cuda::session_options().emulate,
        }
    }

    /// The default for a generation backend: the decoder runs where the DiT runs.
    pub fn for_backend(backend: BackendKind, device_ids: &[usize]) -> Self {
        match backend {
            BackendKind::Cuda => Self::cuda_beside(device_ids),
            _ => DecodeDevice::Cpu,
        }
    }

    /// Whether this is a device a generation with `o` runs its DiT on (the CUDA backend, the
    /// decoder on one of its GPUs, both emulated or neither): finished blocks can then go to
    /// the decoder without crossing to the host
    /// ([`crate::executor::Generator::hand_off_to`] this device's ordinal).
    pub fn beside_dit(self, o: &crate::GenerateOptions) -> bool {
        let emulated = crate::backend::cuda::session_options().emulate;
        match self {
            DecodeDevice::Cuda { ordinal, emulate } if o.backend == BackendKind::Cuda => {
                emulate == emulated && crate::backend::cuda::dit_devices(o).contains(&ordinal)
            }
            _ => false,
        }
    }

    /// Parses a device name as the CLI, the C ABI and the server take it: `cpu`, or `cuda`
    /// (the GPU of [`DecodeDevice::cuda_beside`]`(device_ids)`).
    pub fn parse(s: &str, device_ids: &[usize]) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(DecodeDevice::Cpu),
            "cuda" => Ok(Self::cuda_beside(device_ids)),
            other => Err(Error::invalid(format!(
                "decoder device {other:?}: expected \"cpu\" or \"cuda\""
            ))),
        }
    }

    /// `cpu` or `cuda` (what [`DecodeDevice::parse`] reads).
    pub fn name(self) -> &'static str {
        match self {
            DecodeDevice::Cpu => "cpu",
            DecodeDevice::Cuda { .. } => "cuda",
        }
    }

    /// Checks, without opening it for compute, that the device can be used: a CUDA device
    /// needs the kernels built in, a driver, and `ordinal` below the device count (not
    /// cuBLASLt). Each failure is one [`Error::Device`] naming the CPU option. For front ends
    /// that want the error when the option is set, not at the first decode.
    pub fn check(self) -> Result<()> {
        match self {
            DecodeDevice::Cuda {
                ordinal,
                emulate: false,
            } => check_cuda(ordinal, crate::kernels::fatbin().is_some(), || {
                crate::backend::cuda::info::probe_driver().map(|p| p.devices)
            }),
            _ => Ok(()),
        }
    }

    /// Opens the device (`None` for the CPU). A GPU that cannot be opened is one
    /// [`Error::Device`] naming the CPU option.
    pub fn open(self) -> Result<Option<Gpu>> {
        match self {
            DecodeDevice::Cpu => Ok(None),
            DecodeDevice::Cuda { emulate: true, .. } => Gpu::open_emulated().map(Some),
            // Kernels only: the decoders need no cuBLASLt.
            DecodeDevice::Cuda { ordinal, .. } => Gpu::open_kernels(ordinal)
                .map(Some)
                .map_err(|e| cannot_open(ordinal, e)),
        }
    }

    /// A decoder on this device over `decoder`'s shared weights ([`Decoder::weights_on`]: the
    /// first one on a device uploads them); `None` for the CPU. Weights that do not fit are one
    /// [`Error::OutOfMemory`] naming the CPU option.
    pub fn open_decoder(self, decoder: &Decoder) -> Result<Option<CudaDecoder>> {
        match decoder.weights_on(self)? {
            Some(w) => CudaDecoder::on(w).map(Some),
            None => Ok(None),
        }
    }
}

/// An out-of-memory error of the device decoder as the user gets it: `what` did not fit, and
/// the CPU option. Other errors pass unchanged.
pub(super) fn no_room(e: Error, what: &str) -> Error {
    match e {
        Error::OutOfMemory(m) => Error::OutOfMemory(format!("{what}: {m} ({CPU_HINT})")),
        other => other,
    }
}

/// [`DecodeDevice::check`] of CUDA device `ordinal`, given whether the kernels were built in
/// and how to count the devices (the driver probe; a stand-in in tests).
fn check_cuda(
    ordinal: usize,
    kernels_built: bool,
    count_devices: impl FnOnce() -> Result<usize>,
) -> Result<()> {
    if !kernels_built {
        return Err(cannot_open(
            ordinal,
            Error::Unsupported(crate::kernels::NOT_BUILT.into()),
        ));
    }
    let n = count_devices().map_err(|e| cannot_open(ordinal, e))?;
    if ordinal >= n {
        return Err(cannot_open(
            ordinal,
            Error::Device(format!("there are only {n} CUDA devices (0..{n})")),
        ));
    }
    Ok(())
}

/// The error of a CUDA device the decoder cannot use.
fn cannot_open(ordinal: usize, e: Error) -> Error {
    let why = match e {
        Error::Device(m) | Error::Unsupported(m) => m,
        other => other.to_string(),
    };
    Error::Device(format!(
        "the decoder cannot run on CUDA device {ordinal}: {why} ({CPU_HINT})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_default_follows_the_backend() {
        for d in [DecodeDevice::Cpu, DecodeDevice::cuda_beside(&[3])] {
            assert_eq!(
                DecodeDevice::parse(d.name(), &[3]).unwrap().name(),
                d.name()
            );
        }
        assert!(matches!(
            DecodeDevice::cuda_beside(&[3, 1]),
            DecodeDevice::Cuda { ordinal: 3, .. }
        ));
        assert_eq!(
            DecodeDevice::for_backend(BackendKind::Cpu, &[]),
            DecodeDevice::Cpu
        );
        assert!(matches!(
            DecodeDevice::for_backend(BackendKind::Cuda, &[2]),
            DecodeDevice::Cuda { ordinal: 2, .. }
        ));
        let e = DecodeDevice::parse("gpu", &[]).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[test]
    fn beside_the_dit_is_any_of_its_gpus_on_the_cuda_backend() {
        let emulate = crate::backend::cuda::session_options().emulate;
        let o = crate::GenerateOptions {
            backend: BackendKind::Cuda,
            devices: 2,
            device_ids: vec![2, 5],
            ..Default::default()
        };
        let gpu = |ordinal, emulate| DecodeDevice::Cuda { ordinal, emulate };
        assert!(gpu(2, emulate).beside_dit(&o));
        assert!(gpu(5, emulate).beside_dit(&o));
        assert!(!gpu(3, emulate).beside_dit(&o));
        assert!(!gpu(2, !emulate).beside_dit(&o), "emulated and real mixed");
        assert!(!DecodeDevice::Cpu.beside_dit(&o));
        let cpu = crate::GenerateOptions {
            backend: BackendKind::Cpu,
            ..o.clone()
        };
        assert!(!gpu(2, emulate).beside_dit(&cpu));
    }

    #[test]
    fn out_of_memory_names_the_cpu_option_and_other_errors_pass() {
        let e = no_room(
            Error::OutOfMemory("cuMemAlloc of 9 bytes".into()),
            "X did not fit",
        );
        assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("X did not fit") && m.contains("cuMemAlloc of 9 bytes"),
            "{m}"
        );
        assert!(m.contains("decoder_device = \"cpu\""), "{m}");
        let e = no_room(Error::Device("launch failed".into()), "X");
        assert_eq!(
            e.to_string(),
            Error::Device("launch failed".into()).to_string()
        );
    }

    #[test]
    fn check_needs_kernels_a_driver_and_the_ordinal_and_names_the_cpu_option() {
        let ok = || Ok(2usize);
        assert!(check_cuda(1, true, ok).is_ok());
        let no_driver = || Err(Error::Device("no CUDA driver found".into()));
        let cases = [
            (check_cuda(0, false, ok), crate::kernels::NOT_BUILT),
            (check_cuda(0, true, no_driver), "no CUDA driver found"),
            (check_cuda(2, true, ok), "only 2 CUDA devices"),
        ];
        for (r, why) in cases {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Device(_)), "{e:?}");
            let m = e.to_string();
            assert!(m.contains(why) && m.contains("CUDA device"), "{m}");
            assert!(m.contains("decoder_device = \"cpu\""), "{m}");
        }
        // Through check itself: the CPU and the emulated device need nothing; a real GPU
        // without the kernels built in (this build, unless nvcc was found) is refused.
        assert!(DecodeDevice::Cpu.check().is_ok());
        let emulated = DecodeDevice::Cuda {
            ordinal: 7,
            emulate: true,
        };
        assert!(emulated.check().is_ok());
        if crate::kernels::fatbin().is_none() {
            let e = DecodeDevice::Cuda {
                ordinal: 0,
                emulate: false,
            }
            .check()
            .unwrap_err();
            assert!(e.to_string().contains(crate::kernels::NOT_BUILT), "{e}");
        }
    }

    #[test]
    fn a_decoder_set_loads_each_file_once() {
        let set = DecoderSet::default();
        let a = set.get(None).unwrap();
        assert!(Arc::ptr_eq(&a, &set.clone().get(None).unwrap()));
        let dir = std::env::temp_dir().join(format!("bc-decoder-set-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("taehv.safetensors");
        let t = super::super::taehv::synthetic([8, 4, 2, 2], 16, 1);
        let named: Vec<(&str, Vec<usize>, &[f32])> = t
            .iter()
            .map(|(n, s, d)| (n.as_str(), s.clone(), d.as_slice()))
            .collect();
        crate::tensorfile::write_f32(&file, &named, &Default::default()).unwrap();
        let b = set.get(Some(&file)).unwrap();
        // The same file by another name is the same decoder.
        let other = dir.join(".").join("taehv.safetensors");
        assert!(Arc::ptr_eq(&b, &set.get(Some(&other)).unwrap()));
        assert!(!Arc::ptr_eq(&a, &b));
        // A file that cannot be loaded is its error, and is not kept.
        let missing = dir.join("missing.safetensors");
        assert!(set.get(Some(&missing)).is_err());
        assert!(set.get(Some(&missing)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_gpu_that_cannot_be_opened_is_one_device_error_naming_the_cpu() {
        // Far past any machine's devices: on a GPU machine too, the open fails.
        let d = DecodeDevice::Cuda {
            ordinal: 4000,
            emulate: false,
        };
        let e = d.open().map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::Device(_)), "{e:?}");
        assert!(e.to_string().contains("decoder_device"), "{e}");
        assert!(e.to_string().contains("CUDA device 4000"), "{e}");
    }
}
