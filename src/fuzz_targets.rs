//! Entry points for coverage-guided fuzzing: one function per input format the engine parses,
//! each taking raw bytes and returning a [`Result`].
//!
//! The same functions serve the fuzzer (`fuzz/`, driven by `scripts/fuzz.sh`) and the replay
//! test (`tests/fuzz_replay.rs`), which runs every committed corpus file and crash regression
//! in the normal `cargo test`. See `docs/fuzzing.md`.
//!
//! What counts as a finding: a panic or abort, an [`Error::Internal`] (a broken invariant), an
//! allocation larger than [`AllocGuard`] allows for the input's size, or a run longer than the
//! fuzzer's timeout. Any other `Err` is the expected answer to a bad input.
//!
//! Inputs made of several files (a model directory, a prompt schedule and its embedding files)
//! are the files' bytes joined by [`FILE_SEPARATOR`]; each target's doc says which part is
//! which file. Files are written to a fresh folder under the system temp folder (`TMPDIR`).

use crate::config::GenerateOptions;
use crate::ffi::sys::*;
use crate::ffi::{
    bc_engine_close, bc_engine_get_info, bc_engine_open, bc_last_error, bc_session_close,
    bc_session_generate, bc_session_last_stats, bc_session_open, bc_session_set_noise_file,
};
use crate::model::CHANNELS;
use crate::noise::{NoiseSource, RecordedNoise};
use crate::prompt::{load_schedule, PromptEmbeds};
use crate::tensorfile::TensorFile;
use crate::weights::builtin_config;
use crate::{Engine, Error, Generator, Result};
use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_void, CStr};
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

mod c_abi_stream;
mod loaders;
mod outputs;
pub use c_abi_stream::c_abi_stream;
pub use loaders::{taehv_weights, tokenizer, umt5_weights, vae_weights};
pub use outputs::{latents_file, video_out};
#[cfg(feature = "serve")]
mod serve;
#[cfg(feature = "serve")]
pub use serve::serve_messages;

/// A fuzz target: a name (the corpus folder `fuzz/corpus/<name>/` and the argument of
/// `scripts/fuzz.sh`) and its entry point.
pub struct Target {
    /// Name of the target.
    pub name: &'static str,
    /// The entry point: parses `bytes` the way the engine parses that input.
    pub entry: fn(&[u8]) -> Result<()>,
}

/// Every target. Adding one: write `fn x(bytes: &[u8]) -> Result<()>` and list it here.
pub const TARGETS: &[Target] = &[
    Target {
        name: "safetensors",
        entry: safetensors,
    },
    Target {
        name: "model_dir",
        entry: model_dir,
    },
    Target {
        name: "prompt_schedule",
        entry: prompt_schedule,
    },
    Target {
        name: "recorded_noise",
        entry: recorded_noise,
    },
    Target {
        name: "c_abi_options",
        entry: c_abi_options,
    },
    Target {
        name: "c_abi_stream",
        entry: c_abi_stream,
    },
    Target {
        name: "vae_weights",
        entry: vae_weights,
    },
    Target {
        name: "taehv_weights",
        entry: taehv_weights,
    },
    Target {
        name: "umt5_weights",
        entry: umt5_weights,
    },
    Target {
        name: "tokenizer",
        entry: tokenizer,
    },
    Target {
        name: "latents_file",
        entry: latents_file,
    },
    Target {
        name: "video_out",
        entry: video_out,
    },
    #[cfg(feature = "serve")]
    Target {
        name: "serve_messages",
        entry: serve_messages,
    },
];

