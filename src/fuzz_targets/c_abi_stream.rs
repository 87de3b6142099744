//! Fuzz target of the C ABI's live streams: `bc_stream_options` and `bc_stream_block` from
//! bytes (their `struct_size` included) and a sequence of stream calls on a session.

use super::{shared_engine, status, Session};
use crate::ffi::sys::*;
use crate::ffi::{
    bc_session_generate, bc_session_options_default, bc_stream_close, bc_stream_next,
    bc_stream_open, bc_stream_options_default, bc_stream_switch_prompt,
    bc_stream_switch_prompt_text,
};
use crate::{Error, Result};
use std::mem::size_of;

/// Most calls one input makes on its stream (each waits at most [`WAIT_MS`]).
const MAX_OPS: usize = 16;
/// The longest `bc_stream_next` timeout used (ms): the time per input stays bounded.
const WAIT_MS: i32 = 2;

/// The C ABI's live streams, from bytes:
///
/// | bytes  | meaning                                                                       |
/// |--------|-------------------------------------------------------------------------------|
/// | 0..24  | a `bc_stream_options`' first 24 bytes as laid out in memory (`struct_size`    |
/// |        | first; the fields after them keep their defaults)                             |
/// | 24..28 | `bc_stream_block.struct_size` for every `bc_stream_next`                      |
/// | 28     | bits 0..4: the session's `local_attn` (0: `-1`, global, which a stream        |
/// |        | refuses, else 1..15); bits 4..6: `want_latents` (0: default 1, 1: 0, 2: 1, 3: 2) |
/// | 29..   | calls, one byte each (and their arguments): `% 5` = 0 next (no wait), 1 next  |
/// |        | (2 ms), 2 switch embeddings (rows, cols bytes follow), 3 switch text (a       |
/// |        | length byte and the text follow), 4 `bc_session_generate` (must be refused)   |
///
/// Missing bytes are zeros. Oracles: blocks arrive with consecutive indices from 0 and the
/// session's latent shape (no latents without `want_latents`; RGB8 pixels with `want_pixels`); a busy session refuses to generate; a closed stream's handle is
/// refused by `bc_stream_next` and a second close is harmless.
pub fn c_abi_stream(bytes: &[u8]) -> Result<()> {
    run(bytes, WAIT_MS).map(|_| ())
}

/// [`c_abi_stream`] with `wait_ms` for the waiting `bc_stream_next` calls, returning the
/// number of blocks handed out. Tests wait longer than the fuzzer so that a loaded machine
/// cannot make them miss a block.
fn run(bytes: &[u8], wait_ms: i32) -> Result<u64> {
    let mut head = [0u8; 29];
    let n = bytes.len().min(head.len());
    head[..n].copy_from_slice(&bytes[..n]);
    // The first 24 bytes of the options (their first version); `reserved` keeps its default,
    // `want_latents` comes from byte 28.
    let mut sopts = bc_stream_options_default();
    // SAFETY: bc_stream_options is integers and a double, at least 24 bytes: any 24 bytes at
    // its start leave a valid value.
    unsafe {
        std::ptr::copy_nonoverlapping(
            head.as_ptr(),
            (&mut sopts as *mut bc_stream_options).cast::<u8>(),
            24,
        )
    };
    match head[28] / 16 % 4 {
        0 => {}
        v => sopts.want_latents = u32::from(v - 1),
    }
    let block_size = u32::from_le_bytes([head[24], head[25], head[26], head[27]]);
    let mut o = bc_session_options_default();
    (o.height, o.width) = (2, 2);
    o.local_attn = match head[28] % 16 {
        0 => -1,
        v => i32::from(v),
    };
    shared_engine()?;
    let sess = Session::open(&o)?;
    let mut st = std::ptr::null_mut();
    // SAFETY: a live session, full-sized options, a valid out pointer.
    status(unsafe { bc_stream_open(sess.0, &sopts, &mut st) })?;
    let ops = bytes.get(29..).unwrap_or_default();
    // A first-version struct (24 bytes) leaves `want_latents` at the library's default, 1.
    let has_latents_field =
        sopts.struct_size as usize > std::mem::offset_of!(bc_stream_options, want_latents);
    let want = (
        !has_latents_field || sopts.want_latents == 1,
        sopts.want_pixels == 1,
    );
    let result = drive(st, &sess, block_size, ops, wait_ms, want);
    bc_stream_close(st);
    bc_stream_close(st);
    // SAFETY: an all-zero block is a valid value; the struct is full-sized.
    let mut out: bc_stream_block = unsafe { std::mem::zeroed() };
    out.struct_size = size_of::<bc_stream_block>() as u32;
    // SAFETY: a closed handle (refused by lookup) and a full-sized, writable struct.
    if status(unsafe { bc_stream_next(st, 0, &mut out) }).is_ok() {
        return Err(Error::Internal(
            "bc_stream_next accepted a closed stream".into(),
        ));
    }
    result
}

