//! The CUDA kernels run on the CPU through the SIMT emulation layer (`cuda/emu/`).
//!
//! Every `cuda/*.cu` is compiled as host C++ into a static library with one `extern "C"`
//! entry point per kernel (`bc_emu_<kernel>`), which runs the kernel's blocks with CUDA
//! semantics (threads as fibers, real barriers and warp collectives). The same source is what
//! nvcc compiles, so these functions test the kernels without a GPU. Divergent barriers and
//! bad warp-collective masks come back as [`LaunchError`](super::LaunchError)s rather than hangs,
//! and so does a kernel that loops forever through them (a block past the step budget,
//! [`set_step_limit`]).
//!
//! [`launch_raw`] takes a kernel, launch dimensions and a params struct (from
//! [`super::params`]); the safe wrappers below check buffer sizes, then build the params,
//! grid and block through [`super::launch`], the constructors the GPU backend launches
//! with too, and mirror the CPU reference ops in [`crate::backend::cpu::ops`] /
//! [`crate::backend::cpu::attention`]. bf16 buffers are `half::bf16`.
#![allow(clippy::too_many_arguments)]

pub use super::launch::AttentionTile;
use super::launch::{self, i32_of, Launch};
use super::params::*;
use super::{invalid, Kernel, LaunchResult};
use half::bf16;
use std::ffi::c_void;
use std::ops::Range;

pub mod decode;
mod ffi;
mod tma;

pub use tma::{
    tma_probe, tma_probe_global_map, tma_probe_params, tma_probe_wgmma, tma_probe_wgmma_params,
    tma_probe_wgmma_spec, TmaProbeCase,
};

pub use ffi::{dims, launch_raw, set_step_limit};

/// Runs a launch built by [`super::launch`] (or a test kernel's).
fn run<P>(l: LaunchResult<Launch<P>>) -> LaunchResult {
    let l = l?;
    // SAFETY: the wrappers below build the params from slices whose sizes they checked
    // against the extents the kernel touches for this grid.
    unsafe {
        launch_raw(
            l.kernel,
            &dims(l.kernel, l.grid, [l.block, 1, 1]),
            &l.params as *const P as *const c_void,
        )
    }
}

fn check_len(kernel: Kernel, what: &str, have: usize, need: usize) -> LaunchResult {
    if have < need {
        return Err(invalid(
            kernel,
            format!("{what} has {have} values, needs {need}"),
        ));
    }
    Ok(())
}

