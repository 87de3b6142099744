//! The Wan causal DiT forward (DESIGN §2) over a *window*: several members (blocks of whole
//! frames), each frame with its own timestep, in one joint pass. The sequential pipeline is a
//! window of one member; a Block Cascading tick is a window of several.
//!
//! Tokens of all members are concatenated so every linear layer is one GEMM over the window;
//! attention runs per member over the key frames that member may see (DESIGN §3–4).

use crate::config::{AttentionMode, ModelConfig};
use crate::cpu::attention::{attention, push_segment, KvSegment};
use crate::cpu::{gemm::linear, ops};
use crate::kv_cache::KvCache;
use crate::weights::Weights;
use crate::{Error, Result};

/// Latent channels.
pub const CHANNELS: usize = 16;

/// Cross-attention keys and values of one prompt, computed once per prompt.
#[derive(Clone, Debug)]
pub struct PromptContext {
    /// Per layer: K (RMS-normed) and V, each `[text_len, dim]`.
    pub kv: Vec<(Vec<f32>, Vec<f32>)>,
}

/// One member of a window.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    /// Absolute index of the member's first frame (RoPE position, cache position).
    pub first_frame: usize,
    /// Latents `[frames, 16, H, W]`.
    pub latents: &'a [f32],
    /// Timestep of all its frames.
    pub timestep: f64,
    /// A context member: clean latents whose K/V are written to the cache.
    pub context: bool,
    /// The prompt its cross-attention uses.
    pub prompt: &'a PromptContext,
}

/// The model: weights plus the forward.
#[derive(Debug)]
pub struct Model {
    /// Weights (f32).
    pub weights: Weights,
}

