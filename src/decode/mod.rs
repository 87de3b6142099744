//! Latents to pixels: the Wan2.1 VAE decoder and the TAEHV tiny decoder, on the CPU, whole
//! videos or streamed block by block.
//!
//! [`Decoder::load`] reads either decoder from a safetensors file with the upstream tensor
//! names (sizes come from the shapes; f32, bf16 and f16 are accepted). [`Decoder::stream`]
//! starts a [`DecodeStream`] that takes the DiT's finished blocks of latent frames one after
//! the other and returns their pixel frames at once, carrying only the decoders' causal state
//! between blocks (bounded; it does not grow with the stream). Joining the blocks' frames gives
//! the same video as [`Decoder::decode`] of all the latents at once. The math, the caches and
//! their sizes are described in docs/decoders.md.
//!
//! On a GPU, [`CudaDecoder`] runs both decoders on the device; [`DecodeDevice`] says where a
//! decoder runs (by default beside the DiT) and keeps one upload of its weights per device,
//! and [`BackgroundDecoder`] decodes on its own thread so that decoding overlaps the DiT,
//! taking host latents or a finished block that never left the device.

mod background;
mod bench;
pub(crate) mod conv;
mod cuda;
mod device;
mod latents;
mod taehv;
mod wan_vae;
mod weights;

pub use background::{hold_device_decodes, BackgroundDecoder, PixelOutputs, QUEUE_BLOCKS};
pub(crate) use bench::process_cpu_ms;
pub use bench::{
    bench_conv, bench_decode, bench_decode_device, conv_table, decoder_conv_shapes,
    profile_decode_device, table as bench_table, ConvShape, DecodeBench, DecodeProfile,
    DeviceDecodeBench,
};
pub use cuda::{
    by_kernel, BlockCost, CudaDecoder, DecodeStats, DeviceFrames, DeviceWeights, KernelTime,
    BLOCK_ROWS,
};
pub use device::{DecodeDevice, DecoderSet};
pub use latents::LatentsFile;

use crate::tensorfile::TensorFile;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use weights::Weights;

/// Which decoder a weight file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecoderKind {
    /// The Wan2.1 VAE decoder (`Wan2.1_VAE.pth`): exact pixels, heavy.
    WanVae,
    /// TAEHV (`taew2_1`): the tiny decoder real-time demos use, ~10x cheaper.
    Taehv,
}

impl std::str::FromStr for DecoderKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "wan" => Ok(DecoderKind::WanVae),
            "taehv" => Ok(DecoderKind::Taehv),
            _ => Err(Error::invalid(format!(
                "unknown decoder `{s}` (expected `wan` or `taehv`)"
            ))),
        }
    }
}

impl std::fmt::Display for DecoderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            DecoderKind::WanVae => "wan",
            DecoderKind::Taehv => "taehv",
        })
    }
}

/// Decoded pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Video {
    /// Number of frames `T`.
    pub frames: usize,
    /// Height `H` in pixels.
    pub height: usize,
    /// Width `W` in pixels.
    pub width: usize,
    /// `[T, 3, H, W]` RGB, in [-1, 1] (the Wan VAE clamps; TAEHV's `2x - 1` may overshoot
    /// slightly, as upstream's does).
    pub data: Vec<f32>,
}

impl Video {
    /// The frames as 8-bit RGB, `[T][H][W][3]` (interleaved, as video encoders and image files
    /// want them), by upstream's rule: see [`crate::video::to_rgb8`].
    pub fn to_rgb8(&self) -> Vec<u8> {
        crate::video::to_rgb8(&self.data, self.frames, self.height, self.width)
    }
}

enum Inner {
    Wan(Box<wan_vae::WanVae>),
    Taehv(taehv::Taehv),
}

/// A loaded decoder: immutable weights, shared by any number of streams (`Send + Sync`), and
/// their copies on devices ([`Decoder::weights_on`]: one per device, uploaded by the first
/// stream there and shared by every later one).
pub struct Decoder {
    inner: Inner,
    on_devices: device::OnDevices,
}

/// Largest latent height or width accepted (8192 pixels).
const MAX_LATENT_SIDE: usize = 1024;

