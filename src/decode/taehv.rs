//! The TAEHV decoder (`taew2_1`, the tiny decoder of real-time Wan demos), as upstream
//! `TAEHV.decode_video` runs it frame by frame, then mapped to [-1, 1] by `2x - 1` with the
//! first `frames_to_trim` frames dropped. See docs/decoders.md.

use super::conv::{map_inplace, upsample2x, Conv, Src};
use super::wan_vae::frame_bytes;
use super::weights::{random_tensor, Weights};
use crate::Result;

/// Upstream's decoder `nn.Sequential`, by index.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Clamp,
    Conv,
    Relu,
    Mem,
    Up,
    TGrow,
}

const LAYOUT: [Kind; 23] = {
    use Kind::*;
    [
        Clamp, Conv, Relu, Mem, Mem, Mem, Up, TGrow, Conv, Mem, Mem, Mem, Up, TGrow, Conv, Mem,
        Mem, Mem, Up, TGrow, Conv, Relu, Conv,
    ]
};

/// One entry of upstream's decoder `nn.Sequential` (the device decoder walks the same list).
pub(crate) enum Layer {
    Clamp,
    Conv(Conv),
    Relu,
    /// `MemBlock`: relu(conv(relu(conv(relu(conv(cat[x, past]))))) + skip(x)).
    Mem {
        convs: Box<[Conv; 3]>,
        skip: Option<Conv>,
        slot: usize,
    },
    Up,
    /// `TGrow`: a 1x1 conv to `stride * C` channels, split into `stride` frames (the first
    /// channel chunk is the earlier frame).
    TGrow {
        conv: Conv,
        stride: usize,
    },
}

/// The loaded decoder.
pub(crate) struct Taehv {
    pub(crate) layers: Vec<Layer>,
    /// Latent channels (16).
    pub z_dim: usize,
    /// Pixel frames per latent frame (4 in `taew2_1`).
    pub t_up: usize,
    /// Spatial upsampling factor (8).
    pub up: usize,
    /// Frames dropped at the start of a stream (`t_up - 1`).
    pub trim: usize,
    /// MemBlock memories: (channels, spatial factor).
    pub(crate) mem_dims: Vec<(usize, usize)>,
}

/// Streaming state: every MemBlock's input of the previous frame (none before the first) and
/// how many leading frames are still to be trimmed.
pub(crate) struct TaehvState {
    mem: Vec<Option<Vec<f32>>>,
    to_trim: usize,
}

impl TaehvState {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.mem.iter().flatten().map(|m| 4 * m.len()).sum()
    }
}

impl Taehv {
    /// Reads the decoder from upstream tensor names (`decoder.{i}.*`), widths from the shapes.
    pub fn load(wt: &Weights) -> Result<Taehv> {
        let z = wt.shape("decoder.1.weight")?.get(1).copied().unwrap_or(0);
        let mut c = z;
        let (mut t_up, mut up) = (1usize, 1usize);
        let mut layers = Vec::new();
        let mut mem_dims = Vec::new();
        // An upsample not yet consumed: the next 3x3 conv reads through it (1x1 convs run
        // before it, at the lower resolution), so it gets the sub-pixel form.
        let mut pending = false;
        for (i, kind) in LAYOUT.iter().enumerate() {
            let p = format!("decoder.{i}");
            let layer = match kind {
                Kind::Clamp => Layer::Clamp,
                Kind::Relu => Layer::Relu,
                Kind::Up => {
                    up *= 2;
                    pending = true;
                    Layer::Up
                }
                Kind::Conv => {
                    let mut cv = wt.conv(&p, 4, (1, 3, 3), Some(c), false)?;
                    if std::mem::take(&mut pending) {
                        cv = cv.with_parity();
                    }
                    c = cv.cout;
                    Layer::Conv(cv)
                }
                Kind::Mem => {
                    let a = wt.conv(&format!("{p}.conv.0"), 4, (1, 3, 3), Some(2 * c), false)?;
                    let o = a.cout;
                    let b = wt.conv(&format!("{p}.conv.2"), 4, (1, 3, 3), Some(o), false)?;
                    let d = wt.conv(&format!("{p}.conv.4"), 4, (1, 3, 3), Some(o), false)?;
                    if b.cout != o || d.cout != o {
                        return Err(wt.err(format!("`{p}.conv.*` must all output {o} channels")));
                    }
                    let skip = if wt.has(&format!("{p}.skip.weight")) {
                        let s = wt.conv(&format!("{p}.skip"), 4, (1, 1, 1), Some(c), false)?;
                        if s.cout != o {
                            return Err(
                                wt.err(format!("`{p}.skip.weight` must output {o} channels"))
                            );
                        }
                        Some(s)
                    } else if o != c {
                        return Err(wt.err(format!("missing tensor `{p}.skip.weight`")));
                    } else {
                        None
                    };
                    mem_dims.push((c, up));
                    pending = false;
                    c = o;
                    Layer::Mem {
                        convs: Box::new([a, b, d]),
                        skip,
                        slot: mem_dims.len() - 1,
                    }
                }
                Kind::TGrow => {
                    let cv = wt.conv(&format!("{p}.conv"), 4, (1, 1, 1), Some(c), false)?;
                    if cv.cout % c != 0 {
                        return Err(wt.err(format!(
                            "`{p}.conv.weight` outputs {} channels, not a multiple of {c}",
                            cv.cout
                        )));
                    }
                    let stride = cv.cout / c;
                    t_up *= stride;
                    Layer::TGrow { conv: cv, stride }
                }
            };
            layers.push(layer);
        }
        if c != 3 {
            return Err(wt.err(format!(
                "`decoder.22.weight` has {c} output channels, expected 3 (RGB)"
            )));
        }
        Ok(Taehv {
            layers,
            z_dim: z,
            t_up,
            up,
            trim: t_up - 1,
            mem_dims,
        })
    }