/// The target called `name`.
pub fn find(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Runs `target` on `bytes` and tells whether the outcome is a finding: `Err` with a
/// description for an [`Error::Internal`], `Ok` for success or an ordinary error. (Panics
/// propagate: the caller decides whether they abort.)
pub fn check(target: &Target, bytes: &[u8]) -> std::result::Result<(), String> {
    match (target.entry)(bytes) {
        Err(Error::Internal(m)) => Err(format!("target {}: internal error: {m}", target.name)),
        _ => Ok(()),
    }
}

/// Joins the files of a multi-file input.
pub const FILE_SEPARATOR: &[u8] = b"--BCFUZZ-FILE--";

/// Splits a multi-file input at [`FILE_SEPARATOR`] (always at least one part).
pub fn split_files(bytes: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = bytes;
    while let Some(i) = rest
        .windows(FILE_SEPARATOR.len())
        .position(|w| w == FILE_SEPARATOR)
    {
        parts.push(&rest[..i]);
        rest = &rest[i + FILE_SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// A fresh folder under the temp folder, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bc-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Scratch { dir })
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let p = self.dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        Ok(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A safetensors file: the header is validated, then every tensor is converted to f32, written
/// back with [`crate::tensorfile::write_f32`] and read again (the round trip must give the same
/// values).
pub fn safetensors(bytes: &[u8]) -> Result<()> {
    let s = Scratch::new()?;
    let f = TensorFile::open(&s.write("in.safetensors", bytes)?)?;
    let mut values = Vec::new();
    for (name, info) in f.tensors() {
        let v = f.tensor_f32(name, Some(&info.shape))?;
        if v.len() != info.elements() {
            return Err(Error::Internal(format!(
                "tensor `{name}`: {} values for {} elements",
                v.len(),
                info.elements()
            )));
        }
        values.push((name.as_str(), info.shape.clone(), v));
    }
    let out: Vec<crate::tensorfile::OutTensor> = values
        .iter()
        .map(|(n, s, v)| (*n, s.clone(), v.as_slice()))
        .collect();
    let back = s.dir.join("out.safetensors");
    crate::tensorfile::write_f32(&back, &out, f.metadata())?;
    let g = TensorFile::open(&back)
        .map_err(|e| Error::Internal(format!("a written file does not read back: {e}")))?;
    let same = g.metadata() == f.metadata()
        && g.tensors().len() == values.len()
        && values.iter().all(|(n, s, v)| {
            g.tensor_f32(n, Some(s)).is_ok_and(|w| {
                w.len() == v.len() && w.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits())
            })
        });
    if !same {
        return Err(Error::Internal(
            "a tensor file written and read back differs".into(),
        ));
    }
    Ok(())
}

/// A model directory. Parts: `config.json`, then the weights. With two parts the weights are
/// one file; with more, part 2 is shard 1, part 3 the shard index
/// (`diffusion_pytorch_model.safetensors.index.json`), part 4 shard 2. A model that loads
/// also generates one small block when that is cheap (a bounded amount of work).
pub fn model_dir(bytes: &[u8]) -> Result<()> {
    let parts = split_files(bytes);
    let s = Scratch::new()?;
    s.write("config.json", parts[0])?;
    const BASE: &str = "diffusion_pytorch_model";
    match parts.len() {
        1 => {}
        2 => {
            s.write(&format!("{BASE}.safetensors"), parts[1])?;
        }
        _ => {
            for (i, p) in parts[1..].iter().enumerate() {
                let name = match i {
                    0 => format!("{BASE}-00001-of-00002.safetensors"),
                    1 => format!("{BASE}.safetensors.index.json"),
                    2 => format!("{BASE}-00002-of-00002.safetensors"),
                    _ => format!("extra-{i}.safetensors"),
                };
                s.write(&name, p)?;
            }
        }
    }
    let engine = Engine::open(Some(&s.dir))?;
    // One block of 2x2 latents with two steps, if the model is small enough for a fuzzer.
    let opts = GenerateOptions {
        height: 2,
        width: 2,
        block_frames: 1,
        steps: vec![1000.0, 500.0],
        ..GenerateOptions::default()
    };
    let est = crate::engine::MemoryEstimate::new(engine.config(), &opts, 1);
    if est.total() <= 64 << 20 {
        let prompt = PromptEmbeds::builtin(engine.config(), 0);
        let gen = Generator::new(engine.model(), opts, NoiseSource::Seeded(0), &prompt)?;
        let (latents, _) = gen.generate(1)?;
        if latents.len() != CHANNELS * 4 {
            return Err(Error::Internal(format!(
                "one 2x2 block gave {} latent values",
                latents.len()
            )));
        }
    }
    Ok(())
}

/// A prompt schedule for the built-in `tiny` model (blocks of 3 frames). Parts: the schedule
/// JSON (`schedule.json`), then embedding files `p0.safetensors`, `p1.safetensors`, ... it may
/// name.
pub fn prompt_schedule(bytes: &[u8]) -> Result<()> {
    let parts = split_files(bytes);
    let s = Scratch::new()?;
    let sched = s.write("schedule.json", parts[0])?;
    for (i, p) in parts[1..].iter().enumerate() {
        s.write(&format!("p{i}.safetensors"), p)?;
    }
    let cfg = builtin_config("tiny")?;
    let switches = load_schedule(&sched, &cfg, 3)?;
    if switches.windows(2).any(|w| w[0].block >= w[1].block) {
        return Err(Error::Internal(
            "prompt switches are not sorted by block".into(),
        ));
    }
    for sw in &switches {
        sw.embeds.check(&cfg).map_err(|e| {
            Error::Internal(format!("a loaded prompt does not pass its own check: {e}"))
        })?;
    }
    Ok(())
}

/// Recorded noise. Bytes 0..4 are the request: frames (0 = through the C ABI's
/// `bc_session_set_noise_file`, which takes the frame count from the file), latent height and
/// width (`2 + 2 * (b % 8)`), denoising steps (`1 + b % 8`; the C ABI path uses its session's
/// 4). The rest is the safetensors file. Every frame and slot of loaded noise is read back.
pub fn recorded_noise(bytes: &[u8]) -> Result<()> {
    let Some((req, file)) = bytes.split_first_chunk::<4>() else {
        return Err(Error::invalid("a recorded-noise input starts with 4 bytes"));
    };
    let h = 2 + 2 * (req[1] as usize % 8);
    let w = 2 + 2 * (req[2] as usize % 8);
    let s = Scratch::new()?;
    let path = s.write("noise.safetensors", file)?;
    if req[0] == 0 {
        let opts = bc_session_options {
            height: h as u32,
            width: w as u32,
            ..crate::ffi::bc_session_options_default()
        };
        let sess = Session::open(&opts)?;
        let c = path_cstring(&path)?;
        // SAFETY: a live session and a NUL-terminated path.
        return status(unsafe { bc_session_set_noise_file(sess.0, c.as_ptr()) });
    }
    let frames = req[0] as usize;
    let steps = 1 + req[3] as usize % 8;
    let src = NoiseSource::Recorded(RecordedNoise::load(&path, frames, CHANNELS, h, w, steps)?);
    let mut out = vec![0f32; CHANNELS * h * w];
    for f in 0..frames {
        for slot in 0..steps {
            src.fill(f, slot, &mut out).map_err(|e| {
                Error::Internal(format!("frame {f} slot {slot} of loaded noise: {e}"))
            })?;
        }
    }
    if src.fill(frames, 0, &mut out).is_ok() || src.fill(0, steps, &mut out).is_ok() {
        return Err(Error::Internal(
            "noise past the recorded frames or steps was served".into(),
        ));
    }
    Ok(())
}

/// The C ABI's option structs, from bytes, through the exported functions:
///
/// | bytes    | meaning                                                                  |
/// |----------|--------------------------------------------------------------------------|
/// | 0..40    | a `bc_session_options` as laid out in memory (`struct_size` first)       |
/// | 40..44   | `bc_engine_info.struct_size` for `bc_engine_get_info`                    |
/// | 44..48   | `bc_session_stats.struct_size` for `bc_session_last_stats`               |
/// | 48..52   | `bc_engine_options.struct_size` for `bc_engine_open`                     |
/// | 52       | backend: 0 NULL, 1 `"cpu"`, 2 `"cuda"`, else the bytes from 320 on      |
/// | 53       | `devices`: 0 NULL, else the 64 `int32_t` at 64..320                      |
/// | 54       | blocks to generate with the session (0..=3; only for tiny latents)       |
/// | 55       | `decoder_device`: 0 NULL, 1 `"cpu"`, 2 `"cuda"`, 3 `" cpu "`, else the   |
/// |          | second NUL-terminated string from 320 on (any bytes: invalid UTF-8 too)  |
/// | 56..60   | `n_devices`                                                              |
/// | 60       | `text_encoder`: 0 NULL, 1 a missing path, 2 an empty path, 3 a file      |
/// |          | holding the third string from 320 on, else a folder holding it as        |
/// |          | `model.safetensors`                                                      |
/// | 61       | `tokenizer`: 0 NULL, 1 a missing path, else a file holding the fourth    |
/// |          | string from 320 on                                                       |
/// | 62       | `text_encoder_precision`: 0 NULL, 1 `"exact"`, 2 `"bf16"`, 3 `" bf16 "`, |
/// |          | else the fifth string from 320 on                                        |
/// | 64..320  | device indices                                                           |
///
/// Missing bytes are zeros; missing strings are empty. Every struct handed over is full-sized, so that any accepted
/// `struct_size` is safe to read and write.
pub fn c_abi_options(bytes: &[u8]) -> Result<()> {
    let mut b = [0u8; 320];
    let n = bytes.len().min(b.len());
    b[..n].copy_from_slice(&bytes[..n]);
    // The NUL-terminated strings from byte 320 on (each with its NUL; missing ones empty).
    let mut strings = bytes
        .get(320..)
        .unwrap_or_default()
        .split(|&c| c == 0)
        .map(|t| t.iter().copied().chain([0]).collect::<Vec<u8>>());
    let mut string = || strings.next().unwrap_or_else(|| vec![0]);
    let (tail, dec_tail, te_bytes, tok_bytes) = (string(), string(), string(), string());
    let prec_tail = string();
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);

    // bc_engine_open with fuzzed options.
    let devices: Vec<i32> = b[64..320]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let backend: &[u8] = match b[52] {
        0 => b"\0",
        1 => b"cpu\0",
        2 => b"cuda\0",
        _ => &tail,
    };
    let decoder_device: &[u8] = match b[55] {
        0 => b"\0",
        1 => b"cpu\0",
        2 => b"cuda\0",
        3 => b" cpu \0",
        _ => &dec_tail,
    };
    let precision: &[u8] = match b[62] {
        0 => b"\0",
        1 => b"exact\0",
        2 => b"bf16\0",
        3 => b" bf16 \0",
        _ => &prec_tail,
    };
    let s = Scratch::new()?;
    let file_of = |name: &str, t: &[u8]| -> Result<std::ffi::CString> {
        path_cstring(&s.write(name, &t[..t.len() - 1])?)
    };
    let text_encoder = match b[60] {
        0 => None,
        1 => Some(path_cstring(&s.dir.join("no-such-encoder"))?),
        2 => Some(std::ffi::CString::default()),
        3 => Some(file_of("umt5.safetensors", &te_bytes)?),
        _ => {
            std::fs::create_dir_all(s.dir.join("te")).map_err(|e| Error::io(&s.dir, e))?;
            file_of("te/model.safetensors", &te_bytes)?;
            Some(path_cstring(&s.dir.join("te"))?)
        }
    };
    let tokenizer = match b[61] {
        0 => None,
        1 => Some(path_cstring(&s.dir.join("no-such-tokenizer.json"))?),
        _ => Some(file_of("tokenizer.json", &tok_bytes)?),
    };
    let c_ptr = |c: &Option<std::ffi::CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let eopts = bc_engine_options {
        struct_size: u32_at(48),
        backend: if b[52] == 0 {
            std::ptr::null()
        } else {
            backend.as_ptr().cast()
        },
        devices: if b[53] == 0 {
            std::ptr::null()
        } else {
            devices.as_ptr()
        },
        n_devices: u32_at(56),
        text_encoder: c_ptr(&text_encoder),
        tokenizer: c_ptr(&tokenizer),
        text_encoder_device: std::ptr::null(),
        decoder_device: if b[55] == 0 {
            std::ptr::null()
        } else {
            decoder_device.as_ptr().cast()
        },
        text_encoder_precision: if b[62] == 0 {
            std::ptr::null()
        } else {
            precision.as_ptr().cast()
        },
    };
    let mut e = std::ptr::null_mut();
    // A 2-wide model from files loads faster than the built-in one (the options are the point).
    let dir = path_cstring(&small_model(&s)?)?;
    // SAFETY: full-sized options whose pointers are NULL, NUL-terminated strings, or 64 ints
    // (the most devices accepted, checked before they are read).
    let opened = status(unsafe { bc_engine_open(dir.as_ptr(), &eopts, &mut e) });
    bc_engine_close(e);
    let open_err = opened.err();

    // bc_engine_get_info and bc_session_open / _last_stats / _generate on the shared engine.
    let engine = shared_engine()?;
    // SAFETY: all-zero bytes are a valid bc_engine_info; the struct is full-sized.
    let mut info: bc_engine_info = unsafe { std::mem::zeroed() };
    info.struct_size = u32_at(40);
    // SAFETY: a live engine and a full-sized, writable struct.
    let info_res = status(unsafe { bc_engine_get_info(engine as *const bc_engine, &mut info) });
    if info_res.is_ok() && info.struct_size as usize != size_of::<bc_engine_info>() {
        return Err(Error::Internal(
            "bc_engine_get_info accepted a struct size it then changed".into(),
        ));
    }

    // SAFETY: bc_session_options is plain integers; any 40 bytes are a valid value.
    let sopts: bc_session_options =
        unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<bc_session_options>()) };
    let sess = Session::open(&sopts)?;
    // SAFETY: all-zero bytes are a valid bc_session_stats; the struct is full-sized.
    let mut stats: bc_session_stats = unsafe { std::mem::zeroed() };
    stats.struct_size = u32_at(44);
    // SAFETY: a live session and a full-sized, writable struct.
    let _ = status(unsafe { bc_session_last_stats(sess.0, &mut stats) });
    let blocks = (b[54] % 4) as u32;
    let tokens = (sopts.height / 2) as u64 * (sopts.width / 2) as u64 * sopts.block_frames as u64;
    if blocks > 0 && tokens * blocks as u64 <= 16 {
        // SAFETY: a live session and a callback that only reads its arguments.
        status(unsafe {
            bc_session_generate(sess.0, blocks, Some(count_block), std::ptr::null_mut())
        })?;
        stats.struct_size = size_of::<bc_session_stats>() as u32;
        // SAFETY: as above.
        status(unsafe { bc_session_last_stats(sess.0, &mut stats) })?;
        if stats.blocks != blocks {
            return Err(Error::Internal(format!(
                "generated {blocks} blocks, stats say {}",
                stats.blocks
            )));
        }
    }
    match open_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

unsafe extern "C" fn count_block(
    _user: *mut c_void,
    _index: u32,
    latents: *const f32,
    frames: u32,
    channels: u32,
    h: u32,
    w: u32,
) -> i32 {
    let n = frames as usize * channels as usize * h as usize * w as usize;
    // SAFETY: the engine passes `frames * channels * h * w` readable floats.
    let v = unsafe { std::slice::from_raw_parts(latents, n) };
    i32::from(v.iter().any(|x| !x.is_finite()))
}

/// Writes a valid model directory with `dim` 2 (one layer, all weights 0.01) under `s`.
fn small_model(s: &Scratch) -> Result<PathBuf> {
    let cfg = crate::ModelConfig {
        dim: 2,
        ffn_dim: 2,
        freq_dim: 2,
        num_heads: 1,
        num_layers: 1,
        text_len: 2,
        text_dim: 2,
        ..builtin_config("tiny")?
    };
    let json = serde_json::to_vec(&cfg).map_err(|e| Error::Internal(e.to_string()))?;
    s.write("config.json", &json)?;
    let shapes = crate::config::weight_shapes(&cfg);
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, sh)| vec![0.01; sh.iter().product()])
        .collect();
    let tensors: Vec<crate::tensorfile::OutTensor> = shapes
        .iter()
        .zip(&values)
        .map(|((n, sh), v)| (n.as_str(), sh.clone(), v.as_slice()))
        .collect();
    let weights = s.dir.join("model.safetensors");
    crate::tensorfile::write_f32(&weights, &tensors, &Default::default())?;
    Ok(s.dir.clone())
}

