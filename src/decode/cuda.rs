//! Both decoders on a CUDA device (a GPU through the driver, or the emulated device in CI): the
//! same layer walks as the CPU decoders (depth first, one frame per level alive), with every
//! convolution on `cuda/conv.cu` and the small ops on `cuda/decode_ops.cu`.
//!
//! This file holds what both share ([`Dev`]: the device, weight upload, a pool of activation
//! buffers, launches, the pixel output) and the public [`CudaDecoder`]; `cuda/taehv.rs` and
//! `cuda/wan.rs` are the two walks.
//!
//! Weights are uploaded once per decoder and device (bf16, packed `[cout][kt][kh][kw][cin]`;
//! biases and norm gains f32) into a [`DeviceWeights`], which every [`CudaDecoder`] on that device
//! shares ([`CudaDecoder::on`]; [`super::Decoder::weights_on`] keeps one per device). Each
//! `CudaDecoder` has its own device handle (its own streams; on a GPU the primary context,
//! shared with the DiT and the weights' owner) and its own activation pool. A stream's causal state (TAEHV's MemBlock memories, the Wan VAE's two-frame conv caches) lives
//! on the device and is carried from block to block; activations come from a pool of device
//! buffers that grows to the peak live set of the first frames and is reused after. Per pushed
//! block only the latents go up and only the pixels come back: RGB8 `[T][H][W][3]` always, f32
//! `[T][3][H][W]` when asked.
//!
//! Precision: bf16 activations, weights and caches, f32 accumulation; the last conv writes f32.
//! Against upstream's golden output within 2e-2 relative L2 (tests/decode_cuda_emulated.rs).

mod taehv;
mod wan;

use super::conv::Conv;
use super::{DecodeDevice, Decoder, Inner};
use crate::backend::cuda::device::{DevPtr, Gpu, Mark};
use crate::kernels::launch::{self, ConvEpilogue, ConvOut, ConvShape, ConvSource, Launch};
use crate::kernels::{Kernel, LaunchResult};
use crate::{Error, Result};
use std::sync::{Arc, Mutex};

/// One convolution's weights on the device (or any bf16 `[cout][k]` matrix used as weights).
#[derive(Clone, Copy)]
struct DevConv {
    w: DevPtr,
    bias: DevPtr,
    shape: ConvShape,
}

/// An NHWC frame on the device (`[h*w][c]`, bf16, or f32 for a last conv); `owned`: a pool
/// buffer (a view into another frame is not).
#[derive(Clone, Copy)]
struct Frame {
    ptr: DevPtr,
    bytes: usize,
    c: usize,
    h: usize,
    w: usize,
    owned: bool,
}

impl Frame {
    /// A view of `c` channels at `ptr` inside a buffer owned elsewhere.
    fn view(ptr: DevPtr, c: usize, h: usize, w: usize) -> Frame {
        Frame {
            ptr,
            bytes: 2 * c * h * w,
            c,
            h,
            w,
            owned: false,
        }
    }
}

/// One input frame of a conv launch: the frame, its weight channel offset, time tap, and
/// whether it is read through a nearest 2x upsample.
#[derive(Clone, Copy)]
struct In {
    f: Frame,
    c0: usize,
    t: usize,
    up: bool,
}

impl In {
    /// The whole frame at tap `t`.
    fn at(f: Frame, t: usize) -> In {
        In {
            f,
            c0: 0,
            t,
            up: false,
        }
    }
}

/// Decoded frames of one pushed block, as they come back from the device (or from the CPU
/// decoder, through [`super::BackgroundDecoder::spawn_on`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceFrames {
    /// Number of frames.
    pub frames: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// `[T][H][W][3]` RGB8 (`Video::to_rgb8`'s rule).
    pub rgb: Vec<u8>,
    /// `[T][3][H][W]` f32, when asked for.
    pub f32: Option<Vec<f32>>,
}

