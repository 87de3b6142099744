//! Skinny linear layers on bf16 weights: `y[n, o] = x[n, k] · Wᵀ` for a few rows `n` (a
//! prompt's tokens through the umT5 encoder), `W` bf16 (`[o, k]`, the `nn.Linear` layout, as
//! it lies in a memory-mapped file), the arithmetic f32.
//!
//! At a few dozen rows such a product reads each weight once and does `2 n` FLOPs with it, so
//! what costs is reading and converting the weights and keeping the FMA units fed. The kernel
//! (AVX-512F) takes dot products along `k`: a register tile of `R` rows of `x` by `C` rows of
//! `W` holds `R·C` 16-lane partial sums; per step of 16 depths it loads `C` weight vectors as
//! bf16, widens them to f32 in registers (a zero-extension and a shift: bf16 is the high half
//! of an f32), and does `R·C` FMAs with the `R` activation vectors. No weight tile is converted
//! into a buffer first (which writes and reads back 4 bytes per 2-byte weight), and no row of
//! the tile is padding (a token-panel layout of 64 lanes would be half padding at 30 tokens).
//!
//! The depth is cut into blocks of 1024 so that a block of `x` (`n × 1024` f32) stays in the
//! L2 cache while every column tile of a task passes over it; the partial sums are kept as
//! vectors in a per-thread scratch between blocks and reduced across lanes once at the end.
//! Tasks (rayon) own 16 output columns each. Results are the f32 products summed in a
//! different order than a scalar loop: within f32 rounding of the exact reference.
//!
//! Built only where the compiler has the AVX-512 intrinsics (the cfg `bc_avx512`, Rust 1.89),
//! as [`super::simd`]; elsewhere [`try_linear_bf16`] returns false.
#![allow(clippy::incompatible_msrv)]

/// Most rows (tokens) for which [`try_linear_bf16`] runs; above, the packed kernel of
/// [`super::gemm`] (weights converted per tile, read once for all rows) does better.
pub const MAX_ROWS: usize = 128;

/// `out[n, o] = x · Wᵀ` with `w` the little-endian bf16 bytes of a row-major `[o, k]` weight.
/// Runs the AVX-512 kernel and returns true where it is available and `n <= MAX_ROWS`;
/// returns false without touching `out` elsewhere (the caller then runs its own path).
///
/// # Panics
/// When `x` is not `n × k`, `w` not `o × k` bf16 values or `out` not `n × o`.
pub fn try_linear_bf16(x: &[f32], n: usize, k: usize, w: &[u8], o: usize, out: &mut [f32]) -> bool {
    assert!(
        x.len() == n * k && w.len() == 2 * o * k && out.len() == n * o,
        "try_linear_bf16: shapes do not match"
    );
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    if super::simd::avx512() && n <= MAX_ROWS {
        if n > 0 && o > 0 {
            fast::gemm(x, n, k, w, o, out);
        }
        return true;
    }
    let _ = (w, out);
    false
}

#[cfg(all(bc_avx512, target_arch = "x86_64"))]
mod fast {
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Output columns per parallel task.
    const CG: usize = 16;
    /// Depth per block (a block of `x`, `n × KB` f32, stays in L2: 120 KiB at 30 rows).
    const KB: usize = 1024;
    /// Rows of `x` per register tile.
    const R: usize = 6;
    /// Rows of `W` (output columns) per register tile.
    const C: usize = 4;

