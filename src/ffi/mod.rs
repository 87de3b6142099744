//! The C ABI (see `ffi/include/blockcascade.h` and `ffi/README.md`).
//!
//! Handles are opaque values registered in a global registry: a handle is looked up (and its
//! kind checked) on every call, so NULL, closed, made-up or wrong-kind handles are reported as
//! `BC_ERR_INVALID_ARGUMENT` instead of being dereferenced. Handle values come from a counter
//! and are never reused. Every entry point runs under `catch_unwind`, and the message of the
//! last failure is kept per thread for `bc_last_error`.

mod stream;
pub mod sys;

pub use stream::{
    bc_stream_close, bc_stream_next, bc_stream_open, bc_stream_options_default,
    bc_stream_switch_prompt, bc_stream_switch_prompt_text,
};

use crate::config::BackendKind;
use crate::config::{AttentionMode, GenerateOptions, Schedule};
use crate::decode::{BackgroundDecoder, DecodeDevice, Decoder, DecoderSet};
use crate::executor::{Generator, RunReport};
use crate::model::CHANNELS;
use crate::noise::{NoiseSource, RecordedNoise};
use crate::prompt::{PromptEmbeds, PromptSwitch};
use crate::tensorfile::TensorFile;
use crate::text::TextEncoder;
use crate::{Engine, Error, Result};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::size_of;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use sys::*;

// ---------------------------------------------------------------------------------------------
// Errors

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// The `bc_status` code of an error.
pub fn status_of(e: &Error) -> bc_status {
    match e {
        Error::InvalidArgument(_) => BC_ERR_INVALID_ARGUMENT,
        Error::Io { .. } => BC_ERR_IO,
        Error::Format(_) => BC_ERR_FORMAT,
        Error::Unsupported(_) => BC_ERR_UNSUPPORTED,
        Error::OutOfMemory(_) => BC_ERR_OUT_OF_MEMORY,
        Error::Device(_) => BC_ERR_DEVICE,
        Error::Cancelled => BC_ERR_CANCELLED,
        Error::Internal(_) => BC_ERR_INTERNAL,
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// Runs an entry point: catches panics, records the error message, returns the status.
fn guard(what: &str, f: impl FnOnce() -> Result<(), Failure>) -> bc_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => BC_OK,
        Ok(Err(e)) => {
            set_last_error(format!("{what}: {}", e.msg));
            e.status
        }
        Err(p) => {
            set_last_error(format!(
                "{what}: internal error: panic: {}",
                panic_message(p.as_ref())
            ));
            BC_ERR_INTERNAL
        }
    }
}

/// A failed call: its status and message.
struct Failure {
    status: bc_status,
    msg: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure {
            status: status_of(&e),
            msg: e.to_string(),
        }
    }
}

fn invalid<T, E: From<Error>>(msg: impl Into<String>) -> Result<T, E> {
    Err(Error::InvalidArgument(msg.into()).into())
}

// ---------------------------------------------------------------------------------------------
// Handles

/// A session: what `bc_session_generate` needs to start a generation from scratch.
struct Session {
    engine: Engine,
    opts: GenerateOptions,
    seed: u64,
    /// The prompt from block 0.
    prompt: PromptEmbeds,
    /// Prompt switches (block >= 1).
    switches: BTreeMap<usize, PromptEmbeds>,
    noise: Option<RecordedNoise>,
    last: Option<(usize, RunReport)>,
    /// The engine's text encoder, for the `*_prompt_text` functions.
    text: Option<Arc<TextEncoder>>,
    /// The decoder and frames callback of `bc_session_set_decoder`.
    frames: Option<FramesSink>,
    /// Where decoders run (the engine's `decoder_device`).
    decoder_device: DecodeDevice,
    /// The engine's decoders, shared by its sessions (one load and one device upload each).
    decoders: DecoderSet,
    /// A `bc_stream` is open on the session: every other call is refused as busy.
    streaming: bool,
}

/// Where `bc_session_generate` sends pixels: a decoder and the caller's frames callback.
struct FramesSink {
    decoder: Arc<Decoder>,
    cb: unsafe extern "C" fn(*mut c_void, u32, *const u8, *const f32, u32, u32, u32) -> i32,
    user: UserPtr,
}

/// The caller's `user` pointer, handed to the decode thread. The header tells the caller that
/// the frames callback runs on another thread.
#[derive(Clone, Copy)]
struct UserPtr(*mut c_void);
// SAFETY: the pointer is only passed back to the caller's callback, never dereferenced here.
unsafe impl Send for UserPtr {}

impl UserPtr {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    fn get(self) -> *mut c_void {
        self.0
    }
}

