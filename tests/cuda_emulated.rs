//! The whole CUDA backend (buffers, visibility tables, kernel launches, GEMM calls, graph
//! capture and replay) on the emulated device: the kernels run under the SIMT emulation layer
//! and the GEMMs on the CPU with bf16 operands, so the backend's host code is checked in CI
//! without a GPU. Tolerances are those of the GPU tests (bf16 activations).

mod common;
use blockcascade::backend::cuda::device::{host_traffic, HostTraffic};
use blockcascade::backend::cuda::ops::{attention_launches, split_attention_launches};
use blockcascade::backend::cuda::{device_flow_steps, set_session_options, CudaOptions};
use blockcascade::config::BackendKind;
use blockcascade::kernels::launch::AttentionTile;
use blockcascade::{AttentionMode, Generator, Schedule};
use common::*;
use std::sync::Mutex;

/// The backend options are process-global: one test at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn run(schedule: Schedule, mode: AttentionMode, graphs: bool) -> Vec<f32> {
    run_opts(
        schedule,
        mode,
        CudaOptions {
            graphs,
            emulate: true,
            ..CudaOptions::default()
        },
    )
}

#[test]
fn golden_case_through_the_emulated_cuda_backend() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cases = [
        (
            Schedule::Sequential,
            AttentionMode::Causal,
            "expected".to_string(),
        ),
        (
            Schedule::Cascade { lag: 1 },
            AttentionMode::Causal,
            "cascade-lag1-causal".to_string(),
        ),
        (
            Schedule::Cascade { lag: 2 },
            AttentionMode::Bidirectional,
            "cascade-lag2-bidirectional".to_string(),
        ),
    ];
    for (schedule, mode, name) in cases {
        let lat = run(schedule, mode, true);
        let err = rel_l2(&expected(&format!("{name}.safetensors")), &lat);
        println!("emulated CUDA backend, {name}: rel L2 {err:.3e}");
        assert!(err < 2e-2, "{name}: rel L2 {err}");
    }
}

#[test]
fn emulated_graph_replay_equals_eager_launches() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Lag 2: windows of 1, 2 and 3 members, so several graphs are captured and replayed.
    let schedule = Schedule::Cascade { lag: 2 };
    let eager = run(schedule, AttentionMode::Causal, false);
    let graph = run(schedule, AttentionMode::Causal, true);
    assert_eq!(
        eager, graph,
        "{schedule:?}: graph replay differs from eager launches"
    );
}

#[test]
fn cli_runs_the_emulated_cuda_backend_with_and_without_graphs() {
    let dir = tempfile::tempdir().unwrap();
    let d = golden_dir();
    let p = |s: &str| d.join(s).display().to_string();
    let mut outs = Vec::new();
    for extra in [&[][..], &["--no-graphs"][..]] {
        let out = dir.path().join(format!("o{}.safetensors", extra.len()));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_blockcascade"))
            .env("BC_CUDA_EMULATE", "1")
            .args([
                "generate",
                "--backend",
                "cuda",
                "--model",
                &p("model"),
                "--prompt-embeds",
            ])
            .arg(p("prompt_embeds.safetensors"))
            .args([
                "--noise",
                &p("noise.safetensors"),
                "--frames",
                "9",
                "--height",
                "8",
                "--width",
                "12",
            ])
            .args(["--schedule", "cascade", "--lag", "2", "-q"])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let f = blockcascade::tensorfile::TensorFile::open(&out).unwrap();
        outs.push(f.tensor_f32("latents", None).unwrap());
    }
    assert_eq!(outs[0], outs[1], "--no-graphs changed the latents");
    let err = rel_l2(&expected("cascade-lag2-causal.safetensors"), &outs[0]);
    assert!(err < 2e-2, "rel L2 {err}");
}

