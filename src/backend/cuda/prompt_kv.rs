//! A prompt's cross-attention K/V computed on the device (the CUDA backend's side of
//! [`PromptContext`]): when a prompt first needs one of the backend's prompt slots, its
//! embeddings are uploaded (bf16, zero-padded to `text_len` rows) into a scratch buffer, the
//! text embedding runs as two cuBLASLt GEMMs (`text_embedding.0` with the GELU+bias epilogue,
//! `text_embedding.2` with the bias epilogue; [`ops::gemm`] falls back to the activation
//! kernel where cuBLASLt has no fused epilogue), and per layer two GEMMs write K and V straight
//! into the slot (K `[text_len, dim]` then V `[text_len, dim]`, bf16, the layout the
//! cross-attention segments point at), K then RMS-normed in place with the layer's `norm_k`
//! (`bc_qk_norm_rope` without RoPE, the kernel that also norms the cross-attention queries).
//! bf16 operands, f32 accumulation: about 1e-2 relative from the f32 CPU values
//! ([`PromptContext::kv`]), which [`CudaOptions::host_prompt_context`] still uses (and a model
//! whose `text_dim` is not a multiple of 8, for the GEMM's row alignment).
//!
//! This runs eagerly on the backend's stream before the tick's graph is launched or captured,
//! never inside a capture; the weights and the scratch buffer are allocated with everything
//! else when the backend opens.

use super::device::{DevPtr, Epilogue, Gpu, OutType};
use super::ops::{self, QkArgs, NULL};
use super::weight_cache::to_bf16;
use super::CudaBackend;
#[cfg(doc)]
use super::CudaOptions;
use crate::config::ModelConfig;
use crate::model::{Model, PromptContext};
use crate::Result;

/// The device weights the prompt K/V need (resident with the model's other weights).
#[derive(Clone)]
pub(super) struct PromptWeights {
    /// `text_embedding.0` weight (bf16 `[dim, text_dim]`) and bias (f32 `[dim]`).
    text0: (DevPtr, DevPtr),
    /// `text_embedding.2` weight (bf16 `[dim, dim]`) and bias (f32 `[dim]`).
    text1: (DevPtr, DevPtr),
    /// Per layer: the cross-attention K and V weight rows (`qkv` rows `dim..3 dim`, bf16
    /// `[2 dim, dim]`), their bias (f32 `[2 dim]`) and `norm_k` (f32 `[dim]`).
    layers: Vec<(DevPtr, DevPtr, DevPtr)>,
}

/// A device allocation holding `v` (bf16 for `bf16`, else f32), uploaded and synced.
fn up(gpu: &mut Gpu, v: &[f32], bf16: bool) -> Result<DevPtr> {
    let p = gpu.alloc(v.len() * if bf16 { 2 } else { 4 })?;
    if bf16 {
        gpu.upload(p, &to_bf16(v))?;
    } else {
        gpu.upload(p, v)?;
    }
    gpu.sync()?;
    Ok(p)
}

/// Uploads the text embedding and the cross-attention K/V weights of `model`.
pub(super) fn upload(gpu: &mut Gpu, model: &Model) -> Result<PromptWeights> {
    let d = model.config().dim;
    let w = &model.weights;
    let text0 = (up(gpu, &w.text[0].0, true)?, up(gpu, &w.text[0].1, false)?);
    let text1 = (up(gpu, &w.text[1].0, true)?, up(gpu, &w.text[1].1, false)?);
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        let ca = &l.cross_attn;
        layers.push((
            up(gpu, &ca.qkv_w[d * d..3 * d * d], true)?,
            up(gpu, &ca.qkv_b[d..3 * d], false)?,
            up(gpu, &ca.norm_k, false)?,
        ));
    }
    Ok(PromptWeights {
        text0,
        text1,
        layers,
    })
}

/// Bytes of [`PromptWeights`] on the device (u128, like the backend's byte plan).
pub(super) fn weight_bytes(c: &ModelConfig) -> u128 {
    let (d, td, l) = (c.dim as u128, c.text_dim as u128, c.num_layers as u128);
    2 * (d * td + d * d + l * 2 * d * d) + 4 * (2 * d + l * 3 * d)
}