/// A device handle, the bytes of weights uploaded through it, and its activation pool.
struct Dev {
    gpu: Gpu,
    /// Bytes of weights uploaded through this handle (freed with the device).
    weight_bytes: usize,
    /// Free activation buffers (bytes, pointer).
    pool: Vec<(usize, DevPtr)>,
    /// Bytes allocated for activations and stream state.
    pool_bytes: usize,
    /// Convolution FLOPs launched so far (2 per multiply-add, the attention's GEMMs included).
    flops: f64,
    /// A u32 that `bc_dec_latent_in` flags when it reads a NaN/inf latent (0: none allocated
    /// yet; a decoder allocates it with its first push).
    nonfinite: DevPtr,
    /// Of `flops`, those launched on `bc_conv_wgmma` / `bc_conv_wgmma_n96`.
    wgmma_flops: f64,
    /// Convolutions that fit it run `bc_conv_wgmma` (Hopper; see [`conv_wgmma_default`]).
    conv_wgmma: bool,
}

/// Whether a new decoder on `gpu` runs its convolutions on the Hopper wgmma kernel
/// (`bc_conv_wgmma`): only with `BC_CONV_WGMMA=1` on a compute capability 9.0 device (opt-in
/// until the GPU bundle's layout probe has passed on hardware; elsewhere the flag is ignored).
fn conv_wgmma_default(gpu: &Gpu) -> bool {
    std::env::var("BC_CONV_WGMMA").is_ok_and(|v| v.trim() == "1")
        && gpu.compute_capability() == Some((9, 0))
}

impl Dev {
    fn new(gpu: Gpu) -> Dev {
        let conv_wgmma = conv_wgmma_default(&gpu);
        Dev {
            gpu,
            weight_bytes: 0,
            pool: Vec::new(),
            pool_bytes: 0,
            flops: 0.0,
            wgmma_flops: 0.0,
            nonfinite: 0,
            conv_wgmma,
        }
    }

    /// Uploads `data` (kept alive until the device has it).
    fn upload<T: Copy>(&mut self, data: &[T]) -> Result<DevPtr> {
        let p = self.gpu.alloc(std::mem::size_of_val(data))?;
        self.weight_bytes += std::mem::size_of_val(data);
        self.gpu.upload(p, data)?;
        self.gpu.sync()?;
        Ok(p)
    }

    fn conv_weights(&mut self, c: &Conv) -> Result<DevConv> {
        let w = self.upload(&c.packed_bf16())?;
        let bias = match c.bias() {
            Some(b) => self.upload(b)?,
            None => 0,
        };
        Ok(DevConv {
            w,
            bias,
            shape: ConvShape {
                cout: c.cout,
                cin: c.cin,
                kt: c.kt,
                kh: c.kh,
                kw: c.kw,
            },
        })
    }

    fn run<P>(&self, l: LaunchResult<Launch<P>>) -> Result<()> {
        let l = l.map_err(|e| Error::InvalidArgument(format!("{}: {}", e.kernel, e.message)))?;
        // SAFETY: every launch of the device decoder is built over device buffers allocated
        // by `get` with the sizes its frames need, and weights uploaded with their shapes.
        unsafe { self.gpu.launch(l.kernel, l.grid, l.block, &l.params) }
    }

    /// A pool buffer for a `c x h x w` frame of `elem`-byte values.
    fn get(&mut self, c: usize, h: usize, w: usize, elem: usize) -> Result<Frame> {
        let bytes = c * h * w * elem;
        let best = self
            .pool
            .iter()
            .enumerate()
            .filter(|(_, (b, _))| *b >= bytes)
            .min_by_key(|(_, (b, _))| *b)
            .map(|(i, _)| i);
        let (bytes, ptr) = match best {
            Some(i) => self.pool.swap_remove(i),
            None => {
                self.pool_bytes += bytes;
                (bytes, self.gpu.alloc(bytes)?)
            }
        };
        Ok(Frame {
            ptr,
            bytes,
            c,
            h,
            w,
            owned: true,
        })
    }

    /// Returns a buffer to the pool (later launches reuse it, in stream order).
    fn put(&mut self, f: Frame) {
        if f.owned {
            self.pool.push((f.bytes, f.ptr));
        }
    }

