//! One constructor per kernel for its params struct, grid and block size.
//!
//! Both launchers build their launches here: the device launchers of the CUDA backend
//! (`backend::cuda::ops`, on device addresses) and the emulated wrappers of [`super::emu`]
//! (on host slices, after checking their lengths). A function takes raw pointers and sizes
//! as `usize`, converts the sizes to the `int` fields of `params.h` with overflow checks (an
//! overflow is an [`LaunchErrorKind::InvalidArgument`] error) and picks the grid and block the
//! kernel's doc comment in `params.h` prescribes. Nothing is read or written through the
//! pointers: their validity is the launcher's business.
//!
//! [`LaunchErrorKind::InvalidArgument`]: super::LaunchErrorKind::InvalidArgument
#![allow(clippy::too_many_arguments)]

use super::params::*;
use super::{invalid, Kernel, LaunchResult};
use std::ffi::c_void;

/// A kernel launch: the kernel, its grid and block size (`[block, 1, 1]`) and params struct.
#[derive(Clone, Copy, Debug)]
pub struct Launch<P> {
    /// The kernel.
    pub kernel: Kernel,
    /// Blocks per grid (x, y, z).
    pub grid: [u32; 3],
    /// Threads per block (x).
    pub block: u32,
    /// The params struct the kernel takes.
    pub params: P,
}

/// `v` as an `int` field of a params struct; `what` names it in the error.
pub(super) fn i32_of(kernel: Kernel, v: usize, what: &str) -> LaunchResult<i32> {
    i32::try_from(v).map_err(|_| invalid(kernel, format!("{what} = {v} does not fit in i32")))
}

/// Blocks of `per` threads covering `n` items.
fn blocks(kernel: Kernel, n: usize, per: u32) -> LaunchResult<u32> {
    u32::try_from(n.div_ceil(per as usize)).map_err(|_| invalid(kernel, "grid too large"))
}

/// `a * b`, or an error on overflow.
fn mul(kernel: Kernel, a: usize, b: usize) -> LaunchResult<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(kernel, format!("{a} * {b} overflows")))
}

/// One block per row (a checked `i32` row count is a valid `u32` grid size).
fn row_grid(rows: i32) -> [u32; 3] {
    [rows as u32, 1, 1]
}

/// `bc_ln_modulate` (the math: `cuda/norm.cu`): `x` f32 and `out` bf16 `[rows, dim]`, `shift`/`scale` `[frames, frame_stride]`, biases
/// `[dim]` or null. Grid (rows), block `BC_ROW_THREADS`.
pub fn ln_modulate(
    x: *const f32,
    out: *mut bc_bf16,
    rows: usize,
    dim: usize,
    eps: f32,
    tokens_per_frame: usize,
    shift: *const f32,
    scale: *const f32,
    frame_stride: usize,
    shift_bias: *const f32,
    scale_bias: *const f32,
) -> LaunchResult<Launch<BcLnModulateParams>> {
    let k = Kernel::LnModulate;
    let (rows, dim) = (i32_of(k, rows, "rows")?, i32_of(k, dim, "dim")?);
    Ok(Launch {
        kernel: k,
        grid: row_grid(rows),
        block: BC_ROW_THREADS,
        params: BcLnModulateParams {
            x,
            out,
            shift,
            scale,
            shift_bias,
            scale_bias,
            rows,
            dim,
            x_stride: dim,
            out_stride: dim,
            frame_stride: i32_of(k, frame_stride, "frame_stride")?,
            tokens_per_frame: i32_of(k, tokens_per_frame, "tokens_per_frame")?,
            eps,
            _pad: 0,
        },
    })
}

/// `bc_layer_norm_affine` (`cuda/norm.cu`): `x` f32 and `out` bf16
/// `[rows, dim]`. Grid (rows), block `BC_ROW_THREADS`.
pub fn layer_norm_affine(
    x: *const f32,
    out: *mut bc_bf16,
    rows: usize,
    dim: usize,
    eps: f32,
    weight: *const f32,
    bias: *const f32,
) -> LaunchResult<Launch<BcLayerNormParams>> {
    let k = Kernel::LayerNormAffine;
    let (rows, dim) = (i32_of(k, rows, "rows")?, i32_of(k, dim, "dim")?);
    Ok(Launch {
        kernel: k,
        grid: row_grid(rows),
        block: BC_ROW_THREADS,
        params: BcLayerNormParams {
            x,
            out,
            weight,
            bias,
            rows,
            dim,
            x_stride: dim,
            out_stride: dim,
            eps,
            _pad: 0,
        },
    })
}

/// `bc_gated_residual` (`cuda/norm.cu`; `gate` null: no gate): `x` f32 and `delta` bf16 `[rows, dim]`. Grid (ceil(rows*dim/2 / `BC_ELEM_THREADS`)).
pub fn gated_residual(
    x: *mut f32,
    delta: *const bc_bf16,
    rows: usize,
    dim: usize,
    tokens_per_frame: usize,
    gate: *const f32,
    frame_stride: usize,
    gate_bias: *const f32,
) -> LaunchResult<Launch<BcGatedResidualParams>> {
    let k = Kernel::GatedResidual;
    let n = mul(k, rows, dim)?;
    let dim32 = i32_of(k, dim, "dim")?;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, n / 2, BC_ELEM_THREADS)?, 1, 1],
        block: BC_ELEM_THREADS,
        params: BcGatedResidualParams {
            x,
            delta,
            gate,
            gate_bias,
            rows: i32_of(k, rows, "rows")?,
            dim: dim32,
            delta_stride: dim32,
            frame_stride: i32_of(k, frame_stride, "frame_stride")?,
            tokens_per_frame: i32_of(k, tokens_per_frame, "tokens_per_frame")?,
            _pad: 0,
        },
    })
}

/// `bc_residual_norm` (`cuda/norm.cu`): the gated residual of [`gated_residual`] (`gate` null:
/// none; `gate_stride` its frame stride), then the LayerNorm of the updated rows into `out`
/// (bf16 `[rows, dim]`), modulated like [`ln_modulate`] (`shift`/`scale` of frame stride
/// `mod_stride`, biases or null) or, with `affine`, `LN * scale + shift`. `dim` at most
/// `BC_RESNORM_MAX_DIM`. Grid (rows), block `BC_ROW_THREADS`.
pub fn residual_norm(
    x: *mut f32,
    delta: *const bc_bf16,
    out: *mut bc_bf16,
    rows: usize,
    dim: usize,
    eps: f32,
    tokens_per_frame: usize,
    gate: *const f32,
    gate_stride: usize,
    gate_bias: *const f32,
    shift: *const f32,
    scale: *const f32,
    mod_stride: usize,
    shift_bias: *const f32,
    scale_bias: *const f32,
    affine: bool,
) -> LaunchResult<Launch<BcResidualNormParams>> {
    let k = Kernel::ResidualNorm;
    if dim > BC_RESNORM_MAX_DIM as usize {
        return Err(invalid(
            k,
            format!("dim = {dim} exceeds BC_RESNORM_MAX_DIM = {BC_RESNORM_MAX_DIM}"),
        ));
    }
    let (rows, dim) = (i32_of(k, rows, "rows")?, i32_of(k, dim, "dim")?);
    Ok(Launch {
        kernel: k,
        grid: row_grid(rows),
        block: BC_ROW_THREADS,
        params: BcResidualNormParams {
            x,
            delta,
            gate,
            gate_bias,
            out,
            shift,
            scale,
            shift_bias,
            scale_bias,
            rows,
            dim,
            delta_stride: dim,
            out_stride: dim,
            gate_stride: i32_of(k, gate_stride, "gate_stride")?,
            mod_stride: i32_of(k, mod_stride, "mod_stride")?,
            tokens_per_frame: i32_of(k, tokens_per_frame, "tokens_per_frame")?,
            affine: affine as i32,
            eps,
            _pad: 0,
        },
    })
}

/// `bc_qk_norm_rope` (`cuda/qk_norm_rope.cu`): optional RMSNorm (`norm_weight` null: none), optional RoPE, store into
/// `out` rows of `heads*head_dim` (contiguous, or cache slots with `frame_slot`); `x` rows of
/// stride `x_stride`. Grid (rows), block `BC_ROW_THREADS`, RoPE theta 10000.
pub fn qk_norm_rope(
    x: *const bc_bf16,
    x_stride: usize,
    out: *mut bc_bf16,
    rows: usize,
    heads: usize,
    head_dim: usize,
    tokens_per_frame: usize,
    wp: usize,
    norm_weight: *const f32,
    frame_pos: *const i32,
    frame_slot: *const i32,
    first_frame: i32,
    rope: bool,
    eps: f32,
) -> LaunchResult<Launch<BcQkNormRopeParams>> {
    let k = Kernel::QkNormRope;
    let rows = i32_of(k, rows, "rows")?;
    Ok(Launch {
        kernel: k,
        grid: row_grid(rows),
        block: BC_ROW_THREADS,
        params: BcQkNormRopeParams {
            x,
            out,
            norm_weight,
            frame_pos,
            frame_slot,
            rows,
            heads: i32_of(k, heads, "heads")?,
            head_dim: i32_of(k, head_dim, "head_dim")?,
            x_stride: i32_of(k, x_stride, "x_stride")?,
            out_stride: i32_of(k, mul(k, heads, head_dim)?, "dim")?,
            tokens_per_frame: i32_of(k, tokens_per_frame, "tokens_per_frame")?,
            wp: i32_of(k, wp, "wp")?,
            first_frame,
            rope: rope as i32,
            _pad: 0,
            eps,
            theta: 10000.0,
        },
    })
}

/// Query rows per block of the attention kernel (two tile shapes of the same kernel source,
/// `cuda/attention.cu`; the CUDA backend times both on each window shape's list and keeps the
/// faster).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionTile {
    /// 64 query rows per block, 2 warps of 32 rows (`bc_attention_hd64`,
    /// `bc_attention_hd128`).
    Rows64,
    /// 128 query rows per block, 4 warps of 32 rows (`bc_attention_hd64_q128`,
    /// `bc_attention_hd128_q128`): half the K/V traffic per FLOP. Same key tiles and per-warp
    /// work as [`AttentionTile::Rows64`], so the same output bits.
    Rows128,
    /// The Hopper prototype (sm_90a only; not in [`AttentionTile::ALL`], so never timed or
    /// picked by the tuner): `bc_attention_wgmma_hd64` (one warpgroup of 64 query rows) /
    /// `bc_attention_wgmma_hd128` (two warpgroups, 128 rows), Q K^T and P V by wgmma. The CUDA
    /// backend uses a wgmma tile by default on a compute capability 9.0 device
    /// ([`AttentionTile::WgmmaPpK128`] unless `BC_ATTN_WGMMA_VARIANT` says otherwise).
    Wgmma64,
    /// [`AttentionTile::Wgmma64`] with 128-key tiles for head_dim > 64
    /// (`bc_attention_wgmma_hd128_k128`; hd64 runs `bc_attention_wgmma_hd64`).
    /// `BC_ATTN_WGMMA_VARIANT=k128`.
    WgmmaK128,
    /// [`AttentionTile::Wgmma64`] with ping-pong scheduling for head_dim > 64: its two
    /// warpgroups take turns issuing their wgmma (`bc_attention_wgmma_hd128_pp`).
    /// `BC_ATTN_WGMMA_VARIANT=pp`.
    WgmmaPp,
    /// Ping-pong and 128-key tiles (`bc_attention_wgmma_hd128_pp_k128`).
    /// `BC_ATTN_WGMMA_VARIANT=pp_k128`.
    WgmmaPpK128,
    /// Warp-specialized (`bc_attention_wgmma_hd128_ws`, `cuda/attention_ws.cu`): a producer
    /// warpgroup does every K/V copy and signals the two consumer warpgroups through mbarriers;
    /// their math is `pp_k128`'s, so the same output bits. 384 threads for head_dim > 64 (hd64
    /// runs `bc_attention_wgmma_hd64`). Opt-in: `BC_ATTN_WGMMA_VARIANT=ws`.
    WgmmaWs,
    /// [`AttentionTile::WgmmaWs`] with a deeper producer pipeline
    /// (`bc_attention_wgmma_hd128_ws_deep`): tiles after the first are handed to their mbarrier
    /// by `cp.async.mbarrier.arrive.noinc` (up to 3 tiles in flight, no `cp.async.wait_group`),
    /// the consumers fence the async proxy after each wait; the same math, so the same output
    /// bits as `pp_k128`. Opt-in: `BC_ATTN_WGMMA_VARIANT=ws_deep`.
    WgmmaWsDeep,
}