/// An engine handle: the model plus the backend and devices chosen at `bc_engine_open`.
#[derive(Clone)]
struct EngineEntry {
    engine: Engine,
    backend: BackendKind,
    devices: usize,
    /// CUDA ordinals of the logical devices (empty: the default device).
    device_ids: Vec<usize>,
    /// The text encoder (`bc_engine_options.text_encoder`, or the built-in one for the
    /// built-in model).
    text: Option<Arc<TextEncoder>>,
    /// Where the sessions' decoders run (`bc_engine_options.decoder_device`).
    decoder_device: DecodeDevice,
    /// The decoders its sessions loaded (`bc_session_set_decoder`), shared between them.
    decoders: DecoderSet,
}

enum Object {
    Engine(EngineEntry),
    Session(Arc<Mutex<Session>>),
    Stream(Arc<stream::StreamEntry>),
}

impl Object {
    /// The C type of the handle, for messages.
    fn kind(&self) -> &'static str {
        match self {
            Object::Engine(_) => "bc_engine",
            Object::Session(_) => "bc_session",
            Object::Stream(_) => "bc_stream",
        }
    }
}

static REGISTRY: Mutex<BTreeMap<usize, Object>> = Mutex::new(BTreeMap::new());
/// Handle values: distinct, aligned, never reused, never dereferenced.
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(0x10_0000);

fn registry() -> MutexGuard<'static, BTreeMap<usize, Object>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(obj: Object) -> usize {
    let h = NEXT_HANDLE.fetch_add(16, Ordering::Relaxed);
    registry().insert(h, obj);
    h
}

fn lookup_engine(h: *const bc_engine) -> Result<EngineEntry> {
    if h.is_null() {
        return invalid("the engine handle is NULL");
    }
    match registry().get(&(h as usize)) {
        Some(Object::Engine(e)) => Ok(e.clone()),
        Some(other) => invalid(format!("the handle is a {}, not a bc_engine", other.kind())),
        None => invalid(format!(
            "{h:p} is not a live bc_engine handle (closed, or never returned by bc_engine_open)"
        )),
    }
}

fn lookup_session(h: *const bc_session) -> Result<Arc<Mutex<Session>>> {
    if h.is_null() {
        return invalid("the session handle is NULL");
    }
    match registry().get(&(h as usize)) {
        Some(Object::Session(s)) => Ok(s.clone()),
        Some(other) => invalid(format!(
            "the handle is a {}, not a bc_session",
            other.kind()
        )),
        None => invalid(format!(
            "{h:p} is not a live bc_session handle (closed, or never returned by bc_session_open)"
        )),
    }
}

/// Runs `f` on a session, refusing (instead of blocking) when another call holds it.
fn with_session<T>(
    h: *const bc_session,
    f: impl FnOnce(&mut Session) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let s = lookup_session(h)?;
    let mut guard =
        match s.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return invalid(
                "the session is busy in another call (a session may be used by one thread at a \
                 time, and not from its own block callback)",
            ),
        };
    if guard.streaming {
        return invalid(
            "the session is busy: a bc_stream is open on it (close it with bc_stream_close)",
        );
    }
    f(&mut guard)
}

