//! Runs a cascade plan on a backend (CPU or CUDA) and streams finished blocks out in order.
//!
//! Every schedule (sequential = lag S, cascade = lag 1..S-1) goes through the same loop, for
//! a run of a known number of blocks ([`Generator::run`]) and for an open-ended one whose
//! prompt schedule grows while it runs ([`Generator::run_live`], fed by a [`PromptMailbox`]):
//! per tick, take the prompt switches that arrived, start new blocks, build the window, one
//! joint [`Backend::forward`] over it (while the next noise is generated), then renoise /
//! finish / commit.
//!
//! A backend that keeps the latents of the blocks in flight on its device(s)
//! ([`Backend::keeps_latents`], the CUDA backend on one or several devices) runs the flow step
//! and the renoise there ([`Backend::forward_resident`], [`Backend::step_resident`]; a separate
//! context pass is a resident forward of its own): only the renoise goes up and only finished
//! blocks come back. The executor's own copy of such a block's latents is then its initial
//! noise, read for its shape only.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::DeviceLatents;
use crate::backend::{Backend, FlowStep};
use crate::cascade::{Plan, PlannedMember, Role};
use crate::config::BackendKind;
use crate::config::{GenerateOptions, Recache};
use crate::engine::MemoryEstimate;
use crate::model::{Member, Model, PromptContext, CHANNELS};
use crate::noise::NoiseSource;
use crate::prompt::{PromptEmbeds, PromptSwitch};
use crate::schedule::StepSchedule;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A block handed to the caller as soon as it is final.
#[derive(Debug)]
pub struct FinishedBlock<'a> {
    /// Block index (0-based), in increasing order.
    pub index: usize,
    /// Absolute index of its first latent frame.
    pub first_frame: usize,
    /// Latent frames in the block.
    pub frames: usize,
    /// Latents `[frames, 16, H, W]`, valid during the callback. Empty when the block was
    /// handed off on the device without its latents ([`Generator::hand_off_on_device`]).
    pub latents: &'a [f32],
    /// The block's latents on the DiT's device, when handed off there
    /// ([`Generator::hand_off_on_device`]): clone it to keep the slot for a decoder there. The
    /// run waits for every clone to be dropped before it writes the slot again (and before it
    /// returns): a clone must be dropped by another thread (the decode thread), or before the
    /// next blocks are needed, or the run stalls.
    pub device: Option<&'a DeviceLatents>,
    /// Time since the run started.
    pub since_start: Duration,
    /// Time since the previous block (or the start, for block 0).
    pub block_time: Duration,
    /// Bytes held by the KV cache right now.
    pub cache_bytes: usize,
    /// Handed off ([`Generator::hand_off_to`]) but this block came through the host after all
    /// (`device` is `None`, `latents` set): why, e.g. the DiT device that finished it has no
    /// peer access to the decoder's ([`RunReport::handoff_note`]).
    pub handoff_note: Option<&'a str>,
}

/// What a run did and how long it took.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunReport {
    /// Ticks executed.
    pub ticks: usize,
    /// Model forwards executed (one per tick, plus separate context passes and recaches).
    pub forward_passes: usize,
    /// Query tokens per tick.
    pub tokens_per_tick: Vec<usize>,
    /// Seconds per block (time between consecutive finished blocks).
    pub block_seconds: Vec<f64>,
    /// Seconds until the first block was final.
    pub time_to_first_block: f64,
    /// Wall-clock seconds of the run.
    pub total_seconds: f64,
    /// Recache forwards run at prompt switches (`--recache window`).
    pub recache_passes: usize,
    /// Frames re-run by recaches.
    pub recache_frames: usize,
    /// Seconds spent recaching.
    pub recache_seconds: f64,
    /// Largest KV cache size seen, in bytes.
    pub max_cache_bytes: usize,
    /// Finished blocks handed off on the device ([`Generator::hand_off_to`]) that still cross
    /// the host to the decoder, and why (a DiT device without peer access to the decoder's);
    /// `None` when none do.
    pub handoff_note: Option<String>,
}

/// What a tick's forward left for the flow step.
enum Flows {
    /// The flows, one per member (the host steps).
    Host(Vec<Vec<f32>>),
    /// The backend stepped (it holds the latents): per member, a block that became final.
    Resident(Vec<Option<Vec<f32>>>),
}

/// What a run keeps between ticks.
struct RunState {
    /// Latents of the blocks being denoised.
    state: HashMap<usize, Vec<f32>>,
    /// Final latents of blocks whose context pass is still to come.
    finals: HashMap<usize, Vec<f32>>,
    /// Clean latents of cached frames, for recaching (frame -> latents).
    clean: BTreeMap<usize, Vec<f32>>,
    /// Noise generated while a forward ran, by (block, slot), until it is used.
    noise_ready: HashMap<(usize, usize), Vec<f32>>,
    report: RunReport,
    start: Instant,
    last_done: Instant,
    /// The next block to hand out.
    next_emit: usize,
    /// The prompt schedule of this run: (first block, prompt), sorted, first entry at block 0.
    /// Starts as the generator's; a live run adds the switches of its mailbox.
    prompts: Vec<(usize, Arc<PromptContext>)>,
}

