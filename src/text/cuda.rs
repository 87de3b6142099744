//! The umT5 encoder on a CUDA device (or on the emulated device): the same function as
//! [`Umt5::forward`](super::Umt5::forward), with bf16 GEMMs through cuBLASLt and the kernels of
//! `cuda/t5.cu`.
//!
//! What lives where:
//! - the layers' weights are uploaded once, when the encoder moves to the device: bf16 GEMM
//!   weights (`q|k|v` as one `[3 dim_attn, dim]` matrix, `o`, `gate|fc1` as one
//!   `[2 ffn, dim]` matrix, `fc2`), f32 norms and position-bias tables. The token embedding
//!   (2.1 GB for umT5-XXL) stays on the host: the prompt's `L` rows are gathered there and
//!   uploaded, `L × dim` f32;
//! - the bucket of every relative position `-(MAX-1)..=MAX-1` (`MAX` =
//!   [`BC_T5_ATTN_MAX_TOKENS`]) is made on the host once ([`relative_bucket`], the CPU's own
//!   function, so device and CPU agree at the logarithmic boundaries) and uploaded with the
//!   weights; each layer's kernel reads its own `[buckets, heads]` bias table;
//! - activations are allocated once for `MAX` rows (about 110 MB at umT5-XXL's sizes).
//!
//! Per layer: `h = rms(x)` (bf16) → `qkv = h Wqkvᵀ` (f32) → `bc_t5_attention` (bf16) →
//! `δ = a Woᵀ` (f32) → `x += δ; h = rms(x)` → `gf = h Wgfᵀ` (f32) → `bc_t5_gated_gelu` (bf16) →
//! `δ = g Wfc2ᵀ` (f32), whose add is fused into the next layer's norm (or the final norm, which
//! writes f32). The residual stream, the GEMM outputs, attention scores and softmax are f32;
//! GEMM inputs and weights bf16 (the emulated device runs the GEMMs on the CPU with the same
//! bf16 operands).

use super::umt5::{relative_bucket, Mat, Umt5, EPS, MAX_DISTANCE};
use crate::backend::cuda::device::{DevPtr, Epilogue, Gpu, OutType};
use crate::backend::cuda::ops::{self, NULL};
use crate::kernels::params::{BC_T5_ATTN_MAX_HEAD_DIM, BC_T5_ATTN_MAX_TOKENS};
use crate::{Error, Result};
use half::bf16;
use std::sync::Mutex;

/// Most tokens the device encoder takes (the attention kernel's limit).
pub const MAX_TOKENS: usize = BC_T5_ATTN_MAX_TOKENS as usize;
/// Values converted and uploaded per chunk of a weight (4 MiB of f32 on the host).
const UPLOAD_CHUNK: usize = 1 << 20;

/// One layer's device weights.
struct LayerW {
    norm1: DevPtr,
    /// bf16 `[3 dim_attn, dim]`: q, k, v rows.
    qkv: DevPtr,
    /// bf16 `[dim, dim_attn]`.
    o: DevPtr,
    /// f32 `[buckets, heads]`.
    rel: DevPtr,
    norm2: DevPtr,
    /// bf16 `[2 ffn, dim]`: gate (GELU half) rows, then fc1 (linear half) rows.
    gate_fc1: DevPtr,
    /// bf16 `[dim, ffn]`.
    fc2: DevPtr,
}

/// Activation buffers for [`MAX_TOKENS`] rows.
struct Acts {
    /// Residual stream f32 `[L, dim]`.
    x: DevPtr,
    /// Normed rows bf16 `[L, dim]`.
    h: DevPtr,
    /// f32 `[L, 3 dim_attn]`.
    qkv: DevPtr,
    /// Attention output bf16 `[L, dim_attn]`.
    attn: DevPtr,
    /// A sublayer's output f32 `[L, dim]`.
    delta: DevPtr,
    /// f32 `[L, 2 ffn]`.
    gf: DevPtr,
    /// FFN hidden layer bf16 `[L, ffn]`.
    g: DevPtr,
    /// The encoder's output f32 `[L, dim]`.
    out: DevPtr,
}

struct State {
    gpu: Gpu,
    layers: Vec<LayerW>,
    norm: DevPtr,
    /// i32 buckets of relative positions `-(MAX-1)..=MAX-1`.
    buckets: DevPtr,
    acts: Acts,
}