impl Model {
    /// Wraps loaded weights.
    pub fn new(weights: Weights) -> Self {
        Model { weights }
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    /// Text embedding and cross-attention K/V of prompt embeddings `[rows, text_dim]`
    /// (zero-padded to `text_len` rows; at most `text_len` rows, all finite).
    pub fn prompt_context(&self, embeds: &[f32], rows: usize) -> Result<PromptContext> {
        let c = self.config();
        let (d, tl) = (c.dim, c.text_len);
        if rows == 0 || embeds.len() != rows * c.text_dim {
            return Err(Error::invalid(format!(
                "prompt embeddings must be [rows, {}] (text_dim of the model), got {} values for {rows} rows",
                c.text_dim,
                embeds.len()
            )));
        }
        if rows > tl {
            return Err(Error::invalid(format!(
                "prompt embeddings have {rows} rows, more than the model's text_len {tl}"
            )));
        }
        if embeds.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "prompt embeddings contain NaN or infinite values",
            ));
        }
        let w = &self.weights;
        let mut padded = vec![0f32; tl * c.text_dim];
        padded[..embeds.len()].copy_from_slice(embeds);
        let mut h = vec![0f32; tl * d];
        linear(
            &padded,
            tl,
            c.text_dim,
            &w.text[0].0,
            Some(&w.text[0].1),
            &mut h,
        );
        ops::gelu_tanh(&mut h);
        let mut ctx = vec![0f32; tl * d];
        linear(&h, tl, d, &w.text[1].0, Some(&w.text[1].1), &mut ctx);
        let mut kv = Vec::with_capacity(c.num_layers);
        let mut both = vec![0f32; tl * 2 * d];
        for l in &w.layers {
            let ca = &l.cross_attn;
            linear(
                &ctx,
                tl,
                d,
                &ca.qkv_w[d * d..],
                Some(&ca.qkv_b[d..]),
                &mut both,
            );
            let (mut k, mut v) = (vec![0f32; tl * d], vec![0f32; tl * d]);
            for r in 0..tl {
                k[r * d..(r + 1) * d].copy_from_slice(&both[r * 2 * d..r * 2 * d + d]);
                v[r * d..(r + 1) * d].copy_from_slice(&both[r * 2 * d + d..(r + 1) * 2 * d]);
            }
            ops::rms_norm(&mut k, d, c.eps, &ca.norm_k);
            kv.push((k, v));
        }
        Ok(PromptContext { kv })
    }

    /// Time embedding `e` `[dim]` and projection `e0` `[6*dim]` for timestep `t`.
    pub fn time_embedding(&self, t: f64) -> (Vec<f32>, Vec<f32>) {
        let c = self.config();
        let w = &self.weights;
        let d = c.dim;
        let s = ops::sinusoidal(c.freq_dim, t);
        let mut h = vec![0f32; d];
        linear(&s, 1, c.freq_dim, &w.time[0].0, Some(&w.time[0].1), &mut h);
        ops::silu(&mut h);
        let mut e = vec![0f32; d];
        linear(&h, 1, d, &w.time[1].0, Some(&w.time[1].1), &mut e);
        let mut se = e.clone();
        ops::silu(&mut se);
        let mut e0 = vec![0f32; 6 * d];
        linear(&se, 1, d, &w.time_proj.0, Some(&w.time_proj.1), &mut e0);
        (e, e0)
    }

    /// One joint forward over `members` of latent size `h`×`w`. Returns the predicted flow of
    /// every member (same layout as its latents). Context members' K/V are written to `cache`
    /// (committed by the caller). Members must be ordered by first frame and not overlap.
    pub fn forward(
        &self,
        members: &[Member],
        cache: &mut KvCache,
        mode: AttentionMode,
        h: usize,
        w: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let c = self.config();
        let wt = &self.weights;
        let (d, nh, hd) = (c.dim, c.num_heads, c.head_dim());
        let (hp, wp) = (h / 2, w / 2);
        let tpf = hp * wp;
        let flen = CHANNELS * h * w;
        // Geometry of the window.
        let mut frames = Vec::with_capacity(members.len());
        let mut row0 = Vec::with_capacity(members.len());
        let mut fr0 = Vec::with_capacity(members.len());
        let (mut n, mut nf) = (0usize, 0usize);
        for (i, m) in members.iter().enumerate() {
            if m.latents.is_empty() || m.latents.len() % flen != 0 {
                return Err(Error::invalid(format!(
                    "member {i}: {} latent values is not a whole number of [16, {h}, {w}] frames",
                    m.latents.len()
                )));
            }
            if i > 0 && m.first_frame < members[i - 1].first_frame + frames[i - 1] {
                return Err(Error::Internal(
                    "window members overlap or are out of order".into(),
                ));
            }
            let f = m.latents.len() / flen;
            frames.push(f);
            row0.push(n);
            fr0.push(nf);
            n += f * tpf;
            nf += f;
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        // Patch embedding.
        let mut patches = vec![0f32; n * CHANNELS * 4];
        for (i, m) in members.iter().enumerate() {
            ops::patchify(
                m.latents,
                frames[i],
                CHANNELS,
                h,
                w,
                &mut patches[row0[i] * 64..],
            );
        }
        let mut x = vec![0f32; n * d];
        linear(
            &patches,
            n,
            CHANNELS * 4,
            &wt.patch_w,
            Some(&wt.patch_b),
            &mut x,
        );
        drop(patches);
        // Time conditioning, one per frame of the window.
        let mut e_frames = vec![0f32; nf * d];
        let mut e0_frames = vec![0f32; nf * 6 * d];
        for (i, m) in members.iter().enumerate() {
            let (e, e0) = self.time_embedding(m.timestep);
            for f in fr0[i]..fr0[i] + frames[i] {
                e_frames[f * d..(f + 1) * d].copy_from_slice(&e);
                e0_frames[f * 6 * d..(f + 1) * 6 * d].copy_from_slice(&e0);
            }
        }
        // Scratch.
        let mut y = vec![0f32; n * d];
        let mut qkv = vec![0f32; n * 3 * d];
        let (mut q, mut k, mut v) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
        let mut att = vec![0f32; n * d];
        let mut ffn = vec![0f32; n * c.ffn_dim];
        // mods[j] = modulation[j] + e0[j] per frame, j = shift, scale, gate, shift2, scale2, gate2.
        let mut mods = vec![vec![0f32; nf * d]; 6];
        for (li, l) in wt.layers.iter().enumerate() {
            for (j, mj) in mods.iter_mut().enumerate() {
                for f in 0..nf {
                    for t in 0..d {
                        mj[f * d + t] = l.modulation[j * d + t] + e0_frames[f * 6 * d + j * d + t];
                    }
                }
            }
            // Self-attention.
            ops::ln_modulate(&x, d, c.eps, tpf, &mods[0], &mods[1], &mut y);
            let sa = &l.self_attn;
            linear(&y, n, d, &sa.qkv_w, Some(&sa.qkv_b), &mut qkv);
            for r in 0..n {
                let src = &qkv[r * 3 * d..(r + 1) * 3 * d];
                q[r * d..(r + 1) * d].copy_from_slice(&src[..d]);
                k[r * d..(r + 1) * d].copy_from_slice(&src[d..2 * d]);
                v[r * d..(r + 1) * d].copy_from_slice(&src[2 * d..]);
            }
            ops::rms_norm(&mut q, d, c.eps, &sa.norm_q);
            ops::rms_norm(&mut k, d, c.eps, &sa.norm_k);
            for (i, m) in members.iter().enumerate() {
                let rows = row0[i] * d..(row0[i] + frames[i] * tpf) * d;
                ops::rope_3d(&mut q[rows.clone()], nh, hd, m.first_frame, hp, wp);
                ops::rope_3d(&mut k[rows], nh, hd, m.first_frame, hp, wp);
            }
            for (i, m) in members.iter().enumerate() {
                let e_end = m.first_frame + frames[i];
                let mut segs: Vec<KvSegment> = Vec::new();
                for f in cache.visible(m.first_frame, e_end) {
                    let (ck, cv) = cache.frame(li, f);
                    push_segment(&mut segs, KvSegment { k: ck, v: cv });
                }
                for (j, o) in members.iter().enumerate() {
                    let r = row0[j] * d..(row0[j] + frames[j] * tpf) * d;
                    let all = KvSegment {
                        k: &k[r.clone()],
                        v: &v[r],
                    };
                    if j == i {
                        push_segment(&mut segs, all);
                    } else if o.first_frame < m.first_frame {
                        for fi in 0..frames[j] {
                            if cache.in_window(o.first_frame + fi, e_end) {
                                let r = (row0[j] + fi * tpf) * d..(row0[j] + (fi + 1) * tpf) * d;
                                push_segment(
                                    &mut segs,
                                    KvSegment {
                                        k: &k[r.clone()],
                                        v: &v[r],
                                    },
                                );
                            }
                        }
                    } else if mode == AttentionMode::Bidirectional && !o.context && !m.context {
                        push_segment(&mut segs, all);
                    }
                }
                let rows = row0[i] * d..(row0[i] + frames[i] * tpf) * d;
                attention(&q[rows.clone()], nh, hd, &segs, &mut att[rows]);
            }
            linear(&att, n, d, &sa.o_w, Some(&sa.o_b), &mut y);
            ops::gated_residual(&mut x, &y, d, tpf, Some(&mods[2]));
            // Commit context members' K/V (their attention for this layer is done).
            for (i, m) in members.iter().enumerate().filter(|(_, m)| m.context) {
                for fi in 0..frames[i] {
                    let r = (row0[i] + fi * tpf) * d..(row0[i] + (fi + 1) * tpf) * d;
                    cache.write(li, m.first_frame + fi, &k[r.clone()], &v[r]);
                }
            }
            // Cross-attention (members sharing a prompt run together).
            let ca = &l.cross_attn;
            ops::layer_norm_affine(&x, d, c.eps, &l.norm3_w, &l.norm3_b, &mut y);
            linear(&y, n, d, &ca.qkv_w[..d * d], Some(&ca.qkv_b[..d]), &mut q);
            ops::rms_norm(&mut q, d, c.eps, &ca.norm_q);
            let mut i = 0;
            while i < members.len() {
                let p = members[i].prompt;
                let mut j = i + 1;
                while j < members.len() && std::ptr::eq(members[j].prompt, p) {
                    j += 1;
                }
                let rows = row0[i] * d..(row0[j - 1] + frames[j - 1] * tpf) * d;
                let (pk, pv) = &p.kv[li];
                attention(
                    &q[rows.clone()],
                    nh,
                    hd,
                    &[KvSegment { k: pk, v: pv }],
                    &mut att[rows],
                );
                i = j;
            }
            linear(&att, n, d, &ca.o_w, Some(&ca.o_b), &mut y);
            ops::gated_residual(&mut x, &y, d, tpf, None);
            // FFN.
            ops::ln_modulate(&x, d, c.eps, tpf, &mods[3], &mods[4], &mut y);
            linear(&y, n, d, &l.ffn0_w, Some(&l.ffn0_b), &mut ffn);
            ops::gelu_tanh(&mut ffn);
            linear(&ffn, n, c.ffn_dim, &l.ffn2_w, Some(&l.ffn2_b), &mut y);
            ops::gated_residual(&mut x, &y, d, tpf, Some(&mods[5]));
        }
        // Head: shift = m0 + e, scale = m1 + e.
        let (mut sh, mut sc) = (vec![0f32; nf * d], vec![0f32; nf * d]);
        for f in 0..nf {
            for t in 0..d {
                sh[f * d + t] = wt.head_modulation[t] + e_frames[f * d + t];
                sc[f * d + t] = wt.head_modulation[d + t] + e_frames[f * d + t];
            }
        }
        ops::ln_modulate(&x, d, c.eps, tpf, &sh, &sc, &mut y);
        let po = c.out_dim * 4;
        let mut head = vec![0f32; n * po];
        linear(&y, n, d, &wt.head.0, Some(&wt.head.1), &mut head);
        let mut out = Vec::with_capacity(members.len());
        for i in 0..members.len() {
            let mut lat = vec![0f32; frames[i] * flen];
            ops::unpatchify(&head[row0[i] * po..], frames[i], CHANNELS, h, w, &mut lat);
            out.push(lat);
        }
        Ok(out)
    }
}
