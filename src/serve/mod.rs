//! `blockcascade serve`: live streams over HTTP and WebSocket, with a viewer page.
//!
//! - `GET /`: the viewer (one self-contained HTML page, [`PAGE`]);
//! - `GET /health`: `{"streams": n, "max_streams": m}`;
//! - WebSocket `/ws`: JSON control messages in, block headers and JPEG frames out
//!   ([`protocol`], documented for client authors in `docs/server.md`).
//!
//! Each WebSocket runs at most one stream: a [`crate::stream::Stream`] (which owns its
//! generation worker) drained by a pump thread that JPEG-encodes each block's frames and hands
//! them to the connection's task. The async runtime only moves bytes: generation, decoding,
//! text encoding and JPEG encoding all run on their own threads. Backpressure goes all the way
//! back: a slow socket stops the pump, which leaves the stream's bounded queue full, which
//! pauses the engine.

pub mod protocol;
mod session;

use crate::decode::{DecodeDevice, Decoder};
use crate::text::{TextDevice, TextPrecision};
use crate::TextEncoder;
use crate::{Engine, Error, GenerateOptions, Generator, NoiseSource, PromptEmbeds, Result};
use axum::extract::{State, WebSocketUpgrade};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The viewer page, with `/*BC_CONFIG*/null` standing for the server's settings (filled in by
/// [`Server::load`]).
pub const PAGE: &str = include_str!("page.html");

/// Settings of a server.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Model directory (`None`: the built-in tiny model with the built-in tiny decoder and
    /// text encoder; the pictures are noise-like).
    pub model: Option<PathBuf>,
    /// Decoder weights (Wan VAE or TAEHV); required with `model`.
    pub vae: Option<PathBuf>,
    /// umT5 text encoder (a folder or one file); required with `model`.
    pub text_encoder: Option<PathBuf>,
    /// The tokenizer.json of the text encoder (default: beside it).
    pub tokenizer: Option<PathBuf>,
    /// Where the text encoder runs (`None`: where `generate.backend` runs; `Some(Cpu)` keeps
    /// the GPU's memory for the DiT).
    pub text_encoder_device: Option<TextDevice>,
    /// The text encoder's arithmetic on the CPU (default exact; bf16 is upstream's rounding,
    /// faster).
    pub text_encoder_precision: TextPrecision,
    /// Where the decoder runs (`None`: where `generate.backend` runs, on the DiT's first GPU
    /// with CUDA, only JPEG-bound RGB8 coming back; `Some(DecodeDevice::Cpu)` keeps the GPU's
    /// memory for the DiT).
    pub decoder_device: Option<DecodeDevice>,
    /// Address to listen on (loopback unless told otherwise).
    pub host: String,
    /// Port (0: any free port).
    pub port: u16,
    /// Streams that may run at once; a client asking for one more gets `busy`.
    pub max_streams: usize,
    /// Generation settings of every stream (the seed comes with each `start`).
    pub generate: GenerateOptions,
    /// Pixel frames per second each stream is paced to, and the page shows (0: as fast as
    /// they are made).
    pub fps: f64,
    /// Finished blocks a stream may hold ahead of its consumer.
    pub queue_blocks: usize,
    /// JPEG quality, 1..=100.
    pub jpeg_quality: u8,
    /// Connections (HTTP and WebSocket, idle ones included) open at once, at most
    /// [`MAX_CONNECTIONS`]; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Connections kept for plain HTTP requests (the page, `/health`): WebSockets may hold at
    /// most `max_connections` minus this many, and a WebSocket request beyond that is
    /// answered `503 Service Unavailable`, so the page still loads while the WebSockets'
    /// share is taken. `None`: an eighth of `max_connections`, at least 1. At least 1, and
    /// `max_connections` minus it must leave `max_streams` WebSockets.
    pub http_reserved: Option<usize>,
    /// How long a WebSocket that runs no stream may go without receiving anything (a message,
    /// a ping or a pong) before the server closes it; a connection with a running stream is
    /// never idle.
    pub ws_idle_timeout: Duration,
    /// How long a client may take to send a request's head (request line and headers), also
    /// the longest a kept-alive HTTP connection may sit idle between requests: a client that
    /// trickles its request (slowloris) is disconnected after it.
    pub request_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: None,
            vae: None,
            text_encoder: None,
            tokenizer: None,
            text_encoder_device: None,
            text_encoder_precision: TextPrecision::Exact,
            decoder_device: None,
            host: "127.0.0.1".into(),
            port: 7860,
            max_streams: 2,
            generate: GenerateOptions {
                local_attn: Some(DEFAULT_LOCAL_ATTN),
                sink: DEFAULT_SINK,
                ..GenerateOptions::default()
            },
            fps: 16.0,
            queue_blocks: 2,
            jpeg_quality: 85,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            http_reserved: None,
            ws_idle_timeout: DEFAULT_WS_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Local attention window (latent frames) of the streams when none is given: a stream needs
