//! Kernel launches on device buffers: the params structs of `params.h`, grids and block sizes
//! come from [`crate::kernels::launch`], the constructors the emulated wrappers in
//! [`crate::kernels::emu`] use too.
#![allow(clippy::too_many_arguments)]

use super::device::{DevPtr, Epilogue, Gpu, OutType};
use crate::kernels::launch::{self, AttentionTile, Launch};
use crate::kernels::params::*;
use crate::kernels::LaunchResult;
use crate::{Error, Result};

/// A device address as a typed pointer for a params field.
fn p<T>(d: DevPtr) -> *const T {
    d as *const T
}

/// A device address as a typed mutable pointer for a params field.
fn pm<T>(d: DevPtr) -> *mut T {
    d as *mut T
}

/// Launches `l` on `g`; a size that does not fit the params is an
/// [`Error::InvalidArgument`].
pub(crate) fn run<P>(g: &Gpu, l: LaunchResult<Launch<P>>) -> Result<()> {
    let l = l.map_err(|e| Error::InvalidArgument(format!("{}: {}", e.kernel, e.message)))?;
    // SAFETY: the callers of the launchers below pass device buffers of the documented sizes.
    unsafe { g.launch(l.kernel, l.grid, l.block, &l.params) }
}

/// `bc_ln_modulate` (the math: `cuda/norm.cu`), bf16 out.
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
    run(
        g,
        launch::ln_modulate(
            p(x),
            pm(out),
            rows,
            dim,
            eps,
            tpf,
            p(shift),
            p(scale),
            frame_stride,
            p(shift_bias),
            p(scale_bias),
        ),
    )
}

/// `bc_layer_norm_affine` (`cuda/norm.cu`), bf16 out.
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
    run(
        g,
        launch::layer_norm_affine(p(x), pm(out), rows, dim, eps, p(weight), p(bias)),
    )
}

/// `bc_gated_residual` (`cuda/norm.cu`); `gate` [`NULL`]: no gate.
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
    run(
        g,
        launch::gated_residual(
            pm(x),
            p(delta),
            rows,
            dim,
            tpf,
            p(gate),
            frame_stride,
            p(gate_bias),
        ),
    )
}

/// A LayerNorm of the residual stream as the layer applies it: modulated
/// (`LN * (1 + scale) + shift`, [`ln_modulate`]) or affine (`LN * weight + bias`,
/// [`layer_norm_affine`]). What [`norm`] and [`residual_norm`] apply.
#[derive(Clone, Copy, Debug)]
pub struct Norm {
    /// Per-frame shift (affine: the bias).
    pub shift: DevPtr,
    /// Per-frame scale (affine: the weight).
    pub scale: DevPtr,
    /// Frame stride of `shift`/`scale` in elements (affine: 0).
    pub stride: usize,
    /// Optional `[dim]` added to every frame's shift ([`NULL`]: none).
    pub shift_bias: DevPtr,
    /// Optional `[dim]` added to every frame's scale ([`NULL`]: none).
    pub scale_bias: DevPtr,
    /// Affine LayerNorm instead of the modulation.
    pub affine: bool,
}

impl Norm {
    /// The modulation `LN * (1 + scale + scale_bias) + shift + shift_bias`.
    pub fn modulate(
        shift: DevPtr,
        scale: DevPtr,
        stride: usize,
        shift_bias: DevPtr,
        scale_bias: DevPtr,
    ) -> Norm {
        Norm {
            shift,
            scale,
            stride,
            shift_bias,
            scale_bias,
            affine: false,
        }
    }

    /// The affine LayerNorm `LN * weight + bias`.
    pub fn affine(weight: DevPtr, bias: DevPtr) -> Norm {
        Norm {
            shift: bias,
            scale: weight,
            stride: 0,
            shift_bias: NULL,
            scale_bias: NULL,
            affine: true,
        }
    }
}

/// The LayerNorm `n` of `x` (f32 `[rows, dim]`) into `out` (bf16): [`ln_modulate`] or
/// [`layer_norm_affine`].
pub fn norm(
    g: &Gpu,
    x: DevPtr,
    out: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
    tpf: usize,
    n: &Norm,
) -> Result<()> {
    if n.affine {
        layer_norm_affine(g, x, out, rows, dim, eps, n.scale, n.shift)
    } else {
        ln_modulate(
            g,
            x,
            out,
            rows,
            dim,
            eps,
            tpf,
            n.shift,
            n.scale,
            n.stride,
            n.shift_bias,
            n.scale_bias,
        )
    }
}

