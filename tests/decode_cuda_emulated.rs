//! The device decoders (`decode::CudaDecoder`: the decoder kernels of `cuda/conv.cu` and
//! `cuda/decode_ops.cu` on the backend's device abstraction) on the emulated device, TAEHV and
//! the Wan VAE, against upstream's golden output and the CPU decoder: whole video and block by
//! block, RGB8 bytes against `Video::to_rgb8` of the device's own f32 frames.

use blockcascade::backend::cuda::device::Gpu;
use blockcascade::bench::rel_l2;
use blockcascade::decode::{CudaDecoder, Decoder, DecoderKind, BLOCK_ROWS};
use blockcascade::tensorfile::TensorFile;
use blockcascade::video::to_rgb8;
use std::path::Path;

fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = TensorFile::open(path).unwrap();
    let shape = f.tensors()[name].shape.clone();
    (shape, f.tensor_f32(name, None).unwrap())
}

#[test]
fn taehv_on_the_emulated_device_matches_pytorch_whole_and_streamed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/decode/taehv-tiny");
    let (ls, latents) = tensor(&dir.join("latents.safetensors"), "latents");
    let (shape, expected) = tensor(&dir.join("expected.safetensors"), "video");
    let (f, h, w) = (ls[0], ls[2], ls[3]);
    let dec = Decoder::load(&dir.join("taehv/model.safetensors"), None).unwrap();
    let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();

    dev.begin(h, w).unwrap();
    let whole = dev.push(&latents, f, true).unwrap();
    assert_eq!(vec![whole.frames, 3, whole.height, whole.width], shape);
    let px = whole.f32.clone().unwrap();
    let err = rel_l2(&expected, &px);
    println!("device TAEHV whole vs PyTorch: rel L2 {err:.3e}");
    assert!(err < 2e-2, "rel L2 {err}");
    assert_eq!(
        whole.rgb,
        to_rgb8(&px, whole.frames, whole.height, whole.width)
    );

    // Block by block (3 + 3): the carried device memories give the same frames, bit for bit
    // (the same launches per frame); the buffer pool does not grow over a second stream; RGB8
    // only (no f32 asked) gives the same bytes.
    let per = 16 * h * w;
    let grown = dev.activation_bytes();
    dev.begin(h, w).unwrap();
    let (mut rgb, mut fr) = (Vec::new(), Vec::new());
    for (i, b) in latents.chunks(3 * per).enumerate() {
        let out = dev.push(b, b.len() / per, i == 0).unwrap();
        rgb.extend(out.rgb);
        fr.extend(out.f32.unwrap_or_default());
    }
    assert!(
        fr == px[..fr.len()],
        "blocks of 3 differ from the whole decode"
    );
    assert_eq!(rgb, whole.rgb);
    assert_eq!(
        dev.activation_bytes(),
        grown,
        "device memory grew over streams"
    );
    // The steady state's walks were graph replays (the block walk by default: the second
    // chunk of the whole push and the second block of 3); with graphs off (every launch
    // eager) the same bits.
    assert!(dev.frame_batching(), "the block walk is the default");
    assert!(dev.stats().graph_frames >= 5, "{:?}", dev.stats());
    let mut eager = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    eager.set_graphs(false).unwrap();
    eager.begin(h, w).unwrap();
    assert_eq!(eager.push(&latents, f, true).unwrap(), whole);
    assert_eq!(eager.stats().graph_frames, 0);
}

/// Pushes `blocks` (latent frame counts) of `latents` through `dev` in one stream; the f32
/// and RGB8 frames joined.
fn stream(
    dev: &mut CudaDecoder,
    latents: &[f32],
    (h, w): (usize, usize),
    blocks: &[usize],
) -> (Vec<f32>, Vec<u8>) {
    let per = 16 * h * w;
    dev.begin(h, w).unwrap();
    let (mut f, mut rgb, mut at) = (Vec::new(), Vec::new(), 0);
    for &n in blocks {
        let out = dev
            .push(&latents[at * per..(at + n) * per], n, true)
            .unwrap();
        f.extend(out.f32.unwrap());
        rgb.extend(out.rgb);
        at += n;
    }
    (f, rgb)
}

