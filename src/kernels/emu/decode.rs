//! The decoder kernels (`cuda/conv.cu`, `cuda/decode_ops.cu`) on host slices: each wrapper
//! checks the lengths the launch touches, then runs the launch [`crate::kernels::launch`]
//! builds (the one the device decoder launches too). NHWC bf16 frames are `[h*w][stride]`.

use super::super::launch::{self, ConvEpilogue, ConvOut, ConvShape, ConvSource, Launch};
use super::super::params::*;
use super::super::{invalid, Kernel, LaunchResult};
use super::{check_len, run};
use half::bf16;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};

/// One input frame of [`conv`]: NHWC `data` with `channels` of `stride` per pixel, meeting
/// time tap `t` and weight channels from `c0`; `up`: read through a nearest 2x upsample.
#[derive(Clone, Copy, Debug)]
pub struct ConvSrc<'a> {
    /// The frame.
    pub data: &'a [bf16],
    /// Channels.
    pub channels: usize,
    /// Elements per pixel.
    pub stride: usize,
    /// First weight input channel.
    pub c0: usize,
    /// Time tap.
    pub t: usize,
    /// Nearest 2x upsampled read.
    pub up: bool,
}

/// The output of [`conv`].
pub enum ConvDst<'a> {
    /// bf16 values.
    Bf16(&'a mut [bf16]),
    /// f32 values.
    F32(&'a mut [f32]),
}

/// Activation after a [`conv`]'s bias and residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAct {
    /// None.
    None,
    /// ReLU.
    Relu,
    /// SiLU.
    Silu,
}

impl ConvAct {
    /// The `BC_ACT_*` selector.
    pub fn code(self) -> u32 {
        match self {
            ConvAct::None => BC_ACT_NONE,
            ConvAct::Relu => BC_ACT_RELU,
            ConvAct::Silu => BC_ACT_SILU,
        }
    }
}

/// `bc_conv` / `bc_conv_n16` (`cuda/conv.cu`, by the output channels): `h x w` output frames;
/// weights `[cout][kt][kh][kw][cin]`; `res` a residual `[h*w][res_stride]` per frame; `geo` is
/// `(out_stride, split, frame_stride, frames)`: the output has `out_stride` elements per pixel
/// and channel `n` goes to frame `n / split` (`frame_stride` elements apart); `frames` >= 1
/// frames in one launch (`ConvOut::frames`: each source and the residual hold that many
/// contiguous frames, frame `f` writes output frames `f * (cout / split)` on).
#[allow(clippy::too_many_arguments)]
pub fn conv(
    srcs: &[ConvSrc],
    weights: &[bf16],
    shape: ConvShape,
    hw: (usize, usize),
    bias: Option<&[f32]>,
    res: Option<(&[bf16], usize)>,
    act: ConvAct,
    out: ConvDst,
    geo: (usize, usize, usize, usize),
) -> LaunchResult {
    conv_impl(
        srcs,
        weights,
        shape,
        hw,
        (bias, res, act),
        out,
        geo,
        None,
        Via::Wgmma,
    )
}

/// [`conv`] on the Hopper variant (`cuda/conv_wgmma.cu`) with `tile` output channels per block
/// (`BC_CONV_WG_BN`: `bc_conv_wgmma`, `BC_CONV_WG_BN_96`: `bc_conv_wgmma_n96`,
/// `BC_CONV_WG_BN_64`: `bc_conv_wgmma_n64`); an error
/// (nothing runs) when the conv does not fit it (every channel count, stride and offset a
/// multiple of 8, more than `BC_CONV_BN_NARROW` output channels), instead of falling back to
/// `bc_conv`.
#[allow(clippy::too_many_arguments)]
pub fn conv_wgmma(
    srcs: &[ConvSrc],
    weights: &[bf16],
    shape: ConvShape,
    hw: (usize, usize),
    bias: Option<&[f32]>,
    res: Option<(&[bf16], usize)>,
    act: ConvAct,
    out: ConvDst,
    geo: (usize, usize, usize, usize),
    tile: u32,
) -> LaunchResult {
    conv_impl(
        srcs,
        weights,
        shape,
        hw,
        (bias, res, act),
        out,
        geo,
        Some(tile),
        Via::Wgmma,
    )
}

/// [`conv_wgmma`] on one of the wgmma conv kernels, `via` (each an error, nothing run, where
/// the conv does not fit it).
#[allow(clippy::too_many_arguments)]
pub fn conv_wgmma_via(
    srcs: &[ConvSrc],
    weights: &[bf16],
    shape: ConvShape,
    hw: (usize, usize),
    bias: Option<&[f32]>,
    res: Option<(&[bf16], usize)>,
    act: ConvAct,
    out: ConvDst,
    geo: (usize, usize, usize, usize),
    tile: u32,
    via: Via,
) -> LaunchResult {
    conv_impl(
        srcs,
        weights,
        shape,
        hw,
        (bias, res, act),
        out,
        geo,
        Some(tile),
        via,
    )
}

/// Which wgmma conv kernel [`conv_wgmma_via`] runs ([`conv_wgmma`] is `Wgmma`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `bc_conv_wgmma*` (the tile given).
    Wgmma,
    /// `bc_conv_wgmma_tma*` (`cuda/conv_wgmma_tma.cu`: operand tiles by TMA from a producer
    /// warp, the maps encoded as the emulation's tensor maps by the same specs the device path
    /// gives the driver): the wgmma conv's 128- or 96-channel tile, no upsampled source.
    Tma,
    /// `bc_conv_wgmma_ws*` (`cuda/conv_ws.cu`, [`launch::conv_ws`]: a producer warpgroup gathers
    /// for two consumer warpgroups; it picks its own channel tile, 192, 96 or 64, and must give
    /// `bc_conv_wgmma`'s bits; the tile given must be `BC_CONV_WG_BN`).
    Ws,
    /// `bc_conv_halo_n64` on exactly this many blocks, more than the launch has tiles too (the
    /// extra blocks find none) (`cuda/conv_halo.cu`, [`launch::conv_halo`]: weights resident,
    /// one input halo per pixel tile, tiles claimed from a counter; it must give
    /// `bc_conv_wgmma_n64`'s bits; [`launch::conv_halo_fits`]: 3x3, 64 outputs, one or two
    /// 64-channel sources or one of 128, plain or upsampled; the tile given must be
    /// `BC_CONV_WG_BN_64`). The launching thread's one counter pair serves all its halo
    /// launches, never reset by the host: a launch that leaves it non-zero is an error.
    Halo(u32),
}