fn check_align<T>(kernel: Kernel, what: &str, p: *const T, align: usize) -> LaunchResult {
    if (p as usize) % align != 0 {
        return Err(invalid(
            kernel,
            format!("{what} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

fn opt_ptr<T>(v: Option<&[T]>) -> *const T {
    v.map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Rows of `x_len` values for the per-frame kernels: `dim` even and dividing `x_len`,
/// `tokens_per_frame > 0`.
fn frame_rows(k: Kernel, x_len: usize, dim: usize, tokens_per_frame: usize) -> LaunchResult<usize> {
    if dim == 0 || dim % 2 != 0 || tokens_per_frame == 0 || x_len % dim != 0 {
        return Err(invalid(
            k,
            "dim must be even and divide x.len(); tokens_per_frame > 0",
        ));
    }
    Ok(x_len / dim)
}

/// Values a per-frame table `[frames, frame_stride]` needs for `rows` rows of `dim`.
/// `usize::MAX` when that overflows (no slice is that long, so the length check fails).
fn frame_table_len(rows: usize, tokens_per_frame: usize, frame_stride: usize, dim: usize) -> usize {
    match rows.div_ceil(tokens_per_frame) {
        0 => 0,
        frames => (frames - 1)
            .checked_mul(frame_stride)
            .and_then(|v| v.checked_add(dim))
            .unwrap_or(usize::MAX),
    }
}

/// `bc_ln_modulate` (the math: `cuda/norm.cu`): `x` `[rows, dim]` f32, `shift`/`scale` `[frames, frame_stride]`, row r using frame
/// `r / tokens_per_frame`, `out` `[rows, dim]` bf16.
pub fn ln_modulate(
    x: &[f32],
    dim: usize,
    eps: f32,
    tokens_per_frame: usize,
    shift: &[f32],
    scale: &[f32],
    frame_stride: usize,
    shift_bias: Option<&[f32]>,
    scale_bias: Option<&[f32]>,
    out: &mut [bf16],
) -> LaunchResult {
    let k = Kernel::LnModulate;
    let rows = frame_rows(k, x.len(), dim, tokens_per_frame)?;
    let need = frame_table_len(rows, tokens_per_frame, frame_stride, dim);
    check_len(k, "shift", shift.len(), need)?;
    check_len(k, "scale", scale.len(), need)?;
    check_len(k, "out", out.len(), rows * dim)?;
    for b in [shift_bias, scale_bias].into_iter().flatten() {
        check_len(k, "bias", b.len(), dim)?;
    }
    run(launch::ln_modulate(
        x.as_ptr(),
        out.as_mut_ptr().cast(),
        rows,
        dim,
        eps,
        tokens_per_frame,
        shift.as_ptr(),
        scale.as_ptr(),
        frame_stride,
        opt_ptr(shift_bias),
        opt_ptr(scale_bias),
    ))
}

/// `bc_layer_norm_affine` (`cuda/norm.cu`): `x` `[rows, dim]` f32, `out` bf16.
pub fn layer_norm_affine(
    x: &[f32],
    dim: usize,
    eps: f32,
    weight: &[f32],
    bias: &[f32],
    out: &mut [bf16],
) -> LaunchResult {
    let k = Kernel::LayerNormAffine;
    if dim == 0 || dim % 2 != 0 || x.len() % dim != 0 {
        return Err(invalid(k, "dim must be even and divide x.len()"));
    }
    let rows = x.len() / dim;
    check_len(k, "weight", weight.len(), dim)?;
    check_len(k, "bias", bias.len(), dim)?;
    check_len(k, "out", out.len(), rows * dim)?;
    run(launch::layer_norm_affine(
        x.as_ptr(),
        out.as_mut_ptr().cast(),
        rows,
        dim,
        eps,
        weight.as_ptr(),
        bias.as_ptr(),
    ))
}

/// `bc_gated_residual` (`cuda/norm.cu`; `gate = None`: no gate): `x` `[rows, dim]` f32, `delta` `[rows, dim]` bf16, `gate` `[frames, frame_stride]`.
pub fn gated_residual(
    x: &mut [f32],
    delta: &[bf16],
    dim: usize,
    tokens_per_frame: usize,
    gate: Option<(&[f32], usize)>,
    gate_bias: Option<&[f32]>,
) -> LaunchResult {
    let k = Kernel::GatedResidual;
    let rows = frame_rows(k, x.len(), dim, tokens_per_frame)?;
    check_len(k, "delta", delta.len(), rows * dim)?;
    let (gate_ptr, frame_stride) = match gate {
        Some((g, fs)) => {
            let need = frame_table_len(rows, tokens_per_frame, fs, dim);
            check_len(k, "gate", g.len(), need)?;
            (g.as_ptr(), fs)
        }
        None => (std::ptr::null(), 0),
    };
    if let Some(b) = gate_bias {
        check_len(k, "gate_bias", b.len(), dim)?;
    }
    run(launch::gated_residual(
        x.as_mut_ptr(),
        delta.as_ptr().cast(),
        rows,
        dim,
        tokens_per_frame,
        gate_ptr,
        frame_stride,
        opt_ptr(gate_bias),
    ))
}

/// The LayerNorm [`residual_norm`] applies after the residual add.
#[derive(Clone, Copy, Debug)]
pub struct NormMod<'a> {
    /// Per-frame shift `[frames, stride]` (the bias of an affine LayerNorm, `stride` 0).
    pub shift: &'a [f32],
    /// Per-frame scale `[frames, stride]` (the weight of an affine LayerNorm, `stride` 0).
    pub scale: &'a [f32],
    /// Frame stride of `shift` and `scale` (0: the same vector for every frame).
    pub stride: usize,
    /// Optional `[dim]` added to every frame's shift.
    pub shift_bias: Option<&'a [f32]>,
    /// Optional `[dim]` added to every frame's scale.
    pub scale_bias: Option<&'a [f32]>,
    /// `LN * scale + shift` (affine) instead of `LN * (1 + scale) + shift` (modulation).
    pub affine: bool,
}

/// `bc_residual_norm` (`cuda/norm.cu`): [`gated_residual`] on `x`, then the LayerNorm `norm`
/// of the updated rows into `out` `[rows, dim]` bf16 (as [`ln_modulate`] or, affine, as
/// [`layer_norm_affine`]), in one pass.
pub fn residual_norm(
    x: &mut [f32],
    delta: &[bf16],
    dim: usize,
    eps: f32,
    tokens_per_frame: usize,
    gate: Option<(&[f32], usize)>,
    gate_bias: Option<&[f32]>,
    norm: &NormMod,
    out: &mut [bf16],
) -> LaunchResult {
    let k = Kernel::ResidualNorm;
    let rows = frame_rows(k, x.len(), dim, tokens_per_frame)?;
    check_len(k, "delta", delta.len(), rows * dim)?;
    check_len(k, "out", out.len(), rows * dim)?;
    let (gate_ptr, gate_stride) = match gate {
        Some((g, fs)) => {
            let need = frame_table_len(rows, tokens_per_frame, fs, dim);
            check_len(k, "gate", g.len(), need)?;
            (g.as_ptr(), fs)
        }
        None => (std::ptr::null(), 0),
    };
    let need = frame_table_len(rows, tokens_per_frame, norm.stride, dim);
    check_len(k, "shift", norm.shift.len(), need)?;
    check_len(k, "scale", norm.scale.len(), need)?;
    for b in [gate_bias, norm.shift_bias, norm.scale_bias]
        .into_iter()
        .flatten()
    {
        check_len(k, "bias", b.len(), dim)?;
    }
    run(launch::residual_norm(
        x.as_mut_ptr(),
        delta.as_ptr().cast(),
        out.as_mut_ptr().cast(),
        rows,
        dim,
        eps,
        tokens_per_frame,
        gate_ptr,
        gate_stride,
        opt_ptr(gate_bias),
        norm.shift.as_ptr(),
        norm.scale.as_ptr(),
        norm.stride,
        opt_ptr(norm.shift_bias),
        opt_ptr(norm.scale_bias),
        norm.affine,
    ))
}

/// Arguments of [`qk_norm_rope`] besides the data.
#[derive(Clone, Copy, Debug)]
pub struct QkNormRope<'a> {
    /// Heads per row.
    pub heads: usize,
    /// Head dimension (even).
    pub head_dim: usize,
    /// Rows per latent frame (`hp * wp`).
    pub tokens_per_frame: usize,
    /// Patch columns per frame row.
    pub wp: usize,
    /// Absolute index of local frame 0 (temporal RoPE position) when `frame_pos` is `None`.
    pub first_frame: i32,
    /// Absolute frame index of every local frame.
    pub frame_pos: Option<&'a [i32]>,
    /// Cache slot of every local frame: row r goes to row `slot * tpf + r % tpf` of `out`.
    pub frame_slot: Option<&'a [i32]>,
    /// RMSNorm weight `[heads*head_dim]` (None: no norm).
    pub norm_weight: Option<&'a [f32]>,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Whether to apply RoPE.
    pub rope: bool,
}

/// `bc_qk_norm_rope` (`cuda/qk_norm_rope.cu`): `x` `[rows, heads*head_dim]` bf16 into `out`
/// (contiguous rows, or cache slots of `[tokens_per_frame, dim]` with `frame_slot`).
pub fn qk_norm_rope(x: &[bf16], a: &QkNormRope, out: &mut [bf16]) -> LaunchResult {
    let k = Kernel::QkNormRope;
    let dim = a.heads * a.head_dim;
    if dim == 0 || a.head_dim % 2 != 0 || a.tokens_per_frame == 0 || a.wp == 0 || x.len() % dim != 0
    {
        return Err(invalid(k, "bad shape"));
    }
    let rows = x.len() / dim;
    let frames = rows.div_ceil(a.tokens_per_frame);
    if let Some(fp) = a.frame_pos {
        check_len(k, "frame_pos", fp.len(), frames)?;
    }
    match a.frame_slot {
        Some(fs) => {
            check_len(k, "frame_slot", fs.len(), frames)?;
            for &s in &fs[..frames] {
                if s < 0 {
                    return Err(invalid(k, "negative cache slot"));
                }
                let need = (s as usize + 1)
                    .checked_mul(a.tokens_per_frame)
                    .and_then(|v| v.checked_mul(dim))
                    .ok_or_else(|| invalid(k, "cache slot too large"))?;
                check_len(k, "out (cache)", out.len(), need)?;
            }
        }
        None => check_len(k, "out", out.len(), rows * dim)?,
    }
    if let Some(w) = a.norm_weight {
        check_len(k, "norm_weight", w.len(), dim)?;
    }
    run(launch::qk_norm_rope(
        x.as_ptr().cast(),
        dim,
        out.as_mut_ptr().cast(),
        rows,
        a.heads,
        a.head_dim,
        a.tokens_per_frame,
        a.wp,
        opt_ptr(a.norm_weight),
        opt_ptr(a.frame_pos),
        opt_ptr(a.frame_slot),
        a.first_frame,
        a.rope,
        a.eps,
    ))
}

/// A run of keys and values for [`attention`]: rows of `heads*head_dim` bf16 values.
#[derive(Clone, Copy, Debug)]
pub struct KvSegment<'a> {
    /// Keys `[tokens, dim]`.
    pub k: &'a [bf16],
    /// Values `[tokens, dim]`.
    pub v: &'a [bf16],
}

/// Query rows that see the same list of segments.
#[derive(Clone, Debug)]
pub struct QueryGroup {
    /// Query rows of the group.
    pub rows: Range<usize>,
    /// Indices into the segment list.
    pub segments: Vec<usize>,
}

/// `bc_attention_hd64` / `bc_attention_hd128` (`cuda/attention.cu`): `q` and `out`
/// `[nq, heads*head_dim]` bf16; each group's rows attend to its segments; scale
/// `1/sqrt(head_dim)`. Rows not in any group are left untouched.
pub fn attention(
    q: &[bf16],
    heads: usize,
    head_dim: usize,
    segments: &[KvSegment],
    groups: &[QueryGroup],
    out: &mut [bf16],
    tile: AttentionTile,
) -> LaunchResult {
    attention_split(q, heads, head_dim, segments, groups, out, tile, 1)
}

/// [`attention`] with `splits` key splits (split-KV): the attention kernel writes each split's
/// partial result into a scratch buffer (NaN-poisoned first, so a partial the combine reads but
/// no block wrote shows), then `bc_attention_combine` merges them into `out`. `splits` 1 is
/// [`attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_split(
    q: &[bf16],
    heads: usize,
    head_dim: usize,
    segments: &[KvSegment],
    groups: &[QueryGroup],
    out: &mut [bf16],
    tile: AttentionTile,
    splits: usize,
) -> LaunchResult {
    let dim = heads * head_dim;
    let k = tile.kernel(head_dim);
    if dim == 0 || head_dim % 8 != 0 || head_dim > 128 || q.len() % dim != 0 {
        return Err(invalid(
            k,
            "head_dim must be a multiple of 8 and at most 128",
        ));
    }
    let nq = q.len() / dim;
    check_len(k, "out", out.len(), nq * dim)?;
    check_align(k, "q", q.as_ptr(), 16)?;
    check_align(k, "out", out.as_ptr(), 16)?;
    let mut segs = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        if s.k.len() % dim != 0 || s.v.len() != s.k.len() {
            return Err(invalid(k, format!("segment {i}: k/v sizes")));
        }
        check_align(k, "segment k", s.k.as_ptr(), 16)?;
        check_align(k, "segment v", s.v.as_ptr(), 16)?;
        segs.push(BcKvSegment {
            k: s.k.as_ptr() as *const bc_bf16,
            v: s.v.as_ptr() as *const bc_bf16,
            tokens: i32_of(k, s.k.len() / dim, "segment tokens")?,
            _pad: 0,
        });
    }
    let mut index = Vec::new();
    let mut gs = Vec::with_capacity(groups.len());
    let mut max_rows = 0;
    for g in groups {
        if g.rows.start > g.rows.end || g.rows.end > nq {
            return Err(invalid(k, "group rows out of range"));
        }
        if let Some(&bad) = g.segments.iter().find(|&&s| s >= segments.len()) {
            return Err(invalid(k, format!("segment index {bad} out of range")));
        }
        gs.push(BcAttnGroup {
            q_begin: i32_of(k, g.rows.start, "q_begin")?,
            q_rows: i32_of(k, g.rows.len(), "q_rows")?,
            seg_begin: i32_of(k, index.len(), "seg_begin")?,
            seg_count: i32_of(k, g.segments.len(), "seg_count")?,
        });
        index.extend(g.segments.iter().map(|&s| s as i32));
        max_rows = max_rows.max(g.rows.len());
    }
    if gs.is_empty() || max_rows == 0 {
        return Ok(());
    }
    let bytes = launch::attention_split_bytes(heads, head_dim, gs.len(), max_rows, tile, splits)
        .ok_or_else(|| invalid(k, "split scratch too large"))?;
    /// 16-byte aligned floats (the kernel stores float2, the combine loads float4).
    #[repr(C, align(16))]
    #[derive(Clone, Copy)]
    struct F4([f32; 4]);
    let mut partial = vec![F4([f32::NAN; 4]); bytes.div_ceil(16)];
    let split = launch::AttnSplit {
        splits,
        partial: if splits > 1 {
            partial.as_mut_ptr().cast()
        } else {
            std::ptr::null_mut()
        },
    };
    run(launch::attention(
        q.as_ptr().cast(),
        out.as_mut_ptr().cast(),
        heads,
        head_dim,
        segs.as_ptr(),
        index.as_ptr(),
        gs.as_ptr(),
        gs.len(),
        max_rows,
        tile,
        split,
    ))?;
    if splits > 1 {
        run(launch::attention_combine(
            out.as_mut_ptr().cast(),
            heads,
            head_dim,
            gs.as_ptr(),
            gs.len(),
            max_rows,
            tile,
            split,
        ))?;
    }
    Ok(())
}

/// Activation selector of [`activation_f32`] / [`activation_bf16`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// GELU, tanh approximation.
    GeluTanh,
    /// SiLU.
    Silu,
    /// Identity (bias only).
    None,
}

