//! The Wan2.1 VAE decoder (`Decoder3d` of `Wan2.1_VAE.pth`), as `WanVAEWrapper.decode_to_pixel`
//! runs it: un-normalise, the 1x1x1 `conv2`, then the decoder one latent frame at a time with
//! causal-convolution caches, and a final clamp to [-1, 1]. See docs/decoders.md.

use super::conv::{attention, rms_norm, Conv, Src};
use super::weights::{random_tensor, Weights};
use crate::Result;

/// Per-channel latent mean of the Wan2.1 VAE (`WanVAEWrapper`).
pub const MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
/// Per-channel latent standard deviation of the Wan2.1 VAE (`WanVAEWrapper`).
pub const STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

/// A block of the decoder's `middle` or `upsamples` list (the device decoder walks the same list).
pub(crate) enum Block {
    /// `ResidualBlock`: norm, SiLU, causal conv, norm, SiLU, causal conv, plus a shortcut.
    Res {
        g1: Vec<f32>,
        a: Conv,
        g2: Vec<f32>,
        b: Conv,
        short: Option<Conv>,
        ca: usize,
        cb: usize,
    },
    /// `AttentionBlock`: single-head attention over the pixels of each frame.
    Attn { g: Vec<f32>, qkv: Conv, proj: Conv },
    /// `Resample` upsample2d (no `time`) or upsample3d (`time`, with its cache slot).
    Up {
        conv: Conv,
        time: Option<(Conv, usize)>,
    },
}

/// The loaded decoder.
pub(crate) struct WanVae {
    /// Latent channels (16 for Wan2.1).
    pub z_dim: usize,
    pub(crate) conv2: Conv,
    pub(crate) conv1: Conv,
    pub(crate) blocks: Vec<Block>,
    pub(crate) head_g: Vec<f32>,
    pub(crate) head: Conv,
    /// Spatial upsampling factor (8 for Wan2.1).
    pub up: usize,
    /// Temporal upsampling factor after the stream's first frame: 2 per `time_conv` (4 for
    /// Wan2.1).
    pub t_up: usize,
    /// Causal caches: (input channels, spatial factor relative to the latent grid).
    pub(crate) cache_dims: Vec<(usize, usize)>,
}

/// Streaming state: the causal caches (the last two input frames of every causal conv) and,
/// for every temporal upsample, whether it has seen its first frame (upstream's `'Rep'`).
pub(crate) struct WanState {
    caches: Vec<Vec<Vec<f32>>>,
    started: Vec<bool>,
}

impl WanState {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.caches.iter().flatten().map(|f| 4 * f.len()).sum()
    }
}

/// A causal conv over the frames `x` continuing the stream held in `cache` (up to `kt - 1`
/// previous input frames; missing ones are zero), which then keeps the last `kt - 1` inputs.
fn causal(
    conv: &Conv,
    x: Vec<Vec<f32>>,
    cache: &mut Vec<Vec<f32>>,
    h: usize,
    w: usize,
) -> Vec<Vec<f32>> {
    let pre = conv.kt - 1;
    let hist = std::mem::take(cache);
    let out = {
        let mut seq: Vec<Option<&[f32]>> = vec![None; pre.saturating_sub(hist.len())];
        seq.extend(hist.iter().map(|f| Some(f.as_slice())));
        seq.extend(x.iter().map(|f| Some(f.as_slice())));
        let jobs: Vec<Vec<Src>> = (0..x.len())
            .map(|i| {
                (0..conv.kt)
                    .filter_map(|t| seq[i + t].map(|d| Src::new(d, t, conv.cin)))
                    .collect()
            })
            .collect();
        conv.forward(&jobs, h, w)
    };
    let mut all: Vec<Vec<f32>> = hist.into_iter().chain(x).collect();
    let keep = all.len().saturating_sub(pre);
    *cache = all.split_off(keep);
    out
}