    /// `cv` over `srcs` into a new `cout`-channel frame of `h x w` (f32 when `f32`).
    fn conv(
        &mut self,
        cv: &DevConv,
        srcs: &[In],
        (h, w): (usize, usize),
        res: Option<Frame>,
        act: u32,
        f32: bool,
    ) -> Result<Frame> {
        let y = self.get(cv.shape.cout, h, w, if f32 { 4 } else { 2 })?;
        let c = cv.shape.cout;
        self.conv_into(cv, srcs, (h, w), res, act, (y.ptr, f32, c, 1))?;
        Ok(y)
    }

    /// `cv` over `srcs` into `out`: f32 or bf16, output channels split into frames of `split`
    /// (NHWC frames of `split` channels, one after the other), `cstride` elements between
    /// channels (1, or `h*w` for a channel-major output).
    fn conv_into(
        &mut self,
        cv: &DevConv,
        srcs: &[In],
        hw: (usize, usize),
        res: Option<Frame>,
        act: u32,
        (out, f32, split, cstride): (DevPtr, bool, usize, usize),
    ) -> Result<()> {
        let ls: Vec<ConvSource> = srcs
            .iter()
            .map(|s| ConvSource {
                x: s.f.ptr as *const _,
                channels: s.f.c,
                stride: s.f.c,
                c0: s.c0,
                t: s.t,
                up: s.up,
            })
            .collect();
        let pixels = hw.0 * hw.1;
        let k: usize = srcs.iter().map(|s| s.f.c).sum::<usize>() * cv.shape.kh * cv.shape.kw;
        let flops = 2.0 * pixels as f64 * cv.shape.cout as f64 * k as f64;
        self.flops += flops;
        let l = launch::conv_on(
            &ls,
            cv.w as *const _,
            cv.shape,
            hw,
            ConvEpilogue {
                bias: cv.bias as *const f32,
                res: res.map_or(std::ptr::null(), |r| r.ptr as *const _),
                res_stride: res.map_or(0, |r| r.c),
                act,
            },
            ConvOut {
                out: out as *mut _,
                f32,
                stride: if cstride > 1 { 1 } else { split },
                split,
                frame_stride: split * pixels,
                cstride,
            },
            self.conv_wgmma,
        );
        let wg = |k| matches!(k, Kernel::ConvWgmma | Kernel::ConvWgmmaN96);
        if l.as_ref().is_ok_and(|l| wg(l.kernel)) {
            self.wgmma_flops += flops;
        }
        self.run(l)
    }

    /// Channel RMS norm (then SiLU when `silu`) of `x` into a new frame.
    fn rms_norm(&mut self, x: Frame, gamma: DevPtr, silu: bool) -> Result<Frame> {
        let y = self.get(x.c, x.h, x.w, 2)?;
        self.run(launch::dec_rms_norm(
            x.ptr as *const _,
            y.ptr as *mut _,
            gamma as *const f32,
            x.h * x.w,
            x.c,
            silu,
        ))?;
        Ok(y)
    }

    /// Nearest 2x upsample of `x` (which goes back to the pool).
    fn upsample(&mut self, x: Frame) -> Result<Frame> {
        let y = self.get(x.c, 2 * x.h, 2 * x.w, 2)?;
        self.run(launch::dec_upsample2x(
            x.ptr as *const _,
            y.ptr as *mut _,
            std::ptr::null_mut(),
            x.h,
            x.w,
            x.c,
        ))?;
        self.put(x);
        Ok(y)
    }

