//! `blockcascade tune` without a GPU: the probe children run on the emulated device at tiny
//! shapes (the sm_90a wgmma kernels under the SIMT emulation), test hooks
//! (`BC_TUNE_TEST_FAULT`) make a child hang, fail or differ, and the tuning file is applied by
//! the emulated CUDA backend and decoder when named explicitly (`TuningSource::File`,
//! `BC_TUNING_EMULATED=1`). Nothing here measures speed: which of the correct candidates wins
//! on the emulator is not asserted.

mod common;
use blockcascade::backend::cuda::device::Gpu;
use blockcascade::backend::cuda::ops::{attention_launches, split_attention_launches};
use blockcascade::backend::cuda::CudaOptions;
use blockcascade::decode::{CudaDecoder, Decoder, DecoderKind};
use blockcascade::kernels::launch::AttentionTile;
use blockcascade::tune::apply::{key_of, TuningSource};
use blockcascade::tune::file::{Choices, Entry, TuningFile, TuningKey};
use blockcascade::{AttentionMode, Error, Schedule};
use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

/// The backend options are process-global: one in-process session at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blockcascade"));
    for k in [
        "BC_TUNING",
        "BC_TUNING_FILE",
        "BC_TUNE_TEST_FAULT",
        "BC_ATTN_SPLIT",
        "BC_ATTN_WGMMA_VARIANT",
        "BC_CONV_WGMMA_VARIANT",
        "BC_CONV_HALO",
    ] {
        c.env_remove(k);
    }
    c
}

fn tune(out: &Path, fault: Option<&str>) -> Output {
    tune_with(out, fault, &[])
}

fn tune_with(out: &Path, fault: Option<&str>, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args(["tune", "--emulate", "--reps", "1", "--timeout-s", "10"])
        .arg("--out")
        .arg(out)
        .args(extra);
    if let Some(f) = fault {
        c.env("BC_TUNE_TEST_FAULT", f);
    }
    c.output().unwrap()
}

fn emulated_key() -> TuningKey {
    key_of(&Gpu::open_emulated().unwrap()).unwrap()
}

fn entry(key: TuningKey, choices: Choices) -> Entry {
    Entry {
        key,
        tuned_at: 0,
        choices,
        measured: Vec::new(),
    }
}

/// The table row of `family` `candidate`: (outcome, chosen).
fn row<'a>(table: &'a str, family: &str, candidate: &str) -> (&'a str, bool) {
    let l = table
        .lines()
        .find(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some(family) && w.next() == Some(candidate)
        })
        .unwrap_or_else(|| panic!("no row {family} {candidate} in\n{table}"));
    let w: Vec<&str> = l.split_whitespace().collect();
    (w[2], w.last() == Some(&"*"))
}

/// A child that hangs is killed at the timeout (hung), one that errors is failed, one whose
/// output is perturbed differs; none of them is chosen, the tune finishes and writes the file,
/// keeping another device's entry.
#[test]
fn faulty_candidates_are_reported_and_never_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuning.json");
    let mut other = TuningFile::default();
    let h100 = TuningKey::new("NVIDIA H100 80GB HBM3", Some((9, 0)), Some(12080));
    other.insert(entry(
        h100.clone(),
        Choices {
            attention: Some("k128".into()),
            ..Choices::default()
        },
    ));
    other.save(&path).unwrap();
    let o = tune(
        &path,
        Some("hang:attention=ws,wrong:attention=ws_deep,fail:attention=k128,wrong:attention=pp,wrong:attention=base,wrong:conv=halo,fail:conv=ws_halo,hang:split=1"),
    );
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    println!("{out}{err}");
    for (family, candidate, outcome) in [
        ("attention", "ws", "hung"),
        ("attention", "ws_deep", "differs"),
        ("attention", "k128", "failed"),
        ("attention", "pp", "differs"),
        ("attention", "base", "differs"),
        ("conv", "halo", "differs"),
        ("conv", "ws_halo", "failed"),
        ("split", "1", "hung"),
    ] {
        assert_eq!(
            row(&out, family, candidate),
            (outcome, false),
            "{family}={candidate}"
        );
    }
    // The only correct attention candidate is the default; its split family ran with it.
    assert_eq!(row(&out, "attention", "pp_k128"), ("ok", true));
    assert!(err.contains("no result within 10 s: killed"), "{err}");
    let f = TuningFile::load(&path).unwrap().unwrap();
    assert_eq!(f.entries.len(), 2, "{f:?}");
    let mine = f
        .entry(&emulated_key())
        .expect("the emulated device's entry");
    assert_eq!(mine.choices.attention.as_deref(), Some("pp_k128"));
    // split=1 hung: the default is the only correct split candidate.
    assert_eq!(mine.choices.split.as_deref(), Some("auto"));
    assert!(matches!(mine.choices.conv.as_deref(), Some("base" | "ws")));
    // halo differed and ws_halo failed: the halo conv must not be chosen.
    assert_ne!(mine.choices.conv_halo, Some(true));
    assert_eq!(mine.measured.len(), 12);
    assert_eq!(
        f.entry(&h100).and_then(|e| e.choices.attention.clone()),
        Some("k128".into())
    );
}

