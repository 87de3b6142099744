//! Helpers of the tests that hand finished blocks to a decoder on the (emulated) device
//! (`tests/decode_handoff.rs`, `tests/decode_handoff_multi.rs`).
#![allow(dead_code)]

use blockcascade::backend::cuda::{handoff_waits, set_session_options, CudaOptions};
use blockcascade::decode::{hold_device_decodes, BackgroundDecoder, DecodeDevice, Decoder};
use blockcascade::executor::Generator;
use blockcascade::{Engine, PromptEmbeds, RunReport};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of the decoder's non-finite flag, read back after each block handed off on the device.
pub const FLAG_BYTES: usize = 4;

/// The CUDA options and the counters are process-wide: one test at a time.
static LOCK: Mutex<()> = Mutex::new(());

/// Takes the lock, puts the CUDA backend on emulated devices; the tiny engine and decoder.
pub fn emulated() -> (MutexGuard<'static, ()>, Engine, Arc<Decoder>) {
    let l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    set_session_options(Some(CudaOptions {
        emulate: true,
        ..CudaOptions::default()
    }));
    let engine = Engine::open(None).unwrap();
    (l, engine, Arc::new(Decoder::tiny_taehv(0)))
}

/// Prompt embeddings large enough (finite) that the tiny model's blocks overflow to inf/NaN.
pub fn overflowing_prompt(engine: &Engine) -> PromptEmbeds {
    let mut p = PromptEmbeds::builtin(engine.config(), 2);
    p.data.iter_mut().for_each(|v| *v = v.signum() * f32::MAX);
    p
}

/// The error a run must end with: the typed non-finite-latents error.
pub fn assert_non_finite<T>(r: blockcascade::Result<T>, what: &str) {
    match r {
        Err(e @ blockcascade::Error::Format(_)) if e.to_string().contains("non-finite") => {}
        Err(e) => panic!("{what}: {e:?}"),
        Ok(_) => panic!("{what}: non-finite latents decoded without an error"),
    }
}

/// A decode thread on `device` collecting the RGB8 frames of `(h, w)` latents pushed to it.
pub fn rgb_thread(
    decoder: &Arc<Decoder>,
    device: DecodeDevice,
    (h, w): (usize, usize),
) -> BackgroundDecoder<Vec<u8>> {
    BackgroundDecoder::spawn_on(
        decoder.clone(),
        device,
        (h, w),
        false,
        Vec::new(),
        |acc: &mut Vec<u8>, out| {
            acc.extend_from_slice(&out.rgb);
            Ok(())
        },
    )
    .expect("decode thread")
}

/// Runs `f` with every decode thread holding its first block of device latents until the
/// DiT has had to wait for a reader ([`handoff_waits`] grows; at most 2 minutes), then lets
/// them go. Returns `f`'s result and whether the DiT waited.
pub fn with_held_decoder<T>(f: impl FnOnce() -> T) -> (T, bool) {
    let w0 = handoff_waits();
    hold_device_decodes(true);
    let release = std::thread::spawn(move || {
        let start = Instant::now();
        while handoff_waits() == w0 && start.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(2));
        }
        hold_device_decodes(false);
    });
    let r = f();
    release.join().expect("release thread");
    (r, handoff_waits() > w0)
}

/// What [`decode_run`] gave: each block's host latents, whether it came with device latents,
/// how many blocks carried a note of the host path, the run's report and the RGB8 frames.
pub struct Decoded {
    pub latents: Vec<Vec<f32>>,
    pub on_device: Vec<bool>,
    pub notes: usize,
    pub report: RunReport,
    pub rgb: Vec<u8>,
}

/// Runs `gen` for `blocks` blocks, pushing each finished block to the decode thread `bg`, and
/// waits for the decode: the generation's or the decoder's error, if any.
pub fn decode_run(
    gen: &Generator,
    blocks: usize,
    mut bg: BackgroundDecoder<Vec<u8>>,
) -> blockcascade::Result<Decoded> {
    let (mut latents, mut on_device, mut notes) = (Vec::new(), Vec::new(), 0);
    let mut err = None;
    let report = gen.run(blocks, |b| {
        notes += usize::from(b.handoff_note.is_some());
        latents.push(b.latents.to_vec());
        on_device.push(b.device.is_some());
        bg.push_block(b).map_err(|e| err = Some(e)).is_ok()
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let rgb = bg.finish()?;
    Ok(Decoded {
        latents,
        on_device,
        notes,
        report,
        rgb,
    })
}
