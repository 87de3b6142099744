//! The tick tables: per-tick data (latents, conditioning, RoPE positions, cache slots) and
//! the attention segment tables and groups of a window, built on the host and uploaded before
//! the tick's launches, and the launch shape they imply.

use super::device::DevPtr;
use super::{CudaBackend, ShapeKey};
use crate::kernels::params::{BcAttnGroup, BcKvSegment};
use crate::kv_cache::KvCache;
use crate::model::Member;
use crate::window;
use crate::{Error, Result};

/// A run of keys: cache slots or window rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Src {
    Cache {
        slot: usize,
        frames: usize,
    },
    Win {
        row: usize,
        rows: usize,
    },
    /// Rows of the previous tick's K/V (lagged exchange), in that tick's row layout.
    Prev {
        row: usize,
        rows: usize,
    },
}

/// Lagged exchange, as one device sees a tick: per member, the first row of its previous-tick
/// K/V in `prev_kv` (`None`: not available, the member is not attended to), for members this
/// device does not compute; and per layer the (K, V) buffers of the previous tick.
pub(super) struct LagView<'a> {
    pub(super) prev_row: &'a [Option<usize>],
    pub(super) prev_kv: &'a [(DevPtr, DevPtr)],
}

pub(super) fn push_src(v: &mut Vec<Src>, s: Src) {
    if let Some(last) = v.last_mut() {
        match (last, s) {
            (
                Src::Cache { slot, frames },
                Src::Cache {
                    slot: s2,
                    frames: f2,
                },
            ) if *slot + *frames == s2 => {
                *frames += f2;
                return;
            }
            (Src::Win { row, rows }, Src::Win { row: r2, rows: n2 })
            | (Src::Prev { row, rows }, Src::Prev { row: r2, rows: n2 })
                if *row + *rows == r2 =>
            {
                *rows += n2;
                return;
            }
            _ => {}
        }
    }
    v.push(s);
}

impl CudaBackend<'_> {
    /// Validates the window, uploads the tick's data and tables and returns the launch shape.
    /// `own`: the members this device computes (all with `None`); the visibility tables and
    /// the cache writes cover every member, the attention groups and row ranges only `own`.
    /// `lag`: lagged exchange (members of peers are read from the previous tick's K/V, or
    /// not attended to; only this device's context members are written to its cache).
    /// `held`: the block of every member, whose latents the device holds
    /// ([`CudaBackend::load_latents`]); `None`: every member's latents are uploaded.
    pub(super) fn prepare(
        &mut self,
        members: &[Member],
        own: Option<&[usize]>,
        lag: Option<&LagView>,
        held: Option<&[usize]>,
    ) -> Result<(Shape, ShapeKey)> {
        let own: Vec<bool> = match own {
            None => vec![true; members.len()],
            Some(o) => (0..members.len()).map(|i| o.contains(&i)).collect(),
        };
        let c = self.model.config();
        let (h, w) = (self.opts.height, self.opts.width);
        let geom = window::geometry(members, h, w)?;
        let nf: usize = geom.iter().map(|g| g.frames).sum();
        if members.len() > self.max_members || nf > self.max_frames {
            return Err(Error::Internal(format!(
                "window of {} members / {nf} frames exceeds the CUDA buffers ({} / {})",
                members.len(),
                self.max_members,
                self.max_frames
            )));
        }
        let pslot = self.load_prompts(members, &own)?;
        let tables = TableInput {
            members,
            own: &own,
            pslot: &pslot,
            lag,
            cache: &self.geom,
            slots: self.slots,
            mode: self.opts.attention,
            height: h,
            width: w,
            dim: c.dim,
            text_len: c.text_len,
            seg_max: self.seg_max,
            layer_kv: &(0..self.layers.len())
                .map(|li| {
                    let ld = &self.layers[li];
                    LayerKv {
                        cache: (ld.cache_k, ld.cache_v),
                        window: self.kv_bufs(li),
                    }
                })
                .collect::<Vec<_>>(),
            prompt_kv: self.b.prompt_kv,
            prompt_slots: self.prompt_slots.len(),
        }
        .build()?;
        // Per-tick conditioning: latents and time embeddings (host-cached per timestep).
        self.load_time_embeddings(members)?;
        self.load_latents(members, held, &own)?;
        let g = &self.gpu;
        let t = &tables;
        g.upload_staged(self.b.frame_pos, &t.pos)?;
        g.upload_staged(self.b.frame_slot, &t.slot)?;
        g.upload_staged(self.b.sa_segs, &t.seg_tab)?;
        g.upload_staged(self.b.sa_index, &t.index)?;
        g.upload_staged(self.b.sa_groups, &t.groups)?;
        g.upload_staged(self.b.ca_segs, &t.ca_tab)?;
        g.upload_staged(self.b.ca_index, &t.ca_index)?;
        g.upload_staged(self.b.ca_groups, &t.ca_groups)?;
        // Pinned staging: the host vectors may end now; the next tick's tables wait for this
        // batch's event (queued before this tick's forward), not for the stream.
        self.gpu.end_staged()?;
        self.tune_attention(&tables)?;
        Ok((tables.shape, tables.key))
    }
}

