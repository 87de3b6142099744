//! [`CudaBackend`]: one logical device, its weights, activation buffers, KV cache, prompt
//! slots and graphs; opening it and running one tick.

use super::device::{self, DevPtr, Gpu};
use super::graphs::{GraphKey, GraphState, Part};
use super::options::env_attention_tile;
use super::tables::Shape;
use super::weight_cache::{
    cache_lock, evict_ordinal, take_cached, upload_weights, CacheKey, DevWeights, LayerDev,
    Resident, WEIGHT_UPLOADS,
};
use super::{attention_tune, memory, nvtx, tables, CudaOptions};
use crate::backend::{Backend, FlowStep};
use crate::config::GenerateOptions;
use crate::kernels::launch::AttentionTile;
use crate::kv_cache::KvCache;
use crate::model::{Member, Model, CHANNELS};
use crate::{Error, Result};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering;

/// Activation buffers and tables.
pub(super) struct Bufs {
    pub(super) lat: DevPtr,
    pub(super) flow: DevPtr,
    /// `max_members` latent slots of one block each ([`super::resident`]).
    pub(super) lat_slots: DevPtr,
    /// Renoise `[max_frames, flen]` and sigma / next sigma `[2, max_frames]` of the device
    /// flow step.
    pub(super) step_noise: DevPtr,
    pub(super) step_sigma: DevPtr,
    pub(super) patches: DevPtr,
    pub(super) x: DevPtr,
    pub(super) y: DevPtr,
    pub(super) qkv: DevPtr,
    pub(super) q: DevPtr,
    pub(super) k: DevPtr,
    pub(super) v: DevPtr,
    pub(super) att: DevPtr,
    pub(super) ffn: DevPtr,
    pub(super) head: DevPtr,
    pub(super) e: DevPtr,
    pub(super) e0: DevPtr,
    /// The time embeddings of the distinct timesteps ([`super::time_table`]).
    pub(super) time_table: DevPtr,
    pub(super) frame_pos: DevPtr,
    pub(super) frame_slot: DevPtr,
    pub(super) sa_segs: DevPtr,
    pub(super) sa_index: DevPtr,
    pub(super) sa_groups: DevPtr,
    pub(super) ca_segs: DevPtr,
    pub(super) ca_index: DevPtr,
    pub(super) ca_groups: DevPtr,
    pub(super) prompt_kv: DevPtr,
    /// Scratch of the prompts' text embedding
    /// ([`prompt_kv::scratch_bytes`](super::prompt_kv::scratch_bytes)).
    pub(super) prompt_scratch: DevPtr,
    /// The self-attention's split-KV partial results
    /// ([`memory::split_scratch_bytes`] bytes: `attn_split_bytes`).
    pub(super) attn_split: DevPtr,
}