    /// A finished f32 frame `[hw][3]` to the host: `x * a + b` (clamped when `clamp`) as RGB8,
    /// and as f32 when `out` asks for it.
    fn emit(
        &mut self,
        x: Frame,
        affine: (f32, f32),
        clamp: bool,
        out: &mut DeviceFrames,
    ) -> Result<()> {
        let hw = x.h * x.w;
        let rgb = self.get(3, x.h, x.w, 1)?;
        let f = match out.f32 {
            Some(_) => Some(self.get(3, x.h, x.w, 4)?),
            None => None,
        };
        self.run(launch::dec_to_pixels(
            x.ptr as *const _,
            true,
            hw,
            3,
            affine,
            clamp,
            f.map_or(std::ptr::null_mut(), |f| f.ptr as *mut f32),
            rgb.ptr as *mut u8,
        ))?;
        let at = out.rgb.len();
        out.rgb.resize(at + 3 * hw, 0);
        self.gpu.download(&mut out.rgb[at..], rgb.ptr)?;
        if let (Some(f), Some(v)) = (f, out.f32.as_mut()) {
            let at = v.len();
            v.resize(at + 3 * hw, 0.0);
            self.gpu.download(&mut v[at..], f.ptr)?;
            self.put(f);
        }
        self.put(rgb);
        self.put(x);
        out.frames += 1;
        Ok(())
    }
}

/// The model on the device.
enum Model {
    Taehv(taehv::DevTaehv),
    Wan(Box<wan::DevWan>),
}

/// A stream's state on the device.
enum State {
    Taehv(taehv::TaehvDevState),
    Wan(wan::WanDevState),
}

/// A decoder's weights on one device: uploaded once, then read by any number of
/// [`CudaDecoder`]s there (each with its own streams, causal state and activations), so that
/// several streams or sessions hold one copy and a new stream starts without an upload.
/// [`super::Decoder::weights_on`] makes (and keeps) them.
pub struct DeviceWeights {
    model: Model,
    z_dim: usize,
    up: usize,
    bytes: usize,
    /// Shared weights: the device they are on and the handle that uploaded them, which owns
    /// their allocations (freed when the last holder drops, after every user has synced).
    /// `None`: private to one [`CudaDecoder`], allocated on (and freed with) its own handle.
    home: Option<(DecodeDevice, Mutex<Gpu>)>,
}

/// Uploads `dec`'s layers through `dev`.
fn upload_model(dec: &Decoder, dev: &mut Dev) -> Result<(Model, usize, usize)> {
    Ok(match &dec.inner {
        Inner::Taehv(t) => (Model::Taehv(taehv::DevTaehv::new(dev, t)?), t.z_dim, t.up),
        Inner::Wan(w) => (
            Model::Wan(Box::new(wan::DevWan::new(dev, w)?)),
            w.z_dim,
            w.up,
        ),
    })
}

impl DeviceWeights {
    /// Uploads `dec` through `gpu` (a handle opened on `device`, kept as the weights' owner).
    pub(super) fn upload(dec: &Decoder, device: DecodeDevice, gpu: Gpu) -> Result<DeviceWeights> {
        let mut dev = Dev::new(gpu);
        let (model, z_dim, up) = upload_model(dec, &mut dev)?;
        Ok(DeviceWeights {
            model,
            z_dim,
            up,
            bytes: dev.weight_bytes,
            home: Some((device, Mutex::new(dev.gpu))),
        })
    }

    /// Bytes of device memory the weights take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The device the weights are on (`None`: private to one [`CudaDecoder`]).
    pub fn device(&self) -> Option<DecodeDevice> {
        self.home.as_ref().map(|(d, _)| *d)
    }
}

/// A decoder on a device (see the module docs): [`CudaDecoder::begin`] a stream, then
/// [`CudaDecoder::push`] each finished block of latent frames.
pub struct CudaDecoder {
    // Field order: `dev` (the stream's handle) is synced by `Drop` and dropped before the last
    // hold on shared weights goes.
    dev: Dev,
    weights: Arc<DeviceWeights>,
    state: Option<(usize, usize, State)>,
}

impl CudaDecoder {
    /// Uploads `dec`'s weights to `gpu`, for this decoder alone.
    pub fn new(dec: &Decoder, gpu: Gpu) -> Result<CudaDecoder> {
        let mut dev = Dev::new(gpu);
        let (model, z_dim, up) = upload_model(dec, &mut dev)?;
        let weights = Arc::new(DeviceWeights {
            model,
            z_dim,
            up,
            bytes: dev.weight_bytes,
            home: None,
        });
        Ok(CudaDecoder {
            dev,
            weights,
            state: None,
        })
    }

