//! One WebSocket connection: reads control messages, runs at most one stream, and sends each
//! finished block as a header and its JPEG frames.

use super::protocol::{Action, Incoming, Protocol, ServerMessage};
use super::{Shared, Slot};
use crate::stream::{Stream, StreamBlock, StreamControl, StreamOptions, SwitchReport};
use crate::{Error, NoiseSource, Result};
use axum::extract::ws::{Message, WebSocket};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What the pump thread hands to the connection.
enum Item {
    /// A block: its header and one JPEG per frame.
    Block(ServerMessage, Vec<Vec<u8>>),
    /// The stream failed; it has ended.
    Failed(String),
}

/// A running stream, seen from the connection.
struct Live {
    control: StreamControl,
    items: mpsc::Receiver<Item>,
    /// Fires when the pump has dropped the stream (worker joined) and given its slot back.
    done: oneshot::Receiver<()>,
}

impl Live {
    /// Cancels the stream and waits until it is gone.
    async fn end(self) {
        self.control.cancel();
        drop(self.items);
        let _ = self.done.await;
    }
}

/// How often the pump looks whether its connection is gone while the stream makes a block.
const POLL: Duration = Duration::from_millis(100);

/// Serves one connection until the client closes it or goes away.
pub(super) async fn run(mut socket: WebSocket, shared: Arc<Shared>) {
    let mut proto = Protocol::new();
    let mut live: Option<Live> = None;
    // Prompt switches encode off this loop, so that blocks keep going out meanwhile.
    let (acks, mut acked) = mpsc::channel::<ServerMessage>(1);
    let mut sw = Switching {
        acks,
        in_flight: false,
        pending: None,
    };
    // When the connection last received something or last ran a stream: one that runs none
    // and receives nothing for `ws_idle_timeout` is closed (idle sockets would otherwise hold
    // the server's connections for good).
    let mut active = tokio::time::Instant::now();
    loop {
        if live.is_some() {
            active = tokio::time::Instant::now();
        }
        let idle_at = active + shared.ws_idle_timeout;
        tokio::select! {
            // The client's messages first: a switch or a stop waits for at most the block
            // being sent, never for the blocks queued behind it. Then switch answers (rare
            // and small: a stream that always has a block ready does not hold them back).
            biased;
            msg = socket.recv() => {
                let Some(Ok(msg)) = msg else { break };
                active = tokio::time::Instant::now();
                let action = match &msg {
                    Message::Text(t) => proto.on_message(Incoming::Text(t.as_str())),
                    Message::Binary(b) => proto.on_message(Incoming::Binary(b)),
                    Message::Close(_) => break,
                    // Pings are answered by the WebSocket layer.
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                if !act(action, &mut socket, &shared, &mut proto, &mut live, &mut sw).await {
                    break;
                }
            }
            Some(reply) = acked.recv() => {
                active = tokio::time::Instant::now();
                sw.in_flight = false;
                // The newest switch that waited for this one goes next.
                if let (Some(prompt), Some(l)) = (sw.pending.take(), live.as_ref()) {
                    sw.start(l, prompt);
                }
                if !send(&mut socket, reply).await {
                    break;
                }
            }
            item = next_item(&mut live) => {
                // A stream that just ended or failed was activity: its last block may have
                // taken longer than the idle timeout.
                active = tokio::time::Instant::now();
                let sent = match item {
                    Some(Item::Block(header, frames)) => send_block(&mut socket, header, frames).await,
                    Some(Item::Failed(m)) => {
                        end(&mut live, &mut proto).await;
                        send(&mut socket, ServerMessage::error(format!("the stream failed: {m}"))).await
                    }
                    None => {
                        end(&mut live, &mut proto).await;
                        true
                    }
                };
                if !sent {
                    break;
                }
            }
            _ = tokio::time::sleep_until(idle_at), if live.is_none() && !sw.in_flight => {
                let close = Message::Close(Some(axum::extract::ws::CloseFrame {
                    code: axum::extract::ws::close_code::NORMAL,
                    reason: "idle timeout".into(),
                }));
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                break;
            }
        }
    }
    // The client is gone: free its stream now.
    if let Some(l) = live.take() {
        l.end().await;
    }
}

/// The next item of the running stream; never resolves when none runs.
async fn next_item(live: &mut Option<Live>) -> Option<Item> {
    match live {
        Some(l) => l.items.recv().await,
        None => std::future::pending().await,
    }
}

async fn end(live: &mut Option<Live>, proto: &mut Protocol) {
    if let Some(l) = live.take() {
        l.end().await;
    }
    proto.stopped();
}

/// Sends one JSON message; `false` when the connection is gone.
async fn send(socket: &mut WebSocket, m: ServerMessage) -> bool {
    socket.send(Message::Text(m.to_json().into())).await.is_ok()
}

/// Sends a block header and its frames, nothing in between.
async fn send_block(socket: &mut WebSocket, header: ServerMessage, frames: Vec<Vec<u8>>) -> bool {
    if !send(socket, header).await {
        return false;
    }
    for f in frames {
        if socket.send(Message::Binary(f.into())).await.is_err() {
            return false;
        }
    }
    true
}

/// Carries out one decision of the protocol; `false` closes the connection.
async fn act(
    action: Action,
    socket: &mut WebSocket,
    shared: &Arc<Shared>,
    proto: &mut Protocol,
    live: &mut Option<Live>,
    sw: &mut Switching,
) -> bool {
    match action {
        Action::Nothing => true,
        Action::Reply(m) => send(socket, m).await,
        Action::Stop => {
            end(live, proto).await;
            sw.drop_pending(socket).await
        }
        Action::Switch { prompt } => {
            let Some(l) = live.as_ref() else {
                return send(socket, ServerMessage::error("no stream is running")).await;
            };
            if !sw.in_flight {
                sw.start(l, prompt);
                return true;
            }
            // One encode at a time per connection: the newest switch waits for it, and one
            // that waited is replaced (the latest switch wins).
            match sw.pending.replace(prompt) {
                Some(_) => send(socket, ServerMessage::error(REPLACED)).await,
                None => true,
            }
        }
        Action::Start { prompt, seed } => {
            // A new start replaces this connection's stream: the old one goes first, so that
            // its place is free again.
            end(live, proto).await;
            if !sw.drop_pending(socket).await {
                return false;
            }
            let Some(slot) = Slot::acquire(shared) else {
                let _ = send(socket, ServerMessage::Busy).await;
                let _ = socket.send(Message::Close(None)).await;
                return false;
            };
            let sh = shared.clone();
            let r = tokio::task::spawn_blocking(move || open(&sh, &prompt, seed, slot)).await;
            match r {
                Ok(Ok(l)) => {
                    *live = Some(l);
                    proto.started();
                    send(socket, ServerMessage::Started).await
                }
                Ok(Err(e)) => {
                    send(socket, ServerMessage::error(format!("cannot start: {e}"))).await
                }
                Err(_) => {
                    send(
                        socket,
                        ServerMessage::error("cannot start (internal error)"),
                    )
                    .await
                }
            }
        }
    }
}

/// The answer to a switch replaced by a later one while it waited for an encode.
const REPLACED: &str =
    "prompt switch not applied: a later switch replaced it while an earlier one was encoding";

/// A connection's prompt switches: at most one encoding (off the connection's loop), and the
/// newest one waiting for it.
struct Switching {
    /// Where the encoding switch answers.
    acks: mpsc::Sender<ServerMessage>,
    in_flight: bool,
    pending: Option<String>,
}

impl Switching {
    /// Starts encoding `prompt` for `live`'s stream on the blocking pool (not on the
    /// runtime's threads); its answer comes through `acks`.
    fn start(&mut self, live: &Live, prompt: String) {
        let control = live.control.clone();
        let acks = self.acks.clone();
        self.in_flight = true;
        tokio::spawn(async move {
            let r = tokio::task::spawn_blocking(move || control.switch_prompt_text_report(&prompt))
                .await;
            let _ = acks.send(switch_reply(r)).await;
        });
    }

    /// The stream ended: a switch still waiting is answered and dropped (it was for that
    /// stream); `false` when the connection is gone.
    async fn drop_pending(&mut self, socket: &mut WebSocket) -> bool {
        match self.pending.take() {
            Some(_) => {
                let m = "prompt switch not applied: the stream stopped before it was encoded";
                send(socket, ServerMessage::error(m)).await
            }
            None => true,
        }
    }
}

/// The answer to a prompt switch.
fn switch_reply(
    r: std::result::Result<Result<SwitchReport>, tokio::task::JoinError>,
) -> ServerMessage {
    match r {
        Ok(Ok(r)) if r.superseded => ServerMessage::error(format!(
            "prompt switch not applied: a later switch was ready first (it applies from block {})",
            r.applies_from
        )),
        Ok(Ok(r)) => ServerMessage::PromptAck {
            applies_from: r.applies_from,
        },
        Ok(Err(e)) => ServerMessage::error(format!("prompt switch refused: {e}")),
        Err(_) => ServerMessage::error("prompt switch failed (internal error)"),
    }
}

/// Opens a stream for `prompt` and starts its pump thread (blocking: encodes the prompt).
fn open(shared: &Arc<Shared>, prompt: &str, seed: u64, slot: Slot) -> Result<Live> {
    let embeds = shared.text.prompt_embeds(prompt, shared.engine.config())?;
    let sopts = StreamOptions {
        // Clients get frames only: with the decoder beside the DiT, no latents come to the host.
        host_latents: false,
        queue_blocks: shared.queue_blocks,
        target_fps: shared.fps,
        decoder: Some(shared.decoder.clone()),
        decoder_device: Some(shared.decoder_device),
        switch_encode_threads: Some(0),
        text_encoder: Some(shared.text.clone()),
    };
    let stream = Stream::open(
        &*shared.engine,
        shared.generate.clone(),
        NoiseSource::Seeded(seed),
        embeds,
        sopts,
    )?;
    let control = stream.control();
    // One block in the channel: with the stream's own queue, that is all that waits.
    let (tx, items) = mpsc::channel(1);
    let (done_tx, done) = oneshot::channel();
    let quality = shared.jpeg_quality;
    let spawned = std::thread::Builder::new()
        .name("bc-serve-pump".into())
        .spawn(move || {
            pump(stream, &tx, quality);
            // `stream` is dropped (its worker joined) before the slot is given back.
            drop(slot);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        control.cancel();
        return Err(Error::Internal(format!("cannot start a thread: {e}")));
    }
    Ok(Live {
        control,
        items,
        done,
    })
}

/// Moves blocks from the stream to the connection, JPEG-encoding their frames, until the
/// stream ends or the connection is gone; then drops the stream.
fn pump(mut stream: Stream, tx: &mpsc::Sender<Item>, quality: u8) {
    loop {
        match stream.next_block(Some(POLL)) {
            Ok(Some(b)) => {
                let item = match encode_block(&b, quality) {
                    Ok((header, frames)) => Item::Block(header, frames),
                    Err(e) => Item::Failed(e.to_string()),
                };
                let failed = matches!(item, Item::Failed(_));
                if tx.blocking_send(item).is_err() || failed {
                    break;
                }
            }
            Ok(None) if tx.is_closed() => break,
            Ok(None) => {}
            Err(Error::Cancelled) => break,
            Err(e) => {
                let _ = tx.blocking_send(Item::Failed(e.to_string()));
                break;
            }
        }
    }
}

/// A block's header and its frames as JPEG files.
fn encode_block(b: &StreamBlock, quality: u8) -> Result<(ServerMessage, Vec<Vec<u8>>)> {
    let rgb = b
        .rgb
        .as_deref()
        .ok_or_else(|| Error::Internal("a block came without pixels".into()))?;
    let frames = encode_jpegs(rgb, b.pixel_frames, b.pixel_height, b.pixel_width, quality)?;
    let header = ServerMessage::Block {
        index: b.index,
        frames: frames.len(),
        width: b.pixel_width,
        height: b.pixel_height,
    };
    Ok((header, frames))
}

/// Encodes `frames` RGB8 frames (`[frames][h][w][3]`) as baseline JPEG files.
pub(crate) fn encode_jpegs(
    rgb: &[u8],
    frames: usize,
    h: usize,
    w: usize,
    quality: u8,
) -> Result<Vec<Vec<u8>>> {
    let frame = h.saturating_mul(w).saturating_mul(3);
    if frames.checked_mul(frame) != Some(rgb.len()) {
        return Err(Error::invalid(format!(
            "{} bytes of RGB are not {frames} frames of {w}x{h}",
            rgb.len()
        )));
    }
    let (Ok(w16), Ok(h16)) = (u16::try_from(w), u16::try_from(h)) else {
        return Err(Error::invalid(format!(
            "a {w}x{h} frame is too large for JPEG"
        )));
    };
    (0..frames)
        .map(|i| {
            let mut out = Vec::new();
            jpeg_encoder::Encoder::new(&mut out, quality)
                .encode(
                    &rgb[i * frame..(i + 1) * frame],
                    w16,
                    h16,
                    jpeg_encoder::ColorType::Rgb,
                )
                .map_err(|e| Error::invalid(format!("JPEG encoding failed: {e}")))?;
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_become_jpeg_files() {
        let (w, h) = (24, 16);
        let rgb: Vec<u8> = (0..2 * w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let jpegs = encode_jpegs(&rgb, 2, h, w, 80).unwrap();
        assert_eq!(jpegs.len(), 2);
        for j in &jpegs {
            assert_eq!(&j[..2], &[0xFF, 0xD8], "SOI marker");
            assert_eq!(&j[j.len() - 2..], &[0xFF, 0xD9], "EOI marker");
        }
        assert_ne!(jpegs[0], jpegs[1]);
        assert!(encode_jpegs(&rgb[1..], 2, h, w, 80).is_err());
        assert!(encode_jpegs(&[], 1, 1, 70_000, 80).is_err());
    }
}
