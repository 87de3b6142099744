//! The Wan2.1 VAE decoder on the device, walked as `decode/wan_vae.rs` walks it. Every causal
//! conv keeps its last two input frames on the device (bf16; the head too, as upstream, rather
//! than the CPU's partial sums). Fused over the CPU walk: the residual add is the second conv's
//! epilogue, `time_conv` writes its two frames from its epilogue, the resample conv reads
//! through the nearest upsample, the head conv writes f32 and the clamp is in the pixel
//! conversion. The attention block runs on the same conv kernel: `to_qkv` writes Q and K NHWC
//! and V transposed, S = Q K^T is a 1x1 conv of Q with K as its weights (f32 scores),
//! `bc_dec_softmax` makes bf16 probabilities, O = P V a 1x1 conv of P with V^T as weights.
//!
//! Two walks, one code ([`DevWan::decode`], `Dev::batch` choosing): the frame walk
//! (`BC_DECODE_PER_FRAME=1`) takes one latent frame depth first, as the CPU does, each causal
//! conv reading its cache's frames as time taps 0 and 1 (fewer at the start of the stream: a
//! zero frame is not passed). The block walk (the default) takes a block of latent frames
//! breadth first: every layer once over all the frames it has at its stage (1 per latent frame
//! at the latent resolution, 2 and 4 after the temporal upsamples; the stream's first latent
//! frame skips each `time_conv`, upstream's first-chunk rule), each conv one launch over all of
//! them. A causal conv's input buffer of several frames has two spare leading frames where its
//! cache is copied, so tap `t` of all its frames is one source (the input `2 - t` frames back);
//! its last two input frames are then copied into the cache (a launch of one frame takes its
//! taps from the cache as the frame walk does: no copy in, one frame out). After an upsample whose frames would make more than
//! `dev.block_rows` GEMM rows a launch, they go on in groups, depth first (caches carried from
//! group to group). The attention is per frame: its 1x1 convs over all frames, the scores,
//! softmax and P V one frame at a time. Each output value is the same sum in the same order in
//! both walks (a zero tap adds exact zeros), so both give the same bits
//! (tests/decode_cuda_emulated.rs).

use super::{Dev, DevConv, Frame, In};
use crate::backend::cuda::device::DevPtr;
use crate::decode::wan_vae::{Block, WanVae, MEAN, STD};
use crate::kernels::launch::{self, ConvShape};
use crate::kernels::params::BC_ACT_NONE;
use crate::{Error, Result};

enum DevBlock {
    Res {
        g1: DevPtr,
        a: DevConv,
        g2: DevPtr,
        b: DevConv,
        short: Option<DevConv>,
        ca: usize,
        cb: usize,
    },
    Attn {
        g: DevPtr,
        /// `to_qkv` rows for Q and K (2C outputs).
        qk: DevConv,
        /// `to_qkv` rows for V (C outputs).
        v: DevConv,
        proj: DevConv,
    },
    Up {
        conv: DevConv,
        time: Option<(DevConv, usize)>,
    },
}

/// The Wan VAE's weights on the device.
pub(super) struct DevWan {
    z_dim: usize,
    mean: DevPtr,
    scale: DevPtr,
    conv2: DevConv,
    conv1: DevConv,
    blocks: Vec<DevBlock>,
    head_g: DevPtr,
    head: DevConv,
    /// Device caches: (channels, spatial factor); the last is the head's input.
    cache_dims: Vec<(usize, usize)>,
}

/// The last two input frames of one causal conv: a two-frame device buffer (zeroed when the
/// stream begins) used as a ring, `first` the slot of the older frame; `n` frames taken so far
/// (at most 2; the slots of frames not taken yet are zero, upstream's padding).
#[derive(Clone)]
struct Cache {
    buf: Frame,
    n: usize,
    first: usize,
}

impl Cache {
    /// The ring slot `i` (0 or 1) viewed with `x`'s geometry.
    fn slot(&self, i: usize, x: Frame) -> Frame {
        Frame::view(
            self.buf.base + (i * self.buf.frame_bytes()) as u64,
            x.c,
            x.h,
            x.w,
        )
    }
}

/// A stream: every causal conv's cache and, per temporal upsample, whether it has started.
#[derive(Clone)]
pub(super) struct WanDevState {
    caches: Vec<Cache>,
    started: Vec<bool>,
}

