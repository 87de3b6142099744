//! Runs a cascade plan on the CPU backend and streams finished blocks out in order.
//!
//! Every schedule (sequential = lag S, cascade = lag 1..S-1) goes through the same loop: per
//! tick, one joint [`Model::forward`] over the planned members, then renoise / finish / commit.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendKind};
use crate::cascade::{Plan, Role};
use crate::config::{GenerateOptions, Recache};
use crate::engine::MemoryEstimate;
use crate::model::{Member, Model, PromptContext, CHANNELS};
use crate::noise::NoiseSource;
use crate::prompt::{PromptEmbeds, PromptSwitch};
use crate::schedule::StepSchedule;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
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
    /// Latents `[frames, 16, H, W]`, valid during the callback.
    pub latents: &'a [f32],
    /// Time since the run started.
    pub since_start: Duration,
    /// Time since the previous block (or the start, for block 0).
    pub block_time: Duration,
    /// Bytes held by the KV cache right now.
    pub cache_bytes: usize,
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
}

/// A configured generation: model, options, noise and prompts.
pub struct Generator<'m> {
    model: &'m Model,
    opts: GenerateOptions,
    steps: StepSchedule,
    noise: NoiseSource,
    /// (first block, prompt), sorted, first entry at block 0.
    prompts: Vec<(usize, Arc<PromptContext>)>,
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
        })
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

    /// The backend the options ask for, for a run of `frames` frames.
    fn backend(&self, frames: usize) -> Result<Box<dyn Backend + 'm>> {
        match self.opts.backend {
            BackendKind::Cpu => Ok(Box::new(CpuBackend::new(self.model, &self.opts)?)),
            BackendKind::Cuda => crate::backend::cuda_backend(self.model, &self.opts, Some(frames)),
        }
    }

    fn prompt_for(&self, block: usize) -> &Arc<PromptContext> {
        let i = self.prompts.partition_point(|(b, _)| *b <= block);
        &self.prompts[i.saturating_sub(1)].1
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
        mut on_block: impl FnMut(&FinishedBlock) -> bool,
    ) -> Result<RunReport> {
        let o = &self.opts;
        let bf = o.block_frames;
        let (h, w) = (o.height, o.width);
        let flen = CHANNELS * h * w;
        let s_count = self.steps.len();
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
        let plan = Plan::new(blocks, s_count, o.lag())?;
        if o.backend == BackendKind::Cpu {
            MemoryEstimate::new(self.model.config(), o, blocks.saturating_mul(bf)).check_run()?;
        }
        let tpf = (h / 2) * (w / 2);
        let mut backend = self.backend(blocks.saturating_mul(bf))?;
        let keep_latents = o.recache == Recache::Window;
        let mut state: HashMap<usize, Vec<f32>> = HashMap::new();
        let mut finals: HashMap<usize, Vec<f32>> = HashMap::new();
        // Clean latents of cached frames, for recaching (frame -> latents).
        let mut clean: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        let mut report = RunReport {
            ticks: plan.ticks(),
            ..Default::default()
        };
        let start = Instant::now();
        let mut last_done = start;
        let mut next_emit = 0usize;
        // Noise generated while a forward ran, by (block, slot), until it is used.
        let mut noise_ready: HashMap<(usize, usize), Vec<f32>> = HashMap::new();
        for tau in 0..plan.ticks() {
            let planned = plan.members(tau);
            // New blocks start from their initial noise; a prompt switch may trigger a recache.
            for m in &planned {
                if m.role == Role::Denoise(0) {
                    let noise = match noise_ready.remove(&(m.block, 0)) {
                        Some(n) => n,
                        None => self.block_noise(m.block, 0)?,
                    };
                    state.insert(m.block, noise);
                    if keep_latents
                        && m.block > 0
                        && self.prompts.iter().any(|(b, _)| *b == m.block)
                    {
                        let t0 = Instant::now();
                        let frames = self.recache(backend.as_mut(), &clean, m.block)?;
                        if frames > 0 {
                            report.recache_passes += 1;
                            report.forward_passes += 1;
                            report.recache_frames += frames;
                            report.recache_seconds += t0.elapsed().as_secs_f64();
                        }
                    }
                }
            }
            // Build the window. With `--recache window` a block's context pass runs under the
            // prompt of the block after it (its first reader): in the sequential schedule this is
            // LongLive's re-encoding of the cache at a switch, and blocks of the old prompt still
            // in flight never see context encoded under the new one.
            let mut members = Vec::with_capacity(planned.len());
            for m in &planned {
                let (lat, t, ctx) = match m.role {
                    Role::Denoise(s) => (&state[&m.block], self.steps.timesteps[s], false),
                    Role::Context => (&finals[&m.block], o.context_noise, true),
                };
                members.push(Member {
                    first_frame: m.block * bf,
                    latents: lat,
                    timestep: t,
                    context: ctx,
                    prompt: if ctx && keep_latents {
                        self.prompt_for(m.block + 1)
                    } else {
                        self.prompt_for(m.block)
                    },
                });
            }
            report.tokens_per_tick.push(members.len() * bf * tpf);
            let blocks_of: Vec<usize> = planned.iter().map(|m| m.block).collect();
            // The renoise of this tick's denoising members, and the initial noise of the blocks
            // starting next tick, are generated on another thread (and the rayon pool) while
            // the backend runs the forward; otherwise a GPU would idle while the host makes
            // them (about 11 ms per 3-frame block at 60x104 latents on one CI core).
            let next_starts: Vec<(usize, usize)> = if tau + 1 < plan.ticks() {
                plan.members(tau + 1)
                    .iter()
                    .filter(|m| m.role == Role::Denoise(0))
                    .map(|m| (m.block, 0))
                    .collect()
            } else {
                Vec::new()
            };
            let wanted: Vec<(usize, usize)> = planned
                .iter()
                .filter_map(|m| match m.role {
                    Role::Denoise(s) if s + 1 < s_count => Some((m.block, s + 1)),
                    _ => None,
                })
                .chain(next_starts)
                .collect();
            let noise = |key: &(usize, usize)| Ok((*key, self.block_noise(key.0, key.1)?));
            // Called from inside a rayon pool, the blocked caller could be the worker the
            // parallel noise waits for: generate it sequentially then.
            let in_pool = rayon::current_thread_index().is_some();
            let (flows, generated) = std::thread::scope(|sc| -> Result<_> {
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
                            .map_err(|e| {
                                Error::Internal(format!("cannot start the noise thread: {e}"))
                            })
                    })
                    .transpose()?;
                let mut forward = || -> Result<Vec<Vec<f32>>> {
                    if o.separate_context_pass && members.len() > 1 && members[0].context {
                        let mut f = backend.forward(&members[..1], &blocks_of[..1], tau)?;
                        backend.commit(members[0].first_frame + bf);
                        f.extend(backend.forward(&members[1..], &blocks_of[1..], tau)?);
                        report.forward_passes += 2;
                        Ok(f)
                    } else {
                        report.forward_passes += 1;
                        backend.forward(&members, &blocks_of, tau)
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
            })?;
            drop(members);
            noise_ready.extend(generated);
            // Apply the results.
            for (m, v) in planned.iter().zip(flows) {
                match m.role {
                    Role::Context => {
                        backend.commit((m.block + 1) * bf);
                        if let Some(lat) = finals.remove(&m.block) {
                            if keep_latents {
                                for fi in 0..bf {
                                    clean.insert(
                                        m.block * bf + fi,
                                        lat[fi * flen..(fi + 1) * flen].to_vec(),
                                    );
                                }
                                clean.retain(|&f, _| backend.resident(f));
                            }
                        }
                    }
                    Role::Denoise(s) => {
                        let Some(mut x) = state.remove(&m.block) else {
                            return Err(Error::Internal(format!("block {} has no state", m.block)));
                        };
                        if s + 1 < s_count {
                            let sn = self.steps.sigmas[s + 1];
                            let noise = noise_ready.remove(&(m.block, s + 1)).ok_or_else(|| {
                                Error::Internal(format!("no renoise for block {}", m.block))
                            })?;
                            crate::cpu::ops::flow_step(
                                &mut x,
                                &v,
                                self.steps.sigmas[s],
                                Some((sn, &noise)),
                            );
                            state.insert(m.block, x);
                        } else {
                            crate::cpu::ops::flow_step(&mut x, &v, self.steps.sigmas[s], None);
                            // Finite but huge weights or prompts can overflow: bad input, not a bug.
                            if x.iter().any(|v| !v.is_finite()) {
                                return Err(Error::Format(format!(
                                    "block {} produced non-finite latents: the model's weights or the prompt embeddings are out of range (values overflow to inf/NaN)",
                                    m.block
                                )));
                            }
                            if m.block != next_emit {
                                return Err(Error::Internal("blocks finished out of order".into()));
                            }
                            let now = Instant::now();
                            let fb = FinishedBlock {
                                index: m.block,
                                first_frame: m.block * bf,
                                frames: bf,
                                latents: &x,
                                since_start: now - start,
                                block_time: now - last_done,
                                cache_bytes: backend.cache_bytes(),
                            };
                            if next_emit == 0 {
                                report.time_to_first_block = fb.since_start.as_secs_f64();
                            }
                            report.block_seconds.push(fb.block_time.as_secs_f64());
                            last_done = now;
                            next_emit += 1;
                            if !on_block(&fb) {
                                return Err(Error::Cancelled);
                            }
                            if m.block + 1 < blocks {
                                finals.insert(m.block, x);
                            }
                        }
                    }
                }
            }
            report.max_cache_bytes = report.max_cache_bytes.max(backend.cache_bytes());
        }
        report.total_seconds = start.elapsed().as_secs_f64();
        Ok(report)
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
    /// under the prompt of `block`. Returns the number of frames re-run.
    fn recache(
        &self,
        backend: &mut dyn Backend,
        clean: &BTreeMap<usize, Vec<f32>>,
        block: usize,
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
        let prompt = self.prompt_for(block);
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
