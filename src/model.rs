//! The Wan causal DiT forward (DESIGN §2) over a *window*: several members (blocks of whole
//! frames), each frame with its own timestep, in one joint pass. The sequential pipeline is a
//! window of one member; a Block Cascading tick is a window of several.
//!
//! Tokens of all members are concatenated so every linear layer is one GEMM over the window;
//! attention runs per member over the key frames that member may see (DESIGN §3–4).

use crate::config::{AttentionMode, ModelConfig};
use crate::cpu::attention::{attention, KvSegment};
use crate::cpu::{gemm::linear, ops};
use crate::kv_cache::KvCache;
use crate::weights::Weights;
use crate::window;
use crate::{Error, Result};

/// Latent channels.
pub const CHANNELS: usize = 16;

/// Per layer: K (RMS-normed with the layer's cross-attention `norm_k`) and V, each
/// `[text_len, dim]`.
pub type PromptKv = Vec<(Vec<f32>, Vec<f32>)>;

static NEXT_PROMPT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One prompt as the model's cross-attention sees it: validated prompt embeddings, and their
/// text embedding and per-layer cross-attention K/V, computed lazily.
///
/// [`Model::prompt_context`] only validates and copies the embeddings; the K/V (the text MLP
/// and one `[text_len, dim] x [dim, 2 dim]` projection per layer, about 150 GFLOP for
/// Wan-1.3B) are computed on the CPU the first time [`PromptContext::kv`] is called, i.e. by
/// the first CPU forward that uses the prompt. The CUDA backend never calls it: it computes
/// the K/V on the device from [`PromptContext::embeds`] when the prompt first needs a slot.
///
/// A context belongs to the model that made it ([`PromptContext::model_id`]); using it with
/// another model is an [`Error::InvalidArgument`]. Its [`id`](PromptContext::id) is unique in
/// the process and never reused, so devices can key their copies by it (a clone keeps the id:
/// same embeddings, same model, same K/V). The K/V are computed from the model's weights as
/// they are at the first call (like the CUDA backend's weight snapshot).
#[derive(Clone)]
pub struct PromptContext {
    id: u64,
    model_id: u64,
    rows: usize,
    /// `[rows, text_dim]`, finite.
    embeds: Vec<f32>,
    kv: std::sync::OnceLock<PromptKv>,
}

impl std::fmt::Debug for PromptContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptContext")
            .field("id", &self.id)
            .field("model_id", &self.model_id)
            .field("rows", &self.rows)
            .field("kv_computed", &self.kv.get().is_some())
            .finish()
    }
}

impl PromptContext {
    /// This prompt context's process-unique id (never reused; shared by clones).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The [`Model::id`] of the model it was made for.
    pub fn model_id(&self) -> u64 {
        self.model_id
    }

    /// Number of embedding rows (at most `text_len`; the rest are zero).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The prompt embeddings `[rows, text_dim]` (not padded).
    pub fn embeds(&self) -> &[f32] {
        &self.embeds
    }

    /// Whether the CPU K/V have been computed (by [`PromptContext::kv`]).
    pub fn kv_computed(&self) -> bool {
        self.kv.get().is_some()
    }

    /// Checks that `model` is the model this context was made for.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        if model.id() != self.model_id {
            return Err(Error::invalid(format!(
                "a prompt context made for model {} was used with model {}",
                self.model_id,
                model.id()
            )));
        }
        Ok(())
    }

    /// The per-layer cross-attention K/V (f32), computed on the CPU on the first call (later
    /// calls, from any thread, return the same values). `model` must be the model this
    /// context was made for.
    pub fn kv(&self, model: &Model) -> Result<&[(Vec<f32>, Vec<f32>)]> {
        self.check_model(model)?;
        Ok(self.kv.get_or_init(|| model.compute_prompt_kv(self)))
    }
}

/// This device's K/V of one member for one layer: (member index, K, V), each `[tokens, dim]`.
pub type OwnKv<'a> = (usize, &'a [f32], &'a [f32]);

/// A peer's K/V of one member for one layer, as received in an exchange.
#[derive(Clone, Debug)]
pub struct MemberKv {
    /// Index of the member in the window.
    pub member: usize,
    /// Keys `[tokens, dim]` (normed, rotated).
    pub k: Vec<f32>,
    /// Values `[tokens, dim]`.
    pub v: Vec<f32>,
}

/// The per-layer K/V exchange of [`Model::forward_partial`]: given the layer and this device's
/// members' K/V, returns the peers' K/V.
pub type KvExchangeFn<'a> = dyn FnMut(usize, &[OwnKv]) -> Result<Vec<MemberKv>> + 'a;

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
    /// Unique per model in this process (never reused), e.g. to key device copies of weights.
    id: u64,
}

