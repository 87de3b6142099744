//! Build script: compiles the CUDA kernels.
//!
//! 1. Always: every `cuda/*.cu` and `cuda/test/*.cu` (plus the emulation runtime and the
//!    emulation-only test kernels of `cuda/emu/`) is compiled as host C++17 against the SIMT
//!    emulation layer `cuda/emu/` into the static library `bc_emu`, linked into the crate
//!    (`blockcascade::kernels::emu`).
//! 2. When nvcc is found (`NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, then the
//!    project's own `.cuda-toolchain/nvidia/cu13/bin` from `scripts/install-cuda-toolchain.sh`):
//!    all of `cuda/*.cu` and `cuda/test/*.cu` are compiled as one translation unit into one
//!    fatbin (sm_80 and sm_90a cubins + compute_80 PTX) with `-Xptxas -v`; the build FAILS on
//!    any register spill. The fatbin and a per-kernel resource report are written to OUT_DIR
//!    and embedded, and the cfg `bc_fatbin` is set. Without nvcc the crate still builds (CPU only) and the report says so.
//!    `BC_SKIP_NVCC=1` forces the CPU-only path; `BC_NVCC_FLAGS` adds nvcc flags
//!    (whitespace-separated; note `__launch_bounds__` overrides `-maxrregcount`).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const NOT_BUILT: &str = "kernels were not built: run scripts/install-cuda-toolchain.sh";
const ARCHS: &[&str] = &[
    "arch=compute_80,code=sm_80",
    "arch=compute_90a,code=sm_90a",
    "arch=compute_80,code=compute_80",
];

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rustc-check-cfg=cfg(bc_fatbin)");
    avx512_cfg();
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "BC_SKIP_NVCC",
        "BC_NVCC_FLAGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let cuda = root.join("cuda");
    // The library's kernels, then the test kernels that the fatbin carries too (cuda/test/).
    let mut kernels = list(&cuda, "cu");
    kernels.extend(list(&cuda.join("test"), "cu"));
    for dir in [
        cuda.clone(),
        cuda.join("include"),
        cuda.join("emu"),
        cuda.join("test"),
    ] {
        println!("cargo:rerun-if-changed={}", dir.display());
        for f in list(&dir, "") {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }

    build_emulation(&cuda, &kernels, &out);

    let report_path = out.join("kernels_report.txt");
    let fatbin_path = out.join("blockcascade.fatbin");
    let nvcc = if env::var_os("BC_SKIP_NVCC").is_some_and(|v| v != "0") {
        None
    } else {
        find_nvcc(&root)
    };
    match nvcc {
        None => {
            println!("cargo:warning={NOT_BUILT} (CPU-only build; the emulated kernels are built)");
            fs::write(&report_path, format!("{NOT_BUILT}\n")).unwrap();
        }
        Some(nvcc) => {
            let report = build_fatbin(&nvcc, &cuda, &kernels, &out, &fatbin_path);
            fs::write(&report_path, report).unwrap();
            println!("cargo:rustc-cfg=bc_fatbin");
        }
    }
}

/// Files of `dir` (not recursive) ending in `.ext` (any file for ""), sorted.
fn list(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file() && (ext.is_empty() || p.extension().is_some_and(|e| e == ext)));
    v.sort();
    v
}

/// Host C++ build of every kernel against the SIMT emulation layer.
fn build_emulation(cuda: &Path, kernels: &[PathBuf], out: &Path) {
    let wrap = out.join("emu");
    fs::create_dir_all(&wrap).unwrap();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("BC_EMU", "1")
        .include(cuda.join("include"))
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-comment")
        // Params structs holding a 64-byte aligned tensor map (BcTensorMap) are passed by value:
        // g++ notes that this ABI changed in GCC 4.6, which concerns no one here.
        .flag_if_supported("-Wno-psabi")
        .warnings(true);
    let mut sources: Vec<PathBuf> = kernels.to_vec();
    sources.push(cuda.join("emu").join("test_kernels.cu"));
    for src in &sources {
        // g++ does not know the .cu extension: compile through a one-line .cpp wrapper.
        let stem = src.file_stem().unwrap().to_string_lossy();
        let w = wrap.join(format!("{stem}.cpp"));
        write_if_changed(&w, &format!("#include \"{}\"\n", src.display()));
        build.file(w);
    }
    // BC_EMU_UCONTEXT=1: fibers switch through ucontext, the fallback of hosts other than
    // x86-64 (to build and test it on one).
    println!("cargo:rerun-if-env-changed=BC_EMU_UCONTEXT");
    if std::env::var("BC_EMU_UCONTEXT").is_ok_and(|v| v == "1") {
        build.define("BC_EMU_UCONTEXT", "1");
    }
    build.file(cuda.join("emu").join("emu.cpp"));
    build.file(cuda.join("emu").join("tma.cpp"));
    build.compile("bc_emu");
}

fn write_if_changed(path: &Path, content: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(content) {
        fs::write(path, content).unwrap();
    }
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) =
            env::var_os(var).and_then(|h| exe(PathBuf::from(h).join("bin").join("nvcc")))
        {
            return Some(p);
        }
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path).find_map(|d| exe(d.join("nvcc"))) {
            return Some(p);
        }
    }
    exe(root.join(".cuda-toolchain/nvidia/cu13/bin/nvcc"))
}

/// Resource usage of one (function, arch) pair from `ptxas -v`.
#[derive(Default, Clone)]
struct Usage {
    name: String,
    arch: String,
    entry: bool,
    regs: u32,
    smem: u32,
    stack: u32,
    spill_st: u32,
    spill_ld: u32,
}

