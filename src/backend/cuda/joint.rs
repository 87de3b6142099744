//! [`MultiCudaBackend`]: several logical devices; the joint exchange (peer copies of K/V in
//! every layer).

#[cfg(doc)]
use super::device::Gpu;
use super::device::{self, DevPtr};
use super::graphs::{GraphKey, Part};
#[cfg(doc)]
use super::peer_copy_bytes;
use super::tables::Shape;
use super::{nvtx, CudaBackend, CudaOptions, ShapeKey, DOUBLE_KV_DEVICES};
use crate::backend::{Backend, FlowStep};
use crate::config::GenerateOptions;
use crate::model::{Member, Model};
use crate::window;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// The CUDA backend over several logical devices (joint mode; see docs/multi-device.md): one
/// [`CudaBackend`] per device (weights, activation buffers and KV cache replicated), members
/// placed with [`crate::cascade::place`], and in every layer each member's K/V rows copied
/// from the device that computed them into the window buffers (same row offsets on every
/// device) of every peer that reads them before attention, so every member sees exactly what
/// it sees on one device. A peer reads a member's rows when one of its own members attends to
/// it, or when it is a context member: every device writes every context member's K/V into
/// its own cache. A device waits only for the copies it reads ([`peer_copy_bytes`] counts the
/// bytes).
///
/// All devices are driven from one host thread, layer by layer. The copies run on each
/// source device's copy stream ([`Gpu::send_to_peer`]), ordered with the compute streams by
/// events only ([`device::Mark`]), and the window K/V are double-buffered by layer parity
/// ([`CudaOptions::double_kv`]), so the exchange overlaps compute (the rules are listed in
/// `run_layers`). Graphs: each device captures the work between two exchanges as one graph
/// (`GraphKey`: part 0 = embedding + layer 0's q/k/v, part `i` = layer `i-1`'s attention and
/// FFN + layer `i`'s q/k/v, the last part ends with the head), so a tick is `layers + 1` graph
/// launches per device with the event waits between them; graph launches are ordinary stream
/// work, so the cross-device ordering is the same as with eager launches. `recache` runs the
/// whole rebuild on every device.
///
/// **Lagged** exchange ([`crate::config::KvExchange::Lagged`], the semantics of
/// [`crate::backend::cpu::multi_device`]): no exchange inside the tick. Every device keeps two generations
/// of per-layer K/V buffers in the window's row layout: during a tick it snapshots its own
/// window members' K/V of every layer into the current generation, and its attention reads
/// the peers' members from the previous generation (keyed by block index; a block that was
/// not in the previous tick is not attended to). After the tick each device copies its
/// window members' rows of the current generation, and its context members' cache frames, to
/// every peer; the generations then swap. So every device holds every window member's K/V
/// of the previous tick (a block may move to another device between ticks). With nothing
/// exchanged inside the tick, each device's whole tick is one graph (one per generation).
///
/// With [`CudaOptions::device_latents`] each device holds the latents of the blocks placed on
/// it and steps them itself; a block placed elsewhere than last tick moves there once, by a
/// peer copy (`backend::cuda::resident`), and only finished blocks are downloaded; handed off
/// to a decoder on one of the devices, not even those (`backend::cuda::relay`).
pub struct MultiCudaBackend<'m> {
    pub(super) devs: Vec<CudaBackend<'m>>,
    pub(super) opts: GenerateOptions,
    pub(super) lag: Option<LagState>,
    /// The placement of the last tick run on held latents (for its flow step).
    held_placement: Option<Vec<Vec<usize>>>,
    /// The GPU ordinal of each logical device.
    pub(super) ordinals: Vec<usize>,
    /// `peer[a][b]`: device `a` has peer access to device `b`'s memory.
    pub(super) peer: Vec<Vec<bool>>,
    /// The logical device of the decoder finished blocks are handed to (`super::relay`).
    pub(super) decoder: Option<usize>,
    /// Why some finished blocks still cross the host to the decoder, if they do.
    pub(super) handoff_note: Option<String>,
}