/// The device side of a umT5 encoder: its weights on a GPU (or the emulated device) and the
/// launches of one forward. The host [`Umt5`] it was made from still provides the token
/// embedding rows.
pub struct Umt5Cuda {
    state: Mutex<State>,
    device: String,
    weight_bytes: usize,
}

impl std::fmt::Debug for Umt5Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Umt5Cuda")
            .field("device", &self.device)
            .field("weight_bytes", &self.weight_bytes)
            .finish()
    }
}

/// Uploads f32 values (synced: `v` may end right after).
fn up_f32(g: &mut Gpu, v: &[f32]) -> Result<DevPtr> {
    let p = g.alloc(v.len() * 4)?;
    g.upload(p, v)?;
    g.sync()?;
    Ok(p)
}

/// Writes `m` as bf16 at `dst`, a chunk of rows at a time (never a full f32 copy on the host).
fn up_mat(g: &Gpu, dst: DevPtr, m: &Mat) -> Result<()> {
    let (rows, cols) = m.dims();
    let per = (UPLOAD_CHUNK / cols.max(1)).max(1);
    let mut f = Vec::new();
    let mut b = Vec::new();
    for r0 in (0..rows).step_by(per) {
        let n = per.min(rows - r0);
        f.resize(n * cols, 0.0);
        m.rows_into(r0, &mut f);
        b.clear();
        b.extend(f.iter().map(|&v| bf16::from_f32(v)));
        g.upload(dst + (r0 * cols * 2) as u64, &b)?;
        // The upload reads `b`, which the next chunk overwrites.
        g.sync()?;
    }
    Ok(())
}

/// Uploads matrices stacked by rows (same column count) as one bf16 matrix.
fn up_stacked(g: &mut Gpu, mats: &[&Mat]) -> Result<DevPtr> {
    let bytes: usize = mats.iter().map(|m| m.dims().0 * m.dims().1 * 2).sum();
    let p = g.alloc(bytes)?;
    let mut off = 0u64;
    for m in mats {
        up_mat(g, p + off, m)?;
        off += (m.dims().0 * m.dims().1 * 2) as u64;
    }
    Ok(p)
}