impl WanDevState {
    /// The device frames the state holds.
    pub(super) fn frames(self) -> Vec<Frame> {
        self.caches.into_iter().map(|c| c.buf).collect()
    }

    /// As after a stream's first frames: every cache full, every `time_conv` started (what a
    /// measured walk of the steady state starts from; the caches' contents are not touched).
    pub(super) fn make_steady(&mut self) {
        self.caches.iter_mut().for_each(|c| c.n = 2);
        self.started.iter_mut().for_each(|s| *s = true);
    }

    /// Once every cache holds two frames (every time tap taken, every `time_conv` started),
    /// a walk depends only on which ring slot holds each cache's older frame: that is the key
    /// (`None` before). In the frame walk the caches at the latent resolution take one frame
    /// per latent frame, the others 2 or 4, so two keys alternate: two graphs rotate the
    /// rings, where copies would move every latent-resolution cache once more per frame. The
    /// block walk's launches of several frames leave a ring with its older frame in slot 0,
    /// those of one frame rotate it as the frame walk does: at most two keys per block size.
    pub(super) fn graph_key(&self) -> Option<Vec<u8>> {
        if self.caches.iter().any(|c| c.n < 2) {
            return None;
        }
        let rings = self.caches.iter().map(|c| c.first as u8);
        Some(rings.chain(self.started.iter().map(|&s| s as u8)).collect())
    }
}

/// Spare leading frames the input of a causal conv over `n` frames has: 2 when `n > 1` (its
/// cache is copied there), else none.
fn lead(n: usize) -> usize {
    if n > 1 {
        2
    } else {
        0
    }
}

/// The time-tap sources of a causal 3-tap conv over the frames `x` continuing `cache`, its
/// current frames (tap 2) last. One frame (the frame walk, or a block walk's group of one): the
/// cache's frames as taps 0 and 1 (zero frames omitted). More: the cache is copied into the
/// [`lead`] frames before `x` (an error if it has none), and tap `t` is `x` read `2 - t`
/// frames back.
fn taps(dev: &mut Dev, cache: &Cache, x: Frame) -> Result<Vec<In>> {
    if x.n == 1 {
        let mut s: Vec<In> = (2 - cache.n.min(2)..2)
            .map(|i| In::at(cache.slot((cache.first + i) % 2, x), i))
            .collect();
        s.push(In::at(x, 2));
        return Ok(s);
    }
    let fb = x.frame_bytes();
    if x.ptr < x.base + 2 * fb as u64 || cache.buf.frame_bytes() != fb {
        return Err(Error::Internal(
            "a Wan VAE causal conv's input has no room for its cache".into(),
        ));
    }
    let back = |t: usize| Frame {
        ptr: x.ptr - (t * fb) as u64,
        owned: false,
        ..x
    };
    // Older frame first: one copy when the ring is in order.
    if cache.first == 0 {
        dev.copy(back(2).ptr, cache.buf.base, 2 * fb)?;
    } else {
        dev.copy(back(2).ptr, cache.slot(1, x).ptr, fb)?;
        dev.copy(back(1).ptr, cache.slot(0, x).ptr, fb)?;
    }
    Ok(vec![In::at(back(2), 0), In::at(back(1), 1), In::at(x, 2)])
}

/// After a causal conv over `x` (read through [`taps`]): `cache` takes its input frames
/// (device copies, stream-ordered after the conv read them). One frame: `x` into the ring's
/// older slot, which becomes the newer. More: the last two frames of the cache and `x` (one
/// copy from before `x`'s end) into slots 0 and 1.
fn keep(dev: &mut Dev, cache: &mut Cache, x: Frame) -> Result<()> {
    let fb = x.frame_bytes();
    cache.n = (cache.n + x.n).min(2);
    if x.n == 1 {
        let slot = cache.slot(cache.first, x).ptr;
        cache.first = 1 - cache.first;
        return dev.copy(slot, x.ptr, fb);
    }
    cache.first = 0;
    let from = x.ptr + (x.n * fb) as u64 - 2 * fb as u64;
    dev.copy(cache.buf.base, from, 2 * fb)
}

/// A causal conv of `x`'s frames continuing `cache` into new frames after `lead` spare ones
/// (f32 when `f32`; `res` added in the epilogue); the cache then takes `x`'s frames.
fn causal(
    dev: &mut Dev,
    cache: &mut Cache,
    cv: &DevConv,
    x: Frame,
    res: Option<Frame>,
    (f32, lead): (bool, usize),
) -> Result<Frame> {
    let srcs = taps(dev, cache, x)?;
    let y = dev.conv_n(cv, &srcs, (x.h, x.w), res, BC_ACT_NONE, f32, (x.n, lead))?;
    keep(dev, cache, x)?;
    Ok(y)
}