/// The block walk (each layer one launch over all of a block's frames) against the frame walk
/// (`BC_DECODE_PER_FRAME=1`), bit for bit (f32 and RGB8), on a small random model at latents
/// `h x w`: blocks of 3, 1, 2, 1, 5 and 3 latent frames (5: two walks of 4 + 1; the first
/// several, so that a walk starts the stream), the causal state carried from block to block, the stream's first latent frame giving 1 frame (TAEHV: 4, less
/// the 3 trimmed); with each `(graphs, rows)` of `runs` (rows: the bound on GEMM rows per
/// launch that makes frames go on in groups). And what a block costs: fewer launches,
/// activation memory bounded by the walk's frames whatever the push.
fn block_walk_equals_the_frame_walk(
    kind: DecoderKind,
    dim: usize,
    (h, w): (usize, usize),
    runs: &[(bool, usize)],
) {
    let dec = Decoder::synthetic(kind, dim, 21);
    let blocks = [3, 1, 2, 1, 5, 3];
    let total: usize = blocks.iter().sum();
    let mut rng = blockcascade::rng::Rng::new(77);
    let latents: Vec<f32> = (0..total * 16 * h * w)
        .map(|_| 2.0 * rng.normal())
        .collect();
    let mut per_frame = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    per_frame.set_frame_batching(false).unwrap();
    per_frame.set_graphs(false).unwrap();
    let want = stream(&mut per_frame, &latents, (h, w), &blocks);
    assert_eq!(want.0.len(), (4 * total - 3) * 3 * 64 * h * w);
    for &(graphs, rows) in runs {
        let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        dev.set_graphs(graphs).unwrap();
        dev.set_block_rows(rows).unwrap();
        assert!(dev.frame_batching());
        let got = stream(&mut dev, &latents, (h, w), &blocks);
        let bad = got
            .0
            .iter()
            .zip(&want.0)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        let what = format!("{kind}: graphs {graphs}, {rows} rows");
        assert!(
            bad.is_none() && got.0.len() == want.0.len(),
            "{what}: value {bad:?} differs"
        );
        assert_eq!(got.1, want.1, "{what}: RGB8");
        if graphs {
            assert!(dev.stats().graph_frames > 0, "{:?}", dev.stats());
        }
    }

    // A block of 3 at 6x10: one walk instead of 3, far fewer submissions; the pool is the same
    // for 4 latent frames as for 12 (three walks of 4): bounded by the walk, not the push.
    let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    let block = dev.measure_block(6, 10, 3).unwrap();
    let four = dev.measure_block(6, 10, 4).unwrap();
    let twelve = dev.measure_block(6, 10, 12).unwrap();
    dev.set_frame_batching(false).unwrap();
    let frame = dev.measure_block(6, 10, 3).unwrap();
    assert_eq!((block.walks, frame.walks, twelve.walks), (1, 3, 3));
    assert!(
        2 * block.submissions < frame.submissions,
        "{kind}: {block:?} vs {frame:?}"
    );
    assert_eq!(four.pool_bytes, twelve.pool_bytes, "{kind}");
    assert!(
        block.pool_bytes < four.pool_bytes && frame.pool_bytes < block.pool_bytes,
        "{kind}: {frame:?} {block:?} {four:?}"
    );
    assert_eq!(block.state_bytes, frame.state_bytes);
}

/// TAEHV's block walk against its frame walk: the default bound on rows per launch (no
/// grouping at this size), then frames past a TGrow in groups (500 rows: stage 3 in groups of
/// 2 frames, the full resolution one by one; 1 row: every frame alone past the first TGrow),
/// with graphs and without.
#[test]
fn taehv_block_walk_equals_the_frame_walk_bit_for_bit() {
    let runs = [(false, BLOCK_ROWS), (true, 500), (false, 1)];
    block_walk_equals_the_frame_walk(DecoderKind::Taehv, 8, (3, 5), &runs);
}

