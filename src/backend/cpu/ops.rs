//! Element-wise and row-wise ops of the Wan DiT, f32 reference (statistics in f64).
//!
//! Each op's math is stated once, with its layout and precision, at the head of the CUDA file
//! that implements it (`cuda/norm.cu`, `cuda/qk_norm_rope.cu`, `cuda/elementwise.cu`,
//! `cuda/patch.cu`); the one-line formulas below only name the op.
//!
//! Layout conventions shared with the CUDA kernels (`cuda/`):
//! - activations are row-major `[tokens, dim]`, tokens ordered (frame, row, column);
//! - per-frame conditioning (`shift`, `scale`, `gate`) is `[frames, dim]` and row `r` uses
//!   frame `r / tokens_per_frame`;
//! - latents are `[frames, 16, height, width]`; patches are 64-vectors in the order
//!   (channel, dh, dw) going in and (dh, dw, channel) coming out of the head.

use rayon::prelude::*;

/// Rows handled per rayon task in row-wise ops.
const ROWS_PER_TASK: usize = 16;

fn row_stats(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// A per-frame conditioning vector as the CUDA kernels read it: row `d` of frame `f` is
/// `table[f·stride + d] + bias[d]`. A DiT layer's shift, scale and gate are slices of the time
/// projection `e0` (`[frames, 6·dim]`, stride `6·dim`) plus that layer's learned modulation as
/// the bias, so no per-layer table of their sums is built.
#[derive(Clone, Copy, Debug)]
pub struct FrameVec<'a> {
    /// `[frames, stride]` (the first `dim` values of each frame's row are read).
    pub table: &'a [f32],
    /// Values between consecutive frames' rows.
    pub stride: usize,
    /// Added to every frame's row (`None`: nothing).
    pub bias: Option<&'a [f32]>,
}

impl<'a> FrameVec<'a> {
    /// A plain `[frames, dim]` table.
    pub fn plain(table: &'a [f32], dim: usize) -> Self {
        FrameVec {
            table,
            stride: dim,
            bias: None,
        }
    }

    /// Frame `f`'s row: `(table row, bias)`, each `dim` values.
    ///
    /// # Panics
    /// When the table or the bias is shorter than that.
    #[inline]
    pub fn row(&self, f: usize, dim: usize) -> (&'a [f32], Option<&'a [f32]>) {
        (
            &self.table[f * self.stride..f * self.stride + dim],
            self.bias.map(|b| &b[..dim]),
        )
    }
}

/// `out = LayerNorm(x) * (1 + scale[frame]) + shift[frame]` (LayerNorm without affine).
pub fn ln_modulate(
    x: &[f32],
    dim: usize,
    eps: f64,
    tokens_per_frame: usize,
    shift: &[f32],
    scale: &[f32],
    out: &mut [f32],
) {
    let (sh, sc) = (FrameVec::plain(shift, dim), FrameVec::plain(scale, dim));
    ln_modulate_frames(x, dim, eps, tokens_per_frame, sh, sc, out);
}

/// [`ln_modulate`] with shift and scale read as [`FrameVec`]s (the CUDA side's
/// `bc_ln_modulate`): `out = LN(x) * (1 + (scale[f] + scale_bias)) + (shift[f] + shift_bias)`,
/// one pass per row (statistics, then the modulated output).
pub fn ln_modulate_frames(
    x: &[f32],
    dim: usize,
    eps: f64,
    tokens_per_frame: usize,
    shift: FrameVec,
    scale: FrameVec,
    out: &mut [f32],
) {
    out.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(c, (oc, xc))| {
            for (i, (o, xr)) in oc.chunks_mut(dim).zip(xc.chunks(dim)).enumerate() {
                let f = (c * ROWS_PER_TASK + i) / tokens_per_frame;
                let (m, r) = row_stats(xr, eps);
                match (shift.row(f, dim), scale.row(f, dim)) {
                    ((sh, Some(shb)), (sc, Some(scb))) => {
                        for d in 0..dim {
                            o[d] = (xr[d] - m) * r * (1.0 + (sc[d] + scb[d])) + (sh[d] + shb[d]);
                        }
                    }
                    ((sh, None), (sc, None)) => {
                        for d in 0..dim {
                            o[d] = (xr[d] - m) * r * (1.0 + sc[d]) + sh[d];
                        }
                    }
                    ((sh, shb), (sc, scb)) => {
                        let b = |v: Option<&[f32]>, d: usize| v.map_or(0.0, |v| v[d]);
                        for d in 0..dim {
                            o[d] =
                                (xr[d] - m) * r * (1.0 + (sc[d] + b(scb, d))) + sh[d] + b(shb, d);
                        }
                    }
                }
            }
        });
}

