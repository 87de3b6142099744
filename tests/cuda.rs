//! The CUDA backend. Runs everywhere: without a GPU (or without the kernels built), every GPU
//! test prints why it skips and passes; the CLI test checks the clean one-line error instead.
//!
//! On a GPU: every kernel against the CPU reference on random data with the output poisoned
//! (NaN) first, at small and Wan-1.3B shapes (bf16 tolerance ~1e-2 relative, NaN never passes;
//! each prints a `KERNEL <name> <shape> max_err=<e>` line that the GPU bundle collects), the
//! cuBLASLt GEMMs, the golden case through `--backend cuda` (relative L2 < 2e-2), every
//! cascade lag, and graph replay against eager launches.

mod common;
use blockcascade::backend::cpu::attention::{attention as cpu_attention, KvSegment as CpuSeg};
use blockcascade::backend::cpu::gemm::linear;
use blockcascade::backend::cpu::ops as cops;
use blockcascade::backend::cuda::device::{probe, probe_driver, DevPtr, Epilogue, Gpu, OutType};
use blockcascade::backend::cuda::{graph_replays, ops, set_session_options, CudaOptions};
use blockcascade::config::BackendKind;
use blockcascade::kernels::launch::AttentionTile;
use blockcascade::kernels::params::{BcAttnGroup, BcKvSegment};
use blockcascade::rng::Rng;
use blockcascade::{kernels, AttentionMode, Generator, Schedule};
use common::{expected, golden, rel_l2};
use half::bf16;
use std::collections::HashMap;
use std::sync::Mutex;

/// GPU tests share one device and the session-options override: run them one at a time.
static GPU_LOCK: Mutex<()> = Mutex::new(());

