//! The frames that the library hands out (Rust streams, the C ABI's frames callback) come from
//! the decoder on the device the DiT runs on, here the emulated CUDA device: the same bytes as
//! `CudaDecoder` pushed the same latents directly, and the CPU decoder's bytes when the decoder is
//! kept on the CPU (`decoder_device` cpu). Small shapes: the built-in tiny model and decoder.

mod common;

use blockcascade::backend::cuda::device::Gpu;
use blockcascade::backend::cuda::{set_session_options, CudaOptions};
use blockcascade::bench::rel_l2;
use blockcascade::config::BackendKind;
use blockcascade::decode::{CudaDecoder, DecodeDevice, Decoder};
use blockcascade::ffi::sys::*;
use blockcascade::ffi::*;
use blockcascade::{Engine, GenerateOptions, NoiseSource, PromptEmbeds, Stream, StreamOptions};
use common::{c_generate, expect_c_err, last_error};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

/// Latent size (the tiny model's smallest useful one; the tiny TAEHV makes it 32x32 pixels).
const H: usize = 4;
const W: usize = 4;

/// The CUDA options are process-global: one test at a time, each on the emulated device.
static LOCK: Mutex<()> = Mutex::new(());

fn emulated() -> MutexGuard<'static, ()> {
    let l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    set_session_options(Some(CudaOptions {
        emulate: true,
        ..CudaOptions::default()
    }));
    l
}

/// Latents and RGB8 frames of a stream's first `blocks` blocks.
fn stream_frames(
    backend: BackendKind,
    decoder_device: Option<DecodeDevice>,
    blocks: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<u8>>) {
    let engine = Engine::open(None).unwrap();
    let decoder = Arc::new(Decoder::tiny_taehv(0));
    let mut st = open_stream(&engine, backend, &decoder, decoder_device, 2);
    let (mut lat, mut rgb) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        let (l, r) = next_frames(&mut st);
        lat.push(l);
        rgb.push(r);
    }
    st.cancel();
    (lat, rgb)
}

/// A stream of `seed` on `engine` whose frames `decoder` makes on `decoder_device`.
fn open_stream(
    engine: &Engine,
    backend: BackendKind,
    decoder: &Arc<Decoder>,
    decoder_device: Option<DecodeDevice>,
    seed: u64,
) -> Stream {
    let opts = GenerateOptions {
        height: H,
        width: W,
        local_attn: Some(6),
        backend,
        ..Default::default()
    };
    let prompt = PromptEmbeds::builtin(engine.config(), 2);
    let sopts = StreamOptions {
        decoder: Some(decoder.clone()),
        decoder_device,
        ..Default::default()
    };
    Stream::open(engine, opts, NoiseSource::Seeded(seed), prompt, sopts).unwrap()
}

/// The latents and RGB8 frames of a stream's next block.
fn next_frames(st: &mut Stream) -> (Vec<f32>, Vec<u8>) {
    let b = st.next_block(None).unwrap().unwrap();
    assert_eq!((b.pixel_height, b.pixel_width), (8 * H, 8 * W));
    assert_eq!(
        b.rgb.as_ref().map(Vec::len),
        Some(b.pixel_frames * 64 * H * W * 3)
    );
    (b.latents, b.rgb.unwrap_or_default())
}

/// `blocks` pushed one by one through a `CudaDecoder` on the emulated device: (RGB8, f32).
fn direct_device(blocks: &[Vec<f32>]) -> (Vec<Vec<u8>>, Vec<f32>) {
    let dec = Decoder::tiny_taehv(0);
    let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    dev.begin(H, W).unwrap();
    let (mut rgb, mut f) = (Vec::new(), Vec::new());
    for b in blocks {
        let out = dev.push(b, b.len() / (16 * H * W), true).unwrap();
        rgb.push(out.rgb);
        f.extend(out.f32.unwrap_or_default());
    }
    (rgb, f)
}

/// The CPU decoder over all `blocks`.
fn cpu_decode(blocks: &[Vec<f32>]) -> blockcascade::decode::Video {
    let all: Vec<f32> = blocks.concat();
    Decoder::tiny_taehv(0)
        .decode(&all, all.len() / (16 * H * W), H, W)
        .unwrap()
}

