//! Soak: concurrent clients that start, switch, stop, restart, disconnect mid-stream and send
//! garbage, for a bounded time; afterwards no stream may be left and the server must still
//! serve. `bounded()` runs in `cargo test`; `long_soak` (ignored) is what `scripts/soak.sh`
//! runs against the `serve` command in its own process, watching its memory.

use super::client::*;
use blockcascade::serve::protocol::{ClientMessage, ServerMessage};
use futures_util::SinkExt;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Tallies of a soak.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub connections: u64,
    pub started: u64,
    pub busy: u64,
    pub blocks: u64,
    pub frames: u64,
    pub acks: u64,
    pub errors: u64,
    pub abrupt_disconnects: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.connections += o.connections;
        self.started += o.started;
        self.busy += o.busy;
        self.blocks += o.blocks;
        self.frames += o.frames;
        self.acks += o.acks;
        self.errors += o.errors;
        self.abrupt_disconnects += o.abrupt_disconnects;
    }
}

/// A small deterministic generator (xorshift64*), so a failing soak can be rerun.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

const GARBAGE: &[&str] = &[
    "",
    "null",
    "{\"type\":\"start\"",
    "{\"type\":\"prompt\",\"prompt\":[]}",
    "{\"type\":\"launch\"}",
    "[\"start\"]",
    "{\"type\":\"start\",\"prompt\":\"x\",\"seed\":1e99}",
    "\u{0}\u{1}\u{2}",
];

/// Reads until the start is answered: `true` for started, `false` for busy (then closed).
/// Frames and headers of a replaced stream may still come first.
async fn await_start(ws: &mut Ws, t: &mut Tally) -> bool {
    loop {
        match recv(ws).await {
            Got::Json(ServerMessage::Started) => {
                t.started += 1;
                return true;
            }
            Got::Json(ServerMessage::Busy) => {
                t.busy += 1;
                assert!(matches!(recv(ws).await, Got::Closed), "busy, then close");
                return false;
            }
            Got::Json(ServerMessage::Error { .. }) => t.errors += 1,
            Got::Json(ServerMessage::PromptAck { .. }) => t.acks += 1,
            Got::Json(h @ ServerMessage::Block { .. }) => {
                read_frames(ws, &h).await;
            }
            Got::Frame(_) => panic!("a frame outside a block"),
            Got::Closed => panic!("closed while starting"),
        }
    }
}

/// One client's life until `until`: sessions of random length and ending.
async fn client(addr: SocketAddr, seed: u64, until: Instant) -> Tally {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut t = Tally::default();
    while Instant::now() < until {
        t.connections += 1;
        let mut ws = connect(addr).await;
        if rng.below(2) == 0 {
            let g = GARBAGE[rng.below(GARBAGE.len() as u64) as usize];
            send_text(&mut ws, g).await;
            match recv_json(&mut ws).await {
                ServerMessage::Error { .. } => t.errors += 1,
                other => panic!("garbage {g:?} answered with {other:?}"),
            }
        }
        let prompt = format!("soak prompt {}", rng.below(1000));
        send(
            &mut ws,
            &ClientMessage::Start {
                prompt,
                seed: rng.below(10),
            },
        )
        .await;
        if !await_start(&mut ws, &mut t).await {
            tokio::time::sleep(Duration::from_millis(20 + rng.below(80))).await;
            continue;
        }
        let want = 1 + rng.below(4);
        let mut next_index = 0;
        let mut got = 0;
        while got < want {
            match recv(&mut ws).await {
                Got::Json(h @ ServerMessage::Block { .. }) => {
                    let b = read_frames(&mut ws, &h).await;
                    assert_eq!(b.index, next_index, "blocks in order");
                    next_index += 1;
                    got += 1;
                    t.blocks += 1;
                    t.frames += b.frames.len() as u64;
                    match rng.below(6) {
                        0 => {
                            send(
                                &mut ws,
                                &ClientMessage::Prompt {
                                    prompt: format!("switch {}", rng.below(100)),
                                },
                            )
                            .await
                        }
                        1 => {
                            let g = GARBAGE[rng.below(GARBAGE.len() as u64) as usize];
                            send_text(&mut ws, g).await;
                        }
                        2 => {
                            ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
                        }
                        _ => {}
                    }
                }
                Got::Json(ServerMessage::PromptAck { applies_from }) => {
                    assert!(applies_from >= 1);
                    t.acks += 1;
                }
                Got::Json(ServerMessage::Error { .. }) => t.errors += 1,
                other => panic!("while streaming: {other:?}"),
            }
        }
        match rng.below(4) {
            // Gone mid-stream, no close frame: the TCP connection just drops.
            0 | 1 => {
                t.abrupt_disconnects += 1;
                drop(ws);
            }
            // A polite stop and close.
            2 => {
                send(&mut ws, &ClientMessage::Stop).await;
                let _ = ws.close(None).await;
            }
            // Restart on the same connection, then leave.
            _ => {
                send(
                    &mut ws,
                    &ClientMessage::Start {
                        prompt: "restart".into(),
                        seed: 5,
                    },
                )
                .await;
                if await_start(&mut ws, &mut t).await {
                    let _ = ws.close(None).await;
                }
            }
        }
    }
    t
}

