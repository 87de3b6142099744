//! `bench --decode`: milliseconds per block of latent frames for both decoders at their real
//! widths, with random weights generated on the spot (nothing stored), and peak memory.

use super::{CudaDecoder, Decoder, DecoderKind};
use crate::backend::cuda::device::Gpu;
use crate::Result;
use std::time::Instant;

/// One decoder's measurement.
#[derive(Clone, Debug)]
pub struct DecodeBench {
    /// Which decoder.
    pub kind: DecoderKind,
    /// Latent grid height.
    pub latent_h: usize,
    /// Latent grid width.
    pub latent_w: usize,
    /// Latent frames per block.
    pub block_frames: usize,
    /// Milliseconds of the stream's first block (fewer pixel frames, caches filling).
    pub first_block_ms: f64,
    /// Milliseconds per later block (mean), the steady streaming cost; `None` with one block.
    pub block_ms: Option<f64>,
    /// Pixel frames of a steady block.
    pub frames_per_block: usize,
    /// Bytes of causal state a warmed-up stream holds (f32).
    pub state_bytes: usize,
    /// Bytes of weights (f32).
    pub weight_bytes: usize,
    /// Peak resident memory of the process during this decoder's run (Linux `VmHWM`, reset
    /// before the run where the kernel allows), if known.
    pub peak_rss_bytes: Option<usize>,
    /// Rayon threads used.
    pub threads: usize,
}

/// Decodes `blocks` blocks of `block_frames` random latent frames of `latent_h x latent_w`
/// (60 x 104 is 480 x 832 pixels) through each decoder in `kinds`, built at real widths (Wan
/// VAE dim 96, TAEHV 256/128/64/64) with random weights, and times every block.
pub fn bench_decode(
    kinds: &[DecoderKind],
    latent_h: usize,
    latent_w: usize,
    block_frames: usize,
    blocks: usize,
) -> Result<Vec<DecodeBench>> {
    let mut out = Vec::new();
    for &kind in kinds {
        let dim = match kind {
            DecoderKind::WanVae => 96,
            DecoderKind::Taehv => 64,
        };
        let dec = Decoder::synthetic(kind, dim, 1);
        crate::host_memory::ensure(dec.state_bytes(latent_h, latent_w) * 3, || {
            format!("{kind} decode benchmark at {latent_h}x{latent_w} latents")
        })?;
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let mut stream = dec.stream(latent_h, latent_w)?;
        let mut rng = crate::rng::Rng::new(2);
        let per = 16 * latent_h * latent_w * block_frames.max(1);
        let mut times = Vec::new();
        for _ in 0..blocks.max(1) {
            let z: Vec<f32> = (0..per).map(|_| rng.normal()).collect();
            let t = Instant::now();
            let v = stream.push(&z, block_frames.max(1))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(v);
        }
        let steady = &times[1..];
        out.push(DecodeBench {
            kind,
            latent_h,
            latent_w,
            block_frames: block_frames.max(1),
            first_block_ms: times[0],
            block_ms: (!steady.is_empty())
                .then(|| steady.iter().sum::<f64>() / steady.len() as f64),
            frames_per_block: 4 * block_frames.max(1),
            state_bytes: dec.state_bytes(latent_h, latent_w),
            weight_bytes: dec.weight_bytes(),
            peak_rss_bytes: if reset { peak_rss() } else { None },
            threads: rayon::current_num_threads(),
        });
    }
    Ok(out)
}

/// A printable table of [`bench_decode`] results.
pub fn table(results: &[DecodeBench]) -> String {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut s = String::from(
        "decoder  latents   block  first ms  ms/block  frames/block  state MiB  weights MiB  peak RSS MiB  threads\n",
    );
    for r in results {
        s += &format!(
            "{:<8} {:>3}x{:<4} {:>6} {:>9.1} {:>9} {:>13} {:>10.1} {:>12.1} {:>13} {:>8}\n",
            r.kind.to_string(),
            r.latent_h,
            r.latent_w,
            r.block_frames,
            r.first_block_ms,
            r.block_ms.map_or("-".into(), |v| format!("{v:.1}")),
            r.frames_per_block,
            mib(r.state_bytes),
            mib(r.weight_bytes),
            r.peak_rss_bytes
                .map_or("-".into(), |v| format!("{:.1}", mib(v))),
            r.threads
        );
    }
    s
}

