//! The umT5 encoder with bf16 activations ([`super::TextPrecision::Bf16`]): what Wan's
//! `T5EncoderModel` computes with its default `t5_dtype = torch.bfloat16` (the module
//! converted to bf16, as `generate.py --t5_cpu` runs it), rounding where PyTorch rounds.
//!
//! Every parameter is bf16 (weights stored otherwise are rounded to bf16, round to nearest
//! even, as `module.to(torch.bfloat16)` does). Every tensor upstream holds is bf16, so a value
//! is rounded to bf16 after each op that produces one:
//!
//! - embedding rows: bf16 parameters, as they are;
//! - T5 norm: `x * rsqrt(mean(x.float()²) + eps)` in f32 (a bf16 tensor times an f32 one is
//!   f32), cast to bf16 (`type_as(weight)`), then `weight * that` rounded;
//! - linear layers: bf16 × bf16 products summed in f32, the result rounded (PyTorch's CPU
//!   bf16 GEMMs, oneDNN's `vdpbf16ps` kernels on AVX512-BF16, do the same);
//! - attention: `q·k` rounded, `+ bias` rounded, softmax in f32 (`softmax(attn.float())`)
//!   rounded (`type_as`), `P·V` rounded;
//! - residual adds rounded;
//! - the GELU is upstream's formula op by op, each op rounded (`0.5 * x * (1 + tanh(sqrt(2/pi)
//!   * (x + 0.044715 * x³)))`, the Python scalars in f32, `x³` as PyTorch's bf16 `pow(x, 3)`
//!   computes it, see [`gelu`]); then `fc1(h) * gelu` rounded;
//! - the final norm's output is bf16 (returned as f32 values).
//!
//! What cannot be the same: the order in which a GEMM or a softmax sums (oneDNN's blocking is
//! not ours), `tanh`/`exp` implementations (ours are Rust's `libm`, PyTorch's Sleef; they differ
//! by an f32 ulp now and then), so a bf16 rounding flips now and then and the two drift apart
//! by about a bf16 ulp per layer (measured in docs/text-encoder.md).

use super::umt5::{bucket_table, Layer, Mat, Umt5, EPS, MAX_DISTANCE, MAX_TOKENS};
use crate::backend::cpu::gemm_bf16;
use crate::Result;
use rayon::prelude::*;

/// Rounds an f32 to bf16 (round to nearest even, as PyTorch's `c10::BFloat16`): the bits.
/// NaN stays a (quiet) NaN.
#[inline]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `v` rounded to bf16, as f32.
#[inline]
pub fn round_bf16(v: f32) -> f32 {
    from_bf16(to_bf16(v))
}

/// Upstream's GELU (`wan/modules/t5.py` `GELU`, the tanh form written out) on a bf16 tensor,
/// as PyTorch evaluates it: every op reads bf16, computes in f32 and rounds its result to
/// bf16; the Python scalars (`0.5`, `0.044715`, `sqrt(2/pi)`, `1.0`) are f32.
pub fn gelu(x: f32) -> f32 {
    let r = round_bf16;
    let half = r(0.5 * x);
    // torch.pow(x, 3.0) on bf16: x * x * x with the bf16 type's operators, each product
    // rounded.
    let cube = r(r(x * x) * x);
    let inner = r(x + r(0.044_715_f32 * cube));
    // tanh of a bf16 value, rounded to bf16: through f64 it is the correctly rounded result,
    // which is what PyTorch's bf16 tanh gives on every bf16 input (checked exhaustively).
    // (The whole function was compared with PyTorch 2.15 on all 65280 finite bf16 inputs:
    // equal bit for bit.)
    let a = r((2.0f64 / std::f64::consts::PI).sqrt() as f32 * inner);
    let t = r((a as f64).tanh() as f32);
    r(half * r(1.0 + t))
}

/// [`gelu`] of every bf16 value (the input's bits index it): the forward looks it up instead
/// of evaluating the f64 `tanh` (7 % of the encoder's time at real sizes before).
fn gelu_table() -> &'static [u16] {
    static T: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| to_bf16(gelu(from_bf16(b))))
            .collect()
    })
}