type ConvEpi<'a> = (Option<&'a [f32]>, Option<(&'a [bf16], usize)>, ConvAct);

#[allow(clippy::too_many_arguments)]
fn conv_impl(
    srcs: &[ConvSrc],
    weights: &[bf16],
    shape: ConvShape,
    (h, w): (usize, usize),
    (bias, res, act): ConvEpi,
    out: ConvDst,
    (out_stride, split, frame_stride, frames): (usize, usize, usize, usize),
    wgmma_tile: Option<u32>,
    via: Via,
) -> LaunchResult {
    let k = if wgmma_tile.is_some() {
        Kernel::ConvWgmma
    } else {
        Kernel::Conv
    };
    let hw = h * w;
    let need_w = shape.weight_len();
    check_len(k, "weights", weights.len(), need_w)?;
    if let Some(b) = bias {
        check_len(k, "bias", b.len(), shape.cout)?;
    }
    let mut ls = Vec::with_capacity(srcs.len());
    for s in srcs {
        let pixels = if s.up { (h / 2) * (w / 2) } else { hw };
        if pixels > 0 && frames > 0 {
            check_len(
                k,
                "source",
                s.data.len(),
                ((frames - 1) * pixels + pixels - 1) * s.stride + s.channels,
            )?;
        }
        ls.push(ConvSource {
            x: s.data.as_ptr().cast(),
            channels: s.channels,
            stride: s.stride,
            c0: s.c0,
            t: s.t,
            up: s.up,
        });
    }
    if let Some((r, rs)) = res {
        if hw > 0 && frames > 0 {
            check_len(k, "residual", r.len(), (frames * hw - 1) * rs + shape.cout)?;
        }
    }
    if split == 0 || shape.cout % split != 0 {
        return Err(invalid(k, "split must divide cout"));
    }
    let need_out = if hw == 0 || frames == 0 {
        0
    } else {
        (frames * (shape.cout / split) - 1) * frame_stride + (hw - 1) * out_stride + split
    };
    let (ptr, is_f32): (*mut c_void, bool) = match out {
        ConvDst::Bf16(o) => {
            check_len(k, "out", o.len(), need_out)?;
            (o.as_mut_ptr().cast(), false)
        }
        ConvDst::F32(o) => {
            check_len(k, "out", o.len(), need_out)?;
            (o.as_mut_ptr().cast(), true)
        }
    };
    let l = launch::conv_tiled(
        &ls,
        weights.as_ptr().cast(),
        shape,
        (h, w),
        ConvEpilogue {
            bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()),
            res: res.map_or(std::ptr::null(), |r| r.0.as_ptr().cast()),
            res_stride: res.map_or(0, |r| r.1),
            act: act.code(),
        },
        ConvOut {
            out: ptr,
            f32: is_f32,
            stride: out_stride,
            split,
            frame_stride,
            cstride: 1,
            frames,
        },
        wgmma_tile,
    )?;
    let wg = matches!(
        l.kernel,
        Kernel::ConvWgmma | Kernel::ConvWgmmaN96 | Kernel::ConvWgmmaN64
    );
    if wgmma_tile.is_some() && !wg {
        return Err(invalid(
            k,
            "does not fit the wgmma conv (needs 8-aligned channels and > 16 outputs)",
        ));
    }
    if via == Via::Ws {
        return run(launch::conv_ws(l));
    }
    if let Via::Halo(ctas) = via {
        return conv_halo_run(l, ctas);
    }
    if via == Via::Tma {
        let kt = Kernel::ConvWgmmaTma;
        if !launch::conv_tma_fits(&l) {
            return Err(invalid(
                kt,
                "does not fit the TMA conv (an upsampled source, or the 64-channel tile)",
            ));
        }
        let maps = launch::conv_tma_specs(&l)
            .iter()
            .map(|(spec, addr)| spec.encode_emulated(*addr).map_err(|e| invalid(kt, e)))
            .collect::<LaunchResult<Vec<_>>>()?;
        return run(launch::conv_tma(l, &maps));
    }
    run(Ok(l))
}

thread_local! {
    /// The tile counter pair of this thread's `bc_conv_halo_n64` launches ([`Via::Halo`]).
    static HALO_COUNTER: [AtomicU32; 2] = const { [AtomicU32::new(0), AtomicU32::new(0)] };
}

/// `bc_conv_halo_n64` for the wgmma launch `l` on `ctas` blocks, claiming tiles from the
/// thread's counter pair, which the launch must leave at zero.
fn conv_halo_run(l: Launch<BcConvParams>, ctas: u32) -> LaunchResult {
    let k = Kernel::ConvHaloN64;
    HALO_COUNTER.with(|c| {
        let mut h = launch::conv_halo(l, ctas, c[0].as_ptr())?;
        // Exactly `ctas` blocks (the launcher stops at the tile count).
        h.grid[0] = ctas.max(1);
        run(Ok(h))?;
        let left = [c[0].load(Ordering::SeqCst), c[1].load(Ordering::SeqCst)];
        if left != [0, 0] {
            c.iter().for_each(|v| v.store(0, Ordering::SeqCst));
            return Err(invalid(
                k,
                format!("the tile counters were left at {left:?}"),
            ));
        }
        Ok(())
    })
}

/// `bc_dec_softmax` (`cuda/decode_ops.cu`): rows of `n` f32 scores to bf16 probabilities.
pub fn softmax(s: &[f32], n: usize, scale: f32, out: &mut [bf16]) -> LaunchResult {
    let k = Kernel::DecSoftmax;
    if n == 0 || s.len() % n != 0 {
        return Err(invalid(k, "n must divide s.len()"));
    }
    check_len(k, "out", out.len(), s.len())?;
    run(launch::dec_softmax(
        s.as_ptr(),
        out.as_mut_ptr().cast(),
        s.len() / n,
        n,
        scale,
    ))
}

/// How [`latent_in`] maps the latents.
#[derive(Clone, Copy, Debug)]
pub enum LatentMap<'a> {
    /// As they are.
    Identity,
    /// TAEHV's `tanh(z/3)*3`.
    TanhClamp,
    /// The Wan VAE's `z / scale[c] + mean[c]` (`scale = 1/std`).
    Unnormalise {
        /// `[c]` means.
        mean: &'a [f32],
        /// `[c]` reciprocal standard deviations.
        scale: &'a [f32],
    },
}

/// `bc_dec_latent_in` (`cuda/decode_ops.cu`): one latent frame `[c][hw]` f32 to NHWC bf16;
/// bit 0 of `nonfinite` is set (never cleared) when a latent is NaN or infinite.
pub fn latent_in(
    z: &[f32],
    c: usize,
    map: LatentMap,
    out: &mut [bf16],
    nonfinite: Option<&mut u32>,
) -> LaunchResult {
    let k = Kernel::DecLatentIn;
    if c == 0 || z.len() % c != 0 {
        return Err(invalid(k, "c must divide z.len()"));
    }
    check_len(k, "out", out.len(), z.len())?;
    let (mode, mean, scale) = match map {
        LatentMap::Identity => (0, std::ptr::null(), std::ptr::null()),
        LatentMap::TanhClamp => (1, std::ptr::null(), std::ptr::null()),
        LatentMap::Unnormalise { mean, scale } => {
            check_len(k, "mean", mean.len(), c)?;
            check_len(k, "scale", scale.len(), c)?;
            (2, mean.as_ptr(), scale.as_ptr())
        }
    };
    run(launch::dec_latent_in(
        z.as_ptr(),
        out.as_mut_ptr().cast(),
        c,
        z.len() / c,
        mode,
        mean,
        scale,
        nonfinite.map_or(std::ptr::null_mut(), |f| f as *mut u32),
    ))
}

/// `bc_dec_rms_norm` (`cuda/decode_ops.cu`): NHWC `[pixels][c]`, SiLU after when `silu`.
pub fn rms_norm(x: &[bf16], c: usize, gamma: &[f32], silu: bool, out: &mut [bf16]) -> LaunchResult {
    let k = Kernel::DecRmsNorm;
    if c == 0 || x.len() % c != 0 {
        return Err(invalid(k, "c must divide x.len()"));
    }
    check_len(k, "gamma", gamma.len(), c)?;
    check_len(k, "out", out.len(), x.len())?;
    run(launch::dec_rms_norm(
        x.as_ptr().cast(),
        out.as_mut_ptr().cast(),
        gamma.as_ptr(),
        x.len() / c,
        c,
        silu,
    ))
}

/// `bc_dec_upsample2x` (`cuda/decode_ops.cu`): `[h][w][c]` to `[2h][2w][c]` into `out` (and
/// `out2`).
pub fn upsample2x(
    x: &[bf16],
    (h, w, c): (usize, usize, usize),
    out: &mut [bf16],
    out2: Option<&mut [bf16]>,
) -> LaunchResult {
    let k = Kernel::DecUpsample2x;
    check_len(k, "x", x.len(), h * w * c)?;
    check_len(k, "out", out.len(), 4 * h * w * c)?;
    let o2 = match out2 {
        Some(o) => {
            check_len(k, "out2", o.len(), 4 * h * w * c)?;
            o.as_mut_ptr().cast()
        }
        None => std::ptr::null_mut(),
    };
    run(launch::dec_upsample2x(
        x.as_ptr().cast(),
        out.as_mut_ptr().cast(),
        o2,
        h,
        w,
        c,
    ))
}

/// The input of [`to_pixels`].
#[derive(Clone, Copy, Debug)]
pub enum PixelSrc<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
}