/// The CUDA backend: one device, its weights, activations, KV cache and graphs.
pub struct CudaBackend<'m> {
    pub(super) graphs: HashMap<GraphKey, GraphState>,
    pub(super) graphs_ok: bool,
    /// Taken out in `Drop` (back to the weight cache, or dropped).
    pub(super) gpu: ManuallyDrop<Gpu>,
    /// Where the weights' cache entry goes back to.
    pub(super) key: CacheKey,
    /// Per-run allocations (activations, KV cache, tables, lagged-exchange buffers), freed
    /// when the run ends; the weights stay.
    pub(super) run_allocs: Vec<DevPtr>,
    pub(super) model: &'m Model,
    pub(super) opts: GenerateOptions,
    pub(super) copts: CudaOptions,
    pub(super) geom: KvCache,
    pub(super) slots: usize,
    pub(super) max_frames: usize,
    pub(super) max_members: usize,
    pub(super) seg_max: usize,
    pub(super) w: DevWeights,
    pub(super) layers: Vec<LayerDev>,
    pub(super) b: Bufs,
    /// Per prompt slot: (prompt id, last tick that used it).
    pub(super) prompt_slots: Vec<Option<(u64, usize)>>,
    pub(super) time_cache: HashMap<u64, (Vec<f32>, Vec<f32>)>,
    pub(super) cache_bytes: usize,
    pub(super) ticks: usize,
    pub(super) attn_tile: AttentionTile,
    /// Bytes of `b.attn_split`.
    pub(super) attn_split_bytes: usize,
    /// The latest timing of the tiles (`None` until one ran, and with a fixed tile).
    pub(super) attn_tune: Option<attention_tune::TuneResult>,
    /// The tile per window shape, timed on the shape's first tick (`None`: a fixed tile).
    pub(super) attn_auto: Option<attention_tune::AutoTile>,
    /// The window K/V buffers of odd layers when double-buffered ([`Self::kv_bufs`]).
    pub(super) kv_odd: Option<(DevPtr, DevPtr)>,
    /// The tuning entry applied at open, as its stderr line says (`None`: none applied).
    pub(super) tuning: Option<String>,
    /// The latents of the blocks being denoised, on the device ([`CudaOptions::device_latents`]).
    pub(super) res: super::resident::Resident,
    /// Which timesteps' embeddings the device table holds.
    pub(super) times: super::time_table::TimeTable,
}

impl<'m> CudaBackend<'m> {
    /// Opens device `copts.device` and allocates everything a session with `opts` needs.
    pub fn new(model: &'m Model, opts: &GenerateOptions, copts: CudaOptions) -> Result<Self> {
        if opts.devices > 1 {
            return Err(Error::Unsupported(
                "CudaBackend runs on one device: use MultiCudaBackend (or cuda::open) for --devices > 1".into(),
            ));
        }
        let ordinal = copts.devices.first().copied().unwrap_or(copts.device);
        Self::open_device(model, opts, copts, ordinal)
    }