#[test]
fn a_stream_on_the_cuda_backend_decodes_on_its_device() {
    let _l = emulated();
    // Default decoder device: where the DiT runs, the (emulated) CUDA device.
    let (lat, rgb) = stream_frames(BackendKind::Cuda, None, 2);
    let (want, f) = direct_device(&lat);
    assert_eq!(
        rgb, want,
        "stream frames differ from CudaDecoder on the same latents"
    );
    // The device decoder really ran: its bf16 frames are close to the CPU's, not equal.
    let cpu = cpu_decode(&lat);
    let err = rel_l2(&cpu.data, &f);
    println!("device vs CPU decoder on the stream's latents: rel L2 {err:.3e}");
    assert!(err < 2e-2, "rel L2 {err}");
    assert_ne!(rgb.concat(), cpu.to_rgb8(), "no bf16 difference at all");

    // decoder_device cpu keeps the decoder on the CPU beside the CUDA DiT.
    let (lat, rgb) = stream_frames(BackendKind::Cuda, Some(DecodeDevice::Cpu), 2);
    assert_eq!(rgb.concat(), cpu_decode(&lat).to_rgb8());

    // And a CPU DiT can decode on a device when asked.
    let dev = DecodeDevice::Cuda {
        ordinal: 0,
        emulate: true,
    };
    let (lat, rgb) = stream_frames(BackendKind::Cpu, Some(dev), 1);
    assert_eq!(rgb, direct_device(&lat).0);
    set_session_options(None);
}

/// Two streams open at once on one engine, with one decoder on the (emulated) device: each
/// decodes as it would alone (its own causal state: bit for bit `CudaDecoder` on its own
/// latents), and the decoder's weights went to the device once.
#[test]
fn streams_on_one_engine_share_the_device_weights() {
    let _l = emulated();
    let engine = Engine::open(None).unwrap();
    let decoder = Arc::new(Decoder::tiny_taehv(0));
    let dev = Some(DecodeDevice::Cuda {
        ordinal: 0,
        emulate: true,
    });
    let mut a = open_stream(&engine, BackendKind::Cpu, &decoder, dev, 3);
    let mut b = open_stream(&engine, BackendKind::Cpu, &decoder, dev, 4);
    let (mut lat, mut rgb) = ([vec![], vec![]], [vec![], vec![]]);
    for _ in 0..2 {
        for (i, st) in [&mut a, &mut b].into_iter().enumerate() {
            let (l, r) = next_frames(st);
            lat[i].push(l);
            rgb[i].push(r);
        }
    }
    a.cancel();
    b.cancel();
    assert_ne!(lat[0], lat[1], "the two streams must differ");
    for i in 0..2 {
        assert_eq!(rgb[i], direct_device(&lat[i]).0, "stream {i}");
    }
    assert_eq!(decoder.device_uploads(), 1, "one upload for both streams");
    // The next generation with the same decoder uploads nothing either.
    let mut c = open_stream(&engine, BackendKind::Cpu, &decoder, dev, 3);
    let (l, r) = next_frames(&mut c);
    c.cancel();
    assert_eq!((l, r), (lat[0][0].clone(), rgb[0][0].clone()));
    assert_eq!(decoder.device_uploads(), 1);
    set_session_options(None);
}

/// What the frames callback saw: RGB8 and f32 frames, in order.
#[derive(Default)]
struct Seen {
    rgb: Vec<u8>,
    pixels: Vec<f32>,
}

unsafe extern "C" fn collect(
    user: *mut c_void,
    _block: u32,
    rgb: *const u8,
    pixels: *const f32,
    frames: u32,
    height: u32,
    width: u32,
) -> i32 {
    let out = &mut *(user as *mut Seen);
    let n = (frames * height * width * 3) as usize;
    out.rgb
        .extend_from_slice(std::slice::from_raw_parts(rgb, n));
    out.pixels
        .extend_from_slice(std::slice::from_raw_parts(pixels, n));
    0
}

fn open_engine(device: *const std::ffi::c_char, size: Option<u32>) -> (bc_status, *mut bc_engine) {
    let mut o = bc_engine_options {
        backend: c"cpu".as_ptr(),
        decoder_device: device,
        ..bc_engine_options_default()
    };
    if let Some(s) = size {
        o.struct_size = s;
    }
    let mut e = std::ptr::null_mut();
    // SAFETY: valid options and out pointer; NULL model dir = the built-in model.
    let st = unsafe { bc_engine_open(std::ptr::null(), &o, &mut e) };
    (st, e)
}

/// A session of `seed` on engine `e` whose frames callback (the built-in decoder) collects
/// into `seen`, which must outlive the session's generations.
fn session_with_frames(e: *mut bc_engine, seed: u64, seen: &mut Seen) -> *mut bc_session {
    let so = bc_session_options {
        height: H as u32,
        width: W as u32,
        seed,
        ..bc_session_options_default()
    };
    let mut s = std::ptr::null_mut();
    // SAFETY: a live engine, valid options and out pointer.
    let st = unsafe { bc_session_open(e, &so, &mut s) };
    assert_eq!(st, BC_OK, "{}", last_error());
    let user = seen as *mut Seen as *mut c_void;
    // SAFETY: the caller keeps `seen` alive; `collect` matches the callback's contract.
    let st = unsafe { bc_session_set_decoder(s, std::ptr::null(), Some(collect), user) };
    assert_eq!(st, BC_OK, "{}", last_error());
    s
}

