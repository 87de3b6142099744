//! CPU building blocks shared by the two decoders: convolution as implicit GEMM, channel RMS
//! norm, SiLU / ReLU, nearest 2x upsampling and single-head spatial attention.
//!
//! Activations are frame-major: one frame is a `Vec<f32>` laid out `[C, H, W]`, as PyTorch's
//! NCHW. A convolution output frame is a sum over *sources*: input frames (or channel slices of
//! a concatenation) paired with the time tap of the kernel they meet. A causal 3x3x3 conv is
//! three sources (the two cached frames and the current one), a MemBlock's conv over
//! `cat[x, past]` is two sources with different channel offsets, and a missing source is a zero
//! frame (skipped, as adding zeros changes nothing).
//!
//! Each output frame is split into tiles of whole rows. A tile copies the rows it needs (plus a
//! zero border) into a padded buffer of width `W + 2`, then accumulates one `Cout x Cin x
//! rows*(W+2)` GEMM per kernel tap, with the tap's shift applied as an offset into that buffer;
//! the two extra columns per row are computed and dropped. No im2col matrix is ever built, so
//! the extra memory is one padded tile per thread. A source may also be read through a nearest
//! 2x upsample, which is then never materialised.
//!
//! Where the CPU has AVX-512 the GEMMs run on the CPU backend's register-tiled kernel (the one
//! of the linear layers, `backend::cpu::simd`): per block of 64 output pixels and 6 output
//! channels, all taps of a source accumulate in registers, the weights broadcast and the
//! block's padded rows packed contiguously once for all output channels. Elsewhere (and in
//! the tests, on every machine) each tap is one `matrixmultiply` GEMM.

use rayon::prelude::*;

/// Raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only where tasks write disjoint index ranges of a live buffer (see call sites).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `c[i*rsc + j*csc] = beta*c[..] + sum_p a[i*rsa + p*csa] * b[p*rsb + j*csb]`, for an `m x k`
/// times `k x n` product, each operand a slice plus an offset and strides.
///
/// # Panics
/// When an index would fall outside a slice (a bug in the caller, never user input).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    (m, k, n): (usize, usize, usize),
    a: (&[f32], usize, usize, usize),
    b: (&[f32], usize, usize, usize),
    beta: f32,
    c: (*mut f32, usize, usize, usize, usize),
) {
    let (a, ao, rsa, csa) = a;
    let (b, bo, rsb, csb) = b;
    let (cp, clen, co, rsc, csc) = c;
    if m == 0 || n == 0 {
        return;
    }
    let last = |o: usize, r: usize, rs: usize, cl: usize, cs: usize| {
        o + r.saturating_sub(1) * rs + cl.saturating_sub(1) * cs
    };
    assert!(
        k == 0 || last(ao, m, rsa, k, csa) < a.len(),
        "gemm: A out of bounds"
    );
    assert!(
        k == 0 || last(bo, k, rsb, n, csb) < b.len(),
        "gemm: B out of bounds"
    );
    assert!(last(co, m, rsc, n, csc) < clen, "gemm: C out of bounds");
    // SAFETY: every index the product touches was checked against the slice lengths above;
    // the caller guarantees `cp` is valid for `clen` values and not aliased by `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr().add(ao),
            rsa as isize,
            csa as isize,
            b.as_ptr().add(bo),
            rsb as isize,
            csb as isize,
            beta,
            cp.add(co),
            rsc as isize,
            csc as isize,
        );
    }
}

/// A convolution's weights, repacked for tap-wise GEMMs.
pub(crate) struct Conv {
    /// Output channels.
    pub cout: usize,
    /// Input channels.
    pub cin: usize,
    /// Temporal taps (1 for conv2d).
    pub kt: usize,
    /// Kernel height (1 or 3).
    pub kh: usize,
    /// Kernel width (1 or 3).
    pub kw: usize,
    /// `[kt][kh][kw][cout][cin]`.
    taps: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// The sub-pixel form of a 3x3 conv2d read through a nearest 2x upsample
    /// ([`Conv::with_parity`]): `[4 parities][2][2][cout][cin]`, parity `2 py + px`.
    parity: Option<Vec<f32>>,
    /// The CPU runs the parity form (`BC_CONV_PARITY` was not `0` at [`Conv::with_parity`]).
    parity_cpu: bool,
}

/// One input of a convolution output frame.
#[derive(Clone, Copy)]
pub(crate) struct Src<'a> {
    /// The frame, `[c, H, W]` (or `[c, H/2, W/2]` when `up`).
    pub data: &'a [f32],
    /// The kernel's time tap this frame meets.
    pub t: usize,
    /// First weight input channel of this frame's channels.
    pub c0: usize,
    /// Channels of this frame.
    pub c: usize,
    /// Read through a nearest 2x spatial upsample.
    pub up: bool,
}

impl<'a> Src<'a> {
    /// A whole frame meeting tap `t`.
    pub fn new(data: &'a [f32], t: usize, c: usize) -> Self {
        Src {
            data,
            t,
            c0: 0,
            c,
            up: false,
        }
    }
}

/// Target number of GEMM columns per tile.
const TILE_COLS: usize = 4096;

/// Kernel rows (or columns) summed into each of a parity's two taps: `PARITY_TAPS[py][a]`
/// (see [`Conv::with_parity`]).
pub(crate) const PARITY_TAPS: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];

