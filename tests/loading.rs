//! Model directories in every supported layout give the same model.

mod common;
use blockcascade::tensorfile::{TensorFile, TensorInfo};
use blockcascade::weights::Weights;
use common::*;
use std::io::Write;
use std::path::Path;

/// Writes tensors with a given dtype (raw little-endian bytes) and an optional name prefix.
fn write_raw(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)], dtype: &str) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (n, s, b) in tensors {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dtype, "shape": s, "data_offsets": [off, off + b.len()]}),
        );
        off += b.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    for (_, _, b) in tensors {
        f.write_all(b).unwrap();
    }
}

fn golden_tensors() -> Vec<(String, TensorInfo, Vec<f32>)> {
    let f =
        TensorFile::open(&golden_dir().join("model/diffusion_pytorch_model.safetensors")).unwrap();
    f.tensors()
        .iter()
        .map(|(n, i)| (n.clone(), i.clone(), f.convert(i)))
        .collect()
}

fn same(a: &Weights, b: &Weights, tol: f32) {
    let pairs = [
        (&a.patch_w, &b.patch_w),
        (&a.layers[1].ffn2_w, &b.layers[1].ffn2_w),
        (&a.head_modulation, &b.head_modulation),
    ];
    for (x, y) in pairs {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y.iter()) {
            assert!((p - q).abs() <= tol * (1.0 + p.abs()), "{p} vs {q}");
        }
    }
}

#[test]
fn sharded_prefixed_and_half_precision_models_load_identically() {
    let reference = Weights::load(&golden_dir().join("model")).unwrap();
    let ts = golden_tensors();
    let cfg = std::fs::read(golden_dir().join("model/config.json")).unwrap();

    // Two shards with an index and a `model.` prefix, f32.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), &cfg).unwrap();
    let half = ts.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&ts[..half], &ts[half..]].iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = part
            .iter()
            .map(|(n, info, v)| {
                (
                    format!("model.{n}"),
                    info.shape.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        for (n, _, _) in &raw {
            map.insert(n.clone(), serde_json::Value::String(name.clone()));
        }
        write_raw(&d.path().join(&name), &raw, "F32");
    }
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
    let sharded = Weights::load(d.path()).unwrap();
    same(&reference, &sharded, 0.0);

    // bf16 and f16.
    for (dt, conv) in [
        (
            "BF16",
            (|x: f32| half::bf16::from_f32(x).to_le_bytes()) as fn(f32) -> [u8; 2],
        ),
        ("F16", |x: f32| half::f16::from_f32(x).to_le_bytes()),
    ] {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), &cfg).unwrap();
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = ts
            .iter()
            .map(|(n, info, v)| {
                (
                    n.clone(),
                    info.shape.clone(),
                    v.iter().flat_map(|&x| conv(x)).collect(),
                )
            })
            .collect();
        write_raw(&d.path().join("w.safetensors"), &raw, dt);
        let w = Weights::load(d.path()).unwrap();
        assert_eq!(w.source_dtype.name(), dt);
        same(&reference, &w, 1e-2);
    }
}

#[test]
fn a_missing_shard_is_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        golden_dir().join("model/config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"patch_embedding.weight": "shard-1.safetensors"}}"#,
    )
    .unwrap();
    let e = Weights::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("shard-1.safetensors"), "{e}");
}