/// Lagged exchange state.
pub(super) struct LagState {
    /// Per device, two generations of per-layer (K, V) buffers, each `[max_frames * tpf, dim]`
    /// bf16 in the window's row layout.
    pub(super) gens: Vec<[Vec<(DevPtr, DevPtr)>; 2]>,
    /// The generation written this tick (`1 - cur` holds the previous tick's K/V).
    pub(super) cur: usize,
    /// Block index -> (first row, rows) in generation `1 - cur`: the previous tick's window
    /// members (not its context members, whose K/V are in the caches).
    pub(super) prev: HashMap<usize, (usize, usize)>,
}

impl<'m> MultiCudaBackend<'m> {
    /// Opens one logical device per entry of `copts.devices` (or `opts.devices` devices from
    /// `copts.device` on when the list is empty).
    pub fn new(model: &'m Model, opts: &GenerateOptions, copts: CudaOptions) -> Result<Self> {
        let ordinals: Vec<usize> = if copts.devices.is_empty() {
            (0..opts.devices.max(1)).map(|i| copts.device + i).collect()
        } else {
            copts.devices.clone()
        };
        if opts.devices > 1 && ordinals.len() != opts.devices {
            return Err(Error::invalid(format!(
                "{} devices requested but the CUDA device list has {} entries",
                opts.devices,
                ordinals.len()
            )));
        }
        let mut one = opts.clone();
        one.devices = 1;
        let mut devs = Vec::with_capacity(ordinals.len());
        for &o in &ordinals {
            devs.push(CudaBackend::open_device(model, &one, copts.clone(), o)?);
        }
        let mut peer = vec![vec![true; devs.len()]; devs.len()];
        for a in 0..devs.len() {
            for b in 0..devs.len() {
                if a != b {
                    peer[a][b] = devs[a].gpu.enable_peer_access(&devs[b].gpu)?;
                }
            }
        }
        let lag = if opts.kv_exchange == crate::config::KvExchange::Lagged {
            let mut gens = Vec::with_capacity(devs.len());
            for dev in &mut devs {
                let c = dev.model.config();
                let tpf = (dev.opts.height / 2) * (dev.opts.width / 2);
                let bytes = dev.max_frames * tpf * c.dim * 2;
                let need = 2 * 2 * c.num_layers * bytes;
                let (free, total) = dev.gpu.mem_info()?;
                if need + (64 << 20) > free {
                    return Err(Error::OutOfMemory(format!(
                        "lagged K/V exchange needs {need} more bytes for the previous tick's K/V but only {free} of {total} bytes are free on {}",
                        dev.gpu.name
                    )));
                }
                let mut gen = || -> Result<Vec<(DevPtr, DevPtr)>> {
                    (0..c.num_layers)
                        .map(|_| Ok((dev.alloc_run(bytes)?, dev.alloc_run(bytes)?)))
                        .collect()
                };
                gens.push([gen()?, gen()?]);
            }
            Some(LagState {
                gens,
                cur: 0,
                prev: HashMap::new(),
            })
        } else {
            None
        };
        if lag.is_none() && devs.len() > 1 && copts.double_kv {
            // Joint exchange: a second pair of window K/V buffers for odd layers, so a device
            // never waits for its outgoing copies of one layer before computing the next
            // (see `forward`). Where it does not fit, single buffering (correct, less overlap).
            for dev in &mut devs {
                let c = dev.model.config();
                let tpf = (dev.opts.height / 2) * (dev.opts.width / 2);
                let bytes = dev.max_frames * tpf * c.dim * 2;
                let (free, _) = dev.gpu.mem_info()?;
                if 2 * bytes + (64 << 20) <= free {
                    dev.kv_odd = Some((dev.alloc_run(bytes)?, dev.alloc_run(bytes)?));
                    DOUBLE_KV_DEVICES.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(MultiCudaBackend {
            devs,
            opts: opts.clone(),
            lag,
            held_placement: None,
            ordinals,
            peer,
            decoder: None,
            handoff_note: None,
        })
    }

    /// Number of logical devices.
    pub fn device_count(&self) -> usize {
        self.devs.len()
    }
}

/// The flow of all `n` members of the tick just enqueued, each downloaded from the device
/// it was placed on.
pub(super) fn download_all(
    devs: &mut [CudaBackend],
    shapes: &[Shape],
    placement: &[Vec<usize>],
    n: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    for ((dev, s), own) in devs.iter_mut().zip(shapes).zip(placement) {
        dev.gpu.bind()?;
        for &i in own {
            out[i] = Some(dev.download_member(s, i)?);
        }
        dev.ticks += 1;
    }
    out.into_iter()
        .enumerate()
        .map(|(i, f)| f.ok_or_else(|| Error::Internal(format!("member {i} was not computed"))))
        .collect()
}

/// `regions[src][dst]`: the runs `(byte offset, bytes)` of `src`'s K/V rows that `dst` reads,
/// the same offsets in both devices' window buffers.
type Regions = Vec<Vec<Vec<(u64, usize)>>>;

/// Per device: the marks of one layer's exchange.
type Marks = Vec<Option<device::Mark>>;

impl MultiCudaBackend<'_> {
    /// Every device's tick tables for the members placed on it (`placement[device]`), their
    /// latents uploaded or (`held`) gathered from the device's slots.
    fn prepare_devices(
        &mut self,
        members: &[Member],
        placement: &[Vec<usize>],
        held: Option<&[usize]>,
    ) -> Result<(Vec<Shape>, Vec<ShapeKey>)> {
        let nd = self.devs.len();
        let (mut shapes, mut keys) = (Vec::with_capacity(nd), Vec::with_capacity(nd));
        for (dev, own) in self.devs.iter_mut().zip(placement) {
            dev.gpu.bind()?;
            let (s, k) = dev.prepare(members, Some(own), None, held)?;
            shapes.push(s);
            keys.push(k);
        }
        Ok((shapes, keys))
    }

    /// Part 0 on every device: the embedding and layer 0's q/k/v.
    fn launch_embedding(&mut self, shapes: &[Shape], keys: &[ShapeKey]) -> Result<()> {
        for ((dev, s), k) in self.devs.iter_mut().zip(shapes).zip(keys) {
            dev.gpu.bind()?;
            let key = GraphKey {
                shape: k.clone(),
                part: Part::Joint(0),
            };
            dev.launch(key, &|b: &mut CudaBackend| {
                b.enqueue_embed(s)?;
                let _r = nvtx::range(|| "layer 0".to_string());
                b.enqueue_pre(s, 0)
            })?;
        }
        Ok(())
    }

    /// What each device reads of its peers' rows: the members its own members attend to this
    /// tick (the shared visibility rule), and every context member (each device writes every
    /// context member's K/V into its own cache). Nothing else is copied, and a device waits
    /// only for the copies it reads: with causal attention the device of the earliest members
    /// needs nothing from the devices of later ones. Adjacent rows are merged into one run.
    fn exchange_regions(
        &self,
        members: &[Member],
        placement: &[Vec<usize>],
        shapes: &[Shape],
    ) -> Result<Regions> {
        let nd = self.devs.len();
        let row = (self.devs[0].model.config().dim * 2) as u64;
        let geom = window::geometry(members, self.opts.height, self.opts.width)?;
        let tpf = (self.opts.height / 2) * (self.opts.width / 2);
        let mut regions_to: Regions = vec![vec![Vec::new(); nd]; nd];
        for (dst, own) in placement.iter().enumerate() {
            let mut needs: Vec<bool> = members.iter().map(|m| m.context).collect();
            for &i in own {
                let vis = window::visible(&geom, i, &self.devs[dst].geom, self.opts.attention);
                for (j, _) in vis.members {
                    needs[j] = true;
                }
            }
            for (src, src_own) in placement.iter().enumerate().filter(|&(p, _)| p != dst) {
                let s = &shapes[src];
                let mut runs: Vec<(u64, usize)> = Vec::new();
                for &j in src_own.iter().filter(|&&j| needs[j]) {
                    let (off, bytes) = (s.row0[j] as u64 * row, s.frames[j] * tpf * row as usize);
                    match runs.last_mut() {
                        Some(r) if r.0 + r.1 as u64 == off => r.1 += bytes,
                        _ => runs.push((off, bytes)),
                    }
                }
                regions_to[src][dst] = runs;
            }
        }
        Ok(regions_to)
    }

    /// Every layer: the K/V exchange of layer `li`, then part `li + 1` on every device. The
    /// exchange runs on each source device's copy stream, ordered by marks only, so a device
    /// computes on while its K/V travel and waits only for the rows it reads:
    ///   (1) a copy of layer li starts after its source computed layer li's K/V;
    ///   (2) it lands after the destination finished reading the rows it overwrites: the
    ///       peer rows of the same buffer, last read by the destination's attention of layer
    ///       li - 2 with double buffering (part li - 1), of layer li - 1 without (part li);
    ///       layer 0's copies with double buffering land after the destination's work of the
    ///       previous tick (`start`: each device's compute mark before this tick's part 0),
    ///       which read the same buffer (nothing else orders them once the ticks no longer
    ///       end with a host sync: with the latents on the devices they do not);
    ///   (3) a device runs layer li's attention (part li + 1) after every copy into it;
    ///   (4) a device overwrites its own rows in a buffer after its outgoing copies read
    ///       them: part li + 1 writes layer li + 1's K/V, into the buffer of layer li - 1
    ///       with double buffering (so it waits for the copies of layer li - 1), into the
    ///       one of layer li without (the copies of layer li).
    ///
    /// With double buffering a device with early members runs ahead of the devices that read
    /// its K/V, and the copies overlap compute instead of stopping every device.
    fn run_layers(
        &mut self,
        regions_to: &Regions,
        (shapes, keys): (&[Shape], &[ShapeKey]),
        start: Marks,
    ) -> Result<()> {
        let nd = self.devs.len();
        let layers = self.devs[0].layers.len();
        let double: Vec<bool> = self.devs.iter().map(|d| d.kv_odd.is_some()).collect();
        let mut done_prev: Marks = start;
        let mut sent_prev: Marks = (0..nd).map(|_| None).collect();
        for li in 0..layers {
            let _r = nvtx::range(|| format!("layer {li} exchange"));
            let done = self
                .devs
                .iter()
                .map(|d| d.gpu.mark_compute())
                .collect::<Result<Vec<_>>>()?;
            let (sent, arrived) = self.send_layer(li, regions_to, &done, &done_prev, &double)?;
            let own_sent: Vec<Option<&device::Mark>> = (0..nd)
                .map(|d| if double[d] { &sent_prev[d] } else { &sent[d] }.as_ref())
                .collect();
            self.launch_layer(li, shapes, keys, &arrived, &own_sent)?;
            done_prev = done.into_iter().map(Some).collect();
            sent_prev = sent;
        }
        Ok(())
    }

    /// Queues the copies of layer `li`'s K/V (rules (1) and (2) of [`Self::run_layers`];
    /// `done`: each device's compute mark after part `li`, `done_prev` after part `li - 1`).
    /// Returns per device the end of all its outgoing copies (`sent`, none when it sends
    /// nothing) and the ends of the copies into it (`arrived`).
    fn send_layer(
        &self,
        li: usize,
        regions_to: &Regions,
        done: &[device::Mark],
        done_prev: &[Option<device::Mark>],
        double: &[bool],
    ) -> Result<(Marks, Vec<Vec<device::Mark>>)> {
        let nd = self.devs.len();
        let mut sent: Marks = (0..nd).map(|_| None).collect();
        let mut arrived: Vec<Vec<device::Mark>> = (0..nd).map(|_| Vec::new()).collect();
        for (src, to) in regions_to.iter().enumerate() {
            let sd = &self.devs[src];
            let (sk, sv) = sd.kv_bufs(li);
            for (dst, runs) in to.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                let dd = &self.devs[dst];
                let (dk, dv) = dd.kv_bufs(li);
                let mut regions = Vec::with_capacity(2 * runs.len());
                for &(off, bytes) in runs {
                    regions.push((dk + off, sk + off, bytes));
                    regions.push((dv + off, sv + off, bytes));
                }
                // (1) and (2).
                let war = if double[dst] {
                    done_prev[dst].as_ref()
                } else {
                    Some(&done[dst])
                };
                let after: Vec<&device::Mark> = std::iter::once(&done[src]).chain(war).collect();
                arrived[dst].push(sd.gpu.send_to_peer(&dd.gpu, &regions, &after)?);
            }
            if to.iter().any(|r| !r.is_empty()) {
                sent[src] = Some(sd.gpu.mark_copies()?);
            }
        }
        Ok((sent, arrived))
    }

    /// Part `li + 1` on every device: layer `li`'s attention and FFN, then layer `li + 1`'s
    /// q/k/v (or the head after the last layer), after the copies into the device
    /// (`arrived`, rule (3)) and its own outgoing copies that read the buffer it overwrites
    /// (`own_sent`, rule (4)).
    fn launch_layer(
        &mut self,
        li: usize,
        shapes: &[Shape],
        keys: &[ShapeKey],
        arrived: &[Vec<device::Mark>],
        own_sent: &[Option<&device::Mark>],
    ) -> Result<()> {
        let layers = self.devs[0].layers.len();
        for (d, ((dev, s), k)) in self.devs.iter_mut().zip(shapes).zip(keys).enumerate() {
            dev.gpu.bind()?;
            for m in &arrived[d] {
                dev.gpu.compute_wait(m)?;
            }
            if let Some(m) = own_sent[d] {
                dev.gpu.compute_wait(m)?;
            }
            let key = GraphKey {
                shape: k.clone(),
                part: Part::Joint(li + 1),
            };
            dev.launch(key, &|b: &mut CudaBackend| {
                b.enqueue_post(s, li)?;
                if li + 1 < layers {
                    let _r = nvtx::range(|| format!("layer {}", li + 1));
                    b.enqueue_pre(s, li + 1)
                } else {
                    b.enqueue_head(s)
                }
            })?;
        }
        Ok(())
    }
}

impl Backend for MultiCudaBackend<'_> {
    fn forward(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        tick: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let _r = nvtx::range(|| nvtx::tick_label(tick, members));
        self.forward_any(members, blocks, false)?
            .ok_or_else(|| Error::Internal("the flows of a tick were not downloaded".into()))
    }

