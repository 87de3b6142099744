//! Blockwise attention with online softmax (flash-attention style) on the CPU.
//!
//! Memory stays O(query tile × key tile) whatever the number of keys: keys come as a list of
//! segments (runs of cache slots, window members' frames), each a row-major
//! `[tokens, heads*head_dim]` block, and are consumed tile by tile with a running max and sum
//! per query row.
//!
//! On CPUs with AVX-512 and head sizes of 16, 32, 64 or 128 the tiles run through
//! [`super::simd`]: per (head, 64-query tile) job the scaled queries are transposed once, each
//! key tile gives the transposed scores `Sᵀ = K·(scale·Q)ᵀ` (keys broadcast, query columns in
//! vectors, so the softmax is vertical: no horizontal reductions), then `O += P·V` reads the
//! value rows as they lie. No packing of K or V, and scratch memory is per thread, reused.
//! Elsewhere the portable tiles below (`matrixmultiply`) run.

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
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    if matches!(head_dim, 16 | 32 | 64 | 128) && super::simd::avx512() {
        fast::attention(q, heads, head_dim, segs, out);
        return;
    }
    portable(q, heads, head_dim, segs, out);
}

/// The portable form of [`attention`] (any CPU, any head size).
fn portable(q: &[f32], heads: usize, head_dim: usize, segs: &[KvSegment], out: &mut [f32]) {
    let dim = heads * head_dim;
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
    store_rows(&acc, &l, hd, rows, out.add(r0 * dim + c0), dim);
}

/// `out[r, 0..hd] = acc[r, ·] / l[r]` for `r < rows` (0 where `l[r]` is 0), `out` rows at
/// stride `dim`.
///
/// # Safety
/// `out` is valid for writes of `rows` rows of `hd` values at stride `dim`; `acc` holds
/// `rows·hd` values and `l` `rows`.
unsafe fn store_rows(acc: &[f32], l: &[f32], hd: usize, rows: usize, out: *mut f32, dim: usize) {
    for r in 0..rows {
        let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
        let o = out.add(r * dim);
        for (d, a) in acc[r * hd..(r + 1) * hd].iter().enumerate() {
            *o.add(d) = a * inv;
        }
    }
}

#[cfg(all(bc_avx512, target_arch = "x86_64"))]
mod fast {
    use super::{KvSegment, SendPtr};
    use crate::backend::cpu::simd;
    use rayon::prelude::*;
    use std::cell::RefCell;

    /// Queries per job (the width of a transposed score tile).
    const FQ: usize = 64;
    /// Keys per score tile.
    const FK: usize = 256;

