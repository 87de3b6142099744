//! Blockwise attention with online softmax (flash-attention style) on the CPU.
//!
//! Memory stays O(query tile × key tile) whatever the number of keys: keys come as a list of
//! segments (runs of cache slots, window members' frames), each a row-major
//! `[tokens, heads*head_dim]` block, and are consumed tile by tile with a running max and sum
//! per query row.

use rayon::prelude::*;

/// Query rows per task.
const Q_TILE: usize = 128;
/// Keys per inner step.
const K_TILE: usize = 256;

/// A contiguous run of keys and values, rows of `heads * head_dim` values.
#[derive(Clone, Copy, Debug)]
pub struct KvSegment<'a> {
    /// Keys `[tokens, dim]`.
    pub k: &'a [f32],
    /// Values `[tokens, dim]`.
    pub v: &'a [f32],
}

impl KvSegment<'_> {
    fn tokens(&self, dim: usize) -> usize {
        self.k.len() / dim
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `out[n, h] = softmax(q[n, h] · K[:, h]ᵀ / sqrt(head_dim)) · V[:, h]` over all segments.
/// `q` and `out` are `[nq, heads*head_dim]`.
///
/// # Panics
/// When `q`/`out` are not whole rows of the same count, or a segment's K and V differ in
/// length or are not whole rows.
pub fn attention(q: &[f32], heads: usize, head_dim: usize, segs: &[KvSegment], out: &mut [f32]) {
    let dim = heads * head_dim;
    assert!(
        dim > 0 && q.len() % dim == 0 && out.len() == q.len(),
        "attention: q {} / out {} values are not rows of {dim}",
        q.len(),
        out.len()
    );
    for s in segs {
        assert!(
            s.k.len() == s.v.len() && s.k.len() % dim == 0,
            "attention: segment K {} / V {} values are not rows of {dim}",
            s.k.len(),
            s.v.len()
        );
    }
    let nq = q.len() / dim;
    let tiles = nq.div_ceil(Q_TILE);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let optr = SendPtr(out.as_mut_ptr());
    (0..heads * tiles).into_par_iter().for_each(|job| {
        let (h, t) = (job / tiles, job % tiles);
        let r0 = t * Q_TILE;
        let rows = Q_TILE.min(nq - r0);
        let p = optr;
        // SAFETY: `out` is nq×dim (asserted) and outlives the parallel scope; every job writes
        // only rows [r0, r0+rows) × columns of head h through the raw pointer: disjoint.
        unsafe { tile(q, dim, h * head_dim, head_dim, r0, rows, segs, scale, p.0) };
    });
}

/// One (head, query tile) job of [`attention`].
///
/// # Safety
/// `out` is valid for writes of rows `[r0, r0+rows)`, columns `[c0, c0+hd)` at stride `dim`,
/// and nothing else accesses them during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    q: &[f32],
    dim: usize,
    c0: usize,
    hd: usize,
    r0: usize,
    rows: usize,
    segs: &[KvSegment],
    scale: f32,
    out: *mut f32,
) {
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut acc = vec![0f32; rows * hd];
    let mut s = vec![0f32; rows * K_TILE];
    let qp = q[r0 * dim + c0..].as_ptr();
    for seg in segs {
        let n = seg.tokens(dim);
        let mut k0 = 0;
        while k0 < n {
            let kn = K_TILE.min(n - k0);
            // SAFETY: q has rows*dim values from (r0, c0); k/v have kn rows from k0 (slice lengths).
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    hd,
                    kn,
                    scale,
                    qp,
                    dim as isize,
                    1,
                    seg.k[k0 * dim + c0..].as_ptr(),
                    1,
                    dim as isize,
                    0.0,
                    s.as_mut_ptr(),
                    kn as isize,
                    1,
                );
            }
            for r in 0..rows {
                let sr = &mut s[r * kn..(r + 1) * kn];
                let mx = sr.iter().fold(m[r], |a, &b| a.max(b));
                let alpha = (m[r] - mx).exp();
                let mut sum = 0f32;
                for v in sr.iter_mut() {
                    *v = (*v - mx).exp();
                    sum += *v;
                }
                l[r] = l[r] * alpha + sum;
                m[r] = mx;
                if alpha != 1.0 {
                    acc[r * hd..(r + 1) * hd]
                        .iter_mut()
                        .for_each(|a| *a *= alpha);
                }
            }
            // SAFETY: as above; acc is rows×hd.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    kn,
                    hd,
                    1.0,
                    s.as_ptr(),
                    kn as isize,
                    1,
                    seg.v[k0 * dim + c0..].as_ptr(),
                    dim as isize,
                    1,
                    1.0,
                    acc.as_mut_ptr(),
                    hd as isize,
                    1,
                );
            }
            k0 += kn;
        }
    }
    for r in 0..rows {
        let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
        let o = out.add((r0 + r) * dim + c0);
        for (d, a) in acc[r * hd..(r + 1) * hd].iter().enumerate() {
            *o.add(d) = a * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], heads: usize, hd: usize) -> Vec<f32> {
        let dim = heads * hd;
        let (nq, nk) = (q.len() / dim, k.len() / dim);
        let mut out = vec![0f32; q.len()];
        for h in 0..heads {
            for i in 0..nq {
                let s: Vec<f64> = (0..nk)
                    .map(|j| {
                        (0..hd)
                            .map(|d| {
                                q[i * dim + h * hd + d] as f64 * k[j * dim + h * hd + d] as f64
                            })
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = p.iter().sum();
                for d in 0..hd {
                    out[i * dim + h * hd + d] = (0..nk)
                        .map(|j| p[j] * v[j * dim + h * hd + d] as f64)
                        .sum::<f64>() as f32
                        / z as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_softmax_across_segments_and_tiles() {
        let mut rng = crate::rng::Rng::new(3);
        let (heads, hd) = (3, 8);
        let dim = heads * hd;
        let (nq, nk) = (70, 600);
        let q: Vec<f32> = (0..nq * dim).map(|_| rng.normal() * 2.0).collect();
        let k: Vec<f32> = (0..nk * dim).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..nk * dim).map(|_| rng.normal()).collect();
        // Uneven segments, one of them in another buffer.
        let k2 = k[300 * dim..].to_vec();
        let v2 = v[300 * dim..].to_vec();
        let segs = [
            KvSegment {
                k: &k[..10 * dim],
                v: &v[..10 * dim],
            },
            KvSegment {
                k: &k[10 * dim..300 * dim],
                v: &v[10 * dim..300 * dim],
            },
            KvSegment { k: &k2, v: &v2 },
        ];
        let mut out = vec![f32::NAN; q.len()];
        attention(&q, heads, hd, &segs, &mut out);
        let r = naive(&q, &k, &v, heads, hd);
        for (a, b) in out.iter().zip(&r) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
