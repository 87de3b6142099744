//! Finished blocks handed from the DiT to a decoder on the same (emulated) device: the frames
//! are bit for bit those of the latents downloaded and pushed from the host, the latents cross
//! to the host only when they are wanted, and a decoder slower than the DiT keeps the block's
//! slot from being reused until it has read it. Small shapes: the built-in tiny model and
//! decoder.

use blockcascade::backend::cuda::device::host_traffic;
use blockcascade::backend::cuda::set_session_options;
use blockcascade::config::{BackendKind, Schedule};
use blockcascade::decode::{DecodeDevice, Decoder};
use blockcascade::executor::Generator;
use blockcascade::{Engine, GenerateOptions, NoiseSource, PromptEmbeds, Stream, StreamOptions};
use std::sync::Arc;

#[path = "common/handoff.rs"]
mod handoff;
use handoff::{
    assert_non_finite, decode_run, emulated, overflowing_prompt, rgb_thread, with_held_decoder,
    FLAG_BYTES,
};

/// Latent size (the tiny TAEHV makes it 32x32 pixels).
const H: usize = 4;
const W: usize = 4;
/// Bytes of one block's latents (3 frames).
const BLOCK_BYTES: usize = 3 * 16 * H * W * 4;

fn options() -> GenerateOptions {
    GenerateOptions {
        height: H,
        width: W,
        local_attn: Some(6),
        backend: BackendKind::Cuda,
        ..Default::default()
    }
}

/// A cascade (lag 1, several blocks in flight) with its context passes apart.
fn cascade() -> GenerateOptions {
    GenerateOptions {
        schedule: Schedule::Cascade { lag: 1 },
        separate_context_pass: true,
        ..options()
    }
}

/// What one run gave: each block's host latents, whether it came with device latents, the
/// RGB8 frames, and the bytes downloaded from every device during the run and its decode.
struct Run {
    latents: Vec<Vec<f32>>,
    on_device: Vec<bool>,
    rgb: Vec<u8>,
    downloaded: usize,
}

/// `blocks` blocks of the tiny model on the emulated CUDA backend, decoded on the emulated
/// device by a decode thread; `handoff`: [`Generator::hand_off_on_device`]`(host_latents)`.
fn run(engine: &Engine, decoder: &Arc<Decoder>, handoff: Option<bool>, blocks: usize) -> Run {
    run_with(engine, decoder, options(), handoff, blocks)
}

/// [`run`] with options `o`.
fn run_with(
    engine: &Engine,
    decoder: &Arc<Decoder>,
    o: GenerateOptions,
    handoff: Option<bool>,
    blocks: usize,
) -> Run {
    let prompt = PromptEmbeds::builtin(engine.config(), 2);
    try_run(engine, decoder, o, &prompt, handoff, blocks).expect("run")
}

/// [`run_with`] of `prompt`: the generation's or the decoder's error, if any.
fn try_run(
    engine: &Engine,
    decoder: &Arc<Decoder>,
    o: GenerateOptions,
    prompt: &PromptEmbeds,
    handoff: Option<bool>,
    blocks: usize,
) -> blockcascade::Result<Run> {
    let mut gen =
        Generator::new(engine.model(), o, NoiseSource::Seeded(7), prompt).expect("generator");
    if let Some(host) = handoff {
        gen.hand_off_on_device(host);
    }
    let device = DecodeDevice::cuda_beside(&[]);
    assert!(matches!(device, DecodeDevice::Cuda { emulate: true, .. }));
    let bg = rgb_thread(decoder, device, (H, W));
    let t0 = host_traffic();
    let d = decode_run(&gen, blocks, bg)?;
    Ok(Run {
        latents: d.latents,
        on_device: d.on_device,
        rgb: d.rgb,
        downloaded: host_traffic().download_bytes - t0.download_bytes,
    })
}

