//! Text in: the umT5 text encoder and its tokenizer, so that a prompt can be plain text.
//!
//! [`TextEncoder::load`] reads the encoder's safetensors (Wan or Hugging Face names) and the
//! umT5 `tokenizer.json`; [`TextEncoder::encode`] cleans the text as Wan does, tokenizes it,
//! appends `</s>`, truncates to `text_len` and runs the encoder on the real tokens only. The
//! result (`[L, dim]`) is what the DiT takes as prompt embeddings; it zero-pads to its own
//! `text_len`. See docs/text-encoder.md.

pub mod bf16;
pub mod clean;
pub mod cuda;
pub mod tokenizer;
pub mod umt5;

use crate::config::ModelConfig;
use crate::prompt::PromptEmbeds;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
pub use tokenizer::Tokenizer;
pub use umt5::{Umt5, Umt5Config};

/// `text_len` when no model says otherwise (umT5's and Wan's).
pub const DEFAULT_TEXT_LEN: usize = 512;
/// Prompts whose embeddings are kept per encoder (the cache is emptied when full).
const CACHE_ENTRIES: usize = 64;

/// Where a [`TextEncoder`] runs its layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TextDevice {
    /// The CPU (f32 arithmetic on the memory-mapped weights; no GPU memory).
    #[default]
    Cpu,
    /// A CUDA device (bf16 weights uploaded once, cuBLASLt GEMMs, `cuda/t5.cu` kernels).
    Cuda,
}

impl TextDevice {
    /// The name the CLI and the C ABI use (`cpu`, `cuda`).
    pub fn name(self) -> &'static str {
        match self {
            TextDevice::Cpu => "cpu",
            TextDevice::Cuda => "cuda",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(TextDevice::Cpu),
            "cuda" => Ok(TextDevice::Cuda),
            other => Err(Error::invalid(format!(
                "text encoder device {other:?}: expected cpu or cuda"
            ))),
        }
    }

    /// The default for a generation backend: the encoder runs where the DiT runs.
    pub fn for_backend(b: crate::config::BackendKind) -> Self {
        match b {
            crate::config::BackendKind::Cuda => TextDevice::Cuda,
            _ => TextDevice::Cpu,
        }
    }
}

/// The arithmetic of the encoder on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TextPrecision {
    /// f32 arithmetic on the weights' values: the exact function of the checkpoint (the
    /// reference; 4.6e-7 relative L2 from upstream's f32 module on the golden case).
    #[default]
    Exact,
    /// bf16 activations rounded where upstream's bf16 module (Wan's default `t5_dtype`)
    /// rounds them, bf16 × bf16 products summed in f32 (`vdpbf16ps` where the CPU has
    /// AVX512-BF16): what Wan computes, faster, about 1e-2 from the exact function.
    Bf16,
}

impl TextPrecision {
    /// The name the CLI and the C ABI use (`exact`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            TextPrecision::Exact => "exact",
            TextPrecision::Bf16 => "bf16",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "exact" => Ok(TextPrecision::Exact),
            "bf16" => Ok(TextPrecision::Bf16),
            other => Err(Error::invalid(format!(
                "text encoder precision {other:?}: expected exact or bf16"
            ))),
        }
    }
}

/// An encoded prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// Token ids, `</s>` last (`L` of them).
    pub ids: Vec<i64>,
    /// Embeddings `[L, dim]`.
    pub embeds: PromptEmbeds,
}

/// A cache entry's key: text, `text_len`, precision.
type CacheKey = (String, usize, TextPrecision);

/// A text encoder: tokenizer + umT5, with a per-text cache of results.
pub struct TextEncoder {
    model: Umt5,
    tokenizer: Tokenizer,
    source: String,
    /// The CPU path's arithmetic ([`TextEncoder::with_precision`]).
    precision: TextPrecision,
    cache: Mutex<HashMap<CacheKey, Arc<Encoded>>>,
    /// The layers on a CUDA device ([`TextEncoder::on_device`]); `None`: on the CPU.
    device: Option<cuda::Umt5Cuda>,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("source", &self.source)
            .field("config", self.model.config())
            .field("tokenizer", &self.tokenizer)
            .field("device", &self.device)
            .field("precision", &self.precision)
            .finish()
    }
}