/// Bytes of the scratch buffer: the padded embeddings `[text_len, text_dim]` and the two
/// text-embedding activations `[text_len, dim]`, bf16.
pub(super) fn scratch_bytes(c: &ModelConfig) -> u128 {
    let (d, td, tl) = (c.dim as u128, c.text_dim as u128, c.text_len as u128);
    2 * tl * (td + 2 * d)
}

impl CudaBackend<'_> {
    /// Writes `p`'s cross-attention K/V into prompt slot `slot`: computed on the device, or on
    /// the host and uploaded with [`CudaOptions::host_prompt_context`] (or a `text_dim` that
    /// is not a multiple of 8). Eager, synced at the end; `p` must belong to this model.
    pub(super) fn compute_prompt(&mut self, slot: usize, p: &PromptContext) -> Result<()> {
        p.check_model(self.model)?;
        let c = self.model.config();
        let (d, tl, td, nh, hd) = (c.dim, c.text_len, c.text_dim, c.num_heads, c.head_dim());
        let eps = c.eps as f32;
        let kv_bytes = (tl * d * 2) as u64;
        let base = self.b.prompt_kv + slot as u64 * c.num_layers as u64 * 2 * kv_bytes;
        if self.copts.host_prompt_context || td % 8 != 0 {
            for (li, (k, v)) in p.kv(self.model)?.iter().enumerate() {
                let off = base + li as u64 * 2 * kv_bytes;
                self.gpu.upload(off, &to_bf16(k))?;
                self.gpu.upload(off + kv_bytes, &to_bf16(v))?;
                // The uploads read host vectors that end here.
                self.gpu.sync()?;
            }
            return Ok(());
        }
        let pw = &self.w.prompt;
        let g = &mut self.gpu;
        let emb = self.b.prompt_scratch;
        let hid = emb + (tl * td * 2) as u64;
        let ctx = hid + kv_bytes;
        let host = to_bf16(p.embeds());
        g.upload(emb, &host)?;
        let pad = (tl - p.rows().min(tl)) * td * 2;
        if pad > 0 {
            g.memset(emb + (host.len() * 2) as u64, 0, pad)?;
        }
        ops::gemm(
            g,
            emb,
            pw.text0.0,
            pw.text0.1,
            hid,
            tl,
            td,
            d,
            OutType::Bf16,
            Epilogue::GeluBias,
        )?;
        ops::gemm(
            g,
            hid,
            pw.text1.0,
            pw.text1.1,
            ctx,
            tl,
            d,
            d,
            OutType::Bf16,
            Epilogue::Bias,
        )?;
        for (li, &(kv_w, kv_b, norm_k)) in pw.layers.iter().enumerate() {
            let k = base + li as u64 * 2 * kv_bytes;
            let v = k + kv_bytes;
            ops::gemm(
                g,
                ctx,
                kv_w,
                kv_b,
                k,
                tl,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            ops::gemm(
                g,
                ctx,
                kv_w + (d * d * 2) as u64,
                kv_b + (d * 4) as u64,
                v,
                tl,
                d,
                d,
                OutType::Bf16,
                Epilogue::Bias,
            )?;
            // RMSNorm over K's rows, in place (no RoPE on cross-attention keys).
            ops::qk_norm_rope(
                g,
                &QkArgs {
                    x: k,
                    x_stride: d,
                    out: k,
                    rows: tl,
                    heads: nh,
                    head_dim: hd,
                    tpf: 1,
                    wp: 1,
                    norm: norm_k,
                    frame_pos: NULL,
                    frame_slot: NULL,
                    rope: false,
                    eps,
                },
            )?;
        }
        // The upload reads `host`, which ends here; errors of the launches surface here too.
        g.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CudaBackend, CudaOptions};
    use crate::config::GenerateOptions;
    use crate::model::{Member, Model, PromptContext};
    use crate::rng::Rng;
    use crate::weights::{builtin_config, Weights};
    use crate::Error;
    use half::bf16;

    /// A small random model whose text_len (40) and text_dim (48) differ from everything else.
    fn model(seed: u64) -> Model {
        let mut c = builtin_config("tiny").unwrap();
        c.text_len = 40;
        c.text_dim = 48;
        Model::new(Weights::random(c, seed))
    }

    fn member(p: &PromptContext) -> Member<'_> {
        Member {
            first_frame: 0,
            latents: &[],
            timestep: 0.0,
            context: false,
            prompt: p,
        }
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let (mut num, mut den) = (0f64, 0f64);
        for (x, y) in a.iter().zip(b) {
            num += ((x - y) as f64).powi(2);
            den += (*x as f64).powi(2);
        }
        (num / den).sqrt()
    }

    /// The K/V in prompt slot `slot`, per layer (K, V) as f32.
    fn download_slot(be: &CudaBackend, slot: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        let c = be.model.config();
        let n = c.text_len * c.dim;
        let len = c.num_layers * 2 * n;
        let mut all = vec![bf16::ZERO; len];
        be.gpu
            .download(&mut all, be.b.prompt_kv + (slot * len * 2) as u64)
            .unwrap();
        let f: Vec<f32> = all.iter().map(|v| v.to_f32()).collect();
        f.chunks(2 * n)
            .map(|l| (l[..n].to_vec(), l[n..].to_vec()))
            .collect()
    }

    /// Device-computed prompt K/V (text MLP, K/V GEMMs, K's RMSNorm) against the f32 CPU
    /// values, for embeddings with fewer rows than text_len, into NaN-poisoned slots, with
    /// fused epilogues and with the bias / GELU kernels; the CPU K/V are never computed on
    /// the device path; a context of another model is refused.
    #[test]
    fn device_prompt_kv_matches_the_cpu() {
        let m = model(11);
        let c = m.config().clone();
        let rows = 23;
        let mut rng = Rng::new(5);
        let emb: Vec<f32> = (0..rows * c.text_dim).map(|_| rng.normal()).collect();
        let opts = GenerateOptions {
            height: 4,
            width: 4,
            ..Default::default()
        };
        for (fuse, host) in [(true, false), (false, false), (true, true)] {
            let co = CudaOptions {
                emulate: true,
                graphs: false,
                fuse_bias: fuse,
                fuse_gelu: fuse,
                host_prompt_context: host,
                ..CudaOptions::default()
            };
            let mut be = CudaBackend::new(&m, &opts, co).unwrap();
            let slots = be.prompt_slots.len();
            let per = c.num_layers * 2 * c.text_len * c.dim * 2;
            be.gpu.memset(be.b.prompt_kv, 0xff, slots * per).unwrap();
            be.gpu
                .memset(be.b.prompt_scratch, 0xff, super::scratch_bytes(&c) as usize)
                .unwrap();
            let p = m.prompt_context(&emb, rows).unwrap();
            let s = be.load_prompts(&[member(&p)], &[true]).unwrap()[0].unwrap();
            assert_eq!(
                p.kv_computed(),
                host,
                "CPU K/V computed: {}",
                p.kv_computed()
            );
            let dev = download_slot(&be, s);
            let cpu = p.kv(&m).unwrap();
            let mut worst = 0f64;
            for (li, ((dk, dv), (ck, cv))) in dev.iter().zip(cpu).enumerate() {
                assert!(
                    dk.iter().chain(dv).all(|v| v.is_finite()),
                    "layer {li}: slot not fully written"
                );
                for (what, d, c) in [("K", dk, ck), ("V", dv, cv)] {
                    let e = rel_l2(c, d);
                    println!("fused {fuse}, host {host}: layer {li} {what}: rel L2 {e:.3e}");
                    assert!(e < 1e-2, "layer {li} {what}: rel L2 {e}");
                    worst = worst.max(e);
                }
            }
            assert!(worst > 0.0, "bf16 slot equal to f32: not what was computed");
            // Same prompt again: no recomputation, same slot.
            be.gpu.memset(be.b.prompt_kv, 0xff, slots * per).unwrap();
            let again = be.load_prompts(&[member(&p)], &[true]).unwrap();
            assert_eq!(again, vec![Some(s)]);
            assert!(download_slot(&be, s)[0].0[0].is_nan());
            // A prompt context of another model.
            let other = model(12);
            let q = other.prompt_context(&emb, rows).unwrap();
            let err = be.load_prompts(&[member(&q)], &[true]).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(q.kv(&m).is_err());
        }
    }
}
