//! Configuration: the Wan `config.json` of a model, and the settings of a generation.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn default_text_dim() -> usize {
    4096
}
fn default_patch() -> Vec<usize> {
    vec![1, 2, 2]
}
fn default_eps() -> f64 {
    1e-6
}
fn default_freq_dim() -> usize {
    256
}
fn default_text_len() -> usize {
    512
}
fn default_in_dim() -> usize {
    16
}
fn default_model_type() -> String {
    "t2v".into()
}

/// The fields of a Wan `config.json` this engine uses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    /// Hidden size.
    pub dim: usize,
    /// FFN hidden size.
    pub ffn_dim: usize,
    /// Size of the sinusoidal time embedding.
    #[serde(default = "default_freq_dim")]
    pub freq_dim: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Latent channels in.
    #[serde(default = "default_in_dim")]
    pub in_dim: usize,
    /// Latent channels out.
    #[serde(default = "default_in_dim")]
    pub out_dim: usize,
    /// Text tokens cross-attention sees (prompts are zero-padded to this).
    #[serde(default = "default_text_len")]
    pub text_len: usize,
    /// Width of the prompt embeddings.
    #[serde(default = "default_text_dim")]
    pub text_dim: usize,
    /// Patch size (t, h, w); only `[1, 2, 2]` is supported.
    #[serde(default = "default_patch")]
    pub patch_size: Vec<usize>,
    /// Norm epsilon.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// `t2v` (text to video) is supported.
    #[serde(default = "default_model_type")]
    pub model_type: String,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::files::read_regular_file(
            path,
            "a model's config.json",
            crate::files::MAX_JSON_BYTES,
        )?;
        let malformed =
            |m: String| Error::format(format!("{}: malformed config: {m}", path.display()));
        let v: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| malformed(e.to_string()))?;
        let cfg: ModelConfig = serde_json::from_value(v.clone()).map_err(|e| {
            // serde names a missing field but not the field whose value has the wrong type.
            malformed(match bad_config_field(&v) {
                Some(field) => format!("field `{field}`: {e}"),
                None => e.to_string(),
            })
        })?;
        cfg.validate()
            .map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Checks the combination of fields this engine supports.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Unsupported(m));
        if self.dim == 0 || self.num_heads == 0 || self.num_layers == 0 || self.ffn_dim == 0 {
            return err("dim, ffn_dim, num_heads and num_layers must be positive".into());
        }
        // Far above any Wan model (14B: dim 5120, ffn 13824, 40 layers, text 512x4096), low
        // enough that no size computed from them overflows.
        for (name, v, max) in [
            ("dim", self.dim, 1 << 16),
            ("ffn_dim", self.ffn_dim, 1 << 18),
            ("num_heads", self.num_heads, 1 << 10),
            ("num_layers", self.num_layers, 1 << 10),
            ("freq_dim", self.freq_dim, 1 << 16),
            ("text_len", self.text_len, 1 << 16),
            ("text_dim", self.text_dim, 1 << 16),
        ] {
            if v > max {
                return err(format!("{name} {v} (at most {max})"));
            }
        }
        if self.dim % self.num_heads != 0 || (self.dim / self.num_heads) % 2 != 0 {
            return err(format!(
                "dim {} must split into num_heads = {} heads of even size",
                self.dim, self.num_heads
            ));
        }
        if self.patch_size != [1, 2, 2] {
            return err(format!("patch_size {:?} (only [1, 2, 2])", self.patch_size));
        }
        if self.in_dim != 16 || self.out_dim != 16 {
            return err(format!(
                "in_dim {} / out_dim {} (only 16 latent channels)",
                self.in_dim, self.out_dim
            ));
        }
        if self.model_type != "t2v" {
            return err(format!("model_type `{}` (only t2v)", self.model_type));
        }
        if self.freq_dim == 0 || self.freq_dim % 2 != 0 || self.text_len == 0 || self.text_dim == 0
        {
            return err("freq_dim must be even and text_len, text_dim positive".into());
        }
        // RMSNorm / LayerNorm divide by sqrt(mean + eps): eps <= 0 can give inf or NaN.
        if !(self.eps.is_finite() && self.eps > 0.0 && self.eps <= 1.0) {
            return err(format!("eps {} (must be in (0, 1])", self.eps));
        }
        Ok(())
    }

    /// Channels per attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// Parameter count implied by the config.
    pub fn parameter_count(&self) -> usize {
        weight_shapes(self)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The first field of a config object whose value has the wrong type for [`ModelConfig`].
fn bad_config_field(v: &serde_json::Value) -> Option<&'static str> {
    fn wrong<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> bool {
        serde_json::from_value::<T>(v.clone()).is_err()
    }
    let obj = v.as_object()?;
    let is_wrong = |f: &str, check: fn(&serde_json::Value) -> bool| obj.get(f).is_some_and(check);
    const COUNTS: [&str; 9] = [
        "dim",
        "ffn_dim",
        "freq_dim",
        "num_heads",
        "num_layers",
        "in_dim",
        "out_dim",
        "text_len",
        "text_dim",
    ];
    COUNTS
        .into_iter()
        .find(|f| is_wrong(f, wrong::<usize>))
        .or_else(|| is_wrong("patch_size", wrong::<Vec<usize>>).then_some("patch_size"))
        .or_else(|| is_wrong("eps", wrong::<f64>).then_some("eps"))
        .or_else(|| is_wrong("model_type", wrong::<String>).then_some("model_type"))
}