/// A weight as bf16 bytes: where it is stored as bf16, the bytes as they lie; otherwise its
/// values rounded to bf16, `rows` rows at a time from `r0` (the caller keeps the tile small).
fn rounded_rows(w: &Mat, r0: usize, rows: usize) -> Vec<u8> {
    let (_, k) = w.dims();
    let mut f = vec![0.0f32; rows * k];
    w.rows_into(r0, &mut f);
    f.iter().flat_map(|&v| to_bf16(v).to_le_bytes()).collect()
}

/// `y[l, o] = x[l, k] · Wᵀ` on bf16 `x`, summed in f32, rounded to bf16 (the values as f32).
fn linear(x: &[u16], l: usize, w: &Mat) -> Vec<f32> {
    let (o, k) = w.dims();
    let mut y = vec![0.0f32; l * o];
    if let Some(wb) = w.bf16_bytes() {
        gemm_bf16::linear_bf16_act(x, l, k, wb, o, &mut y);
    } else {
        // f32 or f16 weights: a tile of rows (at most 1 Mi values) rounded at a time.
        let tile = ((1usize << 20) / k.max(1)).clamp(1, o);
        let mut part = vec![0.0f32; l * tile];
        for r0 in (0..o).step_by(tile) {
            let rn = tile.min(o - r0);
            let wb = rounded_rows(w, r0, rn);
            gemm_bf16::linear_bf16_act(x, l, k, &wb, rn, &mut part[..l * rn]);
            for i in 0..l {
                y[i * o + r0..i * o + r0 + rn].copy_from_slice(&part[i * rn..(i + 1) * rn]);
            }
        }
    }
    y.par_chunks_mut(4096)
        .for_each(|c| c.iter_mut().for_each(|v| *v = round_bf16(*v)));
    y
}

/// T5's RMS norm of bf16 rows `x` (`[l, d]`) with bf16 weight `w`, as upstream's
/// `T5LayerNorm` in bf16: statistics in f32, `x * rsqrt` in f32, cast to bf16, times the
/// weight, rounded. The bf16 bits.
fn rms_norm(x: &[f32], d: usize, w: &[f32]) -> Vec<u16> {
    let mut h = vec![0u16; x.len()];
    h.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(hr, xr)| {
            // The mean of squares as PyTorch's f32 reduction gets it (a cascade of partial
            // sums, within an ulp or two of the exact sum): summed in f64, rounded once. A plain
            // f32 loop over 4096 values is ~1e-5 off, which flips the bf16 rounding of about
            // 0.3 % of the normed values (measured: 3x further from PyTorch at real width).
            let ms = (xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64) as f32;
            let s = 1.0 / (ms + EPS as f32).sqrt();
            for ((h, &v), &g) in hr.iter_mut().zip(xr).zip(w) {
                *h = to_bf16(g * round_bf16(v * s));
            }
        });
    h
}

/// Attention of all `l` queries over all `l` keys per head, scores `q·k + bias` with no
/// scaling, every tensor bf16 as upstream's (see the module's list). `q`, `k`, `v` and the
/// result `[l, heads·hd]`; the result as bf16 bits.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: usize,
    heads: usize,
    hd: usize,
    rel: &[f32],
    buckets: &[usize],
) -> Vec<u16> {
    let bf16 = super::umt5::AttentionRounding {
        score: |dot, bias| round_bf16(round_bf16(dot) + bias),
        prob: round_bf16,
        store: to_bf16,
    };
    super::umt5::attention_rounded(q, k, v, l, heads, hd, rel, buckets, bf16)
}

/// `x ← round(x + δ)`: a residual add of two bf16 tensors.
fn add_into(x: &mut [f32], d: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(d.par_chunks(4096))
        .for_each(|(x, d)| {
            for (x, &d) in x.iter_mut().zip(d) {
                *x = round_bf16(*x + d);
            }
        });
}

