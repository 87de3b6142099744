//! A small client of the server's protocol for the tests: WebSocket messages with deadlines,
//! block reading that checks the framing, and a plain HTTP GET.

use blockcascade::serve::protocol::{ClientMessage, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any one expected message may take (a generous bound: tests must not hang).
pub const WAIT: Duration = Duration::from_secs(60);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What came over the socket.
#[derive(Debug)]
pub enum Got {
    Json(ServerMessage),
    Frame(Vec<u8>),
    /// The server closed the connection (or it broke).
    Closed,
}

pub async fn connect(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("WebSocket connect");
    ws
}

pub async fn send(ws: &mut Ws, m: &ClientMessage) {
    send_text(ws, &m.to_json()).await;
}

/// Sends a prompt switch.
pub async fn switch(ws: &mut Ws, prompt: &str) {
    send(
        ws,
        &ClientMessage::Prompt {
            prompt: prompt.into(),
        },
    )
    .await;
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// The next message (pings and pongs skipped).
pub async fn recv(ws: &mut Ws) -> Got {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no message from the server in time");
        return match m {
            Some(Ok(Message::Text(t))) => Got::Json(
                ServerMessage::parse(t.as_str())
                    .unwrap_or_else(|| panic!("not a server message: {t}")),
            ),
            Some(Ok(Message::Binary(b))) => Got::Frame(b.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Got::Closed,
        };
    }
}

/// The next JSON message; panics on a frame or a close.
pub async fn recv_json(ws: &mut Ws) -> ServerMessage {
    match recv(ws).await {
        Got::Json(m) => m,
        other => panic!("expected a JSON message, got {other:?}"),
    }
}

/// A block as received.
#[derive(Debug)]
pub struct Block {
    pub index: u64,
    pub width: usize,
    pub height: usize,
    pub frames: Vec<Vec<u8>>,
}

/// Reads the frames that follow a block header, checking that nothing comes in between and
/// that each is a JPEG file.
pub async fn read_frames(ws: &mut Ws, header: &ServerMessage) -> Block {
    let ServerMessage::Block {
        index,
        frames,
        width,
        height,
    } = *header
    else {
        panic!("not a block header: {header:?}")
    };
    assert!(frames > 0 && width > 0 && height > 0, "{header:?}");
    let mut out = Vec::with_capacity(frames);
    for i in 0..frames {
        match recv(ws).await {
            Got::Frame(j) => {
                assert!(
                    j.starts_with(&[0xFF, 0xD8]) && j.ends_with(&[0xFF, 0xD9]),
                    "frame {i} of block {index} is not a JPEG file"
                );
                out.push(j);
            }
            other => panic!("block {index}: frame {i} of {frames} expected, got {other:?}"),
        }
    }
    Block {
        index,
        width,
        height,
        frames: out,
    }
}

/// Reads messages until the next block, which it returns with the JSON messages seen before
/// it (acks, errors).
pub async fn next_block(ws: &mut Ws) -> (Block, Vec<ServerMessage>) {
    let mut other = Vec::new();
    loop {
        match recv(ws).await {
            Got::Json(h @ ServerMessage::Block { .. }) => {
                return (read_frames(ws, &h).await, other)
            }
            Got::Json(m) => other.push(m),
            Got::Frame(_) => panic!("a frame without a block header"),
            Got::Closed => panic!("closed while waiting for a block"),
        }
    }
}

/// Waits for `started`, skipping what is left of the previous stream (the rest of a block that
/// was on its way when `stop` or a new `start` arrived).
pub async fn await_started(ws: &mut Ws) {
    loop {
        match recv(ws).await {
            Got::Json(h @ ServerMessage::Block { .. }) => {
                read_frames(ws, &h).await;
            }
            Got::Json(ServerMessage::Started) => return,
            other => panic!("waiting for started: {other:?}"),
        }
    }
}

/// `GET path` over HTTP/1.1: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("HTTP response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    // The bodies here are small and sent whole; undo chunking if the server used it.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// `/health`: (streams, max_streams).
pub async fn health(addr: SocketAddr) -> (u64, u64) {
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("health is JSON");
    (
        v["streams"].as_u64().expect("streams"),
        v["max_streams"].as_u64().expect("max_streams"),
    )
}

/// Waits until `/health` reports no stream (streams end shortly after their client leaves:
/// the worker finishes its current step first).
pub async fn wait_no_streams(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (n, _) = health(addr).await;
        if n == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} streams still run long after their clients left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `serve` command running in its own process; killed when dropped.
pub struct ServeProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl ServeProcess {
    /// Starts `blockcascade serve --port 0 ARGS` and reads its address from the first line it
    /// prints.
    pub fn start(args: &[&str]) -> ServeProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_blockcascade"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the serve command");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok());
        let mut p = ServeProcess {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        p.addr = addr.unwrap_or_else(|| panic!("no address in {line:?}"));
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