/// Every weight the model needs, with its shape, in the upstream naming.
pub fn weight_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = c.dim;
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("patch_embedding.weight".into(), vec![d, c.in_dim, 1, 2, 2]),
        ("patch_embedding.bias".into(), vec![d]),
        ("text_embedding.0.weight".into(), vec![d, c.text_dim]),
        ("text_embedding.0.bias".into(), vec![d]),
        ("text_embedding.2.weight".into(), vec![d, d]),
        ("text_embedding.2.bias".into(), vec![d]),
        ("time_embedding.0.weight".into(), vec![d, c.freq_dim]),
        ("time_embedding.0.bias".into(), vec![d]),
        ("time_embedding.2.weight".into(), vec![d, d]),
        ("time_embedding.2.bias".into(), vec![d]),
        ("time_projection.1.weight".into(), vec![6 * d, d]),
        ("time_projection.1.bias".into(), vec![6 * d]),
    ];
    for l in 0..c.num_layers {
        for a in ["self_attn", "cross_attn"] {
            for p in ["q", "k", "v", "o"] {
                v.push((format!("blocks.{l}.{a}.{p}.weight"), vec![d, d]));
                v.push((format!("blocks.{l}.{a}.{p}.bias"), vec![d]));
            }
            v.push((format!("blocks.{l}.{a}.norm_q.weight"), vec![d]));
            v.push((format!("blocks.{l}.{a}.norm_k.weight"), vec![d]));
        }
        v.push((format!("blocks.{l}.norm3.weight"), vec![d]));
        v.push((format!("blocks.{l}.norm3.bias"), vec![d]));
        v.push((format!("blocks.{l}.ffn.0.weight"), vec![c.ffn_dim, d]));
        v.push((format!("blocks.{l}.ffn.0.bias"), vec![c.ffn_dim]));
        v.push((format!("blocks.{l}.ffn.2.weight"), vec![d, c.ffn_dim]));
        v.push((format!("blocks.{l}.ffn.2.bias"), vec![d]));
        v.push((format!("blocks.{l}.modulation"), vec![1, 6, d]));
    }
    let po = c.out_dim * 4;
    v.push(("head.head.weight".into(), vec![po, d]));
    v.push(("head.head.bias".into(), vec![po]));
    v.push(("head.modulation".into(), vec![1, 2, d]));
    v
}