/// Both tiles of the attention kernel (64 or 128 query rows per block; on a GPU the backend
/// times both per window shape) run the whole golden case, sequential and cascade, within the bf16
/// tolerance, and the session really launches the tile it was given.
#[test]
fn both_attention_tiles_reproduce_the_golden_case() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (schedule, name) in [
        (Schedule::Sequential, "expected"),
        (Schedule::Cascade { lag: 1 }, "cascade-lag1-causal"),
    ] {
        let want = expected(&format!("{name}.safetensors"));
        let mut outs = Vec::new();
        for tile in AttentionTile::ALL {
            let other = AttentionTile::ALL.into_iter().find(|&t| t != tile);
            let (mine0, other0) = (attention_launches(tile), other.map(attention_launches));
            let co = CudaOptions {
                emulate: true,
                attention_tile: Some(tile),
                ..CudaOptions::default()
            };
            let lat = run_opts(schedule, AttentionMode::Causal, co);
            assert!(attention_launches(tile) > mine0, "{tile:?} never launched");
            assert_eq!(
                other.map(attention_launches),
                other0,
                "{tile:?} session launched the other tile"
            );
            let err = rel_l2(&want, &lat);
            println!("TILE {} {name}: rel L2 {err:.3e}", tile.name());
            assert!(err < 2e-2, "{tile:?} {name}: rel L2 {err}");
            outs.push(lat);
        }
        let between = rel_l2(&outs[0], &outs[1]);
        println!("TILE rows64 vs rows128 {name}: rel L2 {between:.3e}");
        assert!(
            outs[0] == outs[1],
            "{name}: the tiles give different latents (rel L2 {between})"
        );
    }
}

/// Split-KV self-attention forced on a session (`CudaOptions::attention_split`; the emulated
/// device's one slot never splits by itself): the golden case, sequential and cascade lag 2
/// (windows of 1 to 3 members: a launch splits only as far as the session's scratch holds its
/// partials), with the `mma.sync` tile, `pp_k128` and the warp-specialized Hopper tile (what
/// `BC_ATTN_WGMMA_VARIANT=ws` selects; the tiny model's head_dim 32 runs their hd64 kernel, so
/// this checks that a ws session splits at all: tests/kernels_emu.rs checks the hd128 kernels),
/// graphs captured and replayed,
/// within the bf16 tolerance; the sessions really launched split attention, and eager launches
/// give the same bits as the graphs.
#[test]
fn forced_split_kv_reproduces_the_golden_case() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (schedule, name) in [
        (Schedule::Sequential, "expected"),
        (Schedule::Cascade { lag: 2 }, "cascade-lag2-causal"),
    ] {
        let want = expected(&format!("{name}.safetensors"));
        for (tile, splits) in [
            (AttentionTile::Rows128, 2usize),
            (AttentionTile::WgmmaPpK128, 3),
            (AttentionTile::WgmmaWs, 2),
        ] {
            let co = |graphs| CudaOptions {
                emulate: true,
                graphs,
                attention_tile: Some(tile),
                attention_split: Some(splits),
                ..CudaOptions::default()
            };
            let before = split_attention_launches();
            let lat = run_opts(schedule, AttentionMode::Causal, co(true));
            assert!(
                split_attention_launches() > before,
                "{name} {tile:?}: no split attention was launched"
            );
            let err = rel_l2(&want, &lat);
            println!("SPLIT {} x{splits} {name}: rel L2 {err:.3e}", tile.name());
            assert!(err < 2e-2, "{tile:?} split {splits} {name}: rel L2 {err}");
            let eager = run_opts(schedule, AttentionMode::Causal, co(false));
            assert!(
                eager == lat,
                "{tile:?} split {splits} {name}: graphs differ from eager"
            );
        }
    }
}

