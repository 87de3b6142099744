//! The Wan causal DiT forward in f32 on the CPU: the reference every other backend is checked
//! against. One joint pass over a window of members ([`crate::model::Member`]): the tokens of
//! all members are concatenated so every linear layer is one GEMM over the window; attention
//! runs per member over the key frames that member may see ([`crate::window`]).
//!
//! A layer is: modulated LayerNorm, self-attention (q/k/v, RMS norm, RoPE, attention over the
//! cache and the window, output projection, gated residual), cross-attention to the prompt
//! (LayerNorm, q, attention to the prompt's K/V, output projection, residual), and the FFN
//! (modulated LayerNorm, Linear, GELU(tanh), Linear, gated residual); the op definitions are in
//! [`super::ops`], [`super::gemm`] and [`super::attention`].

use super::attention::{attention, KvSegment};
use super::gemm::{linear, linear_residual};
use super::ops;
use crate::config::AttentionMode;
use crate::kv_cache::KvCache;
use crate::model::{Member, Model, PromptContext, PromptKv, CHANNELS};
use crate::weights::LayerWeights;
use crate::window::{self, MemberGeom};
use crate::{Error, Result};
use rayon::prelude::*;
use std::ops::Range;

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

impl PromptContext {
    /// The per-layer cross-attention K/V (f32), computed on the CPU on the first call (later
    /// calls, from any thread, return the same values). `model` must be the model this
    /// context was made for.
    pub fn kv(&self, model: &Model) -> Result<&[(Vec<f32>, Vec<f32>)]> {
        self.check_model(model)?;
        Ok(self.kv.get_or_init(|| model.compute_prompt_kv(self)))
    }
}

impl Model {
    /// Text embedding (`Linear, GELU(tanh), Linear` over the zero-padded embeddings) and the
    /// per-layer cross-attention K (RMS-normed) and V of `p`, in f32 on the CPU.
    fn compute_prompt_kv(&self, p: &PromptContext) -> PromptKv {
        let c = self.config();
        let (d, tl) = (c.dim, c.text_len);
        let w = &self.weights;
        let mut padded = vec![0f32; tl * c.text_dim];
        padded[..p.embeds().len()].copy_from_slice(p.embeds());
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
        if h == 0 || w == 0 || h % 2 != 0 || w % 2 != 0 {
            return Err(Error::invalid(format!(
                "latent size {h}x{w} must be positive and even"
            )));
        }
        let geom = window::geometry(members, h, w)?;
        if mine.windows(2).any(|p| p[0] >= p[1]) || mine.iter().any(|&i| i >= members.len()) {
            return Err(Error::Internal(
                "device member list must be increasing indices".into(),
            ));
        }
        let c = self.config();
        let lay = Layout::new(&geom, mine, h, w, c.dim);
        // Cross-attention K/V of this device's members' prompts (computed on first use).
        let mut prompt_kv = vec![None; members.len()];
        for &i in mine {
            prompt_kv[i] = Some(members[i].prompt.kv(self)?);
        }
        let mut x = self.embed_patches(members, &lay);
        let (e_frames, e0_frames) = self.time_conditioning(members, &lay);
        // RoPE angles of this device's members (positions are absolute frames).
        let rope: Vec<Vec<(f32, f32)>> = mine
            .iter()
            .map(|&i| {
                ops::rope_table(
                    c.head_dim(),
                    members[i].first_frame,
                    lay.frames[i],
                    lay.hp,
                    lay.wp,
                )
            })
            .collect();
        let mut s = Scratch::take(lay.n, lay.nf, c.dim, c.ffn_dim);
        for (li, l) in self.weights.layers.iter().enumerate() {
            s.modulation(l, &e0_frames, lay.nf, c.dim);
            let step = LayerStep {
                model: self,
                members,
                lay: &lay,
                li,
                l,
            };
            step.self_attention(&mut x, &mut s, &rope, &geom, cache, mode, exchange)?;
            step.cross_attention(&mut x, &mut s, &prompt_kv)?;
            step.ffn(&mut x, &mut s);
        }
        let out = self.head(&x, &e_frames, &lay, &mut s.y);
        s.give_back();
        Ok(out)
    }

    /// Patch embedding of this device's members: `[n, dim]` tokens.
    fn embed_patches(&self, members: &[Member], lay: &Layout) -> Vec<f32> {
        let (n, wt) = (lay.n, &self.weights);
        let mut patches = vec![0f32; n * CHANNELS * 4];
        for &i in &lay.mine {
            ops::patchify(
                members[i].latents,
                lay.frames[i],
                CHANNELS,
                lay.h,
                lay.w,
                &mut patches[lay.row0[i] * 64..],
            );
        }
        let mut x = vec![0f32; n * lay.d];
        linear(
            &patches,
            n,
            CHANNELS * 4,
            &wt.patch_w,
            Some(&wt.patch_b),
            &mut x,
        );
        x
    }