/// `clients` clients for `secs` seconds against `addr`; returns the tallies.
pub async fn soak(addr: SocketAddr, clients: u64, secs: f64) -> Tally {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|i| tokio::spawn(client(addr, i + 1, until)))
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        total.add(&t.await.expect("a soak client panicked"));
    }
    total
}

/// The soak in `cargo test`: 6 clients, 3 seconds, 2 streams at most.
pub async fn bounded() {
    let server = super::start_server(2, 0.0);
    let addr = server.addr();
    let t = soak(addr, 6, 3.0).await;
    eprintln!("bounded soak: {t:?}");
    assert!(t.blocks > 0 && t.started > 0, "{t:?}");
    wait_no_streams(addr).await;
    // Still serving.
    let mut ws = connect(addr).await;
    send(
        &mut ws,
        &ClientMessage::Start {
            prompt: "after the soak".into(),
            seed: 0,
        },
    )
    .await;
    assert_eq!(recv_json(&mut ws).await, ServerMessage::Started);
    let (b, _) = next_block(&mut ws).await;
    assert_eq!(b.index, 0);
    drop(ws);
    wait_no_streams(addr).await;
    server.stop().expect("clean stop");
}

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The long soak of `scripts/soak.sh`: `BC_SOAK_SECONDS` (default 60) with `BC_SOAK_CLIENTS`
/// (default 8) clients against the `serve` command (`--max-streams 4`) in its own process; its
/// resident memory is sampled every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/soak.sh"]
async fn long_soak() {
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let secs = env("BC_SOAK_SECONDS", 60.0);
    let clients = env("BC_SOAK_CLIENTS", 8.0) as u64;
    let server = ServeProcess::start(&["--max-streams", "4", "--fps", "0"]);
    let (addr, pid) = (server.addr, server.pid());
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while let Some(r) = rss_kib(pid) {
            samples.push(r);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        samples
    });
    let t = soak(addr, clients, secs).await;
    wait_no_streams(addr).await;
    let after = rss_kib(pid);
    drop(server);
    let samples = sampler.await.unwrap_or_default();
    let n = samples.len();
    let warm = samples.get(n / 5).copied().unwrap_or(0);
    let peak = samples.iter().copied().max().unwrap_or(0);
    println!(
        "soak: {secs} s, {clients} clients: {t:?}\nsoak: server RSS after warm-up {warm} KiB, \
         peak {peak} KiB, at the end (no streams) {after:?} KiB, {n} samples"
    );
    assert!(t.blocks > 0, "{t:?}");
    // A leak grows with the number of streams served; warm-up allocations do not.
    if let Some(a) = after {
        assert!(
            a <= warm.max(1) * 2 + 64 * 1024,
            "server memory grew from {warm} to {a} KiB"
        );
    }
}
