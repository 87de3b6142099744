//! Adversarial inputs (deterministic fuzzing with the crate's own RNG and fixed seeds) at every
//! user-reachable entry point: safetensors files, model directories, prompt embeddings, recorded
//! noise, prompt schedules, the CLI and the C ABI. Every case must give one typed error whose
//! message names the problem (or, where the input is still valid, an answer that passes the
//! format's invariants): never a panic, an abort, a hang or a silent wrong answer.

mod common;

use blockcascade::ffi::sys::*;
use blockcascade::ffi::*;
use blockcascade::noise::RecordedNoise;
use blockcascade::prompt::{load_schedule, PromptEmbeds};
use blockcascade::rng::Rng;
use blockcascade::tensorfile::{write_f32, TensorFile};
use blockcascade::weights::{builtin_config, Weights};
use blockcascade::{Error, GenerateOptions, ModelConfig};
use common::*;
use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn pick<T: Clone>(rng: &mut Rng, v: &[T]) -> T {
    v[below(rng, v.len())].clone()
}

/// Runs `f`, turning a panic into a test failure that names the case.
#[track_caller]
fn no_panic<T>(case: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("case {case}: panicked: {msg}")
        }
    }
}

/// Asserts an error whose message mentions `needle` (case-insensitive).
#[track_caller]
fn expect_err<T>(r: blockcascade::Result<T>, needle: &str, case: &str) -> Error {
    match r {
        Ok(_) => panic!("case {case}: succeeded, expected an error mentioning `{needle}`"),
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.to_lowercase().contains(&needle.to_lowercase()),
                "case {case}: error `{m}` does not mention `{needle}`"
            );
            e
        }
    }
}

/// A safetensors file from a raw header and data.
fn raw_file(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(data);
    v
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file with one tensor `name` of `dtype` (`F32`, `F16`, `BF16`) and `shape`,
/// values converted from `vals`.
fn one_tensor(name: &str, dtype: &str, shape: &[usize], vals: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = match dtype {
        "F32" => f32_bytes(vals),
        "F16" => vals
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        "BF16" => vals
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => unreachable!(),
    };
    let h = serde_json::json!({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, data.len()]}});
    raw_file(h.to_string().as_bytes(), &data)
}

/// Opens `bytes` written to `path`; when it opens, every tensor must convert to exactly its
/// shape's element count, inside the data, without two tensors sharing bytes.
fn open_checked(path: &Path, bytes: &[u8], case: &str) -> blockcascade::Result<TensorFile> {
    std::fs::write(path, bytes).unwrap();
    let r = no_panic(case, || TensorFile::open(path));
    match &r {
        Ok(f) => {
            let data_len = bytes.len() as u64;
            for (name, info) in f.tensors() {
                let n = info
                    .shape
                    .iter()
                    .try_fold(1usize, |a, &b| a.checked_mul(b))
                    .unwrap_or_else(|| panic!("case {case}: `{name}` shape overflows but opened"));
                assert!(
                    (n * info.dtype.size()) as u64 <= data_len,
                    "case {case}: `{name}` larger than the file"
                );
                let v = no_panic(case, || f.tensor_f32(name, Some(&info.shape)))
                    .unwrap_or_else(|e| panic!("case {case}: `{name}` opened but: {e}"));
                assert_eq!(v.len(), n, "case {case}: `{name}` element count");
            }
        }
        Err(e) => {
            let m = e.to_string();
            let file = path.file_name().unwrap().to_str().unwrap();
            assert!(
                m.contains(file),
                "case {case}: error `{m}` does not name the file"
            );
        }
    }
    r
}

/// A valid two-tensor file written by `write_f32`, with metadata.
fn valid_file(dir: &Path) -> Vec<u8> {
    let p = dir.join("valid.safetensors");
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
    let b = [1.0f32, -2.0, 3.5, 1e-3];
    let mut meta = BTreeMap::new();
    meta.insert("k".to_string(), "v".to_string());
    write_f32(
        &p,
        &[("alpha", vec![2, 3], &a), ("beta", vec![4], &b)],
        &meta,
    )
    .unwrap();
    std::fs::read(&p).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. safetensors files

#[test]
fn safetensors_byte_flips_and_truncations() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_file(dir.path());
    let p = dir.path().join("mutated.safetensors");
    let f = open_checked(&p, &good, "valid").unwrap();
    assert_eq!(f.tensor_f32("beta", None).unwrap()[1], -2.0);
    assert_eq!(f.metadata()["k"], "v");
    let hlen = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // Random flips of 1..=3 bytes in the length and the header.
    let mut rng = Rng::new(0xF1_1F);
    let mut opened = 0;
    for case in 0..400 {
        let mut b = good.clone();
        for _ in 0..1 + below(&mut rng, 3) {
            let at = below(&mut rng, 8 + hlen);
            b[at] ^= 1 + below(&mut rng, 255) as u8;
        }
        opened += open_checked(&p, &b, &format!("flip {case}")).is_ok() as usize;
    }
    // Most flips break the header; some (in a name, in the padding) legitimately do not.
    assert!(opened < 200, "{opened} of 400 flipped headers opened");
    // Truncation at every offset.
    for cut in 0..good.len() {
        let r = open_checked(&p, &good[..cut], &format!("cut at {cut}"));
        assert!(r.is_err(), "truncated at {cut} of {} opened", good.len());
    }
    // The 8-byte length: huge, zero, just past the file, one short.
    let total = good.len() as u64;
    for (n, needle) in [
        (u64::MAX, "exceeds the file size"),
        (1 << 63, "exceeds the file size"),
        ((100 << 20) + 1, "exceeds the file size"),
        (total - 7, "exceeds the file size"),
        (0, "header JSON"),
        (hlen as u64 - 1, "header JSON"),
        (2, "header JSON"),
    ] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        expect_err(open_checked(&p, &b, "len"), needle, &format!("length {n}"));
    }
    // Empty files, directories and FIFOs.
    expect_err(open_checked(&p, &[], "empty"), "too short", "empty");
    expect_err(TensorFile::open(dir.path()), "not a regular file", "dir");
    let fifo = dir.path().join("fifo.safetensors");
    if Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        // Opening a FIFO for reading would block until a writer comes: refused up front.
        expect_err(TensorFile::open(&fifo), "not a regular file", "fifo");
    }
    expect_err(
        TensorFile::open(&dir.path().join("missing.safetensors")),
        "missing.safetensors",
        "missing",
    );
}

