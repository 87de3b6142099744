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
use super::ops::{self, FrameVec};
use crate::config::AttentionMode;
use crate::kv_cache::KvCache;
use crate::model::{Member, Model, PromptContext, PromptKv, CHANNELS};
use crate::weights::LayerWeights;
use crate::window::{self, MemberGeom, Visible};
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
        let d = self.config().dim;
        let (mut e, mut e0) = (vec![0f32; d], vec![0f32; 6 * d]);
        self.time_embedding_into(t, &mut Vec::new(), &mut e, &mut e0);
        (e, e0)
    }

    /// [`Model::time_embedding`] into `e` `[dim]` and `e0` `[6*dim]`, `tmp` reused scratch.
    fn time_embedding_into(&self, t: f64, tmp: &mut Vec<f32>, e: &mut [f32], e0: &mut [f32]) {
        let c = self.config();
        let w = &self.weights;
        let (d, fd) = (c.dim, c.freq_dim);
        tmp.resize(fd + 2 * d, 0.0);
        let (s, rest) = tmp.split_at_mut(fd);
        let (h, se) = rest.split_at_mut(d);
        ops::sinusoidal_into(t, s);
        linear(s, 1, fd, &w.time[0].0, Some(&w.time[0].1), h);
        ops::silu(h);
        linear(h, 1, d, &w.time[1].0, Some(&w.time[1].1), e);
        se.copy_from_slice(e);
        ops::silu(se);
        linear(se, 1, d, &w.time_proj.0, Some(&w.time_proj.1), e0);
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
        let heap: Vec<usize>;
        let all = if members.len() <= INDICES.len() {
            &INDICES[..members.len()]
        } else {
            heap = (0..members.len()).collect();
            &heap
        };
        let mut none = |_: usize, _: &[OwnKv]| Ok(Vec::new());
        let out = self.forward_partial(members, all, cache, mode, h, w, &mut none)?;
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
        let mut s = Scratch::take();
        let out = self.forward_with(members, mine, cache, mode, (h, w), exchange, &mut s);
        // On error the buffers are dropped (the next forward makes new ones).
        if out.is_ok() {
            s.give_back();
        }
        out
    }

    /// [`Model::forward_partial`] with the tick's buffers `s`.
    #[allow(clippy::too_many_arguments)]
    fn forward_with(
        &self,
        members: &[Member],
        mine: &[usize],
        cache: &mut KvCache,
        mode: AttentionMode,
        (h, w): (usize, usize),
        exchange: &mut KvExchangeFn,
        s: &mut Scratch,
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        window::geometry_into(members, h, w, &mut s.geom)?;
        if mine.windows(2).any(|p| p[0] >= p[1]) || mine.iter().any(|&i| i >= members.len()) {
            return Err(Error::Internal(
                "device member list must be increasing indices".into(),
            ));
        }
        let c = self.config();
        let Scratch {
            geom,
            lay,
            vis,
            runs,
            rope,
            bufs,
        } = s;
        lay.fill(geom, mine, h, w, c.dim);
        let lay = &*lay;
        // Cross-attention K/V of this device's members' prompts (computed on first use).
        for &i in mine {
            members[i].prompt.kv(self)?;
        }
        self.embed_patches(members, lay, bufs);
        self.time_conditioning(members, lay, bufs);
        // RoPE angles of this device's members (positions are absolute frames), what each
        // member sees and where those cache frames lie: the same for every layer.
        grow(rope, mine.len());
        grow(vis, mine.len());
        grow(runs, mine.len());
        for (k, &i) in mine.iter().enumerate() {
            let (ff, nfr) = (members[i].first_frame, lay.frames[i]);
            ops::rope_table_into(c.head_dim(), ff, nfr, lay.hp, lay.wp, &mut rope[k]);
            window::visible_into(geom, i, cache, mode, &mut vis[k]);
            cache.slot_runs_into(&vis[k].cache_frames, &mut runs[k]);
        }
        bufs.size(lay.n, c.dim, c.ffn_dim);
        let per_member = PerMember {
            rope: &rope[..mine.len()],
            vis: &vis[..mine.len()],
            runs: &runs[..mine.len()],
        };
        for (li, l) in self.weights.layers.iter().enumerate() {
            let step = LayerStep {
                model: self,
                members,
                lay,
                li,
                l,
            };
            step.self_attention(bufs, &per_member, cache, exchange)?;
            step.cross_attention(bufs)?;
            step.ffn(bufs);
        }
        Ok(self.head(lay, bufs))
    }

    /// Patch embedding of this device's members: `[n, dim]` tokens into `b.x`.
    fn embed_patches(&self, members: &[Member], lay: &Layout, b: &mut Bufs) {
        let (n, wt) = (lay.n, &self.weights);
        resize(&mut b.patches, n * CHANNELS * 4);
        for &i in &lay.mine {
            ops::patchify(
                members[i].latents,
                lay.frames[i],
                CHANNELS,
                lay.h,
                lay.w,
                &mut b.patches[lay.row0[i] * 64..],
            );
        }
        resize(&mut b.x, n * lay.d);
        let (p, x) = (&b.patches, &mut b.x);
        linear(p, n, CHANNELS * 4, &wt.patch_w, Some(&wt.patch_b), x);
    }

    /// Time conditioning, one per frame slot: `e` `[nf, dim]` and `e0` `[nf, 6 dim]`, into
    /// `b.e` and `b.e0`.
    fn time_conditioning(&self, members: &[Member], lay: &Layout, b: &mut Bufs) {
        let d = lay.d;
        resize(&mut b.e, lay.nf * d);
        resize(&mut b.e0, lay.nf * 6 * d);
        for &i in &lay.mine {
            let f0 = lay.fr0[i];
            let (e, e0) = (&mut b.e[f0 * d..], &mut b.e0[f0 * 6 * d..]);
            let (e, e0) = (&mut e[..d], &mut e0[..6 * d]);
            self.time_embedding_into(members[i].timestep, &mut b.temb, e, e0);
            for f in 1..lay.frames[i] {
                b.e.copy_within(f0 * d..(f0 + 1) * d, (f0 + f) * d);
                b.e0.copy_within(f0 * 6 * d..(f0 + 1) * 6 * d, (f0 + f) * 6 * d);
            }
        }
    }

    /// The output head (shift = m0 + e, scale = m1 + e, modulated LayerNorm, Linear) and
    /// unpatchify: `(member index, flow)` for this device's members.
    fn head(&self, lay: &Layout, b: &mut Bufs) -> Vec<(usize, Vec<f32>)> {
        let (c, wt) = (self.config(), &self.weights);
        let (d, n, tpf) = (lay.d, lay.n, lay.tpf);
        let hm = &wt.head_modulation;
        let sh = FrameVec {
            table: &b.e,
            stride: d,
            bias: Some(&hm[..d]),
        };
        let sc = FrameVec {
            bias: Some(&hm[d..2 * d]),
            ..sh
        };
        ops::ln_modulate_frames(&b.x, d, c.eps, tpf, sh, sc, &mut b.y);
        let po = c.out_dim * 4;
        resize(&mut b.head, n * po);
        linear(&b.y, n, d, &wt.head.0, Some(&wt.head.1), &mut b.head);
        let flen = CHANNELS * lay.h * lay.w;
        let mut out = Vec::with_capacity(lay.mine.len());
        for &i in &lay.mine {
            let mut lat = vec![0f32; lay.frames[i] * flen];
            ops::unpatchify(
                &b.head[lay.row0[i] * po..],
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

/// `0, 1, 2, ...`: the member list of a single-device forward, without allocating one.
const INDICES: [usize; 64] = {
    let mut a = [0usize; 64];
    let mut i = 0;
    while i < a.len() {
        a[i] = i;
        i += 1;
    }
    a
};

/// Resizes a reused buffer to `len` values (contents unspecified): allocates only when it
/// grows past its capacity.
fn resize(b: &mut Vec<f32>, len: usize) {
    b.resize(len, 0.0);
}

/// Makes a list of reused buffers at least `n` long.
fn grow<T: Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize_with(n, T::default);
    }
}

/// Where this device's members sit in its token rows and frame slots.
#[derive(Default)]
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
    /// Refills this layout for `mine` of the window `geom` (reusing its lists).
    fn fill(&mut self, geom: &[MemberGeom], mine: &[usize], h: usize, w: usize, d: usize) {
        self.frames.clear();
        self.frames.extend(geom.iter().map(|g| g.frames));
        let (hp, wp) = (h / 2, w / 2);
        let tpf = hp * wp;
        self.row0.clear();
        self.row0.resize(geom.len(), 0);
        self.fr0.clear();
        self.fr0.resize(geom.len(), 0);
        let (mut n, mut nf) = (0usize, 0usize);
        for &i in mine {
            self.row0[i] = n;
            self.fr0[i] = nf;
            n += self.frames[i] * tpf;
            nf += self.frames[i];
        }
        self.mine.clear();
        self.mine.extend_from_slice(mine);
        (self.n, self.nf, self.h, self.w) = (n, nf, h, w);
        (self.hp, self.wp, self.tpf, self.d) = (hp, wp, tpf, d);
    }

    /// The elements of member `i`'s token rows in a `[n, dim]` buffer.
    fn rows(&self, i: usize) -> Range<usize> {
        self.row0[i] * self.d..(self.row0[i] + self.frames[i] * self.tpf) * self.d
    }
}

