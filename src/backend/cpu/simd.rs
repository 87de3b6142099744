//! AVX-512 kernels of the CPU backend, chosen at run time (`avx512f` detected), with the
//! portable code of the callers as the fallback on other CPUs.
//!
//! - [`axpy_tile`]: `C[R × 16·NV] (+)= A[R × k] · B[k × 16·NV]`, A and B row-major with any
//!   row strides, no packing: B's rows are read as they lie (a value tile `V`, or a transposed
//!   key tile), A's values are broadcast. `R·NV` accumulators stay in registers.
//!   [`axpy_parts_rows`] sums several such products (a convolution's taps, each a shift of
//!   the input) in registers, loading and storing `C` once.
//! - [`exp`]: `e^x` on 16 lanes, a degree-6 polynomial on `[-ln2/2, ln2/2]` scaled by `2^n`
//!   (relative error about 2 ulp; inputs below -87 give about 1e-38, never NaN).
//! - [`softmax_cols`]: the online-softmax step of attention over one (transposed) score tile.
//! - [`norm_scale_silu`]: a channel row of the decoders' RMS norm, optionally then SiLU.
//!
//! Everything here is `unsafe` with the feature as a precondition: call only after
//! [`avx512`] returned true. The module's kernels are built only by compilers that have the
//! AVX-512 intrinsics (Rust 1.89, the cfg `bc_avx512` set by `build.rs`), so the crate's
//! older minimum Rust version still builds (the portable path alone).
#![allow(clippy::incompatible_msrv)]

#[cfg(all(bc_avx512, target_arch = "x86_64"))]
use std::arch::x86_64::*;

/// Whether the AVX-512 kernels can run on this CPU (cached by the standard library).
pub fn avx512() -> bool {
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(all(bc_avx512, target_arch = "x86_64")))]
    {
        false
    }
}

/// `C[i, 0..16·NV] = (add ? C : 0) + sum_(ao, bo) sum_p A[ao + i, p] · B[bo + p, 0..16·NV]`
/// for `i < R`, with `A[ao + i, p] = *a.add(ao + i·lda + p·acs)`, `B[bo + p, ·]` at
/// `b.add(bo + p·ldb)`, `C[i, ·]` at `c.add(i·ldc)`: one `k`-deep product per offset pair of
/// `parts`, summed in that order in registers (bit for bit the same as one call per part).
///
/// # Safety
/// AVX-512F is available; the pointers are valid for those reads and writes for every part.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
#[inline(never)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub unsafe fn axpy_tile<const R: usize, const NV: usize>(
    a: *const f32,
    lda: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    parts: &[(usize, usize)],
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    if add {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(c.add(i * ldc + 16 * v));
            }
        }
    }
    for &(ao, bo) in parts {
        let (a, b) = (a.add(ao), b.add(bo));
        for p in 0..k {
            let mut av = [_mm512_setzero_ps(); R];
            for (i, x) in av.iter_mut().enumerate() {
                *x = _mm512_set1_ps(*a.add(i * lda + p * acs));
            }
            let bp = b.add(p * ldb);
            for v in 0..NV {
                let bv = _mm512_loadu_ps(bp.add(16 * v));
                for i in 0..R {
                    acc[i][v] = _mm512_fmadd_ps(av[i], bv, acc[i][v]);
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc + 16 * v), *x);
        }
    }
}

/// [`axpy_tile`] of one part at offsets (0, 0) over `rows` rows (any count): a plain
/// `C (+)= A · B`.
///
/// # Safety
/// As [`axpy_tile`], for rows `0..rows`.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn axpy_rows<const NV: usize>(
    rows: usize,
    a: *const f32,
    lda: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let ab = (a, lda, acs, b, ldb, k);
    axpy_parts_rows::<NV>(rows, ab, &[(0, 0)], c, ldc, add);
}

/// [`axpy_tile`] over `rows` rows (any count), in register tiles of `6` rows (`NV ≤ 4`) or
/// `3` rows (`NV = 8`); `ab` is `(a, lda, acs, b, ldb, k)`.
///
/// # Safety
/// As [`axpy_tile`], for rows `0..rows`.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[allow(clippy::type_complexity)]
pub unsafe fn axpy_parts_rows<const NV: usize>(
    rows: usize,
    ab: (*const f32, usize, usize, *const f32, usize, usize),
    parts: &[(usize, usize)],
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let (a, lda, acs, b, ldb, k) = ab;
    let tile = if NV > 4 { 3 } else { 6 };
    let mut r = 0;
    while r < rows {
        let n = tile.min(rows - r);
        let (ar, cr) = (a.add(r * lda), c.add(r * ldc));
        match n {
            6 => axpy_tile::<6, NV>(ar, lda, acs, b, ldb, k, parts, cr, ldc, add),
            5 => axpy_tile::<5, NV>(ar, lda, acs, b, ldb, k, parts, cr, ldc, add),
            4 => axpy_tile::<4, NV>(ar, lda, acs, b, ldb, k, parts, cr, ldc, add),
            3 => axpy_tile::<3, NV>(ar, lda, acs, b, ldb, k, parts, cr, ldc, add),
            2 => axpy_tile::<2, NV>(ar, lda, acs, b, ldb, k, parts, cr, ldc, add),
            _ => axpy_tile::<1, NV>(ar, lda, acs, b, ldb, k, parts, cr, ldc, add),
        }
        r += n;
    }
}