    /// One logical device on GPU `ordinal` (or an emulated device), ignoring `opts.devices`.
    pub(super) fn open_device(
        model: &'m Model,
        opts: &GenerateOptions,
        copts: CudaOptions,
        ordinal: usize,
    ) -> Result<Self> {
        let c = model.config();
        let (d, hd) = (c.dim, c.head_dim());
        if hd % 8 != 0 || hd > 128 || d % 8 != 0 {
            return Err(Error::Unsupported(format!(
                "the CUDA kernels need head_dim a multiple of 8 and at most 128 (model: {hd})"
            )));
        }
        let (h, w) = (opts.height, opts.width);
        if h == 0 || w == 0 || h % 2 != 0 || w % 2 != 0 {
            return Err(Error::invalid(format!(
                "latent size {h}x{w} must be positive and even"
            )));
        }
        let key: CacheKey = (model.id(), ordinal, copts.emulate);
        // A cached device with this model's weights, or a fresh one (none cached, or another
        // run / logical device on this ordinal holds the entry).
        let (mut gpu, resident) = match take_cached(key) {
            Some(r) => {
                r.gpu.bind()?;
                (r.gpu, Some(r.w))
            }
            None if copts.emulate => (Gpu::open_emulated()?, None),
            None => (Gpu::open(ordinal)?, None),
        };
        gpu.fused_epilogues = copts.fuse_bias;
        gpu.gelu_epilogue = copts.fuse_gelu;
        let mut copts = copts;
        let (tuned_tile, tuning) = apply_tuning(&gpu, &mut copts)?;
        let sz = memory::Sizes::new(opts, &copts, d)?;
        let geom = KvCache::new(0, sz.tpf * d, opts.local_attn, opts.sink)?;
        let plan = memory::RunPlan::new(c, &sz);
        ensure_fits(
            &mut gpu,
            model,
            &plan,
            resident.is_some(),
            ordinal,
            copts.emulate,
        )?;
        // From here on every size is at most what was checked to fit in free memory: the
        // usize arithmetic of the allocations cannot overflow.
        let w = match resident {
            Some(w) => w,
            None => {
                let w = upload_weights(&mut gpu, model)?;
                WEIGHT_UPLOADS.fetch_add(1, Ordering::Relaxed);
                w
            }
        };
        let mut run_allocs = Vec::new();
        let mut named: Vec<(&str, DevPtr)> = Vec::with_capacity(plan.buffers.len());
        for &(name, _, bytes) in &plan.buffers {
            let p = gpu.alloc(bytes as usize)?;
            run_allocs.push(p);
            named.push((name, p));
        }
        let (caches, b) = Bufs::from_plan(&named, c.num_layers)?;
        let layers = w
            .layers
            .iter()
            .zip(&caches)
            .map(|(&lw, &(cache_k, cache_v))| LayerDev {
                w: lw,
                cache_k,
                cache_v,
            })
            .collect();
        let (attn_tile, attn_auto) = attention_tile_choice(&gpu, &copts, ordinal, tuned_tile)?;
        let res = super::resident::Resident::new(
            b.lat_slots,
            sz.max_members,
            opts.block_frames * sz.flen * 4,
        );
        let times = super::time_table::TimeTable::new(b.time_table, sz.time_entries);
        let cb = sz.slots * sz.tpf * d * 2;
        for &(k, v) in &caches {
            gpu.memset(k, 0, cb)?;
            gpu.memset(v, 0, cb)?;
        }
        gpu.sync()?;
        Ok(CudaBackend {
            graphs: HashMap::new(),
            graphs_ok: copts.graphs,
            gpu: ManuallyDrop::new(gpu),
            key,
            run_allocs,
            model,
            opts: opts.clone(),
            copts,
            geom,
            slots: sz.slots,
            max_frames: sz.max_frames,
            max_members: sz.max_members,
            seg_max: sz.seg_max,
            w,
            layers,
            b,
            prompt_slots: vec![None; sz.prompt_slots],
            time_cache: HashMap::new(),
            cache_bytes: plan.bytes(memory::Use::Cache) as usize,
            ticks: 0,
            attn_tile,
            attn_split_bytes: memory::split_scratch_bytes(c, &sz) as usize,
            attn_tune: None,
            attn_auto,
            kv_odd: None,
            res,
            times,
            tuning,
        })
    }

    /// The window K/V buffers (K, V) that layer `li` writes and its attention reads. With
    /// double buffering (multi-device joint exchange) odd layers use a second pair, so the peer
    /// copies of layer `li` can still read, or land in, its rows while layer `li + 1` runs.
    pub(super) fn kv_bufs(&self, li: usize) -> (DevPtr, DevPtr) {
        match self.kv_odd {
            Some(p) if li % 2 == 1 => p,
            _ => (self.b.k, self.b.v),
        }
    }

    /// A per-run allocation (freed when the run ends).
    pub(super) fn alloc_run(&mut self, bytes: usize) -> Result<DevPtr> {
        let p = self.gpu.alloc(bytes)?;
        self.run_allocs.push(p);
        Ok(p)
    }

