//! `decode`'s latents file and the paths around it: every bad latents file is one error naming
//! the file, odd but valid flag values work, and a bare file name is reported as one.

use super::*;
use blockcascade::decode::{Decoder, LatentsFile};

fn data_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/decode")
        .join(case)
}

#[test]
fn bad_latents_files_are_one_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let dec = Decoder::tiny_taehv(0);
    let write = |name: &str, bytes: Vec<u8>| -> PathBuf {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut vals: Vec<f32> = (0..2 * 16 * 4)
        .map(|i| (i % 9) as f32 * 0.1 - 0.4)
        .collect();
    let ok = write(
        "ok.safetensors",
        one_tensor("latents", "BF16", &[2, 16, 2, 2], &vals),
    );
    let lat = LatentsFile::load(&ok, &dec).unwrap();
    assert_eq!(
        (lat.frames, lat.channels, lat.height, lat.width),
        (2, 16, 2, 2)
    );
    assert_eq!(lat.data.len(), lat.frames * lat.frame_len());
    // A NaN in frame 1: refused before any decoding (it would decode to black pixels), and the
    // message says where.
    vals[64 + 5] = f32::NAN;
    let nan = write(
        "nan.safetensors",
        one_tensor("latents", "F16", &[2, 16, 2, 2], &vals),
    );
    let e = expect_err(LatentsFile::load(&nan, &dec), "nan.safetensors", "nan");
    let m = e.to_string();
    assert!(m.contains("frame 1") && m.contains("NaN"), "{m}");
    vals[64 + 5] = f32::NEG_INFINITY;
    let inf = write(
        "inf.safetensors",
        one_tensor("latents", "F32", &[2, 16, 2, 2], &vals),
    );
    expect_err(LatentsFile::load(&inf, &dec), "inf.safetensors", "inf");
    for (name, shape, tensor) in [
        ("c8", vec![2, 8, 2, 2], "latents"),
        ("rank3", vec![16, 2, 2], "latents"),
        ("zero", vec![0, 16, 2, 2], "latents"),
        ("zero-w", vec![1, 16, 2, 0], "latents"),
        ("wrong-name", vec![1, 16, 2, 2], "video"),
    ] {
        let n: usize = shape.iter().product();
        let p = write(
            &format!("{name}.safetensors"),
            one_tensor(tensor, "F32", &shape, &vec![0.1; n]),
        );
        expect_err(
            LatentsFile::load(&p, &dec),
            &format!("{name}.safetensors"),
            name,
        );
    }
    // Blocks of any size from 1 on cover every frame once; 0 is refused.
    for bf in [1, 2, 3, usize::MAX] {
        let got: Vec<usize> = lat.blocks(bf).unwrap().map(|(_, n)| n).collect();
        assert_eq!(got.iter().sum::<usize>(), 2, "{bf}");
        assert!(got.iter().all(|&n| n <= bf && n > 0), "{bf}: {got:?}");
    }
    assert!(lat.blocks(0).is_err());
}

/// `decode --block-frames` past the frame count is one block (it overflowed a multiplication
/// before), with the same video as blocks of 1.
#[test]
fn decode_with_a_huge_block_size_is_one_block() {
    let c = data_dir("taehv-tiny");
    let d = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for bf in ["1", "18446744073709551615"] {
        let out = d.path().join(format!("v{}.safetensors", bf.len()));
        let o = Command::new(env!("CARGO_BIN_EXE_blockcascade"))
            .args(["decode", "-q", "--block-frames", bf, "--vae"])
            .arg(c.join("taehv"))
            .arg("--latents")
            .arg(c.join("latents.safetensors"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "--block-frames {bf}: {err}");
        outs.push(
            TensorFile::open(&out)
                .unwrap()
                .tensor_f32("video", None)
                .unwrap(),
        );
    }
    assert_eq!(outs[0], outs[1]);
}

/// `--text-encoder FILE` given as a bare file name: the missing tokenizer is reported against
/// the working folder, not an empty path (`error: : no tokenizer.json ...` before).
#[test]
fn a_bare_text_encoder_file_name_is_reported_with_its_folder() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("enc.safetensors"), b"garbage").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_blockcascade"))
        .args([
            "encode-prompt",
            "--text-encoder",
            "enc.safetensors",
            "--prompt",
            "hi",
            "--out",
            "p.safetensors",
        ])
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.starts_with("error: .: "), "{err}");
    assert!(
        err.contains("tokenizer.json") && err.lines().count() == 1,
        "{err}"
    );
    let mut left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["enc.safetensors"]);
}