/// `out = LayerNorm(x) * weight + bias` (the affine `norm3` before cross-attention).
pub fn layer_norm_affine(x: &[f32], dim: usize, eps: f64, w: &[f32], b: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .for_each(|(oc, xc)| {
            for (o, xr) in oc.chunks_mut(dim).zip(xc.chunks(dim)) {
                let (m, r) = row_stats(xr, eps);
                for d in 0..dim {
                    o[d] = (xr[d] - m) * r * w[d] + b[d];
                }
            }
        });
}

/// `x += delta * gate[frame]` (gated residual); `gate = None` means a plain residual add.
pub fn gated_residual(
    x: &mut [f32],
    delta: &[f32],
    dim: usize,
    tokens_per_frame: usize,
    gate: Option<&[f32]>,
) {
    let gate = gate.map(|g| FrameVec::plain(g, dim));
    gated_residual_frames(x, delta, dim, tokens_per_frame, gate);
}

/// [`gated_residual`] with the gate read as a [`FrameVec`] (the CUDA side's
/// `bc_gated_residual`): `x += delta * (gate[f] + gate_bias)`.
pub fn gated_residual_frames(
    x: &mut [f32],
    delta: &[f32],
    dim: usize,
    tokens_per_frame: usize,
    gate: Option<FrameVec>,
) {
    x.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(delta.par_chunks(dim * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(c, (xc, dc))| {
            for (i, (xr, dr)) in xc.chunks_mut(dim).zip(dc.chunks(dim)).enumerate() {
                let f = (c * ROWS_PER_TASK + i) / tokens_per_frame;
                gate_row(xr, dr, gate.map(|g| g.row(f, dim)));
            }
        });
}

/// `x += delta * (gate + bias)` on one row (`gate` `None`: `x += delta`).
#[inline]
pub(crate) fn gate_row(x: &mut [f32], delta: &[f32], gate: Option<(&[f32], Option<&[f32]>)>) {
    match gate {
        Some((g, Some(b))) => {
            for (((x, d), g), b) in x.iter_mut().zip(delta).zip(g).zip(b) {
                *x += d * (g + b);
            }
        }
        Some((g, None)) => {
            for ((x, d), g) in x.iter_mut().zip(delta).zip(g) {
                *x += d * g;
            }
        }
        None => x.iter_mut().zip(delta).for_each(|(x, d)| *x += d),
    }
}

/// In place RMSNorm over each row of `dim` values: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &mut [f32], dim: usize, eps: f64, w: &[f32]) {
    x.par_chunks_mut(dim * ROWS_PER_TASK).for_each(|xc| {
        for xr in xc.chunks_mut(dim) {
            rms_norm_row(xr, eps, w);
        }
    });
}

/// One row of [`rms_norm`], in place.
pub fn rms_norm_row(xr: &mut [f32], eps: f64, w: &[f32]) {
    let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / xr.len() as f64;
    let r = (1.0 / (ms + eps).sqrt()) as f32;
    for (x, w) in xr.iter_mut().zip(w) {
        *x = *x * r * w;
    }
}

/// The split of a head into (temporal, height, width) RoPE channels: `d - 4*(d/6)`, `2*(d/6)`, `2*(d/6)`.
pub fn rope_parts(head_dim: usize) -> [usize; 3] {
    let d6 = head_dim / 6;
    [head_dim - 4 * d6, 2 * d6, 2 * d6]
}

/// Rotation angles of one token: `angles[j]` for pair j of a head (`head_dim / 2` values),
/// `position[axis] * 10000^(-2i/n)` computed in f64, so positions have no upper limit.
pub fn rope_angles(head_dim: usize, pos: [f64; 3], angles: &mut [f64]) {
    let mut j = 0;
    for (axis, &n) in rope_parts(head_dim).iter().enumerate() {
        for i in 0..n / 2 {
            angles[j] = pos[axis] * 10000f64.powf(-2.0 * i as f64 / n as f64);
            j += 1;
        }
    }
}

