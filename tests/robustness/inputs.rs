//! Prompt embeddings, recorded noise, prompt schedules and generation options.

use super::*;

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

/// Runs `f` on a thread of its own and waits a bounded time for it, so that a call that blocks
/// for good (opening a FIFO waits for a writer) fails the test instead of hanging it.
fn within_a_minute<T: Send + 'static>(case: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{case}: still blocked after a minute"))
}

pub(crate) fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {p:?}"
    );
}

/// The JSON files and the tokenizer a user names are read whole: a FIFO, a device or a huge
/// file must be one error, not a read that blocks forever, never ends or allocates the file.
#[test]
fn special_and_huge_settings_files() {
    let expect = |r: blockcascade::Result<()>, needle: &str, case: &str| {
        let e = r.expect_err(case);
        let m = e.to_string();
        assert!(m.contains(needle), "{case}: {m}");
    };
    // config.json as a FIFO (first: before the fix this case blocked), as /dev/zero, too large.
    let m = model_copy();
    let config = m.path().join("config.json");
    std::fs::remove_file(&config).unwrap();
    mkfifo(&config);
    let dir = m.path().to_path_buf();
    let r = within_a_minute("config.json FIFO", move || {
        blockcascade::Engine::open(Some(&dir)).map(drop)
    });
    expect(r, "not a regular file", "config.json FIFO");
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &config).unwrap();
    let dir = m.path().to_path_buf();
    let r = within_a_minute("config.json -> /dev/zero", move || {
        blockcascade::Engine::open(Some(&dir)).map(drop)
    });
    expect(r, "not a regular file", "config.json -> /dev/zero");
    std::fs::remove_file(&config).unwrap();
    // Sparse: no disk space, but read whole it would be 64 MiB of NULs in memory.
    let f = std::fs::File::create(&config).unwrap();
    f.set_len(blockcascade::files::MAX_JSON_BYTES + 1).unwrap();
    drop(f);
    expect(
        blockcascade::Engine::open(Some(m.path())).map(drop),
        "is too large for a model's config.json",
        "huge config.json",
    );

    // The weight index of a sharded model as a FIFO.
    let m = model_copy();
    mkfifo(
        &m.path()
            .join("diffusion_pytorch_model.safetensors.index.json"),
    );
    let dir = m.path().to_path_buf();
    let r = within_a_minute("index FIFO", move || {
        blockcascade::Engine::open(Some(&dir)).map(drop)
    });
    expect(r, "not a regular file", "index FIFO");

    // A prompt schedule as a FIFO.
    let d = tempfile::tempdir().unwrap();
    let sp = d.path().join("schedule.json");
    mkfifo(&sp);
    let r = within_a_minute("schedule FIFO", move || {
        load_schedule(&sp, &builtin_config("tiny").unwrap(), 3).map(drop)
    });
    expect(r, "not a regular file", "schedule FIFO");

    // A tokenizer.json given as a FIFO: not "does not exist".
    let tok = d.path().join("tokenizer.json");
    mkfifo(&tok);
    let enc = golden_dir()
        .parent()
        .unwrap()
        .join("umt5-tiny/text_encoder");
    let r = within_a_minute("tokenizer FIFO", move || {
        blockcascade::TextEncoder::load(&enc, Some(&tok)).map(drop)
    });
    expect(r, "not a regular file", "tokenizer FIFO");
}