impl AttentionTile {
    /// How many variants there are (sizes per-variant tables; `WgmmaWsDeep` is the last).
    pub const COUNT: usize = AttentionTile::WgmmaWsDeep as usize + 1;

    /// Both tiles.
    pub const ALL: [AttentionTile; 2] = [AttentionTile::Rows64, AttentionTile::Rows128];

    /// The Hopper wgmma tiles (never timed or picked by the tuner): the prototype and its
    /// variants, which differ only for head_dim > 64.
    pub const WGMMA: [AttentionTile; 6] = [
        AttentionTile::Wgmma64,
        AttentionTile::WgmmaK128,
        AttentionTile::WgmmaPp,
        AttentionTile::WgmmaPpK128,
        AttentionTile::WgmmaWs,
        AttentionTile::WgmmaWsDeep,
    ];

    /// Whether this is one of [`Self::WGMMA`] (sm_90a only; not bit-identical to the others).
    pub fn is_wgmma(self) -> bool {
        Self::WGMMA.contains(&self)
    }

    /// The wgmma tile `BC_ATTN_WGMMA_VARIANT` names (unset or empty: the prototype
    /// [`AttentionTile::Wgmma64`]; `k128`, `pp`, `pp_k128`, `ws`, `ws_deep`: its variants); an
    /// error for anything else.
    pub fn wgmma_variant(v: Option<&str>) -> std::result::Result<AttentionTile, String> {
        match v.map(str::trim).unwrap_or("") {
            "" | "base" => Ok(AttentionTile::Wgmma64),
            "k128" => Ok(AttentionTile::WgmmaK128),
            "pp" => Ok(AttentionTile::WgmmaPp),
            "pp_k128" => Ok(AttentionTile::WgmmaPpK128),
            "ws" => Ok(AttentionTile::WgmmaWs),
            "ws_deep" => Ok(AttentionTile::WgmmaWsDeep),
            other => Err(format!(
                "BC_ATTN_WGMMA_VARIANT={other}: expected {}",
                Self::WGMMA_VARIANT_NAMES
            )),
        }
    }

    /// The names [`AttentionTile::wgmma_variant`] takes, for error messages.
    pub const WGMMA_VARIANT_NAMES: &'static str = "base, k128, pp, pp_k128, ws or ws_deep";

    /// The kernel for `head_dim` (at most 64: the hd64 kernels, else the hd128 ones).
    pub fn kernel(self, head_dim: usize) -> Kernel {
        match (self, head_dim <= 64) {
            (
                AttentionTile::Wgmma64
                | AttentionTile::WgmmaK128
                | AttentionTile::WgmmaPp
                | AttentionTile::WgmmaPpK128
                | AttentionTile::WgmmaWs
                | AttentionTile::WgmmaWsDeep,
                true,
            ) => Kernel::AttentionWgmmaHd64,
            (AttentionTile::Wgmma64, false) => Kernel::AttentionWgmmaHd128,
            (AttentionTile::WgmmaK128, false) => Kernel::AttentionWgmmaHd128K128,
            (AttentionTile::WgmmaPp, false) => Kernel::AttentionWgmmaHd128Pp,
            (AttentionTile::WgmmaPpK128, false) => Kernel::AttentionWgmmaHd128PpK128,
            (AttentionTile::WgmmaWs, false) => Kernel::AttentionWgmmaHd128Ws,
            (AttentionTile::WgmmaWsDeep, false) => Kernel::AttentionWgmmaHd128WsDeep,
            (AttentionTile::Rows64, true) => Kernel::AttentionHd64,
            (AttentionTile::Rows64, false) => Kernel::AttentionHd128,
            (AttentionTile::Rows128, true) => Kernel::AttentionHd64Q128,
            (AttentionTile::Rows128, false) => Kernel::AttentionHd128Q128,
        }
    }

    /// Query rows per block of the kernel for `head_dim` (the wgmma tile's hd128 kernel has
    /// two warpgroups: 128).
    pub fn rows(self, head_dim: usize) -> u32 {
        match self {
            AttentionTile::Rows64 => BC_ATTN_BQ,
            AttentionTile::Rows128 => BC_ATTN_WIDE_BQ,
            _ if head_dim <= 64 => BC_ATTN_WGMMA_BQ,
            _ => BC_ATTN_WGMMA_HD128_BQ,
        }
    }

    /// Whether the tile's kernels implement split-KV (`BcAttentionParams::splits` > 1 and
    /// their partial store). A kernel that ignored `splits` would run every split over all keys
    /// into the same rows, so a new variant must be added here deliberately (no wildcard).
    pub fn supports_split(self) -> bool {
        match self {
            AttentionTile::Rows64
            | AttentionTile::Rows128
            | AttentionTile::Wgmma64
            | AttentionTile::WgmmaK128
            | AttentionTile::WgmmaPp
            | AttentionTile::WgmmaPpK128
            // (its producer walks the split's key tiles, its consumers store pp_k128's partials)
            | AttentionTile::WgmmaWs
            // (ws's split code, only the producer's hand-over differs)
            | AttentionTile::WgmmaWsDeep => true,
        }
    }

    /// Keys per K/V tile of the kernel for `head_dim` (what a block walks per step; a split
    /// launch divides a group's keys in tiles of this size).
    pub fn key_tile(self, head_dim: usize) -> u32 {
        match (self, head_dim <= 64) {
            (AttentionTile::Rows64 | AttentionTile::Rows128, false) => BC_ATTN_HD128_BK,
            (
                AttentionTile::WgmmaK128
                | AttentionTile::WgmmaPpK128
                | AttentionTile::WgmmaWs
                | AttentionTile::WgmmaWsDeep,
                false,
            ) => BC_ATTN_WGMMA_K128_BK,
            _ => BC_ATTN_HD64_BK,
        }
    }

    /// Threads per block of the kernel for `head_dim`.
    pub fn threads(self, head_dim: usize) -> u32 {
        match self {
            AttentionTile::Rows64 => BC_ATTN_THREADS,
            AttentionTile::Rows128 => BC_ATTN_WIDE_THREADS,
            _ if head_dim <= 64 => BC_ATTN_WGMMA_THREADS,
            AttentionTile::WgmmaWs | AttentionTile::WgmmaWsDeep => BC_ATTN_WS_THREADS,
            _ => BC_ATTN_WGMMA_HD128_THREADS,
        }
    }

    /// Short name (`rows64`, `rows128`, as `BC_ATTENTION_TILE` takes them; `wgmma64`).
    pub fn name(self) -> &'static str {
        match self {
            AttentionTile::Rows64 => "rows64",
            AttentionTile::Rows128 => "rows128",
            AttentionTile::Wgmma64 => "wgmma64",
            AttentionTile::WgmmaK128 => "wgmma64_k128",
            AttentionTile::WgmmaPp => "wgmma64_pp",
            AttentionTile::WgmmaPpK128 => "wgmma64_pp_k128",
            AttentionTile::WgmmaWs => "wgmma64_ws",
            AttentionTile::WgmmaWsDeep => "wgmma64_ws_deep",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(s: &str) -> Option<AttentionTile> {
        Self::ALL.into_iter().find(|t| t.name() == s.trim())
    }
}

/// The split-KV part of an attention launch ([`attention`]): `splits` blocks share each (row
/// tile, head, group), each over its own range of the group's key tiles, writing partial results
/// to `partial` ([`attention_split_bytes`] bytes, 16-byte aligned) that [`attention_combine`]
/// merges into the output. `splits` 1: no split (the output is written directly, `partial`
/// unused; the same bits as before split-KV existed).
#[derive(Clone, Copy, Debug)]
pub struct AttnSplit {
    /// Key splits S (>= 1).
    pub splits: usize,
    /// The partial results (S > 1).
    pub partial: *mut f32,
}

impl AttnSplit {
    /// No split.
    pub const NONE: AttnSplit = AttnSplit {
        splits: 1,
        partial: std::ptr::null_mut(),
    };
}

/// Most key splits of one attention launch (the launcher clamps to it).
pub const ATTN_MAX_SPLITS: usize = 8;

/// Bytes of the partial results of an attention launch with `splits` key splits (0 for one):
/// per block of the split grid (row tiles x splits, heads, groups) `BQ x (head_dim + 2)` f32.
/// `None` on overflow.
pub fn attention_split_bytes(
    heads: usize,
    head_dim: usize,
    num_groups: usize,
    max_rows: usize,
    tile: AttentionTile,
    splits: usize,
) -> Option<usize> {
    if splits <= 1 {
        return Some(0);
    }
    let bq = tile.rows(head_dim) as usize;
    max_rows
        .div_ceil(bq)
        .checked_mul(heads)?
        .checked_mul(num_groups)?
        .checked_mul(splits)?
        .checked_mul(bq)?
        .checked_mul(head_dim.checked_add(2)?)?
        .checked_mul(4)
}

/// The wave-fill model that picks an attention launch's key splits ([`attention_splits`]).
/// A block of the unsplit launch (a row tile of one head and group) walks `key_tiles` key tiles;
/// the device runs `slots` blocks at once (SMs x blocks per SM), so `items` blocks take
/// `ceil(items / slots)` waves and the last one may leave SMs idle. With S splits there are S
/// times the blocks, each over ~1/S of the tiles, plus the combine's traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitModel {
    /// Blocks of the unsplit launch: row tiles x heads x groups.
    pub items: usize,
    /// Blocks resident at once: SMs x blocks per SM (the kernel's occupancy).
    pub slots: usize,
    /// Key tiles of the heaviest group's walk (keys / BK, rounded up per segment).
    pub key_tiles: usize,
    /// Bytes of one block's partial O (BQ x head_dim x 4).
    pub partial_bytes: usize,
    /// Microseconds one block takes per key tile (H200, `bc_attention_wgmma_hd128_pp_k128`:
    /// 4 x 128 x 128 x 128 FLOP at 460 / 0.84 TFLOP/s over 132 SMs = 2.02).
    pub tile_us: f64,
}