impl TextEncoder {
    /// Loads an encoder from `path` (a folder of safetensors, or one file) and its tokenizer
    /// (`tokenizer`: a `tokenizer.json` or a folder with one; default: `tokenizer.json` in the
    /// encoder's folder or in its `tokenizer/` subfolder).
    pub fn load(path: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let dir = if path.is_dir() {
            path
        } else {
            // A bare file name's folder is the working folder (`parent` gives "").
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        };
        // The tokenizer first: a missing one is reported before mapping gigabytes.
        let tok_path = Tokenizer::find(dir, tokenizer)?;
        let tok = Tokenizer::from_file(&tok_path)?;
        let model = Umt5::load(path)?;
        let vocab = model.config().vocab;
        if tok.vocab_size() > vocab {
            return Err(Error::format(format!(
                "{}: the tokenizer has {} tokens but the encoder's embedding {} rows (a tokenizer \
                 of another model?)",
                tok_path.display(),
                tok.vocab_size(),
                vocab
            )));
        }
        Ok(Self::new(model, tok, path.display().to_string()))
    }

    /// A built-in encoder with random weights (vocab 259, dim 32, 4 heads, 2 layers, ffn 64:
    /// the width of the built-in tiny model's prompts) and the byte-level toy tokenizer, so that
    /// text prompts work with no files.
    pub fn tiny(seed: u64) -> Self {
        let cfg = Umt5Config {
            vocab: 259,
            dim: 32,
            dim_attn: 32,
            ffn: 64,
            heads: 4,
            layers: 2,
            buckets: 32,
        };
        Self::new(
            Umt5::random(&cfg, seed),
            Tokenizer::Toy,
            format!("built-in:tiny:{seed}"),
        )
    }

    /// An encoder from its parts.
    pub fn new(model: Umt5, tokenizer: Tokenizer, source: String) -> Self {
        TextEncoder {
            model,
            tokenizer,
            source,
            precision: TextPrecision::Exact,
            cache: Mutex::new(HashMap::new()),
            device: None,
        }
    }

    /// Sets the arithmetic of the CPU path (default [`TextPrecision::Exact`]). Encodings are
    /// cached per precision, so switching back and forth reuses earlier results. The CUDA
    /// path ([`TextEncoder::on_device`]) has its own arithmetic (bf16 GEMM operands, f32
    /// elsewhere) and does not read this.
    pub fn with_precision(self, precision: TextPrecision) -> Self {
        TextEncoder { precision, ..self }
    }

    /// The CPU path's arithmetic.
    pub fn precision(&self) -> TextPrecision {
        self.precision
    }

    /// Runs the encoder on `device`: [`TextDevice::Cuda`] uploads the layers (bf16) to the GPU
    /// the CUDA backend would use (`BC_CUDA_DEVICE`, default 0; the emulated device with
    /// `BC_CUDA_EMULATE=1`), [`TextDevice::Cpu`] keeps (or brings back) everything on the CPU.
    /// No GPU is one clear [`Error::Device`].
    pub fn on_device(self, device: TextDevice) -> Result<Self> {
        self.on_device_with(device, &[])
    }

    /// [`TextEncoder::on_device`] beside a DiT on the CUDA devices `device_ids` (`--devices`,
    /// `bc_engine_options.devices`): [`TextDevice::Cuda`] opens the DiT's first GPU
    /// ([`crate::backend::cuda::first_device`]), so encoder and DiT share a device.
    pub fn on_device_with(self, device: TextDevice, device_ids: &[usize]) -> Result<Self> {
        match device {
            TextDevice::Cpu => {
                if self.device.is_some() {
                    self.lock_cache().clear();
                }
                Ok(TextEncoder {
                    device: None,
                    ..self
                })
            }
            TextDevice::Cuda => {
                let emulate = crate::backend::cuda::session_options().emulate;
                self.on_cuda(crate::backend::cuda::first_device(device_ids), emulate)
            }
        }
    }

    /// Runs the encoder on CUDA device `ordinal`, or on the emulated device (`emulate`).
    pub fn on_cuda(self, ordinal: usize, emulate: bool) -> Result<Self> {
        use crate::backend::cuda::device::Gpu;
        let gpu = if emulate {
            Gpu::open_emulated()?
        } else {
            Gpu::open(ordinal).map_err(|e| {
                let why = match e {
                    Error::Device(m) | Error::Unsupported(m) => m,
                    other => other.to_string(),
                };
                Error::Device(format!(
                    "the text encoder cannot run on CUDA device {ordinal}: {why} (run it on the \
                     CPU: --text-encoder-device cpu)"
                ))
            })?
        };
        let dev = cuda::Umt5Cuda::new(&self.model, gpu)?;
        // Results from the CPU path are not mixed with the device's.
        self.lock_cache().clear();
        Ok(TextEncoder {
            device: Some(dev),
            ..self
        })
    }

