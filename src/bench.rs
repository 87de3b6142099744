//! CPU benchmarks shared by `blockcascade bench` and `benches/cpu.rs`: time per forward and
//! per block on the built-in models, optionally for every cascade lag; [`switch`]: prompt-switch
//! latency in a live stream.

pub mod switch;

use crate::config::{GenerateOptions, Schedule};
use crate::engine::Engine;
use crate::executor::Generator;
use crate::kv_cache::KvCache;
use crate::model::{Member, CHANNELS};
use crate::noise::NoiseSource;
use crate::prompt::PromptEmbeds;
use crate::Result;
use std::time::Instant;

/// One measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    /// Built-in model name.
    pub model: String,
    /// Latent height × width.
    pub latent: [usize; 2],
    /// Frames generated.
    pub frames: usize,
    /// Lag (S = sequential).
    pub lag: usize,
    /// Median milliseconds of one single-block forward (empty cache).
    pub ms_per_forward: f64,
    /// Median milliseconds per block of a whole generation.
    pub ms_per_block: f64,
    /// Forward passes per generation.
    pub forwards: usize,
    /// rayon threads.
    pub threads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Shapes used per built-in model: (height, width, frames).
pub fn shapes(model: &str) -> (usize, usize, usize) {
    match model {
        "tiny" => (8, 12, 9),
        "medium" => (16, 16, 9),
        _ => (60, 104, 21),
    }
}

/// Runs the benchmarks; `cascade` adds lag S-1..1.
pub fn run_cpu(models: &[&str], reps: usize, cascade: bool) -> Result<Vec<BenchResult>> {
    let mut out = Vec::new();
    for &name in models {
        let engine = Engine::builtin(name)?;
        let model = engine.model();
        let cfg = model.config();
        let (h, w, frames) = shapes(name);
        let base = GenerateOptions {
            height: h,
            width: w,
            ..Default::default()
        };
        let prompt = PromptEmbeds::builtin(cfg, 0);
        let ctx = model.prompt_context(&prompt.data, prompt.rows)?;
        // The K/V are computed on first use: here, outside the timed forwards.
        ctx.kv(model)?;
        let lat: Vec<f32> = {
            let mut v = vec![0f32; base.block_frames * CHANNELS * h * w];
            NoiseSource::Seeded(1).fill(0, 0, &mut v)?;
            v
        };
        let mut fwd = Vec::new();
        for _ in 0..reps {
            let mut cache = KvCache::new(cfg.num_layers, (h / 2) * (w / 2) * cfg.dim, None, 0)?;
            let m = Member {
                first_frame: 0,
                latents: &lat,
                timestep: 1000.0,
                context: false,
                prompt: &ctx,
            };
            let t = Instant::now();
            model.forward(&[m], &mut cache, base.attention, h, w)?;
            fwd.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let s = base.steps.len();
        let lags: Vec<usize> = if cascade {
            (1..=s).rev().collect()
        } else {
            vec![s]
        };
        for lag in lags {
            let mut o = base.clone();
            o.schedule = if lag == s {
                Schedule::Sequential
            } else {
                Schedule::Cascade { lag }
            };
            let gen = Generator::new(model, o.clone(), NoiseSource::Seeded(0), &prompt)?;
            let mut per_block = Vec::new();
            let mut forwards = 0;
            for _ in 0..reps {
                let (_, r) = gen.generate(frames / o.block_frames)?;
                per_block.push(r.total_seconds * 1e3 / (frames / o.block_frames) as f64);
                forwards = r.forward_passes;
            }
            out.push(BenchResult {
                model: name.to_string(),
                latent: [h, w],
                frames,
                lag,
                ms_per_forward: median(fwd.clone()),
                ms_per_block: median(per_block),
                forwards,
                threads: rayon::current_num_threads(),
            });
        }
    }
    Ok(out)
}

/// A text table of results.
pub fn table(results: &[BenchResult]) -> String {
    let mut s = String::from(
        "model           latent   frames  lag  forwards  ms/forward  ms/block  threads\n",
    );
    for r in results {
        s.push_str(&format!(
            "{:<15} {:>3}x{:<4} {:>6} {:>4} {:>9} {:>11.2} {:>9.2} {:>8}\n",
            r.model,
            r.latent[0],
            r.latent[1],
            r.frames,
            r.lag,
            r.forwards,
            r.ms_per_forward,
            r.ms_per_block,
            r.threads
        ));
    }
    s
}

/// Relative L2 distance of `a` from `e` (infinite when lengths differ or `a` is not finite).
pub fn rel_l2(e: &[f32], a: &[f32]) -> f64 {
    if e.len() != a.len() || a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = e
        .iter()
        .zip(a)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = e.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
