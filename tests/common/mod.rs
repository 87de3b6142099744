//! Helpers shared by the integration tests.
#![allow(dead_code, unused_imports)]

use blockcascade::noise::{NoiseSource, RecordedNoise};
use blockcascade::tensorfile::TensorFile;
use blockcascade::{Engine, GenerateOptions, PromptEmbeds};
use std::path::PathBuf;

/// The golden case folder: `$BC_TEST_DATA/selfforcing-tiny` when set (the GPU bundle carries
/// the test data next to the test binaries), else this crate's `tests/data/selfforcing-tiny`.
pub fn golden_dir() -> PathBuf {
    std::env::var_os("BC_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data"))
        .join("selfforcing-tiny")
}

/// The golden case: engine, options from case.json, recorded noise, prompt.
pub struct Golden {
    pub engine: Engine,
    pub opts: GenerateOptions,
    pub frames: usize,
    pub noise: NoiseSource,
    pub prompt: PromptEmbeds,
}

pub fn golden() -> Golden {
    let dir = golden_dir();
    let engine = Engine::open(Some(&dir.join("model"))).unwrap();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let u = |k: &str| case[k].as_u64().unwrap() as usize;
    let local = case["local_attn"].as_i64().unwrap();
    let opts = GenerateOptions {
        height: u("height"),
        width: u("width"),
        block_frames: u("block_frames"),
        steps: case["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect(),
        shift: case["shift"].as_f64().unwrap(),
        local_attn: if local < 0 {
            None
        } else {
            Some(local as usize)
        },
        sink: u("sink"),
        context_noise: case["context_noise"].as_f64().unwrap(),
        ..Default::default()
    };
    let frames = u("frames");
    let noise = NoiseSource::Recorded(
        RecordedNoise::load(
            &dir.join("noise.safetensors"),
            frames,
            16,
            opts.height,
            opts.width,
            opts.steps.len(),
        )
        .unwrap(),
    );
    let prompt =
        PromptEmbeds::load(&dir.join("prompt_embeds.safetensors"), engine.config()).unwrap();
    Golden {
        engine,
        opts,
        frames,
        noise,
        prompt,
    }
}

/// Loads tensor `latents` from a golden file.
pub fn expected(name: &str) -> Vec<f32> {
    TensorFile::open(&golden_dir().join(name))
        .unwrap()
        .tensor_f32("latents", None)
        .unwrap()
}

/// Relative L2 error of `a` against `e`; infinite when shapes differ or `a` is not finite.
pub use blockcascade::bench::rel_l2;
