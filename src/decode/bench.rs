//! `bench --decode`: milliseconds per block of latent frames for both decoders at their real
//! widths, with random weights generated on the spot (nothing stored), and peak memory.

use super::conv::{Conv, Path, Src};
use super::{CudaDecoder, Decoder, DecoderKind, KernelTime};
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
    /// CPU milliseconds (all threads of the process) per later block (mean): the figure
    /// that survives a machine shared with other jobs; `None` with one block or where the
    /// process CPU time is unknown (not Linux).
    pub cpu_block_ms: Option<f64>,
    /// Pixel frames of a steady block.
    pub frames_per_block: usize,
    /// TFLOP of the convolutions (and attention products) of a steady block, as run
    /// ([`Decoder::conv_flops`]: the upsample convs in the parity form unless
    /// `BC_CONV_PARITY=0`).
    pub block_tflop: f64,
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
        let mut cpu = Vec::new();
        for _ in 0..blocks.max(1) {
            let z: Vec<f32> = (0..per).map(|_| rng.normal()).collect();
            let (t, c) = (Instant::now(), process_cpu_ms());
            let v = stream.push(&z, block_frames.max(1))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            cpu.push(process_cpu_ms().zip(c).map(|(b, a)| b - a));
            std::hint::black_box(v);
        }
        let steady = &times[1..];
        let steady_cpu: Option<Vec<f64>> = cpu[1..].iter().copied().collect();
        out.push(DecodeBench {
            kind,
            latent_h,
            latent_w,
            block_frames: block_frames.max(1),
            first_block_ms: times[0],
            block_ms: (!steady.is_empty())
                .then(|| steady.iter().sum::<f64>() / steady.len() as f64),
            cpu_block_ms: steady_cpu
                .filter(|c| !c.is_empty())
                .map(|c| c.iter().sum::<f64>() / c.len() as f64),
            frames_per_block: 4 * block_frames.max(1),
            block_tflop: dec.conv_flops(latent_h, latent_w) * block_frames.max(1) as f64 / 1e12,
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
        "decoder  latents   block  first ms  ms/block  cpu ms/block  frames/block  TFLOP/block  state MiB  weights MiB  peak RSS MiB  threads\n",
    );
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    for r in results {
        s += &format!(
            "{:<8} {:>3}x{:<4} {:>6} {:>9.1} {:>9} {:>13} {:>13} {:>12.4} {:>10.1} {:>12.1} {:>13} {:>8}\n",
            r.kind.to_string(),
            r.latent_h,
            r.latent_w,
            r.block_frames,
            r.first_block_ms,
            opt(r.block_ms),
            opt(r.cpu_block_ms),
            r.frames_per_block,
            r.block_tflop,
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

/// CPU time used so far by all threads of this process, in milliseconds, if known:
/// `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`, nanosecond resolution (a block that takes a few
/// milliseconds is measured, not rounded to the 10 ms ticks of `/proc/self/stat`).
#[cfg(unix)]
pub(crate) fn process_cpu_ms() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant of the platform.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (r == 0).then_some(ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6)
}

/// No process CPU clock off Unix.
#[cfg(not(unix))]
pub(crate) fn process_cpu_ms() -> Option<f64> {
    None
}

/// One convolution shape of the decoders, for [`bench_conv`].
#[derive(Clone, Debug)]
pub struct ConvShape {
    /// Where the shape occurs.
    pub name: &'static str,
    /// Input channels of one source.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Sources (time taps that meet a frame): 3 for a warm causal conv3d, 2 for a MemBlock's
    /// `cat[x, past]`, 1 otherwise.
    pub sources: usize,
    /// Spatial kernel size (1 or 3).
    pub k: usize,
    /// Output frame height.
    pub h: usize,
    /// Output frame width.
    pub w: usize,
    /// The (one) source is read through a nearest 2x upsample (half of `h x w`): `Some(true)`
    /// in the sub-pixel (parity) form, `Some(false)` dense; `None`: no upsample.
    pub up: Option<bool>,
}

impl ConvShape {
    /// Floating-point operations of one output frame as run (the parity form: 2x2 taps per
    /// output pixel).
    pub fn flop(&self) -> f64 {
        let taps = if self.up == Some(true) {
            4
        } else {
            self.k * self.k
        };
        2.0 * (self.cout * self.cin * self.sources * taps * self.h * self.w) as f64
    }
}

/// The convolution shapes that carry the decoders' work at 480x832 (TAEHV at 256/128/64
/// channels, the Wan VAE at 384/192/96), at the resolution they run at, except the Wan VAE's
/// two finest levels, taken at half that size (same per-pixel kernel, a quarter of the time).
pub fn decoder_conv_shapes() -> Vec<ConvShape> {
    let s = |name, cin, cout, sources, k, h, w| ConvShape {
        name,
        cin,
        cout,
        sources,
        k,
        h,
        w,
        up: None,
    };
    let up = |name, cin, cout, h, w, parity| ConvShape {
        up: Some(parity),
        ..s(name, cin, cout, 1, 3, h, w)
    };
    vec![
        up("taehv up 128->64 @240x416", 128, 64, 240, 416, false),
        up("taehv up 128->64 @240x416 par", 128, 64, 240, 416, true),
        up("wan up 384->192 @240x416", 384, 192, 240, 416, false),
        up("wan up 384->192 @240x416 par", 384, 192, 240, 416, true),
        s("taehv mem 256 @60x104", 256, 256, 2, 3, 60, 104),
        s("taehv mem 128 @120x208", 128, 128, 2, 3, 120, 208),
        s("taehv mem 64 @240x416", 64, 64, 2, 3, 240, 416),
        s("taehv tgrow 1x1 128 @120x208", 128, 256, 1, 1, 120, 208),
        s("wan res 384 @60x104", 384, 384, 3, 3, 60, 104),
        s("wan res 192 @120x208", 192, 192, 3, 3, 120, 208),
        s("wan res 96 @240x416", 96, 96, 3, 3, 240, 416),
        s("wan head 96->3 @240x416", 96, 3, 3, 3, 240, 416),
    ]
}

/// GFLOP/s of one output frame of each shape with random weights, best of `reps` runs (all
/// rayon threads): `(shape, fast path, portable path)`. The fast path is the AVX-512 kernel
/// where the CPU has it (otherwise both columns measure the portable path).
pub fn bench_conv(shapes: &[ConvShape], reps: usize) -> Vec<(ConvShape, f64, f64)> {
    let mut rng = crate::rng::Rng::new(3);
    let mut v = |n: usize| (0..n).map(|_| rng.normal() * 0.1).collect::<Vec<f32>>();
    shapes
        .iter()
        .map(|sh| {
            let wt = v(sh.cout * sh.cin * sh.sources * sh.k * sh.k);
            let mut conv = Conv::from_torch(
                &wt,
                &[sh.cout, sh.cin, sh.sources, sh.k, sh.k],
                Some(v(sh.cout)),
            );
            if sh.up == Some(true) {
                conv = conv.with_parity();
            }
            let px = if sh.up.is_some() {
                (sh.h / 2) * (sh.w / 2)
            } else {
                sh.h * sh.w
            };
            let frames: Vec<Vec<f32>> = (0..sh.sources).map(|_| v(sh.cin * px)).collect();
            let job: Vec<Src> = frames
                .iter()
                .enumerate()
                .map(|(t, f)| Src {
                    up: sh.up.is_some(),
                    ..Src::new(f, t, sh.cin)
                })
                .collect();
            let rate = |path: Path| {
                let mut best = f64::INFINITY;
                for _ in 0..reps.max(1) {
                    let t = Instant::now();
                    let out =
                        conv.forward_with(std::slice::from_ref(&job), &[], true, sh.h, sh.w, path);
                    best = best.min(t.elapsed().as_secs_f64());
                    std::hint::black_box(out);
                }
                sh.flop() / best / 1e9
            };
            (sh.clone(), rate(Path::Best), rate(Path::Portable))
        })
        .collect()
}

/// A printable table of [`bench_conv`] results (GFLOP as run; `par`: the parity form of an
/// upsample conv, to compare with the dense row above it).
pub fn conv_table(results: &[(ConvShape, f64, f64)]) -> String {
    let mut s = format!(
        "threads {}, GFLOP/s of one output frame\n{:<30} {:>6} {:>9} {:>10} {:>9} {:>10} {:>15}\n",
        rayon::current_num_threads(),
        "shape",
        "GFLOP",
        "sources",
        "cin->cout",
        "kernel",
        "kernel ms",
        "matrixmultiply"
    );
    for (sh, fast, port) in results {
        s += &format!(
            "{:<30} {:>6.1} {:>9} {:>10} {:>9.1} {:>10.1} {:>15.1}\n",
            sh.name,
            sh.flop() / 1e9,
            sh.sources,
            format!("{}->{}", sh.cin, sh.cout),
            fast,
            sh.flop() / fast / 1e6,
            port
        );
    }
    s
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
    /// The block's cost as counted by `CudaDecoder::measure_block` (launches, copies and
    /// memsets of its walks and latent inputs, the pool it needs), for the walk timed.
    pub cost: super::BlockCost,
}

/// [`bench_decode`] on a CUDA device (`gpu` opens it: the driver, or the emulated device in
/// tests): `blocks` blocks of `block_frames` random latent frames, each timed from upload to the
/// last pixel downloaded (RGB8 only, as a player takes them). `dim`: the decoders' width
/// (`None`: real widths, Wan VAE 96, TAEHV 64). `wgmma`: convolutions that fit it on the
/// Hopper `bc_conv_wgmma` (refused on a device without wgmma), else on `bc_conv`; `tma` (with
/// `wgmma`): those over plain sources (and the parity-form upsample convs) on its TMA variant
/// `bc_conv_wgmma_tma`; `ws` (with `wgmma`): the others on its warp-specialized variant
/// `bc_conv_wgmma_ws` (`CudaDecoder::set_conv_ws`); `parity`: the upsample convs in the
/// sub-pixel (parity) form, else dense (`CudaDecoder::set_conv_parity`); `batch`: the block
/// walk (every layer one launch over
/// all of a block's frames), else one latent frame at a time
/// (`CudaDecoder::set_frame_batching`); `halo` (with `wgmma`): the convolutions that fit it on
/// the persistent halo conv `bc_conv_halo_n64` (`CudaDecoder::set_conv_halo`).
pub fn bench_decode_device(
    kinds: &[DecoderKind],
    (latent_h, latent_w): (usize, usize),
    (block_frames, blocks): (usize, usize),
    dim: Option<usize>,
    (wgmma, tma, ws, parity, batch, halo): (bool, bool, bool, bool, bool, bool),
    gpu: &dyn Fn() -> Result<Gpu>,
) -> Result<Vec<DeviceDecodeBench>> {
    let mut out = Vec::new();
    let bf = block_frames.max(1);
    for &kind in kinds {
        let mut dev = device_decoder(kind, dim, (wgmma, tma, ws, parity, batch, halo), gpu)?;
        let cost = dev.measure_block(latent_h, latent_w, bf)?;
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
            cost,
        });
    }
    Ok(out)
}

