//! Finished blocks handed from a DiT on two (emulated) devices to a decoder on one of them:
//! blocks final on the decoder's device are read in place, the others are copied device to
//! device first; the frames are bit for bit those of the latents downloaded and pushed from the
//! host, the latents no longer cross to the host, and a decoder slower than the DiT makes the
//! DiT wait instead of reading rewritten latents. Joint and lagged K/V exchange, cascades;
//! small shapes: the built-in tiny model and decoder.

use blockcascade::backend::cuda::device::host_traffic;
use blockcascade::backend::cuda::emu_device::{set_stream_order, StreamOrder};
use blockcascade::backend::cuda::{
    deny_peer_handoff, handoff_relays, peer_copy_bytes, set_session_options,
};
use blockcascade::config::{BackendKind, KvExchange, Schedule};
use blockcascade::decode::{DecodeDevice, Decoder};
use blockcascade::executor::Generator;
use blockcascade::{Engine, GenerateOptions, NoiseSource, PromptEmbeds};
use std::sync::Arc;

#[path = "common/handoff.rs"]
mod handoff;
use handoff::{
    assert_non_finite, decode_run, emulated, overflowing_prompt, rgb_thread, with_held_decoder,
    FLAG_BYTES,
};

/// Latent size (the tiny TAEHV makes it 16x16 pixels).
const H: usize = 2;
const W: usize = 2;
/// Bytes of one block's latents (3 frames).
const BLOCK_BYTES: usize = 3 * 16 * H * W * 4;
/// A cascade (lag 1, several blocks in flight, context passes apart) on 2 devices; 2 steps
/// per block keep it fast.
fn options(xch: KvExchange) -> GenerateOptions {
    GenerateOptions {
        height: H,
        width: W,
        steps: vec![1000.0, 500.0],
        local_attn: Some(6),
        backend: BackendKind::Cuda,
        devices: 2,
        kv_exchange: xch,
        schedule: Schedule::Cascade { lag: 1 },
        separate_context_pass: true,
        ..Default::default()
    }
}

/// The decoder on GPU `ordinal` (emulated).
fn device(ordinal: usize) -> DecodeDevice {
    DecodeDevice::Cuda {
        ordinal,
        emulate: true,
    }
}

/// What one run gave: whether each block came with device latents, each block's host latents,
/// the RGB8 frames, the bytes downloaded from every device during the run and its decode, the
/// bytes copied between devices, the blocks relayed to the decoder's device, and the run's
/// note of blocks that took the host path.
struct Run {
    on_device: Vec<bool>,
    latents: Vec<Vec<f32>>,
    rgb: Vec<u8>,
    downloaded: usize,
    peer_bytes: usize,
    relays: usize,
    note: Option<String>,
    /// Blocks that came with a note of the host path.
    notes: usize,
}

/// `blocks` blocks of the tiny model on 2 emulated devices, decoded on emulated GPU `dec` by
/// a decode thread; `handoff`: `Some(host_latents)` hands the blocks off on the device.
fn run(
    engine: &Engine,
    decoder: &Arc<Decoder>,
    o: GenerateOptions,
    prompt: &PromptEmbeds,
    (dec, handoff): (usize, Option<bool>),
    blocks: usize,
) -> blockcascade::Result<Run> {
    let mut gen =
        Generator::new(engine.model(), o, NoiseSource::Seeded(7), prompt).expect("generator");
    if let Some(host) = handoff {
        assert!(gen.hand_off_to_decoder(device(dec), host), "not beside");
    }
    let bg = rgb_thread(decoder, device(dec), (H, W));
    let (t0, p0, r0) = (host_traffic(), peer_copy_bytes(), handoff_relays());
    let d = decode_run(&gen, blocks, bg)?;
    Ok(Run {
        on_device: d.on_device,
        latents: d.latents,
        rgb: d.rgb,
        downloaded: host_traffic().download_bytes - t0.download_bytes,
        peer_bytes: peer_copy_bytes() - p0,
        relays: handoff_relays() - r0,
        note: d.report.handoff_note,
        notes: d.notes,
    })
}