thread_local! {
    /// Floating-point operations of the convolutions (and attention products) started on
    /// this thread: what [`conv_flops_done`] reads.
    static FLOPS_DONE: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Floating-point operations the convolutions and attention products called from this
/// thread have done so far (multiply and add counted apart; a parity conv counts its 2x2
/// taps). Tests compare it with [`super::Decoder::conv_flops`].
#[cfg(test)]
pub(crate) fn conv_flops_done() -> f64 {
    FLOPS_DONE.with(|f| f.get())
}

/// Whether decoders built now give their upsample convs the parity form: yes unless the
/// environment says `BC_CONV_PARITY=0` (for comparisons; read at each load).
pub(crate) fn parity_from_env() -> bool {
    std::env::var("BC_CONV_PARITY").map_or(true, |v| v.trim() != "0")
}

fn count_flops(n: f64) {
    FLOPS_DONE.with(|f| f.set(f.get() + n));
}

impl Conv {
    /// Builds from PyTorch's layout `[cout, cin, (kt,) kh, kw]` (shape already validated to be
    /// 4-D or 5-D with odd spatial sizes of 1 or 3).
    pub fn from_torch(w: &[f32], shape: &[usize], bias: Option<Vec<f32>>) -> Conv {
        let (cout, cin) = (shape[0], shape[1]);
        let (kt, kh, kw) = if shape.len() == 5 {
            (shape[2], shape[3], shape[4])
        } else {
            (1, shape[2], shape[3])
        };
        let mut taps = vec![0.0; w.len()];
        for o in 0..cout {
            for i in 0..cin {
                for t in 0..kt {
                    for y in 0..kh {
                        for x in 0..kw {
                            let src = (((o * cin + i) * kt + t) * kh + y) * kw + x;
                            let dst = (((t * kh + y) * kw + x) * cout + o) * cin + i;
                            taps[dst] = w[src];
                        }
                    }
                }
            }
        }
        Conv {
            cout,
            cin,
            kt,
            kh,
            kw,
            taps,
            bias,
            parity: None,
            parity_cpu: false,
        }
    }

    /// This conv with its sub-pixel (parity) weights, for a 3x3 conv2d (pad 1) that reads
    /// its input through a nearest 2x upsample (any other conv is returned as it is).
    ///
    /// Output pixel `(2i + py, 2j + px)` of `conv3x3(upsample2x(x))` reads upsampled rows
    /// `2i + py - 1 ..= 2i + py + 1`, i.e. original rows `{i - 1, i}` for `py = 0` (kernel row
    /// 0, then rows 1 and 2 both on row `i`) and `{i, i + 1}` for `py = 1` (rows 0 and 1 on
    /// `i`, row 2 on `i + 1`); the same for columns. So each of the four output parities is a
    /// 2x2 conv over the original image with summed weights: 16 taps per output quad instead
    /// of 36 (2.25x fewer FLOPs). The zero padding agrees (upsampled rows -1 and `2H` are
    /// original rows -1 and `H`). Summing the weights first rounds differently from summing
    /// the products (a few ulp).
    ///
    /// The CPU then runs every upsampled read of this conv in that form unless
    /// `BC_CONV_PARITY=0` is set now; the device decoder decides for itself
    /// (`CudaDecoder::set_conv_parity`) and only needs to know the conv is one of these.
    pub fn with_parity(mut self) -> Conv {
        if self.kt == 1 && self.kh == 3 && self.kw == 3 {
            self.parity = Some(self.parity_taps());
            self.parity_cpu = parity_from_env();
        }
        self
    }

    /// Whether [`Conv::with_parity`] gave this conv parity weights (an upsample conv).
    pub fn has_parity(&self) -> bool {
        self.parity.is_some()
    }

    /// Whether the CPU runs this conv's upsampled reads in the parity form.
    pub fn cpu_parity(&self) -> bool {
        self.parity.is_some() && self.parity_cpu
    }

    /// The parity weights of a 3x3 conv2d, `[4][2][2][cout][cin]` (see [`Conv::with_parity`]).
    ///
    /// # Panics
    /// When the conv is not a 3x3 conv2d (a bug in the caller: [`Conv::with_parity`] checks).
    pub(crate) fn parity_taps(&self) -> Vec<f32> {
        assert!(
            self.kt == 1 && self.kh == 3 && self.kw == 3,
            "conv: the parity form is for 3x3 conv2d weights"
        );
        let n = self.cout * self.cin;
        let mut out = vec![0.0f32; 16 * n];
        for p in 0..4 {
            let (py, px) = (p / 2, p % 2);
            for a in 0..2 {
                for b in 0..2 {
                    let dst = &mut out[((p * 2 + a) * 2 + b) * n..][..n];
                    for dy in PARITY_TAPS[py][a] {
                        for dx in PARITY_TAPS[px][b] {
                            let src = &self.taps[(dy * 3 + dx) * n..][..n];
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        }
                    }
                }
            }
        }
        out
    }

    /// The parity weights as bf16 `[4][cout][2][2][cin]` (each parity in the layout of
    /// [`Conv::packed_bf16`] for a 2x2 kernel), summed in f32 then rounded once.
    ///
    /// # Panics
    /// When the conv is not a 3x3 conv2d (see [`Conv::parity_taps`]).
    pub fn parity_packed_bf16(&self) -> Vec<half::bf16> {
        let (cout, cin) = (self.cout, self.cin);
        let pt = self.parity_taps();
        let mut out = vec![half::bf16::ZERO; pt.len()];
        for p in 0..4 {
            for tap in 0..4 {
                for o in 0..cout {
                    let src = &pt[((p * 4 + tap) * cout + o) * cin..][..cin];
                    let dst = &mut out[((p * cout + o) * 4 + tap) * cin..][..cin];
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d = half::bf16::from_f32(*v);
                    }
                }
            }
        }
        out
    }

    /// The weights as bf16 `[cout][kt][kh][kw][cin]`: the layout the GPU convolution
    /// (`cuda/conv.cu`) reads, one GEMM row of K values per output channel.
    pub fn packed_bf16(&self) -> Vec<half::bf16> {
        let taps = self.kt * self.kh * self.kw;
        let mut out = vec![half::bf16::ZERO; self.taps.len()];
        for tap in 0..taps {
            for o in 0..self.cout {
                let src = &self.taps[(tap * self.cout + o) * self.cin..][..self.cin];
                let dst = &mut out[(o * taps + tap) * self.cin..][..self.cin];
                for (d, v) in dst.iter_mut().zip(src) {
                    *d = half::bf16::from_f32(*v);
                }
            }
        }
        out
    }

    /// Floating-point operations of one `h x w` output frame over `sources` sources of all
    /// `cin` channels (multiply and add apart), as [`Conv::forward`] runs it: 2x2 taps per
    /// output pixel when `up` and the conv has the parity form, else the kernel's.
    pub fn flops(&self, h: usize, w: usize, sources: usize, up: bool) -> f64 {
        let taps = if up && self.cpu_parity() {
            4
        } else {
            self.kh * self.kw
        };
        2.0 * (self.cout * self.cin * sources * taps) as f64 * (h * w) as f64
    }

    /// The bias, if the conv has one.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Bytes of weights held (the parity form's included).
    pub fn bytes(&self) -> usize {
        let n = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |b| b.len());
        4 * (self.taps.len() + n(&self.bias) + n(&self.parity))
    }

    /// Computes one output frame `[cout, h, w]` per job (a job is the list of its sources),
    /// all jobs and row tiles in parallel.
    pub fn forward(&self, jobs: &[Vec<Src>], h: usize, w: usize) -> Vec<Vec<f32>> {
        self.forward_from(jobs, &[], true, h, w)
    }

    /// [`Conv::forward`] where job `j` starts from the partial sum `init[j]` (`[cout, h, w]`,
    /// no bias; absent or `None`: zero) and the bias is added only when `bias`. Accumulating
    /// the taps over several calls this way rounds exactly as one call over all sources.
    pub fn forward_from(
        &self,
        jobs: &[Vec<Src>],
        init: &[Option<&[f32]>],
        bias: bool,
        h: usize,
        w: usize,
    ) -> Vec<Vec<f32>> {
        self.forward_with(jobs, init, bias, h, w, Path::Best)
    }

    /// [`Conv::forward_from`] on a chosen kernel path (the tests and the conv benchmark
    /// compare both).
    pub(crate) fn forward_with(
        &self,
        jobs: &[Vec<Src>],
        init: &[Option<&[f32]>],
        bias: bool,
        h: usize,
        w: usize,
        path: Path,
    ) -> Vec<Vec<f32>> {
        let hw = h * w;
        let mut outs: Vec<Vec<f32>> = jobs.iter().map(|_| vec![0.0; self.cout * hw]).collect();
        if hw == 0 {
            return outs;
        }
        // The sub-pixel path: every source upsampled, no partial sums, even sizes.
        let parity = self.cpu_parity()
            && jobs.iter().flatten().all(|s| s.up)
            && jobs.iter().any(|j| !j.is_empty())
            && init.iter().all(|i| i.is_none())
            && h % 2 == 0
            && w % 2 == 0;
        let taps = if parity { 4 } else { self.kh * self.kw };
        count_flops(
            jobs.iter()
                .flatten()
                .map(|s| 2.0 * (self.cout * s.c * taps * hw) as f64)
                .sum(),
        );
        // The grid the tiles cover: the input's in the parity form (each of its pixels gives
        // an output quad), else the output's.
        let (gh, gw) = if parity { (h / 2, w / 2) } else { (h, w) };
        let wp = gw + self.kw - 1;
        let threads = rayon::current_num_threads().max(1);
        // A parity tile has four accumulators of this many columns: four times the scratch of
        // a plain tile (a quarter of the columns padded the 64-column blocks more and re-read
        // the weights more often: the Wan VAE's 384 -> 192 upsample conv ran at 80 GFLOP/s
        // instead of 96).
        let mut rows = TILE_COLS.div_ceil(wp).clamp(1, gh);
        // Enough tiles to keep every thread busy on a single frame, when the frame allows it.
        let want = (2 * threads).div_ceil(jobs.len().max(1));
        if gh.div_ceil(rows) < want {
            rows = gh.div_ceil(want).max(1);
        }
        let tiles = gh.div_ceil(rows);
        let ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
        let len = self.cout * hw;
        let fast = path == Path::Best && crate::backend::cpu::simd::avx512();
        (0..jobs.len() * tiles).into_par_iter().for_each(|task| {
            let (j, tile) = (task / tiles, task % tiles);
            let r0 = tile * rows;
            let r1 = (r0 + rows).min(gh);
            // SAFETY: `ptrs[j]` points at `outs[j]` (cout*hw values, alive until after this
            // parallel loop); each task writes rows [r0, r1) of every channel of its own frame
            // (output rows [2 r0, 2 r1) in the parity form), disjoint from all other tasks.
            let out = ptrs[j];
            let init = init.get(j).copied().flatten();
            let t = Tile {
                srcs: &jobs[j],
                init,
                add_bias: bias,
                hw: (gh, gw),
                rows: (r0, r1),
                parity,
                out,
                len,
            };
            #[cfg(all(bc_avx512, target_arch = "x86_64"))]
            if fast {
                SCRATCH.with(|s| self.tile_avx512(&t, &mut s.borrow_mut()));
                return;
            }
            let _ = fast;
            self.tile(&t);
        });
        outs
    }

    /// Checks that a source can be read as `[c, H, W]` (or its half size when upsampled)
    /// and meets existing weights.
    ///
    /// # Panics
    /// When it cannot (a bug in the caller: the decoders build sources from validated shapes).
    fn check_src(&self, s: &Src, h: usize, w: usize) {
        let (sh, sw) = if s.up { (h / 2, w / 2) } else { (h, w) };
        assert!(
            s.t < self.kt && s.c0 + s.c <= self.cin && s.data.len() >= s.c * sh * sw,
            "conv: source does not fit the kernel or the frame"
        );
    }

    /// Copies rows `[r0 - ph, r1 + ph)` of every channel of `s` into `pad` (planes of `prow`
    /// rows of width `wp = w + 2 pw`, zero outside the frame and in the trailing `slack`),
    /// through the nearest 2x upsample when `s.up`. Returns the plane stride.
    #[allow(clippy::too_many_arguments)]
    fn fill_pad(
        &self,
        s: &Src,
        (h, w): (usize, usize),
        (r0, r1): (usize, usize),
        slack: usize,
        pad: &mut Vec<f32>,
    ) -> usize {
        let (ph, pw) = (self.kh / 2, self.kw / 2);
        let wp = w + 2 * pw;
        let prow = r1 - r0 + 2 * ph;
        let need = s.c * prow * wp + 2 * pw + slack;
        pad.clear();
        pad.resize(need, 0.0);
        let (sh, sw) = if s.up { (h / 2, w / 2) } else { (h, w) };
        for ci in 0..s.c {
            let plane = &s.data[ci * sh * sw..(ci + 1) * sh * sw];
            for pr in 0..prow {
                let y = r0 as isize + pr as isize - ph as isize;
                if y < 0 || y >= h as isize {
                    continue;
                }
                let dst = &mut pad[ci * prow * wp + pr * wp + pw..][..w];
                if s.up {
                    let srow = &plane[(y as usize / 2) * sw..][..sw];
                    for (x, d) in dst.iter_mut().enumerate() {
                        *d = srow[x / 2];
                    }
                } else {
                    dst.copy_from_slice(&plane[y as usize * w..][..w]);
                }
            }
        }
        prow * wp
    }

    /// Writes rows `[r0, r1)` of the accumulators (`cout` rows of stride `ldc`, image row `r`
    /// at column `r·wp`) plus the bias (when asked) to the tile's output. In the parity form
    /// there are four accumulators (parity `2 py + px` at `p·cout·ldc`), and grid pixel
    /// `(i, j)` of parity `(py, px)` is output pixel `(2i + py, 2j + px)`.
    fn write_back(&self, t: &Tile, acc: &[f32], ldc: usize, wp: usize) {
        let ((gh, gw), (r0, r1)) = (t.hw, t.rows);
        let (s, parities) = if t.parity { (2, 4) } else { (1, 1) };
        let (h, w) = (s * gh, s * gw);
        let hw = h * w;
        for o in 0..self.cout {
            let bias = match &self.bias {
                Some(b) if t.add_bias => b[o],
                _ => 0.0,
            };
            for r in r0..r1 {
                for y in s * r..s * (r + 1) {
                    let at = o * hw + y * w;
                    assert!(at + w <= t.len, "conv: output row out of bounds");
                    // SAFETY: `at + w <= cout*hw = len` (checked), and output rows
                    // [s r0, s r1) of this frame belong to this task only (see
                    // `forward_with`).
                    let dst = unsafe { std::slice::from_raw_parts_mut(t.out.0.add(at), w) };
                    if parities == 1 {
                        let src = &acc[o * ldc + (r - r0) * wp..][..w];
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = v + bias;
                        }
                        continue;
                    }
                    let py = y - 2 * r;
                    for px in 0..2 {
                        let p = 2 * py + px;
                        let src = &acc[(p * self.cout + o) * ldc + (r - r0) * wp..][..gw];
                        for (d, v) in dst[px..].iter_mut().step_by(2).zip(src) {
                            *d = v + bias;
                        }
                    }
                }
            }
        }
    }

    /// The (weight offset, input offset) of every tap of source `s` in the GEMMs of
    /// accumulator `p`: the kernel's taps, or in the parity form parity `p`'s four 2x2 taps
    /// (offsets into the parity weights). `kc` and `pl` are the input's channels and row
    /// length, `(dy, dx)` moving `dy·kc·pl + dx` values.
    fn parts(
        &self,
        s: &Src,
        parity: bool,
        p: usize,
        (kc, pl): (usize, usize),
    ) -> Vec<(usize, usize)> {
        let n = self.cout * self.cin;
        if parity {
            let (py, px) = (p / 2, p % 2);
            (0..4)
                .map(|tap| {
                    let (a, b) = (tap / 2, tap % 2);
                    ((p * 4 + tap) * n, (py + a) * kc * pl + px + b)
                })
                .collect()
        } else {
            (0..self.kh)
                .flat_map(|dy| (0..self.kw).map(move |dx| (dy, dx)))
                .map(|(dy, dx)| (((s.t * self.kh + dy) * self.kw + dx) * n, dy * kc * pl + dx))
                .collect()
        }
    }

    /// One row tile on the portable path: per source and kernel tap one `matrixmultiply`
    /// GEMM over the padded rows (in the parity form: per parity, four).
    fn tile(&self, t: &Tile) {
        let ((h, w), (r0, r1)) = (t.hw, t.rows);
        let (ph, pw) = (self.kh / 2, self.kw / 2);
        let wp = w + 2 * pw;
        let rows = r1 - r0;
        let n = rows * wp;
        let (parities, weights) = match &self.parity {
            Some(p) if t.parity => (4, p),
            _ => (1, &self.taps),
        };
        let mut acc = vec![0.0f32; parities * self.cout * n];
        let mut pad: Vec<f32> = Vec::new();
        if let Some(p) = t.init {
            for o in 0..self.cout {
                for r in 0..rows {
                    acc[o * n + r * wp..][..w].copy_from_slice(&p[(o * h + r0 + r) * w..][..w]);
                }
            }
        }
        for s in t.srcs {
            // The parity form reads the source at its own size.
            let s = &Src {
                up: s.up && !t.parity,
                ..*s
            };
            self.check_src(s, h, w);
            // The GEMM's B operand: rows = channels at stride `rsb`, columns contiguous.
            let (b, bo, rsb): (&[f32], usize, usize) = if ph == 0 && pw == 0 && !s.up {
                (s.data, r0 * w, h * w)
            } else {
                let rsb = self.fill_pad(s, t.hw, t.rows, 0, &mut pad);
                (&pad, 0, rsb)
            };
            for p in 0..parities {
                // Offsets in units of padded rows: `kc·pl` is one row here.
                for (wo, io) in self.parts(s, t.parity, p, (1, wp)) {
                    gemm(
                        (self.cout, s.c, n),
                        (weights, wo + s.c0, self.cin, 1),
                        (b, bo + io, rsb, 1),
                        // Onto the zeroed (or partial-sum) accumulators.
                        1.0,
                        (acc.as_mut_ptr(), acc.len(), p * self.cout * n, n, 1),
                    );
                }
            }
        }
        self.write_back(t, &acc, n, wp);
    }

    /// One row tile on the AVX-512 path: the register-tiled kernel of the linear layers
    /// ([`simd::axpy_rows`]) as an implicit GEMM. Per block of 64 output columns and six output
    /// channels, every kernel tap of every source accumulates in registers (`C += W_tap ·
    /// X_shifted`, the weights broadcast, the block's padded input rows packed once), so a
    /// value sees its taps in the same order as on the portable path and as across
    /// [`Conv::forward_from`] calls. Columns run in whole blocks of 64 (the padded buffer has
    /// the slack), the extra ones dropped with the border columns.
    ///
    /// [`simd::axpy_rows`]: crate::backend::cpu::simd::axpy_rows
    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
    fn tile_avx512(&self, t: &Tile, (pad, acc, bpack): &mut (Vec<f32>, Vec<f32>, Vec<f32>)) {
        use crate::backend::cpu::simd;
        /// Columns per register tile (4 vectors of 16) and output channels per tile.
        const CB: usize = 64;
        const RT: usize = 6;
        let ((h, w), (r0, r1)) = (t.hw, t.rows);
        let (ph, pw) = (self.kh / 2, self.kw / 2);
        let wp = w + 2 * pw;
        let n = (r1 - r0) * wp;
        let ldc = n.div_ceil(CB) * CB;
        let (cout, cin) = (self.cout, self.cin);
        let (parities, weights) = match &self.parity {
            Some(p) if t.parity => (4, p),
            _ => (1, &self.taps),
        };
        let alen = parities * cout * ldc;
        if acc.len() < alen {
            acc.resize(alen, 0.0);
        }
        let acc = &mut acc[..alen];
        let mut started = false;
        if let Some(p) = t.init {
            assert!(p.len() >= cout * h * w, "conv: partial sum too short");
            for o in 0..cout {
                for r in 0..r1 - r0 {
                    acc[o * ldc + r * wp..][..w].copy_from_slice(&p[(o * h + r0 + r) * w..][..w]);
                }
            }
            started = true;
        }
        for s in t.srcs {
            // The parity form reads the source at its own size.
            let s = &Src {
                up: s.up && !t.parity,
                ..*s
            };
            self.check_src(s, h, w);
            let (b, bo, rsb): (&[f32], usize, usize) = if ph == 0 && pw == 0 && !s.up && n == ldc {
                (s.data, r0 * w, h * w)
            } else {
                let rsb = self.fill_pad(s, t.hw, t.rows, ldc - n, pad);
                (&pad[..], 0, rsb)
            };
            // The farthest value read: last channel, last tap's shift, last column.
            let last = bo + (s.c - 1) * rsb + (self.kh - 1) * wp + (self.kw - 1) + ldc - 1;
            assert!(last < b.len(), "conv: input tile out of bounds");
            // Per block of CB columns, the kh rows of every channel it reads (CB + kw - 1
            // values each) are packed contiguously: the kernel then walks one dense buffer
            // instead of a channel stride of a whole padded plane (a new page per channel).
            let pl = CB + self.kw - 1;
            let kc = s.c;
            bpack.resize(self.kh * kc * pl, 0.0);
            let first_add = started;
            // Per accumulator, the taps of this source: (weight offset, packed-input offset).
            let parts: Vec<Vec<(usize, usize)>> = (0..parities)
                .map(|p| self.parts(s, t.parity, p, (kc, pl)))
                .collect();
            for cb in (0..ldc).step_by(CB) {
                for dy in 0..self.kh {
                    for ci in 0..kc {
                        let src = &b[bo + ci * rsb + dy * wp + cb..][..pl];
                        bpack[(dy * kc + ci) * pl..][..pl].copy_from_slice(src);
                    }
                }
                for (p, parts) in parts.iter().enumerate() {
                    for o in (0..cout).step_by(RT) {
                        let rn = RT.min(cout - o);
                        // SAFETY: AVX-512F was detected (`forward_with`); per tap, A reads
                        // rows o..o+rn, columns c0..c0+c of that tap's weights (check_src:
                        // c0 + c <= cin, t < kt; a parity tap is one of 16 cout x cin
                        // matrices); B reads rows dy*kc..(dy+1)*kc of `bpack` for a tap row
                        // dy < kh, columns dx..dx+CB < pl for dx < kw; C is rows o..o+rn,
                        // columns cb..cb+CB <= ldc of accumulator p (cout x ldc each).
                        unsafe {
                            simd::axpy_parts_rows::<{ CB / 16 }>(
                                rn,
                                (
                                    weights.as_ptr().add(o * cin + s.c0),
                                    cin,
                                    1,
                                    bpack.as_ptr(),
                                    pl,
                                    kc,
                                ),
                                parts,
                                acc.as_mut_ptr().add((p * cout + o) * ldc + cb),
                                ldc,
                                first_add,
                            );
                        }
                    }
                }
            }
            started = true;
        }
        if !started {
            acc.fill(0.0);
        }
        self.write_back(t, acc, ldc, wp);
    }
}