impl RunState {
    fn new(ticks: usize, prompts: Vec<(usize, Arc<PromptContext>)>) -> Self {
        let start = Instant::now();
        RunState {
            state: HashMap::new(),
            finals: HashMap::new(),
            clean: BTreeMap::new(),
            noise_ready: HashMap::new(),
            report: RunReport {
                ticks,
                ..Default::default()
            },
            start,
            last_done: start,
            next_emit: 0,
            prompts,
        }
    }

    /// Drops the prompts no block at or after `first_live` can use any more (the run's
    /// earliest member is `first_live`), so that a long live run keeps a bounded schedule.
    fn prune_prompts(&mut self, first_live: usize) {
        let keep_from = self
            .prompts
            .partition_point(|(b, _)| *b <= first_live)
            .saturating_sub(1);
        self.prompts.drain(..keep_from);
    }
}

/// The prompt of `block` in a sorted schedule whose first entry is at block 0.
fn prompt_for(prompts: &[(usize, Arc<PromptContext>)], block: usize) -> &Arc<PromptContext> {
    let i = prompts.partition_point(|(b, _)| *b <= block);
    &prompts[i.saturating_sub(1)].1
}

/// Inserts a switch at `block` into a sorted schedule (replacing one at the same block).
fn insert_prompt(
    prompts: &mut Vec<(usize, Arc<PromptContext>)>,
    block: usize,
    ctx: Arc<PromptContext>,
) {
    match prompts.binary_search_by_key(&block, |(b, _)| *b) {
        Ok(i) => prompts[i].1 = ctx,
        Err(i) => prompts.insert(i, (block, ctx)),
    }
}

/// Blocks an open-ended run plans for: never reached (about 5e14 blocks on 64-bit), small
/// enough that no frame index or tick number overflows.
const OPEN_ENDED_BLOCKS: usize = usize::MAX / (crate::config::MAX_BLOCK_FRAMES * 8);

/// Prompt switches handed to a live run ([`Generator::run_live`]) from any thread while it
/// runs, and the way to stop it.
///
/// A switch applies from the next block to *start*: [`PromptMailbox::switch`] returns that
/// block's index. The run takes the waiting switches at the start of every tick, under the
/// same lock that advances "the next block to start", so the returned index is exactly the
/// first block denoised under the new prompt. Blocks already started keep their prompt; with
/// `Recache::Window` the cache is re-encoded under the new prompt when that block starts,
/// and the context pass of the block before it runs under the new prompt (as in a fixed
/// prompt schedule with a switch at that block).
#[derive(Debug, Default)]
pub struct PromptMailbox {
    inner: Mutex<Mailbox>,
}

#[derive(Debug, Default)]
struct Mailbox {
    /// The first block that has not started yet.
    next_start: usize,
    /// Switches not yet taken by the run: (first block, prompt).
    pending: Vec<(usize, Arc<PromptContext>)>,
    /// Set by [`PromptMailbox::cancel`]: the run stops at its next tick.
    cancelled: bool,
    /// When the most recent blocks started (block, the start of the tick that started it),
    /// oldest first, at most [`STARTS_KEPT`]: for switch latency measurements.
    starts: VecDeque<(usize, Instant)>,
}

/// Block start times a [`PromptMailbox`] remembers ([`PromptMailbox::started_at`]).
const STARTS_KEPT: usize = 64;

impl PromptMailbox {
    /// An empty mailbox: no switch, block 0 not started.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Mailbox> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a prompt (made by [`Model::prompt_context`] for the run's model) and returns the
    /// index of the first block that will use it: the next block to start. A second switch
    /// before that block starts replaces the first.
    pub fn switch(&self, prompt: PromptContext) -> usize {
        let mut m = self.lock();
        let block = m.next_start;
        m.pending.push((block, Arc::new(prompt)));
        block
    }

    /// The next block to start (the block a switch made now would apply from).
    pub fn next_start(&self) -> usize {
        self.lock().next_start
    }

    /// Asks the run to stop: it returns [`Error::Cancelled`] at the start of its next tick.
    pub fn cancel(&self) {
        self.lock().cancelled = true;
    }

    /// Whether [`PromptMailbox::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// When block `block` started (the start of the tick that ran its first step), if it is
    /// one of the last blocks to start (the mailbox keeps the most recent 64). With the
    /// switch's own time this splits a switch's latency into waiting for the block to start
    /// and the block's own generation.
    pub fn started_at(&self, block: usize) -> Option<Instant> {
        let m = self.lock();
        m.starts.iter().find(|(b, _)| *b == block).map(|(_, t)| *t)
    }