    fn commit(&mut self, end: usize) {
        self.devs.iter_mut().for_each(|d| d.commit(end));
    }

    fn resident(&self, f: usize) -> bool {
        self.devs[0].resident(f)
    }

    fn recache(&mut self, members: &[Member]) -> Result<()> {
        self.devs.iter_mut().try_for_each(|d| d.recache(members))
    }

    fn cache_bytes(&self) -> usize {
        self.devs[0].cache_bytes()
    }

    fn keeps_latents(&self) -> bool {
        self.devs.iter().all(|d| d.copts.device_latents)
    }

    fn forward_resident(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        tick: usize,
    ) -> Result<()> {
        let _r = nvtx::range(|| nvtx::tick_label(tick, members));
        self.forward_any(members, blocks, true).map(|_| ())
    }

    fn step_resident(&mut self, steps: &[Option<FlowStep>]) -> Result<Vec<Option<Vec<f32>>>> {
        let placement = self
            .held_placement
            .take()
            .ok_or_else(|| Error::Internal("a flow step without a forward".into()))?;
        if placement.iter().map(Vec::len).sum::<usize>() != steps.len() {
            return Err(Error::Internal("one flow step per member expected".into()));
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; steps.len()];
        for (dev, own) in self.devs.iter_mut().zip(&placement) {
            if own.iter().any(|&i| i >= steps.len()) {
                return Err(Error::Internal("one flow step per member expected".into()));
            }
            dev.gpu.bind()?;
            let mine: Vec<Option<FlowStep>> = own.iter().map(|&i| steps[i]).collect();
            for (&i, x) in own.iter().zip(dev.step_held(&mine)?) {
                out[i] = x;
            }
        }
        self.relay_finals()?;
        Ok(out)
    }