/// `bc_dec_to_pixels` (`cuda/decode_ops.cu`): channels 0..3 of `hw` pixels of `stride`
/// elements to `x * scale + shift` (clamped when `clamp`) as f32 `[3][hw]` and/or RGB8
/// `[hw][3]`.
#[allow(clippy::too_many_arguments)]
pub fn to_pixels(
    x: PixelSrc,
    hw: usize,
    stride: usize,
    affine: (f32, f32),
    clamp: bool,
    out_f32: Option<&mut [f32]>,
    rgb: Option<&mut [u8]>,
) -> LaunchResult {
    let k = Kernel::DecToPixels;
    let need = if hw == 0 { 0 } else { (hw - 1) * stride + 3 };
    let (ptr, is_f32, len): (*const c_void, bool, usize) = match x {
        PixelSrc::F32(v) => (v.as_ptr().cast(), true, v.len()),
        PixelSrc::Bf16(v) => (v.as_ptr().cast(), false, v.len()),
    };
    check_len(k, "x", len, need)?;
    let of = match out_f32 {
        Some(o) => {
            check_len(k, "out_f32", o.len(), 3 * hw)?;
            o.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    let rg = match rgb {
        Some(o) => {
            check_len(k, "rgb", o.len(), 3 * hw)?;
            o.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    run(launch::dec_to_pixels(
        ptr, is_f32, hw, stride, affine, clamp, of, rg,
    ))
}

/// The decoder kernels under emulation against the CPU decoders' own building blocks
/// (`crate::decode::conv`), on fresh random inputs (rounded to bf16 first, so both sides see
/// the same values) with every output poisoned (NaN, or 0xAA bytes for RGB8) before the launch.
///
/// Tolerance of the conv: both sides multiply the same bf16 values and sum in f32, in different
/// orders (at most K = 27 * 48 terms here: a few f32 ulps of the sum of |terms|); a bf16 output
/// adds its rounding, half an ulp = 2^-9 relative. So `|got - want| <= 2^-8 |want| + 1e-4 rms`
/// for bf16 outputs and `1e-5 |want| + 1e-5 rms` for f32 ones: a wrong tap, channel or pixel is
/// off by O(rms).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::conv::{self, Conv, Src};
    use crate::rng::Rng;

    fn rand_bf16(rng: &mut Rng, n: usize) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(rng.normal())).collect()
    }

    fn f32s(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    /// NHWC `[hw][stride]` (first `c` channels) to the CPU's `[c][hw]`.
    fn to_chw(x: &[f32], hw: usize, c: usize, stride: usize) -> Vec<f32> {
        let mut out = vec![0.0; c * hw];
        for p in 0..hw {
            for ch in 0..c {
                out[ch * hw + p] = x[p * stride + ch];
            }
        }
        out
    }

    fn check(what: &str, got: &[f32], want: &[f32], rel: f32, floor: f32) {
        assert_eq!(got.len(), want.len(), "{what}");
        let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len().max(1) as f32).sqrt();
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.is_finite() && (g - w).abs() <= rel * w.abs() + floor * rms,
                "{what}: element {i}: {g} vs {w} (rms {rms})"
            );
        }
    }

    /// One source of a conv case: its channels, stride (>= channels), weight offset, tap and
    /// whether it is read upsampled.
    struct S {
        c: usize,
        stride: usize,
        c0: usize,
        t: usize,
        up: bool,
    }

    struct Case {
        cout: usize,
        cin: usize,
        kt: usize,
        k: usize,
        h: usize,
        w: usize,
        srcs: Vec<S>,
        bias: bool,
        res: bool,
        act: ConvAct,
        f32_out: bool,
        split: usize,
    }

    /// Case `cs`'s sources over `data` (one buffer per source), each from element `skip(s)` on.
    fn case_srcs<'a>(
        cs: &Case,
        data: &'a [Vec<bf16>],
        skip: impl Fn(&S) -> usize,
    ) -> Vec<ConvSrc<'a>> {
        cs.srcs
            .iter()
            .zip(data)
            .map(|(s, d)| ConvSrc {
                data: &d[skip(s)..],
                channels: s.c,
                stride: s.stride,
                c0: s.c0,
                t: s.t,
                up: s.up,
            })
            .collect()
    }

    /// Case `cs`'s random bias and the CPU conv of random bf16-valued weights (torch layout).
    fn case_conv(rng: &mut Rng, cs: &Case) -> (Option<Vec<f32>>, Conv) {
        let shape: Vec<usize> = if cs.kt > 1 {
            vec![cs.cout, cs.cin, cs.kt, cs.k, cs.k]
        } else {
            vec![cs.cout, cs.cin, cs.k, cs.k]
        };
        let wt = f32s(&rand_bf16(rng, shape.iter().product()));
        let bias: Option<Vec<f32>> = cs
            .bias
            .then(|| (0..cs.cout).map(|_| rng.normal()).collect());
        let cpu = Conv::from_torch(&wt, &shape, bias.clone());
        (bias, cpu)
    }

    fn run_case(seed: u64, cs: &Case) {
        let mut rng = Rng::new(seed);
        let (h, w) = (cs.h, cs.w);
        let hw = h * w;
        let (bias, cpu) = case_conv(&mut rng, cs);
        let packed = cpu.packed_bf16();
        let data: Vec<Vec<bf16>> = cs
            .srcs
            .iter()
            .map(|s| {
                let px = if s.up { (h / 2) * (w / 2) } else { hw };
                rand_bf16(&mut rng, px * s.stride)
            })
            .collect();
        let res = cs.res.then(|| rand_bf16(&mut rng, hw * cs.cout));
        // CPU: sources as [c][hw'] frames.
        let chw: Vec<Vec<f32>> = cs
            .srcs
            .iter()
            .zip(&data)
            .map(|(s, d)| {
                let px = if s.up { (h / 2) * (w / 2) } else { hw };
                to_chw(&f32s(d), px, s.c, s.stride)
            })
            .collect();
        let job: Vec<Src> = cs
            .srcs
            .iter()
            .zip(&chw)
            .map(|(s, d)| Src {
                data: d,
                t: s.t,
                c0: s.c0,
                c: s.c,
                up: s.up,
            })
            .collect();
        let dense = cpu.forward(&[job], h, w).remove(0);
        // The sub-pixel (parity) form, for a 3x3 conv2d over upsampled sources only: its own
        // reference, a direct 2x2 sum per output parity over the sources at their own size
        // with the bf16 parity weights the device reads (summed in f32, rounded once).
        let parity = cs.kt == 1 && cs.k == 3 && cs.srcs.iter().all(|s| s.up);
        let ppacked = if parity {
            cpu.parity_packed_bf16()
        } else {
            Vec::new()
        };
        let pwant = parity.then(|| {
            let pw = f32s(&ppacked);
            let (gh, gw) = (h / 2, w / 2);
            let mut out = vec![0.0f32; cs.cout * hw];
            for (s, d) in cs.srcs.iter().zip(&chw) {
                for o in 0..cs.cout {
                    for y in 0..h {
                        for x in 0..w {
                            let (py, px) = (y % 2, x % 2);
                            let z = 2 * py + px;
                            let mut acc = 0.0f32;
                            for tap in 0..4 {
                                let (a, b) = (tap / 2, tap % 2);
                                let sy = (y / 2 + py + a) as isize - 1;
                                let sx = (x / 2 + px + b) as isize - 1;
                                if sy < 0 || sx < 0 || sy >= gh as isize || sx >= gw as isize {
                                    continue;
                                }
                                let at = sy as usize * gw + sx as usize;
                                let wrow = ((z * cs.cout + o) * 4 + tap) * cs.cin + s.c0;
                                for ci in 0..s.c {
                                    acc += pw[wrow + ci] * d[ci * gh * gw + at];
                                }
                            }
                            out[o * hw + y * w + x] += acc;
                        }
                    }
                }
            }
            if let Some(b) = &bias {
                for (i, v) in out.iter_mut().enumerate() {
                    *v += b[i / hw];
                }
            }
            out
        });
        let finish = |mut want: Vec<f32>| {
            if let Some(r) = &res {
                let r = to_chw(&f32s(r), hw, cs.cout, cs.cout);
                want.iter_mut().zip(&r).for_each(|(a, b)| *a += b);
            }
            match cs.act {
                ConvAct::Relu => want.iter_mut().for_each(|v| *v = v.max(0.0)),
                ConvAct::Silu => want.iter_mut().for_each(|v| *v = conv::silu(*v)),
                ConvAct::None => {}
            }
            want
        };
        let want = finish(dense);
        let pwant = pwant.map(finish);
        // Device: output frames of `split` channels, pixel stride `split` to `split + 2` (by the
        // seed: packed, odd and even strides, so both the paired and the element stores run),
        // frames `frame_stride` apart.
        let frames = cs.cout / cs.split;
        let ostride = cs.split + (seed % 3) as usize;
        let fstride = hw * ostride + 5;
        let n_out = frames * fstride;
        let srcs = case_srcs(cs, &data, |_| 0);
        let geo = (ostride, cs.split, fstride, 1);
        let r = res.as_deref().map(|r| (r, cs.cout));
        let launch = |dst: ConvDst, tile: Option<(u32, Via)>, parity: bool| {
            let b = bias.as_deref();
            let kshape = ConvShape {
                cout: cs.cout,
                cin: cs.cin,
                kt: cs.kt,
                kh: cs.k,
                kw: cs.k,
                parity,
            };
            let wts: &[bf16] = if parity { &ppacked } else { &packed };
            match tile {
                None => conv(&srcs, wts, kshape, (h, w), b, r, cs.act, dst, geo),
                Some((t, via)) => {
                    conv_wgmma_via(&srcs, wts, kshape, (h, w), b, r, cs.act, dst, geo, t, via)
                }
            }
        };
        let (rel, floor) = if cs.f32_out {
            (1e-5, 1e-5)
        } else {
            (1.0 / 256.0, 1e-4)
        };
        // bc_conv (or bc_conv_n16), then bc_conv_wgmma, bc_conv_wgmma_n96 and bc_conv_wgmma_n64
        // where the case fits them (16-byte copies, more than 16 output channels; they refuse
        // the others).
        let fits = cs.cin % 8 == 0
            && cs.cout > BC_CONV_BN_NARROW as usize
            && cs
                .srcs
                .iter()
                .all(|s| s.c % 8 == 0 && s.stride % 8 == 0 && s.c0 % 8 == 0);
        // ... and the TMA variants bc_conv_wgmma_tma(_n96) where no source is upsampled (or,
        // in the parity form, all are), then the warp-specialized bc_conv_wgmma_ws* (its own
        // tile): bc_conv_wgmma's bits exactly, NaN-poisoned padding included.
        let plain = cs.srcs.iter().all(|s| !s.up);
        // ... and the persistent halo conv bc_conv_halo_n64 on few blocks, so that they walk
        // several tiles: bc_conv_wgmma_n64's bits exactly.
        let ctas = 1 + (seed % 3) as u32;
        // Each kernel plain, then in the parity form where the case has one.
        let forms: &[bool] = if parity { &[false, true] } else { &[false] };
        for &par in forms {
            let mut wg_bits: Option<Vec<u32>> = None;
            let mut n64_bits: Option<Vec<u32>> = None;
            for tile in [
                None,
                Some((BC_CONV_WG_BN, Via::Wgmma)),
                Some((BC_CONV_WG_BN_96, Via::Wgmma)),
                Some((BC_CONV_WG_BN_64, Via::Wgmma)),
                Some((BC_CONV_WG_BN, Via::Tma)),
                Some((BC_CONV_WG_BN_96, Via::Tma)),
                Some((BC_CONV_WG_BN, Via::Ws)),
                Some((BC_CONV_WG_BN_64, Via::Halo(ctas))),
            ] {
                let wg = tile.is_some();
                let fits = match tile {
                    Some((_, Via::Tma)) => fits && (plain || par),
                    Some((_, Via::Halo(_))) => fits && halo_fits(cs, par),
                    _ => fits,
                };
                let got = if cs.f32_out {
                    let mut o = vec![f32::NAN; n_out];
                    launch(ConvDst::F32(&mut o), tile, par).map(|()| o)
                } else {
                    let mut o = vec![bf16::NAN; n_out];
                    launch(ConvDst::Bf16(&mut o), tile, par).map(|()| f32s(&o))
                };
                if wg && !fits {
                    assert!(got.is_err(), "bc_conv_wgmma took a case it does not fit");
                    continue;
                }
                let got = got.unwrap();
                let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                match tile {
                    Some((BC_CONV_WG_BN, Via::Wgmma)) => wg_bits = Some(bits),
                    Some((BC_CONV_WG_BN_64, Via::Wgmma)) => n64_bits = Some(bits),
                    Some((_, Via::Halo(_))) => {
                        let want = n64_bits.as_ref().expect("bc_conv_wgmma_n64 ran first");
                        let bad = bits.iter().zip(want).position(|(a, b)| a != b);
                        assert!(
                            bad.is_none(),
                            "bc_conv_halo_n64 differs from bc_conv_wgmma_n64 (case seed {seed}) \
                             at element {bad:?}"
                        );
                    }
                    Some((_, Via::Ws)) => {
                        let want = wg_bits.as_ref().expect("bc_conv_wgmma ran first");
                        let bad = bits.iter().zip(want).position(|(a, b)| a != b);
                        assert!(
                            bad.is_none(),
                            "bc_conv_wgmma_ws differs from bc_conv_wgmma (case seed {seed}, \
                             parity {par}) at element {bad:?}"
                        );
                    }
                    _ => {}
                }
                // Gather the device output back to [cout][hw].
                let mut g = vec![0.0; cs.cout * hw];
                for n in 0..cs.cout {
                    let (f, ch) = (n / cs.split, n % cs.split);
                    for p in 0..hw {
                        g[n * hw + p] = got[f * fstride + p * ostride + ch];
                    }
                }
                let what = match tile {
                    None => "bc_conv".to_string(),
                    Some((t, Via::Wgmma)) => format!("bc_conv_wgmma tile {t}"),
                    Some((t, Via::Tma)) => format!("bc_conv_wgmma_tma tile {t}"),
                    Some((_, Via::Ws)) => "bc_conv_wgmma_ws".to_string(),
                    Some((_, Via::Halo(c))) => format!("bc_conv_halo_n64 on {c} blocks"),
                };
                let (what, want) = match (&pwant, par) {
                    (Some(pw), true) => (format!("{what} parity"), pw),
                    _ => (what, &want),
                };
                check(&format!("{what} case seed {seed}"), &g, want, rel, floor);
            }
        }
    }

    /// Case `cs` over `frames` frames in one launch (`ConvOut::frames`) against one launch
    /// per frame (each checked against the CPU by [`run_case`]), bit for bit, on every kernel
    /// that fits it (`bc_conv` / `bc_conv_n16`, the three wgmma tiles), plain and in the parity
    /// form where the case has one: random sources and residual, NaN-poisoned outputs.
    fn run_frames(seed: u64, cs: &Case, frames: usize) {
        let mut rng = Rng::new(seed);
        let (h, w) = (cs.h, cs.w);
        let hw = h * w;
        let (bias, cpu) = case_conv(&mut rng, cs);
        let parity = cs.kt == 1 && cs.k == 3 && cs.srcs.iter().all(|s| s.up);
        let packed = cpu.packed_bf16();
        let ppacked = if parity {
            cpu.parity_packed_bf16()
        } else {
            Vec::new()
        };
        let px = |s: &S| if s.up { (h / 2) * (w / 2) } else { hw };
        let data: Vec<Vec<bf16>> = cs
            .srcs
            .iter()
            .map(|s| rand_bf16(&mut rng, frames * px(s) * s.stride))
            .collect();
        let res = cs.res.then(|| rand_bf16(&mut rng, frames * hw * cs.cout));
        let nsplit = cs.cout / cs.split;
        let ostride = cs.split + (seed % 3) as usize;
        let fstride = hw * ostride + 3;
        let n_out = frames * nsplit * fstride;
        let fits = cs.cin % 8 == 0
            && cs.cout > BC_CONV_BN_NARROW as usize
            && cs
                .srcs
                .iter()
                .all(|s| s.c % 8 == 0 && s.stride % 8 == 0 && s.c0 % 8 == 0);
        // ... and bc_conv_halo_n64 (2 blocks) where it fits.
        // Launch frames `f0 .. f0 + n` into `out` (which starts at frame f0's first output).
        let launch = |f0: usize, n: usize, out: ConvDst, tile: Option<(u32, Via)>, par: bool| {
            let srcs = case_srcs(cs, &data, |s| f0 * px(s) * s.stride);
            let kshape = ConvShape {
                cout: cs.cout,
                cin: cs.cin,
                kt: cs.kt,
                kh: cs.k,
                kw: cs.k,
                parity: par,
            };
            let wts: &[bf16] = if par { &ppacked } else { &packed };
            let r = res.as_deref().map(|r| (&r[f0 * hw * cs.cout..], cs.cout));
            let (b, geo) = (bias.as_deref(), (ostride, cs.split, fstride, n));
            match tile {
                None => conv(&srcs, wts, kshape, (h, w), b, r, cs.act, out, geo),
                Some((t, via)) => {
                    conv_wgmma_via(&srcs, wts, kshape, (h, w), b, r, cs.act, out, geo, t, via)
                }
            }
        };
        let forms: &[bool] = if parity { &[false, true] } else { &[false] };
        for &par in forms {
            // bc_conv_wgmma_n64's frame-batched output bits (bc_conv_halo_n64 must equal them).
            let mut n64_all: Option<Vec<u32>> = None;
            for tile in [
                None,
                Some((BC_CONV_WG_BN, Via::Wgmma)),
                Some((BC_CONV_WG_BN_96, Via::Wgmma)),
                Some((BC_CONV_WG_BN_64, Via::Wgmma)),
                Some((BC_CONV_WG_BN_64, Via::Halo(2))),
            ] {
                let is_halo = matches!(tile, Some((_, Via::Halo(_))));
                if tile.is_some() && !fits || is_halo && !halo_fits(cs, par) {
                    continue;
                }
                let per = nsplit * fstride;
                let (all, one): (Vec<u32>, Vec<u32>) = if cs.f32_out {
                    let mut all = vec![f32::NAN; n_out];
                    launch(0, frames, ConvDst::F32(&mut all), tile, par).unwrap();
                    let mut one = vec![f32::NAN; n_out];
                    for f in 0..frames {
                        let o = ConvDst::F32(&mut one[f * per..]);
                        launch(f, 1, o, tile, par).unwrap();
                    }
                    let b = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect();
                    (b(&all), b(&one))
                } else {
                    let mut all = vec![bf16::NAN; n_out];
                    launch(0, frames, ConvDst::Bf16(&mut all), tile, par).unwrap();
                    let mut one = vec![bf16::NAN; n_out];
                    for f in 0..frames {
                        let o = ConvDst::Bf16(&mut one[f * per..]);
                        launch(f, 1, o, tile, par).unwrap();
                    }
                    let b = |v: &Vec<bf16>| v.iter().map(|x| u32::from(x.to_bits())).collect();
                    (b(&all), b(&one))
                };
                let bad = all.iter().zip(&one).position(|(a, o)| a != o);
                assert!(
                    bad.is_none(),
                    "{frames} frames in one launch differ from one launch each (tile {tile:?}, \
                     parity {par}, seed {seed}) at element {bad:?}"
                );
                if tile == Some((BC_CONV_WG_BN_64, Via::Wgmma)) {
                    n64_all = Some(all);
                } else if is_halo {
                    let want = n64_all.as_ref().expect("bc_conv_wgmma_n64 ran first");
                    let bad = all.iter().zip(want).position(|(a, o)| a != o);
                    assert!(
                        bad.is_none(),
                        "bc_conv_halo_n64 over {frames} frames differs from bc_conv_wgmma_n64 \
                         (seed {seed}) at element {bad:?}"
                    );
                }
            }
        }
    }

    /// Whether case `cs` has the shape of `bc_conv_halo_n64` (`launch::conv_halo_fits`, given
    /// the 16-byte path): 3x3, 64 outputs, one or two 64-channel sources or one of 128, each
    /// plain or upsampled; in the parity form (`par`), one upsampled 64-channel source.
    fn halo_fits(cs: &Case, par: bool) -> bool {
        let c: Vec<usize> = cs.srcs.iter().map(|s| s.c).collect();
        let shapes = if par {
            c[..] == [64] && cs.srcs.iter().all(|s| s.up)
        } else {
            matches!(c[..], [64] | [128] | [64, 64])
        };
        cs.k == 3 && cs.kt == 1 && cs.cout == 64 && shapes
    }

    #[test]
    fn frame_batched_launch_equals_one_launch_per_frame() {
        // MemBlock: cat[x, past] with residual and ReLU, 64 channels (wgmma tiles), 3 frames.
        let mut c = memblock(64, 64, (5, 7));
        c.res = true;
        c.act = ConvAct::Relu;
        run_frames(31, &c, 3);
        // Element path, odd channels, bias, f32 output (the narrow tile).
        let mut c = memblock(3, 5, (3, 4));
        c.bias = true;
        c.f32_out = true;
        run_frames(32, &c, 2);
        // TGrow: a 1x1 conv split into two frames per input frame.
        let mut c = case(32, 24, 1, 1, (3, 5), vec![s(24, 24, 0, 0, false)]);
        c.split = 16;
        run_frames(33, &c, 3);
        // An upsampled source, 3x3 (dense and parity form) with bias.
        let mut c = case(24, 16, 1, 3, (6, 4), vec![s(16, 16, 0, 0, true)]);
        c.bias = true;
        run_frames(34, &c, 2);
        // Causal 3x3x3 taps (the Wan VAE's shape), SiLU.
        let mut c = causal3(24, 8, (4, 3));
        c.act = ConvAct::Silu;
        run_frames(35, &c, 2);
    }

    fn s(c: usize, stride: usize, c0: usize, t: usize, up: bool) -> S {
        S {
            c,
            stride,
            c0,
            t,
            up,
        }
    }

    fn case(
        cout: usize,
        cin: usize,
        kt: usize,
        k: usize,
        hw: (usize, usize),
        srcs: Vec<S>,
    ) -> Case {
        Case {
            cout,
            cin,
            kt,
            k,
            h: hw.0,
            w: hw.1,
            srcs,
            bias: false,
            res: false,
            act: ConvAct::None,
            f32_out: false,
            split: cout,
        }
    }

    /// A 3x3 conv to `cout` channels over one `cin`-channel source of `stride` elements per
    /// pixel, with bias and ReLU.
    fn run_3x3_bias_relu(
        seed: u64,
        cout: usize,
        (cin, stride): (usize, usize),
        hw: (usize, usize),
    ) {
        let mut c = case(cout, cin, 1, 3, hw, vec![s(cin, stride, 0, 0, false)]);
        c.bias = true;
        c.act = ConvAct::Relu;
        run_case(seed, &c);
    }

    /// A causal 3x3x3 conv over `cin`-channel frames: the two cached frames and the current
    /// one as taps 0, 1, 2.
    fn causal3(cout: usize, cin: usize, hw: (usize, usize)) -> Case {
        let srcs = (0..3).map(|t| s(cin, cin, 0, t, false)).collect();
        case(cout, cin, 3, 3, hw, srcs)
    }

    /// A MemBlock's 3x3 conv over `cat[x, past]`: two `c`-channel sources at weight channel
    /// offsets 0 and `c`.
    fn memblock(cout: usize, c: usize, hw: (usize, usize)) -> Case {
        let srcs = vec![s(c, c, 0, 0, false), s(c, c, c, 0, false)];
        case(cout, 2 * c, 1, 3, hw, srcs)
    }

    /// A source read through the nearest 2x upsample: a 3x3 conv `(cout, cin)` with bias at
    /// 6x10 (seed `seed`), then a 1x1 conv `(cout, cin, source stride)` at 4x6 (`seed + 1`).
    fn run_upsampled(
        seed: u64,
        (co3, ci3): (usize, usize),
        (co1, ci1, st1): (usize, usize, usize),
    ) {
        let mut c = case(co3, ci3, 1, 3, (6, 10), vec![s(ci3, ci3, 0, 0, true)]);
        c.bias = true;
        run_case(seed, &c);
        let c = case(co1, ci1, 1, 1, (4, 6), vec![s(ci1, st1, 0, 0, true)]);
        run_case(seed + 1, &c);
    }

    #[test]
    fn conv3x3_odd_shapes_element_path_f32_out() {
        // cin 5, cout 3 (the 16-channel tile) and 19 (the 64-channel one), 5x7: every tile edge
        // masked, element loads (cin not a multiple of 8).
        for cout in [3, 19] {
            let mut c = case(cout, 5, 1, 3, (5, 7), vec![s(5, 5, 0, 0, false)]);
            c.bias = true;
            c.f32_out = true;
            run_case(1, &c);
        }
    }

    #[test]
    fn conv3x3_vector_path_crosses_tiles() {
        // 11x13 = 143 pixels (two pixel tiles), cout 72 (two channel tiles), cin 40 (two
        // k-steps per tap, the second half empty), padded source stride.
        run_3x3_bias_relu(2, 72, (40, 48), (11, 13));
    }

    #[test]
    fn causal_conv3d_as_temporal_taps_with_residual() {
        // Three taps (two cached frames + the current one), then only the last two (the
        // stream's second frame: tap 0 is a zero frame and is not passed); both channel tiles.
        for cout in [16, 40] {
            causal_case(cout);
        }
    }

    fn causal_case(cout: usize) {
        let mut c = causal3(cout, 24, (6, 5));
        c.res = true;
        c.act = ConvAct::Silu;
        run_case(3, &c);
        c.srcs.remove(0);
        c.bias = true;
        run_case(4, &c);
    }

    #[test]
    fn memblock_concat_sources_and_odd_channels() {
        // cat[x, past] as two sources with weight offsets 0 and C, vector and element paths.
        let mut c = memblock(8, 8, (4, 6));
        c.act = ConvAct::Relu;
        run_case(5, &c);
        run_case(6, &memblock(7, 3, (3, 5)));
    }

    #[test]
    fn upsampled_source_3x3_and_1x1() {
        run_upsampled(7, (8, 16), (5, 3, 4));
    }

    #[test]
    fn split_output_tgrow_and_time_conv() {
        // TAEHV's TGrow: 1x1 conv to 2C channels, two output frames of C.
        let mut c = case(16, 8, 1, 1, (3, 7), vec![s(8, 8, 0, 0, false)]);
        c.split = 8;
        run_case(9, &c);
        // The Wan VAE's time_conv: (3,1,1) causal conv to 2C, split into two frames.
        let mut c = case(
            16,
            8,
            3,
            1,
            (5, 3),
            vec![s(8, 8, 0, 1, false), s(8, 8, 0, 2, false)],
        );
        c.split = 8;
        c.bias = true;
        c.f32_out = true;
        run_case(10, &c);
    }

    /// Cases shaped for `bc_conv_wgmma` (128 x 128 tiles, 64-channel k-steps along each
    /// source's (tap, channel) sequence); `run_case` runs each through `bc_conv` and it.
    #[test]
    fn wgmma_conv_k_steps_across_taps_and_two_tiles_each_way() {
        // 3x3 over 96 channels: 864 values per output = 13.5 k-steps, most of them crossing
        // from one tap into the next; cout 136 (two channel tiles, the second mostly masked);
        // 9 x 17 = 153 pixels (two pixel tiles); padded source stride; bias + ReLU.
        run_3x3_bias_relu(11, 136, (96, 104), (9, 17));
    }

    #[test]
    fn wgmma_conv_sources_taps_upsample_split() {
        // MemBlock: two 64-channel sources at c0 0 and 64, residual + SiLU, odd 5 x 7.
        let mut c = memblock(64, 64, (5, 7));
        c.res = true;
        c.act = ConvAct::Silu;
        run_case(12, &c);
        // Causal 3x3x3 over 8-channel frames: 72 values per source, k-steps spanning 8 taps,
        // three sources (taps 0, 1, 2), residual; then only taps 1 and 2.
        let mut c = causal3(24, 8, (7, 3));
        c.res = true;
        run_case(13, &c);
        c.srcs.remove(0);
        c.f32_out = true;
        run_case(14, &c);
        // Upsampled sources, 3x3 and 1x1.
        run_upsampled(15, (24, 32), (40, 16, 24));
        // Two sources of different widths and pixel strides (16 of 24, 32 of 40 channels):
        // every gather must switch its rows' offsets with the source.
        let c = case(
            40,
            48,
            1,
            3,
            (7, 9),
            vec![s(16, 24, 0, 0, false), s(32, 40, 16, 0, false)],
        );
        run_case(18, &c);
        // 1x1, cout 200 split into two frames of 100 (TGrow / time_conv), f32, 11 x 13.
        let mut c = case(200, 136, 1, 1, (11, 13), vec![s(136, 136, 0, 0, false)]);
        c.split = 100;
        c.f32_out = true;
        c.bias = true;
        run_case(17, &c);
    }

    /// Cases whose tile is `bc_conv_wgmma_n64` (`launch::conv_wgmma_tile`: TAEHV's 64 output
    /// channels, and 32 or 40, which it pads less than 96 or 128); `run_case` runs each through
    /// `bc_conv` and every wgmma tile, random inputs, NaN-poisoned outputs.
    #[test]
    fn wgmma_conv_n64_taehv_shapes() {
        for cout in [64, 32, 40] {
            assert_eq!(
                launch::conv_wgmma_tile(cout),
                BC_CONV_WG_BN_64,
                "cout {cout}"
            );
        }
        // TAEHV's 3x3 64 -> 64 with bias + ReLU: 9 k-steps of one tap each, two pixel tiles
        // (9 x 17 = 153), padded source stride.
        run_3x3_bias_relu(20, 64, (64, 72), (9, 17));
        // 32 outputs over 40 channels: k-steps across taps, the last one partly empty.
        run_3x3_bias_relu(21, 32, (40, 40), (7, 11));
        // 40 outputs (the tile's last 24 channels masked) from an upsampled 64-channel source,
        // with residual and SiLU (the parity form too).
        let mut c = case(40, 64, 1, 3, (6, 10), vec![s(64, 64, 0, 0, true)]);
        c.res = true;
        c.act = ConvAct::Silu;
        run_case(22, &c);
        // TGrow: 1x1 64 -> 128 split into two frames of 64, f32 output.
        let mut c = case(128, 64, 1, 1, (5, 9), vec![s(64, 64, 0, 0, false)]);
        c.split = 64;
        c.f32_out = true;
        c.bias = true;
        run_case(23, &c);
    }

    /// `bc_conv_halo_n64` (`cuda/conv_halo.cu`) on TAEHV's shapes: `run_case` runs each through
    /// every kernel, the halo conv on 1 to 3 persistent blocks (so each walks several 8 x 16
    /// tiles), NaN-poisoned outputs, bits equal to `bc_conv_wgmma_n64`'s; `run_frames` batches
    /// frames (the block walk crosses frames).
    #[test]
    fn halo_conv_taehv_shapes() {
        // 3x3 64 -> 64, bias + ReLU, 13 x 21: partial tiles on both edges (2 x 2 tiles), padded
        // source stride.
        run_3x3_bias_relu(40, 64, (64, 72), (13, 21));
        // The MemBlock's 128 -> 64 over cat[x, past] with residual + ReLU, 13 x 21.
        let mut c = memblock(64, 64, (13, 21));
        c.res = true;
        c.act = ConvAct::Relu;
        run_case(41, &c);
        // Exactly one tile row and column (8 x 16), SiLU, f32 output, one block for the lot.
        let mut c = case(64, 64, 1, 3, (8, 16), vec![s(64, 64, 0, 0, false)]);
        c.act = ConvAct::Silu;
        c.f32_out = true;
        c.bias = true;
        run_case(42, &c);
        // 64 -> 64 over 2 frames of 9 x 17 (8 tiles on 2 blocks).
        let mut c = case(64, 64, 1, 3, (9, 17), vec![s(64, 72, 0, 0, false)]);
        c.bias = true;
        c.act = ConvAct::Relu;
        run_frames(43, &c, 2);
        // The conv after an Upsample, dense: 64 -> 64 from a 7 x 13 source to 14 x 26
        // (partial tiles on both edges), bias + ReLU; 128 -> 64 (one 128-channel source: 18
        // k-steps, both halo stages as its channel planes) likewise with residual + SiLU and a
        // padded source stride; over 2 frames too.
        let mut c = case(64, 64, 1, 3, (14, 26), vec![s(64, 64, 0, 0, true)]);
        c.bias = true;
        c.act = ConvAct::Relu;
        run_case(44, &c);
        let mut c = case(64, 128, 1, 3, (14, 26), vec![s(128, 136, 0, 0, true)]);
        c.res = true;
        c.act = ConvAct::Silu;
        run_case(45, &c);
        c.bias = true;
        run_frames(46, &c, 2);
        // The parity form of the 64 -> 64 after an Upsample over more than one tile: 18 x 36
        // from 9 x 18 (2 x 2 tiles of the source grid, partial on both edges), over 2 frames
        // too (run_case and run_frames run every upsampled case plain and in the parity form).
        let mut c = case(64, 64, 1, 3, (18, 36), vec![s(64, 72, 0, 0, true)]);
        c.bias = true;
        c.res = true;
        c.act = ConvAct::Relu;
        run_case(49, &c);
        run_frames(50, &c, 2);
        // A plain 128-channel source (13 x 21), bias + ReLU.
        run_3x3_bias_relu(47, 64, (128, 128), (13, 21));
        // The conv refuses what it does not fit (and so never runs it).
        for (cout, srcs) in [
            (64, vec![s(32, 32, 0, 0, false)]),
            (64, vec![s(192, 192, 0, 0, false)]),
            (64, vec![s(128, 128, 0, 0, false), s(64, 64, 128, 0, false)]),
            (
                64,
                vec![
                    s(64, 64, 0, 0, false),
                    s(64, 64, 64, 0, false),
                    s(64, 64, 128, 0, false),
                ],
            ),
            (128, vec![s(64, 64, 0, 0, false)]),
        ] {
            let cin = srcs.iter().map(|x| x.c0 + x.c).max().unwrap_or(0);
            let c = case(cout, cin, 1, 3, (4, 6), srcs);
            assert!(!halo_fits(&c, false) || cout != 64);
            let shape = ConvShape::new(cout, cin, 1, 3, 3);
            let wts = vec![bf16::ONE; shape.weight_len()];
            let data = vec![vec![bf16::ONE; 4 * 6 * 192]; 3];
            let srcs = case_srcs(&c, &data, |_| 0);
            let mut out = vec![bf16::ZERO; 4 * 6 * cout];
            let r = conv_wgmma_via(
                &srcs,
                &wts,
                shape,
                (4, 6),
                None,
                None,
                ConvAct::None,
                ConvDst::Bf16(&mut out),
                (cout, cout, 0, 1),
                BC_CONV_WG_BN_64,
                Via::Halo(2),
            );
            assert!(
                r.is_err(),
                "bc_conv_halo_n64 took cout {cout}, {:?}",
                c.srcs.len()
            );
        }
    }

    /// `bc_conv_halo_n64`'s dynamic tile claims: the same bits as `bc_conv_wgmma_n64` on 1 to
    /// 3 blocks and on more blocks than tiles (12 tiles: 2 frames of 2 x 3), each launch twice
    /// in a row on fresh NaN-poisoned outputs with no reset of the counter pair in between
    /// (`conv_halo_run` fails a launch that leaves it non-zero).
    #[test]
    fn halo_conv_claims_tiles_dynamically() {
        let mut rng = Rng::new(48);
        let (h, w, frames) = (13, 40, 2);
        let cs = memblock(64, 64, (h, w));
        let (_, cpu) = case_conv(&mut rng, &cs);
        let packed = cpu.packed_bf16();
        let data: Vec<Vec<bf16>> = (0..2)
            .map(|_| rand_bf16(&mut rng, frames * h * w * 64))
            .collect();
        let srcs = case_srcs(&cs, &data, |_| 0);
        let shape = ConvShape::new(64, 128, 1, 3, 3);
        let bits = |via: Via| {
            let mut o = vec![bf16::NAN; frames * h * w * 64];
            let geo = (64, 64, h * w * 64, frames);
            let dst = ConvDst::Bf16(&mut o);
            let r = conv_wgmma_via(
                &srcs,
                &packed,
                shape,
                (h, w),
                None,
                None,
                ConvAct::Relu,
                dst,
                geo,
                BC_CONV_WG_BN_64,
                via,
            );
            r.unwrap();
            o.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()
        };
        let want = bits(Via::Wgmma);
        assert!(want.iter().all(|&b| !bf16::from_bits(b).is_nan()));
        for ctas in [1, 2, 3, 12, 17, 40] {
            for round in 0..2 {
                let got = bits(Via::Halo(ctas));
                let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                assert!(
                    bad.is_none(),
                    "bc_conv_halo_n64 on {ctas} blocks (launch {round}) differs at {bad:?}"
                );
            }
        }
    }

    #[test]
    fn conv_refuses_bad_geometry() {
        let x = vec![bf16::ZERO; 64];
        let wts = vec![bf16::ZERO; 9 * 64];
        let mut o = vec![bf16::ZERO; 64];
        let sh = ConvShape {
            cout: 8,
            cin: 8,
            kt: 1,
            kh: 3,
            kw: 3,
            parity: false,
        };
        let src = |t, c0| ConvSrc {
            data: &x,
            channels: 8,
            stride: 8,
            c0,
            t,
            up: false,
        };
        let mut try_conv = |srcs: &[ConvSrc], hw| {
            let dst = ConvDst::Bf16(&mut o);
            conv(
                srcs,
                &wts,
                sh,
                hw,
                None,
                None,
                ConvAct::None,
                dst,
                (8, 8, 0, 1),
            )
        };
        // A tap past kt, channels past cin, no source at all.
        for bad in [vec![src(1, 0)], vec![src(0, 4)], vec![]] {
            assert!(try_conv(&bad, (2, 4)).is_err());
        }
        // Too short an output is refused before anything runs; the right size runs.
        assert!(try_conv(&[src(0, 0)], (3, 4)).is_err());
        assert!(try_conv(&[src(0, 0)], (2, 4)).is_ok());
        // The parity form: only over upsampled sources, of a 3x3 conv2d, an even output.
        let pw = vec![bf16::ZERO; 16 * 64];
        let up = ConvSrc {
            up: true,
            ..src(0, 0)
        };
        let mut try_parity = |srcs: &[ConvSrc], sh: ConvShape, hw| {
            let dst = ConvDst::Bf16(&mut o);
            let sh = ConvShape { parity: true, ..sh };
            conv(
                srcs,
                &pw,
                sh,
                hw,
                None,
                None,
                ConvAct::None,
                dst,
                (8, 8, 0, 1),
            )
        };
        assert!(try_parity(&[src(0, 0)], sh, (2, 4)).is_err());
        assert!(try_parity(&[up], ConvShape { kh: 1, kw: 1, ..sh }, (2, 4)).is_err());
        assert!(try_parity(&[up], sh, (2, 3)).is_err());
        assert!(try_parity(&[up], sh, (2, 4)).is_ok());
    }

    /// The sub-pixel (parity) form on every kernel: `run_case` runs each upsampled 3x3 case
    /// plain and in the parity form (grid z = 4) against a direct 2x2 sum per parity.
    #[test]
    fn parity_form_tiles_edges_and_sources() {
        // Grid 13 x 18 = 234 rows (two pixel tiles; TMA: 3 x 1 tiles of 8 x 16), cout 136 (two
        // channel tiles), cin 40 in a stride-48 source (k-steps across the 2x2 taps), bias +
        // ReLU.
        let mut c = case(136, 40, 1, 3, (26, 36), vec![s(40, 48, 0, 0, true)]);
        c.bias = true;
        c.act = ConvAct::Relu;
        run_case(21, &c);
        // Two upsampled sources at weight channels 0 and 24, odd grid 5 x 7, residual + SiLU.
        let mut c = case(
            24,
            48,
            1,
            3,
            (10, 14),
            vec![s(24, 24, 0, 0, true), s(24, 24, 24, 0, true)],
        );
        c.res = true;
        c.act = ConvAct::Silu;
        run_case(22, &c);
        // The element path (cin 5) to 3 channels (bc_conv_n16), f32 out, a 1 x 3 grid.
        let mut c = case(3, 5, 1, 3, (2, 6), vec![s(5, 5, 0, 0, true)]);
        c.bias = true;
        c.f32_out = true;
        run_case(23, &c);
    }

    #[test]
    fn softmax_rows() {
        let mut rng = Rng::new(15);
        let (rows, n, scale) = (5, 700, 0.3f32);
        let s: Vec<f32> = (0..rows * n).map(|_| 4.0 * rng.normal()).collect();
        let mut out = vec![bf16::NAN; rows * n];
        softmax(&s, n, scale, &mut out).unwrap();
        let mut want = Vec::new();
        for r in s.chunks(n) {
            let mx = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let e: Vec<f64> = r
                .iter()
                .map(|&v| ((v as f64 - mx) * scale as f64).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            want.extend(e.iter().map(|v| (v / sum) as f32));
        }
        check("softmax", &f32s(&out), &want, 1.0 / 256.0, 1e-3);
    }

    #[test]
    fn latent_in_maps_and_transposes() {
        let mut rng = Rng::new(11);
        let (c, hw) = (16, 35);
        let z: Vec<f32> = (0..c * hw).map(|_| 2.0 * rng.normal()).collect();
        let mean: Vec<f32> = (0..c).map(|_| rng.normal()).collect();
        let scale: Vec<f32> = (0..c).map(|_| 0.5 + rng.normal().abs()).collect();
        for (i, map) in [
            LatentMap::Identity,
            LatentMap::TanhClamp,
            LatentMap::Unnormalise {
                mean: &mean,
                scale: &scale,
            },
        ]
        .into_iter()
        .enumerate()
        {
            let mut out = vec![bf16::NAN; c * hw];
            let mut flag = 0;
            latent_in(&z, c, map, &mut out, Some(&mut flag)).unwrap();
            assert_eq!(flag, 0, "finite latents flagged");
            let want: Vec<f32> = (0..hw * c)
                .map(|j| {
                    let (p, ch) = (j / c, j % c);
                    let v = z[ch * hw + p];
                    match map {
                        LatentMap::Identity => v,
                        LatentMap::TanhClamp => (v / 3.0).tanh() * 3.0,
                        LatentMap::Unnormalise { mean, scale } => v / scale[ch] + mean[ch],
                    }
                })
                .collect();
            check(
                &format!("latent_in {i}"),
                &f32s(&out),
                &want,
                1.0 / 256.0,
                0.0,
            );
        }
    }

    #[test]
    fn latent_in_flags_a_non_finite_latent() {
        let mut rng = Rng::new(21);
        let (c, hw) = (16, 35);
        for (bad, map) in [
            (f32::NAN, LatentMap::TanhClamp),
            (f32::INFINITY, LatentMap::Identity),
        ]
        .into_iter()
        .chain([(f32::NEG_INFINITY, LatentMap::TanhClamp)])
        {
            let mut z: Vec<f32> = (0..c * hw).map(|_| 2.0 * rng.normal()).collect();
            let at = (rng.next_u64() % (c * hw) as u64) as usize;
            z[at] = bad;
            let mut out = vec![bf16::NAN; c * hw];
            let mut flag = 0;
            latent_in(&z, c, map, &mut out, Some(&mut flag)).unwrap();
            assert_eq!(flag, 1, "{bad} at {at} not flagged");
            // Every other value is still converted (the check does not stop the kernel).
            let (p, ch) = (at % hw, at / hw);
            let ok = out
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != p * c + ch)
                .all(|(_, v)| v.to_f32().is_finite());
            assert!(ok, "a finite latent came out non-finite");
            // No flag pointer: converted, nothing written.
            latent_in(&z, c, map, &mut out, None).unwrap();
        }
    }

    #[test]
    fn rms_norm_with_and_without_silu() {
        let mut rng = Rng::new(12);
        for &(c, px) in &[(384usize, 9usize), (19, 21)] {
            let x = rand_bf16(&mut rng, c * px);
            let gamma: Vec<f32> = (0..c).map(|_| rng.normal()).collect();
            for silu in [false, true] {
                let mut out = vec![bf16::NAN; c * px];
                rms_norm(&x, c, &gamma, silu, &mut out).unwrap();
                let cpu = conv::rms_norm(&[to_chw(&f32s(&x), px, c, c)], c, &gamma, silu);
                let want = to_chw(&cpu[0], c, px, px); // [c][px] -> [px][c]
                check("rms_norm", &f32s(&out), &want, 1.0 / 256.0, 1e-4);
            }
        }
    }

    #[test]
    fn upsample_spatial_and_duplicated() {
        let mut rng = Rng::new(13);
        let (h, w, c) = (3, 5, 6);
        let x = rand_bf16(&mut rng, h * w * c);
        let (mut a, mut b) = (
            vec![bf16::NAN; 4 * h * w * c],
            vec![bf16::NAN; 4 * h * w * c],
        );
        upsample2x(&x, (h, w, c), &mut a, Some(&mut b)).unwrap();
        let cpu = conv::upsample2x(&to_chw(&f32s(&x), h * w, c, c), c, h, w);
        let want = to_chw(&cpu, c, 4 * h * w, 4 * h * w);
        assert_eq!(f32s(&a), want);
        assert_eq!(a, b);
    }

    #[test]
    fn to_pixels_bytes_equal_video_to_rgb8() {
        let mut rng = Rng::new(14);
        let hw = 300;
        let stride = 5;
        let mut x: Vec<f32> = (0..hw * stride).map(|_| 0.7 * rng.normal()).collect();
        // Values on and next to the rounding edges of the byte conversion.
        for (i, v) in [-1.0f32, 1.0, 0.0, -1.5, 1.5, 1.0 / 127.5 - 1.0, 0.5]
            .iter()
            .enumerate()
        {
            x[i * stride] = *v;
        }
        for &(affine, clamp) in &[((1.0f32, 0.0f32), true), ((2.0, -1.0), false)] {
            let mut f = vec![f32::NAN; 3 * hw];
            let mut rgb = vec![0xAAu8; 3 * hw];
            to_pixels(
                PixelSrc::F32(&x),
                hw,
                stride,
                affine,
                clamp,
                Some(&mut f),
                Some(&mut rgb),
            )
            .unwrap();
            let mut planar = to_chw(&x, hw, 3, stride);
            planar.iter_mut().for_each(|v| {
                *v = *v * affine.0 + affine.1;
                if clamp {
                    *v = v.clamp(-1.0, 1.0);
                }
            });
            assert_eq!(f, planar);
            assert_eq!(rgb, crate::video::to_rgb8(&planar, 1, 1, hw));
        }
        // bf16 input, RGB8 only.
        let xb = rand_bf16(&mut rng, hw * 3);
        let mut rgb = vec![0xAAu8; 3 * hw];
        to_pixels(
            PixelSrc::Bf16(&xb),
            hw,
            3,
            (0.5, 0.0),
            false,
            None,
            Some(&mut rgb),
        )
        .unwrap();
        let mut planar = to_chw(&f32s(&xb), hw, 3, 3);
        planar.iter_mut().for_each(|v| *v *= 0.5);
        assert_eq!(rgb, crate::video::to_rgb8(&planar, 1, 1, hw));
    }
}