/// The Wan VAE's block walk against its frame walk (the causal convs' first taps from the
/// carried caches, the `time_conv`s' first-chunk rule) at latents 2x3 (the emulated Wan VAE
/// is slow): the default bound (no grouping at this size), then after the upsamples in groups
/// (800 rows: a walk of 4 latent frames goes on past the second temporal upsample in 2 groups
/// of 8 frames, past the last upsample in pairs; 120: in 2 groups of 4 past the first, then
/// pairs, then one by one), with graphs and without.
#[test]
fn wan_vae_block_walk_equals_the_frame_walk_bit_for_bit() {
    let runs = [(false, BLOCK_ROWS), (true, 800), (false, 120)];
    block_walk_equals_the_frame_walk(DecoderKind::WanVae, 2, (2, 3), &runs);
}

/// What a 3-latent-frame block at 480x832 (latents 60x104) costs the real-width decoders
/// (random weights), counted without running (`CudaDecoder::measure_block`): submissions per
/// block and device memory, for each decoder's block walk and frame walk (`COST` lines with
/// `--nocapture`; docs/decoders.md quotes them). The block walk's pool is bounded by its walk
/// (4 latent frames at most), whatever the push.
#[test]
fn block_costs_at_480x832() {
    let mib = |b: usize| b as f64 / 1048576.0;
    for (kind, dim) in [(DecoderKind::Taehv, 64), (DecoderKind::WanVae, 96)] {
        let dec = Decoder::synthetic(kind, dim, 1);
        let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        let mut costs = Vec::new();
        for batch in [true, false] {
            dev.set_frame_batching(batch).unwrap();
            for frames in [1, 3, 4, 12] {
                let c = dev.measure_block(60, 104, frames).unwrap();
                println!(
                    "COST {kind} {} {frames} latent frames: {} walks, {} submissions, pool \
                     {:.1} MiB, state {:.1} MiB, io {:.1} MiB",
                    if batch { "block-walk" } else { "per-frame" },
                    c.walks,
                    c.submissions,
                    mib(c.pool_bytes),
                    mib(c.state_bytes),
                    mib(c.io_bytes)
                );
                costs.push(c);
            }
        }
        // Fewer submissions: TAEHV under half, the Wan VAE under two thirds (its full
        // resolution goes one frame at a time, as in the frame walk).
        let (b3, b4, b12, f3) = (costs[1], costs[2], costs[3], costs[5]);
        let (num, den) = if kind == DecoderKind::Taehv {
            (1, 2)
        } else {
            (2, 3)
        };
        assert!(
            b3.submissions * den < f3.submissions * num,
            "{kind}: {b3:?} vs {f3:?}"
        );
        assert_eq!(
            b4.pool_bytes, b12.pool_bytes,
            "{kind}: the pool grows with the push"
        );
        assert!(b3.pool_bytes < 1 << 31, "{kind}: {b3:?}");
        assert_eq!((b3.walks, f3.walks), (1, 3));
        // Without the groups (all of a walk's frames in every launch) the pool is larger.
        dev.set_frame_batching(true).unwrap();
        dev.set_block_rows(usize::MAX).unwrap();
        let all = dev.measure_block(60, 104, 3).unwrap();
        println!(
            "COST {kind} block-walk without groups 3 latent frames: {} submissions, pool {:.1} \
             MiB",
            all.submissions,
            mib(all.pool_bytes)
        );
        assert!(b3.pool_bytes < all.pool_bytes, "{kind}: {b3:?} vs {all:?}");
    }
}