/// The process's peak resident set size (`VmHWM`), Linux only.
fn peak_rss() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One decoder's measurement on a CUDA device ([`bench_decode_device`]).
#[derive(Clone, Debug)]
pub struct DeviceDecodeBench {
    /// Which decoder.
    pub kind: DecoderKind,
    /// Milliseconds of the stream's first block (fewer pixel frames, buffers allocated).
    pub first_block_ms: f64,
    /// Milliseconds per later block (mean); `None` with one block.
    pub block_ms: Option<f64>,
    /// Convolution TFLOP of a later block (of the first with one block).
    pub block_tflop: f64,
    /// TFLOP/s of the later blocks (of the first with one block).
    pub tflops: f64,
    /// Bytes of device memory held for activations and causal state.
    pub device_bytes: usize,
}

/// [`bench_decode`] on a CUDA device (`gpu` opens it: the driver, or the emulated device in
/// tests): `blocks` blocks of `block_frames` random latent frames, each timed from upload to the
/// last pixel downloaded (RGB8 only, as a player takes them). `dim`: the decoders' width
/// (`None`: real widths, Wan VAE 96, TAEHV 64).
pub fn bench_decode_device(
    kinds: &[DecoderKind],
    (latent_h, latent_w): (usize, usize),
    (block_frames, blocks): (usize, usize),
    dim: Option<usize>,
    gpu: &dyn Fn() -> Result<Gpu>,
) -> Result<Vec<DeviceDecodeBench>> {
    let mut out = Vec::new();
    let bf = block_frames.max(1);
    for &kind in kinds {
        let d = dim.unwrap_or(match kind {
            DecoderKind::WanVae => 96,
            DecoderKind::Taehv => 64,
        });
        let dec = Decoder::synthetic(kind, d, 1);
        let mut dev = CudaDecoder::new(&dec, gpu()?)?;
        dev.begin(latent_h, latent_w)?;
        let mut rng = crate::rng::Rng::new(2);
        let per = 16 * latent_h * latent_w * bf;
        let mut times = Vec::new();
        let mut flops = Vec::new();
        for _ in 0..blocks.max(1) {
            let z: Vec<f32> = (0..per).map(|_| rng.normal()).collect();
            let f0 = dev.flops();
            let t = Instant::now();
            std::hint::black_box(dev.push(&z, bf, false)?);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            flops.push(dev.flops() - f0);
        }
        let (ms, fl) = if times.len() > 1 {
            let n = (times.len() - 1) as f64;
            (
                times[1..].iter().sum::<f64>() / n,
                flops[1..].iter().sum::<f64>() / n,
            )
        } else {
            (times[0], flops[0])
        };
        out.push(DeviceDecodeBench {
            kind,
            first_block_ms: times[0],
            block_ms: (times.len() > 1).then_some(ms),
            block_tflop: fl / 1e12,
            tflops: fl / 1e12 / (ms / 1e3),
            device_bytes: dev.activation_bytes(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bench_counts_conv_flops_per_pixel() {
        let run = |h: usize, w: usize| {
            let kinds = [DecoderKind::Taehv, DecoderKind::WanVae];
            bench_decode_device(&kinds, (h, w), (1, 2), Some(2), &Gpu::open_emulated).unwrap()
        };
        let (small, large) = (run(2, 2), run(4, 2));
        for (a, b) in small.iter().zip(&large) {
            assert!(a.block_ms.is_some() && a.first_block_ms > 0.0 && a.device_bytes > 0);
            // Every conv is per pixel except the attention's P x P GEMMs (Wan: quadratic).
            let ratio = b.block_tflop / a.block_tflop;
            match a.kind {
                DecoderKind::Taehv => assert!((ratio - 2.0).abs() < 1e-9, "{ratio}"),
                DecoderKind::WanVae => assert!(ratio > 2.0 && ratio < 2.1, "{ratio}"),
            }
        }
    }
}