    /// A decoder over shared `weights`: opens its own handle on their device (its own
    /// streams; on a GPU the device's primary context) and uploads nothing.
    pub fn on(weights: Arc<DeviceWeights>) -> Result<CudaDecoder> {
        let Some((device, _)) = &weights.home else {
            return Err(Error::Internal(
                "a decoder's private device weights cannot be shared".into(),
            ));
        };
        let gpu = device
            .open()?
            .ok_or_else(|| Error::Internal("device weights on the CPU".into()))?;
        Ok(CudaDecoder {
            dev: Dev::new(gpu),
            weights,
            state: None,
        })
    }

    /// The weights this decoder reads (shared with other decoders when made by
    /// [`CudaDecoder::on`]).
    pub fn weights(&self) -> &Arc<DeviceWeights> {
        &self.weights
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.dev.gpu.name
    }

    /// Bytes of device memory held for activations and stream state (weights not counted).
    pub fn activation_bytes(&self) -> usize {
        self.dev.pool_bytes
    }

    /// Whether convolutions run the Hopper wgmma kernel `bc_conv_wgmma` where they fit (the
    /// default: `BC_CONV_WGMMA=1` on a compute capability 9.0 device).
    pub fn conv_wgmma(&self) -> bool {
        self.dev.conv_wgmma
    }

    /// Turns the Hopper wgmma convolution on or off for the following launches (tests and
    /// benchmarks compare it with `bc_conv`): on is refused, with an error, on a device that has
    /// no wgmma (anything but compute capability 9.0 and the emulated device).
    pub fn set_conv_wgmma(&mut self, on: bool) -> Result<()> {
        let gpu = &self.dev.gpu;
        if on && !gpu.is_emulated() && gpu.compute_capability() != Some((9, 0)) {
            return Err(Error::invalid(format!(
                "the wgmma convolution needs a compute capability 9.0 device, not {}",
                gpu.name
            )));
        }
        self.dev.conv_wgmma = on;
        Ok(())
    }

    /// Convolution FLOPs launched since the decoder was made (the work a benchmark divides by
    /// its time: every conv, 1x1 and attention GEMM, counted at the channels it really reads).
    pub fn flops(&self) -> f64 {
        self.dev.flops
    }

    /// Of [`CudaDecoder::flops`], the convolution FLOPs launched on the Hopper wgmma kernels
    /// `bc_conv_wgmma` / `bc_conv_wgmma_n96` (the rest ran `bc_conv` / `bc_conv_n16`).
    pub fn wgmma_flops(&self) -> f64 {
        self.dev.wgmma_flops
    }

    /// Starts a stream of `latent_h x latent_w` latents (ending any previous one): the causal
    /// state is allocated here and carried across [`CudaDecoder::push`]es. Activations are
    /// not: the first push allocates them (and may be the one that runs out of memory).
    pub fn begin(&mut self, latent_h: usize, latent_w: usize) -> Result<()> {
        if latent_h == 0 || latent_w == 0 || latent_h > 1024 || latent_w > 1024 {
            return Err(Error::invalid(format!(
                "latent size {latent_h}x{latent_w}: each side must be 1..=1024"
            )));
        }
        self.end()?;
        let (h, w) = (latent_h, latent_w);
        let st = match &self.weights.model {
            Model::Taehv(m) => State::Taehv(m.state(&mut self.dev, h, w)?),
            Model::Wan(m) => State::Wan(m.state(&mut self.dev, h, w)?),
        };
        self.state = Some((h, w, st));
        Ok(())
    }

    /// Ends the stream: its state goes back to the pool.
    pub fn end(&mut self) -> Result<()> {
        if let Some((_, _, st)) = self.state.take() {
            self.dev.gpu.sync()?;
            let frames = match st {
                State::Taehv(s) => s.frames(),
                State::Wan(s) => s.frames(),
            };
            for f in frames {
                self.dev.put(f);
            }
        }
        Ok(())
    }

    /// Decodes the next `frames` latent frames `[frames, 16, h, w]` of the stream and returns
    /// their pixels (as the CPU stream does: TAEHV's first 3 frames trimmed, the Wan VAE's first
    /// latent frame giving 1 frame).
    pub fn push(&mut self, latents: &[f32], frames: usize, want_f32: bool) -> Result<DeviceFrames> {
        self.push_from(Latents::Host(latents), frames, want_f32)
    }

