//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and crash regressions
//! (`fuzz/regressions/<target>/`) through the fuzz entry points, under the same allocation
//! guard as the fuzzer. A file named `ok-*` must be accepted, `err-*` must be refused with an
//! ordinary error; any other name only must not panic, abort or fail internally.
//! `BC_FUZZ_REPLAY_VERBOSE=1` prints each file before it runs (to find the one that aborts).

use blockcascade::fuzz_targets::{check, AllocGuard, Target, TARGETS};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The fuzzer's limits (fuzz/src/main.rs), set for the largest input the corpora may hold.
#[global_allocator]
static ALLOC: AllocGuard = AllocGuard::new(64 << 20, 64);
const MAX_INPUT: usize = 1 << 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs every file of `dir` through `target`; returns the failures.
fn replay(target: &Target, dir: &Path) -> (usize, Vec<String>) {
    let verbose = std::env::var_os("BC_FUZZ_REPLAY_VERBOSE").is_some();
    let mut failures = Vec::new();
    let list = files(dir);
    for path in &list {
        let bytes = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if verbose {
            eprintln!("replay {}", path.display());
        }
        if bytes.len() > MAX_INPUT {
            failures.push(format!("{}: larger than {MAX_INPUT} bytes", path.display()));
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            check(target, &bytes)?;
            Ok::<_, String>((target.entry)(&bytes))
        }));
        let problem = match outcome {
            Err(_) => Some("panicked".to_string()),
            Ok(Err(bug)) => Some(bug),
            Ok(Ok(Err(e))) if name.starts_with("ok-") => Some(format!("refused: {e}")),
            Ok(Ok(Ok(()))) if name.starts_with("err-") => Some("accepted".into()),
            Ok(Ok(_)) => None,
        };
        if let Some(p) = problem {
            failures.push(format!("{}: {p}", path.display()));
        }
    }
    (list.len(), failures)
}

#[test]
fn corpora_and_crash_regressions_replay() {
    ALLOC.set_input_len(MAX_INPUT);
    // One thread per target (the corpora are independent).
    let mut failures: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = TARGETS
            .iter()
            .map(|t| {
                s.spawn(move || {
                    let (n, mut f) = replay(t, &root().join("corpus").join(t.name));
                    if n == 0 {
                        f.push(format!(
                            "target {0} has no corpus in fuzz/corpus/{0}",
                            t.name
                        ));
                    }
                    f.extend(replay(t, &root().join("regressions").join(t.name)).1);
                    f
                })
            })
            .collect();
        runs.into_iter()
            .flat_map(|r| {
                r.join()
                    .unwrap_or_else(|_| vec!["a replay thread panicked".into()])
            })
            .collect()
    });
    // Every corpus folder belongs to a target (a renamed target must not leave files unreplayed).
    for sub in ["corpus", "regressions"] {
        for d in std::fs::read_dir(root().join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = d.file_name().to_string_lossy().to_string();
            if !TARGETS.iter().any(|t| t.name == n) {
                failures.push(format!("fuzz/{sub}/{n} names no target"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_header_claiming_a_terabyte_tensor_is_refused_at_once() {
    ALLOC.set_input_len(MAX_INPUT);
    let header =
        br#"{"t":{"dtype":"F32","shape":[274877906944],"data_offsets":[0,1099511627776]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    let e = blockcascade::fuzz_targets::safetensors(&file).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
}

/// Found by fuzzing `model_dir`: finite weights large enough that one block overflows to
/// inf/NaN were reported as an internal error (a bug); they are bad input.
#[test]
fn weights_that_overflow_are_a_format_error() {
    ALLOC.set_input_len(MAX_INPUT);
    let path = root().join("regressions/model_dir/err-finite-weights-overflow-to-nan");
    let e = blockcascade::fuzz_targets::model_dir(&std::fs::read(path).unwrap()).unwrap_err();
    assert!(
        matches!(e, blockcascade::Error::Format(_)) && e.to_string().contains("non-finite"),
        "{e:?}"
    );
}

/// The guard really stops an oversized allocation (in a child process: it aborts).
#[test]
fn the_allocation_guard_aborts_on_an_oversized_allocation() {
    const NAME: &str = "the_allocation_guard_aborts_on_an_oversized_allocation";
    if std::env::var_os("BC_FUZZ_GUARD_CHILD").is_some() {
        ALLOC.set_input_len(1000);
        let v: Vec<u8> = Vec::with_capacity((64 << 20) + 64 * 1000 + 1);
        std::hint::black_box(&v);
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env("BC_FUZZ_GUARD_CHILD", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("AllocGuard"),
        "{:?} {err}",
        out.status
    );
}

/// Found while writing the tokenizer target (and reproduced with its harness): a
/// `tokenizer.json` whose own padding is `Fixed` at 10^11 made encoding allocate 400 GB. The
/// file's padding and truncation are now ignored (the engine truncates and appends `</s>`).
#[test]
fn a_tokenizer_file_does_not_choose_the_encoding_length() {
    ALLOC.set_input_len(MAX_INPUT);
    for name in ["ok-fixed-padding-of-1e11", "ok-truncation-to-0"] {
        let path = root().join("regressions/tokenizer").join(name);
        blockcascade::fuzz_targets::tokenizer(&std::fs::read(path).unwrap()).unwrap();
    }
}

/// Found by fuzzing `tokenizer`: the tokenizers crate panics on a syntax error inside the
/// `decoder` value, on a precompiled character map that is not base64, and (in the
/// `spm_precompiled` crate) on a map whose trie points outside itself. Each is a format error.
#[test]
fn tokenizer_files_that_make_the_tokenizers_crate_panic_are_format_errors() {
    ALLOC.set_input_len(MAX_INPUT);
    for name in [
        "err-invalid-json-in-decoder",
        "err-precompiled-map-not-base64",
        "err-precompiled-trie-out-of-bounds",
    ] {
        let path = root().join("regressions/tokenizer").join(name);
        let e = blockcascade::fuzz_targets::tokenizer(&std::fs::read(path).unwrap()).unwrap_err();
        assert!(matches!(e, blockcascade::Error::Format(_)), "{name}: {e:?}");
    }
}