/// Cosines and sines of the RoPE angles of every token of `frames` frames starting at absolute
/// frame `first_frame`: `[tokens, head_dim/2]` pairs `(cos, sin)`, shared by all heads, q and k
/// and every layer of a forward.
pub fn rope_table(
    head_dim: usize,
    first_frame: usize,
    frames: usize,
    hp: usize,
    wp: usize,
) -> Vec<(f32, f32)> {
    let mut out = Vec::new();
    rope_table_into(head_dim, first_frame, frames, hp, wp, &mut out);
    out
}

/// [`rope_table`] into a reused buffer (resized to fit), so a tick need not allocate.
pub fn rope_table_into(
    head_dim: usize,
    first_frame: usize,
    frames: usize,
    hp: usize,
    wp: usize,
    out: &mut Vec<(f32, f32)>,
) {
    let half = head_dim / 2;
    let tpf = hp * wp;
    out.clear();
    out.resize(frames * tpf * half, (0.0, 0.0));
    let parts = rope_parts(head_dim);
    out.par_chunks_mut(half.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let pos = [
                (first_frame + r / tpf) as f64,
                ((r / wp) % hp) as f64,
                (r % wp) as f64,
            ];
            // The angles of `rope_angles`, pair by pair.
            let mut j = 0;
            for (axis, &n) in parts.iter().enumerate() {
                for i in 0..n / 2 {
                    let a = pos[axis] * 10000f64.powf(-2.0 * i as f64 / n as f64);
                    row[j] = (a.cos() as f32, a.sin() as f32);
                    j += 1;
                }
            }
        });
}

/// Applies a [`rope_table`] in place to rows of `heads * head_dim` values: adjacent pairs
/// rotate as complex numbers.
pub fn rope_apply(x: &mut [f32], heads: usize, head_dim: usize, table: &[(f32, f32)]) {
    let dim = heads * head_dim;
    let half = head_dim / 2;
    x.par_chunks_mut(dim)
        .zip(table.par_chunks(half))
        .for_each(|(row, cs)| {
            for hr in row.chunks_mut(head_dim) {
                for (j, &(c, s)) in cs.iter().enumerate() {
                    let a = hr[2 * j];
                    let b = hr[2 * j + 1];
                    hr[2 * j] = a * c - b * s;
                    hr[2 * j + 1] = a * s + b * c;
                }
            }
        });
}

/// 3D RoPE in place on rows of `heads * head_dim` values. Token `r` has position
/// `(first_frame + r / (hp*wp), (r / wp) % hp, r % wp)`; angles come from [`rope_angles`], so
/// positions have no upper limit.
pub fn rope_3d(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    first_frame: usize,
    hp: usize,
    wp: usize,
) {
    let frames = x.len() / (heads * head_dim) / (hp * wp).max(1);
    rope_apply(
        x,
        heads,
        head_dim,
        &rope_table(head_dim, first_frame, frames, hp, wp),
    );
}

/// GELU with the tanh approximation, in place. `0.5·(1 + tanh(z))` is evaluated as the
/// equal `1 / (1 + exp(-2z))`, which is cheaper than `tanhf` and exact to f32 rounding.
pub fn gelu_tanh(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(|c| {
        #[cfg(all(bc_avx512, target_arch = "x86_64"))]
        if super::simd::avx512() {
            // SAFETY: AVX-512F was just detected.
            unsafe { super::simd::gelu_tanh(c) };
            return;
        }
        gelu_tanh_portable(c);
    });
}

/// [`gelu_tanh`] on one chunk without SIMD kernels.
fn gelu_tanh_portable(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x {
        let u = *v;
        let z = C * (u + 0.044715 * u * u * u);
        *v = u / (1.0 + (-2.0 * z).exp());
    }
}

/// SiLU `x * sigmoid(x)`, in place.
pub fn silu(x: &mut [f32]) {
    for v in x {
        *v /= 1.0 + (-*v).exp();
    }
}