/// The engine handle shared by the C ABI targets: the [`small_model`] on the CPU (a real size
/// would spend the fuzzer's time in instrumented matrix products).
fn shared_engine() -> Result<usize> {
    static ENGINE: OnceLock<usize> = OnceLock::new();
    if let Some(&e) = ENGINE.get() {
        return Ok(e);
    }
    let opts = bc_engine_options {
        backend: c"cpu".as_ptr(),
        ..crate::ffi::bc_engine_options_default()
    };
    let mut e = std::ptr::null_mut();
    let s = Scratch::new()?;
    let dir = path_cstring(&small_model(&s)?)?;
    // SAFETY: valid options and out pointer.
    status(unsafe { bc_engine_open(dir.as_ptr(), &opts, &mut e) })?;
    if ENGINE.set(e as usize).is_err() {
        // Another thread won the race; keep its engine.
        bc_engine_close(e);
    }
    ENGINE
        .get()
        .copied()
        .ok_or_else(|| Error::Internal("shared engine".into()))
}

/// A session on the shared engine, closed on drop.
struct Session(*mut bc_session);

impl Session {
    fn open(opts: &bc_session_options) -> Result<Self> {
        let mut s = std::ptr::null_mut();
        // SAFETY: a live engine, full-sized options, a valid out pointer.
        status(unsafe { bc_session_open(shared_engine()? as *mut bc_engine, opts, &mut s) })?;
        Ok(Session(s))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        bc_session_close(self.0);
    }
}