/// Fixed cost of a block in key tiles (Q load, the pipeline's fill and drain, the store), an
/// estimate: what a split adds per extra block.
pub const SPLIT_PROLOGUE_TILES: f64 = 1.0;
/// Device memory bandwidth the combine's traffic is charged at, bytes per microsecond (~3 TB/s).
pub const SPLIT_BYTES_PER_US: f64 = 3.0e6;
/// Fixed cost of the combine launch in microseconds (launch gap, a short kernel's tail).
pub const SPLIT_COMBINE_US: f64 = 3.0;

impl SplitModel {
    /// Predicted microseconds of the launch with `s` splits: waves x the time of one block
    /// (its share of the key tiles plus the prologue), and for s > 1 the partials written and
    /// read back (2 x items x s x partial_bytes) and the combine's launch.
    pub fn predict_us(&self, s: usize) -> f64 {
        let s = s.max(1);
        let slots = self.slots.max(1);
        let blocks = self.items * s;
        let waves = blocks.div_ceil(slots) as f64;
        let per_block = self.key_tiles.div_ceil(s) as f64 + SPLIT_PROLOGUE_TILES;
        let mut t = waves * per_block * self.tile_us;
        if s > 1 {
            t += 2.0 * (blocks * self.partial_bytes) as f64 / SPLIT_BYTES_PER_US + SPLIT_COMBINE_US;
        }
        t
    }

    /// Wave fill of the launch with `s` splits: blocks / (waves x slots).
    pub fn fill(&self, s: usize) -> f64 {
        let blocks = self.items * s.max(1);
        let slots = self.slots.max(1);
        blocks as f64 / (blocks.div_ceil(slots) * slots) as f64
    }
}

/// The key splits the model predicts fastest, 1..=[`ATTN_MAX_SPLITS`] (never more than the key
/// tiles): the smallest S of the lowest [`SplitModel::predict_us`], and 1 unless that beats one
/// split by more than 3% (the model's constants are estimates; a full last wave stays unsplit).
pub fn attention_splits(m: &SplitModel) -> usize {
    if m.items == 0 || m.key_tiles < 2 {
        return 1;
    }
    let one = m.predict_us(1);
    let (mut best, mut best_t) = (1, one);
    for s in 2..=ATTN_MAX_SPLITS.min(m.key_tiles) {
        let t = m.predict_us(s);
        if t < best_t {
            (best, best_t) = (s, t);
        }
    }
    if best_t < one * 0.97 {
        best
    } else {
        1
    }
}

/// The attention kernel (`cuda/attention.cu`) of `tile` for `head_dim` (`bc_attention_hd64*` for `head_dim <= 64`,
/// else `bc_attention_hd128*`): `q` and `out` rows of `heads*head_dim`, tables `segments` /
/// `seg_index` / `groups` (`num_groups` entries), `max_rows` the largest group, scale
/// `1/sqrt(head_dim)`. Grid (ceil(max_rows / `tile.rows(head_dim)`) x `split.splits`, heads,
/// num_groups), block `tile.threads(head_dim)` (and the kernel's
/// [`Kernel::dynamic_smem_bytes`]). With `split.splits` > 1, [`attention_combine`] must follow.
pub fn attention(
    q: *const bc_bf16,
    out: *mut bc_bf16,
    heads: usize,
    head_dim: usize,
    segments: *const BcKvSegment,
    seg_index: *const i32,
    groups: *const BcAttnGroup,
    num_groups: usize,
    max_rows: usize,
    tile: AttentionTile,
    split: AttnSplit,
) -> LaunchResult<Launch<BcAttentionParams>> {
    let k = tile.kernel(head_dim);
    let dim = i32_of(k, mul(k, heads, head_dim)?, "dim")?;
    if split.splits == 0 || split.splits > ATTN_MAX_SPLITS {
        return Err(invalid(k, format!("{} key splits", split.splits)));
    }
    if split.splits > 1 && (split.partial.is_null() || split.partial as usize % 16 != 0) {
        return Err(invalid(
            k,
            "split attention without an aligned partial buffer",
        ));
    }
    if split.splits > 1 && !tile.supports_split() {
        return Err(invalid(k, "this kernel does not implement split-KV"));
    }
    let (heads, num_groups) = (i32_of(k, heads, "heads")?, i32_of(k, num_groups, "groups")?);
    let tiles = blocks(k, max_rows, tile.rows(head_dim))?;
    Ok(Launch {
        kernel: k,
        grid: [
            tiles
                .checked_mul(split.splits as u32)
                .ok_or_else(|| invalid(k, "grid too large"))?,
            heads as u32,
            num_groups as u32,
        ],
        block: tile.threads(head_dim),
        params: BcAttentionParams {
            q,
            out,
            segments,
            seg_index,
            groups,
            num_groups,
            heads,
            head_dim: i32_of(k, head_dim, "head_dim")?,
            q_stride: dim,
            kv_stride: dim,
            out_stride: dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            splits: split.splits as i32,
            partial: split.partial,
        },
    })
}

/// `bc_attention_combine` (`cuda/attention.cu`) after a split [`attention`] launch with the same
/// `heads`, `head_dim`, `groups`, `max_rows`, `tile` and `split` (`split.splits` >= 2): merges
/// the partial results into `out` (rows of `heads*head_dim`). Grid (ceil(max_rows / BQ), heads,
/// num_groups), block `BC_ATTN_COMBINE_THREADS`.
pub fn attention_combine(
    out: *mut bc_bf16,
    heads: usize,
    head_dim: usize,
    groups: *const BcAttnGroup,
    num_groups: usize,
    max_rows: usize,
    tile: AttentionTile,
    split: AttnSplit,
) -> LaunchResult<Launch<BcAttnCombineParams>> {
    let k = Kernel::AttentionCombine;
    if split.splits < 2 || split.splits > ATTN_MAX_SPLITS || split.partial.is_null() {
        return Err(invalid(k, format!("{} key splits", split.splits)));
    }
    if head_dim == 0 || head_dim % 8 != 0 {
        return Err(invalid(k, format!("head_dim {head_dim}")));
    }
    let dim = i32_of(k, mul(k, heads, head_dim)?, "dim")?;
    let (h, g) = (i32_of(k, heads, "heads")?, i32_of(k, num_groups, "groups")?);
    Ok(Launch {
        kernel: k,
        grid: [
            blocks(k, max_rows, tile.rows(head_dim))?,
            h as u32,
            g as u32,
        ],
        block: BC_ATTN_COMBINE_THREADS,
        params: BcAttnCombineParams {
            partial: split.partial,
            out,
            groups,
            heads: h,
            head_dim: i32_of(k, head_dim, "head_dim")?,
            out_stride: dim,
            splits: split.splits as i32,
            rows: tile.rows(head_dim) as i32,
            _pad: 0,
        },
    })
}

/// `bc_activation` (`cuda/elementwise.cu`) over `n` values, bf16 or f32
/// (`op`: `BC_ACT_*`; `bias` null: none; `cols` 0 counts as 1). Grid
/// (ceil(n / `BC_ELEM_THREADS`)), block `BC_ELEM_THREADS`.
pub fn activation(
    x: *const c_void,
    out: *mut c_void,
    n: usize,
    op: u32,
    bf16: bool,
    bias: *const f32,
    cols: usize,
) -> LaunchResult<Launch<BcActivationParams>> {
    let k = Kernel::Activation;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, n, BC_ELEM_THREADS)?, 1, 1],
        block: BC_ELEM_THREADS,
        params: BcActivationParams {
            x,
            out,
            n: i64::try_from(n).map_err(|_| invalid(k, format!("n = {n} does not fit in i64")))?,
            op: i32::try_from(op).map_err(|_| invalid(k, format!("bad op {op}")))?,
            bf16: bf16 as i32,
            bias,
            cols: i32_of(k, cols.max(1), "cols")?,
            _pad: 0,
        },
    })
}

/// `bc_activation` as a conversion (`BC_ACT_F32_TO_BF16`, `BC_ACT_NONE`, no bias): `n` f32
/// values `x` to bf16 `out` (round to nearest even). Grid (ceil(n / BC_ELEM_THREADS)), block
/// `BC_ELEM_THREADS`.
pub fn f32_to_bf16(
    x: *const f32,
    out: *mut c_void,
    n: usize,
) -> LaunchResult<Launch<BcActivationParams>> {
    let mut l = activation(
        x as *const c_void,
        out,
        n,
        BC_ACT_NONE,
        false,
        std::ptr::null(),
        1,
    )?;
    l.params.bf16 = BC_ACT_F32_TO_BF16 as i32;
    Ok(l)
}

/// `bc_time_embedding` (`cuda/elementwise.cu`) of `frames` timesteps `t` (f32) into `out`
/// `[frames, freq_dim]`. Grid (frames), block `BC_ELEM_THREADS`.
pub fn time_embedding(
    t: *const f32,
    out: *mut f32,
    frames: usize,
    freq_dim: usize,
) -> LaunchResult<Launch<BcTimeEmbeddingParams>> {
    let k = Kernel::TimeEmbedding;
    let frames = i32_of(k, frames, "frames")?;
    Ok(Launch {
        kernel: k,
        grid: row_grid(frames),
        block: BC_ELEM_THREADS,
        params: BcTimeEmbeddingParams {
            t,
            out,
            frames,
            freq_dim: i32_of(k, freq_dim, "freq_dim")?,
        },
    })
}

/// `bc_patchify` (`cuda/patch.cu`; `patchify`: f32 latents `[frames, ch, h, w]` to bf16 rows of `ch*4`) or
/// `bc_unpatchify` (back). Grid (ceil(frames*ch*h*w / `BC_ELEM_THREADS`)).
pub fn patch(
    patchify: bool,
    latents: *mut f32,
    rows: *mut bc_bf16,
    frames: usize,
    ch: usize,
    h: usize,
    w: usize,
) -> LaunchResult<Launch<BcPatchParams>> {
    let k = if patchify {
        Kernel::Patchify
    } else {
        Kernel::Unpatchify
    };
    let n = mul(k, mul(k, frames, ch)?, mul(k, h, w)?)?;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, n, BC_ELEM_THREADS)?, 1, 1],
        block: BC_ELEM_THREADS,
        params: BcPatchParams {
            latents,
            rows,
            frames: i32_of(k, frames, "frames")?,
            ch: i32_of(k, ch, "ch")?,
            h: i32_of(k, h, "h")?,
            w: i32_of(k, w, "w")?,
            row_stride: i32_of(k, mul(k, ch, 4)?, "row_stride")?,
            _pad: 0,
        },
    })
}

/// `bc_flow_step` (`cuda/elementwise.cu`) over `frames` frames of `frame_elems` values;
/// `sigma_next` null: no renoise, `x0_out` null: x0 not kept. Grid (ceil(frames*frame_elems / `BC_ELEM_THREADS`)).
pub fn flow_step(
    x: *mut f32,
    v: *const f32,
    noise: *const f32,
    x0_out: *mut f32,
    sigma: *const f32,
    sigma_next: *const f32,
    frames: usize,
    frame_elems: usize,
) -> LaunchResult<Launch<BcFlowStepParams>> {
    let k = Kernel::FlowStep;
    Ok(Launch {
        kernel: k,
        grid: [
            blocks(k, mul(k, frames, frame_elems)?, BC_ELEM_THREADS)?,
            1,
            1,
        ],
        block: BC_ELEM_THREADS,
        params: BcFlowStepParams {
            x,
            v,
            noise,
            x0_out,
            sigma,
            sigma_next,
            frames: i32_of(k, frames, "frames")?,
            frame_elems: i32_of(k, frame_elems, "frame_elems")?,
        },
    })
}