static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What runs when a model is dropped, with its [`Model::id`]: a backend that keeps copies of a
/// model's weights (the CUDA backend's weight cache) registers a hook that drops them, so the
/// model does not need to know its backends.
static DROP_HOOKS: std::sync::Mutex<Vec<fn(u64)>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run with a model's id whenever a [`Model`] is dropped. Backends call it
/// once (before they first keep anything keyed by a model id).
pub fn on_model_drop(hook: fn(u64)) {
    DROP_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(hook);
}

impl Drop for Model {
    fn drop(&mut self) {
        // Copies of these weights that backends keep go with the model.
        let hooks = DROP_HOOKS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for hook in hooks {
            hook(self.id);
        }
    }
}

impl Model {
    /// Wraps loaded weights.
    pub fn new(weights: Weights) -> Self {
        let id = NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Model { weights, id }
    }

    /// This model's process-unique id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    /// Validates prompt embeddings `[rows, text_dim]` (1..=`text_len` rows, all finite; they
    /// are zero-padded to `text_len` rows) and wraps them in a [`PromptContext`] for this
    /// model. Cheap: the text embedding and cross-attention K/V are computed when first
    /// needed ([`PromptContext::kv`] on the CPU, on the device by the CUDA backend).
    pub fn prompt_context(&self, embeds: &[f32], rows: usize) -> Result<PromptContext> {
        let c = self.config();
        let tl = c.text_len;
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
        Ok(PromptContext {
            id: NEXT_PROMPT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            model_id: self.id,
            rows,
            embeds: embeds.to_vec(),
            kv: std::sync::OnceLock::new(),
        })
    }

    /// Text embedding (`Linear, GELU(tanh), Linear` over the zero-padded embeddings) and the
    /// per-layer cross-attention K (RMS-normed) and V of `p`, in f32 on the CPU.
    fn compute_prompt_kv(&self, p: &PromptContext) -> PromptKv {
        let c = self.config();
        let (d, tl) = (c.dim, c.text_len);
        let w = &self.weights;
        let mut padded = vec![0f32; tl * c.text_dim];
        padded[..p.embeds.len()].copy_from_slice(&p.embeds);
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
        kv
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
        let all: Vec<usize> = (0..members.len()).collect();
        let mut none = |_: usize, _: &[OwnKv]| Ok(Vec::new());
        let out = self.forward_partial(members, &all, cache, mode, h, w, &mut none)?;
        Ok(out.into_iter().map(|(_, v)| v).collect())
    }