/// `bc_residual_norm` (`cuda/norm.cu`): the gated residual `x += delta * (gate + gate_bias)`
/// ([`gated_residual`]; `gate` [`NULL`]: none) and the LayerNorm `n` of the updated rows into
/// `out`, in one pass over the f32 residual (bit-identical to [`gated_residual`] then
/// [`norm`], which is what runs for rows longer than `BC_RESNORM_MAX_DIM`).
pub fn residual_norm(
    g: &Gpu,
    x: DevPtr,
    delta: DevPtr,
    out: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
    tpf: usize,
    gate: DevPtr,
    gate_stride: usize,
    gate_bias: DevPtr,
    n: &Norm,
) -> Result<()> {
    if dim > BC_RESNORM_MAX_DIM as usize {
        gated_residual(g, x, delta, rows, dim, tpf, gate, gate_stride, gate_bias)?;
        return norm(g, x, out, rows, dim, eps, tpf, n);
    }
    run(
        g,
        launch::residual_norm(
            pm(x),
            p(delta),
            pm(out),
            rows,
            dim,
            eps,
            tpf,
            p(gate),
            gate_stride,
            p(gate_bias),
            p(n.shift),
            p(n.scale),
            n.stride,
            p(n.shift_bias),
            p(n.scale_bias),
            n.affine,
        ),
    )
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

/// `bc_qk_norm_rope` (`cuda/qk_norm_rope.cu`): RMSNorm, RoPE, store.
pub fn qk_norm_rope(g: &Gpu, a: &QkArgs) -> Result<()> {
    run(
        g,
        launch::qk_norm_rope(
            p(a.x),
            a.x_stride,
            pm(a.out),
            a.rows,
            a.heads,
            a.head_dim,
            a.tpf,
            a.wp,
            p(a.norm),
            p(a.frame_pos),
            p(a.frame_slot),
            0,
            a.rope,
            a.eps,
        ),
    )
}

/// One counter per [`AttentionTile`] variant (the wgmma ones too: a GPU run with
/// `BC_WGMMA_OK=1` indexed past a 3-long array here).
static ATTENTION_LAUNCHES: [std::sync::atomic::AtomicUsize; AttentionTile::COUNT] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; AttentionTile::COUNT];

/// Attention launches enqueued with `tile` in this process (eager or captured into a graph;
/// replays are not counted): lets tests check which kernel a session runs.
pub fn attention_launches(tile: AttentionTile) -> usize {
    ATTENTION_LAUNCHES[tile as usize].load(std::sync::atomic::Ordering::Relaxed)
}

/// Split-KV for one [`attention`] launch: where the partial results may go and what the
/// wave-fill model needs to know ([`launch::attention_splits`]).
#[derive(Clone, Copy, Debug)]
pub struct SplitScratch {
    /// Device buffer for the partial results (16-byte aligned), allocated once per session
    /// (never inside a graph capture).
    pub ptr: DevPtr,
    /// Its size: a launch splits only as far as its partials fit.
    pub bytes: usize,
    /// The most keys a group of the launch sees (the model's work per block).
    pub max_keys: usize,
    /// Splits regardless of the model and of `BC_ATTN_SPLIT` (still clamped to the scratch
    /// and to [`launch::ATTN_MAX_SPLITS`]); `None`: `BC_ATTN_SPLIT`, else the model.
    pub force: Option<usize>,
}

/// `BC_ATTN_SPLIT`: `Ok(None)` when unset, empty or `auto` (the model decides), `Ok(Some(n))`
/// for a number n >= 1 (1: never split; n: n splits where the scratch allows), an error for
/// anything else.
pub fn env_attention_split() -> Result<Option<usize>> {
    match std::env::var("BC_ATTN_SPLIT") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() || v.trim() == "auto" => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(Error::invalid(format!(
                "BC_ATTN_SPLIT={v:?} is not auto or a number >= 1"
            ))),
        },
    }
}

/// The wave-fill model of an attention launch on `g` ([`launch::SplitModel`]): its blocks, the
/// device's resident blocks (SMs x the kernel's occupancy), the heaviest group's key tiles.
#[allow(clippy::too_many_arguments)]
pub fn attention_split_model(
    g: &Gpu,
    heads: usize,
    head_dim: usize,
    num_groups: usize,
    max_rows: usize,
    max_keys: usize,
    tile: AttentionTile,
) -> launch::SplitModel {
    let k = tile.kernel(head_dim);
    let per_sm = g.blocks_per_sm(k, tile.threads(head_dim)).max(1) as usize;
    let (bq, bk) = (
        tile.rows(head_dim) as usize,
        tile.key_tile(head_dim) as usize,
    );
    // One H200 SM ran bc_attention_wgmma_hd128_pp_k128 at 460 / 0.84 TFLOP/s over 132 SMs
    // (the measured rate over the launch's 84% wave fill); shared by the blocks it holds.
    let sm_flops_per_us = 460.0e6 / 0.84 / 132.0;
    launch::SplitModel {
        items: max_rows.div_ceil(bq) * heads * num_groups,
        slots: g.sm_count().max(1) as usize * per_sm,
        key_tiles: max_keys.div_ceil(bk),
        partial_bytes: bq * head_dim * 4,
        tile_us: (4 * bq * bk * head_dim.next_multiple_of(64)) as f64 * per_sm as f64
            / sm_flops_per_us,
    }
}