impl DevWan {
    pub(super) fn new(dev: &mut Dev, m: &WanVae) -> Result<DevWan> {
        let causal3 = |c: &DevConv| {
            if c.shape.kt == 3 {
                Ok(())
            } else {
                Err(Error::Internal(
                    "Wan VAE causal convs have 3 time taps".into(),
                ))
            }
        };
        let mut blocks = Vec::with_capacity(m.blocks.len());
        for b in &m.blocks {
            blocks.push(match b {
                Block::Res {
                    g1,
                    a,
                    g2,
                    b,
                    short,
                    ca,
                    cb,
                } => {
                    let (a, b) = (dev.conv_weights(a)?, dev.conv_weights(b)?);
                    causal3(&a)?;
                    causal3(&b)?;
                    DevBlock::Res {
                        g1: dev.upload(g1)?,
                        a,
                        g2: dev.upload(g2)?,
                        b,
                        short: short.as_ref().map(|s| dev.conv_weights(s)).transpose()?,
                        ca: *ca,
                        cb: *cb,
                    }
                }
                Block::Attn { g, qkv, proj } => {
                    let all = dev.conv_weights(qkv)?;
                    let c = proj.cout;
                    let rows = |n: usize, at: usize| DevConv {
                        w: all.w + (2 * at * c) as u64,
                        bias: all.bias + if all.bias == 0 { 0 } else { (4 * at) as u64 },
                        shape: ConvShape {
                            cout: n,
                            ..all.shape
                        },
                        parity: 0,
                    };
                    DevBlock::Attn {
                        g: dev.upload(g)?,
                        qk: rows(2 * c, 0),
                        v: rows(c, 2 * c),
                        proj: dev.conv_weights(proj)?,
                    }
                }
                Block::Up { conv, time } => DevBlock::Up {
                    conv: dev.conv_weights(conv)?,
                    time: match time {
                        Some((t, slot)) => {
                            let t = dev.conv_weights(t)?;
                            causal3(&t)?;
                            Some((t, *slot))
                        }
                        None => None,
                    },
                },
            });
        }
        let inv: Vec<f32> = STD.iter().map(|s| 1.0f32 / s).collect();
        let head = dev.conv_weights(&m.head)?;
        causal3(&head)?;
        let conv1 = dev.conv_weights(&m.conv1)?;
        causal3(&conv1)?;
        let mut cache_dims = m.cache_dims.clone();
        if let Some(last) = cache_dims.last_mut() {
            last.0 = head.shape.cin;
        }
        Ok(DevWan {
            z_dim: m.z_dim,
            mean: dev.upload(&MEAN)?,
            scale: dev.upload(&inv)?,
            conv2: dev.conv_weights(&m.conv2)?,
            conv1,
            blocks,
            head_g: dev.upload(&m.head_g)?,
            head,
            cache_dims,
        })
    }

    /// Pixel frames a latent frame gives (after the first): 2 per temporal upsample.
    pub(super) fn frames_per_latent(&self) -> usize {
        let times = self
            .blocks
            .iter()
            .filter(|b| matches!(b, DevBlock::Up { time: Some(_), .. }));
        1 << times.count()
    }

    pub(super) fn state(&self, dev: &mut Dev, h: usize, w: usize) -> Result<WanDevState> {
        let mut caches = Vec::with_capacity(self.cache_dims.len());
        for &(c, s) in &self.cache_dims {
            let buf = dev.get_n(c, h * s, w * s, 2, 2, 0)?;
            // The frames before a stream's first are zero (upstream's padding): the block walk
            // reads them, the frame walk leaves them out.
            dev.memset(buf.base, buf.bytes)?;
            caches.push(Cache {
                buf,
                n: 0,
                first: 0,
            });
        }
        Ok(WanDevState {
            started: vec![false; caches.len()],
            caches,
        })
    }

    /// The un-normalisation of latent frame `z` (f32 `[16][h*w]` on the device) into NHWC
    /// `x0`.
    pub(super) fn input(&self, dev: &mut Dev, z: DevPtr, x0: Frame) -> Result<()> {
        let l = launch::dec_latent_in(
            z as *const f32,
            x0.ptr as *mut _,
            self.z_dim,
            x0.h * x0.w,
            2,
            self.mean as *const f32,
            self.scale as *const f32,
            dev.nonfinite as *mut u32,
        );
        dev.run(l)
    }

