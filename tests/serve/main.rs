//! `blockcascade serve` end to end on loopback: the protocol with a Rust WebSocket client, a
//! bounded soak, the command line, and the page in headless Chromium (`browser.rs`).
#![cfg(feature = "serve")]

mod browser;
mod client;
mod soak;

use blockcascade::serve::protocol::{ClientMessage, ServerMessage};
use blockcascade::serve::{RunningServer, ServeConfig, Server};
use client::*;
use std::time::Duration;

/// A server on a free loopback port with the built-in tiny models, unpaced (tests want blocks
/// as fast as they come).
pub fn start_server(max_streams: usize, fps: f64) -> RunningServer {
    let cfg = ServeConfig {
        port: 0,
        max_streams,
        fps,
        ..ServeConfig::default()
    };
    Server::load(&cfg)
        .expect("load")
        .start("127.0.0.1", 0)
        .expect("start")
}

fn start(prompt: &str, seed: u64) -> ClientMessage {
    ClientMessage::Start {
        prompt: prompt.into(),
        seed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sends_blocks_in_order_and_a_prompt_switch_is_acknowledged() {
    let server = start_server(2, 0.0);
    let addr = server.addr();
    let mut ws = connect(addr).await;
    send(&mut ws, &start("a red fox in the snow", 3)).await;
    assert_eq!(recv_json(&mut ws).await, ServerMessage::Started);
    let (b0, before) = next_block(&mut ws).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(b0.index, 0);
    // The built-in decoder: 8x upscale of the 8x12 latents.
    assert_eq!((b0.width, b0.height), (96, 64));
    assert_eq!(health(addr).await, (1, 2));

    switch(&mut ws, "a blue whale").await;
    // Blocks keep coming in order; the ack comes between two blocks, never inside one.
    let mut applies_from = None;
    let mut seen_after_switch = false;
    // The engine may be several blocks ahead of the client (queues), so the switch may apply
    // a few blocks later.
    for expect in 1..=40 {
        let (b, msgs) = next_block(&mut ws).await;
        assert_eq!(b.index, expect, "blocks come in order");
        for m in msgs {
            match m {
                ServerMessage::PromptAck { applies_from: a } => {
                    assert!(a >= 1, "the switch cannot apply to a block already sent");
                    applies_from = Some(a);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if let Some(a) = applies_from {
            if b.index >= a {
                seen_after_switch = true;
                break;
            }
        }
    }
    assert!(
        seen_after_switch,
        "the ack ({applies_from:?}) and a block it applies to arrived"
    );

    send(&mut ws, &ClientMessage::Stop).await;
    wait_no_streams(addr).await;
    // After stop the connection can start again.
    send(&mut ws, &start("again", 0)).await;
    await_started(&mut ws).await;
    let (b, _) = next_block(&mut ws).await;
    assert_eq!(b.index, 0, "a new stream starts at block 0");
    drop(ws);
    wait_no_streams(addr).await;
    server.stop().unwrap();
}

/// The ack tells the truth: with the same seed, the frames of a stream whose prompt was
/// switched equal those of an unswitched stream before the acknowledged block, and differ from
/// it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_change_exactly_from_the_acknowledged_block() {
    let server = start_server(1, 0.0);
    let addr = server.addr();
    let mut ws = connect(addr).await;
    send(&mut ws, &start("a lighthouse at night", 5)).await;
    assert_eq!(recv_json(&mut ws).await, ServerMessage::Started);
    let mut switched = vec![next_block(&mut ws).await.0];
    switch(&mut ws, "a desert in daylight").await;
    let mut applies_from = None;
    while applies_from.is_none_or(|a| (switched.len() as u64) <= a) {
        let (b, msgs) = next_block(&mut ws).await;
        for m in msgs {
            if let ServerMessage::PromptAck { applies_from: a } = m {
                applies_from = Some(a);
            }
        }
        switched.push(b);
    }
    let a = applies_from.unwrap();
    send(&mut ws, &start("a lighthouse at night", 5)).await;
    await_started(&mut ws).await;
    for b in &switched {
        let (same, _) = next_block(&mut ws).await;
        assert_eq!(same.index, b.index);
        if b.index < a {
            assert_eq!(
                same.frames, b.frames,
                "block {} is before the switch",
                b.index
            );
        } else {
            assert_ne!(
                same.frames, b.frames,
                "block {} has the new prompt",
                b.index
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_an_error_and_the_connection_stays_usable() {
    let server = start_server(1, 0.0);
    let addr = server.addr();
    let mut ws = connect(addr).await;
    for bad in [
        "not json",
        "{}",
        r#"{"type":"rewind"}"#,
        r#"{"type":"start","prompt":1}"#,
        r#"{"type":"start","prompt":"p","seed":-4}"#,
        r#"{"type":"prompt","prompt":"no stream yet"}"#,
    ] {
        send_text(&mut ws, bad).await;
        match recv_json(&mut ws).await {
            ServerMessage::Error { message } => assert!(!message.is_empty()),
            other => panic!("{bad}: {other:?}"),
        }
    }
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::binary(vec![0xFF, 0xD8, 1]),
    )
    .await
    .unwrap();
    assert!(matches!(
        recv_json(&mut ws).await,
        ServerMessage::Error { .. }
    ));
    // `stop` with nothing running is harmless and silent; then a real start works.
    send(&mut ws, &ClientMessage::Stop).await;
    send(&mut ws, &start("", 1)).await;
    assert_eq!(recv_json(&mut ws).await, ServerMessage::Started);
    // Garbage while streaming: an error between blocks, and the blocks go on.
    send_text(&mut ws, "{{{{").await;
    let mut errors = 0;
    let mut i = 0;
    while errors == 0 || i < 2 {
        let (b, msgs) = next_block(&mut ws).await;
        assert_eq!(b.index, i);
        i += 1;
        errors += msgs
            .iter()
            .filter(|m| matches!(m, ServerMessage::Error { .. }))
            .count();
        assert!(i < 100, "no error reply");
    }
    assert_eq!(errors, 1);
    drop(ws);
    wait_no_streams(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_says_busy_and_closes_and_a_leaving_client_frees_its_place() {
    let server = start_server(1, 0.0);
    let addr = server.addr();
    let mut a = connect(addr).await;
    // An idle connection holds no place.
    let mut b = connect(addr).await;
    send(&mut a, &start("first", 0)).await;
    assert_eq!(recv_json(&mut a).await, ServerMessage::Started);
    assert_eq!(health(addr).await, (1, 1));
    send(&mut b, &start("second", 0)).await;
    assert_eq!(recv_json(&mut b).await, ServerMessage::Busy);
    assert!(matches!(recv(&mut b).await, Got::Closed));
    // A restarts its stream: it keeps its place.
    let _ = next_block(&mut a).await;
    send(&mut a, &start("first, again", 1)).await;
    await_started(&mut a).await;
    // A goes away mid-stream without a close: its place is free again.
    drop(a);
    wait_no_streams(addr).await;
    let mut c = connect(addr).await;
    send(&mut c, &start("third", 0)).await;
    assert_eq!(recv_json(&mut c).await, ServerMessage::Started);
    let (blk, _) = next_block(&mut c).await;
    assert_eq!(blk.index, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_health_are_served() {
    let server = start_server(3, 16.0);
    let addr = server.addr();
    let (status, page) = http_get(addr, "/").await;
    assert_eq!(status, 200);
    for part in [
        "<canvas",
        "id=\"prompt\"",
        "id=\"start\"",
        "id=\"switch\"",
        "id=\"stop\"",
    ] {
        assert!(page.contains(part), "the page has {part}");
    }
    // The server's settings replace the placeholder; the built-in models are announced.
    assert!(!page.contains("/*BC_CONFIG*/null"));
    assert!(
        page.contains("\"noise_like\":true"),
        "noise-like note enabled"
    );
    assert!(page.contains("\"fps\":16.0"));
    // Self-contained: nothing is loaded from elsewhere.
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert_eq!(health(addr).await, (0, 3));
    let (status, _) = http_get(addr, "/nothing-here").await;
    assert_eq!(status, 404);
}

/// What a raw connection gets before the server closes it (`None`: still open after `wait`).
async fn read_until_closed(s: &mut tokio::net::TcpStream, wait: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    match tokio::time::timeout(wait, s.read_to_end(&mut buf)).await {
        Ok(_) => Some(buf),
        Err(_) => None,
    }
}

/// A client that sends part of a request head and then nothing (slowloris), or nothing at
/// all, is disconnected after `request_timeout`; a WebSocket is not (its request is done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_is_cut_off_after_the_request_timeout() {
    use tokio::io::AsyncWriteExt;
    let cfg = ServeConfig {
        port: 0,
        fps: 0.0,
        request_timeout: Duration::from_millis(200),
        ..ServeConfig::default()
    };
    let server = Server::load(&cfg).unwrap().start("127.0.0.1", 0).unwrap();
    let addr = server.addr();
    let mut ws = connect(addr).await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A bound far beyond the 200 ms: without the timeout these stay open for good.
    let bound = Duration::from_secs(10);
    let got = read_until_closed(&mut slow, bound).await;
    assert!(got.is_some(), "a trickled request head kept its connection");
    assert!(read_until_closed(&mut silent, bound).await.is_some());
    // The WebSocket outlived the timeout and still works.
    send(&mut ws, &start("still here", 0)).await;
    assert_eq!(recv_json(&mut ws).await, ServerMessage::Started);
    let (b, _) = next_block(&mut ws).await;
    assert_eq!(b.index, 0);
}

/// Connections beyond `max_connections` (idle ones and WebSockets count) are closed without an
/// answer; once one leaves, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    use tokio::io::AsyncWriteExt;
    let cfg = ServeConfig {
        port: 0,
        max_streams: 1,
        max_connections: 2,
        ..ServeConfig::default()
    };
    let server = Server::load(&cfg).unwrap().start("127.0.0.1", 0).unwrap();
    let addr = server.addr();
    let ws = connect(addr).await;
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET").await.unwrap();
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The write may fail once the server has closed the socket.
    let _ = third.write_all(request.as_bytes()).await;
    let got = read_until_closed(&mut third, WAIT).await;
    assert_eq!(
        got.as_deref(),
        Some(&b""[..]),
        "a third connection was served"
    );
    drop(ws);
    drop(idle);
    // The server notices the closed sockets shortly after: a new client gets its answer.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(request.as_bytes()).await;
        let got = read_until_closed(&mut c, WAIT).await.unwrap_or_default();
        if got.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        assert!(
            tokio::time::Instant::now() < deadline,
            "no place came free after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Idle WebSockets holding the WebSockets' share of the connections (`max_connections -
/// http_reserved`) do not lock the server: one more WebSocket is answered 503, the page and
/// `/health` still load on the connections kept for HTTP, and a WebSocket is accepted again
/// once one leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_cannot_take_the_connections_kept_for_http() {
    let cfg = ServeConfig {
        port: 0,
        max_streams: 1,
        max_connections: 4,
        http_reserved: Some(2),
        ..ServeConfig::default()
    };
    let server = Server::load(&cfg).unwrap().start("127.0.0.1", 0).unwrap();
    let addr = server.addr();
    let a = connect(addr).await;
    let _b = connect(addr).await;
    let url = format!("ws://{addr}/ws");
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
        .await
        .expect("an answer in time")
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 503);
            let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("too many WebSocket connections"), "{body}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a WebSocket beyond the WebSockets' share was accepted"),
    }
    let (status, page) = http_get(addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"start\""));
    assert_eq!(health(addr).await, (0, 1));
    drop(a);
    // The server notices the closed socket shortly after.
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio_tungstenite::connect_async(&url).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no WebSocket place came free after a client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket that runs no stream and receives nothing for `ws_idle_timeout` is closed;
/// pings count as traffic, and a connection with a running stream is not idle while the
/// client only reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_and_pings_keep_one_open() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let idle_timeout = Duration::from_millis(500);
    let cfg = ServeConfig {
        port: 0,
        max_streams: 1,
        fps: 0.0,
        ws_idle_timeout: idle_timeout,
        ..ServeConfig::default()
    };
    let server = Server::load(&cfg).unwrap().start("127.0.0.1", 0).unwrap();
    let addr = server.addr();
    let mut idle = connect(addr).await;
    let mut pinging = connect(addr).await;
    // More than two idle periods, a ping every fifth of one (room for a loaded machine).
    for _ in 0..12 {
        pinging.send(Message::Ping(vec![1u8].into())).await.unwrap();
        tokio::time::sleep(idle_timeout / 5).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(10), recv(&mut idle))
        .await
        .expect("an idle WebSocket stayed open");
    assert!(matches!(got, Got::Closed), "{got:?}");
    // The pinged one is still open and works; while its stream runs the client only reads,
    // for more than an idle period.
    send(&mut pinging, &start("still here", 0)).await;
    await_started(&mut pinging).await;
    let t = tokio::time::Instant::now();
    while t.elapsed() < idle_timeout * 2 {
        next_block(&mut pinging).await;
    }
}

/// The path with files: a Wan model directory, a TAEHV decoder and a umT5 text encoder with
/// its tokenizer (the tiny golden files of the test data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_model_files_streams_and_switches() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let cfg = ServeConfig {
        model: Some(data.join("selfforcing-tiny/model")),
        vae: Some(data.join("decode/taehv-tiny/taehv")),
        text_encoder: Some(data.join("umt5-tiny/text_encoder")),
        port: 0,
        fps: 0.0,
        ..ServeConfig::default()
    };
    let server = Server::load(&cfg).unwrap().start("127.0.0.1", 0).unwrap();
    let addr = server.addr();
    let (_, page) = http_get(addr, "/").await;
    assert!(page.contains("\"noise_like\":false"));
    let mut ws = connect(addr).await;
    send(&mut ws, &start("a fox in the snow", 1)).await;
    assert_eq!(recv_json(&mut ws).await, ServerMessage::Started);
    let (b0, _) = next_block(&mut ws).await;
    assert_eq!((b0.index, b0.width, b0.height), (0, 96, 64));
    switch(&mut ws, "a whale").await;
    let mut acked = false;
    for _ in 0..40 {
        let (_, msgs) = next_block(&mut ws).await;
        if msgs
            .iter()
            .any(|m| matches!(m, ServerMessage::PromptAck { .. }))
        {
            acked = true;
            break;
        }
    }
    assert!(acked);
}

#[test]
fn bad_settings_are_refused_before_listening() {
    let bad = |f: fn(&mut ServeConfig)| {
        let mut c = ServeConfig::default();
        f(&mut c);
        Server::load(&c).err().expect("refused").to_string()
    };
    assert!(bad(|c| c.max_streams = 0).contains("--max-streams"));
    assert!(bad(|c| c.fps = f64::NAN).contains("--fps"));
    // Rates the streams refuse are refused at the start, not by every stream.
    assert!(bad(|c| c.fps = 1e-300).contains("--fps"));
    assert!(bad(|c| c.fps = 1e300).contains("--fps"));
    assert!(bad(|c| c.jpeg_quality = 0).contains("--jpeg-quality"));
    assert!(bad(|c| c.model = Some("/nonexistent".into())).contains("--vae"));
    assert!(bad(|c| c.generate.height = 3).contains("even"));
    assert!(bad(|c| c.max_connections = 1).contains("max_connections"));
    assert!(bad(|c| c.request_timeout = Duration::ZERO).contains("request_timeout"));
    assert!(bad(|c| c.ws_idle_timeout = Duration::ZERO).contains("ws_idle_timeout"));
    assert!(bad(|c| c.http_reserved = Some(0)).contains("http_reserved"));
    // The WebSockets' share must hold max_streams.
    assert!(bad(|c| {
        c.max_connections = 4;
        c.max_streams = 2;
        c.http_reserved = Some(3);
    })
    .contains("max_connections"));
}

/// The `serve` command: starts, prints its address, answers `/health`; bad flags fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serve_command_listens_on_loopback() {
    let exe = env!("CARGO_BIN_EXE_blockcascade");
    let out = std::process::Command::new(exe)
        .args(["serve", "--max-streams", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-streams"));

    // More streams than the default connection limit (256): the CLI raises the limit with
    // them (`serve::default_max_connections`), or the server refuses to start.
    let server = ServeProcess::start(&["--max-streams", "300"]);
    let addr = server.addr;
    assert!(addr.ip().is_loopback(), "{addr}");
    let h = health(addr).await;
    drop(server);
    assert_eq!(h, (0, 300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_soak() {
    soak::bounded().await;
}

#[test]
fn browser_end_to_end() {
    browser::run();
}