/// The unfused GEMM epilogue (what runs where cuBLASLt has no fused bias / GELU algorithm):
/// plain GEMMs, then the activation kernel adds the bias and applies the GELU. Same result as
/// the fused epilogue up to one more bf16 rounding, and the golden tolerance holds.
#[test]
fn unfused_gemm_epilogues_match_the_fused_ones() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let run = |fuse_bias: bool, fuse_gelu: bool| {
        let co = CudaOptions {
            emulate: true,
            fuse_bias,
            fuse_gelu,
            ..CudaOptions::default()
        };
        run_opts(Schedule::Sequential, AttentionMode::Causal, co)
    };
    let fused = run(true, true);
    let want = expected("expected.safetensors");
    for (fb, fg) in [(false, false), (true, false)] {
        let lat = run(fb, fg);
        let vs_fused = rel_l2(&fused, &lat);
        let vs_expected = rel_l2(&want, &lat);
        println!(
            "fuse bias {fb}, fuse GELU {fg}: rel L2 {vs_fused:.3e} vs fused, {vs_expected:.3e} vs expected"
        );
        assert!(lat.iter().all(|v| v.is_finite()), "non-finite latents");
        assert!(vs_fused < 1e-2, "vs fused epilogue: {vs_fused}");
        assert!(vs_expected < 2e-2, "vs expected: {vs_expected}");
    }
}

/// A bf16-output GEMM whose bias is wider than the GPU's bf16 bias scratch
/// (`BIAS_BF16_ELEMS`) runs plain on the GPU and adds its f32 bias in `bc_activation`:
/// bf16(bf16(acc) + bias), not cuBLASLt's bf16(acc + bf16(bias)). The emulated device follows
/// the same rule, so its bits are those of a plain GEMM plus that kernel.
#[test]
fn a_bias_too_wide_for_the_bf16_scratch_rounds_as_on_the_gpu() {
    use blockcascade::backend::cuda::device::{Epilogue, Gpu, OutType, BIAS_BF16_ELEMS};
    use blockcascade::backend::cuda::ops;
    use half::bf16;
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (rows, inp, out) = (2usize, 16usize, BIAS_BF16_ELEMS + 40);
    let mut rng = blockcascade::rng::Rng::new(7);
    let mut rand = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.normal() * s).collect() };
    let x: Vec<bf16> = rand(rows * inp, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let w: Vec<bf16> = rand(out * inp, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let bias = rand(out, 3.0);
    let mut g = Gpu::open_emulated().unwrap();
    let (px, pw, pb) = (
        g.alloc(x.len() * 2).unwrap(),
        g.alloc(w.len() * 2).unwrap(),
        g.alloc(bias.len() * 4).unwrap(),
    );
    let (plain, biased) = (
        g.alloc(rows * out * 2).unwrap(),
        g.alloc(rows * out * 2).unwrap(),
    );
    g.upload(px, &x).unwrap();
    g.upload(pw, &w).unwrap();
    g.upload(pb, &bias).unwrap();
    let nan = vec![bf16::NAN; rows * out];
    g.upload(plain, &nan).unwrap();
    g.upload(biased, &nan).unwrap();
    let bf = OutType::Bf16;
    ops::gemm(&mut g, px, pw, 0, plain, rows, inp, out, bf, Epilogue::None).unwrap();
    ops::gemm(
        &mut g,
        px,
        pw,
        pb,
        biased,
        rows,
        inp,
        out,
        bf,
        Epilogue::Bias,
    )
    .unwrap();
    let (mut p, mut b) = (vec![bf16::ZERO; rows * out], vec![bf16::ZERO; rows * out]);
    g.download(&mut p, plain).unwrap();
    g.download(&mut b, biased).unwrap();
    let want: Vec<bf16> = p
        .iter()
        .enumerate()
        .map(|(i, v)| bf16::from_f32(v.to_f32() + bias[i % out]))
        .collect();
    let differ = b
        .iter()
        .zip(&want)
        .filter(|(a, e)| a.to_bits() != e.to_bits())
        .count();
    assert!(b.iter().all(|v| v.is_finite()), "non-finite output");
    assert_eq!(
        differ,
        0,
        "{differ} of {} values differ from bf16(bf16(acc) + bias)",
        b.len()
    );
}

/// The latents kept on the device (flow step and renoise by `bc_flow_step`, only finished
/// blocks downloaded) against the host flow step on flows downloaded every tick: the same f32
/// arithmetic, so the same bits, with graphs and in a cascade.
#[test]
fn device_latents_match_the_host_flow_step_bit_for_bit() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for schedule in [Schedule::Sequential, Schedule::Cascade { lag: 1 }] {
        let co = |device_latents: bool| CudaOptions {
            emulate: true,
            device_latents,
            ..CudaOptions::default()
        };
        let t0 = host_traffic();
        let host = run_opts(schedule, AttentionMode::Causal, co(false));
        let (t1, before) = (host_traffic(), device_flow_steps());
        let device = run_opts(schedule, AttentionMode::Causal, co(true));
        let (t2, steps) = (host_traffic(), device_flow_steps() - before);
        let moved = |a: HostTraffic, b: HostTraffic| {
            (
                b.staged_bytes - a.staged_bytes,
                b.download_bytes - a.download_bytes,
                b.downloads - a.downloads,
            )
        };
        let (mh, md) = (moved(t0, t1), moved(t1, t2));
        println!(
            "TRAFFIC {schedule:?}: host step: {} B of per-tick uploads, {} B down in {} downloads; device latents: {} B of per-tick uploads, {} B down in {} downloads; {steps} flow steps on the device",
            mh.0, mh.1, mh.2, md.0, md.1, md.2
        );
        assert!(steps > 0, "{schedule:?}: no flow step ran on the device");
        assert!(
            md.1 < mh.1 && md.2 < mh.2,
            "{schedule:?}: device latents downloaded no less: {md:?} vs {mh:?}"
        );
        assert!(!host.is_empty() && host.iter().all(|v| v.is_finite()));
        assert!(
            bits(&host) == bits(&device),
            "{schedule:?}: device latents differ from the host flow step (rel L2 {:.3e})",
            rel_l2(&host, &device)
        );
    }
}

