//! The TAEHV decoder on a CUDA device (a GPU through the driver, or the emulated device in CI):
//! the same layer walk as the CPU decoder (`taehv.rs`, depth first, one frame per level alive),
//! with the convolutions on `cuda/conv.cu` and the small ops on `cuda/decode_ops.cu`.
//!
//! Weights are uploaded once (bf16, packed `[cout][kt][kh][kw][cin]`; biases f32). A stream's
//! MemBlock memories live on the device (one NHWC bf16 frame per MemBlock) and are carried from
//! block to block; activations come from a pool of device buffers that grows to the peak live set
//! of the first frames and is reused after. Per pushed block only the latents go up and only the
//! pixels come back: RGB8 `[T][H][W][3]` always, f32 `[T][3][H][W]` when asked.
//!
//! Fusions over the CPU walk: TAEHV's input `Clamp` is applied while the latents are turned
//! NHWC (`bc_dec_latent_in`); every ReLU after a conv, and a MemBlock's `+ skip(x)` and final
//! ReLU, are in the conv epilogue; `TGrow` writes its frames from the conv epilogue; a conv after
//! an `Upsample` reads through it; the last conv writes f32, and `2x - 1` and the RGB8 conversion
//! are one kernel.
//!
//! Precision: bf16 activations and weights, f32 accumulation; against the f32 CPU decoder and
//! upstream's golden output within 2e-2 relative L2 (tests/decode_cuda_emulated.rs).

use super::taehv::{Layer, Taehv};
use super::{Decoder, DecoderKind, Inner};
use crate::backend::cuda::device::{DevPtr, Gpu};
use crate::kernels::launch::{self, ConvEpilogue, ConvOut, ConvShape, ConvSource, Launch};
use crate::kernels::params::{BC_ACT_NONE, BC_ACT_RELU};
use crate::kernels::LaunchResult;
use crate::{Error, Result};

/// One convolution's weights on the device.
struct DevConv {
    w: DevPtr,
    bias: DevPtr,
    shape: ConvShape,
}

/// A device layer: the CPU layer list, with the weights uploaded.
enum DevLayer {
    Clamp,
    Conv(DevConv),
    Relu,
    Mem {
        convs: Box<[DevConv; 3]>,
        skip: Option<DevConv>,
        slot: usize,
    },
    Up,
    TGrow {
        conv: DevConv,
        stride: usize,
    },
}

/// An NHWC bf16 (or, for the last conv, f32) frame on the device; `owned`: from the pool.
#[derive(Clone, Copy)]
struct Frame {
    ptr: DevPtr,
    bytes: usize,
    c: usize,
    h: usize,
    w: usize,
    owned: bool,
}

/// Decoded frames of one pushed block, as they come back from the device.
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
    /// `[T][3][H][W]` f32 in about [-1, 1], when asked for.
    pub f32: Option<Vec<f32>>,
}

/// The stream state on the device: the MemBlock memories and the frames still to trim.
struct DevState {
    h: usize,
    w: usize,
    mem: Vec<Frame>,
    has_mem: Vec<bool>,
    to_trim: usize,
}

/// A TAEHV decoder on a device (see the module docs).
pub struct CudaDecoder {
    gpu: Gpu,
    layers: Vec<DevLayer>,
    z_dim: usize,
    up: usize,
    trim: usize,
    t_up: usize,
    mem_dims: Vec<(usize, usize)>,
    /// Every weight allocation (freed with the device).
    weights: Vec<DevPtr>,
    /// Free activation buffers (bytes, pointer).
    pool: Vec<(usize, DevPtr)>,
    /// Bytes of device memory allocated for activations and state.
    pool_bytes: usize,
    state: Option<DevState>,
}

fn launch_err(e: crate::kernels::LaunchError) -> Error {
    Error::InvalidArgument(format!("{}: {}", e.kernel, e.message))
}

