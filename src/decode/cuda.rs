//! Both decoders on a CUDA device (a GPU through the driver, or the emulated device in CI): the
//! same layer walks as the CPU decoders (depth first, one frame per level alive; by default
//! in blocks of up to [`CHUNK_LATENTS`] latent frames, each layer one launch over all their
//! frames: `cuda/taehv.rs`, `cuda/wan.rs`, docs/decoders.md), with every convolution on `cuda/conv.cu`
//! and the small ops on `cuda/decode_ops.cu`.
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
//! `[T][3][H][W]` when asked, each written to one block buffer and downloaded once.
//!
//! CUDA graphs: once a stream's causal state is full (every time tap taken), a latent frame's
//! walk depends only on which ring slot holds each Wan VAE cache's older frame
//! (`State::graph_key`), so it is captured once per key (planned first on the pool, then
//! captured on exactly the planned buffers, which the pool keeps) and replayed for every later
//! frame with that key: TAEHV one graph, the Wan VAE two (the latent-resolution caches
//! alternate), per output kind. The latent input kernel runs before each replay (the latents'
//! address changes), and the pixels land in fixed per-stream buffers copied into the block
//! buffer after it. The first frames of a stream run eagerly; a failed capture falls back to
//! eager for the decoder, with the reason kept ([`CudaDecoder::graph_failure`]). Bit-identical
//! to the eager walk: the same launches on the same kind of buffers (tests/decode_graphs.rs).
//!
//! Precision: bf16 activations, weights and caches, f32 accumulation; the last conv writes f32.
//! Against upstream's golden output within 2e-2 relative L2 (tests/decode_cuda_emulated.rs).

mod profile;
mod taehv;
mod wan;

pub use profile::{by_kernel, KernelTime};

use super::conv::Conv;
use super::{DecodeDevice, Decoder, Inner};
use crate::backend::cuda::device::{env_flag, DevPtr, Gpu, Graph, Mark};
use crate::kernels::launch::{self, ConvEpilogue, ConvOut, ConvShape, ConvSource, Launch};
use crate::kernels::{Kernel, LaunchResult};
use crate::tune::apply::{self, TuningSource};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One convolution's weights on the device (or any bf16 `[cout][k]` matrix used as weights).
#[derive(Clone, Copy)]
struct DevConv {
    w: DevPtr,
    bias: DevPtr,
    shape: ConvShape,
    /// An upsample conv's weights in the sub-pixel form (`[4][cout][2][2][cin]` bf16,
    /// `Conv::parity_packed_bf16`); 0: none.
    parity: DevPtr,
}

/// NHWC frames on the device (`n` of them, one after the other, each `[h*w][c]`, bf16, or f32
/// for a last conv) at `ptr`, inside the buffer at `base` of `bytes` (`base` < `ptr` when the
/// buffer holds leading frames before them: a MemBlock's past); `owned`: a pool buffer (a view
/// into another frame is not).
#[derive(Clone, Copy)]
struct Frame {
    ptr: DevPtr,
    base: DevPtr,
    bytes: usize,
    c: usize,
    h: usize,
    w: usize,
    n: usize,
    owned: bool,
}

impl Frame {
    /// A view of one frame of `c` channels at `ptr` inside a buffer owned elsewhere.
    fn view(ptr: DevPtr, c: usize, h: usize, w: usize) -> Frame {
        Frame {
            ptr,
            base: ptr,
            bytes: 2 * c * h * w,
            c,
            h,
            w,
            n: 1,
            owned: false,
        }
    }

    /// Bytes of one of its bf16 frames.
    fn frame_bytes(&self) -> usize {
        2 * self.c * self.h * self.w
    }

    /// Views of its bf16 frames in order, in groups of `g` (the last may be shorter): a block
    /// walk's frames going on in groups. Only the first group keeps the buffer's spare leading
    /// frames (`base`).
    fn groups(self, g: usize) -> impl Iterator<Item = Frame> {
        let fb = self.frame_bytes() as u64;
        let g = g.max(1);
        (0..self.n).step_by(g).map(move |k| {
            let ptr = self.ptr + k as u64 * fb;
            Frame {
                ptr,
                base: if k == 0 { self.base } else { ptr },
                n: g.min(self.n - k),
                owned: false,
                ..self
            }
        })
    }
}

