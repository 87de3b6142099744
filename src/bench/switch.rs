//! Prompt-switch latency and stall of a live stream (`blockcascade bench --switch`; see
//! docs/streams.md, "Switch latency").
//!
//! A stream runs unpaced with a consumer that takes every block at once, so the blocks'
//! inter-arrival times are the engine's cadence. After `warmup_blocks` blocks, a switcher
//! thread makes `switches` text switches, one after the other: each `gap_blocks` blocks after
//! the first block of the previous one arrived, so the windows do not overlap (the last one
//! repeats the first text: a cached text, no encode). For each switch:
//!
//! - **latency** = from the switch call to the arrival of the first block generated under the
//!   new prompt (the block the switch returns), split into **encode** (call to the prompt
//!   handed to the worker), **wait** (until that block's first denoising step starts) and
//!   **block** (its own generation: its steps, or its lag in a cascade, and the hand-off);
//! - **stall**: the largest gap between two block arrivals from the call to that block,
//!   against the steady gaps (those of blocks outside every switch's window), wall time and
//!   the process's CPU time between the arrivals.

use crate::config::{BackendKind, GenerateOptions, Schedule};
use crate::engine::Engine;
use crate::noise::NoiseSource;
use crate::stream::{Stream, StreamOptions, SwitchReport};
use crate::text::{TextDevice, TextEncoder, Tokenizer, Umt5, Umt5Config};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The text encoder a switch benchmark uses.
#[derive(Clone, Debug)]
pub enum SwitchEncoder {
    /// Random bf16 weights (generated; one layer shared by all layers, as
    /// [`Umt5::bench_bf16`]) of the model's text width `text_dim`, with these attention width,
    /// FFN width, heads and layers, and the byte-level toy tokenizer: an encoder whose cost can
    /// be set against the DiT's block time without files.
    Random {
        /// Attention width (`dim_attn`).
        dim_attn: usize,
        /// FFN width.
        ffn: usize,
        /// Attention heads.
        heads: usize,
        /// Layers.
        layers: usize,
    },
    /// A real umT5 encoder folder (safetensors + `tokenizer.json`).
    Dir(PathBuf),
}

impl Default for SwitchEncoder {
    /// An encoder that costs a few blocks of the tiny model on a CPU (24 layers, FFN 8192).
    fn default() -> Self {
        SwitchEncoder::Random {
            dim_attn: 1024,
            ffn: 8192,
            heads: 8,
            layers: 24,
        }
    }
}

/// Settings of [`run`].
#[derive(Clone, Debug)]
pub struct SwitchBenchOptions {
    /// Built-in model (`tiny`, `medium`, ...).
    pub model: String,
    /// Latent height and width.
    pub latent: (usize, usize),
    /// Cascade lag 1 instead of sequential.
    pub cascade: bool,
    /// Where the DiT runs.
    pub backend: BackendKind,
    /// The encoder.
    pub encoder: SwitchEncoder,
    /// Where the encoder runs.
    pub text_device: TextDevice,
    /// [`StreamOptions::switch_encode_threads`].
    pub encode_threads: Option<usize>,
    /// Switches (the last of them repeats the first text when there are 2 or more).
    pub switches: usize,
    /// Blocks before the first switch.
    pub warmup_blocks: usize,
    /// Blocks from the arrival of a switch's first block to the next switch.
    pub gap_blocks: usize,
}

impl Default for SwitchBenchOptions {
    fn default() -> Self {
        SwitchBenchOptions {
            model: "tiny".into(),
            latent: (8, 12),
            cascade: false,
            backend: BackendKind::Cpu,
            encoder: SwitchEncoder::default(),
            text_device: TextDevice::Cpu,
            encode_threads: Some(0),
            switches: 4,
            warmup_blocks: 8,
            gap_blocks: 16,
        }
    }
}

/// One switch, measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwitchSample {
    /// The text was in the encoder's cache.
    pub cached: bool,
    /// A later switch overtook it (never here: the switches are one after the other).
    pub superseded: bool,
    /// The block it applies from.
    pub applies_from: u64,
    /// The next block to start when the switch was made.
    pub next_start_at_call: u64,
    /// Call to the prompt handed to the worker, ms.
    pub encode_ms: f64,
    /// Handed to the worker to the start of block `applies_from`, ms.
    pub wait_ms: f64,
    /// Start of block `applies_from` to its arrival, ms.
    pub block_ms: f64,
    /// Call to the arrival of block `applies_from`, ms.
    pub latency_ms: f64,
    /// Process CPU time from the call to that arrival, ms.
    pub latency_cpu_ms: f64,
    /// Blocks that arrived during the encode.
    pub blocks_during_encode: usize,
    /// Largest gap between block arrivals from the call to that arrival, ms (wall).
    pub max_gap_ms: f64,
    /// Largest process CPU time between two arrivals in that window, ms.
    pub max_gap_cpu_ms: f64,
}

