//! Multi-device cascades on the CUDA backend (joint and lagged K/V exchange), on emulated devices: every
//! logical device is its own emulated device (host memory, kernels under the SIMT emulation,
//! CPU GEMMs), the per-layer K/V exchange is a copy between them, and the latents must equal
//! the one-device emulated CUDA result (the arithmetic per member is the same); lagged exchange
//! must follow the CPU backend's lagged exchange.

mod common;
use blockcascade::backend::cuda::device::host_traffic;
use blockcascade::backend::cuda::device::Gpu;
use blockcascade::backend::cuda::emu_device::{set_stream_order, StreamOrder};
use blockcascade::backend::cuda::{
    device_flow_steps, double_kv_devices, graph_replays, latent_moves, peer_copy_bytes,
    set_session_options, time_table_uploads, CudaOptions,
};
use blockcascade::config::BackendKind;
use blockcascade::config::KvExchange;
use blockcascade::kernels::Kernel;
use blockcascade::model::Model;
use blockcascade::noise::NoiseSource;
use blockcascade::prompt::{PromptEmbeds, PromptSwitch};
use blockcascade::weights::Weights;
use blockcascade::Recache;
use blockcascade::{AttentionMode, GenerateOptions, Generator, RunReport, Schedule};
use common::*;
use std::sync::Mutex;

/// The backend options are process-global: one test at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn run(schedule: Schedule, mode: AttentionMode, devices: usize) -> blockcascade::Result<Vec<f32>> {
    run_with(schedule, mode, devices, KvExchange::Joint)
}

fn run_with(
    schedule: Schedule,
    mode: AttentionMode,
    devices: usize,
    xch: KvExchange,
) -> blockcascade::Result<Vec<f32>> {
    run_blocks(schedule, mode, devices, xch, true, None)
}

/// `blocks`: `None` for the golden case (its recorded noise), `Some(n)` for `n` blocks with
/// seeded noise.
fn run_blocks(
    schedule: Schedule,
    mode: AttentionMode,
    devices: usize,
    xch: KvExchange,
    graphs: bool,
    blocks: Option<usize>,
) -> blockcascade::Result<Vec<f32>> {
    let edit = |o: &mut GenerateOptions| {
        o.schedule = schedule;
        o.attention = mode;
        o.devices = devices;
        o.kv_exchange = xch;
    };
    generate(graphs, blocks, edit, |_| Ok(())).map(|r| r.0)
}

/// One run of the golden model through the CUDA backend on emulated devices: `edit` changes
/// the golden options (the backend is already CUDA), `prepare` the generator (e.g. its prompt
/// schedule); `blocks` as in [`run_blocks`].
fn generate(
    graphs: bool,
    blocks: Option<usize>,
    edit: impl FnOnce(&mut GenerateOptions),
    prepare: impl FnOnce(&mut Generator) -> blockcascade::Result<()>,
) -> blockcascade::Result<(Vec<f32>, RunReport)> {
    generate_with(
        CudaOptions {
            emulate: true,
            graphs,
            ..CudaOptions::default()
        },
        blocks,
        edit,
        prepare,
    )
}

/// [`generate`] with explicit backend options.
fn generate_with(
    co: CudaOptions,
    blocks: Option<usize>,
    edit: impl FnOnce(&mut GenerateOptions),
    prepare: impl FnOnce(&mut Generator) -> blockcascade::Result<()>,
) -> blockcascade::Result<(Vec<f32>, RunReport)> {
    set_session_options(Some(co));
    let g = golden();
    let mut o = g.opts.clone();
    o.backend = BackendKind::Cuda;
    edit(&mut o);
    let (noise, n) = match blocks {
        None => (g.noise.clone(), g.frames / o.block_frames),
        Some(n) => (NoiseSource::Seeded(7), n),
    };
    let res = Generator::new(g.engine.model(), o, noise, &g.prompt).and_then(|mut gen| {
        prepare(&mut gen)?;
        gen.generate(n)
    });
    set_session_options(None);
    res
}

