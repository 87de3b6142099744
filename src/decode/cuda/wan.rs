//! The Wan2.1 VAE decoder on the device, walked as `decode/wan_vae.rs` walks it (one latent
//! frame at a time, depth first after each temporal upsample). Every causal conv keeps its last
//! two input frames on the device (bf16; the head too, as upstream, rather than the CPU's
//! partial sums) and passes them to `bc_conv` as time taps 0 and 1 (fewer at the start of the
//! stream: a zero frame is not passed). Fused over the CPU walk: the residual add is the second
//! conv's epilogue, `time_conv` writes its two frames from its epilogue, the resample conv reads
//! through the nearest upsample, the head conv writes f32 and the clamp is in the pixel
//! conversion. The attention block runs on the same conv kernel: `to_qkv` writes Q and K NHWC
//! and V transposed, S = Q K^T is a 1x1 conv of Q with K as its weights (f32 scores),
//! `bc_dec_softmax` makes bf16 probabilities, O = P V a 1x1 conv of P with V^T as weights.

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

/// The last (up to) two input frames of one causal conv, in a ring of two device frames.
#[derive(Clone)]
struct Cache {
    buf: [Frame; 2],
    n: usize,
    first: usize,
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
        self.caches.into_iter().flat_map(|c| c.buf).collect()
    }

    /// Once every cache holds two frames (every time tap taken, every `time_conv` started),
    /// a latent frame's walk depends only on which ring slot holds each cache's older frame:
    /// that is the key (`None` before). The caches at the latent resolution take one frame
    /// per latent frame, the others 2 or 4, so two keys alternate: two graphs rotate the
    /// rings, where copies would move every latent-resolution cache once more per frame.
    /// As after a stream's first frames: every cache full, every `time_conv` started (what a
    /// measured walk of the steady state starts from; the caches' contents are not touched).
    pub(super) fn make_steady(&mut self) {
        self.caches.iter_mut().for_each(|c| c.n = 2);
        self.started.iter_mut().for_each(|s| *s = true);
    }

    pub(super) fn graph_key(&self) -> Option<Vec<u8>> {
        if self.caches.iter().any(|c| c.n < 2) {
            return None;
        }
        let rings = self.caches.iter().map(|c| c.first as u8);
        Some(rings.chain(self.started.iter().map(|&s| s as u8)).collect())
    }
}

/// The sources of a causal 3-tap conv of `x` continuing `cache` (zero frames omitted).
fn causal_srcs(cache: &Cache, x: Frame) -> Vec<In> {
    let mut s: Vec<In> = (0..cache.n)
        .map(|i| {
            let f = cache.buf[(cache.first + i) % 2];
            In::at(
                Frame {
                    c: x.c,
                    h: x.h,
                    w: x.w,
                    ..f
                },
                2 - cache.n + i,
            )
        })
        .collect();
    s.push(In::at(x, 2));
    s
}

/// A causal conv of `x` continuing `cache` into a new frame (the cache then holds `x`).
fn causal(
    dev: &mut Dev,
    cache: &mut Cache,
    cv: &DevConv,
    x: Frame,
    res: Option<Frame>,
    f32: bool,
) -> Result<Frame> {
    let srcs = causal_srcs(cache, x);
    let y = dev.conv(cv, &srcs, (x.h, x.w), res, BC_ACT_NONE, f32)?;
    cache_push(dev, cache, x)?;
    Ok(y)
}

