//! Cascade behaviour beyond the golden files: determinism, streaming, prompt switches,
//! bounded memory on long streams.

mod common;
use blockcascade::prompt::{PromptEmbeds, PromptSwitch};
use blockcascade::{
    AttentionMode, Engine, Error, GenerateOptions, Generator, NoiseSource, Recache, Schedule,
};

fn opts(lag: Option<usize>, mode: AttentionMode) -> GenerateOptions {
    GenerateOptions {
        height: 4,
        width: 6,
        schedule: lag.map_or(Schedule::Sequential, |lag| Schedule::Cascade { lag }),
        attention: mode,
        ..Default::default()
    }
}

#[test]
fn every_lag_is_deterministic_and_streams_in_order() {
    let e = Engine::builtin("tiny").unwrap();
    let p = PromptEmbeds::builtin(e.config(), 0);
    for lag in 1..=4 {
        for mode in [AttentionMode::Causal, AttentionMode::Bidirectional] {
            let g = Generator::new(e.model(), opts(Some(lag), mode), NoiseSource::Seeded(9), &p)
                .unwrap();
            let mut order = Vec::new();
            let mut a = Vec::new();
            g.run(4, |b| {
                order.push(b.index);
                a.extend_from_slice(b.latents);
                true
            })
            .unwrap();
            assert_eq!(order, vec![0, 1, 2, 3]);
            let (b, _) = g.generate(4).unwrap();
            assert_eq!(a, b, "lag {lag} is not deterministic");
            let (c, _) = Generator::new(
                e.model(),
                opts(Some(lag), mode),
                NoiseSource::Seeded(10),
                &p,
            )
            .unwrap()
            .generate(4)
            .unwrap();
            assert_ne!(a, c, "the seed must matter");
        }
    }
}

#[test]
fn a_callback_can_stop_the_run() {
    let e = Engine::builtin("tiny").unwrap();
    let p = PromptEmbeds::builtin(e.config(), 0);
    let g = Generator::new(
        e.model(),
        opts(Some(1), AttentionMode::Causal),
        NoiseSource::Seeded(1),
        &p,
    )
    .unwrap();
    let mut seen = 0;
    let r = g.run(5, |_| {
        seen += 1;
        seen < 2
    });
    assert!(matches!(r, Err(Error::Cancelled)));
    assert_eq!(seen, 2);
}

#[test]
fn prompt_switch_changes_only_later_blocks_and_recache_costs_a_pass() {
    let e = Engine::builtin("tiny").unwrap();
    let cfg = e.config();
    let p0 = PromptEmbeds::builtin(cfg, 0);
    let p1 = PromptEmbeds::builtin(cfg, 1);
    let flen = 16 * 4 * 6 * 3;
    for lag in [1, 4] {
        let base = Generator::new(
            e.model(),
            opts(Some(lag), AttentionMode::Causal),
            NoiseSource::Seeded(3),
            &p0,
        )
        .unwrap();
        let (a, _) = base.generate(4).unwrap();
        let sw = [PromptSwitch {
            block: 2,
            embeds: p1.clone(),
        }];
        let mut g = Generator::new(
            e.model(),
            opts(Some(lag), AttentionMode::Causal),
            NoiseSource::Seeded(3),
            &p0,
        )
        .unwrap();
        g.set_prompt_schedule(&sw).unwrap();
        let (b, rb) = g.generate(4).unwrap();
        assert_eq!(rb.recache_passes, 0);
        // Blocks before the switch are final before block 2 starts: unchanged.
        assert_eq!(a[..2 * flen], b[..2 * flen]);
        assert_ne!(a[2 * flen..], b[2 * flen..]);
        let mut o = opts(Some(lag), AttentionMode::Causal);
        o.recache = Recache::Window;
        let mut g = Generator::new(e.model(), o, NoiseSource::Seeded(3), &p0).unwrap();
        g.set_prompt_schedule(&sw).unwrap();
        let (c, rc) = g.generate(4).unwrap();
        assert_eq!(c[..2 * flen], b[..2 * flen]);
        if lag == 4 {
            // Sequential: block 0 is in the cache when block 2 starts and is re-run; block 1's
            // context pass (merged into block 2's first step) runs under the new prompt.
            assert_eq!(rc.recache_passes, 1);
            assert_eq!(rc.recache_frames, 3);
            assert!(rc.recache_seconds > 0.0);
            assert_eq!(rc.forward_passes, rb.forward_passes + 1);
            assert_ne!(
                c[2 * flen..],
                b[2 * flen..],
                "recache must change what later blocks see"
            );
        } else {
            // Lag 1: nothing is committed yet when block 2 starts, so there is nothing to re-run;
            // block 1's later context pass is encoded under the prompt of its reader, block 2.
            assert_eq!(rc.recache_passes, 0);
            assert_eq!(rc.forward_passes, rb.forward_passes);
            assert_ne!(c[2 * flen..], b[2 * flen..]);
        }
    }
}

