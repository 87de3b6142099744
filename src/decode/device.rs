//! Where a decoder runs: the one choice every front end (the CLI, the Rust streams, the C ABI,
//! the web server) makes the same way. By default the decoder runs where the DiT runs: with the
//! CUDA backend on the DiT's first GPU (as the text encoder does), so that only RGB8 frames
//! cross to the host; [`DecodeDevice::Cpu`] keeps the GPU's memory for the DiT.
//!
//! [`super::BackgroundDecoder::spawn_on`] starts a decode thread on either device.

use super::{CudaDecoder, Decoder};
use crate::backend::cuda::device::Gpu;
use crate::config::BackendKind;
use crate::{Error, Result};

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
    /// needs a driver and the kernels (not cuBLASLt). No GPU is one [`Error::Device`] naming the
    /// CPU option. For front ends that want the error when the option is set, not at the first
    /// decode.
    pub fn check(self) -> Result<()> {
        match self {
            DecodeDevice::Cuda {
                ordinal,
                emulate: false,
            } => crate::backend::cuda::info::probe_driver()
                .map(|_| ())
                .map_err(|e| cannot_open(ordinal, e)),
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

    /// Opens the device and uploads `decoder` to it ([`CudaDecoder::new`]); `None` for the
    /// CPU. Weights that do not fit are one [`Error::OutOfMemory`] naming the CPU option.
    pub fn open_decoder(self, decoder: &Decoder) -> Result<Option<CudaDecoder>> {
        let Some(gpu) = self.open()? else {
            return Ok(None);
        };
        let what = format!(
            "the {} decoder's weights do not fit on {}",
            decoder.kind(),
            gpu.name
        );
        CudaDecoder::new(decoder, gpu)
            .map(Some)
            .map_err(|e| no_room(e, &what))
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