fn activation_raw(
    x: *const c_void,
    x_len: usize,
    out: *mut c_void,
    out_len: usize,
    act: Act,
    is_bf16: bool,
    bias: Option<&[f32]>,
) -> LaunchResult {
    let k = Kernel::Activation;
    if out_len != x_len {
        return Err(invalid(k, "output length differs from input length"));
    }
    let n = x_len;
    let cols = match bias {
        Some(b) if b.is_empty() || n % b.len() != 0 => {
            return Err(invalid(
                k,
                format!("bias of {} values does not divide {n} values", b.len()),
            ))
        }
        Some(b) => b.len(),
        None => 1,
    };
    let op = match act {
        Act::GeluTanh => BC_ACT_GELU_TANH,
        Act::Silu => BC_ACT_SILU,
        Act::None => BC_ACT_NONE,
    };
    run(launch::activation(
        x,
        out,
        n,
        op,
        is_bf16,
        opt_ptr(bias),
        cols,
    ))
}

/// `bc_activation` (`cuda/elementwise.cu`) in place on f32 values.
pub fn activation_f32(x: &mut [f32], act: Act) -> LaunchResult {
    let px = x.as_mut_ptr() as *mut c_void;
    activation_raw(px, x.len(), px, x.len(), act, false, None)
}