#[test]
fn every_switch_recaches() {
    let e = Engine::builtin("tiny").unwrap();
    let cfg = e.config();
    let p0 = PromptEmbeds::builtin(cfg, 0);
    let p1 = PromptEmbeds::builtin(cfg, 1);
    let mut o = opts(None, AttentionMode::Causal);
    o.recache = Recache::Window;
    let mut g = Generator::new(e.model(), o.clone(), NoiseSource::Seeded(4), &p0).unwrap();
    g.set_prompt_schedule(&[
        PromptSwitch {
            block: 1,
            embeds: p1.clone(),
        },
        PromptSwitch {
            block: 2,
            embeds: p1,
        },
    ])
    .unwrap();
    let (a, r) = g.generate(3).unwrap();
    // The switch at block 1 finds an empty cache; the one at block 2 re-runs block 0.
    assert_eq!(r.recache_passes, 1);
    assert_eq!(r.recache_frames, 3);
    assert!(a.iter().all(|v| v.is_finite()));
}

#[test]
fn long_stream_with_local_window_runs_in_constant_memory_past_1024_frames() {
    let e = Engine::builtin("tiny").unwrap();
    let p = PromptEmbeds::builtin(e.config(), 0);
    let o = GenerateOptions {
        height: 2,
        width: 2,
        local_attn: Some(6),
        sink: 3,
        schedule: Schedule::Cascade { lag: 2 },
        ..Default::default()
    };
    let g = Generator::new(e.model(), o, NoiseSource::Seeded(5), &p).unwrap();
    let blocks = 350; // 1050 frames
    let mut bytes = Vec::new();
    let mut last = Vec::new();
    let mut first = Vec::new();
    let r = g
        .run(blocks, |b| {
            bytes.push(b.cache_bytes);
            assert!(
                b.latents.iter().all(|v| v.is_finite()),
                "block {} not finite",
                b.index
            );
            if b.index == 0 {
                first = b.latents.to_vec();
            }
            if b.index + 1 == blocks {
                last = b.latents.to_vec();
            }
            true
        })
        .unwrap();
    assert_eq!(bytes.len(), blocks);
    // The ring (3 sink + 3 recent frames) is full after a few blocks; from then on the cache
    // does not grow, however long the stream.
    assert!(
        bytes[5..].iter().all(|&b| b == bytes[5] && b > 0),
        "cache size changed: {:?}",
        &bytes[..8]
    );
    assert_eq!(r.max_cache_bytes, bytes[5]);
    assert_ne!(first, last);
    // The global cache, in contrast, grows with the video.
    let g2 = Generator::new(
        e.model(),
        GenerateOptions {
            height: 2,
            width: 2,
            ..Default::default()
        },
        NoiseSource::Seeded(5),
        &p,
    )
    .unwrap();
    let mut gb = Vec::new();
    g2.run(6, |b| {
        gb.push(b.cache_bytes);
        true
    })
    .unwrap();
    assert!(gb[5] > gb[1]);
}