    thread_local! {
        /// A task's partial sums `[CG][n][16]`, per worker thread.
        static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    #[derive(Clone, Copy)]
    struct SendPtr(*mut f32);
    unsafe impl Send for SendPtr {}
    unsafe impl Sync for SendPtr {}

    /// The whole product (shapes checked by the caller, `n`, `o` > 0).
    pub(super) fn gemm(x: &[f32], n: usize, k: usize, w: &[u8], o: usize, out: &mut [f32]) {
        let p = SendPtr(out.as_mut_ptr());
        (0..o.div_ceil(CG)).into_par_iter().for_each(|t| {
            let q = p;
            let (c0, c1) = (t * CG, ((t + 1) * CG).min(o));
            ACC.with(|acc| {
                let mut acc = acc.borrow_mut();
                if acc.len() < CG * n * 16 {
                    acc.resize(CG * n * 16, 0.0);
                }
                // SAFETY: AVX-512F detected by the caller; `x` n×k, `w` o×k bf16, `acc`
                // CG·n·16; the task writes only columns c0..c1 of `out` (n×o), which no other
                // task writes.
                unsafe { task(x, n, k, w, c0, c1, &mut acc, q.0, o) };
            });
        });
    }

    /// Columns `c0..c1` of the output.
    ///
    /// # Safety
    /// As [`gemm`]'s comment says.
    // The target feature lets the lane reductions at the end inline (out of line, each a call
    // with its vector passed through memory, they took 10 % of the encoder's time).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn task(
        x: &[f32],
        n: usize,
        k: usize,
        w: &[u8],
        c0: usize,
        c1: usize,
        acc: &mut [f32],
        out: *mut f32,
        ldo: usize,
    ) {
        let k16 = k - k % 16;
        let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
        let mut kb = 0;
        while kb < k16 {
            let kn = KB.min(k16 - kb);
            let mut c = c0;
            while c < c1 {
                let cn = C.min(c1 - c);
                // The weights the next tile reads (the next columns in this depth block, else
                // the first columns of the next block), fetched while this tile computes: the
                // rows are read in pieces of `KB`, too short for the hardware prefetchers.
                // Every row tile issues them: the repeats find the lines in cache, or retry
                // prefetches dropped while the miss queue was full (measured: 3 % faster with
                // streamed weights than the first row tile alone).
                let next = if c + cn < c1 {
                    wp.add((c + cn) * k + kb)
                } else {
                    wp.add(c0 * k + kb + kn)
                };
                let mut r = 0;
                while r < n {
                    let rn = R.min(n - r);
                    // acc[(c - c0) * n + r][16]: the tile's rows are `n` vectors apart.
                    let a = acc.as_mut_ptr().add(((c - c0) * n + r) * 16);
                    let xt = xp.add(r * k + kb);
                    let wt = wp.add(c * k + kb);
                    let pf = next;
                    let t = Tile {
                        x: xt,
                        w: wt,
                        k,
                        kn,
                        acc: a,
                        ldacc: n * 16,
                        first: kb == 0,
                        pf,
                    };
                    tile(rn, cn, t);
                    r += rn;
                }
                c += cn;
            }
            kb += kn;
        }
        for c in c0..c1 {
            let wr = wp.add(c * k);
            for r in 0..n {
                let mut s = if k16 > 0 {
                    _mm512_reduce_add_ps(_mm512_loadu_ps(acc.as_ptr().add(((c - c0) * n + r) * 16)))
                } else {
                    0.0
                };
                for p in k16..k {
                    s += x[r * k + p] * f32::from_bits((wr.add(p).read_unaligned() as u32) << 16);
                }
                *out.add(r * ldo + c) = s;
            }
        }
    }

    /// One register tile's operands (see [`micro`]).
    #[derive(Clone, Copy)]
    struct Tile {
        /// Activation rows (row stride `k`).
        x: *const f32,
        /// Weight rows, bf16 (row stride `k`).
        w: *const u16,
        k: usize,
        /// Depths of this block (a multiple of 16).
        kn: usize,
        /// Partial sums: row `i`, column `j` at `acc + j·ldacc + i·16`.
        acc: *mut f32,
        ldacc: usize,
        /// Start from zero instead of `acc`.
        first: bool,
        /// Weights to prefetch (null: none).
        pf: *const u16,
    }

    /// Dispatches a register tile of `rn` rows of `x` by `cn` rows of `W` to its instance.
    ///
    /// # Safety
    /// As [`micro`].
    #[inline(always)]
    unsafe fn tile(rn: usize, cn: usize, t: Tile) {
        macro_rules! rows {
            ($c:literal) => {
                match rn {
                    6 => micro::<6, $c>(t),
                    5 => micro::<5, $c>(t),
                    4 => micro::<4, $c>(t),
                    3 => micro::<3, $c>(t),
                    2 => micro::<2, $c>(t),
                    _ => micro::<1, $c>(t),
                }
            };
        }
        match cn {
            4 => rows!(4),
            3 => rows!(3),
            2 => rows!(2),
            _ => rows!(1),
        }
    }