/// A causal conv like [`causal`] that keeps, instead of its last `kt - 1` input frames, the
/// partial output sums those frames contribute to the next `kt - 1` outputs (`parts[j]` for
/// output `next + j`). That is `kt - 1` frames of `cout` channels instead of `cin`: the head's
/// cache (96 -> 3 channels at full resolution) shrinks 32x. The taps are accumulated in the
/// same order as [`causal`], so the values are identical.
fn causal_partial(
    conv: &Conv,
    x: Vec<Vec<f32>>,
    parts: &mut Vec<Vec<f32>>,
    h: usize,
    w: usize,
) -> Vec<Vec<f32>> {
    let kt = conv.kt;
    let mut out = Vec::with_capacity(x.len());
    for f in &x {
        let src = |t: usize| vec![Src::new(f, t, conv.cin)];
        let get = |j: usize| parts.get(j).map(|p| p.as_slice());
        out.extend(conv.forward_from(&[src(kt - 1)], &[get(0)], true, h, w));
        let jobs: Vec<Vec<Src>> = (0..kt - 1).map(|j| src(kt - 2 - j)).collect();
        let init: Vec<Option<&[f32]>> = (0..kt - 1).map(|j| get(j + 1)).collect();
        let next = conv.forward_from(&jobs, &init, false, h, w);
        *parts = next;
    }
    out
}

/// Bytes of one f32 frame of `c` channels at `s` times the latent size `h x w` (saturating).
pub(crate) fn frame_bytes(c: usize, s: usize, h: usize, w: usize) -> usize {
    [c, s, h, s, w, 4]
        .iter()
        .fold(1usize, |a, &b| a.saturating_mul(b))
}

/// A pointwise conv (kernel 1) of every frame.
fn pointwise(conv: &Conv, x: &[Vec<f32>], h: usize, w: usize) -> Vec<Vec<f32>> {
    let jobs: Vec<Vec<Src>> = x.iter().map(|f| vec![Src::new(f, 0, conv.cin)]).collect();
    conv.forward(&jobs, h, w)
}

impl WanVae {
    /// Reads the decoder from upstream tensor names, sizes from the shapes.
    pub fn load(wt: &Weights) -> Result<WanVae> {
        let z = wt.shape("conv2.weight")?.first().copied().unwrap_or(0);
        let conv2 = wt.conv("conv2", 5, (1, 1, 1), Some(z), true)?;
        if conv2.cout != z {
            return Err(wt.err(format!("`conv2.weight` must map {z} channels to {z}")));
        }
        let conv1 = wt.conv("decoder.conv1", 5, (3, 3, 3), Some(z), true)?;
        let mut cache_dims = vec![(z, 1)];
        let mut c = conv1.cout;
        let (mut up, mut t_up) = (1usize, 1usize);
        let mut blocks = Vec::new();
        for list in ["decoder.middle", "decoder.upsamples"] {
            let mut i = 0;
            while wt.has_prefix(&format!("{list}.{i}.")) {
                let p = format!("{list}.{i}");
                let (b, cout) = Self::block(wt, &p, c, up, &mut cache_dims)?;
                if let Block::Up { time, .. } = &b {
                    up *= 2;
                    if time.is_some() {
                        t_up *= 2;
                    }
                }
                blocks.push(b);
                c = cout;
                i += 1;
            }
            if i == 0 {
                return Err(wt.err(format!("missing tensors `{list}.0.*`")));
            }
        }
        let head_g = wt.vector("decoder.head.0.gamma", c)?;
        let head = wt.conv("decoder.head.2", 5, (3, 3, 3), Some(c), true)?;
        if head.cout != 3 {
            return Err(wt.err(format!(
                "`decoder.head.2.weight` has {} output channels, expected 3 (RGB)",
                head.cout
            )));
        }
        if up > 64 {
            return Err(wt.err(format!(
                "{} resample blocks: a {up}x spatial upsampling is not a Wan VAE",
                up.trailing_zeros()
            )));
        }
        cache_dims.push((c.min(head.cout), up));
        Ok(WanVae {
            z_dim: z,
            conv2,
            conv1,
            blocks,
            head_g,
            head,
            up,
            t_up,
            cache_dims,
        })
    }