/// Frames per group when a block walk's `n` frames of `rows` GEMM rows each go on in even
/// groups of at most `bound` rows (about: at least one frame a group, at most `n` groups).
fn group_frames(n: usize, rows: usize, bound: usize) -> usize {
    let n = n.max(1);
    let groups = (n * rows).div_ceil(bound.max(1)).clamp(1, n);
    n.div_ceil(groups)
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

/// How [`Dev`] runs a layer walk.
enum Mode {
    /// Buffers from the pool, work launched.
    Live,
    /// Planning a capture: buffers from the pool as in `Live` (allocated when the pool has
    /// none that fits), nothing launched; every buffer handed out is recorded, in order.
    Plan(Vec<Frame>),
    /// Capturing: `get` hands out the planned buffers in order (the pool is not touched, so
    /// nothing is allocated inside the capture, which a GPU forbids), `put` keeps nothing.
    Script(Vec<Frame>, usize),
    /// Measuring: as `Plan`, but a buffer the pool lacks is counted, not allocated (a stand-in
    /// address), and every launch or copy that would run is counted in `Dev::measured`.
    Measure(DevPtr),
}

/// Where [`Dev::emit`] writes the pixel frames of the latent frame being decoded: fixed
/// buffers of the stream, so a captured walk writes them at the same place every replay.
#[derive(Clone, Copy, Default)]
struct Sink {
    /// `[cap][hw][3]` RGB8.
    rgb: DevPtr,
    /// `[cap][3][hw]` f32 (0: not asked for).
    f32: DevPtr,
    /// Pixels per frame.
    hw: usize,
    /// Pixel frames one latent frame can give.
    cap: usize,
    /// Pixel frames written for the current latent frame.
    n: usize,
}

/// A device handle, the bytes of weights uploaded through it, and its activation pool.
struct Dev {
    /// Events around every live launch, copy and memset while profiling
    /// ([`CudaDecoder::set_profiling`]); declared before `gpu`, so that its events are dropped
    /// while the device's context still exists.
    profile: Option<profile::Recorder>,
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
    /// Live, planning or capturing.
    mode: Mode,
    /// The current latent frame's pixel output.
    sink: Sink,
    /// Work submitted to the stream: launches, copies, memsets, uploads, graph replays.
    submits: u64,
    /// Of `flops`, those launched on `bc_conv_wgmma` (any of its channel tiles).
    wgmma_flops: f64,
    /// Convolutions that fit it run `bc_conv_wgmma` (Hopper; see [`conv_wgmma_default`]).
    conv_wgmma: bool,
    /// With `conv_wgmma`, those that fit it run its TMA variant `bc_conv_wgmma_tma` (plain
    /// sources; see [`conv_tma_default`]).
    conv_tma: bool,
    /// With `conv_wgmma`, the convolutions run its warp-specialized variant
    /// `bc_conv_wgmma_ws` instead (see [`conv_ws_default`]; the TMA variant still takes those
    /// that fit it when `conv_tma` is on).
    conv_ws: bool,
    /// With `conv_wgmma`, the convolutions that fit it ([`launch::conv_halo_fits`]: TAEHV's 3x3
    /// convs to 64 channels over one or two 64-channel sources or one of 128, plain or
    /// upsampled) run the persistent halo conv `bc_conv_halo_n64` instead (see
    /// [`conv_halo_default`]).
    conv_halo: bool,
    /// Upsample convs run in the sub-pixel (parity) form (see [`conv_parity_default`]).
    conv_parity: bool,
    /// The tuning entry applied to the conv flags, as its stderr line says.
    tuning: Option<String>,
    /// The tile counter pair of `bc_conv_halo_n64` (`BcConvParams::tile_counter`: two u32,
    /// zeroed once when allocated; every launch leaves them zero, and all of this decoder's
    /// launches are ordered on its stream, so they share it, captured graphs too).
    halo_counter: DevPtr,
    /// Launches and copies a `Mode::Measure` walk would have submitted.
    measured: u64,
    /// Both decoders decode a push's latent frames in blocks of up to [`CHUNK_LATENTS`], each
    /// layer one launch over all of a block's frames (see [`frame_batching_default`]); else one
    /// latent frame at a time.
    batch: bool,
    /// The block walk's bound on GEMM rows (pixels x frames) per launch past a TAEHV `TGrow`
    /// or a Wan VAE upsample ([`BLOCK_ROWS`]).
    block_rows: usize,
}

/// GEMM rows (output pixels of all the frames) the block walk gives a launch at most (about)
/// past a TAEHV `TGrow` or a Wan VAE upsample, where it goes on in groups of frames (a frame's
/// pixels at least): 2^19 rows are 4096 blocks of 128 pixels, ten and more waves on a 132-SM
/// GPU. At 480x832 (latents 60x104) a 3-latent-frame block of TAEHV runs its first two stages
/// (6240 and 24960 pixels a frame) in one launch per layer, the third (99840) in 2 groups of 3
/// frames and the full resolution (399360) in 6 of 2; the Wan VAE runs 60x104 and 120x208 in
/// one launch per layer, 240x416 in 3 groups of 4 frames, 480x832 one frame at a time. So the
/// activations stay near a few hundred MiB (TAEHV) or about a GiB (the Wan VAE).
pub const BLOCK_ROWS: usize = 1 << 19;

/// Whether a new decoder batches frames (the block walk): yes unless
/// `BC_DECODE_PER_FRAME=1` (the frame-at-a-time walk, kept to compare with: same bits).
fn frame_batching_default() -> bool {
    !env_flag("BC_DECODE_PER_FRAME")
}

/// Whether a new decoder runs its nearest-upsample + 3x3 convs in the sub-pixel (parity) form
/// (2x2 taps per output pixel instead of 3x3): yes unless `BC_CONV_PARITY=0`.
fn conv_parity_default() -> bool {
    super::conv::parity_from_env()
}

/// Whether a new decoder's wgmma convolutions use the TMA variant (`bc_conv_wgmma_tma`): only
/// with `BC_CONV_TMA=1` (opt-in: on the first GPU run, H200 2026-12-04, the TMA probe's first
/// raw copy stopped with an illegal instruction, so the TMA path is unproven on hardware).
fn conv_tma_default(gpu: &Gpu) -> bool {
    std::env::var("BC_CONV_TMA").is_ok_and(|v| v.trim() == "1") && conv_wgmma_default(gpu)
}

/// Whether a new decoder's wgmma convolutions use the warp-specialized variant
/// `bc_conv_wgmma_ws` (`cuda/conv_ws.cu`: the same output bits): only with
/// `BC_CONV_WGMMA_VARIANT=ws` (opt-in until a GPU has measured it; `base` or unset: the
/// default `bc_conv_wgmma`; anything else is an error).
fn conv_ws_default(gpu: &Gpu) -> Result<bool> {
    let v = std::env::var("BC_CONV_WGMMA_VARIANT").ok();
    let variant = launch::ConvWgmmaVariant::parse(v.as_deref()).map_err(Error::invalid)?;
    Ok(variant == launch::ConvWgmmaVariant::Ws && conv_wgmma_default(gpu))
}

/// Whether a new decoder's wgmma convolutions that fit it use the persistent halo conv
/// `bc_conv_halo_n64` (`cuda/conv_halo.cu`: the same output bits as `bc_conv_wgmma_n64` under
/// the emulation): only with `BC_CONV_HALO=1` (opt-in: it has never run on a GPU).
fn conv_halo_default(gpu: &Gpu) -> bool {
    std::env::var("BC_CONV_HALO").is_ok_and(|v| v.trim() == "1") && conv_wgmma_default(gpu)
}

/// Whether a new decoder on `gpu` runs its convolutions on the Hopper wgmma kernel
/// (`bc_conv_wgmma`): by default on a compute capability 9.0 device, unless `BC_CONV_WGMMA=0`
/// (elsewhere never). The default comes from the first GPU run (H200, 2026-12-04): the layout
/// probe passed, both golden videos matched (9.9e-3 / 1.3e-2), every conv layer's output
/// equalled `bc_conv`'s, and a Wan VAE block at 480x832 took 168.8 ms against 307.4.
fn conv_wgmma_default(gpu: &Gpu) -> bool {
    !std::env::var("BC_CONV_WGMMA").is_ok_and(|v| v.trim() == "0")
        && gpu.compute_capability() == Some((9, 0))
}

/// The conv choices of `gpu`'s tuning entry from `source` that the environment leaves open
/// ([`crate::tune::apply::conv_tuning`]), with the line that says what was applied (printed
/// once to stderr); `None` without an entry.
fn conv_tuning(gpu: &Gpu, source: &TuningSource) -> Result<Option<(apply::ConvTuning, String)>> {
    let Some(a) = apply::load(gpu, source)? else {
        return Ok(None);
    };
    let t = apply::conv_tuning(&a.parsed, &apply::env_set);
    let line = apply::describe(&a, &t.notes);
    apply::note(&line);
    Ok(Some((t, line)))
}

impl Dev {
    fn new(mut gpu: Gpu) -> Result<Dev> {
        let conv_wgmma = conv_wgmma_default(&gpu);
        let conv_tma = conv_tma_default(&gpu);
        let conv_ws = conv_ws_default(&gpu)?;
        let conv_halo = conv_halo_default(&gpu);
        let halo_counter = gpu.alloc(8)?;
        gpu.memset(halo_counter, 0, 8)?;
        Ok(Dev {
            tuning: None,
            gpu,
            weight_bytes: 0,
            pool: Vec::new(),
            pool_bytes: 0,
            flops: 0.0,
            wgmma_flops: 0.0,
            nonfinite: 0,
            mode: Mode::Live,
            sink: Sink::default(),
            submits: 0,
            conv_wgmma,
            conv_tma,
            conv_ws,
            conv_halo,
            conv_parity: conv_parity_default(),
            halo_counter,
            measured: 0,
            batch: frame_batching_default(),
            block_rows: BLOCK_ROWS,
            profile: None,
        })
    }

    /// Whether launches are skipped (planning or measuring a walk).
    fn planning(&self) -> bool {
        matches!(self.mode, Mode::Plan(_) | Mode::Measure(_))
    }

    /// Counts a submission a measured walk skips.
    fn count_skipped(&mut self) {
        if matches!(self.mode, Mode::Measure(_)) {
            self.measured += 1;
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
        let parity = if c.has_parity() {
            self.upload(&c.parity_packed_bf16())?
        } else {
            0
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
                parity: false,
            },
            parity,
        })
    }

    fn run<P>(&mut self, l: LaunchResult<Launch<P>>) -> Result<()> {
        let l = l.map_err(|e| Error::InvalidArgument(format!("{}: {}", e.kernel, e.message)))?;
        if self.planning() {
            self.count_skipped();
            return Ok(());
        }
        self.submits += 1;
        // SAFETY: every launch of the device decoder is built over device buffers allocated
        // by `get` with the sizes its frames need, and weights uploaded with their shapes.
        let launch = |g: &Gpu| unsafe { g.launch(l.kernel, l.grid, l.block, &l.params) };
        self.submit(l.kernel.name(), l.grid, launch)
    }

    /// Runs `work` on the stream, between profiling events when profiling a live walk.
    fn submit(
        &mut self,
        name: &'static str,
        grid: [u32; 3],
        work: impl FnOnce(&Gpu) -> Result<()>,
    ) -> Result<()> {
        match self.profile.as_mut() {
            Some(p) if matches!(self.mode, Mode::Live) => p.around(&self.gpu, name, grid, work),
            _ => work(&self.gpu),
        }
    }

    /// A device-to-device copy in stream order (none while planning).
    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        if self.planning() {
            self.count_skipped();
            return Ok(());
        }
        self.submits += 1;
        self.submit("copy", [0; 3], |g| g.copy(dst, src, bytes))
    }

    /// Zeroes `bytes` at `dst` in stream order (none while planning).
    fn memset(&mut self, dst: DevPtr, bytes: usize) -> Result<()> {
        if self.planning() {
            self.count_skipped();
            return Ok(());
        }
        self.submits += 1;
        self.submit("memset", [0; 3], |g| g.memset(dst, 0, bytes))
    }

    /// A pool buffer for a `c x h x w` frame of `elem`-byte values (while capturing: the
    /// planned one).
    fn get(&mut self, c: usize, h: usize, w: usize, elem: usize) -> Result<Frame> {
        self.get_n(c, h, w, elem, 1, 0)
    }

    /// A pool buffer for `n` frames of `c x h x w` `elem`-byte values after `lead` more frames
    /// (the returned frames start after them); while capturing, the planned one.
    fn get_n(
        &mut self,
        c: usize,
        h: usize,
        w: usize,
        elem: usize,
        n: usize,
        lead: usize,
    ) -> Result<Frame> {
        let one = c * h * w * elem;
        let bytes = one * (n + lead);
        let at = |f: Frame| Frame {
            c,
            h,
            w,
            n,
            ptr: f.base + (lead * one) as u64,
            ..f
        };
        if let Mode::Script(plan, i) = &mut self.mode {
            let f = plan.get(*i).copied().filter(|f| f.bytes >= bytes);
            let f = f.ok_or_else(|| {
                Error::Internal("a captured decoder walk left its planned buffers".into())
            })?;
            *i += 1;
            return Ok(at(f));
        }
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
                let ptr = match &mut self.mode {
                    Mode::Measure(next) => {
                        // Stand-in addresses, 256-byte aligned as the driver's.
                        let p = *next;
                        *next += bytes.div_ceil(256) as u64 * 256;
                        p
                    }
                    _ => self.gpu.alloc(bytes)?,
                };
                (bytes, ptr)
            }
        };
        let f = at(Frame {
            ptr,
            base: ptr,
            bytes,
            c,
            h,
            w,
            n,
            owned: true,
        });
        if let Mode::Plan(plan) = &mut self.mode {
            plan.push(f);
        }
        Ok(f)
    }

    /// Returns a buffer to the pool (later launches reuse it, in stream order).
    fn put(&mut self, f: Frame) {
        if f.owned && !matches!(self.mode, Mode::Script(..)) {
            self.pool.push((f.bytes, f.base));
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

    /// [`Dev::conv`] over `n` frames in one launch (`srcs` and `res` hold `n` frames each) into
    /// a new `n`-frame buffer after `lead` spare frames.
    #[allow(clippy::too_many_arguments)]
    fn conv_n(
        &mut self,
        cv: &DevConv,
        srcs: &[In],
        (h, w): (usize, usize),
        res: Option<Frame>,
        act: u32,
        f32: bool,
        (n, lead): (usize, usize),
    ) -> Result<Frame> {
        let c = cv.shape.cout;
        let y = self.get_n(c, h, w, if f32 { 4 } else { 2 }, n, lead)?;
        self.conv_frames(cv, srcs, (h, w), res, act, (y.ptr, f32, c, 1), n)?;
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
        out: (DevPtr, bool, usize, usize),
    ) -> Result<()> {
        self.conv_frames(cv, srcs, hw, res, act, out, 1)
    }

    /// [`Dev::conv_into`] over `frames` frames in one launch (`ConvOut::frames`: each source
    /// and the residual hold that many frames, one after the other; frame `f` writes output
    /// frames `f * (cout / split)` on).
    #[allow(clippy::too_many_arguments)]
    fn conv_frames(
        &mut self,
        cv: &DevConv,
        srcs: &[In],
        hw: (usize, usize),
        res: Option<Frame>,
        act: u32,
        (out, f32, split, cstride): (DevPtr, bool, usize, usize),
        frames: usize,
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
        // An upsample conv in the sub-pixel form: 2x2 taps per output pixel.
        let parity = self.conv_parity && cv.parity != 0 && srcs.iter().all(|s| s.up);
        let (w, shape, taps) = if parity {
            let shape = ConvShape {
                parity: true,
                ..cv.shape
            };
            (cv.parity, shape, 4)
        } else {
            (cv.w, cv.shape, cv.shape.kh * cv.shape.kw)
        };
        let k: usize = srcs.iter().map(|s| s.f.c).sum::<usize>() * taps;
        let flops = 2.0 * (frames * pixels) as f64 * cv.shape.cout as f64 * k as f64;
        let planning = self.planning();
        if !planning {
            self.flops += flops;
        }
        let l = launch::conv_on(
            &ls,
            w as *const _,
            shape,
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
                frames,
            },
            self.conv_wgmma,
        );
        let wg = |k| {
            matches!(
                k,
                Kernel::ConvWgmma | Kernel::ConvWgmmaN96 | Kernel::ConvWgmmaN64
            )
        };
        if !planning && l.as_ref().is_ok_and(|l| wg(l.kernel)) {
            self.wgmma_flops += flops;
        }
        if let Ok(l) = &l {
            let tma = self.conv_tma && launch::conv_tma_fits(l);
            if self.conv_halo && launch::conv_halo_fits(l) {
                // One persistent block per SM (the emulated device counts 1); a block per
                // tile if the driver could not tell.
                let ctas = u32::try_from(self.gpu.sm_count())
                    .ok()
                    .filter(|&c| c > 0)
                    .unwrap_or(u32::MAX);
                let ctr = self.halo_counter as *mut u32;
                return self.run(launch::conv_halo(*l, ctas, ctr));
            }
            if self.conv_ws && !tma && wg(l.kernel) {
                return self.run(launch::conv_ws(*l));
            }
            if tma {
                if planning {
                    self.count_skipped();
                    return Ok(());
                }
                // The tensor maps hold the frames' addresses (a captured walk launches with the
                // same buffers).
                let maps = launch::conv_tma_specs(l)
                    .iter()
                    .map(|(spec, addr)| self.gpu.encode_tensor_map(spec, *addr))
                    .collect::<Result<Vec<_>>>()?;
                return self.run(launch::conv_tma(*l, &maps));
            }
        }
        self.run(l)
    }

    /// Channel RMS norm (then SiLU when `silu`) of `x`'s frames into a new buffer, after
    /// `lead` spare frames (one launch: the norm is per pixel).
    fn rms_norm(&mut self, x: Frame, gamma: DevPtr, silu: bool, lead: usize) -> Result<Frame> {
        let y = self.get_n(x.c, x.h, x.w, 2, x.n, lead)?;
        self.run(launch::dec_rms_norm(
            x.ptr as *const _,
            y.ptr as *mut _,
            gamma as *const f32,
            x.n * x.h * x.w,
            x.c,
            silu,
        ))?;
        Ok(y)
    }

    /// Nearest 2x upsample of `x` (which goes back to the pool).
    fn upsample(&mut self, x: Frame) -> Result<Frame> {
        self.upsample_n(x, 0)
    }

    /// Nearest 2x upsample of `x`'s `n` frames in one launch (the frames stacked are one
    /// `n*h x w` image: rows never mix) into a new buffer after `lead` spare frames; `x` goes
    /// back to the pool.
    fn upsample_n(&mut self, x: Frame, lead: usize) -> Result<Frame> {
        let y = self.get_n(x.c, 2 * x.h, 2 * x.w, 2, x.n, lead)?;
        self.run(launch::dec_upsample2x(
            x.ptr as *const _,
            y.ptr as *mut _,
            std::ptr::null_mut(),
            x.n * x.h,
            x.w,
            x.c,
        ))?;
        self.put(x);
        Ok(y)
    }

    /// The finished f32 frames of `x` (`[hw][3]` each) from frame `skip` on, each as
    /// [`Dev::emit`] does; `x` then goes back to the pool.
    fn emit_n(&mut self, x: Frame, skip: usize, affine: (f32, f32), clamp: bool) -> Result<()> {
        let per = 4 * x.c * x.h * x.w;
        for k in skip..x.n {
            let f = Frame {
                ptr: x.ptr + (k * per) as u64,
                n: 1,
                owned: false,
                ..x
            };
            self.emit(f, affine, clamp)?;
        }
        self.put(x);
        Ok(())
    }

    /// A finished f32 frame `[hw][3]`, `x * a + b` (clamped when `clamp`), into the next
    /// pixel frame of the sink: RGB8, and f32 when the sink has it.
    fn emit(&mut self, x: Frame, affine: (f32, f32), clamp: bool) -> Result<()> {
        let s = self.sink;
        let hw = x.h * x.w;
        if s.n >= s.cap || hw != s.hw {
            return Err(Error::Internal(
                "a latent frame gave more pixel frames than the decoder's output holds".into(),
            ));
        }
        let at = (s.n * 3 * hw) as u64;
        let f32 = match s.f32 {
            0 => std::ptr::null_mut(),
            p => (p + 4 * at) as *mut f32,
        };
        self.run(launch::dec_to_pixels(
            x.ptr as *const _,
            true,
            hw,
            3,
            affine,
            clamp,
            f32,
            (s.rgb + at) as *mut u8,
        ))?;
        self.put(x);
        self.sink.n += 1;
        Ok(())
    }
}