    /// `acc[j·ldacc + i·16 ..][16] (+)= sum over kn/16 steps of x[i, p..p+16] · W[j, p..p+16]`
    /// lane by lane, for `i < RR` rows of `x` and `j < CC` rows of `W` ([`Tile`]'s fields).
    ///
    /// `pf` (not null): prefetch [`C`] rows of `kn` weights there (row stride `k`), a cache
    /// line per row every other step (prefetches never fault, wherever they point).
    ///
    /// # Safety
    /// AVX-512F; `x` valid for `RR` rows of `kn` values, `w` for `CC` rows of `kn` values,
    /// `acc` for the tile's vectors; `kn` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn micro<const RR: usize, const CC: usize>(t: Tile) {
        let Tile {
            x,
            w,
            k,
            kn,
            acc,
            ldacc,
            first,
            pf,
        } = t;
        let mut s = [[_mm512_setzero_ps(); CC]; RR];
        if !first {
            for i in 0..RR {
                for j in 0..CC {
                    s[i][j] = _mm512_loadu_ps(acc.add(j * ldacc + i * 16));
                }
            }
        }
        let mut p = 0;
        while p < kn {
            if !pf.is_null() && p % 32 == 0 {
                for j in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(j * k + p) as *const i8);
                }
            }
            let mut wv = [_mm512_setzero_ps(); CC];
            for j in 0..CC {
                let h = _mm256_loadu_si256(w.add(j * k + p) as *const __m256i);
                wv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            }
            for i in 0..RR {
                let xv = _mm512_loadu_ps(x.add(i * k + p));
                for j in 0..CC {
                    s[i][j] = _mm512_fmadd_ps(xv, wv[j], s[i][j]);
                }
            }
            p += 16;
        }
        for i in 0..RR {
            for j in 0..CC {
                _mm512_storeu_ps(acc.add(j * ldacc + i * 16), s[i][j]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_bytes(v: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let bits: Vec<u16> = v.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        let back = bits
            .iter()
            .map(|&b| f32::from_bits((b as u32) << 16))
            .collect();
        (bits.iter().flat_map(|b| b.to_le_bytes()).collect(), back)
    }

    /// Against an f64 reference on the same (bf16-rounded) weights, on shapes that leave
    /// partial register tiles, partial tasks, a depth tail (k % 16) and several depth blocks.
    #[test]
    fn matches_a_naive_product() {
        let mut rng = crate::rng::Rng::new(11);
        for &(n, k, o) in &[
            (30usize, 1040, 37),
            (1, 16, 1),
            (7, 15, 5),
            (13, 2100, 20),
            (MAX_ROWS, 48, 9),
        ] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let wf: Vec<f32> = (0..o * k).map(|_| rng.normal()).collect();
            let (wb, w) = bf16_bytes(&wf);
            let mut y = vec![f32::NAN; n * o];
            if !try_linear_bf16(&x, n, k, &wb, o, &mut y) {
                assert!(
                    y.iter().all(|v| v.is_nan()),
                    "out touched without the kernel"
                );
                continue;
            }
            for r in 0..n {
                for c in 0..o {
                    let e: f64 = (0..k)
                        .map(|p| x[r * k + p] as f64 * w[c * k + p] as f64)
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|p| (x[r * k + p] as f64 * w[c * k + p] as f64).abs())
                        .sum();
                    let got = y[r * o + c] as f64;
                    assert!(
                        (got - e).abs() <= 1e-5 * scale,
                        "{got} vs {e} at row {r} col {c} of {n}x{k}x{o}"
                    );
                }
            }
        }
    }

    #[test]
    fn too_many_rows_are_left_to_the_caller() {
        let (n, k, o) = (MAX_ROWS + 1, 16, 2);
        let x = vec![1.0f32; n * k];
        let w = vec![0u8; 2 * o * k];
        let mut y = vec![f32::NAN; n * o];
        assert!(!try_linear_bf16(&x, n, k, &w, o, &mut y));
        assert!(y.iter().all(|v| v.is_nan()));
    }

    /// Kernel speed on one thread, per CPU-second, at 30 rows and depth 4096: weights streamed
    /// from memory (`[4096, 4096]`, 32 MiB) and weights that stay in L2 (`[64, 4096]`, 64 times).
    #[test]
    #[ignore = "timing; run by hand"]
    fn kernel_speed() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (n, k) = (30usize, 4096usize);
        let mut rng = crate::rng::Rng::new(1);
        let x: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        // Small bf16 values (exponent bits low): no infinities or NaNs.
        let big: Vec<u8> = (0..2 * 4096 * k)
            .map(|i| (i * 7 % 61) as u8 & 0x3f)
            .collect();
        for (o, reps) in [(4096usize, 8usize), (64, 512)] {
            let mut y = vec![0f32; n * o];
            let c0 = crate::decode::process_cpu_ms().unwrap_or(0.0);
            pool.install(|| {
                for _ in 0..reps {
                    assert!(try_linear_bf16(&x, n, k, &big[..2 * o * k], o, &mut y));
                }
            });
            let cpu = (crate::decode::process_cpu_ms().unwrap_or(0.0) - c0) / 1e3;
            let fl = 2.0 * (n * k * o * reps) as f64;
            eprintln!(
                "[{n}, {k}] x [{o}, {k}]ᵀ x{reps}: {:.1} GFLOP and {:.2} GB of bf16 weights per CPU-s",
                fl / cpu / 1e9,
                (2 * o * k * reps) as f64 / cpu / 1e9
            );
        }
    }
}