    /// One block at prefix `p` taking `c` channels at spatial factor `up`; returns it with its
    /// output channels.
    fn block(
        wt: &Weights,
        p: &str,
        c: usize,
        up: usize,
        cache_dims: &mut Vec<(usize, usize)>,
    ) -> Result<(Block, usize)> {
        if wt.has(&format!("{p}.residual.0.gamma")) {
            let g1 = wt.vector(&format!("{p}.residual.0.gamma"), c)?;
            let a = wt.conv(&format!("{p}.residual.2"), 5, (3, 3, 3), Some(c), true)?;
            let o = a.cout;
            let g2 = wt.vector(&format!("{p}.residual.3.gamma"), o)?;
            let b = wt.conv(&format!("{p}.residual.6"), 5, (3, 3, 3), Some(o), true)?;
            if b.cout != o {
                return Err(wt.err(format!("`{p}.residual.6.weight` must output {o} channels")));
            }
            let short = if wt.has(&format!("{p}.shortcut.weight")) {
                let s = wt.conv(&format!("{p}.shortcut"), 5, (1, 1, 1), Some(c), true)?;
                if s.cout != o {
                    return Err(wt.err(format!("`{p}.shortcut.weight` must output {o} channels")));
                }
                Some(s)
            } else if c != o {
                return Err(wt.err(format!(
                    "missing tensor `{p}.shortcut.weight` ({c} -> {o} channels)"
                )));
            } else {
                None
            };
            let ca = cache_dims.len();
            cache_dims.push((c, up));
            cache_dims.push((o, up));
            Ok((
                Block::Res {
                    g1,
                    a,
                    g2,
                    b,
                    short,
                    ca,
                    cb: ca + 1,
                },
                o,
            ))
        } else if wt.has(&format!("{p}.to_qkv.weight")) {
            let g = wt.vector(&format!("{p}.norm.gamma"), c)?;
            let qkv = wt.conv(&format!("{p}.to_qkv"), 4, (1, 1, 1), Some(c), true)?;
            let proj = wt.conv(&format!("{p}.proj"), 4, (1, 1, 1), Some(c), true)?;
            if qkv.cout != 3 * c || proj.cout != c {
                return Err(wt.err(format!(
                    "`{p}`: attention over {c} channels needs to_qkv [{}, {c}, 1, 1] and proj [{c}, {c}, 1, 1]",
                    3 * c
                )));
            }
            Ok((Block::Attn { g, qkv, proj }, c))
        } else if wt.has(&format!("{p}.resample.1.weight")) {
            // Read through the nearest 2x upsample: the sub-pixel form.
            let conv = wt
                .conv(&format!("{p}.resample.1"), 4, (1, 3, 3), Some(c), true)?
                .with_parity();
            let time = if wt.has(&format!("{p}.time_conv.weight")) {
                let t = wt.conv(&format!("{p}.time_conv"), 5, (3, 1, 1), Some(c), true)?;
                if t.cout != 2 * c {
                    return Err(wt.err(format!(
                        "`{p}.time_conv.weight` must output {} channels",
                        2 * c
                    )));
                }
                cache_dims.push((c, up));
                Some((t, cache_dims.len() - 1))
            } else {
                None
            };
            let o = conv.cout;
            Ok((Block::Up { conv, time }, o))
        } else {
            Err(wt.err(format!(
                "`{p}.*` is not a residual, attention or resample block of the Wan VAE decoder"
            )))
        }
    }

    /// Fresh streaming state (all caches empty).
    pub fn state(&self) -> WanState {
        WanState {
            caches: vec![Vec::new(); self.cache_dims.len()],
            started: vec![false; self.cache_dims.len()],
        }
    }