/// The residual-stream precision: the backend keeps the residual stream in f32. This
/// measures what bf16 storage of it would cost, by rounding it to bf16 after every residual
/// add, on the golden case against the f32 reference; docs/cuda.md quotes the printed numbers.
/// It asserts that the rounding is applied (the latents change) and stays within the bf16
/// tolerance, so the measurement itself cannot silently measure nothing.
#[test]
fn residual_stream_precision_measured() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let want = expected("expected.safetensors");
    let run = |round: bool| {
        let co = CudaOptions {
            emulate: true,
            round_residual_bf16: round,
            ..CudaOptions::default()
        };
        run_opts(Schedule::Sequential, AttentionMode::Causal, co)
    };
    let f32_res = run(false);
    let bf16_res = run(true);
    let (e32, e16) = (rel_l2(&want, &f32_res), rel_l2(&want, &bf16_res));
    println!(
        "RESIDUAL f32 rel_l2={e32:.3e} bf16 rel_l2={e16:.3e} (golden case vs the f32 reference)"
    );
    assert_ne!(f32_res, bf16_res, "rounding the residual changed nothing");
    assert!(e16 < 2e-2, "bf16 residual: rel L2 {e16}");
}

/// Sizes too large for any GPU (a latent size or a run length whose buffers overflow 64-bit
/// byte counts, or simply exceed the device) are one out-of-memory error line and a non-zero
/// exit from the CUDA backend, not a panic or an overflowed allocation.
#[test]
fn cuda_sizes_beyond_any_device_are_a_clean_out_of_memory_error() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--height", "1099511627776", "--width", "2"][..],
        &["--frames", "3000000000"][..],
        &[
            "--height",
            "4611686018427387904",
            "--width",
            "4611686018427387904",
        ][..],
    ] {
        let out = dir.path().join("o.safetensors");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_blockcascade"))
            .env("BC_CUDA_EMULATE", "1")
            .args(["generate", "--backend", "cuda", "-q"])
            .args(args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: succeeded");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("out of memory") || err.contains("invalid"),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?}: output written");
    }
}