    /// At the start of a tick: takes the waiting switches and records that every block below
    /// `next_start` has now started. [`Error::Cancelled`] once cancelled.
    fn take(&self, next_start: usize) -> Result<Vec<(usize, Arc<PromptContext>)>> {
        let mut m = self.lock();
        if m.cancelled {
            return Err(Error::Cancelled);
        }
        if next_start > m.next_start {
            let now = Instant::now();
            let first = m.next_start.max(next_start.saturating_sub(STARTS_KEPT));
            for b in first..next_start {
                if m.starts.len() == STARTS_KEPT {
                    m.starts.pop_front();
                }
                m.starts.push_back((b, now));
            }
            m.next_start = next_start;
        }
        Ok(std::mem::take(&mut m.pending))
    }
}

/// Entries a live run keeps in [`RunReport::tokens_per_tick`] and
/// [`RunReport::block_seconds`] (the most recent ones).
const LIVE_REPORT_ENTRIES: usize = 1024;

/// Drops the oldest entries of `v` beyond `keep` (in batches, so that it is cheap per tick).
fn trim_front<T>(v: &mut Vec<T>, keep: usize) {
    if v.len() > 2 * keep {
        v.drain(..v.len() - keep);
    }
}

/// A configured generation: model, options, noise and prompts.
pub struct Generator<'m> {
    model: &'m Model,
    opts: GenerateOptions,
    steps: StepSchedule,
    noise: NoiseSource,
    /// (first block, prompt), sorted, first entry at block 0.
    prompts: Vec<(usize, Arc<PromptContext>)>,
    /// Hand finished blocks off on the device (`Some((download, decoder GPU ordinal))`), see
    /// [`Generator::hand_off_to`].
    handoff: Option<(bool, usize)>,
}

impl<'m> Generator<'m> {
    /// Validates the options and the prompt embeddings. The prompt's cross-attention K/V are
    /// computed when first needed: by the first CPU forward that uses the prompt, or on the
    /// device by the CUDA backend (see [`PromptContext`]).
    pub fn new(
        model: &'m Model,
        opts: GenerateOptions,
        noise: NoiseSource,
        prompt: &PromptEmbeds,
    ) -> Result<Self> {
        opts.validate(None)?;
        let steps = StepSchedule::new(&opts.steps, opts.shift)?;
        prompt.check(model.config())?;
        let ctx = Arc::new(model.prompt_context(&prompt.data, prompt.rows)?);
        Ok(Generator {
            model,
            opts,
            steps,
            noise,
            prompts: vec![(0, ctx)],
            handoff: None,
        })
    }

    /// For a decoder on the DiT's device: when the backend keeps the latents on one CUDA
    /// device, each finished block comes with [`FinishedBlock::device`] (its latents where
    /// they are, held until every clone is dropped), and its latents are downloaded only when
    /// `host_latents` (otherwise [`FinishedBlock::latents`] is empty, and the check for
    /// non-finite latents is left to whoever reads them). `--recache window` keeps the clean
    /// latents on the host, so it downloads them anyway. Other backends: no effect.
    pub fn hand_off_on_device(&mut self, host_latents: bool) {
        let first = crate::backend::cuda::first_device(&self.opts.device_ids);
        self.hand_off_to(first, host_latents);
    }

    /// [`Generator::hand_off_on_device`] for a decoder on GPU `ordinal`, one of the DiT's
    /// devices ([`crate::decode::DecodeDevice::beside_dit`]): with several devices, a block
    /// finished on the decoder's device is handed off in place, one finished on another device
    /// is first copied device to device into a buffer on the decoder's (where peer access
    /// allows; otherwise it comes through the host, [`RunReport::handoff_note`]).
    pub fn hand_off_to(&mut self, ordinal: usize, host_latents: bool) {
        self.handoff = Some((host_latents, ordinal));
    }

    /// [`Generator::hand_off_to`] `decoder`'s GPU when it is one of the DiT's devices
    /// ([`crate::decode::DecodeDevice::beside_dit`]); returns whether it is. What the front
    /// ends call with the device their decoder runs on.
    pub fn hand_off_to_decoder(
        &mut self,
        decoder: crate::decode::DecodeDevice,
        host_latents: bool,
    ) -> bool {
        match decoder {
            crate::decode::DecodeDevice::Cuda { ordinal, .. } if decoder.beside_dit(&self.opts) => {
                self.hand_off_to(ordinal, host_latents);
                true
            }
            _ => false,
        }
    }

    /// The options.
    pub fn options(&self) -> &GenerateOptions {
        &self.opts
    }