/// Appends input frame `x` to `cache` (a device copy, stream-ordered after the conv read it).
fn cache_push(dev: &mut Dev, cache: &mut Cache, x: Frame) -> Result<()> {
    let slot = if cache.n < 2 {
        cache.n += 1;
        (cache.first + cache.n - 1) % 2
    } else {
        let s = cache.first;
        cache.first = (cache.first + 1) % 2;
        s
    };
    dev.copy(cache.buf[slot].ptr, x.ptr, 2 * x.c * x.h * x.w)
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
            let buf = [dev.get(c, h * s, w * s, 2)?, dev.get(c, h * s, w * s, 2)?];
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

    /// Decodes one latent frame from its un-normalised NHWC input `x0` (not a pool buffer).
    pub(super) fn frame(&self, dev: &mut Dev, st: &mut WanDevState, x0: Frame) -> Result<()> {
        let (h, w) = (x0.h, x0.w);
        let x1 = dev.conv(
            &self.conv2,
            &[In::at(x0, 0)],
            (h, w),
            None,
            BC_ACT_NONE,
            false,
        )?;
        dev.put(x0);
        let x = causal(dev, &mut st.caches[0], &self.conv1, x1, None, false)?;
        dev.put(x1);
        self.walk(dev, st, 0, x)
    }

    fn walk(&self, dev: &mut Dev, st: &mut WanDevState, from: usize, mut x: Frame) -> Result<()> {
        for i in from..self.blocks.len() {
            let hw = (x.h, x.w);
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
                    let r = dev.rms_norm(x, *g1, true)?;
                    let r2 = causal(dev, &mut st.caches[*ca], a, r, None, false)?;
                    dev.put(r);
                    let r3 = dev.rms_norm(r2, *g2, true)?;
                    dev.put(r2);
                    let s = match short {
                        Some(s) => {
                            Some(dev.conv(s, &[In::at(x, 0)], hw, None, BC_ACT_NONE, false)?)
                        }
                        None => None,
                    };
                    let y = causal(dev, &mut st.caches[*cb], b, r3, Some(s.unwrap_or(x)), false)?;
                    dev.put(r3);
                    if let Some(s) = s {
                        dev.put(s);
                    }
                    dev.put(x);
                    x = y;
                }
                DevBlock::Attn { g, qk, v, proj } => {
                    let (c, p) = (x.c, x.h * x.w);
                    let n = dev.rms_norm(x, *g, false)?;
                    let q = dev.get(2 * c, x.h, x.w, 2)?;
                    dev.conv_into(
                        qk,
                        &[In::at(n, 0)],
                        hw,
                        None,
                        BC_ACT_NONE,
                        (q.ptr, false, c, 1),
                    )?;
                    let vt = dev.get(c, x.h, x.w, 2)?;
                    dev.conv_into(
                        v,
                        &[In::at(n, 0)],
                        hw,
                        None,
                        BC_ACT_NONE,
                        (vt.ptr, false, c, p),
                    )?;
                    dev.put(n);
                    // S = Q K^T: K's rows are the "weights" of a 1x1 conv with p outputs.
                    let k = DevConv {
                        w: q.ptr + (2 * c * p) as u64,
                        bias: 0,
                        parity: 0,
                        shape: ConvShape {
                            cout: p,
                            cin: c,
                            kt: 1,
                            kh: 1,
                            kw: 1,
                            parity: false,
                        },
                    };
                    let s = dev.conv(
                        &k,
                        &[In::at(Frame::view(q.ptr, c, x.h, x.w), 0)],
                        hw,
                        None,
                        BC_ACT_NONE,
                        true,
                    )?;
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
                    dev.put(q);
                    // O = P V: V^T [c][p] as the weights of a 1x1 conv over the p "channels" of P.
                    let vw = DevConv {
                        w: vt.ptr,
                        bias: 0,
                        parity: 0,
                        shape: ConvShape {
                            cout: c,
                            cin: p,
                            kt: 1,
                            kh: 1,
                            kw: 1,
                            parity: false,
                        },
                    };
                    let o = dev.conv(
                        &vw,
                        &[In::at(Frame { c: p, ..pm }, 0)],
                        hw,
                        None,
                        BC_ACT_NONE,
                        false,
                    )?;
                    dev.put(pm);
                    dev.put(vt);
                    let y = dev.conv(proj, &[In::at(o, 0)], hw, Some(x), BC_ACT_NONE, false)?;
                    dev.put(o);
                    dev.put(x);
                    x = y;
                }
                DevBlock::Up { conv, time } => {
                    let c = x.c;
                    let (h2, w2) = (2 * x.h, 2 * x.w);
                    let up = |f: Frame| In {
                        up: true,
                        ..In::at(f, 0)
                    };
                    if let Some((tc, slot)) = time {
                        if st.started[*slot] {
                            // Channels [0, C) are frame 2t, [C, 2C) frame 2t+1.
                            let y = dev.get(2 * c, x.h, x.w, 2)?;
                            let srcs = causal_srcs(&st.caches[*slot], x);
                            dev.conv_into(tc, &srcs, hw, None, BC_ACT_NONE, (y.ptr, false, c, 1))?;
                            cache_push(dev, &mut st.caches[*slot], x)?;
                            dev.put(x);
                            for f in 0..2 {
                                let part = Frame::view(
                                    y.ptr + (2 * f * c * hw.0 * hw.1) as u64,
                                    c,
                                    hw.0,
                                    hw.1,
                                );
                                let u = dev.conv(
                                    conv,
                                    &[up(part)],
                                    (h2, w2),
                                    None,
                                    BC_ACT_NONE,
                                    false,
                                )?;
                                self.walk(dev, st, i + 1, u)?;
                            }
                            dev.put(y);
                            return Ok(());
                        }
                        // The stream's first frame skips the time conv; the next one then sees
                        // zeros before it (upstream's 'Rep' marker).
                        st.started[*slot] = true;
                    }
                    let u = dev.conv(conv, &[up(x)], (h2, w2), None, BC_ACT_NONE, false)?;
                    dev.put(x);
                    x = u;
                }
            }
        }
        let r = dev.rms_norm(x, self.head_g, true)?;
        dev.put(x);
        let last = st.caches.len() - 1;
        let y = causal(dev, &mut st.caches[last], &self.head, r, None, true)?;
        dev.put(r);
        dev.emit(y, (1.0, 0.0), true)
    }
}