/// `BC_CUDA_EMULATE=1` runs these tests on the emulated device (small shapes only): a check of
/// the test code itself before a GPU session, not of the GPU.
fn emulated() -> bool {
    std::env::var("BC_CUDA_EMULATE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `BC_TEST_SMALL=1`: the GPU bundle's compute-sanitizer pass, where every access is checked
/// and Wan shapes would take too long.
fn sanitizer_pass() -> bool {
    std::env::var("BC_TEST_SMALL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Small kernel shapes only: on the emulated device, or in the sanitizer pass.
fn small_only(g: &Gpu) -> bool {
    g.is_emulated() || sanitizer_pass()
}

/// The device for a kernel test: GPU 0 opened for kernels (cuBLASLt not needed), or the
/// emulated device with `BC_CUDA_EMULATE=1`; `None` (after a SKIP line) without a GPU.
fn gpu(test: &str) -> Option<Gpu> {
    if emulated() {
        println!("EMULATED {test}: on the emulated device (small shapes only)");
        return Some(Gpu::open_emulated().unwrap());
    }
    if !kernels::built() {
        println!("SKIP {test}: {}", kernels::NOT_BUILT);
        return None;
    }
    if let Err(e) = probe_driver() {
        println!("SKIP {test}: no GPU ({e})");
        return None;
    }
    match Gpu::open_kernels(0) {
        Ok(g) => Some(g),
        Err(e) => panic!("{test}: a GPU was found but could not be opened: {e}"),
    }
}

/// [`gpu`] for a test that needs GEMMs (cuBLASLt): without cuBLASLt it skips (`SKIP ...: no
/// cuBLASLt`, not counted as a missing GPU), so the kernel tests still judge the kernels.
fn gpu_gemm(test: &str) -> Option<Gpu> {
    let g = gpu(test)?;
    if !g.has_gemm() {
        println!(
            "SKIP {test}: no cuBLASLt ({})",
            probe().err().map_or_else(String::new, |e| e.to_string())
        );
        return None;
    }
    Some(g)
}

fn randn(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * s).collect()
}

fn rb(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn rf(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Random bf16-representable values: (f32 for the reference, bf16 for the kernel).
fn randb(rng: &mut Rng, n: usize, s: f32) -> (Vec<f32>, Vec<bf16>) {
    let b = rb(&randn(rng, n, s));
    (rf(&b), b)
}

fn up<T: Copy>(g: &mut Gpu, v: &[T]) -> DevPtr {
    let p = g.alloc(std::mem::size_of_val(v)).unwrap();
    g.upload(p, v).unwrap();
    g.sync().unwrap();
    p
}

/// A NaN-poisoned device buffer of `bytes`.
fn poisoned(g: &mut Gpu, bytes: usize) -> DevPtr {
    let p = g.alloc(bytes).unwrap();
    g.memset(p, 0xFF, bytes).unwrap();
    p
}

/// Largest error of `got` against `want`, relative to |want| + 1e-2 rms(want); infinite for a
/// non-finite value.
fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
    got.iter()
        .zip(want)
        .map(|(x, w)| {
            if x.is_finite() {
                (x - w).abs() / (w.abs() + 1e-2 * rms)
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

fn down_f(g: &Gpu, p: DevPtr, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    g.download(&mut v, p).unwrap();
    v
}

fn down_b(g: &Gpu, p: DevPtr, n: usize) -> Vec<f32> {
    let mut v = vec![bf16::ZERO; n];
    g.download(&mut v, p).unwrap();
    rf(&v)
}

/// Max of `|got - want| / (|want| + 0.05 rms(want))`; panics on non-finite output or above `tol`.
fn check(name: &str, shape: &str, got: &[f32], want: &[f32], tol: f32) {
    check_floor(name, shape, got, want, tol, 0.05)
}

/// `check` with the error of each element measured against `|want| + floor * rms(want)`.
/// Attention uses floor 1.0: it rounds the probabilities to bf16 before P·V (as
/// FlashAttention-2 does), which adds noise of about 1e-2 of the output's RMS everywhere,
/// also on near-zero outputs (the same rule as tests/kernels_emu.rs).
fn check_floor(name: &str, shape: &str, got: &[f32], want: &[f32], tol: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    let rms =
        (want.iter().map(|v| (v * v) as f64).sum::<f64>() / want.len().max(1) as f64).sqrt() as f32;
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "{name} {shape}: element {i} is {g} (want {w})"
        );
        worst = worst.max((g - w).abs() / (w.abs() + floor * rms).max(1e-30));
    }
    println!("KERNEL {name} {shape} max_err={worst:.3e}");
    assert!(
        worst <= tol,
        "{name} {shape}: max relative error {worst} > {tol}"
    );
}

struct Shape {
    name: &'static str,
    rows: usize,
    dim: usize,
    tpf: usize,
    hp: usize,
    wp: usize,
    heads: usize,
}

const SMALL: Shape = Shape {
    name: "small",
    rows: 96,
    dim: 64,
    tpf: 24,
    hp: 4,
    wp: 6,
    heads: 2,
};
/// One Wan-1.3B block of 3 frames at 60x104 latents: 3 * 30 * 52 = 4680 tokens.
const WAN: Shape = Shape {
    name: "wan1.3b",
    rows: 4680,
    dim: 1536,
    tpf: 1560,
    hp: 30,
    wp: 52,
    heads: 12,
};

fn shape_str(s: &Shape) -> String {
    format!("{}:{}x{}", s.name, s.rows, s.dim)
}

#[test]
fn cli_without_a_gpu_prints_one_error_line() {
    if kernels::built() && probe().is_ok() {
        println!("SKIP cli_without_a_gpu_prints_one_error_line: a GPU is present");
        return;
    }
    if emulated() {
        println!("SKIP cli_without_a_gpu_prints_one_error_line: BC_CUDA_EMULATE makes --backend cuda run");
        return;
    }
    let bin = std::env::var("BC_CLI")
        .ok()
        .or(option_env!("CARGO_BIN_EXE_blockcascade").map(String::from))
        .filter(|p| std::path::Path::new(p).exists());
    let Some(bin) = bin else {
        println!("SKIP cli_without_a_gpu_prints_one_error_line: CLI binary not found (set BC_CLI)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let o = std::process::Command::new(bin)
        .args(["generate", "--backend", "cuda", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    println!("stderr: {stderr}");
    assert!(!o.status.success());
    assert_eq!(o.status.code(), Some(1), "exit code (a panic gives 101)");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one error line: {stderr:?}");
    let l = lines[0];
    assert!(l.starts_with("error:"), "{l}");
    assert!(
        l.contains("no CUDA driver found (libcuda.so)")
            || l.contains("cuBLASLt not found")
            || l.contains("no CUDA device found")
            || l.contains(kernels::NOT_BUILT),
        "{l}"
    );
    assert!(!out.exists(), "no output file on failure");
}

#[test]
fn missing_kernels_or_driver_is_a_clean_error() {
    let model =
        blockcascade::model::Model::new(blockcascade::weights::Weights::builtin("tiny").unwrap());
    let opts = blockcascade::GenerateOptions {
        backend: BackendKind::Cuda,
        ..Default::default()
    };
    let res = blockcascade::backend::cuda_backend(&model, &opts, None).map(|_| ());
    match res {
        Ok(_) => println!("a GPU is present: the backend opened"),
        Err(e) => {
            let msg = e.to_string();
            println!("{msg}");
            if !kernels::built() {
                assert!(msg.contains(kernels::NOT_BUILT), "{msg}");
            } else {
                assert!(matches!(e, blockcascade::Error::Device(_)), "{msg}");
            }
        }
    }
}

#[test]
fn norm_and_elementwise_kernels_match_the_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("norm_and_elementwise_kernels_match_the_cpu") else {
        return;
    };
    let mut rng = Rng::new(7);
    let shapes = if small_only(&g) {
        vec![SMALL]
    } else {
        vec![SMALL, WAN]
    };
    for s in shapes {
        let (n, d, tpf) = (s.rows, s.dim, s.tpf);
        let frames = n.div_ceil(tpf);
        let ss = shape_str(&s);
        let x = randn(&mut rng, n * d, 1.0);
        let e0 = randn(&mut rng, frames * 6 * d, 0.3);
        let modu = randn(&mut rng, 6 * d, 0.3);
        let xd = up(&mut g, &x);
        let e0d = up(&mut g, &e0);
        let md = up(&mut g, &modu);
        // ln_modulate with per-frame shift/scale from e0 (stride 6d) plus modulation biases.
        let out = poisoned(&mut g, n * d * 2);
        ops::ln_modulate(
            &g,
            xd,
            out,
            n,
            d,
            1e-6,
            tpf,
            e0d,
            e0d + 4 * d as u64,
            6 * d,
            md,
            md + 4 * d as u64,
        )
        .unwrap();
        let (mut sh, mut sc) = (vec![0f32; frames * d], vec![0f32; frames * d]);
        for f in 0..frames {
            for t in 0..d {
                sh[f * d + t] = e0[f * 6 * d + t] + modu[t];
                sc[f * d + t] = e0[f * 6 * d + d + t] + modu[d + t];
            }
        }
        let mut want = vec![0f32; n * d];
        cops::ln_modulate(&x, d, 1e-6, tpf, &sh, &sc, &mut want);
        check("ln_modulate", &ss, &down_b(&g, out, n * d), &want, 1e-2);
        // layer_norm_affine.
        let (w, b) = (randn(&mut rng, d, 1.0), randn(&mut rng, d, 0.1));
        let (wd, bd) = (up(&mut g, &w), up(&mut g, &b));
        let out = poisoned(&mut g, n * d * 2);
        ops::layer_norm_affine(&g, xd, out, n, d, 1e-6, wd, bd).unwrap();
        cops::layer_norm_affine(&x, d, 1e-6, &w, &b, &mut want);
        check(
            "layer_norm_affine",
            &ss,
            &down_b(&g, out, n * d),
            &want,
            1e-2,
        );
        // gated_residual with gate = e0[2] + modulation[2].
        let (delta, deltab) = randb(&mut rng, n * d, 1.0);
        let dd = up(&mut g, &deltab);
        let xr = up(&mut g, &x);
        ops::gated_residual(
            &g,
            xr,
            dd,
            n,
            d,
            tpf,
            e0d + 2 * 4 * d as u64,
            6 * d,
            md + 2 * 4 * d as u64,
        )
        .unwrap();
        let mut gate = vec![0f32; frames * d];
        for f in 0..frames {
            for t in 0..d {
                gate[f * d + t] = e0[f * 6 * d + 2 * d + t] + modu[2 * d + t];
            }
        }
        let mut wantx = x.clone();
        cops::gated_residual(&mut wantx, &delta, d, tpf, Some(&gate));
        check("gated_residual", &ss, &down_f(&g, xr, n * d), &wantx, 1e-4);
        // residual_norm: the same gated residual fused with ln_modulate, bit for bit the pair.
        let xf = up(&mut g, &x);
        let (out, out_pair) = (poisoned(&mut g, n * d * 2), poisoned(&mut g, n * d * 2));
        let (sh_d, sc_d) = (e0d, e0d + 4 * d as u64);
        let (shb_d, scb_d) = (md, md + 4 * d as u64);
        let nm = ops::Norm::modulate(sh_d, sc_d, 6 * d, shb_d, scb_d);
        let (gate_d, gate_b) = (e0d + 2 * 4 * d as u64, md + 2 * 4 * d as u64);
        ops::residual_norm(&g, xf, dd, out, n, d, 1e-6, tpf, gate_d, 6 * d, gate_b, &nm).unwrap();
        ops::ln_modulate(
            &g,
            xr,
            out_pair,
            n,
            d,
            1e-6,
            tpf,
            sh_d,
            sc_d,
            6 * d,
            shb_d,
            scb_d,
        )
        .unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let fused_x = down_f(&g, xf, n * d);
        assert!(
            bits(fused_x) == bits(down_f(&g, xr, n * d)),
            "residual_norm {ss}: residual differs from gated_residual"
        );
        let fused_out = down_b(&g, out, n * d);
        assert!(
            bits(fused_out.clone()) == bits(down_b(&g, out_pair, n * d)),
            "residual_norm {ss}: rows differ from gated_residual + ln_modulate"
        );
        cops::ln_modulate(&wantx, d, 1e-6, tpf, &sh, &sc, &mut want);
        check("residual_norm", &ss, &fused_out, &want, 1e-2);
        // GELU (bf16, in place).
        let (a, ab) = randb(&mut rng, n * d, 2.0);
        let ad = up(&mut g, &ab);
        ops::activation(&g, ad, n * d, true, true).unwrap();
        let mut want = a.clone();
        cops::gelu_tanh(&mut want);
        check("gelu_bf16", &ss, &down_b(&g, ad, n * d), &want, 1e-2);
        // SiLU (f32).
        let ad = up(&mut g, &a);
        ops::activation(&g, ad, n * d, false, false).unwrap();
        let mut want = a.clone();
        cops::silu(&mut want);
        check("silu_f32", &ss, &down_f(&g, ad, n * d), &want, 1e-5);
        // qk_norm_rope: RMSNorm + RoPE with frame positions, into cache slots.
        let hd = d / s.heads;
        let (q, qb) = randb(&mut rng, n * 3 * d, 1.0);
        let qd = up(&mut g, &qb);
        let nw = randn(&mut rng, d, 0.1)
            .iter()
            .map(|v| 1.0 + v)
            .collect::<Vec<_>>();
        let nwd = up(&mut g, &nw);
        let first = 9usize;
        let pos: Vec<i32> = (0..frames as i32).map(|f| first as i32 + f).collect();
        let slots: Vec<i32> = (0..frames as i32).rev().collect();
        let (posd, slotd) = (up(&mut g, &pos), up(&mut g, &slots));
        let out = poisoned(&mut g, frames * tpf * d * 2);
        ops::qk_norm_rope(
            &g,
            &ops::QkArgs {
                x: qd + 2 * d as u64, // the k third of a fused qkv row
                x_stride: 3 * d,
                out,
                rows: n,
                heads: s.heads,
                head_dim: hd,
                tpf,
                wp: s.wp,
                norm: nwd,
                frame_pos: posd,
                frame_slot: slotd,
                rope: true,
                eps: 1e-6,
            },
        )
        .unwrap();
        let mut k: Vec<f32> = (0..n)
            .flat_map(|r| q[r * 3 * d + d..r * 3 * d + 2 * d].to_vec())
            .collect();
        cops::rms_norm(&mut k, d, 1e-6, &nw);
        cops::rope_3d(&mut k, s.heads, hd, first, s.hp, s.wp);
        let got = down_b(&g, out, frames * tpf * d);
        let mut got_rows = vec![0f32; n * d];
        for r in 0..n {
            let (f, t) = (r / tpf, r % tpf);
            let src = (slots[f] as usize * tpf + t) * d;
            got_rows[r * d..(r + 1) * d].copy_from_slice(&got[src..src + d]);
        }
        check("qk_norm_rope", &ss, &got_rows, &k, 1e-2);
    }
}

#[test]
fn patch_time_and_flow_kernels_match_the_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("patch_time_and_flow_kernels_match_the_cpu") else {
        return;
    };
    let mut rng = Rng::new(11);
    for (name, frames, h, w) in [("small", 3usize, 8usize, 12usize), ("wan1.3b", 3, 60, 104)] {
        let ss = format!("{name}:{frames}x16x{h}x{w}");
        let n = frames * 16 * h * w;
        let (lat, _) = randb(&mut rng, n, 1.0);
        let latd = up(&mut g, &lat);
        let rows = poisoned(&mut g, n * 2);
        ops::patch(&g, true, latd, rows, frames, 16, h, w).unwrap();
        let mut want = vec![0f32; n];
        cops::patchify(&lat, frames, 16, h, w, &mut want);
        check("patchify", &ss, &down_b(&g, rows, n), &want, 0.0);
        let (hr, hrb) = randb(&mut rng, n, 1.0);
        let hrd = up(&mut g, &hrb);
        let out = poisoned(&mut g, n * 4);
        ops::patch(&g, false, out, hrd, frames, 16, h, w).unwrap();
        cops::unpatchify(&hr, frames, 16, h, w, &mut want);
        check("unpatchify", &ss, &down_f(&g, out, n), &want, 0.0);
        // flow_step: per-frame sigma, renoise all frames but the last.
        let fe = 16 * h * w;
        let (x, v, noise) = (
            randn(&mut rng, n, 1.0),
            randn(&mut rng, n, 1.0),
            randn(&mut rng, n, 1.0),
        );
        let sigma: Vec<f32> = (0..frames).map(|f| 0.9 - 0.2 * f as f32).collect();
        let sn: Vec<f32> = (0..frames)
            .map(|f| {
                if f + 1 == frames {
                    -1.0
                } else {
                    0.5 - 0.1 * f as f32
                }
            })
            .collect();
        let (xd, vd, nd, sd, snd) = (
            up(&mut g, &x),
            up(&mut g, &v),
            up(&mut g, &noise),
            up(&mut g, &sigma),
            up(&mut g, &sn),
        );
        let x0 = poisoned(&mut g, n * 4);
        ops::flow_step(&g, xd, vd, nd, x0, sd, snd, frames, fe).unwrap();
        let mut want = x.clone();
        for f in 0..frames {
            let r = f * fe..(f + 1) * fe;
            let next = (sn[f] >= 0.0).then(|| (sn[f], &noise[r.clone()]));
            cops::flow_step(&mut want[r.clone()], &v[r], sigma[f], next);
        }
        check("flow_step", &ss, &down_f(&g, xd, n), &want, 1e-5);
    }
    // Time embedding, f64 inside.
    let t = [1000.0f32, 937.5, 833.333_3, 625.0, 0.0];
    let td = up(&mut g, &t);
    let out = poisoned(&mut g, t.len() * 256 * 4);
    ops::time_embedding(&g, td, out, t.len(), 256).unwrap();
    let want: Vec<f32> = t
        .iter()
        .flat_map(|&v| cops::sinusoidal(256, v as f64))
        .collect();
    check(
        "time_embedding",
        "5x256",
        &down_f(&g, out, t.len() * 256),
        &want,
        1e-4,
    );
}

#[test]
fn gemms_match_the_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu_gemm("gemms_match_the_cpu") else {
        return;
    };
    let mut rng = Rng::new(13);
    for (name, n, k, o, gelu, f32out) in [
        ("small_bias", 96usize, 64usize, 192usize, false, false),
        ("small_gelu", 96, 64, 128, true, false),
        ("wan_qkv", 4680, 1536, 4608, false, false),
        ("wan_ffn0_gelu", 4680, 1536, 8960, true, false),
        ("wan_ffn2", 4680, 8960, 1536, false, false),
        ("wan_patch_f32", 4680, 64, 1536, false, true),
    ] {
        if sanitizer_pass() && name.starts_with("wan") {
            continue;
        }
        let (x, xb) = randb(&mut rng, n * k, 1.0);
        let (w, wb) = randb(&mut rng, o * k, 1.0 / (k as f32).sqrt());
        let b = randn(&mut rng, o, 0.1);
        let (xd, wd, bd) = (up(&mut g, &xb), up(&mut g, &wb), up(&mut g, &b));
        let ty = if f32out { OutType::F32 } else { OutType::Bf16 };
        let ep = if gelu {
            Epilogue::GeluBias
        } else {
            Epilogue::Bias
        };
        // Reference on a sample of rows (the full Wan shapes are slow on a CPU).
        let rows: Vec<usize> = (0..n).step_by((n / 64).max(1)).collect();
        let xs: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * k..(r + 1) * k].to_vec())
            .collect();
        let mut want = vec![0f32; rows.len() * o];
        linear(&xs, rows.len(), k, &w, Some(&b), &mut want);
        if gelu {
            cops::gelu_tanh(&mut want);
        }
        // Fused cuBLASLt epilogue, then the unfused path (plain GEMM + bias/GELU kernel).
        for fused in [true, false] {
            g.fused_epilogues = fused;
            let out = poisoned(&mut g, n * o * 4);
            ops::gemm(&mut g, xd, wd, bd, out, n, k, o, ty, ep).unwrap();
            let all = if f32out {
                down_f(&g, out, n * o)
            } else {
                down_b(&g, out, n * o)
            };
            let got: Vec<f32> = rows
                .iter()
                .flat_map(|&r| all[r * o..(r + 1) * o].to_vec())
                .collect();
            let suffix = if fused { "" } else { "_unfused" };
            check(
                &format!("gemm_{name}{suffix}"),
                &format!("{n}x{k}x{o}"),
                &got,
                &want,
                2e-2,
            );
        }
        g.fused_epilogues = true;
    }
    // Shapes where cuBLASLt had no fused epilogue (they ran the kernel fallback above too).
    println!(
        "EPILOGUE unfused_gemm_shapes={}",
        blockcascade::backend::cuda::device::unfused_gemm_shapes()
    );
}

/// The attention tiles to check on `g` at `head_dim`: both of [`AttentionTile::ALL`], and the
/// Hopper wgmma prototype and its hd128 variants ([`AttentionTile::WGMMA`]) when `BC_WGMMA_OK=1` (the GPU bundle sets
/// it once every wgmma layout of `wgmma_layouts_match_the_hardware` PASSed) on compute
/// capability 9.0; without [`AttentionTile::WgmmaWs`] under `BC_NO_ATTN_WS=1` and without
/// [`AttentionTile::WgmmaWsDeep`] under `BC_NO_ATTN_WS_DEEP=1` (the GPU bundle sets them when the
/// kernel's smoke run failed or hung: one hang would cost the whole test run).
fn attention_tiles(g: &Gpu) -> Vec<AttentionTile> {
    let mut tiles = AttentionTile::ALL.to_vec();
    if std::env::var("BC_WGMMA_OK").is_ok_and(|v| v == "1")
        && g.compute_capability() == Some((9, 0))
    {
        let no_ws = std::env::var_os("BC_NO_ATTN_WS").is_some();
        let no_deep = std::env::var_os("BC_NO_ATTN_WS_DEEP").is_some();
        tiles.extend(AttentionTile::WGMMA.into_iter().filter(|&t| {
            !(no_ws && t == AttentionTile::WgmmaWs || no_deep && t == AttentionTile::WgmmaWsDeep)
        }));
    }
    tiles
}

/// Every tile of [`attention_tiles`] unsplit, and split-KV with 2 and 3 key splits
/// (`bc_attention_combine` after the kernel); unsplit only under `BC_NO_SPLIT=1` (the GPU bundle
/// sets it when the split-KV smoke run failed or hung).
fn split_tiles(g: &Gpu) -> Vec<(AttentionTile, usize)> {
    let mut v = Vec::new();
    let no_split = std::env::var_os("BC_NO_SPLIT").is_some();
    for t in attention_tiles(g) {
        let splits: &[usize] = if t.supports_split() && !no_split {
            &[1, 2, 3]
        } else {
            &[1]
        };
        v.extend(splits.iter().map(|&s| (t, s)));
    }
    v
}

/// `_splitN` for N > 1 key splits, else nothing (the line names of the unsplit runs).
fn split_name(splits: usize) -> String {
    if splits > 1 {
        format!("_split{splits}")
    } else {
        String::new()
    }
}

/// `ops::attention` with `splits` key splits forced (a NaN-poisoned partial buffer of the
/// launch's size, freed after), the splits used returned.
#[allow(clippy::too_many_arguments)]
fn attention_split(
    g: &mut Gpu,
    (q, out): (DevPtr, DevPtr),
    (heads, hd): (usize, usize),
    (sd, id, gd): (DevPtr, DevPtr, DevPtr),
    groups: usize,
    max_rows: usize,
    tile: AttentionTile,
    splits: usize,
) -> usize {
    if splits == 1 {
        return ops::attention(
            g, q, out, heads, hd, sd, id, gd, groups, max_rows, tile, None,
        )
        .unwrap();
    }
    let bytes = blockcascade::kernels::launch::attention_split_bytes(
        heads, hd, groups, max_rows, tile, splits,
    )
    .unwrap();
    let scratch = poisoned(g, bytes);
    let split = ops::SplitScratch {
        ptr: scratch,
        bytes,
        max_keys: 0,
        force: Some(splits),
    };
    let used = ops::attention(
        g,
        q,
        out,
        heads,
        hd,
        sd,
        id,
        gd,
        groups,
        max_rows,
        tile,
        Some(&split),
    )
    .unwrap();
    g.sync().unwrap();
    g.free(scratch).unwrap();
    used
}

/// Self-attention with several groups (segments from a cache and the window) and
/// cross-attention, at small and Wan-1.3B shapes (4680 queries, up to 32760 keys, 12 x 128);
/// the wgmma prototype too where [`attention_tiles`] says.
#[test]
fn attention_matches_the_cpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("attention_matches_the_cpu") else {
        return;
    };
    let mut rng = Rng::new(17);
    // (name, heads, head_dim, tokens per frame, query frames, cache frames, text tokens)
    for (name, heads, hd, tpf, qf, cf, text) in [
        (
            "small_hd32",
            2usize,
            32usize,
            24usize,
            3usize,
            5usize,
            16usize,
        ),
        ("small_hd64", 2, 64, 40, 3, 4, 16),
        ("small_hd128", 2, 128, 40, 3, 4, 16),
        ("wan1.3b_18f", 12, 128, 1560, 3, 18, 512),
    ] {
        if small_only(&g) && name.starts_with("wan") {
            continue;
        }
        let d = heads * hd;
        let nq = qf * tpf;
        let nc = cf * tpf;
        let (q, qb) = randb(&mut rng, nq * d, 1.0);
        let (kc, kcb) = randb(&mut rng, nc * d, 1.0);
        let (vc, vcb) = randb(&mut rng, nc * d, 1.0);
        let (kw, kwb) = randb(&mut rng, nq * d, 1.0);
        let (vw, vwb) = randb(&mut rng, nq * d, 1.0);
        let (qd, kcd, vcd, kwd, vwd) = (
            up(&mut g, &qb),
            up(&mut g, &kcb),
            up(&mut g, &vcb),
            up(&mut g, &kwb),
            up(&mut g, &vwb),
        );
        let row = (d * 2) as u64;
        // Segments: 0 = cache frames [0, cf-1) (skipping the last), 1 = last cache frame,
        // 2 = the window. Group 0 = first query frame sees 0 + 2; group 1 (the rest) sees
        // 0, 1, 2.
        let segs = [
            BcKvSegment {
                k: kcd as *const _,
                v: vcd as *const _,
                tokens: ((cf - 1) * tpf) as i32,
                _pad: 0,
            },
            BcKvSegment {
                k: (kcd + ((cf - 1) * tpf) as u64 * row) as *const _,
                v: (vcd + ((cf - 1) * tpf) as u64 * row) as *const _,
                tokens: tpf as i32,
                _pad: 0,
            },
            BcKvSegment {
                k: kwd as *const _,
                v: vwd as *const _,
                tokens: nq as i32,
                _pad: 0,
            },
        ];
        let index = [0i32, 2, 0, 1, 2];
        let groups = [
            BcAttnGroup {
                q_begin: 0,
                q_rows: tpf as i32,
                seg_begin: 0,
                seg_count: 2,
            },
            BcAttnGroup {
                q_begin: tpf as i32,
                q_rows: (nq - tpf) as i32,
                seg_begin: 2,
                seg_count: 3,
            },
        ];
        let (sd, id, gd) = (up(&mut g, &segs), up(&mut g, &index), up(&mut g, &groups));
        // Every tile variant of the kernel (the backend picks one per window shape by timing).
        let sample: Vec<usize> = (0..nq).step_by((nq / 48).max(1)).collect();
        // The tiles must agree bit for bit (same key tiles and per-warp work; this also checks
        // that nvcc compiled both template instances to the same arithmetic).
        let same_bits = |first: &mut Option<Vec<u32>>, got: &[f32], what: &str| {
            let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            match first {
                Some(b) => assert!(*b == bits, "{what}: the attention tiles differ"),
                None => *first = Some(bits),
            }
        };
        let mut first = None;
        let mut pp_k128 = HashMap::new();
        for (tile, splits) in split_tiles(&g) {
            let out = poisoned(&mut g, nq * d * 2);
            let used = attention_split(
                &mut g,
                (qd, out),
                (heads, hd),
                (sd, id, gd),
                2,
                nq - tpf,
                tile,
                splits,
            );
            assert_eq!(used, splits, "attention_self_{name}: splits used");
            let got = down_b(&g, out, nq * d);
            if !tile.is_wgmma() && splits == 1 {
                same_bits(&mut first, &got, &format!("attention_self_{name}"));
            }
            ws_twin(
                &mut pp_k128,
                (tile, splits),
                &got,
                &format!("attention_self_{name}{}", split_name(splits)),
            );
            // Reference on sampled rows of each group.
            let mut want_rows = Vec::new();
            let mut got_rows = Vec::new();
            for &r in &sample {
                let lc = if r < tpf { cf - 1 } else { cf };
                let cs = [
                    CpuSeg {
                        k: &kc[..lc * tpf * d],
                        v: &vc[..lc * tpf * d],
                    },
                    CpuSeg { k: &kw, v: &vw },
                ];
                let mut o = vec![0f32; d];
                cpu_attention(&q[r * d..(r + 1) * d], heads, hd, &cs, &mut o);
                want_rows.extend(o);
                got_rows.extend_from_slice(&got[r * d..(r + 1) * d]);
            }
            let keys = nc + nq;
            check_floor(
                &format!(
                    "attention_self_{name}_{}{}",
                    tile.name(),
                    split_name(splits)
                ),
                &format!("q{nq}xk{keys}xh{heads}x{hd}"),
                &got_rows,
                &want_rows,
                2e-2,
                1.0,
            );
        }
        // Cross-attention: every query row against `text` tokens.
        let (kt, ktb) = randb(&mut rng, text * d, 1.0);
        let (vt, vtb) = randb(&mut rng, text * d, 1.0);
        let (ktd, vtd) = (up(&mut g, &ktb), up(&mut g, &vtb));
        let segs = [BcKvSegment {
            k: ktd as *const _,
            v: vtd as *const _,
            tokens: text as i32,
            _pad: 0,
        }];
        let groups = [BcAttnGroup {
            q_begin: 0,
            q_rows: nq as i32,
            seg_begin: 0,
            seg_count: 1,
        }];
        let (sd, id, gd) = (up(&mut g, &segs), up(&mut g, &[0i32]), up(&mut g, &groups));
        let mut first = None;
        let mut pp_k128 = HashMap::new();
        for (tile, splits) in split_tiles(&g) {
            let out = poisoned(&mut g, nq * d * 2);
            let used = attention_split(
                &mut g,
                (qd, out),
                (heads, hd),
                (sd, id, gd),
                1,
                nq,
                tile,
                splits,
            );
            assert_eq!(used, splits, "attention_cross_{name}: splits used");
            let got = down_b(&g, out, nq * d);
            if !tile.is_wgmma() && splits == 1 {
                same_bits(&mut first, &got, &format!("attention_cross_{name}"));
            }
            ws_twin(
                &mut pp_k128,
                (tile, splits),
                &got,
                &format!("attention_cross_{name}{}", split_name(splits)),
            );
            let (mut want_rows, mut got_rows) = (Vec::new(), Vec::new());
            for &r in &sample {
                let mut o = vec![0f32; d];
                cpu_attention(
                    &q[r * d..(r + 1) * d],
                    heads,
                    hd,
                    &[CpuSeg { k: &kt, v: &vt }],
                    &mut o,
                );
                want_rows.extend(o);
                got_rows.extend_from_slice(&got[r * d..(r + 1) * d]);
            }
            check_floor(
                &format!(
                    "attention_cross_{name}_{}{}",
                    tile.name(),
                    split_name(splits)
                ),
                &format!("q{nq}xk{text}xh{heads}x{hd}"),
                &got_rows,
                &want_rows,
                2e-2,
                1.0,
            );
        }
    }
}

/// The warp-specialized attention kernels ([`AttentionTile::WgmmaWs`],
/// [`AttentionTile::WgmmaWsDeep`]) run `pp_k128`'s math, so the emulation gives them `pp_k128`'s
/// bits, split or not: on the GPU, keeps `pp_k128`'s output per split count (`keep`) and prints
/// `ATTN_WS_BITS <what> same|differ (<n> of <m> values)` for the ws one with the same splits
/// (`ATTN_WS_BITS <what> ws_deep ...` for the deep one; not an assertion: nvcc compiles the
/// kernels separately; all are checked against the CPU).
fn ws_twin(
    keep: &mut HashMap<usize, Vec<u32>>,
    (tile, splits): (AttentionTile, usize),
    got: &[f32],
    what: &str,
) {
    let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
    match tile {
        AttentionTile::WgmmaPpK128 => {
            keep.insert(splits, bits);
        }
        AttentionTile::WgmmaWs | AttentionTile::WgmmaWsDeep => {
            if let Some(b) = keep.get(&splits) {
                let n = b.iter().zip(&bits).filter(|(x, y)| x != y).count();
                let verdict = if n == 0 { "same" } else { "differ" };
                let deep = if tile == AttentionTile::WgmmaWsDeep {
                    " ws_deep"
                } else {
                    ""
                };
                println!(
                    "ATTN_WS_BITS {what}{deep} {verdict} ({n} of {} values differ from pp_k128)",
                    bits.len()
                );
            }
        }
        _ => {}
    }
}

/// The tensor-core fragment layouts on the hardware: `bc_test_mma` (one warp: cp.async,
/// ldmatrix.x4 with and without .trans, mma.sync m16n8k16) against a plain matmul. The SIMT
/// emulation implements these layouts from the PTX ISA (tests/kernels_emu.rs checks the
/// emulation with the same kernel); this is the check that the emulation is the hardware.
#[test]
fn mma_fragment_layouts_match_the_hardware() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("mma_fragment_layouts_match_the_hardware") else {
        return;
    };
    let mut rng = Rng::new(77);
    for round in 0..4 {
        let (af, a) = randb(&mut rng, 256, 1.0);
        let (bf, b) = randb(&mut rng, 128, 1.0);
        let c = randn(&mut rng, 128, 1.0);
        let bt: Vec<bf16> = (0..128).map(|i| b[(i % 16) * 8 + i / 16]).collect();
        let (ad, bd, btd, cd) = (
            up(&mut g, &a),
            up(&mut g, &b),
            up(&mut g, &bt),
            up(&mut g, &c),
        );
        let (d1, d2) = (poisoned(&mut g, 512), poisoned(&mut g, 512));
        let p = kernels::emu::TestMmaParams {
            a: ad as *const _,
            b: bd as *const _,
            bt: btd as *const _,
            c: cd as *const f32,
            d1: d1 as *mut f32,
            d2: d2 as *mut f32,
        };
        // SAFETY: every pointer is a device allocation of the size the kernel reads/writes.
        unsafe { g.launch(kernels::Kernel::TestMma, [1, 1, 1], 32, &p) }.unwrap();
        g.sync().unwrap();
        let want: Vec<f32> = (0..128)
            .map(|i| {
                let (r, n) = (i / 8, i % 8);
                c[i] + (0..16).map(|k| af[r * 16 + k] * bf[k * 8 + n]).sum::<f32>()
            })
            .collect();
        let shape = format!("16x16x8 round{round}");
        check(
            "mma_ldmatrix_trans",
            &shape,
            &down_f(&g, d1, 128),
            &want,
            1e-3,
        );
        check("mma_direct_b", &shape, &down_f(&g, d2, 128), &want, 1e-3);
    }
}

/// The Hopper warpgroup-MMA layouts on the hardware (run first by the GPU bundle, before any
/// wgmma kernel relies on them): `bc_wgmma_probe` (a warpgroup computes `c[64][n] = a . b^T`
/// through shared memory) for every shared-memory layout (no swizzle, 128/64/32-byte swizzle),
/// N = 64/128/256, A from shared memory or registers and B K-major or MN-major (the
/// `imm-trans-b = 1` form of P V), then at N = 128 with one commit group per k-step and with two
/// warpgroups, against a plain matmul, one `WGMMA ... PASS|FAIL` line each; then deliberately
/// wrong descriptors (a stride, an MN-major leading offset, the K-major form on an MN-major
/// tile) must not match. The SIMT emulation implements
/// these layouts from the PTX ISA (tests/wgmma_emu.rs); this is the check that the emulation is
/// the hardware. Needs compute capability 9.0 (sm_90a); elsewhere it prints `WGMMA SKIP`.
#[test]
fn wgmma_layouts_match_the_hardware() {
    use blockcascade::kernels::emu::{
        wgmma_probe_params, WgmmaProbeCase, WGMMA_PROBE_LAYOUTS, WGMMA_PROBE_NS,
    };
    use blockcascade::kernels::params::{
        BC_WGMMA_FAULT_LBO, BC_WGMMA_FAULT_NO_TRANS, BC_WGMMA_FAULT_STRIDE,
    };
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("wgmma_layouts_match_the_hardware") else {
        return;
    };
    match g.compute_capability() {
        Some((9, 0)) | None => {}
        Some((major, minor)) => {
            println!("WGMMA SKIP: the device is sm_{major}{minor}, wgmma needs sm_90a");
            return;
        }
    }
    let kd = kernels::params::BC_WGMMA_PROBE_K as usize;
    let mut rng = Rng::new(78);
    // Largest error of any warpgroup's output, relative to |want| + 1e-2 rms(want); infinite
    // for a non-finite value or a failed launch.
    let mut run = |g: &mut Gpu, case: &WgmmaProbeCase| -> f32 {
        let n = case.n;
        let (af, a) = randb(&mut rng, 64 * kd, 1.0);
        let (bf, b) = randb(&mut rng, n * kd, 1.0);
        let (ad, bd) = (up(g, &a), up(g, &b));
        let cd = poisoned(g, case.out_len() * 4);
        let p = wgmma_probe_params(ad as *const _, bd as *const _, cd as *mut f32, case).unwrap();
        // SAFETY: every pointer is a device allocation of the size the kernel reads/writes.
        let launched =
            unsafe { g.launch(kernels::Kernel::WgmmaProbe, [1, 1, 1], case.block(), &p) }
                .and_then(|()| g.sync());
        if let Err(e) = launched {
            println!("WGMMA launch error: {e}");
            return f32::INFINITY;
        }
        let got = down_f(g, cd, case.out_len());
        let want: Vec<f32> = (0..64 * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..kd).map(|k| af[r * kd + k] * bf[c * kd + k]).sum()
            })
            .collect();
        got.chunks(want.len())
            .map(|part| max_rel_err(part, &want))
            .fold(0.0, f32::max)
    };
    let mut cases = Vec::new();
    for b_mn_major in [false, true] {
        for n in WGMMA_PROBE_NS {
            for (swizzle, _) in WGMMA_PROBE_LAYOUTS {
                for a_regs in [false, true] {
                    cases.push(WgmmaProbeCase {
                        a_regs,
                        b_mn_major,
                        ..WgmmaProbeCase::new(n, swizzle)
                    });
                }
            }
        }
    }
    for (swizzle, _) in WGMMA_PROBE_LAYOUTS {
        for (warpgroups, a_regs, b_mn_major) in
            [(1, false, false), (2, true, false), (2, true, true)]
        {
            cases.push(WgmmaProbeCase {
                a_regs,
                pipelined: true,
                warpgroups,
                b_mn_major,
                ..WgmmaProbeCase::new(128, swizzle)
            });
        }
    }
    let mut failed = Vec::new();
    for case in &cases {
        let err = run(&mut g, case);
        let layout = WGMMA_PROBE_LAYOUTS[case.swizzle as usize].1;
        let what = format!(
            "m64n{}k16 swizzle={layout} A={} B={}{}{}",
            case.n,
            if case.a_regs { "registers" } else { "shared" },
            if case.b_mn_major {
                "MN-major"
            } else {
                "K-major"
            },
            if case.pipelined {
                " group-per-kstep"
            } else {
                ""
            },
            if case.warpgroups > 1 {
                " warpgroups=2"
            } else {
                ""
            },
        );
        let ok = err < 1e-3;
        let verdict = if ok { "PASS" } else { "FAIL" };
        println!("WGMMA {what} {verdict} max_err={err:.2e}");
        if !ok {
            failed.push(what);
        }
    }
    // The controls: a stride-dimension byte offset 16 bytes off, an MN-major leading-dimension
    // byte offset 16 bytes off (N = 128: two 128B atoms), and an MN-major tile read by the
    // K-major form must not match.
    for (what, fault, n, b_mn_major) in [
        ("wrong B descriptor", BC_WGMMA_FAULT_STRIDE, 64, false),
        (
            "wrong MN-major leading offset",
            BC_WGMMA_FAULT_LBO,
            128,
            true,
        ),
        ("MN-major B read K-major", BC_WGMMA_FAULT_NO_TRANS, 64, true),
    ] {
        let control = WgmmaProbeCase {
            fault: fault as i32,
            b_mn_major,
            ..WgmmaProbeCase::new(n, 1)
        };
        let err = run(&mut g, &control);
        let ok = err > 1e-2;
        println!(
            "WGMMA control: {what} {} (max_err={err:.2e}, must be large)",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failed.push(format!("the control '{what}' matched"));
        }
    }
    assert!(failed.is_empty(), "wgmma layouts that fail: {failed:?}");
}

/// The TMA / mbarrier probe (`cuda/test/tma_probe.cu`) on a Hopper GPU against the emulation's
/// reading of the PTX ISA: raw boxes of every swizzle x rank 2..5 x 2- and 4-byte elements,
/// hanging over every edge (zero fill), two mbarrier phases per run, byte for byte against the
/// emulated load of the same tensor (`TMA raw ... PASS|FAIL`); then A and B loaded by TMA in
/// each layout and multiplied by wgmma (`TMA wgmma ... PASS|FAIL`: the TMA's swizzle is what
/// the descriptor reads); then two controls that must not match (boxes one row off, 128B tiles
/// loaded unswizzled). The GPU bundle runs it with the wgmma probe and exports `BC_TMA_OK=1`
/// when every line PASSes.
#[test]
fn tma_layouts_match_the_hardware() {
    use blockcascade::kernels::emu::{
        self as kemu, tma_probe_params, tma_probe_wgmma_params, tma_probe_wgmma_spec, TmaProbeCase,
    };
    use blockcascade::kernels::params::BC_TMA_FAULT_COORD;
    use blockcascade::kernels::tma::{TensorMapSpec, TmaSwizzle};
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("tma_layouts_match_the_hardware") else {
        return;
    };
    match g.compute_capability() {
        Some((9, 0)) | None => {}
        Some((major, minor)) => {
            println!("TMA SKIP: the device is sm_{major}{minor}, the probe needs sm_90a");
            return;
        }
    }
    let mut rng = Rng::new(91);
    let mut failed = Vec::new();
    let block = kernels::params::BC_TMA_PROBE_THREADS;
    // Every raw case twice: first with the loads reading a copy of the map in global memory
    // (`map_global`, the parameter's map zeroed; `global-map raw ...` lines), then from the
    // kernel parameter's map as the TMA convolution does. The first H200 run faulted (illegal
    // instruction) at the first load from the parameter's map; the global pass says whether the
    // map's location is the cause. A fault leaves the context unusable, so what follows it fails
    // too: the first FAIL line is the one that counts.
    // BC_TMA_ONLY runs one case alone (a fault leaves the context unusable, so one process per
    // case tells them apart): `raw:SWIZZLE:RANK:ELEM_BYTES` (the parameter's map),
    // `raw-in:...` (the same with both boxes inside the tensor: no negative or overhanging
    // coordinates), `global:...` (the map in global memory), `wgmma:SWIZZLE` (the wgmma-mode
    // tiles); SWIZZLE as printed (None, B32, B64, B128). A raw case takes a fifth field, a
    // comma list of shape changes (`TmaProbeCase::reshaped`: `inside`, `dense`, `fit`, `rows8`), the
    // bisection `scripts/gpu-run.sh` runs when the probe fails.
    let only = std::env::var("BC_TMA_ONLY").ok();
    let only_parts: Vec<String> = only
        .as_deref()
        .map(|o| o.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    // Whether a raw case runs, and with which shape changes (none without BC_TMA_ONLY).
    let raw_selected =
        |global: bool, swizzle: TmaSwizzle, rank: usize, eb: usize| -> Option<Vec<&str>> {
            let Some(kind) = only_parts.first() else {
                return Some(Vec::new());
            };
            let want_global = kind == "global";
            let raw = kind == "raw" || kind == "raw-in" || want_global;
            let hit = raw
                && want_global == global
                && only_parts.get(1).map(String::as_str) == Some(format!("{swizzle:?}").as_str())
                && only_parts.get(2).map(String::as_str) == Some(rank.to_string().as_str())
                && only_parts.get(3).map(String::as_str) == Some(eb.to_string().as_str());
            let mut mods: Vec<&str> = only_parts
                .get(4)
                .map(|m| m.split(',').filter(|x| !x.is_empty()).collect())
                .unwrap_or_default();
            if kind == "raw-in" {
                mods.push("inside");
            }
            hit.then_some(mods)
        };
    for global in [true, false] {
        for swizzle in TmaSwizzle::ALL {
            for rank in 2..=5 {
                for eb in [2usize, 4] {
                    let Some(mods) = raw_selected(global, swizzle, rank, eb) else {
                        continue;
                    };
                    let case = TmaProbeCase::edges(rank, swizzle, eb).reshaped(&mods);
                    let t: Vec<u8> = (0..case.tensor_bytes())
                        .map(|_| (rng.next_u64() % 255) as u8 + 1)
                        .collect();
                    let want = kemu::tma_probe(&t, &case).unwrap();
                    assert_eq!(want, case.expected(&t), "the emulation against its model");
                    let td = up(&mut g, &t);
                    let od = poisoned(&mut g, want.len());
                    let got = g
                        .encode_tensor_map(&case.spec, td)
                        .and_then(|map| {
                            let p = if global {
                                let md = up(&mut g, &map.opaque);
                                let mut p = tma_probe_params(
                                    kernels::params::BcTensorMap { opaque: [0; 16] },
                                    &case,
                                    od as *mut u8,
                                )
                                .unwrap();
                                p.map_global = md as *const kernels::params::BcTensorMap;
                                p
                            } else {
                                tma_probe_params(map, &case, od as *mut u8).unwrap()
                            };
                            // SAFETY: the tensor and the output are device allocations of the sizes the
                            // probe reads and writes (`md`: the 128-byte map, 256-byte aligned).
                            unsafe { g.launch(kernels::Kernel::TmaProbe, [1, 1, 1], block, &p) }
                        })
                        .and_then(|()| g.sync())
                        .map(|()| {
                            let mut v = vec![0u8; want.len()];
                            g.download(&mut v, od).unwrap();
                            v
                        });
                    let what = format!(
                        "{}raw{} swizzle={swizzle:?} rank={rank} elem={eb}B",
                        if global { "global-map " } else { "" },
                        if mods.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", mods.join(","))
                        }
                    );
                    let (ok, detail) = match got {
                        Ok(v) => {
                            let bad = v.iter().zip(&want).filter(|(a, b)| a != b).count();
                            (bad == 0, format!("{bad} of {} bytes differ", want.len()))
                        }
                        Err(e) => (false, format!("error: {e}")),
                    };
                    println!("TMA {what} {} ({detail})", if ok { "PASS" } else { "FAIL" });
                    if !ok {
                        failed.push(what);
                    }
                }
            }
        }
    }
    // wgmma on TMA-written tiles: c = a . b^T, [64][64] bf16 each.
    let mut wgmma_run =
        |g: &mut Gpu, swizzle: TmaSwizzle, map_swizzle: TmaSwizzle, fault: u32| -> f32 {
            let (af, a) = randb(&mut rng, 64 * 64, 1.0);
            let (bf, b) = randb(&mut rng, 64 * 64, 1.0);
            let spec = TensorMapSpec {
                swizzle: map_swizzle,
                ..tma_probe_wgmma_spec(swizzle)
            };
            let (ad, bd) = (up(g, &a), up(g, &b));
            let cd = poisoned(g, 64 * 64 * 4);
            let launched = g.encode_tensor_map(&spec, ad).and_then(|ma| {
                let mb = g.encode_tensor_map(&spec, bd)?;
                let p =
                    tma_probe_wgmma_params(ma, mb, swizzle, fault as i32, cd as *mut f32).unwrap();
                // SAFETY: a, b and c are device allocations of 64 x 64 values.
                unsafe { g.launch(kernels::Kernel::TmaProbe, [1, 1, 1], block, &p) }?;
                g.sync()
            });
            if let Err(e) = launched {
                println!("TMA launch error: {e}");
                return f32::INFINITY;
            }
            let got = down_f(g, cd, 64 * 64);
            let want: Vec<f32> = (0..64 * 64)
                .map(|i| {
                    (0..64)
                        .map(|k| af[i / 64 * 64 + k] * bf[i % 64 * 64 + k])
                        .sum()
                })
                .collect();
            max_rel_err(&got, &want)
        };
    for swizzle in TmaSwizzle::ALL {
        if only.is_some()
            && (only_parts.first().map(String::as_str) != Some("wgmma")
                || only_parts.get(1).map(String::as_str) != Some(format!("{swizzle:?}").as_str()))
        {
            continue;
        }
        let err = wgmma_run(&mut g, swizzle, swizzle, 0);
        let ok = err < 1e-3;
        println!(
            "TMA wgmma m64n64k16 tiles swizzle={swizzle:?} {} max_err={err:.2e}",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failed.push(format!("wgmma {swizzle:?}"));
        }
    }
    for (what, map_swizzle, fault) in [
        ("boxes one row off", TmaSwizzle::B128, BC_TMA_FAULT_COORD),
        ("128B tiles loaded unswizzled", TmaSwizzle::None, 0),
    ] {
        if only.is_some() {
            break;
        }
        let err = wgmma_run(&mut g, TmaSwizzle::B128, map_swizzle, fault);
        let ok = err > 1e-2;
        println!(
            "TMA control: {what} {} (max_err={err:.2e}, must be large)",
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failed.push(format!("the control '{what}' matched"));
        }
    }
    assert!(failed.is_empty(), "TMA layouts that fail: {failed:?}");
}

fn run_golden(schedule: Schedule, mode: AttentionMode, graphs: bool) -> Vec<f32> {
    set_session_options(Some(CudaOptions {
        graphs,
        ..CudaOptions::from_env()
    }));
    let gd = golden();
    let mut opts = gd.opts.clone();
    opts.schedule = schedule;
    opts.attention = mode;
    opts.backend = BackendKind::Cuda;
    let gen = Generator::new(
        gd.engine.model(),
        opts.clone(),
        gd.noise.clone(),
        &gd.prompt,
    )
    .unwrap();
    let res = gen.generate(gd.frames / opts.block_frames);
    set_session_options(None);
    res.unwrap().0
}

#[test]
fn golden_case_on_the_gpu() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(g) = gpu_gemm("golden_case_on_the_gpu") else {
        return;
    };
    drop(g);
    let exp = expected("expected.safetensors");
    let lat = run_golden(Schedule::Sequential, AttentionMode::Causal, true);
    let err = rel_l2(&exp, &lat);
    println!("GOLDEN sequential rel_l2={err:.3e}");
    assert!(err < 2e-2, "sequential: rel L2 {err}");
    for lag in 1..=3 {
        for (mode, name) in [
            (AttentionMode::Causal, "causal"),
            (AttentionMode::Bidirectional, "bidirectional"),
        ] {
            let exp = expected(&format!("cascade-lag{lag}-{name}.safetensors"));
            let lat = run_golden(Schedule::Cascade { lag }, mode, true);
            let err = rel_l2(&exp, &lat);
            println!("GOLDEN lag{lag}-{name} rel_l2={err:.3e}");
            assert!(err < 2e-2, "lag {lag} {name}: rel L2 {err}");
        }
    }
}