/// Which kernels a convolution runs on.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Path {
    /// The AVX-512 kernel where the CPU has it, else the portable one.
    Best,
    /// `matrixmultiply` whatever the CPU (the fallback, tested on every machine).
    Portable,
}

/// One row tile of one output frame: its sources, start, rows and output.
struct Tile<'a, 'b> {
    srcs: &'a [Src<'b>],
    init: Option<&'a [f32]>,
    add_bias: bool,
    /// The grid the tile's rows are in: the output frame's, or in the parity form the
    /// (upsampled) sources' own, each pixel an output quad.
    hw: (usize, usize),
    rows: (usize, usize),
    /// The sub-pixel form: sources read at their own size through the parity weights.
    parity: bool,
    out: SendPtr,
    len: usize,
}

#[cfg(all(bc_avx512, target_arch = "x86_64"))]
thread_local! {
    /// The AVX-512 path's padded input tile, accumulators and packed column block, per
    /// worker thread, reused from tile to tile.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Applies `f` to every element of every frame, in parallel.
pub(crate) fn map_inplace(frames: &mut [Vec<f32>], f: impl Fn(f32) -> f32 + Sync) {
    frames
        .par_iter_mut()
        .flat_map(|fr| fr.par_chunks_mut(1 << 14))
        .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

/// SiLU, `x * sigmoid(x)`.
#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Channel RMS norm as upstream `RMS_norm`: `x / max(||x||_2, 1e-12) * sqrt(C) * gamma`, the
/// norm taken over the channels of each pixel; then SiLU when `act`. Returns new frames.
pub(crate) fn rms_norm(frames: &[Vec<f32>], c: usize, gamma: &[f32], act: bool) -> Vec<Vec<f32>> {
    let scale = (c as f32).sqrt();
    // AVX-512: the same divisions and products, SiLU's e^x from the backend's kernel (about
    // 2 ulp from libm's).
    let fast = crate::backend::cpu::simd::avx512();
    let _ = fast;
    frames
        .iter()
        .map(|x| {
            let hw = x.len() / c.max(1);
            let mut out = vec![0.0f32; x.len()];
            let chunk = 1024usize;
            let optr = SendPtr(out.as_mut_ptr());
            (0..hw.div_ceil(chunk)).into_par_iter().for_each(|k| {
                let p0 = k * chunk;
                let p1 = (p0 + chunk).min(hw);
                let mut ss = vec![0.0f32; p1 - p0];
                for ch in 0..c {
                    for (s, v) in ss.iter_mut().zip(&x[ch * hw + p0..ch * hw + p1]) {
                        *s += v * v;
                    }
                }
                for s in ss.iter_mut() {
                    *s = s.sqrt().max(1e-12);
                }
                let o = optr;
                for (ch, &g) in gamma.iter().enumerate().take(c) {
                    // SAFETY: pixel range [p0, p1) of every channel belongs to this task only;
                    // `out` has c*hw values and outlives the parallel loop.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(o.0.add(ch * hw + p0), p1 - p0) };
                    let src = &x[ch * hw + p0..ch * hw + p1];
                    #[cfg(all(bc_avx512, target_arch = "x86_64"))]
                    if fast {
                        // SAFETY: AVX-512F detected; `src` and `ss` hold `dst.len()` values.
                        unsafe {
                            crate::backend::cpu::simd::norm_scale_silu(dst, src, &ss, scale, g, act)
                        };
                        continue;
                    }
                    for ((d, v), n) in dst.iter_mut().zip(src).zip(&ss) {
                        let y = v / n * scale * g;
                        *d = if act { silu(y) } else { y };
                    }
                }
            });
            out
        })
        .collect()
}

/// Nearest 2x upsample of one frame `[c, h, w]` to `[c, 2h, 2w]`.
pub(crate) fn upsample2x(x: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; c * 4 * h * w];
    out.par_chunks_mut(2 * w)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ch, y) = (row / (2 * h), row % (2 * h));
            let src = &x[(ch * h + y / 2) * w..][..w];
            for (xx, d) in dst.iter_mut().enumerate() {
                *d = src[xx / 2];
            }
        });
    out
}