/// The local attention window from its command-line / C ABI form: `-1` = global attention
/// (`None`), a positive number of frames otherwise.
pub fn local_attn_frames(v: i64) -> Result<Option<usize>> {
    match v {
        -1 => Ok(None),
        l if l > 0 => usize::try_from(l)
            .map(Some)
            .map_err(|_| Error::invalid(format!("local attention window {l} is too large"))),
        l => Err(Error::invalid(format!(
            "the local attention window (local_attn, --local-attn) must be -1 (global attention) or a positive number of frames, got {l}"
        ))),
    }
}

/// The most devices a generation may use.
pub const MAX_DEVICES: usize = 64;

/// Largest latent height or width accepted (8x that in pixels).
pub const MAX_LATENT_SIDE: usize = 1 << 14;

/// Largest number of latent frames per block accepted.
pub const MAX_BLOCK_FRAMES: usize = 1 << 12;

fn default_true() -> bool {
    true
}

/// Which schedule runs the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// Self-Forcing order: every block finishes all steps before the next starts (lag = S).
    Sequential,
    /// Block Cascading with the given lag (1..=S).
    Cascade {
        /// Steps a block completes before its successor starts.
        lag: usize,
    },
}

/// Visibility among the denoising members of a cascade window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttentionMode {
    /// A member sees only earlier frames.
    Causal,
    /// A denoising member also sees the later denoising members.
    Bidirectional,
}

/// What happens to the KV cache when the prompt changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recache {
    /// Keep the cache (cascade behaviour).
    None,
    /// Re-run the cached frames under the new prompt (LongLive).
    Window,
}

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendKind {
    /// The exact f32 CPU backend.
    Cpu,
    /// NVIDIA GPUs.
    Cuda,
}

/// How devices share K/V.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvExchange {
    /// Every layer, before attention: exact.
    Joint,
    /// Once per tick: peers' K/V from the previous tick.
    Lagged,
}

/// Settings of one generation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Latent height (even).
    pub height: usize,
    /// Latent width (even).
    pub width: usize,
    /// Latent frames per block.
    pub block_frames: usize,
    /// Denoising steps on the 0..1000 scale before warping, e.g. `[1000, 750, 500, 250]`.
    pub steps: Vec<f64>,
    /// Flow-matching shift.
    pub shift: f64,
    /// Local attention window in frames (`None` = global attention).
    pub local_attn: Option<usize>,
    /// Sink frames kept visible with local attention.
    pub sink: usize,
    /// Timestep of the context member (only 0 is supported).
    pub context_noise: f64,
    /// The schedule.
    pub schedule: Schedule,
    /// Visibility among denoising members.
    pub attention: AttentionMode,
    /// Cache behaviour at prompt switches.
    pub recache: Recache,
    /// Run the context member as its own forward instead of merging it into the next
    /// block's first step (the literal Self-Forcing loop; slower, same result).
    pub separate_context_pass: bool,
    /// Which backend runs the model.
    pub backend: BackendKind,
    /// Devices the window's members are spread over (CPU: worker threads), at least 1.
    pub devices: usize,
    /// CUDA: capture and replay one CUDA graph per window shape (`--no-graphs` turns it off
    /// for debugging; `BC_NO_GRAPHS=1` too). Ignored by the CPU backend.
    #[serde(default = "default_true")]
    pub graphs: bool,
    /// CUDA: the GPU ordinal of every logical device (`--devices 0,0` = two logical devices on
    /// GPU 0); empty = the backend's default (`BC_CUDA_DEVICE`, then consecutive GPUs).
    #[serde(default)]
    pub device_ids: Vec<usize>,
    /// How devices share K/V (only used with more than one device).
    pub kv_exchange: KvExchange,
    /// Testing hook: `(device, tick)` makes that device fail in that tick.
    #[serde(skip)]
    #[doc(hidden)]
    pub fail_device_at: Option<(usize, usize)>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            height: 8,
            width: 12,
            block_frames: 3,
            steps: vec![1000.0, 750.0, 500.0, 250.0],
            shift: 5.0,
            local_attn: None,
            sink: 0,
            context_noise: 0.0,
            schedule: Schedule::Sequential,
            attention: AttentionMode::Causal,
            recache: Recache::None,
            separate_context_pass: false,
            backend: BackendKind::Cpu,
            devices: 1,
            device_ids: Vec::new(),
            graphs: true,
            kv_exchange: KvExchange::Joint,
            fail_device_at: None,
        }
    }
}