    /// Spare leading frames the input of block `i` (or the head, past the last) has when it
    /// is `n` frames: a `time_conv`'s has [`lead`]'s, any other none (a norm comes first).
    fn lead_into(&self, i: usize, n: usize) -> usize {
        match self.blocks.get(i) {
            Some(DevBlock::Up { time: Some(_), .. }) => lead(n),
            _ => 0,
        }
    }

    /// Decodes the `x0.n` latent frames (one in the frame walk) from their un-normalised NHWC
    /// inputs `x0` (one after the other, not a pool buffer): the frame walk or the block walk as
    /// `dev.batch` says (see the module docs), the caches and `time_conv` starts carried from
    /// block to block (and group to group).
    pub(super) fn decode(&self, dev: &mut Dev, st: &mut WanDevState, x0: Frame) -> Result<()> {
        let (hw, n) = ((x0.h, x0.w), x0.n);
        let src = [In::at(x0, 0)];
        let x1 = dev.conv_n(
            &self.conv2,
            &src,
            hw,
            None,
            BC_ACT_NONE,
            false,
            (n, lead(n)),
        )?;
        dev.put(x0);
        let into = (false, self.lead_into(0, n));
        let x = causal(dev, &mut st.caches[0], &self.conv1, x1, None, into)?;
        dev.put(x1);
        self.walk(dev, st, 0, x)
    }

    /// The attention block over `x`'s frames (its output after `lead` spare frames): the norm,
    /// `to_qkv` and `proj` one launch each over all frames, the attention itself per frame.
    fn attention(
        &self,
        dev: &mut Dev,
        (g, qk, v, proj): (DevPtr, &DevConv, &DevConv, &DevConv),
        x: Frame,
        lead: usize,
    ) -> Result<Frame> {
        let (c, p, n, hw) = (x.c, x.h * x.w, x.n, (x.h, x.w));
        let fb = x.frame_bytes() as u64;
        let nrm = dev.rms_norm(x, g, false, 0)?;
        // Frame f's Q and K: frames 2f and 2f+1 of `q`.
        let q = dev.get_n(c, x.h, x.w, 2, 2 * n, 0)?;
        let none = BC_ACT_NONE;
        dev.conv_frames(
            qk,
            &[In::at(nrm, 0)],
            hw,
            None,
            none,
            (q.ptr, false, c, 1),
            n,
        )?;
        let o = dev.get_n(c, x.h, x.w, 2, n, 0)?;
        let ones = |w: DevPtr, cout: usize, cin: usize| DevConv {
            w,
            bias: 0,
            parity: 0,
            shape: ConvShape {
                cout,
                cin,
                kt: 1,
                kh: 1,
                kw: 1,
                parity: false,
            },
        };
        for f in 0..n as u64 {
            let one = |base: DevPtr, k: u64| Frame::view(base + k * fb, c, x.h, x.w);
            let vt = dev.get(c, x.h, x.w, 2)?;
            let src = [In::at(one(nrm.ptr, f), 0)];
            dev.conv_into(v, &src, hw, None, none, (vt.ptr, false, c, p))?;
            // S = Q K^T: K's rows are the "weights" of a 1x1 conv with p outputs.
            let k = ones(one(q.ptr, 2 * f + 1).ptr, p, c);
            let s = dev.conv(&k, &[In::at(one(q.ptr, 2 * f), 0)], hw, None, none, true)?;
            let pm = dev.get(p, x.h, x.w, 2)?;
            let scale = 1.0 / (c as f32).sqrt();
            dev.run(launch::dec_softmax(
                s.ptr as *const f32,
                pm.ptr as *mut _,
                p,
                p,
                scale,
            ))?;
            dev.put(s);
            // O = P V: V^T [c][p] as the weights of a 1x1 conv over the p "channels" of P.
            let src = [In::at(Frame { c: p, ..pm }, 0)];
            let out = (one(o.ptr, f).ptr, false, c, 1);
            dev.conv_into(&ones(vt.ptr, c, p), &src, hw, None, none, out)?;
            dev.put(pm);
            dev.put(vt);
        }
        dev.put(nrm);
        dev.put(q);
        let y = dev.conv_n(proj, &[In::at(o, 0)], hw, Some(x), none, false, (n, lead))?;
        dev.put(o);
        Ok(y)
    }

