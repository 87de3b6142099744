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
/// `cuda/attention.cu`; the CUDA backend times both at open and keeps the faster).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionTile {
    /// 64 query rows per block, 4 warps, 2 blocks per SM (`bc_attention_hd64`,
    /// `bc_attention_hd128`).
    Rows64,
    /// 128 query rows per block, 8 warps, 1 block per SM (`bc_attention_hd64_q128`,
    /// `bc_attention_hd128_q128`): half the K/V traffic per FLOP. Same key tiles and per-warp
    /// work as [`AttentionTile::Rows64`], so the same output bits.
    Rows128,
}

impl AttentionTile {
    /// Both tiles.
    pub const ALL: [AttentionTile; 2] = [AttentionTile::Rows64, AttentionTile::Rows128];

    /// The kernel for `head_dim` (at most 64: the hd64 kernels, else the hd128 ones).
    pub fn kernel(self, head_dim: usize) -> Kernel {
        match (self, head_dim <= 64) {
            (AttentionTile::Rows64, true) => Kernel::AttentionHd64,
            (AttentionTile::Rows64, false) => Kernel::AttentionHd128,
            (AttentionTile::Rows128, true) => Kernel::AttentionHd64Q128,
            (AttentionTile::Rows128, false) => Kernel::AttentionHd128Q128,
        }
    }

    /// Query rows per block.
    pub fn rows(self) -> u32 {
        match self {
            AttentionTile::Rows64 => BC_ATTN_BQ,
            AttentionTile::Rows128 => BC_ATTN_WIDE_BQ,
        }
    }

    /// Threads per block.
    pub fn threads(self) -> u32 {
        match self {
            AttentionTile::Rows64 => BC_ATTN_THREADS,
            AttentionTile::Rows128 => BC_ATTN_WIDE_THREADS,
        }
    }

    /// Short name (`rows64`, `rows128`), as `BC_ATTENTION_TILE` takes it.
    pub fn name(self) -> &'static str {
        match self {
            AttentionTile::Rows64 => "rows64",
            AttentionTile::Rows128 => "rows128",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(s: &str) -> Option<AttentionTile> {
        Self::ALL.into_iter().find(|t| t.name() == s.trim())
    }
}

/// The attention kernel (`cuda/attention.cu`) of `tile` for `head_dim` (`bc_attention_hd64*` for `head_dim <= 64`,
/// else `bc_attention_hd128*`): `q` and `out` rows of `heads*head_dim`, tables `segments` /
/// `seg_index` / `groups` (`num_groups` entries), `max_rows` the largest group, scale
/// `1/sqrt(head_dim)`. Grid (ceil(max_rows / `tile.rows()`), heads, num_groups), block
/// `tile.threads()` (and the kernel's [`Kernel::dynamic_smem_bytes`]).
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
) -> LaunchResult<Launch<BcAttentionParams>> {
    let k = tile.kernel(head_dim);
    let dim = i32_of(k, mul(k, heads, head_dim)?, "dim")?;
    let (heads, num_groups) = (i32_of(k, heads, "heads")?, i32_of(k, num_groups, "groups")?);
    Ok(Launch {
        kernel: k,
        grid: [
            blocks(k, max_rows, tile.rows())?,
            heads as u32,
            num_groups as u32,
        ],
        block: tile.threads(),
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
