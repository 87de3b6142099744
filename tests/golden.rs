//! The golden case: the PyTorch Self-Forcing result (sequential) and the spec's cascade results.

mod common;
use blockcascade::{AttentionMode, Generator, Schedule};
use common::*;

fn run(schedule: Schedule, attention: AttentionMode, separate: bool) -> Vec<f32> {
    let g = golden();
    let mut opts = g.opts.clone();
    opts.schedule = schedule;
    opts.attention = attention;
    opts.separate_context_pass = separate;
    let gen = Generator::new(g.engine.model(), opts.clone(), g.noise.clone(), &g.prompt).unwrap();
    let (lat, report) = gen.generate(g.frames / opts.block_frames).unwrap();
    let lag = opts.lag();
    assert_eq!(
        report.ticks,
        (g.frames / opts.block_frames - 1) * lag + opts.steps.len()
    );
    lat
}

#[test]
fn sequential_matches_pytorch_self_forcing() {
    let exp = expected("expected.safetensors");
    let lat = run(Schedule::Sequential, AttentionMode::Causal, true);
    let err = rel_l2(&exp, &lat);
    println!("sequential (separate context pass) vs PyTorch: rel L2 {err:.3e}");
    assert!(err < 1e-4, "rel L2 {err}");
}

#[test]
fn merged_context_pass_equals_separate_context_pass() {
    let sep = run(Schedule::Sequential, AttentionMode::Causal, true);
    let merged = run(Schedule::Sequential, AttentionMode::Causal, false);
    let err = rel_l2(&sep, &merged);
    assert!(err < 1e-5, "rel L2 {err}");
    let exp = expected("expected.safetensors");
    assert!(rel_l2(&exp, &merged) < 1e-4);
    let lag4 = run(Schedule::Cascade { lag: 4 }, AttentionMode::Causal, false);
    assert!(rel_l2(&sep, &lag4) < 1e-5);
}

#[test]
fn every_cascade_lag_matches_the_spec() {
    for lag in 1..=3 {
        for (mode, name) in [
            (AttentionMode::Causal, "causal"),
            (AttentionMode::Bidirectional, "bidirectional"),
        ] {
            let exp = expected(&format!("cascade-lag{lag}-{name}.safetensors"));
            let lat = run(Schedule::Cascade { lag }, mode, false);
            let err = rel_l2(&exp, &lat);
            println!("lag {lag} {name}: rel L2 {err:.3e}");
            assert!(err < 1e-4, "lag {lag} {name}: rel L2 {err}");
        }
    }
}

/// Local attention with a sink: 5 blocks so the ring buffer wraps; expected from the f64 spec.
#[test]
fn local_window_with_sink_matches_the_spec_for_every_schedule() {
    use blockcascade::noise::{NoiseSource, RecordedNoise};
    use blockcascade::GenerateOptions;
    let dir = golden_dir().parent().unwrap().join("spec-local-window");
    let g = golden();
    let opts = GenerateOptions {
        height: 4,
        width: 6,
        local_attn: Some(5),
        sink: 1,
        ..Default::default()
    };
    let noise = NoiseSource::Recorded(
        RecordedNoise::load(&dir.join("noise.safetensors"), 15, 16, 4, 6, 4).unwrap(),
    );
    let load = |n: &str| {
        blockcascade::tensorfile::TensorFile::open(&dir.join(n))
            .unwrap()
            .tensor_f32("latents", None)
            .unwrap()
    };
    let mut cases = vec![(
        Schedule::Sequential,
        AttentionMode::Causal,
        "sequential".to_string(),
    )];
    for lag in 1..=3 {
        for (m, n) in [
            (AttentionMode::Causal, "causal"),
            (AttentionMode::Bidirectional, "bidirectional"),
        ] {
            cases.push((
                Schedule::Cascade { lag },
                m,
                format!("cascade-lag{lag}-{n}"),
            ));
        }
    }
    for (schedule, attention, name) in cases {
        let o = GenerateOptions {
            schedule,
            attention,
            ..opts.clone()
        };
        let gen = Generator::new(g.engine.model(), o, noise.clone(), &g.prompt).unwrap();
        let (lat, _) = gen.generate(5).unwrap();
        let err = rel_l2(&load(&format!("{name}.safetensors")), &lat);
        println!("local window {name}: rel L2 {err:.3e}");
        assert!(err < 1e-4, "{name}: rel L2 {err}");
    }
}