/// `bc_copy` (`cuda/copy.cu`): every one of the `num_regions` regions of the table `regions`. Grid
/// (max(blocks_per_region, 1), num_regions), block `BC_ELEM_THREADS`.
pub fn copy(
    regions: *const BcCopyRegion,
    num_regions: usize,
    blocks_per_region: u32,
) -> LaunchResult<Launch<BcCopyParams>> {
    let k = Kernel::Copy;
    let num_regions = i32_of(k, num_regions, "regions")?;
    Ok(Launch {
        kernel: k,
        grid: [blocks_per_region.max(1), num_regions as u32, 1],
        block: BC_ELEM_THREADS,
        params: BcCopyParams {
            regions,
            num_regions,
            _pad: 0,
        },
    })
}

/// `bc_t5_rms_norm` (`cuda/t5.cu`): `x += delta` when `delta` is not null, then T5's RMS norm
/// of `x` `[rows, dim]` (f32) times `weight` into `out` (f32 with `out_f32`, else bf16). Grid
/// (rows), block `BC_T5_NORM_THREADS`.
pub fn t5_rms_norm(
    x: *mut f32,
    delta: *const f32,
    weight: *const f32,
    out: *mut c_void,
    out_f32: bool,
    rows: usize,
    dim: usize,
    eps: f32,
) -> LaunchResult<Launch<BcT5RmsNormParams>> {
    let k = Kernel::T5RmsNorm;
    let rows = i32_of(k, rows, "rows")?;
    Ok(Launch {
        kernel: k,
        grid: row_grid(rows),
        block: BC_T5_NORM_THREADS,
        params: BcT5RmsNormParams {
            x,
            delta,
            weight,
            out,
            rows,
            dim: i32_of(k, dim, "dim")?,
            out_f32: out_f32 as i32,
            eps,
        },
    })
}

/// `bc_t5_gated_gelu` (`cuda/t5.cu`): `out` `[rows, cols]` bf16 from the f32 rows of
/// `in_stride` at `gate` and `lin`. Grid (ceil(rows*cols / `BC_ELEM_THREADS`)).
pub fn t5_gated_gelu(
    gate: *const f32,
    lin: *const f32,
    in_stride: usize,
    out: *mut bc_bf16,
    rows: usize,
    cols: usize,
) -> LaunchResult<Launch<BcT5GatedGeluParams>> {
    let k = Kernel::T5GatedGelu;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, mul(k, rows, cols)?, BC_ELEM_THREADS)?, 1, 1],
        block: BC_ELEM_THREADS,
        params: BcT5GatedGeluParams {
            gate,
            lin,
            out,
            rows: i32_of(k, rows, "rows")?,
            cols: i32_of(k, cols, "cols")?,
            in_stride: i32_of(k, in_stride, "in_stride")?,
            _pad: 0,
        },
    })
}

/// `bc_t5_attention` (`cuda/t5.cu`) of `rows` tokens: `q`, `k`, `v` f32 rows of `qkv_stride`,
/// `out` bf16 rows of `heads*head_dim`, the layer's `rel_bias` `[buckets, heads]` and `bucket`
/// (the entry of relative position 0 of a table covering `-(rows-1)..=rows-1`). Refuses more
/// than `BC_T5_ATTN_MAX_TOKENS` rows or a head dim over `BC_T5_ATTN_MAX_HEAD_DIM`. Grid
/// (ceil(rows / `BC_T5_ATTN_ROWS`), heads), block `BC_T5_ATTN_THREADS`.
pub fn t5_attention(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    qkv_stride: usize,
    out: *mut bc_bf16,
    rel_bias: *const f32,
    bucket: *const i32,
    rows: usize,
    heads: usize,
    head_dim: usize,
) -> LaunchResult<Launch<BcT5AttentionParams>> {
    let kern = Kernel::T5Attention;
    if rows > BC_T5_ATTN_MAX_TOKENS as usize {
        return Err(invalid(
            kern,
            format!("{rows} tokens: the kernel takes at most {BC_T5_ATTN_MAX_TOKENS}"),
        ));
    }
    if head_dim == 0 || head_dim > BC_T5_ATTN_MAX_HEAD_DIM as usize {
        return Err(invalid(
            kern,
            format!("head_dim {head_dim}: the kernel takes 1..={BC_T5_ATTN_MAX_HEAD_DIM}"),
        ));
    }
    let heads32 = i32_of(kern, heads, "heads")?;
    Ok(Launch {
        kernel: kern,
        grid: [blocks(kern, rows, BC_T5_ATTN_ROWS)?, heads32 as u32, 1],
        block: BC_T5_ATTN_THREADS,
        params: BcT5AttentionParams {
            q,
            k,
            v,
            rel_bias,
            bucket,
            out,
            rows: i32_of(kern, rows, "rows")?,
            heads: heads32,
            head_dim: i32_of(kern, head_dim, "head_dim")?,
            qkv_stride: i32_of(kern, qkv_stride, "qkv_stride")?,
            out_stride: i32_of(kern, mul(kern, heads, head_dim)?, "out_stride")?,
            _pad: 0,
        },
    })
}

/// One input frame of [`conv_on`] (the fields of `BcConvSource`, `cuda/include/params.h`).
#[derive(Clone, Copy, Debug)]
pub struct ConvSource {
    /// NHWC bf16 frame `[h*w][stride]` (`[(h/2)*(w/2)][stride]` when `up`).
    pub x: *const bc_bf16,
    /// Channels of the frame.
    pub channels: usize,
    /// Elements per pixel.
    pub stride: usize,
    /// First weight input channel.
    pub c0: usize,
    /// Time tap it meets.
    pub t: usize,
    /// Read through a nearest 2x upsample.
    pub up: bool,
}

/// Kernel geometry of a [`conv_on`]: weights `[cout][kt][kh][kw][cin]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Output channels.
    pub cout: usize,
    /// Input channels (all sources).
    pub cin: usize,
    /// Temporal taps.
    pub kt: usize,
    /// Kernel height (1 or 3).
    pub kh: usize,
    /// Kernel width (1 or 3).
    pub kw: usize,
    /// The sub-pixel (parity) form of a 3x3 conv2d whose sources are all upsampled: the
    /// weights are `[4 parities][cout][2][2][cin]` (`Conv::parity_packed_bf16`), each output
    /// parity a 2x2 conv of the sources at their own size (grid z = 4; `BcConvParams::parity`).
    pub parity: bool,
}

impl ConvShape {
    /// A plain conv (not the parity form).
    pub fn new(cout: usize, cin: usize, kt: usize, kh: usize, kw: usize) -> ConvShape {
        ConvShape {
            cout,
            cin,
            kt,
            kh,
            kw,
            parity: false,
        }
    }

    /// Weight values the launch reads: `cout * kt * kh * kw * cin`, or `16 * cout * cin` in the
    /// parity form.
    pub fn weight_len(&self) -> usize {
        if self.parity {
            16 * self.cout * self.cin
        } else {
            self.cout * self.kt * self.kh * self.kw * self.cin
        }
    }
}

/// Where and how [`conv_on`] writes: `out` bf16 or f32, `stride` elements per pixel, output
/// channel `n` to frame `n / split` at `frame_stride` elements apart (`split = cout`: one frame).
#[derive(Clone, Copy, Debug)]
pub struct ConvOut {
    /// Output base.
    pub out: *mut c_void,
    /// f32 (else bf16).
    pub f32: bool,
    /// Elements per pixel.
    pub stride: usize,
    /// Output channels per frame (divides cout).
    pub split: usize,
    /// Elements between output frames.
    pub frame_stride: usize,
    /// Elements between output channels (1: NHWC; the pixel count: channel-major).
    pub cstride: usize,
    /// Frames the launch covers (1: one output frame per launch). With more, frame `f` reads
    /// every source `f` frames on (frames contiguous: `h*w*stride` elements apart, a quarter of
    /// the pixels for an upsampled source), the residual `f * h*w * res_stride` elements on,
    /// and writes output frames `f * (cout / split)` on; needs `cstride = 1`.
    pub frames: usize,
}

impl ConvOut {
    /// One bf16 output frame, NHWC with `cout` channels per pixel: the plain layout of a single
    /// conv layer (benchmarks and tests launch it; the decoders set the frame fields).
    pub fn nhwc_bf16(out: *mut c_void, cout: usize) -> Self {
        ConvOut {
            out,
            f32: false,
            stride: cout,
            split: cout,
            frame_stride: 0,
            cstride: 1,
            frames: 1,
        }
    }
}

/// The epilogue of a [`conv_on`]: bias (null: none), residual `[h*w][res_stride]` bf16 (null:
/// none), activation (`BC_ACT_NONE`, `BC_ACT_RELU`, `BC_ACT_SILU`).
#[derive(Clone, Copy, Debug)]
pub struct ConvEpilogue {
    /// `[cout]` f32 or null.
    pub bias: *const f32,
    /// Residual or null.
    pub res: *const bc_bf16,
    /// Elements per pixel of `res`.
    pub res_stride: usize,
    /// Activation selector.
    pub act: u32,
}

/// `bc_conv` (`cuda/conv.cu`; `bc_conv_n16` for at most `BC_CONV_BN_NARROW` output channels):
/// one output frame `h x w` of a convolution over `srcs`. Checks the geometry (1..=3 sources,
/// kh/kw 1 or 3, taps and channel ranges inside the weights, the split, even sizes under an
/// upsampled source) and picks the 16-byte copy path when every count and pointer allows it.
/// Grid (ceil(h*w / `BC_CONV_BM`), ceil(cout / channel tile)), block `BC_CONV_THREADS`; in
/// the parity form ([`ConvShape::parity`]) the rows are the sources' (h/2) x (w/2) pixels and
/// the grid's z the 4 parities.
///
/// With `wgmma`, the Hopper variant (`cuda/conv_wgmma.cu`, sm_90a only: the caller checks the
/// device) wherever it applies: the 16-byte copy path (every channel count, stride and offset
/// a multiple of 8, pointers 16-byte aligned) and more than `BC_CONV_BN_NARROW` output
/// channels; the channel tile that pads cout least ([`conv_wgmma_tile`]); elsewhere `bc_conv`
/// / `bc_conv_n16` as without it.
pub fn conv_on(
    srcs: &[ConvSource],
    w: *const bc_bf16,
    shape: ConvShape,
    hw: (usize, usize),
    ep: ConvEpilogue,
    out: ConvOut,
    wgmma: bool,
) -> LaunchResult<Launch<BcConvParams>> {
    let tile = wgmma.then(|| conv_wgmma_tile(shape.cout));
    conv_tiled(srcs, w, shape, hw, ep, out, tile)
}

/// The output channels per block of the wgmma conv for `cout`: of `BC_CONV_WG_BN` (128,
/// `bc_conv_wgmma`), `BC_CONV_WG_BN_96` (`bc_conv_wgmma_n96`) and `BC_CONV_WG_BN_64`
/// (`bc_conv_wgmma_n64`), the one that pads cout least, the wider one on a tie: 96 for the Wan
/// VAE's 96 and 192 channels (and 136), 64 for TAEHV's 64 (and 32, 40), 128 for 384, 256, 200.
pub fn conv_wgmma_tile(cout: usize) -> u32 {
    least_padding_tile(cout, [BC_CONV_WG_BN, BC_CONV_WG_BN_96, BC_CONV_WG_BN_64])
}

