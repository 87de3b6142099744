//! Live streams ([`blockcascade::stream`]): switches from another thread land at the returned
//! block and give the latents of the same fixed prompt schedule through `Generator::run`;
//! cancel (also while the engine waits on a full queue, and while the consumer waits);
//! backpressure counted in blocks; timeouts; pixels; typed errors.

mod common;

use blockcascade::config::BackendKind;
use blockcascade::decode::Decoder;
use blockcascade::prompt::PromptSwitch;
use blockcascade::{
    AttentionMode, Engine, Error, GenerateOptions, Generator, NoiseSource, PromptEmbeds, Recache,
    Schedule, Stream, StreamOptions, TextEncoder,
};
use std::sync::Arc;
use std::time::Duration;

/// The tiny model's options for a stream: local attention (a stream needs it), 3-frame blocks.
fn opts(schedule: Schedule) -> GenerateOptions {
    GenerateOptions {
        schedule,
        local_attn: Some(6),
        sink: 0,
        ..Default::default()
    }
}

fn prompt(engine: &Engine, seed: u64) -> PromptEmbeds {
    PromptEmbeds::builtin(engine.config(), seed)
}

/// Latents of blocks `0..blocks` through `Generator::run` with prompt `p0` and `switches`.
fn fixed_run(
    engine: &Engine,
    o: &GenerateOptions,
    seed: u64,
    p0: &PromptEmbeds,
    switches: &[(usize, PromptEmbeds)],
    blocks: usize,
) -> Vec<Vec<f32>> {
    let mut gen = Generator::new(engine.model(), o.clone(), NoiseSource::Seeded(seed), p0).unwrap();
    let sw: Vec<PromptSwitch> = switches
        .iter()
        .map(|(block, embeds)| PromptSwitch {
            block: *block,
            embeds: embeds.clone(),
        })
        .collect();
    gen.set_prompt_schedule(&sw).unwrap();
    let mut out = Vec::new();
    gen.run(blocks, |b| {
        out.push(b.latents.to_vec());
        true
    })
    .unwrap();
    out
}