/// `bc_activation` with a bias (`cuda/elementwise.cu`; the unfused GEMM epilogue) on f32
/// values.
pub fn bias_activation_f32(x: &[f32], bias: &[f32], out: &mut [f32], act: Act) -> LaunchResult {
    let (px, po) = (x.as_ptr() as *const c_void, out.as_mut_ptr() as *mut c_void);
    activation_raw(px, x.len(), po, out.len(), act, false, Some(bias))
}

/// [`bias_activation_f32`] on bf16 values.
pub fn bias_activation_bf16(x: &[bf16], bias: &[f32], out: &mut [bf16], act: Act) -> LaunchResult {
    let (px, po) = (x.as_ptr() as *const c_void, out.as_mut_ptr() as *mut c_void);
    activation_raw(px, x.len(), po, out.len(), act, true, Some(bias))
}

/// `bc_activation` as a conversion (`BC_ACT_F32_TO_BF16`): f32 `x` to bf16 `out` (what the
/// driver device runs before a fused bf16-output GEMM, to hand cuBLASLt a bf16 bias).
pub fn f32_to_bf16(x: &[f32], out: &mut [bf16]) -> LaunchResult {
    check_len(Kernel::Activation, "out", out.len(), x.len())?;
    run(launch::f32_to_bf16(
        x.as_ptr(),
        out.as_mut_ptr() as *mut c_void,
        x.len(),
    ))
}