/// One layer of the bf16 forward on the bf16 residual stream `x` (`[l, dim]`).
fn layer(m: &Umt5, lay: &Layer, x: &mut [f32], l: usize, buckets: &[usize]) {
    let c = m.config();
    let d = c.dim;
    let bf = |v: &[f32]| v.iter().map(|&x| round_bf16(x)).collect::<Vec<f32>>();
    let (norm1, norm2, rel) = (bf(&lay.norm1), bf(&lay.norm2), bf(&lay.rel));
    // Attention block.
    let h = rms_norm(x, d, &norm1);
    let q = linear(&h, l, &lay.q);
    let k = linear(&h, l, &lay.k);
    let v = linear(&h, l, &lay.v);
    let a = attention(&q, &k, &v, l, c.heads, c.dim_attn / c.heads, &rel, buckets);
    let o = linear(&a, l, &lay.o);
    add_into(x, &o);
    // Gated-GELU FFN block: fc2(fc1(h) * gelu(gate(h))).
    let h = rms_norm(x, d, &norm2);
    let gate = linear(&h, l, &lay.gate);
    let lin = linear(&h, l, &lay.fc1);
    let table = gelu_table();
    let mut g = vec![0u16; gate.len()];
    g.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(lin.par_chunks(4096)))
        .for_each(|(g, (gate, lin))| {
            for ((g, &a), &b) in g.iter_mut().zip(gate).zip(lin) {
                // `a` is a bf16 value: its bits are the table's index.
                *g = to_bf16(b * from_bf16(table[to_bf16(a) as usize]));
            }
        });
    let y = linear(&g, l, &lay.fc2);
    add_into(x, &y);
}

/// Embeddings `[ids.len(), dim]` of token ids with bf16 activations (the values are bf16,
/// returned as f32).
pub(crate) fn forward(m: &Umt5, ids: &[i64]) -> Result<Vec<f32>> {
    let c = m.config();
    let l = ids.len();
    let mut x = m.embed_rows(ids, MAX_TOKENS)?;
    x.iter_mut().for_each(|v| *v = round_bf16(*v));
    let buckets = bucket_table(l, c.buckets, MAX_DISTANCE);
    for lay in m.layers() {
        layer(m, lay, &mut x, l, &buckets);
    }
    let norm: Vec<f32> = m.final_norm().iter().map(|&v| round_bf16(v)).collect();
    Ok(rms_norm(&x, c.dim, &norm)
        .into_iter()
        .map(from_bf16)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: even (1). 1 + 3·2^-8: up.
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(
            round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(round_bf16(-1.0 - 2f32.powi(-8)), -1.0);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    }

    /// Values PyTorch 2.15 gives for upstream's GELU on bf16 tensors, where `F.gelu(x,
    /// approximate="tanh")` (one rounding) differs: the op-by-op roundings are what upstream
    /// computes (its tail under about -3 is exactly 0: `1 + tanh` rounds to 0).
    #[test]
    fn gelu_matches_pytorch_bf16_where_the_fused_form_differs() {
        for (x, want) in [
            (0x3d51u16, 0x3cd9u16),
            (0x3e12, 0x3da2),
            (0x3ef5, 0x3ea7),
            (0x3ff8, 0x3ff2),
            (0xbea2, 0xbdf3),
            (0xbf50, 0xbe2e),
            (0xbfbe, 0xbdd0),
            (0xc011, 0xbcda),
            (0xc059, 0x8000),
            (0xc0a1, 0x8000),
        ] {
            let got = to_bf16(gelu(from_bf16(x)));
            assert_eq!(
                got,
                want,
                "gelu({}) = {} (bits {got:#06x}), PyTorch {want:#06x}",
                from_bf16(x),
                from_bf16(got)
            );
        }
    }

    #[test]
    fn gelu_is_upstreams_formula() {
        // Close to the f32 function at bf16 precision (within a bf16 ulp of `1 + tanh` times
        // `x / 2` in the negative tail, where upstream's rounds to 0), exactly 0 at 0.
        for i in -400..400 {
            let x = round_bf16(i as f32 * 0.02);
            let e = 0.5
                * x
                * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!(
                (gelu(x) - e).abs() <= 2e-2 * e.abs() + x.abs() * 2f32.powi(-8),
                "{x}: {} vs {e}",
                gelu(x)
            );
            assert_eq!(gelu(x), round_bf16(gelu(x)));
        }
        assert_eq!(gelu(0.0), 0.0);
        // The table is the function.
        let t = gelu_table();
        for b in (0..=u16::MAX).step_by(7) {
            assert_eq!(t[b as usize], to_bf16(gelu(from_bf16(b))), "{b:#06x}");
        }
    }
}