/// Everything a forward needs besides the weights and the cache, reused from tick to tick
/// (per thread): after the first ticks of a stream a forward allocates only the flows it
/// returns (`tests/alloc_per_tick.rs` counts).
#[derive(Default)]
struct Scratch {
    /// The window's geometry.
    geom: Vec<MemberGeom>,
    /// This device's rows and frame slots.
    lay: Layout,
    /// Per member of this device: what it sees, the cache slot runs of that, its RoPE table.
    vis: Vec<Visible>,
    runs: Vec<Vec<(usize, usize)>>,
    rope: Vec<Vec<(f32, f32)>>,
    /// Activations and conditioning.
    bufs: Bufs,
}

/// The activation and conditioning buffers of a forward.
#[derive(Default)]
struct Bufs {
    /// The residual stream `[n, dim]`.
    x: Vec<f32>,
    /// Patch rows `[n, 64]`.
    patches: Vec<f32>,
    /// Time embedding `[frames, dim]` and projection `[frames, 6 dim]` per frame slot; the
    /// time embedding's temporaries.
    e: Vec<f32>,
    e0: Vec<f32>,
    temb: Vec<f32>,
    y: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    ffn: Vec<f32>,
    head: Vec<f32>,
}

impl Bufs {
    /// Sizes the per-layer activations for `n` tokens (contents unspecified).
    fn size(&mut self, n: usize, d: usize, ffn_dim: usize) {
        for (b, len) in [
            (&mut self.y, n * d),
            (&mut self.qkv, n * 3 * d),
            (&mut self.q, n * d),
            (&mut self.k, n * d),
            (&mut self.v, n * d),
            (&mut self.att, n * d),
            (&mut self.ffn, n * ffn_dim),
        ] {
            resize(b, len);
        }
    }
}