/// The cache slot of committed frame `f` in a cache of `slots` slots with `geom`'s layout.
pub(super) fn cache_slot(geom: &KvCache, slots: usize, f: usize) -> Result<usize> {
    let s = geom.slot(f);
    if s >= slots {
        return Err(Error::OutOfMemory(format!(
            "the CUDA KV cache holds {slots} frames with global attention and frame {f} does not fit (a Generator run sizes it for its frames; otherwise set BC_CUDA_CACHE_FRAMES), or use local attention"
        )));
    }
    Ok(s)
}

/// What the tick tables of one device are built from: host data only (device addresses are
/// numbers the tables store, never dereferenced here).
pub(super) struct TableInput<'a> {
    /// The window, ordered by first frame.
    pub(super) members: &'a [Member<'a>],
    /// Per member: computed on this device.
    pub(super) own: &'a [bool],
    /// Per member: its prompt's K/V slot (`Some` for every own member).
    pub(super) pslot: &'a [Option<usize>],
    /// Lagged exchange: where the peers' members' previous-tick K/V are.
    pub(super) lag: Option<&'a LagView<'a>>,
    /// The cache geometry (committed frames, local window, sink) and its slot count.
    pub(super) cache: &'a KvCache,
    pub(super) slots: usize,
    pub(super) mode: crate::config::AttentionMode,
    /// Latent size, model width, prompt rows.
    pub(super) height: usize,
    pub(super) width: usize,
    pub(super) dim: usize,
    pub(super) text_len: usize,
    /// Segment-table capacity per layer.
    pub(super) seg_max: usize,
    /// Per layer: the cache's (K, V) and the window's (K, V) buffers.
    pub(super) layer_kv: &'a [LayerKv],
    /// The prompt K/V slots (`[slots, layers, 2, text_len, dim]` bf16) and their count.
    pub(super) prompt_kv: DevPtr,
    pub(super) prompt_slots: usize,
}

/// One layer's K/V buffers as the segment tables address them: (K, V) of the cache and of
/// the window.
#[derive(Clone, Copy, Debug)]
pub(super) struct LayerKv {
    pub(super) cache: (DevPtr, DevPtr),
    pub(super) window: (DevPtr, DevPtr),
}

/// One device's tables for one tick, as uploaded.
pub(super) struct TickTables {
    /// Per frame slot: absolute frame (RoPE position) and cache slot (context frames).
    pub(super) pos: Vec<i32>,
    pub(super) slot: Vec<i32>,
    /// Self-attention: `[layers, seg_max]` segments, per member its segments' indices, and
    /// one group per own member.
    pub(super) seg_tab: Vec<BcKvSegment>,
    pub(super) index: Vec<i32>,
    pub(super) groups: Vec<BcAttnGroup>,
    /// Cross-attention: `[layers, prompt slots]` segments, per group its slot, and one group
    /// per run of consecutive own members sharing a prompt.
    pub(super) ca_tab: Vec<BcKvSegment>,
    pub(super) ca_index: Vec<i32>,
    pub(super) ca_groups: Vec<BcAttnGroup>,
    pub(super) shape: Shape,
    pub(super) key: ShapeKey,
}