impl GenerateOptions {
    /// Checks the settings; `frames` (if known) must be whole blocks.
    pub fn validate(&self, frames: Option<usize>) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.height == 0 || self.width == 0 || self.height % 2 != 0 || self.width % 2 != 0 {
            return bad(format!(
                "latent height and width must be positive and even (patch 2x2), got {}x{}",
                self.height, self.width
            ));
        }
        // Far above any video model (Wan at 480x832 has 60x104 latents, blocks of 3 frames),
        // low enough that no size derived from them can overflow.
        if self.height > MAX_LATENT_SIDE || self.width > MAX_LATENT_SIDE {
            return bad(format!(
                "latent height and width must be at most {MAX_LATENT_SIDE}, got {}x{}",
                self.height, self.width
            ));
        }
        if self.block_frames == 0 || self.block_frames > MAX_BLOCK_FRAMES {
            return bad(format!(
                "block frames must be in 1..={MAX_BLOCK_FRAMES}, got {}",
                self.block_frames
            ));
        }
        if let Some(f) = frames {
            if f == 0 || f % self.block_frames != 0 {
                return bad(format!(
                    "frames ({f}) must be a positive multiple of the block size ({})",
                    self.block_frames
                ));
            }
        }
        if self.steps.is_empty()
            || self
                .steps
                .iter()
                .any(|s| !(s.is_finite() && *s > 0.0 && *s <= 1000.0))
        {
            return bad(format!(
                "steps must be values in (0, 1000], got {:?}",
                self.steps
            ));
        }
        if let Some(w) = self.steps.windows(2).find(|w| w[1] >= w[0]) {
            return bad(format!(
                "steps must be strictly decreasing (each step denoises further), got {} then {}",
                w[0], w[1]
            ));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return bad(format!("shift must be positive, got {}", self.shift));
        }
        if let Some(l) = self.local_attn {
            if l <= self.sink {
                return bad(format!(
                    "local attention window ({l}) must be larger than the sink ({})",
                    self.sink
                ));
            }
            if l - self.sink < self.block_frames {
                return bad(format!(
                    "local attention window ({l}) minus the sink ({}) must hold at least one block ({} frames)",
                    self.sink, self.block_frames
                ));
            }
        } else if self.sink > 0 {
            return bad("--sink needs a local attention window (--local-attn)".into());
        }
        if self.devices == 0 || self.devices > MAX_DEVICES {
            return bad(format!(
                "devices must be in 1..={MAX_DEVICES}, got {}",
                self.devices
            ));
        }
        if self.context_noise != 0.0 {
            return Err(Error::Unsupported(
                "context_noise other than 0 (the context pass runs at t = 0)".into(),
            ));
        }
        let s = self.steps.len();
        if let Schedule::Cascade { lag } = self.schedule {
            if lag == 0 || lag > s {
                return bad(format!(
                    "lag must be in 1..={s} (the number of steps), got {lag}"
                ));
            }
        }
        Ok(())
    }

    /// Members of the largest window: `ceil(S / lag)` denoising blocks plus a context block.
    pub fn max_window_members(&self) -> usize {
        self.steps.len().div_ceil(self.lag().max(1)) + 1
    }

    /// CPU devices that can get work: more than [`Self::max_window_members`] would idle.
    pub fn useful_cpu_devices(&self) -> usize {
        self.devices.clamp(1, self.max_window_members())
    }

    /// The lag the executor runs with (S for the sequential schedule).
    pub fn lag(&self) -> usize {
        match self.schedule {
            Schedule::Sequential => self.steps.len(),
            Schedule::Cascade { lag } => lag,
        }
    }
}