    /// The options this backend was opened with.
    pub fn options(&self) -> &CudaOptions {
        &self.copts
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// The attention tile of this session's latest tick (with automatic tuning, picked per
    /// window shape).
    pub fn attention_tile(&self) -> AttentionTile {
        self.attn_tile
    }

    /// The latest timing of both tiles on one of this session's lists (`None` with a fixed
    /// tile, and before the first tick).
    pub fn attention_tune(&self) -> Option<&attention_tune::TuneResult> {
        self.attn_tune.as_ref()
    }

    /// What this session took from the tuning file (`blockcascade tune`): `tuning: FILE:
    /// DEVICE: attention=ws, split=auto (BC_ATTN_SPLIT wins)`; `None` when no entry applied.
    pub fn tuning(&self) -> Option<&str> {
        self.tuning.as_deref()
    }

    /// Number of graphs captured so far.
    pub fn graphs_captured(&self) -> usize {
        self.graphs
            .values()
            .filter(|g| matches!(g, GraphState::Ready(_)))
            .count()
    }

    /// Whether graphs are in use (false when disabled or when a capture failed).
    pub fn graphs_enabled(&self) -> bool {
        self.graphs_ok
    }

    pub(super) fn slot_of(&self, f: usize) -> Result<usize> {
        tables::cache_slot(&self.geom, self.slots, f)
    }

    pub(super) fn time_embedding(&mut self, t: f64) -> (Vec<f32>, Vec<f32>) {
        let m = self.model;
        self.time_cache
            .entry(t.to_bits())
            .or_insert_with(|| m.time_embedding(t))
            .clone()
    }

    /// Makes sure the prompt of every member this device computes (`own`) has a slot, its
    /// K/V computed when it enters one ([`Self::compute_prompt`]); returns the slot of each
    /// member (`None` for the members of other devices). Slots are keyed by
    /// [`PromptContext::id`](crate::model::PromptContext::id); a new prompt takes the least
    /// recently used slot that this window does not need.
    pub(super) fn load_prompts(
        &mut self,
        members: &[Member],
        own: &[bool],
    ) -> Result<Vec<Option<usize>>> {
        let mut out = Vec::with_capacity(members.len());
        let mut used = vec![false; self.prompt_slots.len()];
        for (m, &mine) in members.iter().zip(own) {
            if !mine {
                out.push(None);
                continue;
            }
            let id = m.prompt.id();
            let s = match self
                .prompt_slots
                .iter()
                .position(|p| p.is_some_and(|(i, _)| i == id))
            {
                Some(s) => s,
                None => {
                    let s = (0..self.prompt_slots.len())
                        .filter(|&s| !used[s])
                        .min_by_key(|&s| self.prompt_slots[s].map_or(0, |p| p.1 + 1))
                        .ok_or_else(|| Error::Internal("no free prompt slot".into()))?;
                    // Empty until its K/V are written (a failure leaves it empty).
                    self.prompt_slots[s] = None;
                    self.compute_prompt(s, m.prompt)?;
                    s
                }
            };
            self.prompt_slots[s] = Some((id, self.ticks));
            used[s] = true;
            out.push(Some(s));
        }
        Ok(out)
    }

    /// One forward over `members` on this device (latents uploaded, or with `held` gathered
    /// from the device's latent slots, see [`Self::load_latents`]); the flows stay in `flow`.
    pub(super) fn forward_window(
        &mut self,
        members: &[Member],
        held: Option<&[usize]>,
    ) -> Result<Shape> {
        self.gpu.bind()?;
        let (shape, key) = self.prepare(members, None, None, held)?;
        self.launch(
            GraphKey {
                shape: key,
                part: Part::Whole,
            },
            &|b: &mut Self| b.enqueue(&shape),
        )?;
        self.ticks += 1;
        Ok(shape)
    }

    pub(super) fn run(&mut self, members: &[Member]) -> Result<Vec<Vec<f32>>> {
        let shape = self.forward_window(members, None)?;
        let flen = CHANNELS * self.opts.height * self.opts.width;
        let nf: usize = shape.frames.iter().sum();
        let mut flow = vec![0f32; nf * flen];
        self.gpu.download(&mut flow, self.b.flow)?;
        let (fr0, frames) = (&shape.fr0, &shape.frames);
        Ok(members
            .iter()
            .enumerate()
            .map(|(i, _)| flow[fr0[i] * flen..(fr0[i] + frames[i]) * flen].to_vec())
            .collect())
    }

    /// Downloads the flow of member `i` of the last tick.
    pub(super) fn download_member(&self, s: &Shape, i: usize) -> Result<Vec<f32>> {
        let flen = CHANNELS * self.opts.height * self.opts.width;
        let mut flow = vec![0f32; s.frames[i] * flen];
        self.gpu
            .download(&mut flow, self.b.flow + (s.fr0[i] * flen * 4) as u64)?;
        Ok(flow)
    }
}

impl Backend for CudaBackend<'_> {
    fn forward(
        &mut self,
        members: &[Member],
        _blocks: &[usize],
        tick: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let _r = nvtx::range(|| nvtx::tick_label(tick, members));
        self.run(members)
    }