    /// [`CudaDecoder::push`] of latents already on the device, `[frames][16][h][w]` f32 at
    /// `latents` (a DiT's finished block, which then never crosses to the host): the decode
    /// reads them in place, after `after` (a mark on the producer's stream, of any handle on the
    /// device) is reached. When this returns, the decode no longer reads them.
    ///
    /// # Safety
    /// `latents` must be an allocation of this device's context (a handle on the same GPU, or
    /// the emulated device) holding at least `frames * 16 * h * w` f32 values, left unchanged
    /// until this call returns. A NaN/inf among them is found on the device and returned as
    /// [`Error::Format`] (the frames of that push are dropped).
    pub unsafe fn push_device(
        &mut self,
        latents: DevPtr,
        frames: usize,
        after: Option<&Mark>,
        want_f32: bool,
    ) -> Result<DeviceFrames> {
        if latents == 0 {
            return Err(Error::invalid("device latents at a null pointer"));
        }
        if let Some(m) = after {
            self.dev.gpu.compute_wait(m)?;
        }
        self.push_from(Latents::Device(latents), frames, want_f32)
    }

    fn push_from(
        &mut self,
        latents: Latents,
        frames: usize,
        want_f32: bool,
    ) -> Result<DeviceFrames> {
        let Some((h, w, mut st)) = self.state.take() else {
            return Err(Error::invalid("push before begin: start a stream first"));
        };
        let r = self.push_in(&mut st, (h, w), latents, frames, want_f32);
        self.state = Some((h, w, st));
        r
    }

    fn push_in(
        &mut self,
        st: &mut State,
        (h, w): (usize, usize),
        latents: Latents,
        frames: usize,
        want_f32: bool,
    ) -> Result<DeviceFrames> {
        let (z_dim, up) = (self.weights.z_dim, self.weights.up);
        let per = z_dim * h * w;
        match latents {
            Latents::Host(l) => super::check_latents(l, frames, (z_dim, h, w))?,
            Latents::Device(_) if frames == 0 || frames > MAX_DEVICE_FRAMES => {
                return Err(Error::invalid(format!(
                    "{frames} device latent frames: a push takes 1..={MAX_DEVICE_FRAMES}"
                )))
            }
            Latents::Device(_) => {}
        }
        let mut out = DeviceFrames {
            frames: 0,
            height: h * up,
            width: w * up,
            rgb: Vec::new(),
            f32: want_f32.then(Vec::new),
        };
        // Latents handed over on the device never pass the host's finiteness check: the
        // latent-input kernel flags a NaN/inf instead, read back with the pixels.
        if self.dev.nonfinite == 0 {
            self.dev.nonfinite = self.dev.gpu.alloc(4)?;
        }
        self.dev.gpu.memset(self.dev.nonfinite, 0, 4)?;
        // Host latents go up one frame at a time through `zbuf`.
        let zbuf = match latents {
            Latents::Host(_) => self.dev.gpu.alloc(4 * per.max(1))?,
            Latents::Device(_) => 0,
        };
        let r = (|| -> Result<()> {
            for i in 0..frames {
                let z = match latents {
                    Latents::Host(l) => {
                        self.dev.gpu.upload(zbuf, &l[i * per..(i + 1) * per])?;
                        zbuf
                    }
                    Latents::Device(p) => p + (4 * i * per) as u64,
                };
                match (&self.weights.model, &mut *st) {
                    (Model::Taehv(m), State::Taehv(s)) => {
                        m.frame(&mut self.dev, s, z, (h, w), &mut out)?
                    }
                    (Model::Wan(m), State::Wan(s)) => {
                        m.frame(&mut self.dev, s, z, (h, w), &mut out)?
                    }
                    _ => {
                        return Err(Error::Internal(
                            "device decoder and stream state differ".into(),
                        ))
                    }
                }
                // The upload's host slice must outlive the copy.
                self.dev.gpu.sync()?;
            }
            Ok(())
        })();
        self.dev.gpu.sync()?;
        if zbuf != 0 {
            self.dev.gpu.free(zbuf)?;
        }
        r?;
        // Host latents were checked before upload; device ones are read back here.
        if let Latents::Device(_) = latents {
            let mut flag = [0u32];
            self.dev.gpu.download(&mut flag, self.dev.nonfinite)?;
            if flag[0] != 0 {
                return Err(non_finite_latents());
            }
        }
        Ok(out)
    }
}