/// Without faults every candidate runs correctly on the emulator (the wgmma variants agree
/// with the reference), and the file written applies to the emulated device.
#[test]
fn every_candidate_matches_the_reference_on_the_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.json");
    let o = tune(&path, None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<&str> = out
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("chosen"))
        .collect();
    assert_eq!(rows.len(), 12, "{out}");
    for r in &rows {
        assert_eq!(r.split_whitespace().nth(2), Some("ok"), "{r}");
    }
    // One chosen per family.
    for fam in ["attention", "split", "conv"] {
        let chosen = rows
            .iter()
            .filter(|r| r.starts_with(fam) && r.ends_with('*'))
            .count();
        assert_eq!(chosen, 1, "{fam}: {out}");
    }
    let f = TuningFile::load(&path).unwrap().unwrap();
    let before = f.entry(&emulated_key()).unwrap().clone();
    assert!(before.choices.conv.is_some());
    // Tuning the convs again, all of them wrong now: the conv choice goes (defaults apply),
    // the attention and split choices and their measurements stay.
    let all_wrong = "wrong:conv=base,wrong:conv=ws,wrong:conv=halo,wrong:conv=ws_halo";
    let o = tune_with(&path, Some(all_wrong), &["--only", "conv"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.lines().any(|l| l.ends_with('*')), "{out}");
    let f = TuningFile::load(&path).unwrap().unwrap();
    let after = f.entry(&emulated_key()).unwrap();
    assert_eq!(after.choices.attention, before.choices.attention);
    assert_eq!(after.choices.split, before.choices.split);
    assert_eq!(
        (after.choices.conv.as_ref(), after.choices.conv_halo),
        (None, None)
    );
    assert_eq!(after.measured.len(), 12);
    assert!(after
        .measured
        .iter()
        .filter(|m| m.family == "conv")
        .all(|m| m.outcome == "differs"));
}

/// A malformed file: `tune` refuses to overwrite it with one clear error, and a session
/// opened with it fails with a typed error naming it (no panic).
#[test]
fn a_malformed_tuning_file_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuning.json");
    std::fs::write(&path, "{\"version\": 1, \"entries\": [oops").unwrap();
    let o = tune(&path, None);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&path.display().to_string()) && err.contains("then rerun `blockcascade tune`"),
        "{err}"
    );
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let g = golden();
    let co = CudaOptions {
        emulate: true,
        tuning: TuningSource::File(path.clone()),
        ..CudaOptions::default()
    };
    let r = blockcascade::backend::cuda::CudaBackend::new(g.engine.model(), &g.opts, co);
    match r {
        Err(Error::Format(m)) => assert!(m.contains(&path.display().to_string()), "{m}"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a malformed tuning file was accepted"),
    }
    let dec = Decoder::synthetic(DecoderKind::Taehv, 16, 9);
    let mut d = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    d.set_conv_wgmma(true).unwrap();
    assert!(matches!(
        d.apply_tuning(&TuningSource::File(path)),
        Err(Error::Format(_))
    ));
}

/// The golden case (sequential, causal) through the emulated CUDA backend with `co`.
fn run_golden(co: CudaOptions) -> Vec<f32> {
    run_opts(Schedule::Sequential, AttentionMode::Causal, co)
}

/// A tuning file in a new temporary folder with one entry, for the emulated device.
fn emulated_file(choices: Choices) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuning.json");
    let mut f = TuningFile::default();
    f.insert(entry(emulated_key(), choices));
    f.save(&path).unwrap();
    (dir, path)
}

