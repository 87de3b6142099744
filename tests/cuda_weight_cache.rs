//! The CUDA backend's process-wide weight cache, on the emulated device: a model's device
//! weights survive from one run to the next (uploaded once per model and device), per-run
//! buffers and graphs do not, and dropping the model drops its cached weights.

mod common;
use blockcascade::backend::cuda::{
    cached_weight_sets, set_session_options, weight_uploads, CudaOptions,
};
use blockcascade::config::BackendKind;
use blockcascade::config::KvExchange;
use blockcascade::{AttentionMode, GenerateOptions, Generator, Schedule};
use common::*;
use std::sync::Mutex;

/// The backend options and the cache counters are process-global: one test at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn emulated() {
    set_session_options(Some(CudaOptions {
        emulate: true,
        ..CudaOptions::from_env()
    }));
}

fn run(g: &Golden, o: &GenerateOptions) -> Vec<f32> {
    Generator::new(g.engine.model(), o.clone(), g.noise.clone(), &g.prompt)
        .and_then(|gen| gen.generate(g.frames / o.block_frames))
        .unwrap()
        .0
}

fn cuda_opts(g: &Golden) -> GenerateOptions {
    let mut o = g.opts.clone();
    o.schedule = Schedule::Sequential;
    o.attention = AttentionMode::Causal;
    o.backend = BackendKind::Cuda;
    o
}

#[test]
fn weights_are_uploaded_once_per_model_and_evicted_with_it() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    emulated();
    let g = golden();
    let o = cuda_opts(&g);
    let (up0, cached0) = (weight_uploads(), cached_weight_sets());

    let first = run(&g, &o);
    assert_eq!(weight_uploads(), up0 + 1, "first run uploads the weights");
    assert_eq!(cached_weight_sets(), cached0 + 1, "kept after the run");
    let second = run(&g, &o);
    assert_eq!(weight_uploads(), up0 + 1, "second run reuses them");
    assert_eq!(cached_weight_sets(), cached0 + 1);
    assert!(
        first == second,
        "runs on resident weights must be identical"
    );
    let err = rel_l2(&expected("expected.safetensors"), &second);
    println!("two runs, one upload: rel L2 {err:.3e} vs expected");
    assert!(err < 2e-2, "rel L2 {err}");

    // Another engine is another model: its own weights.
    let g2 = golden();
    assert_ne!(g.engine.model().id(), g2.engine.model().id());
    let other = run(&g2, &o);
    assert_eq!(weight_uploads(), up0 + 2, "a second model uploads its own");
    assert_eq!(cached_weight_sets(), cached0 + 2);
    assert!(other == first, "same weights, same latents");

    drop(g2);
    assert_eq!(
        cached_weight_sets(),
        cached0 + 1,
        "dropping an engine evicts"
    );
    drop(g);
    assert_eq!(cached_weight_sets(), cached0);
    set_session_options(None);
}

#[test]
fn two_logical_devices_on_one_ordinal_get_their_own_weights() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    emulated();
    let g = golden();
    let mut o = cuda_opts(&g);
    o.schedule = Schedule::Cascade { lag: 1 };
    o.devices = 2;
    o.device_ids = vec![0, 0];
    let (up0, cached0) = (weight_uploads(), cached_weight_sets());

    let joint = run(&g, &o);
    // Both logical devices on ordinal 0: the second cannot share the first's cache entry.
    assert_eq!(weight_uploads(), up0 + 2);
    assert_eq!(
        cached_weight_sets(),
        cached0 + 1,
        "one entry per (model, ordinal)"
    );
    o.kv_exchange = KvExchange::Lagged;
    let lagged = run(&g, &o);
    assert_eq!(weight_uploads(), up0 + 3, "one reused, one fresh");
    o.kv_exchange = KvExchange::Joint;
    let again = run(&g, &o);
    assert_eq!(weight_uploads(), up0 + 4);
    assert!(
        joint == again,
        "joint exchange on resident weights must be identical"
    );
    let err = rel_l2(&expected("cascade-lag1-causal.safetensors"), &joint);
    let lag_err = rel_l2(&joint, &lagged);
    println!("devices 0,0: rel L2 {err:.3e} vs expected, lagged vs joint {lag_err:.3e}");
    assert!(err < 2e-2, "rel L2 {err}");
    assert!(
        lag_err.is_finite() && lag_err < 0.1,
        "lagged vs joint {lag_err}"
    );

    drop(g);
    assert_eq!(cached_weight_sets(), cached0);
    set_session_options(None);
}