    /// Fresh streaming state.
    pub fn state(&self) -> TaehvState {
        TaehvState {
            mem: vec![None; self.mem_dims.len()],
            to_trim: self.trim,
        }
    }

    /// Bytes the MemBlock memories take at latent size `h x w` (f32).
    pub fn cache_bytes(&self, h: usize, w: usize) -> usize {
        self.mem_dims
            .iter()
            .map(|&(c, s)| frame_bytes(c, s, h, w))
            .fold(0, usize::saturating_add)
    }

    /// Bytes of the largest activation frame at latent size `h x w` (a MemBlock's concatenated
    /// input counts twice).
    pub fn max_frame_bytes(&self, h: usize, w: usize) -> usize {
        self.mem_dims
            .iter()
            .map(|&(c, s)| frame_bytes(2 * c, s, h, w))
            .chain([frame_bytes(3 * self.t_up, self.up, h, w)])
            .max()
            .unwrap_or(0)
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                Layer::Conv(c) | Layer::TGrow { conv: c, .. } => c.bytes(),
                Layer::Mem { convs, skip, .. } => {
                    convs.iter().map(|c| c.bytes()).sum::<usize>()
                        + skip.as_ref().map_or(0, |s| s.bytes())
                }
                _ => 0,
            })
            .sum()
    }

    /// Floating-point operations of the convolutions for one latent frame of a running stream
    /// (every MemBlock with its memory) at latent size `h x w`, as [`Taehv::run`] does them:
    /// `TGrow` at the lower resolution, the upsample convs in the parity form when built so.
    pub fn conv_flops(&self, mut h: usize, mut w: usize) -> f64 {
        let (mut frames, mut pending, mut f) = (1.0f64, false, 0.0f64);
        for layer in &self.layers {
            if pending && matches!(layer, Layer::Mem { .. } | Layer::Clamp) {
                (h, w, pending) = (2 * h, 2 * w, false);
            }
            f += frames
                * match layer {
                    Layer::Up => {
                        pending = true;
                        0.0
                    }
                    Layer::Conv(cv) => {
                        if std::mem::take(&mut pending) {
                            (h, w) = (2 * h, 2 * w);
                            cv.flops(h, w, 1, true)
                        } else {
                            cv.flops(h, w, 1, false)
                        }
                    }
                    Layer::TGrow { conv, stride } => {
                        let f = conv.flops(h, w, 1, false);
                        frames *= *stride as f64;
                        f
                    }
                    // `cin` counts both halves of `cat[x, past]`.
                    Layer::Mem { convs, skip, .. } => {
                        convs.iter().map(|c| c.flops(h, w, 1, false)).sum::<f64>()
                            + skip.as_ref().map_or(0.0, |s| s.flops(h, w, 1, false))
                    }
                    Layer::Clamp | Layer::Relu => 0.0,
                };
        }
        f
    }

    /// Decodes latent frames (each `[z, h, w]`) continuing `st`; returns the pixel frames
    /// `[3, H, W]` (`2x - 1`, not clamped), the stream's leading frames trimmed.
    pub fn run(
        &self,
        latents: Vec<Vec<f32>>,
        h: usize,
        w: usize,
        st: &mut TaehvState,
    ) -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        for z in latents {
            let at = Pos {
                c: self.z_dim,
                h,
                w,
                pending: false,
            };
            self.forward(0, z, at, st, &mut out);
        }
        let drop = st.to_trim.min(out.len());
        st.to_trim -= drop;
        out.drain(..drop);
        out
    }

    /// Runs one frame `x` through layers `from..`, depth first as upstream's sequential mode:
    /// after a `TGrow`, each of its frames goes through the rest of the decoder before the
    /// next, so only one frame per level is alive at a time. Finished frames go to `out`.
    fn forward(
        &self,
        from: usize,
        mut x: Vec<f32>,
        at: Pos,
        st: &mut TaehvState,
        out: &mut Vec<Vec<f32>>,
    ) {
        let Pos {
            mut c,
            mut h,
            mut w,
            mut pending,
        } = at;
        for (i, layer) in self.layers.iter().enumerate().skip(from) {
            // A pending nearest 2x upsample not yet applied to `x`: 1x1 convs and ReLU commute
            // with it, a 3x3 conv reads through it, anything else needs it applied.
            if pending && matches!(layer, Layer::Mem { .. } | Layer::Up | Layer::Clamp) {
                x = upsample2x(&x, c, h, w);
                h *= 2;
                w *= 2;
                pending = false;
            }
            match layer {
                Layer::Clamp => {
                    map_inplace(std::slice::from_mut(&mut x), |v| (v / 3.0).tanh() * 3.0)
                }
                Layer::Relu => map_inplace(std::slice::from_mut(&mut x), |v| v.max(0.0)),
                Layer::Up => pending = true,
                Layer::Conv(cv) => {
                    if pending {
                        h *= 2;
                        w *= 2;
                    }
                    x = first(cv.forward(&one(&x, c, pending), h, w));
                    pending = false;
                    c = cv.cout;
                }
                Layer::TGrow { conv, stride } => {
                    let y = first(conv.forward(&one(&x, c, false), h, w));
                    drop(x);
                    debug_assert_eq!(conv.cout, stride * c);
                    for f in y.chunks(c * h * w) {
                        let at = Pos { c, h, w, pending };
                        self.forward(i + 1, f.to_vec(), at, st, out);
                    }
                    return;
                }
                Layer::Mem { convs, skip, slot } => {
                    let past = st.mem[*slot].take();
                    let o = convs[0].cout;
                    let mut job = vec![Src::new(&x, 0, c)];
                    if let Some(p) = &past {
                        job.push(Src {
                            data: p,
                            t: 0,
                            c0: c,
                            c,
                            up: false,
                        });
                    }
                    let mut y = first(convs[0].forward(&[job], h, w));
                    for cv in &convs[1..] {
                        map_inplace(std::slice::from_mut(&mut y), |v| v.max(0.0));
                        y = first(cv.forward(&one(&y, o, false), h, w));
                    }
                    let s = skip
                        .as_ref()
                        .map(|s| first(s.forward(&one(&x, c, false), h, w)));
                    let sk = s.as_ref().unwrap_or(&x);
                    y.iter_mut()
                        .zip(sk)
                        .for_each(|(a, b)| *a = (*a + b).max(0.0));
                    // The memory is the block's input; the previous one's buffer is freed.
                    drop(past);
                    st.mem[*slot] = Some(x);
                    x = y;
                    c = o;
                }
            }
        }
        if pending {
            x = upsample2x(&x, c, h, w);
        }
        map_inplace(std::slice::from_mut(&mut x), |v| v * 2.0 - 1.0);
        out.push(x);
    }
}

