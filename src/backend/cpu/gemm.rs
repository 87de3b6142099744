//! Linear layers: `y = x · Wᵀ + b`, split across rayon threads.
//!
//! With AVX-512 (see [`super::simd`]) the product is computed transposed, `yᵀ = W · xᵀ`:
//! the activations `x` (the small operand: `n × k` against `o × k` weights) are packed once
//! per call into `xᵀ` panels of 64 tokens, the weights are read as they lie (their values
//! broadcast, six output columns per register tile against 64 tokens, 24 accumulators), and
//! each task's tile is written back transposed through an epilogue: plain output with bias,
//! or the gated residual `x += (y + b) · gate` fused (the CUDA side's `bc_gated_residual`),
//! so `y` never goes to memory. Elsewhere `matrixmultiply::sgemm` runs, split by rows or
//! columns.

use super::ops::FrameVec;
use rayon::prelude::*;

/// Rows or columns per parallel task below which splitting stops paying off.
const MIN_SPLIT: usize = 16;

/// `out[n, o] = sum_i x[n, i] * w[o, i] + bias[o]`, with `x` row-major `[n, k]`, `w` row-major
/// `[o, k]` (the PyTorch `nn.Linear` layout) and `out` row-major `[n, o]`.
///
/// # Panics
/// When the slice lengths do not match these shapes (`o = w.len() / k`).
pub fn linear(x: &[f32], n: usize, k: usize, w: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let o = w.len() / k.max(1);
    assert!(
        x.len() == n * k
            && w.len() == o * k
            && out.len() == n * o
            && bias.is_none_or(|b| b.len() == o),
        "linear: x {} (want {n}x{k}), w {} (want {o}x{k}), out {} (want {n}x{o})",
        x.len(),
        w.len(),
        out.len()
    );
    if n == 0 || o == 0 {
        return;
    }
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    if super::simd::avx512() {
        let p = SendPtr(out.as_mut_ptr());
        // SAFETY: every (row, column range) reaches the epilogue once; `out` is n×o.
        fast::gemm(
            x,
            n,
            k,
            fast::WeightRows::F32(w),
            o,
            bias,
            &|r, c0, vals: &[f32]| unsafe {
                let q = p;
                std::ptr::copy_nonoverlapping(vals.as_ptr(), q.0.add(r * o + c0), vals.len());
            },
        );
        return;
    }
    linear_portable(x, n, k, w, bias, out);
}

/// `resid[r, ·] += (x · Wᵀ + b)[r, ·] · gate[r / tokens_per_frame, ·]` (`gate` `None`: a
/// plain residual add; a [`FrameVec`] gate is its table row plus its bias): [`linear`] then
/// [`super::ops::gated_residual_frames`], fused where the AVX-512 kernels run (then `tmp`,
/// `n × o` scratch, is not touched).
#[allow(clippy::too_many_arguments)]
pub fn linear_residual(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    tmp: &mut [f32],
    resid: &mut [f32],
    tokens_per_frame: usize,
    gate: Option<FrameVec>,
) {
    let o = w.len() / k.max(1);
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    if super::simd::avx512() && n > 0 && o > 0 {
        let frames = n.div_ceil(tokens_per_frame.max(1));
        assert!(
            x.len() == n * k
                && w.len() == o * k
                && resid.len() == n * o
                && bias.is_none_or(|b| b.len() == o)
                && gate.is_none_or(|g| g.table.len() >= (frames - 1) * g.stride + o
                    && g.bias.is_none_or(|b| b.len() >= o)),
            "linear_residual: shapes do not match"
        );
        let p = SendPtr(resid.as_mut_ptr());
        let tpf = tokens_per_frame.max(1);
        // SAFETY: every (row, column range) reaches the epilogue once; `resid` is n×o.
        fast::gemm(
            x,
            n,
            k,
            fast::WeightRows::F32(w),
            o,
            bias,
            &|r, c0, vals: &[f32]| unsafe {
                let q = p;
                let dst = std::slice::from_raw_parts_mut(q.0.add(r * o + c0), vals.len());
                let c1 = c0 + vals.len();
                let g = gate.map(|g| {
                    let (t, b) = g.row(r / tpf, c1);
                    (&t[c0..], b.map(|b| &b[c0..]))
                });
                super::ops::gate_row(dst, vals, g);
            },
        );
        return;
    }
    linear(x, n, k, w, bias, tmp);
    super::ops::gated_residual_frames(resid, tmp, o, tokens_per_frame, gate);
}

