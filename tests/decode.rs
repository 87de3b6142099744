//! The decoders against upstream PyTorch (golden cases made by the public Self-Forcing code):
//! whole-video and block-by-block decodes, the weight dtypes, and bad input.

use blockcascade::bench::rel_l2;
use blockcascade::decode::{DecodeStream, Decoder, DecoderKind, Video};
use blockcascade::tensorfile::{write_f32, TensorFile};
use blockcascade::Error;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/decode")
        .join(name)
}

fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = TensorFile::open(path).unwrap();
    let shape = f.tensors()[name].shape.clone();
    (shape, f.tensor_f32(name, None).unwrap())
}

struct Golden {
    weights: PathBuf,
    latents: Vec<f32>,
    f: usize,
    h: usize,
    w: usize,
    expected: Vec<f32>,
    exp_shape: Vec<usize>,
}

fn golden(name: &str, weights: &str) -> Golden {
    let dir = case(name);
    let (ls, latents) = tensor(&dir.join("latents.safetensors"), "latents");
    let (exp_shape, expected) = tensor(&dir.join("expected.safetensors"), "video");
    Golden {
        weights: dir.join(weights),
        latents,
        f: ls[0],
        h: ls[2],
        w: ls[3],
        expected,
        exp_shape,
    }
}

fn stream_blocks(s: &mut DecodeStream, g: &Golden, block: usize) -> Vec<f32> {
    let per = 16 * g.h * g.w;
    let mut out = Vec::new();
    for b in g.latents.chunks(block * per) {
        let v = s.push(b, b.len() / per).unwrap();
        out.extend(v.data);
    }
    out
}

fn check_case(g: &Golden, kind: DecoderKind) {
    // Folder path, kind detected from the names.
    let d = Decoder::load(&g.weights, None).unwrap();
    assert_eq!(d.kind(), kind);
    let v: Video = d.decode(&g.latents, g.f, g.h, g.w).unwrap();
    assert_eq!(
        vec![v.frames, 3, v.height, v.width],
        g.exp_shape,
        "video shape"
    );
    assert_eq!(v.frames, d.pixel_frames(g.f));
    assert_eq!((v.height, v.width), d.pixel_size(g.h, g.w));
    let err = rel_l2(&g.expected, &v.data);
    println!("{kind} whole decode vs PyTorch: rel L2 {err:.3e}");
    assert!(err < 1e-4, "{kind} whole: rel L2 {err}");
    for block in [3, 1] {
        let mut s = d.stream(g.h, g.w).unwrap();
        let got = stream_blocks(&mut s, g, block);
        let err = rel_l2(&g.expected, &got);
        println!("{kind} blocks of {block} vs PyTorch: rel L2 {err:.3e}");
        assert!(err < 1e-4, "{kind} blocks of {block}: rel L2 {err}");
        assert!(
            got == v.data,
            "{kind}: blocks of {block} differ from the whole decode"
        );
    }
}

#[test]
fn wan_vae_matches_pytorch_whole_and_streamed() {
    let g = golden("wan-vae-tiny", "vae");
    check_case(&g, DecoderKind::WanVae);
    // The clamp really happens (the reference hits it).
    let d = Decoder::load(&g.weights, Some(DecoderKind::WanVae)).unwrap();
    let v = d.decode(&g.latents, g.f, g.h, g.w).unwrap();
    assert!(v.data.iter().all(|x| (-1.0..=1.0).contains(x)));
    assert!(v.data.contains(&1.0));
}

#[test]
fn taehv_matches_pytorch_whole_and_streamed() {
    let g = golden("taehv-tiny", "taehv/model.safetensors");
    check_case(&g, DecoderKind::Taehv);
    // Not clamped: 2x - 1 may leave [-1, 1], as upstream.
    let d = Decoder::load(&g.weights, None).unwrap();
    let v = d.decode(&g.latents, g.f, g.h, g.w).unwrap();
    assert!(v.data.iter().any(|x| x.abs() > 1.0));
}