/// `bc_activation` (`cuda/elementwise.cu`) in place on bf16 values.
pub fn activation_bf16(x: &mut [bf16], act: Act) -> LaunchResult {
    let px = x.as_mut_ptr() as *mut c_void;
    activation_raw(px, x.len(), px, x.len(), act, true, None)
}

/// `bc_time_embedding` (`cuda/elementwise.cu`) of every timestep in `t`, `out`
/// `[t.len(), freq_dim]`.
pub fn time_embedding(t: &[f32], freq_dim: usize, out: &mut [f32]) -> LaunchResult {
    let k = Kernel::TimeEmbedding;
    if freq_dim % 2 != 0 {
        return Err(invalid(k, "freq_dim must be even"));
    }
    check_len(k, "out", out.len(), t.len() * freq_dim)?;
    run(launch::time_embedding(
        t.as_ptr(),
        out.as_mut_ptr(),
        t.len(),
        freq_dim,
    ))
}

/// `bc_patchify` (`patchify`) or `bc_unpatchify` after checking both buffers' lengths.
fn patch(
    patchify: bool,
    lat: *mut f32,
    lat_len: usize,
    rows: *mut bc_bf16,
    rows_len: usize,
    frames: usize,
    ch: usize,
    h: usize,
    w: usize,
) -> LaunchResult {
    let k = if patchify {
        Kernel::Patchify
    } else {
        Kernel::Unpatchify
    };
    if h % 2 != 0 || w % 2 != 0 {
        return Err(invalid(k, "h and w must be even"));
    }
    let n = frames
        .checked_mul(ch)
        .and_then(|v| v.checked_mul(h))
        .and_then(|v| v.checked_mul(w))
        .ok_or_else(|| invalid(k, "frames x channels x h x w overflows"))?;
    check_len(k, "latents", lat_len, n)?;
    check_len(k, "rows", rows_len, n)?;
    run(launch::patch(patchify, lat, rows, frames, ch, h, w))
}

/// `bc_patchify` (`cuda/patch.cu`): latents `[frames, ch, h, w]` to patch rows
/// `[frames*(h/2)*(w/2), ch*4]`.
pub fn patchify(
    lat: &[f32],
    frames: usize,
    ch: usize,
    h: usize,
    w: usize,
    out: &mut [bf16],
) -> LaunchResult {
    // The kernel only reads the latents.
    let (pl, po) = (lat.as_ptr() as *mut f32, out.as_mut_ptr().cast());
    patch(true, pl, lat.len(), po, out.len(), frames, ch, h, w)
}

/// `bc_unpatchify` (`cuda/patch.cu`): head rows back to latents `[frames, ch, h, w]`.
pub fn unpatchify(
    rows: &[bf16],
    frames: usize,
    ch: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
) -> LaunchResult {
    // The kernel only reads the rows.
    let (pr, po) = (rows.as_ptr() as *mut bc_bf16, out.as_mut_ptr());
    patch(false, po, out.len(), pr, rows.len(), frames, ch, h, w)
}