/// `out[n, o] = x · Wᵀ` where `rows(r0, buf)` writes weight rows `r0..` (as many as `buf`
/// holds, `k` values each) as f32: [`try_linear_rows`] where it runs, otherwise per task a tile
/// of rows converted into a per-thread buffer and multiplied by `matrixmultiply`. For weights
/// kept in another dtype (bf16, f16) that are never widened whole.
///
/// # Panics
/// When `x` is not `n × k` or `out` not `n × o`.
pub fn linear_rows(
    x: &[f32],
    n: usize,
    k: usize,
    o: usize,
    rows: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
) {
    if try_linear_rows(x, n, k, o, rows, out) || n == 0 || o == 0 {
        return;
    }
    use rayon::prelude::*;
    /// Values of one converted weight tile (4 MiB of f32).
    const TILE_ELEMS: usize = 1 << 20;
    let threads = rayon::current_num_threads().max(1);
    let tile = (TILE_ELEMS / k.max(1)).min(o.div_ceil(4 * threads)).max(1);
    // Transposed output `[o, n]`: each tile writes a contiguous chunk.
    let mut yt = vec![0.0f32; o * n];
    yt.par_chunks_mut(tile * n).enumerate().for_each_init(
        Vec::new,
        |buf: &mut Vec<f32>, (t, chunk)| {
            let rn = chunk.len() / n;
            buf.resize(rn * k, 0.0);
            rows(t * tile, &mut buf[..rn * k]);
            // SAFETY: `buf` is rn×k, `x` is n×k, `chunk` is rn×n, all row-major and disjoint.
            unsafe {
                matrixmultiply::sgemm(
                    rn,
                    k,
                    n,
                    1.0,
                    buf.as_ptr(),
                    k as isize,
                    1,
                    x.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    chunk.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        },
    );
    for (c, col) in yt.chunks(n).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            out[r * o + c] = v;
        }
    }
}

/// `out[n, o] = x · Wᵀ` with the rows of `W` (`[o, k]`) produced by `rows(r0, buf)`, which
/// fills `buf` with rows `r0..r0 + buf.len() / k` as f32 (bf16 weights converted a tile at a
/// time, never whole). Runs the AVX-512 kernel and returns true where it is available;
/// returns false without touching `out` elsewhere (the caller then runs its own path).
///
/// # Panics
/// When `x` is not `n × k` or `out` not `n × o`.
pub fn try_linear_rows(
    x: &[f32],
    n: usize,
    k: usize,
    o: usize,
    rows: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
) -> bool {
    assert!(
        x.len() == n * k && out.len() == n * o,
        "try_linear_rows: shapes do not match"
    );
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    if super::simd::avx512() {
        if n > 0 && o > 0 {
            let p = SendPtr(out.as_mut_ptr());
            let w = fast::WeightRows::Convert(rows);
            // SAFETY: every (row, column range) reaches the epilogue once; `out` is n×o.
            fast::gemm(x, n, k, w, o, None, &|r, c0, vals: &[f32]| unsafe {
                let q = p;
                std::ptr::copy_nonoverlapping(vals.as_ptr(), q.0.add(r * o + c0), vals.len());
            });
        }
        return true;
    }
    let _ = rows;
    false
}

/// Frees this thread's packing buffer of the AVX-512 linear (a no-op elsewhere).
pub(crate) fn release_thread_scratch() {
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    fast::PACK.with(|p| *p.borrow_mut() = Vec::new());
}