#[test]
fn safetensors_header_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.safetensors");
    let data = f32_bytes(&[0.5; 10]); // 40 bytes
    let ok = r#""a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}"#;
    let t = |dtype: &str, shape: &str, off: &str| {
        format!(r#"{{"a":{{"dtype":{dtype},"shape":{shape},"data_offsets":{off}}}}}"#)
    };
    let big = format!("[{}]", u64::MAX);
    let cases: Vec<(String, &str)> = vec![
        (t(r#""f32""#, "[2,3]", "[0,24]"), "unsupported dtype f32"),
        (t(r#""I64""#, "[2,3]", "[0,48]"), "unsupported dtype I64"),
        (t(r#""F64""#, "[2,3]", "[0,48]"), "unsupported dtype F64"),
        (t("5", "[2,3]", "[0,24]"), "unsupported dtype 5"),
        (t("null", "[2,3]", "[0,24]"), "unsupported dtype null"),
        (t(r#""F32""#, "[-2,3]", "[0,24]"), "no valid shape"),
        (t(r#""F32""#, "[2.0,3]", "[0,24]"), "no valid shape"),
        (t(r#""F32""#, r#""2,3""#, "[0,24]"), "no valid shape"),
        (t(r#""F32""#, r#"["2",3]"#, "[0,24]"), "no valid shape"),
        (t(r#""F32""#, "null", "[0,24]"), "no valid shape"),
        (
            t(r#""F32""#, "[4611686018427387904,4]", "[0,24]"),
            "overflows",
        ),
        (t(r#""F32""#, &big, "[0,24]"), "overflows"),
        (
            t(
                r#""F32""#,
                "[0,4611686018427387904,4611686018427387904]",
                "[0,0]",
            ),
            "overflows",
        ),
        (t(r#""F32""#, "[2,3]", "[24,0]"), "reversed"),
        (t(r#""F32""#, "[2,3]", "[16,36]"), "holds 20 bytes"),
        (
            t(r#""F32""#, "[2,3]", "[24,48]"),
            "outside the 40 data bytes",
        ),
        (
            t(r#""F32""#, "[2,3]", &format!("[0,{}]", u64::MAX)),
            "outside",
        ),
        (t(r#""F32""#, "[2,3]", "[0,24,40]"), "no valid data_offsets"),
        (t(r#""F32""#, "[2,3]", "[0]"), "no valid data_offsets"),
        (
            t(r#""F32""#, "[2,3]", r#"["0","24"]"#),
            "no valid data_offsets",
        ),
        (
            t(r#""F32""#, "[2,3]", "[0.0,24.0]"),
            "no valid data_offsets",
        ),
        (t(r#""F32""#, "[2,3]", "[-24,0]"), "no valid data_offsets"),
        (t(r#""F32""#, "[2,3]", "null"), "no valid data_offsets"),
        (
            r#"{"a":{"shape":[2,3],"data_offsets":[0,24]}}"#.into(),
            "no dtype",
        ),
        (r#"{"a":5}"#.into(), "must be an object"),
        (r#"{"a":[1,2]}"#.into(), "must be an object"),
        (r#"{"a":"F32"}"#.into(), "must be an object"),
        (format!("{{{ok},{ok}}}"), "appears twice"),
        (
            format!(r#"{{{ok},"b":{{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}}}"#),
            "overlap",
        ),
        (
            format!(r#"{{{ok},"b":{{"dtype":"F16","shape":[2],"data_offsets":[20,24]}}}}"#),
            "overlap",
        ),
        (r#"[]"#.into(), "header JSON"),
        (r#""a""#.into(), "header JSON"),
        (r#"5"#.into(), "header JSON"),
        (r#"null"#.into(), "header JSON"),
        (r#"{"a":"#.into(), "header JSON"),
        (format!("{{{ok}}}xyz"), "header JSON"),
        (
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            "header JSON",
        ),
        (
            format!(
                r#"{{"a":{{"x":{}1{}}}}}"#,
                "[".repeat(5000),
                "]".repeat(5000)
            ),
            "header JSON",
        ),
        (format!(r#"{{"__metadata__":5,{ok}}}"#), "__metadata__"),
        (format!(r#"{{"__metadata__":[],{ok}}}"#), "__metadata__"),
        (
            format!(r#"{{"__metadata__":{{"k":5}},{ok}}}"#),
            "__metadata__",
        ),
        (
            format!(r#"{{"__metadata__":{{}},"__metadata__":{{}},{ok}}}"#),
            "__metadata__",
        ),
    ];
    for (i, (h, needle)) in cases.iter().enumerate() {
        let r = open_checked(&p, &raw_file(h.as_bytes(), &data), &format!("json {i}"));
        expect_err(r, needle, &format!("json {i}: {}", &h[..h.len().min(120)]));
    }
    // Invalid UTF-8 in a name and in the padding.
    let mut h = format!("{{{ok}}}").into_bytes();
    h[2] = 0xFF;
    expect_err(
        open_checked(&p, &raw_file(&h, &data), "utf8"),
        "header JSON",
        "utf8",
    );
    let mut h = format!("{{{ok}}}  ").into_bytes();
    let n = h.len();
    h[n - 1] = 0xC3;
    expect_err(
        open_checked(&p, &raw_file(&h, &data), "utf8 pad"),
        "header JSON",
        "utf8 pad",
    );
    // Still valid: a scalar, a zero-sized tensor, gaps, unknown fields, empty header.
    for (i, h) in [
        r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"BF16","shape":[0,7],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[36,40]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":true},"__metadata__":{"format":"pt"}}"#,
        r#"{}"#,
        r#"  {}  "#,
    ]
    .iter()
    .enumerate()
    {
        open_checked(&p, &raw_file(h.as_bytes(), &data), &format!("valid {i}"))
            .unwrap_or_else(|e| panic!("valid header {i} `{h}` refused: {e}"));
    }
}

/// Random headers assembled from interesting pieces: whatever opens passes every invariant.
#[test]
fn safetensors_random_headers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.safetensors");
    let mut rng = Rng::new(0x5AFE_7E45);
    let names = ["a", "b", "a", "__metadata__", "", "é", "a\\u0000b"];
    let dtypes = [
        r#""F32""#,
        r#""BF16""#,
        r#""F16""#,
        r#""f16""#,
        r#""I8""#,
        "7",
        "null",
        "[]",
    ];
    let dims = [
        "0",
        "1",
        "2",
        "3",
        "7",
        "-1",
        "1.5",
        r#""2""#,
        "4294967296",
        "4611686018427387904",
        "18446744073709551615",
        "18446744073709551616",
    ];
    let offs = [
        "0",
        "4",
        "8",
        "12",
        "16",
        "24",
        "64",
        "65",
        "-4",
        "2.5",
        "18446744073709551615",
        "1e3",
    ];
    let mut opened = 0;
    for case in 0..500 {
        let mut entries = Vec::new();
        for _ in 0..below(&mut rng, 4) {
            let name = pick(&mut rng, &names);
            let shape: Vec<&str> = (0..below(&mut rng, 4))
                .map(|_| pick(&mut rng, &dims))
                .collect();
            let (o1, o2) = if below(&mut rng, 2) == 0 {
                // Consistent offsets for the shape (when numeric), so that some cases open.
                let n: Option<u64> = shape
                    .iter()
                    .map(|d| d.parse::<u64>().ok())
                    .try_fold(1u64, |a, b| b.and_then(|b| a.checked_mul(b)));
                let start = 4 * below(&mut rng, 8) as u64;
                let len = n.and_then(|n| n.checked_mul(2 + 2 * below(&mut rng, 2) as u64));
                (
                    start.to_string(),
                    len.and_then(|l| l.checked_add(start))
                        .map_or("0".to_string(), |e| e.to_string()),
                )
            } else {
                (
                    pick(&mut rng, &offs).to_string(),
                    pick(&mut rng, &offs).to_string(),
                )
            };
            let mut off = vec![o1, o2];
            if below(&mut rng, 10) == 0 {
                off.push("8".into());
            }
            entries.push(format!(
                r#""{name}":{{"dtype":{},"shape":[{}],"data_offsets":[{}]}}"#,
                pick(&mut rng, &dtypes),
                shape.join(","),
                off.join(",")
            ));
        }
        let h = format!("{{{}}}", entries.join(","));
        let data = vec![0x3Cu8; below(&mut rng, 80)];
        let r = open_checked(
            &p,
            &raw_file(h.as_bytes(), &data),
            &format!("random {case}: {h}"),
        );
        if let Ok(f) = r {
            opened += 1;
            for t in f.tensors().values() {
                let bytes = t.shape.iter().product::<usize>() * t.dtype.size();
                assert!(bytes <= data.len(), "{h}");
            }
        }
    }
    assert!(
        opened > 20,
        "only {opened} random headers opened: the fuzzer is too harsh"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. model directories

/// A copy of the golden model directory.
fn model_copy() -> tempfile::TempDir {
    let src = golden_dir().join("model");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn golden_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden_dir().join("model/config.json")).unwrap())
        .unwrap()
}

#[test]
fn model_config_mutations() {
    let d = model_copy();
    let cfg_path = d.path().join("config.json");
    Weights::load(d.path()).unwrap();
    let fields = [
        "dim",
        "ffn_dim",
        "freq_dim",
        "num_heads",
        "num_layers",
        "in_dim",
        "out_dim",
        "text_len",
        "text_dim",
        "patch_size",
        "eps",
        "model_type",
    ];
    let values = [
        "-1",
        "0",
        "1.5",
        "\"x\"",
        "null",
        "1e30",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "[]",
        "{}",
        "true",
        "[1, 2]",
        "-0.0",
        "65",
    ];
    for field in fields {
        for value in values {
            let mut c = golden_config();
            c[field] = serde_json::from_str(value).unwrap();
            std::fs::write(&cfg_path, c.to_string()).unwrap();
            let case = format!("{field} = {value}");
            match no_panic(&case, || Weights::load(d.path())) {
                // text_len is in no weight's shape: any value in range is a valid config.
                Ok(_) => assert_eq!((field, value), ("text_len", "65"), "{case} loaded"),
                // Wrong types and values name the field, or the tensor whose shape no longer
                // matches the config.
                Err(e) => {
                    let m = e.to_string();
                    assert!(
                        m.contains(field)
                            || m.contains("has shape")
                            || m.contains("missing tensor"),
                        "{case}: `{m}` names neither the field nor a tensor"
                    );
                }
            }
        }
        // A required field missing is named; the others have Wan's defaults.
        let mut c = golden_config();
        c.as_object_mut().unwrap().remove(field);
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        let r = no_panic(field, || Weights::load(d.path()));
        if ["dim", "ffn_dim", "num_heads", "num_layers"].contains(&field) {
            expect_err(r, &format!("missing field `{field}`"), field);
        } else if field == "text_dim" {
            // The default (4096) does not match this tiny model's weights.
            expect_err(r, "has shape", field);
        } else {
            r.unwrap_or_else(|e| panic!("{field} missing: {e}"));
        }
    }
    // Absurd combinations.
    for (edit, needle) in [
        (serde_json::json!({"dim": 65}), "heads"),
        (
            serde_json::json!({"dim": 66, "num_heads": 2}),
            "heads of even size",
        ),
        (serde_json::json!({"num_layers": 0}), "num_layers"),
        (serde_json::json!({"num_heads": 0}), "num_heads"),
        (serde_json::json!({"eps": 0.0}), "eps"),
        (serde_json::json!({"eps": -1e-6}), "eps"),
        (serde_json::json!({"eps": 1e300}), "eps"),
        (serde_json::json!({"freq_dim": 255}), "freq_dim"),
        (serde_json::json!({"text_len": 0}), "text_len"),
        (serde_json::json!({"model_type": "i2v"}), "t2v"),
        (serde_json::json!({"dim": 1u64 << 40}), "at most"),
        (serde_json::json!({"ffn_dim": 1u64 << 40}), "at most"),
        (serde_json::json!({"num_layers": 1u64 << 40}), "at most"),
        (serde_json::json!({"text_dim": 1u64 << 40}), "at most"),
        // Within the limits but far from the weights: a shape error, nothing allocated.
        (
            serde_json::json!({"dim": 65536, "num_heads": 1024, "ffn_dim": 262144, "num_layers": 1024}),
            "has shape",
        ),
    ] {
        let mut c = golden_config();
        for (k, v) in edit.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        let case = edit.to_string();
        expect_err(no_panic(&case, || Weights::load(d.path())), needle, &case);
    }
    // Not JSON, not an object, empty, a directory, missing.
    for (text, needle) in [
        ("{ not json", "malformed config"),
        ("[]", "malformed config"),
        ("", "malformed config"),
        ("\u{feff}{}", "malformed config"),
        ("null", "malformed config"),
    ] {
        std::fs::write(&cfg_path, text).unwrap();
        expect_err(Weights::load(d.path()), needle, text);
    }
    std::fs::remove_file(&cfg_path).unwrap();
    expect_err(Weights::load(d.path()), "config.json", "missing config");
    std::fs::create_dir(&cfg_path).unwrap();
    expect_err(Weights::load(d.path()), "config.json", "config dir");
    expect_err(
        Weights::load(&d.path().join("diffusion_pytorch_model.safetensors")),
        "not a directory",
        "model is a file",
    );
}

/// Every tensor of the golden model.
fn golden_weights() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let f =
        TensorFile::open(&golden_dir().join("model/diffusion_pytorch_model.safetensors")).unwrap();
    f.tensors()
        .iter()
        .map(|(k, i)| (k.clone(), (i.shape.clone(), f.convert(i))))
        .collect()
}

fn write_weights(path: &Path, m: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let ts: Vec<(&str, Vec<usize>, &[f32])> = m
        .iter()
        .map(|(k, (s, v))| (k.as_str(), s.clone(), v.as_slice()))
        .collect();
    write_f32(path, &ts, &BTreeMap::new()).unwrap();
}

#[test]
fn model_weight_mutations() {
    let all = golden_weights();
    let names: Vec<String> = all.keys().cloned().collect();
    let d = model_copy();
    let wpath = d.path().join("diffusion_pytorch_model.safetensors");
    let mut rng = Rng::new(0x3E1_6475);
    for case in 0..60 {
        let mut m = all.clone();
        let name = pick(&mut rng, &names);
        let what = below(&mut rng, 5);
        let needle = match what {
            0 => {
                m.remove(&name);
                format!("missing tensor `{name}`")
            }
            1 => {
                // Same element count, another shape.
                let e = m.get_mut(&name).unwrap();
                let n = e.1.len();
                e.0 = vec![1, n];
                format!("`{name}` has shape [1, {n}]")
            }
            2 => {
                let e = m.get_mut(&name).unwrap();
                e.1.push(0.0);
                e.0 = vec![e.1.len()];
                format!("`{name}` has shape")
            }
            3 => {
                let e = m.get_mut(&name).unwrap();
                let i = below(&mut rng, e.1.len());
                e.1[i] = pick(&mut rng, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
                format!("`{name}` contains NaN or infinite")
            }
            _ => {
                // Renamed: missing under its own name, the stray name ignored.
                let v = m.remove(&name).unwrap();
                m.insert(format!("{name}.x"), v);
                format!("missing tensor `{name}`")
            }
        };
        write_weights(&wpath, &m);
        let c = format!("weights {case}");
        expect_err(no_panic(&c, || Weights::load(d.path())), &needle, &c);
    }
    // Mixed dtypes: one tensor stored as BF16.
    let mut m = all.clone();
    let (shape, vals) = m.remove("head.head.bias").unwrap();
    write_weights(&wpath, &m);
    std::fs::write(
        d.path().join("extra.safetensors"),
        one_tensor("head.head.bias", "BF16", &shape, &vals),
    )
    .unwrap();
    expect_err(Weights::load(d.path()), "mixed dtypes", "mixed");
    // The same tensor in two files.
    std::fs::write(
        d.path().join("extra.safetensors"),
        one_tensor("head.modulation", "F32", &[1, 2, 64], &[0.0; 128]),
    )
    .unwrap();
    write_weights(&wpath, &all);
    expect_err(Weights::load(d.path()), "is in both", "duplicate");
    std::fs::remove_file(d.path().join("extra.safetensors")).unwrap();
    // No weights at all.
    std::fs::remove_file(&wpath).unwrap();
    expect_err(Weights::load(d.path()), "no *.safetensors", "none");
}

#[test]
fn model_index_mutations() {
    let d = model_copy();
    let idx = d.path().join("model.safetensors.index.json");
    let good = "diffusion_pytorch_model.safetensors";
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(
        d.path().join(good),
        outside.path().join("stolen.safetensors"),
    )
    .unwrap();
    let abs = outside
        .path()
        .join("stolen.safetensors")
        .display()
        .to_string();
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"weight_map": {"dim": good}}), ""),
        (
            serde_json::json!({"weight_map": {"a": "missing.safetensors"}}),
            "missing.safetensors",
        ),
        (
            serde_json::json!({"weight_map": {"a": "../stolen.safetensors"}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": abs}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": ""}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": "."}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": "sub/x.safetensors"}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": "sub"}}),
            "not a regular file",
        ),
        (serde_json::json!({"weight_map": {"a": 5}}), "file names"),
        (serde_json::json!({"weight_map": {"a": null}}), "file names"),
        (serde_json::json!({"weight_map": []}), "weight_map"),
        (serde_json::json!({"weight_map": "x"}), "weight_map"),
        (serde_json::json!({}), "weight_map"),
        (serde_json::json!([]), "weight_map"),
        (serde_json::json!({"weight_map": {}}), "missing tensor"),
    ];
    for (i, (v, needle)) in cases.iter().enumerate() {
        std::fs::write(&idx, v.to_string()).unwrap();
        let c = format!("index {i}: {v}");
        let r = no_panic(&c, || Weights::load(d.path()));
        if needle.is_empty() {
            r.unwrap_or_else(|e| panic!("{c}: {e}"));
        } else {
            expect_err(r, needle, &c);
        }
    }
    std::fs::write(&idx, "{ not json").unwrap();
    expect_err(Weights::load(d.path()), "malformed index", "bad json");
    std::fs::remove_file(&idx).unwrap();
    std::fs::create_dir(&idx).unwrap();
    expect_err(Weights::load(d.path()), "index.json", "index dir");
}

/// Header of a sparse safetensors file that declares every weight of `cfg` as BF16.
fn sparse_model(dir: &Path, cfg: &ModelConfig) -> std::io::Result<()> {
    let mut h = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in blockcascade::config::weight_shapes(cfg) {
        let n = 2 * shape.iter().product::<usize>();
        h.insert(
            name,
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let h = serde_json::to_vec(&h).unwrap();
    let f = std::fs::File::create(dir.join("model.safetensors"))?;
    use std::io::Write;
    (&f).write_all(&(h.len() as u64).to_le_bytes())?;
    (&f).write_all(&h)?;
    f.set_len((8 + h.len() + off) as u64)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string(cfg).unwrap())
}

#[test]
fn models_and_inputs_too_large_for_memory_are_clean_errors() {
    // A valid 4.4 TB (f32) model as a sparse file: refused before anything is converted.
    let mut cfg = builtin_config("tiny").unwrap();
    (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers) = (16384, 65536, 128, 1024);
    let d = tempfile::tempdir().unwrap();
    match sparse_model(d.path(), &cfg) {
        Ok(()) => match Weights::load(d.path()) {
            Err(Error::OutOfMemory(m)) => assert!(m.contains("f32 weights"), "{m}"),
            // Where the address space is limited (ulimit -v), mapping the file already fails.
            Err(e @ Error::Io { .. }) => eprintln!("huge model: {e}"),
            r => panic!("huge model: {:?}", r.map(|_| ())),
        },
        Err(e) => eprintln!("no sparse file here ({e}); huge model case skipped"),
    }
    // A prompt with 2^32 rows (sparse): refused by its row count, not converted.
    let cfgt = builtin_config("tiny").unwrap();
    let p = d.path().join("prompt.safetensors");
    let rows = 1usize << 32;
    let h = serde_json::json!({"prompt_embeds": {"dtype": "F32", "shape": [rows, 32], "data_offsets": [0, rows * 128]}});
    let hb = h.to_string();
    let mut bytes = (hb.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(hb.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    if std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_len((bytes.len() + rows * 128) as u64))
        .is_ok()
    {
        expect_err(PromptEmbeds::load(&p, &cfgt), "text_len", "huge prompt");
        // Noise of 2^28 frames of 16x8x8 (sparse 1 TB): refused by the memory check.
        let frames = 1usize << 28;
        let n = frames * 16 * 64 * 4;
        let h = serde_json::json!({"noise": {"dtype": "F32", "shape": [frames, 16, 8, 8], "data_offsets": [0, n]},
            "renoise": {"dtype": "F32", "shape": [frames, 0, 16, 8, 8], "data_offsets": [n, n]}});
        let hb = h.to_string();
        let np = d.path().join("noise.safetensors");
        let mut bytes = (hb.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(hb.as_bytes());
        std::fs::write(&np, &bytes).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&np)
            .and_then(|f| f.set_len((bytes.len() + n) as u64))
            .unwrap();
        match RecordedNoise::load(&np, frames, 16, 8, 8, 1) {
            Err(Error::OutOfMemory(m)) => assert!(m.contains("`noise`"), "{m}"),
            Err(e @ Error::Io { .. }) => eprintln!("huge noise: {e}"),
            r => panic!("huge noise: {:?}", r.map(|_| ())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. prompt embeddings, recorded noise, prompt schedules

#[test]
fn prompt_embedding_files() {
    let cfg = builtin_config("tiny").unwrap(); // text 16 x 32
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("prompt.safetensors");
    let mut rng = Rng::new(0x9_0E7);
    // Valid in every dtype and both ranks; values survive.
    for dtype in ["F32", "F16", "BF16"] {
        for shape in [vec![4, 32], vec![1, 4, 32], vec![16, 32], vec![1, 1, 32]] {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (i % 5) as f32 - 2.0).collect();
            std::fs::write(&p, one_tensor("prompt_embeds", dtype, &shape, &v)).unwrap();
            let e = PromptEmbeds::load(&p, &cfg).unwrap();
            assert_eq!(
                (e.rows, e.data),
                (shape[shape.len() - 2], v),
                "{dtype} {shape:?}"
            );
        }
    }
    // Bad values in every dtype.
    for dtype in ["F32", "F16", "BF16"] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30] {
            let mut v = vec![0.25f32; 4 * 32];
            let at = below(&mut rng, v.len());
            v[at] = bad;
            std::fs::write(&p, one_tensor("prompt_embeds", dtype, &[4, 32], &v)).unwrap();
            let r = PromptEmbeds::load(&p, &cfg);
            if bad == 1e30 && dtype != "F16" {
                r.unwrap(); // large but finite
            } else if bad == 1e30 {
                expect_err(r, "NaN or infinite", "F16 overflow");
            } else {
                expect_err(r, "NaN or infinite", &format!("{dtype} {bad}"));
            }
        }
    }
    // Random names, ranks and shapes: Ok only for exactly the valid layouts.
    let dims = [0usize, 1, 2, 3, 16, 17, 31, 32, 33, 64, 1000];
    for case in 0..300 {
        let rank = below(&mut rng, 5);
        let shape: Vec<usize> = (0..rank)
            .map(|i| {
                if i + 1 == rank && below(&mut rng, 2) == 0 {
                    32
                } else {
                    pick(&mut rng, &dims)
                }
            })
            .collect();
        let n: usize = shape.iter().product();
        if n > 40_000 {
            continue;
        }
        let name = pick(
            &mut rng,
            &["prompt_embeds", "prompt_embeds", "embeds", "Prompt_embeds"],
        );
        let dtype = pick(&mut rng, &["F32", "F16", "BF16"]);
        std::fs::write(&p, one_tensor(name, dtype, &shape, &vec![0.5; n])).unwrap();
        let c = format!("prompt {case}: {name} {dtype} {shape:?}");
        let r = no_panic(&c, || PromptEmbeds::load(&p, &cfg));
        let valid_rows = match shape.as_slice() {
            [l, 32] | [1, l, 32] if (1..=16).contains(l) => Some(*l),
            _ => None,
        };
        match (name, valid_rows, r) {
            ("prompt_embeds", Some(l), Ok(e)) => assert_eq!((e.rows, e.data.len()), (l, l * 32)),
            ("prompt_embeds", None, r) => {
                let e = expect_err(r, "prompt_embeds", &c);
                assert!(e.to_string().contains("prompt.safetensors"), "{c}: {e}");
            }
            (_, _, r) => {
                expect_err(r, "missing tensor `prompt_embeds`", &c);
            }
        }
    }
}

#[test]
fn recorded_noise_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("noise.safetensors");
    let mut rng = Rng::new(0x0153);
    let (f, h, w, s) = (6usize, 4usize, 6usize, 3usize);
    let write = |noise: (&str, &[usize]), renoise: (&str, &[usize]), bad: Option<f32>| {
        let n1: usize = noise.1.iter().product();
        let n2: usize = renoise.1.iter().product();
        let mut v1 = vec![0.5f32; n1];
        if let (Some(b), true) = (bad, n1 > 0) {
            v1[n1 / 2] = b;
        }
        let v2 = vec![-0.5f32; n2];
        write_f32(
            &p,
            &[
                (noise.0, noise.1.to_vec(), &v1),
                (renoise.0, renoise.1.to_vec(), &v2),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
    };
    let good_n = [f, 16, h, w];
    let good_r = [f, s - 1, 16, h, w];
    write(("noise", &good_n), ("renoise", &good_r), None);
    RecordedNoise::load(&p, f, 16, h, w, s).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        write(("noise", &good_n), ("renoise", &good_r), Some(bad));
        expect_err(
            RecordedNoise::load(&p, f, 16, h, w, s),
            "`noise` contains NaN",
            "nan noise",
        );
    }
    for case in 0..200 {
        let mut n = good_n.to_vec();
        let mut r = good_r.to_vec();
        let (mut nn, mut rn) = ("noise", "renoise");
        match below(&mut rng, 6) {
            0 => n[below(&mut rng, 4)] += 1 + below(&mut rng, 3),
            1 => r[below(&mut rng, 5)] = pick(&mut rng, &[0, 1, 7]),
            2 => {
                n.pop();
            }
            3 => r.insert(0, 1),
            4 => nn = pick(&mut rng, &["Noise", "noise0", "renoise"]),
            _ => rn = pick(&mut rng, &["renoise_", "noise", "x"]),
        }
        if nn == rn {
            continue;
        }
        write((nn, &n), (rn, &r), None);
        let c = format!("noise {case}: {nn} {n:?} {rn} {r:?}");
        let res = no_panic(&c, || RecordedNoise::load(&p, f, 16, h, w, s));
        if nn == "noise" && rn == "renoise" && n == good_n && r == good_r {
            res.unwrap();
        } else {
            let e = expect_err(res, "noise`", &c);
            assert!(e.to_string().contains("noise.safetensors"), "{c}: {e}");
        }
    }
    // One step: renoise [F, 0, 16, H, W] holds no values and is still required.
    write(("noise", &good_n), ("renoise", &[f, 0, 16, h, w]), None);
    RecordedNoise::load(&p, f, 16, h, w, 1).unwrap();
}

#[test]
fn prompt_schedule_files() {
    let cfg = builtin_config("tiny").unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("p.safetensors"),
        one_tensor("prompt_embeds", "F32", &[2, 32], &[0.25; 64]),
    )
    .unwrap();
    std::fs::write(
        d.path().join("wide.safetensors"),
        one_tensor("prompt_embeds", "F32", &[2, 33], &[0.25; 66]),
    )
    .unwrap();
    let sp = d.path().join("s.json");
    let cases = [
        (r#"[{"block": 1, "prompt_embeds": "p.safetensors"}]"#, ""),
        (r#"[{"frame": 6, "prompt_embeds": "p.safetensors"}]"#, ""),
        (r#"[]"#, ""),
        (
            r#"[{"block": -1, "prompt_embeds": "p.safetensors"}]"#,
            "block",
        ),
        (
            r#"[{"block": 1.5, "prompt_embeds": "p.safetensors"}]"#,
            "block",
        ),
        (
            r#"[{"block": "1", "prompt_embeds": "p.safetensors"}]"#,
            "block",
        ),
        (
            r#"[{"block": 1, "frame": 3, "prompt_embeds": "p.safetensors"}]"#,
            "exactly one",
        ),
        (r#"[{"prompt_embeds": "p.safetensors"}]"#, "exactly one"),
        (
            r#"[{"frame": 4, "prompt_embeds": "p.safetensors"}]"#,
            "block boundary",
        ),
        (
            r#"[{"frame": 18446744073709551614, "prompt_embeds": "p.safetensors"}]"#,
            "block boundary",
        ),
        (r#"[{"block": 1}]"#, "prompt_embeds"),
        (r#"[{"block": 1, "prompt_embeds": 5}]"#, "prompt_embeds"),
        (
            r#"[{"block": 1, "prompt_embeds": "missing.safetensors"}]"#,
            "missing.safetensors",
        ),
        (
            r#"[{"block": 1, "prompt_embeds": "wide.safetensors"}]"#,
            "wide.safetensors",
        ),
        (
            r#"[{"block": 1, "prompt_embeds": ""}]"#,
            "not a regular file",
        ),
        (
            r#"[{"block": 1, "prompt_embeds": "."}]"#,
            "not a regular file",
        ),
        (
            r#"[{"block": 1, "prompt_embeds": "p.safetensors"}, {"frame": 3, "prompt_embeds": "p.safetensors"}]"#,
            "two entries",
        ),
        (r#"{"block": 1}"#, "JSON list"),
        (r#"[5]"#, "exactly one"),
        (r#"[[]]"#, "exactly one"),
        (r#"[{"#, "malformed prompt schedule"),
        ("", "malformed prompt schedule"),
    ];
    for (text, needle) in cases {
        std::fs::write(&sp, text).unwrap();
        let r = no_panic(text, || load_schedule(&sp, &cfg, 3));
        if needle.is_empty() {
            r.unwrap_or_else(|e| panic!("{text}: {e}"));
        } else {
            expect_err(r, needle, text);
        }
    }
    expect_err(load_schedule(&sp, &cfg, 0), "block frames", "bf 0");
    expect_err(load_schedule(d.path(), &cfg, 3), "", "schedule is a dir");
}

#[test]
fn generate_options_fuzz() {
    let mut rng = Rng::new(0x0B7);
    let engine = blockcascade::Engine::open(None).unwrap();
    let prompt = PromptEmbeds::builtin(engine.config(), 0);
    let fl = [
        f64::NAN,
        f64::INFINITY,
        -1.0,
        0.0,
        1e-300,
        0.5,
        1.0,
        250.0,
        500.0,
        750.0,
        1000.0,
        1000.5,
        1e300,
    ];
    let sizes = [0usize, 1, 2, 3, 4, 8, 12, 16385, 1 << 20, usize::MAX];
    let mut valid = 0;
    for case in 0..400 {
        let mut o = GenerateOptions::default();
        match below(&mut rng, 8) {
            0 => o.height = pick(&mut rng, &sizes),
            1 => o.width = pick(&mut rng, &sizes),
            2 => o.block_frames = pick(&mut rng, &sizes),
            3 => {
                o.steps = (0..below(&mut rng, 5))
                    .map(|_| pick(&mut rng, &fl))
                    .collect()
            }
            4 => o.shift = pick(&mut rng, &fl),
            5 => {
                o.local_attn = Some(pick(&mut rng, &sizes));
                o.sink = pick(&mut rng, &sizes);
            }
            6 => o.devices = pick(&mut rng, &sizes),
            _ => {
                o.schedule = blockcascade::Schedule::Cascade {
                    lag: pick(&mut rng, &sizes),
                }
            }
        }
        let c = format!("options {case}: {o:?}");
        let frames = o.block_frames.saturating_mul(2);
        match no_panic(&c, || o.validate(Some(frames))) {
            Err(e) => assert!(
                matches!(e, Error::InvalidArgument(_) | Error::Unsupported(_)),
                "{c}: {e}"
            ),
            Ok(()) => {
                valid += 1;
                // What validates must run (small sizes only) or fail cleanly.
                if o.height * o.width <= 256 && o.block_frames <= 4 {
                    let r = no_panic(&c, || {
                        blockcascade::Generator::new(
                            engine.model(),
                            o.clone(),
                            blockcascade::NoiseSource::Seeded(1),
                            &prompt,
                        )
                        .and_then(|g| g.generate(1))
                    });
                    if let Ok((lat, _)) = r {
                        assert!(lat.iter().all(|v| v.is_finite()), "{c}: non-finite latents");
                    }
                }
            }
        }
    }
    assert!(valid > 50, "{valid}");
    // Repeated or rising steps are refused (they do not denoise).
    for steps in [
        vec![1000.0, 1000.0],
        vec![250.0, 500.0],
        vec![1000.0, 500.0, 500.0],
    ] {
        let o = GenerateOptions {
            steps: steps.clone(),
            ..Default::default()
        };
        expect_err(
            o.validate(None),
            "strictly decreasing",
            &format!("{steps:?}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The CLI

/// Runs the CLI with a deadline; returns (exit success, stderr).
fn run_cli(args: &[String], cwd: &Path) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_blockcascade"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.success(), err);
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} hung (killed after 30 s)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The failure contract: non-zero exit, an `error:` first line mentioning `want`, no panic or
/// backtrace, a short message, no file left in the working folder.
#[track_caller]
fn cli_fails(args: &[&str], want: &str) {
    let cwd = tempfile::tempdir().unwrap();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (ok, err) = run_cli(&args, cwd.path());
    assert!(!ok, "{args:?} succeeded: {err}");
    assert!(err.starts_with("error"), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{args:?}: {err}"
    );
    assert!(err.lines().count() <= 8, "{args:?}: long stderr: {err}");
    assert!(
        err.to_lowercase().contains(&want.to_lowercase()),
        "{args:?}: expected `{want}` in: {err}"
    );
    let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
    assert!(left.is_empty(), "{args:?} left {left:?}");
}

#[test]
fn cli_bad_flag_values() {
    let g = "generate";
    for (args, want) in [
        (vec![g, "--frames", "0"], "frames (0)"),
        (vec![g, "--frames", "-3"], "unexpected argument"),
        (vec![g, "--frames", "x"], "invalid value"),
        (
            vec![g, "--frames", "99999999999999999999999"],
            "invalid value",
        ),
        (
            vec![g, "--frames", "3000000000", "--local-attn", "6"],
            "out of memory",
        ),
        (
            vec![g, "--frames", "18446744073709551615", "--block-frames", "5"],
            "out of memory",
        ),
        (vec![g, "--height", "0"], "even"),
        (vec![g, "--width", "18446744073709551614"], "at most 16384"),
        (vec![g, "--height", ""], "invalid value"),
        (vec![g, "--block-frames", "0"], "block frames"),
        (vec![g, "--steps", "1000,1000"], "strictly decreasing"),
        (vec![g, "--steps", "250,500,750"], "strictly decreasing"),
        (vec![g, "--steps", ""], "malformed --steps"),
        (vec![g, "--steps", ","], "malformed --steps"),
        (vec![g, "--steps", "1000,,500"], "malformed --steps"),
        (vec![g, "--steps", "nan"], "integers in 1..=1000"),
        (vec![g, "--steps", "inf"], "integers in 1..=1000"),
        (vec![g, "--steps=-250"], "integers in 1..=1000"),
        (vec![g, "--steps", "-250"], "unexpected argument"),
        (vec![g, "--shift", "nan"], "shift"),
        (vec![g, "--shift", "0"], "shift"),
        (vec![g, "--shift", "inf"], "shift"),
        (vec![g, "--schedule", "zigzag"], "invalid value"),
        (
            vec![g, "--schedule", "cascade", "--lag", "1000"],
            "lag must be in 1..=4",
        ),
        (
            vec![g, "--schedule", "cascade", "--lag", "-1"],
            "unexpected argument",
        ),
        (vec![g, "--local-attn", "-2"], "local attention window"),
        (vec![g, "--local-attn", "0"], "local attention window"),
        (
            vec![g, "--local-attn", "99999999999999999999"],
            "invalid value",
        ),
        (vec![g, "--sink", "1"], "--sink needs"),
        (vec![g, "--devices", ""], "malformed --devices"),
        (vec![g, "--devices", ","], "malformed --devices"),
        (vec![g, "--devices", "-1"], "unexpected argument"),
        (vec![g, "--devices", "65"], "devices must be in 1..=64"),
        (
            vec![g, "--devices", "18446744073709551616"],
            "malformed --devices",
        ),
        (vec![g, "--threads", "0"], "--threads"),
        (vec![g, "--threads", "1000000"], "--threads"),
        (vec![g, "--seed", "-1"], "unexpected argument"),
        (vec![g, "--recache", "always"], "invalid value"),
        (vec![g, "--backend", "tpu"], "invalid value"),
        (vec![g, "--compare-sequential"], "--report"),
        (
            vec![g, "--out", "/nonexistent-dir/x.safetensors"],
            "does not exist",
        ),
        (vec![g, "--out", "."], "is a directory"),
        (vec![g, "--out", "/"], "is a directory"),
        (vec![g, "--out", ""], "--out"),
        (vec![g, "--model", ""], "a value is required"),
        (
            vec![g, "--model", "/nonexistent"],
            "model directory not found",
        ),
        (vec![g, "--noise", ""], "a value is required"),
        (vec![g, "--noise", "/"], "not a regular file"),
        (vec![g, "--prompt-embeds", "/"], "not a regular file"),
        (vec![g, "--prompt-schedule", "/"], "directory"),
        (vec!["plan", "--blocks", "0"], "--blocks"),
        (vec!["plan", "--blocks", "18446744073709551615"], "too many"),
        (vec!["plan", "--blocks", "10000000"], "at most 100000"),
        (vec!["plan", "--lag", "0"], "lag"),
        (vec!["plan", "--shift", "nan"], "shift"),
        (vec!["plan", "--steps", "500,1000"], "strictly decreasing"),
        (vec!["info", "--frames", "0"], "frames"),
        (vec!["info", "--builtin", "huge"], "unknown built-in model"),
        (vec!["info", "--model", "/"], "config.json"),
        (vec!["bench", "--models", ""], "unknown built-in model"),
        (
            vec!["bench", "--model-scaling", "--tflops", "nan"],
            "--tflops",
        ),
        (
            vec!["bench", "--model-scaling", "--measured-ms-per-block", "0"],
            "measured",
        ),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ] {
        cli_fails(&args, want);
    }
}

#[test]
fn cli_bad_input_files() {
    let d = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.display().to_string();
    let model = model_copy();
    let mut c = golden_config();
    c["eps"] = serde_json::json!(0.0);
    std::fs::write(model.path().join("config.json"), c.to_string()).unwrap();
    cli_fails(&["generate", "--model", &s(model.path())], "eps");
    c["eps"] = serde_json::json!(1e-6);
    c["dim"] = serde_json::json!("64");
    std::fs::write(model.path().join("config.json"), c.to_string()).unwrap();
    cli_fails(&["generate", "--model", &s(model.path())], "field `dim`");
    // Prompt embeddings and noise with the wrong tensor, rank, rows or dtype values.
    let write = |name: &str, bytes: Vec<u8>| -> String {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        s(&p)
    };
    let wrong_name = write(
        "n.safetensors",
        one_tensor("embeds", "F32", &[2, 32], &[0.0; 64]),
    );
    cli_fails(
        &["generate", "--prompt-embeds", &wrong_name],
        "missing tensor `prompt_embeds`",
    );
    let zero = write(
        "z.safetensors",
        one_tensor("prompt_embeds", "F32", &[0, 32], &[]),
    );
    cli_fails(&["generate", "--prompt-embeds", &zero], "0 rows");
    let many = write(
        "m.safetensors",
        one_tensor("prompt_embeds", "BF16", &[17, 32], &[0.0; 544]),
    );
    cli_fails(&["generate", "--prompt-embeds", &many], "text_len");
    let rank = write(
        "r.safetensors",
        one_tensor("prompt_embeds", "F16", &[2, 2, 32], &[0.0; 128]),
    );
    cli_fails(&["generate", "--prompt-embeds", &rank], "expected [L, 32]");
    let mut v = vec![0.0f32; 64];
    v[3] = f32::NAN;
    let nan16 = write(
        "h.safetensors",
        one_tensor("prompt_embeds", "F16", &[2, 32], &v),
    );
    cli_fails(&["generate", "--prompt-embeds", &nan16], "NaN");
    let noise_name = write(
        "nn.safetensors",
        one_tensor("prompt_embeds", "F32", &[2, 32], &[0.0; 64]),
    );
    cli_fails(
        &["generate", "--noise", &noise_name],
        "missing tensor `noise`",
    );
    let trunc = {
        let b = std::fs::read(golden_dir().join("noise.safetensors")).unwrap();
        write("t.safetensors", b[..b.len() / 2].to_vec())
    };
    cli_fails(
        &["generate", "--noise", &trunc, "--frames", "9"],
        "truncated",
    );
    let garbage = write(
        "g.safetensors",
        b"\x10\0\0\0\0\0\0\0{\"a\":nope}......".to_vec(),
    );
    cli_fails(&["generate", "--noise", &garbage], "header JSON");
}

// ---------------------------------------------------------------------------------------------
// 5. The C ABI

unsafe extern "C" fn count_blocks(
    user: *mut c_void,
    _block: u32,
    latents: *const f32,
    frames: u32,
    channels: u32,
    height: u32,
    width: u32,
) -> i32 {
    let n = (frames * channels * height * width) as usize;
    let v = std::slice::from_raw_parts(latents, n);
    let finite = v.iter().all(|x| x.is_finite());
    let st = &mut *(user as *mut (u32, bool));
    st.0 += 1;
    st.1 &= finite;
    0
}

unsafe extern "C" fn returns_user_value(
    user: *mut c_void,
    _block: u32,
    _latents: *const f32,
    _frames: u32,
    _channels: u32,
    _height: u32,
    _width: u32,
) -> i32 {
    let st = &mut *(user as *mut (i32, u32));
    st.1 += 1;
    st.0
}

#[test]
fn c_abi_session_option_fuzz() {
    let e = cpu_engine();
    let mut rng = Rng::new(0xC_AB1);
    let u = [
        0u32,
        1,
        2,
        3,
        4,
        5,
        6,
        8,
        12,
        16,
        16384,
        16385,
        1 << 31,
        u32::MAX,
    ];
    let i = [i32::MIN, -2, -1, 0, 1, 2, 3, 6, 9, i32::MAX];
    let mut opened = 0;
    for case in 0..300 {
        let d = bc_session_options_default();
        let mut o = d;
        for _ in 0..1 + below(&mut rng, 2) {
            match below(&mut rng, 8) {
                0 => o.height = pick(&mut rng, &u),
                1 => o.width = pick(&mut rng, &u),
                2 => o.block_frames = pick(&mut rng, &u),
                3 => o.lag = pick(&mut rng, &u),
                4 => o.bidirectional = pick(&mut rng, &u),
                5 => o.local_attn = pick(&mut rng, &i),
                6 => o.sink = pick(&mut rng, &u),
                _ => o.seed = rng.next_u64(),
            }
        }
        let mut s = null_mut();
        let st = unsafe { bc_session_open(e, &o, &mut s) };
        let c = format!(
            "session {case}: {}x{} bf {} lag {} bi {} local {} sink {}",
            o.height, o.width, o.block_frames, o.lag, o.bidirectional, o.local_attn, o.sink
        );
        if st != BC_OK {
            assert!(s.is_null(), "{c}: out written on failure");
            assert!(
                st == BC_ERR_INVALID_ARGUMENT || st == BC_ERR_OUT_OF_MEMORY,
                "{c}: status {st}: {}",
                last_error()
            );
            assert!(last_error().starts_with("bc_session_open: "), "{c}");
            continue;
        }
        opened += 1;
        if o.height * o.width <= 256 && o.block_frames <= 6 {
            let mut state = (0u32, true);
            let st = unsafe {
                bc_session_generate(
                    s,
                    2,
                    Some(count_blocks),
                    &mut state as *mut (u32, bool) as *mut c_void,
                )
            };
            assert_eq!(st, BC_OK, "{c}: {}", last_error());
            assert_eq!(state, (2, true), "{c}");
        }
        bc_session_close(s);
    }
    assert!(opened > 30, "{opened}");
    bc_engine_close(e);
}

#[test]
fn c_abi_prompts_noise_callbacks_and_closed_sessions() {
    let e = cpu_engine();
    let mut s = null_mut();
    assert_eq!(unsafe { bc_session_open(e, null(), &mut s) }, BC_OK);
    let mut rng = Rng::new(0x9_0E);
    // Random prompt shapes and poisoned values.
    for case in 0..200 {
        let rows = pick(&mut rng, &[0u32, 1, 2, 15, 16, 17, 1000]);
        let cols = pick(&mut rng, &[0u32, 1, 31, 32, 33]);
        let n = (rows * cols) as usize;
        let mut v = vec![0.125f32; n.max(1)];
        let poison = below(&mut rng, 3);
        if poison > 0 && n > 0 {
            v[below(&mut rng, n)] = pick(
                &mut rng,
                &[f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
            );
        }
        let st = if case % 2 == 0 {
            unsafe { bc_session_set_prompt(s, v.as_ptr(), rows, cols) }
        } else {
            unsafe {
                bc_session_switch_prompt(s, 1 + below(&mut rng, 3) as u32, v.as_ptr(), rows, cols)
            }
        };
        let valid = (1..=16).contains(&rows) && cols == 32 && (poison == 0 || n == 0);
        if valid {
            assert_eq!(st, BC_OK, "prompt {case} {rows}x{cols}: {}", last_error());
        } else {
            assert_eq!(
                st, BC_ERR_INVALID_ARGUMENT,
                "prompt {case} {rows}x{cols} poison {poison}"
            );
            let m = last_error();
            assert!(
                ["columns", "rows", "NaN"].iter().any(|k| m.contains(k)),
                "prompt {case}: {m}"
            );
        }
    }
    let good = vec![0.5f32; 64];
    assert_eq!(
        unsafe { bc_session_set_prompt(s, good.as_ptr(), 2, 32) },
        BC_OK
    );
    // Callbacks returning odd values: any non-zero stops after that block.
    for r in [1, -1, 2, i32::MIN, i32::MAX] {
        let mut state = (r, 0u32);
        let st = unsafe {
            bc_session_generate(
                s,
                3,
                Some(returns_user_value),
                &mut state as *mut (i32, u32) as *mut c_void,
            )
        };
        expect_c_err(st, BC_ERR_CANCELLED, &format!("returned {r} for block 0"));
        assert_eq!(state.1, 1, "callback calls after returning {r}");
    }
    // Huge block counts: a clean out-of-memory error before any callback.
    let mut state = (0i32, 0u32);
    let st = unsafe {
        bc_session_generate(
            s,
            u32::MAX,
            Some(returns_user_value),
            &mut state as *mut (i32, u32) as *mut c_void,
        )
    };
    expect_c_err(st, BC_ERR_OUT_OF_MEMORY, "MiB");
    assert_eq!(state.1, 0);
    // Noise files: missing, empty path, a directory, a FIFO, malformed, zero frames, NaN.
    let d = tempfile::tempdir().unwrap();
    let cs = |p: &Path| CString::new(p.display().to_string()).unwrap();
    let set_noise = |p: &CString| unsafe { bc_session_set_noise_file(s, p.as_ptr()) };
    expect_c_err(
        set_noise(&cs(&d.path().join("none.safetensors"))),
        BC_ERR_IO,
        "none.safetensors",
    );
    expect_c_err(
        set_noise(&CString::new("").unwrap()),
        BC_ERR_IO,
        "No such file",
    );
    expect_c_err(set_noise(&cs(d.path())), BC_ERR_IO, "not a regular file");
    let fifo = d.path().join("fifo");
    if Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        expect_c_err(set_noise(&cs(&fifo)), BC_ERR_IO, "not a regular file");
    }
    let garbage = d.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffxx").unwrap();
    expect_c_err(
        set_noise(&cs(&garbage)),
        BC_ERR_FORMAT,
        "exceeds the file size",
    );
    let zero = d.path().join("zero.safetensors");
    write_f32(
        &zero,
        &[
            ("noise", vec![0, 16, 8, 12], &[]),
            ("renoise", vec![0, 3, 16, 8, 12], &[]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    expect_c_err(set_noise(&cs(&zero)), BC_ERR_FORMAT, "0 frames");
    let nan = d.path().join("nan.safetensors");
    let mut v = vec![0.0f32; 3 * 16 * 96];
    v[5] = f32::NAN;
    write_f32(
        &nan,
        &[
            ("noise", vec![3, 16, 8, 12], &v),
            ("renoise", vec![3, 3, 16, 8, 12], &vec![0.0; 9 * 16 * 96]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    expect_c_err(set_noise(&cs(&nan)), BC_ERR_FORMAT, "NaN");
    let wrong = d.path().join("wrong.safetensors");
    write_f32(
        &wrong,
        &[("noise", vec![3, 16, 8, 10], &[0.0; 3 * 16 * 80])],
        &BTreeMap::new(),
    )
    .unwrap();
    expect_c_err(
        set_noise(&cs(&wrong)),
        BC_ERR_FORMAT,
        "expected [3, 16, 8, 12]",
    );
    // Valid 3-frame noise: one block works, two are refused before any compute.
    let ok = d.path().join("ok.safetensors");
    write_f32(
        &ok,
        &[
            ("noise", vec![3, 16, 8, 12], &vec![0.1; 3 * 16 * 96]),
            ("renoise", vec![3, 3, 16, 8, 12], &vec![0.0; 9 * 16 * 96]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(set_noise(&cs(&ok)), BC_OK, "{}", last_error());
    let mut state = (0u32, true);
    let gen = |n: u32, st: &mut (u32, bool)| unsafe {
        bc_session_generate(
            s,
            n,
            Some(count_blocks),
            st as *mut (u32, bool) as *mut c_void,
        )
    };
    expect_c_err(
        gen(2, &mut state),
        BC_ERR_INVALID_ARGUMENT,
        "recorded noise holds 3 frames",
    );
    assert_eq!(gen(1, &mut state), BC_OK, "{}", last_error());
    assert_eq!(state, (1, true));
    // Every function on a closed session, and closing twice.
    bc_session_close(s);
    bc_session_close(s);
    let mut stats: bc_session_stats = unsafe { std::mem::zeroed() };
    stats.struct_size = std::mem::size_of::<bc_session_stats>() as u32;
    let dead = "not a live bc_session";
    expect_c_err(
        unsafe { bc_session_last_stats(s, &mut stats) },
        BC_ERR_INVALID_ARGUMENT,
        dead,
    );
    expect_c_err(set_noise(&cs(&ok)), BC_ERR_INVALID_ARGUMENT, dead);
    expect_c_err(
        unsafe { bc_session_set_noise_file(s, null()) },
        BC_ERR_INVALID_ARGUMENT,
        dead,
    );
    expect_c_err(
        unsafe { bc_session_switch_prompt(s, 1, good.as_ptr(), 2, 32) },
        BC_ERR_INVALID_ARGUMENT,
        dead,
    );
    expect_c_err(gen(1, &mut state), BC_ERR_INVALID_ARGUMENT, dead);
    // A session handle where an engine is expected, and a closed engine.
    let mut info: bc_engine_info = unsafe { std::mem::zeroed() };
    info.struct_size = std::mem::size_of::<bc_engine_info>() as u32;
    let mut s2 = null_mut();
    assert_eq!(unsafe { bc_session_open(e, null(), &mut s2) }, BC_OK);
    expect_c_err(
        unsafe { bc_engine_get_info(s2 as *const bc_engine, &mut info) },
        BC_ERR_INVALID_ARGUMENT,
        "is a bc_session",
    );
    bc_engine_close(s2 as *mut bc_engine); // wrong kind: ignored
    assert_eq!(
        unsafe { bc_session_last_stats(s2, &mut stats) },
        BC_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("no generation"), "{}", last_error());
    bc_session_close(s2);
    bc_engine_close(e);
    bc_engine_close(e);
    expect_c_err(
        unsafe { bc_engine_get_info(e, &mut info) },
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_engine",
    );
}

#[test]
fn c_abi_engine_open_inputs() {
    let mut e = null_mut();
    let cpu = c"cpu";
    // Too many devices, negative and out-of-range ordinals.
    let many: Vec<i32> = (0..1000).collect();
    for (devs, needle) in [
        (&many[..], "at most 64"),
        (&[-1][..], ">= 0"),
        (&[i32::MIN][..], ">= 0"),
        (&[0, 5][..], "numbered 0..2"),
    ] {
        let o = bc_engine_options {
            backend: cpu.as_ptr(),
            devices: devs.as_ptr(),
            n_devices: devs.len() as u32,
            ..bc_engine_options_default()
        };
        expect_c_err(
            unsafe { bc_engine_open(null(), &o, &mut e) },
            BC_ERR_INVALID_ARGUMENT,
            needle,
        );
        assert!(e.is_null());
    }
    // Bad model directories through the C ABI: typed codes.
    let bad = model_copy();
    let mut c = golden_config();
    c["num_layers"] = serde_json::json!(0);
    std::fs::write(bad.path().join("config.json"), c.to_string()).unwrap();
    let o = bc_engine_options {
        backend: cpu.as_ptr(),
        ..bc_engine_options_default()
    };
    let path = |p: &Path| CString::new(p.display().to_string()).unwrap();
    expect_c_err(
        unsafe { bc_engine_open(path(bad.path()).as_ptr(), &o, &mut e) },
        BC_ERR_FORMAT,
        "num_layers",
    );
    let p = path(&PathBuf::from("/nonexistent/model"));
    expect_c_err(
        unsafe { bc_engine_open(p.as_ptr(), &o, &mut e) },
        BC_ERR_IO,
        "not found",
    );
    let p = CString::new("").unwrap();
    expect_c_err(
        unsafe { bc_engine_open(p.as_ptr(), &o, &mut e) },
        BC_ERR_IO,
        "not found",
    );
    // Invalid UTF-8 in the path: an I/O error, not a panic.
    let p = CString::new(vec![b'/', 0xff, 0xfe]).unwrap();
    expect_c_err(
        unsafe { bc_engine_open(p.as_ptr(), &o, &mut e) },
        BC_ERR_IO,
        "not found",
    );
    assert!(e.is_null());
    // The backend string is compared exactly.
    for b in [c"CPU", c"", c"cpu ", c"cuda\n"] {
        let o = bc_engine_options {
            backend: b.as_ptr(),
            ..bc_engine_options_default()
        };
        expect_c_err(
            unsafe { bc_engine_open(null(), &o, &mut e) },
            BC_ERR_INVALID_ARGUMENT,
            "unknown backend",
        );
    }
}