fn num_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

fn quoted(line: &str, after: &str) -> Option<String> {
    let rest = &line[line.find(after)? + after.len()..];
    let rest = &rest[rest.find('\'')? + 1..];
    Some(rest[..rest.find('\'')?].to_string())
}

/// Parses `ptxas -v` output into per-function usage.
fn parse_ptxas(log: &str) -> Vec<Usage> {
    let mut all: Vec<Usage> = Vec::new();
    let mut arch = String::new();
    let mut cur: Option<usize> = None;
    for line in log.lines() {
        if line.contains("Compiling entry function") {
            let name = quoted(line, "Compiling entry function").unwrap_or_default();
            arch = quoted(line, " for ").unwrap_or_default();
            all.push(Usage {
                name,
                arch: arch.clone(),
                entry: true,
                ..Default::default()
            });
            cur = Some(all.len() - 1);
        } else if let Some(i) = line.find("Function properties for ") {
            let name = line[i + "Function properties for ".len()..]
                .trim()
                .to_string();
            match all.iter().rposition(|u| u.name == name && u.arch == arch) {
                Some(j) => cur = Some(j),
                None => {
                    all.push(Usage {
                        name,
                        arch: arch.clone(),
                        ..Default::default()
                    });
                    cur = Some(all.len() - 1);
                }
            }
        } else if line.contains("bytes stack frame") {
            if let Some(u) = cur.map(|j| &mut all[j]) {
                u.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                u.spill_st = num_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_ld = num_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used") && line.contains("registers") {
            // Belongs to the last entry function compiled.
            if let Some(u) = all.iter_mut().rev().find(|u| u.entry) {
                u.regs = num_before(line, "registers").unwrap_or(0);
                u.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    all
}

fn build_fatbin(
    nvcc: &Path,
    cuda: &Path,
    kernels: &[PathBuf],
    out: &Path,
    fatbin: &Path,
) -> String {
    // One translation unit: one module with every kernel.
    let unity = out.join("blockcascade_kernels.cu");
    let mut src =
        String::from("// Generated by build.rs: every cuda/*.cu in one translation unit.\n");
    for k in kernels {
        writeln!(src, "#include \"{}\"", k.display()).unwrap();
    }
    write_if_changed(&unity, &src);
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin").args([
        "-std=c++17",
        "-O3",
        "-lineinfo",
        "-Xptxas",
        "-v",
        "--threads",
        "0",
    ]);
    for a in ARCHS {
        cmd.arg("-gencode").arg(a);
    }
    if let Ok(extra) = env::var("BC_NVCC_FLAGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.arg("-I")
        .arg(cuda.join("include"))
        .arg("-o")
        .arg(fatbin)
        .arg(&unity);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    fs::write(out.join("ptxas.log"), &log).unwrap();
    if !output.status.success() {
        panic!("nvcc failed ({}):\n{log}", nvcc.display());
    }
    let usage = parse_ptxas(&log);
    let spills: Vec<&Usage> = usage
        .iter()
        .filter(|u| u.spill_st + u.spill_ld > 0)
        .collect();
    if !spills.is_empty() {
        let mut msg = String::from("register spills in CUDA kernels (the build refuses spills):\n");
        for u in spills {
            writeln!(
                msg,
                "  {} ({}): {} bytes spill stores, {} bytes spill loads, {} registers",
                u.name, u.arch, u.spill_st, u.spill_ld, u.regs
            )
            .unwrap();
        }
        panic!("{msg}\nfull ptxas output:\n{log}");
    }
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().rev().nth(1).map(str::to_string))
        .unwrap_or_default();
    let mut r = String::new();
    writeln!(
        r,
        "CUDA kernels: {} ({} bytes fatbin; {})",
        fatbin.display(),
        fs::metadata(fatbin).map(|m| m.len()).unwrap_or(0),
        version.trim()
    )
    .unwrap();
    writeln!(r, "targets: {}", ARCHS.join(" ")).unwrap();
    writeln!(
        r,
        "{:<24} {:<8} {:>5} {:>10} {:>9} {:>12}",
        "kernel", "arch", "regs", "smem(B)", "stack(B)", "spill st/ld"
    )
    .unwrap();
    let mut entries: Vec<&Usage> = usage.iter().filter(|u| u.entry).collect();
    entries.sort_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));
    for u in entries {
        writeln!(
            r,
            "{:<24} {:<8} {:>5} {:>10} {:>9} {:>12}",
            u.name,
            u.arch,
            u.regs,
            u.smem,
            u.stack,
            format!("{}/{}", u.spill_st, u.spill_ld)
        )
        .unwrap();
    }
    r
}

/// Sets the cfg `bc_avx512` when the compiler has the AVX-512 intrinsics (stable from Rust
/// 1.89): the CPU backend's AVX-512 kernels (`src/backend/cpu/simd.rs`) are built only then;
/// older compilers build the portable path alone.
fn avx512_cfg() {
    println!("cargo:rustc-check-cfg=cfg(bc_avx512)");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let v = String::from_utf8_lossy(&o.stdout).to_string();
            let ver = v.split_whitespace().nth(1)?.to_string();
            let mut parts = ver.split('.');
            let major: u32 = parts.next()?.parse().ok()?;
            let minor: u32 = parts.next()?.parse().ok()?;
            Some(if major > 1 { u32::MAX } else { minor })
        })
        .unwrap_or(0);
    if minor >= 89 {
        println!("cargo:rustc-cfg=bc_avx512");
    }
}