/// The key splits an [`attention`] launch with `split` uses: `split.force`, else
/// `BC_ATTN_SPLIT`, else the model's choice; then as many of them as fit `split.bytes` (at
/// least 1); always 1 for a tile without split-KV ([`AttentionTile::supports_split`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_splits(
    g: &Gpu,
    heads: usize,
    head_dim: usize,
    num_groups: usize,
    max_rows: usize,
    tile: AttentionTile,
    split: &SplitScratch,
) -> Result<usize> {
    if !tile.supports_split() {
        return Ok(1);
    }
    let want = match split.force {
        Some(n) => n,
        None => match env_attention_split()? {
            Some(n) => n,
            None => launch::attention_splits(&attention_split_model(
                g,
                heads,
                head_dim,
                num_groups,
                max_rows,
                split.max_keys,
                tile,
            )),
        },
    };
    let mut s = want.clamp(1, launch::ATTN_MAX_SPLITS);
    while s > 1
        && launch::attention_split_bytes(heads, head_dim, num_groups, max_rows, tile, s)
            .is_none_or(|b| b > split.bytes)
    {
        s -= 1;
    }
    Ok(s)
}

/// `bc_attention_*` (`cuda/attention.cu`) over device tables: `segments` (BcKvSegment), `seg_index` (i32),
/// `groups` (BcAttnGroup); `max_rows` is the largest group (sets grid.x); `tile` picks the
/// kernel variant. `split`: split-KV allowed ([`attention_splits`] decides how many; with more
/// than one `bc_attention_combine` follows on the same stream); `None`: never split. Returns
/// the splits used.
#[allow(clippy::too_many_arguments)]
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
    tile: AttentionTile,
    split: Option<&SplitScratch>,
) -> Result<usize> {
    let splits = match split {
        Some(s) => attention_splits(g, heads, head_dim, num_groups, max_rows, tile, s)?,
        None => 1,
    };
    let sp = launch::AttnSplit {
        splits,
        partial: match split {
            Some(s) if splits > 1 => s.ptr as usize as *mut f32,
            _ => std::ptr::null_mut(),
        },
    };
    ATTENTION_LAUNCHES[tile as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if splits > 1 {
        SPLIT_ATTENTION_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    run(
        g,
        launch::attention(
            p(q),
            pm(out),
            heads,
            head_dim,
            p(segments),
            p(seg_index),
            p(groups),
            num_groups,
            max_rows,
            tile,
            sp,
        ),
    )?;
    if splits > 1 {
        run(
            g,
            launch::attention_combine(
                pm(out),
                heads,
                head_dim,
                p(groups),
                num_groups,
                max_rows,
                tile,
                sp,
            ),
        )?;
    }
    Ok(splits)
}

static SPLIT_ATTENTION_LAUNCHES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Attention launches enqueued with more than one key split in this process (eager or
/// captured; replays not counted): lets tests check that a session split.
pub fn split_attention_launches() -> usize {
    SPLIT_ATTENTION_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// `bc_activation` (`cuda/elementwise.cu`) in place, `n` values, bf16 or f32.
pub fn activation(g: &Gpu, x: DevPtr, n: usize, gelu: bool, bf16: bool) -> Result<()> {
    let op = if gelu { BC_ACT_GELU_TANH } else { BC_ACT_SILU };
    bias_activation(g, x, NULL, 1, n, op, bf16)
}

/// `d[rows, out] = epilogue(x[rows, inp] . w[out, inp]^T + bias[out])`, x and w bf16
/// row-major, bias f32, f32 accumulation; d bf16 or f32 with row stride `out`.
///
/// The bias (and GELU) are fused into cuBLASLt's epilogue where it has an algorithm for it
/// ([`Gpu::gemm_fused`]); otherwise (or with `BC_NO_GEMM_EPILOGUE=1` /
/// `BC_NO_GELU_EPILOGUE=1`) the GEMM runs plain and `bc_activation` adds the bias and applies
/// the GELU in place ([`bias_activation`]), so a missing cuBLASLt feature costs one pass over
/// `d`, not the run.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    g: &mut Gpu,
    x: DevPtr,
    w: DevPtr,
    bias: DevPtr,
    d: DevPtr,
    rows: usize,
    inp: usize,
    out: usize,
    ty: OutType,
    ep: Epilogue,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let fused = g.gemm_fused(x, w, bias, d, rows, inp, out, ty, ep)?;
    let add_bias = fused == Epilogue::None && ep != Epilogue::None;
    let act = ep == Epilogue::GeluBias && fused != Epilogue::GeluBias;
    if add_bias || act {
        let op = if act { BC_ACT_GELU_TANH } else { BC_ACT_NONE };
        let b = if add_bias { bias } else { NULL };
        bias_activation(g, d, b, out, rows * out, op, ty == OutType::Bf16)?;
    }
    Ok(())
}

/// `bc_activation` with a bias (`cuda/elementwise.cu`) in place, `n` values, bf16 or f32
/// (`op`: `BC_ACT_*`; `bias` [`NULL`] for none): the epilogue of a GEMM that cuBLASLt does
/// not fuse.
pub fn bias_activation(
    g: &Gpu,
    x: DevPtr,
    bias: DevPtr,
    cols: usize,
    n: usize,
    op: u32,
    bf16: bool,
) -> Result<()> {
    run(
        g,
        launch::activation(p(x), pm(x), n, op, bf16, p(bias), cols),
    )
}

/// `bc_time_embedding` (`cuda/elementwise.cu`) of `frames` timesteps `t` (f32) into `out`
/// `[frames, freq_dim]`.
pub fn time_embedding(
    g: &Gpu,
    t: DevPtr,
    out: DevPtr,
    frames: usize,
    freq_dim: usize,
) -> Result<()> {
    run(g, launch::time_embedding(p(t), pm(out), frames, freq_dim))
}

/// `bc_patchify` / `bc_unpatchify` (`cuda/patch.cu`): latents f32 `[frames, ch, h, w]` to
/// bf16 patch rows (`patchify = true`) or back.
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
    run(
        g,
        launch::patch(patchify, pm(latents), pm(rows), frames, ch, h, w),
    )
}

/// `bc_flow_step` (`cuda/elementwise.cu`; the fields: `BcFlowStepParams`).
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
    run(
        g,
        launch::flow_step(
            pm(x),
            p(v),
            p(noise),
            pm(x0_out),
            p(sigma),
            p(sigma_next),
            frames,
            frame_elems,
        ),
    )
}

/// `bc_copy` (`cuda/copy.cu`): every region of the device table `regions` (`BcCopyRegion`).
pub fn copy_regions(
    g: &Gpu,
    regions: DevPtr,
    num_regions: usize,
    blocks_per_region: u32,
) -> Result<()> {
    run(g, launch::copy(p(regions), num_regions, blocks_per_region))
}

/// `bc_t5_rms_norm` (`cuda/t5.cu`, the text encoder): `x += delta` (`delta` [`NULL`]: no
/// add), then T5's RMS norm of `x` `[rows, dim]` f32 times `weight` into `out` (f32 with
/// `out_f32`, else bf16).
pub fn t5_rms_norm(
    g: &Gpu,
    x: DevPtr,
    delta: DevPtr,
    weight: DevPtr,
    out: DevPtr,
    out_f32: bool,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    run(
        g,
        launch::t5_rms_norm(pm(x), p(delta), p(weight), pm(out), out_f32, rows, dim, eps),
    )
}

/// `bc_t5_gated_gelu` (`cuda/t5.cu`): `out` bf16 `[rows, cols]` = `gelu_tanh(gate) * lin`,
/// f32 inputs with rows of `in_stride`.
pub fn t5_gated_gelu(
    g: &Gpu,
    gate: DevPtr,
    lin: DevPtr,
    in_stride: usize,
    out: DevPtr,
    rows: usize,
    cols: usize,
) -> Result<()> {
    run(
        g,
        launch::t5_gated_gelu(p(gate), p(lin), in_stride, pm(out), rows, cols),
    )
}

/// `bc_t5_attention` (`cuda/t5.cu`): `q`, `k`, `v` f32 rows of `qkv_stride`, `out` bf16 rows
/// of `heads*head_dim`, `rel_bias` f32 `[buckets, heads]`, `bucket` the i32 entry of relative
/// position 0 (valid for `-(rows-1)..=rows-1`).
pub fn t5_attention(
    g: &Gpu,
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    qkv_stride: usize,
    out: DevPtr,
    rel_bias: DevPtr,
    bucket: DevPtr,
    rows: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    run(
        g,
        launch::t5_attention(
            p(q),
            p(k),
            p(v),
            qkv_stride,
            pm(out),
            p(rel_bias),
            p(bucket),
            rows,
            heads,
            head_dim,
        ),
    )
}

/// A null device pointer for optional arguments.
pub const NULL: DevPtr = 0;