/// The golden model's shape with 5 layers (random weights): with double-buffered window K/V a
/// buffer is reused within a tick only from layer 2 on, so the golden model's 2 layers never
/// exercise the reuse rules (2 and 4 of `MultiCudaBackend::forward`) in that form.
fn five_layer_model() -> &'static (Model, PromptEmbeds) {
    static M: std::sync::OnceLock<(Model, PromptEmbeds)> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let mut cfg = golden().engine.config().clone();
        cfg.num_layers = 5;
        let prompt = PromptEmbeds::builtin(&cfg, 3);
        (Model::new(Weights::random(cfg, 5)), prompt)
    })
}

/// [`generate_with`] on [`five_layer_model`] with seeded noise.
fn generate_five_layers(
    co: CudaOptions,
    blocks: usize,
    edit: impl FnOnce(&mut GenerateOptions),
) -> blockcascade::Result<Vec<f32>> {
    set_session_options(Some(co));
    let (model, prompt) = five_layer_model();
    let mut o = golden().opts.clone();
    o.backend = BackendKind::Cuda;
    edit(&mut o);
    let res = Generator::new(model, o, NoiseSource::Seeded(9), prompt)
        .and_then(|gen| gen.generate(blocks))
        .map(|r| r.0);
    set_session_options(None);
    res
}

fn check(schedule: Schedule, mode: AttentionMode, devices: usize, name: &str) {
    let one = run(schedule, mode, 1).unwrap();
    let many = run(schedule, mode, devices).unwrap();
    let vs_one = rel_l2(&one, &many);
    let vs_expected = rel_l2(&expected(&format!("{name}.safetensors")), &many);
    println!(
        "{devices} emulated CUDA devices, {name}: rel L2 {vs_one:.3e} vs 1 device (bit-identical: {}), {vs_expected:.3e} vs expected",
        one == many
    );
    assert!(
        vs_one < 1e-5,
        "{name}: {devices} devices vs 1: rel L2 {vs_one}"
    );
    assert!(
        vs_expected < 2e-2,
        "{name}: vs expected: rel L2 {vs_expected}"
    );
}

#[test]
fn two_emulated_cuda_devices_equal_one_lag1_causal() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check(
        Schedule::Cascade { lag: 1 },
        AttentionMode::Causal,
        2,
        "cascade-lag1-causal",
    );
}

#[test]
fn three_emulated_cuda_devices_equal_one_lag1_bidirectional() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check(
        Schedule::Cascade { lag: 1 },
        AttentionMode::Bidirectional,
        3,
        "cascade-lag1-bidirectional",
    );
}

/// Restores the immediate stream order when a test ends (also when it fails).
struct OrderGuard;

impl Drop for OrderGuard {
    fn drop(&mut self) {
        let _ = set_stream_order(StreamOrder::Immediate);
    }
}

