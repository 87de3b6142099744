//! What the server costs on top of the Stream API: time to the first frame and steady frames
//! per second, direct ([`Stream`] with the decoder) against through `serve` (the same stream,
//! plus JPEG encoding and the WebSocket on loopback, received by a Rust client), both unpaced,
//! on the built-in tiny model, decoder and text encoder (CPU).
//!
//! `cargo bench --bench serve -- [BLOCKS [REPS]]`: BLOCKS blocks per run (default 20; the
//! steady rate is over blocks 1..BLOCKS, the first block is the time to first frame), REPS
//! alternating runs of each (default 3, the median is reported).

use blockcascade::decode::Decoder;
use blockcascade::serve::protocol::{ClientMessage, ServerMessage};
use blockcascade::serve::{ServeConfig, Server};
use blockcascade::stream::{Stream, StreamOptions};
use blockcascade::{Engine, NoiseSource, Result, TextEncoder};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const PROMPT: &str = "a red fox runs through fresh snow at dawn";

/// One run: seconds to the first frame, frames per second after the first block, and CPU
/// milliseconds (all threads of this process: engine, decoder, server and client) per frame
/// after the first block.
#[derive(Clone, Copy, Debug)]
struct Run {
    first_frame: f64,
    fps: f64,
    cpu_ms_per_frame: f64,
}

/// CPU time of this process so far, in milliseconds (Linux: user + system time of all its
/// threads, in the kernel's 100 Hz ticks; 0 elsewhere).
fn cpu_ms() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) end with `)`.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() * 10.0
}

/// The prompt of run `rep`: a new text each run, so that neither path finds it in its text
/// encoder's cache.
fn prompt(rep: usize) -> String {
    format!("{PROMPT}, take {rep}")
}

fn direct(cfg: &ServeConfig, blocks: usize, rep: usize) -> Result<Run> {
    let engine = Engine::open(None)?;
    let text = Arc::new(TextEncoder::tiny(0));
    let decoder = Arc::new(Decoder::tiny_taehv(0));
    let t0 = Instant::now();
    let prompt = text.prompt_embeds(&prompt(rep), engine.config())?;
    let mut s = Stream::open(
        &engine,
        cfg.generate.clone(),
        NoiseSource::Seeded(0),
        prompt,
        StreamOptions {
            queue_blocks: cfg.queue_blocks,
            target_fps: 0.0,
            decoder: Some(decoder),
            decoder_device: None,
            host_latents: true,
            switch_encode_threads: Some(0),
            text_encoder: Some(text),
        },
    )?;
    let (mut first, mut t1, mut c1, mut frames) = (0.0, t0, 0.0, 0);
    for i in 0..blocks {
        let b = s
            .next_block(None)?
            .ok_or_else(|| blockcascade::Error::Internal("no block".into()))?;
        if i == 0 {
            first = t0.elapsed().as_secs_f64();
            t1 = Instant::now();
            c1 = cpu_ms();
        } else {
            frames += b.pixel_frames;
        }
    }
    Ok(Run {
        first_frame: first,
        fps: frames as f64 / t1.elapsed().as_secs_f64(),
        cpu_ms_per_frame: (cpu_ms() - c1) / frames as f64,
    })
}

async fn served(addr: std::net::SocketAddr, blocks: usize, rep: usize) -> Run {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    let start = ClientMessage::Start {
        prompt: prompt(rep),
        seed: 0,
    };
    let t0 = Instant::now();
    ws.send(Message::text(start.to_json())).await.expect("send");
    let (mut first, mut t1, mut c1, mut frames, mut block) = (None, t0, 0.0, 0usize, None);
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Binary(_) => {
                if first.is_none() {
                    first = Some(t0.elapsed().as_secs_f64());
                }
                if block.unwrap_or(0) >= 1 {
                    frames += 1;
                }
            }
            Message::Text(t) => match ServerMessage::parse(t.as_str()) {
                Some(ServerMessage::Block { index, .. }) => {
                    if index as usize >= blocks {
                        break;
                    }
                    if index == 1 {
                        t1 = Instant::now();
                        c1 = cpu_ms();
                    }
                    block = Some(index);
                }
                Some(ServerMessage::Started) => {}
                other => panic!("unexpected {other:?}"),
            },
            _ => {}
        }
    }
    // Frames of blocks 1..blocks arrived between the header of block 1 and that of block
    // `blocks`; the last of them at about the time the loop ended.
    let fps = frames as f64 / t1.elapsed().as_secs_f64();
    let cpu_ms_per_frame = (cpu_ms() - c1) / frames as f64;
    let _ = ws.close(None).await;
    Run {
        first_frame: first.unwrap_or(f64::NAN),
        fps,
        cpu_ms_per_frame,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (blocks, reps) = (num(0, 20).max(2), num(1, 3).max(1));
    let cfg = ServeConfig {
        port: 0,
        max_streams: 1,
        fps: 0.0,
        ..ServeConfig::default()
    };
    let server = match Server::load(&cfg).and_then(|s| s.start("127.0.0.1", 0)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("serve bench: {e}");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut d, mut s) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        match direct(&cfg, blocks, rep) {
            Ok(r) => d.push(r),
            Err(e) => {
                eprintln!("serve bench: {e}");
                std::process::exit(1);
            }
        }
        s.push(rt.block_on(served(server.addr(), blocks, rep)));
        // The server's stream ends (its client left) before the next direct run.
        while server.streams() > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let m = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let (dt, st) = (m(&d, |r| r.first_frame), m(&s, |r| r.first_frame));
    let (df, sf) = (m(&d, |r| r.fps), m(&s, |r| r.fps));
    let (dc, sc) = (m(&d, |r| r.cpu_ms_per_frame), m(&s, |r| r.cpu_ms_per_frame));
    let g = &cfg.generate;
    println!(
        "built-in tiny model, {}x{} latents, blocks of {}, {} steps, local attention {:?} + sink {}, \
         CPU; {blocks} blocks, median of {reps}",
        g.height,
        g.width,
        g.block_frames,
        g.steps.len(),
        g.local_attn,
        g.sink
    );
    println!("| path | first frame (ms) | steady frames/s | CPU ms per frame |");
    println!("|---|---|---|---|");
    for (name, t, f, c) in [
        ("Stream API (decoded RGB)", dt, df, dc),
        ("serve (JPEG over WebSocket)", st, sf, sc),
    ] {
        println!("| {name} | {:.1} | {:.1} | {c:.2} |", t * 1e3, f);
    }
    println!(
        "| serve / direct | {:.2}x | {:.2}x | {:.2}x |",
        st / dt,
        sf / df,
        sc / dc
    );
}
