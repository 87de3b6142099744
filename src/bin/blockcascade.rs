//! The `blockcascade` command line: `generate`, `plan`, `info`, `bench`.

use blockcascade::bench;
use blockcascade::cascade::Plan;
use blockcascade::config::local_attn_frames;
use blockcascade::config::BackendKind;
use blockcascade::config::KvExchange;
use blockcascade::engine::MemoryEstimate;
use blockcascade::noise::{NoiseSource, RecordedNoise};
use blockcascade::prompt::{load_schedule, PromptEmbeds};
use blockcascade::schedule::{parse_steps, StepSchedule};
use blockcascade::tensorfile::write_f32;
use blockcascade::{
    AttentionMode, Engine, Error, GenerateOptions, Generator, Recache, Result, Schedule,
};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "blockcascade",
    version,
    about = "Block-causal video diffusion inference with Block Cascading"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate video latents (built-in tiny model and seeded noise when no files are given).
    Generate(GenerateArgs),
    /// Print the ticks of a cascade plan.
    Plan(PlanArgs),
    /// Print a model's config, size and memory needs (or the kernel report).
    Info(InfoArgs),
    /// Benchmark the CPU backend (time per forward and per block); JSON on stdout.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ScheduleArg {
    Sequential,
    Cascade,
}
#[derive(Clone, Copy, ValueEnum)]
enum AttentionArg {
    Causal,
    Bidirectional,
}
#[derive(Clone, Copy, ValueEnum)]
enum RecacheArg {
    None,
    Window,
}
#[derive(Clone, Copy, ValueEnum)]
enum ExchangeArg {
    Joint,
    Lagged,
}
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BackendArg {
    Cpu,
    Cuda,
}

/// Sampling settings shared by `generate`, `info` and `bench`.
#[derive(clap::Args, Clone)]
struct SamplingArgs {
    /// Latent height (even, at most 16384). Default: 8 for the built-in model, 60 (480 px)
    /// otherwise.
    #[arg(long)]
    height: Option<usize>,
    /// Latent width (even, at most 16384). Default: 12 for the built-in model, 104 (832 px)
    /// otherwise.
    #[arg(long)]
    width: Option<usize>,
    /// Latent frames per block.
    #[arg(long, default_value_t = 3)]
    block_frames: usize,
    /// Denoising steps (0..1000 scale), comma-separated.
    #[arg(long, default_value = "1000,750,500,250")]
    steps: String,
    /// Flow-matching shift.
    #[arg(long, default_value_t = 5.0)]
    shift: f64,
    /// Local attention window in frames (-1 = global attention).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    local_attn: i64,
    /// Sink frames kept visible with local attention.
    #[arg(long, default_value_t = 0)]
    sink: usize,
    /// sequential (Self-Forcing) or cascade (Block Cascading, see --lag).
    #[arg(long, value_enum, default_value = "sequential")]
    schedule: ScheduleArg,
    /// Cascade lag: steps a block completes before the next starts (1..=steps).
    #[arg(long)]
    lag: Option<usize>,
    /// Visibility among denoising members of a cascade window.
    #[arg(long, value_enum, default_value = "causal")]
    attention: AttentionArg,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory (Wan config.json + safetensors). Default: the built-in tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt embeddings (safetensors, tensor `prompt_embeds` [L, text_dim]). Default: built-in.
    #[arg(long)]
    prompt_embeds: Option<PathBuf>,
    /// Prompt schedule: JSON list of {"block": n, "prompt_embeds": "file.safetensors"}.
    #[arg(long)]
    prompt_schedule: Option<PathBuf>,
    /// Cache behaviour at prompt switches: none (cascade) or window (LongLive recache).
    #[arg(long, value_enum, default_value = "none")]
    recache: RecacheArg,
    /// Recorded noise (safetensors: `noise` [F,16,H,W], `renoise` [F,S-1,16,H,W]).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Seed of the built-in noise generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Latent frames to generate (a multiple of --block-frames).
    #[arg(long, default_value_t = 21)]
    frames: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Run the context pass as its own forward (the literal Self-Forcing loop).
    #[arg(long)]
    separate_context_pass: bool,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Devices: a count N (CPU: N worker threads) or comma-separated indices (one device each).
    #[arg(long, default_value = "0")]
    devices: String,
    /// How devices share K/V: joint (every layer, exact) or lagged (once per tick).
    #[arg(long, value_enum, default_value = "joint")]
    kv_exchange: ExchangeArg,
    /// CUDA: launch kernels one by one instead of replaying captured CUDA graphs (debugging).
    #[arg(long)]
    no_graphs: bool,
    /// Worker threads, 1..=4096 (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Output file (safetensors with `latents` [F,16,H,W] f32).
    #[arg(long, default_value = "latents.safetensors")]
    out: PathBuf,
    /// Print a run report (forwards, tokens per tick, per-block times) to stderr.
    #[arg(long)]
    report: bool,
    /// With --report: also run the sequential schedule and print the latents' relative difference.
    #[arg(long, requires = "report")]
    compare_sequential: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Blocks.
    #[arg(long, default_value_t = 7)]
    blocks: usize,
    /// Lag (default: the number of steps, i.e. sequential).
    #[arg(long)]
    lag: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value = "1000,750,500,250")]
    steps: String,
    /// Shift.
    #[arg(long, default_value_t = 5.0)]
    shift: f64,
}