fn path_cstring(p: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::invalid("a temp path contains NUL"))
}

/// A C ABI status as a [`Result`], with the message of `bc_last_error`; a status that is not
/// one of the header's is an internal error.
fn status(st: bc_status) -> Result<()> {
    if st == BC_OK {
        return Ok(());
    }
    // SAFETY: bc_last_error returns a NUL-terminated string owned by this thread.
    let msg = unsafe { CStr::from_ptr(bc_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(match st {
        BC_ERR_INVALID_ARGUMENT => Error::InvalidArgument(msg),
        BC_ERR_IO => Error::io("", std::io::Error::other(msg)),
        BC_ERR_FORMAT => Error::Format(msg),
        BC_ERR_UNSUPPORTED => Error::Unsupported(msg),
        BC_ERR_OUT_OF_MEMORY => Error::OutOfMemory(msg),
        BC_ERR_DEVICE => Error::Device(msg),
        BC_ERR_CANCELLED => Error::Cancelled,
        _ => Error::Internal(format!("status {st}: {msg}")),
    })
}

/// A global allocator for fuzzing and replay that aborts (a finding, with a message) on an
/// allocation larger than the current limit: `base` bytes plus `per_input_byte` times the
/// input's length, set by [`AllocGuard::set_input_len`] before each input. That catches
/// allocations sized by an unchecked number from the input, even when the machine could serve
/// them.
pub struct AllocGuard {
    base: usize,
    per_input_byte: usize,
    limit: AtomicUsize,
}

impl AllocGuard {
    /// A guard allowing `base + per_input_byte * input length` bytes per allocation.
    pub const fn new(base: usize, per_input_byte: usize) -> Self {
        AllocGuard {
            base,
            per_input_byte,
            limit: AtomicUsize::new(usize::MAX),
        }
    }

    /// Sets the limit for an input of `len` bytes.
    pub fn set_input_len(&self, len: usize) {
        let l = self
            .base
            .saturating_add(self.per_input_byte.saturating_mul(len));
        self.limit.store(l, Ordering::Relaxed);
    }

    fn check(&self, size: usize) {
        if size > self.limit.load(Ordering::Relaxed) {
            use std::io::Write;
            // No allocation here: the message is a fixed string.
            let _ = std::io::stderr()
                .write_all(b"AllocGuard: allocation larger than the input justifies; aborting\n");
            std::process::abort();
        }
    }
}

// SAFETY: forwards to the system allocator unchanged; only adds a size check.
unsafe impl GlobalAlloc for AllocGuard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.check(layout.size());
        // SAFETY: the caller's contract is forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.check(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.check(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