/// The self-attention tables of a tick: the segment table, the groups' segment lists, the
/// groups (most keys first) and the most keys one group sees.
type SelfTables = (Vec<BcKvSegment>, Vec<i32>, Vec<BcAttnGroup>, usize);

impl TableInput<'_> {
    fn slot_of(&self, f: usize) -> Result<usize> {
        cache_slot(self.cache, self.slots, f)
    }

    /// Builds the tables (see [`TickTables`]).
    pub(super) fn build(&self) -> Result<TickTables> {
        let (members, own) = (self.members, self.own);
        let tpf = self.tpf();
        let geom = window::geometry(members, self.height, self.width)?;
        let frames: Vec<usize> = geom.iter().map(|g| g.frames).collect();
        let (mut row0, mut fr0) = (Vec::new(), Vec::new());
        let (mut r, mut f) = (0, 0);
        for &fc in &frames {
            row0.push(r);
            fr0.push(f);
            r += fc * tpf;
            f += fc;
        }
        let (pos, slot) = self.frame_tables(&frames)?;
        let lists = self.visibility(&geom, &row0)?;
        let (seg_tab, index, groups, max_keys) =
            self.self_attention_tables(&lists, &frames, &row0)?;
        let ca_tab = self.prompt_segments();
        let (ca_index, ca_groups, cross_runs) = self.cross_attention_groups(&frames, &row0)?;
        // Runs of consecutive own members: (first row, rows, first frame, frames).
        let mut ranges: Vec<(usize, usize, usize, usize)> = Vec::new();
        for i in (0..members.len()).filter(|&i| own[i]) {
            match ranges.last_mut() {
                Some(r) if r.0 + r.1 == row0[i] => {
                    r.1 += frames[i] * tpf;
                    r.3 += frames[i];
                }
                _ => ranges.push((row0[i], frames[i] * tpf, fr0[i], frames[i])),
            }
        }
        let shape = Shape {
            frames: frames.clone(),
            row0,
            fr0,
            ranges,
            groups: groups.len(),
            max_rows: (0..members.len())
                .filter(|&i| own[i])
                .map(|i| frames[i] * tpf)
                .max()
                .unwrap_or(0),
            max_keys,
            cross_groups: ca_groups.iter().map(|g| g.q_rows as usize).collect(),
            cache_writes: (0..members.len())
                .filter(|&j| members[j].context && (own[j] || self.lag.is_none()))
                .collect(),
        };
        let key = ShapeKey {
            members: frames
                .iter()
                .zip(members)
                .map(|(&f, m)| (f, m.context))
                .collect(),
            cross_runs,
        };
        Ok(TickTables {
            pos,
            slot,
            seg_tab,
            index,
            groups,
            ca_tab,
            ca_index,
            ca_groups,
            shape,
            key,
        })
    }

    /// Per frame slot of the window: its absolute frame (RoPE position) and, for context
    /// frames, the cache slot its K/V go to.
    fn frame_tables(&self, frames: &[usize]) -> Result<(Vec<i32>, Vec<i32>)> {
        let nf: usize = frames.iter().sum();
        let (mut pos, mut slot) = (Vec::with_capacity(nf), Vec::with_capacity(nf));
        for (i, m) in self.members.iter().enumerate() {
            for fi in 0..frames[i] {
                let af = m.first_frame + fi;
                pos.push(i32::try_from(af).map_err(|_| Error::invalid("frame index too large"))?);
                slot.push(if m.context {
                    self.slot_of(af)? as i32
                } else {
                    0
                });
            }
        }
        Ok((pos, slot))
    }

    /// Self-attention visibility, the rule every backend shares ([`window::visible`]): per
    /// member, the runs of keys it attends to (adjacent runs merged).
    fn visibility(&self, geom: &[window::MemberGeom], row0: &[usize]) -> Result<Vec<Vec<Src>>> {
        let tpf = self.tpf();
        let mut lists: Vec<Vec<Src>> = Vec::with_capacity(self.members.len());
        for i in 0..self.members.len() {
            let vis = window::visible(geom, i, self.cache, self.mode);
            let mut segs = Vec::new();
            for f in vis.cache_frames {
                push_src(
                    &mut segs,
                    Src::Cache {
                        slot: self.slot_of(f)?,
                        frames: 1,
                    },
                );
            }
            for (j, r) in vis.members {
                let rows = r.len() * tpf;
                let src = match self.lag {
                    Some(lv) if !self.own[j] => match lv.prev_row[j] {
                        Some(pr) => Src::Prev {
                            row: pr + r.start * tpf,
                            rows,
                        },
                        // The peer's K/V did not arrive: not attended to.
                        None => continue,
                    },
                    _ => Src::Win {
                        row: row0[j] + r.start * tpf,
                        rows,
                    },
                };
                push_src(&mut segs, src);
            }
            lists.push(segs);
        }
        Ok(lists)
    }

    /// The self-attention segment table (`[layers, seg_max]`: each layer's key runs as
    /// addresses, padded with empty segments), each member's segment indices, and one group
    /// per own member.
    fn self_attention_tables(
        &self,
        lists: &[Vec<Src>],
        frames: &[usize],
        row0: &[usize],
    ) -> Result<SelfTables> {
        let tpf = self.tpf();
        let nseg: usize = lists.iter().map(Vec::len).sum();
        if nseg > self.seg_max {
            return Err(Error::Internal("attention segment table overflow".into()));
        }
        let row_bytes = (self.dim * 2) as u64;
        let mut seg_tab = Vec::with_capacity(self.layer_kv.len() * self.seg_max);
        for (li, lk) in self.layer_kv.iter().enumerate() {
            let ((cache_k, cache_v), (bk, bv)) = (lk.cache, lk.window);
            for s in lists.iter().flatten() {
                let (k, v, tokens) = match *s {
                    Src::Cache { slot, frames } => {
                        let off = (slot * tpf) as u64 * row_bytes;
                        (cache_k + off, cache_v + off, frames * tpf)
                    }
                    Src::Win { row, rows } => {
                        let off = row as u64 * row_bytes;
                        (bk + off, bv + off, rows)
                    }
                    Src::Prev { row, rows } => {
                        let (pk, pv) = self
                            .lag
                            .and_then(|lv| lv.prev_kv.get(li))
                            .copied()
                            .ok_or_else(|| Error::Internal("lagged K/V buffers missing".into()))?;
                        let off = row as u64 * row_bytes;
                        (pk + off, pv + off, rows)
                    }
                };
                seg_tab.push(BcKvSegment {
                    k: k as *const _,
                    v: v as *const _,
                    tokens: tokens as i32,
                    _pad: 0,
                });
            }
            while seg_tab.len() % self.seg_max != 0 {
                seg_tab.push(BcKvSegment {
                    k: std::ptr::null(),
                    v: std::ptr::null(),
                    tokens: 0,
                    _pad: 0,
                });
            }
        }
        let mut index = Vec::with_capacity(nseg);
        let mut groups = Vec::with_capacity(lists.len());
        for (i, list) in lists.iter().enumerate() {
            if self.own[i] {
                let keys: usize = list
                    .iter()
                    .map(|s| match *s {
                        Src::Cache { frames, .. } => frames * tpf,
                        Src::Win { rows, .. } | Src::Prev { rows, .. } => rows,
                    })
                    .sum();
                groups.push((
                    keys,
                    BcAttnGroup {
                        q_begin: row0[i] as i32,
                        q_rows: (frames[i] * tpf) as i32,
                        seg_begin: index.len() as i32,
                        seg_count: list.len() as i32,
                    },
                ));
            }
            let b = index.len() as i32;
            index.extend((0..list.len() as i32).map(|x| b + x));
        }
        // Groups with the most keys first: blocks start in grid order (the group is grid.z), so
        // the longest blocks start first instead of forming the tail of the launch.
        groups.sort_by_key(|&(keys, _)| std::cmp::Reverse(keys));
        let max_keys = groups.first().map_or(0, |g| g.0);
        let groups: Vec<BcAttnGroup> = groups.into_iter().map(|(_, g)| g).collect();
        Ok((seg_tab, index, groups, max_keys))
    }

    /// The cross-attention segment table: `[layers, prompt slots]`, each the slot's K/V of
    /// that layer.
    fn prompt_segments(&self) -> Vec<BcKvSegment> {
        let (tl, d, l, pslots) = (
            self.text_len,
            self.dim,
            self.layer_kv.len(),
            self.prompt_slots,
        );
        let per = l * 2 * tl * d * 2;
        let mut ca_tab = Vec::with_capacity(l * pslots);
        for li in 0..l {
            for s in 0..pslots {
                let k = self.prompt_kv + (s * per + li * 2 * tl * d * 2) as u64;
                ca_tab.push(BcKvSegment {
                    k: k as *const _,
                    v: (k + (tl * d * 2) as u64) as *const _,
                    tokens: tl as i32,
                    _pad: 0,
                });
            }
        }
        ca_tab
    }

    /// Cross-attention: consecutive own members sharing a prompt form one group. Returns
    /// each group's prompt slot, the groups, and each group's member count.
    fn cross_attention_groups(
        &self,
        frames: &[usize],
        row0: &[usize],
    ) -> Result<(Vec<i32>, Vec<BcAttnGroup>, Vec<usize>)> {
        let (members, own, tpf) = (self.members, self.own, self.tpf());
        let mut ca_groups = Vec::new();
        let mut ca_index = Vec::new();
        let mut cross_runs = Vec::new();
        let mut a = 0;
        while a < members.len() {
            if !own[a] {
                a += 1;
                continue;
            }
            let mut b = a + 1;
            while b < members.len() && own[b] && members[b].prompt.id() == members[a].prompt.id() {
                b += 1;
            }
            ca_groups.push(BcAttnGroup {
                q_begin: row0[a] as i32,
                q_rows: (row0[b - 1] + frames[b - 1] * tpf - row0[a]) as i32,
                seg_begin: ca_index.len() as i32,
                seg_count: 1,
            });
            let slot =
                self.pslot[a].ok_or_else(|| Error::Internal("prompt slot missing".into()))?;
            ca_index.push(slot as i32);
            cross_runs.push(b - a);
            a = b;
        }
        Ok((ca_index, ca_groups, cross_runs))
    }

    fn tpf(&self) -> usize {
        (self.height / 2) * (self.width / 2)
    }
}

