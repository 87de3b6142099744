//! The `blockcascade` command line: `generate`, `plan`, `info`, `bench`, `decode`,
//! `encode-prompt`, `tune`, `serve`.

use blockcascade::bench;
use blockcascade::cascade::Plan;
use blockcascade::config::local_attn_frames;
use blockcascade::config::BackendKind;
use blockcascade::config::KvExchange;
use blockcascade::decode::{
    BackgroundDecoder, DecodeDevice, Decoder, DecoderKind, LatentsFile, PixelOutputs,
};
use blockcascade::engine::MemoryEstimate;
use blockcascade::noise::{NoiseSource, RecordedNoise};
use blockcascade::prompt::{load_schedule_with_text, PromptEmbeds};
use blockcascade::schedule::{parse_steps, StepSchedule};
use blockcascade::tensorfile::{write_f32, write_tensors, OutData};
use blockcascade::text::{TextDevice, TextEncoder, TextPrecision, DEFAULT_TEXT_LEN};
use blockcascade::video::{VideoOptions, VideoWriter};
use blockcascade::{
    AttentionMode, Engine, Error, GenerateOptions, Generator, Recache, Result, Schedule,
};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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
    Generate(Box<GenerateArgs>),
    /// Print the ticks of a cascade plan.
    Plan(PlanArgs),
    /// Print a model's config, size and memory needs (or the kernel report).
    Info(InfoArgs),
    /// Benchmark the CPU backend (time per forward and per block); JSON on stdout.
    Bench(BenchArgs),
    /// Decode latents to pixels (Wan2.1 VAE or TAEHV) and write a video.
    Decode(DecodeArgs),
    /// Encode a text prompt with the umT5 text encoder to prompt embeddings.
    EncodePrompt(EncodePromptArgs),
    /// Measure the Hopper kernel variants on a GPU (each in its own child process) and write
    /// the fastest correct ones to the tuning file the CUDA backend and decoder apply.
    Tune(TuneArgs),
    /// Serve live streams to a browser page and WebSocket clients (see docs/server.md).
    ///
    /// Streams need local attention (bounded memory): without --local-attn (or with -1) they
    /// get a window of 12 frames with a sink of 3.
    #[cfg(feature = "serve")]
    Serve(Box<ServeArgs>),
}

#[cfg(feature = "serve")]
#[derive(clap::Args)]
struct ServeArgs {
    /// Model directory (Wan config.json + safetensors); needs --vae and --text-encoder.
    /// Default: the built-in tiny model, decoder and text encoder (noise-like pictures).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Decoder weights: the Wan2.1 VAE or TAEHV (safetensors file, or a folder holding one).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// umT5 text encoder (a folder of safetensors, or one file).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// The umT5 tokenizer.json (default: in the text encoder's folder or its tokenizer/).
    #[arg(long, requires = "text_encoder")]
    tokenizer: Option<PathBuf>,
    /// Where the text encoder runs (default: where --backend runs).
    #[arg(long, value_enum)]
    text_encoder_device: Option<BackendArg>,
    /// Arithmetic of the text encoder on the CPU: exact (f32, the reference) or bf16 (bf16
    /// activations as upstream's bf16 module, faster, ~1e-2 from exact). The CUDA encoder has
    /// its own (bf16 GEMM operands).
    #[arg(long, value_enum, default_value = "exact")]
    text_encoder_precision: PrecisionArg,
    /// Where the frames are decoded (default: where --backend runs; cpu keeps the GPU's
    /// memory for the DiT).
    #[arg(long, value_enum)]
    decoder_device: Option<BackendArg>,
    /// Address to listen on. Anything but loopback exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Streams that may run at once; one more gets `busy`.
    #[arg(long, default_value_t = 2)]
    max_streams: usize,
    /// Pixel frames per second every stream is paced to (0: as fast as they are made).
    #[arg(long, default_value_t = 16.0)]
    fps: f64,
    /// Finished blocks a stream may hold ahead of a slow client.
    #[arg(long, default_value_t = 2)]
    queue_blocks: usize,
    /// JPEG quality of the frames, 1..=100.
    #[arg(long, default_value_t = 85)]
    jpeg_quality: u8,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Cache behaviour at prompt switches: none (cascade) or window (LongLive recache).
    #[arg(long, value_enum, default_value = "none")]
    recache: RecacheArg,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum DecoderArg {
    Wan,
    Taehv,
}

impl From<DecoderArg> for DecoderKind {
    fn from(d: DecoderArg) -> Self {
        match d {
            DecoderArg::Wan => DecoderKind::WanVae,
            DecoderArg::Taehv => DecoderKind::Taehv,
        }
    }
}

/// Decoder and video settings shared by `generate` and `decode`.
#[derive(clap::Args, Clone)]
struct VideoArgs {
    /// Decoder weights: the Wan2.1 VAE or TAEHV (safetensors file, or a folder holding one).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Force the decoder kind instead of detecting it from the tensor names.
    #[arg(long, value_enum)]
    decoder: Option<DecoderArg>,
    /// Frames per second of .mp4 / .y4m output.
    #[arg(long, default_value_t = 16.0)]
    fps: f64,
}

impl VideoArgs {
    /// The decoder `--vae` names; without it, the built-in tiny random TAEHV-shaped decoder
    /// when `builtin_ok` (its pixels are noise-like), else an error.
    fn decoder(&self, builtin_ok: bool) -> Result<Arc<Decoder>> {
        match &self.vae {
            Some(p) => Ok(Arc::new(Decoder::load(p, self.decoder.map(Into::into))?)),
            None if builtin_ok => match self.decoder {
                Some(DecoderArg::Wan) => Err(Error::invalid(
                    "--decoder wan needs --vae (there is no built-in Wan VAE)",
                )),
                _ => Ok(Arc::new(Decoder::tiny_taehv(0))),
            },
            None => Err(Error::invalid("--vae is required")),
        }
    }