/// The deferred stream orders: copies as late as their marks allow, as early as they allow,
/// and random interleavings (seeds 1 and 2, or 1 to N with `BC_STREAM_ORDER_SEEDS=N`).
fn orders() -> Vec<StreamOrder> {
    let seeds = std::env::var("BC_STREAM_ORDER_SEEDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(2);
    [StreamOrder::CopiesLate, StreamOrder::CopiesEarly]
        .into_iter()
        .chain((1..=seeds).map(StreamOrder::Random))
        .collect()
}

/// One joint-exchange configuration of the ordering test.
#[derive(Clone, Copy, Debug)]
struct JointCase {
    /// On [`five_layer_model`] instead of the golden model.
    five_layers: bool,
    mode: AttentionMode,
    devices: usize,
    double_kv: bool,
    graphs: bool,
}

/// The joint exchange's peer copies run on each device's copy stream, ordered with the compute
/// streams by marks only (the rules listed in `MultiCudaBackend::run_layers`, joint.rs: 1 to
/// 4, and 5, rule 2 for layer 0 across ticks, which no host sync orders now that the latents
/// stay on the devices). Under the deferred stream orders of the emulation every stream's work
/// is queued and run in an order a GPU could choose, so a forgotten wait reads rows before
/// they are written or after they are overwritten, and the latents change. Each rule was
/// checked by deleting its wait (`scripts/check-ordering-mutations.sh`): the test then fails
/// (rules 1 to 4 caught by the first or second case under `CopiesLate`, rule 5 by the
/// golden 3-device double-buffered case under `CopiesEarly`).
/// Double-buffered (default; asserted to be on) and single-buffered window K/V, 2 and 3
/// devices, causal and bidirectional attention, graphs and eager launches: bit-identical to
/// one device under every order.
#[test]
fn joint_exchange_is_exact_under_every_stream_order() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _guard = OrderGuard;
    let blocks = 4;
    let run = |c: JointCase| {
        let co = CudaOptions {
            emulate: true,
            graphs: c.graphs,
            double_kv: c.double_kv,
            ..CudaOptions::default()
        };
        let edit = |o: &mut GenerateOptions| {
            o.schedule = Schedule::Cascade { lag: 1 };
            o.attention = c.mode;
            o.devices = c.devices;
            o.kv_exchange = KvExchange::Joint;
        };
        if c.five_layers {
            generate_five_layers(co, blocks, edit).unwrap()
        } else {
            generate_with(co, Some(blocks), edit, |_| Ok(())).unwrap().0
        }
    };
    let case = |mode, devices, double_kv, graphs| JointCase {
        five_layers: false,
        mode,
        devices,
        double_kv,
        graphs,
    };
    let (causal, bidi) = (AttentionMode::Causal, AttentionMode::Bidirectional);
    let all = [
        case(causal, 3, true, true),
        case(causal, 3, false, false),
        case(causal, 2, true, false),
        case(bidi, 3, true, true),
        JointCase {
            five_layers: true,
            ..case(causal, 3, true, true)
        },
        JointCase {
            five_layers: true,
            ..case(causal, 2, true, false)
        },
    ];
    let plan: Vec<(StreamOrder, JointCase)> = orders()
        .into_iter()
        .flat_map(|o| all.iter().map(move |&c| (o, c)))
        .collect();
    set_stream_order(StreamOrder::Immediate).unwrap();
    let mut one: Vec<((AttentionMode, bool), Vec<f32>)> = Vec::new();
    for (order, c) in plan {
        let reference = (c.mode, c.five_layers);
        if !one.iter().any(|(k, _)| *k == reference) {
            set_stream_order(StreamOrder::Immediate).unwrap();
            let r = run(JointCase {
                five_layers: c.five_layers,
                ..case(c.mode, 1, true, false)
            });
            one.push((reference, r));
        }
        let Some((_, one)) = one.iter().find(|(k, _)| *k == reference) else {
            unreachable!()
        };
        set_stream_order(order).unwrap();
        let before = double_kv_devices();
        let many = run(c);
        let doubled = double_kv_devices() - before;
        assert_eq!(
            doubled,
            if c.double_kv { c.devices } else { 0 },
            "double-buffered devices"
        );
        println!("{order:?}, {c:?}: rel L2 {:.3e}", rel_l2(one, &many));
        assert!(
            *one == many,
            "{order:?}, {c:?}: the stream order changes the latents (rel L2 {})",
            rel_l2(one, &many)
        );
    }
}