    /// Runs the frames `x` through blocks `from..` and the head; after an upsample, depth
    /// first over groups of frames (the frame walk: one frame a group).
    fn walk(&self, dev: &mut Dev, st: &mut WanDevState, from: usize, mut x: Frame) -> Result<()> {
        for i in from..self.blocks.len() {
            let (hw, n) = ((x.h, x.w), x.n);
            let into = (false, self.lead_into(i + 1, n));
            match &self.blocks[i] {
                DevBlock::Res {
                    g1,
                    a,
                    g2,
                    b,
                    short,
                    ca,
                    cb,
                } => {
                    let r = dev.rms_norm(x, *g1, true, lead(n))?;
                    let r2 = causal(dev, &mut st.caches[*ca], a, r, None, (false, 0))?;
                    dev.put(r);
                    let r3 = dev.rms_norm(r2, *g2, true, lead(n))?;
                    dev.put(r2);
                    let s = match short {
                        Some(s) => {
                            let src = [In::at(x, 0)];
                            Some(dev.conv_n(s, &src, hw, None, BC_ACT_NONE, false, (n, 0))?)
                        }
                        None => None,
                    };
                    let res = Some(s.unwrap_or(x));
                    let y = causal(dev, &mut st.caches[*cb], b, r3, res, into)?;
                    dev.put(r3);
                    if let Some(s) = s {
                        dev.put(s);
                    }
                    dev.put(x);
                    x = y;
                }
                DevBlock::Attn { g, qk, v, proj } => {
                    let y = self.attention(dev, (*g, qk, v, proj), x, into.1)?;
                    dev.put(x);
                    x = y;
                }
                DevBlock::Up { conv, time } => {
                    if let Some((tc, slot)) = time {
                        // The stream's first frame skips the time conv (copied as it is); the
                        // next one then sees zeros before it (upstream's 'Rep' marker).
                        let skip = usize::from(!st.started[*slot]);
                        st.started[*slot] = true;
                        if n > skip {
                            let (c, fb) = (x.c, x.frame_bytes());
                            let y = dev.get_n(c, x.h, x.w, 2, skip + 2 * (n - skip), 0)?;
                            if skip == 1 {
                                dev.copy(y.ptr, x.ptr, fb)?;
                            }
                            let xs = Frame {
                                ptr: x.ptr + (skip * fb) as u64,
                                n: n - skip,
                                owned: false,
                                ..x
                            };
                            // Input frame f's channels [0, C) are frame 2f, [C, 2C) 2f+1.
                            let srcs = taps(dev, &st.caches[*slot], xs)?;
                            let out = (y.ptr + (skip * fb) as u64, false, c, 1);
                            dev.conv_frames(tc, &srcs, hw, None, BC_ACT_NONE, out, xs.n)?;
                            keep(dev, &mut st.caches[*slot], xs)?;
                            dev.put(x);
                            x = y;
                        }
                    }
                    // Through the nearest upsample: in groups of at most `block_rows` rows at
                    // the new size (the frame walk: one frame at a time), in order.
                    let hw2 = (2 * x.h, 2 * x.w);
                    let bound = if dev.batch { dev.block_rows } else { 1 };
                    let g = super::group_frames(x.n, hw2.0 * hw2.1, bound);
                    let up = |f: Frame| In {
                        up: true,
                        ..In::at(f, 0)
                    };
                    let none = BC_ACT_NONE;
                    if g >= x.n {
                        let k = (x.n, self.lead_into(i + 1, x.n));
                        let u = dev.conv_n(conv, &[up(x)], hw2, None, none, false, k)?;
                        dev.put(x);
                        x = u;
                        continue;
                    }
                    for part in x.groups(g) {
                        let k = (part.n, self.lead_into(i + 1, part.n));
                        let u = dev.conv_n(conv, &[up(part)], hw2, None, none, false, k)?;
                        self.walk(dev, st, i + 1, u)?;
                    }
                    dev.put(x);
                    return Ok(());
                }
            }
        }
        let r = dev.rms_norm(x, self.head_g, true, lead(x.n))?;
        dev.put(x);
        let last = st.caches.len() - 1;
        let y = causal(dev, &mut st.caches[last], &self.head, r, None, (true, 0))?;
        dev.put(r);
        dev.emit_n(y, 0, (1.0, 0.0), true)
    }
}