/// Polls `cond` every few milliseconds (at most about a minute): a liveness wait, not a time
/// assertion.
fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..6000 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A stream whose block 0 has been taken and whose block 1 is paced hours away (3 frames at
/// 1e-4 fps): the consumer's next wait does not end by itself.
fn paced_stream(engine: &Engine) -> Stream {
    let mut st = Stream::open(
        engine,
        opts(Schedule::Sequential),
        NoiseSource::Seeded(1),
        prompt(engine, 1),
        StreamOptions {
            target_fps: 1e-4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(st.next_block(None).unwrap().unwrap().index, 0);
    st
}

#[test]
fn a_switch_from_another_thread_lands_at_the_returned_block_and_equals_a_fixed_schedule() {
    let engine = Engine::open(None).unwrap();
    let (p0, p1) = (prompt(&engine, 1), prompt(&engine, 2));
    for (schedule, recache, attention) in [
        (Schedule::Sequential, Recache::None, AttentionMode::Causal),
        (
            Schedule::Cascade { lag: 1 },
            Recache::None,
            AttentionMode::Causal,
        ),
        (
            Schedule::Cascade { lag: 2 },
            Recache::Window,
            AttentionMode::Causal,
        ),
        (Schedule::Sequential, Recache::Window, AttentionMode::Causal),
        (
            Schedule::Cascade { lag: 2 },
            Recache::None,
            AttentionMode::Bidirectional,
        ),
    ] {
        let o = GenerateOptions {
            recache,
            attention,
            ..opts(schedule)
        };
        let seed = 5;
        let mut st = Stream::open(
            &engine,
            o.clone(),
            NoiseSource::Seeded(seed),
            p0.clone(),
            StreamOptions::default(),
        )
        .unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(st.next_block(None).unwrap().unwrap());
        }
        // The switch comes from another thread while this one keeps consuming.
        let ctl = st.control();
        let p = p1.clone();
        let at = std::thread::spawn(move || ctl.switch_prompt(&p))
            .join()
            .unwrap()
            .unwrap() as usize;
        assert!(at >= 2, "blocks 0 and 1 had started: {at}");
        let total = at + 2;
        while got.len() < total {
            got.push(st.next_block(None).unwrap().unwrap());
        }
        drop(st);
        for (i, b) in got.iter().enumerate() {
            assert_eq!(b.index, i as u64);
            assert_eq!(b.first_frame, 3 * i as u64);
            assert_eq!((b.frames, b.channels, b.height, b.width), (3, 16, 8, 12));
            assert!(b.rgb.is_none() && b.pixel_frames == 0);
        }
        let got: Vec<Vec<f32>> = got.into_iter().map(|b| b.latents).collect();
        // Bidirectional denoising members also see the later members in flight: the fixed run
        // must go on past the blocks compared (by S = 4 blocks, enough for any lag).
        let run_blocks = match attention {
            AttentionMode::Causal => total,
            AttentionMode::Bidirectional => total + 4,
        };
        let mut want = fixed_run(&engine, &o, seed, &p0, &[(at, p1.clone())], run_blocks);
        want.truncate(total);
        assert!(
            got == want,
            "{schedule:?} {recache:?}: stream vs fixed schedule"
        );
        // The switch lands exactly at `at`: before it, the latents of no switch at all.
        let unswitched = fixed_run(&engine, &o, seed, &p0, &[], run_blocks);
        // (Bidirectional: the blocks denoising beside block `at` see its frames, so the
        // unchanged ones are those finished before it starts, `at - S/lag` and earlier.)
        let unchanged = match (attention, schedule) {
            (AttentionMode::Bidirectional, Schedule::Cascade { lag }) => at + 1 - 4 / lag,
            _ => at,
        };
        assert!(got[..unchanged] == unswitched[..unchanged], "{schedule:?}");
        assert!(
            got[at] != unswitched[at],
            "{schedule:?}: block {at} has the new prompt"
        );
        if unchanged < at {
            assert!(
                got[at - 1] != unswitched[at - 1],
                "bidirectional: block {at} is seen"
            );
        }
    }
}

#[test]
fn a_text_switch_right_after_open_equals_a_fixed_schedule() {
    let engine = Engine::open(None).unwrap();
    let enc = Arc::new(TextEncoder::tiny(0));
    let o = opts(Schedule::Cascade { lag: 2 });
    // Whenever the switch lands, the stream equals the fixed schedule switching there.
    let mut st = Stream::open(
        &engine,
        o.clone(),
        NoiseSource::Seeded(3),
        prompt(&engine, 1),
        StreamOptions {
            text_encoder: Some(enc.clone()),
            queue_blocks: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let ctl = st.control();
    let at = ctl.switch_prompt_text("a red fox").unwrap() as usize;
    let total = at + 2;
    let got: Vec<Vec<f32>> = (0..total)
        .map(|_| st.next().unwrap().unwrap().latents)
        .collect();
    let text = enc.prompt_embeds("a red fox", engine.config()).unwrap();
    let want = fixed_run(&engine, &o, 3, &prompt(&engine, 1), &[(at, text)], total);
    assert!(got == want, "text switch at {at}");
}

#[test]
fn cancel_ends_a_waiting_consumer_and_an_engine_blocked_on_a_full_queue() {
    let engine = Engine::open(None).unwrap();
    // Engine blocked on a full queue: nothing is consumed until it has filled everything.
    let st = Stream::open(
        &engine,
        opts(Schedule::Sequential),
        NoiseSource::Seeded(1),
        prompt(&engine, 1),
        StreamOptions {
            queue_blocks: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let limit = st.ahead_limit() as u64;
    assert!(wait_for(|| st.blocks_finished() == limit));
    let ctl = st.control();
    std::thread::spawn(move || ctl.cancel()).join().unwrap();
    let mut st = st;
    assert!(matches!(st.next_block(None), Err(Error::Cancelled)));
    assert!(st.next().is_none(), "the iterator ends after a cancel");
    assert!(matches!(
        st.control().switch_prompt(&prompt(&engine, 2)),
        Err(Error::Cancelled)
    ));
    drop(st); // joins the worker: the test hangs here if cancel did not wake it

    // A consumer waiting in next_block (the next block is paced hours away) is woken by a
    // cancel from another thread.
    let mut st = paced_stream(&engine);
    let ctl = st.control();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        ctl.cancel();
    });
    assert!(matches!(st.next_block(None), Err(Error::Cancelled)));
    canceller.join().unwrap();
}

#[test]
fn a_timeout_returns_none_and_the_stream_goes_on() {
    let engine = Engine::open(None).unwrap();
    let mut st = paced_stream(&engine);
    for _ in 0..2 {
        assert!(st
            .next_block(Some(Duration::from_millis(20)))
            .unwrap()
            .is_none());
    }
    assert!(st.next_block(Some(Duration::ZERO)).unwrap().is_none());
    // Still alive: a switch is accepted.
    let at = st.control().switch_prompt(&prompt(&engine, 2)).unwrap();
    assert!(at >= 1);
}

/// Counts: with a consumer that sleeps, the engine finishes at most the queue plus the blocks
/// in flight beyond those taken, and it does reach that bound (it ran ahead, then waited).
fn check_backpressure(sopts: StreamOptions, expected_limit: usize) {
    let engine = Engine::open(None).unwrap();
    let mut st = Stream::open(
        &engine,
        opts(Schedule::Cascade { lag: 2 }),
        NoiseSource::Seeded(1),
        prompt(&engine, 1),
        sopts,
    )
    .unwrap();
    let limit = st.ahead_limit() as u64;
    assert_eq!(limit, expected_limit as u64);
    for _ in 0..4 {
        assert!(
            wait_for(|| st.blocks_finished() >= st.blocks_taken() + limit),
            "the engine never filled the queue"
        );
        // The consumer sleeps; the engine must not run further ahead.
        std::thread::sleep(Duration::from_millis(30));
        let ahead = st.blocks_finished() - st.blocks_taken();
        assert_eq!(ahead, limit, "blocks finished beyond those taken");
        let b = st.next_block(None).unwrap().unwrap();
        assert_eq!(b.index + 1, st.blocks_taken());
    }
}

#[test]
fn backpressure_bounds_the_blocks_ahead_of_a_sleeping_consumer() {
    check_backpressure(
        StreamOptions {
            queue_blocks: 2,
            ..Default::default()
        },
        3,
    );
    check_backpressure(
        StreamOptions {
            queue_blocks: 1,
            decoder: Some(Arc::new(Decoder::tiny_taehv(0))),
            ..Default::default()
        },
        1 + 1 + blockcascade::decode::QUEUE_BLOCKS + 1,
    );
}

#[test]
fn pixels_are_the_streamed_decode_of_the_latents_and_memory_stays_flat() {
    let engine = Engine::open(None).unwrap();
    let dec = Arc::new(Decoder::tiny_taehv(0));
    let blocks = 7;
    let st = Stream::open(
        &engine,
        GenerateOptions {
            local_attn: Some(7),
            sink: 1,
            ..opts(Schedule::Cascade { lag: 1 })
        },
        NoiseSource::Seeded(2),
        prompt(&engine, 1),
        StreamOptions {
            decoder: Some(dec.clone()),
            target_fps: 1e6,
            ..Default::default()
        },
    )
    .unwrap();
    let got: Vec<_> = st.take(blocks).map(Result::unwrap).collect();
    let latents: Vec<f32> = got.iter().flat_map(|b| b.latents.clone()).collect();
    let rgb: Vec<u8> = got
        .iter()
        .flat_map(|b| b.rgb.clone().expect("rgb"))
        .collect();
    let want = dec.decode(&latents, 3 * blocks, 8, 12).unwrap();
    assert_eq!(rgb, want.to_rgb8());
    assert_eq!(
        got.iter().map(|b| b.pixel_frames).collect::<Vec<_>>(),
        [9, 12, 12, 12, 12, 12, 12]
    );
    assert!(got
        .iter()
        .all(|b| (b.pixel_height, b.pixel_width) == (64, 96)));
    // Local attention 7 with a sink of 1: the cache is full (7 frames) from block 2 on.
    let cache: Vec<usize> = got.iter().map(|b| b.cache_bytes).collect();
    assert!(cache[3..].iter().all(|&c| c == cache[3]), "{cache:?}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let engine = Engine::open(None).unwrap();
    let p = prompt(&engine, 1);
    let open = |o: GenerateOptions, s: StreamOptions| {
        Stream::open(&engine, o, NoiseSource::Seeded(0), p.clone(), s)
    };
    let inval = |r: Result<Stream, Error>, what: &str| match r {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(what), "{m}"),
        Err(e) => panic!("{what}: wrong error {e}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    inval(
        open(GenerateOptions::default(), StreamOptions::default()),
        "local attention",
    );
    let o = opts(Schedule::Sequential);
    for q in [0, 100_000] {
        inval(
            open(
                o.clone(),
                StreamOptions {
                    queue_blocks: q,
                    ..Default::default()
                },
            ),
            "queue_blocks",
        );
    }
    // 1e-300 and 1e300: a block's interval (frames / fps) or the rate would not fit a Duration.
    for fps in [
        -1.0,
        f64::NAN,
        f64::INFINITY,
        1e-300,
        f64::MIN_POSITIVE,
        1e300,
    ] {
        inval(
            open(
                o.clone(),
                StreamOptions {
                    target_fps: fps,
                    ..Default::default()
                },
            ),
            "target_fps",
        );
    }
    let bad_prompt = PromptEmbeds {
        data: vec![0.0; 5],
        rows: 1,
    };
    assert!(matches!(
        Stream::open(
            &engine,
            o.clone(),
            NoiseSource::Seeded(0),
            bad_prompt.clone(),
            StreamOptions::default()
        ),
        Err(Error::InvalidArgument(_))
    ));
    let st = open(o.clone(), StreamOptions::default()).unwrap();
    let ctl = st.control();
    assert!(matches!(
        ctl.switch_prompt(&bad_prompt),
        Err(Error::InvalidArgument(_))
    ));
    let mut nan = p.clone();
    nan.data[0] = f32::NAN;
    assert!(matches!(
        ctl.switch_prompt(&nan),
        Err(Error::InvalidArgument(_))
    ));
    match ctl.switch_prompt_text("a fox") {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("text encoder"), "{m}"),
        r => panic!("text switch without an encoder: {r:?}"),
    }
    // An engine error (recorded noise that runs out) is reported once, after the blocks
    // finished before it; then the stream has ended.
    drop(st);
    let g = common::golden();
    let bf = g.opts.block_frames;
    let go = GenerateOptions {
        local_attn: Some(2 * bf),
        ..g.opts.clone()
    };
    let mut st = Stream::open(
        &g.engine,
        go,
        g.noise.clone(),
        g.prompt.clone(),
        StreamOptions::default(),
    )
    .unwrap();
    let mut blocks = 0;
    let err = loop {
        match st.next_block(None) {
            Ok(Some(_)) => blocks += 1,
            Ok(None) => unreachable!(),
            Err(e) => break e,
        }
    };
    assert!(
        blocks <= g.frames / bf,
        "{} recorded frames, {blocks} blocks",
        g.frames
    );
    assert!(err.to_string().contains("recorded noise"), "{err}");
    assert!(matches!(
        st.next_block(None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(st.next().is_none());
}

#[test]
fn cuda_stream_on_the_emulated_device_matches_the_cpu() {
    use blockcascade::backend::cuda::{set_session_options, CudaOptions};
    let engine = Engine::open(None).unwrap();
    set_session_options(Some(CudaOptions {
        emulate: true,
        ..CudaOptions::default()
    }));
    let o = GenerateOptions {
        backend: BackendKind::Cuda,
        ..opts(Schedule::Cascade { lag: 2 })
    };
    let st = Stream::open(
        &engine,
        o,
        NoiseSource::Seeded(4),
        prompt(&engine, 1),
        StreamOptions::default(),
    );
    let got: Result<Vec<Vec<f32>>, Error> =
        st.and_then(|s| s.take(4).map(|b| b.map(|b| b.latents)).collect());
    set_session_options(None);
    let got: Vec<f32> = got.unwrap().concat();
    let cpu: Vec<f32> = fixed_run(
        &engine,
        &opts(Schedule::Cascade { lag: 2 }),
        4,
        &prompt(&engine, 1),
        &[],
        4,
    )
    .concat();
    let err = common::rel_l2(&cpu, &got);
    println!("emulated CUDA stream vs CPU: rel L2 {err:.3e}");
    assert!(err < 2e-2, "rel L2 {err}");
}

/// How long a liveness wait for a block may take before the test fails instead of hanging (a
/// guard, not a time assertion).
const HANG_GUARD: Duration = Duration::from_secs(300);

/// The next block, failing the test instead of hanging if none comes.
fn next(st: &mut Stream) -> blockcascade::StreamBlock {
    st.next_block(Some(HANG_GUARD))
        .unwrap()
        .expect("no block came: the stream stalled")
}

/// A switch whose encode holds until released: (its thread, "encode started", release).
type HeldSwitch = (
    std::thread::JoinHandle<blockcascade::Result<blockcascade::stream::SwitchReport>>,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
);

/// Starts a switch to `p` on another thread whose encode waits for the release.
fn held_switch(ctl: blockcascade::StreamControl, p: PromptEmbeds) -> HeldSwitch {
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        ctl.switch_prompt_with(|| {
            let _ = started_tx.send(());
            let _ = released.recv();
            Ok(p)
        })
    });
    (h, started, release)
}

#[test]
fn blocks_keep_coming_while_a_switch_encodes_and_it_lands_at_its_block() {
    let engine = Engine::open(None).unwrap();
    let (p0, p1) = (prompt(&engine, 1), prompt(&engine, 2));
    for schedule in [Schedule::Sequential, Schedule::Cascade { lag: 1 }] {
        let o = opts(schedule);
        let mut st = Stream::open(
            &engine,
            o.clone(),
            NoiseSource::Seeded(4),
            p0.clone(),
            StreamOptions::default(),
        )
        .unwrap();
        let mut got = vec![next(&mut st)];
        let ctl = st.control();
        let (h, started, release) = held_switch(ctl.clone(), p1.clone());
        started.recv().unwrap();
        let before = ctl.next_start();
        // The encode holds: the worker goes on starting and finishing blocks that had not
        // started when the encode began (a stall would hang here until the guard fails it).
        while got.last().unwrap().index < before + 2 {
            got.push(next(&mut st));
        }
        let last = got.last().unwrap().index;
        assert!(ctl.next_start() > last);
        release.send(()).unwrap();
        let r = h.join().unwrap().unwrap();
        assert!(!r.superseded);
        assert!(r.posted >= r.called);
        // Every block taken had started before the switch was handed to the worker.
        assert!(r.applies_from > last, "{} vs {last}", r.applies_from);
        let at = r.applies_from as usize;
        while got.len() < at + 2 {
            got.push(next(&mut st));
        }
        let want = fixed_run(&engine, &o, 4, &p0, &[(at, p1.clone())], at + 2);
        let got: Vec<Vec<f32>> = got.into_iter().map(|b| b.latents).collect();
        assert!(got == want, "{schedule:?}: the switch landed at block {at}");
        // The start of the switch's block is known, and after the switch was posted.
        let started_at = ctl
            .block_started(r.applies_from)
            .expect("start of the block");
        assert!(started_at >= r.posted);
    }
}

#[test]
fn the_latest_call_wins_even_when_an_earlier_encode_finishes_last() {
    let engine = Engine::open(None).unwrap();
    let (p0, pa, pb) = (prompt(&engine, 1), prompt(&engine, 2), prompt(&engine, 3));
    let o = opts(Schedule::Sequential);
    let mut st = Stream::open(
        &engine,
        o.clone(),
        NoiseSource::Seeded(6),
        p0.clone(),
        StreamOptions::default(),
    )
    .unwrap();
    let mut got = vec![next(&mut st)];
    let ctl = st.control();
    // A is called first and encodes slowly; B is called later and is ready at once.
    let (h, started, release) = held_switch(ctl.clone(), pa.clone());
    started.recv().unwrap();
    let b = ctl.switch_prompt(&pb).unwrap();
    got.push(next(&mut st));
    release.send(()).unwrap();
    let ra = h.join().unwrap().unwrap();
    assert!(ra.superseded, "A was overtaken by the later call B");
    assert_eq!(
        ra.applies_from, b,
        "an overtaken switch reports where B applies"
    );
    // B was posted and A never was: the stream is the fixed schedule switching to B only.
    let at = b as usize;
    while got.len() < at + 3 {
        got.push(next(&mut st));
    }
    let want = fixed_run(&engine, &o, 6, &p0, &[(at, pb.clone())], at + 3);
    let got: Vec<Vec<f32>> = got.into_iter().map(|b| b.latents).collect();
    assert!(got == want, "B from block {at}, A nowhere");
    // Made one after the other, the second call wins too (it replaces or follows the first).
    let c1 = ctl.switch_prompt(&pa).unwrap();
    let c2 = ctl.switch_prompt_with(|| Ok(pb.clone())).unwrap();
    assert!(!c2.superseded && c2.applies_from >= c1);
}

#[test]
fn a_cancel_during_an_encode_ends_the_switch_and_a_stopped_stream_encodes_nothing() {
    let engine = Engine::open(None).unwrap();
    let mut st = Stream::open(
        &engine,
        opts(Schedule::Sequential),
        NoiseSource::Seeded(7),
        prompt(&engine, 1),
        StreamOptions::default(),
    )
    .unwrap();
    next(&mut st);
    let ctl = st.control();
    let (h, started, release) = held_switch(ctl.clone(), prompt(&engine, 2));
    started.recv().unwrap();
    ctl.cancel();
    assert!(matches!(st.next_block(None), Err(Error::Cancelled)));
    release.send(()).unwrap();
    assert!(matches!(h.join().unwrap(), Err(Error::Cancelled)));
    let mut encoded = false;
    let r = ctl.switch_prompt_with(|| {
        encoded = true;
        Ok(prompt(&engine, 3))
    });
    assert!(matches!(r, Err(Error::Cancelled)));
    assert!(!encoded, "a stopped stream does not run the encoder");
}

#[test]
fn text_switches_report_cache_hits_on_either_encode_pool() {
    let engine = Engine::open(None).unwrap();
    for threads in [Some(0), Some(1), None] {
        let enc = Arc::new(TextEncoder::tiny(0));
        let mut st = Stream::open(
            &engine,
            opts(Schedule::Sequential),
            NoiseSource::Seeded(8),
            prompt(&engine, 1),
            StreamOptions {
                text_encoder: Some(enc.clone()),
                switch_encode_threads: threads,
                ..Default::default()
            },
        )
        .unwrap();
        next(&mut st);
        let ctl = st.control();
        let a = ctl.switch_prompt_text_report("a red fox").unwrap();
        assert!(!a.cached && !a.superseded, "{threads:?}");
        assert_eq!(enc.cached(), 1);
        next(&mut st);
        let b = ctl.switch_prompt_text_report("a red fox").unwrap();
        assert!(
            b.cached,
            "{threads:?}: the second switch to the same text is a cache hit"
        );
        assert!(b.applies_from >= a.applies_from);
    }
}