/// Of `tiles` (widest first), the channel tile that pads `cout` least; the earlier (wider) one
/// on a tie.
fn least_padding_tile(cout: usize, tiles: [u32; 3]) -> u32 {
    let pad = |t: u32| cout.div_ceil(t as usize) * t as usize - cout;
    let mut best = tiles[0];
    for t in tiles {
        if pad(t) < pad(best) {
            best = t;
        }
    }
    best
}

/// [`conv_on`] with the wgmma channel tile given: `Some(BC_CONV_WG_BN)` (`bc_conv_wgmma`),
/// `Some(BC_CONV_WG_BN_96)` (`bc_conv_wgmma_n96`), `Some(BC_CONV_WG_BN_64)`
/// (`bc_conv_wgmma_n64`; another width is refused), where the conv
/// fits it; `None`: `bc_conv` / `bc_conv_n16`. The wgmma grid is (ceil(h*w /
/// `BC_CONV_WG_BM`), ceil(cout / tile)), block `BC_CONV_WG_THREADS`, with the kernel's
/// dynamic shared memory.
pub fn conv_tiled(
    srcs: &[ConvSource],
    w: *const bc_bf16,
    shape: ConvShape,
    (h, w_px): (usize, usize),
    ep: ConvEpilogue,
    out: ConvOut,
    wgmma_tile: Option<u32>,
) -> LaunchResult<Launch<BcConvParams>> {
    let ConvShape {
        cout,
        cin,
        kt,
        kh,
        kw,
        parity,
    } = shape;
    let (k, bn) = if cout <= BC_CONV_BN_NARROW as usize {
        (Kernel::ConvN16, BC_CONV_BN_NARROW)
    } else {
        (Kernel::Conv, BC_CONV_BN)
    };
    if srcs.is_empty() || srcs.len() > BC_CONV_MAX_SOURCES as usize {
        return Err(invalid(k, format!("{} sources (1..=3)", srcs.len())));
    }
    if !matches!(kh, 1 | 3) || !matches!(kw, 1 | 3) || kt == 0 || cout == 0 || cin == 0 {
        return Err(invalid(
            k,
            format!("bad kernel {cout}x{cin}x{kt}x{kh}x{kw}"),
        ));
    }
    if parity
        && (kt != 1
            || kh != 3
            || kw != 3
            || h % 2 != 0
            || w_px % 2 != 0
            || srcs.iter().any(|s| !s.up))
    {
        return Err(invalid(
            k,
            "the parity form needs a 3x3 conv2d, an even output and only upsampled sources",
        ));
    }
    if out.split == 0 || cout % out.split != 0 || (out.cstride <= 1 && out.stride < out.split) {
        return Err(invalid(k, "output split must divide cout, stride >= split"));
    }
    if out.frames == 0 || (out.frames > 1 && out.cstride > 1) {
        return Err(invalid(
            k,
            "a launch covers at least one frame, and several only with an NHWC output",
        ));
    }
    if !ep.res.is_null() && (out.split != cout || ep.res_stride < cout) {
        return Err(invalid(
            k,
            "a residual needs an unsplit output and res_stride >= cout",
        ));
    }
    let aligned = |p: usize| p % 16 == 0;
    let mut vec = cin % 8 == 0 && aligned(w as usize);
    let empty = BcConvSource {
        x: std::ptr::null(),
        channels: 0,
        stride: 0,
        c0: 0,
        t: 0,
        up: 0,
        _pad: 0,
    };
    let mut ps = [empty; BC_CONV_MAX_SOURCES as usize];
    for (i, s) in srcs.iter().enumerate() {
        if s.t >= kt || s.channels == 0 || s.c0 + s.channels > cin || s.stride < s.channels {
            return Err(invalid(
                k,
                format!("source {i}: tap or channels outside the weights"),
            ));
        }
        if s.up && (h % 2 != 0 || w_px % 2 != 0) {
            return Err(invalid(k, "an upsampled source needs an even output size"));
        }
        vec &= s.channels % 8 == 0 && s.stride % 8 == 0 && s.c0 % 8 == 0 && aligned(s.x as usize);
        ps[i] = BcConvSource {
            x: s.x,
            channels: i32_of(k, s.channels, "channels")?,
            stride: i32_of(k, s.stride, "stride")?,
            c0: i32_of(k, s.c0, "c0")?,
            t: i32_of(k, s.t, "t")?,
            up: s.up as i32,
            _pad: 0,
        };
    }
    let ktot = mul(k, mul(k, mul(k, kt, kh)?, kw)?, cin)?;
    mul(k, mul(k, ktot, cout)?, if parity { 2 } else { 1 })?;
    // The GEMM rows: the output pixels, or the sources' in the parity form.
    let hw = i32_of(k, mul(k, h, w_px)?, "h*w")? as usize / if parity { 4 } else { 1 };
    let (k, bm, bn, threads) = match wgmma_tile {
        Some(t) if vec && cout > BC_CONV_BN_NARROW as usize => {
            let wk = match t {
                BC_CONV_WG_BN => Kernel::ConvWgmma,
                BC_CONV_WG_BN_96 => Kernel::ConvWgmmaN96,
                BC_CONV_WG_BN_64 => Kernel::ConvWgmmaN64,
                _ => return Err(invalid(k, format!("no {t}-channel wgmma conv tile"))),
            };
            (wk, BC_CONV_WG_BM, t, BC_CONV_WG_THREADS)
        }
        _ => (k, BC_CONV_BM, bn, BC_CONV_THREADS),
    };
    Ok(Launch {
        kernel: k,
        grid: [
            blocks(k, hw, bm)?,
            blocks(k, cout, bn)?,
            u32::try_from(out.frames * if parity { 4 } else { 1 })
                .ok()
                .filter(|&z| z <= 65535)
                .ok_or_else(|| invalid(k, format!("{} frames in one launch", out.frames)))?,
        ],
        block: threads,
        params: BcConvParams {
            src: ps,
            w,
            bias: ep.bias,
            res: ep.res,
            out: out.out,
            out_frame_stride: i64::try_from(out.frame_stride)
                .map_err(|_| invalid(k, "frame stride too large"))?,
            num_src: srcs.len() as i32,
            h: i32_of(k, h, "h")?,
            w_px: i32_of(k, w_px, "w")?,
            cin: i32_of(k, cin, "cin")?,
            cout: i32_of(k, cout, "cout")?,
            kt: i32_of(k, kt, "kt")?,
            kh: kh as i32,
            kw: kw as i32,
            res_stride: i32_of(k, ep.res_stride, "res_stride")?,
            out_stride: i32_of(k, out.stride, "out_stride")?,
            out_split: i32_of(k, out.split, "out_split")?,
            out_f32: out.f32 as i32,
            act: i32::try_from(ep.act).map_err(|_| invalid(k, "bad activation"))?,
            vec: vec as i32,
            out_cstride: i32_of(k, out.cstride.max(1), "out_cstride")?,
            parity: parity as i32,
            frames: out.frames as i32,
            _pad: 0,
            tile_counter: std::ptr::null_mut(),
        },
    })
}

/// Which wgmma convolution a Hopper decoder launches, from `BC_CONV_WGMMA_VARIANT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvWgmmaVariant {
    /// `bc_conv_wgmma*` (`cuda/conv_wgmma.cu`; the default: measured on an H200).
    Base,
    /// `bc_conv_wgmma_ws*` (`cuda/conv_ws.cu`, [`conv_ws`]): warp-specialized, the same output
    /// bits; opt-in until a GPU has measured it.
    Ws,
}

impl ConvWgmmaVariant {
    /// The variant `BC_CONV_WGMMA_VARIANT` names (unset, empty or `base`: [`Self::Base`];
    /// `ws`: [`Self::Ws`]); an error for anything else.
    pub fn parse(v: Option<&str>) -> std::result::Result<ConvWgmmaVariant, String> {
        match v.map(str::trim).unwrap_or("") {
            "" | "base" => Ok(ConvWgmmaVariant::Base),
            "ws" => Ok(ConvWgmmaVariant::Ws),
            other => Err(format!(
                "BC_CONV_WGMMA_VARIANT={other}: expected base or ws"
            )),
        }
    }
}

/// The output channels per block of the warp-specialized conv for `cout`: of
/// `BC_CONV_WS_BN` (192, `bc_conv_wgmma_ws`), `BC_CONV_WG_BN_96` (`bc_conv_wgmma_ws_n96`) and
/// `BC_CONV_WG_BN_64` (`bc_conv_wgmma_ws_n64`), the one that pads cout least, the wider one on
/// a tie: 192 for the Wan VAE's 384 and 192 channels, 96 for its 96, 64 for TAEHV's 64 (and
/// 128, 256).
pub fn conv_ws_tile(cout: usize) -> u32 {
    least_padding_tile(cout, [BC_CONV_WS_BN, BC_CONV_WG_BN_96, BC_CONV_WG_BN_64])
}

/// `bc_conv_wgmma_ws*` (`cuda/conv_ws.cu`) for a launch [`conv_tiled`] built on a wgmma tile
/// (`bc_conv_wgmma*`: the same params, the same output bits): the tile [`conv_ws_tile`] picks,
/// grid (ceil(rows / `BC_CONV_WG_BM`), ceil(cout / tile), z as it was), block
/// `BC_CONV_WS_THREADS`. Any other launch is refused.
pub fn conv_ws(l: Launch<BcConvParams>) -> LaunchResult<Launch<BcConvParams>> {
    if !matches!(
        l.kernel,
        Kernel::ConvWgmma | Kernel::ConvWgmmaN96 | Kernel::ConvWgmmaN64
    ) {
        return Err(invalid(Kernel::ConvWgmmaWs, "not a wgmma conv launch"));
    }
    let cout = usize::try_from(l.params.cout).unwrap_or(0);
    let t = conv_ws_tile(cout);
    let kernel = match t {
        BC_CONV_WS_BN => Kernel::ConvWgmmaWs,
        BC_CONV_WG_BN_96 => Kernel::ConvWgmmaWsN96,
        _ => Kernel::ConvWgmmaWsN64,
    };
    Ok(Launch {
        kernel,
        grid: [l.grid[0], blocks(kernel, cout, t)?, l.grid[2]],
        block: BC_CONV_WS_THREADS,
        params: l.params,
    })
}