/// `bc_engine_options.decoder_device`: a bad name is an invalid argument, an older struct_size
/// (ending before the field) is still accepted, "cuda" decodes the frames callback's pixels on
/// the (emulated) device, bit for bit those of `CudaDecoder` on the same latents, and "cuda"
/// without a usable GPU is one device error naming the CPU option.
#[test]
fn c_abi_decoder_device() {
    let _l = emulated();
    let (st, e) = open_engine(c"tpu".as_ptr(), None);
    expect_c_err(st, BC_ERR_INVALID_ARGUMENT, "expected \"cpu\" or \"cuda\"");
    assert!(e.is_null());
    let v1 = std::mem::offset_of!(bc_engine_options, decoder_device) as u32;
    let (st, e) = open_engine(c"tpu".as_ptr(), Some(v1));
    assert_eq!(st, BC_OK, "{}", last_error());
    bc_engine_close(e);

    let (st, e) = open_engine(c"cuda".as_ptr(), None);
    assert_eq!(st, BC_OK, "{}", last_error());
    let mut seen = Box::<Seen>::default();
    let s = session_with_frames(e, 0, &mut seen);
    let lat = c_generate(s, 2);
    let per = 3 * 16 * H * W;
    let blocks: Vec<Vec<f32>> = lat.chunks(per).map(<[f32]>::to_vec).collect();
    let (rgb, f) = direct_device(&blocks);
    assert_eq!(seen.rgb, rgb.concat());
    assert_eq!(seen.pixels, f);

    // A second session on the engine shares its decoder (one device upload) and decodes its
    // own latents from a fresh causal state.
    let mut seen2 = Box::<Seen>::default();
    let s2 = session_with_frames(e, 9, &mut seen2);
    let lat2 = c_generate(s2, 1);
    assert_ne!(lat2[..per], lat[..per], "the sessions' seeds differ");
    assert_eq!(seen2.rgb, direct_device(&[lat2]).0.concat());
    bc_session_close(s2);
    bc_session_close(s);
    bc_engine_close(e);

    // Without emulation and without a GPU driver: BC_ERR_DEVICE at bc_engine_open.
    set_session_options(Some(CudaOptions::default()));
    if blockcascade::backend::cuda::info::probe_driver().is_err() {
        let (st, e) = open_engine(c"cuda".as_ptr(), None);
        expect_c_err(st, BC_ERR_DEVICE, "decoder_device = \"cpu\"");
        assert!(e.is_null());
    }
    set_session_options(None);
}

/// `generate --decoder-device`: it needs `--video`; `cuda` on a machine without a GPU (and
/// without emulation) is one error line naming the CPU option, exit code 1, no video left.
#[test]
fn cli_decoder_device_errors() {
    let bin = env!("CARGO_BIN_EXE_blockcascade");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], video: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(bin);
        c.env_remove("BC_CUDA_EMULATE")
            .args(["generate", "--frames", "3", "--quiet", "--out"])
            .arg(dir.path().join("latents.safetensors"))
            .args(args);
        if let Some(v) = video {
            c.arg("--video").arg(v);
        }
        c.output().unwrap()
    };
    let o = run(&["--decoder-device", "cpu"], None);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("--decoder-device need --video"), "{stderr}");

    if blockcascade::backend::cuda::info::probe_driver().is_ok() {
        println!("SKIP the no-GPU half of cli_decoder_device_errors: a CUDA driver is present");
        return;
    }
    let video = dir.path().join("v.y4m");
    let o = run(&["--decoder-device", "cuda"], Some(&video));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit code (a panic gives 101): {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one error line: {stderr:?}");
    assert!(lines[0].starts_with("error:"), "{stderr}");
    assert!(lines[0].contains("--decoder-device cpu"), "{stderr}");
    assert!(!video.exists(), "no video on failure");
    assert!(!dir.path().join("latents.safetensors").exists());
}

/// The server checks an explicit CUDA decoder device when it loads: without a GPU driver (and
/// without emulation) that is the load's error, naming the CPU option.
#[cfg(feature = "serve")]
#[test]
fn serve_refuses_a_decoder_device_it_cannot_use() {
    use blockcascade::serve::{ServeConfig, Server};
    if blockcascade::backend::cuda::info::probe_driver().is_ok() {
        println!("SKIP serve_refuses_a_decoder_device_it_cannot_use: a CUDA driver is present");
        return;
    }
    let cfg = ServeConfig {
        port: 0,
        decoder_device: Some(DecodeDevice::Cuda {
            ordinal: 0,
            emulate: false,
        }),
        ..ServeConfig::default()
    };
    match Server::load(&cfg) {
        Err(blockcascade::Error::Device(m)) => assert!(m.contains("--decoder-device cpu"), "{m}"),
        Err(e) => panic!("expected a device error, got {e:?}"),
        Ok(_) => panic!("the server loaded with a CUDA decoder and no GPU"),
    }
}
