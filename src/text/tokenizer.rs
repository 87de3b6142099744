//! Text to token ids: the Hugging Face `tokenizer.json` of umT5 (through the `tokenizers`
//! crate) or a built-in byte-level toy tokenizer, after Wan's cleaning.

use super::clean::clean_prompt;
use crate::{Error, Result};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Ids of the toy tokenizer's special tokens (umT5's are the same: pad 0, `</s>` 1, unk 2).
const TOY_SPECIALS: u32 = 3;

/// Most bytes of a `tokenizer.json` (umT5's is about 16 MiB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// A tokenizer: text in, ids with the final `</s>` out.
pub enum Tokenizer {
    /// A `tokenizer.json` (its normaliser, pre-tokenizer and model); `eos` is the id of `</s>`.
    Hf {
        /// The tokenizer.
        inner: Box<tokenizers::Tokenizer>,
        /// Id of `</s>`.
        eos: u32,
        /// Where it was read from.
        path: PathBuf,
    },
    /// Built-in: each UTF-8 byte `b` of the cleaned text is id `b + 3` (vocab 259, `</s>` = 1).
    Toy,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Tokenizer::Hf { path, eos, .. } => {
                write!(f, "Tokenizer({}, eos {eos})", path.display())
            }
            Tokenizer::Toy => f.write_str("Tokenizer(built-in bytes)"),
        }
    }
}

impl Tokenizer {
    /// Finds the tokenizer of an encoder: `explicit` (a `tokenizer.json` or a folder holding
    /// one), else `tokenizer.json` in `dir` or in `dir/tokenizer/`.
    pub fn find(dir: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
        let not_found = |p: &Path, msg: String| {
            Error::io(p, std::io::Error::new(std::io::ErrorKind::NotFound, msg))
        };
        if let Some(p) = explicit {
            if p.is_dir() {
                let f = p.join("tokenizer.json");
                return if f.exists() {
                    // A FIFO or folder of that name is its own error, not "no tokenizer.json".
                    crate::files::regular_file(&f, "a tokenizer.json").map(|_| f)
                } else {
                    Err(not_found(p, "no tokenizer.json in this folder".into()))
                };
            }
            return if p.exists() {
                crate::files::regular_file(p, "a tokenizer.json").map(|_| p.to_path_buf())
            } else {
                Err(not_found(p, "the tokenizer file does not exist".into()))
            };
        }
        for cand in [
            dir.join("tokenizer.json"),
            dir.join("tokenizer/tokenizer.json"),
        ] {
            if cand.exists() {
                // A FIFO or folder of that name is its own error, not "no tokenizer.json".
                return crate::files::regular_file(&cand, "a tokenizer.json").map(|_| cand);
            }
        }
        Err(not_found(
            dir,
            "no tokenizer.json here or in tokenizer/ (give the umT5 tokenizer.json explicitly: \
             --tokenizer FILE, bc_engine_options.tokenizer)"
                .into(),
        ))
    }

    /// Reads a Hugging Face `tokenizer.json`, which must know `</s>`.
    pub fn from_file(path: &Path) -> Result<Self> {
        // Read first, so that a missing or unreadable file is an I/O error with its path.
        let bytes = crate::files::read_regular_file(path, "a tokenizer.json", MAX_TOKENIZER_BYTES)?;
        let bad = |e: &dyn std::fmt::Display| {
            Error::format(format!(
                "{}: not a valid Hugging Face tokenizer.json: {e}",
                path.display()
            ))
        };
        // JSON syntax first: the tokenizers crate panics on some syntax errors.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| bad(&e))?;
        let mut inner = contained(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|e| bad(&e))?
            .map_err(|e| bad(&e))?;
        // `encode` truncates and appends `</s>` itself. The file's own padding would pad before
        // `</s>` to a length the file chooses (a `Fixed` length of 10^11 is a 400 GB
        // allocation), and its truncation would cut by other rules: both are switched off.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Internal(format!("switching truncation off: {e}")))?;
        let eos = inner.token_to_id("</s>").ok_or_else(|| {
            Error::format(format!(
                "{}: the tokenizer has no `</s>` token (not a T5 tokenizer?)",
                path.display()
            ))
        })?;
        Ok(Tokenizer::Hf {
            inner: Box::new(inner),
            eos,
            path: path.to_path_buf(),
        })
    }

    /// The vocabulary size (ids are below it).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
            Tokenizer::Toy => 256 + TOY_SPECIALS as usize,
        }
    }

    /// Cleans `text` as Wan does, tokenizes it and appends `</s>`, keeping at most `text_len`
    /// ids (`text_len - 1` pieces, then `</s>`). A blank text gives `</s>` alone.
    pub fn encode(&self, text: &str, text_len: usize) -> Result<Vec<i64>> {
        if text_len == 0 {
            return Err(Error::invalid("text_len must be at least 1"));
        }
        let cleaned = clean_prompt(text);
        let (mut ids, eos): (Vec<i64>, u32) = match self {
            Tokenizer::Hf { inner, eos, .. } => {
                // Without the post-processor: `</s>` is appended here, after truncation, whether
                // or not the file's template adds it.
                let enc = contained(|| inner.encode(cleaned.as_str(), false))
                    .map_err(|e| Error::format(format!("tokenizer: {e}")))?
                    .map_err(|e| Error::invalid(format!("tokenizer: {e}")))?;
                (enc.get_ids().iter().map(|&i| i as i64).collect(), *eos)
            }
            Tokenizer::Toy => (
                cleaned
                    .bytes()
                    .take(text_len)
                    .map(|b| (b as u32 + TOY_SPECIALS) as i64)
                    .collect(),
                1,
            ),
        };
        ids.truncate(text_len - 1);
        ids.push(eos as i64);
        Ok(ids)
    }
}

thread_local! {
    static IN_TOKENIZERS: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is inside a call into the `tokenizers` crate, where a panic is
/// contained and becomes an error (for a panic hook that must tell contained panics from bugs,
/// such as the fuzz harness's).
pub fn in_tokenizers_call() -> bool {
    IN_TOKENIZERS.with(Cell::get)
}

/// Runs `f`, a call into the `tokenizers` crate (and the `spm_precompiled` character maps it
/// reads), with its panics contained: that code indexes and `expect`s its way through some
/// malformed `tokenizer.json` files (an invalid precompiled character map, for one), which
/// must be an error here, not a crash. The panic's message is the error.
fn contained<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let outer = IN_TOKENIZERS.with(|c| c.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_TOKENIZERS.with(|c| c.set(outer));
    r.map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        format!("the tokenizers library failed on this file ({msg})")
    })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A `tokenizer.json` that is a FIFO (or a folder) where the tokenizer is looked for is
    /// reported as such, not as a missing tokenizer (nor skipped for the next place).
    #[test]
    fn a_fifo_named_tokenizer_json_is_not_a_missing_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokenizer.json");
        crate::files::test_mkfifo(&f);
        for explicit in [None, Some(dir.path())] {
            let m = Tokenizer::find(dir.path(), explicit)
                .unwrap_err()
                .to_string();
            assert!(
                m.contains("not a regular file") && m.contains("tokenizer.json"),
                "{m}"
            );
        }
        let sub = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sub.path().join("tokenizer/tokenizer.json")).unwrap();
        let m = Tokenizer::find(sub.path(), None).unwrap_err().to_string();
        assert!(m.contains("not a regular file"), "{m}");
    }
}