    /// Where the layers run.
    pub fn device(&self) -> TextDevice {
        match self.device {
            Some(_) => TextDevice::Cuda,
            None => TextDevice::Cpu,
        }
    }

    /// Sizes of the encoder.
    pub fn config(&self) -> &Umt5Config {
        self.model.config()
    }

    /// Width of the embeddings (the DiT's `text_dim` must equal it).
    pub fn dim(&self) -> usize {
        self.model.config().dim
    }

    /// Where the encoder came from (a path or `built-in:...`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` (cleaned, `</s>` appended, at most `text_len`).
    pub fn tokenize(&self, text: &str, text_len: usize) -> Result<Vec<i64>> {
        self.tokenizer.encode(text, text_len)
    }

    /// Encodes `text` to `[L, dim]` embeddings, `L <= text_len` (cached per text, `text_len`
    /// and precision).
    pub fn encode(&self, text: &str, text_len: usize) -> Result<Encoded> {
        let key = (text.to_string(), text_len, self.precision);
        if let Some(e) = self.lock_cache().get(&key) {
            return Ok((**e).clone());
        }
        let ids = self.tokenize(text, text_len)?;
        let data = match &self.device {
            Some(d) => d.forward(&self.model, &ids)?,
            None => self.model.forward_with(&ids, self.precision)?,
        };
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::format(format!(
                "{}: the text encoder produced NaN or infinite values (broken weights?)",
                self.source
            )));
        }
        let e = Encoded {
            embeds: PromptEmbeds {
                data,
                rows: ids.len(),
            },
            ids,
        };
        let mut cache = self.lock_cache();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, Arc::new(e.clone()));
        Ok(e)
    }

    /// Prompt embeddings of `text` for a DiT model: checks that the model's `text_dim` is this
    /// encoder's width and truncates to the model's `text_len`.
    pub fn prompt_embeds(&self, text: &str, cfg: &ModelConfig) -> Result<PromptEmbeds> {
        self.check_model(cfg)?;
        let e = self.encode(text, cfg.text_len)?;
        e.embeds.check(cfg)?;
        Ok(e.embeds)
    }

    /// Refuses a model whose `text_dim` differs from this encoder's width.
    pub fn check_model(&self, cfg: &ModelConfig) -> Result<()> {
        if cfg.text_dim != self.dim() {
            return Err(Error::invalid(format!(
                "the model takes prompt embeddings of width {} (text_dim) but the text encoder {} \
                 produces width {}",
                cfg.text_dim,
                self.source,
                self.dim()
            )));
        }
        Ok(())
    }

    /// Prompts in the cache.
    pub fn cached(&self) -> usize {
        self.lock_cache().len()
    }

    /// Whether `text` at `text_len` (in this encoder's precision) is in the cache (encoding it
    /// then costs no encoder run).
    pub fn is_cached(&self, text: &str, text_len: usize) -> bool {
        self.lock_cache()
            .contains_key(&(text.to_string(), text_len, self.precision))
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<Encoded>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Milliseconds to encode a `tokens`-token prompt with an encoder of `cfg`'s sizes and random
/// bf16 weights (generated, not stored: one layer shared by all layers, see
/// [`Umt5::bench_bf16`]): the median of `reps` runs after one warm-up.
pub fn bench_text_encoder(cfg: &Umt5Config, tokens: usize, reps: usize) -> Result<f64> {
    bench_text_encoder_on(cfg, tokens, reps, TextDevice::Cpu)
}

/// [`bench_text_encoder`] on `device`: with [`TextDevice::Cuda`] the layers are uploaded first
/// (each layer separately: the device holds the full 24 layers' bytes), and the time is one
/// forward on the device including the upload of the prompt's rows and the download of the
/// result.
pub fn bench_text_encoder_on(
    cfg: &Umt5Config,
    tokens: usize,
    reps: usize,
    device: TextDevice,
) -> Result<f64> {
    bench_text_encoder_timed(cfg, tokens, reps, device).map(|b| b.ms)
}

/// One prompt's encoding time from [`bench_text_encoder_timed`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct TextBench {
    /// Wall milliseconds (median of the runs).
    pub ms: f64,
    /// CPU milliseconds of the whole process, all threads (median of the runs; `None` where
    /// the platform has no process CPU clock): on a shared machine the figure to compare.
    pub cpu_ms: Option<f64>,
}

