//! A generation started from inside rayon's global pool, when that pool has a single worker:
//! the executor's noise thread must not wait on rayon work that only the (blocked) caller
//! could run. A hang is turned into a failure by a timeout. Own test binary: it sets up the
//! global pool with one thread.

use blockcascade::{Engine, GenerateOptions, Generator, NoiseSource, PromptEmbeds, Schedule};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn generation_inside_a_one_thread_global_pool_finishes() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("the global pool is set up once, here");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let res = rayon::scope(|_| {
            let e = Engine::builtin("tiny")?;
            let prompt = PromptEmbeds::builtin(e.config(), 0);
            let opts = GenerateOptions {
                schedule: Schedule::Cascade { lag: 1 },
                ..Default::default()
            };
            let gen = Generator::new(e.model(), opts, NoiseSource::Seeded(1), &prompt)?;
            gen.generate(3).map(|(lat, _)| lat)
        });
        let _ = tx.send(res);
    });
    let lat = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("generation inside the rayon pool hung")
        .unwrap();
    assert!(!lat.is_empty() && lat.iter().all(|v| v.is_finite()));
}