/// one so that its KV cache stays bounded (LongLive's short window).
pub const DEFAULT_LOCAL_ATTN: usize = 12;
/// Sink frames kept with [`DEFAULT_LOCAL_ATTN`] (LongLive's frame sink).
pub const DEFAULT_SINK: usize = 3;

/// Most streams `max_streams` accepts.
pub const MAX_STREAMS: usize = 1024;

/// Connections open at once by default ([`ServeConfig::max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Most connections `max_connections` accepts (each holds a file descriptor).
pub const MAX_CONNECTIONS: usize = 16384;

/// The connection limit for a server of `max_streams` streams when nobody chose one (the
/// CLI): [`DEFAULT_MAX_CONNECTIONS`], or twice the streams when that is more (each stream's
/// WebSocket holds a connection for its life, and its page, previews and reconnects need
/// more), at most [`MAX_CONNECTIONS`]. For any stream count `serve` accepts, the WebSockets'
/// share left by the default [`ServeConfig::http_reserved`] ([`default_http_reserved`]) still
/// holds `max_streams`.
pub fn default_max_connections(max_streams: usize) -> usize {
    DEFAULT_MAX_CONNECTIONS
        .max(max_streams.saturating_mul(2))
        .min(MAX_CONNECTIONS)
}
/// Time for a request's head by default ([`ServeConfig::request_timeout`]).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a WebSocket without a stream may stay silent by default
/// ([`ServeConfig::ws_idle_timeout`]).
pub const DEFAULT_WS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The connections kept for plain HTTP out of `max_connections` when nobody chose
/// ([`ServeConfig::http_reserved`]): an eighth, at least 1.
pub fn default_http_reserved(max_connections: usize) -> usize {
    (max_connections / 8).max(1)
}

/// What every connection shares: the loaded models, the settings and the stream count.
struct Shared {
    engine: Arc<Engine>,
    decoder: Arc<Decoder>,
    decoder_device: DecodeDevice,
    text: Arc<TextEncoder>,
    generate: GenerateOptions,
    fps: f64,
    queue_blocks: usize,
    jpeg_quality: u8,
    max_streams: usize,
    /// Streams running (slots held, see [`Slot`]).
    streams: AtomicUsize,
    /// The WebSockets' share of the connections (`max_connections - http_reserved`
    /// permits, one held by each open WebSocket).
    websockets: Arc<tokio::sync::Semaphore>,
    /// [`ServeConfig::ws_idle_timeout`].
    ws_idle_timeout: Duration,
    page: String,
}

/// One of the `max_streams` places: held from a stream's start until its worker has been
/// joined, so that `/health` counts what really runs.
struct Slot(Arc<Shared>);