/// Prompt switches mid-run on the emulated device: the new prompts' cross-attention K/V are
/// computed on the device when they enter a prompt slot (text MLP, K/V GEMMs into the slot,
/// K's RMSNorm), and the latents stay within the bf16 tolerance of the CPU backend, for a
/// cascade (no recache; members of two prompts in one window) and the sequential schedule
/// with `--recache window`. Each case also runs with the K/V computed on the host
/// (`host_prompt_context`): the two differ (the device path ran) and both are close to the
/// CPU. The switched-to prompts have fewer rows than text_len.
#[test]
fn prompt_switches_on_the_emulated_device_match_the_cpu() {
    use blockcascade::prompt::{PromptEmbeds, PromptSwitch};
    use blockcascade::Recache;
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let g = golden();
    let cfg = g.engine.config();
    let short = |seed: u64, rows: usize| {
        let p = PromptEmbeds::builtin(cfg, seed);
        PromptEmbeds {
            data: p.data[..rows * cfg.text_dim].to_vec(),
            rows,
        }
    };
    let switches = [
        PromptSwitch {
            block: 1,
            embeds: short(1, 9),
        },
        PromptSwitch {
            block: 2,
            embeds: short(2, 5),
        },
    ];
    let blocks = g.frames / g.opts.block_frames;
    for (schedule, recache) in [
        (Schedule::Cascade { lag: 1 }, Recache::None),
        (Schedule::Sequential, Recache::Window),
    ] {
        let run = |backend: BackendKind, host: bool| {
            set_session_options(Some(CudaOptions {
                emulate: true,
                host_prompt_context: host,
                ..CudaOptions::default()
            }));
            let mut o = g.opts.clone();
            o.schedule = schedule;
            o.recache = recache;
            o.backend = backend;
            let res = Generator::new(g.engine.model(), o, g.noise.clone(), &g.prompt).and_then(
                |mut gen| {
                    gen.set_prompt_schedule(&switches)?;
                    gen.generate(blocks)
                },
            );
            set_session_options(None);
            res.unwrap()
        };
        let (cpu, _) = run(BackendKind::Cpu, false);
        let (dev, report) = run(BackendKind::Cuda, false);
        let (host, _) = run(BackendKind::Cuda, true);
        if recache == Recache::Window {
            assert!(report.recache_passes > 0, "no recache happened");
        }
        let (e_dev, e_host, dev_host) =
            (rel_l2(&cpu, &dev), rel_l2(&cpu, &host), rel_l2(&host, &dev));
        println!(
            "{schedule:?}, recache {recache:?}: device prompt K/V rel L2 {e_dev:.3e} vs CPU, host prompt K/V {e_host:.3e} vs CPU, device vs host {dev_host:.3e}"
        );
        assert!(e_dev < 2e-2, "device prompt K/V: rel L2 {e_dev}");
        assert!(e_host < 2e-2, "host prompt K/V: rel L2 {e_host}");
        assert!(
            dev_host > 0.0,
            "device and host prompt K/V gave identical latents"
        );
    }
}

/// The golden case with the prompt K/V computed on the device (the default) and on the host
/// (`host_prompt_context`, the f32 CPU values rounded to bf16), both against the f32
/// reference; docs/cuda.md quotes the printed numbers.
#[test]
fn golden_case_with_device_and_host_prompt_kv() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let want = expected("expected.safetensors");
    let run = |host: bool| {
        let co = CudaOptions {
            emulate: true,
            host_prompt_context: host,
            ..CudaOptions::default()
        };
        run_opts(Schedule::Sequential, AttentionMode::Causal, co)
    };
    let (dev, host) = (rel_l2(&want, &run(false)), rel_l2(&want, &run(true)));
    println!("PROMPT_KV device rel_l2={dev:.3e} host rel_l2={host:.3e} (golden case vs the f32 reference)");
    assert!(dev < 2e-2, "device prompt K/V: rel L2 {dev}");
    assert!(host < 2e-2, "host prompt K/V: rel L2 {host}");
}
