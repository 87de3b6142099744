//! The device decoders' steady state as CUDA graphs (`CudaDecoder`: one graph per walk (a
//! latent frame's, or TAEHV's block walk's over up to 4), captured once the causal state is
//! full), on the emulated device: long streams
//! of both decoders give, block for block, the bits of the eager decoder (graphs off), through
//! blocks of 1 to 5 latent frames, with and without f32 output; the device memory and the
//! number of graphs stay constant once the steady state is reached; and the work submitted
//! per block (and the host time to enqueue it) is printed for both paths
//! (`cargo test --test decode_graphs -- --nocapture`).

use blockcascade::backend::cuda::device::Gpu;
use blockcascade::backend::cuda::emu_device::{set_stream_order, StreamOrder};
use blockcascade::decode::{CudaDecoder, DecodeStats, Decoder, DecoderKind, DeviceFrames};
use blockcascade::rng::Rng;
use std::sync::Mutex;

/// The tests of this file run one at a time: the enqueue timing defers the emulated streams of
/// the whole process, and another test's waits would run (and time) its queued work.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Latent size of the streams (pixels 8x larger).
const H: usize = 2;
const W: usize = 3;

fn latents(frames: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..frames * 16 * H * W).map(|_| rng.normal()).collect()
}

fn decoder(dec: &Decoder, graphs: bool) -> CudaDecoder {
    let mut d = CudaDecoder::new(dec, Gpu::open_emulated().unwrap()).unwrap();
    d.set_graphs(graphs).unwrap();
    d.begin(H, W).unwrap();
    d
}

/// Pushes `lat` in blocks of `sizes` (f32 output too on every third block when `f32`) and
/// returns each block's frames with the stats and device memory after it.
fn stream(
    dev: &mut CudaDecoder,
    lat: &[f32],
    sizes: &[usize],
    f32: bool,
) -> Vec<(DeviceFrames, DecodeStats, usize)> {
    let per = 16 * H * W;
    let mut at = 0;
    let mut out = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let f = dev
            .push(&lat[at * per..(at + n) * per], n, f32 && i % 3 == 1)
            .unwrap();
        at += n;
        out.push((f, dev.stats(), dev.activation_bytes()));
    }
    out
}

/// 12 blocks, 20 latent frames: blocks of 1 and 2 through the first frames and the steady
/// state, a 5-frame block (two downloads).
const SIZES: [usize; 12] = [1, 2, 1, 1, 5, 1, 2, 1, 2, 1, 2, 1];

fn check_stream(kind: DecoderKind, dim: usize, eager_frames: u64, again: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dec = Decoder::synthetic(kind, dim, 11);
    let lat = latents(SIZES.iter().sum(), 5);
    let want = stream(&mut decoder(&dec, false), &lat, &SIZES, true);
    let mut dev = decoder(&dec, true);
    let got = stream(&mut dev, &lat, &SIZES, true);
    for (i, ((g, gs, _), (e, es, _))) in got.iter().zip(&want).enumerate() {
        assert!(g == e, "{kind}: block {i} differs from the eager decode");
        assert_eq!(es.graph_frames, 0, "graphs off");
        let _ = gs;
    }
    let last = got.last().unwrap().1;
    assert_eq!(
        last.eager_frames, eager_frames,
        "{kind}: only the first frames run eagerly"
    );
    assert_eq!(
        last.graph_frames + last.eager_frames,
        SIZES.iter().sum::<usize>() as u64
    );
    assert!(dev.graph_failure().is_none(), "{:?}", dev.graph_failure());
    // Bounded: no graph and no byte of device memory more once every kind of block (with and
    // without f32) has been seen in the steady state.
    // (The block walk: one graph per walk size, 1 to 4 latent frames, and output kind.)
    let graphs = dev.graph_count();
    assert!((1..=8).contains(&graphs), "{kind}: {graphs} graphs");
    let steady = got[5].2;
    for (i, (_, _, bytes)) in got.iter().enumerate().skip(5) {
        assert_eq!(*bytes, steady, "{kind}: device memory grew at block {i}");
    }
    // The same stream again on the same decoder (new graphs: the state's buffers may
    // differ): the same frames, no growth.
    if again {
        dev.begin(H, W).unwrap();
        let again = stream(&mut dev, &lat, &SIZES, true);
        assert!(
            again.iter().zip(&want).all(|(a, b)| a.0 == b.0),
            "{kind}: second stream"
        );
        assert_eq!(dev.activation_bytes(), steady, "{kind}: grew over streams");
    }
    println!(
        "MEMORY {kind} (latents {H}x{W}): eager {} B, graphs {} B of activations and stream buffers",
        want.last().unwrap().2,
        steady
    );
}

#[test]
fn taehv_stream_replays_graphs_bit_for_bit() {
    // Latent frame 0 (the MemBlocks empty, 3 frames trimmed) runs eagerly.
    check_stream(DecoderKind::Taehv, 4, 1, true);
}

#[test]
fn wan_vae_stream_replays_graphs_bit_for_bit() {
    // Latent frames 0-2 (the first two blocks) run eagerly: the caches fill (the `time_conv`s
    // start at frame 1 and hold two frames after frame 2).
    check_stream(DecoderKind::WanVae, 2, 3, false);
}

/// Work per steady block of 3 latent frames, eager and replayed, and the host time spent
/// enqueuing it. The emulated streams are deferred (`StreamOrder::CopiesLate`: work is queued
/// and runs when the host waits), so the time is the host's enqueue cost alone. Host-side
/// only: nothing here measures a GPU.
#[test]
fn launches_and_enqueue_time_per_block() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    set_stream_order(StreamOrder::CopiesLate).unwrap();
    for (kind, dim) in [(DecoderKind::Taehv, 4), (DecoderKind::WanVae, 2)] {
        let dec = Decoder::synthetic(kind, dim, 3);
        let sizes = [3; 4];
        let lat = latents(12, 9);
        let mut per_block = Vec::new();
        for graphs in [false, true] {
            let mut dev = decoder(&dec, graphs);
            let runs = stream(&mut dev, &lat, &sizes, false);
            // Blocks 2 and 3 are steady (all replays) either way.
            let (a, b) = (runs[1].1, runs[3].1);
            let n = 2.0;
            per_block.push((
                (b.submissions - a.submissions) as f64 / n,
                (b.downloads - a.downloads) as f64 / n,
                (b.enqueue_s - a.enqueue_s) / n * 1e6,
                b.graph_frames - a.graph_frames,
            ));
        }
        let ((es, ed, et, eg), (gs, gd, gt, gg)) = (per_block[0], per_block[1]);
        println!(
            "ENQUEUE {kind} per steady block of 3 latent frames: eager {es:.0} submissions, \
             {ed:.0} downloads, {et:.0} us host; graphs {gs:.0} submissions ({gg} frames \
             replayed over 2 blocks), {gd:.0} downloads, {gt:.0} us host"
        );
        assert_eq!(eg, 0);
        assert_eq!(gg, 6, "{kind}: every steady frame replayed");
        assert!(gs < es, "{kind}: fewer submissions with graphs");
    }
    set_stream_order(StreamOrder::Immediate).unwrap();
}