impl CudaDecoder {
    /// Uploads `dec`'s weights to `gpu`. Only TAEHV runs on the device so far; the Wan VAE is a
    /// clear error.
    pub fn new(dec: &Decoder, mut gpu: Gpu) -> Result<CudaDecoder> {
        let t: &Taehv = match &dec.inner {
            Inner::Taehv(t) => t,
            Inner::Wan(_) => {
                return Err(Error::invalid(format!(
                    "the {} decoder does not run on the CUDA device yet (TAEHV does); decode on \
                     the CPU",
                    DecoderKind::WanVae
                )))
            }
        };
        let mut weights = Vec::new();
        let mut up = |gpu: &mut Gpu, c: &super::conv::Conv| -> Result<DevConv> {
            let packed = c.packed_bf16();
            let w = gpu.alloc(2 * packed.len())?;
            weights.push(w);
            gpu.upload(w, &packed)?;
            let bias = match c.bias() {
                Some(b) => {
                    let p = gpu.alloc(4 * b.len())?;
                    weights.push(p);
                    gpu.upload(p, b)?;
                    p
                }
                None => 0,
            };
            // Uploads are asynchronous: the host copies must live until the device has them.
            gpu.sync()?;
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
        };
        let mut layers = Vec::with_capacity(t.layers.len());
        for l in &t.layers {
            layers.push(match l {
                Layer::Clamp => DevLayer::Clamp,
                Layer::Relu => DevLayer::Relu,
                Layer::Up => DevLayer::Up,
                Layer::Conv(c) => DevLayer::Conv(up(&mut gpu, c)?),
                Layer::TGrow { conv, stride } => DevLayer::TGrow {
                    conv: up(&mut gpu, conv)?,
                    stride: *stride,
                },
                Layer::Mem { convs, skip, slot } => DevLayer::Mem {
                    convs: Box::new([
                        up(&mut gpu, &convs[0])?,
                        up(&mut gpu, &convs[1])?,
                        up(&mut gpu, &convs[2])?,
                    ]),
                    skip: match skip {
                        Some(s) => Some(up(&mut gpu, s)?),
                        None => None,
                    },
                    slot: *slot,
                },
            });
        }
        if !matches!(layers.first(), Some(DevLayer::Clamp)) {
            return Err(Error::Internal(
                "TAEHV layer list must start with Clamp".into(),
            ));
        }
        Ok(CudaDecoder {
            gpu,
            layers,
            z_dim: t.z_dim,
            up: t.up,
            trim: t.trim,
            t_up: t.t_up,
            mem_dims: t.mem_dims.clone(),
            weights,
            pool: Vec::new(),
            pool_bytes: 0,
            state: None,
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// Bytes of device memory held for activations and stream state (weights not counted).
    pub fn activation_bytes(&self) -> usize {
        self.pool_bytes
    }

    /// Bytes of weights on the device.
    pub fn weight_allocations(&self) -> usize {
        self.weights.len()
    }

    /// Starts a stream of `latent_h x latent_w` latents (ending any previous one): the
    /// MemBlock memories are allocated here and carried across [`CudaDecoder::push`]es.
    pub fn begin(&mut self, latent_h: usize, latent_w: usize) -> Result<()> {
        if latent_h == 0 || latent_w == 0 || latent_h > 1024 || latent_w > 1024 {
            return Err(Error::invalid(format!(
                "latent size {latent_h}x{latent_w}: each side must be 1..=1024"
            )));
        }
        self.end()?;
        let mut mem = Vec::new();
        for &(c, s) in &self.mem_dims.clone() {
            let (h, w) = (latent_h * s, latent_w * s);
            mem.push(self.get(c, h, w, 2)?);
        }
        let n = mem.len();
        self.state = Some(DevState {
            h: latent_h,
            w: latent_w,
            mem,
            has_mem: vec![false; n],
            to_trim: self.trim,
        });
        Ok(())
    }

    /// Ends the stream: its memories go back to the pool.
    pub fn end(&mut self) -> Result<()> {
        if let Some(st) = self.state.take() {
            self.gpu.sync()?;
            for f in st.mem {
                self.put(f);
            }
        }
        Ok(())
    }

    /// Decodes the next `frames` latent frames `[frames, 16, h, w]` of the stream; returns their
    /// pixels (the stream's first 3 frames trimmed, as the CPU decoder does).
    pub fn push(&mut self, latents: &[f32], frames: usize, want_f32: bool) -> Result<DeviceFrames> {
        let Some(st) = self.state.as_ref() else {
            return Err(Error::invalid("push before begin: start a stream first"));
        };
        let (h, w) = (st.h, st.w);
        let per = self.z_dim * h * w;
        super::check_latents(latents, frames, (self.z_dim, h, w))?;
        let (ph, pw) = (h * self.up, w * self.up);
        let mut out = DeviceFrames {
            frames: 0,
            height: ph,
            width: pw,
            rgb: Vec::with_capacity(frames * self.t_up * ph * pw * 3),
            f32: want_f32.then(Vec::new),
        };
        let zbuf = self.gpu.alloc(4 * per.max(1))?;
        let r = (|| -> Result<()> {
            for z in latents.chunks(per) {
                self.gpu.upload(zbuf, z)?;
                let x = self.get(self.z_dim, h, w, 2)?;
                self.run(launch::dec_latent_in(
                    zbuf as *const f32,
                    x.ptr as *mut _,
                    self.z_dim,
                    h * w,
                    1,
                    std::ptr::null(),
                    std::ptr::null(),
                ))?;
                self.forward(1, x, false, &mut out)?;
                // The upload's host slice must outlive the copy.
                self.gpu.sync()?;
            }
            Ok(())
        })();
        self.gpu.sync()?;
        self.gpu.free(zbuf)?;
        r?;
        Ok(out)
    }

    fn run<P>(&self, l: LaunchResult<Launch<P>>) -> Result<()> {
        let l = l.map_err(launch_err)?;
        // SAFETY: every launch of this module is built over device buffers allocated here with
        // the sizes its frames need (`get`), and weights uploaded with their conv's shape.
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

    fn put(&mut self, f: Frame) {
        if f.owned {
            self.pool.push((f.bytes, f.ptr));
        }
    }

    /// `conv` over `srcs` into a new `cout x h x w` frame (f32 when `f32`).
    fn conv(
        &mut self,
        cv: &DevConv,
        srcs: &[(Frame, usize, bool)],
        (h, w): (usize, usize),
        res: Option<Frame>,
        act: u32,
        f32: bool,
    ) -> Result<Frame> {
        let y = self.get(cv.shape.cout, h, w, if f32 { 4 } else { 2 })?;
        self.conv_into(cv, srcs, (h, w), res, act, (y, f32, cv.shape.cout))?;
        Ok(y)
    }

    fn conv_into(
        &mut self,
        cv: &DevConv,
        srcs: &[(Frame, usize, bool)],
        hw: (usize, usize),
        res: Option<Frame>,
        act: u32,
        (y, f32, split): (Frame, bool, usize),
    ) -> Result<()> {
        let ls: Vec<ConvSource> = srcs
            .iter()
            .map(|&(f, c0, up)| ConvSource {
                x: f.ptr as *const _,
                channels: f.c,
                stride: f.c,
                c0,
                t: 0,
                up,
            })
            .collect();
        self.run(launch::conv(
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
                out: y.ptr as *mut _,
                f32,
                stride: split,
                split,
                frame_stride: split * hw.0 * hw.1,
            },
        ))
    }

    /// Runs frame `x` through layers `from..` (depth first after each TGrow, as the CPU does);
    /// finished frames go to `out`.
    fn forward(
        &mut self,
        from: usize,
        mut x: Frame,
        mut pending: bool,
        out: &mut DeviceFrames,
    ) -> Result<()> {
        let layers = std::mem::take(&mut self.layers);
        let r = self.walk(&layers, from, &mut x, &mut pending, out);
        self.layers = layers;
        r
    }

    fn walk(
        &mut self,
        layers: &[DevLayer],
        from: usize,
        x: &mut Frame,
        pending: &mut bool,
        out: &mut DeviceFrames,
    ) -> Result<()> {
        let mut i = from;
        while i < layers.len() {
            let layer = &layers[i];
            if *pending && matches!(layer, DevLayer::Mem { .. } | DevLayer::Up | DevLayer::Clamp) {
                *x = self.upsample(*x)?;
                *pending = false;
            }
            match layer {
                // Applied by `bc_dec_latent_in` (always layer 0).
                DevLayer::Clamp => {}
                // Fused into the conv before it (`Conv, Relu` is the only place it occurs).
                DevLayer::Relu => {}
                DevLayer::Up => *pending = true,
                DevLayer::Conv(cv) => {
                    let relu = matches!(layers.get(i + 1), Some(DevLayer::Relu));
                    let last = i + 1 == layers.len();
                    let (h, w) = if *pending {
                        (2 * x.h, 2 * x.w)
                    } else {
                        (x.h, x.w)
                    };
                    let act = if relu { BC_ACT_RELU } else { BC_ACT_NONE };
                    let y = self.conv(cv, &[(*x, 0, *pending)], (h, w), None, act, last)?;
                    self.put(*x);
                    *x = y;
                    *pending = false;
                }
                DevLayer::TGrow { conv, stride } => {
                    let c = x.c;
                    let mut y = self.get(conv.shape.cout, x.h, x.w, 2)?;
                    y.c = c;
                    self.conv_into(
                        conv,
                        &[(*x, 0, false)],
                        (x.h, x.w),
                        None,
                        BC_ACT_NONE,
                        (y, false, c),
                    )?;
                    self.put(*x);
                    for f in 0..*stride {
                        let mut part = y;
                        part.ptr = y.ptr + (2 * f * c * x.h * x.w) as u64;
                        part.owned = false;
                        let mut pend = *pending;
                        self.walk(layers, i + 1, &mut part, &mut pend, out)?;
                    }
                    self.put(y);
                    return Ok(());
                }
                DevLayer::Mem { convs, skip, slot } => {
                    let st = self
                        .state
                        .as_ref()
                        .ok_or_else(|| Error::Internal("no stream".into()))?;
                    let (mem, has) = (st.mem[*slot], st.has_mem[*slot]);
                    let hw = (x.h, x.w);
                    let mut srcs = vec![(*x, 0, false)];
                    if has {
                        srcs.push((Frame { c: x.c, ..mem }, x.c, false));
                    }
                    let a = self.conv(&convs[0], &srcs, hw, None, BC_ACT_RELU, false)?;
                    let b = self.conv(&convs[1], &[(a, 0, false)], hw, None, BC_ACT_RELU, false)?;
                    self.put(a);
                    let sk = match skip {
                        Some(s) => {
                            Some(self.conv(s, &[(*x, 0, false)], hw, None, BC_ACT_NONE, false)?)
                        }
                        None => None,
                    };
                    let y = self.conv(
                        &convs[2],
                        &[(b, 0, false)],
                        hw,
                        Some(sk.unwrap_or(*x)),
                        BC_ACT_RELU,
                        false,
                    )?;
                    self.put(b);
                    if let Some(s) = sk {
                        self.put(s);
                    }
                    // The memory is the block's input (stream-ordered after conv 0 read the old one).
                    self.gpu.copy(mem.ptr, x.ptr, 2 * x.c * x.h * x.w)?;
                    if let Some(st) = self.state.as_mut() {
                        st.has_mem[*slot] = true;
                    }
                    self.put(*x);
                    *x = y;
                }
            }
            i += 1;
        }
        if *pending {
            *x = self.upsample(*x)?;
            *pending = false;
        }
        self.emit(*x, out)
    }

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

    /// A finished f32 frame (`[hw][3]`): `2x - 1`, to the host as RGB8 (and f32), unless trimmed.
    fn emit(&mut self, x: Frame, out: &mut DeviceFrames) -> Result<()> {
        let trim = self.state.as_ref().is_some_and(|s| s.to_trim > 0);
        if trim {
            if let Some(st) = self.state.as_mut() {
                st.to_trim -= 1;
            }
            self.put(x);
            return Ok(());
        }
        let hw = x.h * x.w;
        let rgb = self.get(3, x.h, x.w, 1)?;
        let f = if out.f32.is_some() {
            Some(self.get(3, x.h, x.w, 4)?)
        } else {
            None
        };
        self.run(launch::dec_to_pixels(
            x.ptr as *const _,
            true,
            hw,
            3,
            (2.0, -1.0),
            false,
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

impl Drop for CudaDecoder {
    fn drop(&mut self) {
        // Everything is freed with the device; stop any work in flight first.
        let _ = self.gpu.sync();
    }
}