    fn commit(&mut self, end: usize) {
        self.geom.commit(end);
    }

    fn resident(&self, f: usize) -> bool {
        self.geom.resident(f)
    }

    fn recache(&mut self, members: &[Member]) -> Result<()> {
        // Context members are causal among themselves, so running them in chunks that fit
        // the window buffers, committing each chunk, sees exactly what one joint forward over
        // a fresh cache sees.
        let old = self.geom.committed();
        self.geom = self.geom.empty_like();
        let mut i = 0;
        while i < members.len() {
            let mut j = i;
            let mut fr = 0;
            let flen = CHANNELS * self.opts.height * self.opts.width;
            while j < members.len()
                && j - i < self.max_members
                && fr + members[j].latents.len() / flen <= self.max_frames
            {
                fr += members[j].latents.len() / flen;
                j += 1;
            }
            if j == i {
                return Err(Error::Internal(
                    "recache member larger than the window buffers".into(),
                ));
            }
            self.run(&members[i..j])?;
            let m = &members[j - 1];
            self.geom.commit(m.first_frame + m.latents.len() / flen);
            i = j;
        }
        self.geom = self.geom.empty_like();
        self.geom.commit(old);
        Ok(())
    }

    fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }

    fn keeps_latents(&self) -> bool {
        self.copts.device_latents
    }

    fn forward_resident(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        tick: usize,
    ) -> Result<()> {
        let _r = nvtx::range(|| nvtx::tick_label(tick, members));
        self.forward_held(members, blocks)
    }

    fn step_resident(&mut self, steps: &[Option<FlowStep>]) -> Result<Vec<Option<Vec<f32>>>> {
        self.step_held(steps)
    }

    fn release_latents(&mut self, block: usize) {
        self.release_held(block)
    }

    fn hand_off_finals(&mut self, download: bool, _decoder: usize) -> bool {
        if self.copts.device_latents {
            self.hand_off(download);
        }
        self.copts.device_latents
    }

    fn take_handed(&mut self, block: usize) -> Option<super::DeviceLatents> {
        self.take_handed(block)
    }
}

impl Drop for CudaBackend<'_> {
    fn drop(&mut self) {
        // SAFETY: `self.gpu` is taken once, here, and not used afterwards.
        let mut gpu = unsafe { ManuallyDrop::take(&mut self.gpu) };
        // A decoder may still read finished blocks handed off from the latent slots.
        self.res.wait_lent();
        let _ = gpu.bind();
        // Graphs belong to the run: they go before the buffers they captured (and before the
        // context).
        self.graphs.clear();
        // Back to the weight cache only when the device is healthy (no error pending, no
        // capture open) and the per-run buffers are gone; otherwise the device (weights
        // included) is dropped and the next run starts fresh.
        let ok = gpu.sync_copies().is_ok()
            && gpu.sync().is_ok()
            && self.run_allocs.drain(..).all(|p| gpu.free(p).is_ok());
        if ok {
            let mut c = cache_lock();
            if !c.iter().any(|(k, _)| *k == self.key) {
                c.push((
                    self.key,
                    Resident {
                        gpu,
                        w: self.w.clone(),
                    },
                ));
                return;
            }
        }
        drop(gpu);
    }
}