/// Writes `tensors` of `src` to `dst`, converted to `dtype` ("F32", "BF16", "F16"), with
/// `edit` applied to the (name, shape, values) list first.
fn rewrite(
    src: &Path,
    dst: &Path,
    dtype: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) {
    let f = TensorFile::open(src).unwrap();
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = f
        .tensors()
        .iter()
        .map(|(k, i)| (k.clone(), i.shape.clone(), f.tensor_f32(k, None).unwrap()))
        .collect();
    edit(&mut t);
    if dtype == "F32" {
        let out: Vec<_> = t
            .iter()
            .map(|(k, s, d)| (k.as_str(), s.clone(), d.as_slice()))
            .collect();
        write_f32(dst, &out, &BTreeMap::new()).unwrap();
        return;
    }
    let mut header = serde_json::Map::new();
    let mut bytes = Vec::new();
    for (k, s, d) in &t {
        let start = bytes.len();
        for v in d {
            let b = if dtype == "BF16" {
                half::bf16::from_f32(*v).to_le_bytes()
            } else {
                half::f16::from_f32(*v).to_le_bytes()
            };
            bytes.extend_from_slice(&b);
        }
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": dtype, "shape": s, "data_offsets": [start, bytes.len()]}),
        );
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(bytes);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn half_precision_weights_load() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, weights) in [
        ("taehv-tiny", "taehv/model.safetensors"),
        ("wan-vae-tiny", "vae/model.safetensors"),
    ] {
        let g = golden(name, weights);
        let f32v = Decoder::load(&g.weights, None)
            .unwrap()
            .decode(&g.latents, g.f, g.h, g.w)
            .unwrap();
        for dt in ["BF16", "F16"] {
            let p = tmp.path().join(format!("{name}-{dt}.safetensors"));
            rewrite(&g.weights, &p, dt, |_| {});
            let d = Decoder::load(&p, None).unwrap();
            let v = d.decode(&g.latents, g.f, g.h, g.w).unwrap();
            let err = rel_l2(&f32v.data, &v.data);
            println!("{name} {dt} weights vs f32: rel L2 {err:.3e}");
            // Rounding the weights moves the output a little, not a lot.
            assert!(err > 0.0 && err < 5e-2, "{name} {dt}: {err}");
        }
    }
}