/// The model on the device.
enum Model {
    Taehv(taehv::DevTaehv),
    Wan(Box<wan::DevWan>),
}

impl Model {
    /// Latent frame `[16][h*w]` f32 at `z` (on any handle of the device) into the NHWC bf16
    /// frame `x` the walk starts from: TAEHV's clamp or the Wan VAE's un-normalisation, and
    /// the non-finite flag. Launched eagerly before each walk, so a graph never holds the
    /// latents' address.
    fn input(&self, dev: &mut Dev, z: DevPtr, x: Frame) -> Result<()> {
        match self {
            Model::Taehv(m) => m.input(dev, z, x),
            Model::Wan(m) => m.input(dev, z, x),
        }
    }

    /// Most pixel frames one latent frame gives (4 for both decoders).
    fn frames_per_latent(&self) -> usize {
        match self {
            Model::Taehv(m) => m.frames_per_latent(),
            Model::Wan(m) => m.frames_per_latent(),
        }
    }

    /// Latent frames one walk takes: up to [`CHUNK_LATENTS`] for the block walk (with
    /// `batch`), else 1.
    fn walk_frames(&self, batch: bool) -> usize {
        if batch {
            CHUNK_LATENTS
        } else {
            1
        }
    }
}

/// A stream's state on the device.
#[derive(Clone)]
enum State {
    Taehv(taehv::TaehvDevState),
    Wan(wan::WanDevState),
}