#[derive(clap::Args)]
struct InfoArgs {
    /// Model directory (default: the built-in tiny model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Built-in model name instead of a directory (tiny, medium, wan-1.3b-shape).
    #[arg(long, conflicts_with = "model")]
    builtin: Option<String>,
    /// Frames for the memory estimate.
    #[arg(long, default_value_t = 21)]
    frames: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print the CUDA kernel report (registers, shared memory, spills) instead.
    #[arg(long)]
    kernels: bool,
    /// List the CUDA devices (name, memory, compute capability) and peer access between them
    /// instead.
    #[arg(long)]
    devices: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Built-in models to benchmark (comma-separated: tiny, medium, wan-1.3b-shape).
    #[arg(long, default_value = "tiny,medium")]
    models: String,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also time lag S..1 (cascade) per block.
    #[arg(long)]
    cascade: bool,
    /// Instead of timing the CPU: predict FPS for 1..8 GPUs, every lag, NVLink and PCIe, for the
    /// Wan-1.3B and 14B shapes (see src/scaling.rs for the model).
    #[arg(long)]
    model_scaling: bool,
    /// Scaling model: dense bf16 TFLOP/s of one device.
    #[arg(long, default_value_t = 800.0)]
    tflops: f64,
    /// Scaling model: fraction of peak reached (overridden by --measured-ms-per-block).
    #[arg(long, default_value_t = 0.6)]
    mfu: f64,
    /// Scaling model: a measured single-device sequential ms/block for Wan-1.3B (7 blocks of
    /// 60x104, global attention) to calibrate the efficiency from.
    #[arg(long)]
    measured_ms_per_block: Option<f64>,
    /// Scaling model: NVLink bandwidth per GPU, GB/s.
    #[arg(long, default_value_t = 450.0)]
    nvlink_gbs: f64,
    /// Scaling model: PCIe bandwidth per GPU, GB/s.
    #[arg(long, default_value_t = 25.0)]
    pcie_gbs: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Plan(a) => plan(a),
        Cmd::Info(a) => info(a),
        Cmd::Bench(a) => bench_cmd(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options(s: &SamplingArgs, builtin: bool) -> Result<GenerateOptions> {
    let steps = parse_steps(&s.steps)?;
    let local_attn = local_attn_frames(s.local_attn)?;
    let schedule = match (s.schedule, s.lag) {
        (ScheduleArg::Sequential, None) => Schedule::Sequential,
        (ScheduleArg::Sequential, Some(_)) => {
            return Err(Error::invalid("--lag needs --schedule cascade"));
        }
        (ScheduleArg::Cascade, lag) => Schedule::Cascade {
            lag: lag.unwrap_or(1),
        },
    };
    let (dh, dw) = if builtin { (8, 12) } else { (60, 104) };
    let o = GenerateOptions {
        height: s.height.unwrap_or(dh),
        width: s.width.unwrap_or(dw),
        block_frames: s.block_frames,
        steps,
        shift: s.shift,
        local_attn,
        sink: s.sink,
        schedule,
        attention: match s.attention {
            AttentionArg::Causal => AttentionMode::Causal,
            AttentionArg::Bidirectional => AttentionMode::Bidirectional,
        },
        ..Default::default()
    };
    o.validate(None)?;
    Ok(o)
}

/// Most worker threads `--threads` accepts.
const MAX_THREADS: usize = 4096;

/// Checks, before any work, that `--out` can be written: not a directory, in an existing
/// folder where a file can be created (probed with the temporary name `write_f32` uses).
fn check_out(out: &std::path::Path) -> Result<()> {
    let not = |msg: &str| {
        Error::io(
            out,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.to_string()),
        )
    };
    if out.is_dir() {
        return Err(not(
            "--out is a directory; give a file name such as latents.safetensors",
        ));
    }
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| not("--out has no file name"))?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the folder {} of --out does not exist", dir.display()),
            ),
        ));
    }
    let probe = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| Error::io(&probe, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (devices, device_list) = parse_devices(&a.devices)?;
    check_out(&a.out)?;
    if let Some(t) = a.threads {
        if t == 0 || t > MAX_THREADS {
            return Err(Error::invalid(format!(
                "--threads must be in 1..={MAX_THREADS}, got {t}"
            )));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| Error::Internal(e.to_string()))?;
    }
    let mut opts = options(&a.sampling, a.model.is_none())?;
    opts.separate_context_pass = a.separate_context_pass;
    opts.graphs = !a.no_graphs;
    opts.devices = devices;
    opts.backend = match a.backend {
        BackendArg::Cpu => BackendKind::Cpu,
        BackendArg::Cuda => BackendKind::Cuda,
    };
    if let (BackendKind::Cuda, Some(list)) = (opts.backend, device_list) {
        // `--devices 0,0`: the CUDA ordinal of every logical device.
        opts.device_ids = list;
    }
    opts.kv_exchange = match a.kv_exchange {
        ExchangeArg::Joint => KvExchange::Joint,
        ExchangeArg::Lagged => KvExchange::Lagged,
    };
    opts.recache = match a.recache {
        RecacheArg::None => Recache::None,
        RecacheArg::Window => Recache::Window,
    };
    opts.validate(Some(a.frames))?;
    let blocks = a.frames / opts.block_frames;
    // All latents are kept until they are written: they must fit in memory.
    let out_bytes = [a.frames, 16, opts.height, opts.width, 4]
        .iter()
        .fold(1usize, |p, &d| p.saturating_mul(d));
    blockcascade::host_memory::ensure(out_bytes, || {
        format!("the output latents of {} frames", a.frames)
    })?;
    // Check every input before loading the model's weights.
    let noise = match &a.noise {
        Some(p) => NoiseSource::Recorded(RecordedNoise::load(
            p,
            a.frames,
            16,
            opts.height,
            opts.width,
            opts.steps.len(),
        )?),
        None => NoiseSource::Seeded(a.seed),
    };
    let engine = Engine::open(a.model.as_deref())?;
    let cfg = engine.config().clone();
    let prompt = match &a.prompt_embeds {
        Some(p) => PromptEmbeds::load(p, &cfg)?,
        None => PromptEmbeds::builtin(&cfg, 0),
    };
    let switches = match &a.prompt_schedule {
        Some(p) => load_schedule(p, &cfg, opts.block_frames)?,
        None => Vec::new(),
    };
    let mut gen = Generator::new(engine.model(), opts.clone(), noise.clone(), &prompt)?;
    gen.set_prompt_schedule(&switches)?;
    let progress = !a.quiet;
    let tty = std::io::stderr().is_terminal();
    let mut latents = Vec::new();
    let report = gen.run(blocks, |b| {
        latents.extend_from_slice(b.latents);
        if progress {
            let done = b.index + 1;
            let secs = b.since_start.as_secs_f64().max(1e-9);
            let rate = done as f64 / secs;
            let eta = (blocks - done) as f64 / rate;
            let width = 24;
            let filled = done * width / blocks;
            let line = format!(
                "[{}{}] {done}/{blocks} blocks  {rate:.2} blocks/s  block {:.3}s  ETA {eta:.1}s",
                "#".repeat(filled),
                " ".repeat(width - filled),
                b.block_time.as_secs_f64()
            );
            if tty {
                eprint!("\r{line}");
                if done == blocks {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
        }
        true
    })?;
    let mut meta = BTreeMap::new();
    meta.insert("blockcascade_version".into(), blockcascade::VERSION.into());
    meta.insert("model".into(), engine.source().into());
    meta.insert("frames".into(), a.frames.to_string());
    meta.insert(
        "seed".into(),
        if a.noise.is_some() {
            "recorded".into()
        } else {
            a.seed.to_string()
        },
    );
    meta.insert(
        "options".into(),
        serde_json::to_string(&opts).map_err(|e| Error::Internal(e.to_string()))?,
    );
    let shape = vec![a.frames, 16, opts.height, opts.width];
    write_f32(&a.out, &[("latents", shape, &latents)], &meta)?;
    if progress {
        eprintln!(
            "wrote {} ({} frames, {:.2}s, {:.2} blocks/s)",
            a.out.display(),
            a.frames,
            report.total_seconds,
            blocks as f64 / report.total_seconds.max(1e-9)
        );
    }
    if a.report {
        eprintln!(
            "report: {}",
            serde_json::to_string(&report).map_err(|e| Error::Internal(e.to_string()))?
        );
        if a.compare_sequential {
            let mut so = opts.clone();
            so.schedule = Schedule::Sequential;
            let mut sg = Generator::new(engine.model(), so, noise, &prompt)?;
            sg.set_prompt_schedule(&switches)?;
            let (seq, _) = sg.generate(blocks)?;
            eprintln!(
                "relative L2 vs sequential: {:.3e}",
                blockcascade::bench::rel_l2(&seq, &latents)
            );
        }
    }
    Ok(())
}

/// `--devices`: `N` (a count; `0` means the single device 0) or a list `0,1,2` (one each).
fn parse_devices(s: &str) -> Result<(usize, Option<Vec<usize>>)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let bad = || {
        Error::invalid(format!(
            "malformed --devices `{s}`: expected a count or a list of indices"
        ))
    };
    let nums: Vec<usize> = parts
        .iter()
        .map(|p| p.parse::<usize>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    match nums.as_slice() {
        [n] => Ok(((*n).max(1), None)),
        list => Ok((list.len(), Some(list.to_vec()))),
    }
}

/// Most ticks `plan` prints.
const MAX_PLAN_TICKS: usize = 100_000;

fn plan(a: PlanArgs) -> Result<()> {
    let steps = StepSchedule::new(&parse_steps(&a.steps)?, a.shift)?;
    if a.blocks == 0 {
        return Err(Error::invalid("--blocks must be at least 1"));
    }
    let p = Plan::new(a.blocks, steps.len(), a.lag.unwrap_or(steps.len()))?;
    if p.ticks() > MAX_PLAN_TICKS {
        return Err(Error::invalid(format!(
            "the plan has {} ticks; at most {MAX_PLAN_TICKS} are printed (fewer --blocks)",
            p.ticks()
        )));
    }
    print!("{}", p.table(&steps.timesteps));
    Ok(())
}

/// `info --devices`: CUDA devices, peer access and the link between each pair.
fn info_devices() -> Result<()> {
    print!("{}", blockcascade::backend::cuda::info::devices_report()?);
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    if a.kernels {
        println!("{}", blockcascade::kernels::report());
        if blockcascade::kernels::built() {
            // ptxas counts static shared memory only.
            for k in blockcascade::kernels::Kernel::ALL {
                let b = k.dynamic_smem_bytes();
                if b > 0 {
                    println!("{}: plus {b} bytes of dynamic shared memory", k.name());
                }
            }
        }
        return Ok(());
    }
    if a.devices {
        return info_devices();
    }
    let engine = match (&a.model, &a.builtin) {
        (_, Some(b)) => Engine::builtin(b)?,
        (m, None) => Engine::open(m.as_deref())?,
    };
    let cfg = engine.config();
    let opts = options(&a.sampling, a.model.is_none())?;
    opts.validate(Some(a.frames))?;
    let mem = MemoryEstimate::new(cfg, &opts, a.frames);
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!("model:        {}", engine.source());
    println!(
        "config:       dim {} ffn {} heads {} (head_dim {}) layers {} freq_dim {} text {}x{} eps {}",
        cfg.dim,
        cfg.ffn_dim,
        cfg.num_heads,
        cfg.head_dim(),
        cfg.num_layers,
        cfg.freq_dim,
        cfg.text_len,
        cfg.text_dim,
        cfg.eps
    );
    println!(
        "parameters:   {} ({:.3} B)",
        cfg.parameter_count(),
        cfg.parameter_count() as f64 / 1e9
    );
    println!(
        "weight dtype: {} on disk, f32 on the CPU backend",
        engine.model().weights.source_dtype.name()
    );
    println!(
        "memory for {} frames of {}x{} latents ({} tokens/frame), lag {}: weights {:.3} GiB + KV cache {:.3} GiB + activations {:.3} GiB = {:.3} GiB",
        a.frames,
        opts.height,
        opts.width,
        (opts.height / 2) * (opts.width / 2),
        opts.lag(),
        gib(mem.weights),
        gib(mem.kv_cache),
        gib(mem.activations),
        gib(mem.total())
    );
    Ok(())
}

fn scaling_cmd(a: &BenchArgs) -> Result<()> {
    use blockcascade::scaling::{predict, predict_with, Hardware, Overlap, Workload};
    use blockcascade::weights::builtin_config;
    let w = Workload {
        tokens_per_frame: 1560,
        block_frames: 3,
        blocks: 7,
        steps: 4,
        local_attn: None,
    };
    let mut mfu = a.mfu;
    for (name, v) in [
        ("--tflops", a.tflops),
        ("--mfu", a.mfu),
        ("--nvlink-gbs", a.nvlink_gbs),
        ("--pcie-gbs", a.pcie_gbs),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::invalid(format!("{name} must be positive, got {v}")));
        }
    }
    if let Some(ms) = a.measured_ms_per_block {
        if !(ms.is_finite() && ms > 0.0) {
            return Err(Error::invalid(format!(
                "--measured-ms-per-block must be positive, got {ms}"
            )));
        }
        let ideal = Hardware {
            tflops: a.tflops,
            mfu: 1.0,
            link_gbs: 1.0,
            link_latency_us: 0.0,
        };
        let p = predict(
            &builtin_config("wan-1.3b-shape")?,
            &w,
            &ideal,
            1,
            4,
            KvExchange::Joint,
        );
        mfu = p.ms_per_block / ms;
        eprintln!(
            "calibrated efficiency from {ms} ms/block: {:.1}% of {} TFLOP/s",
            mfu * 100.0,
            a.tflops
        );
    }
    let mut rows = Vec::new();
    println!("model      link    xch     devices  lag  ms/block     FPS  comm%");
    for model in ["wan-1.3b-shape", "wan-14b-shape"] {
        let c = builtin_config(model)?;
        for (link, gbs) in [("nvlink", a.nvlink_gbs), ("pcie", a.pcie_gbs)] {
            let hw = Hardware {
                tflops: a.tflops,
                mfu,
                link_gbs: gbs,
                link_latency_us: 10.0,
            };
            // joint: overlapped with compute (copy stream, double-buffered K/V, the CUDA
            // backend's default); serial: joint with every layer waiting for its exchange.
            for (name, xch, overlap) in [
                ("joint", KvExchange::Joint, Overlap::CopyStream),
                ("serial", KvExchange::Joint, Overlap::None),
                ("lagged", KvExchange::Lagged, Overlap::None),
            ] {
                for devices in 1..=8 {
                    if devices == 1 && name != "joint" {
                        continue;
                    }
                    for lag in (1..=w.steps).rev() {
                        let p = predict_with(&c, &w, &hw, devices, lag, xch, overlap);
                        println!(
                            "{:<10} {link:<7} {name:<7} {devices:>7} {lag:>4} {:>9.1} {:>7.1} {:>5.1}",
                            model.trim_end_matches("-shape"),
                            p.ms_per_block,
                            p.fps,
                            p.comm_share * 100.0
                        );
                        rows.push(serde_json::json!({"model": model, "link": link, "exchange": name, "prediction": p}));
                    }
                }
            }
        }
    }
    eprintln!(
        "{}",
        serde_json::to_string(&rows).map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.model_scaling {
        return scaling_cmd(&a);
    }
    let models: Vec<&str> = a.models.split(',').map(str::trim).collect();
    let results = bench::run_cpu(&models, a.reps.max(1), a.cascade)?;
    eprint!("{}", bench::table(&results));
    println!(
        "{}",
        serde_json::to_string_pretty(&results).map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}