/// [`linear`] through `matrixmultiply` whatever the CPU: the fallback, public for the GEMM
/// benchmark (`benches/gemm.rs`) and the tests that compare the two paths.
///
/// # Panics
/// As [`linear`].
pub fn linear_portable(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let o = w.len() / k.max(1);
    assert!(
        x.len() == n * k && w.len() == o * k && out.len() == n * o,
        "linear_portable: shapes do not match"
    );
    if n == 0 || o == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // matrixmultiply packs both operands per call: splitting over rows re-packs all of W in
    // every task, splitting over columns re-packs all of x. Split the larger one.
    if n >= o {
        let rows = n.div_ceil(threads).max(MIN_SPLIT.min(n));
        out.par_chunks_mut(rows * o)
            .zip(x.par_chunks(rows * k))
            .for_each(|(oc, xc)| {
                let r = xc.len() / k;
                // SAFETY: `xc` is r×k, `oc` is r×o, `w` is o×k (lengths asserted above).
                unsafe { gemm_block(xc, r, k, w, 0, o, bias, oc.as_mut_ptr(), o) }
            });
    } else {
        let cols = o.div_ceil(threads).max(MIN_SPLIT);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..o.div_ceil(cols)).into_par_iter().for_each(|c| {
            let c0 = c * cols;
            let c1 = (c0 + cols).min(o);
            let p = out_ptr;
            // SAFETY: `out` is n×o (asserted) and outlives the parallel scope; tasks write
            // disjoint column ranges [c0, c1) through the raw pointer, no references overlap.
            unsafe { gemm_block(x, n, k, w, c0, c1, bias, p.0, o) }
        });
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Single-threaded GEMM of the `n` rows of `x` against output columns `[c0, c1)` of `w`,
/// written to `out` (row stride `ldo`, column `c` at `out + r*ldo + c`).
///
/// # Safety
/// `x` holds n×k values, `w` at least c1×k, `bias` (if any) at least c1; `out` is valid for
/// writes of rows 0..n, columns c0..c1 at stride `ldo`, and nothing else accesses them.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    c0: usize,
    c1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let beta = match bias {
        Some(b) => {
            for r in 0..n {
                std::ptr::copy_nonoverlapping(b.as_ptr().add(c0), out.add(r * ldo + c0), c1 - c0);
            }
            1.0
        }
        None => 0.0,
    };
    matrixmultiply::sgemm(
        n,
        k,
        c1 - c0,
        1.0,
        x.as_ptr(),
        k as isize,
        1,
        w.as_ptr().add(c0 * k),
        1,
        k as isize,
        beta,
        out.add(c0),
        ldo as isize,
        1,
    );
}

#[cfg(all(bc_avx512, target_arch = "x86_64"))]
mod fast {
    use crate::backend::cpu::simd;
    use rayon::prelude::*;
    use std::cell::RefCell;

    /// Tokens per packed panel of `xᵀ` (the register tile's width: 4 vectors of 16).
    const PW: usize = 64;
    /// Output columns per register tile.
    const CT: usize = 6;
    /// Output columns per task.
    const CG: usize = 48;
    /// Panels per task.
    const NG: usize = 4;
    /// Depth of one pass (a task's panels: `NG·PW·KC` values, 256 KiB, stay in L2).
    const KC: usize = 256;