#[test]
fn graph_replay_equals_eager_launches() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(g) = gpu_gemm("graph_replay_equals_eager_launches") else {
        return;
    };
    drop(g);
    for schedule in [Schedule::Sequential, Schedule::Cascade { lag: 1 }] {
        let eager = run_golden(schedule, AttentionMode::Causal, false);
        let before = graph_replays();
        let graph = run_golden(schedule, AttentionMode::Causal, true);
        let replays = graph_replays() - before;
        let err = rel_l2(&eager, &graph);
        let (failed, last) = blockcascade::backend::cuda::graph_capture_failures();
        println!(
            "GRAPH {schedule:?} graph_vs_eager_rel_l2={err:.3e} replays={replays} captures_failed={failed}{}",
            last.map_or_else(String::new, |m| format!(" (last: {m})"))
        );
        assert!(
            replays > 0,
            "{schedule:?}: no graph was replayed (capture failed?)"
        );
        assert!(
            err < 1e-6,
            "{schedule:?}: graph replay differs from eager: rel L2 {err}"
        );
    }
}

#[test]
fn two_logical_devices_on_gpu0_equal_one() {
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(g) = gpu_gemm("two_logical_devices_on_gpu0_equal_one") else {
        return;
    };
    drop(g);
    let run = |devices: Vec<usize>, graphs: bool| {
        set_session_options(Some(CudaOptions {
            graphs,
            devices: devices.clone(),
            ..CudaOptions::from_env()
        }));
        let gd = golden();
        let mut opts = gd.opts.clone();
        opts.schedule = Schedule::Cascade { lag: 1 };
        opts.backend = BackendKind::Cuda;
        opts.devices = devices.len();
        let res = Generator::new(
            gd.engine.model(),
            opts.clone(),
            gd.noise.clone(),
            &gd.prompt,
        )
        .and_then(|gen| gen.generate(gd.frames / opts.block_frames));
        set_session_options(None);
        res.unwrap().0
    };
    let one = run(vec![0], false);
    let two = run(vec![0, 0], false);
    let err = rel_l2(&one, &two);
    println!(
        "MULTI --devices 0,0 vs 0: rel_l2={err:.3e} identical={}",
        one == two
    );
    // cuBLASLt may pick another algorithm for the smaller per-device GEMMs: bf16 tolerance.
    assert!(err < 1e-2, "--devices 0,0 vs --devices 0: rel L2 {err}");
    // Graphs per device (one per stretch between two K/V exchanges) replay the eager result.
    let before = graph_replays();
    let two_graphs = run(vec![0, 0], true);
    let replays = graph_replays() - before;
    let eg = rel_l2(&two, &two_graphs);
    println!("MULTI --devices 0,0 graphs vs eager: rel_l2={eg:.3e} replays={replays}");
    assert!(replays > 0, "--devices 0,0: no graph was replayed");
    assert!(eg < 1e-6, "--devices 0,0: graphs vs eager: rel L2 {eg}");
    let exp = expected("cascade-lag1-causal.safetensors");
    let e2 = rel_l2(&exp, &two);
    assert!(e2 < 2e-2, "--devices 0,0 vs expected: rel L2 {e2}");
}