#[test]
fn non_finite_latents_handed_off_on_the_device_are_an_error() {
    let (_l, engine, decoder) = emulated();
    let bad = overflowing_prompt(&engine);
    // On the host the executor's check finds them; handed off (latents on the host too, or
    // not), the decoder's latent-input kernel does, and the run ends with the same error.
    for handoff in [None, Some(true), Some(false)] {
        let r = try_run(&engine, &decoder, options(), &bad, handoff, 2);
        assert_non_finite(r, &format!("handoff {handoff:?}"));
    }
    // A stream without host latents ends with that error instead of garbage frames.
    let sopts = StreamOptions {
        decoder: Some(decoder.clone()),
        host_latents: false,
        ..Default::default()
    };
    let mut st = Stream::open(&engine, options(), NoiseSource::Seeded(3), bad, sopts).unwrap();
    let mut got = None;
    for _ in 0..3 {
        match st.next_block(None) {
            Ok(Some(b)) => assert!(b.rgb.is_none(), "frames of non-finite latents"),
            Ok(None) => break,
            Err(e) => {
                got = Some(e);
                break;
            }
        }
    }
    let e = got.expect("the stream ended without an error");
    assert!(
        matches!(e, blockcascade::Error::Format(_)) && e.to_string().contains("non-finite"),
        "{e:?}"
    );
    // Clean latents after it decode as before (the flag is cleared per block).
    let clean = run(&engine, &decoder, Some(false), 1);
    assert!(!clean.rgb.is_empty());
    set_session_options(None);
}

#[test]
fn finished_blocks_go_to_the_decoder_on_the_device() {
    let (_l, engine, decoder) = emulated();
    let blocks = 3;
    // Warm-up: weights and decoder uploaded once, so that the runs below move the same bytes
    // apart from the latents.
    run(&engine, &decoder, None, 1);

    // Reference: every block downloaded, then pushed up to the decoder.
    let host = run(&engine, &decoder, None, blocks);
    assert_eq!(host.latents.len(), blocks);
    assert!(host.on_device.iter().all(|d| !d));
    assert!(host.latents.iter().all(|l| l.len() * 4 == BLOCK_BYTES));
    assert!(!host.rgb.is_empty());

    // Handed off, latents wanted too: the same latents and frames, the same downloads.
    let both = run(&engine, &decoder, Some(true), blocks);
    assert!(both.on_device.iter().all(|&d| d));
    assert!(
        both.latents == host.latents,
        "the downloaded latents differ"
    );
    assert!(both.rgb == host.rgb, "device hand-off changed the frames");
    assert_eq!(both.downloaded, host.downloaded + blocks * FLAG_BYTES);

    // Handed off alone: the same frames, and no block's latents came to the host.
    let dev = run(&engine, &decoder, Some(false), blocks);
    assert!(dev.on_device.iter().all(|&d| d));
    assert!(dev.latents.iter().all(Vec::is_empty));
    assert!(dev.rgb == host.rgb, "device hand-off changed the frames");
    println!(
        "downloads: {} B with the latents, {} B without ({blocks} blocks of {BLOCK_BYTES} B)",
        host.downloaded, dev.downloaded
    );
    // A handed-off block's latents stay on the device; its non-finite flag comes back.
    assert_eq!(
        host.downloaded - dev.downloaded,
        blocks * (BLOCK_BYTES - FLAG_BYTES)
    );

    // A decoder slower than the DiT: it holds block 0 until the DiT has had to wait for a
    // slot still being read; if a slot were reused early, the frames would differ.
    let blocks = 5;
    let host = run(&engine, &decoder, None, blocks);
    let (slow, waited) = with_held_decoder(|| run(&engine, &decoder, Some(false), blocks));
    assert!(waited, "the DiT never waited for the decoder");
    assert!(slow.rgb == host.rgb, "a slot was reused before its decode");

    // A cascade: several blocks in flight, context passes apart; the same frames.
    let host = run_with(&engine, &decoder, cascade(), None, 3);
    let dev = run_with(&engine, &decoder, cascade(), Some(false), 3);
    assert!(dev.on_device.iter().all(|&d| d));
    assert!(
        dev.rgb == host.rgb,
        "device hand-off changed the cascade's frames"
    );
    set_session_options(None);
}

#[test]
fn a_stream_without_host_latents_hands_out_the_same_frames() {
    let (_l, engine, decoder) = emulated();
    let frames = |host_latents: bool| {
        let prompt = PromptEmbeds::builtin(engine.config(), 2);
        let sopts = StreamOptions {
            decoder: Some(decoder.clone()),
            host_latents,
            ..Default::default()
        };
        let mut st =
            Stream::open(&engine, options(), NoiseSource::Seeded(3), prompt, sopts).unwrap();
        let mut out = Vec::new();
        for _ in 0..2 {
            let b = st.next_block(None).unwrap().unwrap();
            assert_eq!(b.latents.is_empty(), !host_latents);
            out.push(b.rgb.unwrap_or_default());
        }
        st.cancel();
        out
    };
    let with = frames(true);
    assert!(with.iter().all(|f| !f.is_empty()));
    assert!(
        frames(false) == with,
        "the frames differ without host latents"
    );
    set_session_options(None);
}