/// `e^x` on 16 lanes (see the module notes for the accuracy).
///
/// # Safety
/// AVX-512F is available.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn exp(x: __m512) -> __m512 {
    let x = _mm512_max_ps(
        _mm512_min_ps(x, _mm512_set1_ps(88.0)),
        _mm512_set1_ps(-87.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(p, n)
}

/// The mask of the first `n` (< 16) lanes.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[inline]
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// One online-softmax step over a transposed score tile `st[j, r]` (`kn` keys × `w` query
/// columns, `w` a multiple of 16), per column r: `mx = max(m, max_j st)`,
/// `st ← e^(st − mx)` in place, `alpha = e^(m − mx)` (0 while `m` is still −∞),
/// `l ← l·alpha + Σ_j st`, `m ← mx`. The caller scales its accumulators by `alpha`.
///
/// # Safety
/// AVX-512F is available; `st` holds `kn·w` values; `m`, `l`, `alpha` hold `w`.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_cols(
    st: &mut [f32],
    w: usize,
    kn: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    assert!(st.len() >= kn * w && m.len() >= w && l.len() >= w && alpha.len() >= w);
    let sp = st.as_mut_ptr();
    for v in (0..w).step_by(16) {
        let mold = _mm512_loadu_ps(m.as_ptr().add(v));
        let mut vmax = mold;
        for j in 0..kn {
            vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sp.add(j * w + v)));
        }
        let mut vsum = _mm512_setzero_ps();
        for j in 0..kn {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(sp.add(j * w + v)), vmax));
            _mm512_storeu_ps(sp.add(j * w + v), e);
            vsum = _mm512_add_ps(vsum, e);
        }
        let first = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mold, _mm512_set1_ps(f32::NEG_INFINITY));
        let a = _mm512_mask_blend_ps(first, exp(_mm512_sub_ps(mold, vmax)), _mm512_setzero_ps());
        let lv = _mm512_fmadd_ps(_mm512_loadu_ps(l.as_ptr().add(v)), a, vsum);
        _mm512_storeu_ps(l.as_mut_ptr().add(v), lv);
        _mm512_storeu_ps(m.as_mut_ptr().add(v), vmax);
        _mm512_storeu_ps(alpha.as_mut_ptr().add(v), a);
    }
}

/// `x ← x · (1 + e^(−2·c·(x + 0.044715·x³)))⁻¹` (GELU, tanh form) on a slice.
///
/// # Safety
/// AVX-512F is available.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu_tanh(x: &mut [f32]) {
    const C: f32 = 0.797_884_6;
    let n = x.len();
    let p = x.as_mut_ptr();
    let one = _mm512_set1_ps(1.0);
    let f = |u: __m512| {
        let u3 = _mm512_mul_ps(_mm512_mul_ps(u, u), u);
        let z = _mm512_mul_ps(
            _mm512_set1_ps(-2.0 * C),
            _mm512_fmadd_ps(_mm512_set1_ps(0.044715), u3, u),
        );
        _mm512_div_ps(u, _mm512_add_ps(one, exp(z)))
    };
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_ps(p.add(i), f(_mm512_loadu_ps(p.add(i))));
        i += 16;
    }
    if i < n {
        let k = lanes(n - i);
        _mm512_mask_storeu_ps(p.add(i), k, f(_mm512_maskz_loadu_ps(k, p.add(i))));
    }
}

/// `dst[i] = f(src[i] / norm[i] * scale * g)` with `f` SiLU (`y / (1 + e^(-y))`) when `act`,
/// else the identity: one channel row of the decoders' channel RMS norm, the division and the
/// products rounded in the portable code's order.
///
/// # Safety
/// AVX-512F is available; `src` and `norm` hold at least `dst.len()` values.
#[cfg(all(bc_avx512, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
pub unsafe fn norm_scale_silu(
    dst: &mut [f32],
    src: &[f32],
    norm: &[f32],
    scale: f32,
    g: f32,
    act: bool,
) {
    let n = dst.len();
    assert!(src.len() >= n && norm.len() >= n);
    let (d, x, nr) = (dst.as_mut_ptr(), src.as_ptr(), norm.as_ptr());
    let (sv, gv, one) = (
        _mm512_set1_ps(scale),
        _mm512_set1_ps(g),
        _mm512_set1_ps(1.0),
    );
    let f = |v: __m512, m: __m512| {
        let y = _mm512_mul_ps(_mm512_mul_ps(_mm512_div_ps(v, m), sv), gv);
        if act {
            let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), y));
            _mm512_div_ps(y, _mm512_add_ps(one, e))
        } else {
            y
        }
    };
    let mut i = 0;
    while i + 16 <= n {
        let y = f(_mm512_loadu_ps(x.add(i)), _mm512_loadu_ps(nr.add(i)));
        _mm512_storeu_ps(d.add(i), y);
        i += 16;
    }
    if i < n {
        let k = lanes(n - i);
        // Masked-off lanes divide 0 by 1: no exception, nothing stored.
        let m = _mm512_mask_loadu_ps(one, k, nr.add(i));
        _mm512_mask_storeu_ps(d.add(i), k, f(_mm512_maskz_loadu_ps(k, x.add(i)), m));
    }
}