impl State {
    /// As after a stream's first frames (see the models' `make_steady`).
    fn make_steady(&mut self) {
        match self {
            State::Taehv(s) => s.make_steady(),
            State::Wan(s) => s.make_steady(),
        }
    }

    /// What a latent frame's walk depends on besides the buffers, once every causal conv
    /// takes all its time taps (the steady state); `None` before that (the first frames of a
    /// stream, decoded eagerly).
    fn graph_key(&self) -> Option<Vec<u8>> {
        match self {
            State::Taehv(s) => s.graph_key(),
            State::Wan(s) => s.graph_key(),
        }
    }
}

/// Decodes the `x.n` latent frames (one, unless the block walk) from their NHWC bf16 input
/// `x` (made by [`Model::input`]): eagerly, planned or captured, as the device's mode says.
fn walk(model: &Model, dev: &mut Dev, st: &mut State, x: Frame) -> Result<()> {
    match (model, st) {
        (Model::Taehv(m), State::Taehv(s)) if dev.batch => m.block(dev, s, x),
        (Model::Wan(m), State::Wan(s)) if dev.batch => m.decode(dev, s, x),
        _ if x.n != 1 => Err(Error::Internal(
            "a frame-at-a-time decoder walk was given several frames".into(),
        )),
        (Model::Taehv(m), State::Taehv(s)) => m.frame(dev, s, x),
        (Model::Wan(m), State::Wan(s)) => m.decode(dev, s, x),
        _ => Err(Error::Internal(
            "device decoder and stream state differ".into(),
        )),
    }
}

/// A captured latent frame's walk: replaying `graph` does what the walk did from the state it
/// was captured at, which then becomes `after`.
struct Captured {
    graph: Graph,
    after: State,
    /// Pixel frames it writes into the sink.
    frames: usize,
    /// Its convolution FLOPs.
    flops: f64,
    /// Of `flops`, those on the wgmma convolution.
    wgmma_flops: f64,
}

/// Most graphs a stream keeps (the Wan VAE needs 2 per output kind, TAEHV 1): a key beyond
/// them runs eagerly, so a stream's graphs stay bounded whatever it is pushed.
const MAX_GRAPHS: usize = 8;

/// Latent frames whose pixels one download brings back (a longer push downloads every this
/// many): bounds the device buffer of a block's pixels.
const CHUNK_LATENTS: usize = 4;

/// The stream's graphs and how the decoder has run so far.
struct Graphs {
    /// Capture and replay (`BC_NO_GRAPHS=1`, [`CudaDecoder::set_graphs`] and a failed
    /// capture turn it off).
    on: bool,
    map: HashMap<(Vec<u8>, bool), Captured>,
    failure: Option<String>,
    stats: DecodeStats,
    /// A test hook: the next capture fails.
    #[cfg(test)]
    fail_next: bool,
}

/// What one block of latent frames costs a [`CudaDecoder`] in the steady state of a stream,
/// counted by [`CudaDecoder::measure_block`] without running anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCost {
    /// Latent frames in the block.
    pub frames: usize,
    /// Walks (one per latent frame frame by frame; one per chunk of up to 4 latent frames with
    /// the block walk): each is one graph replay once graphs are captured.
    pub walks: usize,
    /// Kernel launches, copies and memsets the walks and the latent inputs submit (what one
    /// graph replay per walk holds, plus the input launches; not the pixel copies and
    /// downloads after each walk).
    pub submissions: u64,
    /// Device memory of the stream's causal state (TAEHV's memories, the Wan VAE's caches).
    pub state_bytes: usize,
    /// Device memory of the activation pool the walks need (its high-water mark, as a fresh
    /// decoder would allocate it; the fixed input, pixel and block buffers not counted).
    pub pool_bytes: usize,
    /// The fixed buffers for such a block: the walk's latent input, its pixel output and the
    /// block's pixels (RGB8, no f32).
    pub io_bytes: usize,
}