    /// The part of a joint forward that one device runs: the members `mine` (indices into
    /// `members`, increasing) are computed here; the K/V of the others arrive through
    /// `exchange`, called once per layer with this device's members' K/V and returning what the
    /// peers send (members whose K/V do not arrive are not attended to). Context members' K/V,
    /// own or received, are written to `cache`. Returns `(member index, flow)` for `mine`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_partial(
        &self,
        members: &[Member],
        mine: &[usize],
        cache: &mut KvCache,
        mode: AttentionMode,
        h: usize,
        w: usize,
        exchange: &mut KvExchangeFn,
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        let c = self.config();
        let wt = &self.weights;
        let (d, nh, hd) = (c.dim, c.num_heads, c.head_dim());
        let (hp, wp) = (h / 2, w / 2);
        let tpf = hp * wp;
        let flen = CHANNELS * h * w;
        if h == 0 || w == 0 || h % 2 != 0 || w % 2 != 0 {
            return Err(Error::invalid(format!(
                "latent size {h}x{w} must be positive and even"
            )));
        }
        // Geometry of the whole window.
        let geom = window::geometry(members, h, w)?;
        let frames: Vec<usize> = geom.iter().map(|g| g.frames).collect();
        if mine.windows(2).any(|p| p[0] >= p[1]) || mine.iter().any(|&i| i >= members.len()) {
            return Err(Error::Internal(
                "device member list must be increasing indices".into(),
            ));
        }
        // Cross-attention K/V of this device's members' prompts (computed on first use).
        let mut prompt_kv = vec![None; members.len()];
        for &i in mine {
            prompt_kv[i] = Some(members[i].prompt.kv(self)?);
        }
        // Rows and frame slots of this device's members.
        let mut row0 = vec![0usize; members.len()];
        let mut fr0 = vec![0usize; members.len()];
        let (mut n, mut nf) = (0usize, 0usize);
        for &i in mine {
            row0[i] = n;
            fr0[i] = nf;
            n += frames[i] * tpf;
            nf += frames[i];
        }
        let rows_of = |i: usize| row0[i] * d..(row0[i] + frames[i] * tpf) * d;
        // Patch embedding.
        let mut patches = vec![0f32; n * CHANNELS * 4];
        for &i in mine {
            ops::patchify(
                members[i].latents,
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
        // Time conditioning, one per frame.
        let mut e_frames = vec![0f32; nf * d];
        let mut e0_frames = vec![0f32; nf * 6 * d];
        for &i in mine {
            let (e, e0) = self.time_embedding(members[i].timestep);
            for f in fr0[i]..fr0[i] + frames[i] {
                e_frames[f * d..(f + 1) * d].copy_from_slice(&e);
                e0_frames[f * 6 * d..(f + 1) * 6 * d].copy_from_slice(&e0);
            }
        }
        // RoPE angles of this device's members (positions are absolute frames).
        let rope: Vec<Vec<(f32, f32)>> = mine
            .iter()
            .map(|&i| ops::rope_table(hd, members[i].first_frame, frames[i], hp, wp))
            .collect();
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
            // Self-attention: q, k, v of this device's tokens.
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
            for (&i, table) in mine.iter().zip(&rope) {
                ops::rope_apply(&mut q[rows_of(i)], nh, hd, table);
                ops::rope_apply(&mut k[rows_of(i)], nh, hd, table);
            }
            // Exchange K/V with the peers, then gather every member's K/V.
            let own: Vec<OwnKv> = mine
                .iter()
                .map(|&i| (i, &k[rows_of(i)], &v[rows_of(i)]))
                .collect();
            let remote = exchange(li, &own)?;
            let mut kv_of: Vec<Option<(&[f32], &[f32])>> = vec![None; members.len()];
            for &(i, kk, vv) in &own {
                kv_of[i] = Some((kk, vv));
            }
            for r in &remote {
                let len = frames.get(r.member).map(|f| f * tpf * d);
                if len != Some(r.k.len()) || r.k.len() != r.v.len() {
                    return Err(Error::Device(format!(
                        "peer sent malformed K/V for member {}",
                        r.member
                    )));
                }
                kv_of[r.member] = Some((&r.k, &r.v));
            }
            for &i in mine {
                let vis = window::visible(&geom, i, cache, mode);
                let mut segs: Vec<KvSegment> = cache
                    .frame_runs(li, &vis.cache_frames)
                    .into_iter()
                    .map(|(k, v)| KvSegment { k, v })
                    .collect();
                for (j, r) in vis.members {
                    if let Some((kj, vj)) = kv_of[j] {
                        let r = r.start * tpf * d..r.end * tpf * d;
                        segs.push(KvSegment {
                            k: &kj[r.clone()],
                            v: &vj[r],
                        });
                    }
                }
                attention(&q[rows_of(i)], nh, hd, &segs, &mut att[rows_of(i)]);
            }
            // Commit context members' K/V (own or received; attention for this layer is done).
            let fl = tpf * d;
            for (j, m) in members.iter().enumerate().filter(|(_, m)| m.context) {
                if let Some((kk, vv)) = kv_of[j] {
                    for fi in 0..frames[j] {
                        let r = fi * fl..(fi + 1) * fl;
                        cache.write(li, m.first_frame + fi, &kk[r.clone()], &vv[r]);
                    }
                }
            }
            linear(&att, n, d, &sa.o_w, Some(&sa.o_b), &mut y);
            ops::gated_residual(&mut x, &y, d, tpf, Some(&mods[2]));
            // Cross-attention (consecutive members sharing a prompt run together).
            let ca = &l.cross_attn;
            ops::layer_norm_affine(&x, d, c.eps, &l.norm3_w, &l.norm3_b, &mut y);
            linear(&y, n, d, &ca.qkv_w[..d * d], Some(&ca.qkv_b[..d]), &mut q);
            ops::rms_norm(&mut q, d, c.eps, &ca.norm_q);
            let mut a = 0;
            while a < mine.len() {
                let p = members[mine[a]].prompt.id();
                let mut b = a + 1;
                while b < mine.len() && members[mine[b]].prompt.id() == p {
                    b += 1;
                }
                let rows = row0[mine[a]] * d..(row0[mine[b - 1]] + frames[mine[b - 1]] * tpf) * d;
                let (pk, pv) = prompt_kv[mine[a]]
                    .and_then(|kv| kv.get(li))
                    .ok_or_else(|| Error::Internal("prompt K/V missing".into()))?;
                attention(
                    &q[rows.clone()],
                    nh,
                    hd,
                    &[KvSegment { k: pk, v: pv }],
                    &mut att[rows],
                );
                a = b;
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
        let mut out = Vec::with_capacity(mine.len());
        for &i in mine {
            let mut lat = vec![0f32; frames[i] * flen];
            ops::unpatchify(&head[row0[i] * po..], frames[i], CHANNELS, h, w, &mut lat);
            out.push((i, lat));
        }
        Ok(out)
    }
}