/// Launch-shape data of one tick.
pub(super) struct Shape {
    pub(super) frames: Vec<usize>,
    pub(super) row0: Vec<usize>,
    pub(super) fr0: Vec<usize>,
    /// Runs of consecutive members this device computes: (first row, rows, first frame,
    /// frames). One run covering the window on a single device.
    pub(super) ranges: Vec<(usize, usize, usize, usize)>,
    /// Self-attention groups (members this device computes).
    pub(super) groups: usize,
    /// Most query rows of one of those members.
    pub(super) max_rows: usize,
    /// Most keys one of those members sees (the split-KV model's work estimate; the graph
    /// captured at this shape's first tick keeps the splits chosen then).
    pub(super) max_keys: usize,
    pub(super) cross_groups: Vec<usize>,
    /// Context members whose K/V this device writes to its cache.
    pub(super) cache_writes: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::{LagView, LayerKv, TableInput};
    use crate::config::AttentionMode;
    use crate::kv_cache::KvCache;
    use crate::model::{Member, Model, PromptContext, CHANNELS};
    use crate::weights::{builtin_config, Weights};

    const H: usize = 4;
    const W: usize = 6;
    const TPF: usize = (H / 2) * (W / 2);
    const ROW: u64 = 2 * 32; // dim 32, bf16
    const CACHE_K: u64 = 0x1000_0000;
    const CACHE_V: u64 = 0x2000_0000;
    const WIN_K: u64 = 0x3000_0000;
    const WIN_V: u64 = 0x4000_0000;
    const PREV_K: u64 = 0x5000_0000;
    const PREV_V: u64 = 0x6000_0000;