    /// Bytes the full caches take at latent size `h x w` (f32).
    pub fn cache_bytes(&self, h: usize, w: usize) -> usize {
        self.cache_dims
            .iter()
            .map(|&(c, s)| frame_bytes(c, s, h, w).saturating_mul(2))
            .fold(0, usize::saturating_add)
    }

    /// Bytes of the largest activation frame at latent size `h x w` (twice the widest input
    /// of a level, which covers the temporal upsample's doubled channels).
    pub fn max_frame_bytes(&self, h: usize, w: usize) -> usize {
        self.cache_dims
            .iter()
            .map(|&(c, s)| frame_bytes(2 * c, s, h, w))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let mut n =
            self.conv1.bytes() + self.conv2.bytes() + self.head.bytes() + 4 * self.head_g.len();
        for b in &self.blocks {
            n += match b {
                Block::Res {
                    g1,
                    a,
                    g2,
                    b,
                    short,
                    ..
                } => {
                    4 * (g1.len() + g2.len())
                        + a.bytes()
                        + b.bytes()
                        + short.as_ref().map_or(0, |s| s.bytes())
                }
                Block::Attn { g, qkv, proj } => 4 * g.len() + qkv.bytes() + proj.bytes(),
                Block::Up { conv, time } => conv.bytes() + time.as_ref().map_or(0, |t| t.0.bytes()),
            };
        }
        n
    }

    /// Floating-point operations of the convolutions and attention products for one latent
    /// frame of a running stream (every cache full, every `time_conv` started) at latent
    /// size `h x w`, as [`WanVae::step`] does them: the upsample convs in the parity form
    /// when built so.
    pub fn conv_flops(&self, mut h: usize, mut w: usize) -> f64 {
        let causal = |c: &Conv, h: usize, w: usize| c.flops(h, w, c.kt, false);
        let mut frames = 1.0f64;
        let mut f = self.conv2.flops(h, w, 1, false) + causal(&self.conv1, h, w);
        for b in &self.blocks {
            f += match b {
                Block::Res { a, b, short, .. } => {
                    frames
                        * (causal(a, h, w)
                            + causal(b, h, w)
                            + short.as_ref().map_or(0.0, |s| s.flops(h, w, 1, false)))
                }
                Block::Attn { qkv, proj, .. } => {
                    // Scores and the weighted sum: two (h w) x (h w) x C products.
                    let p = (h * w) as f64;
                    frames
                        * (qkv.flops(h, w, 1, false)
                            + proj.flops(h, w, 1, false)
                            + 4.0 * p * p * proj.cout as f64)
                }
                Block::Up { conv, time } => {
                    // `time_conv` on each input frame, doubling them; then the upsample conv.
                    let t = time.as_ref().map_or(0.0, |(t, _)| frames * causal(t, h, w));
                    if time.is_some() {
                        frames *= 2.0;
                    }
                    (h, w) = (2 * h, 2 * w);
                    t + frames * conv.flops(h, w, 1, true)
                }
            };
        }
        f + frames * causal(&self.head, h, w)
    }

    /// Decodes one latent frame `[z, h, w]` (as the DiT produces it), continuing `st`; returns
    /// its pixel frames `[3, H, W]` (1 for the stream's first latent frame, `t_up` after).
    pub fn step(&self, z: &[f32], h: usize, w: usize, st: &mut WanState) -> Vec<Vec<f32>> {
        let hw = h * w;
        // Un-normalise exactly as upstream: z / (1/std) + mean, in f32.
        let mut x = z.to_vec();
        for (ch, plane) in x.chunks_mut(hw).enumerate() {
            let inv = 1.0f32 / STD[ch % 16];
            let mean = MEAN[ch % 16];
            plane.iter_mut().for_each(|v| *v = *v / inv + mean);
        }
        let x = pointwise(&self.conv2, &[x], h, w);
        let x = causal(&self.conv1, x, &mut st.caches[0], h, w);
        let mut out = Vec::new();
        self.forward(0, x, h, w, st, &mut out);
        out
    }