/// `bc_flow_step` (`cuda/elementwise.cu`); `next = None`: no renoise; `x0_out` receives x0.
pub fn flow_step(
    x: &mut [f32],
    v: &[f32],
    frame_elems: usize,
    sigma: &[f32],
    next: Option<(&[f32], &[f32])>,
    x0_out: Option<&mut [f32]>,
) -> LaunchResult {
    let k = Kernel::FlowStep;
    if frame_elems == 0 || x.len() % frame_elems != 0 {
        return Err(invalid(k, "frame_elems must divide x.len()"));
    }
    let frames = x.len() / frame_elems;
    check_len(k, "v", v.len(), x.len())?;
    check_len(k, "sigma", sigma.len(), frames)?;
    let (sn, noise) = match next {
        Some((sn, noise)) => {
            check_len(k, "sigma_next", sn.len(), frames)?;
            check_len(k, "noise", noise.len(), x.len())?;
            (sn.as_ptr(), noise.as_ptr())
        }
        None => (std::ptr::null(), std::ptr::null()),
    };
    let x0 = match x0_out {
        Some(o) => {
            check_len(k, "x0_out", o.len(), x.len())?;
            o.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    run(launch::flow_step(
        x.as_mut_ptr(),
        v.as_ptr(),
        noise,
        x0,
        sigma.as_ptr(),
        sn,
        frames,
        frame_elems,
    ))
}

/// `bc_copy` (`cuda/copy.cu`): every `(src, dst)` pair; the two slices of a pair must have equal
/// lengths. `blocks_per_region` is the grid's x size.
pub fn copy(regions: &mut [(&[u8], &mut [u8])], blocks_per_region: u32) -> LaunchResult {
    let k = Kernel::Copy;
    let mut table = Vec::with_capacity(regions.len());
    for (src, dst) in regions.iter_mut() {
        if src.len() != dst.len() {
            return Err(invalid(k, "source and destination lengths differ"));
        }
        table.push(BcCopyRegion {
            src: src.as_ptr() as *const c_void,
            dst: dst.as_mut_ptr() as *mut c_void,
            bytes: src.len() as i64,
        });
    }
    if table.is_empty() {
        return Ok(());
    }
    run(launch::copy(table.as_ptr(), table.len(), blocks_per_region))
}

/// Where [`t5_rms_norm`] writes: bf16 (a GEMM input) or f32 (the encoder's output).
#[derive(Debug)]
pub enum T5NormOut<'a> {
    /// bf16 rows.
    Bf16(&'a mut [bf16]),
    /// f32 rows.
    F32(&'a mut [f32]),
}

/// Values a table of `rows` rows of `cols` values with row stride `stride` spans.
fn strided_len(rows: usize, cols: usize, stride: usize) -> usize {
    match rows {
        0 => 0,
        r => (r - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(cols))
            .unwrap_or(usize::MAX),
    }
}

/// `bc_t5_rms_norm` (`cuda/t5.cu`): `x += delta` (when given, written back), then T5's RMS
/// norm of `x` `[rows, dim]` times `weight` into `out`.
pub fn t5_rms_norm(
    x: &mut [f32],
    delta: Option<&[f32]>,
    weight: &[f32],
    dim: usize,
    eps: f32,
    out: T5NormOut,
) -> LaunchResult {
    let k = Kernel::T5RmsNorm;
    if dim == 0 || x.len() % dim != 0 {
        return Err(invalid(k, "dim must divide x.len()"));
    }
    let rows = x.len() / dim;
    if let Some(d) = delta {
        check_len(k, "delta", d.len(), x.len())?;
    }
    check_len(k, "weight", weight.len(), dim)?;
    let (po, f32_out) = match out {
        T5NormOut::Bf16(o) => {
            check_len(k, "out", o.len(), x.len())?;
            (o.as_mut_ptr() as *mut c_void, false)
        }
        T5NormOut::F32(o) => {
            check_len(k, "out", o.len(), x.len())?;
            (o.as_mut_ptr() as *mut c_void, true)
        }
    };
    run(launch::t5_rms_norm(
        x.as_mut_ptr(),
        opt_ptr(delta),
        weight.as_ptr(),
        po,
        f32_out,
        rows,
        dim,
        eps,
    ))
}

/// `bc_t5_gated_gelu` (`cuda/t5.cu`): `out[r, c] = gelu_tanh(gate[r, c]) * lin[r, c]` for
/// `rows` rows of `cols` values; `gate` and `lin` have rows of `in_stride` values.
pub fn t5_gated_gelu(
    gate: &[f32],
    lin: &[f32],
    in_stride: usize,
    rows: usize,
    cols: usize,
    out: &mut [bf16],
) -> LaunchResult {
    let k = Kernel::T5GatedGelu;
    if cols > in_stride {
        return Err(invalid(k, "cols must be at most in_stride"));
    }
    let need = strided_len(rows, cols, in_stride);
    check_len(k, "gate", gate.len(), need)?;
    check_len(k, "lin", lin.len(), need)?;
    check_len(k, "out", out.len(), rows.saturating_mul(cols))?;
    run(launch::t5_gated_gelu(
        gate.as_ptr(),
        lin.as_ptr(),
        in_stride,
        out.as_mut_ptr().cast(),
        rows,
        cols,
    ))
}

/// The tensors of one [`t5_attention`] call.
#[derive(Clone, Copy, Debug)]
pub struct T5Attention<'a> {
    /// Queries: `rows` rows of `qkv_stride` f32, head h at columns `h * head_dim`.
    pub q: &'a [f32],
    /// Keys, same layout.
    pub k: &'a [f32],
    /// Values, same layout.
    pub v: &'a [f32],
    /// Row stride of `q`, `k`, `v`.
    pub qkv_stride: usize,
    /// The layer's position bias `[buckets, heads]`.
    pub rel_bias: &'a [f32],
    /// Bucket of relative position `d = key - query` at index `d + rows - 1` (`2 rows - 1`
    /// entries).
    pub bucket: &'a [i32],
    /// Number of tokens.
    pub rows: usize,
    /// Heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// `bc_t5_attention` (`cuda/t5.cu`): T5 attention (relative position bias, no scale) of
/// `a.rows` tokens into `out` `[rows, heads*head_dim]` bf16.
pub fn t5_attention(a: &T5Attention, out: &mut [bf16]) -> LaunchResult {
    let k = Kernel::T5Attention;
    let dim = a.heads.saturating_mul(a.head_dim);
    if dim == 0 || a.rows == 0 || a.qkv_stride < dim {
        return Err(invalid(
            k,
            "need rows, heads, head_dim > 0 and qkv_stride >= heads*head_dim",
        ));
    }
    let need = strided_len(a.rows, dim, a.qkv_stride);
    check_len(k, "q", a.q.len(), need)?;
    check_len(k, "k", a.k.len(), need)?;
    check_len(k, "v", a.v.len(), need)?;
    check_len(k, "out", out.len(), a.rows * dim)?;
    check_len(k, "bucket", a.bucket.len(), 2 * a.rows - 1)?;
    let buckets = a.rel_bias.len() / a.heads;
    if let Some(b) = a.bucket[..2 * a.rows - 1]
        .iter()
        .find(|&&b| b < 0 || b as usize >= buckets)
    {
        return Err(invalid(
            k,
            format!("bucket {b} outside the bias table's {buckets} buckets"),
        ));
    }
    run(launch::t5_attention(
        a.q.as_ptr(),
        a.k.as_ptr(),
        a.v.as_ptr(),
        a.qkv_stride,
        out.as_mut_ptr().cast(),
        a.rel_bias.as_ptr(),
        a.bucket[a.rows - 1..].as_ptr(),
        a.rows,
        a.heads,
        a.head_dim,
    ))
}

#[repr(C)]
struct TestParams {
    data: *mut f32,
    n: i32,
    mode: i32,
    arg: i32,
    _pad: i32,
}

/// Runs the emulation-only test kernel `bc_test_sync` over `data` in blocks of `block`
/// threads: mode 0 is correct (every element becomes its block's sum), modes 1-4 are
/// deliberately broken (see `cuda/emu/test_kernels.cu`) and must return an error; modes 5-11
/// do the same for named barriers (5 correct, 6-11 broken), 20-22 for mbarrier waits (20
/// correct) and 30-33 for the race check of asynchronous copies (30 correct, blocks of 256).
#[doc(hidden)]
pub fn test_sync(data: &mut [f32], block: u32, mode: i32, arg: i32) -> LaunchResult {
    let k = Kernel::TestSync;
    if block == 0 || block > 1024 || data.len() % block as usize != 0 {
        return Err(invalid(
            k,
            "data must be whole blocks of at most 1024 threads",
        ));
    }
    let p = TestParams {
        data: data.as_mut_ptr(),
        n: data.len() as i32,
        mode,
        arg,
        _pad: 0,
    };
    run(Ok(Launch {
        kernel: k,
        grid: [data.len() as u32 / block, 1, 1],
        block,
        params: p,
    }))
}

/// Params of the layout test kernel `bc_test_mma` (declared in `cuda/test/test_mma.cu`, not in
/// `params.h`: the engine never launches it).
#[doc(hidden)]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TestMmaParams {
    /// A `[16][16]` bf16.
    pub a: *const bc_bf16,
    /// B `[16][8]` (k, n).
    pub b: *const bc_bf16,
    /// B transposed `[8][16]` (n, k).
    pub bt: *const bc_bf16,
    /// C `[16][8]` f32.
    pub c: *const f32,
    /// D through ldmatrix.trans `[16][8]` f32.
    pub d1: *mut f32,
    /// D through direct B fragments `[16][8]` f32.
    pub d2: *mut f32,
}

/// Runs the tensor-core layout test kernel `bc_test_mma` (one warp): `a` `[16][16]`, `b`
/// `[16][8]` (k, n), `c` `[16][8]`; returns `(d1, d2)`, both `A.B + C` `[16][8]` computed
/// through ldmatrix.trans and through direct fragment loads of `B^T`.
#[doc(hidden)]
pub fn test_mma(a: &[bf16], b: &[bf16], c: &[f32]) -> LaunchResult<(Vec<f32>, Vec<f32>)> {
    let k = Kernel::TestMma;
    check_len(k, "a", a.len(), 256)?;
    check_len(k, "b", b.len(), 128)?;
    check_len(k, "c", c.len(), 128)?;
    let bt: Vec<bf16> = (0..128).map(|i| b[(i % 16) * 8 + i / 16]).collect();
    let (mut d1, mut d2) = (vec![f32::NAN; 128], vec![f32::NAN; 128]);
    let p = TestMmaParams {
        a: a.as_ptr() as *const bc_bf16,
        b: b.as_ptr() as *const bc_bf16,
        bt: bt.as_ptr() as *const bc_bf16,
        c: c.as_ptr(),
        d1: d1.as_mut_ptr(),
        d2: d2.as_mut_ptr(),
    };
    run(Ok(Launch {
        kernel: k,
        grid: [1, 1, 1],
        block: 32,
        params: p,
    }))?;
    Ok((d1, d2))
}

/// The shared-memory layouts the wgmma probe checks: the descriptor's swizzle code and a name
/// for the PASS/FAIL lines.
#[doc(hidden)]
pub const WGMMA_PROBE_LAYOUTS: [(i32, &str); 4] =
    [(0, "none"), (1, "128B"), (2, "64B"), (3, "32B")];

/// The N values of the wgmma probe (the instruction shapes m64n64k16, m64n128k16, m64n256k16).
#[doc(hidden)]
pub const WGMMA_PROBE_NS: [usize; 3] = [64, 128, 256];

/// One run of the wgmma probe: the instruction's N (64, 128, 256), the shared-memory layout
/// (`swizzle`, see `WGMMA_PROBE_LAYOUTS`), where A comes from, a deliberate fault (0 or a
/// `BC_WGMMA_FAULT_*`), one commit group per k-step or one in all, 1 or 2 warpgroups, and B
/// K-major or MN-major (the `imm-trans-b = 1` form P V uses).
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct WgmmaProbeCase {
    /// N of `wgmma.mma_async.m64nNk16`.
    pub n: usize,
    /// Layout and descriptor swizzle: 0 none, 1 128-byte, 2 64-byte, 3 32-byte.
    pub swizzle: i32,
    /// A from registers instead of shared memory.
    pub a_regs: bool,
    /// 0, or a `BC_WGMMA_FAULT_*`.
    pub fault: i32,
    /// One commit group per k-step (wait_group 1 in between).
    pub pipelined: bool,
    /// Warpgroups of the block (1 or 2), each computing the whole output.
    pub warpgroups: usize,
    /// B stored MN-major (`[K][n]`, n contiguous) and read with `imm-trans-b = 1`.
    pub b_mn_major: bool,
}

impl WgmmaProbeCase {
    /// The plain case: A from shared memory, no fault, one group, one warpgroup.
    pub fn new(n: usize, swizzle: i32) -> Self {
        WgmmaProbeCase {
            n,
            swizzle,
            a_regs: false,
            fault: 0,
            pipelined: false,
            warpgroups: 1,
            b_mn_major: false,
        }
    }

    /// Threads of the launch.
    pub fn block(&self) -> u32 {
        BC_WGMMA_PROBE_THREADS * self.warpgroups as u32
    }

    /// Output values: `[warpgroups][64][n]`.
    pub fn out_len(&self) -> usize {
        self.warpgroups * 64 * self.n
    }
}

/// Params of the wgmma probe for `case` after checking it (pointers are the caller's).
#[doc(hidden)]
pub fn wgmma_probe_params(
    a: *const bc_bf16,
    b: *const bc_bf16,
    c: *mut f32,
    case: &WgmmaProbeCase,
) -> LaunchResult<BcWgmmaProbeParams> {
    let k = Kernel::WgmmaProbe;
    let WgmmaProbeCase {
        n,
        swizzle,
        a_regs,
        fault,
        pipelined,
        warpgroups,
        b_mn_major,
    } = *case;
    if !WGMMA_PROBE_NS.contains(&n) {
        return Err(invalid(k, format!("n = {n}: must be 64, 128 or 256")));
    }
    if !(0..=3).contains(&swizzle) {
        return Err(invalid(k, format!("swizzle = {swizzle}: must be 0..=3")));
    }
    if !(0..=BC_WGMMA_FAULT_UNPUBLISHED as i32).contains(&fault) {
        return Err(invalid(
            k,
            format!("fault = {fault}: not a BC_WGMMA_FAULT_*"),
        ));
    }
    if !b_mn_major && [BC_WGMMA_FAULT_LBO, BC_WGMMA_FAULT_NO_TRANS].contains(&(fault as u32)) {
        return Err(invalid(
            k,
            format!("fault = {fault}: only with an MN-major B"),
        ));
    }
    if !(1..=BC_WGMMA_PROBE_MAX_WARPGROUPS as usize).contains(&warpgroups) {
        return Err(invalid(
            k,
            format!("warpgroups = {warpgroups}: must be 1 or 2"),
        ));
    }
    Ok(BcWgmmaProbeParams {
        a,
        b,
        c,
        n: n as i32,
        swizzle,
        a_regs: a_regs as i32,
        fault,
        pipelined: pipelined as i32,
        warpgroups: warpgroups as i32,
        b_mn_major: b_mn_major as i32,
        _pad: 0,
    })
}

/// Runs the Hopper warpgroup-MMA layout probe `bc_wgmma_probe`: returns, per warpgroup,
/// `c[64][n] = a[64][K] . b[n][K]^T` (K = `BC_WGMMA_PROBE_K`, both row-major bf16) computed by
/// wgmma through shared memory as `case` says (a fault must make the result differ, or the
/// emulation report an error). `c` starts as NaN.
#[doc(hidden)]
pub fn wgmma_probe(a: &[bf16], b: &[bf16], case: &WgmmaProbeCase) -> LaunchResult<Vec<f32>> {
    let k = Kernel::WgmmaProbe;
    let kd = BC_WGMMA_PROBE_K as usize;
    let mut c = vec![f32::NAN; case.out_len()];
    let p = wgmma_probe_params(
        a.as_ptr() as *const bc_bf16,
        b.as_ptr() as *const bc_bf16,
        c.as_mut_ptr(),
        case,
    )?;
    check_len(k, "a", a.len(), 64 * kd)?;
    check_len(k, "b", b.len(), case.n * kd)?;
    run(Ok(Launch {
        kernel: k,
        grid: [1, 1, 1],
        block: case.block(),
        params: p,
    }))?;
    Ok(c)
}