    fn options(&self) -> VideoOptions {
        VideoOptions {
            fps: self.fps,
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
struct DecodeArgs {
    #[command(flatten)]
    video: VideoArgs,
    /// Latents (safetensors, tensor `latents` [F,16,H,W], as `generate --out` writes).
    #[arg(long)]
    latents: PathBuf,
    /// Output: .mp4 (H.264), .y4m, .safetensors (tensor `video` f32 [T,3,H,W], exact), a
    /// folder ending in / or a name%04d.png pattern (PNG frames).
    #[arg(long)]
    out: PathBuf,
    /// Latent frames decoded per step (the stream's block size; the result does not depend on it).
    #[arg(long, default_value_t = 3)]
    block_frames: usize,
    /// Where to decode: the CPU (f32, exact) or a CUDA device (bf16 kernels, only the pixels
    /// cross back; `BC_CUDA_EMULATE=1`: the emulated device).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::Args)]
struct EncodePromptArgs {
    /// Text encoder: a folder of umT5 safetensors (Wan or Hugging Face names), or one file.
    #[arg(long)]
    text_encoder: PathBuf,
    /// The umT5 tokenizer.json (default: in the encoder's folder or its tokenizer/ subfolder).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Most tokens, `</s>` included (default: the --model's text_len, else 512).
    #[arg(long)]
    text_len: Option<usize>,
    /// A DiT model directory: its text_len is the default and its text_dim is checked.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output safetensors: `prompt_embeds` [L, dim] f32 and `input_ids` [L] i64.
    #[arg(long, default_value = "prompt_embeds.safetensors")]
    out: PathBuf,
    /// Where the encoder runs (cuda: bf16 weights on the GPU of BC_CUDA_DEVICE, default 0).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Overrides --backend for the text encoder.
    #[arg(long, value_enum)]
    text_encoder_device: Option<BackendArg>,
    /// Arithmetic of the text encoder on the CPU: exact (f32, the reference) or bf16 (bf16
    /// activations as upstream's bf16 module, faster, ~1e-2 from exact). The CUDA encoder has
    /// its own (bf16 GEMM operands).
    #[arg(long, value_enum, default_value = "exact")]
    text_encoder_precision: PrecisionArg,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum PrecisionArg {
    Exact,
    Bf16,
}
impl From<PrecisionArg> for TextPrecision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Exact => TextPrecision::Exact,
            PrecisionArg::Bf16 => TextPrecision::Bf16,
        }
    }
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
impl From<RecacheArg> for Recache {
    fn from(r: RecacheArg) -> Self {
        match r {
            RecacheArg::None => Recache::None,
            RecacheArg::Window => Recache::Window,
        }
    }
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
impl From<BackendArg> for BackendKind {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::Cuda => BackendKind::Cuda,
        }
    }
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
    /// Prompt schedule: JSON list of {"block": n, "prompt_embeds": "file.safetensors"} or
    /// {"block": n, "prompt": "text"}.
    #[arg(long)]
    prompt_schedule: Option<PathBuf>,
    /// Text prompt, encoded by --text-encoder (the built-in model has a built-in encoder).
    #[arg(long, conflicts_with = "prompt_embeds")]
    prompt: Option<String>,
    /// umT5 text encoder for --prompt and text entries of --prompt-schedule (a folder of
    /// safetensors, or one file).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// The umT5 tokenizer.json (default: in the text encoder's folder or its tokenizer/).
    #[arg(long, requires = "text_encoder")]
    tokenizer: Option<PathBuf>,
    /// Where the text encoder runs (default: where --backend runs; cpu keeps the GPU's memory
    /// for the DiT).
    #[arg(long, value_enum)]
    text_encoder_device: Option<BackendArg>,
    /// Arithmetic of the text encoder on the CPU: exact (f32, the reference) or bf16 (bf16
    /// activations as upstream's bf16 module, faster, ~1e-2 from exact). The CUDA encoder has
    /// its own (bf16 GEMM operands).
    #[arg(long, value_enum, default_value = "exact")]
    text_encoder_precision: PrecisionArg,
    /// Where --video is decoded (default: where --backend runs, on the DiT's first GPU with
    /// cuda; cpu keeps the GPU's memory for the DiT).
    #[arg(long, value_enum)]
    decoder_device: Option<BackendArg>,
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
    /// Devices: a count N (CPU: N worker threads) or comma-separated indices (one device each;
    /// on the CPU only 0,1,...,N-1, which means N).
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
    /// Also decode each block as it finishes and write a video (.mp4, .y4m, .safetensors,
    /// PNG folder or pattern). Without --vae a built-in tiny random decoder is used (noise-like
    /// pixels: it only shows the path works).
    #[arg(long)]
    video: Option<PathBuf>,
    #[command(flatten)]
    video_opts: VideoArgs,
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
    /// Instead of the DiT: time both decoders (Wan VAE, TAEHV) at real widths with random
    /// weights, ms per block of 3 latent frames at 60x104 latents (480x832 pixels), on the CPU.
    #[arg(long)]
    decode: bool,
    /// With --decode: blocks to decode per decoder (the first block is reported apart).
    #[arg(long, default_value_t = 3)]
    decode_blocks: usize,
    /// Instead: time the umT5-XXL text encoder on the CPU for a --text-tokens prompt (random
    /// bf16 weights, generated: one layer shared by the 24).
    #[arg(long)]
    text_encoder: bool,
    /// Tokens of the --text-encoder benchmark prompt.
    #[arg(long, default_value_t = 30)]
    text_tokens: usize,
    /// Where --text-encoder runs (cuda: the 24 layers uploaded in bf16, 9.3 GB of GPU memory).
    #[arg(long, value_enum, default_value = "cpu")]
    text_encoder_device: BackendArg,
    /// Arithmetic of --text-encoder on the CPU: exact or bf16.
    #[arg(long, value_enum, default_value = "exact")]
    text_encoder_precision: PrecisionArg,
    /// Instead: prompt-switch latency and block stall in a live stream (--switches text switches
    /// during an unpaced stream; docs/streams.md). The encoder runs on --text-encoder-device;
    /// --cascade uses lag 1.
    #[arg(long)]
    switch: bool,
    /// With --switch: the built-in model.
    #[arg(long, default_value = "tiny")]
    switch_model: String,
    /// With --switch: the DiT's backend.
    #[arg(long, value_enum, default_value = "cpu")]
    switch_backend: BackendArg,
    /// With --switch: a real umT5 encoder folder instead of a random one of the model's width.
    #[arg(long, value_name = "DIR")]
    switch_encoder_dir: Option<PathBuf>,
    /// With --switch: layers of the random encoder.
    #[arg(long, default_value_t = 24)]
    switch_encoder_layers: usize,
    /// With --switch: FFN width of the random encoder.
    #[arg(long, default_value_t = 8192)]
    switch_encoder_ffn: usize,
    /// With --switch: switches (the last repeats the first text: a cached one).
    #[arg(long, default_value_t = 4)]
    switches: usize,
    /// With --switch: blocks between switches.
    #[arg(long, default_value_t = 16)]
    switch_gap_blocks: usize,
    /// With --switch: where switch texts are encoded: a number of threads of the stream's own
    /// lower-priority pool (0: one per core, the default), or `shared` (rayon's global pool,
    /// with a CPU DiT).
    #[arg(long, default_value = "0")]
    switch_encode_threads: String,
}

#[derive(clap::Args)]
struct TuneArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Model directory (or its config.json) whose heads set the attention shape (default:
    /// Wan-1.3B, 12 x 128).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The tuning file to write (default: $BC_TUNING_FILE, else
    /// $XDG_CACHE_HOME/blockcascade/tuning.json, else ~/.cache/blockcascade/tuning.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Wall-clock limit of each candidate's child process, in seconds (it is killed after).
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Timed launches per candidate (the median counts).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Only these families, comma-separated: attention, split, conv.
    #[arg(long)]
    only: Option<String>,
    /// Measure the emulated device at tiny shapes (for tests: no GPU timing is meaningful).
    #[arg(long)]
    emulate: bool,
    /// Probe child: FAMILY=CANDIDATE (internal).
    #[arg(long, hide = true, requires = "spec")]
    probe: Option<String>,
    /// Probe child: the shapes as JSON (internal).
    #[arg(long, hide = true, requires = "probe")]
    spec: Option<String>,
}

/// `tune`: every candidate in a child process, the table on stdout, the file written.
fn tune_cmd(a: TuneArgs) -> Result<()> {
    use blockcascade::tune;
    if let (Some(p), Some(s)) = (&a.probe, &a.spec) {
        let (line, ok) = tune::probe_main(p, s);
        println!("{line}");
        std::io::stdout()
            .flush()
            .map_err(|e| Error::io("stdout", e))?;
        return if ok {
            Ok(())
        } else {
            Err(Error::Device(format!("probe {p} failed")))
        };
    }
    if !(a.timeout_s.is_finite() && a.timeout_s > 0.0) {
        return Err(Error::invalid(format!(
            "--timeout-s {}: expected a positive number of seconds",
            a.timeout_s
        )));
    }
    let model = match &a.model {
        Some(m) => {
            let path = if m.is_dir() {
                m.join("config.json")
            } else {
                m.clone()
            };
            Some(blockcascade::ModelConfig::load(&path)?)
        }
        None => None,
    };
    let families = match &a.only {
        Some(list) => list
            .split(',')
            .map(|f| {
                tune::Family::parse(f).ok_or_else(|| {
                    Error::invalid(format!(
                        "--only {list:?}: expected attention, split or conv, comma-separated"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let opts = tune::TuneOptions {
        device: a.device,
        emulate: a.emulate,
        tiny: a.emulate,
        model,
        timeout: std::time::Duration::try_from_secs_f64(a.timeout_s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "--timeout-s must be a positive number of seconds, got {}",
                    a.timeout_s
                ))
            })?,
        reps: a.reps,
        families,
        out: a.out.clone(),
        exe,
    };
    let report = tune::tune(&opts, &mut |l| eprintln!("{l}"))?;
    print!("{}", tune::table(&report.rows));
    println!(
        "chosen: {}\nwritten: {}",
        report.entry.choices.describe(),
        report.path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Generate(a) => generate(*a),
        Cmd::Plan(a) => plan(a),
        Cmd::Info(a) => info(a),
        Cmd::Bench(a) => bench_cmd(a),
        Cmd::Decode(a) => decode_cmd(a),
        Cmd::EncodePrompt(a) => encode_prompt(a),
        Cmd::Tune(a) => tune_cmd(a),
        #[cfg(feature = "serve")]
        Cmd::Serve(a) => serve(*a),
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

#[cfg(feature = "serve")]
fn serve(a: ServeArgs) -> Result<()> {
    let mut generate = options(&a.sampling, a.model.is_none())?;
    if generate.local_attn.is_none() {
        // A stream's KV cache must stay bounded: local attention it is.
        generate.local_attn = Some(blockcascade::serve::DEFAULT_LOCAL_ATTN);
        generate.sink = blockcascade::serve::DEFAULT_SINK;
    }
    generate.recache = a.recache.into();
    generate.backend = a.backend.into();
    blockcascade::serve::run(&blockcascade::serve::ServeConfig {
        model: a.model,
        vae: a.vae,
        text_encoder: a.text_encoder,
        tokenizer: a.tokenizer,
        text_encoder_device: a
            .text_encoder_device
            .map(|d| TextDevice::for_backend(d.into())),
        text_encoder_precision: a.text_encoder_precision.into(),
        decoder_device: a
            .decoder_device
            .map(|d| decode_device(Some(d), generate.backend, &generate.device_ids)),
        host: a.host,
        port: a.port,
        max_streams: a.max_streams,
        max_connections: blockcascade::serve::default_max_connections(a.max_streams),
        generate,
        fps: a.fps,
        queue_blocks: a.queue_blocks,
        jpeg_quality: a.jpeg_quality,
        ..Default::default()
    })
}

/// Most worker threads `--threads` accepts.
const MAX_THREADS: usize = 4096;

/// Where `p` points once symlinks and `..` are resolved (for a path that does not exist yet:
/// its folder resolved, then its name); `None` when its folder does not exist.
fn resolved(p: &std::path::Path) -> Option<PathBuf> {
    if let Ok(r) = std::fs::canonicalize(p) {
        return Some(r);
    }
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    Some(std::fs::canonicalize(dir).ok()?.join(p.file_name()?))
}

/// Refuses, before any work, an output that names the same file as an input or as an earlier
/// output (`(flag, path)` pairs): writing it would silently replace that file (the latents
/// over the video, a video over the latents it was decoded from).
fn distinct_files(
    outputs: &[(&str, Option<&std::path::Path>)],
    inputs: &[(&str, Option<&std::path::Path>)],
) -> Result<()> {
    for (i, (flag, out)) in outputs.iter().enumerate() {
        let Some(o) = out.and_then(resolved) else {
            continue;
        };
        for (other, p) in outputs[..i].iter().chain(inputs) {
            if p.and_then(resolved).as_ref() == Some(&o) {
                return Err(Error::invalid(format!(
                    "{flag} {} is also the {other} file; writing it would replace that file",
                    o.display()
                )));
            }
        }
    }
    Ok(())
}

/// Checks, before any work, that `--out` can be written: not a directory, in an existing
/// folder where a file can be created (probed with a hidden temporary name, as `write_f32`
/// writes one).
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
    blockcascade::files::check_output_target(out)?;
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

/// The run's options from `generate`'s arguments (and the thread pool `--threads` asks for),
/// validated against the frame count.
fn generate_options(
    a: &GenerateArgs,
    (devices, device_list): (usize, Option<Vec<usize>>),
) -> Result<GenerateOptions> {
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
    opts.backend = a.backend.into();
    match (opts.backend, device_list) {
        // `--devices 0,0`: the CUDA ordinal of every logical device.
        (BackendKind::Cuda, Some(list)) => opts.device_ids = list,
        // The CPU's devices are worker threads without identities: a list means its length
        // only, so only `0,1,...,N-1` is taken (another list would be silently ignored).
        (BackendKind::Cpu, Some(list)) if list.iter().enumerate().any(|(i, &d)| i != d) => {
            return Err(Error::invalid(format!(
                "--devices {}: the CPU backend has no device indices (--devices N runs N \
                 worker threads): give a count, e.g. --devices {}, or the list 0..N-1",
                a.devices.trim(),
                list.len()
            )));
        }
        _ => {}
    }
    opts.kv_exchange = match a.kv_exchange {
        ExchangeArg::Joint => KvExchange::Joint,
        ExchangeArg::Lagged => KvExchange::Lagged,
    };
    opts.recache = a.recache.into();
    opts.validate(Some(a.frames))?;
    Ok(opts)
}

/// One progress line on stderr for a finished block (redrawn in place on a terminal).
fn print_progress(b: &blockcascade::FinishedBlock, blocks: usize, tty: bool) {
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

fn generate(a: GenerateArgs) -> Result<()> {
    let devices = parse_devices(&a.devices)?;
    check_out(&a.out)?;
    distinct_files(
        &[("--out", Some(&a.out)), ("--video", a.video.as_deref())],
        &[
            ("--noise", a.noise.as_deref()),
            ("--prompt-embeds", a.prompt_embeds.as_deref()),
            ("--prompt-schedule", a.prompt_schedule.as_deref()),
        ],
    )?;
    let opts = generate_options(&a, devices)?;
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
    if a.video.is_none()
        && (a.video_opts.vae.is_some()
            || a.video_opts.decoder.is_some()
            || a.decoder_device.is_some())
    {
        return Err(Error::invalid(
            "--vae / --decoder / --decoder-device need --video OUT",
        ));
    }
    // The decoder and the video file are checked before the model is loaded.
    let device = decode_device(a.decoder_device, opts.backend, &opts.device_ids);
    let mut pixels = match &a.video {
        Some(path) => Some(start_video(
            &a.video_opts,
            true,
            path,
            (opts.height, opts.width),
            device,
        )?),
        None => None,
    };
    let engine = Engine::open(a.model.as_deref())?;
    let cfg = engine.config().clone();
    // The text encoder: --text-encoder, else the built-in one for the built-in model.
    let text = match (&a.text_encoder, a.model.is_none()) {
        (Some(d), _) => Some(TextEncoder::load(d, a.tokenizer.as_deref())?),
        (None, true) => Some(TextEncoder::tiny(0)),
        (None, false) => None,
    };
    let text = match text {
        Some(t) => Some(place_text_encoder(
            t,
            a.text_encoder_device,
            a.backend,
            &opts.device_ids,
            a.text_encoder_precision,
        )?),
        None => None,
    };
    if let Some(t) = &text {
        t.check_model(&cfg)?;
    }
    let prompt = match (&a.prompt_embeds, &a.prompt, &text) {
        (Some(p), _, _) => PromptEmbeds::load(p, &cfg)?,
        (None, Some(t), Some(enc)) => enc.prompt_embeds(t, &cfg)?,
        (None, Some(_), None) => {
            return Err(Error::invalid(
                "--prompt needs --text-encoder DIR (the umT5 encoder) with --model",
            ))
        }
        (None, None, _) => PromptEmbeds::builtin(&cfg, 0),
    };
    let switches = match &a.prompt_schedule {
        Some(p) => load_schedule_with_text(p, &cfg, opts.block_frames, text.as_ref())?,
        None => Vec::new(),
    };
    let mut gen = Generator::new(engine.model(), opts.clone(), noise.clone(), &prompt)?;
    gen.set_prompt_schedule(&switches)?;
    if pixels.is_some() {
        // A decoder on the DiT's device(s) reads each block there (the latents still come
        // back for the output file).
        gen.hand_off_to_decoder(device, true);
    }
    let progress = !a.quiet;
    let tty = std::io::stderr().is_terminal();
    let mut latents = Vec::new();
    let mut decode_err = None;
    let report = gen.run(blocks, |b| {
        latents.extend_from_slice(b.latents);
        if let Some(p) = pixels.as_mut() {
            if let Err(e) = p.push_block(b) {
                decode_err = Some(e);
                return false;
            }
        }
        if progress {
            print_progress(b, blocks, tty);
        }
        true
    });
    let report = match (report, decode_err) {
        (_, Some(e)) => return Err(e),
        (r, None) => r?,
    };
    let video_path = match pixels {
        Some(p) => Some(p.finish()?.finish()?),
        None => None,
    };
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
        if let Some(v) = &video_path {
            eprintln!("wrote {}", v.display());
        }
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
    let (devs, _) = blockcascade::backend::cuda::info::list_devices()?;
    for l in blockcascade::tune::apply::devices_report(&devs) {
        println!("{l}");
    }
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
    if a.mfu > 1.0 {
        return Err(Error::invalid(format!(
            "--mfu is a fraction of the peak, in (0, 1], got {}",
            a.mfu
        )));
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
        if mfu > 1.0 {
            return Err(Error::invalid(format!(
                "--measured-ms-per-block {ms} is faster than {:.3} ms/block, the ideal at \
                 --tflops {}: the measurement or --tflops is wrong",
                p.ms_per_block, a.tflops
            )));
        }
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

fn switch_bench_cmd(a: &BenchArgs) -> Result<()> {
    use blockcascade::bench::switch::{run, table, SwitchBenchOptions, SwitchEncoder};
    let encode_threads = match a.switch_encode_threads.trim() {
        "shared" => None,
        n => Some(n.parse::<usize>().map_err(|_| {
            Error::invalid(format!(
                "--switch-encode-threads: expected a number or `shared`, got {n:?}"
            ))
        })?),
    };
    let model = a.switch_model.trim();
    let (h, w, _) = bench::shapes(model);
    let o = SwitchBenchOptions {
        model: model.to_string(),
        latent: (h, w),
        cascade: a.cascade,
        backend: a.switch_backend.into(),
        encoder: match &a.switch_encoder_dir {
            Some(d) => SwitchEncoder::Dir(d.clone()),
            None => SwitchEncoder::Random {
                dim_attn: 1024,
                ffn: a.switch_encoder_ffn,
                heads: 8,
                layers: a.switch_encoder_layers,
            },
        },
        text_device: TextDevice::for_backend(a.text_encoder_device.into()),
        encode_threads,
        switches: a.switches,
        gap_blocks: a.switch_gap_blocks,
        ..Default::default()
    };
    let r = run(&o)?;
    eprint!("{}", table(&r));
    println!(
        "{}",
        serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.model_scaling {
        return scaling_cmd(&a);
    }
    if a.decode {
        let results = blockcascade::decode::bench_decode(
            &[DecoderKind::Taehv, DecoderKind::WanVae],
            60,
            104,
            3,
            a.decode_blocks.max(1),
        )?;
        eprint!("{}", blockcascade::decode::bench_table(&results));
        return Ok(());
    }
    if a.switch {
        return switch_bench_cmd(&a);
    }
    if a.text_encoder {
        let cfg = blockcascade::text::Umt5Config::xxl();
        let device = TextDevice::for_backend(a.text_encoder_device.into());
        let precision = TextPrecision::from(a.text_encoder_precision);
        let b = blockcascade::text::bench_text_encoder_precision(
            &cfg,
            a.text_tokens,
            a.reps.max(1),
            device,
            precision,
        )?;
        let cpu = b.cpu_ms.map_or("-".into(), |c| format!("{c:.1}"));
        // The CUDA encoder has its own arithmetic.
        let precision = match device {
            TextDevice::Cpu => precision.name(),
            TextDevice::Cuda => "cuda-bf16",
        };
        let kernel = blockcascade::backend::cpu::gemm_bf16::bf16_kernel().name();
        eprintln!(
            "umT5-XXL encoder on {}, {precision}{}, {} tokens, {} threads: {:.1} ms wall, {cpu} ms CPU",
            device.name(),
            if precision == "bf16" { format!(" ({kernel})") } else { String::new() },
            a.text_tokens,
            rayon::current_num_threads(),
            b.ms
        );
        println!(
            "{}",
            serde_json::json!({"text_encoder": "umt5-xxl", "tokens": a.text_tokens,
                "device": device.name(), "precision": precision,
                "threads": rayon::current_num_threads(), "ms": b.ms, "cpu_ms": b.cpu_ms})
        );
        return Ok(());
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

/// Where a decoder runs: `arg` (`--decoder-device`), else where `backend` runs; CUDA on the
/// first GPU of `device_ids` (the DiT's `--devices`; empty: BC_CUDA_DEVICE).
fn decode_device(arg: Option<BackendArg>, backend: BackendKind, ids: &[usize]) -> DecodeDevice {
    match arg {
        Some(BackendArg::Cpu) => DecodeDevice::Cpu,
        Some(BackendArg::Cuda) => DecodeDevice::cuda_beside(ids),
        None => DecodeDevice::for_backend(backend, ids),
    }
}

/// Opens the decoder and the video writer for latents of `latent_h x latent_w`, and starts the
/// decode thread on `device` that writes each block's frames as soon as they are decoded (on a
/// GPU: its own streams, overlapping the DiT's ticks; RGB8 back to the host, f32 only for
/// `.safetensors`).
fn start_video(
    v: &VideoArgs,
    builtin_ok: bool,
    path: &std::path::Path,
    (latent_h, latent_w): (usize, usize),
    device: DecodeDevice,
) -> Result<BackgroundDecoder<VideoWriter>> {
    let decoder = v.decoder(builtin_ok)?;
    decoder.check_latent_size(decoder.latent_channels(), latent_h, latent_w)?;
    let (h, w) = decoder.pixel_size(latent_h, latent_w);
    let writer = VideoWriter::create(path, w, h, &v.options())?;
    // A `.safetensors` video is f32 only: no RGB8 conversion on the CPU.
    let outputs = match writer.format() {
        blockcascade::video::VideoFormat::Safetensors => PixelOutputs::F32,
        _ => PixelOutputs::Rgb8,
    };
    let size = (latent_h, latent_w);
    BackgroundDecoder::spawn_on(
        decoder,
        device,
        size,
        outputs,
        writer,
        |wr, out| match &out.f32 {
            Some(f) => wr.write_frames(f, out.frames),
            None => wr.write_rgb8(&out.rgb, out.frames),
        },
    )
}

/// `decode`: latents file to video, streamed in blocks of `--block-frames` latent frames.
fn decode_cmd(a: DecodeArgs) -> Result<()> {
    if a.block_frames == 0 {
        return Err(Error::invalid("--block-frames must be at least 1"));
    }
    distinct_files(
        &[("--out", Some(&a.out))],
        &[
            ("--latents", Some(&a.latents)),
            ("--vae", a.video.vae.as_deref()),
        ],
    )?;
    let decoder = a.video.decoder(false)?;
    let lat = LatentsFile::load(&a.latents, &decoder)?;
    let (frames, lh, lw) = (lat.frames, lat.height, lat.width);
    let (h, w) = decoder.pixel_size(lh, lw);
    let mut writer = VideoWriter::create(&a.out, w, h, &a.video.options())?;
    let mut push = block_decoder(&decoder, a.backend, lh, lw, &writer)?;
    let started = std::time::Instant::now();
    for (i, (chunk, n)) in lat.blocks(a.block_frames)?.enumerate() {
        push(chunk, n, &mut writer)?;
        if !a.quiet {
            let done = i
                .saturating_mul(a.block_frames)
                .saturating_add(n)
                .min(frames);
            eprintln!(
                "decoded {done}/{frames} latent frames  {} pixel frames  {:.2}s",
                writer.frames(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let frames_out = writer.frames();
    let path = writer.finish()?;
    if !a.quiet {
        eprintln!(
            "wrote {} ({frames_out} frames of {w}x{h}, {} decoder)",
            path.display(),
            decoder.kind()
        );
    }
    Ok(())
}

/// Decodes one block of latent frames into `writer`.
type PushBlock<'d> = Box<dyn FnMut(&[f32], usize, &mut VideoWriter) -> Result<()> + 'd>;

/// The block decoder of `decode --backend`: the CPU stream, or the device decoder on
/// BC_CUDA_DEVICE (default 0), as the CUDA backend would pick (RGB8 from the device; f32 for
/// `.safetensors`).
fn block_decoder<'d>(
    decoder: &'d Decoder,
    backend: BackendArg,
    lh: usize,
    lw: usize,
    writer: &VideoWriter,
) -> Result<PushBlock<'d>> {
    let device = decode_device(Some(backend), BackendKind::Cpu, &[]);
    let Some(mut dev) = device.open_decoder(decoder)? else {
        let mut stream = decoder.stream(lh, lw)?;
        return Ok(Box::new(move |z, n, wr| {
            let v = stream.push(z, n)?;
            wr.write_frames(&v.data, v.frames)
        }));
    };
    dev.begin(lh, lw)?;
    let want_f32 = writer.format() == blockcascade::video::VideoFormat::Safetensors;
    Ok(Box::new(move |z, n, wr| {
        let out = dev.push(z, n, want_f32)?;
        match &out.f32 {
            Some(f) => wr.write_frames(f, out.frames),
            None => wr.write_rgb8(&out.rgb, out.frames),
        }
    }))
}

/// The text encoder on the device `--text-encoder-device` names, else where `--backend` runs;
/// on CUDA, the first GPU of `device_ids` (the DiT's `--devices` list; empty: BC_CUDA_DEVICE).
/// On the CPU it computes in `precision` (`--text-encoder-precision`).
fn place_text_encoder(
    enc: TextEncoder,
    device: Option<BackendArg>,
    backend: BackendArg,
    device_ids: &[usize],
    precision: PrecisionArg,
) -> Result<TextEncoder> {
    enc.with_precision(precision.into()).on_device_with(
        TextDevice::for_backend(device.unwrap_or(backend).into()),
        device_ids,
    )
}

fn encode_prompt(a: EncodePromptArgs) -> Result<()> {
    check_out(&a.out)?;
    distinct_files(
        &[("--out", Some(&a.out))],
        &[
            ("--text-encoder", Some(&a.text_encoder)),
            ("--tokenizer", a.tokenizer.as_deref()),
        ],
    )?;
    // The model's config.json only: its weights are not needed here.
    let model_cfg = match &a.model {
        Some(m) => Some(blockcascade::ModelConfig::load(&m.join("config.json"))?),
        None => None,
    };
    let text_len = a
        .text_len
        .or(model_cfg.as_ref().map(|c| c.text_len))
        .unwrap_or(DEFAULT_TEXT_LEN);
    if text_len == 0 {
        return Err(Error::invalid("--text-len must be at least 1"));
    }
    let enc = TextEncoder::load(&a.text_encoder, a.tokenizer.as_deref())?;
    let enc = place_text_encoder(
        enc,
        a.text_encoder_device,
        a.backend,
        &[],
        a.text_encoder_precision,
    )?;
    if let Some(c) = &model_cfg {
        enc.check_model(c)?;
    }
    let t = std::time::Instant::now();
    let e = enc.encode(&a.prompt, text_len)?;
    let secs = t.elapsed().as_secs_f64();
    let mut meta = BTreeMap::new();
    meta.insert("blockcascade_version".into(), blockcascade::VERSION.into());
    meta.insert("text_encoder".into(), enc.source().into());
    meta.insert("prompt".into(), a.prompt.clone());
    meta.insert("text_len".into(), text_len.to_string());
    meta.insert("text_encoder_device".into(), enc.device().name().into());
    if enc.device() == TextDevice::Cpu {
        meta.insert(
            "text_encoder_precision".into(),
            enc.precision().name().into(),
        );
        if enc.precision() == TextPrecision::Bf16 {
            // Which bf16 GEMM ran (BC_NO_AVX512_BF16=1 forces the widening one).
            meta.insert(
                "text_encoder_gemm".into(),
                blockcascade::backend::cpu::gemm_bf16::bf16_kernel()
                    .name()
                    .into(),
            );
        }
    }
    let l = e.embeds.rows;
    write_tensors(
        &a.out,
        &[
            (
                "prompt_embeds",
                vec![l, enc.dim()],
                OutData::F32(&e.embeds.data),
            ),
            ("input_ids", vec![l], OutData::I64(&e.ids)),
        ],
        &meta,
    )?;
    eprintln!(
        "wrote {} ({l} tokens x {}, {:.3}s)",
        a.out.display(),
        enc.dim(),
        secs
    );
    Ok(())
}