/// A DiT on two logical devices hands its finished blocks to the decoder on the device
/// (`Generator::hand_off_to_decoder`): blocks final on the decoder's logical device are read in
/// place, the others copied device to device first (`--devices 0,0`: a copy within GPU 0's
/// context; with two GPUs also `--devices 0,1` with the decoder on either GPU: a peer copy, or
/// the host path where the GPUs have no peer access, which the run's note says). The RGB8
/// frames equal the host path's (latents downloaded and pushed) bit for bit.
#[test]
fn multi_device_handoff_equals_the_host_path() {
    use blockcascade::backend::cuda::handoff_relays;
    use blockcascade::decode::{BackgroundDecoder, DecodeDevice, Decoder};
    use std::sync::Arc;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(g) = gpu_gemm("multi_device_handoff_equals_the_host_path") else {
        return;
    };
    drop(g);
    let gpus = if emulated() {
        2
    } else {
        probe_driver().map_or(1, |p| p.devices)
    };
    let mut cases = vec![(vec![0, 0], 0)];
    if gpus >= 2 {
        cases.extend([(vec![0, 1], 0), (vec![0, 1], 1)]);
    }
    let decoder = Arc::new(Decoder::tiny_taehv(0));
    let gd = golden();
    for (devices, dec) in cases {
        set_session_options(Some(CudaOptions {
            devices: devices.clone(),
            ..CudaOptions::from_env()
        }));
        let mut opts = gd.opts.clone();
        opts.schedule = Schedule::Cascade { lag: 1 };
        opts.backend = BackendKind::Cuda;
        opts.devices = devices.len();
        let device = DecodeDevice::Cuda {
            ordinal: dec,
            emulate: emulated(),
        };
        let frames = |handoff: bool| {
            let mut gen = Generator::new(
                gd.engine.model(),
                opts.clone(),
                gd.noise.clone(),
                &gd.prompt,
            )
            .unwrap();
            if handoff {
                assert!(gen.hand_off_to_decoder(device, false), "not beside the DiT");
            }
            let mut bg = BackgroundDecoder::spawn_on(
                decoder.clone(),
                device,
                (opts.height, opts.width),
                false,
                Vec::new(),
                |acc: &mut Vec<u8>, out| {
                    acc.extend_from_slice(&out.rgb);
                    Ok(())
                },
            )
            .unwrap();
            let r0 = handoff_relays();
            let mut err = None;
            let report = gen
                .run(gd.frames / opts.block_frames, |b| {
                    bg.push_block(b).map_err(|e| err = Some(e)).is_ok()
                })
                .unwrap();
            assert!(err.is_none(), "{err:?}");
            (
                bg.finish().unwrap(),
                handoff_relays() - r0,
                report.handoff_note,
            )
        };
        let (host, _, _) = frames(false);
        let (dev, relays, note) = frames(true);
        set_session_options(None);
        println!(
            "MULTI handoff --devices {devices:?} decoder on GPU {dec}: relays={relays} \
             note={note:?} identical={}",
            dev == host
        );
        assert!(!host.is_empty());
        assert!(
            dev == host,
            "--devices {devices:?}, decoder on GPU {dec}: the handed-off frames differ"
        );
    }
}