impl Bufs {
    /// The buffers of a [`memory::RunPlan`] by name: per layer the cache's (K, V), and the
    /// activation and table buffers.
    fn from_plan(named: &[(&str, DevPtr)], layers: usize) -> Result<(Vec<(DevPtr, DevPtr)>, Self)> {
        let get = |name: &str| {
            named
                .iter()
                .find(|n| n.0 == name)
                .map(|n| n.1)
                .ok_or_else(|| Error::Internal(format!("buffer {name} missing from the plan")))
        };
        let ks = named.iter().filter(|n| n.0 == "cache_k").map(|n| n.1);
        let vs = named.iter().filter(|n| n.0 == "cache_v").map(|n| n.1);
        let caches: Vec<(DevPtr, DevPtr)> = ks.zip(vs).collect();
        if caches.len() != layers {
            return Err(Error::Internal("one KV cache per layer expected".into()));
        }
        let b = Bufs {
            lat: get("lat")?,
            flow: get("flow")?,
            lat_slots: get("lat_slots")?,
            step_noise: get("step_noise")?,
            step_sigma: get("step_sigma")?,
            patches: get("patches")?,
            x: get("x")?,
            y: get("y")?,
            qkv: get("qkv")?,
            q: get("q")?,
            k: get("k")?,
            v: get("v")?,
            att: get("att")?,
            ffn: get("ffn")?,
            head: get("head")?,
            e: get("e")?,
            e0: get("e0")?,
            time_table: get("time_table")?,
            frame_pos: get("frame_pos")?,
            frame_slot: get("frame_slot")?,
            sa_segs: get("sa_segs")?,
            sa_index: get("sa_index")?,
            sa_groups: get("sa_groups")?,
            ca_segs: get("ca_segs")?,
            ca_index: get("ca_index")?,
            ca_groups: get("ca_groups")?,
            prompt_kv: get("prompt_kv")?,
            prompt_scratch: get("prompt_scratch")?,
            attn_split: get("attn_split")?,
        };
        Ok((caches, b))
    }
}

/// Checks that the weights (unless `resident`), the GEMM workspace of a fresh device and
/// `plan` fit in `gpu`'s free memory, first dropping other models' cached weights on this
/// GPU when they do not; otherwise an [`Error::OutOfMemory`] naming the bytes.
fn ensure_fits(
    gpu: &mut Gpu,
    model: &Model,
    plan: &memory::RunPlan,
    resident: bool,
    ordinal: usize,
    emulate: bool,
) -> Result<()> {
    let weights = memory::weight_bytes(model);
    // Resident weights (and the GEMM workspace of a device already open) are not needed
    // again.
    let upload = if resident {
        0
    } else {
        weights + device::GEMM_WORKSPACE as u128
    };
    let need = upload + plan.total();
    let (mut free, mut total) = gpu.mem_info()?;
    // Allocation granularity and the driver's own needs.
    let margin = 64u128 << 20;
    if need + margin > free as u128 && !emulate && evict_ordinal(ordinal, false) > 0 {
        // Other models' cached weights on this GPU made way.
        gpu.bind()?;
        (free, total) = gpu.mem_info()?;
    }
    if need + margin > free as u128 {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        return Err(Error::OutOfMemory(format!(
            "the CUDA backend needs {need} bytes ({:.2} GiB: weights {:.2}{}, KV cache {:.2}, activations {:.2}, prompts {:.2}) but only {free} of {total} bytes are free on {}",
            gib(need),
            gib(weights),
            if resident { " already resident, not counted" } else { "" },
            gib(plan.bytes(memory::Use::Cache)),
            gib(plan.bytes(memory::Use::Activations)),
            gib(plan.bytes(memory::Use::Prompts)),
            gpu.name
        )));
    }
    Ok(())
}

