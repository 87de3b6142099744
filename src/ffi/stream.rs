//! The C ABI of live streams (`bc_stream_*`): a [`Stream`] behind a registered handle.
//!
//! The handle's entry is shared (`Arc`) between the registry and the calls in progress, so
//! `bc_stream_close` on one thread removes the handle and cancels the stream while another
//! thread waits in `bc_stream_next`: that call returns `BC_ERR_CANCELLED` and drops the last
//! reference, which joins the worker and frees the session for other calls.

use super::sys::*;
use super::{
    check_size, guard, invalid, prompt_text, read_prompt, read_struct, register, registry,
    with_session, write_struct, Failure, Object, Session,
};
use crate::noise::{NoiseSource, RecordedNoise};
use crate::stream::{Stream, StreamBlock, StreamControl, StreamOptions};
use crate::{Engine, Error, Result};
use std::ffi::c_char;
use std::mem::size_of;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

/// The published `struct_size`s of the stream structs, oldest first: `bc_stream_options`
/// grew `reserved` (its first version's padding, made explicit) and `want_latents`.
const STREAM_OPTIONS_SIZES: &[usize] = &[
    std::mem::offset_of!(bc_stream_options, want_latents),
    size_of::<bc_stream_options>(),
];
const STREAM_BLOCK_SIZES: &[usize] = &[size_of::<bc_stream_block>()];

/// What a `bc_stream` handle holds.
pub(super) struct StreamEntry {
    /// The stream and the block last handed out (its buffers back the caller's pointers).
    /// Locked by `bc_stream_next` only.
    inner: Mutex<(Stream, Option<StreamBlock>)>,
    /// Switches and cancel, without the lock above.
    control: StreamControl,
    /// The engine (prompt checks) and the session's text encoder, for the switches.
    engine: Engine,
    text: Option<Arc<crate::text::TextEncoder>>,
    /// `bc_stream_options::want_latents`: blocks carry their latents.
    want_latents: bool,
    /// Declared last: dropped after the stream (whose drop joins the worker).
    _release: SessionRelease,
}

/// Makes the session usable again when the stream's entry is dropped.
struct SessionRelease(Arc<Mutex<Session>>);

impl Drop for SessionRelease {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).streaming = false;
    }
}

fn default_stream_options() -> bc_stream_options {
    bc_stream_options {
        struct_size: size_of::<bc_stream_options>() as u32,
        queue_blocks: 2,
        target_fps: 0.0,
        want_pixels: 0,
        reserved: 0,
        want_latents: 1,
    }
}

fn lookup_stream(h: *const bc_stream) -> Result<Arc<StreamEntry>> {
    if h.is_null() {
        return invalid("the stream handle is NULL");
    }
    match registry().get(&(h as usize)) {
        Some(Object::Stream(s)) => Ok(s.clone()),
        Some(other) => invalid(format!("the handle is a {}, not a bc_stream", other.kind())),
        None => invalid(format!(
            "{h:p} is not a live bc_stream handle (closed, or never returned by bc_stream_open)"
        )),
    }
}

/// `bc_stream_options bc_stream_options_default(void)`.
#[no_mangle]
pub extern "C" fn bc_stream_options_default() -> bc_stream_options {
    default_stream_options()
}

/// Starts a live stream on a session; the session is busy until the stream is closed.
///
/// # Safety
/// `opts` is NULL or points to a `bc_stream_options` of at least its `struct_size` bytes;
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn bc_stream_open(
    s: *mut bc_session,
    opts: *const bc_stream_options,
    out: *mut *mut bc_stream,
) -> bc_status {
    guard("bc_stream_open", || {
        let session = super::lookup_session(s)?;
        if out.is_null() {
            return invalid("out is NULL");
        }
        let o = if opts.is_null() {
            default_stream_options()
        } else {
            read_struct(
                opts,
                default_stream_options(),
                STREAM_OPTIONS_SIZES,
                "bc_stream_options",
            )?
        };
        let want_pixels = match o.want_pixels {
            0 => false,
            1 => true,
            v => return invalid(format!("want_pixels must be 0 or 1, got {v}")),
        };
        let want_latents = match o.want_latents {
            0 if !want_pixels => {
                return invalid("want_latents 0 needs want_pixels 1 (a block would carry nothing)")
            }
            0 => false,
            1 => true,
            v => return invalid(format!("want_latents must be 0 or 1, got {v}")),
        };
        let entry = with_session(s, |sess| {
            // The session's decoder, else the engine's built-in one (shared by its streams).
            let decoder = match (want_pixels, &sess.frames) {
                (false, _) => None,
                (true, Some(f)) => Some(f.decoder.clone()),
                (true, None) => Some(sess.decoders.get(None)?),
            };
            let sopts = StreamOptions {
                host_latents: want_latents,
                queue_blocks: o.queue_blocks as usize,
                target_fps: o.target_fps,
                decoder,
                decoder_device: Some(sess.decoder_device),
                switch_encode_threads: Some(0),
                text_encoder: sess.text.clone(),
            };
            let noise = match &sess.noise {
                Some(r) => NoiseSource::Recorded(RecordedNoise::clone(r)),
                None => NoiseSource::Seeded(sess.seed),
            };
            let stream = Stream::open(
                &sess.engine,
                sess.opts.clone(),
                noise,
                sess.prompt.clone(),
                sopts,
            )?;
            sess.streaming = true;
            Ok(StreamEntry {
                control: stream.control(),
                inner: Mutex::new((stream, None)),
                engine: sess.engine.clone(),
                text: sess.text.clone(),
                want_latents,
                _release: SessionRelease(session.clone()),
            })
        })?;
        *out = register(Object::Stream(Arc::new(entry))) as *mut bc_stream;
        Ok(())
    })
}