/// The error for NaN/inf latents found on the device: the same kind and words as the
/// executor's check on the host (bad weights or prompt, not a bug).
fn non_finite_latents() -> Error {
    Error::Format(
        "a block produced non-finite latents: the model's weights or the prompt embeddings are \
         out of range (values overflow to inf/NaN)"
            .into(),
    )
}

/// Where a push's latents are.
#[derive(Clone, Copy)]
enum Latents<'a> {
    /// On the host: uploaded frame by frame.
    Host(&'a [f32]),
    /// On the device, read in place.
    Device(DevPtr),
}

/// Most latent frames one device push takes (a bound on what a bad count can read).
const MAX_DEVICE_FRAMES: usize = 1024;

impl Drop for CudaDecoder {
    fn drop(&mut self) {
        // Everything is freed with the device; stop any work in flight first.
        let _ = self.dev.gpu.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_latents_decode_in_place_like_host_latents() {
        let dec = Decoder::tiny_taehv(2);
        let (h, w, frames) = (2, 3, 4);
        let mut rng = crate::rng::Rng::new(8);
        let lat: Vec<f32> = (0..frames * 16 * h * w).map(|_| rng.normal()).collect();
        let mut host = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        host.begin(h, w).unwrap();
        let want = host.push(&lat, frames, true).unwrap();

        // The latents on another handle of the device (the DiT's), ordered by its mark.
        let mut dit = Gpu::open_emulated().unwrap();
        let p = dit.alloc(4 * lat.len()).unwrap();
        dit.upload(p, &lat).unwrap();
        let ready = dit.mark_compute().unwrap();
        let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        dev.begin(h, w).unwrap();
        let per = 4 * 16 * h * w;
        let mut got = DeviceFrames::default();
        for (i, n) in [(0, 1), (1, 3)] {
            // SAFETY: `p` holds `frames` latent frames on the emulated device, unchanged.
            let out = unsafe { dev.push_device(p + (i * per) as u64, n, Some(&ready), true) };
            let out = out.unwrap();
            got.frames += out.frames;
            got.rgb.extend(out.rgb);
            got.f32
                .get_or_insert_with(Vec::new)
                .extend(out.f32.unwrap());
            (got.height, got.width) = (out.height, out.width);
        }
        assert_eq!(got, want);
        dit.sync().unwrap();

        // A NaN or inf among device latents: the typed error, found on the device; the next
        // push of clean latents decodes again.
        for bad in [f32::NAN, f32::INFINITY] {
            let mut poisoned = lat.clone();
            poisoned[per / 4 + 5] = bad;
            dit.upload(p, &poisoned).unwrap();
            let ready = dit.mark_compute().unwrap();
            dev.begin(h, w).unwrap();
            // SAFETY: as above.
            let e = unsafe { dev.push_device(p, frames, Some(&ready), false) }.unwrap_err();
            assert!(
                matches!(e, Error::Format(_)) && e.to_string().contains("non-finite"),
                "{e:?}"
            );
        }
        dit.upload(p, &lat).unwrap();
        let ready = dit.mark_compute().unwrap();
        dev.begin(h, w).unwrap();
        // SAFETY: as above.
        let again = unsafe { dev.push_device(p, frames, Some(&ready), true) }.unwrap();
        assert_eq!(again, want);

        // Bad counts and a null pointer are errors, not reads.
        for (ptr, n) in [(p, 0), (p, MAX_DEVICE_FRAMES + 1), (0, 1)] {
            // SAFETY: each is refused before any launch.
            let e = unsafe { dev.push_device(ptr, n, None, false) }.unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        }
    }
}