fn load_err(p: &Path, kind: Option<DecoderKind>) -> String {
    match Decoder::load(p, kind) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => {
            assert!(matches!(e, Error::Format(_) | Error::Io { .. }), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn bad_weights_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let wan = case("wan-vae-tiny").join("vae/model.safetensors");
    let tae = case("taehv-tiny").join("taehv/model.safetensors");
    let p = tmp.path().join("w.safetensors");

    rewrite(&wan, &p, "F32", |t| {
        t.retain(|(k, _, _)| k != "decoder.upsamples.4.shortcut.weight")
    });
    let e = load_err(&p, None);
    assert!(e.contains("decoder.upsamples.4.shortcut.weight"), "{e}");

    rewrite(&wan, &p, "F32", |t| {
        for (k, s, d) in t.iter_mut() {
            if k == "decoder.middle.0.residual.6.weight" {
                s[1] -= 1;
                d.truncate(s.iter().product());
            }
        }
    });
    let e = load_err(&p, None);
    assert!(e.contains("decoder.middle.0.residual.6.weight"), "{e}");

    rewrite(&tae, &p, "F32", |t| {
        t.retain(|(k, _, _)| k != "decoder.9.conv.2.weight")
    });
    let e = load_err(&p, None);
    assert!(e.contains("decoder.9.conv.2.weight"), "{e}");

    rewrite(&tae, &p, "F32", |t| {
        for (k, s, d) in t.iter_mut() {
            if k == "decoder.13.conv.weight" {
                s[0] = 17;
                d.truncate(17 * s[1]);
            }
        }
    });
    let e = load_err(&p, None);
    assert!(e.contains("decoder.13.conv.weight"), "{e}");

    // Unrecognisable names, a forced kind that does not fit, an empty folder.
    rewrite(&tae, &p, "F32", |t| {
        t.retain(|(k, _, _)| k.starts_with("encoder."))
    });
    let e = load_err(&p, None);
    assert!(e.contains("decoder kind"), "{e}");
    let e = load_err(&tae, Some(DecoderKind::WanVae));
    assert!(e.contains("conv2.weight"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = load_err(&empty, None);
    assert!(e.contains("no .safetensors"), "{e}");
    load_err(&tmp.path().join("missing.safetensors"), None);
    assert!("vae".parse::<DecoderKind>().is_err());
}

/// A NaN or an infinity in a decoder's weights is refused at load: the decoders' ReLUs
/// (`max(x, 0)`) turn NaN into 0, so such a file used to decode to plausible, wrong frames.
#[test]
fn non_finite_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.safetensors");
    for (src, name) in [
        (
            case("taehv-tiny").join("taehv/model.safetensors"),
            "decoder.1.weight",
        ),
        (
            case("taehv-tiny").join("taehv/model.safetensors"),
            "decoder.1.bias",
        ),
        (
            case("wan-vae-tiny").join("vae/model.safetensors"),
            "decoder.middle.0.residual.6.weight",
        ),
        (
            case("wan-vae-tiny").join("vae/model.safetensors"),
            "conv2.weight",
        ),
    ] {
        for (dtype, bad) in [
            ("F32", f32::NAN),
            ("BF16", f32::INFINITY),
            ("F16", f32::NAN),
        ] {
            rewrite(&src, &p, dtype, |t| {
                let (_, _, d) = t.iter_mut().find(|(k, _, _)| k == name).unwrap();
                let mid = d.len() / 2;
                d[mid] = bad;
            });
            let e = load_err(&p, None);
            assert!(
                e.contains(name) && e.contains("NaN or infinite"),
                "{name} {dtype}: {e}"
            );
        }
    }
}

#[test]
fn bad_latents_are_clear_errors() {
    let d = Decoder::tiny_taehv(3);
    let inv = |r: blockcascade::Result<Video>| match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("{other:?}"),
    };
    assert!(d.check_latent_size(16, 4, 6).is_ok());
    assert!(d.check_latent_size(12, 4, 6).is_err());
    assert!(d.check_latent_size(16, 0, 6).is_err());
    assert!(d.check_latent_size(16, 4, 100_000).is_err());
    assert!(d.stream(0, 3).is_err());
    let z = vec![0.5f32; 2 * 16 * 4 * 6];
    let m = inv(d.decode(&z, 3, 4, 6));
    assert!(m.contains("3 frames"), "{m}");
    let m = inv(d.decode(&z[1..], 2, 4, 6));
    assert!(m.contains("need"), "{m}");
    let mut bad = z.clone();
    bad[7] = f32::NAN;
    let m = inv(d.decode(&bad, 2, 4, 6));
    assert!(m.contains("not finite"), "{m}");
    // An error leaves the stream usable.
    let mut s = d.stream(4, 6).unwrap();
    assert!(s.push(&z[1..], 2).is_err());
    let v = s.push(&z, 2).unwrap();
    assert_eq!(v.frames, 5);
    assert_eq!(v, d.decode(&z, 2, 4, 6).unwrap());
}

#[test]
fn stream_state_stays_bounded() {
    for kind in [DecoderKind::WanVae, DecoderKind::Taehv] {
        let d = Decoder::synthetic(kind, 2, 4);
        let (h, w) = (2, 2);
        let mut s = d.stream(h, w).unwrap();
        let z = vec![0.25f32; 16 * h * w];
        let mut sizes = Vec::new();
        for _ in 0..40 {
            let v = s.push(&z, 1).unwrap();
            assert!(v.data.iter().all(|x| x.is_finite()));
            sizes.push(s.state_bytes());
        }
        assert!(
            sizes[3..].iter().all(|&b| b == sizes[3]),
            "{kind}: {sizes:?}"
        );
        assert_eq!(sizes[39], d.state_bytes(h, w), "{kind}");
    }
}

#[test]
fn tiny_taehv_is_deterministic_and_sized() {
    let a = Decoder::tiny_taehv(1);
    let b = Decoder::tiny_taehv(1);
    assert_eq!(a.kind(), DecoderKind::Taehv);
    assert_eq!(a.pixel_size(3, 5), (24, 40));
    let z = vec![0.1f32; 16 * 3 * 5];
    let va = a.decode(&z, 1, 3, 5).unwrap();
    assert_eq!(va.frames, 1);
    assert_eq!(va, b.decode(&z, 1, 3, 5).unwrap());
    let c = Decoder::tiny_taehv(2).decode(&z, 1, 3, 5).unwrap();
    assert_ne!(va.data, c.data);
}

#[test]
fn decoder_is_shareable() {
    fn check<T: Send + Sync>() {}
    check::<Decoder>();
}