    /// Time conditioning, one per frame slot: `e` `[nf, dim]` and `e0` `[nf, 6 dim]`.
    fn time_conditioning(&self, members: &[Member], lay: &Layout) -> (Vec<f32>, Vec<f32>) {
        let d = lay.d;
        let mut e_frames = vec![0f32; lay.nf * d];
        let mut e0_frames = vec![0f32; lay.nf * 6 * d];
        for &i in &lay.mine {
            let (e, e0) = self.time_embedding(members[i].timestep);
            for f in lay.fr0[i]..lay.fr0[i] + lay.frames[i] {
                e_frames[f * d..(f + 1) * d].copy_from_slice(&e);
                e0_frames[f * 6 * d..(f + 1) * 6 * d].copy_from_slice(&e0);
            }
        }
        (e_frames, e0_frames)
    }

    /// The output head (shift = m0 + e, scale = m1 + e, modulated LayerNorm, Linear) and
    /// unpatchify: `(member index, flow)` for this device's members. `y` is scratch.
    fn head(
        &self,
        x: &[f32],
        e_frames: &[f32],
        lay: &Layout,
        y: &mut [f32],
    ) -> Vec<(usize, Vec<f32>)> {
        let (c, wt) = (self.config(), &self.weights);
        let (d, nf, n, tpf) = (lay.d, lay.nf, lay.n, lay.tpf);
        let (mut sh, mut sc) = (vec![0f32; nf * d], vec![0f32; nf * d]);
        for f in 0..nf {
            for t in 0..d {
                sh[f * d + t] = wt.head_modulation[t] + e_frames[f * d + t];
                sc[f * d + t] = wt.head_modulation[d + t] + e_frames[f * d + t];
            }
        }
        ops::ln_modulate(x, d, c.eps, tpf, &sh, &sc, y);
        let po = c.out_dim * 4;
        let mut head = vec![0f32; n * po];
        linear(y, n, d, &wt.head.0, Some(&wt.head.1), &mut head);
        let flen = CHANNELS * lay.h * lay.w;
        let mut out = Vec::with_capacity(lay.mine.len());
        for &i in &lay.mine {
            let mut lat = vec![0f32; lay.frames[i] * flen];
            ops::unpatchify(
                &head[lay.row0[i] * po..],
                lay.frames[i],
                CHANNELS,
                lay.h,
                lay.w,
                &mut lat,
            );
            out.push((i, lat));
        }
        out
    }
}

/// Where this device's members sit in its token rows and frame slots.
struct Layout {
    /// This device's members (indices into the window, increasing).
    mine: Vec<usize>,
    /// Frames of every member of the window.
    frames: Vec<usize>,
    /// First token row of each of this device's members.
    row0: Vec<usize>,
    /// First frame slot of each of this device's members.
    fr0: Vec<usize>,
    /// Token rows and frame slots of this device.
    n: usize,
    nf: usize,
    /// Latent size, patch grid, tokens per frame, model width.
    h: usize,
    w: usize,
    hp: usize,
    wp: usize,
    tpf: usize,
    d: usize,
}

impl Layout {
    fn new(geom: &[MemberGeom], mine: &[usize], h: usize, w: usize, d: usize) -> Self {
        let frames: Vec<usize> = geom.iter().map(|g| g.frames).collect();
        let (hp, wp) = (h / 2, w / 2);
        let tpf = hp * wp;
        let mut row0 = vec![0usize; geom.len()];
        let mut fr0 = vec![0usize; geom.len()];
        let (mut n, mut nf) = (0usize, 0usize);
        for &i in mine {
            row0[i] = n;
            fr0[i] = nf;
            n += frames[i] * tpf;
            nf += frames[i];
        }
        Layout {
            mine: mine.to_vec(),
            frames,
            row0,
            fr0,
            n,
            nf,
            h,
            w,
            hp,
            wp,
            tpf,
            d,
        }
    }

    /// The elements of member `i`'s token rows in a `[n, dim]` buffer.
    fn rows(&self, i: usize) -> Range<usize> {
        self.row0[i] * self.d..(self.row0[i] + self.frames[i] * self.tpf) * self.d
    }
}