/// The lagged exchange's copies (on the compute streams, ordered with both devices' work by
/// `copy_to_peer`'s waits: the source waits for the destination's compute, the destination for
/// the copy) give the same latents under the deferred stream orders as under immediate
/// execution, and the deferred orders change nothing else (uploads, graphs, downloads). With
/// the latents on the devices no host sync starts each tick any more, so those waits are what
/// orders the copies, and this test checks them: deleting the source's wait fails it under
/// `CopiesLate` (4.0e-1 relative L2), deleting the destination's wait makes a block non-finite
/// (both checked once by hand; when every tick began with a host sync, deleting the copy's
/// wait did not fail it).
#[test]
fn lagged_exchange_is_exact_under_every_stream_order() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _guard = OrderGuard;
    let run = |graphs: bool| {
        run_blocks(
            Schedule::Cascade { lag: 1 },
            AttentionMode::Causal,
            3,
            KvExchange::Lagged,
            graphs,
            Some(4),
        )
        .unwrap()
    };
    set_stream_order(StreamOrder::Immediate).unwrap();
    let immediate = run(false);
    for order in orders() {
        set_stream_order(order).unwrap();
        let got = run(true);
        println!("{order:?}, lagged: rel L2 {:.3e}", rel_l2(&immediate, &got));
        assert!(
            immediate == got,
            "{order:?}, lagged: the stream order changes the latents (rel L2 {})",
            rel_l2(&immediate, &got)
        );
    }
}

/// The CPU backend's result for the same case (the exact lagged-exchange reference).
fn run_cpu(lag: usize, devices: usize, xch: KvExchange) -> Vec<f32> {
    let g = golden();
    let mut o = g.opts.clone();
    o.schedule = Schedule::Cascade { lag };
    o.attention = AttentionMode::Causal;
    o.backend = BackendKind::Cpu;
    o.devices = devices;
    o.kv_exchange = xch;
    Generator::new(g.engine.model(), o.clone(), g.noise.clone(), &g.prompt)
        .and_then(|gen| gen.generate(g.frames / o.block_frames))
        .unwrap()
        .0
}

/// Lagged exchange on 3 emulated CUDA devices follows the CPU backend's lagged exchange on 3
/// devices (bf16 tolerance) and differs from the joint result by more than that tolerance.
fn check_lagged(lag: usize) {
    let cuda = run_with(
        Schedule::Cascade { lag },
        AttentionMode::Causal,
        3,
        KvExchange::Lagged,
    )
    .unwrap();
    let cpu = run_cpu(lag, 3, KvExchange::Lagged);
    let joint = run_cpu(lag, 3, KvExchange::Joint);
    let vs_cpu = rel_l2(&cpu, &cuda);
    let vs_joint = rel_l2(&joint, &cuda);
    let cpu_drift = rel_l2(&joint, &cpu);
    println!(
        "lag {lag}, 3 emulated CUDA devices, lagged: rel L2 {vs_cpu:.3e} vs CPU lagged, {vs_joint:.3e} vs joint (CPU lagged vs joint: {cpu_drift:.3e})"
    );
    assert!(
        vs_cpu < 2e-2,
        "lag {lag}: CUDA lagged vs CPU lagged: {vs_cpu}"
    );
    assert!(
        vs_joint > 2e-2 && cpu_drift > 2e-2,
        "lag {lag}: lagged must differ from joint: CUDA {vs_joint}, CPU {cpu_drift}"
    );
    assert!(
        vs_cpu < vs_joint / 2.0,
        "lag {lag}: CUDA lagged is closer to joint ({vs_joint}) than to CPU lagged ({vs_cpu})"
    );
}

#[test]
fn lagged_exchange_on_three_emulated_cuda_devices_lag1() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check_lagged(1);
}

#[test]
fn lagged_exchange_on_three_emulated_cuda_devices_lag2() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check_lagged(2);
}

/// Graphs per device (joint: one per stretch between two exchanges; lagged: one per tick)
/// replay exactly what eager launches compute, and are actually replayed.
fn check_graphs(xch: KvExchange, devices: usize, blocks: usize) {
    // Lag 1: from block 5 on, the steady-state window (context + 4 members) repeats on
    // consecutive ticks; with 9 blocks a graph is replayed on ticks of both parities (the
    // lagged K/V generations alternate with the tick).
    let schedule = Schedule::Cascade { lag: 1 };
    let run = |graphs| {
        run_blocks(
            schedule,
            AttentionMode::Causal,
            devices,
            xch,
            graphs,
            Some(blocks),
        )
        .unwrap()
    };
    let before = graph_replays();
    let eager = run(false);
    assert_eq!(graph_replays(), before, "graphs replayed with graphs off");
    let graph = run(true);
    let replays = graph_replays() - before;
    println!("{xch:?}, {devices} emulated CUDA devices: {replays} graph launches");
    assert!(replays > 0, "{xch:?}: no graph was replayed");
    assert_eq!(
        eager, graph,
        "{xch:?}, {devices} devices: graph replay differs from eager launches"
    );
}