/// Spare [`Scratch`]es: a forward takes one and gives it back, so after the first ticks the
/// buffers are the right size and a tick allocates none of them (one per forward running at
/// the same time: one per device thread).
static SPARE: std::sync::Mutex<Vec<Scratch>> = std::sync::Mutex::new(Vec::new());

impl Scratch {
    /// A spare scratch, or a new one (contents unspecified).
    fn take() -> Self {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        spare.pop().unwrap_or_default()
    }

    /// Hands the buffers back for the next forward.
    fn give_back(self) {
        SPARE.lock().unwrap_or_else(|e| e.into_inner()).push(self);
    }
}

/// Frees the spare forward buffers and this thread's GEMM packing buffer (the CPU backend
/// does when it is dropped; a forward running meanwhile keeps its own).
pub(crate) fn release_thread_scratch() {
    let spare = std::mem::take(&mut *SPARE.lock().unwrap_or_else(|e| e.into_inner()));
    drop(spare);
    super::gemm::release_thread_scratch();
}

/// Per member of this device (in `mine` order), the same for every layer of a forward.
struct PerMember<'a> {
    /// RoPE tables.
    rope: &'a [Vec<(f32, f32)>],
    /// What the member's self-attention sees.
    vis: &'a [Visible],
    /// The cache slot runs of `vis.cache_frames`.
    runs: &'a [Vec<(usize, usize)>],
}