/// Activations reused by every layer.
struct Scratch {
    y: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    ffn: Vec<f32>,
    /// `mods[j] = modulation[j] + e0[j]` per frame, j = shift, scale, gate, shift2, scale2,
    /// gate2.
    mods: Vec<Vec<f32>>,
}

thread_local! {
    /// The last forward's [`Scratch`] of this thread, reused by the next one: the buffers
    /// grow to the largest window once, then a tick allocates none of them.
    static SCRATCH: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

impl Scratch {
    /// This thread's scratch, sized for `n` tokens and `nf` frames (contents unspecified).
    fn take(n: usize, nf: usize, d: usize, ffn_dim: usize) -> Self {
        let mut s = SCRATCH.with(|c| c.take()).unwrap_or(Scratch {
            y: Vec::new(),
            qkv: Vec::new(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            att: Vec::new(),
            ffn: Vec::new(),
            mods: vec![Vec::new(); 6],
        });
        for (b, len) in [
            (&mut s.y, n * d),
            (&mut s.qkv, n * 3 * d),
            (&mut s.q, n * d),
            (&mut s.k, n * d),
            (&mut s.v, n * d),
            (&mut s.att, n * d),
            (&mut s.ffn, n * ffn_dim),
        ] {
            b.resize(len, 0.0);
        }
        s.mods.iter_mut().for_each(|m| m.resize(nf * d, 0.0));
        s
    }

    /// Hands the buffers back to this thread for the next forward.
    fn give_back(self) {
        SCRATCH.with(|c| c.set(Some(self)));
    }
}

/// Frees this thread's reused forward buffers (the CPU backend does when it is dropped).
pub(crate) fn release_thread_scratch() {
    SCRATCH.with(|c| drop(c.take()));
    super::gemm::release_thread_scratch();
}

impl Scratch {
    /// This layer's per-frame modulation from the time conditioning `e0_frames`.
    fn modulation(&mut self, l: &LayerWeights, e0_frames: &[f32], nf: usize, d: usize) {
        for (j, mj) in self.mods.iter_mut().enumerate() {
            for f in 0..nf {
                for t in 0..d {
                    mj[f * d + t] = l.modulation[j * d + t] + e0_frames[f * 6 * d + j * d + t];
                }
            }
        }
    }
}

/// A member's prompt K/V, per layer (present for this device's members).
type PromptKvRef<'a> = &'a [(Vec<f32>, Vec<f32>)];

/// One layer of one device's forward.
struct LayerStep<'a> {
    model: &'a Model,
    members: &'a [Member<'a>],
    lay: &'a Layout,
    li: usize,
    l: &'a LayerWeights,
}