impl Slot {
    fn acquire(shared: &Arc<Shared>) -> Option<Slot> {
        shared
            .streams
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < shared.max_streams).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(shared.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A loaded server, ready to listen.
pub struct Server {
    shared: Arc<Shared>,
    limits: Limits,
}

/// What bounds the connections of a server ([`ServeConfig::max_connections`] and
/// [`ServeConfig::request_timeout`]).
#[derive(Clone, Copy)]
struct Limits {
    max_connections: usize,
    request_timeout: Duration,
}

impl Server {
    /// Loads the models `cfg` names (or the built-in ones) and checks the settings.
    pub fn load(cfg: &ServeConfig) -> Result<Server> {
        if cfg.max_streams == 0 || cfg.max_streams > MAX_STREAMS {
            return Err(Error::invalid(format!(
                "--max-streams must be in 1..={MAX_STREAMS}, got {}",
                cfg.max_streams
            )));
        }
        // The streams' own range: a rate they refuse would fail every stream, not the start.
        let (lo, hi) = (crate::stream::MIN_TARGET_FPS, crate::stream::MAX_TARGET_FPS);
        if !(cfg.fps == 0.0 || (lo..=hi).contains(&cfg.fps)) {
            return Err(Error::invalid(format!(
                "--fps must be 0 (unpaced) or in {lo:e}..={hi:e}, got {}",
                cfg.fps
            )));
        }
        if cfg.queue_blocks == 0 || cfg.queue_blocks > crate::stream::MAX_QUEUE_BLOCKS {
            return Err(Error::invalid(format!(
                "--queue-blocks must be in 1..={}, got {}",
                crate::stream::MAX_QUEUE_BLOCKS,
                cfg.queue_blocks
            )));
        }
        if !(1..=100).contains(&cfg.jpeg_quality) {
            return Err(Error::invalid(format!(
                "--jpeg-quality must be in 1..=100, got {}",
                cfg.jpeg_quality
            )));
        }
        let reserved = cfg
            .http_reserved
            .unwrap_or_else(|| default_http_reserved(cfg.max_connections));
        if reserved == 0 {
            return Err(Error::invalid(
                "http_reserved must be at least 1 (a connection for the page and /health)",
            ));
        }
        if cfg.max_connections < cfg.max_streams.saturating_add(reserved)
            || cfg.max_connections > MAX_CONNECTIONS
        {
            return Err(Error::invalid(format!(
                "max_connections must be in --max-streams ({}) + http_reserved ({reserved})..={MAX_CONNECTIONS}, got {}",
                cfg.max_streams, cfg.max_connections
            )));
        }
        if cfg.request_timeout.is_zero() {
            return Err(Error::invalid("request_timeout must be positive"));
        }
        if cfg.ws_idle_timeout.is_zero() {
            return Err(Error::invalid("ws_idle_timeout must be positive"));
        }
        cfg.generate.validate(None)?;
        let builtin = cfg.model.is_none();
        if !builtin && (cfg.vae.is_none() || cfg.text_encoder.is_none()) {
            return Err(Error::invalid(
                "--model needs --vae (frames are decoded to pixels) and --text-encoder (prompts \
                 arrive as text)",
            ));
        }
        // Small files first: a bad decoder or encoder is reported before the model is mapped.
        let decoder = Arc::new(match &cfg.vae {
            Some(p) => Decoder::load(p, None)?,
            None => Decoder::tiny_taehv(0),
        });
        decoder.check_latent_size(
            decoder.latent_channels(),
            cfg.generate.height,
            cfg.generate.width,
        )?;
        let decoder_device = cfg.decoder_device.unwrap_or_else(|| {
            DecodeDevice::for_backend(cfg.generate.backend, &cfg.generate.device_ids)
        });
        // A GPU that is not there fails the load, not every stream.
        decoder_device.check()?;
        let text = match &cfg.text_encoder {
            Some(p) => TextEncoder::load(p, cfg.tokenizer.as_deref())?,
            None => TextEncoder::tiny(0),
        };
        let device = cfg
            .text_encoder_device
            .unwrap_or(TextDevice::for_backend(cfg.generate.backend));
        let text = Arc::new(
            text.with_precision(cfg.text_encoder_precision)
                .on_device_with(device, &cfg.generate.device_ids)?,
        );
        let engine = Arc::new(Engine::open(cfg.model.as_deref())?);
        text.check_model(engine.config())?;
        // What every stream will check at its start, checked once now (local attention, the
        // memory the KV cache and activations need).
        let probe = PromptEmbeds::builtin(engine.config(), 0);
        Generator::new(
            engine.model(),
            cfg.generate.clone(),
            NoiseSource::Seeded(0),
            &probe,
        )?
        .check_live()?;
        let (ph, pw) = decoder.pixel_size(cfg.generate.height, cfg.generate.width);
        if ph > u16::MAX as usize || pw > u16::MAX as usize {
            return Err(Error::invalid(format!(
                "frames of {pw}x{ph} pixels are too large for JPEG (at most 65535 a side)"
            )));
        }
        let page_cfg = serde_json::json!({
            "fps": cfg.fps,
            "noise_like": builtin && cfg.vae.is_none(),
            "model": engine.source(),
            "decoder": decoder.kind().to_string(),
            "decoder_device": decoder_device.name(),
            "text_encoder": text.source(),
            "width": pw,
            "height": ph,
            "max_streams": cfg.max_streams,
        });
        let page = PAGE.replacen("/*BC_CONFIG*/null", &page_cfg.to_string(), 1);
        Ok(Server {
            shared: Arc::new(Shared {
                engine,
                decoder,
                decoder_device,
                text,
                generate: cfg.generate.clone(),
                fps: cfg.fps,
                queue_blocks: cfg.queue_blocks,
                jpeg_quality: cfg.jpeg_quality,
                max_streams: cfg.max_streams,
                streams: AtomicUsize::new(0),
                websockets: Arc::new(tokio::sync::Semaphore::new(cfg.max_connections - reserved)),
                ws_idle_timeout: cfg.ws_idle_timeout,
                page,
            }),
            limits: Limits {
                max_connections: cfg.max_connections,
                request_timeout: cfg.request_timeout,
            },
        })
    }

    /// Streams running now.
    pub fn streams(&self) -> usize {
        self.shared.streams.load(Ordering::SeqCst)
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/health", get(health))
            .route("/ws", get(ws))
            .with_state(self.shared.clone())
    }

    /// Starts listening on `host:port` on a thread of its own and returns at once (port 0
    /// picks a free port: see [`RunningServer::addr`]).
    pub fn start(self, host: &str, port: u16) -> Result<RunningServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bc-serve")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
        // Bound here (blocking, outside any runtime) so that the address is known at once and a
        // caller inside another runtime can start a server too.
        let listener = std::net::TcpListener::bind((host, port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| Error::io(format!("{host}:{port}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io(format!("{host}:{port}"), e))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = self.router();
        let limits = self.limits;
        let thread = std::thread::Builder::new()
            .name("bc-serve-main".into())
            .spawn(move || {
                let served = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    accept_loop(listener, app, limits, stop_rx).await
                });
                // Open WebSockets are not waited for: their tasks end with the runtime, which
                // drops their streams (cancel + join).
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
                served.map_err(|e| Error::io(addr.to_string(), e))
            })
            .map_err(|e| Error::Internal(format!("cannot start the server thread: {e}")))?;
        Ok(RunningServer {
            addr,
            shared: self.shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// A server listening on its own thread; dropping it stops it.
pub struct RunningServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Streams running now.
    pub fn streams(&self) -> usize {
        self.shared.streams.load(Ordering::SeqCst)
    }

    /// Blocks until the server stops by itself (it only does on an I/O error).
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Internal("the server thread panicked".into())),
            None => Ok(()),
        }
    }

    /// Stops listening, ends every connection and its stream, and waits.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Internal("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Loads the server `cfg` describes, listens, prints the address and serves until the process
/// ends.
pub fn run(cfg: &ServeConfig) -> Result<()> {
    let server = Server::load(cfg)?;
    let source = server.shared.engine.source().to_string();
    let running = server.start(&cfg.host, cfg.port)?;
    println!(
        "blockcascade serve: http://{} (model {source}, at most {} streams)",
        running.addr(),
        cfg.max_streams
    );
    running.wait()
}

/// Serves the connections of `listener` until `stop` fires: at most `limits.max_connections`
/// at once (one more is closed at once), each with `limits.request_timeout` for every request
/// head. `axum::serve` has neither bound (hyper's header timeout needs a timer it does not
/// set), so a client could hold any number of connections open forever by sending nothing.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // A connection that failed before it was accepted, or no file descriptor left:
            // the listener itself is fine, try again (after a pause for the latter).
            Err(e) => {
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            // The permit goes with the socket, into the WebSocket after an upgrade too.
            let io = TokioIo::new(Counted {
                stream,
                _permit: permit,
            });
            let service = hyper_util::service::TowerToHyperService::new(app);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.request_timeout)
                .serve_connection(io, service)
                .with_upgrades()
                .await;
            // A client that went away or sent garbage: nothing to do but close.
            drop(served);
        });
    }
}

/// A connection's socket and its place among the server's `max_connections`.
struct Counted {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

async fn page(State(s): State<Arc<Shared>>) -> Html<String> {
    Html(s.page.clone())
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    let body = serde_json::json!({
        "streams": s.streams.load(Ordering::SeqCst),
        "max_streams": s.max_streams,
    });
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// Upgrades to a WebSocket when the WebSockets' share of the connections has room
/// ([`ServeConfig::http_reserved`]); else `503 Service Unavailable` (and the connection stays
/// an HTTP one).
async fn ws(State(s): State<Arc<Shared>>, up: WebSocketUpgrade) -> Response {
    let Ok(permit) = s.websockets.clone().try_acquire_owned() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // Frees the connection (one of those kept for plain HTTP) at once.
                (header::CONNECTION, "close"),
            ],
            "too many WebSocket connections: try again later\n",
        )
            .into_response();
    };
    up.max_message_size(protocol::MAX_MESSAGE_BYTES)
        .max_frame_size(protocol::MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            // The permit is held for the WebSocket's life.
            session::run(socket, s).await;
            drop(permit);
        })
}