/// Whether a launch built by [`conv_tiled`] fits the persistent halo conv `bc_conv_halo_n64`
/// (`cuda/conv_halo.cu`): it runs `bc_conv_wgmma_n64` (the 16-byte path, the 64-channel tile)
/// with exactly 64 output channels, a 3x3, and at most `BC_CONV_HALO_MAX_KSTEPS` = 18 k-steps
/// of 64 weights (they stay resident): plain, 1 or 2 sources of 64 channels or one of 128, each
/// read as it is or through the nearest 2x upsample (9 k-steps per 64 channels); in the parity
/// form, one upsampled source of 64 channels (4 parities x 4 taps = 16 k-steps). So every 3x3
/// conv of TAEHV to 64 channels but one: 64 -> 64, the MemBlocks' 128 -> 64 over
/// `cat[x, past]`, the 64 -> 64 after the last `Upsample` in both forms, and the 128 -> 64
/// after the one before it dense only (its parity form would need 32 k-steps, 256 KB).
pub fn conv_halo_fits(l: &Launch<BcConvParams>) -> bool {
    let p = &l.params;
    let n = usize::try_from(p.num_src).unwrap_or(0);
    let bk = BC_CONV_WG_BK as i32;
    let srcs = &p.src[..n.min(p.src.len())];
    let shapes = match srcs {
        [a] => a.channels == bk || a.channels == 2 * bk,
        [a, b] => a.channels == bk && b.channels == bk,
        _ => false,
    };
    // Weight k-steps per 64 channels: 9 taps, or 4 parities x 4 taps.
    let per = if p.parity != 0 { 16 } else { 9 };
    // One time tap (a conv2d): the kernel's sources are frames of their own, never taps of a
    // causal conv3d (the emulated cases check kt == 1 only).
    if p.kt != 1 {
        return false;
    }
    l.kernel == Kernel::ConvWgmmaN64
        && p.cout == BC_CONV_WG_BN_64 as i32
        && p.kh == 3
        && p.kw == 3
        && p.vec != 0
        && shapes
        && (p.parity == 0 || srcs.iter().all(|s| s.up != 0))
        && srcs.iter().map(|s| per * s.channels / bk).sum::<i32>() <= BC_CONV_HALO_MAX_KSTEPS as i32
}

/// `bc_conv_halo_n64` (`cuda/conv_halo.cu`) for a launch that [`conv_halo_fits`] (the same
/// params, `bc_conv_wgmma_n64`'s output bits): a persistent grid of `min(ctas, tiles)` blocks
/// (`ctas`: the device's SM count; at least 1) over the `BC_CONV_HALO_TH` x `BC_CONV_HALO_TW`
/// pixel tiles of all the launch's frames (of the output, or in the parity form of the
/// sources' (h/2) x (w/2) grid, each tile then giving all 4 parities), block
/// `BC_CONV_HALO_THREADS`. The blocks claim their
/// tiles from `tile_counter` (`BcConvParams::tile_counter`: two u32 in device memory, zero
/// before the first launch; each launch leaves them zero again, so a stream, or a graph, can
/// reuse them launch after launch, but two launches that may overlap need a pair each). Any
/// other launch, or a null counter, is refused.
pub fn conv_halo(
    l: Launch<BcConvParams>,
    ctas: u32,
    tile_counter: *mut u32,
) -> LaunchResult<Launch<BcConvParams>> {
    let k = Kernel::ConvHaloN64;
    if !conv_halo_fits(&l) {
        return Err(invalid(
            k,
            "not a 3x3 conv to 64 channels of one or two 64-channel sources or one of 128",
        ));
    }
    if tile_counter.is_null() {
        return Err(invalid(k, "no tile counter"));
    }
    let p = &l.params;
    let dim = |v: i32| usize::try_from(v).map_err(|_| invalid(k, "negative size"));
    let (h, w, frames) = (dim(p.h)?, dim(p.w_px)?, dim(p.frames)?);
    // The GEMM grid: the output, or the sources' pixels in the parity form.
    let (h, w) = if p.parity != 0 {
        (h / 2, w / 2)
    } else {
        (h, w)
    };
    let per_frame = mul(
        k,
        h.div_ceil(BC_CONV_HALO_TH as usize),
        w.div_ceil(BC_CONV_HALO_TW as usize),
    )?;
    let tiles = mul(k, per_frame, frames)?;
    let grid = u32::try_from(tiles)
        .unwrap_or(u32::MAX)
        .clamp(1, ctas.max(1));
    // The kernel counts tiles in i32, and each block claims up to one past the last.
    i32_of(k, tiles.saturating_add(grid as usize), "tiles")?;
    Ok(Launch {
        kernel: k,
        grid: [grid, 1, 1],
        block: BC_CONV_HALO_THREADS,
        params: BcConvParams {
            tile_counter,
            ..l.params
        },
    })
}

/// Whether a launch built by [`conv_tiled`] with a wgmma tile fits the TMA variant
/// `bc_conv_wgmma_tma*` (`cuda/conv_wgmma_tma.cu`): it runs `bc_conv_wgmma` or
/// `bc_conv_wgmma_n96` (16-byte path, more than 16 output channels; the TMA variant has no
/// 64-channel tile, so a `bc_conv_wgmma_n64` launch stays on that kernel) and no source is
/// upsampled (a TMA box reads a source's pixels as they are), unless in the parity form, which
/// reads the upsampled sources at their own size; and it covers one frame (a TMA map is one frame).
pub fn conv_tma_fits(l: &Launch<BcConvParams>) -> bool {
    matches!(l.kernel, Kernel::ConvWgmma | Kernel::ConvWgmmaN96)
        && l.params.frames == 1
        && (l.params.parity != 0
            || l.params.src[..l.params.num_src.clamp(0, BC_CONV_MAX_SOURCES as i32) as usize]
                .iter()
                .all(|s| s.up == 0))
}

/// The tensor maps `bc_conv_wgmma_tma*` needs for the conv `l` ([`conv_tma_fits`]): per source
/// the frame as `{channels, w, h}` (strides `stride`, `w * stride` elements) with box `{32,
/// TX, TY}`, then the weights as `{kt*kh*kw*cin, cout}` with box `{32, tile}`, all 64-byte
/// swizzled bf16 (a k-step is two such boxes each: two column blocks of the wgmma tile); each with the address it describes. Encoded by the caller (the driver, or the
/// emulation), then handed to [`conv_tma`].
pub fn conv_tma_specs(l: &Launch<BcConvParams>) -> Vec<(super::tma::TensorMapSpec, u64)> {
    use super::tma::{TensorMapSpec, TmaSwizzle};
    let p = &l.params;
    let bn = match l.kernel {
        Kernel::ConvWgmmaN96 => BC_CONV_WG_BN_96,
        _ => BC_CONV_WG_BN,
    };
    // The parity form reads its (upsampled) sources at their own size, and its weights are
    // the 4 parities' `[cout][4 * cin]` blocks one after the other.
    let (par, sh, sw) = if p.parity != 0 {
        (4, p.h / 2, p.w_px / 2)
    } else {
        (1, p.h, p.w_px)
    };
    let mut v: Vec<(TensorMapSpec, u64)> = p.src[..p.num_src.clamp(0, 3) as usize]
        .iter()
        .map(|s| {
            let row = s.stride as u64 * 2;
            let spec = TensorMapSpec {
                elem_bytes: 2,
                dims: vec![s.channels as u64, sw as u64, sh as u64],
                strides: vec![row, row * sw as u64],
                box_dims: vec![32, BC_CONV_TMA_TX, BC_CONV_TMA_TY],
                element_strides: vec![1; 3],
                swizzle: TmaSwizzle::B64,
            };
            (spec, s.x as u64)
        })
        .collect();
    let ktot = if par == 4 {
        4 * p.cin as u64
    } else {
        (p.kt * p.kh * p.kw * p.cin) as u64
    };
    v.push((
        TensorMapSpec {
            elem_bytes: 2,
            dims: vec![ktot, par * p.cout as u64],
            strides: vec![ktot * 2],
            box_dims: vec![32, bn],
            element_strides: vec![1; 2],
            swizzle: TmaSwizzle::B64,
        },
        p.w as u64,
    ));
    v
}

/// `bc_conv_wgmma_tma` / `bc_conv_wgmma_tma_n96` from a [`conv_tiled`] wgmma launch that
/// [`conv_tma_fits`] and the encoded [`conv_tma_specs`] maps (sources, then weights). Grid
/// (ceil(w / TX) * ceil(h / TY), ceil(cout / tile)), block `BC_CONV_TMA_THREADS`.
pub fn conv_tma(
    l: Launch<BcConvParams>,
    maps: &[BcTensorMap],
) -> LaunchResult<Launch<BcConvTmaParams>> {
    let (k, bn) = match l.kernel {
        Kernel::ConvWgmma => (Kernel::ConvWgmmaTma, BC_CONV_WG_BN),
        Kernel::ConvWgmmaN96 => (Kernel::ConvWgmmaTmaN96, BC_CONV_WG_BN_96),
        Kernel::ConvWgmmaN64 => {
            return Err(invalid(
                Kernel::ConvWgmmaTma,
                "no 64-channel tile in the TMA conv (run bc_conv_wgmma_n64)",
            ))
        }
        _ => return Err(invalid(Kernel::ConvWgmmaTma, "not a wgmma conv launch")),
    };
    if !conv_tma_fits(&l) {
        return Err(invalid(k, "an upsampled source does not fit the TMA conv"));
    }
    let p = &l.params;
    let ns = p.num_src as usize;
    if maps.len() != ns + 1 {
        return Err(invalid(
            k,
            format!("{} tensor maps for {ns} sources", maps.len()),
        ));
    }
    let zero = BcTensorMap { opaque: [0; 16] };
    let mut src_map = [zero; BC_CONV_MAX_SOURCES as usize];
    src_map[..ns].copy_from_slice(&maps[..ns]);
    let g = if p.parity != 0 { 2 } else { 1 };
    let tiles_x = (p.w_px as u32 / g).div_ceil(BC_CONV_TMA_TX);
    let tiles_y = (p.h as u32 / g).div_ceil(BC_CONV_TMA_TY);
    let tiles = tiles_x
        .checked_mul(tiles_y)
        .ok_or_else(|| invalid(k, "too many pixel tiles"))?;
    Ok(Launch {
        kernel: k,
        grid: [tiles, (p.cout as u32).div_ceil(bn), l.grid[2]],
        block: BC_CONV_TMA_THREADS,
        params: BcConvTmaParams {
            src_map,
            w_map: maps[ns],
            conv: l.params,
            tiles_x: tiles_x as i32,
        },
    })
}

/// `bc_dec_latent_in` (`cuda/decode_ops.cu`): one latent frame f32 `[c][hw]` to NHWC bf16,
/// `mode` 0 (as is), 1 (`tanh(z/3)*3`) or 2 (`z / scale[c] + mean[c]`); a NaN/inf latent sets
/// bit 0 of the u32 at `nonfinite` (null: not checked). Grid (ceil(c*hw / `BC_ELEM_THREADS`)).
pub fn dec_latent_in(
    z: *const f32,
    out: *mut bc_bf16,
    c: usize,
    hw: usize,
    mode: i32,
    mean: *const f32,
    scale: *const f32,
    nonfinite: *mut u32,
) -> LaunchResult<Launch<BcDecLatentInParams>> {
    let k = Kernel::DecLatentIn;
    let n = mul(k, c, hw)?;
    i32_of(k, n, "c*hw")?;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, n, BC_ELEM_THREADS)?, 1, 1],
        block: BC_ELEM_THREADS,
        params: BcDecLatentInParams {
            z,
            out,
            mean,
            scale,
            nonfinite,
            c: i32_of(k, c, "c")?,
            hw: i32_of(k, hw, "hw")?,
            mode,
            _pad: 0,
        },
    })
}

