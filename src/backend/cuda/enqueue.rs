//! The launches of one joint forward on one device: patch embedding, each layer before and
//! after the K/V exchange point, and the head.
//!
//! Every gated residual add is fused with the LayerNorm that reads its result
//! ([`ops::residual_norm`]): self-attention's with norm3, cross-attention's with the FFN's
//! modulated LN, the FFN's with the next layer's modulated LN (or the head's). So only layer 0
//! (right after the patch embedding) runs a LayerNorm of its own, and the per-layer work after
//! the K/V exchange point ends with the next layer's (or the head's) input in `y`.

use super::device::{DevPtr, Epilogue, OutType};
use super::ops::{self, Norm, QkArgs, NULL};
use super::single::Bufs;
use super::tables::Shape;
use super::weight_cache::{DevWeights, LayerDev};
use super::{nvtx, CudaBackend};
use crate::kernels::params::{BcKvSegment, BC_ACT_ROUND_BF16};
use crate::model::CHANNELS;
use crate::Result;

/// The sizes and strides every layer launch uses.
#[derive(Clone, Copy)]
struct Dims {
    d: usize,
    nh: usize,
    hd: usize,
    ffn: usize,
    eps: f32,
    /// Patch columns and tokens per frame.
    wp: usize,
    tpf: usize,
    /// Bytes of an f32, the width as u64, and the bytes of a bf16 row of `d` values.
    f32b: u64,
    du: u64,
    row: u64,
}

/// The LayerNorm that starts layer `li` (its modulated LN before self-attention) for the rows
/// of frames `f0..`, or with `li == layers.len()` the head's modulated LN (`shift = e + m0`,
/// `scale = e + m1`).
fn norm_before(
    layers: &[LayerDev],
    w: &DevWeights,
    b: &Bufs,
    dm: &Dims,
    li: usize,
    f0: u64,
) -> Norm {
    let (d, f32b, du) = (dm.d, dm.f32b, dm.du);
    match layers.get(li) {
        Some(ld) => {
            let e0 = |j: usize| b.e0 + (f0 * 6 * du + (j * d) as u64) * f32b;
            let m = |j: usize| ld.modulation + (j * d) as u64 * f32b;
            Norm::modulate(e0(0), e0(1), 6 * d, m(0), m(1))
        }
        None => {
            let er = b.e + f0 * du * f32b;
            Norm::modulate(er, er, d, w.head_mod, w.head_mod + du * f32b)
        }
    }
}

/// A residual add `x += delta * (gate + gate_bias)` and the LayerNorm `n` that reads its result
/// into `out`: one fused kernel, or with `round` (the bf16 residual experiment,
/// `CudaOptions::round_residual_bf16`) the add, the rounding and the norm as three kernels.
#[allow(clippy::too_many_arguments)]
fn residual_then_norm(
    g: &super::device::Gpu,
    round: bool,
    dm: &Dims,
    (x, delta, out): (DevPtr, DevPtr, DevPtr),
    rows: usize,
    (gate, gate_stride, gate_bias): (DevPtr, usize, DevPtr),
    n: &Norm,
) -> Result<()> {
    let (d, eps, tpf) = (dm.d, dm.eps, dm.tpf);
    if !round {
        return ops::residual_norm(
            g,
            x,
            delta,
            out,
            rows,
            d,
            eps,
            tpf,
            gate,
            gate_stride,
            gate_bias,
            n,
        );
    }
    ops::gated_residual(g, x, delta, rows, d, tpf, gate, gate_stride, gate_bias)?;
    ops::bias_activation(g, x, NULL, 1, rows * d, BC_ACT_ROUND_BF16, false)?;
    ops::norm(g, x, out, rows, d, eps, tpf, n)
}