/// Sinusoidal timestep embedding `[cos(t*w_i), sin(t*w_i)]`, `w_i = 10000^(-i/half)`, in f64.
pub fn sinusoidal(freq_dim: usize, t: f64) -> Vec<f32> {
    let mut out = vec![0f32; freq_dim];
    sinusoidal_into(t, &mut out);
    out
}

/// [`sinusoidal`] into `out` (`freq_dim` values; an odd last value is left as it is).
pub fn sinusoidal_into(t: f64, out: &mut [f32]) {
    let half = out.len() / 2;
    for i in 0..half {
        let a = t * 10000f64.powf(-(i as f64) / half as f64);
        out[i] = a.cos() as f32;
        out[half + i] = a.sin() as f32;
    }
}

/// Latents `[frames, 16, h, w]` to patch rows `[frames*(h/2)*(w/2), 64]`, element order (c, dh, dw).
pub fn patchify(lat: &[f32], frames: usize, ch: usize, h: usize, w: usize, out: &mut [f32]) {
    let (hp, wp) = (h / 2, w / 2);
    let pd = ch * 4;
    for f in 0..frames {
        for i in 0..hp {
            for j in 0..wp {
                let row = &mut out[((f * hp + i) * wp + j) * pd..][..pd];
                for c in 0..ch {
                    for dh in 0..2 {
                        for dw in 0..2 {
                            row[c * 4 + dh * 2 + dw] =
                                lat[((f * ch + c) * h + 2 * i + dh) * w + 2 * j + dw];
                        }
                    }
                }
            }
        }
    }
}

/// Head rows `[frames*(h/2)*(w/2), 64]` (order dh, dw, c) back to latents `[frames, 16, h, w]`.
pub fn unpatchify(rows: &[f32], frames: usize, ch: usize, h: usize, w: usize, out: &mut [f32]) {
    let (hp, wp) = (h / 2, w / 2);
    let pd = ch * 4;
    for f in 0..frames {
        for i in 0..hp {
            for j in 0..wp {
                let row = &rows[((f * hp + i) * wp + j) * pd..][..pd];
                for dh in 0..2 {
                    for dw in 0..2 {
                        for c in 0..ch {
                            out[((f * ch + c) * h + 2 * i + dh) * w + 2 * j + dw] =
                                row[dh * 2 * ch + dw * ch + c];
                        }
                    }
                }
            }
        }
    }
}