impl LayerStep<'_> {
    /// Self-attention: q, k, v of this device's tokens, the K/V exchange with the peers,
    /// attention over what each member sees, the context members' K/V into the cache, the
    /// output projection and the gated residual.
    #[allow(clippy::too_many_arguments)]
    fn self_attention(
        &self,
        x: &mut [f32],
        s: &mut Scratch,
        rope: &[Vec<(f32, f32)>],
        geom: &[MemberGeom],
        cache: &mut KvCache,
        mode: AttentionMode,
        exchange: &mut KvExchangeFn,
    ) -> Result<()> {
        let c = self.model.config();
        let (d, nh, hd) = (c.dim, c.num_heads, c.head_dim());
        let lay = self.lay;
        let (n, tpf, li) = (lay.n, lay.tpf, self.li);
        let members = self.members;
        let mine = &lay.mine;
        ops::ln_modulate(x, d, c.eps, tpf, &s.mods[0], &s.mods[1], &mut s.y);
        let sa = &self.l.self_attn;
        linear(&s.y, n, d, &sa.qkv_w, Some(&sa.qkv_b), &mut s.qkv);
        // Split q, k, v and RMS-norm q and k, row by row in parallel.
        s.q.par_chunks_mut(d)
            .zip(s.k.par_chunks_mut(d))
            .zip(s.v.par_chunks_mut(d))
            .zip(s.qkv.par_chunks(3 * d))
            .for_each(|(((q, k), v), src)| {
                q.copy_from_slice(&src[..d]);
                k.copy_from_slice(&src[d..2 * d]);
                v.copy_from_slice(&src[2 * d..]);
                ops::rms_norm_row(q, c.eps, &sa.norm_q);
                ops::rms_norm_row(k, c.eps, &sa.norm_k);
            });
        for (&i, table) in mine.iter().zip(rope) {
            ops::rope_apply(&mut s.q[lay.rows(i)], nh, hd, table);
            ops::rope_apply(&mut s.k[lay.rows(i)], nh, hd, table);
        }
        // Exchange K/V with the peers, then gather every member's K/V.
        let (k, v) = (&s.k, &s.v);
        let own: Vec<OwnKv> = mine
            .iter()
            .map(|&i| (i, &k[lay.rows(i)], &v[lay.rows(i)]))
            .collect();
        let remote = exchange(li, &own)?;
        let mut kv_of: Vec<Option<(&[f32], &[f32])>> = vec![None; members.len()];
        for &(i, kk, vv) in &own {
            kv_of[i] = Some((kk, vv));
        }
        for r in &remote {
            let len = lay.frames.get(r.member).map(|f| f * tpf * d);
            if len != Some(r.k.len()) || r.k.len() != r.v.len() {
                return Err(Error::Device(format!(
                    "peer sent malformed K/V for member {}",
                    r.member
                )));
            }
            kv_of[r.member] = Some((&r.k, &r.v));
        }
        for &i in mine {
            let vis = window::visible(geom, i, cache, mode);
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
            attention(&s.q[lay.rows(i)], nh, hd, &segs, &mut s.att[lay.rows(i)]);
        }
        // Commit context members' K/V (own or received; attention for this layer is done).
        let fl = tpf * d;
        for (j, m) in members.iter().enumerate().filter(|(_, m)| m.context) {
            if let Some((kk, vv)) = kv_of[j] {
                for fi in 0..lay.frames[j] {
                    let r = fi * fl..(fi + 1) * fl;
                    cache.write(li, m.first_frame + fi, &kk[r.clone()], &vv[r]);
                }
            }
        }
        let (att, y, g) = (&s.att, &mut s.y, Some(&s.mods[2][..]));
        linear_residual(att, n, d, &sa.o_w, Some(&sa.o_b), y, x, tpf, g);
        Ok(())
    }

    /// Cross-attention to the prompts (consecutive members sharing a prompt run together)
    /// and the residual.
    fn cross_attention(
        &self,
        x: &mut [f32],
        s: &mut Scratch,
        prompt_kv: &[Option<PromptKvRef>],
    ) -> Result<()> {
        let c = self.model.config();
        let (d, nh, hd) = (c.dim, c.num_heads, c.head_dim());
        let lay = self.lay;
        let (n, tpf, li) = (lay.n, lay.tpf, self.li);
        let (members, mine) = (self.members, &lay.mine);
        let ca = &self.l.cross_attn;
        ops::layer_norm_affine(x, d, c.eps, &self.l.norm3_w, &self.l.norm3_b, &mut s.y);
        linear(
            &s.y,
            n,
            d,
            &ca.qkv_w[..d * d],
            Some(&ca.qkv_b[..d]),
            &mut s.q,
        );
        ops::rms_norm(&mut s.q, d, c.eps, &ca.norm_q);
        let mut a = 0;
        while a < mine.len() {
            let p = members[mine[a]].prompt.id();
            let mut b = a + 1;
            while b < mine.len() && members[mine[b]].prompt.id() == p {
                b += 1;
            }
            let rows =
                lay.row0[mine[a]] * d..(lay.row0[mine[b - 1]] + lay.frames[mine[b - 1]] * tpf) * d;
            let (pk, pv) = prompt_kv[mine[a]]
                .and_then(|kv| kv.get(li))
                .ok_or_else(|| Error::Internal("prompt K/V missing".into()))?;
            attention(
                &s.q[rows.clone()],
                nh,
                hd,
                &[KvSegment { k: pk, v: pv }],
                &mut s.att[rows],
            );
            a = b;
        }
        linear_residual(&s.att, n, d, &ca.o_w, Some(&ca.o_b), &mut s.y, x, tpf, None);
        Ok(())
    }

    /// The FFN (modulated LayerNorm, Linear, GELU(tanh), Linear) and its gated residual.
    fn ffn(&self, x: &mut [f32], s: &mut Scratch) {
        let c = self.model.config();
        let (d, n, tpf, l) = (c.dim, self.lay.n, self.lay.tpf, self.l);
        ops::ln_modulate(x, d, c.eps, tpf, &s.mods[3], &s.mods[4], &mut s.y);
        linear(&s.y, n, d, &l.ffn0_w, Some(&l.ffn0_b), &mut s.ffn);
        ops::gelu_tanh(&mut s.ffn);
        let (h, y, g) = (&s.ffn, &mut s.y, Some(&s.mods[5][..]));
        linear_residual(h, n, c.ffn_dim, &l.ffn2_w, Some(&l.ffn2_b), y, x, tpf, g);
    }
}
