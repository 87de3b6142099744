//! Adversarial inputs (deterministic fuzzing with the crate's own RNG and fixed seeds) at every
//! user-reachable entry point: safetensors files, model directories, prompt embeddings, recorded
//! noise, prompt schedules, the CLI and the C ABI. Every case must give one typed error whose
//! message names the problem (or, where the input is still valid, an answer that passes the
//! format's invariants): never a panic, an abort, a hang or a silent wrong answer.

mod c_abi;
mod cli;
#[path = "../common/mod.rs"]
mod common;
mod inputs;
mod model_dir;
mod outputs;
mod safetensors;

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
use std::sync::Arc;
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