    fn model() -> Model {
        let mut c = builtin_config("tiny").unwrap();
        c.dim = 32;
        c.num_heads = 2;
        c.num_layers = 2;
        Model::new(Weights::random(c, 1))
    }

    /// Context member at frames 3..6 (prompt a), denoising members 6..9 (a) and 9..12 (b),
    /// three committed frames in the cache.
    fn window<'a>(lat: &'a [f32], a: &'a PromptContext, b: &'a PromptContext) -> Vec<Member<'a>> {
        let m = |first_frame, context, prompt| Member {
            first_frame,
            latents: lat,
            timestep: if context { 0.0 } else { 500.0 },
            context,
            prompt,
        };
        vec![m(3, true, a), m(6, false, a), m(9, false, b)]
    }

    fn input<'a>(
        members: &'a [Member<'a>],
        own: &'a [bool],
        pslot: &'a [Option<usize>],
        cache: &'a KvCache,
        layer_kv: &'a [LayerKv],
        mode: AttentionMode,
        lag: Option<&'a LagView<'a>>,
    ) -> TableInput<'a> {
        TableInput {
            members,
            own,
            pslot,
            lag,
            cache,
            slots: 21,
            mode,
            height: H,
            width: W,
            dim: 32,
            text_len: 8,
            seg_max: 64,
            layer_kv,
            prompt_kv: 0x7000_0000,
            prompt_slots: 3,
        }
    }

    /// The tokens each own group attends to, from the segment table of layer `li`, in member
    /// order (the launch order is heaviest first; see `launch_order_is_heaviest_first`).
    fn tokens_seen(t: &super::TickTables, li: usize, seg_max: usize) -> Vec<usize> {
        let mut seen: Vec<(i32, usize)> = launch_tokens(t, li, seg_max);
        seen.sort_by_key(|&(q_begin, _)| q_begin);
        seen.into_iter().map(|(_, n)| n).collect()
    }

    /// (first query row, tokens attended) of each own group, in launch order.
    fn launch_tokens(t: &super::TickTables, li: usize, seg_max: usize) -> Vec<(i32, usize)> {
        t.groups
            .iter()
            .map(|g| {
                let n = (0..g.seg_count as usize)
                    .map(|s| {
                        let idx = t.index[g.seg_begin as usize + s] as usize;
                        t.seg_tab[li * seg_max + idx].tokens as usize
                    })
                    .sum();
                (g.q_begin, n)
            })
            .collect()
    }

    #[test]
    fn one_device_tables_follow_the_visibility_rule() {
        let m = model();
        let (a, b) = (
            m.prompt_context(&vec![0.5; 4 * m.config().text_dim], 4)
                .unwrap(),
            m.prompt_context(&vec![0.25; 4 * m.config().text_dim], 4)
                .unwrap(),
        );
        let lat = vec![0f32; 3 * CHANNELS * H * W];
        let members = window(&lat, &a, &b);
        let mut cache = KvCache::new(0, TPF * 32, None, 0).unwrap();
        cache.commit(3);
        let lk = [LayerKv {
            cache: (CACHE_K, CACHE_V),
            window: (WIN_K, WIN_V),
        }; 2];
        let own = [true; 3];
        let pslot = [Some(0), Some(0), Some(2)];
        for (mode, seen) in [
            // Causal: 3 cache frames + the frames of earlier members and its own.
            (AttentionMode::Causal, [6, 9, 12]),
            // Bidirectional: denoising members also see later denoising members.
            (AttentionMode::Bidirectional, [6, 12, 12]),
        ] {
            let t = input(&members, &own, &pslot, &cache, &lk, mode, None)
                .build()
                .unwrap();
            assert_eq!(t.pos, (3..12).collect::<Vec<i32>>());
            // Only context frames have a cache slot (global attention: the frame itself).
            assert_eq!(t.slot, vec![3, 4, 5, 0, 0, 0, 0, 0, 0]);
            for li in 0..2 {
                let want: Vec<usize> = seen.iter().map(|f| f * TPF).collect();
                assert_eq!(tokens_seen(&t, li, 64), want, "{mode:?} layer {li}");
                // Launched heaviest first, so the longest blocks do not form the launch's tail.
                let order: Vec<usize> = launch_tokens(&t, li, 64).iter().map(|x| x.1).collect();
                assert!(
                    order.windows(2).all(|w| w[0] >= w[1]),
                    "{mode:?} layer {li}: launch order {order:?}"
                );
            }
            // The attention tuner times this very list: the groups in launch order, each with
            // the keys of its segments (the cache run of 3 frames first).
            let p = crate::backend::cuda::attention_tune::TuneShape::of_tables(7, 2, 16, &t);
            let got: Vec<(usize, usize)> = p
                .groups
                .iter()
                .map(|g| (g.rows, g.segments.iter().sum()))
                .collect();
            let want: Vec<(usize, usize)> = launch_tokens(&t, 0, 64)
                .iter()
                .map(|&(_, n)| (3 * TPF, n))
                .collect();
            assert_eq!(got, want, "{mode:?}: the tuner's list");
            let mut keys: Vec<usize> = want.iter().map(|w| w.1).collect();
            keys.sort();
            let mut seen_keys: Vec<usize> = seen.iter().map(|f| f * TPF).collect();
            seen_keys.sort();
            assert_eq!(keys, seen_keys);
            assert!(p.groups.iter().all(|g| g.segments[0] == 3 * TPF));
            // Every segment points into the cache or the window buffers of its layer, and the
            // first segment of every member is the cache run starting at slot 0.
            for g in &t.groups {
                let s = &t.seg_tab[t.index[g.seg_begin as usize] as usize];
                assert_eq!((s.k as u64, s.v as u64), (CACHE_K, CACHE_V));
            }
            let mut q_begins: Vec<i32> = t.groups.iter().map(|g| g.q_begin).collect();
            q_begins.sort();
            assert_eq!(q_begins, vec![0, 3 * TPF as i32, 6 * TPF as i32]);
            // Cross-attention: the two members with prompt a form one group, b another.
            assert_eq!(t.key.cross_runs, vec![2, 1]);
            assert_eq!(t.ca_index, vec![0, 2]);
            assert_eq!(
                t.ca_groups.iter().map(|g| g.q_rows).collect::<Vec<_>>(),
                vec![6 * TPF as i32, 3 * TPF as i32]
            );
            // Prompt slot s of layer li: K then V, each [text_len, dim] bf16.
            let per = 2 * 2 * 8 * 32 * 2;
            let s1 = &t.ca_tab[3 + 1];
            assert_eq!(s1.k as u64, 0x7000_0000 + (per + 2 * 8 * 32 * 2) as u64);
            assert_eq!(s1.v as u64 - s1.k as u64, (8 * 32 * 2) as u64);
            assert_eq!(t.shape.ranges, vec![(0, 9 * TPF, 0, 9)]);
            assert_eq!(t.shape.cache_writes, vec![0]);
        }
    }

    #[test]
    fn lagged_tables_read_the_previous_tick_and_skip_what_did_not_arrive() {
        let m = model();
        let a = m
            .prompt_context(&vec![0.5; 4 * m.config().text_dim], 4)
            .unwrap();
        let lat = vec![0f32; 3 * CHANNELS * H * W];
        let members = window(&lat, &a, &a);
        let mut cache = KvCache::new(0, TPF * 32, None, 0).unwrap();
        cache.commit(3);
        let lk = [LayerKv {
            cache: (CACHE_K, CACHE_V),
            window: (WIN_K, WIN_V),
        }];
        let prev_kv = [(PREV_K, PREV_V)];
        // This device computes member 2; member 1's previous-tick K/V sit at row 40 and
        // member 0 (the context member) has none.
        let prev_row = [None, Some(40), None];
        let lag = LagView {
            prev_row: &prev_row,
            prev_kv: &prev_kv,
        };
        let own = [false, false, true];
        let pslot = [None, None, Some(1)];
        let t = input(
            &members,
            &own,
            &pslot,
            &cache,
            &lk,
            AttentionMode::Causal,
            Some(&lag),
        )
        .build()
        .unwrap();
        assert_eq!(t.groups.len(), 1);
        let g = &t.groups[0];
        let segs: Vec<_> = (0..g.seg_count as usize)
            .map(|s| &t.seg_tab[t.index[g.seg_begin as usize + s] as usize])
            .collect();
        let addr: Vec<(u64, usize)> = segs
            .iter()
            .map(|s| (s.k as u64, s.tokens as usize))
            .collect();
        assert_eq!(
            addr,
            vec![
                (CACHE_K, 3 * TPF),
                (PREV_K + 40 * ROW, 3 * TPF),
                (WIN_K + 6 * TPF as u64 * ROW, 3 * TPF),
            ]
        );
        // Only this device's context members are written to its cache with lagged exchange.
        assert!(t.shape.cache_writes.is_empty());
        assert_eq!(t.shape.ranges, vec![(6 * TPF, 3 * TPF, 6, 3)]);
    }
}
