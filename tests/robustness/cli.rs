//! The CLI: bad flag values and bad input files.

use super::*;

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
        // More than the peak: predictions faster than the hardware can be.
        (vec!["bench", "--model-scaling", "--mfu", "2"], "--mfu"),
        (
            vec![
                "bench",
                "--model-scaling",
                "--measured-ms-per-block",
                "1e-9",
            ],
            "faster than",
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