#[test]
fn joint_exchange_graphs_equal_eager_on_two_emulated_cuda_devices() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check_graphs(KvExchange::Joint, 2, 6);
}

#[test]
fn lagged_exchange_graphs_equal_eager_on_three_emulated_cuda_devices() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check_graphs(KvExchange::Lagged, 3, 9);
}

/// A graph captured for one part of a multi-device tick must never be replayed for another
/// kind of work with the same window shape: here a context pass run alone
/// (`separate_context_pass`, one member, all on device 0) and the recache of that same single
/// block after a prompt switch (`--recache window`) have the same shape. Graphs must give the
/// eager result bit for bit.
#[test]
fn recache_and_context_pass_graphs_equal_eager_on_two_emulated_cuda_devices() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let p1 = PromptEmbeds::builtin(golden().engine.config(), 1);
    let run = |graphs: bool| {
        let edit = |o: &mut GenerateOptions| {
            o.schedule = Schedule::Sequential;
            o.devices = 2;
            o.separate_context_pass = true;
            o.recache = Recache::Window;
        };
        let switch = [PromptSwitch {
            block: 2,
            embeds: p1.clone(),
        }];
        generate(graphs, Some(4), edit, |gen| {
            gen.set_prompt_schedule(&switch)
        })
        .unwrap()
    };
    let before = graph_replays();
    let (eager, re) = run(false);
    let (graph, _) = run(true);
    assert!(re.recache_passes > 0, "no recache happened");
    assert!(graph_replays() > before, "no graph was replayed");
    assert_eq!(eager, graph, "graph replay differs from eager launches");
}

/// Joint exchange copies only what a peer reads: with causal attention a device never gets
/// the K/V of later members it does not attend to, so a causal tick moves fewer bytes than a
/// bidirectional one over the same placement, and both still match the golden results.
#[test]
fn joint_exchange_copies_only_what_peers_read() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let schedule = Schedule::Cascade { lag: 1 };
    let mut bytes = Vec::new();
    for (mode, name) in [
        (AttentionMode::Causal, "cascade-lag1-causal"),
        (AttentionMode::Bidirectional, "cascade-lag1-bidirectional"),
    ] {
        let before = peer_copy_bytes();
        let lat = run(schedule, mode, 3).unwrap();
        let moved = peer_copy_bytes() - before;
        let err = rel_l2(&expected(&format!("{name}.safetensors")), &lat);
        println!("{name}, 3 emulated CUDA devices: {moved} bytes exchanged, rel L2 {err:.3e}");
        assert!(err < 2e-2, "{name}: rel L2 {err}");
        assert!(moved > 0, "{name}: nothing exchanged");
        bytes.push(moved);
    }
    assert!(
        bytes[0] < bytes[1],
        "causal exchanged {} bytes, bidirectional {}",
        bytes[0],
        bytes[1]
    );
}

/// Partial exchange (each device gets only the rows it reads) must not change what any member
/// sees: bit-identical latents to one device with local attention + sink (ring wrap, members
/// partly outside the window) and with a separate context pass.
#[test]
fn partial_exchange_is_exact_with_local_attention_and_separate_context_pass() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let run = |devices: usize, local: bool| {
        let edit = |o: &mut GenerateOptions| {
            o.devices = devices;
            if local {
                o.schedule = Schedule::Cascade { lag: 1 };
                o.local_attn = Some(2 * o.block_frames + 1);
                o.sink = 1;
            } else {
                o.schedule = Schedule::Cascade { lag: 2 };
                o.separate_context_pass = true;
            }
        };
        generate(false, Some(5), edit, |_| Ok(())).unwrap().0
    };
    for (local, devices) in [(true, 3), (false, 2)] {
        let one = run(1, local);
        let many = run(devices, local);
        let what = if local {
            "lag 1, local attention + sink"
        } else {
            "lag 2, separate context pass"
        };
        assert!(
            one == many,
            "{what}, {devices} devices: rel L2 {} vs 1 device",
            rel_l2(&one, &many)
        );
    }
}