/// Block inter-arrival times, wall and process CPU.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Gaps {
    /// Gaps counted.
    pub count: usize,
    /// Median wall gap, ms.
    pub p50_ms: f64,
    /// Largest wall gap, ms.
    pub max_ms: f64,
    /// Median CPU time between arrivals, ms.
    pub p50_cpu_ms: f64,
    /// Largest CPU time between arrivals, ms.
    pub max_cpu_ms: f64,
}

impl Gaps {
    fn of(wall: Vec<f64>, cpu: Vec<f64>) -> Gaps {
        Gaps {
            count: wall.len(),
            p50_ms: median(wall.clone()),
            max_ms: wall.iter().copied().fold(0.0, f64::max),
            p50_cpu_ms: median(cpu.clone()),
            max_cpu_ms: cpu.iter().copied().fold(0.0, f64::max),
        }
    }
}

/// What [`run`] measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwitchBenchResult {
    /// Model, latent size, schedule, backend.
    pub setup: String,
    /// The encoder and where it runs.
    pub encoder: String,
    /// Where switch texts were encoded: `pool N` (the stream's own, lower priority) or
    /// `shared` (rayon's global pool, with the DiT).
    pub encode_on: String,
    /// One encode of a fresh text with no stream running, ms (wall) and process CPU ms.
    pub idle_encode_ms: f64,
    /// Process CPU time of that encode, ms.
    pub idle_encode_cpu_ms: f64,
    /// Each switch.
    pub samples: Vec<SwitchSample>,
    /// Gaps between arrivals outside every switch's window.
    pub steady: Gaps,
    /// Gaps between arrivals inside the switches' windows (call to first block under it).
    pub around: Gaps,
    /// rayon's global threads (the DiT's on a CPU).
    pub threads: usize,
    /// The 1-minute load average when the run ended (other processes share the CPU).
    pub load_average: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The 1-minute load average (Linux), to say how busy the machine was.
fn load_average() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Builds the encoder of `o` for a model of text width `text_dim`.
fn encoder(o: &SwitchBenchOptions, text_dim: usize) -> Result<TextEncoder> {
    let enc = match &o.encoder {
        SwitchEncoder::Dir(dir) => TextEncoder::load(dir, None)?,
        &SwitchEncoder::Random {
            dim_attn,
            ffn,
            heads,
            layers,
        } => {
            if heads == 0 || dim_attn % heads != 0 || layers == 0 || ffn == 0 {
                return Err(Error::invalid(format!(
                    "switch benchmark encoder: {heads} heads must divide the attention width \
                     {dim_attn}, and layers ({layers}) and FFN ({ffn}) must be positive"
                )));
            }
            let cfg = Umt5Config {
                vocab: 259,
                dim: text_dim,
                dim_attn,
                ffn,
                heads,
                layers,
                buckets: 32,
            };
            let desc = format!(
                "random umT5 dim {text_dim}, attention {dim_attn}/{heads} heads, ffn {ffn}, \
                 {layers} layers"
            );
            TextEncoder::new(Umt5::bench_bf16(&cfg, cfg.vocab, 11), Tokenizer::Toy, desc)
        }
    };
    enc.on_device(o.text_device)
}

/// A text no earlier switch used (no cache hit), about 60 characters.
fn text(i: usize) -> String {
    format!("switch {i}: a red fox runs through the snow under a pale moon")
}