/// Where a frame is in the decoder: channels, size, and whether a 2x upsample is pending.
#[derive(Clone, Copy)]
struct Pos {
    c: usize,
    h: usize,
    w: usize,
    pending: bool,
}

/// The job list of a conv over the single frame `x` (read through a 2x upsample when `up`).
fn one(x: &[f32], c: usize, up: bool) -> Vec<Vec<Src<'_>>> {
    let mut s = Src::new(x, 0, c);
    s.up = up;
    vec![vec![s]]
}

/// The single output frame of a one-job convolution.
fn first(mut v: Vec<Vec<f32>>) -> Vec<f32> {
    v.pop().unwrap_or_default()
}

/// Weights of a TAEHV decoder with the given widths (real `taew2_1`: 256, 128, 64, 64) and
/// random values, under upstream names.
pub(crate) fn synthetic(
    widths: [usize; 4],
    z: usize,
    seed: u64,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut t = Vec::new();
    let mut c = z;
    let mut level = 0;
    for (i, kind) in LAYOUT.iter().enumerate() {
        let p = format!("decoder.{i}");
        let mut add = |n: String, s: Vec<usize>| t.push(random_tensor(&mut rng, &n, s));
        match kind {
            Kind::Conv => {
                let o = if i == LAYOUT.len() - 1 {
                    3
                } else {
                    widths[level.min(3)]
                };
                add(format!("{p}.weight"), vec![o, c, 3, 3]);
                if i == 1 || i == LAYOUT.len() - 1 {
                    add(format!("{p}.bias"), vec![o]);
                }
                c = o;
            }
            Kind::Mem => {
                add(format!("{p}.conv.0.weight"), vec![c, 2 * c, 3, 3]);
                for j in [0, 2, 4] {
                    if j > 0 {
                        add(format!("{p}.conv.{j}.weight"), vec![c, c, 3, 3]);
                    }
                    add(format!("{p}.conv.{j}.bias"), vec![c]);
                }
            }
            Kind::TGrow => {
                let stride = if level == 0 { 1 } else { 2 };
                add(format!("{p}.conv.weight"), vec![stride * c, c, 1, 1]);
                level += 1;
            }
            _ => {}
        }
    }
    t
}
