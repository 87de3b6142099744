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

// ---- C ABI (tests/ffi.rs, tests/robustness.rs) ----------------------------------------------

/// The thread's `bc_last_error` message.
pub fn last_error() -> String {
    // SAFETY: bc_last_error returns a valid NUL-terminated string owned by the library.
    unsafe { std::ffi::CStr::from_ptr(blockcascade::ffi::bc_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts a status and a non-empty last error mentioning `needle`.
#[track_caller]
pub fn expect_c_err(
    status: blockcascade::ffi::sys::bc_status,
    code: blockcascade::ffi::sys::bc_status,
    needle: &str,
) {
    let msg = last_error();
    assert_eq!(status, code, "status (last error: {msg})");
    assert!(!msg.is_empty(), "empty bc_last_error");
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "bc_last_error `{msg}` does not mention `{needle}`"
    );
}

/// The built-in model on the CPU backend through the C ABI (NULL options would pick CUDA on a
/// GPU machine, and the tests compare bit for bit with the CPU Rust API).
pub fn cpu_engine() -> *mut blockcascade::ffi::sys::bc_engine {
    use blockcascade::ffi::sys::*;
    use blockcascade::ffi::*;
    let mut e = std::ptr::null_mut();
    let o = bc_engine_options {
        backend: c"cpu".as_ptr(),
        ..bc_engine_options_default()
    };
    // SAFETY: valid options and out pointer; a NULL model dir picks the built-in model.
    let st = unsafe { bc_engine_open(std::ptr::null(), &o, &mut e) };
    assert_eq!(st, BC_OK, "{}", last_error());
    assert!(!e.is_null());
    e
}

/// Block callback that appends every block's latents to the `Vec<f32>` behind `user`.
///
/// # Safety
/// `user` points to a `Vec<f32>`; `latents` holds `frames*channels*height*width` floats.
pub unsafe extern "C" fn append_latents(
    user: *mut std::ffi::c_void,
    _block: u32,
    latents: *const f32,
    frames: u32,
    channels: u32,
    height: u32,
    width: u32,
) -> i32 {
    let out = &mut *(user as *mut Vec<f32>);
    let n = (frames * channels * height * width) as usize;
    out.extend_from_slice(std::slice::from_raw_parts(latents, n));
    0
}

/// Generates `blocks` blocks through the C ABI; the latents of all blocks (asserts success).
pub fn c_generate(s: *mut blockcascade::ffi::sys::bc_session, blocks: u32) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::new();
    let st = unsafe {
        blockcascade::ffi::bc_session_generate(
            s,
            blocks,
            Some(append_latents),
            &mut out as *mut Vec<f32> as *mut std::ffi::c_void,
        )
    };
    assert_eq!(st, blockcascade::ffi::sys::BC_OK, "{}", last_error());
    out
}

/// The golden case with `schedule` and `mode` through the CUDA backend with options `co`
/// (set as the session's options for the run: callers serialize).
pub fn run_opts(
    schedule: blockcascade::Schedule,
    mode: blockcascade::AttentionMode,
    co: blockcascade::backend::cuda::CudaOptions,
) -> Vec<f32> {
    use blockcascade::backend::cuda::set_session_options;
    set_session_options(Some(co));
    let g = golden();
    let mut o = g.opts.clone();
    o.schedule = schedule;
    o.attention = mode;
    o.backend = blockcascade::config::BackendKind::Cuda;
    let res = blockcascade::Generator::new(g.engine.model(), o.clone(), g.noise.clone(), &g.prompt)
        .and_then(|gen| gen.generate(g.frames / o.block_frames));
    set_session_options(None);
    res.unwrap().0
}