impl Decoder {
    /// Loads a decoder from a safetensors file, or a folder holding exactly one. The kind is
    /// detected from the tensor names (`decoder.middle.*`/`conv2.*`: Wan VAE, whose
    /// `encoder.*`/`conv1.*` are ignored; `decoder.{i}.*`: TAEHV) unless `kind` forces one.
    pub fn load(path: &Path, kind: Option<DecoderKind>) -> Result<Decoder> {
        let file = resolve(path)?;
        let wt = Weights::file(TensorFile::open(&file)?);
        let kind = match kind {
            Some(k) => k,
            None => detect(&wt)?,
        };
        Self::from_weights(&wt, kind)
    }

    fn from_weights(wt: &Weights, kind: DecoderKind) -> Result<Decoder> {
        let inner = match kind {
            DecoderKind::WanVae => Inner::Wan(Box::new(wan_vae::WanVae::load(wt)?)),
            DecoderKind::Taehv => Inner::Taehv(taehv::Taehv::load(wt)?),
        };
        let d = Decoder {
            inner,
            on_devices: Default::default(),
        };
        if d.latent_channels() != 16 {
            return Err(wt.err(format!(
                "the {kind} decoder takes {} latent channels; Wan2.1 latents have 16",
                d.latent_channels()
            )));
        }
        Ok(d)
    }

    /// A built-in tiny TAEHV-shaped decoder with random weights (widths 32, 16, 8, 8), so the
    /// no-files path still ends in a video (noise-like pictures, not a real decode).
    pub fn tiny_taehv(seed: u64) -> Decoder {
        Self::synthetic(DecoderKind::Taehv, 8, seed)
    }

    /// A decoder of `kind` with random weights at width `dim` (Wan VAE: the base width, 96 in
    /// the real model; TAEHV: the last width, 64 in the real model, the others 4x, 2x, 1x).
    /// For benchmarks and the no-files path.
    pub fn synthetic(kind: DecoderKind, dim: usize, seed: u64) -> Decoder {
        let dim = dim.max(1);
        let t = match kind {
            DecoderKind::WanVae => wan_vae::synthetic(dim, 16, seed),
            DecoderKind::Taehv => taehv::synthetic([4 * dim, 2 * dim, dim, dim], 16, seed),
        };
        let wt = Weights::mem(t);
        match Self::from_weights(&wt, kind) {
            Ok(d) => d,
            // The generated names and shapes are those the loaders read.
            Err(e) => unreachable!("synthetic {kind} decoder: {e}"),
        }
    }

    /// Which decoder this is.
    pub fn kind(&self) -> DecoderKind {
        match self.inner {
            Inner::Wan(_) => DecoderKind::WanVae,
            Inner::Taehv(_) => DecoderKind::Taehv,
        }
    }

    /// Latent channels the decoder takes (16).
    pub fn latent_channels(&self) -> usize {
        match &self.inner {
            Inner::Wan(d) => d.z_dim,
            Inner::Taehv(d) => d.z_dim,
        }
    }

    fn up(&self) -> usize {
        match &self.inner {
            Inner::Wan(d) => d.up,
            Inner::Taehv(d) => d.up,
        }
    }

    /// `(H, W)` in pixels of a `latent_h x latent_w` latent grid (8x for both real decoders).
    pub fn pixel_size(&self, latent_h: usize, latent_w: usize) -> (usize, usize) {
        (latent_h * self.up(), latent_w * self.up())
    }

    /// Pixel frames for `latent_frames` latent frames decoded as one stream: `1 + 4(F-1)` for
    /// the Wan VAE, `4F - 3` for TAEHV (0 for 0); a file with other temporal upsampling gives
    /// `1 + t(F-1)` and `tF - (t - 1)` for its factor `t` ([`Decoder::temporal_factor`]).
    pub fn pixel_frames(&self, latent_frames: usize) -> usize {
        if latent_frames == 0 {
            return 0;
        }
        match &self.inner {
            Inner::Wan(d) => 1 + d.t_up * (latent_frames - 1),
            Inner::Taehv(d) => d.t_up * latent_frames - d.trim,
        }
    }