/// A session whose device has an entry launches the entry's attention variant with its key
/// splits (and still matches the golden case); an entry with another key changes nothing; an
/// option set in code wins over the file.
#[test]
fn the_backend_launches_the_tuned_variant() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let choices = Choices {
        attention: Some("ws".into()),
        split: Some("2".into()),
        ..Choices::default()
    };
    let (_dir, path) = emulated_file(choices.clone());
    let f = TuningFile::load(&path).unwrap().unwrap();
    let co = |tuning, tile| CudaOptions {
        emulate: true,
        tuning,
        attention_tile: tile,
        ..CudaOptions::default()
    };
    let want = expected("expected.safetensors");
    let (ws0, split0, rows0) = (
        attention_launches(AttentionTile::WgmmaWs),
        split_attention_launches(),
        attention_launches(AttentionTile::Rows128),
    );
    let lat = run_golden(co(TuningSource::File(path.clone()), None));
    assert!(
        attention_launches(AttentionTile::WgmmaWs) > ws0,
        "ws never launched"
    );
    assert!(split_attention_launches() > split0, "no split launch");
    assert_eq!(attention_launches(AttentionTile::Rows128), rows0);
    let err = bench_rel_l2(&want, &lat);
    assert!(err < 2e-2, "rel L2 {err}");

    // The same file, but its entry was measured by another engine version: ignored.
    let mut stale = TuningFile::default();
    stale.insert(entry(
        TuningKey {
            engine: "0.0.1-old".into(),
            ..emulated_key()
        },
        choices,
    ));
    stale.save(&path).unwrap();
    let ws1 = attention_launches(AttentionTile::WgmmaWs);
    let rows1 = attention_launches(AttentionTile::Rows128);
    run_golden(co(TuningSource::File(path.clone()), None));
    assert_eq!(attention_launches(AttentionTile::WgmmaWs), ws1);
    assert!(attention_launches(AttentionTile::Rows128) > rows1);

    // An option in code wins over a matching entry.
    f.save(&path).unwrap();
    let (ws2, r64) = (
        attention_launches(AttentionTile::WgmmaWs),
        attention_launches(AttentionTile::Rows64),
    );
    run_golden(co(TuningSource::File(path), Some(AttentionTile::Rows64)));
    assert_eq!(attention_launches(AttentionTile::WgmmaWs), ws2);
    assert!(attention_launches(AttentionTile::Rows64) > r64);
}

fn bench_rel_l2(a: &[f32], b: &[f32]) -> f64 {
    blockcascade::bench::rel_l2(a, b)
}