    fn release_latents(&mut self, block: usize) {
        for d in &mut self.devs {
            d.release_held(block);
        }
    }

    fn hand_off_finals(&mut self, download: bool, decoder: usize) -> bool {
        self.hand_off_to(download, decoder)
    }

    fn take_handed(&mut self, block: usize) -> Option<super::DeviceLatents> {
        self.devs.iter_mut().find_map(|d| d.take_handed(block))
    }

    fn handoff_note(&self) -> Option<String> {
        self.handoff_note.clone()
    }
}

impl Drop for MultiCudaBackend<'_> {
    fn drop(&mut self) {
        // Before any device frees its buffers: no peer copy may still read or write them.
        for d in &self.devs {
            let _ = d.gpu.sync_copies();
        }
    }
}

impl MultiCudaBackend<'_> {
    /// One tick on every device, joint or lagged exchange. `held`: the members start from
    /// the latents the devices hold ([`super::resident`]; blocks placed on another device than
    /// last tick move there first) and the flows stay on the devices for
    /// [`Backend::step_resident`] (returns `None`); otherwise the latents are uploaded and
    /// every member's flow is downloaded.
    fn forward_any(
        &mut self,
        members: &[Member],
        blocks: &[usize],
        held: bool,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        if blocks.len() != members.len() {
            return Err(Error::Internal(
                "one block index per member expected".into(),
            ));
        }
        self.held_placement = None;
        let tokens: Vec<usize> = members.iter().map(|m| m.latents.len()).collect();
        let placement = crate::cascade::place(&tokens, self.devs.len());
        let held = held.then_some(blocks);
        if held.is_some() {
            super::resident::move_held(&mut self.devs, members, blocks, &placement)?;
        }
        let shapes = if self.lag.is_some() {
            self.forward_lagged(members, blocks, &placement, held)?
        } else {
            self.forward_joint(members, &placement, held)?
        };
        self.finish_tick(&shapes, &placement, blocks, held.is_some())
    }

    /// After a tick's launches: with `held`, each device records its members for the flow
    /// step; otherwise every member's flow is downloaded from its device.
    pub(super) fn finish_tick(
        &mut self,
        shapes: &[Shape],
        placement: &[Vec<usize>],
        blocks: &[usize],
        held: bool,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        if !held {
            return download_all(&mut self.devs, shapes, placement, blocks.len()).map(Some);
        }
        for ((dev, s), own) in self.devs.iter_mut().zip(shapes).zip(placement) {
            dev.set_last(blocks, s, own);
            dev.ticks += 1;
        }
        self.held_placement = Some(placement.to_vec());
        Ok(None)
    }

    /// One tick with joint exchange (see [`MultiCudaBackend`]) over `placement`.
    fn forward_joint(
        &mut self,
        members: &[Member],
        placement: &[Vec<usize>],
        held: Option<&[usize]>,
    ) -> Result<Vec<Shape>> {
        let (shapes, keys) = self.prepare_devices(members, placement, held)?;
        let start = self
            .devs
            .iter()
            .map(|d| d.gpu.mark_compute().map(Some))
            .collect::<Result<Marks>>()?;
        self.launch_embedding(&shapes, &keys)?;
        let regions_to = self.exchange_regions(members, placement, &shapes)?;
        // Every exit, error or not, waits for the copy streams: no copy may still read or
        // write a buffer once the caller goes on (or drops the devices).
        let res = self.run_layers(&regions_to, (&shapes, &keys), start);
        for dev in &self.devs {
            let synced = dev.gpu.sync_copies();
            if res.is_ok() {
                synced?;
            }
        }
        res?;
        Ok(shapes)
    }

    /// The generation options this backend was opened with.
    pub fn generate_options(&self) -> &GenerateOptions {
        &self.opts
    }
}