/// `bc_dec_rms_norm` (`cuda/decode_ops.cu`): `pixels x c` NHWC bf16, optional SiLU after.
/// Grid (ceil(pixels / `BC_DEC_NORM_PIXELS`)), block 32 * `BC_DEC_NORM_PIXELS`.
pub fn dec_rms_norm(
    x: *const bc_bf16,
    out: *mut bc_bf16,
    gamma: *const f32,
    pixels: usize,
    c: usize,
    silu: bool,
) -> LaunchResult<Launch<BcDecRmsNormParams>> {
    let k = Kernel::DecRmsNorm;
    i32_of(k, mul(k, pixels, c)?, "pixels*c")?;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, pixels, BC_DEC_NORM_PIXELS)?, 1, 1],
        block: 32 * BC_DEC_NORM_PIXELS,
        params: BcDecRmsNormParams {
            x,
            out,
            gamma,
            pixels: i32_of(k, pixels, "pixels")?,
            c: i32_of(k, c, "c")?,
            silu: silu as i32,
            _pad: 0,
        },
    })
}

/// `bc_dec_upsample2x` (`cuda/decode_ops.cu`): NHWC bf16 `[h][w][c]` to `[2h][2w][c]` in `out`
/// (and `out2` unless null). Grid (ceil(4*h*w*c / `BC_ELEM_THREADS`)).
pub fn dec_upsample2x(
    x: *const bc_bf16,
    out: *mut bc_bf16,
    out2: *mut bc_bf16,
    h: usize,
    w: usize,
    c: usize,
) -> LaunchResult<Launch<BcDecUpsampleParams>> {
    let k = Kernel::DecUpsample2x;
    let n = mul(k, mul(k, 4, mul(k, h, w)?)?, c)?;
    i32_of(k, n, "4*h*w*c")?;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, n, BC_ELEM_THREADS)?, 1, 1],
        block: BC_ELEM_THREADS,
        params: BcDecUpsampleParams {
            x,
            out,
            out2,
            h: i32_of(k, h, "h")?,
            w: i32_of(k, w, "w")?,
            c: i32_of(k, c, "c")?,
            _pad: 0,
        },
    })
}

/// `bc_dec_to_pixels` (`cuda/decode_ops.cu`): channels 0..3 of `hw` pixels (`stride` elements
/// each, f32 or bf16) to `x * scale + shift` (clamped when `clamp`), f32 planar and/or RGB8
/// (either null: not written). Grid (ceil(hw / `BC_ELEM_THREADS`)).
pub fn dec_to_pixels(
    x: *const c_void,
    in_f32: bool,
    hw: usize,
    stride: usize,
    (scale, shift): (f32, f32),
    clamp: bool,
    out_f32: *mut f32,
    rgb: *mut u8,
) -> LaunchResult<Launch<BcDecToPixelsParams>> {
    let k = Kernel::DecToPixels;
    if stride < 3 {
        return Err(invalid(k, "stride must be at least 3"));
    }
    i32_of(k, mul(k, hw, stride)?, "hw*stride")?;
    Ok(Launch {
        kernel: k,
        grid: [blocks(k, hw, BC_ELEM_THREADS)?, 1, 1],
        block: BC_ELEM_THREADS,
        params: BcDecToPixelsParams {
            x,
            out_f32,
            rgb,
            scale,
            shift,
            hw: i32_of(k, hw, "hw")?,
            stride: i32_of(k, stride, "stride")?,
            in_f32: in_f32 as i32,
            clamp: clamp as i32,
        },
    })
}