/// Takes the next block (see the header for the timeout and pointer lifetime rules).
///
/// # Safety
/// `out` is NULL or points to a writable `bc_stream_block` of at least its `struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn bc_stream_next(
    st: *mut bc_stream,
    timeout_ms: i32,
    out: *mut bc_stream_block,
) -> bc_status {
    guard("bc_stream_next", || {
        let entry = lookup_stream(st)?;
        if out.is_null() {
            return invalid("out is NULL");
        }
        check_size(
            std::ptr::read(out as *const u32) as usize,
            STREAM_BLOCK_SIZES,
            size_of::<bc_stream_block>(),
            "bc_stream_block",
        )?;
        let timeout = match timeout_ms {
            -1 => None,
            t if t >= 0 => Some(Duration::from_millis(t as u64)),
            t => return invalid(format!("timeout_ms must be -1 (wait) or >= 0, got {t}")),
        };
        let mut inner = match entry.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return invalid(
                    "another thread is already waiting in bc_stream_next on this stream",
                )
            }
        };
        let (stream, last) = &mut *inner;
        *last = None;
        let block = match stream.next_block(timeout)? {
            Some(b) => last.insert(b),
            None => {
                return Err(Failure {
                    status: BC_ERR_TIMEOUT,
                    msg: format!("no block within {timeout_ms} ms (the stream goes on)"),
                })
            }
        };
        // Without want_latents: none, also where they came to the host anyway (a decoder
        // that is not on the DiT's device).
        let (latents, shape) = if entry.want_latents {
            let s = [block.frames, block.channels, block.height, block.width];
            (block.latents.as_ptr(), s.map(|v| v as u32))
        } else {
            (std::ptr::null(), [0; 4])
        };
        let value = bc_stream_block {
            struct_size: size_of::<bc_stream_block>() as u32,
            block_index: block.index,
            latents,
            frames: shape[0],
            channels: shape[1],
            height: shape[2],
            width: shape[3],
            rgb: block.rgb.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
            pixel_frames: block.pixel_frames as u32,
            pixel_height: block.pixel_height as u32,
            pixel_width: block.pixel_width as u32,
        };
        write_struct(out, value, STREAM_BLOCK_SIZES, "bc_stream_block")?;
        Ok(())
    })
}

/// Writes the block a switch applies from to `applies_from` (NULL: not written).
///
/// # Safety
/// `applies_from` is NULL or writable.
unsafe fn report_switch(applies_from: *mut u64, r: Result<u64>) -> Result<(), Failure> {
    let block = r.map_err(|e| match e {
        Error::Cancelled => Failure {
            status: BC_ERR_CANCELLED,
            msg: "the stream has stopped (closed, or ended after an error)".into(),
        },
        e => e.into(),
    })?;
    if !applies_from.is_null() {
        *applies_from = block;
    }
    Ok(())
}

/// Switches the prompt from the next block to start on.
///
/// # Safety
/// `embeds` is NULL or points to `rows * cols` readable floats; `applies_from` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn bc_stream_switch_prompt(
    st: *mut bc_stream,
    embeds: *const f32,
    rows: u32,
    cols: u32,
    applies_from: *mut u64,
) -> bc_status {
    guard("bc_stream_switch_prompt", || {
        let entry = lookup_stream(st)?;
        let p = read_prompt(&entry.engine, embeds, rows, cols)?;
        report_switch(applies_from, entry.control.switch_prompt(&p))
    })
}

/// Switches to a text prompt from the next block to start on.
///
/// # Safety
/// `utf8` is NULL or a NUL-terminated string; `applies_from` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn bc_stream_switch_prompt_text(
    st: *mut bc_stream,
    utf8: *const c_char,
    applies_from: *mut u64,
) -> bc_status {
    guard("bc_stream_switch_prompt_text", || {
        let entry = lookup_stream(st)?;
        // Encoded on the stream's switch encoder pool, ordered with the other switches.
        let (_, text) = prompt_text(entry.text.as_deref(), utf8)?;
        report_switch(applies_from, entry.control.switch_prompt_text(text))
    })
}

/// Stops and closes a stream (NULL or unknown: no-op).
#[no_mangle]
pub extern "C" fn bc_stream_close(st: *mut bc_stream) {
    let _ = catch_unwind(|| {
        let mut reg = registry();
        let h = st as usize;
        if !matches!(reg.get(&h), Some(Object::Stream(_))) {
            return;
        }
        let removed = reg.remove(&h);
        drop(reg);
        if let Some(Object::Stream(entry)) = &removed {
            // Wakes a bc_stream_next waiting on another thread; whoever drops the last
            // reference joins the worker.
            entry.control.cancel();
        }
        drop(removed);
    });
}
