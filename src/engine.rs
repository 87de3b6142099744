//! An [`Engine`]: a loaded model, shareable across threads and sessions.

use crate::config::{GenerateOptions, ModelConfig};
use crate::model::{Model, CHANNELS};
use crate::weights::Weights;
use crate::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// A loaded model. Cheap to clone (the weights are shared).
#[derive(Clone, Debug)]
pub struct Engine {
    model: Arc<Model>,
    source: String,
}

impl Engine {
    /// Loads a model directory, or the built-in tiny model when `dir` is `None`.
    pub fn open(dir: Option<&Path>) -> Result<Self> {
        match dir {
            Some(d) => Ok(Engine {
                model: Arc::new(Model::new(Weights::load(d)?)),
                source: d.display().to_string(),
            }),
            None => Self::builtin("tiny"),
        }
    }

    /// A built-in model (`tiny`, `medium`, `wan-1.3b-shape`) with seeded random weights.
    pub fn builtin(name: &str) -> Result<Self> {
        Ok(Engine {
            model: Arc::new(Model::new(Weights::builtin(name)?)),
            source: format!("built-in:{name}"),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model as a shared handle, for what outlives a borrow of the engine (a
    /// [`crate::stream::Stream`]'s worker thread).
    pub fn shared_model(&self) -> Arc<Model> {
        self.model.clone()
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Where the weights came from (a path or `built-in:NAME`).
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl From<Engine> for Arc<Model> {
    /// The engine's shared model (no copy of the weights).
    fn from(e: Engine) -> Self {
        e.model
    }
}

impl From<&Engine> for Arc<Model> {
    /// The engine's shared model (no copy of the weights).
    fn from(e: &Engine) -> Self {
        e.model.clone()
    }
}

/// Memory a generation needs on the CPU backend, in bytes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryEstimate {
    /// f32 weights.
    pub weights: usize,
    /// KV cache at its largest (all frames with global attention).
    pub kv_cache: usize,
    /// Activations of the largest window (one tick).
    pub activations: usize,
}

impl MemoryEstimate {
    /// Estimates memory for `frames` latent frames with `opts` (saturating, never overflows).
    pub fn new(cfg: &ModelConfig, opts: &GenerateOptions, frames: usize) -> Self {
        let tpf = (opts.height / 2).saturating_mul(opts.width / 2);
        let cached = match opts.local_attn {
            Some(l) => l.min(frames),
            None => frames,
        };
        let window_frames = opts.max_window_members().saturating_mul(opts.block_frames);
        // The CPU backend replicates the cache on every device.
        let replicas = opts.useful_cpu_devices();
        let n = window_frames.saturating_mul(tpf);
        let prod = |v: &[usize]| v.iter().fold(1usize, |a, &b| a.saturating_mul(b));
        MemoryEstimate {
            weights: cfg.parameter_count().saturating_mul(4),
            kv_cache: prod(&[replicas, cfg.num_layers, 2, cached, tpf, cfg.dim, 4]),
            activations: prod(&[n, 12 * cfg.dim + cfg.ffn_dim + 2 * CHANNELS * 4, 4])
                .saturating_add(prod(&[cfg.num_layers, 2, cfg.text_len, cfg.dim, 4])),
        }
    }

    /// Total bytes.
    pub fn total(&self) -> usize {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.activations)
    }

    /// Checks that a run's KV cache and activations (the weights are already loaded) fit in the
    /// memory this machine has available; a clean [`Error::OutOfMemory`] instead of an abort.
    pub fn check_run(&self) -> Result<()> {
        let need = self.kv_cache.saturating_add(self.activations);
        if let Some(avail) = crate::host_memory::available() {
            if need > avail {
                return Err(Error::OutOfMemory(format!(
                    "this generation needs about {} MiB (KV cache {} MiB + activations {} MiB) but {} MiB are available",
                    need >> 20,
                    self.kv_cache >> 20,
                    self.activations >> 20,
                    avail >> 20
                )));
            }
        }
        Ok(())
    }
}