/// Flow prediction to clean latents and, unless this was the last step, renoise:
/// `x0 = x - sigma * v`; `next = (1 - sigma_next) * x0 + sigma_next * noise`.
/// Returns `x0` in `x` when `next` is `None`, otherwise the renoised latents.
pub fn flow_step(x: &mut [f32], v: &[f32], sigma: f32, next: Option<(f32, &[f32])>) {
    match next {
        None => x.iter_mut().zip(v).for_each(|(a, &b)| *a -= sigma * b),
        Some((sn, noise)) => x
            .iter_mut()
            .zip(v)
            .zip(noise)
            .for_each(|((a, &b), &n)| *a = (1.0 - sn) * (*a - sigma * b) + sn * n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_roundtrip_and_layout() {
        let (f, c, h, w) = (2, 16, 4, 6);
        let lat: Vec<f32> = (0..f * c * h * w).map(|i| i as f32).collect();
        let mut p = vec![0.0; lat.len()];
        patchify(&lat, f, c, h, w, &mut p);
        // token (frame 1, row 1, col 2), channel 3, dh 1, dw 0
        let tok = (2 + 1) * 3 + 2;
        assert_eq!(p[tok * 64 + 3 * 4 + 2], lat[((16 + 3) * h + 3) * w + 4]);
        // The head order is (dh, dw, c): permute to it, then unpatchify must give the latents back.
        let mut q = vec![0.0; p.len()];
        for t in 0..p.len() / 64 {
            for c in 0..16 {
                for d in 0..4 {
                    q[t * 64 + d * 16 + c] = p[t * 64 + c * 4 + d];
                }
            }
        }
        let mut back = vec![f32::NAN; lat.len()];
        unpatchify(&q, f, c, h, w, &mut back);
        assert_eq!(back, lat);
    }

    #[test]
    fn rope_preserves_norm_and_rotates_pairs() {
        let (heads, hd) = (2, 12);
        let mut x: Vec<f32> = (0..3 * heads * hd)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let orig = x.clone();
        rope_3d(&mut x, heads, hd, 5, 1, 3);
        for (a, b) in x.chunks(2).zip(orig.chunks(2)) {
            let na = a[0] * a[0] + a[1] * a[1];
            let nb = b[0] * b[0] + b[1] * b[1];
            assert!((na - nb).abs() < 1e-5);
        }
        // token 0 has position (5, 0, 0): temporal pair 0 rotates by angle 5.
        let (c, s) = (5f32.cos(), 5f32.sin());
        assert!((x[0] - (orig[0] * c - orig[1] * s)).abs() < 1e-5);
        // its height pairs (position 0) are unchanged.
        assert_eq!(x[4], orig[4]);
        assert_ne!(x, orig);
    }

    #[test]
    fn rope_has_no_position_limit() {
        // Frame 5000: the temporal pair 0 rotates by exactly 5000 radians (computed in f64).
        let mut x = vec![1f32, 0.0, 0.0, 0.0, 0.0, 0.0];
        rope_3d(&mut x, 1, 6, 5000, 1, 1);
        assert!(
            (x[0] - 5000f64.cos() as f32).abs() < 1e-6
                && (x[1] - 5000f64.sin() as f32).abs() < 1e-6
        );
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let orig: Vec<f32> = (-80..85).map(|i| i as f32 * 0.1).collect();
        let mut x = orig.clone();
        gelu_tanh(&mut x);
        let mut p = orig.clone();
        gelu_tanh_portable(&mut p);
        for (g, u) in x.iter().chain(&p).zip(orig.iter().chain(&orig)) {
            let u = *u as f64;
            let e = 0.5
                * u
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (u + 0.044715 * u * u * u)).tanh());
            assert!((*g as f64 - e).abs() < 1e-6 * (1.0 + e.abs()), "{g} vs {e}");
        }
    }

    /// Shift and scale read as table rows plus a bias give what the summed tables give, bit
    /// for bit (the same f32 sums, in place).
    #[test]
    fn ln_modulate_frames_equals_the_summed_tables() {
        let mut r = crate::rng::Rng::new(5);
        let (dim, tpf, frames, stride) = (24usize, 5, 3, 6 * 24);
        let mut v = |n: usize| (0..n).map(|_| r.normal()).collect::<Vec<f32>>();
        let x = v(tpf * frames * dim);
        let e0 = v(frames * stride);
        let m = v(6 * dim);
        let sum = |j: usize| -> Vec<f32> {
            (0..frames * dim)
                .map(|i| m[j * dim + i % dim] + e0[(i / dim) * stride + j * dim + i % dim])
                .collect()
        };
        let mut want = vec![0f32; x.len()];
        ln_modulate(&x, dim, 1e-6, tpf, &sum(3), &sum(4), &mut want);
        let fv = |j: usize| FrameVec {
            table: &e0[j * dim..],
            stride,
            bias: Some(&m[j * dim..(j + 1) * dim]),
        };
        let mut got = vec![0f32; x.len()];
        ln_modulate_frames(&x, dim, 1e-6, tpf, fv(3), fv(4), &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn rope_table_matches_the_angles() {
        let (hd, hp, wp) = (12usize, 2, 3);
        let t = rope_table(hd, 4, 2, hp, wp);
        let mut ang = vec![0f64; hd / 2];
        for r in 0..2 * hp * wp {
            let pos = [
                (4 + r / (hp * wp)) as f64,
                ((r / wp) % hp) as f64,
                (r % wp) as f64,
            ];
            rope_angles(hd, pos, &mut ang);
            for (j, a) in ang.iter().enumerate() {
                assert_eq!(t[r * hd / 2 + j], (a.cos() as f32, a.sin() as f32));
            }
        }
    }

    #[test]
    fn sinusoidal_matches_formula() {
        let e = sinusoidal(8, 3.0);
        assert!((e[0] - 3f32.cos()).abs() < 1e-6);
        assert!((e[5] - (3.0f64 * 10000f64.powf(-0.25)).sin() as f32).abs() < 1e-6);
    }
}