    /// Pixel frames per latent frame once a stream has started (4 for both real decoders).
    pub fn temporal_factor(&self) -> usize {
        match &self.inner {
            Inner::Wan(d) => d.t_up,
            Inner::Taehv(d) => d.t_up,
        }
    }

    /// Checks that latents of `channels x h x w` per frame can be decoded.
    pub fn check_latent_size(&self, channels: usize, h: usize, w: usize) -> Result<()> {
        if channels != self.latent_channels() {
            return Err(Error::invalid(format!(
                "latents have {channels} channels; the {} decoder takes {}",
                self.kind(),
                self.latent_channels()
            )));
        }
        if h == 0 || w == 0 || h > MAX_LATENT_SIDE || w > MAX_LATENT_SIDE {
            return Err(Error::invalid(format!(
                "latent size {h}x{w}: each side must be 1..={MAX_LATENT_SIDE}"
            )));
        }
        Ok(())
    }

    /// Bytes of the causal state a stream holds at latent size `h x w`, once warmed up (f32).
    pub fn state_bytes(&self, latent_h: usize, latent_w: usize) -> usize {
        match &self.inner {
            Inner::Wan(d) => d.cache_bytes(latent_h, latent_w),
            Inner::Taehv(d) => d.cache_bytes(latent_h, latent_w),
        }
    }

    /// Floating-point operations (multiply and add counted apart) of the convolutions, and
    /// of the Wan VAE's attention products, that the CPU decoder does per latent frame of a
    /// running stream at latent size `latent_h x latent_w`, as it does them: TAEHV's `TGrow`
    /// at the lower resolution, and every nearest-upsample-then-3x3 conv in the sub-pixel
    /// (parity) form, 2x2 taps per output pixel instead of 3x3, unless the decoder was built
    /// with `BC_CONV_PARITY=0` (docs/decoders.md). At 480x832: Wan VAE 12.92 TFLOP, TAEHV
    /// 0.437 (13.55 and 0.527 without the parity form).
    pub fn conv_flops(&self, latent_h: usize, latent_w: usize) -> f64 {
        match &self.inner {
            Inner::Wan(d) => d.conv_flops(latent_h, latent_w),
            Inner::Taehv(d) => d.conv_flops(latent_h, latent_w),
        }
    }

    /// Bytes of weights held (f32).
    pub fn weight_bytes(&self) -> usize {
        match &self.inner {
            Inner::Wan(d) => d.weight_bytes(),
            Inner::Taehv(d) => d.weight_bytes(),
        }
    }

    /// Starts a stream of `latent_h x latent_w` latents. The stream borrows the decoder (wrap
    /// the decoder in an `Arc` and keep it alive to hand streams to other threads).
    pub fn stream(&self, latent_h: usize, latent_w: usize) -> Result<DecodeStream<'_>> {
        self.check_latent_size(self.latent_channels(), latent_h, latent_w)?;
        // The caches plus a few activation frames of the widest level.
        let frame = match &self.inner {
            Inner::Wan(d) => d.max_frame_bytes(latent_h, latent_w),
            Inner::Taehv(d) => d.max_frame_bytes(latent_h, latent_w),
        };
        let need = self
            .state_bytes(latent_h, latent_w)
            .saturating_add(frame.saturating_mul(6));
        crate::host_memory::ensure(need, || {
            format!(
                "decoding {latent_h}x{latent_w} latents with the {} decoder",
                self.kind()
            )
        })?;
        let state = match &self.inner {
            Inner::Wan(d) => State::Wan(d.state()),
            Inner::Taehv(d) => State::Taehv(d.state()),
        };
        Ok(DecodeStream {
            dec: self,
            h: latent_h,
            w: latent_w,
            state,
        })
    }

    /// Decodes a whole latent video `[frames, 16, h, w]` (frame-major, as the DiT writes it).
    pub fn decode(&self, latents: &[f32], frames: usize, h: usize, w: usize) -> Result<Video> {
        self.stream(h, w)?.push(latents, frames)
    }
}

enum State {
    Wan(wan_vae::WanState),
    Taehv(taehv::TaehvState),
}

/// A decode in progress: push the latent frames of each finished block, get its pixels.
pub struct DecodeStream<'a> {
    dec: &'a Decoder,
    h: usize,
    w: usize,
    state: State,
}