/// Removes a handle of the given kind; unknown handles and other kinds are ignored. The object
/// is dropped outside the registry lock.
fn close_handle(h: usize, engine: bool) {
    let _ = catch_unwind(|| {
        let mut reg = registry();
        let kind_ok = matches!(
            (reg.get(&h), engine),
            (Some(Object::Engine(_)), true) | (Some(Object::Session(_)), false)
        );
        if kind_ok {
            let removed = reg.remove(&h);
            drop(reg);
            drop(removed);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Option structs

/// The `struct_size` of every published version of each struct, oldest first (the last is
/// ours). Only these are accepted: a size between two versions would end inside a field (e.g.
/// in the middle of a pointer, which would then be read half from garbage).
/// `bc_engine_options` grew `text_encoder` and `tokenizer`, then `text_encoder_device`, then
/// `decoder_device`, then `text_encoder_precision` after its first version.
const ENGINE_OPTIONS_SIZES: &[usize] = &[
    std::mem::offset_of!(bc_engine_options, text_encoder),
    std::mem::offset_of!(bc_engine_options, text_encoder_device),
    std::mem::offset_of!(bc_engine_options, decoder_device),
    std::mem::offset_of!(bc_engine_options, text_encoder_precision),
    size_of::<bc_engine_options>(),
];
const SESSION_OPTIONS_SIZES: &[usize] = &[size_of::<bc_session_options>()];
const ENGINE_INFO_SIZES: &[usize] = &[size_of::<bc_engine_info>()];
const SESSION_STATS_SIZES: &[usize] = &[size_of::<bc_session_stats>()];

/// Reads a caller's option struct of any published version (`sizes`, the last ours); fields
/// the caller does not know keep their defaults.
///
/// # Safety
/// `p` must point to a readable struct whose first field is `uint32_t struct_size` and which
/// is at least `struct_size` bytes long.
unsafe fn read_struct<T: Copy>(p: *const T, default: T, sizes: &[usize], name: &str) -> Result<T> {
    let size = std::ptr::read(p as *const u32) as usize;
    check_size(size, sizes, size_of::<T>(), name)?;
    let mut out = default;
    std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, size);
    std::ptr::write(&mut out as *mut T as *mut u32, size_of::<T>() as u32);
    Ok(out)
}

/// Writes `value` into a caller's struct of any published version (`sizes`, the last ours).
///
/// # Safety
/// `p` must point to a writable struct whose first field is `uint32_t struct_size` (set by the
/// caller) and which is at least `struct_size` bytes long.
unsafe fn write_struct<T: Copy>(p: *mut T, value: T, sizes: &[usize], name: &str) -> Result<()> {
    let size = std::ptr::read(p as *const u32) as usize;
    check_size(size, sizes, size_of::<T>(), name)?;
    std::ptr::copy_nonoverlapping(&value as *const T as *const u8, p as *mut u8, size);
    std::ptr::write(p as *mut u32, size as u32);
    Ok(())
}

/// Accepts a `struct_size` that is one of the published `sizes` of `name` (each at most
/// `current`, ours).
fn check_size(size: usize, sizes: &[usize], current: usize, name: &str) -> Result<()> {
    debug_assert!(sizes.iter().all(|&s| s <= current) && sizes.last() == Some(&current));
    if !sizes.contains(&size) {
        let list: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
        return invalid(format!(
            "{name}.struct_size is {size}, expected {current} (sizeof({name}); this library \
             accepts the sizes of its published versions: {}); initialize it with the \
             _default() function or sizeof",
            list.join(", ")
        ));
    }
    Ok(())
}

fn default_engine_options() -> bc_engine_options {
    bc_engine_options {
        struct_size: size_of::<bc_engine_options>() as u32,
        backend: std::ptr::null(),
        devices: std::ptr::null(),
        n_devices: 0,
        text_encoder: std::ptr::null(),
        tokenizer: std::ptr::null(),
        text_encoder_device: std::ptr::null(),
        decoder_device: std::ptr::null(),
        text_encoder_precision: std::ptr::null(),
    }
}

fn default_session_options() -> bc_session_options {
    bc_session_options {
        struct_size: size_of::<bc_session_options>() as u32,
        height: 8,
        width: 12,
        block_frames: 3,
        lag: 0,
        bidirectional: 0,
        local_attn: -1,
        sink: 0,
        seed: 0,
    }
}

/// Converts C session options to the engine's options (validated).
fn generate_options(o: &bc_session_options) -> Result<GenerateOptions> {
    let local_attn = crate::config::local_attn_frames(o.local_attn as i64)?;
    let attention = match o.bidirectional {
        0 => AttentionMode::Causal,
        1 => AttentionMode::Bidirectional,
        b => return invalid(format!("bidirectional must be 0 or 1, got {b}")),
    };
    let opts = GenerateOptions {
        height: o.height as usize,
        width: o.width as usize,
        block_frames: o.block_frames as usize,
        local_attn,
        sink: o.sink as usize,
        schedule: match o.lag {
            0 => Schedule::Sequential,
            lag => Schedule::Cascade { lag: lag as usize },
        },
        attention,
        ..GenerateOptions::default()
    };
    opts.validate(None)?;
    Ok(opts)
}

/// Refuses requests whose working set clearly exceeds the machine's memory (an allocation
/// failure would abort the process instead of returning an error). `frames` = frames kept in
/// the KV cache.
fn check_memory(engine: &Engine, o: &GenerateOptions, frames: usize) -> Result<()> {
    crate::engine::MemoryEstimate::new(engine.config(), o, frames).check_run()
}

/// Copies and checks prompt embeddings given as `[rows][cols]`.
///
/// # Safety
/// `embeds` must be NULL or point to `rows * cols` readable floats.
unsafe fn read_prompt(
    engine: &Engine,
    embeds: *const f32,
    rows: u32,
    cols: u32,
) -> Result<PromptEmbeds> {
    let cfg = engine.config();
    if embeds.is_null() {
        return invalid("the prompt embeddings pointer is NULL");
    }
    if cols as usize != cfg.text_dim {
        return invalid(format!(
            "prompt embeddings have {cols} columns, but the model's text_dim is {}",
            cfg.text_dim
        ));
    }
    if rows == 0 || rows as usize > cfg.text_len {
        return invalid(format!(
            "prompt embeddings have {rows} rows; the model takes 1..={} (text_len)",
            cfg.text_len
        ));
    }
    let n = rows as usize * cols as usize;
    let data = std::slice::from_raw_parts(embeds, n).to_vec();
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return invalid(format!(
            "prompt embeddings contain a NaN or infinite value (row {}, column {})",
            i / cols as usize,
            i % cols as usize
        ));
    }
    let p = PromptEmbeds {
        data,
        rows: rows as usize,
    };
    p.check(cfg)?;
    Ok(p)
}

/// A path from a NUL-terminated string (bytes as-is).
///
/// # Safety
/// `p` must be a valid NUL-terminated string.
unsafe fn c_path(p: *const c_char) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(CStr::from_ptr(p).to_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Exports

static VERSION_C: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// `const char *bc_version(void)`: the library version.
#[no_mangle]
pub extern "C" fn bc_version() -> *const c_char {
    VERSION_C.as_ptr() as *const c_char
}

/// `const char *bc_last_error(void)`: the message of the last failure on this thread, or "".
#[no_mangle]
pub extern "C" fn bc_last_error() -> *const c_char {
    static EMPTY: &[u8] = b"\0";
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(EMPTY.as_ptr() as *const c_char)
}

/// `bc_engine_options bc_engine_options_default(void)`.
#[no_mangle]
pub extern "C" fn bc_engine_options_default() -> bc_engine_options {
    default_engine_options()
}

/// `bc_session_options bc_session_options_default(void)`.
#[no_mangle]
pub extern "C" fn bc_session_options_default() -> bc_session_options {
    default_session_options()
}

/// Opens a model directory (or the built-in tiny model for NULL).
///
/// # Safety
/// `model_dir` is NULL or a NUL-terminated string; `opts` is NULL or points to a
/// `bc_engine_options` of at least its `struct_size` bytes (with valid `backend`/`devices`
/// pointers); `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn bc_engine_open(
    model_dir: *const c_char,
    opts: *const bc_engine_options,
    out: *mut *mut bc_engine,
) -> bc_status {
    guard("bc_engine_open", || {
        if out.is_null() {
            return invalid("out is NULL");
        }
        let o = if opts.is_null() {
            default_engine_options()
        } else {
            read_struct(
                opts,
                default_engine_options(),
                ENGINE_OPTIONS_SIZES,
                "bc_engine_options",
            )?
        };
        let backend = if o.backend.is_null() {
            None
        } else {
            Some(CStr::from_ptr(o.backend).to_string_lossy().into_owned())
        };
        let kind = match backend.as_deref() {
            None => {
                if crate::backend::cuda::info::probe().is_ok() {
                    BackendKind::Cuda
                } else {
                    BackendKind::Cpu
                }
            }
            Some("cpu") => BackendKind::Cpu,
            Some("cuda") => {
                // A clean BC_ERR_DEVICE / BC_ERR_UNSUPPORTED now rather than at the first generate.
                crate::backend::cuda::info::probe()?;
                BackendKind::Cuda
            }
            Some(b) => {
                return invalid(format!(
                    "unknown backend \"{b}\" (expected \"cpu\", \"cuda\" or NULL)"
                ))
            }
        };
        let mut devices = 1;
        let mut device_ids = Vec::new();
        if o.n_devices > 0 {
            if o.devices.is_null() {
                return invalid(format!("n_devices is {} but devices is NULL", o.n_devices));
            }
            if o.n_devices as usize > crate::config::MAX_DEVICES {
                return invalid(format!(
                    "n_devices is {}, at most {} devices are supported",
                    o.n_devices,
                    crate::config::MAX_DEVICES
                ));
            }
            let devs = std::slice::from_raw_parts(o.devices, o.n_devices as usize);
            if devs.iter().any(|&d| d < 0) {
                return invalid(format!("devices {devs:?}: indices must be >= 0"));
            }
            // The CPU's devices are worker threads without identities: only {0, 1, ..., n-1}
            // is taken (a repeated or reordered index would be silently run as the count).
            if kind == BackendKind::Cpu && devs.iter().enumerate().any(|(i, &d)| d as usize != i) {
                return invalid(format!(
                    "devices {devs:?}: CPU devices are worker threads numbered 0..{}, given \
                     once each in order (0, 1, ..., n-1)",
                    devs.len()
                ));
            }
            devices = devs.len();
            if kind == BackendKind::Cuda {
                device_ids = devs.iter().map(|&d| d as usize).collect();
            }
        }
        if o.text_encoder.is_null() && !o.tokenizer.is_null() {
            return invalid("tokenizer is set but text_encoder is NULL");
        }
        let text_device = if o.text_encoder_device.is_null() {
            crate::text::TextDevice::for_backend(kind)
        } else {
            crate::text::TextDevice::parse(
                &CStr::from_ptr(o.text_encoder_device).to_string_lossy(),
            )?
        };
        let text_precision = if o.text_encoder_precision.is_null() {
            crate::text::TextPrecision::Exact
        } else {
            crate::text::TextPrecision::parse(
                &CStr::from_ptr(o.text_encoder_precision).to_string_lossy(),
            )?
        };
        let decoder_device = if o.decoder_device.is_null() {
            DecodeDevice::for_backend(kind, &device_ids)
        } else {
            DecodeDevice::parse(
                &CStr::from_ptr(o.decoder_device).to_string_lossy(),
                &device_ids,
            )?
        };
        // "cuda" without a GPU: a clean BC_ERR_DEVICE now rather than at the first decode.
        decoder_device.check()?;
        let model = if model_dir.is_null() {
            Engine::open(None)?
        } else {
            Engine::open(Some(&c_path(model_dir)))?
        };
        let text = if !o.text_encoder.is_null() {
            let tok = (!o.tokenizer.is_null()).then(|| c_path(o.tokenizer));
            Some(TextEncoder::load(&c_path(o.text_encoder), tok.as_deref())?)
        } else if model_dir.is_null() {
            Some(TextEncoder::tiny(0))
        } else {
            None
        };
        if let Some(t) = &text {
            t.check_model(model.config())?;
        }
        let text = match text {
            Some(t) => Some(
                t.with_precision(text_precision)
                    .on_device_with(text_device, &device_ids)?,
            ),
            None => None,
        };
        let engine = EngineEntry {
            engine: model,
            backend: kind,
            devices,
            device_ids,
            text: text.map(Arc::new),
            decoder_device,
            decoders: DecoderSet::default(),
        };
        *out = register(Object::Engine(engine)) as *mut bc_engine;
        Ok(())
    })
}

/// Closes an engine handle (NULL or unknown: no-op). Open sessions keep the model alive.
#[no_mangle]
pub extern "C" fn bc_engine_close(engine: *mut bc_engine) {
    close_handle(engine as usize, true);
}

/// Opens a session on an engine.
///
/// # Safety
/// `opts` is NULL or points to a `bc_session_options` of at least its `struct_size` bytes;
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn bc_session_open(
    engine: *mut bc_engine,
    opts: *const bc_session_options,
    out: *mut *mut bc_session,
) -> bc_status {
    guard("bc_session_open", || {
        let entry = lookup_engine(engine)?;
        if out.is_null() {
            return invalid("out is NULL");
        }
        let o = if opts.is_null() {
            default_session_options()
        } else {
            read_struct(
                opts,
                default_session_options(),
                SESSION_OPTIONS_SIZES,
                "bc_session_options",
            )?
        };
        let mut gopts = generate_options(&o)?;
        gopts.backend = entry.backend;
        gopts.devices = entry.devices;
        gopts.device_ids = entry.device_ids;
        let engine = entry.engine;
        let text = entry.text;
        let decoder_device = entry.decoder_device;
        check_memory(&engine, &gopts, gopts.block_frames)?;
        let prompt = PromptEmbeds::builtin(engine.config(), o.seed);
        let session = Session {
            engine,
            opts: gopts,
            seed: o.seed,
            prompt,
            switches: BTreeMap::new(),
            noise: None,
            last: None,
            text,
            frames: None,
            decoder_device,
            decoders: entry.decoders,
            streaming: false,
        };
        *out = register(Object::Session(Arc::new(Mutex::new(session)))) as *mut bc_session;
        Ok(())
    })
}

/// Sets the prompt (and removes prompt switches).
///
/// # Safety
/// `embeds` is NULL or points to `rows * cols` readable floats.
#[no_mangle]
pub unsafe extern "C" fn bc_session_set_prompt(
    s: *mut bc_session,
    embeds: *const f32,
    rows: u32,
    cols: u32,
) -> bc_status {
    guard("bc_session_set_prompt", || {
        with_session(s, |sess| {
            sess.prompt = read_prompt(&sess.engine, embeds, rows, cols)?;
            sess.switches.clear();
            Ok(())
        })
    })
}

/// Encodes a UTF-8 text prompt with an engine's text encoder `text`.
///
/// # Safety
/// `utf8` is NULL or a NUL-terminated string.
unsafe fn text_prompt(
    engine: &Engine,
    text: Option<&TextEncoder>,
    utf8: *const c_char,
) -> Result<PromptEmbeds> {
    let (enc, prompt) = prompt_text(text, utf8)?;
    enc.prompt_embeds(prompt, engine.config())
}

/// The text of a C prompt string and the engine's text encoder `text` that will encode it
/// (its absence is this call's error).
///
/// # Safety
/// `utf8` is NULL or a NUL-terminated string that outlives the result.
unsafe fn prompt_text<'a>(
    text: Option<&TextEncoder>,
    utf8: *const c_char,
) -> Result<(&TextEncoder, &'a str)> {
    if utf8.is_null() {
        return invalid("the prompt text is NULL");
    }
    let prompt = CStr::from_ptr(utf8).to_str().map_err(|e| {
        Error::invalid(format!(
            "the prompt text is not valid UTF-8 (byte {})",
            e.valid_up_to()
        ))
    })?;
    let enc = text.ok_or_else(|| {
        Error::invalid(
            "the engine has no text encoder: open it with bc_engine_options.text_encoder set",
        )
    })?;
    Ok((enc, prompt))
}

/// Sets the prompt as text (and removes prompt switches).
///
/// # Safety
/// `utf8` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bc_session_set_prompt_text(
    s: *mut bc_session,
    utf8: *const c_char,
) -> bc_status {
    guard("bc_session_set_prompt_text", || {
        with_session(s, |sess| {
            sess.prompt = text_prompt(&sess.engine, sess.text.as_deref(), utf8)?;
            sess.switches.clear();
            Ok(())
        })
    })
}