/// The emulated streams themselves: a peer copy that waits for the sender's compute mark reads
/// what the compute stream wrote, under every order; one that does not wait reads the old
/// bytes under `CopiesEarly` (the emulation exposes the race instead of hiding it); marks and
/// waits inside a graph capture are errors.
#[test]
fn emulated_streams_run_a_missing_wait_in_the_wrong_order() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _guard = OrderGuard;
    let n = 4096;
    // (bytes the receiver sees, with the wait / without it) under `order`.
    let exchange = |order: StreamOrder| -> (Vec<u8>, Vec<u8>) {
        set_stream_order(order).unwrap();
        let mut a = Gpu::open_emulated().unwrap();
        let mut b = Gpu::open_emulated().unwrap();
        let (src, dst_waited, dst_raced) = (
            a.alloc(n).unwrap(),
            b.alloc(n).unwrap(),
            b.alloc(n).unwrap(),
        );
        a.memset(src, 1, n).unwrap();
        a.sync().unwrap();
        // The compute stream writes 7s. A copy stream runs in order, so the copy that does
        // not wait goes first; the second waits for the write.
        a.memset(src, 7, n).unwrap();
        let written = a.mark_compute().unwrap();
        let raced = a.send_to_peer(&b, &[(dst_raced, src, n)], &[]).unwrap();
        let landed = a
            .send_to_peer(&b, &[(dst_waited, src, n)], &[&written])
            .unwrap();
        b.compute_wait(&raced).unwrap();
        b.compute_wait(&landed).unwrap();
        let (mut w, mut r) = (vec![0u8; n], vec![0u8; n]);
        b.download(&mut w, dst_waited).unwrap();
        b.download(&mut r, dst_raced).unwrap();
        a.sync_copies().unwrap();
        (w, r)
    };
    for order in orders() {
        let (waited, _) = exchange(order);
        assert!(waited.iter().all(|&v| v == 7), "{order:?}: waited copy");
    }
    let (_, raced) = exchange(StreamOrder::CopiesEarly);
    assert!(
        raced.iter().all(|&v| v == 1),
        "CopiesEarly: the copy without a wait ran after the write"
    );
    let (_, raced) = exchange(StreamOrder::CopiesLate);
    assert!(raced.iter().all(|&v| v == 7), "CopiesLate: compute first");
    // Inside a capture: marks and waits are refused.
    set_stream_order(StreamOrder::Random(3)).unwrap();
    let g = Gpu::open_emulated().unwrap();
    let outside = g.mark_compute().unwrap();
    g.begin_capture().unwrap();
    let e = g.mark_compute().err().expect("a mark inside a capture");
    assert!(e.to_string().contains("graph capture"), "{e}");
    let e = g.compute_wait(&outside).err();
    g.abort_capture();
    let e = e.expect("a wait inside a capture");
    assert!(e.to_string().contains("graph capture"), "{e}");
}