/// A short list kept on the stack up to `N` values (the usual case: a window has a few
/// members and a member sees a few runs of keys), in a `Vec` beyond.
struct SmallList<T: Copy, const N: usize> {
    stack: [T; N],
    len: usize,
    heap: Vec<T>,
}

impl<T: Copy, const N: usize> SmallList<T, N> {
    /// An empty list; `fill` only initialises the unused stack slots.
    fn new(fill: T) -> Self {
        SmallList {
            stack: [fill; N],
            len: 0,
            heap: Vec::new(),
        }
    }

    /// `n` copies of `v`.
    fn filled(v: T, n: usize) -> Self {
        let mut l = Self::new(v);
        for _ in 0..n {
            l.push(v);
        }
        l
    }

    fn push(&mut self, v: T) {
        if self.len < N {
            self.stack[self.len] = v;
        } else {
            if self.heap.is_empty() {
                self.heap.extend_from_slice(&self.stack);
            }
            self.heap.push(v);
        }
        self.len += 1;
    }

    fn as_slice(&self) -> &[T] {
        if self.len <= N {
            &self.stack[..self.len]
        } else {
            &self.heap
        }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        if self.len <= N {
            &mut self.stack[..self.len]
        } else {
            &mut self.heap
        }
    }
}

/// One layer of one device's forward.
struct LayerStep<'a> {
    model: &'a Model,
    members: &'a [Member<'a>],
    lay: &'a Layout,
    li: usize,
    l: &'a LayerWeights,
}

