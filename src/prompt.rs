//! Prompt embeddings (files, the built-in prompt) and prompt schedules.

use crate::config::ModelConfig;
use crate::rng::Rng;
use crate::tensorfile::TensorFile;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Prompt embeddings `[rows, text_dim]` (the text encoder's output, e.g. UMT5-XXL).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptEmbeds {
    /// Values, row-major.
    pub data: Vec<f32>,
    /// Rows (tokens).
    pub rows: usize,
}

impl PromptEmbeds {
    /// Loads tensor `prompt_embeds` (`[L, text_dim]` or `[1, L, text_dim]`) and checks its width
    /// and values against the model. Other tensors may be there, I64 ones included.
    pub fn load(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        // `encode-prompt` also writes the token ids (`input_ids`, I64): they are not needed.
        let f = TensorFile::open_skipping_ids(path)?;
        let info = f.tensors().get("prompt_embeds").ok_or_else(|| {
            Error::format(format!(
                "{}: missing tensor `prompt_embeds` [L, {}]",
                path.display(),
                cfg.text_dim
            ))
        })?;
        let shape = info.shape.clone();
        let rows = match shape.as_slice() {
            [l, w] if *w == cfg.text_dim => *l,
            [1, l, w] if *w == cfg.text_dim => *l,
            _ => {
                return Err(Error::invalid(format!(
                "{}: prompt_embeds has shape {shape:?}, expected [L, {}] (the model's text_dim)",
                path.display(),
                cfg.text_dim
            )))
            }
        };
        // Rows are checked before the data is converted, so that a huge (e.g. sparse) file is
        // refused without allocating its f32 copy.
        if rows == 0 || rows > cfg.text_len {
            return Err(Error::invalid(format!(
                "{}: prompt_embeds has {rows} rows (shape {shape:?}); the model takes 1..={} (text_len)",
                path.display(),
                cfg.text_len
            )));
        }
        let data = f.convert(info);
        let p = PromptEmbeds { data, rows };
        p.check(cfg).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::invalid(format!("{}: {m}", path.display())),
            e => e,
        })?;
        Ok(p)
    }

    /// Checks rows, width and finiteness against the model.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.rows == 0 || self.data.len() != self.rows * cfg.text_dim {
            return Err(Error::invalid(format!(
                "prompt embeddings must be [rows, {}] with rows >= 1",
                cfg.text_dim
            )));
        }
        if self.rows > cfg.text_len {
            return Err(Error::invalid(format!(
                "prompt embeddings have {} rows, more than text_len {}",
                self.rows, cfg.text_len
            )));
        }
        if self.data.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "prompt embeddings contain NaN or infinite values",
            ));
        }
        Ok(())
    }

    /// The built-in prompt: `min(text_len, 16)` rows of N(0, 1) values from seed `seed`.
    pub fn builtin(cfg: &ModelConfig, seed: u64) -> Self {
        let rows = cfg.text_len.min(16);
        let mut rng = Rng::new(seed ^ 0x05EE_D0F7_E47A);
        PromptEmbeds {
            data: (0..rows * cfg.text_dim).map(|_| rng.normal()).collect(),
            rows,
        }
    }
}

/// One prompt switch: from block `block` on, `embeds` apply.
#[derive(Clone, Debug)]
pub struct PromptSwitch {
    /// First block of the new prompt.
    pub block: usize,
    /// The embeddings.
    pub embeds: PromptEmbeds,
}

/// Parses a prompt schedule: a JSON list of `{ "block": n, "prompt_embeds": "file.safetensors" }`
/// (or `"frame": f` with `f` a multiple of the block size). Relative paths are resolved
/// against the schedule file's folder. Returns the switches sorted by block.
pub fn load_schedule(
    path: &Path,
    cfg: &ModelConfig,
    block_frames: usize,
) -> Result<Vec<PromptSwitch>> {
    load_schedule_with_text(path, cfg, block_frames, None)
}

/// [`load_schedule`] where an entry may also give its prompt as text, `{"block": 3, "prompt":
/// "a fox"}`, encoded by `encoder` (an error when it is `None`).
pub fn load_schedule_with_text(
    path: &Path,
    cfg: &ModelConfig,
    block_frames: usize,
    encoder: Option<&crate::text::TextEncoder>,
) -> Result<Vec<PromptSwitch>> {
    if block_frames == 0 {
        return Err(Error::invalid("block frames must be at least 1"));
    }
    let text = crate::files::read_regular_file(
        path,
        "a prompt schedule (JSON)",
        crate::files::MAX_JSON_BYTES,
    )?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        Error::format(format!(
            "{}: malformed prompt schedule: {e}",
            path.display()
        ))
    })?;
    let list = v.as_array().ok_or_else(|| {
        Error::format(format!(
            "{}: a prompt schedule is a JSON list of {{\"block\", \"prompt_embeds\"}}",
            path.display()
        ))
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out: Vec<PromptSwitch> = Vec::new();
    for (i, e) in list.iter().enumerate() {
        let block = match (
            e.get("block").and_then(|b| b.as_u64()),
            e.get("frame").and_then(|b| b.as_u64()),
        ) {
            (Some(b), None) => b as usize,
            (None, Some(f)) => {
                let f = f as usize;
                if f % block_frames != 0 {
                    return Err(Error::invalid(format!(
                        "{}: entry {i}: frame {f} is not at a block boundary (block size {block_frames})",
                        path.display()
                    )));
                }
                f / block_frames
            }
            _ => {
                return Err(Error::format(format!(
                    "{}: entry {i} needs exactly one non-negative integer `block` (or `frame`)",
                    path.display()
                )))
            }
        };
        if out.iter().any(|s| s.block == block) {
            return Err(Error::invalid(format!(
                "{}: two entries switch at block {block}",
                path.display()
            )));
        }
        let embeds = match (e.get("prompt_embeds"), e.get("prompt")) {
            (Some(file), None) => {
                let file = file.as_str().ok_or_else(|| {
                    Error::format(format!(
                        "{}: entry {i}: `prompt_embeds` must be a file name",
                        path.display()
                    ))
                })?;
                let fp = PathBuf::from(file);
                let fp = if fp.is_absolute() { fp } else { base.join(fp) };
                PromptEmbeds::load(&fp, cfg)?
            }
            (None, Some(t)) => {
                let t = t.as_str().ok_or_else(|| {
                    Error::format(format!(
                        "{}: entry {i}: `prompt` must be a string",
                        path.display()
                    ))
                })?;
                let enc = encoder.ok_or_else(|| {
                    Error::invalid(format!(
                        "{}: entry {i} gives a text prompt, which needs a text encoder \
                         (--text-encoder DIR)",
                        path.display()
                    ))
                })?;
                enc.prompt_embeds(t, cfg)?
            }
            _ => {
                return Err(Error::format(format!(
                    "{}: entry {i} needs exactly one of `prompt_embeds` (a file name) and \
                     `prompt` (text)",
                    path.display()
                )))
            }
        };
        out.push(PromptSwitch { block, embeds });
    }
    out.sort_by_key(|s| s.block);
    Ok(out)
}