/// Runs the benchmark (see the module docs).
pub fn run(o: &SwitchBenchOptions) -> Result<SwitchBenchResult> {
    if o.switches == 0 || o.gap_blocks == 0 {
        return Err(Error::invalid(
            "the switch benchmark needs at least 1 switch and 1 block between switches",
        ));
    }
    let engine = Engine::builtin(&o.model)?;
    let cfg = engine.config().clone();
    let enc = Arc::new(encoder(o, cfg.text_dim)?);
    // Warms the encoder up, and gives the initial prompt.
    let prompt = enc.prompt_embeds("the first prompt", &cfg)?;
    let (t, c) = (Instant::now(), cpu_ms());
    enc.prompt_embeds("an encode with no stream running", &cfg)?;
    let (idle_encode_ms, idle_encode_cpu_ms) = (ms(t.elapsed()), cpu_ms() - c);
    let (h, w) = o.latent;
    let opts = GenerateOptions {
        height: h,
        width: w,
        local_attn: Some(6),
        schedule: if o.cascade {
            Schedule::Cascade { lag: 1 }
        } else {
            Schedule::Sequential
        },
        backend: o.backend,
        ..Default::default()
    };
    let setup = format!(
        "{} {h}x{w}, {}, {} backend",
        o.model,
        if o.cascade {
            "cascade lag 1"
        } else {
            "sequential"
        },
        format!("{:?}", o.backend).to_lowercase()
    );
    let mut stream = Stream::open(
        &engine,
        opts,
        NoiseSource::Seeded(0),
        prompt,
        StreamOptions {
            text_encoder: Some(enc.clone()),
            switch_encode_threads: o.encode_threads,
            ..Default::default()
        },
    )?;
    let control = stream.control();
    // The switcher: one switch per trigger, one after the other.
    let (trigger, triggers) = mpsc::channel::<usize>();
    let (done, reports) = mpsc::channel::<(usize, u64, Result<SwitchReport>)>();
    let switcher = {
        let control = control.clone();
        let n = o.switches;
        std::thread::Builder::new()
            .name("bc-bench-switch".into())
            .spawn(move || {
                for i in triggers {
                    let t = if i + 1 == n && n > 1 {
                        text(0)
                    } else {
                        text(i)
                    };
                    let next = control.next_start();
                    let r = control.switch_prompt_text_report(&t);
                    if done.send((i, next, r)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?
    };
    // Arrivals: (instant, process CPU ms), by block index.
    let mut arrivals: Vec<(Instant, f64)> = Vec::new();
    let mut started: Vec<Option<Instant>> = Vec::new();
    let mut got: Vec<Option<(u64, SwitchReport)>> = vec![None; o.switches];
    let limit = o.warmup_blocks + o.switches * (o.gap_blocks + 1000);
    let mut sent = 0;
    // The block whose arrival triggers the next switch (once the previous one has landed).
    let mut next_trigger = Some(o.warmup_blocks.max(1) - 1);
    let outcome = loop {
        let b = match stream.next_block(Some(Duration::from_secs(600))) {
            Ok(Some(b)) => b,
            Ok(None) => break Err(Error::Internal("no block in 10 minutes".into())),
            Err(e) => break Err(e),
        };
        arrivals.push((Instant::now(), cpu_ms()));
        started.push(control.block_started(b.index));
        if next_trigger.is_some_and(|t| b.index as usize >= t) && sent < o.switches {
            let _ = trigger.send(sent);
            sent += 1;
            next_trigger = None;
        }
        for (i, next_at_call, r) in reports.try_iter() {
            match r {
                Ok(r) => {
                    got[i] = Some((next_at_call, r));
                }
                Err(e) => {
                    drop(trigger);
                    let _ = switcher.join();
                    return Err(e);
                }
            }
        }
        // The last switch made has landed: the next one goes `gap_blocks` blocks later.
        if next_trigger.is_none() && sent > 0 {
            if let Some((_, r)) = &got[sent - 1] {
                if (r.applies_from as usize) < arrivals.len() {
                    next_trigger = Some(arrivals.len() - 1 + o.gap_blocks);
                }
            }
        }
        let all = got.iter().all(|g| {
            g.as_ref()
                .is_some_and(|(_, r)| (r.applies_from as usize) < arrivals.len())
        });
        if all {
            break Ok(());
        }
        if arrivals.len() > limit {
            break Err(Error::Internal(format!(
                "the switches did not land within {limit} blocks"
            )));
        }
    };
    stream.cancel();
    drop(trigger);
    let _ = switcher.join();
    drop(stream);
    outcome?;

    let mut samples = Vec::new();
    let mut windows = Vec::new();
    for (next_at_call, r) in got.into_iter().flatten() {
        let b = r.applies_from as usize;
        let (arrived, arrived_cpu) = arrivals[b];
        let start = started[b].unwrap_or(r.posted);
        // Arrivals inside (call, arrival of b]: the window's gaps.
        let first = arrivals.partition_point(|(t, _)| *t <= r.called);
        let during_encode = arrivals[first..]
            .iter()
            .take_while(|(t, _)| *t <= r.posted)
            .count();
        let (mut gap, mut gap_cpu) = (0f64, 0f64);
        for k in first.max(1)..=b {
            gap = gap.max(ms(arrivals[k].0 - arrivals[k - 1].0));
            gap_cpu = gap_cpu.max(arrivals[k].1 - arrivals[k - 1].1);
        }
        // CPU at the call: interpolated from the arrivals around it is not needed; the
        // arrival before the call bounds it from below.
        let cpu_before = first
            .checked_sub(1)
            .map_or(arrivals[0].1, |k| arrivals[k].1);
        windows.push((first.max(1), b));
        samples.push(SwitchSample {
            cached: r.cached,
            superseded: r.superseded,
            applies_from: r.applies_from,
            next_start_at_call: next_at_call,
            encode_ms: ms(r.posted - r.called),
            wait_ms: ms(start.saturating_duration_since(r.posted)),
            block_ms: ms(arrived.saturating_duration_since(start)),
            latency_ms: ms(arrived.saturating_duration_since(r.called)),
            latency_cpu_ms: arrived_cpu - cpu_before,
            blocks_during_encode: during_encode,
            max_gap_ms: gap,
            max_gap_cpu_ms: gap_cpu,
        });
    }
    // Steady: gaps ending at blocks 2.. outside every window (the first blocks warm up).
    let (mut sw, mut sc, mut aw, mut ac) = (vec![], vec![], vec![], vec![]);
    for k in 2..arrivals.len() {
        let wall = ms(arrivals[k].0 - arrivals[k - 1].0);
        let cpu = arrivals[k].1 - arrivals[k - 1].1;
        if windows.iter().any(|&(a, b)| (a..=b).contains(&k)) {
            aw.push(wall);
            ac.push(cpu);
        } else {
            sw.push(wall);
            sc.push(cpu);
        }
    }
    Ok(SwitchBenchResult {
        setup,
        encoder: format!("{} on {}", enc.source(), enc.device().name()),
        encode_on: match o.encode_threads {
            None => "shared".into(),
            Some(0) => "own pool (one thread per core, nice +10)".into(),
            Some(n) => format!("own pool ({n} threads, nice +10)"),
        },
        idle_encode_ms,
        idle_encode_cpu_ms,
        samples,
        steady: Gaps::of(sw, sc),
        around: Gaps::of(aw, ac),
        threads: rayon::current_num_threads(),
        load_average: load_average(),
    })
}

/// Process CPU time so far, ms (0 where unknown).
fn cpu_ms() -> f64 {
    crate::decode::process_cpu_ms().unwrap_or(0.0)
}

/// A text table of a result.
pub fn table(r: &SwitchBenchResult) -> String {
    let mut s = format!(
        "switch latency: {}; encoder {}; encoded on {}; {} DiT threads, load {}\n\
         encode alone (no stream): {:.1} ms, {:.1} CPU ms\n\
         switch  cached  next  applies  encode ms  wait ms  block ms  latency ms (CPU)  blocks in encode  max gap ms (CPU)\n",
        r.setup,
        r.encoder,
        r.encode_on,
        r.threads,
        r.load_average.map_or("?".into(), |l| format!("{l:.1}")),
        r.idle_encode_ms,
        r.idle_encode_cpu_ms,
    );
    for (i, x) in r.samples.iter().enumerate() {
        s.push_str(&format!(
            "{:>6}  {:>6}  {:>4}  {:>7}  {:>9.1}  {:>7.1}  {:>8.1}  {:>8.1} ({:>6.1})  {:>16}  {:>7.1} ({:>6.1})\n",
            i,
            if x.cached { "yes" } else { "no" },
            x.next_start_at_call,
            x.applies_from,
            x.encode_ms,
            x.wait_ms,
            x.block_ms,
            x.latency_ms,
            x.latency_cpu_ms,
            x.blocks_during_encode,
            x.max_gap_ms,
            x.max_gap_cpu_ms,
        ));
    }
    for (name, g) in [("steady", &r.steady), ("around switches", &r.around)] {
        s.push_str(&format!(
            "block gaps {name:<15}: {:>3} gaps, p50 {:>7.1} ms (CPU {:>6.1}), max {:>7.1} ms (CPU {:>6.1})\n",
            g.count, g.p50_ms, g.p50_cpu_ms, g.max_ms, g.max_cpu_ms
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_switch_benchmark_measures_every_switch() {
        let o = SwitchBenchOptions {
            encoder: SwitchEncoder::Random {
                dim_attn: 32,
                ffn: 64,
                heads: 4,
                layers: 1,
            },
            switches: 3,
            warmup_blocks: 2,
            gap_blocks: 2,
            ..Default::default()
        };
        let r = run(&o).expect("bench");
        assert_eq!(r.samples.len(), 3);
        let cached: Vec<bool> = r.samples.iter().map(|s| s.cached).collect();
        assert_eq!(
            cached,
            [false, false, true],
            "the last switch repeats the first text"
        );
        for w in r.samples.windows(2) {
            assert!(w[1].applies_from > w[0].applies_from, "one after the other");
        }
        for s in &r.samples {
            assert!(!s.superseded);
            assert!(s.applies_from >= s.next_start_at_call);
            assert!(s.latency_ms + 1e-9 >= s.encode_ms + s.wait_ms);
        }
        assert!(r.steady.count > 0 && r.around.count > 0);
        let t = table(&r);
        assert!(t.contains("latency") && t.lines().count() >= 7, "{t}");
        let bad = SwitchBenchOptions {
            switches: 0,
            ..o.clone()
        };
        assert!(run(&bad).is_err());
        let bad = SwitchBenchOptions {
            encoder: SwitchEncoder::Random {
                dim_attn: 30,
                ffn: 64,
                heads: 4,
                layers: 1,
            },
            ..o
        };
        assert!(run(&bad).is_err());
    }
}