#[test]
fn wan_vae_on_the_emulated_device_matches_pytorch_whole_and_streamed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/decode/wan-vae-tiny");
    let (ls, latents) = tensor(&dir.join("latents.safetensors"), "latents");
    let (shape, expected) = tensor(&dir.join("expected.safetensors"), "video");
    let (f, h, w) = (ls[0], ls[2], ls[3]);
    let dec = Decoder::load(&dir.join("vae"), None).unwrap();
    assert_eq!(dec.kind(), DecoderKind::WanVae);
    // Every launch eager (graphs off): the reference for the graph replays below.
    let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    dev.set_graphs(false).unwrap();
    dev.begin(h, w).unwrap();
    let whole = dev.push(&latents, f, true).unwrap();
    assert_eq!(vec![whole.frames, 3, whole.height, whole.width], shape);
    let px = whole.f32.clone().unwrap();
    let err = rel_l2(&expected, &px);
    println!("device Wan VAE whole vs PyTorch: rel L2 {err:.3e}");
    assert!(err < 2e-2, "rel L2 {err}");
    assert!(px.iter().all(|v| (-1.0..=1.0).contains(v)), "clamped");
    assert_eq!(
        whole.rgb,
        to_rgb8(&px, whole.frames, whole.height, whole.width)
    );
    // With graphs (the block walk: blocks of 1 and 2 eager while the caches fill, the block
    // of 3 captured and replayed), in blocks of 1, 2 then 3: the eager whole decode's bits
    // (the carried caches and 'Rep' flags). A whole push with graphs is the same walks per frame (tests/decode_graphs.rs
    // pushes 5 frames at once through capture and replay); not repeated here, the emulated
    // Wan VAE being the slowest test of the suite.
    let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    dev.set_graphs(true).unwrap();
    let per = 16 * h * w;
    dev.begin(h, w).unwrap();
    let mut fr = dev.push(&latents[..per], 1, true).unwrap().f32.unwrap();
    assert_eq!(fr.len(), 3 * whole.height * whole.width);
    for (a, b) in [(1, 3), (3, 6)] {
        let out = dev.push(&latents[a * per..b * per], b - a, true).unwrap();
        fr.extend(out.f32.unwrap());
    }
    assert!(fr == px, "streamed frames differ from the whole decode");
    let st = dev.stats();
    assert_eq!((st.eager_frames, st.graph_frames), (3, 3), "{st:?}");
}

#[test]
fn device_decoder_errors_are_clear() {
    let tae = Decoder::tiny_taehv(3);
    let mut dev = CudaDecoder::new(&tae, Gpu::open_emulated().unwrap()).unwrap();
    assert!(dev.push(&[0.0; 16], 1, false).is_err(), "push before begin");
    assert!(dev.begin(0, 4).is_err());
    dev.begin(2, 2).unwrap();
    let e = dev.push(&[0.0; 10], 1, false).unwrap_err().to_string();
    assert!(e.contains("need 64"), "{e}");
    let mut z = vec![0.0; 64];
    z[5] = f32::NAN;
    assert!(dev.push(&z, 1, false).is_err());
    // The stream survives a refused push.
    assert_eq!(dev.push(&[0.5; 64], 1, false).unwrap().frames, 1);
}

/// Both decoders with every convolution that fits it on the Hopper wgmma kernel
/// (`bc_conv_wgmma`, forced on: the emulated device has it, a default decoder does not use it),
/// then with its TMA variant too (`bc_conv_wgmma_tma`: the convolutions over plain sources and,
/// in the parity form (the default), the upsample convs take it), against upstream's golden
/// output, within the same 2e-2; then with the warp-specialized variant (`bc_conv_wgmma_ws`,
/// what `BC_CONV_WGMMA_VARIANT=ws` picks), which must give `bc_conv_wgmma`'s pixels bit for bit.
#[test]
fn both_decoders_with_the_wgmma_conv_match_pytorch() {
    for (name, model) in [
        ("taehv-tiny", "taehv/model.safetensors"),
        ("wan-vae-tiny", "vae"),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/decode")
            .join(name);
        let (ls, latents) = tensor(&dir.join("latents.safetensors"), "latents");
        let (_, expected) = tensor(&dir.join("expected.safetensors"), "video");
        let (f, h, w) = (ls[0], ls[2], ls[3]);
        let dec = Decoder::load(&dir.join(model), None).unwrap();
        let mut base: Option<Vec<f32>> = None;
        for (tma, ws) in [(false, false), (true, false), (false, true)] {
            let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
            assert!(
                !dev.conv_wgmma() && !dev.conv_tma() && !dev.conv_ws(),
                "off unless asked for"
            );
            dev.set_conv_wgmma(true).unwrap();
            dev.set_conv_tma(tma).unwrap();
            dev.set_conv_ws(ws).unwrap();
            dev.begin(h, w).unwrap();
            let px = dev.push(&latents, f, true).unwrap().f32.unwrap();
            let err = rel_l2(&expected, &px);
            let share = dev.wgmma_flops() / dev.flops();
            let kernel = match (tma, ws) {
                (true, _) => "bc_conv_wgmma(_tma)",
                (_, true) => "bc_conv_wgmma_ws",
                _ => "bc_conv_wgmma",
            };
            println!(
                "{name} with {kernel} ({:.0}% of the FLOPs): rel L2 {err:.3e}",
                100.0 * share
            );
            assert!(err < 2e-2, "{name} {kernel}: rel L2 {err}");
            assert!(
                share > 0.1,
                "{name}: only {share} of the FLOPs ran {kernel}"
            );
            if ws {
                let want = base.as_deref().unwrap();
                let same = px.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && px.len() == want.len(),
                    "{name}: bc_conv_wgmma_ws pixels differ from bc_conv_wgmma's"
                );
            } else if !tma {
                base = Some(px);
            }
        }
    }
}