/// A queued op that fails is reported by its own device's next wait, and again after that
/// (sticky, like a CUDA context), never by another device that happened to run it.
#[test]
fn a_failed_queued_op_is_reported_by_its_own_device() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _guard = OrderGuard;
    for order in orders() {
        set_stream_order(order).unwrap();
        let mut a = Gpu::open_emulated().unwrap();
        let mut b = Gpu::open_emulated().unwrap();
        let (pa, pb) = (a.alloc(64).unwrap(), b.alloc(64).unwrap());
        // 2048 threads per block: the emulated launcher refuses it before reading the params.
        let params = [0u64; 8];
        // SAFETY: the launch is refused before the kernel body (and its params) is touched.
        unsafe { a.launch(Kernel::TestSync, [1, 1, 1], 2048, &params) }.unwrap();
        a.memset(pa, 3, 64).unwrap();
        b.memset(pb, 4, 64).unwrap();
        let after_a = a.mark_compute().unwrap();
        b.compute_wait(&after_a).unwrap();
        let mut got = vec![0u8; 64];
        b.download(&mut got, pb).unwrap();
        assert!(got.iter().all(|&v| v == 4), "{order:?}");
        b.sync().unwrap();
        for _ in 0..2 {
            let e = a.sync().expect_err("the failed launch is reported");
            assert!(
                e.to_string().contains("threads per block"),
                "{order:?}: {e}"
            );
        }
        drop((a, b));
    }
}

/// Freeing a buffer that another device's queued peer copy still writes is an error under the
/// deferred orders (on a GPU, `cuMemFree` would not wait for the peer's copy stream).
#[test]
fn freeing_a_buffer_a_peer_copy_still_uses_is_an_error() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _guard = OrderGuard;
    set_stream_order(StreamOrder::CopiesLate).unwrap();
    let mut a = Gpu::open_emulated().unwrap();
    let mut b = Gpu::open_emulated().unwrap();
    let (src, dst) = (a.alloc(256).unwrap(), b.alloc(256).unwrap());
    a.memset(src, 5, 256).unwrap();
    let written = a.mark_compute().unwrap();
    let _sent = a.send_to_peer(&b, &[(dst, src, 256)], &[&written]).unwrap();
    let e = b.free(dst).expect_err("the copy into it is still queued");
    assert!(e.to_string().contains("still uses"), "{e}");
    // After a sync of the copies, freeing is fine.
    let other = b.alloc(256).unwrap();
    let _sent = a.send_to_peer(&b, &[(other, src, 256)], &[]).unwrap();
    a.sync_copies().unwrap();
    b.free(other).unwrap();
}

/// Host traffic and device work between two points of a test.
#[derive(Debug)]
struct Moved {
    staged: usize,
    down_bytes: usize,
    downloads: usize,
    flow_steps: usize,
    latent_moves: usize,
    time_uploads: usize,
}

/// Runs `f` and counts what it moved between host and devices.
fn counted<T>(f: impl FnOnce() -> T) -> (T, Moved) {
    let (t0, s0, m0, u0) = (
        host_traffic(),
        device_flow_steps(),
        latent_moves(),
        time_table_uploads(),
    );
    let out = f();
    let t1 = host_traffic();
    let moved = Moved {
        staged: t1.staged_bytes - t0.staged_bytes,
        down_bytes: t1.download_bytes - t0.download_bytes,
        downloads: t1.downloads - t0.downloads,
        flow_steps: device_flow_steps() - s0,
        latent_moves: latent_moves() - m0,
        time_uploads: time_table_uploads() - u0,
    };
    (out, moved)
}

/// Backend options with or without the denoising state on the devices.
fn latents_opts(device_latents: bool) -> CudaOptions {
    CudaOptions {
        emulate: true,
        device_latents,
        ..CudaOptions::default()
    }
}

