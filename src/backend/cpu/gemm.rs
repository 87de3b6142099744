//! Linear layers: `y = x · Wᵀ + b` through `matrixmultiply::sgemm`, split across rayon threads.

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
            for c in 0..n * o {
                assert!((y0[c] + b[c % o] - r[c]).abs() <= 1e-4 * (1.0 + r[c].abs()));
            }
        }
    }
}
