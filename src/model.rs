//! The model and what a forward runs over: [`Model`] (weights and a process-unique id), the
//! members of a *window* ([`Member`]: blocks of whole frames, each frame with its own
//! timestep, run in one joint pass) and the prompt a member's cross-attention sees
//! ([`PromptContext`]). The sequential pipeline is a window of one member; a Block Cascading
//! tick is a window of several.
//!
//! The forward itself belongs to the backends: the f32 reference is
//! [`crate::backend::cpu::forward`] (which adds [`Model::forward`] and
//! [`Model::forward_partial`]); which keys each member sees is [`crate::window`].

use crate::config::ModelConfig;
use crate::weights::Weights;
use crate::{Error, Result};

/// Latent channels.
pub const CHANNELS: usize = 16;

/// Per layer: K (RMS-normed with the layer's cross-attention `norm_k`) and V, each
/// `[text_len, dim]`.
pub type PromptKv = Vec<(Vec<f32>, Vec<f32>)>;

static NEXT_PROMPT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One prompt as the model's cross-attention sees it: validated prompt embeddings, and their
/// text embedding and per-layer cross-attention K/V, computed lazily.
///
/// [`Model::prompt_context`] only validates and copies the embeddings; the K/V (the text MLP
/// and one `[text_len, dim] x [dim, 2 dim]` projection per layer, about 150 GFLOP for
/// Wan-1.3B) are computed on the CPU the first time [`PromptContext::kv`] is called, i.e. by
/// the first CPU forward that uses the prompt. The CUDA backend never calls it: it computes
/// the K/V on the device from [`PromptContext::embeds`] when the prompt first needs a slot.
///
/// A context belongs to the model that made it ([`PromptContext::model_id`]); using it with
/// another model is an [`Error::InvalidArgument`]. Its [`id`](PromptContext::id) is unique in
/// the process and never reused, so devices can key their copies by it (a clone keeps the id:
/// same embeddings, same model, same K/V). The K/V are computed from the model's weights as
/// they are at the first call (like the CUDA backend's weight snapshot).
#[derive(Clone)]
pub struct PromptContext {
    id: u64,
    model_id: u64,
    rows: usize,
    /// `[rows, text_dim]`, finite.
    embeds: Vec<f32>,
    /// The CPU K/V, computed once by [`PromptContext::kv`].
    pub(crate) kv: std::sync::OnceLock<PromptKv>,
}

impl std::fmt::Debug for PromptContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptContext")
            .field("id", &self.id)
            .field("model_id", &self.model_id)
            .field("rows", &self.rows)
            .field("kv_computed", &self.kv.get().is_some())
            .finish()
    }
}

impl PromptContext {
    /// This prompt context's process-unique id (never reused; shared by clones).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The [`Model::id`] of the model it was made for.
    pub fn model_id(&self) -> u64 {
        self.model_id
    }

    /// Number of embedding rows (at most `text_len`; the rest are zero).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The prompt embeddings `[rows, text_dim]` (not padded).
    pub fn embeds(&self) -> &[f32] {
        &self.embeds
    }

    /// Whether the CPU K/V have been computed (by [`PromptContext::kv`]).
    pub fn kv_computed(&self) -> bool {
        self.kv.get().is_some()
    }

    /// Checks that `model` is the model this context was made for.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        if model.id() != self.model_id {
            return Err(Error::invalid(format!(
                "a prompt context made for model {} was used with model {}",
                self.model_id,
                model.id()
            )));
        }
        Ok(())
    }
}

/// One member of a window.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    /// Absolute index of the member's first frame (RoPE position, cache position).
    pub first_frame: usize,
    /// Latents `[frames, 16, H, W]`.
    pub latents: &'a [f32],
    /// Timestep of all its frames.
    pub timestep: f64,
    /// A context member: clean latents whose K/V are written to the cache.
    pub context: bool,
    /// The prompt its cross-attention uses.
    pub prompt: &'a PromptContext,
}

/// The model: its weights, and an id that keys copies of them (see [`on_model_drop`]).
#[derive(Debug)]
pub struct Model {
    /// Weights (f32).
    pub weights: Weights,
    /// Unique per model in this process (never reused), e.g. to key device copies of weights.
    id: u64,
}

static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What runs when a model is dropped, with its [`Model::id`]: a backend that keeps copies of a
/// model's weights (the CUDA backend's weight cache) registers a hook that drops them, so the
/// model does not need to know its backends.
static DROP_HOOKS: std::sync::Mutex<Vec<fn(u64)>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run with a model's id whenever a [`Model`] is dropped. Backends call it
/// once (before they first keep anything keyed by a model id).
pub fn on_model_drop(hook: fn(u64)) {
    DROP_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(hook);
}

impl Drop for Model {
    fn drop(&mut self) {
        // Copies of these weights that backends keep go with the model.
        let hooks = DROP_HOOKS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for hook in hooks {
            hook(self.id);
        }
    }
}

impl Model {
    /// Wraps loaded weights.
    pub fn new(weights: Weights) -> Self {
        let id = NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Model { weights, id }
    }

    /// This model's process-unique id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    /// Validates prompt embeddings `[rows, text_dim]` (1..=`text_len` rows, all finite; they
    /// are zero-padded to `text_len` rows) and wraps them in a [`PromptContext`] for this
    /// model. Cheap: the text embedding and cross-attention K/V are computed when first
    /// needed ([`PromptContext::kv`] on the CPU, on the device by the CUDA backend).
    pub fn prompt_context(&self, embeds: &[f32], rows: usize) -> Result<PromptContext> {
        let c = self.config();
        let tl = c.text_len;
        if rows == 0 || embeds.len() != rows * c.text_dim {
            return Err(Error::invalid(format!(
                "prompt embeddings must be [rows, {}] (text_dim of the model), got {} values for {rows} rows",
                c.text_dim,
                embeds.len()
            )));
        }
        if rows > tl {
            return Err(Error::invalid(format!(
                "prompt embeddings have {rows} rows, more than the model's text_len {tl}"
            )));
        }
        if embeds.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "prompt embeddings contain NaN or infinite values",
            ));
        }
        Ok(PromptContext {
            id: NEXT_PROMPT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            model_id: self.id,
            rows,
            embeds: embeds.to_vec(),
            kv: std::sync::OnceLock::new(),
        })
    }
}