/// A decoder of `kind` at width `dim` (`None`: the real one) with random weights on the device
/// `gpu` opens, its kernels chosen as [`bench_decode_device`]'s flags say.
fn device_decoder(
    kind: DecoderKind,
    dim: Option<usize>,
    (wgmma, tma, ws, parity, batch, halo): (bool, bool, bool, bool, bool, bool),
    gpu: &dyn Fn() -> Result<Gpu>,
) -> Result<CudaDecoder> {
    let d = dim.unwrap_or(match kind {
        DecoderKind::WanVae => 96,
        DecoderKind::Taehv => 64,
    });
    let dec = Decoder::synthetic(kind, d, 1);
    let mut dev = CudaDecoder::new(&dec, gpu()?)?;
    dev.set_conv_wgmma(wgmma)?;
    dev.set_conv_tma(wgmma && tma)?;
    dev.set_conv_ws(wgmma && ws)?;
    dev.set_conv_halo(wgmma && halo)?;
    dev.set_conv_parity(parity)?;
    dev.set_frame_batching(batch)?;
    Ok(dev)
}

/// Where a steady block's device time goes ([`profile_decode_device`]).
#[derive(Clone, Debug)]
pub struct DecodeProfile {
    /// Which decoder.
    pub kind: DecoderKind,
    /// Milliseconds of the profiled block, from upload to the last pixel downloaded, run
    /// eagerly with events between the launches (a little slower than a graph replay).
    pub block_ms: f64,
    /// Device time per kernel and grid, longest first ([`super::by_kernel`] sums the grids).
    pub kernels: Vec<KernelTime>,
}