/// The umT5 text encoder on the device (`cuda/t5.cu` kernels, cuBLASLt GEMMs, bf16 weights)
/// against the golden case `umt5-tiny` (upstream's embeddings of 6 prompts): ids equal and
/// relative L2 < 2e-2 for every prompt.
#[test]
fn text_encoder_golden_on_the_gpu() {
    use blockcascade::tensorfile::TensorFile;
    use blockcascade::text::{TextDevice, TextEncoder};
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(g) = gpu_gemm("text_encoder_golden_on_the_gpu") else {
        return;
    };
    drop(g);
    let dir = common::golden_dir()
        .parent()
        .expect("data folder")
        .join("umt5-tiny");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let text_len = case["text_len"].as_u64().unwrap() as usize;
    let enc = TextEncoder::load(&dir.join("text_encoder"), None)
        .unwrap()
        .on_cuda(0, emulated())
        .unwrap();
    assert_eq!(enc.device(), TextDevice::Cuda);
    let exp = TensorFile::open_skipping_ids(&dir.join("expected.safetensors")).unwrap();
    for (i, p) in case["prompts"].as_array().unwrap().iter().enumerate() {
        let e = enc.encode(p["text"].as_str().unwrap(), text_len).unwrap();
        let ids: Vec<i64> = p["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(e.ids, ids, "prompt {i}: ids");
        let want = exp.tensor_f32(&format!("embeds_{i}"), None).unwrap();
        let err = rel_l2(&want, &e.embeds.data);
        println!(
            "TEXT umt5-tiny prompt {i} ({} tokens) rel_l2={err:.3e}",
            ids.len()
        );
        assert!(err < 2e-2, "prompt {i}: rel L2 {err}");
    }
}

/// The umT5 text encoder's kernels (`cuda/t5.cu`) against the CPU reference on random data
/// with poisoned outputs: the RMS norm with its residual add (bf16 and f32 out), the gated
/// GELU, the attention with a relative position bias and no scale; small, and umT5-XXL's
/// widths at 30 and 512 tokens.
#[test]
fn t5_kernels_match_the_cpu() {
    use blockcascade::text::umt5::{
        attention as t5_ref, bucket_table, relative_bucket, MAX_DISTANCE,
    };
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut g) = gpu("t5_kernels_match_the_cpu") else {
        return;
    };
    let mut rng = Rng::new(17);
    // (name, tokens, dim, heads, ffn)
    let mut shapes = vec![("small", 37usize, 64usize, 2usize, 96usize)];
    if !small_only(&g) {
        shapes.push(("umt5-xxl", 30, 4096, 64, 10240));
        shapes.push(("umt5-xxl", 512, 4096, 64, 10240));
    }
    for (name, n, d, heads, f) in shapes {
        let ss = format!("{name}:{n}x{d}");
        // RMS norm after x += delta, bf16 out; then without the add, f32 out.
        let x = randn(&mut rng, n * d, 3.0);
        let delta = randn(&mut rng, n * d, 1.0);
        let w = randn(&mut rng, d, 1.0);
        let (xd, dd, wd) = (up(&mut g, &x), up(&mut g, &delta), up(&mut g, &w));
        let out = poisoned(&mut g, n * d * 2);
        ops::t5_rms_norm(&g, xd, dd, wd, out, false, n, d, 1e-6).unwrap();
        let sum: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        let mut want = sum.clone();
        cops::rms_norm(&mut want, d, 1e-6, &w);
        check("t5_rms_norm", &ss, &down_b(&g, out, n * d), &want, 1e-2);
        check("t5_rms_norm_add", &ss, &down_f(&g, xd, n * d), &sum, 1e-6);
        let outf = poisoned(&mut g, n * d * 4);
        ops::t5_rms_norm(&g, xd, ops::NULL, wd, outf, true, n, d, 1e-6).unwrap();
        check(
            "t5_rms_norm_f32",
            &ss,
            &down_f(&g, outf, n * d),
            &want,
            1e-4,
        );
        // Gated GELU over the two halves of one [n, 2f] GEMM output.
        let gf = randn(&mut rng, n * 2 * f, 2.0);
        let gfd = up(&mut g, &gf);
        let out = poisoned(&mut g, n * f * 2);
        ops::t5_gated_gelu(&g, gfd, gfd + (f * 4) as u64, 2 * f, out, n, f).unwrap();
        let mut gate: Vec<f32> = (0..n * f).map(|i| gf[(i / f) * 2 * f + i % f]).collect();
        cops::gelu_tanh(&mut gate);
        let want: Vec<f32> = (0..n * f)
            .map(|i| gate[i] * gf[(i / f) * 2 * f + f + i % f])
            .collect();
        check("t5_gated_gelu", &ss, &down_b(&g, out, n * f), &want, 1e-2);
        // Attention: q|k|v of one [n, 3d] GEMM output, the layer's [32, heads] bias table.
        let hd = d / heads;
        let qkv = randn(&mut rng, n * 3 * d, 1.0);
        let rel = randn(&mut rng, 32 * heads, 2.0);
        let bucket: Vec<i32> = (0..2 * n - 1)
            .map(|i| relative_bucket(i as i64 - (n as i64 - 1), 32, MAX_DISTANCE) as i32)
            .collect();
        let (qd, reld, bd) = (up(&mut g, &qkv), up(&mut g, &rel), up(&mut g, &bucket));
        let out = poisoned(&mut g, n * d * 2);
        let (kd, vd) = (qd + (d * 4) as u64, qd + (2 * d * 4) as u64);
        let b0 = bd + ((n - 1) * 4) as u64;
        ops::t5_attention(&g, qd, kd, vd, 3 * d, out, reld, b0, n, heads, hd).unwrap();
        let part = |p: usize| -> Vec<f32> {
            (0..n * d)
                .map(|i| qkv[(i / d) * 3 * d + p * d + i % d])
                .collect()
        };
        let table = bucket_table(n, 32, MAX_DISTANCE);
        let want = t5_ref(&part(0), &part(1), &part(2), n, heads, hd, &rel, &table);
        check("t5_attention", &ss, &down_b(&g, out, n * d), &want, 1e-2);
    }
}