/// Runs the calls of `ops` on the open stream `st` of session `sess`; returns the number of
/// blocks handed out.
fn drive(
    st: *mut bc_stream,
    sess: &Session,
    block_size: u32,
    mut ops: &[u8],
    wait_ms: i32,
    want: (bool, bool),
) -> Result<u64> {
    let mut next_index = 0u64;
    let mut calls = 0;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        calls += 1;
        if calls > MAX_OPS {
            break;
        }
        match op % 5 {
            0 | 1 => {
                // SAFETY: an all-zero block is a valid value; the struct is full-sized.
                let mut out: bc_stream_block = unsafe { std::mem::zeroed() };
                out.struct_size = block_size;
                let wait = if op % 5 == 0 { 0 } else { wait_ms };
                // SAFETY: a live stream and a full-sized, writable struct.
                let r = unsafe { bc_stream_next(st, wait, &mut out) };
                if r == BC_OK {
                    // A struct of another accepted size is only written, not checked.
                    if block_size as usize == size_of::<bc_stream_block>() {
                        check_block(&out, next_index, want)?;
                    }
                    next_index += 1;
                }
            }
            2 => {
                let (rows, cols) = (take(&mut ops) as u32, take(&mut ops) as u32);
                let embeds = vec![0.01f32; (rows * cols) as usize];
                let mut from = 0u64;
                // SAFETY: `rows * cols` readable floats and a writable u64.
                let r =
                    unsafe { bc_stream_switch_prompt(st, embeds.as_ptr(), rows, cols, &mut from) };
                if r == BC_OK && from < next_index {
                    return Err(Error::Internal(format!(
                        "a switch applies from block {from}, but block {next_index} was handed out"
                    )));
                }
            }
            3 => {
                let len = (take(&mut ops) as usize).min(ops.len());
                let mut text: Vec<u8> = ops[..len].iter().map(|&c| c.max(1)).collect();
                ops = &ops[len..];
                text.push(0);
                let mut from = 0u64;
                // SAFETY: a NUL-terminated string and a writable u64.
                let _ =
                    unsafe { bc_stream_switch_prompt_text(st, text.as_ptr().cast(), &mut from) };
            }
            _ => {
                // SAFETY: a live session; the callback is never called when refused.
                let r = unsafe { bc_session_generate(sess.0, 1, None, std::ptr::null_mut()) };
                if r == BC_OK {
                    return Err(Error::Internal(
                        "a session with an open stream generated".into(),
                    ));
                }
            }
        }
    }
    Ok(next_index)
}

/// The next byte of `ops` (0 when none is left).
fn take(ops: &mut &[u8]) -> u8 {
    match ops.split_first() {
        Some((&b, rest)) => {
            *ops = rest;
            b
        }
        None => 0,
    }
}

/// A handed-out block: the expected index; with `want_latents` (`want.0`) the session's latent
/// shape and readable, finite latents, without it none; with `want_pixels` (`want.1`) readable
/// RGB8 frames.
fn check_block(b: &bc_stream_block, index: u64, want: (bool, bool)) -> Result<()> {
    let latents_ok = if want.0 {
        !b.latents.is_null() && b.channels == 16 && b.frames > 0
    } else {
        b.latents.is_null() && b.frames == 0
    };
    if b.block_index != index || !latents_ok || want.1 == b.rgb.is_null() {
        return Err(Error::Internal(format!(
            "block {} (expected {index}, want latents/pixels {want:?}): {} frames of {} \
             channels, latents {:?}, rgb {:?}",
            b.block_index, b.frames, b.channels, b.latents, b.rgb
        )));
    }
    if want.0 {
        let n = b.frames as usize * b.channels as usize * b.height as usize * b.width as usize;
        // SAFETY: the ABI promises `frames * channels * height * width` floats until the next
        // call.
        let v = unsafe { std::slice::from_raw_parts(b.latents, n) };
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::Internal(format!(
                "block {index} has non-finite latents"
            )));
        }
    }
    if want.1 {
        let n = b.pixel_frames as usize * b.pixel_height as usize * b.pixel_width as usize * 3;
        // SAFETY: the ABI promises `pixel_frames * pixel_height * pixel_width * 3` bytes until
        // the next call.
        let px = unsafe { std::slice::from_raw_parts(b.rgb, n) };
        std::hint::black_box(px.iter().map(|&c| u64::from(c)).sum::<u64>());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options, block size and `local_attn` of a seed, then its calls.
    fn input(pixels: u32, local_attn: u8, ops: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(size_of::<bc_stream_options>() as u32).to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&0f64.to_le_bytes());
        b.extend_from_slice(&pixels.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&(size_of::<bc_stream_block>() as u32).to_le_bytes());
        b.push(local_attn);
        b.extend_from_slice(ops);
        b
    }

    #[test]
    fn a_valid_input_streams_blocks_and_switches() {
        // next (waiting), a switch to a 1 x 2 prompt, next until two blocks came.
        let ops = [1, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4];
        // Waits return as soon as a block comes; the long bound only keeps a loaded machine
        // (CI, parallel tests) from turning a slow block into a failure.
        let blocks = run(&input(0, 6, &ops), 10_000).unwrap();
        assert!(blocks >= 2, "{blocks} blocks in 10 waits");
        assert!(run(&input(1, 6, &[1, 1, 1, 1]), 10_000).is_ok());
    }

    #[test]
    fn global_attention_and_bad_options_are_ordinary_errors() {
        assert!(matches!(
            c_abi_stream(&input(0, 0, &[1])),
            Err(Error::InvalidArgument(_))
        ));
        let mut zero_queue = input(0, 6, &[1]);
        zero_queue[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            c_abi_stream(&zero_queue),
            Err(Error::InvalidArgument(_))
        ));
    }
}
