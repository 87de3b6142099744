//! Fuzz target of the `serve` WebSocket protocol: the message handling of one connection as a
//! function over bytes, without a socket.

use super::split_files;
use crate::serve::protocol::{
    parse_client, Action, Incoming, Protocol, ServerMessage, MAX_ERROR_CHARS,
};
use crate::weights::builtin_config;
use crate::{Error, Result, TextEncoder};
use std::sync::OnceLock;

/// The messages of one connection, joined by [`super::FILE_SEPARATOR`]. A message's first byte
/// says its kind (even: text, odd: binary); the rest is its payload (text that is not UTF-8 is
/// read lossily, as no WebSocket text message can be). Each goes through the connection's
/// [`Protocol`] with the stream simulated (starts succeed, blocks advance one per message),
/// and the prompts of `start` and `prompt` are encoded by the built-in text encoder for the
/// built-in tiny model, as the server does.
///
/// Oracles (an [`Error::Internal`] when broken): every reply reads back to itself from its
/// JSON; error replies stay short; a message that parses re-serializes to itself; a switch or
/// a stop is only decided while a stream runs.
pub fn serve_messages(bytes: &[u8]) -> Result<()> {
    static TEXT: OnceLock<TextEncoder> = OnceLock::new();
    let text = TEXT.get_or_init(|| TextEncoder::tiny(0));
    let cfg = builtin_config("tiny")?;
    let mut proto = Protocol::new();
    let mut next_block = 0u64;
    for part in split_files(bytes) {
        let Some((&kind, payload)) = part.split_first() else {
            continue;
        };
        let owned;
        let msg = if kind % 2 == 0 {
            owned = String::from_utf8_lossy(payload).into_owned();
            if let Ok(m) = parse_client(&owned) {
                if parse_client(&m.to_json()).as_ref() != Ok(&m) {
                    return Err(Error::Internal(format!(
                        "{m:?} does not read back from its JSON"
                    )));
                }
            }
            Incoming::Text(&owned)
        } else {
            Incoming::Binary(payload)
        };
        let was_streaming = proto.streaming();
        let reply = match proto.on_message(msg) {
            Action::Nothing => None,
            Action::Reply(m) => Some(m),
            Action::Stop | Action::Switch { .. } if !was_streaming => {
                return Err(Error::Internal(
                    "a switch or stop was decided with no stream running".into(),
                ))
            }
            Action::Stop => {
                proto.stopped();
                None
            }
            Action::Switch { prompt } => Some(match text.prompt_embeds(&prompt, &cfg) {
                Ok(_) => ServerMessage::PromptAck {
                    applies_from: next_block + 1,
                },
                Err(e) => ServerMessage::error(format!("prompt switch refused: {e}")),
            }),
            Action::Start { prompt, .. } => Some(match text.prompt_embeds(&prompt, &cfg) {
                Ok(_) => {
                    proto.started();
                    next_block = 0;
                    ServerMessage::Started
                }
                Err(e) => ServerMessage::error(format!("cannot start: {e}")),
            }),
        };
        if let Some(r) = reply {
            if let ServerMessage::Error { message } = &r {
                if message.chars().count() > MAX_ERROR_CHARS {
                    return Err(Error::Internal(format!(
                        "an error reply of {} characters",
                        message.chars().count()
                    )));
                }
            }
            if ServerMessage::parse(&r.to_json()).as_ref() != Some(&r) {
                return Err(Error::Internal(format!(
                    "{r:?} does not read back from its JSON"
                )));
            }
        }
        if proto.streaming() {
            next_block += 1;
        }
    }
    Ok(())
}