/// Both video decoders on the device (`decode::CudaDecoder`: `cuda/conv.cu` and
/// `cuda/decode_ops.cu`) against upstream's golden videos (`data/decode/`), bound 2e-2 relative
/// L2 as on the emulated device (with the upsample convs in the parity form, the default, and
/// dense), and streamed (blocks of 3) equal to the whole decode; the steady frames replayed as
/// CUDA graphs, bit for bit the eager launches.
#[test]
fn decoders_match_the_golden_videos() {
    use blockcascade::decode::{CudaDecoder, Decoder};
    use blockcascade::tensorfile::TensorFile;
    let _l = GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let data = common::golden_dir();
    let data = data.parent().unwrap().join("decode");
    for (name, weights) in [("taehv-tiny", "taehv"), ("wan-vae-tiny", "vae")] {
        let Some(g) = gpu("decoders_match_the_golden_videos") else {
            return;
        };
        let dir = data.join(name);
        let read = |file: &str, t: &str| {
            let f = TensorFile::open(&dir.join(file)).unwrap();
            (f.tensors()[t].shape.clone(), f.tensor_f32(t, None).unwrap())
        };
        let (ls, lat) = read("latents.safetensors", "latents");
        let (_, want) = read("expected.safetensors", "video");
        let (f, h, w) = (ls[0], ls[2], ls[3]);
        let dec = Decoder::load(&dir.join(weights), None).unwrap();
        // On sm_90 once the layout probe passed (BC_WGMMA_OK=1) the Hopper bc_conv_wgmma
        // first; then bc_conv, whose whole decode the eager and streamed checks compare with.
        let wgmma = g.compute_capability() == Some((9, 0))
            && std::env::var("BC_WGMMA_OK").is_ok_and(|v| v == "1");
        let mut dev = CudaDecoder::new(&dec, g).unwrap();
        if wgmma {
            dev.set_conv_wgmma(true).unwrap();
            dev.begin(h, w).unwrap();
            let px = dev.push(&lat, f, true).unwrap().f32.unwrap();
            let err = rel_l2(&want, &px);
            println!("GOLDEN decoder-{name}-conv-wgmma rel_l2={err:.3e}");
            assert!(err < 2e-2, "{name}-conv-wgmma: rel L2 {err}");
            // Its TMA variant once the TMA probe passed too (BC_TMA_OK=1).
            if std::env::var("BC_TMA_OK").is_ok_and(|v| v == "1") {
                dev.set_conv_tma(true).unwrap();
                dev.begin(h, w).unwrap();
                let px = dev.push(&lat, f, true).unwrap().f32.unwrap();
                let err = rel_l2(&want, &px);
                println!("GOLDEN decoder-{name}-conv-tma rel_l2={err:.3e}");
                assert!(err < 2e-2, "{name}-conv-tma: rel L2 {err}");
            }
        }
        dev.set_conv_tma(false).unwrap();
        dev.set_conv_wgmma(false).unwrap();
        // The upsample convs dense (the sub-pixel parity form is the default): the same bound.
        dev.set_conv_parity(false).unwrap();
        dev.begin(h, w).unwrap();
        let px = dev.push(&lat, f, true).unwrap().f32.unwrap();
        let err = rel_l2(&want, &px);
        println!("GOLDEN decoder-{name}-no-parity rel_l2={err:.3e}");
        assert!(err < 2e-2, "{name}-no-parity: rel L2 {err}");
        dev.set_conv_parity(true).unwrap();
        dev.begin(h, w).unwrap();
        let whole = dev.push(&lat, f, true).unwrap().f32.unwrap();
        let err = rel_l2(&want, &whole);
        println!("GOLDEN decoder-{name} rel_l2={err:.3e}");
        assert!(err < 2e-2, "{name}: rel L2 {err}");
        // Both decoders decode in blocks (each layer one launch over all of a block's frames)
        // by default; the frame walk gives the same bits (the same sums per output value).
        if dev.frame_batching() {
            let Some(g) = gpu("decoders_match_the_golden_videos") else {
                return;
            };
            let mut one = CudaDecoder::new(&dec, g).unwrap();
            one.set_conv_wgmma(false).unwrap();
            one.set_conv_parity(true).unwrap();
            one.set_frame_batching(false).unwrap();
            one.begin(h, w).unwrap();
            let px = one.push(&lat, f, true).unwrap().f32.unwrap();
            let same = px
                .iter()
                .zip(&whole)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            println!(
                "GOLDEN decoder-{name}-per-frame rel_l2={:.3e} identical_to_block_walk={same}",
                rel_l2(&want, &px)
            );
            assert!(
                same && px.len() == whole.len(),
                "{name}: frame walk != block walk"
            );
        }
        // The steady frames were graph replays; every launch eager gives the same bits.
        let st = dev.stats();
        println!(
            "GRAPHS decoder-{name} eager_frames={} graph_frames={} failure={:?}",
            st.eager_frames,
            st.graph_frames,
            dev.graph_failure()
        );
        assert!(
            dev.graph_failure().is_none() && st.graph_frames > 0,
            "{name}: {st:?}"
        );
        let Some(g) = gpu("decoders_match_the_golden_videos") else {
            return;
        };
        let mut eager = CudaDecoder::new(&dec, g).unwrap();
        eager.set_graphs(false).unwrap();
        eager.set_conv_wgmma(false).unwrap();
        eager.begin(h, w).unwrap();
        let e = eager.push(&lat, f, true).unwrap().f32.unwrap();
        assert!(
            e == whole,
            "{name}: graph replays differ from eager launches"
        );
        let per = 16 * h * w;
        dev.begin(h, w).unwrap();
        let mut streamed = Vec::new();
        for b in lat.chunks(3 * per) {
            streamed.extend(dev.push(b, b.len() / per, true).unwrap().f32.unwrap());
        }
        assert!(
            streamed == whole,
            "{name}: blocks of 3 differ from the whole decode"
        );
    }
}