impl DecodeStream<'_> {
    /// Decodes the next `frames` latent frames `[frames, 16, h, w]` and returns their pixel
    /// frames: [`Decoder::temporal_factor`] (4) per latent frame, except the stream's first
    /// latent frame, which gives 1 (the Wan VAE's causal first frame; TAEHV's 3 trimmed frames).
    pub fn push(&mut self, latents: &[f32], frames: usize) -> Result<Video> {
        let c = self.dec.latent_channels();
        let per = c * self.h * self.w;
        check_latents(latents, frames, (c, self.h, self.w))?;
        let (ph, pw) = self.dec.pixel_size(self.h, self.w);
        let pixels = [frames, self.dec.temporal_factor(), 3, ph, pw, 4]
            .iter()
            .fold(1usize, |a, &b| a.saturating_mul(b));
        crate::host_memory::ensure(pixels, || {
            format!("{frames} latent frames decoded to {ph}x{pw} pixels")
        })?;
        let out: Vec<Vec<f32>> = match (&self.dec.inner, &mut self.state) {
            (Inner::Wan(d), State::Wan(st)) => latents
                .chunks(per)
                .flat_map(|z| d.step(z, self.h, self.w, st))
                .collect(),
            (Inner::Taehv(d), State::Taehv(st)) => d.run(
                latents.chunks(per).map(|z| z.to_vec()).collect(),
                self.h,
                self.w,
                st,
            ),
            _ => return Err(Error::Internal("decoder and stream state differ".into())),
        };
        let mut data = Vec::with_capacity(out.len() * 3 * ph * pw);
        for f in &out {
            data.extend_from_slice(f);
        }
        Ok(Video {
            frames: out.len(),
            height: ph,
            width: pw,
            data,
        })
    }

    /// Bytes of causal state the stream holds now (stays at most
    /// [`Decoder::state_bytes`], however long the stream).
    pub fn state_bytes(&self) -> usize {
        match &self.state {
            State::Wan(s) => s.bytes(),
            State::Taehv(s) => s.bytes(),
        }
    }
}

/// Checks that `latents` hold `frames` frames of `[c, h, w]`, all finite (what every decoder's
/// push requires).
fn check_latents(latents: &[f32], frames: usize, (c, h, w): (usize, usize, usize)) -> Result<()> {
    let per = c * h * w;
    if frames.checked_mul(per) != Some(latents.len()) {
        return Err(Error::invalid(format!(
            "latents hold {} values; {frames} frames of [{c}, {h}, {w}] need {}",
            latents.len(),
            frames.saturating_mul(per)
        )));
    }
    if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "latent value {i} is {} (not finite)",
            latents[i]
        )));
    }
    Ok(())
}

/// The safetensors file at `path`, or the one inside folder `path`.
fn resolve(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut found: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::format(format!(
            "{}: no .safetensors file in this folder",
            path.display()
        ))),
        n => Err(Error::format(format!(
            "{}: {n} .safetensors files in this folder; name the decoder's file",
            path.display()
        ))),
    }
}