impl CudaBackend<'_> {
    fn dims(&self) -> Dims {
        let c = self.model.config();
        let wp = self.opts.width / 2;
        let du = c.dim as u64;
        Dims {
            d: c.dim,
            nh: c.num_heads,
            hd: c.head_dim(),
            ffn: c.ffn_dim,
            eps: c.eps as f32,
            wp,
            tpf: (self.opts.height / 2) * wp,
            f32b: 4,
            du,
            row: du * 2,
        }
    }

    /// Enqueues one joint forward of a window of `s`'s shape (every launch of the tick).
    pub(super) fn enqueue(&mut self, s: &Shape) -> Result<()> {
        self.enqueue_embed(s)?;
        for li in 0..self.layers.len() {
            let _r = nvtx::range(|| format!("layer {li}"));
            self.enqueue_pre(s, li)?;
            self.enqueue_post(s, li)?;
        }
        self.enqueue_head(s)
    }

    /// Patch embedding of this device's rows.
    pub(super) fn enqueue_embed(&mut self, s: &Shape) -> Result<()> {
        let d = self.model.config().dim;
        let (h, w) = (self.opts.height, self.opts.width);
        let flen = (CHANNELS * h * w) as u64;
        let b = &self.b;
        let g = &mut self.gpu;
        for &(r0, rows, f0, nf) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            ops::patch(
                g,
                true,
                b.lat + f0 * flen * 4,
                b.patches + r0 * 64 * 2,
                nf,
                CHANNELS,
                h,
                w,
            )?;
            ops::gemm(
                g,
                b.patches + r0 * 64 * 2,
                self.w.patch_w,
                self.w.patch_b,
                b.x + r0 * (d as u64) * 4,
                rows,
                64,
                d,
                OutType::F32,
                Epilogue::Bias,
            )?;
        }
        Ok(())
    }

    /// Layer `li` up to the exchange point: modulated LN (layer 0 only: the previous layer's
    /// FFN residual wrote it for the others), qkv GEMM, q/k norm + RoPE, v, for this device's
    /// rows (into the window buffers `q`, `k`, `v` at the members' rows).
    pub(super) fn enqueue_pre(&mut self, s: &Shape, li: usize) -> Result<()> {
        let dm = self.dims();
        let Dims {
            d,
            nh,
            hd,
            eps,
            wp,
            tpf,
            f32b,
            du,
            row,
            ..
        } = dm;
        let (kb, vb) = self.kv_bufs(li);
        let b = &self.b;
        let ld = &self.layers[li];
        let g = &mut self.gpu;
        for &(r0, n, f0, _) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let y = b.y + r0 * row;
            let qkv = b.qkv + r0 * 3 * row;
            if li == 0 {
                let nm = norm_before(&self.layers, &self.w, b, &dm, 0, f0);
                ops::norm(g, b.x + r0 * du * f32b, y, n, d, eps, tpf, &nm)?;
            }
            ops::gemm(
                g,
                y,
                ld.qkv_w,
                ld.qkv_b,
                qkv,
                n,
                d,
                3 * d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            let qa = QkArgs {
                x: qkv,
                x_stride: 3 * d,
                out: b.q + r0 * row,
                rows: n,
                heads: nh,
                head_dim: hd,
                tpf,
                wp,
                norm: ld.norm_q,
                frame_pos: b.frame_pos + f0 * 4,
                frame_slot: NULL,
                rope: true,
                eps,
            };
            ops::qk_norm_rope(g, &qa)?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: qkv + row,
                    out: kb + r0 * row,
                    norm: ld.norm_k,
                    ..qa
                },
            )?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: qkv + 2 * row,
                    out: vb + r0 * row,
                    norm: NULL,
                    rope: false,
                    ..qa
                },
            )?;
        }
        Ok(())
    }

    /// Layer `li` from the exchange point on: self-attention of this device's members (every
    /// member's K/V must be in the window buffers), every context member's K/V into the cache,
    /// output projection, cross-attention, FFN.
    pub(super) fn enqueue_post(&mut self, s: &Shape, li: usize) -> Result<()> {
        self.enqueue_self_attention(s, li)?;
        self.enqueue_cross_queries(s, li)?;
        self.enqueue_cross_attention_ffn(s, li)
    }

    /// Self-attention of this device's members over their segments, then every context
    /// member's K/V into the cache (after this layer's attention read them).
    fn enqueue_self_attention(&mut self, s: &Shape, li: usize) -> Result<()> {
        let Dims {
            d,
            nh,
            hd,
            eps,
            wp,
            tpf,
            row,
            ..
        } = self.dims();
        let b = &self.b;
        let ld = &self.layers[li];
        let tile = self.attn_tile;
        let (k, v) = self.kv_bufs(li);
        let g = &mut self.gpu;
        let (q, att) = (b.q, b.att);
        let seg_stride = (self.seg_max * std::mem::size_of::<BcKvSegment>()) as u64;
        let split = ops::SplitScratch {
            ptr: b.attn_split,
            bytes: self.attn_split_bytes,
            max_keys: s.max_keys,
            force: self.copts.attention_split,
        };
        ops::attention(
            g,
            q,
            att,
            nh,
            hd,
            b.sa_segs + li as u64 * seg_stride,
            b.sa_index,
            b.sa_groups,
            s.groups,
            s.max_rows,
            tile,
            Some(&split),
        )?;
        // Context members' K/V into the cache (after this layer's attention).
        for &j in &s.cache_writes {
            let rows = s.frames[j] * tpf;
            let base = QkArgs {
                x: k + s.row0[j] as u64 * row,
                x_stride: d,
                out: ld.cache_k,
                rows,
                heads: nh,
                head_dim: hd,
                tpf,
                wp,
                norm: NULL,
                frame_pos: NULL,
                frame_slot: b.frame_slot + (s.fr0[j] * 4) as u64,
                rope: false,
                eps,
            };
            ops::qk_norm_rope(g, &base)?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: v + s.row0[j] as u64 * row,
                    out: ld.cache_v,
                    ..base
                },
            )?;
        }
        Ok(())
    }

    /// Per run of rows: the output projection and gated residual of self-attention, then the
    /// cross-attention queries (norm3, q projection, RMSNorm).
    fn enqueue_cross_queries(&mut self, s: &Shape, li: usize) -> Result<()> {
        let dm = self.dims();
        let Dims {
            d,
            nh,
            hd,
            eps,
            wp,
            tpf,
            f32b,
            du,
            row,
            ..
        } = dm;
        let b = &self.b;
        let ld = &self.layers[li];
        let round = self.copts.round_residual_bf16;
        let g = &mut self.gpu;
        let (x, y, q, att) = (b.x, b.y, b.q, b.att);
        let m = |j: usize| ld.modulation + (j * d) as u64 * f32b;
        for &(r0, n, f0, _) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let e0 = |j: usize| b.e0 + (f0 * 6 * du + (j * d) as u64) * f32b;
            let (xr, yr, ar) = (x + r0 * du * f32b, y + r0 * row, att + r0 * row);
            ops::gemm(
                g,
                ar,
                ld.o_w,
                ld.o_b,
                yr,
                n,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            // Gated residual and norm3, then the cross-attention queries.
            residual_then_norm(
                g,
                round,
                &dm,
                (xr, yr, yr),
                n,
                (e0(2), 6 * d, m(2)),
                &Norm::affine(ld.norm3_w, ld.norm3_b),
            )?;
            let qr = q + r0 * row;
            ops::gemm(
                g,
                yr,
                ld.cq_w,
                ld.cq_b,
                qr,
                n,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: qr,
                    x_stride: d,
                    out: qr,
                    rows: n,
                    heads: nh,
                    head_dim: hd,
                    tpf,
                    wp,
                    norm: ld.cnorm_q,
                    frame_pos: NULL,
                    frame_slot: NULL,
                    rope: false,
                    eps,
                },
            )?;
        }
        Ok(())
    }

    /// Cross-attention to the prompts, then per run of rows its output projection and
    /// residual, and the FFN with its gated residual, which ends with the next layer's (or the
    /// head's) modulated LN in `y`.
    fn enqueue_cross_attention_ffn(&mut self, s: &Shape, li: usize) -> Result<()> {
        let dm = self.dims();
        let Dims {
            d,
            nh,
            hd,
            ffn,
            f32b,
            du,
            row,
            ..
        } = dm;
        let b = &self.b;
        let ld = &self.layers[li];
        let round = self.copts.round_residual_bf16;
        let tile = self.attn_tile;
        let g = &mut self.gpu;
        let (x, y, q, att) = (b.x, b.y, b.q, b.att);
        let ca_stride = (self.prompt_slots.len() * std::mem::size_of::<BcKvSegment>()) as u64;
        let m = |j: usize| ld.modulation + (j * d) as u64 * f32b;
        ops::attention(
            g,
            q,
            att,
            nh,
            hd,
            b.ca_segs + li as u64 * ca_stride,
            b.ca_index,
            b.ca_groups,
            s.cross_groups.len(),
            s.cross_groups.iter().copied().max().unwrap_or(0),
            tile,
            None, // (512 text keys: a few key tiles per block, nothing to split)
        )?;
        for &(r0, n, f0, _) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let e0 = |j: usize| b.e0 + (f0 * 6 * du + (j * d) as u64) * f32b;
            let (xr, yr, ar) = (x + r0 * du * f32b, y + r0 * row, att + r0 * row);
            let fr = b.ffn + r0 * (ffn as u64) * 2;
            ops::gemm(
                g,
                ar,
                ld.co_w,
                ld.co_b,
                yr,
                n,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            // Residual (no gate) and the FFN's modulated LN, then the FFN.
            residual_then_norm(
                g,
                round,
                &dm,
                (xr, yr, yr),
                n,
                (NULL, 0, NULL),
                &Norm::modulate(e0(3), e0(4), 6 * d, m(3), m(4)),
            )?;
            ops::gemm(
                g,
                yr,
                ld.ffn0_w,
                ld.ffn0_b,
                fr,
                n,
                d,
                ffn,
                OutType::Bf16,
                Epilogue::GeluBias,
            )?;
            ops::gemm(
                g,
                fr,
                ld.ffn2_w,
                ld.ffn2_b,
                yr,
                n,
                ffn,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            // Gated residual and the next layer's (or the head's) modulated LN.
            let next = norm_before(&self.layers, &self.w, b, &dm, li + 1, f0);
            residual_then_norm(g, round, &dm, (xr, yr, yr), n, (e0(5), 6 * d, m(5)), &next)?;
        }
        Ok(())
    }

    /// The head and unpatchify of this device's rows into `flow`. Its modulated LN is in `y`
    /// already (the last layer's FFN residual wrote it), unless the model has no layers.
    pub(super) fn enqueue_head(&mut self, s: &Shape) -> Result<()> {
        let dm = self.dims();
        let (d, eps, tpf) = (dm.d, dm.eps, dm.tpf);
        let (h, w) = (self.opts.height, self.opts.width);
        let flen = (CHANNELS * h * w) as u64;
        let b = &self.b;
        let g = &mut self.gpu;
        let du = d as u64;
        for &(r0, n, f0, nf) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let (xr, yr, hr) = (b.x + r0 * du * 4, b.y + r0 * du * 2, b.head + r0 * 64 * 2);
            if self.layers.is_empty() {
                let nm = norm_before(&self.layers, &self.w, b, &dm, 0, f0);
                ops::norm(g, xr, yr, n, d, eps, tpf, &nm)?;
            }
            ops::gemm(
                g,
                yr,
                self.w.head_w,
                self.w.head_b,
                hr,
                n,
                d,
                64,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::patch(g, false, b.flow + f0 * flen * 4, hr, nf, CHANNELS, h, w)?;
        }
        Ok(())
    }
}