impl LayerStep<'_> {
    /// This layer's modulation `j` (0..6: shift, scale, gate, shift2, scale2, gate2) per frame:
    /// `e0[f, j] + modulation[j]`, read in place (`e0` is empty on a device without frames
    /// this tick).
    fn modulation<'b>(&'b self, e0: &'b [f32], j: usize) -> FrameVec<'b> {
        let d = self.lay.d;
        FrameVec {
            table: e0.get(j * d..).unwrap_or_default(),
            stride: 6 * d,
            bias: Some(&self.l.modulation[j * d..(j + 1) * d]),
        }
    }

    /// Self-attention: q, k, v of this device's tokens, the K/V exchange with the peers,
    /// attention over what each member sees, the context members' K/V into the cache, the
    /// output projection and the gated residual.
    fn self_attention(
        &self,
        b: &mut Bufs,
        pm: &PerMember,
        cache: &mut KvCache,
        exchange: &mut KvExchangeFn,
    ) -> Result<()> {
        let c = self.model.config();
        let (d, nh, hd) = (c.dim, c.num_heads, c.head_dim());
        let lay = self.lay;
        let (n, tpf, li) = (lay.n, lay.tpf, self.li);
        let members = self.members;
        let mine = &lay.mine;
        let (sh, sc) = (self.modulation(&b.e0, 0), self.modulation(&b.e0, 1));
        ops::ln_modulate_frames(&b.x, d, c.eps, tpf, sh, sc, &mut b.y);
        let sa = &self.l.self_attn;
        linear(&b.y, n, d, &sa.qkv_w, Some(&sa.qkv_b), &mut b.qkv);
        // Split q, k, v and RMS-norm q and k, row by row in parallel.
        b.q.par_chunks_mut(d)
            .zip(b.k.par_chunks_mut(d))
            .zip(b.v.par_chunks_mut(d))
            .zip(b.qkv.par_chunks(3 * d))
            .for_each(|(((q, k), v), src)| {
                q.copy_from_slice(&src[..d]);
                k.copy_from_slice(&src[d..2 * d]);
                v.copy_from_slice(&src[2 * d..]);
                ops::rms_norm_row(q, c.eps, &sa.norm_q);
                ops::rms_norm_row(k, c.eps, &sa.norm_k);
            });
        for (&i, table) in mine.iter().zip(pm.rope) {
            ops::rope_apply(&mut b.q[lay.rows(i)], nh, hd, table);
            ops::rope_apply(&mut b.k[lay.rows(i)], nh, hd, table);
        }
        // Exchange K/V with the peers, then gather every member's K/V.
        let (k, v) = (&b.k, &b.v);
        let mut own = SmallList::<OwnKv, 8>::new((0, &[], &[]));
        for &i in mine {
            own.push((i, &k[lay.rows(i)], &v[lay.rows(i)]));
        }
        let remote = exchange(li, own.as_slice())?;
        let mut kv_of = SmallList::<Option<(&[f32], &[f32])>, 8>::filled(None, members.len());
        let kv_of = kv_of.as_mut_slice();
        for &(i, kk, vv) in own.as_slice() {
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
        for (mi, &i) in mine.iter().enumerate() {
            let empty = KvSegment { k: &[], v: &[] };
            let mut segs = SmallList::<KvSegment, 16>::new(empty);
            for &run in &pm.runs[mi] {
                let (k, v) = cache.slot_run(li, run);
                segs.push(KvSegment { k, v });
            }
            for (j, r) in &pm.vis[mi].members {
                if let Some((kj, vj)) = kv_of[*j] {
                    let r = r.start * tpf * d..r.end * tpf * d;
                    segs.push(KvSegment {
                        k: &kj[r.clone()],
                        v: &vj[r],
                    });
                }
            }
            let rows = lay.rows(i);
            attention(
                &b.q[rows.clone()],
                nh,
                hd,
                segs.as_slice(),
                &mut b.att[rows],
            );
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
        let g = Some(self.modulation(&b.e0, 2));
        linear_residual(
            &b.att,
            n,
            d,
            &sa.o_w,
            Some(&sa.o_b),
            &mut b.y,
            &mut b.x,
            tpf,
            g,
        );
        Ok(())
    }

    /// Cross-attention to the prompts (consecutive members sharing a prompt run together)
    /// and the residual.
    fn cross_attention(&self, b: &mut Bufs) -> Result<()> {
        let c = self.model.config();
        let (d, nh, hd) = (c.dim, c.num_heads, c.head_dim());
        let lay = self.lay;
        let (n, tpf, li) = (lay.n, lay.tpf, self.li);
        let (members, mine) = (self.members, &lay.mine);
        let ca = &self.l.cross_attn;
        let (w3, b3) = (&self.l.norm3_w, &self.l.norm3_b);
        ops::layer_norm_affine(&b.x, d, c.eps, w3, b3, &mut b.y);
        let (qw, qb) = (&ca.qkv_w[..d * d], &ca.qkv_b[..d]);
        linear(&b.y, n, d, qw, Some(qb), &mut b.q);
        ops::rms_norm(&mut b.q, d, c.eps, &ca.norm_q);
        let mut a = 0;
        while a < mine.len() {
            let p = members[mine[a]].prompt;
            let mut e = a + 1;
            while e < mine.len() && members[mine[e]].prompt.id() == p.id() {
                e += 1;
            }
            let last = mine[e - 1];
            let rows = lay.row0[mine[a]] * d..(lay.row0[last] + lay.frames[last] * tpf) * d;
            let (pk, pv) = p
                .kv(self.model)?
                .get(li)
                .ok_or_else(|| Error::Internal("prompt K/V missing".into()))?;
            let seg = [KvSegment { k: pk, v: pv }];
            attention(&b.q[rows.clone()], nh, hd, &seg, &mut b.att[rows]);
            a = e;
        }
        let (ow, ob) = (&ca.o_w, Some(&ca.o_b[..]));
        linear_residual(&b.att, n, d, ow, ob, &mut b.y, &mut b.x, tpf, None);
        Ok(())
    }

    /// The FFN (modulated LayerNorm, Linear, GELU(tanh), Linear) and its gated residual.
    fn ffn(&self, b: &mut Bufs) {
        let c = self.model.config();
        let (d, n, tpf, l) = (c.dim, self.lay.n, self.lay.tpf, self.l);
        let (sh, sc) = (self.modulation(&b.e0, 3), self.modulation(&b.e0, 4));
        ops::ln_modulate_frames(&b.x, d, c.eps, tpf, sh, sc, &mut b.y);
        linear(&b.y, n, d, &l.ffn0_w, Some(&l.ffn0_b), &mut b.ffn);
        ops::gelu_tanh(&mut b.ffn);
        let g = Some(self.modulation(&b.e0, 5));
        let (w2, b2) = (&l.ffn2_w, Some(&l.ffn2_b[..]));
        linear_residual(&b.ffn, n, c.ffn_dim, w2, b2, &mut b.y, &mut b.x, tpf, g);
    }
}