/// The decoder kind from the tensor names.
fn detect(wt: &Weights) -> Result<DecoderKind> {
    let wan = wt.has("conv2.weight") || wt.has_prefix("decoder.middle.");
    let tae = wt.has("decoder.1.weight") || wt.has_prefix("decoder.3.conv.");
    match (wan, tae) {
        (true, false) => Ok(DecoderKind::WanVae),
        (false, true) => Ok(DecoderKind::Taehv),
        _ => {
            let some: Vec<&str> = wt.names().take(3).collect();
            Err(wt.err(format!(
                "cannot tell the decoder kind from the tensor names (first: {some:?}); expected \
                 the Wan VAE's `decoder.middle.*`/`conv2.*` or TAEHV's `decoder.<i>.*` (force \
                 one with the decoder kind)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb8_interleaves_and_clamps() {
        let v = Video {
            frames: 1,
            height: 1,
            width: 2,
            data: vec![-1.0, 2.0, 0.0, 0.5, 1.0, -3.0],
        };
        // Truncation, as upstream: 0.0 -> 127 (not 128).
        assert_eq!(v.to_rgb8(), vec![0, 127, 255, 255, 191, 0]);
    }

    #[test]
    fn kind_parses_and_prints() {
        for k in [DecoderKind::WanVae, DecoderKind::Taehv] {
            assert_eq!(k.to_string().parse::<DecoderKind>().unwrap(), k);
        }
        assert!("vae".parse::<DecoderKind>().is_err());
    }

    #[test]
    fn synthetic_decoders_stream_like_whole() {
        for kind in [DecoderKind::WanVae, DecoderKind::Taehv] {
            let d = Decoder::synthetic(kind, 2, 5);
            let (f, h, w) = (4, 2, 3);
            let mut r = crate::rng::Rng::new(9);
            let z: Vec<f32> = (0..f * 16 * h * w).map(|_| r.normal()).collect();
            let whole = d.decode(&z, f, h, w).unwrap();
            assert_eq!(whole.frames, d.pixel_frames(f));
            let mut s = d.stream(h, w).unwrap();
            let mut joined = Vec::new();
            for b in z.chunks(16 * h * w) {
                joined.extend(s.push(b, 1).unwrap().data);
            }
            assert_eq!(joined, whole.data, "{kind}");
            assert!(s.state_bytes() <= d.state_bytes(h, w));
        }
    }

    /// The analytic per-frame FLOPs are what the decoders do: the thread's counter over a
    /// steady latent frame (the stream warmed up by three frames first: the Wan VAE's second
    /// `time_conv` input is its first with two cached frames), for both decoders,
    /// and the parity form's saving at 480x832 (Wan VAE 13.55 -> 12.92 TFLOP, TAEHV 0.527
    /// -> 0.437).
    #[test]
    fn conv_flops_count_what_a_steady_frame_does() {
        for kind in [DecoderKind::WanVae, DecoderKind::Taehv] {
            let dec = Decoder::synthetic(kind, 4, 3);
            let (h, w) = (3, 5);
            let mut st = dec.stream(h, w).unwrap();
            let mut r = crate::rng::Rng::new(1);
            let mut z = |n: usize| {
                (0..n * 16 * h * w)
                    .map(|_| r.normal())
                    .collect::<Vec<f32>>()
            };
            st.push(&z(3), 3).unwrap();
            let f0 = conv::conv_flops_done();
            st.push(&z(1), 1).unwrap();
            let done = conv::conv_flops_done() - f0;
            assert_eq!(done, dec.conv_flops(h, w), "{kind}");
        }
        let real = |kind, dim| Decoder::synthetic(kind, dim, 1).conv_flops(60, 104) / 1e12;
        let (wan, taehv) = (real(DecoderKind::WanVae, 96), real(DecoderKind::Taehv, 64));
        // Dense (BC_CONV_PARITY=0): 13.55 and 0.527.
        let (w, t) = if conv::parity_from_env() {
            (12.92, 0.437)
        } else {
            (13.55, 0.527)
        };
        assert!((wan - w).abs() < 0.005, "wan {wan}");
        assert!((taehv - t).abs() < 0.0005, "taehv {taehv}");
    }

    /// Found by fuzzing: a Wan VAE file with one temporal upsample instead of two decodes 2
    /// frames per latent frame, and `pixel_frames` must say so (it assumed 4).
    #[test]
    fn pixel_frames_follow_the_temporal_upsampling_of_the_file() {
        let mut t = wan_vae::synthetic(2, 16, 3);
        let first = t
            .iter()
            .position(|(n, _, _)| n.contains("time_conv"))
            .unwrap();
        let prefix = t[first].0.split("time_conv").next().unwrap().to_string();
        t.retain(|(n, _, _)| !n.starts_with(&format!("{prefix}time_conv")));
        let d = Decoder::from_weights(&Weights::mem(t), DecoderKind::WanVae).unwrap();
        assert_eq!(d.temporal_factor(), 2);
        let (f, h, w) = (3, 1, 2);
        let z: Vec<f32> = (0..f * 16 * h * w).map(|i| (i % 5) as f32 * 0.2).collect();
        let v = d.decode(&z, f, h, w).unwrap();
        assert_eq!((v.frames, d.pixel_frames(f)), (5, 5));
    }
}
