//! Kernel launches on device buffers: the params structs of `params.h` filled exactly like
//! the emulated wrappers in [`crate::kernels::emu`] fill them, with the same grids.
#![allow(clippy::too_many_arguments)]

use super::device::{DevPtr, Gpu};
use crate::kernels::emu::Kernel;
use crate::kernels::params::*;
use crate::Result;

fn blocks(n: usize, per: u32) -> u32 {
    n.div_ceil(per as usize) as u32
}

fn p<T>(d: DevPtr) -> *const T {
    d as *const T
}

fn pm<T>(d: DevPtr) -> *mut T {
    d as *mut T
}

/// `out = LN(x) * (1 + scale[f] + scale_bias) + shift[f] + shift_bias` (bf16 out).
pub fn ln_modulate(
    g: &Gpu,
    x: DevPtr,
    out: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
    tpf: usize,
    shift: DevPtr,
    scale: DevPtr,
    frame_stride: usize,
    shift_bias: DevPtr,
    scale_bias: DevPtr,
) -> Result<()> {
    let prm = BcLnModulateParams {
        x: p(x),
        out: pm(out),
        shift: p(shift),
        scale: p(scale),
        shift_bias: p(shift_bias),
        scale_bias: p(scale_bias),
        rows: rows as i32,
        dim: dim as i32,
        x_stride: dim as i32,
        out_stride: dim as i32,
        frame_stride: frame_stride as i32,
        tokens_per_frame: tpf as i32,
        eps,
        _pad: 0,
    };
    // SAFETY: the caller passes buffers of the documented sizes.
    unsafe {
        g.launch(
            Kernel::LnModulate,
            [rows as u32, 1, 1],
            BC_ROW_THREADS,
            &prm,
        )
    }
}

/// `out = LN(x) * weight + bias` (bf16 out).
pub fn layer_norm_affine(
    g: &Gpu,
    x: DevPtr,
    out: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
    weight: DevPtr,
    bias: DevPtr,
) -> Result<()> {
    let prm = BcLayerNormParams {
        x: p(x),
        out: pm(out),
        weight: p(weight),
        bias: p(bias),
        rows: rows as i32,
        dim: dim as i32,
        x_stride: dim as i32,
        out_stride: dim as i32,
        eps,
        _pad: 0,
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            Kernel::LayerNormAffine,
            [rows as u32, 1, 1],
            BC_ROW_THREADS,
            &prm,
        )
    }
}

/// `x += delta * (gate[f] + gate_bias)`; `gate = 0`: `x += delta`.
pub fn gated_residual(
    g: &Gpu,
    x: DevPtr,
    delta: DevPtr,
    rows: usize,
    dim: usize,
    tpf: usize,
    gate: DevPtr,
    frame_stride: usize,
    gate_bias: DevPtr,
) -> Result<()> {
    let prm = BcGatedResidualParams {
        x: pm(x),
        delta: p(delta),
        gate: p(gate),
        gate_bias: p(gate_bias),
        rows: rows as i32,
        dim: dim as i32,
        delta_stride: dim as i32,
        frame_stride: frame_stride as i32,
        tokens_per_frame: tpf as i32,
        _pad: 0,
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            Kernel::GatedResidual,
            [blocks(rows * dim / 2, BC_ELEM_THREADS), 1, 1],
            BC_ELEM_THREADS,
            &prm,
        )
    }
}

/// Arguments of [`qk_norm_rope`].
#[derive(Clone, Copy, Debug)]
pub struct QkArgs {
    /// Input rows (bf16) and their stride.
    pub x: DevPtr,
    /// Row stride of `x`.
    pub x_stride: usize,
    /// Output base (bf16), rows of `heads*head_dim`.
    pub out: DevPtr,
    /// Rows.
    pub rows: usize,
    /// Heads.
    pub heads: usize,
    /// Head dim.
    pub head_dim: usize,
    /// Tokens per frame.
    pub tpf: usize,
    /// Patch columns.
    pub wp: usize,
    /// RMSNorm weight (0: none).
    pub norm: DevPtr,
    /// `[frames]` i32 positions (0: none).
    pub frame_pos: DevPtr,
    /// `[frames]` i32 cache slots (0: contiguous output).
    pub frame_slot: DevPtr,
    /// Apply RoPE.
    pub rope: bool,
    /// RMSNorm eps.
    pub eps: f32,
}

/// RMSNorm + RoPE + store (`bc_qk_norm_rope`).
pub fn qk_norm_rope(g: &Gpu, a: &QkArgs) -> Result<()> {
    let dim = a.heads * a.head_dim;
    let prm = BcQkNormRopeParams {
        x: p(a.x),
        out: pm(a.out),
        norm_weight: p(a.norm),
        frame_pos: p(a.frame_pos),
        frame_slot: p(a.frame_slot),
        rows: a.rows as i32,
        heads: a.heads as i32,
        head_dim: a.head_dim as i32,
        x_stride: a.x_stride as i32,
        out_stride: dim as i32,
        tokens_per_frame: a.tpf as i32,
        wp: a.wp as i32,
        first_frame: 0,
        rope: a.rope as i32,
        _pad: 0,
        eps: a.eps,
        theta: 10000.0,
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            Kernel::QkNormRope,
            [a.rows as u32, 1, 1],
            BC_ROW_THREADS,
            &prm,
        )
    }
}

