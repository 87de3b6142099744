//! An [`Engine`]: a loaded model, shareable across threads and sessions.

use crate::config::{GenerateOptions, ModelConfig};
use crate::model::{Model, CHANNELS};
use crate::weights::Weights;
use crate::Result;
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

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Where the weights came from (a path or `built-in:NAME`).
    pub fn source(&self) -> &str {
        &self.source
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
    /// Estimates memory for `frames` latent frames with `opts`.
    pub fn new(cfg: &ModelConfig, opts: &GenerateOptions, frames: usize) -> Self {
        let tpf = (opts.height / 2) * (opts.width / 2);
        let cached = match opts.local_attn {
            Some(l) => l.min(frames),
            None => frames,
        };
        let window_frames = (opts.steps.len().div_ceil(opts.lag()) + 1) * opts.block_frames;
        let n = window_frames * tpf;
        MemoryEstimate {
            weights: cfg.parameter_count() * 4,
            kv_cache: cfg.num_layers * 2 * cached * tpf * cfg.dim * 4,
            activations: n * (12 * cfg.dim + cfg.ffn_dim + 2 * CHANNELS * 4) * 4
                + cfg.num_layers * 2 * cfg.text_len * cfg.dim * 4,
        }
    }

    /// Total bytes.
    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.activations
    }
}
