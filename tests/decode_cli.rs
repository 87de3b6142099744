//! Pixels out through the CLI: `decode` reproduces the upstream decoders' golden videos,
//! `generate --video` decodes each block as it finishes (the built-in decoder by default), and
//! bad input is one clear error with nothing written.

use blockcascade::tensorfile::{write_f32, TensorFile};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockcascade"))
}

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/decode")
        .join(name)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// `decode --vae VAE --latents LAT --out OUT`.
fn decode(vae: &Path, lat: &Path, out: &Path) -> Output {
    run(&[
        "decode",
        "--vae",
        vae.to_str().unwrap(),
        "--latents",
        lat.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

/// A failed command: non-zero exit, one `error:` line, no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("error:"), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

#[test]
fn decode_matches_upstream_for_both_decoders_and_any_block_size() {
    let dir = tempfile::tempdir().unwrap();
    for (name, weights) in [("wan-vae-tiny", "vae"), ("taehv-tiny", "taehv")] {
        let c = case(name);
        let expected = TensorFile::open(&c.join("expected.safetensors"))
            .unwrap()
            .tensor_f32("video", None)
            .unwrap();
        for block in ["1", "3", "4"] {
            let out = dir.path().join(format!("{name}-{block}.safetensors"));
            let o = run(&[
                "decode",
                "--vae",
                c.join(weights).to_str().unwrap(),
                "--latents",
                c.join("latents.safetensors").to_str().unwrap(),
                "--block-frames",
                block,
                "--quiet",
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let f = TensorFile::open(&out).unwrap();
            let got = f.tensor_f32("video", None).unwrap();
            let err = rel_l2(&got, &expected);
            assert!(err < 1e-4, "{name} block {block}: rel L2 {err}");
        }
    }
}

/// `generate --frames 6 --out LAT --video VIDEO` with the built-in model and decoder; must succeed.
fn generate_video(lat: &Path, video: &Path) {
    let o = run(&[
        "generate",
        "--frames",
        "6",
        "--quiet",
        "--out",
        lat.to_str().unwrap(),
        "--video",
        video.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn generate_writes_a_playable_video_with_the_builtin_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let lat = dir.path().join("lat.safetensors");
    let y4m = dir.path().join("v.y4m");
    generate_video(&lat, &y4m);
    // The built-in model's 8x12 latents are 64x96 pixels; TAEHV makes 4F-3 frames.
    let bytes = std::fs::read(&y4m).unwrap();
    let header_end = bytes.iter().position(|&b| b == b'\n').unwrap();
    let header = String::from_utf8_lossy(&bytes[..header_end]).to_string();
    assert!(
        header.contains(" W96 ") && header.contains(" H64 "),
        "{header}"
    );
    let frames = bytes.windows(6).filter(|w| w == b"FRAME\n").count();
    assert_eq!(frames, 4 * 6 - 3);
    // The latents are written too, and decoding them afterwards gives the same pixels.
    let streamed = dir.path().join("streamed.safetensors");
    generate_video(&lat, &streamed);
    let lat = TensorFile::open(&lat)
        .unwrap()
        .tensor_f32("latents", Some(&[6, 16, 8, 12]))
        .unwrap();
    let a = blockcascade::decode::Decoder::tiny_taehv(0)
        .decode(&lat, 6, 8, 12)
        .unwrap()
        .data;
    let b = TensorFile::open(&streamed)
        .unwrap()
        .tensor_f32("video", None)
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_decode_input_is_one_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = case("wan-vae-tiny");
    let vae = c.join("vae");
    let lat = c.join("latents.safetensors");
    let out = dir.path().join("v.mp4");
    // Unknown extension.
    let bad_ext = dir.path().join("v.avi");
    let o = decode(&vae, &lat, &bad_ext);
    assert_clean_error(&o, "unknown video format");
    // Missing weights.
    let o = decode(&dir.path().join("nope"), &lat, &out);
    assert_clean_error(&o, "nope");
    // Wrong latent channel count and wrong rank.
    let meta = BTreeMap::new();
    let wrong_c = dir.path().join("c8.safetensors");
    let d = vec![0.5f32; 2 * 8 * 6 * 8];
    write_f32(&wrong_c, &[("latents", vec![2, 8, 6, 8], &d)], &meta).unwrap();
    let o = decode(&vae, &wrong_c, &out);
    assert_clean_error(&o, "16");
    let wrong_rank = dir.path().join("r3.safetensors");
    write_f32(
        &wrong_rank,
        &[("latents", vec![16, 6, 8], &d[..768])],
        &meta,
    )
    .unwrap();
    let o = decode(&vae, &wrong_rank, &out);
    assert_clean_error(&o, "[F,16,H,W]");
    // An unwritable output folder fails before any decoding.
    let o = decode(&vae, &lat, &dir.path().join("missing/v.mp4"));
    assert!(!o.status.success());
    // `generate --vae` without `--video` is refused before the model runs.
    let o = run(&[
        "generate",
        "--frames",
        "3",
        "--vae",
        vae.to_str().unwrap(),
        "--out",
        dir.path().join("l.safetensors").to_str().unwrap(),
    ]);
    assert_clean_error(&o, "--video");
    // Nothing was left behind by any failure.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".safetensors") || n == "l.safetensors")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `decode --backend cuda` on the emulated device: TAEHV's golden video within the device's
/// bf16 bound (f32 through `.safetensors`, RGB8 through `.y4m`); bad latents are one clear
/// error with nothing written.
#[test]
fn decode_on_the_emulated_cuda_device() {
    let dir = tempfile::tempdir().unwrap();
    let c = case("taehv-tiny");
    let lat = c.join("latents.safetensors");
    let run_cuda = |vae: &Path, out: &Path| {
        bin()
            .env("BC_CUDA_EMULATE", "1")
            .args(["decode", "--backend", "cuda", "--vae"])
            .arg(vae)
            .arg("--latents")
            .arg(&lat)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = dir.path().join("taehv.safetensors");
    let o = run_cuda(&c.join("taehv"), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = TensorFile::open(&out).unwrap();
    let got = f.tensor_f32("video", None).unwrap();
    let want = TensorFile::open(&c.join("expected.safetensors"))
        .unwrap()
        .tensor_f32("video", None)
        .unwrap();
    let err = rel_l2(&got, &want);
    assert!(err < 2e-2, "device decode vs upstream: rel L2 {err}");
    let y4m = dir.path().join("taehv.y4m");
    let o = run_cuda(&c.join("taehv"), &y4m);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::metadata(&y4m).unwrap().len() > 21 * 32 * 48);

    // A bad latent file is one clear error on this path too, with nothing written.
    let bad = dir.path().join("bad.y4m");
    let o = bin()
        .env("BC_CUDA_EMULATE", "1")
        .args(["decode", "--backend", "cuda", "--vae"])
        .arg(c.join("taehv"))
        .arg("--latents")
        .arg(c.join("expected.safetensors"))
        .arg("--out")
        .arg(&bad)
        .output()
        .unwrap();
    assert_clean_error(&o, "latents");
    assert!(!bad.exists());
}

/// `generate --backend cuda --video` decodes on the (emulated) device, in the background
/// thread: the same video as the CPU run up to bf16 noise (the DiT and the decoder both run
/// bf16 kernels; measured at most 2 levels apart out of 255).
#[test]
fn generate_on_the_emulated_cuda_device_decodes_there() {
    let dir = tempfile::tempdir().unwrap();
    let video = |backend: &str| {
        let out = dir.path().join(format!("{backend}.y4m"));
        let lat = dir.path().join(format!("{backend}.safetensors"));
        let o = bin()
            .env("BC_CUDA_EMULATE", "1")
            .args(["generate", "--frames", "6", "--backend", backend, "--video"])
            .arg(&out)
            .arg("--out")
            .arg(&lat)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&out).unwrap()
    };
    let (gpu, cpu) = (video("cuda"), video("cpu"));
    assert_eq!(gpu.len(), cpu.len());
    let diff: Vec<u8> = gpu.iter().zip(&cpu).map(|(a, b)| a.abs_diff(*b)).collect();
    let mean = diff.iter().map(|&d| d as f64).sum::<f64>() / diff.len() as f64;
    assert!(diff.iter().all(|&d| d <= 16) && mean < 2.0, "mean {mean}");
}