/// Single-head softmax attention over the pixels of one frame, as upstream's `AttentionBlock`
/// core: `qkv` is `[3C, P]` (q, k, v stacked), the result `[C, P]` is
/// `softmax(q^T k / sqrt(C)) v^T` transposed back.
pub(crate) fn attention(qkv: &[f32], c: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; c * p];
    let scale = 1.0 / (c as f32).sqrt();
    count_flops(4.0 * (p * p * c) as f64);
    let rq = 128usize.min(p.max(1));
    let optr = SendPtr(out.as_mut_ptr());
    let olen = out.len();
    (0..p.div_ceil(rq)).into_par_iter().for_each(|k| {
        let q0 = k * rq;
        let m = rq.min(p - q0);
        let mut s = vec![0.0f32; m * p];
        // s[i, j] = sum_c q[c, q0+i] * k[c, j]
        gemm(
            (m, c, p),
            (qkv, q0, 1, p),
            (qkv, c * p, p, 1),
            0.0,
            (s.as_mut_ptr(), s.len(), 0, p, 1),
        );
        for row in s.chunks_mut(p) {
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * scale;
            let mut sum = 0.0f32;
            for v in row.iter_mut() {
                *v = (*v * scale - mx).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
        // out[c, q0+i] = sum_j s[i, j] * v[c, j]
        let o = optr;
        gemm(
            (m, p, c),
            (&s, 0, p, 1),
            (qkv, 2 * c * p, 1, p),
            0.0,
            (o.0, olen, q0, 1, p),
        );
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_conv2d(
        x: &[f32],
        cin: usize,
        h: usize,
        w: usize,
        wt: &[f32],
        cout: usize,
        k: usize,
    ) -> Vec<f32> {
        let p = k as isize / 2;
        let mut out = vec![0.0f32; cout * h * w];
        for o in 0..cout {
            for y in 0..h {
                for xx in 0..w {
                    let mut s = 0.0f64;
                    for i in 0..cin {
                        for dy in 0..k {
                            for dx in 0..k {
                                let yy = y as isize + dy as isize - p;
                                let xi = xx as isize + dx as isize - p;
                                if yy < 0 || xi < 0 || yy >= h as isize || xi >= w as isize {
                                    continue;
                                }
                                s += (wt[((o * cin + i) * k + dy) * k + dx]
                                    * x[(i * h + yy as usize) * w + xi as usize])
                                    as f64;
                            }
                        }
                    }
                    out[(o * h + y) * w + xx] = s as f32;
                }
            }
        }
        out
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.normal()).collect()
    }

    #[test]
    fn conv2d_matches_naive_including_upsampled_source() {
        // Widths that leave partial 64-column blocks, 1x1 convs read in place (16 x 4 = 64
        // columns) and through the padded copy, output channels beyond one 6-row tile.
        let shapes = [
            (3, 5, 7, 9, 3),
            (9, 7, 5, 40, 3),
            (4, 6, 5, 3, 1),
            (2, 3, 1, 1, 3),
            (5, 13, 4, 16, 1),
            (7, 8, 9, 70, 3),
        ];
        for &(cin, cout, h, w, k) in &shapes {
            let x = rand(cin * h * w, 1);
            let wt = rand(cout * cin * k * k, 2);
            let conv = Conv::from_torch(&wt, &[cout, cin, k, k], None);
            for path in [Path::Best, Path::Portable] {
                let job = vec![Src::new(&x, 0, cin)];
                let got = conv.forward_with(&[job], &[], true, h, w, path);
                let want = naive_conv2d(&x, cin, h, w, &wt, cout, k);
                for (a, b) in got[0].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{path:?}: {a} vs {b}");
                }
                let up = upsample2x(&x, cin, h, w);
                let want = naive_conv2d(&up, cin, 2 * h, 2 * w, &wt, cout, k);
                let mut s = Src::new(&x, 0, cin);
                s.up = true;
                // Read through the upsample, then in the sub-pixel form (3x3 only), which
                // does 4 of every 9 taps' FLOPs.
                let bias = rand(cout, 3);
                let par =
                    Conv::from_torch(&wt, &[cout, cin, k, k], Some(bias.clone())).with_parity();
                assert_eq!(par.has_parity(), k == 3);
                for (c, b0) in [(&conv, None), (&par, Some(&bias))] {
                    let f0 = conv_flops_done();
                    let got = c.forward_with(&[vec![s]], &[], true, 2 * h, 2 * w, path);
                    let dense = 2.0 * (cout * cin * k * k * 4 * h * w) as f64;
                    let taps = if c.cpu_parity() { 4.0 / 9.0 } else { 1.0 };
                    assert_eq!(conv_flops_done() - f0, dense * taps);
                    for (i, (a, b)) in got[0].iter().zip(&want).enumerate() {
                        let b = b + b0.map_or(0.0, |v: &Vec<f32>| v[i / (4 * h * w)]);
                        assert!(
                            (a - b).abs() < 1e-4,
                            "{path:?} {cin} {cout} {h} {w} {k} {}: {a} vs {b} at {i}",
                            c.has_parity()
                        );
                    }
                }
            }
        }
    }

    /// A 3-tap conv3d over two frames split as (first source, channel slice) sources, with a
    /// partial sum to start from and the bias, on both paths, against a naive sum; and the
    /// same taps accumulated over two calls give the one-call values bit for bit.
    #[test]
    fn sources_partial_sums_and_bias_on_both_paths() {
        let (cin, cout, h, w) = (6, 9, 5, 67);
        let wt = rand(cout * cin * 27, 5);
        let bias = rand(cout, 6);
        let conv = Conv::from_torch(&wt, &[cout, cin, 3, 3, 3], Some(bias.clone()));
        let f0 = rand(cin * h * w, 7);
        let f1 = rand(cin * h * w, 8);
        let init = rand(cout * h * w, 9);
        // f0 meets tap 0; f1's first 2 channels and its other 4 meet tap 2 as two sources.
        let mut lo = Src::new(&f1[..2 * h * w], 2, 2);
        lo.c0 = 0;
        let mut hi = Src::new(&f1[2 * h * w..], 2, 4);
        hi.c0 = 2;
        let job = vec![Src::new(&f0, 0, cin), lo, hi];
        let k2 = |t: usize| -> Vec<f32> {
            let mut v = vec![0.0; cout * cin * 9];
            for o in 0..cout * cin {
                v[o * 9..o * 9 + 9].copy_from_slice(&wt[(o * 3 + t) * 9..][..9]);
            }
            v
        };
        let a = naive_conv2d(&f0, cin, h, w, &k2(0), cout, 3);
        let b = naive_conv2d(&f1, cin, h, w, &k2(2), cout, 3);
        for path in [Path::Best, Path::Portable] {
            let got =
                conv.forward_with(std::slice::from_ref(&job), &[Some(&init)], true, h, w, path);
            for i in 0..cout * h * w {
                let e = init[i] + a[i] + b[i] + bias[i / (h * w)];
                assert!(
                    (got[0][i] - e).abs() < 1e-4,
                    "{path:?}: {} vs {e}",
                    got[0][i]
                );
            }
            let part = conv.forward_with(&[job[..1].to_vec()], &[], false, h, w, path);
            let rest = conv.forward_with(&[job[1..].to_vec()], &[Some(&part[0])], true, h, w, path);
            let whole = conv.forward_with(std::slice::from_ref(&job), &[], true, h, w, path);
            assert_eq!(rest, whole, "{path:?}");
        }
        // No source at all: the bias alone (or the partial sum).
        for path in [Path::Best, Path::Portable] {
            let got = conv.forward_with(&[vec![]], &[], true, h, w, path);
            assert!(got[0]
                .iter()
                .enumerate()
                .all(|(i, &v)| v == bias[i / (h * w)]));
            let got = conv.forward_with(&[vec![]], &[Some(&init)], false, h, w, path);
            assert_eq!(got[0], init);
        }
    }

    /// The norm (and SiLU) on whatever path this CPU takes, against the formula in f64:
    /// pixel counts that leave a partial 16-lane block, inputs of both signs and a zero pixel.
    #[test]
    fn rms_norm_and_silu_match_the_formula() {
        let (c, hw) = (5, 37);
        let mut x = rand(c * hw, 12);
        for ch in 0..c {
            x[ch * hw + 3] = 0.0;
        }
        let gamma = rand(c, 13);
        for act in [false, true] {
            let got = rms_norm(std::slice::from_ref(&x), c, &gamma, act);
            for p in 0..hw {
                let n = (0..c)
                    .map(|ch| (x[ch * hw + p] as f64).powi(2))
                    .sum::<f64>();
                let n = n.sqrt().max(1e-12);
                for ch in 0..c {
                    let y = x[ch * hw + p] as f64 / n * (c as f64).sqrt() * gamma[ch] as f64;
                    let want = if act { y / (1.0 + (-y).exp()) } else { y };
                    let v = got[0][ch * hw + p] as f64;
                    assert!(
                        (v - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{v} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_rows_sum_to_one() {
        // v = 1 everywhere: every output is exactly the softmax row sum.
        let (c, p) = (4, 300);
        let mut qkv = rand(3 * c * p, 3);
        qkv[2 * c * p..].iter_mut().for_each(|v| *v = 1.0);
        let out = attention(&qkv, c, p);
        assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-5));
    }
}