/// Switches to a text prompt from block `block` (>= 1) on.
///
/// # Safety
/// `utf8` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bc_session_switch_prompt_text(
    s: *mut bc_session,
    block: u32,
    utf8: *const c_char,
) -> bc_status {
    guard("bc_session_switch_prompt_text", || {
        with_session(s, |sess| {
            if block == 0 {
                return invalid(
                    "a prompt switch needs block >= 1 (use bc_session_set_prompt_text for block 0)",
                );
            }
            let p = text_prompt(&sess.engine, sess.text.as_deref(), utf8)?;
            sess.switches.insert(block as usize, p);
            Ok(())
        })
    })
}

/// Generates `n_blocks` blocks from scratch, streaming each to `cb`.
///
/// # Safety
/// `cb` is NULL or a function that is safe to call with `user` and the documented arguments.
#[no_mangle]
pub unsafe extern "C" fn bc_session_generate(
    s: *mut bc_session,
    n_blocks: u32,
    cb: bc_block_callback,
    user: *mut c_void,
) -> bc_status {
    guard("bc_session_generate", || {
        with_session(s, |sess| {
            let Some(cb) = cb else {
                return invalid("the block callback is NULL");
            };
            if n_blocks == 0 {
                return invalid("n_blocks must be at least 1");
            }
            let blocks = n_blocks as usize;
            let o = &sess.opts;
            check_memory(&sess.engine, o, blocks.saturating_mul(o.block_frames))?;
            let noise = match &sess.noise {
                Some(r) => NoiseSource::Recorded(r.clone()),
                None => NoiseSource::Seeded(sess.seed),
            };
            let mut gen = Generator::new(sess.engine.model(), o.clone(), noise, &sess.prompt)?;
            if let Some((&b, _)) = sess.switches.range(blocks..).next() {
                return invalid(format!(
                    "a prompt switch is set at block {b}, but only {blocks} blocks are generated"
                ));
            }
            let switches: Vec<PromptSwitch> = sess
                .switches
                .iter()
                .map(|(&block, embeds)| PromptSwitch {
                    block,
                    embeds: embeds.clone(),
                })
                .collect();
            gen.set_prompt_schedule(&switches)?;
            let (h, w) = (o.height as u32, o.width as u32);
            let mut pixels = match &sess.frames {
                Some(f) => Some(spawn_frames(f, sess.decoder_device, o.height, o.width)?),
                None => None,
            };
            if pixels.is_some() {
                // A decoder on the DiT's device(s) reads each block there; the callback still
                // gets latents.
                gen.hand_off_to_decoder(sess.decoder_device, true);
            }
            let mut decode_err = None;
            let mut stopped_at = None;
            let result = gen.run(blocks, |b| {
                if let Some(p) = pixels.as_mut() {
                    if let Err(e) = p.push_block(b) {
                        decode_err = Some(e);
                        return false;
                    }
                }
                let r = cb(
                    user,
                    b.index as u32,
                    b.latents.as_ptr(),
                    b.frames as u32,
                    CHANNELS as u32,
                    h,
                    w,
                );
                if r != 0 {
                    stopped_at = Some((b.index, r));
                }
                r == 0
            });
            // Every block's frames are handed out before the call returns.
            let decoded = match (pixels, &result, decode_err) {
                (_, _, Some(e)) => Err(e),
                (Some(p), Ok(_), None) => p.finish().map(|_| ()),
                _ => Ok(()),
            };
            if let Err(e) = decoded {
                return Err(match e {
                    Error::Cancelled => Failure {
                        status: BC_ERR_CANCELLED,
                        msg: "cancelled: the frames callback returned non-zero".into(),
                    },
                    e => e.into(),
                });
            }
            match (result, stopped_at) {
                (Ok(report), _) => {
                    sess.last = Some((blocks, report));
                    Ok(())
                }
                (Err(Error::Cancelled), Some((i, r))) => Err(Failure {
                    status: BC_ERR_CANCELLED,
                    msg: format!("cancelled: the block callback returned {r} for block {i}"),
                }),
                (Err(e), _) => Err(e.into()),
            }
        })
    })
}