    /// The warped schedule.
    pub fn steps(&self) -> &StepSchedule {
        &self.steps
    }

    /// Adds prompt switches (each applies from its block on; a switch at block 0 replaces the
    /// initial prompt).
    pub fn set_prompt_schedule(&mut self, switches: &[PromptSwitch]) -> Result<()> {
        for s in switches {
            s.embeds.check(self.model.config())?;
            let ctx = Arc::new(self.model.prompt_context(&s.embeds.data, s.embeds.rows)?);
            self.prompts.retain(|(b, _)| *b != s.block);
            self.prompts.push((s.block, ctx));
        }
        self.prompts.sort_by_key(|(b, _)| *b);
        Ok(())
    }

    /// Replaces the prompt from block `block` on (e.g. between two streamed runs).
    pub fn switch_prompt(&mut self, block: usize, prompt: &PromptEmbeds) -> Result<()> {
        self.set_prompt_schedule(&[PromptSwitch {
            block,
            embeds: prompt.clone(),
        }])
    }

    /// The backend the options ask for, for a run of `frames` frames (`None`: open-ended).
    fn backend(&self, frames: Option<usize>) -> Result<Box<dyn Backend + 'm>> {
        match self.opts.backend {
            BackendKind::Cpu => Ok(Box::new(CpuBackend::new(self.model, &self.opts)?)),
            BackendKind::Cuda => crate::backend::cuda_backend(self.model, &self.opts, frames),
        }
    }

    /// Makes a prompt context for this generator's model (validated), e.g. for
    /// [`PromptMailbox::switch`].
    pub fn prompt_context(&self, prompt: &PromptEmbeds) -> Result<PromptContext> {
        prompt.check(self.model.config())?;
        self.model.prompt_context(&prompt.data, prompt.rows)
    }

    /// Generates `blocks` blocks and returns all latents `[blocks*B, 16, H, W]`.
    pub fn generate(&self, blocks: usize) -> Result<(Vec<f32>, RunReport)> {
        let mut all = Vec::new();
        let report = self.run(blocks, |b| {
            all.extend_from_slice(b.latents);
            true
        })?;
        Ok((all, report))
    }

    /// Generates `blocks` blocks, calling `on_block` for each as soon as it is final (in
    /// order). Returning `false` stops the run with [`Error::Cancelled`]. Memory does not grow
    /// with `blocks` when local attention is used.
    pub fn run(
        &self,
        blocks: usize,
        on_block: impl FnMut(&FinishedBlock) -> bool,
    ) -> Result<RunReport> {
        let plan = self.check_run(blocks)?;
        self.drive(plan, None, on_block)
    }

    /// Generates blocks without end, calling `on_block` for each as soon as it is final (in
    /// order), until `on_block` returns `false` or `mailbox` is cancelled (both end the run
    /// with [`Error::Cancelled`]), or an error. The prompt switches posted to `mailbox` (from
    /// any thread) join the prompt schedule at the start of the next tick; see
    /// [`PromptMailbox`] for which block they apply from.
    ///
    /// The run's memory must stay bounded, so it needs local attention (`local_attn`);
    /// global attention is an [`Error::InvalidArgument`]. With recorded noise the run fails
    /// when the noise runs out.
    pub fn run_live(
        &self,
        mailbox: &PromptMailbox,
        on_block: impl FnMut(&FinishedBlock) -> bool,
    ) -> Result<RunReport> {
        let plan = self.check_live()?;
        self.drive(plan, Some(mailbox), on_block)
    }

    /// The tick loop shared by [`Generator::run`] and [`Generator::run_live`].
    fn drive(
        &self,
        plan: Plan,
        mailbox: Option<&PromptMailbox>,
        mut on_block: impl FnMut(&FinishedBlock) -> bool,
    ) -> Result<RunReport> {
        let bf = self.opts.block_frames;
        let tpf = (self.opts.height / 2) * (self.opts.width / 2);
        let live = mailbox.is_some();
        let frames = (!live).then(|| plan.blocks.saturating_mul(bf));
        let mut backend = self.backend(frames)?;
        let resident = backend.keeps_latents();
        if let (true, Some((host, ordinal))) = (resident, self.handoff) {
            backend.hand_off_finals(host || self.opts.recache == Recache::Window, ordinal);
        }
        let mut st = RunState::new(if live { 0 } else { plan.ticks() }, self.prompts.clone());
        st.report.handoff_note = backend.handoff_note();
        for tau in 0..plan.ticks() {
            let planned = plan.members(tau);
            if let Some(mb) = mailbox {
                // Blocks 0..=tau/lag have started once this tick starts its new ones.
                for (block, ctx) in mb.take(tau / plan.lag + 1)? {
                    insert_prompt(&mut st.prompts, block, ctx);
                }
                st.report.ticks += 1;
            }
            if let Some(first) = planned.first() {
                st.prune_prompts(first.block);
            }
            self.start_blocks(&mut st, backend.as_mut(), &planned)?;
            let blocks_of: Vec<usize> = planned.iter().map(|m| m.block).collect();
            let wanted = self.noise_wanted(&plan, tau, &planned);
            let (flows, generated) = {
                let members = self.window(&st.state, &st.finals, &st.prompts, &planned);
                st.report.tokens_per_tick.push(members.len() * bf * tpf);
                self.forward_with_noise(
                    backend.as_mut(),
                    (&members, &blocks_of, tau),
                    resident,
                    &wanted,
                    &mut st.report,
                )?
            };
            st.noise_ready.extend(generated);
            let flows = match resident {
                true => Flows::Resident(self.step_resident(&mut st, backend.as_mut(), &planned)?),
                false => Flows::Host(flows),
            };
            self.apply(
                &mut st,
                backend.as_mut(),
                &planned,
                flows,
                plan.blocks,
                &mut on_block,
            )?;
            st.report.max_cache_bytes = st.report.max_cache_bytes.max(backend.cache_bytes());
            if live {
                // Keep the per-tick and per-block lists of a run without end bounded.
                trim_front(&mut st.report.tokens_per_tick, LIVE_REPORT_ENTRIES);
                trim_front(&mut st.report.block_seconds, LIVE_REPORT_ENTRIES);
            }
        }
        st.report.total_seconds = st.start.elapsed().as_secs_f64();
        Ok(st.report)
    }

    /// Checks an open-ended run (bounded memory, host memory) and plans it.
    pub(crate) fn check_live(&self) -> Result<Plan> {
        let o = &self.opts;
        let Some(window) = o.local_attn else {
            return Err(Error::invalid(
                "an open-ended stream needs local attention (local_attn / --local-attn, e.g. 12 \
                 frames): with global attention its KV cache would grow without bound",
            ));
        };
        let plan = Plan::new(OPEN_ENDED_BLOCKS, self.steps.len(), o.lag())?;
        if o.backend == BackendKind::Cpu {
            MemoryEstimate::new(self.model.config(), o, window).check_run()?;
        }
        Ok(plan)
    }

    /// Checks a run of `blocks` against the recorded noise, the prompt schedule and (CPU) the
    /// host memory, and plans it.
    fn check_run(&self, blocks: usize) -> Result<Plan> {
        let o = &self.opts;
        let bf = o.block_frames;
        if let Some(avail) = self.noise.frames() {
            if blocks.saturating_mul(bf) > avail {
                return Err(Error::invalid(format!(
                    "recorded noise holds {avail} frames but {} were requested ({blocks} blocks of {bf})",
                    blocks.saturating_mul(bf)
                )));
            }
        }
        if let Some((b, _)) = self.prompts.iter().find(|(b, _)| *b >= blocks.max(1)) {
            return Err(Error::invalid(format!(
                "the prompt schedule switches at block {b}, but only {blocks} blocks are generated"
            )));
        }
        let plan = Plan::new(blocks, self.steps.len(), o.lag())?;
        if o.backend == BackendKind::Cpu {
            MemoryEstimate::new(self.model.config(), o, blocks.saturating_mul(bf)).check_run()?;
        }
        Ok(plan)
    }

    /// New blocks of this tick start from their initial noise; a prompt switch at one of them
    /// triggers a recache (`--recache window`).
    fn start_blocks(
        &self,
        st: &mut RunState,
        backend: &mut dyn Backend,
        planned: &[PlannedMember],
    ) -> Result<()> {
        let keep_latents = self.opts.recache == Recache::Window;
        for m in planned {
            if m.role == Role::Denoise(0) {
                let noise = match st.noise_ready.remove(&(m.block, 0)) {
                    Some(n) => n,
                    None => self.block_noise(m.block, 0)?,
                };
                st.state.insert(m.block, noise);
                if keep_latents && m.block > 0 && st.prompts.iter().any(|(b, _)| *b == m.block) {
                    let t0 = Instant::now();
                    let prompt = prompt_for(&st.prompts, m.block);
                    let frames = self.recache(backend, &st.clean, prompt)?;
                    if frames > 0 {
                        st.report.recache_passes += 1;
                        st.report.forward_passes += 1;
                        st.report.recache_frames += frames;
                        st.report.recache_seconds += t0.elapsed().as_secs_f64();
                    }
                }
            }
        }
        Ok(())
    }

    /// The window of this tick. With `--recache window` a block's context pass runs under the
    /// prompt of the block after it (its first reader): in the sequential schedule this is
    /// LongLive's re-encoding of the cache at a switch, and blocks of the old prompt still in
    /// flight never see context encoded under the new one.
    fn window<'a>(
        &'a self,
        state: &'a HashMap<usize, Vec<f32>>,
        finals: &'a HashMap<usize, Vec<f32>>,
        prompts: &'a [(usize, Arc<PromptContext>)],
        planned: &[PlannedMember],
    ) -> Vec<Member<'a>> {
        let o = &self.opts;
        let keep_latents = o.recache == Recache::Window;
        planned
            .iter()
            .map(|m| {
                let (lat, t, ctx) = match m.role {
                    Role::Denoise(s) => (&state[&m.block], self.steps.timesteps[s], false),
                    Role::Context => (&finals[&m.block], o.context_noise, true),
                };
                Member {
                    first_frame: m.block * o.block_frames,
                    latents: lat,
                    timestep: t,
                    context: ctx,
                    prompt: if ctx && keep_latents {
                        prompt_for(prompts, m.block + 1)
                    } else {
                        prompt_for(prompts, m.block)
                    },
                }
            })
            .collect()
    }

    /// The noise generated during tick `tau`'s forward: the renoise of its denoising members,
    /// and the initial noise of the blocks starting next tick, by (block, slot).
    fn noise_wanted(
        &self,
        plan: &Plan,
        tau: usize,
        planned: &[PlannedMember],
    ) -> Vec<(usize, usize)> {
        let s_count = self.steps.len();
        let next_starts: Vec<(usize, usize)> = if tau + 1 < plan.ticks() {
            plan.members(tau + 1)
                .iter()
                .filter(|m| m.role == Role::Denoise(0))
                .map(|m| (m.block, 0))
                .collect()
        } else {
            Vec::new()
        };
        planned
            .iter()
            .filter_map(|m| match m.role {
                Role::Denoise(s) if s + 1 < s_count => Some((m.block, s + 1)),
                _ => None,
            })
            .chain(next_starts)
            .collect()
    }

    /// Runs the tick's forward while the `wanted` noise is generated on another thread (and
    /// the rayon pool): otherwise a GPU would idle while the host makes it (about 11 ms per
    /// 3-frame block at 60x104 latents on one CI core). Returns the flows and the noise.
    /// With `resident` the forward keeps its flows on the backend
    /// ([`Backend::forward_resident`]) and no flows are returned.
    #[allow(clippy::type_complexity)]
    fn forward_with_noise(
        &self,
        backend: &mut dyn Backend,
        (members, blocks_of, tau): (&[Member], &[usize], usize),
        resident: bool,
        wanted: &[(usize, usize)],
        report: &mut RunReport,
    ) -> Result<(Vec<Vec<f32>>, HashMap<(usize, usize), Vec<f32>>)> {
        let o = &self.opts;
        let bf = o.block_frames;
        let noise = |key: &(usize, usize)| Ok((*key, self.block_noise(key.0, key.1)?));
        // Called from inside a rayon pool, the blocked caller could be the worker the
        // parallel noise waits for: generate it sequentially then.
        let in_pool = rayon::current_thread_index().is_some();
        std::thread::scope(|sc| -> Result<_> {
            let gen = (!wanted.is_empty())
                .then(|| {
                    std::thread::Builder::new()
                        .name("blockcascade-noise".into())
                        .spawn_scoped(sc, || {
                            use rayon::prelude::*;
                            if in_pool {
                                wanted.iter().map(noise).collect::<Result<HashMap<_, _>>>()
                            } else {
                                wanted
                                    .par_iter()
                                    .map(noise)
                                    .collect::<Result<HashMap<_, _>>>()
                            }
                        })
                        .map_err(|e| Error::Internal(format!("cannot start the noise thread: {e}")))
                })
                .transpose()?;
            let apart =
                self.context_apart(members.len(), members.first().is_some_and(|m| m.context));
            let mut forward = || -> Result<Vec<Vec<f32>>> {
                if resident && apart {
                    // The context pass from the block's held latents, then the rest.
                    backend.forward_resident(&members[..1], &blocks_of[..1], tau)?;
                    backend.commit(members[0].first_frame + bf);
                    backend.forward_resident(&members[1..], &blocks_of[1..], tau)?;
                    report.forward_passes += 2;
                    Ok(Vec::new())
                } else if resident {
                    report.forward_passes += 1;
                    backend.forward_resident(members, blocks_of, tau)?;
                    Ok(Vec::new())
                } else if apart {
                    let mut f = backend.forward(&members[..1], &blocks_of[..1], tau)?;
                    backend.commit(members[0].first_frame + bf);
                    f.extend(backend.forward(&members[1..], &blocks_of[1..], tau)?);
                    report.forward_passes += 2;
                    Ok(f)
                } else {
                    report.forward_passes += 1;
                    backend.forward(members, blocks_of, tau)
                }
            };
            let flows = forward();
            // Joined before any error is returned, so the scope never sees a panic.
            let noise = match gen {
                Some(g) => g
                    .join()
                    .map_err(|_| Error::Internal("the noise thread panicked".into()))
                    .and_then(|r| r),
                None => Ok(HashMap::new()),
            };
            Ok((flows?, noise?))
        })
    }

    /// Applies the tick's flows: context members commit their frames (and, with
    /// `--recache window`, keep their clean latents); denoising members take a flow step and
    /// are renoised, or, at their last step, are handed to `on_block` in order.
    fn apply(
        &self,
        st: &mut RunState,
        backend: &mut dyn Backend,
        planned: &[PlannedMember],
        flows: Flows,
        blocks: usize,
        on_block: &mut impl FnMut(&FinishedBlock) -> bool,
    ) -> Result<()> {
        let o = &self.opts;
        let bf = o.block_frames;
        let flen = CHANNELS * o.height * o.width;
        let s_count = self.steps.len();
        let keep_latents = o.recache == Recache::Window;
        let (resident, flows) = match flows {
            Flows::Host(f) => (false, f.into_iter().map(Some).collect()),
            Flows::Resident(finals) => (true, finals),
        };
        for (m, v) in planned.iter().zip(flows) {
            match m.role {
                Role::Context => {
                    backend.commit((m.block + 1) * bf);
                    if resident {
                        backend.release_latents(m.block);
                    }
                    if let Some(lat) = st.finals.remove(&m.block) {
                        if keep_latents {
                            for fi in 0..bf {
                                st.clean.insert(
                                    m.block * bf + fi,
                                    lat[fi * flen..(fi + 1) * flen].to_vec(),
                                );
                            }
                            st.clean.retain(|&f, _| backend.resident(f));
                        }
                    }
                }
                Role::Denoise(s) if resident => {
                    if s + 1 < s_count {
                        continue; // stepped and renoised on the backend
                    }
                    let start = st.state.remove(&m.block);
                    let x = v.ok_or_else(|| {
                        Error::Internal(format!("block {} came back without latents", m.block))
                    })?;
                    let dev = backend.take_handed(m.block);
                    if x.is_empty() {
                        // Handed off without a download: its initial noise gives the shape of
                        // its context pass (which reads the device copy).
                        let start = start.ok_or_else(|| {
                            Error::Internal(format!("block {} has no state", m.block))
                        })?;
                        self.emit(st, backend, m.block, &[], dev.as_ref(), on_block)?;
                        if m.block + 1 < blocks {
                            st.finals.insert(m.block, start);
                        }
                    } else {
                        self.finish_block(st, backend, m.block, (x, dev), blocks, on_block)?;
                    }
                    if m.block + 1 >= blocks {
                        backend.release_latents(m.block);
                    }
                }
                Role::Denoise(s) => {
                    let Some(mut x) = st.state.remove(&m.block) else {
                        return Err(Error::Internal(format!("block {} has no state", m.block)));
                    };
                    let v = v.ok_or_else(|| Error::Internal("a flow is missing".into()))?;
                    if s + 1 < s_count {
                        let sn = self.steps.sigmas[s + 1];
                        let noise = st.noise_ready.remove(&(m.block, s + 1)).ok_or_else(|| {
                            Error::Internal(format!("no renoise for block {}", m.block))
                        })?;
                        crate::backend::cpu::ops::flow_step(
                            &mut x,
                            &v,
                            self.steps.sigmas[s],
                            Some((sn, &noise)),
                        );
                        st.state.insert(m.block, x);
                    } else {
                        crate::backend::cpu::ops::flow_step(&mut x, &v, self.steps.sigmas[s], None);
                        self.finish_block(st, backend, m.block, (x, None), blocks, on_block)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The flow step of this tick's denoising members on the backend that holds their latents
    /// (the renoise generated during the forward goes up): per member, the latents of a block
    /// that became final.
    fn step_resident(
        &self,
        st: &mut RunState,
        backend: &mut dyn Backend,
        planned: &[PlannedMember],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let (sig, s_count) = (&self.steps.sigmas, self.steps.len());
        let renoise = planned
            .iter()
            .map(|m| match m.role {
                Role::Denoise(s) if s + 1 < s_count => st
                    .noise_ready
                    .remove(&(m.block, s + 1))
                    .map(Some)
                    .ok_or_else(|| Error::Internal(format!("no renoise for block {}", m.block))),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let steps: Vec<Option<FlowStep>> = planned
            .iter()
            .zip(&renoise)
            .map(|(m, n)| match m.role {
                Role::Context => None,
                Role::Denoise(s) => Some(FlowStep {
                    sigma: sig[s],
                    next: n.as_deref().map(|n| (sig[s + 1], n)),
                }),
            })
            .collect();
        if self.context_apart(
            planned.len(),
            planned.first().is_some_and(|m| m.role == Role::Context),
        ) {
            // The last forward (`forward_with_noise`) ran the members after the context pass.
            let mut out = vec![None];
            out.extend(backend.step_resident(&steps[1..])?);
            return Ok(out);
        }
        backend.step_resident(&steps)
    }

    /// Whether a tick's context member (first of `n` members, `first_is_context`) runs in a
    /// forward of its own (`separate_context_pass`) before the other members.
    fn context_apart(&self, n: usize, first_is_context: bool) -> bool {
        self.opts.separate_context_pass && n > 1 && first_is_context
    }

    /// A block's final latents `x` (and its device copy, when handed off): checked, handed to
    /// `on_block`, kept for its context pass.
    fn finish_block(
        &self,
        st: &mut RunState,
        backend: &mut dyn Backend,
        block: usize,
        (x, dev): (Vec<f32>, Option<DeviceLatents>),
        blocks: usize,
        on_block: &mut impl FnMut(&FinishedBlock) -> bool,
    ) -> Result<()> {
        // Finite but huge weights or prompts can overflow: bad input, not a bug.
        if x.iter().any(|v| !v.is_finite()) {
            return Err(Error::Format(format!(
                "block {block} produced non-finite latents: the model's weights or the \
                 prompt embeddings are out of range (values overflow to inf/NaN)"
            )));
        }
        self.emit(st, backend, block, &x, dev.as_ref(), on_block)?;
        if block + 1 < blocks {
            st.finals.insert(block, x);
        }
        Ok(())
    }

    /// Hands finished block `block` (latents `x`) to `on_block`, in order.
    fn emit(
        &self,
        st: &mut RunState,
        backend: &dyn Backend,
        block: usize,
        x: &[f32],
        device: Option<&DeviceLatents>,
        on_block: &mut impl FnMut(&FinishedBlock) -> bool,
    ) -> Result<()> {
        let bf = self.opts.block_frames;
        if x.iter().any(|v| !v.is_finite()) {
            return Err(Error::Internal(format!(
                "block {block} produced non-finite latents (weights or inputs out of range?)"
            )));
        }
        if block != st.next_emit {
            return Err(Error::Internal("blocks finished out of order".into()));
        }
        let now = Instant::now();
        let fb = FinishedBlock {
            index: block,
            first_frame: block * bf,
            frames: bf,
            latents: x,
            device,
            since_start: now - st.start,
            block_time: now - st.last_done,
            cache_bytes: backend.cache_bytes(),
            handoff_note: st
                .report
                .handoff_note
                .as_deref()
                .filter(|_| device.is_none()),
        };
        if st.next_emit == 0 {
            st.report.time_to_first_block = fb.since_start.as_secs_f64();
        }
        st.report.block_seconds.push(fb.block_time.as_secs_f64());
        st.last_done = now;
        st.next_emit += 1;
        if !on_block(&fb) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// The noise of every frame of `block` for `slot` (0 = initial noise, `s >= 1` = the
    /// renoise after step `s - 1`).
    fn block_noise(&self, block: usize, slot: usize) -> Result<Vec<f32>> {
        let bf = self.opts.block_frames;
        let flen = CHANNELS * self.opts.height * self.opts.width;
        let mut v = vec![0f32; bf * flen];
        for (fi, frame) in v.chunks_mut(flen).enumerate() {
            self.noise.fill(block * bf + fi, slot, frame)?;
        }
        Ok(v)
    }

    /// LongLive recache: rebuilds the KV cache from the clean latents of the resident frames
    /// under `prompt` (that of the block starting). Returns the number of frames re-run.
    fn recache(
        &self,
        backend: &mut dyn Backend,
        clean: &BTreeMap<usize, Vec<f32>>,
        prompt: &PromptContext,
    ) -> Result<usize> {
        let o = &self.opts;
        let bf = o.block_frames;
        let frames: Vec<usize> = clean
            .keys()
            .copied()
            .filter(|&f| backend.resident(f))
            .collect();
        if frames.is_empty() {
            return Ok(0);
        }
        // One member per (possibly partial) original block, so visibility matches the original passes.
        let mut groups: Vec<(usize, Vec<f32>)> = Vec::new();
        for &f in &frames {
            match groups.last_mut() {
                Some((f0, lat))
                    if f0.div_euclid(bf) == f / bf && *f0 + lat.len() / clean[&f].len() == f =>
                {
                    lat.extend_from_slice(&clean[&f])
                }
                _ => groups.push((f, clean[&f].clone())),
            }
        }
        let members: Vec<Member> = groups
            .iter()
            .map(|(f0, lat)| Member {
                first_frame: *f0,
                latents: lat,
                timestep: o.context_noise,
                context: true,
                prompt,
            })
            .collect();
        backend.recache(&members)?;
        Ok(frames.len())
    }
}