/// How a [`CudaDecoder`]'s pushes ran, counted since it was made: what the graphs save.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeStats {
    /// Latent frames decoded by launching each kernel (the first frames of every stream,
    /// everything with graphs off).
    pub eager_frames: u64,
    /// Latent frames decoded by replaying a captured graph.
    pub graph_frames: u64,
    /// Graphs captured.
    pub captures: u64,
    /// Work submitted to the device's stream: kernel launches, copies, memsets, uploads and
    /// graph replays (one each).
    pub submissions: u64,
    /// Downloads (pixel chunks and the non-finite flag).
    pub downloads: u64,
    /// Host seconds spent in pushes other than waiting for the device (downloads, syncs):
    /// the cost of enqueuing the work.
    pub enqueue_s: f64,
}

/// A decoder's fixed device buffers besides the pool: the input frame a walk reads, the
/// pixel frames it writes (both baked into captured graphs) and a block's pixels, downloaded
/// at once. Kept while the latent size stays the same.
#[derive(Default)]
struct Io {
    /// Latent size they are for.
    hw: (usize, usize),
    /// The walk's input, `[h*w][16]` bf16.
    x0: DevPtr,
    rgb: DevPtr,
    f32: DevPtr,
    /// `[blk_cap][hw][3]` RGB8 and `[blk_cap][3][hw]` f32 (0: none yet).
    blk_rgb: DevPtr,
    blk_f32: DevPtr,
    /// Pixel frames the block buffers hold.
    blk_cap: usize,
    bytes: usize,
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
        let mut dev = Dev::new(gpu)?;
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
    // Field order: the graphs go before the handle they were captured on; `dev` (the
    // stream's handle) is synced by `Drop` and dropped before the last hold on shared weights
    // goes.
    graphs: Graphs,
    dev: Dev,
    weights: Arc<DeviceWeights>,
    state: Option<(usize, usize, State)>,
    io: Io,
}

impl CudaDecoder {
    /// Uploads `dec`'s weights to `gpu`, for this decoder alone.
    pub fn new(dec: &Decoder, gpu: Gpu) -> Result<CudaDecoder> {
        let mut dev = Dev::new(gpu)?;
        let (model, z_dim, up) = upload_model(dec, &mut dev)?;
        let weights = Arc::new(DeviceWeights {
            model,
            z_dim,
            up,
            bytes: dev.weight_bytes,
            home: None,
        });
        CudaDecoder::with(dev, weights)
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
        CudaDecoder::with(Dev::new(gpu)?, weights)
    }

    /// The decoder over `dev` and `weights`, with this device's tuning entry applied
    /// ([`CudaDecoder::apply_tuning`] with [`TuningSource::Auto`]; a `Dev` that only uploads
    /// weights never reads the file).
    fn with(dev: Dev, weights: Arc<DeviceWeights>) -> Result<CudaDecoder> {
        let mut d = CudaDecoder {
            graphs: Graphs {
                on: !env_flag("BC_NO_GRAPHS"),
                map: HashMap::new(),
                failure: None,
                stats: DecodeStats::default(),
                #[cfg(test)]
                fail_next: false,
            },
            dev,
            weights,
            state: None,
            io: Io::default(),
        };
        d.apply_tuning(&TuningSource::Auto)?;
        Ok(d)
    }

    /// Turns the CUDA graphs of the steady state on or off (on by default, off with
    /// `BC_NO_GRAPHS=1`); the frames are the same bits either way. Turning them off drops
    /// the graphs captured so far.
    pub fn set_graphs(&mut self, on: bool) -> Result<()> {
        if !on {
            self.dev.gpu.sync()?;
            self.graphs.map.clear();
        }
        self.graphs.on = on;
        Ok(())
    }