/// `bc_dec_softmax` (`cuda/decode_ops.cu`): `rows` rows of `n` f32 scores to bf16
/// probabilities, `scale >= 0`. Grid (rows), block `BC_ROW_THREADS`.
pub fn dec_softmax(
    s: *const f32,
    p: *mut bc_bf16,
    rows: usize,
    n: usize,
    scale: f32,
) -> LaunchResult<Launch<BcDecSoftmaxParams>> {
    let k = Kernel::DecSoftmax;
    if !(scale >= 0.0 && scale.is_finite()) {
        return Err(invalid(k, "scale must be finite and >= 0"));
    }
    i32_of(k, mul(k, rows, n)?, "rows*n")?;
    let rows = i32_of(k, rows, "rows")?;
    Ok(Launch {
        kernel: k,
        grid: row_grid(rows),
        block: BC_ROW_THREADS,
        params: BcDecSoftmaxParams {
            s,
            p,
            rows,
            n: i32_of(k, n, "n")?,
            scale,
            _pad: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wave-fill model at Wan-1.3B shapes on an H200 (132 SMs, one `pp_k128` block each):
    /// one group of 4680 rows (37 row tiles x 12 heads = 444 blocks, 3.36 waves) splits in two
    /// at 32760 keys (6.73 of 7 waves); two groups (888 blocks, 96% fill) and 512 text keys do
    /// not split, nor does a one-slot (emulated) device.
    #[test]
    fn split_model_fills_the_last_wave_only_where_it_pays() {
        let m = |items, slots, keys: usize| SplitModel {
            items,
            slots,
            key_tiles: keys.div_ceil(128),
            partial_bytes: 128 * 128 * 4,
            tile_us: 2.02,
        };
        let bench = m(444, 132, 32760);
        assert!((bench.fill(1) - 444.0 / 528.0).abs() < 1e-9);
        assert!((bench.fill(2) - 888.0 / 924.0).abs() < 1e-9);
        assert_eq!(attention_splits(&bench), 2);
        assert!(bench.predict_us(2) < 0.92 * bench.predict_us(1));
        // the sequential blocks of the 7-block run: 4680 keys (37 tiles: the partials' traffic
        // costs more than the fill gains), then 9360 .. 32760 keys
        assert_eq!(attention_splits(&m(444, 132, 4680)), 1);
        for b in 2..=7 {
            assert_eq!(attention_splits(&m(444, 132, 4680 * b)), 2, "block {b}");
        }
        assert_eq!(attention_splits(&m(888, 132, 32760)), 1);
        assert_eq!(attention_splits(&m(444, 132, 512)), 1);
        assert_eq!(attention_splits(&m(444, 1, 32760)), 1);
        assert_eq!(attention_splits(&m(0, 132, 32760)), 1);
        // a launch of one wave's worth of blocks or less: as many splits as fill the machine
        assert_eq!(attention_splits(&m(12, 132, 32760)), ATTN_MAX_SPLITS);
    }

    /// Split launches: the grid grows by the splits, the partials are sized per split block, and
    /// a split without an aligned buffer or outside 1..=ATTN_MAX_SPLITS is refused.
    #[test]
    fn split_attention_launches() {
        use std::ptr::{null, null_mut};
        let t = AttentionTile::WgmmaPpK128;
        let buf = 0x1000usize as *mut f32;
        let sp = |splits, partial| AttnSplit { splits, partial };
        let launch = |split| {
            attention(
                null(),
                null_mut(),
                12,
                128,
                null(),
                null(),
                null(),
                2,
                300,
                t,
                split,
            )
        };
        let l = launch(sp(3, buf)).unwrap();
        assert_eq!(l.grid, [9, 12, 2]);
        assert_eq!((l.params.splits, l.params.partial), (3, buf));
        assert_eq!(
            attention_split_bytes(12, 128, 2, 300, t, 3),
            Some(3 * 12 * 2 * 3 * 128 * 130 * 4)
        );
        assert_eq!(attention_split_bytes(12, 128, 2, 300, t, 1), Some(0));
        let c = attention_combine(null_mut(), 12, 128, null(), 2, 300, t, sp(3, buf)).unwrap();
        assert_eq!(
            (c.grid, c.params.rows, c.params.splits),
            ([3, 12, 2], 128, 3)
        );
        for bad in [
            sp(0, buf),
            sp(ATTN_MAX_SPLITS + 1, buf),
            sp(2, null_mut()),
            sp(2, 0x1004 as *mut f32),
        ] {
            assert!(launch(bad).is_err());
        }
        assert!(
            attention_combine(null_mut(), 12, 128, null(), 2, 300, t, AttnSplit::NONE).is_err()
        );
    }

    /// `conv_on` with `wgmma` picks `bc_conv_wgmma` (its grid, block and shared memory) only
    /// where it fits: 8-aligned channels and pointers, more than 16 output channels.
    #[test]
    fn conv_wgmma_only_where_it_fits() {
        let x = 0x1000usize as *const bc_bf16;
        let src = |channels, up| ConvSource {
            x,
            channels,
            stride: channels,
            c0: 0,
            t: 0,
            up,
        };
        let shape = |cout, cin| ConvShape {
            cout,
            cin,
            kt: 1,
            kh: 3,
            kw: 3,
            parity: false,
        };
        let ep = ConvEpilogue {
            bias: std::ptr::null(),
            res: std::ptr::null(),
            res_stride: 0,
            act: 0,
        };
        let out = |cout| ConvOut::nhwc_bf16(0x2000usize as *mut c_void, cout);
        let pick = |c: usize, cout: usize, up: bool, wgmma: bool| {
            let l = conv_on(
                &[src(c, up)],
                x,
                shape(cout, c),
                (10, 30),
                ep,
                out(cout),
                wgmma,
            )
            .unwrap();
            (l.kernel, l.grid, l.block)
        };
        // The tile that pads cout least: 136 -> 2 x 96 (56 padded) rather than 2 x 128 (120).
        assert_eq!(
            pick(96, 136, false, true),
            (Kernel::ConvWgmmaN96, [3, 2, 1], BC_CONV_WG_THREADS)
        );
        assert_eq!(pick(96, 200, true, true).0, Kernel::ConvWgmma);
        assert_eq!(pick(96, 192, false, true).0, Kernel::ConvWgmmaN96);
        assert_eq!(pick(96, 384, false, true).0, Kernel::ConvWgmma);
        // TAEHV's 64 channels (and 32, 40: less padding than 96 or 128) -> 64; 256 ties -> 128.
        assert_eq!(
            pick(64, 64, false, true),
            (Kernel::ConvWgmmaN64, [3, 1, 1], BC_CONV_WG_THREADS)
        );
        assert_eq!(pick(128, 32, false, true).0, Kernel::ConvWgmmaN64);
        assert_eq!(pick(64, 40, true, true).0, Kernel::ConvWgmmaN64);
        assert_eq!(pick(64, 256, false, true).0, Kernel::ConvWgmma);
        for (cout, tile) in [
            (64, 64),
            (32, 64),
            (40, 64),
            (48, 64),
            (96, 96),
            (192, 96),
            (136, 96),
            (128, 128),
            (200, 128),
            (256, 128),
            (384, 128),
        ] {
            assert_eq!(conv_wgmma_tile(cout), tile, "cout {cout}");
        }
        assert_eq!(Kernel::ConvWgmma.dynamic_smem_bytes(), BC_CONV_WG_SMEM);
        assert_eq!(
            Kernel::ConvWgmmaN96.dynamic_smem_bytes(),
            BC_CONV_WG_N96_SMEM
        );
        assert_eq!(
            Kernel::ConvWgmmaN64.dynamic_smem_bytes(),
            BC_CONV_WG_N64_SMEM
        );
        let tiled = |t| {
            conv_tiled(
                &[src(96, false)],
                x,
                shape(136, 96),
                (10, 30),
                ep,
                out(136),
                t,
            )
        };
        assert_eq!(
            tiled(Some(BC_CONV_WG_BN)).unwrap().kernel,
            Kernel::ConvWgmma
        );
        assert_eq!(
            tiled(Some(BC_CONV_WG_BN_64)).unwrap().grid,
            [3, 3, 1] // 136 channels: 3 tiles of 64
        );
        assert!(tiled(Some(80)).is_err());
        // The TMA conv has no 64-channel tile: such a launch does not fit it.
        let l64 = tiled(Some(BC_CONV_WG_BN_64)).unwrap();
        assert_eq!(l64.kernel, Kernel::ConvWgmmaN64);
        assert!(!conv_tma_fits(&l64));
        assert!(conv_tma(l64, &[]).is_err());
        // Off, 16 outputs or fewer, channels not a multiple of 8: bc_conv / bc_conv_n16.
        assert_eq!(pick(96, 136, false, false).0, Kernel::Conv);
        assert_eq!(pick(96, 16, false, true).0, Kernel::ConvN16);
        assert_eq!(pick(12, 136, false, true).0, Kernel::Conv);
        // The warp-specialized variant: same params and rows, its own channel tile.
        let ws = |cout: usize, c: usize| {
            let l = conv_on(
                &[src(c, false)],
                x,
                shape(cout, c),
                (10, 30),
                ep,
                out(cout),
                true,
            )
            .unwrap();
            let w = conv_ws(l).unwrap();
            assert_eq!(w.params.cout, l.params.cout);
            assert_eq!((w.grid[0], w.grid[2]), (l.grid[0], l.grid[2]));
            (w.kernel, w.grid[1], w.block)
        };
        let t = BC_CONV_WS_THREADS;
        assert_eq!(ws(384, 96), (Kernel::ConvWgmmaWs, 2, t));
        assert_eq!(ws(192, 96), (Kernel::ConvWgmmaWs, 1, t));
        assert_eq!(ws(96, 96), (Kernel::ConvWgmmaWsN96, 1, t));
        assert_eq!(ws(64, 64), (Kernel::ConvWgmmaWsN64, 1, t));
        assert_eq!(ws(128, 64), (Kernel::ConvWgmmaWsN64, 2, t));
        assert_eq!(ws(200, 96), (Kernel::ConvWgmmaWsN64, 4, t)); // 56 padded, not 88 or 184
        for (cout, tile) in [
            (384, 192),
            (192, 192),
            (96, 96),
            (64, 64),
            (136, 192), // 56 padded on every tile: the widest
            (32, 64),
        ] {
            assert_eq!(conv_ws_tile(cout), tile, "cout {cout}");
        }
        let plain = conv_on(
            &[src(96, false)],
            x,
            shape(136, 96),
            (10, 30),
            ep,
            out(136),
            false,
        );
        assert!(conv_ws(plain.unwrap()).is_err());
        assert_eq!(Kernel::ConvWgmmaWs.dynamic_smem_bytes(), BC_CONV_WS_SMEM);
        assert_eq!(
            ConvWgmmaVariant::parse(Some(" ws ")),
            Ok(ConvWgmmaVariant::Ws)
        );
        assert_eq!(ConvWgmmaVariant::parse(None), Ok(ConvWgmmaVariant::Base));
        assert_eq!(
            ConvWgmmaVariant::parse(Some("base")),
            Ok(ConvWgmmaVariant::Base)
        );
        assert!(ConvWgmmaVariant::parse(Some("tma")).is_err());
        // The persistent halo conv: 3x3 to 64 channels over one or two 64-channel sources or
        // one of 128, each plain or upsampled; a grid of min(ctas, tiles) over 8 x 16 tiles of
        // all frames, the counter in the params; everything else refused, a null counter too.
        let mut ctr = [0u32; 2];
        let ctr = ctr.as_mut_ptr();
        let halo = |cout: usize, srcs: &[ConvSource], frames: usize, ctas: u32| {
            let cin = srcs.iter().map(|s| s.c0 + s.channels).max().unwrap_or(0);
            let l = conv_on(
                srcs,
                x,
                shape(cout, cin),
                (10, 30),
                ep,
                ConvOut {
                    frames,
                    ..out(cout)
                },
                true,
            )
            .unwrap();
            assert_eq!(conv_halo_fits(&l), conv_halo(l, ctas, ctr).is_ok());
            assert!(conv_halo(l, ctas, std::ptr::null_mut()).is_err());
            assert!(l.params.tile_counter.is_null());
            conv_halo(l, ctas, ctr).ok().map(|h| {
                assert_eq!(h.params.frames, l.params.frames);
                assert_eq!(h.params.tile_counter, ctr);
                (h.kernel, h.grid, h.block)
            })
        };
        let hk = (Kernel::ConvHaloN64, BC_CONV_HALO_THREADS);
        let grid = |g: u32| [g, 1, 1];
        // 10 x 30: 2 x 2 tiles per frame.
        let one = [src(64, false)];
        assert_eq!(halo(64, &one, 1, 132), Some((hk.0, grid(4), hk.1)));
        assert_eq!(halo(64, &one, 3, 5), Some((hk.0, grid(5), hk.1)));
        assert_eq!(halo(64, &one, 3, 0), Some((hk.0, grid(1), hk.1)));
        let two = [
            src(64, false),
            ConvSource {
                c0: 64,
                ..src(64, false)
            },
        ];
        assert_eq!(halo(64, &two, 2, 132), Some((hk.0, grid(8), hk.1)));
        assert_eq!(
            halo(64, &[src(64, true)], 1, 132),
            Some((hk.0, grid(4), hk.1))
        );
        assert_eq!(
            halo(64, &[src(128, false)], 1, 3),
            Some((hk.0, grid(3), hk.1))
        );
        assert_eq!(
            halo(64, &[src(128, true)], 2, 132),
            Some((hk.0, grid(8), hk.1))
        );
        assert!(halo(64, &[src(32, false)], 1, 132).is_none());
        // The parity form (10 x 30 from 5 x 15: 1 x 1 tiles per frame): one upsampled
        // 64-channel source only.
        let halo_par = |srcs: &[ConvSource], frames: usize| {
            let cin = srcs.iter().map(|s| s.c0 + s.channels).max().unwrap_or(0);
            let sh = ConvShape {
                parity: true,
                ..shape(64, cin)
            };
            let o = ConvOut { frames, ..out(64) };
            let l = conv_on(srcs, x, sh, (10, 30), ep, o, true).unwrap();
            assert_eq!(conv_halo_fits(&l), conv_halo(l, 132, ctr).is_ok());
            conv_halo(l, 132, ctr)
                .ok()
                .map(|h| (h.kernel, h.grid, h.block))
        };
        assert_eq!(halo_par(&[src(64, true)], 3), Some((hk.0, grid(3), hk.1)));
        assert!(halo_par(&[src(128, true)], 1).is_none());
        assert!(halo(64, &[src(192, false)], 1, 132).is_none());
        assert!(halo(128, &one, 1, 132).is_none());
        let wide_two = [
            src(128, false),
            ConvSource {
                c0: 128,
                ..src(64, false)
            },
        ];
        assert!(halo(64, &wide_two, 1, 132).is_none());
        let three = [
            two[0],
            two[1],
            ConvSource {
                c0: 128,
                ..src(64, false)
            },
        ];
        assert!(halo(64, &three, 1, 132).is_none());
        assert_eq!(Kernel::ConvHaloN64.dynamic_smem_bytes(), BC_CONV_HALO_SMEM);
        assert!(Kernel::ConvHaloN64.sm90a_only());
    }

    /// The wgmma prototype tile runs its own kernels (one warpgroup of 64 rows for hd64, two of
    /// 128 rows for hd128), and is never the tuner's.
    /// The launch of `tile` at `head_dim` for a 100-row group of 2 heads (null tables: only
    /// the launch shape is looked at).
    fn null_attention(tile: AttentionTile, head_dim: usize) -> Launch<BcAttentionParams> {
        use std::ptr::{null, null_mut};
        attention(
            null(),
            null_mut(),
            2,
            head_dim,
            null(),
            null(),
            null(),
            1,
            100,
            tile,
            AttnSplit::NONE,
        )
        .unwrap()
    }

    #[test]
    fn wgmma_tile_launches_its_kernels() {
        let t = AttentionTile::Wgmma64;
        assert!(
            !AttentionTile::ALL.contains(&t),
            "the tuner must never pick it"
        );
        let l = |hd| null_attention(t, hd);
        let (a, b) = (l(64), l(128));
        assert_eq!(
            (a.kernel, a.block, a.grid[0]),
            (Kernel::AttentionWgmmaHd64, 128, 2)
        );
        assert_eq!(
            (b.kernel, b.block, b.grid[0]),
            (Kernel::AttentionWgmmaHd128, 256, 1)
        );
        assert_eq!(
            b.kernel.dynamic_smem_bytes(),
            BC_ATTN_WGMMA_HD128_SMEM,
            "hd128 tiles need their own shared memory"
        );
        // The variants: their own hd128 kernels, the same launch shape, the prototype's hd64.
        let mut kernels = vec![b.kernel];
        for v in [
            AttentionTile::WgmmaK128,
            AttentionTile::WgmmaPp,
            AttentionTile::WgmmaPpK128,
            AttentionTile::WgmmaWs,
            AttentionTile::WgmmaWsDeep,
        ] {
            assert!(!AttentionTile::ALL.contains(&v) && v.is_wgmma());
            let l = |hd| null_attention(v, hd);
            let (a, c) = (l(64), l(128));
            assert_eq!(a.kernel, Kernel::AttentionWgmmaHd64);
            // (the warp-specialized kernel: one more warpgroup, the producer)
            let threads = if matches!(v, AttentionTile::WgmmaWs | AttentionTile::WgmmaWsDeep) {
                384
            } else {
                256
            };
            assert_eq!((c.block, c.grid[0]), (threads, 1));
            assert!(!kernels.contains(&c.kernel), "{v:?}");
            kernels.push(c.kernel);
        }
        assert_eq!(
            Kernel::AttentionWgmmaHd128PpK128.dynamic_smem_bytes(),
            BC_ATTN_WGMMA_K128_SMEM
        );
        assert_eq!(
            AttentionTile::wgmma_variant(Some("pp")),
            Ok(AttentionTile::WgmmaPp)
        );
        assert_eq!(
            AttentionTile::wgmma_variant(None),
            Ok(AttentionTile::Wgmma64)
        );
        assert_eq!(
            AttentionTile::wgmma_variant(Some("ws")),
            Ok(AttentionTile::WgmmaWs)
        );
        assert_eq!(
            Kernel::AttentionWgmmaHd128Ws.dynamic_smem_bytes(),
            BC_ATTN_WS_SMEM
        );
        assert_eq!(
            AttentionTile::wgmma_variant(Some("ws_deep")),
            Ok(AttentionTile::WgmmaWsDeep)
        );
        assert_eq!(
            Kernel::AttentionWgmmaHd128WsDeep.dynamic_smem_bytes(),
            BC_ATTN_WS_SMEM
        );
        assert!(AttentionTile::wgmma_variant(Some("ping")).is_err());
    }

    /// The module loads on every sm_80+ GPU: a kernel wanting more dynamic shared memory than
    /// sm_86 / sm_89 allow (99 KB) must be one that runs on sm_90a only (the loader lets those
    /// go without their opt-in elsewhere).
    #[test]
    fn only_sm90a_kernels_need_more_than_99_kb() {
        for k in Kernel::ALL {
            if k.dynamic_smem_bytes() > 99 * 1024 {
                assert!(
                    k.sm90a_only(),
                    "{}: {} bytes",
                    k.name(),
                    k.dynamic_smem_bytes()
                );
            }
        }
        assert!(Kernel::AttentionWgmmaHd128.dynamic_smem_bytes() > 99 * 1024);
        assert!(!Kernel::AttentionHd128Q128.sm90a_only());
    }
}
