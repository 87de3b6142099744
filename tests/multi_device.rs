//! Multi-device cascades on CPU worker threads: results independent of the device count.

mod common;
use blockcascade::config::KvExchange;
use blockcascade::{AttentionMode, Error, Generator, Schedule};
use common::*;

fn run(devices: usize, lag: usize, mode: AttentionMode, xch: KvExchange) -> Vec<f32> {
    let g = golden();
    let mut o = g.opts.clone();
    o.schedule = if lag == 4 {
        Schedule::Sequential
    } else {
        Schedule::Cascade { lag }
    };
    o.attention = mode;
    o.devices = devices;
    o.kv_exchange = xch;
    let gen = Generator::new(g.engine.model(), o, g.noise.clone(), &g.prompt).unwrap();
    gen.generate(3).unwrap().0
}

#[test]
fn joint_exchange_gives_the_same_latents_on_1_2_3_and_5_devices() {
    for lag in 1..=4 {
        for mode in [AttentionMode::Causal, AttentionMode::Bidirectional] {
            let one = run(1, lag, mode, KvExchange::Joint);
            if lag < 4 {
                let name = if mode == AttentionMode::Causal {
                    "causal"
                } else {
                    "bidirectional"
                };
                assert!(
                    rel_l2(
                        &expected(&format!("cascade-lag{lag}-{name}.safetensors")),
                        &one
                    ) < 1e-4
                );
            }
            for n in [2, 3, 5] {
                let many = run(n, lag, mode, KvExchange::Joint);
                let err = rel_l2(&one, &many);
                assert!(
                    err < 1e-5,
                    "lag {lag} {mode:?} on {n} devices: rel L2 {err}"
                );
            }
        }
    }
}

#[test]
fn lagged_exchange_runs_and_reports_its_drift() {
    for lag in 1..=2 {
        let joint = run(1, lag, AttentionMode::Causal, KvExchange::Joint);
        let lagged = run(3, lag, AttentionMode::Causal, KvExchange::Lagged);
        let err = rel_l2(&joint, &lagged);
        println!("lag {lag}: lagged exchange on 3 devices vs joint: rel L2 {err:.3e}");
        assert!(
            err.is_finite() && err > 0.0,
            "lagged exchange must differ from joint, got {err}"
        );
        // Deterministic.
        assert_eq!(
            lagged,
            run(3, lag, AttentionMode::Causal, KvExchange::Lagged)
        );
        // One device has no peers: lagged equals joint.
        assert!(
            rel_l2(
                &joint,
                &run(1, lag, AttentionMode::Causal, KvExchange::Lagged)
            ) < 1e-6
        );
    }
}

#[test]
fn a_failing_device_returns_an_error_and_leaves_no_hung_threads() {
    let g = golden();
    for (xch, fail) in [
        (KvExchange::Joint, (1, 2)),
        (KvExchange::Joint, (0, 0)),
        (KvExchange::Lagged, (2, 3)),
    ] {
        let mut o = g.opts.clone();
        o.schedule = Schedule::Cascade { lag: 1 };
        o.devices = 3;
        o.kv_exchange = xch;
        o.fail_device_at = Some(fail);
        let gen = Generator::new(g.engine.model(), o, g.noise.clone(), &g.prompt).unwrap();
        let err = gen.generate(3).unwrap_err();
        assert!(
            matches!(&err, Error::Device(m) if m.contains("injected failure")),
            "{err}"
        );
    }
}