    thread_local! {
        /// The packed `xᵀ` of the calling thread's current linear, reused across calls.
        pub(super) static PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        /// A task's accumulators `[CG][NG·PW]`, per worker thread.
        static ACC: RefCell<Vec<f32>> = RefCell::new(vec![0.0; CG * NG * PW]);
        /// A task's weight rows when they are converted per tile.
        static WBUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// Where the weight rows come from: an f32 `[o, k]` slice read in place, or a function
    /// that converts rows `r0..r0 + buf.len() / k` into `buf` (bf16 weights, per tile).
    #[derive(Clone, Copy)]
    pub(crate) enum WeightRows<'a> {
        F32(&'a [f32]),
        Convert(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
    }

    /// `y = x · Wᵀ + b` handed to `epi(row, first column, values)` in row segments of at most
    /// `CG` columns; every (row, column) is handed over exactly once. Shapes: x `[n, k]`,
    /// w `[o, k]`, bias `[o]`, checked by the callers.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        x: &[f32],
        n: usize,
        k: usize,
        w: WeightRows,
        o: usize,
        bias: Option<&[f32]>,
        epi: &(dyn Fn(usize, usize, &[f32]) + Sync),
    ) {
        let panels = n.div_ceil(PW);
        // Taken out of the thread-local for the call (and put back after): a linear that
        // starts on this thread while this one waits for its tasks (rayon work stealing)
        // finds it empty and uses its own instead of failing on a held borrow.
        let mut taken = PACK.with(|p| std::mem::take(&mut *p.borrow_mut()));
        {
            let pack = &mut taken;
            if pack.len() < panels * PW * k {
                pack.resize(panels * PW * k, 0.0);
            }
            let pack = &mut pack[..panels * PW * k];
            // xᵀ panels: pack[p][kk][j] = x[p·PW + j, kk], zero beyond row n; in blocks of
            // 16 depths, so the panel rows being written stay in L1.
            pack.par_chunks_mut(PW * k)
                .enumerate()
                .for_each(|(p, panel)| {
                    let rows = PW.min(n - p * PW);
                    for kb in (0..k).step_by(16) {
                        let ke = (kb + 16).min(k);
                        for j in 0..PW {
                            if j < rows {
                                let xr = &x[(p * PW + j) * k..][kb..ke];
                                for (kk, &v) in (kb..ke).zip(xr) {
                                    panel[kk * PW + j] = v;
                                }
                            } else {
                                for kk in kb..ke {
                                    panel[kk * PW + j] = 0.0;
                                }
                            }
                        }
                    }
                });
            let pack = &*pack;
            let (cgs, ngs) = (o.div_ceil(CG), panels.div_ceil(NG));
            (0..cgs * ngs).into_par_iter().for_each(|t| {
                let (cg, ng) = (t % cgs, t / cgs);
                ACC.with(|acc| {
                    WBUF.with(|wbuf| {
                        let acc = &mut acc.borrow_mut();
                        // Weight rows of this task's columns, and the first row they hold.
                        let (c0, c1) = (cg * CG, ((cg + 1) * CG).min(o));
                        let (wrows, first): (&[f32], usize) = match w {
                            WeightRows::F32(v) => (v, 0),
                            WeightRows::Convert(f) => {
                                let mut b = wbuf.borrow_mut();
                                b.resize((c1 - c0) * k, 0.0);
                                f(c0, &mut b[..]);
                                drop(b);
                                // SAFETY: this thread's buffer, not resized until the task
                                // below has returned.
                                let b = unsafe { &*wbuf.as_ptr() };
                                (&b[..], c0)
                            }
                        };
                        // SAFETY: AVX-512F was detected by the caller; the slices' shapes are
                        // as documented (pack: panels·PW·k, wrows: rows first..c1 of W).
                        unsafe { task(n, k, wrows, first, o, bias, pack, cg, ng, acc, epi) };
                    });
                });
            });
        }
        PACK.with(|p| *p.borrow_mut() = taken);
    }

    /// One task: output columns `[cg·CG, ..)`, panels `[ng·NG, ..)`.
    ///
    /// # Safety
    /// AVX-512F is available; `pack` holds the packed panels of all `n` rows at depth `k`,
    /// `w` holds the weight rows `first..` of this task's columns (`k` values each), `acc`
    /// `CG·NG·PW`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn task(
        n: usize,
        k: usize,
        w: &[f32],
        first: usize,
        o: usize,
        bias: Option<&[f32]>,
        pack: &[f32],
        cg: usize,
        ng: usize,
        acc: &mut [f32],
        epi: &(dyn Fn(usize, usize, &[f32]) + Sync),
    ) {
        let (c0, c1) = (cg * CG, ((cg + 1) * CG).min(o));
        let (p0, p1) = (ng * NG, ((ng + 1) * NG).min(n.div_ceil(PW)));
        let lda = NG * PW;
        let mut k0 = 0;
        while k0 < k {
            let kn = KC.min(k - k0);
            let mut c = c0;
            while c < c1 {
                let cn = CT.min(c1 - c);
                for p in p0..p1 {
                    simd::axpy_rows::<{ PW / 16 }>(
                        cn,
                        w.as_ptr().add((c - first) * k + k0),
                        k,
                        1,
                        pack.as_ptr().add(p * PW * k + k0 * PW),
                        PW,
                        kn,
                        acc.as_mut_ptr().add((c - c0) * lda + (p - p0) * PW),
                        lda,
                        k0 > 0,
                    );
                }
                c += cn;
            }
            k0 += kn;
        }
        // Transposed write-back through the epilogue, bias added.
        let mut row = [0f32; CG];
        let cols = c1 - c0;
        for r in p0 * PW..(p1 * PW).min(n) {
            let j = r - p0 * PW;
            for (ci, v) in row[..cols].iter_mut().enumerate() {
                *v = acc[ci * lda + j] + bias.map_or(0.0, |b| b[c0 + ci]);
            }
            epi(r, c0, &row[..cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, k: usize, w: &[f32], b: &[f32]) -> Vec<f32> {
        let o = b.len();
        let mut y = vec![0.0; n * o];
        for r in 0..n {
            for c in 0..o {
                let mut s = b[c] as f64;
                for i in 0..k {
                    s += x[r * k + i] as f64 * w[c * k + i] as f64;
                }
                y[r * o + c] = s as f32;
            }
        }
        y
    }

    #[test]
    fn linear_matches_naive_in_both_split_modes() {
        let mut rng = crate::rng::Rng::new(7);
        for &(n, k, o) in &[(100, 33, 7), (3, 40, 500), (1, 5, 1), (37, 64, 64)] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..o * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..o).map(|_| rng.normal()).collect();
            let mut y = vec![f32::NAN; n * o];
            linear(&x, n, k, &w, Some(&b), &mut y);
            let r = naive(&x, n, k, &w, &b);
            for (a, e) in y.iter().zip(&r) {
                assert!(
                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{a} vs {e} at {n}x{k}x{o}"
                );
            }
            let mut y0 = vec![f32::NAN; n * o];
            linear(&x, n, k, &w, None, &mut y0);
            let mut yp = vec![f32::NAN; n * o];
            linear_portable(&x, n, k, &w, Some(&b), &mut yp);
            for c in 0..n * o {
                assert!((y0[c] + b[c % o] - r[c]).abs() <= 1e-4 * (1.0 + r[c].abs()));
                assert!((yp[c] - r[c]).abs() <= 1e-4 * (1.0 + r[c].abs()));
            }
        }
    }

    /// Weight rows converted per tile give what the same weights in a slice give.
    #[test]
    fn converted_weight_rows_match_linear() {
        let mut rng = crate::rng::Rng::new(4);
        let (n, k, o) = (300usize, 70, 101);
        let x: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..o * k).map(|_| rng.normal()).collect();
        let mut want = vec![0f32; n * o];
        linear(&x, n, k, &w, None, &mut want);
        let rows = |r0: usize, buf: &mut [f32]| buf.copy_from_slice(&w[r0 * k..r0 * k + buf.len()]);
        let mut got = vec![f32::NAN; n * o];
        if try_linear_rows(&x, n, k, o, &rows, &mut got) {
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        } else {
            assert!(
                got.iter().all(|v| v.is_nan()),
                "out touched without the kernel"
            );
        }
    }

