//! The CLI: golden case end to end, and bad input -> one clear error line, non-zero exit,
//! no panic, no output file left behind.

mod common;
use blockcascade::tensorfile::{write_f32, TensorFile};
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockcascade"))
}

fn golden_args(out: &Path) -> Vec<String> {
    let d = golden_dir();
    let p = |s: &str| d.join(s).display().to_string();
    [
        "generate",
        "--model",
        &p("model"),
        "--prompt-embeds",
        &p("prompt_embeds.safetensors"),
        "--noise",
        &p("noise.safetensors"),
        "--frames",
        "9",
        "--height",
        "8",
        "--width",
        "12",
        "--quiet",
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn cli_reproduces_the_golden_case() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seq.safetensors");
    let st = bin().args(golden_args(&out)).status().unwrap();
    assert!(st.success());
    let f = TensorFile::open(&out).unwrap();
    assert_eq!(f.tensors()["latents"].shape, vec![9, 16, 8, 12]);
    assert_eq!(f.metadata()["blockcascade_version"], blockcascade::VERSION);
    let err = rel_l2(
        &expected("expected.safetensors"),
        &f.tensor_f32("latents", None).unwrap(),
    );
    assert!(err < 1e-4, "rel L2 {err}");
    // And a cascade schedule through the CLI.
    let out2 = dir.path().join("lag1.safetensors");
    let mut args = golden_args(&out2);
    args.extend(
        [
            "--schedule",
            "cascade",
            "--lag",
            "1",
            "--attention",
            "bidirectional",
            "--devices",
            "3",
        ]
        .map(String::from),
    );
    assert!(bin().args(args).status().unwrap().success());
    let got = TensorFile::open(&out2)
        .unwrap()
        .tensor_f32("latents", None)
        .unwrap();
    let err = rel_l2(&expected("cascade-lag1-bidirectional.safetensors"), &got);
    assert!(err < 1e-4, "rel L2 {err}");
}

/// Runs the CLI with `args` (plus `--out` in a fresh folder) and checks the failure contract;
/// returns stderr.
fn fails(args: &[&str], want: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let o = bin().args(args).arg("--out").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{args:?} succeeded: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.starts_with("error"), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: expected `{want}` in: {err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "{args:?} left files behind"
    );
    err
}

/// A copy of the golden model directory whose weights are rewritten by `edit`.
fn model_variant(
    edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) -> tempfile::TempDir {
    let src = golden_dir().join("model");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let f = TensorFile::open(&src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut m: BTreeMap<String, (Vec<usize>, Vec<f32>)> = f
        .tensors()
        .iter()
        .map(|(k, i)| (k.clone(), (i.shape.clone(), f.convert(i))))
        .collect();
    edit(&mut m);
    let ts: Vec<(&str, Vec<usize>, &[f32])> = m
        .iter()
        .map(|(k, (s, v))| (k.as_str(), s.clone(), v.as_slice()))
        .collect();
    write_f32(&dir.path().join("model.safetensors"), &ts, &BTreeMap::new()).unwrap();
    dir
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn bad_model_directories() {
    fails(
        &["generate", "--model", "/nonexistent/model"],
        "model directory not found",
    );
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    fails(&["generate", "--model", &s(d.path())], "malformed config");
    let cfg = std::fs::read_to_string(golden_dir().join("model/config.json")).unwrap();
    let big = cfg.replace("\"num_layers\": 2", "\"num_layers\": 100000000000");
    std::fs::write(d.path().join("config.json"), big).unwrap();
    fails(
        &["generate", "--model", &s(d.path())],
        "num_layers 100000000000 (at most 1024)",
    );
    let missing = model_variant(|m| {
        m.remove("blocks.1.ffn.0.bias");
    });
    fails(
        &["generate", "--model", &s(missing.path())],
        "missing tensor `blocks.1.ffn.0.bias`",
    );
    let shape = model_variant(|m| {
        let e = m.get_mut("blocks.0.self_attn.q.weight").unwrap();
        e.0 = vec![32, 128];
    });
    fails(
        &["generate", "--model", &s(shape.path())],
        "blocks.0.self_attn.q.weight` has shape [32, 128], expected [64, 64]",
    );
    // Wrong dtype: rewrite one tensor's dtype in the header as I64.
    let dt = model_variant(|_| {});
    let p = dt.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let at = h.find("\"head.modulation\"").unwrap();
    let dt_at = at + h[at..].find("\"F32\"").unwrap();
    let h2 = format!("{}\"I32\"{}", &h[..dt_at], &h[dt_at + 5..]);
    bytes[8..8 + n].copy_from_slice(h2.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    fails(
        &["generate", "--model", &s(dt.path())],
        "unsupported dtype I32",
    );
    // Truncated weights.
    let tr = model_variant(|_| {});
    let p = tr.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    fails(&["generate", "--model", &s(tr.path())], "truncated");
    std::fs::write(&p, &bytes[..5]).unwrap();
    fails(&["generate", "--model", &s(tr.path())], "too short");
}

#[test]
fn bad_generation_settings() {
    fails(
        &["generate", "--frames", "10"],
        "multiple of the block size",
    );
    fails(&["generate", "--height", "7"], "even");
    fails(&["generate", "--steps", "1000,abc"], "malformed --steps");
    fails(&["generate", "--steps", "1000,2000"], "1..=1000");
    fails(&["generate", "--schedule", "diagonal"], "invalid value");
    fails(&["generate", "--attention", "sideways"], "invalid value");
    fails(
        &["generate", "--schedule", "cascade", "--lag", "0"],
        "lag must be in 1..=4",
    );
    fails(
        &["generate", "--schedule", "cascade", "--lag", "5"],
        "lag must be in 1..=4",
    );
    fails(
        &["generate", "--lag", "2"],
        "--lag needs --schedule cascade",
    );
    fails(
        &["generate", "--local-attn", "2", "--sink", "3"],
        "must be larger than the sink",
    );
    fails(&["generate", "--backend", "cuda"], "cuda");
    fails(&["generate", "--devices", "0,x"], "malformed --devices");
    fails(
        &["generate", "--height", "16000", "--width", "16000"],
        "out of memory",
    );
    fails(
        &["generate", "--height", "20000", "--width", "20000"],
        "must be at most 16384",
    );
    fails(&["generate", "--block-frames", "100000"], "block frames");
    fails(&["generate", "--kv-exchange", "sometimes"], "invalid value");
    fails(
        &["generate", "--devices", "100000"],
        "devices must be in 1..=64",
    );
    fails(
        &["generate", "--local-attn", "2"],
        "must hold at least one block",
    );
}

/// On the CPU backend `--devices` is a count of worker threads: a list of indices is taken
/// only as `0,1,...,N-1` (its length), any other list is one clear error instead of being
/// run silently as its length.
#[test]
fn cpu_device_lists_other_than_0_to_n_are_refused() {
    for list in ["0,5", "1,2", "0,0"] {
        let err = fails(&["generate", "--devices", list], "no device indices");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&format!("--devices {list}")), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let mut args = golden_args(&out);
    args.extend(["--devices", "0,1"].map(String::from));
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bad_prompts_and_noise() {
    let d = tempfile::tempdir().unwrap();
    let wide = d.path().join("wide.safetensors");
    write_f32(
        &wide,
        &[("prompt_embeds", vec![4, 31], &[0.5; 124])],
        &BTreeMap::new(),
    )
    .unwrap();
    fails(
        &["generate", "--prompt-embeds", &s(&wide)],
        "expected [L, 32]",
    );
    let nan = d.path().join("nan.safetensors");
    let mut v = vec![0.5f32; 4 * 32];
    v[7] = f32::NAN;
    write_f32(
        &nan,
        &[("prompt_embeds", vec![4, 32], &v)],
        &BTreeMap::new(),
    )
    .unwrap();
    fails(&["generate", "--prompt-embeds", &s(&nan)], "NaN");
    let inf = d.path().join("inf.safetensors");
    v[7] = f32::INFINITY;
    write_f32(
        &inf,
        &[("prompt_embeds", vec![4, 32], &v)],
        &BTreeMap::new(),
    )
    .unwrap();
    fails(
        &["generate", "--prompt-embeds", &s(&inf)],
        "NaN or infinite",
    );
    fails(
        &["generate", "--prompt-embeds", "/nonexistent.safetensors"],
        "No such file",
    );
    let noise = s(&golden_dir().join("noise.safetensors"));
    // The recorded noise has 9 frames of 8x12: asking for 12 frames or another size fails.
    fails(
        &["generate", "--noise", &noise, "--frames", "12"],
        "has shape [9, 16, 8, 12], expected [12, 16, 8, 12]",
    );
    fails(
        &[
            "generate", "--noise", &noise, "--frames", "9", "--height", "10",
        ],
        "expected [9, 16, 10, 12]",
    );
    fails(
        &[
            "generate", "--noise", &noise, "--frames", "9", "--steps", "1000,500",
        ],
        "renoise",
    );
}

#[test]
fn bad_prompt_schedules() {
    let d = tempfile::tempdir().unwrap();
    let pe = d.path().join("p.safetensors");
    write_f32(
        &pe,
        &[("prompt_embeds", vec![2, 32], &[0.25; 64])],
        &BTreeMap::new(),
    )
    .unwrap();
    let sched = |name: &str, text: &str| -> PathBuf {
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let a = sched(
        "a.json",
        r#"[{"frame": 4, "prompt_embeds": "p.safetensors"}]"#,
    );
    fails(
        &["generate", "--prompt-schedule", &s(&a)],
        "not at a block boundary",
    );
    let b = sched(
        "b.json",
        r#"[{"block": 1, "prompt_embeds": "missing.safetensors"}]"#,
    );
    fails(
        &["generate", "--prompt-schedule", &s(&b)],
        "missing.safetensors",
    );
    let c = sched(
        "c.json",
        r#"[{"block": 40, "prompt_embeds": "p.safetensors"}]"#,
    );
    fails(
        &["generate", "--prompt-schedule", &s(&c)],
        "switches at block 40",
    );
    let e = sched("e.json", r#"{"block": 1}"#);
    fails(&["generate", "--prompt-schedule", &s(&e)], "JSON list");
}

#[test]
fn default_generate_runs_with_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .current_dir(dir.path())
        .args(["generate"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = TensorFile::open(&dir.path().join("latents.safetensors")).unwrap();
    let lat = f.tensor_f32("latents", Some(&[21, 16, 8, 12])).unwrap();
    assert!(lat.iter().all(|v| v.is_finite()) && lat.iter().any(|&v| v != 0.0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("blocks/s"));
}

#[test]
fn plan_and_scaling_model_print_tables() {
    let o = bin()
        .args(["plan", "--blocks", "3", "--lag", "1"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("6 ticks") && t.contains("b0:C@0"), "{t}");
    let o = bin().args(["bench", "--model-scaling"]).output().unwrap();
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    // 2 models x 2 links x (8 joint + 7 serial + 7 lagged device counts) x 4 lags, plus the
    // header.
    assert_eq!(t.lines().count(), 1 + 2 * 2 * 22 * 4, "{t}");
    assert!(t.contains("wan-14b") && t.contains("lagged") && t.contains("serial"));
    // Overlapping the joint exchange never predicts fewer FPS than the serial bound.
    let fps = |link: &str, xch: &str| -> f64 {
        t.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| {
                f[0] == "wan-1.3b" && f[1] == link && f[2] == xch && f[3] == "5" && f[4] == "1"
            })
            .and_then(|f| f[6].parse().ok())
            .unwrap_or(f64::NAN)
    };
    assert!(fps("pcie", "joint") > fps("pcie", "serial"), "{t}");
    let o = bin()
        .args(["plan", "--blocks", "18446744073709551615", "--lag", "2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("too many to plan"));
    let o = bin()
        .args(["bench", "--model-scaling", "--measured-ms-per-block", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = bin().args(["plan", "--lag", "9"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("lag must be in 1..=4"));
}

#[test]
fn report_shows_ticks_timings_and_the_difference_to_sequential() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.safetensors");
    let o = bin()
        .args([
            "generate",
            "--schedule",
            "cascade",
            "--lag",
            "1",
            "--frames",
            "12",
            "--report",
            "--compare-sequential",
            "-q",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("report: "))
        .expect("a report line");
    let r: serde_json::Value = serde_json::from_str(&line["report: ".len()..]).unwrap();
    // 4 blocks at lag 1: 3 + 4 = 7 ticks, one forward each.
    assert_eq!(r["ticks"], 7);
    assert_eq!(r["forward_passes"], 7);
    assert_eq!(r["block_seconds"].as_array().unwrap().len(), 4);
    assert_eq!(r["tokens_per_tick"][3], 4 * 3 * 24);
    let diff = err
        .lines()
        .find(|l| l.starts_with("relative L2 vs sequential"))
        .expect("a comparison line");
    let v: f64 = diff.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(v > 0.0 && v < 1.0, "{diff}");
}

#[test]
fn info_prints_config_size_dtype_memory_and_kernels() {
    let model = golden_dir().join("model");
    let o = bin()
        .args(["info", "--model"])
        .arg(&model)
        .args(["--height", "8", "--width", "12", "--frames", "9"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = String::from_utf8_lossy(&o.stdout);
    let params = blockcascade::Engine::open(Some(&model))
        .unwrap()
        .config()
        .parameter_count();
    assert!(t.contains(&format!("parameters:   {params}")), "{t}");
    assert!(
        t.contains("dim 64 ffn 128 heads 2 (head_dim 32) layers 2")
            && t.contains("weight dtype: F32"),
        "{t}"
    );
    assert!(
        t.contains("memory for 9 frames of 8x12 latents (24 tokens/frame)"),
        "{t}"
    );
    let o = bin().args(["info", "--kernels"]).output().unwrap();
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("bc_attention_hd128") || t.contains("kernels were not built"),
        "{t}"
    );
    let o = bin()
        .args(["info", "--model", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).starts_with("error: "));
}