    /// Runs frames `x` (one, in practice) through blocks `from..` and the head, depth first:
    /// after a temporal upsample each of its two frames goes through the rest of the decoder
    /// before the next, so only one frame per level is alive at a time. Every op is per frame
    /// or a causal conv over its own input stream, so this order gives the same values as
    /// upstream's whole-chunk order. Finished frames go to `out`.
    fn forward(
        &self,
        from: usize,
        mut x: Vec<Vec<f32>>,
        mut h: usize,
        mut w: usize,
        st: &mut WanState,
        out: &mut Vec<Vec<f32>>,
    ) {
        for (i, b) in self.blocks.iter().enumerate().skip(from) {
            x = match b {
                Block::Res {
                    g1,
                    a,
                    g2,
                    b,
                    short,
                    ca,
                    cb,
                } => {
                    let r = rms_norm(&x, a.cin, g1, true);
                    let r = causal(a, r, &mut st.caches[*ca], h, w);
                    let r = rms_norm(&r, a.cout, g2, true);
                    let mut r = causal(b, r, &mut st.caches[*cb], h, w);
                    let s = match short {
                        Some(s) => pointwise(s, &x, h, w),
                        None => x,
                    };
                    for (o, s) in r.iter_mut().zip(&s) {
                        o.iter_mut().zip(s).for_each(|(o, s)| *o += s);
                    }
                    r
                }
                Block::Attn { g, qkv, proj } => {
                    let c = proj.cout;
                    let n = rms_norm(&x, c, g, false);
                    let q = pointwise(qkv, &n, h, w);
                    drop(n);
                    let att: Vec<Vec<f32>> = q.iter().map(|q| attention(q, c, h * w)).collect();
                    drop(q);
                    let mut y = pointwise(proj, &att, h, w);
                    for (o, s) in y.iter_mut().zip(&x) {
                        o.iter_mut().zip(s).for_each(|(o, s)| *o += s);
                    }
                    y
                }
                Block::Up { conv, time } => {
                    let c = conv.cin;
                    let mut f = x;
                    if let Some((t, slot)) = time {
                        if st.started[*slot] {
                            let y = causal(t, f, &mut st.caches[*slot], h, w);
                            // Channels [0, C) are frame 2t, [C, 2C) frame 2t+1.
                            f = y
                                .into_iter()
                                .flat_map(|mut a| {
                                    let b = a.split_off(c * h * w);
                                    [a, b]
                                })
                                .collect();
                        } else {
                            // The stream's first frame skips the time conv; the next one then
                            // sees zeros before it (upstream's 'Rep' marker).
                            st.started[*slot] = true;
                        }
                    }
                    h *= 2;
                    w *= 2;
                    let up = |d: &Vec<f32>| {
                        let mut s = Src::new(d, 0, c);
                        s.up = true;
                        conv.forward(&[vec![s]], h, w)
                    };
                    if f.len() > 1 {
                        for d in f {
                            let y = up(&d);
                            drop(d);
                            self.forward(i + 1, y, h, w, st, out);
                        }
                        return;
                    }
                    f.iter().flat_map(up).collect()
                }
            };
        }
        let r = rms_norm(&x, self.head.cin, &self.head_g, true);
        drop(x);
        let last = st.caches.len() - 1;
        let mut y = if self.head.cout < self.head.cin {
            causal_partial(&self.head, r, &mut st.caches[last], h, w)
        } else {
            causal(&self.head, r, &mut st.caches[last], h, w)
        };
        for f in y.iter_mut() {
            f.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
        }
        out.extend(y);
    }
}

