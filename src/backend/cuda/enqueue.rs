//! The launches of one joint forward on one device: patch embedding, each layer before and
//! after the K/V exchange point, and the head.

use super::device::{Epilogue, OutType};
use super::ops::{self, QkArgs, NULL};
use super::tables::Shape;
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

    /// Layer `li` up to the exchange point: modulated LN, qkv GEMM, q/k norm + RoPE, v, for
    /// this device's rows (into the window buffers `q`, `k`, `v` at the members' rows).
    pub(super) fn enqueue_pre(&mut self, s: &Shape, li: usize) -> Result<()> {
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
        } = self.dims();
        let (kb, vb) = self.kv_bufs(li);
        let b = &self.b;
        let ld = &self.layers[li];
        let g = &mut self.gpu;
        let m = |j: usize| ld.modulation + (j * d) as u64 * f32b;
        for &(r0, n, f0, _) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let e0 = |j: usize| b.e0 + (f0 * 6 * du + (j * d) as u64) * f32b;
            let y = b.y + r0 * row;
            let qkv = b.qkv + r0 * 3 * row;
            ops::ln_modulate(
                g,
                b.x + r0 * du * f32b,
                y,
                n,
                d,
                eps,
                tpf,
                e0(0),
                e0(1),
                6 * d,
                m(0),
                m(1),
            )?;
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
        } = self.dims();
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
            ops::gated_residual(g, xr, yr, n, d, tpf, e0(2), 6 * d, m(2))?;
            if round {
                ops::bias_activation(g, xr, NULL, 1, n * d, BC_ACT_ROUND_BF16, false)?;
            }
            // Cross-attention queries.
            ops::layer_norm_affine(g, xr, yr, n, d, eps, ld.norm3_w, ld.norm3_b)?;
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
    /// residual, and the FFN with its gated residual.
    fn enqueue_cross_attention_ffn(&mut self, s: &Shape, li: usize) -> Result<()> {
        let Dims {
            d,
            nh,
            hd,
            ffn,
            eps,
            tpf,
            f32b,
            du,
            row,
            ..
        } = self.dims();
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
            ops::gated_residual(g, xr, yr, n, d, tpf, NULL, 0, NULL)?;
            if round {
                ops::bias_activation(g, xr, NULL, 1, n * d, BC_ACT_ROUND_BF16, false)?;
            }
            // FFN.
            ops::ln_modulate(g, xr, yr, n, d, eps, tpf, e0(3), e0(4), 6 * d, m(3), m(4))?;
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
            ops::gated_residual(g, xr, yr, n, d, tpf, e0(5), 6 * d, m(5))?;
            if round {
                ops::bias_activation(g, xr, NULL, 1, n * d, BC_ACT_ROUND_BF16, false)?;
            }
        }
        Ok(())
    }

    /// The head and unpatchify of this device's rows into `flow`.
    pub(super) fn enqueue_head(&mut self, s: &Shape) -> Result<()> {
        let c = self.model.config();
        let (d, eps) = (c.dim, c.eps as f32);
        let (h, w) = (self.opts.height, self.opts.width);
        let tpf = (h / 2) * (w / 2);
        let flen = (CHANNELS * h * w) as u64;
        let b = &self.b;
        let g = &mut self.gpu;
        let du = d as u64;
        for &(r0, n, f0, nf) in &s.ranges {
            let (r0, f0) = (r0 as u64, f0 as u64);
            let (xr, yr, hr) = (b.x + r0 * du * 4, b.y + r0 * du * 2, b.head + r0 * 64 * 2);
            let er = b.e + f0 * du * 4;
            // Head: shift = m0 + e, scale = m1 + e.
            ops::ln_modulate(
                g,
                xr,
                yr,
                n,
                d,
                eps,
                tpf,
                er,
                er,
                d,
                self.w.head_mod,
                self.w.head_mod + (d * 4) as u64,
            )?;
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