/// The latents kept on two devices (each block on the device it is placed on, moved device to
/// device when the placement moves it, stepped there by `bc_flow_step`, only finished blocks
/// downloaded) against the host flow step on flows downloaded every tick: the same bits for
/// joint and lagged exchange, sequential and cascade, and fewer bytes down. docs/cuda.md and
/// docs/multi-device.md quote the printed traffic.
#[test]
fn device_latents_on_two_devices_match_the_host_flow_step_bit_for_bit() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut moves = 0;
    for xch in [KvExchange::Joint, KvExchange::Lagged] {
        for schedule in [Schedule::Sequential, Schedule::Cascade { lag: 1 }] {
            let run = |device_latents: bool| {
                let edit = |o: &mut GenerateOptions| {
                    o.schedule = schedule;
                    o.devices = 2;
                    o.kv_exchange = xch;
                };
                counted(|| generate_with(latents_opts(device_latents), None, edit, |_| Ok(())))
            };
            let (host, mh) = run(false);
            let (device, md) = run(true);
            let (host, device) = (host.unwrap().0, device.unwrap().0);
            println!(
                "TRAFFIC 2 devices, {xch:?}, {schedule:?}: host step: {} B up, {} B down in {} downloads; device latents: {} B up, {} B down in {} downloads, {} flow steps on the devices, {} blocks moved between devices, {} time embeddings into the tables",
                mh.staged, mh.down_bytes, mh.downloads, md.staged, md.down_bytes, md.downloads, md.flow_steps, md.latent_moves, md.time_uploads
            );
            assert_eq!(
                mh.flow_steps, 0,
                "{xch:?} {schedule:?}: host path stepped on a device"
            );
            assert!(
                md.flow_steps > 0,
                "{xch:?} {schedule:?}: no flow step ran on a device"
            );
            assert!(
                md.down_bytes < mh.down_bytes && md.downloads < mh.downloads,
                "{xch:?} {schedule:?}: device latents downloaded no less: {md:?} vs {mh:?}"
            );
            assert!(
                md.staged < mh.staged,
                "{xch:?} {schedule:?}: device latents uploaded no less: {md:?} vs {mh:?}"
            );
            assert!(!host.is_empty() && host.iter().all(|v| v.is_finite()));
            assert!(
                bits(&host) == bits(&device),
                "{xch:?} {schedule:?}: device latents differ from the host flow step (rel L2 {:.3e})",
                rel_l2(&host, &device)
            );
            moves += md.latent_moves;
        }
    }
    // The cascade's window slides, so its placement moves blocks: the moves were exercised.
    assert!(moves > 0, "no block moved between devices");
}

/// The separate context pass (a block's clean re-forward in a forward of its own) reads the
/// block's latents held on the device instead of uploading them, on one and two devices: the
/// same bits as the host flow step, fewer bytes down. The time embeddings come from each
/// device's table: every distinct timestep (the steps' and the context's) goes up at most once
/// per device.
#[test]
fn separate_context_pass_reads_the_held_latents() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for devices in [1, 2] {
        let run = |device_latents: bool| {
            let edit = |o: &mut GenerateOptions| {
                o.schedule = Schedule::Cascade { lag: 2 };
                o.separate_context_pass = true;
                o.devices = devices;
            };
            counted(|| generate_with(latents_opts(device_latents), Some(3), edit, |_| Ok(())))
        };
        let (host, mh) = run(false);
        let (device, md) = run(true);
        let ((host, rh), (device, rd)) = (host.unwrap(), device.unwrap());
        println!(
            "TRAFFIC separate context pass, {devices} device(s): host step: {} B up, {} B down in {} downloads; device latents: {} B up, {} B down in {} downloads, {} time embeddings into the table",
            mh.staged, mh.down_bytes, mh.downloads, md.staged, md.down_bytes, md.downloads, md.time_uploads
        );
        assert_eq!(
            rh.forward_passes, rd.forward_passes,
            "{devices}: forward passes differ"
        );
        assert!(
            rd.forward_passes > rd.ticks,
            "{devices}: no separate context pass ran"
        );
        assert!(md.flow_steps > 0 && md.downloads < mh.downloads && md.staged < mh.staged);
        let timesteps = golden().opts.steps.len() + 1;
        assert_eq!(
            mh.time_uploads, 0,
            "{devices}: the host path used the time table"
        );
        assert!(
            md.time_uploads > 0 && md.time_uploads <= devices * timesteps,
            "{devices}: {} time embeddings uploaded for {timesteps} timesteps",
            md.time_uploads
        );
        assert!(
            host == device,
            "{devices} device(s): device latents differ from the host flow step (rel L2 {:.3e})",
            rel_l2(&host, &device)
        );
    }
}