/// Weights of a Wan2.1-shaped VAE decoder (`dim_mult` [1, 2, 4, 4], 2 residual blocks per
/// level, attention in the middle only, temporal upsampling in the first two levels) with
/// random values, under upstream names. `dim` is 96 in the real model.
pub(crate) fn synthetic(dim: usize, z: usize, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut t = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| t.push(random_tensor(&mut rng, &name, shape));
    let k3 = |o: usize, i: usize| vec![o, i, 3, 3, 3];
    add("conv2.weight".into(), vec![z, z, 1, 1, 1]);
    add("conv2.bias".into(), vec![z]);
    let top = 4 * dim;
    add("decoder.conv1.weight".into(), k3(top, z));
    add("decoder.conv1.bias".into(), vec![top]);
    let res = |add: &mut dyn FnMut(String, Vec<usize>), p: String, i: usize, o: usize| {
        add(format!("{p}.residual.0.gamma"), vec![i, 1, 1, 1]);
        add(format!("{p}.residual.2.weight"), k3(o, i));
        add(format!("{p}.residual.2.bias"), vec![o]);
        add(format!("{p}.residual.3.gamma"), vec![o, 1, 1, 1]);
        add(format!("{p}.residual.6.weight"), k3(o, o));
        add(format!("{p}.residual.6.bias"), vec![o]);
        if i != o {
            add(format!("{p}.shortcut.weight"), vec![o, i, 1, 1, 1]);
            add(format!("{p}.shortcut.bias"), vec![o]);
        }
    };
    res(&mut add, "decoder.middle.0".into(), top, top);
    add("decoder.middle.1.norm.gamma".into(), vec![top, 1, 1]);
    add(
        "decoder.middle.1.to_qkv.weight".into(),
        vec![3 * top, top, 1, 1],
    );
    add("decoder.middle.1.to_qkv.bias".into(), vec![3 * top]);
    add("decoder.middle.1.proj.weight".into(), vec![top, top, 1, 1]);
    add("decoder.middle.1.proj.bias".into(), vec![top]);
    res(&mut add, "decoder.middle.2".into(), top, top);
    let dims = [4 * dim, 4 * dim, 4 * dim, 2 * dim, dim];
    let mut idx = 0;
    for i in 0..4 {
        let mut cin = if i == 0 { dims[0] } else { dims[i] / 2 };
        let o = dims[i + 1];
        for _ in 0..3 {
            res(&mut add, format!("decoder.upsamples.{idx}"), cin, o);
            cin = o;
            idx += 1;
        }
        if i < 3 {
            let p = format!("decoder.upsamples.{idx}");
            add(format!("{p}.resample.1.weight"), vec![o / 2, o, 3, 3]);
            add(format!("{p}.resample.1.bias"), vec![o / 2]);
            if i < 2 {
                add(format!("{p}.time_conv.weight"), vec![2 * o, o, 3, 1, 1]);
                add(format!("{p}.time_conv.bias"), vec![2 * o]);
            }
            idx += 1;
        }
    }
    add("decoder.head.0.gamma".into(), vec![dim, 1, 1, 1]);
    add("decoder.head.2.weight".into(), k3(3, dim));
    add("decoder.head.2.bias".into(), vec![3]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sum_cache_equals_input_cache_bit_for_bit() {
        let (cin, cout, h, w) = (6, 2, 3, 4);
        let mut r = crate::rng::Rng::new(4);
        let mut v = |n: usize| (0..n).map(|_| r.normal()).collect::<Vec<f32>>();
        let conv = Conv::from_torch(&v(cout * cin * 27), &[cout, cin, 3, 3, 3], Some(v(cout)));
        let frames: Vec<Vec<f32>> = (0..7).map(|_| v(cin * h * w)).collect();
        let whole = causal(&conv, frames.clone(), &mut Vec::new(), h, w);
        let mut parts = Vec::new();
        let mut got = Vec::new();
        for chunk in [&frames[..1], &frames[1..3], &frames[3..]] {
            got.extend(causal_partial(&conv, chunk.to_vec(), &mut parts, h, w));
        }
        assert_eq!(got, whole);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() == cout * h * w));
    }
}