    /// One thread's buffers, sized for head_dim ≤ 128, allocated once per thread.
    struct Scratch {
        qt: Vec<f32>,
        st: Vec<f32>,
        acc: Vec<f32>,
        m: Vec<f32>,
        l: Vec<f32>,
        alpha: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
            qt: vec![0.0; 128 * FQ],
            st: vec![0.0; FK * FQ],
            acc: vec![0.0; FQ * 128],
            m: vec![0.0; FQ],
            l: vec![0.0; FQ],
            alpha: vec![0.0; FQ],
        });
    }

    /// [`super::attention`] with the AVX-512 tiles; `head_dim` is 16, 32, 64 or 128 and the
    /// CPU has AVX-512F (checked by the caller), shapes asserted by the caller.
    pub(super) fn attention(
        q: &[f32],
        heads: usize,
        hd: usize,
        segs: &[KvSegment],
        out: &mut [f32],
    ) {
        let dim = heads * hd;
        let nq = q.len() / dim;
        let tiles = nq.div_ceil(FQ);
        let optr = SendPtr(out.as_mut_ptr());
        (0..heads * tiles).into_par_iter().for_each(|job| {
            let (h, t) = (job / tiles, job % tiles);
            let r0 = t * FQ;
            let rows = FQ.min(nq - r0);
            let p = optr;
            SCRATCH.with(|s| {
                let s = &mut *s.borrow_mut();
                // SAFETY: AVX-512F was detected by the caller; the job writes rows
                // [r0, r0+rows) × columns of head h of `out` (nq×dim, asserted by the
                // caller) only: jobs are disjoint.
                unsafe { job_tile(q, dim, h * hd, hd, r0, rows, segs, s, p.0) }
            });
        });
    }

    /// One (head, query tile) job.
    ///
    /// # Safety
    /// AVX-512F is available; `hd` ∈ {16, 32, 64, 128}; `q` holds rows `[r0, r0+rows)` of
    /// `dim` values; every segment holds whole rows of `dim`; `out` is valid for writes of
    /// rows `[r0, r0+rows)`, columns `[c0, c0+hd)` at stride `dim`, and nobody else touches
    /// them.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn job_tile(
        q: &[f32],
        dim: usize,
        c0: usize,
        hd: usize,
        r0: usize,
        rows: usize,
        segs: &[KvSegment],
        s: &mut Scratch,
        out: *mut f32,
    ) {
        let scale = 1.0 / (hd as f32).sqrt();
        // Qᵀ, scaled, zero in the columns of missing rows.
        for d in 0..hd {
            let row = &mut s.qt[d * FQ..(d + 1) * FQ];
            for (r, v) in row.iter_mut().enumerate() {
                *v = if r < rows {
                    q[(r0 + r) * dim + c0 + d] * scale
                } else {
                    0.0
                };
            }
        }
        s.m.fill(f32::NEG_INFINITY);
        s.l.fill(0.0);
        s.acc[..FQ * hd].fill(0.0);
        for seg in segs {
            let n = seg.k.len() / dim;
            let mut k0 = 0;
            while k0 < n {
                let kn = FK.min(n - k0);
                // Sᵀ[j, r] = K[k0 + j, head] · (scale·Q[r, head]).
                simd::axpy_rows::<{ FQ / 16 }>(
                    kn,
                    seg.k.as_ptr().add(k0 * dim + c0),
                    dim,
                    1,
                    s.qt.as_ptr(),
                    FQ,
                    hd,
                    s.st.as_mut_ptr(),
                    FQ,
                    false,
                );
                simd::softmax_cols(&mut s.st, FQ, kn, &mut s.m, &mut s.l, &mut s.alpha);
                for r in 0..rows {
                    let a = s.alpha[r];
                    if a != 1.0 {
                        s.acc[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= a);
                    }
                }
                // O[r, ·] += Σ_j P[j, r] · V[k0 + j, head].
                let (a, b, c) = (
                    s.st.as_ptr(),
                    seg.v.as_ptr().add(k0 * dim + c0),
                    s.acc.as_mut_ptr(),
                );
                match hd {
                    16 => simd::axpy_rows::<1>(rows, a, 1, FQ, b, dim, kn, c, hd, true),
                    32 => simd::axpy_rows::<2>(rows, a, 1, FQ, b, dim, kn, c, hd, true),
                    64 => simd::axpy_rows::<4>(rows, a, 1, FQ, b, dim, kn, c, hd, true),
                    _ => simd::axpy_rows::<8>(rows, a, 1, FQ, b, dim, kn, c, hd, true),
                }
                k0 += kn;
            }
        }
        super::store_rows(&s.acc, &s.l, hd, rows, out.add(r0 * dim + c0), dim);
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

    /// Every head size of the AVX-512 path (16..128) and one it leaves to the portable
    /// path (8), partial query tiles (70 rows) and several key tiles in uneven segments; both
    /// paths against the f64 softmax.
    #[test]
    fn matches_naive_softmax_across_segments_and_tiles() {
        let mut rng = crate::rng::Rng::new(3);
        for (heads, hd) in [(3, 8), (3, 16), (2, 32), (2, 64), (1, 128)] {
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
            let r = naive(&q, &k, &v, heads, hd);
            let mut out = vec![f32::NAN; q.len()];
            attention(&q, heads, hd, &segs, &mut out);
            let mut port = vec![f32::NAN; q.len()];
            portable(&q, heads, hd, &segs, &mut port);
            for ((a, p), b) in out.iter().zip(&port).zip(&r) {
                assert!((a - b).abs() < 1e-4, "hd {hd}: {a} vs {b}");
                assert!((p - b).abs() < 1e-4, "hd {hd} portable: {p} vs {b}");
            }
        }
    }
}
