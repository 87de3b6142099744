//! Linear layers: `y = x · Wᵀ + b` through `matrixmultiply::sgemm`, split across rayon threads.

use rayon::prelude::*;

/// Rows or columns per parallel task below which splitting stops paying off.
const MIN_SPLIT: usize = 16;

/// `out[n, o] = sum_i x[n, i] * w[o, i] + bias[o]`, with `x` row-major `[n, k]`, `w` row-major
/// `[o, k]` (the PyTorch `nn.Linear` layout) and `out` row-major `[n, o]`.
pub fn linear(x: &[f32], n: usize, k: usize, w: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let o = w.len() / k.max(1);
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), o * k);
    debug_assert_eq!(out.len(), n * o);
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
            .for_each(|(oc, xc)| gemm_rows(xc, xc.len() / k, k, w, o, 0, o, bias, oc, o));
    } else {
        let cols = o.div_ceil(threads).max(MIN_SPLIT);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..o.div_ceil(cols)).into_par_iter().for_each(|c| {
            let c0 = c * cols;
            let c1 = (c0 + cols).min(o);
            let p = out_ptr;
            // SAFETY: tasks write disjoint column ranges [c0, c1) of `out`, which outlives the scope.
            let oc = unsafe { std::slice::from_raw_parts_mut(p.0, n * o) };
            gemm_rows(x, n, k, w, o, c0, c1, bias, oc, o);
        });
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Single-threaded GEMM of `n` rows of `x` against output columns `[c0, c1)` of `w`.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    o: usize,
    c0: usize,
    c1: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    debug_assert!(c1 <= o && out.len() >= (n.max(1) - 1) * ldo + c1);
    let beta = match bias {
        Some(b) => {
            for r in 0..n {
                out[r * ldo + c0..r * ldo + c1].copy_from_slice(&b[c0..c1]);
            }
            1.0
        }
        None => 0.0,
    };
    // SAFETY: all pointers/strides describe regions inside the slices checked above.
    unsafe {
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
            out.as_mut_ptr().add(c0),
            ldo as isize,
            1,
        );
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
        let mut rng = crate::noise::Rng::new(7);
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