/// `generate --backend cuda` on the emulated device with `BC_TUNING_EMULATED=1` and
/// `BC_TUNING_FILE`: the file applies (one stderr line says what), environment variables win
/// over it, and `BC_TUNING=off` loads nothing.
#[test]
fn environment_variables_win_over_the_file_in_the_cli() {
    let (dir, path) = emulated_file(Choices {
        attention: Some("ws".into()),
        split: Some("2".into()),
        ..Choices::default()
    });
    let d = golden_dir();
    let p = |s: &str| d.join(s).display().to_string();
    let gen = |env: &[(&str, &str)]| {
        let mut c = bin();
        c.env("BC_CUDA_EMULATE", "1")
            .env("BC_TUNING_EMULATED", "1")
            .env("BC_TUNING_FILE", &path)
            .args(["generate", "--backend", "cuda", "--model", &p("model")])
            .args(["--prompt-embeds", &p("prompt_embeds.safetensors")])
            .args(["--frames", "3", "--height", "8", "--width", "12", "-q"])
            .arg("--out")
            .arg(dir.path().join("o.safetensors"));
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err.lines()
            .filter(|l| l.starts_with("tuning: "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let plain = gen(&[]);
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert!(
        plain[0].contains("attention=wgmma64_ws") && plain[0].contains("split=2"),
        "{plain:?}"
    );
    assert!(!plain[0].contains("wins"), "{plain:?}");
    let env = gen(&[("BC_ATTN_SPLIT", "1"), ("BC_ATTN_WGMMA_VARIANT", "pp")]);
    assert!(
        env[0].contains("BC_ATTN_SPLIT wins") && env[0].contains("BC_ATTN_WGMMA_VARIANT wins"),
        "{env:?}"
    );
    assert!(gen(&[("BC_TUNING", "off")]).is_empty());
}

/// A decoder applies the entry's conv choices (while its wgmma conv is on, unless the
/// environment set them) and really launches the warp-specialized and halo convs.
#[test]
fn the_decoder_launches_the_tuned_convs() {
    let (_dir, path) = emulated_file(Choices {
        conv: Some("ws".into()),
        conv_halo: Some(true),
        ..Choices::default()
    });
    // A TAEHV of widths 64, 32, 16, 16: its first stage has the 64-channel convs the halo conv
    // takes, the others go to the warp-specialized conv.
    let dec = Decoder::synthetic(DecoderKind::Taehv, 16, 9);
    let mut d = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();
    // Off, the wgmma conv takes nothing from the file.
    assert_eq!(
        d.apply_tuning(&TuningSource::File(path.clone())).unwrap(),
        None
    );
    d.set_conv_wgmma(true).unwrap();
    let line = d.apply_tuning(&TuningSource::File(path)).unwrap();
    assert!(line.is_some_and(|l| l.contains("conv=ws") && l.contains("conv_halo=on")));
    assert!(d.conv_ws() && d.conv_halo());
    assert!(d.tuning().is_some());
    d.set_profiling(true).unwrap();
    let (h, w, frames) = (6, 10, 3);
    let mut rng = blockcascade::rng::Rng::new(5);
    let z: Vec<f32> = (0..frames * 16 * h * w).map(|_| rng.normal()).collect();
    d.begin(h, w).unwrap();
    let px = d.push(&z, frames, true).unwrap().f32.unwrap();
    assert!(px.iter().all(|v| v.is_finite()));
    let prof = d.take_profile().unwrap();
    let launches = |name: &str| -> u64 {
        prof.iter()
            .filter(|k| k.name.starts_with(name))
            .map(|k| k.launches)
            .sum()
    };
    assert!(launches("bc_conv_halo_n64") > 0, "{prof:?}");
    assert!(launches("bc_conv_wgmma_ws") > 0, "{prof:?}");
}

/// A child that leaves a descendant (in its own process group) holding its stdout and
/// stderr open for 20 s still delivers its result line, and the tune does not wait for the
/// descendant (the parent read the pipe only at its end: the result was lost, `failed`).
#[test]
fn a_descendant_holding_a_childs_stdout_does_not_lose_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuning.json");
    let start = std::time::Instant::now();
    let o = tune_with(&path, Some("linger:split=1"), &["--only", "split"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert_eq!(row(&out, "split", "1").0, "ok", "{out}{err}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(18),
        "the tune waited for the descendant"
    );
}

/// `tune --only split` keeps the entry's attention choice and measures the splits with it: a
/// choice this build does not know is one error naming the file, the entry and the field,
/// before any child runs, and the file is left as it was (every split child failed with the
/// name of an environment variable the user never set, and the bad entry was written again).
#[test]
fn a_bad_kept_choice_is_one_error_naming_the_file_and_field() {
    let (_dir, path) = emulated_file(Choices {
        attention: Some("fast".into()),
        ..Choices::default()
    });
    let before = std::fs::read(&path).unwrap();
    let o = tune_with(&path, None, &["--only", "split"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("field \"attention\": \"fast\""), "{err}");
    assert!(!err.contains("BC_ATTN"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// Bad arguments are one error line, before any child runs or any file is written.
#[test]
fn bad_tune_arguments_are_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.json");
    for (args, want) in [
        (&["--only", "gemm"][..], "--only"),
        (&["--timeout-s", "0"][..], "--timeout-s"),
        (&["--timeout-s", "nan"][..], "--timeout-s"),
    ] {
        let o = bin()
            .args(["tune", "--emulate", "--out"])
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err}");
        assert!(!path.exists());
    }
}

/// The default cache file is only a cache: when it cannot be read (here a directory where the
/// file should be) a CUDA run goes on without it, with one stderr note, instead of failing for
/// a user who never ran `tune`. A file named with `BC_TUNING_FILE` stays a hard error.
#[test]
fn an_unreadable_default_cache_file_is_a_note_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("blockcascade/tuning.json")).unwrap();
    let d = golden_dir();
    let p = |s: &str| d.join(s).display().to_string();
    let gen = |named: bool| {
        let mut c = bin();
        c.env("BC_CUDA_EMULATE", "1")
            .env("BC_TUNING_EMULATED", "1")
            .env("XDG_CACHE_HOME", dir.path())
            .env_remove("BC_TUNING_FILE")
            .args(["generate", "--backend", "cuda", "--model", &p("model")])
            .args(["--prompt-embeds", &p("prompt_embeds.safetensors")])
            .args(["--frames", "3", "--height", "8", "--width", "12", "-q"])
            .arg("--out")
            .arg(dir.path().join("o.safetensors"));
        if named {
            c.env(
                "BC_TUNING_FILE",
                dir.path().join("blockcascade/tuning.json"),
            );
        }
        c.output().unwrap()
    };
    let o = gen(false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("tuning: ")
            && l.contains("tuning.json")
            && l.ends_with("ignored")),
        "{err}"
    );
    let o = gen(true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("cannot be read"), "{err}");
}