/// [`bench_text_encoder_on`] with the process CPU time of each run as well (the comparison
/// with PyTorch on a loaded machine, `benches/pytorch_text_encoder.py`, needs it).
pub fn bench_text_encoder_timed(
    cfg: &Umt5Config,
    tokens: usize,
    reps: usize,
    device: TextDevice,
) -> Result<TextBench> {
    bench_text_encoder_precision(cfg, tokens, reps, device, TextPrecision::Exact)
}

/// [`bench_text_encoder_timed`] with the CPU path in `precision` (the CUDA path ignores it).
pub fn bench_text_encoder_precision(
    cfg: &Umt5Config,
    tokens: usize,
    reps: usize,
    device: TextDevice,
    precision: TextPrecision,
) -> Result<TextBench> {
    if tokens == 0 {
        return Err(Error::invalid(
            "the benchmark prompt needs at least 1 token",
        ));
    }
    let rows = tokens.max(1024);
    let model = Umt5::bench_bf16(cfg, rows, 5);
    let dev = match device {
        TextDevice::Cpu => None,
        TextDevice::Cuda => {
            let o = crate::backend::cuda::CudaOptions::from_env();
            let gpu = if o.emulate {
                crate::backend::cuda::device::Gpu::open_emulated()?
            } else {
                crate::backend::cuda::device::Gpu::open(o.device)?
            };
            Some(cuda::Umt5Cuda::new(&model, gpu)?)
        }
    };
    let ids: Vec<i64> = (0..tokens).map(|i| ((i * 7919) % rows) as i64).collect();
    let run = || match &dev {
        Some(d) => d.forward(&model, &ids),
        None => model.forward_with(&ids, precision),
    };
    run()?;
    let cpu_ms = crate::decode::process_cpu_ms;
    let mut ms = Vec::with_capacity(reps.max(1));
    let mut cpu = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let (t, c0) = (std::time::Instant::now(), cpu_ms());
        run()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if let (Some(c0), Some(c1)) = (c0, cpu_ms()) {
            cpu.push(c1 - c0);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    Ok(TextBench {
        ms: median(ms).unwrap_or(f64::NAN),
        cpu_ms: median(cpu),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_encoder_encodes_text_and_caches_it() {
        let enc = TextEncoder::tiny(1);
        let e = enc.encode("  a  fox ", 16).expect("encode");
        // "a fox" is 5 bytes, then </s>.
        assert_eq!(e.ids.len(), 6);
        assert_eq!(*e.ids.last().expect("ids"), 1);
        assert_eq!(e.embeds.data.len(), 6 * 32);
        assert_eq!(enc.cached(), 1);
        assert_eq!(enc.encode("  a  fox ", 16).expect("cached"), e);
        let blank = enc.encode(" \t", 16).expect("blank");
        assert_eq!(blank.ids, vec![1]);
        let cut = enc.encode("abcdefgh", 4).expect("truncated");
        assert_eq!(cut.ids, vec![97 + 3, 98 + 3, 99 + 3, 1]);
        assert!(enc.encode("x", 0).is_err());
        // Beyond the encoder's token limit: an error, not a huge bias table.
        let long = "a".repeat(umt5::MAX_TOKENS + 10);
        let e = enc.encode(&long, usize::MAX).expect_err("too many tokens");
        assert!(e.to_string().contains("text_len"), "{e}");
        assert_eq!(enc.encode(&long, 40).expect("truncated").ids.len(), 40);
    }

    #[test]
    fn bench_runs_at_small_sizes() {
        let cfg = Umt5Config {
            vocab: 50,
            dim: 64,
            dim_attn: 64,
            ffn: 96,
            heads: 4,
            layers: 2,
            buckets: 32,
        };
        let ms = bench_text_encoder(&cfg, 7, 1).expect("bench");
        assert!(ms.is_finite() && ms >= 0.0);
    }
}