/// Closes a session handle (NULL or unknown: no-op).
#[no_mangle]
pub extern "C" fn bc_session_close(s: *mut bc_session) {
    close_handle(s as usize, false);
}

/// Fills `*info` with facts about the engine's model.
///
/// # Safety
/// `info` is NULL or points to a writable `bc_engine_info` of at least its `struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn bc_engine_get_info(
    engine: *const bc_engine,
    info: *mut bc_engine_info,
) -> bc_status {
    guard("bc_engine_get_info", || {
        let engine = lookup_engine(engine)?.engine;
        if info.is_null() {
            return invalid("info is NULL");
        }
        let c = engine.config();
        let value = bc_engine_info {
            struct_size: size_of::<bc_engine_info>() as u32,
            dim: c.dim as u32,
            num_layers: c.num_layers as u32,
            num_heads: c.num_heads as u32,
            text_dim: c.text_dim as u32,
            text_len: c.text_len as u32,
            channels: CHANNELS as u32,
            num_steps: GenerateOptions::default().steps.len() as u32,
        };
        write_struct(info, value, ENGINE_INFO_SIZES, "bc_engine_info")?;
        Ok(())
    })
}

/// Switches the prompt from block `block` (>= 1) on.
///
/// # Safety
/// `embeds` is NULL or points to `rows * cols` readable floats.
#[no_mangle]
pub unsafe extern "C" fn bc_session_switch_prompt(
    s: *mut bc_session,
    block: u32,
    embeds: *const f32,
    rows: u32,
    cols: u32,
) -> bc_status {
    guard("bc_session_switch_prompt", || {
        with_session(s, |sess| {
            if block == 0 {
                return invalid(
                    "a prompt switch needs block >= 1 (use bc_session_set_prompt for block 0)",
                );
            }
            let p = read_prompt(&sess.engine, embeds, rows, cols)?;
            sess.switches.insert(block as usize, p);
            Ok(())
        })
    })
}