/// The attention tile of a session: the option's, [`AttentionTile::Rows128`] on an emulated
/// device, [`AttentionTile::WgmmaPpK128`] (the Hopper wgmma kernels, ping-pong with 128-key
/// tiles for hd128) on a compute capability 9.0 device, or elsewhere (the
/// [`attention_tune::AutoTile`]) the faster of both `mma.sync` tiles timed on this device on
/// each window shape's real list at its first tick ([`CudaBackend::tune_attention`]); until
/// then [`AttentionTile::Rows128`].
///
/// The wgmma default comes from the first GPU run (H200, 2026-12-04): its layout probe passed
/// (62 of 62), every variant matched the CPU at Wan shapes, and at q4680 k32760 12x128 the
/// `pp_k128` kernel ran 462.8 TFLOP/s against 307.8 for `Rows128`. `BC_ATTN_WGMMA=0` turns it
/// off (back to the tuned `mma.sync` tiles), `BC_ATTN_WGMMA=1` forces it over the option's tile,
/// and `BC_ATTN_WGMMA_VARIANT` (`base`, `k128`, `pp`, `pp_k128`, `ws`, `ws_deep`:
/// [`AttentionTile::wgmma_variant`]) picks another wgmma variant; off 9.0 the flags are ignored.
///
/// `tuned`: the wgmma variant of the device's tuning entry ([`apply_tuning`]), used where
/// `BC_ATTN_WGMMA_VARIANT` is unset; on an emulated device (whose entry loads only from a file
/// named explicitly) it makes the session run that wgmma variant.
fn attention_tile_choice(
    gpu: &Gpu,
    copts: &CudaOptions,
    ordinal: usize,
    tuned: Option<AttentionTile>,
) -> Result<(AttentionTile, Option<attention_tune::AutoTile>)> {
    if copts.attention_tile.is_none() {
        // A bad BC_ATTENTION_TILE is an error, unless the options chose a tile in code.
        env_attention_tile()?;
    }
    let flag = std::env::var("BC_ATTN_WGMMA").ok();
    let flag = flag.as_deref().map(str::trim);
    let hopper = gpu.compute_capability() == Some((9, 0));
    let wgmma = || -> Result<AttentionTile> {
        // Set but empty counts as unset (the default variant), as the other flags do.
        match std::env::var("BC_ATTN_WGMMA_VARIANT")
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            Some(v) => AttentionTile::wgmma_variant(Some(&v)).map_err(Error::invalid),
            None => Ok(tuned.unwrap_or(AttentionTile::WgmmaPpK128)),
        }
    };
    if hopper && flag == Some("1") {
        return Ok((wgmma()?, None));
    }
    // The emulated device runs a wgmma tile by default only when its tuning entry chose one.
    let wgmma_default = if copts.emulate {
        tuned.is_some()
    } else {
        hopper
    };
    if wgmma_default && flag != Some("0") && copts.attention_tile.is_none() {
        return Ok((wgmma()?, None));
    }
    Ok(match copts.attention_tile {
        Some(t) => (t, None),
        None if copts.emulate => (AttentionTile::Rows128, None),
        None => (
            AttentionTile::Rows128,
            Some(attention_tune::AutoTile::new(ordinal, &gpu.name)),
        ),
    })
}

/// Loads the device's tuning entry ([`CudaOptions::tuning`]) and applies what the options and
/// the environment left open ([`crate::tune::apply::attention_tuning`]): the key splits go into
/// `copts.attention_split`, the wgmma variant is returned for [`attention_tile_choice`], with
/// the line that says what was applied (printed once to stderr).
fn apply_tuning(
    gpu: &Gpu,
    copts: &mut CudaOptions,
) -> Result<(Option<AttentionTile>, Option<String>)> {
    use crate::tune::apply;
    let Some(a) = apply::load(gpu, &copts.tuning)? else {
        return Ok((None, None));
    };
    let t = apply::attention_tuning(
        &a.parsed,
        copts.attention_tile,
        copts.attention_split,
        &apply::env_set,
    );
    if t.split.is_some() {
        copts.attention_split = t.split;
    }
    let line = apply::describe(&a, &t.notes);
    apply::note(&line);
    Ok((t.tile, Some(line)))
}