/// The upsample convs in the sub-pixel (parity) form and dense (`set_conv_parity(false)`), on
/// `bc_conv`: both within 2e-2 of upstream's golden output (the Wan VAE over its first 3
/// latent frames, a causal prefix of the golden video, to bound the emulation's time), the
/// parity form launching fewer FLOPs. Switching the form mid-stream drops the captured graphs:
/// with graphs, TAEHV blocks decoded parity-on then parity-off give the bits of an eager
/// decoder switched the same way.
#[test]
fn both_decoders_with_and_without_the_parity_form_match_pytorch() {
    for (name, model, frames) in [
        ("taehv-tiny", "taehv/model.safetensors", None),
        ("wan-vae-tiny", "vae", Some(3)),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/decode")
            .join(name);
        let (ls, latents) = tensor(&dir.join("latents.safetensors"), "latents");
        let (_, expected) = tensor(&dir.join("expected.safetensors"), "video");
        let (h, w) = (ls[2], ls[3]);
        let f = frames.unwrap_or(ls[0]);
        let dec = Decoder::load(&dir.join(model), None).unwrap();
        let mut flops = Vec::new();
        for parity in [true, false] {
            let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
            dev.set_conv_parity(parity).unwrap();
            assert_eq!(dev.conv_parity(), parity);
            dev.begin(h, w).unwrap();
            let px = dev
                .push(&latents[..f * 16 * h * w], f, true)
                .unwrap()
                .f32
                .unwrap();
            let err = rel_l2(&expected[..px.len()], &px);
            println!(
                "{name} parity {parity}: rel L2 {err:.3e}, {:.4e} FLOP",
                dev.flops()
            );
            assert!(err < 2e-2, "{name} parity {parity}: rel L2 {err}");
            flops.push(dev.flops());
        }
        assert!(flops[0] < flops[1], "{name}: {flops:?}");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/decode/taehv-tiny");
    let (ls, latents) = tensor(&dir.join("latents.safetensors"), "latents");
    let (h, w) = (ls[2], ls[3]);
    let dec = Decoder::load(&dir.join("taehv/model.safetensors"), None).unwrap();
    let per = 16 * h * w;
    let run = |graphs: bool| {
        let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
        dev.set_graphs(graphs).unwrap();
        dev.begin(h, w).unwrap();
        // Blocks of 1, 2 (parity form: its walk of 2 captured), then 2 and 1 (dense: a walk of
        // 2 again, the key of the graph captured in the other form).
        let (mut out, mut at) = (Vec::new(), 0);
        for (i, n) in [1, 2, 2, 1].into_iter().enumerate() {
            dev.set_conv_parity(i < 2).unwrap();
            let b = &latents[at * per..(at + n) * per];
            out.push(dev.push(b, n, true).unwrap());
            at += n;
        }
        (out, dev.stats().graph_frames)
    };
    let (eager, _) = run(false);
    let (graphs, replays) = run(true);
    assert!(replays >= 4, "{replays} graph frames");
    assert_eq!(graphs, eager, "a graph of the other form was replayed");
}

/// The persistent halo conv (`bc_conv_halo_n64`, `set_conv_halo`: what `BC_CONV_HALO=1` picks)
/// in a whole TAEHV decode must give the wgmma conv's pixels bit for bit. The golden tiny
/// TAEHV has no layer it takes (its widths are 32, 16, 8, 8: no 64-channel conv), so it is
/// decoded for the record only; a synthetic TAEHV of widths 64, 32, 16, 16 runs its first
/// stage's 3x3 convs on it (the MemBlocks' 128 -> 64 over cat[x, past] and their 64 -> 64);
/// one of widths 128, 64, 32, 32 its second stage's, and with the upsample convs dense (not the
/// parity form) also the 128 -> 64 conv after the first `Upsample` (one 128-channel source read
/// through the upsample): one launch more per block. 3 frames of 6 x 10 latents in one launch
/// per layer on the emulated device's one block, halo or not in the same conv form.
#[test]
fn taehv_with_the_halo_conv_equals_the_wgmma_conv() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/decode/taehv-tiny");
    let (ls, golden) = tensor(&dir.join("latents.safetensors"), "latents");
    let tiny = Decoder::load(&dir.join("taehv/model.safetensors"), None).unwrap();
    let mut rng = blockcascade::rng::Rng::new(5);
    let (sh, sw, sf) = (6, 10, 3);
    let synth_latents: Vec<f32> = (0..sf * 16 * sh * sw).map(|_| rng.normal()).collect();
    let synth = Decoder::synthetic(DecoderKind::Taehv, 16, 9);
    let synth128 = Decoder::synthetic(DecoderKind::Taehv, 32, 10);
    // (name, decoder, latents, (frames, h, w), parity form, halo launches expected: at least)
    let runs = [
        ("taehv-tiny", &tiny, &golden, (ls[0], ls[2], ls[3]), true, 0),
        (
            "taehv-synthetic-64",
            &synth,
            &synth_latents,
            (sf, sh, sw),
            true,
            9,
        ),
        (
            "taehv-synthetic-128",
            &synth128,
            &synth_latents,
            (sf, sh, sw),
            true,
            9,
        ),
        (
            "taehv-synthetic-128 dense",
            &synth128,
            &synth_latents,
            (sf, sh, sw),
            false,
            10,
        ),
    ];
    let mut counts = Vec::new();
    for (name, dec, latents, (f, h, w), parity, least) in runs {
        let mut px: Vec<Vec<f32>> = Vec::new();
        for halo in [false, true] {
            let mut dev = CudaDecoder::new(dec, Gpu::open_emulated().unwrap()).unwrap();
            assert!(!dev.conv_halo(), "off unless asked for");
            dev.set_conv_wgmma(true).unwrap();
            dev.set_conv_parity(parity).unwrap();
            dev.set_conv_halo(halo).unwrap();
            // Profiled (eager), to count the halo conv's launches.
            dev.set_profiling(true).unwrap();
            dev.begin(h, w).unwrap();
            px.push(dev.push(latents, f, true).unwrap().f32.unwrap());
            let launches: u64 = dev
                .take_profile()
                .unwrap()
                .iter()
                .filter(|k| k.name == "bc_conv_halo_n64")
                .map(|k| k.launches)
                .sum();
            println!("{name}, halo {halo}: {launches} bc_conv_halo_n64 launches");
            assert!(
                if halo && least > 0 {
                    launches >= least
                } else {
                    launches == 0
                },
                "{name}: {launches} bc_conv_halo_n64 launches"
            );
            if halo {
                counts.push(launches);
            }
        }
        assert!(px[0].iter().all(|v| v.is_finite()), "{name}");
        let bad = px[1]
            .iter()
            .zip(&px[0])
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none() && px[0].len() == px[1].len(),
            "{name}: bc_conv_halo_n64 pixels differ from bc_conv_wgmma's at {bad:?}"
        );
    }
    // Dense, the conv after the first Upsample joins: one launch more than in the parity form.
    assert_eq!(
        counts[3],
        counts[2] + 1,
        "halo launches per run: {counts:?}"
    );
}