/// Uses recorded noise from a safetensors file (NULL: back to seeded noise).
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn bc_session_set_noise_file(
    s: *mut bc_session,
    path: *const c_char,
) -> bc_status {
    guard("bc_session_set_noise_file", || {
        with_session(s, |sess| {
            if path.is_null() {
                sess.noise = None;
                return Ok(());
            }
            let path = c_path(path);
            let o = &sess.opts;
            let frames = {
                let f = TensorFile::open(&path)?;
                match f.tensors().get("noise").map(|t| t.shape.as_slice()) {
                    Some([0, ..]) => {
                        return Err(Error::format(format!(
                            "{}: tensor `noise` holds 0 frames",
                            path.display()
                        ))
                        .into())
                    }
                    Some([frames, ..]) => *frames,
                    _ => {
                        return Err(Error::format(format!(
                            "{}: missing tensor `noise` [F, {CHANNELS}, {}, {}]",
                            path.display(),
                            o.height,
                            o.width
                        ))
                        .into())
                    }
                }
            };
            let noise =
                RecordedNoise::load(&path, frames, CHANNELS, o.height, o.width, o.steps.len())?;
            sess.noise = Some(noise);
            Ok(())
        })
    })
}

/// Statistics of the last successful generation.
///
/// # Safety
/// `stats` is NULL or points to a writable `bc_session_stats` of at least its `struct_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn bc_session_last_stats(
    s: *const bc_session,
    stats: *mut bc_session_stats,
) -> bc_status {
    guard("bc_session_last_stats", || {
        with_session(s, |sess| {
            if stats.is_null() {
                return invalid("stats is NULL");
            }
            check_size(
                std::ptr::read(stats as *const u32) as usize,
                SESSION_STATS_SIZES,
                size_of::<bc_session_stats>(),
                "bc_session_stats",
            )?;
            let Some((blocks, r)) = &sess.last else {
                return invalid("no generation has succeeded on this session yet");
            };
            let value = bc_session_stats {
                struct_size: size_of::<bc_session_stats>() as u32,
                blocks: *blocks as u32,
                ticks: r.ticks as u64,
                forward_passes: r.forward_passes as u64,
                max_cache_bytes: r.max_cache_bytes as u64,
                time_to_first_block: r.time_to_first_block,
                total_seconds: r.total_seconds,
            };
            write_struct(stats, value, SESSION_STATS_SIZES, "bc_session_stats")?;
            Ok(())
        })
    })
}

