//! The C ABI: the C example compiled with `cc` and linked against the built library (static and
//! shared), compared with the Rust API; valgrind; bad handles and bad inputs through the
//! exported functions.

mod common;
use common::{cpu_engine, expect_c_err, last_error};

use blockcascade::ffi::sys::*;
use blockcascade::ffi::*;
use blockcascade::{Engine, GenerateOptions, Generator, NoiseSource, PromptEmbeds, Schedule};
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Helpers

/// The built C library `name` (`libblockcascade.a` or `.so`) that matches this test binary.
///
/// The test binary lives in `<target>/<profile>/deps`. Cargo writes the `cdylib`/`staticlib`
/// outputs of the library unit the tests were built with into that `deps` folder (a plain
/// `cargo build` also copies them up to `<target>/<profile>`); the newest of the two is used.
fn built_lib(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [deps.join(name), deps.parent().unwrap().join(name)];
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| panic!("{name} was not built (looked in {candidates:?})"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// System libraries a program linking `libblockcascade.a` needs (Linux).
const STATIC_LIBS: &[&str] = &[
    "-lstdc++",
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// Compiles `ffi/examples/stream.c` against the static (`shared == false`) or shared library.
fn build_example(dir: &Path, shared: bool) -> PathBuf {
    build_c_example("stream", dir, shared)
}

/// Compiles `ffi/examples/{name}.c` against the static (`shared == false`) or shared library.
fn build_c_example(name: &str, dir: &Path, shared: bool) -> PathBuf {
    let exe = dir.join(if shared {
        format!("{name}-shared")
    } else {
        format!("{name}-static")
    });
    let mut cmd = Command::new(cc());
    // POSIX for the examples' threads and nanosleep.
    cmd.args(["-std=c99", "-D_POSIX_C_SOURCE=200809L", "-pthread"])
        .args(["-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .arg(repo().join(format!("ffi/examples/{name}.c")))
        .arg("-I")
        .arg(repo().join("ffi/include"))
        .arg("-o")
        .arg(&exe);
    if shared {
        // Link the file itself (its folder may hold a stale copy under the same name); the
        // rpath lets the loader find it by its soname.
        let so = built_lib("libblockcascade.so");
        let lib_dir = so.parent().unwrap();
        cmd.arg(&so);
        cmd.arg(format!("-Wl,-rpath,{}", lib_dir.display()));
        cmd.arg("-lm");
    } else {
        cmd.arg(built_lib("libblockcascade.a"));
        // `cargo rustc --lib --crate-type staticlib -- --print native-static-libs`; libstdc++
        // for the C++ kernel emulation layer that build.rs links in.
        cmd.args(STATIC_LIBS);
    }
    let out = cmd.output().expect("running the C compiler (set CC)");
    assert!(
        out.status.success(),
        "compiling {name}.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// What the Rust API produces for the session defaults with `seed`, `lag` and `blocks`.
fn rust_latents(seed: u64, lag: u32, blocks: usize) -> Vec<f32> {
    let engine = Engine::open(None).unwrap();
    let opts = GenerateOptions {
        schedule: if lag == 0 {
            Schedule::Sequential
        } else {
            Schedule::Cascade { lag: lag as usize }
        },
        ..Default::default()
    };
    let prompt = PromptEmbeds::builtin(engine.config(), seed);
    let gen = Generator::new(engine.model(), opts, NoiseSource::Seeded(seed), &prompt).unwrap();
    gen.generate(blocks).unwrap().0
}

/// Under valgrind, which hides AVX-512 from the program, the CPU backend runs its portable
/// kernels (matrixmultiply, scalar softmax) where the test process runs the AVX-512 ones:
/// the same math summed in another order. Those runs are held to a relative L2 distance.
fn assert_close_portable(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rel = common::rel_l2(want, got);
    assert!(rel < 1e-5, "{what}: relative L2 {rel:e}");
}

/// Bit-for-bit equal, or (should a build ever differ in float evaluation) within 1e-6 relative.
fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got == want {
        return;
    }
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        let d = (*g as f64 - *w as f64).abs() / (w.abs() as f64).max(1e-3);
        worst = worst.max(d);
    }
    assert!(worst < 1e-6, "{what}: worst relative difference {worst}");
}

fn open_session(e: *mut bc_engine, opts: Option<bc_session_options>) -> *mut bc_session {
    let mut s = null_mut();
    let p = opts.as_ref().map_or(null(), |o| o as *const _);
    let st = unsafe { bc_session_open(e, p, &mut s) };
    assert_eq!(st, BC_OK, "{}", last_error());
    s
}

unsafe extern "C" fn collect(
    user: *mut c_void,
    block_index: u32,
    latents: *const f32,
    frames: u32,
    channels: u32,
    height: u32,
    width: u32,
) -> i32 {
    let out = &mut *(user as *mut Vec<f32>);
    assert_eq!(
        out.len(),
        (block_index * frames * channels * height * width) as usize
    );
    let n = (frames * channels * height * width) as usize;
    out.extend_from_slice(std::slice::from_raw_parts(latents, n));
    0
}

fn generate(s: *mut bc_session, blocks: u32) -> (bc_status, Vec<f32>) {
    let mut out: Vec<f32> = Vec::new();
    let st = unsafe {
        bc_session_generate(
            s,
            blocks,
            Some(collect),
            &mut out as *mut Vec<f32> as *mut c_void,
        )
    };
    (st, out)
}

// ---------------------------------------------------------------------------------------------
// The C example

#[test]
fn c_example_static_matches_rust_api() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_example(dir.path(), false);
    for (seed, lag) in [(7u64, 0u32), (3, 1)] {
        let out = dir.path().join(format!("latents-{seed}-{lag}.f32"));
        let (seed_s, lag_s) = (seed.to_string(), lag.to_string());
        let stdout = run_example(
            &exe,
            &[
                out.as_os_str(),
                "3".as_ref(),
                seed_s.as_ref(),
                lag_s.as_ref(),
            ],
        );
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("block ")).collect();
        assert_eq!(lines.len(), 3, "one line per block:\n{stdout}");
        assert!(lines[2].starts_with("block 2: 3 frames x 16 channels x 8 x 12"));
        let got = read_f32(&out);
        let want = rust_latents(seed, lag, 3);
        assert_eq!(got.len(), 3 * 3 * 16 * 8 * 12);
        assert_same(&got, &want, "C example (static) vs Rust API");
    }
}

#[test]
fn c_example_shared_library_runs() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_example(dir.path(), true);
    let out = dir.path().join("latents.f32");
    let run = Command::new(&exe)
        .arg(&out)
        .args(["2", "11"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_same(
        &read_f32(&out),
        &rust_latents(11, 0, 2),
        "C example (shared) vs Rust API",
    );
}

/// Runs an example program; its stdout (asserts that it succeeded).
fn run_example(exe: &Path, args: &[&std::ffi::OsStr]) -> String {
    let run = Command::new(exe).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{} failed:\n{stdout}\n{}",
        exe.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

/// Runs `exe args` under valgrind memcheck (leaks included, the project's suppressions) and
/// asserts a clean report; returns the program's stdout. `None` when valgrind is missing.
fn memcheck(exe: &Path, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Option<String> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        return None;
    }
    let run = Command::new("valgrind")
        .envs(env.iter().copied())
        .args([
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect,possible",
            "--error-exitcode=99",
        ])
        .arg(format!(
            "--suppressions={}",
            repo().join("ffi/valgrind.supp").display()
        ))
        .arg(exe)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "valgrind reported errors (exit {:?}):\n{stdout}\n{stderr}",
        run.status.code()
    );
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "{stderr}");
    assert!(
        stderr.contains("definitely lost: 0 bytes") || stderr.contains("no leaks are possible")
    );
    Some(stdout)
}

#[test]
fn c_example_is_clean_under_valgrind() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_example(dir.path(), false);
    let out = dir.path().join("latents.f32");
    let video = dir.path().join("video.y4m");
    let args = [
        out.as_os_str(),
        "2".as_ref(),
        "5".as_ref(),
        "2".as_ref(),
        video.as_os_str(),
    ];
    if memcheck(&exe, &args, &[]).is_none() {
        eprintln!("SKIPPED c_example_is_clean_under_valgrind: valgrind is not installed");
        return;
    }
    assert_close_portable(
        &read_f32(&out),
        &rust_latents(5, 2, 2),
        "C example (valgrind) vs Rust API",
    );
    // The example's .y4m, written from the frames callback: 2 blocks of 3 latent frames of
    // 8x12 give 4*6-3 frames of 96x64 (4:4:4).
    let y4m = std::fs::read(&video).unwrap();
    let header = b"YUV4MPEG2 W96 H64 F16:1 Ip A1:1 C444\n";
    assert!(
        y4m.starts_with(header),
        "{:?}",
        String::from_utf8_lossy(&y4m[..40])
    );
    assert_eq!(y4m.len(), header.len() + 21 * (6 + 3 * 96 * 64));
}

// ---------------------------------------------------------------------------------------------
// Through the exported functions

#[test]
fn version_defaults_and_empty_last_error() {
    std::thread::spawn(|| {
        assert_eq!(last_error(), "", "no failure yet on a new thread");
        let v = unsafe { CStr::from_ptr(bc_version()) };
        assert_eq!(v.to_str().unwrap(), blockcascade::VERSION);
        let e = bc_engine_options_default();
        assert_eq!(
            e.struct_size as usize,
            std::mem::size_of::<bc_engine_options>()
        );
        assert!(e.backend.is_null() && e.devices.is_null() && e.n_devices == 0);
        let s = bc_session_options_default();
        assert_eq!(
            s.struct_size as usize,
            std::mem::size_of::<bc_session_options>()
        );
        assert_eq!(
            (
                s.height,
                s.width,
                s.block_frames,
                s.lag,
                s.bidirectional,
                s.local_attn,
                s.sink,
                s.seed
            ),
            (8, 12, 3, 0, 0, -1, 0, 0)
        );
    })
    .join()
    .unwrap();
}

#[test]
fn ffi_generation_matches_rust_api_and_repeats() {
    let e = cpu_engine();
    let mut o = bc_session_options_default();
    o.seed = 9;
    let s = open_session(e, Some(o));
    let (st, a) = generate(s, 3);
    assert_eq!(st, BC_OK, "{}", last_error());
    assert_eq!(a, rust_latents(9, 0, 3));
    let (st, b) = generate(s, 3);
    assert_eq!(st, BC_OK);
    assert_eq!(a, b, "each generate call starts from scratch");
    let mut stats = bc_session_stats {
        struct_size: std::mem::size_of::<bc_session_stats>() as u32,
        blocks: 0,
        ticks: 0,
        forward_passes: 0,
        max_cache_bytes: 0,
        time_to_first_block: 0.0,
        total_seconds: 0.0,
    };
    assert_eq!(unsafe { bc_session_last_stats(s, &mut stats) }, BC_OK);
    assert_eq!((stats.blocks, stats.ticks), (3, 12));
    assert!(stats.total_seconds > 0.0 && stats.max_cache_bytes > 0);
    bc_session_close(s);
    bc_engine_close(e);
}

#[test]
fn cpu_devices_spread_the_window_and_give_the_same_latents() {
    let devs = [0i32, 1, 2];
    let opts = bc_engine_options {
        backend: c"cpu".as_ptr(),
        devices: devs.as_ptr(),
        n_devices: 3,
        ..bc_engine_options_default()
    };
    let mut e = null_mut();
    assert_eq!(
        unsafe { bc_engine_open(null(), &opts, &mut e) },
        BC_OK,
        "{}",
        last_error()
    );
    let mut o = bc_session_options_default();
    o.seed = 4;
    o.lag = 1;
    let s = open_session(e, Some(o));
    let (st, a) = generate(s, 3);
    assert_eq!(st, BC_OK, "{}", last_error());
    let want = rust_latents(4, 1, 3);
    assert!(common::rel_l2(&want, &a) < 1e-5);
    bc_session_close(s);
    bc_engine_close(e);
}

#[test]
fn golden_case_through_the_c_abi() {
    let dir = common::golden_dir();
    let model = CString::new(dir.join("model").to_str().unwrap()).unwrap();
    let noise = CString::new(dir.join("noise.safetensors").to_str().unwrap()).unwrap();
    let mut e = null_mut();
    let opts = bc_engine_options {
        backend: c"cpu".as_ptr(),
        ..bc_engine_options_default()
    };
    assert_eq!(
        unsafe { bc_engine_open(model.as_ptr(), &opts, &mut e) },
        BC_OK,
        "{}",
        last_error()
    );
    let g = common::golden();
    let text_dim = g.engine.config().text_dim as u32;
    for (lag, name) in [
        (0u32, "expected.safetensors"),
        (2, "cascade-lag2-causal.safetensors"),
    ] {
        let o = bc_session_options {
            lag,
            ..bc_session_options_default()
        };
        let s = open_session(e, Some(o));
        let p = &g.prompt;
        let st = unsafe { bc_session_set_prompt(s, p.data.as_ptr(), p.rows as u32, text_dim) };
        assert_eq!(st, BC_OK, "{}", last_error());
        assert_eq!(
            unsafe { bc_session_set_noise_file(s, noise.as_ptr()) },
            BC_OK,
            "{}",
            last_error()
        );
        let (st, got) = generate(s, (g.frames / 3) as u32);
        assert_eq!(st, BC_OK, "{}", last_error());
        let want = common::expected(name);
        let num: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!(
            (num / den).sqrt() < 1e-4,
            "{name}: relative L2 {}",
            (num / den).sqrt()
        );
        // Recorded noise holds 3 blocks.
        expect_c_err(generate(s, 4).0, BC_ERR_INVALID_ARGUMENT, "recorded noise");
        bc_session_close(s);
    }
    bc_engine_close(e);
    // Missing model folder and noise file.
    let bad = CString::new("/nonexistent/model").unwrap();
    let mut e2 = null_mut();
    let st = unsafe { bc_engine_open(bad.as_ptr(), null(), &mut e2) };
    assert!(
        st == BC_ERR_IO || st == BC_ERR_FORMAT,
        "{st}: {}",
        last_error()
    );
    assert!(e2.is_null(), "no handle on failure");
    let e = cpu_engine();
    let s = open_session(e, None);
    let missing = CString::new("/nonexistent/noise.safetensors").unwrap();
    expect_c_err(
        unsafe { bc_session_set_noise_file(s, missing.as_ptr()) },
        BC_ERR_IO,
        "nonexistent",
    );
    bc_session_close(s);
    bc_engine_close(e);
}

#[test]
fn null_pointers_are_invalid_arguments() {
    let e = cpu_engine();
    expect_c_err(
        unsafe { bc_engine_open(null(), null(), null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "out is NULL",
    );
    expect_c_err(
        unsafe { bc_session_open(e, null(), null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "out is NULL",
    );
    let mut s = null_mut();
    expect_c_err(
        unsafe { bc_session_open(null_mut(), null(), &mut s) },
        BC_ERR_INVALID_ARGUMENT,
        "engine handle is NULL",
    );
    assert!(s.is_null());
    expect_c_err(
        unsafe { bc_session_set_prompt(null_mut(), null(), 1, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "session handle is NULL",
    );
    expect_c_err(
        unsafe { bc_session_generate(null_mut(), 1, Some(collect), null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "NULL",
    );
    expect_c_err(
        unsafe { bc_engine_get_info(e, null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "info is NULL",
    );
    let s = open_session(e, None);
    expect_c_err(
        unsafe { bc_session_generate(s, 1, None, null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "callback is NULL",
    );
    expect_c_err(
        unsafe { bc_session_set_prompt(s, null(), 1, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "NULL",
    );
    expect_c_err(
        unsafe { bc_session_last_stats(s, null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "stats is NULL",
    );
    expect_c_err(generate(s, 0).0, BC_ERR_INVALID_ARGUMENT, "at least 1");
    // Closing NULL is a no-op.
    bc_session_close(null_mut());
    bc_engine_close(null_mut());
    bc_session_close(s);
    bc_engine_close(e);
}

#[test]
fn closed_and_bogus_handles_are_detected() {
    let e = cpu_engine();
    let s = open_session(e, None);
    bc_session_close(s);
    expect_c_err(
        generate(s, 1).0,
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_session",
    );
    let p = [0f32; 32];
    expect_c_err(
        unsafe { bc_session_set_prompt(s, p.as_ptr(), 1, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_session",
    );
    bc_session_close(s); // double close: ignored
                         // A made-up pointer and a handle of the wrong kind.
    let bogus = 0xdead_beef_usize as *mut bc_session;
    expect_c_err(
        generate(bogus, 1).0,
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_session",
    );
    expect_c_err(
        generate(e as *mut bc_session, 1).0,
        BC_ERR_INVALID_ARGUMENT,
        "is a bc_engine",
    );
    bc_session_close(e as *mut bc_session); // wrong kind: ignored, the engine stays open
    let s2 = open_session(e, None);
    bc_engine_close(e);
    let mut s3 = null_mut();
    expect_c_err(
        unsafe { bc_session_open(e, null(), &mut s3) },
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_engine",
    );
    bc_engine_close(e); // double close: ignored
                        // The session outlives its engine handle.
    let (st, got) = generate(s2, 1);
    assert_eq!(st, BC_OK, "{}", last_error());
    assert_eq!(got, rust_latents(0, 0, 1));
    bc_session_close(s2);
}

#[test]
fn wrong_struct_sizes_are_rejected() {
    let e = cpu_engine();
    for size in [0u32, 4, 39, 41, 1000] {
        let o = bc_session_options {
            struct_size: size,
            ..bc_session_options_default()
        };
        let mut s = null_mut();
        expect_c_err(
            unsafe { bc_session_open(e, &o, &mut s) },
            BC_ERR_INVALID_ARGUMENT,
            "struct_size",
        );
        assert!(s.is_null());
    }
    let o = bc_engine_options {
        struct_size: 8,
        ..bc_engine_options_default()
    };
    let mut e2 = null_mut();
    expect_c_err(
        unsafe { bc_engine_open(null(), &o, &mut e2) },
        BC_ERR_INVALID_ARGUMENT,
        "bc_engine_options.struct_size",
    );
    let mut info: bc_engine_info = unsafe { std::mem::zeroed() };
    expect_c_err(
        unsafe { bc_engine_get_info(e, &mut info) },
        BC_ERR_INVALID_ARGUMENT,
        "bc_engine_info.struct_size",
    );
    info.struct_size = std::mem::size_of::<bc_engine_info>() as u32;
    assert_eq!(unsafe { bc_engine_get_info(e, &mut info) }, BC_OK);
    assert_eq!((info.text_dim, info.channels, info.num_steps), (32, 16, 4));
    bc_engine_close(e);
}

/// Only the sizes of published versions of `bc_engine_options` are accepted: a size that ends
/// in the middle of a pointer field would have the library read a pointer half from garbage.
#[test]
fn only_published_engine_options_sizes_are_accepted() {
    use std::mem::{offset_of, size_of};
    let published = [
        offset_of!(bc_engine_options, text_encoder),
        offset_of!(bc_engine_options, text_encoder_device),
        offset_of!(bc_engine_options, decoder_device),
        offset_of!(bc_engine_options, text_encoder_precision),
        size_of::<bc_engine_options>(),
    ];
    for size in published {
        let o = bc_engine_options {
            struct_size: size as u32,
            backend: c"cpu".as_ptr(),
            ..bc_engine_options_default()
        };
        let mut e = null_mut();
        let st = unsafe { bc_engine_open(null(), &o, &mut e) };
        assert_eq!(st, BC_OK, "size {size}: {}", last_error());
        bc_engine_close(e);
    }
    // Ending 4 bytes into text_encoder, tokenizer, text_encoder_device, decoder_device and
    // text_encoder_precision.
    for size in [
        published[0] + 4,
        published[1] - 4,
        published[2] - 4,
        published[3] - 4,
        published[4] - 4,
    ] {
        let o = bc_engine_options {
            struct_size: size as u32,
            backend: c"cpu".as_ptr(),
            ..bc_engine_options_default()
        };
        let mut e = null_mut();
        expect_c_err(
            unsafe { bc_engine_open(null(), &o, &mut e) },
            BC_ERR_INVALID_ARGUMENT,
            &format!(
                "{}, {}, {}, {}, {}",
                published[0], published[1], published[2], published[3], published[4]
            ),
        );
        assert!(e.is_null());
    }
}

#[test]
fn bad_options_and_backends() {
    let mut e = null_mut();
    let cuda = bc_engine_options {
        backend: c"cuda".as_ptr(),
        ..bc_engine_options_default()
    };
    match blockcascade::backend::cuda::device::probe() {
        // No driver here: a clean device error at open, not at the first generate.
        Err(_) => expect_c_err(
            unsafe { bc_engine_open(null(), &cuda, &mut e) },
            BC_ERR_DEVICE,
            "CUDA",
        ),
        Ok(_) => {
            assert_eq!(unsafe { bc_engine_open(null(), &cuda, &mut e) }, BC_OK);
            bc_engine_close(e);
        }
    }
    let tpu = bc_engine_options {
        backend: c"tpu".as_ptr(),
        ..bc_engine_options_default()
    };
    expect_c_err(
        unsafe { bc_engine_open(null(), &tpu, &mut e) },
        BC_ERR_INVALID_ARGUMENT,
        "unknown backend",
    );
    let dev1 = [1i32];
    let d = bc_engine_options {
        devices: dev1.as_ptr(),
        n_devices: 1,
        ..bc_engine_options_default()
    };
    expect_c_err(
        unsafe { bc_engine_open(null(), &d, &mut e) },
        BC_ERR_INVALID_ARGUMENT,
        "worker threads numbered 0..1",
    );
    // A repeated or reordered CPU index has no meaning: refused, not run as the count.
    for devs in [[0i32, 0], [1, 0]] {
        let d = bc_engine_options {
            backend: c"cpu".as_ptr(),
            devices: devs.as_ptr(),
            n_devices: 2,
            ..bc_engine_options_default()
        };
        expect_c_err(
            unsafe { bc_engine_open(null(), &d, &mut e) },
            BC_ERR_INVALID_ARGUMENT,
            "worker threads numbered 0..2, given once each in order",
        );
    }
    let d = bc_engine_options {
        n_devices: 1,
        ..bc_engine_options_default()
    };
    expect_c_err(
        unsafe { bc_engine_open(null(), &d, &mut e) },
        BC_ERR_INVALID_ARGUMENT,
        "devices is NULL",
    );
    assert!(e.is_null());
    let dev0 = [0i32];
    let d = bc_engine_options {
        backend: c"cpu".as_ptr(),
        devices: dev0.as_ptr(),
        n_devices: 1,
        ..bc_engine_options_default()
    };
    assert_eq!(unsafe { bc_engine_open(null(), &d, &mut e) }, BC_OK);
    let d = bc_session_options_default();
    let cases: [(bc_session_options, &str); 7] = [
        (bc_session_options { height: 7, ..d }, "even"),
        (bc_session_options { width: 0, ..d }, "even"),
        (
            bc_session_options {
                block_frames: 0,
                ..d
            },
            "block frames",
        ),
        (bc_session_options { lag: 5, ..d }, "lag"),
        (
            bc_session_options {
                bidirectional: 2,
                ..d
            },
            "bidirectional",
        ),
        (bc_session_options { local_attn: 0, ..d }, "local_attn"),
        (bc_session_options { sink: 1, ..d }, "sink"),
    ];
    for (o, needle) in cases {
        let mut s = null_mut();
        expect_c_err(
            unsafe { bc_session_open(e, &o, &mut s) },
            BC_ERR_INVALID_ARGUMENT,
            needle,
        );
    }
    for (side, code, needle) in [
        (1u32 << 30, BC_ERR_INVALID_ARGUMENT, "at most 16384"),
        (1 << 14, BC_ERR_OUT_OF_MEMORY, "MiB"),
    ] {
        let big = bc_session_options {
            height: side,
            width: side,
            ..d
        };
        let mut s = null_mut();
        expect_c_err(unsafe { bc_session_open(e, &big, &mut s) }, code, needle);
    }
    bc_engine_close(e);
}

#[test]
fn bad_prompts_are_rejected() {
    let e = cpu_engine();
    let s = open_session(e, None);
    let good = vec![0.5f32; 4 * 32];
    expect_c_err(
        unsafe { bc_session_set_prompt(s, good.as_ptr(), 4, 31) },
        BC_ERR_INVALID_ARGUMENT,
        "text_dim is 32",
    );
    expect_c_err(
        unsafe { bc_session_set_prompt(s, good.as_ptr(), 0, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "rows",
    );
    let many = vec![0.5f32; 10_000 * 32];
    expect_c_err(
        unsafe { bc_session_set_prompt(s, many.as_ptr(), 10_000, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "text_len",
    );
    let mut nan = good.clone();
    nan[70] = f32::NAN;
    expect_c_err(
        unsafe { bc_session_set_prompt(s, nan.as_ptr(), 4, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "NaN",
    );
    nan[70] = f32::INFINITY;
    expect_c_err(
        unsafe { bc_session_switch_prompt(s, 1, nan.as_ptr(), 4, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "infinite",
    );
    expect_c_err(
        unsafe { bc_session_switch_prompt(s, 0, good.as_ptr(), 4, 32) },
        BC_ERR_INVALID_ARGUMENT,
        "block >= 1",
    );
    // A valid prompt and a switch, compared with the Rust API.
    assert_eq!(
        unsafe { bc_session_set_prompt(s, good.as_ptr(), 4, 32) },
        BC_OK
    );
    let other: Vec<f32> = (0..8 * 32).map(|i| ((i % 7) as f32 - 3.0) / 3.0).collect();
    assert_eq!(
        unsafe { bc_session_switch_prompt(s, 2, other.as_ptr(), 8, 32) },
        BC_OK
    );
    expect_c_err(generate(s, 2).0, BC_ERR_INVALID_ARGUMENT, "prompt switch");
    let (st, got) = generate(s, 3);
    assert_eq!(st, BC_OK, "{}", last_error());
    let engine = Engine::open(None).unwrap();
    let p0 = PromptEmbeds {
        data: good.clone(),
        rows: 4,
    };
    let p1 = PromptEmbeds {
        data: other,
        rows: 8,
    };
    let mut gen = Generator::new(
        engine.model(),
        GenerateOptions::default(),
        NoiseSource::Seeded(0),
        &p0,
    )
    .unwrap();
    gen.switch_prompt(2, &p1).unwrap();
    assert_eq!(got, gen.generate(3).unwrap().0);
    bc_session_close(s);
    bc_engine_close(e);
}

unsafe extern "C" fn stop_at_1(
    user: *mut c_void,
    block_index: u32,
    _latents: *const f32,
    _frames: u32,
    _channels: u32,
    _height: u32,
    _width: u32,
) -> i32 {
    *(user as *mut u32) += 1;
    if block_index == 1 {
        42
    } else {
        0
    }
}

#[test]
fn callback_can_cancel() {
    let e = cpu_engine();
    let s = open_session(e, None);
    let mut calls = 0u32;
    let st = unsafe {
        bc_session_generate(s, 4, Some(stop_at_1), &mut calls as *mut u32 as *mut c_void)
    };
    expect_c_err(st, BC_ERR_CANCELLED, "returned 42 for block 1");
    assert_eq!(calls, 2, "no callback after the stop");
    expect_c_err(
        unsafe { bc_session_last_stats(s, &mut std::mem::zeroed()) },
        BC_ERR_INVALID_ARGUMENT,
        "struct_size",
    );
    // The session is still usable.
    assert_eq!(generate(s, 1).0, BC_OK);
    bc_session_close(s);
    bc_engine_close(e);
}

unsafe extern "C" fn reenter(
    user: *mut c_void,
    block_index: u32,
    _latents: *const f32,
    _frames: u32,
    _channels: u32,
    _height: u32,
    _width: u32,
) -> i32 {
    if block_index > 0 {
        return 0;
    }
    let s = user as *mut bc_session;
    let st = bc_session_generate(s, 1, Some(collect), null_mut());
    if st != BC_ERR_INVALID_ARGUMENT || !last_error().contains("busy") {
        eprintln!("re-entrant generate: status {st}, `{}`", last_error());
        return 1;
    }
    // Closing the session from its own callback is allowed: the running call keeps it alive.
    bc_session_close(s);
    0
}

#[test]
fn reentrant_calls_are_refused() {
    let e = cpu_engine();
    let s = open_session(e, None);
    let st = unsafe { bc_session_generate(s, 2, Some(reenter), s as *mut c_void) };
    assert_eq!(st, BC_OK, "{}", last_error());
    expect_c_err(
        generate(s, 1).0,
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_session",
    );
    bc_engine_close(e);
}

#[test]
fn sessions_share_an_engine_across_threads() {
    let e = cpu_engine() as usize;
    let want: Vec<Vec<f32>> = (0..3).map(|seed| rust_latents(seed, 1, 2)).collect();
    let threads: Vec<_> = (0..3u64)
        .map(|seed| {
            std::thread::spawn(move || {
                let o = bc_session_options {
                    seed,
                    lag: 1,
                    ..bc_session_options_default()
                };
                let s = open_session(e as *mut bc_engine, Some(o));
                let (st, got) = generate(s, 2);
                assert_eq!(st, BC_OK, "{}", last_error());
                bc_session_close(s);
                got
            })
        })
        .collect();
    for (t, w) in threads.into_iter().zip(want) {
        assert_eq!(t.join().unwrap(), w);
    }
    bc_engine_close(e as *mut bc_engine);
}

/// Function names declared by `pattern` lines (`... fn NAME(`) in a file.
fn fn_names(path: &Path, pattern: &str) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(pattern))
        .filter_map(|rest| rest.split('(').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_header_function_is_exported_and_signature_checked() {
    let declared = fn_names(&repo().join("ffi/bindings.rs"), "pub fn ");
    assert!(declared.len() >= 10, "{declared:?}");
    let mut exported = std::collections::BTreeSet::new();
    for file in ["src/ffi/mod.rs", "src/ffi/stream.rs"] {
        for pattern in ["pub extern \"C\" fn ", "pub unsafe extern \"C\" fn "] {
            exported.extend(fn_names(&repo().join(file), pattern));
        }
    }
    assert_eq!(declared, exported, "header declarations vs Rust exports");
    let sys = std::fs::read_to_string(repo().join("src/ffi/sys.rs")).unwrap();
    let list = &sys[sys.find("same!(").expect("the same!(...) list")..];
    for name in &declared {
        assert!(
            list.contains(&format!("{name},")),
            "{name} is missing from the signature check in src/ffi/sys.rs"
        );
    }
    // The shared library exports exactly these C symbols (when binutils' nm is available).
    let so = built_lib("libblockcascade.so");
    match Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let symbols: std::collections::BTreeSet<String> = text
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter(|s| s.starts_with("bc_"))
                .map(str::to_owned)
                .collect();
            assert_eq!(symbols, declared, "bc_* symbols of {}", so.display());
        }
        _ => eprintln!("SKIPPED the symbol check: nm is not available"),
    }
}

// ---------------------------------------------------------------------------------------------
// Pixels through the C ABI

/// What the frames callback saw: (block index, frames, height, width), the RGB8 and f32 frames.
#[derive(Default)]
struct Frames {
    calls: Vec<(u32, u32, u32, u32)>,
    rgb: Vec<u8>,
    pixels: Vec<f32>,
    stop_at: Option<u32>,
}

unsafe extern "C" fn collect_frames(
    user: *mut c_void,
    block_index: u32,
    rgb: *const u8,
    pixels: *const f32,
    frames: u32,
    height: u32,
    width: u32,
) -> i32 {
    let out = &mut *(user as *mut Frames);
    out.calls.push((block_index, frames, height, width));
    let n = (frames * height * width * 3) as usize;
    out.rgb
        .extend_from_slice(std::slice::from_raw_parts(rgb, n));
    out.pixels
        .extend_from_slice(std::slice::from_raw_parts(pixels, n));
    i32::from(out.stop_at == Some(block_index))
}

#[test]
fn frames_callback_hands_out_each_blocks_pixels_in_order() {
    let e = cpu_engine();
    let s = open_session(e, None);
    let mut seen = Frames::default();
    let user = &mut seen as *mut Frames as *mut c_void;
    // The built-in tiny TAEHV (NULL path).
    let st = unsafe { bc_session_set_decoder(s, null(), Some(collect_frames), user) };
    assert_eq!(st, BC_OK, "{}", last_error());
    let (st, latents) = generate(s, 2);
    assert_eq!(st, BC_OK, "{}", last_error());
    // 2 blocks of 3 latent frames of 8x12: TAEHV gives 4*3-3 then 4*3 frames of 64x96.
    assert_eq!(seen.calls, vec![(0, 9, 64, 96), (1, 12, 64, 96)]);
    let want = blockcascade::decode::Decoder::tiny_taehv(0)
        .decode(&latents, 6, 8, 12)
        .unwrap();
    assert_eq!(seen.pixels, want.data);
    assert_eq!(seen.rgb, want.to_rgb8());

    // A non-zero return stops the generation with BC_ERR_CANCELLED.
    let mut stop = Frames {
        stop_at: Some(0),
        ..Default::default()
    };
    let user = &mut stop as *mut Frames as *mut c_void;
    let st = unsafe { bc_session_set_decoder(s, null(), Some(collect_frames), user) };
    assert_eq!(st, BC_OK);
    let (st, _) = generate(s, 3);
    expect_c_err(st, BC_ERR_CANCELLED, "frames callback");
    assert_eq!(stop.calls.len(), 1);

    // Removing the decoder stops the frames; a missing file is an I/O error.
    let st = unsafe { bc_session_set_decoder(s, null(), None, null_mut()) };
    assert_eq!(st, BC_OK);
    let (st, _) = generate(s, 1);
    assert_eq!(st, BC_OK);
    assert_eq!(stop.calls.len(), 1);
    let missing = CString::new("/nonexistent/decoder.safetensors").unwrap();
    let st = unsafe { bc_session_set_decoder(s, missing.as_ptr(), Some(collect_frames), user) };
    expect_c_err(st, BC_ERR_IO, "nonexistent");
    bc_session_close(s);
    bc_engine_close(e);
}

// ---------------------------------------------------------------------------------------------
// Live streams through the C ABI

/// Session options for streams: the defaults with local attention (a stream needs it).
fn stream_session_options(seed: u64, lag: u32) -> bc_session_options {
    bc_session_options {
        seed,
        lag,
        local_attn: 6,
        ..bc_session_options_default()
    }
}

/// What the Rust API gives for `stream_session_options(seed, lag)` with the session's default
/// prompt, switched to `switch` at its block: the latents of blocks `0..blocks`.
fn rust_stream_latents(
    seed: u64,
    lag: u32,
    switch: Option<(usize, PromptEmbeds)>,
    blocks: usize,
) -> Vec<f32> {
    let engine = Engine::open(None).unwrap();
    let opts = GenerateOptions {
        schedule: if lag == 0 {
            Schedule::Sequential
        } else {
            Schedule::Cascade { lag: lag as usize }
        },
        local_attn: Some(6),
        ..Default::default()
    };
    let prompt = PromptEmbeds::builtin(engine.config(), seed);
    let mut gen = Generator::new(engine.model(), opts, NoiseSource::Seeded(seed), &prompt).unwrap();
    if let Some((block, embeds)) = switch {
        gen.switch_prompt(block, &embeds).unwrap();
    }
    gen.generate(blocks).unwrap().0
}

fn empty_block() -> bc_stream_block {
    bc_stream_block {
        struct_size: std::mem::size_of::<bc_stream_block>() as u32,
        block_index: u64::MAX,
        latents: null(),
        frames: 0,
        channels: 0,
        height: 0,
        width: 0,
        rgb: null(),
        pixel_frames: 0,
        pixel_height: 0,
        pixel_width: 0,
    }
}

fn open_stream(s: *mut bc_session, opts: Option<bc_stream_options>) -> *mut bc_stream {
    let mut st = null_mut();
    let p = opts.as_ref().map_or(null(), |o| o as *const _);
    let status = unsafe { bc_stream_open(s, p, &mut st) };
    assert_eq!(status, BC_OK, "{}", last_error());
    assert!(!st.is_null());
    st
}

/// A new engine, a sequential session with `seed` (local attention) and a stream on it.
fn new_stream(
    seed: u64,
    opts: bc_stream_options,
) -> (*mut bc_engine, *mut bc_session, *mut bc_stream) {
    let e = cpu_engine();
    let s = open_session(e, Some(stream_session_options(seed, 0)));
    (e, s, open_stream(s, Some(opts)))
}

/// Takes the next block (waiting) and copies it out: (index, latents, rgb, pixel dims).
fn next_block(st: *mut bc_stream) -> (u64, Vec<f32>, Option<Vec<u8>>, [u32; 3]) {
    let mut b = empty_block();
    let status = unsafe { bc_stream_next(st, -1, &mut b) };
    assert_eq!(status, BC_OK, "{}", last_error());
    assert_eq!((b.frames, b.channels, b.height, b.width), (3, 16, 8, 12));
    let n = (b.frames * b.channels * b.height * b.width) as usize;
    let latents = unsafe { std::slice::from_raw_parts(b.latents, n) }.to_vec();
    let px = [b.pixel_frames, b.pixel_height, b.pixel_width];
    let rgb = (!b.rgb.is_null()).then(|| {
        let n = px.iter().map(|&v| v as usize).product::<usize>() * 3;
        unsafe { std::slice::from_raw_parts(b.rgb, n) }.to_vec()
    });
    (b.block_index, latents, rgb, px)
}

/// The switch line of the live example: `switch: "..." applies from block B`.
fn applies_from(stdout: &str) -> usize {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("switch:"))
        .unwrap_or_else(|| panic!("no switch line:\n{stdout}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The live example's text switch as the Rust API sees it.
fn red_fox() -> PromptEmbeds {
    let engine = Engine::open(None).unwrap();
    blockcascade::TextEncoder::tiny(0)
        .prompt_embeds("a red fox", engine.config())
        .unwrap()
}

#[test]
fn live_c_example_switches_from_a_thread_and_matches_the_rust_api() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_c_example("live", dir.path(), false);
    for (blocks, seed, lag, pixels) in [(5usize, 3u64, 2u32, 0u32), (10, 7, 0, 1)] {
        let out = dir.path().join(format!("live-{seed}.f32"));
        let nums = [blocks, seed as usize, lag as usize, pixels as usize].map(|v| v.to_string());
        let mut args = vec![out.as_os_str()];
        args.extend(nums.iter().map(std::ffi::OsStr::new));
        let stdout = run_example(&exe, &args);
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("block ")).collect();
        assert_eq!(lines.len(), blocks, "{stdout}");
        if pixels == 1 {
            assert!(lines[0].contains("9 pixel frames of 96 x 64"), "{stdout}");
            assert!(lines[1].contains("12 pixel frames of 96 x 64"), "{stdout}");
        }
        assert!(stdout.contains("BC_ERR_CANCELLED"), "{stdout}");
        let at = applies_from(&stdout);
        assert!((1..blocks).contains(&at), "{stdout}");
        let want = rust_stream_latents(seed, lag, Some((at, red_fox())), blocks);
        assert_same(&read_f32(&out), &want, "live example vs Rust API");
    }
}

#[test]
fn live_c_example_is_clean_under_valgrind() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_c_example("live", dir.path(), false);
    let out = dir.path().join("live.f32");
    // One rayon thread: valgrind runs one thread at a time, and idle workers spinning would
    // only slow it down. 5 blocks, lag 2, latents only keep it to about a minute.
    let args = [
        out.as_os_str(),
        "5".as_ref(),
        "3".as_ref(),
        "2".as_ref(),
        "0".as_ref(),
    ];
    let Some(stdout) = memcheck(&exe, &args, &[("RAYON_NUM_THREADS", "1")]) else {
        eprintln!("SKIPPED live_c_example_is_clean_under_valgrind: valgrind is not installed");
        return;
    };
    let want = rust_stream_latents(3, 2, Some((applies_from(&stdout), red_fox())), 5);
    assert_close_portable(
        &read_f32(&out),
        &want,
        "live example (valgrind) vs Rust API",
    );
}

#[test]
fn a_stream_switch_lands_where_bc_session_switch_prompt_would_put_it() {
    let e = cpu_engine();
    let s = open_session(e, Some(stream_session_options(4, 1)));
    let st = open_stream(s, None);
    // The session is busy while the stream is open; so is a second stream.
    expect_c_err(generate(s, 1).0, BC_ERR_INVALID_ARGUMENT, "bc_stream");
    let mut other = null_mut();
    expect_c_err(
        unsafe { bc_stream_open(s, null(), &mut other) },
        BC_ERR_INVALID_ARGUMENT,
        "bc_stream",
    );
    assert!(other.is_null());
    let mut got = Vec::new();
    for i in 0..2 {
        let (index, lat, rgb, px) = next_block(st);
        assert_eq!(index, i);
        assert!(rgb.is_none() && px == [0, 0, 0]);
        got.extend(lat);
    }
    // The switch from another thread (the handle is a plain integer to C).
    let engine = Engine::open(None).unwrap();
    let p = PromptEmbeds::builtin(engine.config(), 99);
    let (h, data) = (st as usize, p.data.clone());
    let rows = p.rows as u32;
    let at = std::thread::spawn(move || {
        let mut at = u64::MAX;
        let status = unsafe {
            bc_stream_switch_prompt(h as *mut bc_stream, data.as_ptr(), rows, 32, &mut at)
        };
        assert_eq!(status, BC_OK, "{}", last_error());
        at
    })
    .join()
    .unwrap();
    assert!(at >= 2);
    for i in 2..at + 2 {
        let (index, lat, _, _) = next_block(st);
        assert_eq!(index, i);
        got.extend(lat);
    }
    bc_stream_close(st);
    // Closed: the session is usable again, and generates the same video with a fixed switch.
    let status = unsafe { bc_session_switch_prompt(s, at as u32, p.data.as_ptr(), rows, 32) };
    assert_eq!(status, BC_OK, "{}", last_error());
    let (status, want) = generate(s, at as u32 + 2);
    assert_eq!(status, BC_OK, "{}", last_error());
    assert_eq!(got, want);
    bc_session_close(s);
    bc_engine_close(e);
}

#[test]
fn stream_pixels_are_the_decode_of_its_latents() {
    let (e, s, st) = new_stream(
        2,
        bc_stream_options {
            want_pixels: 1,
            ..bc_stream_options_default()
        },
    );
    let (mut latents, mut rgb) = (Vec::new(), Vec::new());
    for (i, frames) in [9u32, 12, 12].into_iter().enumerate() {
        let (index, lat, px, dims) = next_block(st);
        assert_eq!(index, i as u64);
        assert_eq!(dims, [frames, 64, 96]);
        latents.extend(lat);
        rgb.extend(px.expect("rgb"));
    }
    bc_stream_close(st);
    let want = blockcascade::decode::Decoder::tiny_taehv(0)
        .decode(&latents, 9, 8, 12)
        .unwrap();
    assert_eq!(rgb, want.to_rgb8());
    bc_session_close(s);
    bc_engine_close(e);
}

/// `want_latents`: off, blocks carry no latents (NULL, shape 0) and the same frames; the first
/// version of `bc_stream_options` (struct_size 24, before `want_latents`) still opens a stream,
/// with latents (the default), whatever its padding holds.
#[test]
fn stream_frames_without_latents_and_the_old_options_size() {
    let blocks = |o: bc_stream_options| {
        let (e, s, st) = new_stream(2, o);
        let mut out = Vec::new();
        for _ in 0..2 {
            let mut b = empty_block();
            let status = unsafe { bc_stream_next(st, -1, &mut b) };
            assert_eq!(status, BC_OK, "{}", last_error());
            let px = [b.pixel_frames, b.pixel_height, b.pixel_width];
            let n = px.iter().map(|&v| v as usize).product::<usize>() * 3;
            assert!(n > 0 && !b.rgb.is_null());
            let rgb = unsafe { std::slice::from_raw_parts(b.rgb, n) }.to_vec();
            let shape = [b.frames, b.channels, b.height, b.width];
            out.push((b.latents.is_null(), shape, rgb));
        }
        bc_stream_close(st);
        bc_session_close(s);
        bc_engine_close(e);
        out
    };
    let with = blocks(bc_stream_options {
        want_pixels: 1,
        ..bc_stream_options_default()
    });
    let without = blocks(bc_stream_options {
        want_pixels: 1,
        want_latents: 0,
        ..bc_stream_options_default()
    });
    for ((wn, wshape, wrgb), (nn, nshape, nrgb)) in with.iter().zip(&without) {
        assert!(!wn && *wshape == [3, 16, 8, 12]);
        assert!(
            *nn && *nshape == [0; 4],
            "latents handed out without want_latents"
        );
        assert!(wrgb == nrgb, "the frames differ without latents");
    }
    // The old size: `reserved` (its padding) holds garbage, `want_latents` is past its end.
    let old = bc_stream_options {
        struct_size: std::mem::offset_of!(bc_stream_options, want_latents) as u32,
        want_pixels: 1,
        reserved: 0xdead_beef,
        want_latents: 7,
        ..bc_stream_options_default()
    };
    assert_eq!(old.struct_size, 24);
    let got = blocks(old);
    assert!(got == with, "the first options version changed the blocks");
}

#[test]
fn a_close_from_another_thread_ends_a_waiting_next_and_timeouts_are_named() {
    // One frame per 1000 s: block 0 comes at once, block 1 not for hours.
    let (e, s, st) = new_stream(
        1,
        bc_stream_options {
            target_fps: 1e-3,
            ..bc_stream_options_default()
        },
    );
    assert_eq!(next_block(st).0, 0);
    let mut b = empty_block();
    expect_c_err(
        unsafe { bc_stream_next(st, 0, &mut b) },
        BC_ERR_TIMEOUT,
        "no block",
    );
    expect_c_err(
        unsafe { bc_stream_next(st, 20, &mut b) },
        BC_ERR_TIMEOUT,
        "no block",
    );
    assert_eq!(b.block_index, u64::MAX, "a timeout writes nothing");
    // The stream goes on after a timeout: a switch is accepted (applies_from may be NULL).
    let p = PromptEmbeds::builtin(Engine::open(None).unwrap().config(), 5);
    let status = unsafe { bc_stream_switch_prompt(st, p.data.as_ptr(), 16, 32, null_mut()) };
    assert_eq!(status, BC_OK, "{}", last_error());
    let h = st as usize;
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        bc_stream_close(h as *mut bc_stream);
    });
    expect_c_err(
        unsafe { bc_stream_next(st, -1, &mut b) },
        BC_ERR_CANCELLED,
        "cancelled",
    );
    closer.join().unwrap();
    // The handle is gone; a second close is ignored; the session is free again.
    expect_c_err(
        unsafe { bc_stream_next(st, 0, &mut b) },
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_stream",
    );
    bc_stream_close(st);
    assert_eq!(generate(s, 1).0, BC_OK, "{}", last_error());
    bc_session_close(s);
    bc_engine_close(e);
}

#[test]
fn stream_handles_and_inputs_are_checked() {
    let e = cpu_engine();
    let mut st = null_mut();
    // Global attention (the session default) cannot stream in bounded memory.
    let global = open_session(e, None);
    expect_c_err(
        unsafe { bc_stream_open(global, null(), &mut st) },
        BC_ERR_INVALID_ARGUMENT,
        "local attention",
    );
    bc_session_close(global);
    let s = open_session(e, Some(stream_session_options(0, 0)));
    expect_c_err(
        unsafe { bc_stream_open(null_mut(), null(), &mut st) },
        BC_ERR_INVALID_ARGUMENT,
        "session handle is NULL",
    );
    expect_c_err(
        unsafe { bc_stream_open(s, null(), null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "out is NULL",
    );
    let bad = [
        (
            bc_stream_options {
                struct_size: 3,
                ..bc_stream_options_default()
            },
            "struct_size",
        ),
        (
            bc_stream_options {
                queue_blocks: 0,
                ..bc_stream_options_default()
            },
            "queue_blocks",
        ),
        (
            bc_stream_options {
                target_fps: f64::NAN,
                ..bc_stream_options_default()
            },
            "target_fps",
        ),
        (
            bc_stream_options {
                want_pixels: 2,
                ..bc_stream_options_default()
            },
            "want_pixels",
        ),
        (
            bc_stream_options {
                want_latents: 2,
                want_pixels: 1,
                ..bc_stream_options_default()
            },
            "want_latents",
        ),
        (
            bc_stream_options {
                want_latents: 0,
                ..bc_stream_options_default()
            },
            "needs want_pixels 1",
        ),
        (
            // Between the two published sizes: ends inside `want_latents`.
            bc_stream_options {
                struct_size: 28,
                ..bc_stream_options_default()
            },
            "24, 32",
        ),
    ];
    for (o, what) in bad {
        expect_c_err(
            unsafe { bc_stream_open(s, &o, &mut st) },
            BC_ERR_INVALID_ARGUMENT,
            what,
        );
        assert!(st.is_null());
    }
    let d = bc_stream_options_default();
    assert_eq!(
        (
            d.struct_size as usize,
            d.queue_blocks,
            d.target_fps,
            d.want_pixels,
            d.want_latents
        ),
        (std::mem::size_of::<bc_stream_options>(), 2, 0.0, 0, 1)
    );
    // A session handle is not a stream handle, and NULL is not either.
    let mut b = empty_block();
    expect_c_err(
        unsafe { bc_stream_next(s as *mut bc_stream, 0, &mut b) },
        BC_ERR_INVALID_ARGUMENT,
        "is a bc_session",
    );
    expect_c_err(
        unsafe { bc_stream_next(null_mut(), 0, &mut b) },
        BC_ERR_INVALID_ARGUMENT,
        "NULL",
    );
    let st = open_stream(s, None);
    expect_c_err(
        unsafe { bc_stream_next(st, 0, null_mut()) },
        BC_ERR_INVALID_ARGUMENT,
        "out is NULL",
    );
    b.struct_size = 4;
    expect_c_err(
        unsafe { bc_stream_next(st, 0, &mut b) },
        BC_ERR_INVALID_ARGUMENT,
        "struct_size",
    );
    let mut b = empty_block();
    expect_c_err(
        unsafe { bc_stream_next(st, -2, &mut b) },
        BC_ERR_INVALID_ARGUMENT,
        "timeout_ms",
    );
    let mut at = 7u64;
    expect_c_err(
        unsafe { bc_stream_switch_prompt(st, null(), 1, 32, &mut at) },
        BC_ERR_INVALID_ARGUMENT,
        "NULL",
    );
    let row = [0.5f32; 33];
    expect_c_err(
        unsafe { bc_stream_switch_prompt(st, row.as_ptr(), 1, 33, &mut at) },
        BC_ERR_INVALID_ARGUMENT,
        "columns",
    );
    expect_c_err(
        unsafe { bc_stream_switch_prompt_text(st, null(), &mut at) },
        BC_ERR_INVALID_ARGUMENT,
        "NULL",
    );
    let bad_utf8 = [0xffu8, 0];
    expect_c_err(
        unsafe { bc_stream_switch_prompt_text(st, bad_utf8.as_ptr() as *const _, &mut at) },
        BC_ERR_INVALID_ARGUMENT,
        "UTF-8",
    );
    assert_eq!(at, 7, "failed switches write nothing");
    let status = unsafe { bc_stream_switch_prompt_text(st, c"a fox".as_ptr(), &mut at) };
    assert_eq!(status, BC_OK, "{}", last_error());
    assert!(at < 1000);
    bc_stream_close(st);
    bc_stream_close(st); // double close: ignored
    bc_stream_close(null_mut());
    expect_c_err(
        unsafe { bc_stream_switch_prompt_text(st, c"a fox".as_ptr(), &mut at) },
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_stream",
    );
    // A session closed while its stream runs: the stream keeps working.
    let st = open_stream(s, None);
    bc_session_close(s);
    bc_engine_close(e);
    assert_eq!(next_block(st).0, 0);
    bc_stream_close(st);
}