#[cfg(all(test, bc_avx512, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp() {
        if !avx512() {
            return;
        }
        let xs: Vec<f32> = (-8700..8800).map(|i| i as f32 * 0.01 + 0.003).collect();
        for c in xs.chunks_exact(16) {
            let mut out = [0f32; 16];
            // SAFETY: avx512 checked above; both arrays hold 16 values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp(_mm512_loadu_ps(c.as_ptr()))) };
            for (&x, &y) in c.iter().zip(&out) {
                let e = (x as f64).exp();
                assert!(
                    ((y as f64 - e) / e).abs() < 4e-7,
                    "exp({x}) = {y}, want {e}"
                );
            }
        }
    }

    /// Several parts summed in registers give bit for bit what one call per part gives.
    #[test]
    fn parts_equal_successive_calls() {
        if !avx512() {
            return;
        }
        let mut rng = crate::rng::Rng::new(12);
        let (rows, k, lda, ldb, ldc) = (7, 11, 13, 70, 64);
        let a: Vec<f32> = (0..4 * rows * lda).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..4 * k * ldb).map(|_| rng.normal()).collect();
        let c0: Vec<f32> = (0..rows * ldc).map(|_| rng.normal()).collect();
        let parts = [(0, 0), (rows * lda, 3), (2 * rows * lda + 1, k * ldb + 5)];
        let (mut one, mut each) = (c0.clone(), c0.clone());
        // SAFETY: avx512 checked; every part reads rows×k of `a` (offset + rows·lda ≤ its
        // length) and k×64 of `b` (offset + k·ldb ≤ its length); c is rows×64.
        unsafe {
            let ab = (a.as_ptr(), lda, 1, b.as_ptr(), ldb, k);
            axpy_parts_rows::<4>(rows, ab, &parts, one.as_mut_ptr(), ldc, true);
            for p in parts {
                let ab = (a.as_ptr().add(p.0), lda, 1, b.as_ptr().add(p.1), ldb, k);
                axpy_parts_rows::<4>(rows, ab, &[(0, 0)], each.as_mut_ptr(), ldc, true);
            }
        }
        assert_eq!(one, each);
        assert_ne!(one, c0);
    }

    #[test]
    fn axpy_rows_matches_naive_for_every_row_count() {
        if !avx512() {
            return;
        }
        let mut rng = crate::rng::Rng::new(11);
        let (k, lda, ldb) = (37, 40, 136);
        for rows in 1..=13 {
            let a: Vec<f32> = (0..rows * lda).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * ldb).map(|_| rng.normal()).collect();
            for nv in [1usize, 2, 4, 8] {
                let w = 16 * nv;
                let ldc = w + 3;
                let c0: Vec<f32> = (0..rows * ldc).map(|_| rng.normal()).collect();
                for add in [false, true] {
                    let mut c = c0.clone();
                    // SAFETY: avx512 checked; a is rows×lda (k ≤ lda), b is k×ldb (w ≤ ldb),
                    // c is rows×ldc (w ≤ ldc).
                    unsafe {
                        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
                        match nv {
                            1 => axpy_rows::<1>(rows, ap, lda, 1, bp, ldb, k, cp, ldc, add),
                            2 => axpy_rows::<2>(rows, ap, lda, 1, bp, ldb, k, cp, ldc, add),
                            4 => axpy_rows::<4>(rows, ap, lda, 1, bp, ldb, k, cp, ldc, add),
                            _ => axpy_rows::<8>(rows, ap, lda, 1, bp, ldb, k, cp, ldc, add),
                        }
                    }
                    for i in 0..rows {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= w {
                                assert_eq!(got, c0[i * ldc + j], "column {j} beyond the tile");
                                continue;
                            }
                            let mut e = if add { c0[i * ldc + j] as f64 } else { 0.0 };
                            for p in 0..k {
                                e += a[i * lda + p] as f64 * b[p * ldb + j] as f64;
                            }
                            assert!((got as f64 - e).abs() < 1e-4, "{got} vs {e}");
                        }
                    }
                }
            }
        }
    }
}