/// Starts the decode thread of one generation on `device`: it decodes each pushed block and
/// calls the frames callback with the block's RGB8 and f32 frames (the callback's contract asks
/// for both, so f32 comes back from a GPU too).
fn spawn_frames(
    f: &FramesSink,
    device: DecodeDevice,
    h: usize,
    w: usize,
) -> Result<BackgroundDecoder<u32>> {
    let (cb, user) = (f.cb, f.user);
    BackgroundDecoder::spawn_on(
        f.decoder.clone(),
        device,
        (h, w),
        true,
        0u32,
        move |index, v| {
            let pixels = callback_pixels(&v)?;
            // SAFETY: the caller promised `cb` is safe to call with `user` and these arguments,
            // from another thread (bc_session_set_decoder's contract).
            let r = unsafe {
                cb(
                    user.get(),
                    *index,
                    v.rgb.as_ptr(),
                    pixels.as_ptr(),
                    v.frames as u32,
                    v.height as u32,
                    v.width as u32,
                )
            };
            *index += 1;
            if r != 0 {
                return Err(Error::Cancelled);
            }
            Ok(())
        },
    )
}

/// The f32 frames of a decoded block for the frames callback, which reads `frames*3*h*w`
/// floats and as many RGB8 bytes: anything else (no f32 frames, a length that does not match)
/// is [`Error::Internal`] instead of a pointer the callback would read past.
fn callback_pixels(v: &crate::decode::DeviceFrames) -> Result<&[f32]> {
    let want = v.frames * 3 * v.height * v.width;
    match v.f32.as_deref() {
        Some(p) if p.len() == want && v.rgb.len() == want => Ok(p),
        _ => Err(Error::Internal(format!(
            "the decoder returned {} f32 and {} RGB8 values for {} frames of {}x{} (expected \
             {want} of each)",
            v.f32.as_ref().map_or(0, |p| p.len()),
            v.rgb.len(),
            v.frames,
            v.height,
            v.width
        ))),
    }
}