    /// The fused gated residual against linear + gated_residual, with and without a gate, on
    /// shapes that leave partial panels, column groups and depth passes (k > 256).
    #[test]
    fn linear_residual_matches_linear_then_residual() {
        let mut rng = crate::rng::Rng::new(9);
        for &(n, k, o, tpf) in &[(70usize, 300, 50, 7), (130, 33, 100, 65), (1, 8, 3, 1)] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..o * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..o).map(|_| rng.normal()).collect();
            let gate: Vec<f32> = (0..n.div_ceil(tpf) * o).map(|_| rng.normal()).collect();
            let resid: Vec<f32> = (0..n * o).map(|_| rng.normal()).collect();
            let r = naive(&x, n, k, &w, &b);
            for g in [Some(&gate[..]), None] {
                let mut got = resid.clone();
                let mut tmp = vec![0f32; n * o];
                let fv = g.map(|g| FrameVec::plain(g, o));
                linear_residual(&x, n, k, &w, Some(&b), &mut tmp, &mut got, tpf, fv);
                for i in 0..n * o {
                    let gv = g.map_or(1.0, |g| g[(i / o / tpf) * o + i % o]);
                    let e = resid[i] + r[i] * gv;
                    assert!(
                        (got[i] - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{} vs {e}",
                        got[i]
                    );
                }
            }
        }
    }

    /// A gate read as a [`FrameVec`] (rows of a wider table plus a bias, as the forward reads
    /// `e0` and the layer's modulation) gives what the summed `[frames, o]` table gives, bit
    /// for bit, fused or not.
    #[test]
    fn frame_vec_gate_equals_the_summed_table() {
        let mut rng = crate::rng::Rng::new(12);
        let (n, k, o, tpf, stride) = (90usize, 40, 70, 30, 3 * 70);
        let frames = n.div_ceil(tpf);
        let x: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..o * k).map(|_| rng.normal()).collect();
        let table: Vec<f32> = (0..frames * stride).map(|_| rng.normal()).collect();
        let bias: Vec<f32> = (0..o).map(|_| rng.normal()).collect();
        let resid: Vec<f32> = (0..n * o).map(|_| rng.normal()).collect();
        let off = 70;
        let summed: Vec<f32> = (0..frames * o)
            .map(|i| table[(i / o) * stride + off + i % o] + bias[i % o])
            .collect();
        let fv = FrameVec {
            table: &table[off..],
            stride,
            bias: Some(&bias),
        };
        let mut tmp = vec![0f32; n * o];
        let mut want = resid.clone();
        linear_residual(
            &x,
            n,
            k,
            &w,
            None,
            &mut tmp,
            &mut want,
            tpf,
            Some(FrameVec::plain(&summed, o)),
        );
        let mut got = resid.clone();
        linear_residual(&x, n, k, &w, None, &mut tmp, &mut got, tpf, Some(fv));
        assert_eq!(got, want);
        let mut y = vec![0f32; n * o];
        linear(&x, n, k, &w, None, &mut y);
        let mut port = resid.clone();
        super::super::ops::gated_residual_frames(&mut port, &y, o, tpf, Some(fv));
        let mut port_want = resid.clone();
        super::super::ops::gated_residual(&mut port_want, &y, o, tpf, Some(&summed));
        assert_eq!(port, port_want);
    }
}