#[test]
fn blocks_of_two_devices_reach_the_decoder_without_the_host() {
    let (_l, engine, decoder) = emulated();
    let prompt = PromptEmbeds::builtin(engine.config(), 2);
    let blocks = 2;
    for xch in [KvExchange::Joint, KvExchange::Lagged] {
        let o = options(xch);
        let go = |dec, handoff| {
            run(
                &engine,
                &decoder,
                o.clone(),
                &prompt,
                (dec, handoff),
                blocks,
            )
        };
        // Warm-up: weights and decoder uploaded once, so the runs below move the same bytes
        // apart from the latents.
        if xch == KvExchange::Joint {
            go(0, None).unwrap();
        }
        let mut relays = 0;
        for dec in [0, 1] {
            // Reference: every block downloaded, then pushed up to the decoder.
            let host = go(dec, None).unwrap();
            assert!(host.on_device.iter().all(|d| !d));
            assert!(host.latents.iter().all(|l| l.len() * 4 == BLOCK_BYTES));
            assert!(!host.rgb.is_empty());
            assert_eq!(host.relays, 0);

            // Handed off with the latents (as on one device, so once): the same latents and
            // frames, no upload.
            if xch == KvExchange::Joint && dec == 1 {
                let both = go(dec, Some(true)).unwrap();
                assert!(both.on_device.iter().all(|&d| d));
                assert!(
                    both.latents == host.latents,
                    "{xch:?}, decoder {dec}: latents"
                );
                assert!(
                    both.rgb == host.rgb,
                    "{xch:?}, decoder {dec}: frames differ"
                );
                assert_eq!(both.downloaded, host.downloaded + blocks * FLAG_BYTES);
            }

            // Handed off alone: the same frames, and no block's latents came to the host.
            let dev = go(dec, Some(false)).unwrap();
            assert!(dev.on_device.iter().all(|&d| d));
            assert!(dev.latents.iter().all(Vec::is_empty));
            assert!(dev.rgb == host.rgb, "{xch:?}, decoder {dec}: frames differ");
            assert_eq!(
                host.downloaded - dev.downloaded,
                blocks * (BLOCK_BYTES - FLAG_BYTES),
                "{xch:?}, decoder {dec}: the latents still cross the host"
            );
            // Blocks final on the other device came over by one peer copy each.
            assert_eq!(dev.peer_bytes, host.peer_bytes + dev.relays * BLOCK_BYTES);
            assert_eq!((dev.note.as_deref(), dev.notes), (None, 0));
            println!(
                "{xch:?}, decoder on device {dec}: downloads {} B host path, {} B handed off; \
                 {} of {blocks} blocks relayed device to device",
                host.downloaded, dev.downloaded, dev.relays
            );
            relays += dev.relays;
            if dev.relays > 0 && xch == KvExchange::Joint {
                // Deferred stream orders (work runs only when the host waits, in a random
                // order among what the marks allow): the marks alone order the relay copy
                // between the flow step and the decode.
                for seed in [1, 2] {
                    set_stream_order(StreamOrder::Random(seed)).unwrap();
                    let r = go(dec, Some(false));
                    set_stream_order(StreamOrder::Immediate).unwrap();
                    assert!(r.unwrap().rgb == host.rgb, "stream order seed {seed}");
                }
            }
        }
        // Each block is final on one device: in place for one decoder, relayed for the other.
        assert_eq!(relays, blocks, "{xch:?}: relays");
    }
    set_session_options(None);
}

#[test]
fn without_peer_access_blocks_come_through_the_host() {
    let (_l, engine, decoder) = emulated();
    let prompt = PromptEmbeds::builtin(engine.config(), 2);
    let (o, dec, blocks) = (options(KvExchange::Joint), 1, 2);
    let host = run(&engine, &decoder, o.clone(), &prompt, (dec, None), blocks).unwrap();
    // Device 0 (where the blocks become final) "cannot reach" the decoder's device 1.
    deny_peer_handoff(true);
    let r = run(&engine, &decoder, o, &prompt, (dec, Some(false)), blocks);
    deny_peer_handoff(false);
    let r = r.unwrap();
    assert_eq!(r.relays, 0);
    assert!(
        r.on_device.iter().all(|d| !d),
        "handed off without peer access"
    );
    assert!(r.latents == host.latents, "the host path's latents");
    assert!(r.rgb == host.rgb, "the host path's frames");
    assert_eq!(r.downloaded, host.downloaded);
    let note = r.note.expect("no note of the host path");
    assert!(note.contains("no peer access"), "{note}");
    assert_eq!(r.notes, blocks, "a block without its note");
    set_session_options(None);
}

#[test]
fn a_slow_decoder_makes_the_dit_wait_for_relayed_blocks() {
    let (_l, engine, decoder) = emulated();
    let prompt = PromptEmbeds::builtin(engine.config(), 2);
    // Block 0 held by the decoder, blocks 1 and 2 queued: block 3 waits for a relay buffer.
    let blocks = 4;
    // Lagged exchange here (the relay does not depend on the exchange); the decoder on device
    // 1, where the tiny cascade's blocks come from device 0 (checked below).
    let (o, dec) = (options(KvExchange::Lagged), 1);
    let host = run(&engine, &decoder, o.clone(), &prompt, (dec, None), blocks).unwrap();
    // The decoder holds its first block until the DiT has had to wait for a buffer still
    // being read; if one were rewritten early, the frames would differ.
    let (slow, waited) = with_held_decoder(|| {
        run(&engine, &decoder, o, &prompt, (dec, Some(false)), blocks).unwrap()
    });
    assert!(waited, "the DiT never waited");
    assert_eq!(slow.relays, blocks, "not every block was relayed");
    assert!(
        slow.rgb == host.rgb,
        "a buffer was rewritten before its decode"
    );
    set_session_options(None);
}

#[test]
fn non_finite_latents_relayed_to_the_decoder_are_an_error() {
    let (_l, engine, decoder) = emulated();
    let bad = overflowing_prompt(&engine);
    // In place (decoder on device 0) and relayed (on device 1): the host path's error.
    for dec in [0, 1] {
        let o = options(KvExchange::Joint);
        let r = run(&engine, &decoder, o, &bad, (dec, Some(false)), 2);
        assert_non_finite(r, &format!("decoder {dec}"));
    }
    set_session_options(None);
}