/// The device time of every launch, copy and memset of one steady block of `block_frames`
/// random latent frames ([`CudaDecoder::set_profiling`]), after two blocks that fill the causal
/// state and the pool; the decoder and its flags as in [`bench_decode_device`].
pub fn profile_decode_device(
    kind: DecoderKind,
    (latent_h, latent_w): (usize, usize),
    block_frames: usize,
    dim: Option<usize>,
    flags: (bool, bool, bool, bool, bool, bool),
    gpu: &dyn Fn() -> Result<Gpu>,
) -> Result<DecodeProfile> {
    let mut dev = device_decoder(kind, dim, flags, gpu)?;
    dev.set_profiling(true)?;
    dev.begin(latent_h, latent_w)?;
    let bf = block_frames.max(1);
    let mut rng = crate::rng::Rng::new(3);
    let mut block = || -> Vec<f32> {
        (0..16 * latent_h * latent_w * bf)
            .map(|_| rng.normal())
            .collect()
    };
    for _ in 0..2 {
        dev.push(&block(), bf, false)?;
    }
    dev.take_profile()?;
    let z = block();
    let t = Instant::now();
    std::hint::black_box(dev.push(&z, bf, false)?);
    let block_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(DecodeProfile {
        kind,
        block_ms,
        kernels: dev.take_profile()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::by_kernel;

    #[cfg(unix)]
    #[test]
    fn process_cpu_time_is_finer_than_proc_ticks() {
        let a = process_cpu_ms().unwrap();
        // Spin until the clock moves (other tests' threads count too, so no bound on the step).
        let mut b = a;
        let mut x = 0u64;
        while b == a {
            for i in 0..1000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            std::hint::black_box(x);
            b = process_cpu_ms().unwrap();
        }
        assert!(b > a, "{a} -> {b}");
        // 10 ms ticks would give multiples of 10 ms only.
        assert!(
            a % 10.0 != 0.0 || b % 10.0 != 0.0,
            "{a} and {b}: tick resolution"
        );
    }

    #[test]
    fn a_profiled_block_times_each_submission_of_its_walks() {
        let flags = (false, false, false, true, true, false);
        for kind in [DecoderKind::Taehv, DecoderKind::WanVae] {
            let p = profile_decode_device(kind, (2, 3), 2, Some(2), flags, &Gpu::open_emulated)
                .unwrap();
            let mut dev = device_decoder(kind, Some(2), flags, &Gpu::open_emulated).unwrap();
            let cost = dev.measure_block(2, 3, 2).unwrap();
            let launches: u64 = p.kernels.iter().map(|k| k.launches).sum();
            // Every launch, copy and memset of the walks and latent inputs, and the copy of
            // each walk's pixels into the block's buffer (which a measured block leaves out).
            assert_eq!(
                launches,
                cost.submissions + cost.walks as u64,
                "{kind:?}: {cost:?}, {:?}",
                p.kernels
            );
            assert!(p
                .kernels
                .iter()
                .any(|k| k.name.starts_with("bc_conv") && k.ms > 0.0));
            assert!(p.kernels.iter().all(|k| k.launches > 0 && k.ms >= 0.0));
            assert!(
                p.kernels.windows(2).all(|w| w[0].ms >= w[1].ms),
                "longest first"
            );
            let total: f64 = p.kernels.iter().map(|k| k.ms).sum();
            assert!(
                total > 0.0 && total <= p.block_ms,
                "{total} of {}",
                p.block_ms
            );
            // Summed over grids: the same launches and time, one entry per kernel.
            let sums = by_kernel(&p.kernels);
            assert_eq!(sums.iter().map(|k| k.launches).sum::<u64>(), launches);
            assert!((sums.iter().map(|k| k.ms).sum::<f64>() - total).abs() < 1e-9);
            let mut names: Vec<_> = sums.iter().map(|k| k.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), sums.len());
            assert!(sums.len() < p.kernels.len(), "several grids of a kernel");
            // Without profiling nothing is recorded.
            dev.begin(2, 3).unwrap();
            dev.push(&vec![0.5; 16 * 6 * 2], 2, false).unwrap();
            assert!(dev.take_profile().unwrap().is_empty());
        }
    }

    #[test]
    fn device_bench_counts_conv_flops_per_pixel() {
        let run = |h: usize, w: usize, parity: bool| {
            let kinds = [DecoderKind::Taehv, DecoderKind::WanVae];
            bench_decode_device(
                &kinds,
                (h, w),
                (1, 2),
                Some(2),
                (false, false, false, parity, true, false),
                &Gpu::open_emulated,
            )
            .unwrap()
        };
        let (small, large) = (run(2, 2, true), run(4, 2, true));
        // The parity form launches fewer FLOPs (its upsample convs: 4 taps per pixel, not 9).
        for (a, d) in small.iter().zip(run(2, 2, false)) {
            assert!(a.block_tflop < d.block_tflop, "{:?}", a.kind);
        }
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