    /// Starts or stops timing every launch, copy and memset of the following pushes (events
    /// around each, read by [`CudaDecoder::take_profile`]), to see where a block's time goes.
    /// Profiled walks run eagerly: starting turns the graphs off (as
    /// [`CudaDecoder::set_graphs`]`(false)`), stopping leaves them off, and events between the
    /// launches make a profiled block a little slower than the same block unprofiled.
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        if on {
            self.set_graphs(false)?;
            self.dev.profile.get_or_insert_with(Default::default);
        } else {
            self.dev.gpu.sync()?;
            self.dev.profile = None;
        }
        Ok(())
    }

    /// The device time of the work profiled since [`CudaDecoder::set_profiling`] or the last
    /// take, per kernel and grid, longest first (waits for the stream); empty when profiling
    /// is off.
    pub fn take_profile(&mut self) -> Result<Vec<KernelTime>> {
        match self.dev.profile.as_mut() {
            Some(p) => p.read(&self.dev.gpu),
            None => Ok(Vec::new()),
        }
    }

    /// Why graph capture failed on this decoder, if it did (it then decodes eagerly; the
    /// process-wide count is `backend::cuda::graph_capture_failures`).
    pub fn graph_failure(&self) -> Option<&str> {
        self.graphs.failure.as_deref()
    }

    /// How the pushes so far ran: frames decoded eagerly and by graph replays, work
    /// submitted, downloads, host enqueue time.
    pub fn stats(&self) -> DecodeStats {
        DecodeStats {
            submissions: self.dev.submits,
            ..self.graphs.stats
        }
    }

    /// Graphs the current stream holds.
    pub fn graph_count(&self) -> usize {
        self.graphs.map.len()
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
        self.dev.pool_bytes + self.io.bytes
    }

    /// Whether convolutions run the Hopper wgmma kernel `bc_conv_wgmma` where they fit (the
    /// default on a compute capability 9.0 device, unless `BC_CONV_WGMMA=0`).
    pub fn conv_wgmma(&self) -> bool {
        self.dev.conv_wgmma
    }

    /// An error when `on` asks for `what` (a Hopper kernel) on a device without wgmma (anything
    /// but compute capability 9.0 and the emulated device).
    fn need_hopper(&self, on: bool, what: &str) -> Result<()> {
        let gpu = &self.dev.gpu;
        if on && !gpu.is_emulated() && gpu.compute_capability() != Some((9, 0)) {
            return Err(Error::invalid(format!(
                "{what} needs a compute capability 9.0 device, not {}",
                gpu.name
            )));
        }
        Ok(())
    }

    /// Before a setting that changes which kernels a walk launches: waits for the work in flight
    /// and drops the captured decoder graphs (captured again at the next push) when `changed`.
    fn drop_graphs_if(&mut self, changed: bool) -> Result<()> {
        if changed {
            self.dev.gpu.sync()?;
            self.graphs.map.clear();
        }
        Ok(())
    }

    /// Turns the Hopper wgmma convolution on or off for the following launches (tests and
    /// benchmarks compare it with `bc_conv`): on is refused, with an error, on a device that has
    /// no wgmma (anything but compute capability 9.0 and the emulated device).
    pub fn set_conv_wgmma(&mut self, on: bool) -> Result<()> {
        self.need_hopper(on, "the wgmma convolution")?;
        // Captured walks launch the other kernel: capture them again.
        self.drop_graphs_if(self.dev.conv_wgmma != on)?;
        self.dev.conv_wgmma = on;
        Ok(())
    }

    /// Whether the decoder decodes blocks of latent frames at once (each layer one launch over
    /// all the frames of up to 4 latent frames; the default unless `BC_DECODE_PER_FRAME=1`)
    /// rather than one latent frame at a time. Same bits either way.
    pub fn frame_batching(&self) -> bool {
        self.dev.batch
    }

    /// Turns the block walk on or off for the following pushes (tests and benchmarks
    /// compare the two); captured graphs are dropped (and captured again) when it changes.
    pub fn set_frame_batching(&mut self, on: bool) -> Result<()> {
        self.drop_graphs_if(self.dev.batch != on)?;
        self.dev.batch = on;
        Ok(())
    }

    /// Sets the block walk's bound on GEMM rows per launch past a TAEHV `TGrow` or a Wan VAE
    /// upsample (default [`BLOCK_ROWS`]; at least 1: then every frame past the first goes on
    /// alone, as in the frame walk). Tests use small bounds to take the grouped path at small sizes;
    /// the bits are the same whatever the bound. Captured graphs are dropped when it changes.
    pub fn set_block_rows(&mut self, rows: usize) -> Result<()> {
        let rows = rows.max(1);
        self.drop_graphs_if(self.dev.block_rows != rows)?;
        self.dev.block_rows = rows;
        Ok(())
    }

    /// Whether the upsample convs run in the sub-pixel (parity) form (the default, unless
    /// `BC_CONV_PARITY=0`).
    pub fn conv_parity(&self) -> bool {
        self.dev.conv_parity
    }

    /// Turns the sub-pixel (parity) form of the upsample convs on or off for the following
    /// launches (tests and benchmarks compare the two); captured decoder graphs are dropped (and
    /// captured again) when it changes.
    pub fn set_conv_parity(&mut self, on: bool) -> Result<()> {
        self.drop_graphs_if(self.dev.conv_parity != on)?;
        self.dev.conv_parity = on;
        Ok(())
    }

    /// Whether the wgmma convolutions use the TMA variant `bc_conv_wgmma_tma` where it fits
    /// (plain sources; the default: `BC_CONV_TMA=1` with the wgmma conv on).
    pub fn conv_tma(&self) -> bool {
        self.dev.conv_tma
    }

    /// Turns the TMA variant of the wgmma convolution on or off (it applies only while
    /// [`CudaDecoder::set_conv_wgmma`] is on); on is refused where the wgmma conv is.
    pub fn set_conv_tma(&mut self, on: bool) -> Result<()> {
        self.need_hopper(on, "the TMA convolution")?;
        self.drop_graphs_if(self.dev.conv_tma != on)?;
        self.dev.conv_tma = on;
        Ok(())
    }

    /// Whether the wgmma convolutions run the warp-specialized variant `bc_conv_wgmma_ws`
    /// (`BC_CONV_WGMMA_VARIANT=ws`).
    pub fn conv_ws(&self) -> bool {
        self.dev.conv_ws
    }

    /// Turns the warp-specialized variant of the wgmma convolution on or off (it applies only
    /// while [`CudaDecoder::set_conv_wgmma`] is on, to the convolutions the TMA variant does
    /// not take); on is refused where the wgmma conv is.
    pub fn set_conv_ws(&mut self, on: bool) -> Result<()> {
        self.need_hopper(on, "the warp-specialized convolution")?;
        self.drop_graphs_if(self.dev.conv_ws != on)?;
        self.dev.conv_ws = on;
        Ok(())
    }

    /// Whether the convolutions that fit it run the persistent halo conv `bc_conv_halo_n64`
    /// (`BC_CONV_HALO=1`).
    pub fn conv_halo(&self) -> bool {
        self.dev.conv_halo
    }

    /// Turns the persistent halo conv `bc_conv_halo_n64` on or off (it applies only while
    /// [`CudaDecoder::set_conv_wgmma`] is on, to the convolutions
    /// [`launch::conv_halo_fits`] takes, before the TMA and warp-specialized variants); on is
    /// refused where the wgmma conv is.
    pub fn set_conv_halo(&mut self, on: bool) -> Result<()> {
        self.need_hopper(on, "the halo convolution")?;
        self.drop_graphs_if(self.dev.conv_halo != on)?;
        self.dev.conv_halo = on;
        Ok(())
    }

    /// Applies the conv choices of this device's entry in the tuning file `source` names
    /// (`blockcascade tune`; a new decoder on a real Hopper device applies
    /// [`TuningSource::Auto`] itself) where the environment leaves them open
    /// (`BC_CONV_WGMMA_VARIANT`, `BC_CONV_HALO` win), while the wgmma convolution is on. Returns
    /// what was applied (`None`: no entry, or the wgmma conv is off); a malformed file is an
    /// error naming it.
    pub fn apply_tuning(&mut self, source: &TuningSource) -> Result<Option<String>> {
        if !self.dev.conv_wgmma {
            return Ok(None);
        }
        let Some((t, line)) = conv_tuning(&self.dev.gpu, source)? else {
            return Ok(None);
        };
        if let Some(ws) = t.ws {
            self.set_conv_ws(ws)?;
        }
        if let Some(h) = t.halo {
            self.set_conv_halo(h)?;
        }
        self.dev.tuning = Some(line.clone());
        Ok(Some(line))
    }

    /// What the conv flags took from the tuning file (`tuning: FILE: DEVICE: conv=ws,
    /// conv_halo=off`); `None` when no entry applied.
    pub fn tuning(&self) -> Option<&str> {
        self.dev.tuning.as_deref()
    }

    /// Convolution FLOPs launched since the decoder was made (the work a benchmark divides by
    /// its time: every conv, 1x1 and attention GEMM, counted at the channels it really reads).
    pub fn flops(&self) -> f64 {
        self.dev.flops
    }

    /// Of [`CudaDecoder::flops`], the convolution FLOPs launched on the Hopper wgmma kernels
    /// `bc_conv_wgmma` / `bc_conv_wgmma_n96` / `bc_conv_wgmma_n64` (the rest ran `bc_conv` /
    /// `bc_conv_n16`).
    pub fn wgmma_flops(&self) -> f64 {
        self.dev.wgmma_flops
    }

    /// What decoding one block of `frames` latent frames of `latent_h x latent_w` costs in the
    /// steady state of a stream with the current walk ([`CudaDecoder::frame_batching`]),
    /// counted without launching or allocating anything: the walks are planned on a scratch
    /// pool with stand-in addresses. The decoder's stream, pool and graphs are left as they were.
    pub fn measure_block(
        &mut self,
        latent_h: usize,
        latent_w: usize,
        frames: usize,
    ) -> Result<BlockCost> {
        if latent_h == 0 || latent_w == 0 || frames == 0 || frames > MAX_DEVICE_FRAMES {
            return Err(Error::invalid(format!(
                "measure {frames} frames of {latent_h}x{latent_w}: all must be positive"
            )));
        }
        let (h, w) = (latent_h, latent_w);
        let pool = std::mem::take(&mut self.dev.pool);
        let (pool_bytes, sink) = (self.dev.pool_bytes, self.dev.sink);
        let (flops, wgmma_flops) = (self.dev.flops, self.dev.wgmma_flops);
        self.dev.pool_bytes = 0;
        self.dev.measured = 0;
        self.dev.mode = Mode::Measure(1 << 44);
        let r = self.measure_walks((h, w), frames);
        self.dev.mode = Mode::Live;
        let cost = r.map(|(walks, state_bytes)| {
            let (z, up) = (self.weights.z_dim, self.weights.up);
            let lat = self.weights.model.walk_frames(true);
            let px = 3 * h * w * up * up * self.weights.model.frames_per_latent();
            BlockCost {
                frames,
                walks,
                submissions: self.dev.measured,
                state_bytes,
                pool_bytes: self.dev.pool_bytes - state_bytes,
                io_bytes: 2 * z * h * w * lat + px * lat + px * frames.min(CHUNK_LATENTS),
            }
        });
        self.dev.pool = pool;
        (self.dev.pool_bytes, self.dev.sink) = (pool_bytes, sink);
        (self.dev.flops, self.dev.wgmma_flops) = (flops, wgmma_flops);
        cost
    }

    /// [`CudaDecoder::measure_block`]'s walks (the device in `Mode::Measure`): walks and the
    /// state's bytes.
    fn measure_walks(&mut self, (h, w): (usize, usize), frames: usize) -> Result<(usize, usize)> {
        let mut st = match &self.weights.model {
            Model::Taehv(m) => State::Taehv(m.state(&mut self.dev, h, w)?),
            Model::Wan(m) => State::Wan(m.state(&mut self.dev, h, w)?),
        };
        st.make_steady();
        let state_bytes = self.dev.pool_bytes;
        self.dev.measured = 0;
        let fpl = self.weights.model.frames_per_latent();
        let step = self.weights.model.walk_frames(self.dev.batch);
        let z = self.weights.z_dim;
        let x0 = self.dev.get_n(z, h, w, 2, step, 0)?;
        let (mut i, mut walks) = (0, 0);
        while i < frames {
            let n = step.min(frames - i);
            for j in 0..n {
                let x = Frame::view(x0.ptr + (2 * j * z * h * w) as u64, z, h, w);
                self.weights.model.input(&mut self.dev, x0.ptr, x)?;
            }
            self.dev.sink = Sink {
                rgb: 1 << 43,
                f32: 0,
                hw: h * w * self.weights.up * self.weights.up,
                cap: n * fpl,
                n: 0,
            };
            let x = Frame {
                n,
                owned: false,
                ..x0
            };
            walk(&self.weights.model, &mut self.dev, &mut st, x)?;
            i += n;
            walks += 1;
        }
        // The input buffer stands for the fixed one (counted in `io_bytes`).
        self.dev.pool_bytes -= x0.bytes;
        Ok((walks, state_bytes))
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

    /// Ends the stream: its graphs are dropped and its state goes back to the pool.
    pub fn end(&mut self) -> Result<()> {
        if let Some((_, _, st)) = self.state.take() {
            self.dev.gpu.sync()?;
            // They write the state's buffers, which the pool may hand out next.
            self.graphs.map.clear();
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
        let start = Instant::now();
        let mut waited = Duration::ZERO;
        // Latents handed over on the device never pass the host's finiteness check: the
        // latent-input kernel flags a NaN/inf instead, read back with the pixels.
        if self.dev.nonfinite == 0 {
            self.dev.nonfinite = self.dev.gpu.alloc(4)?;
        }
        self.dev.gpu.memset(self.dev.nonfinite, 0, 4)?;
        self.dev.submits += 1;
        self.io_for((h, w), frames, want_f32)?;
        // Host latents go up at once; device latents are read in place.
        let (src, zblock) = match latents {
            Latents::Host(l) => {
                let p = self.dev.gpu.alloc(4 * (frames * per).max(1))?;
                self.dev.gpu.upload(p, &l[..frames * per])?;
                self.dev.submits += 1;
                (p, p)
            }
            Latents::Device(p) => (p, 0),
        };
        let r = self.decode_frames(st, (h, w), src, frames, &mut out, &mut waited);
        let t = Instant::now();
        // The upload's host slice must outlive the copy.
        let synced = self.dev.gpu.sync();
        waited += t.elapsed();
        if zblock != 0 {
            self.dev.gpu.free(zblock)?;
        }
        r?;
        synced?;
        // Host latents were checked before upload; device ones are read back here.
        if let Latents::Device(_) = latents {
            let mut flag = [0u32];
            self.dev.gpu.download(&mut flag, self.dev.nonfinite)?;
            self.graphs.stats.downloads += 1;
            if flag[0] != 0 {
                return Err(non_finite_latents());
            }
        }
        self.graphs.stats.enqueue_s += start.elapsed().saturating_sub(waited).as_secs_f64();
        Ok(out)
    }

    /// The stream's fixed buffers for a push of `frames` latent frames of `h x w`: the walk's
    /// input and pixel output (kept for the stream: captured graphs use them), and
    /// the block's pixels (grown when a push needs more, up to [`CHUNK_LATENTS`] frames).
    fn io_for(&mut self, (h, w): (usize, usize), frames: usize, want_f32: bool) -> Result<()> {
        let per = self.weights.z_dim * h * w;
        // Latent frames a walk takes, and the pixel frames it gives at most.
        let lat = self.weights.model.walk_frames(true);
        let fpl = self.weights.model.frames_per_latent();
        let walk_px = lat * fpl;
        let hw = h * w * self.weights.up * self.weights.up;
        if self.io.hw != (h, w) {
            // A new size only comes with `begin`, whose `end` dropped the graphs.
            self.free_io()?;
            self.io.hw = (h, w);
        }
        let io = &mut self.io;
        let gpu = &mut self.dev.gpu;
        let alloc = |bytes: usize, io: &mut Io, gpu: &mut Gpu| -> Result<DevPtr> {
            let p = gpu.alloc(bytes)?;
            io.bytes += bytes;
            Ok(p)
        };
        if io.x0 == 0 {
            io.x0 = alloc(2 * per * lat, io, gpu)?;
            io.rgb = alloc(3 * hw * walk_px, io, gpu)?;
        }
        if want_f32 && io.f32 == 0 {
            io.f32 = alloc(12 * hw * walk_px, io, gpu)?;
        }
        let need = frames.clamp(1, CHUNK_LATENTS) * fpl;
        if need > io.blk_cap || (want_f32 && io.blk_f32 == 0) {
            // Only the copies after a walk and the downloads read these: none is in flight.
            let cap = need.max(io.blk_cap);
            let f32 = want_f32 || io.blk_f32 != 0;
            for p in [io.blk_rgb, io.blk_f32] {
                if p != 0 {
                    gpu.free(p)?;
                }
            }
            io.bytes -= io.blk_cap * hw * if io.blk_f32 != 0 { 15 } else { 3 };
            io.blk_rgb = alloc(3 * hw * cap, io, gpu)?;
            io.blk_f32 = if f32 {
                alloc(12 * hw * cap, io, gpu)?
            } else {
                0
            };
            io.blk_cap = cap;
        }
        self.dev.sink = Sink {
            rgb: io.rgb,
            f32: if want_f32 { io.f32 } else { 0 },
            hw,
            cap: self.weights.model.walk_frames(self.dev.batch) * fpl,
            n: 0,
        };
        Ok(())
    }

    /// Frees the fixed buffers (after the device is done with them).
    fn free_io(&mut self) -> Result<()> {
        self.dev.gpu.sync()?;
        let io = std::mem::take(&mut self.io);
        for p in [io.x0, io.rgb, io.f32, io.blk_rgb, io.blk_f32] {
            if p != 0 {
                self.dev.gpu.free(p)?;
            }
        }
        Ok(())
    }

    /// Decodes latent frames `[frames][16][h][w]` at `src` on the device into `out`: each walk's
    /// frames (one, or with the block walk up to [`CHUNK_LATENTS`]) are turned into its
    /// input and decoded (a graph replay in the steady state), and their pixel frames appended
    /// to the block buffer, downloaded once per [`CHUNK_LATENTS`] latent frames.
    fn decode_frames(
        &mut self,
        st: &mut State,
        (h, w): (usize, usize),
        src: DevPtr,
        frames: usize,
        out: &mut DeviceFrames,
        waited: &mut Duration,
    ) -> Result<()> {
        let z = self.weights.z_dim;
        let bytes = 4 * z * h * w;
        let hw = self.dev.sink.hw;
        let step = self.weights.model.walk_frames(self.dev.batch);
        let mut held = 0;
        let mut i = 0;
        while i < frames {
            let n = step.min(frames - i);
            let model = &self.weights.model;
            for j in 0..n {
                let x = Frame::view(self.io.x0 + (2 * j * z * h * w) as u64, z, h, w);
                model.input(&mut self.dev, src + ((i + j) * bytes) as u64, x)?;
            }
            let x0 = Frame {
                n,
                ..Frame::view(self.io.x0, z, h, w)
            };
            i += n;
            self.dev.sink.n = 0;
            self.step(st, x0)?;
            let k = self.dev.sink.n;
            if held + k > self.io.blk_cap {
                self.flush(held, out, waited)?;
                held = 0;
            }
            let sink = self.dev.sink;
            self.dev.copy(
                self.io.blk_rgb + (3 * hw * held) as u64,
                sink.rgb,
                3 * hw * k,
            )?;
            if sink.f32 != 0 {
                let at = (12 * hw * held) as u64;
                self.dev.copy(self.io.blk_f32 + at, sink.f32, 12 * hw * k)?;
            }
            held += k;
        }
        self.flush(held, out, waited)
    }

    /// Downloads the block buffer's first `n` pixel frames into `out`.
    fn flush(&mut self, n: usize, out: &mut DeviceFrames, waited: &mut Duration) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let t = Instant::now();
        let px = 3 * self.dev.sink.hw * n;
        let at = out.rgb.len();
        out.rgb.resize(at + px, 0);
        self.dev.gpu.download(&mut out.rgb[at..], self.io.blk_rgb)?;
        self.graphs.stats.downloads += 1;
        if let Some(v) = out.f32.as_mut() {
            let at = v.len();
            v.resize(at + px, 0.0);
            self.dev.gpu.download(&mut v[at..], self.io.blk_f32)?;
            self.graphs.stats.downloads += 1;
        }
        out.frames += n;
        *waited += t.elapsed();
        Ok(())
    }

    /// Decodes the latent frame at the walk's input `x0`: replays the graph of the stream's state
    /// (capturing it the first time that state is seen), or walks eagerly before the steady
    /// state, with graphs off, or once a capture failed.
    fn step(&mut self, st: &mut State, x0: Frame) -> Result<()> {
        // The block walk's graphs are per block size (the key's last byte; 0: a frame walk).
        let size = if self.dev.batch { x0.n as u8 } else { 0 };
        let key = match self.graphs.on {
            true => st.graph_key().map(|mut k| {
                k.push(size);
                (k, self.dev.sink.f32 != 0)
            }),
            false => None,
        };
        if let Some(key) = key {
            if !self.graphs.map.contains_key(&key) && self.graphs.map.len() < MAX_GRAPHS {
                match self.capture(st, x0) {
                    Ok(c) => {
                        self.graphs.map.insert(key.clone(), c);
                        self.graphs.stats.captures += 1;
                    }
                    Err(e) => {
                        let reason = format!("device decoder, decoding eagerly: {e}");
                        crate::backend::cuda::note_capture_failure(reason.clone());
                        self.graphs.failure = Some(reason);
                        self.graphs.on = false;
                        self.graphs.map.clear();
                    }
                }
            }
            if let Some(c) = self.graphs.map.get(&key) {
                self.dev.gpu.replay(&c.graph)?;
                self.dev.submits += 1;
                self.dev.sink.n = c.frames;
                self.dev.flops += c.flops;
                self.dev.wgmma_flops += c.wgmma_flops;
                *st = c.after.clone();
                self.graphs.stats.graph_frames += x0.n as u64;
                return Ok(());
            }
        }
        self.graphs.stats.eager_frames += x0.n as u64;
        walk(&self.weights.model, &mut self.dev, st, x0)
    }

    /// Captures the walk of one latent frame from state `st` (left as it is): first planned
    /// (no launches; the pool hands out, and if it must allocates, every buffer the walk
    /// needs), then captured on exactly those buffers. They stay in the pool: eager walks of
    /// later streams may use them, in stream order, and the graphs go with the stream.
    fn capture(&mut self, st: &State, x0: Frame) -> Result<Captured> {
        let mut planned = st.clone();
        self.dev.mode = Mode::Plan(Vec::new());
        let r = walk(&self.weights.model, &mut self.dev, &mut planned, x0);
        let plan = match std::mem::replace(&mut self.dev.mode, Mode::Live) {
            Mode::Plan(p) => p,
            _ => Vec::new(),
        };
        self.dev.sink.n = 0;
        r?;
        #[cfg(test)]
        if std::mem::take(&mut self.graphs.fail_next) {
            return Err(Error::Device("a capture failure injected by a test".into()));
        }
        let (flops, wgmma_flops, submits) =
            (self.dev.flops, self.dev.wgmma_flops, self.dev.submits);
        let mut after = st.clone();
        self.dev.gpu.begin_capture()?;
        let planned_len = plan.len();
        self.dev.mode = Mode::Script(plan, 0);
        let r = walk(&self.weights.model, &mut self.dev, &mut after, x0);
        let used = match std::mem::replace(&mut self.dev.mode, Mode::Live) {
            Mode::Script(_, used) => used,
            _ => 0,
        };
        let frames = std::mem::take(&mut self.dev.sink.n);
        let captured_flops = self.dev.flops - flops;
        let captured_wgmma = self.dev.wgmma_flops - wgmma_flops;
        (self.dev.flops, self.dev.wgmma_flops, self.dev.submits) = (flops, wgmma_flops, submits);
        let r = r.and_then(|_| match used == planned_len {
            true => Ok(()),
            false => Err(Error::Internal(
                "a captured decoder walk did not follow its plan".into(),
            )),
        });
        match r.and_then(|_| self.dev.gpu.end_capture()) {
            Ok(graph) => Ok(Captured {
                graph,
                after,
                frames,
                flops: captured_flops,
                wgmma_flops: captured_wgmma,
            }),
            Err(e) => {
                self.dev.gpu.abort_capture();
                Err(e)
            }
        }
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

    /// `n` standard normal values (random latents).
    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal()).collect()
    }

    /// A capture that fails leaves the decoder decoding eagerly, with the reason kept and
    /// counted, and the same frames as a decoder that never tried.
    #[test]
    fn a_failed_capture_falls_back_to_eager_frames() {
        let dec = Decoder::tiny_taehv(4);
        let (h, w, frames) = (2, 2, 5);
        let lat = normal(frames * 16 * h * w, 3);
        let mut eager = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        eager.set_graphs(false).unwrap();
        eager.begin(h, w).unwrap();
        let want = eager.push(&lat, frames, true).unwrap();

        let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        dev.set_graphs(true).unwrap();
        dev.graphs.fail_next = true;
        dev.begin(h, w).unwrap();
        let failures = crate::backend::cuda::graph_capture_failures().0;
        assert_eq!(dev.push(&lat, frames, true).unwrap(), want);
        let why = dev.graph_failure().unwrap_or_default();
        assert!(why.contains("injected"), "{why}");
        assert!(crate::backend::cuda::graph_capture_failures().0 > failures);
        let st = dev.stats();
        assert_eq!((st.eager_frames, st.graph_frames, st.captures), (5, 0, 0));

        // Without the failure the same push replays its steady walks from one graph: with the
        // block walk (the default) frames 0-3 are one eager walk (the stream's start), frame 4
        // one captured walk; frame by frame, frames 1.. replay one graph.
        for (batch, counts) in [(true, (4, 1, 1)), (false, (1, 4, 1))] {
            let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
            dev.set_graphs(true).unwrap();
            dev.set_frame_batching(batch).unwrap();
            dev.begin(h, w).unwrap();
            assert_eq!(dev.push(&lat, frames, true).unwrap(), want);
            let st = dev.stats();
            assert_eq!((st.eager_frames, st.graph_frames, st.captures), counts);
            assert!(dev.graph_failure().is_none());
        }
    }

    #[test]
    fn device_latents_decode_in_place_like_host_latents() {
        let dec = Decoder::tiny_taehv(2);
        let (h, w, frames) = (2, 3, 4);
        let lat = normal(frames * 16 * h * w, 8);
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