impl Umt5Cuda {
    /// Uploads `model`'s layers to `gpu` and allocates the activations. Refuses sizes the
    /// device path does not take: widths that are not multiples of 8 (cuBLASLt's 16-byte row
    /// alignment of bf16 operands) or a head dim over [`BC_T5_ATTN_MAX_HEAD_DIM`].
    pub fn new(model: &Umt5, mut gpu: Gpu) -> Result<Self> {
        let c = model.config();
        let hd = c.dim_attn / c.heads;
        if c.dim % 8 != 0 || c.dim_attn % 8 != 0 || c.ffn % 8 != 0 {
            return Err(Error::invalid(format!(
                "the CUDA text encoder needs widths that are multiples of 8 (dim {}, attention \
                 {}, ffn {}): run it on the CPU",
                c.dim, c.dim_attn, c.ffn
            )));
        }
        if hd > BC_T5_ATTN_MAX_HEAD_DIM as usize {
            return Err(Error::invalid(format!(
                "the CUDA text encoder takes head dims up to {BC_T5_ATTN_MAX_HEAD_DIM}, this \
                 encoder has {hd}: run it on the CPU"
            )));
        }
        gpu.bind()?;
        let (d, da, f, n) = (c.dim, c.dim_attn, c.ffn, MAX_TOKENS);
        let weight_bytes =
            c.layers * (2 * (4 * d * da + 3 * d * f) + 4 * (2 * d + c.buckets * c.heads)) + 4 * d;
        // The buffers of `Acts`: x, delta, out f32 and h bf16 [n, d]; qkv f32 and attn bf16;
        // gf f32 and g bf16.
        let act_bytes = n * (3 * 4 * d + 2 * d + 4 * 3 * da + 2 * da + 4 * 2 * f + 2 * f);
        let need = weight_bytes + act_bytes + (2 * n - 1) * 4;
        let (free, _) = gpu.mem_info()?;
        if need > free {
            return Err(Error::OutOfMemory(format!(
                "the text encoder needs {:.2} GB on {} ({:.2} GB free): run it on the CPU \
                 (--text-encoder-device cpu)",
                need as f64 / 1e9,
                gpu.name,
                free as f64 / 1e9
            )));
        }
        let g = &mut gpu;
        let mut layers = Vec::with_capacity(c.layers);
        for l in model.layers() {
            layers.push(LayerW {
                norm1: up_f32(g, &l.norm1)?,
                qkv: up_stacked(g, &[&l.q, &l.k, &l.v])?,
                o: up_stacked(g, &[&l.o])?,
                rel: up_f32(g, &l.rel)?,
                norm2: up_f32(g, &l.norm2)?,
                gate_fc1: up_stacked(g, &[&l.gate, &l.fc1])?,
                fc2: up_stacked(g, &[&l.fc2])?,
            });
        }
        let norm = up_f32(g, model.final_norm())?;
        let table: Vec<i32> = (0..2 * MAX_TOKENS - 1)
            .map(|i| {
                relative_bucket(i as i64 - (MAX_TOKENS as i64 - 1), c.buckets, MAX_DISTANCE) as i32
            })
            .collect();
        let buckets = g.alloc(table.len() * 4)?;
        g.upload(buckets, &table)?;
        g.sync()?;
        let acts = Acts {
            x: g.alloc(n * d * 4)?,
            h: g.alloc(n * d * 2)?,
            qkv: g.alloc(n * 3 * da * 4)?,
            attn: g.alloc(n * da * 2)?,
            delta: g.alloc(n * d * 4)?,
            gf: g.alloc(n * 2 * f * 4)?,
            g: g.alloc(n * f * 2)?,
            out: g.alloc(n * d * 4)?,
        };
        Ok(Umt5Cuda {
            device: gpu.name.clone(),
            state: Mutex::new(State {
                gpu,
                layers,
                norm,
                buckets,
                acts,
            }),
            weight_bytes,
        })
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Bytes of weights on the device (the token embedding stays on the host).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Embeddings `[ids.len(), dim]` of token ids (1..=[`MAX_TOKENS`] of them), computed on the
    /// device; `model` is the host encoder this was made from (its token embedding).
    pub fn forward(&self, model: &Umt5, ids: &[i64]) -> Result<Vec<f32>> {
        if ids.len() > MAX_TOKENS {
            return Err(Error::invalid(format!(
                "{} tokens: the CUDA text encoder takes at most {MAX_TOKENS} (lower text_len, or \
                 run the text encoder on the CPU)",
                ids.len()
            )));
        }
        let x0 = model.embed_rows(ids, MAX_TOKENS)?;
        let c = model.config();
        let (l, d, da, f) = (ids.len(), c.dim, c.dim_attn, c.ffn);
        let hd = da / c.heads;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State {
            gpu,
            layers,
            norm,
            buckets,
            acts: a,
        } = &mut *st;
        gpu.bind()?;
        let g = gpu;
        g.upload(a.x, &x0)?;
        // The upload reads `x0`: done before anything can fail.
        g.sync()?;
        let bucket0 = *buckets + ((MAX_TOKENS - 1) * 4) as u64;
        let eps = EPS as f32;
        let gemm = |g: &mut Gpu, x: DevPtr, w: DevPtr, y: DevPtr, inp: usize, out: usize| {
            ops::gemm(g, x, w, NULL, y, l, inp, out, OutType::F32, Epilogue::None)
        };
        let mut delta = NULL; // the pending residual add (none before layer 0)
        for w in layers.iter() {
            ops::t5_rms_norm(g, a.x, delta, w.norm1, a.h, false, l, d, eps)?;
            gemm(g, a.h, w.qkv, a.qkv, d, 3 * da)?;
            let q = a.qkv;
            let (k, v) = (q + (da * 4) as u64, q + (2 * da * 4) as u64);
            ops::t5_attention(g, q, k, v, 3 * da, a.attn, w.rel, bucket0, l, c.heads, hd)?;
            gemm(g, a.attn, w.o, a.delta, da, d)?;
            ops::t5_rms_norm(g, a.x, a.delta, w.norm2, a.h, false, l, d, eps)?;
            gemm(g, a.h, w.gate_fc1, a.gf, d, 2 * f)?;
            ops::t5_gated_gelu(g, a.gf, a.gf + (f * 4) as u64, 2 * f, a.g, l, f)?;
            gemm(g, a.g, w.fc2, a.delta, f, d)?;
            delta = a.delta;
        }
        ops::t5_rms_norm(g, a.x, delta, *norm, a.out, true, l, d, eps)?;
        let mut y = vec![0f32; l * d];
        g.sync()?;
        g.download(&mut y, a.out)?;
        Ok(y)
    }
}