/// Flash attention over device tables: `segments` (BcKvSegment), `seg_index` (i32),
/// `groups` (BcAttnGroup); `max_rows` is the largest group (sets grid.x).
pub fn attention(
    g: &Gpu,
    q: DevPtr,
    out: DevPtr,
    heads: usize,
    head_dim: usize,
    segments: DevPtr,
    seg_index: DevPtr,
    groups: DevPtr,
    num_groups: usize,
    max_rows: usize,
) -> Result<()> {
    let dim = heads * head_dim;
    let k = if head_dim <= 64 {
        Kernel::AttentionHd64
    } else {
        Kernel::AttentionHd128
    };
    let prm = BcAttentionParams {
        q: p(q),
        out: pm(out),
        segments: p(segments),
        seg_index: p(seg_index),
        groups: p(groups),
        num_groups: num_groups as i32,
        heads: heads as i32,
        head_dim: head_dim as i32,
        q_stride: dim as i32,
        kv_stride: dim as i32,
        out_stride: dim as i32,
        scale: 1.0 / (head_dim as f32).sqrt(),
        _pad: 0,
    };
    let grid = [
        blocks(max_rows, BC_ATTN_BQ),
        heads as u32,
        num_groups as u32,
    ];
    // SAFETY: as above.
    unsafe { g.launch(k, grid, BC_ATTN_THREADS, &prm) }
}

/// `x = act(x)` in place, `n` values, bf16 or f32.
pub fn activation(g: &Gpu, x: DevPtr, n: usize, gelu: bool, bf16: bool) -> Result<()> {
    let op = if gelu { BC_ACT_GELU_TANH } else { BC_ACT_SILU };
    bias_activation(g, x, NULL, 1, n, op, bf16)
}

/// `x = act(x + bias[i % cols])` in place, `n` values, bf16 or f32 (`op`: `BC_ACT_*`; `bias`
/// [`NULL`] for none): the epilogue of a GEMM that cuBLASLt does not fuse.
pub fn bias_activation(
    g: &Gpu,
    x: DevPtr,
    bias: DevPtr,
    cols: usize,
    n: usize,
    op: u32,
    bf16: bool,
) -> Result<()> {
    let prm = BcActivationParams {
        x: p(x),
        out: pm(x),
        n: n as i64,
        op: op as i32,
        bf16: bf16 as i32,
        bias: p(bias),
        cols: cols.max(1) as i32,
        _pad: 0,
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            Kernel::Activation,
            [blocks(n, BC_ELEM_THREADS), 1, 1],
            BC_ELEM_THREADS,
            &prm,
        )
    }
}

/// Sinusoidal embedding of `frames` timesteps `t` (f32) into `out` `[frames, freq_dim]`.
pub fn time_embedding(
    g: &Gpu,
    t: DevPtr,
    out: DevPtr,
    frames: usize,
    freq_dim: usize,
) -> Result<()> {
    let prm = BcTimeEmbeddingParams {
        t: p(t),
        out: pm(out),
        frames: frames as i32,
        freq_dim: freq_dim as i32,
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            Kernel::TimeEmbedding,
            [frames as u32, 1, 1],
            BC_ELEM_THREADS,
            &prm,
        )
    }
}

/// Latents f32 `[frames, ch, h, w]` -> bf16 patch rows (`patchify = true`) or back.
pub fn patch(
    g: &Gpu,
    patchify: bool,
    latents: DevPtr,
    rows: DevPtr,
    frames: usize,
    ch: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    let prm = BcPatchParams {
        latents: pm(latents),
        rows: pm(rows),
        frames: frames as i32,
        ch: ch as i32,
        h: h as i32,
        w: w as i32,
        row_stride: (ch * 4) as i32,
        _pad: 0,
    };
    let k = if patchify {
        Kernel::Patchify
    } else {
        Kernel::Unpatchify
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            k,
            [blocks(frames * ch * h * w, BC_ELEM_THREADS), 1, 1],
            BC_ELEM_THREADS,
            &prm,
        )
    }
}

/// `x0 = x - sigma[f] v`, optional renoise (see `BcFlowStepParams`).
pub fn flow_step(
    g: &Gpu,
    x: DevPtr,
    v: DevPtr,
    noise: DevPtr,
    x0_out: DevPtr,
    sigma: DevPtr,
    sigma_next: DevPtr,
    frames: usize,
    frame_elems: usize,
) -> Result<()> {
    let prm = BcFlowStepParams {
        x: pm(x),
        v: p(v),
        noise: p(noise),
        x0_out: pm(x0_out),
        sigma: p(sigma),
        sigma_next: p(sigma_next),
        frames: frames as i32,
        frame_elems: frame_elems as i32,
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            Kernel::FlowStep,
            [blocks(frames * frame_elems, BC_ELEM_THREADS), 1, 1],
            BC_ELEM_THREADS,
            &prm,
        )
    }
}

/// Copies every region of the device table `regions` (`BcCopyRegion`).
pub fn copy_regions(
    g: &Gpu,
    regions: DevPtr,
    num_regions: usize,
    blocks_per_region: u32,
) -> Result<()> {
    let prm = BcCopyParams {
        regions: p(regions),
        num_regions: num_regions as i32,
        _pad: 0,
    };
    // SAFETY: as above.
    unsafe {
        g.launch(
            Kernel::Copy,
            [blocks_per_region.max(1), num_regions as u32, 1],
            BC_ELEM_THREADS,
            &prm,
        )
    }
}

/// A null device pointer for optional arguments.
pub const NULL: DevPtr = 0;