/// An output naming the file of an input or of the other output is refused before any work
/// (it silently replaced that file before: the latents over the video, a video over the
/// latents it came from), and nothing is written.
#[test]
fn an_output_over_an_input_or_the_other_output_is_refused() {
    let c = data_dir("taehv-tiny");
    let d = tempfile::tempdir().unwrap();
    let lat = d.path().join("l.safetensors");
    std::fs::copy(c.join("latents.safetensors"), &lat).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_blockcascade"))
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let vae = c.join("taehv");
    let vae = vae.to_str().unwrap();
    let e = run(&[
        "decode",
        "--vae",
        vae,
        "--latents",
        "l.safetensors",
        "--out",
        "./l.safetensors",
    ]);
    assert!(e.starts_with("error:") && e.contains("--latents"), "{e}");
    let e = run(&[
        "generate",
        "--frames",
        "3",
        "--video",
        "x.safetensors",
        "--out",
        "x.safetensors",
    ]);
    assert!(e.contains("--video") && e.contains("--out"), "{e}");
    let e = run(&[
        "generate",
        "--frames",
        "3",
        "--noise",
        "l.safetensors",
        "--out",
        "l.safetensors",
    ]);
    assert!(e.contains("--noise"), "{e}");
    // The latents are untouched and nothing else was written.
    let f = TensorFile::open(&lat).unwrap();
    assert!(f.tensors().contains_key("latents"));
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

/// An output that exists as a FIFO (or a device: `/dev/null`, not tried here) is refused
/// before any work: the temporary file used to be renamed over it, replacing the node with a
/// regular file.
#[test]
fn an_output_that_is_a_fifo_or_device_is_refused_and_kept() {
    use blockcascade::video::{VideoOptions, VideoWriter};
    use std::os::unix::fs::FileTypeExt;
    let d = tempfile::tempdir().unwrap();
    let still_a_fifo = |p: &Path| {
        let t = std::fs::symlink_metadata(p).unwrap().file_type();
        assert!(t.is_fifo(), "{} was replaced", p.display());
    };
    let fifo = |name: &str| {
        let p = d.path().join(name);
        super::inputs::mkfifo(&p);
        p
    };
    let p = fifo("l.safetensors");
    let e = write_f32(&p, &[("x", vec![1], &[1.0])], &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    still_a_fifo(&p);
    for name in ["v.y4m", "v.mp4", "v.safetensors"] {
        let p = fifo(name);
        let e = VideoWriter::create(&p, 16, 16, &VideoOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{name}: created"));
        assert!(e.to_string().contains("not a regular file"), "{name}: {e}");
        still_a_fifo(&p);
    }
    // The CLI refuses it before generating anything.
    let p = fifo("cli.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_blockcascade"))
        .args(["generate", "-q", "--frames", "3", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a regular file"),
        "{err}"
    );
    still_a_fifo(&p);
    assert!(std::fs::read_dir(d.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
}

/// Two threads writing the same output at once: each write is whole (temp file + rename), so
/// the file is always one of the two and neither call fails. They used to share one temporary
/// name, truncating each other's data or renaming it away mid-write.
#[test]
fn concurrent_writes_of_one_output_do_not_mix() {
    let d = tempfile::tempdir().unwrap();
    let p = Arc::new(d.path().join("same.safetensors"));
    let values = |v: f32| vec![v; 1 << 16];
    let writers: Vec<_> = [1.0f32, 2.0]
        .into_iter()
        .map(|v| {
            let p = p.clone();
            std::thread::spawn(move || {
                let data = values(v);
                for _ in 0..40 {
                    write_f32(&p, &[("x", vec![data.len()], &data)], &BTreeMap::new())
                        .map_err(|e| e.to_string())?;
                    let f = TensorFile::open(&p).map_err(|e| e.to_string())?;
                    let got = f.tensor_f32("x", None).map_err(|e| e.to_string())?;
                    if got != values(1.0) && got != values(2.0) {
                        return Err("a mixed file".to_string());
                    }
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap().unwrap();
    }
}