/// Sets (or, with `cb` NULL, removes) the decoder whose frames `bc_session_generate` hands out.
///
/// # Safety
/// `path` is NULL or a valid NUL-terminated string; `cb` is NULL or a function that is safe to
/// call with `user` and the documented arguments from another thread.
#[no_mangle]
pub unsafe extern "C" fn bc_session_set_decoder(
    s: *mut bc_session,
    path: *const c_char,
    cb: bc_frames_callback,
    user: *mut c_void,
) -> bc_status {
    guard("bc_session_set_decoder", || {
        with_session(s, |sess| {
            let Some(cb) = cb else {
                sess.frames = None;
                return Ok(());
            };
            let path = (!path.is_null()).then(|| c_path(path));
            let decoder = sess.decoders.get(path.as_deref())?;
            decoder.check_latent_size(CHANNELS, sess.opts.height, sess.opts.width)?;
            sess.frames = Some(FramesSink {
                decoder,
                cb,
                user: UserPtr(user),
            });
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DeviceFrames;

    #[test]
    fn the_frames_callback_gets_whole_f32_frames_or_an_internal_error() {
        let frames = |f32: Option<Vec<f32>>, rgb: usize| DeviceFrames {
            frames: 2,
            height: 3,
            width: 4,
            rgb: vec![0; rgb],
            f32,
        };
        let n = 2 * 3 * 3 * 4;
        assert_eq!(
            callback_pixels(&frames(Some(vec![1.0; n]), n))
                .unwrap()
                .len(),
            n
        );
        for bad in [
            frames(None, n),
            frames(Some(vec![]), n),
            frames(Some(vec![1.0; n - 1]), n),
            frames(Some(vec![1.0; n]), n - 1),
        ] {
            let e = callback_pixels(&bad).unwrap_err();
            assert!(matches!(e, Error::Internal(_)), "{e:?}");
        }
    }

    #[test]
    fn struct_sizes_must_be_a_published_version() {
        let sizes = [32, 48, 56, 64];
        for s in sizes {
            assert!(check_size(s, &sizes, 64, "bc_x").is_ok());
        }
        for s in [0, 4, 31, 36, 40, 52, 60, 63, 65, 1000] {
            let e = check_size(s, &sizes, 64, "bc_x").unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains("bc_x.struct_size") && m.contains("32, 48, 56, 64"),
                "{m}"
            );
        }
    }
}
