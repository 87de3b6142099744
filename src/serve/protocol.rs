//! The WebSocket protocol of `blockcascade serve`, as pure functions over message bytes: parsing
//! and validating what a client sends, the JSON the server sends back, and the per-connection
//! state machine that decides what a message does. No socket here: the session
//! (`session.rs`) carries the decisions out, and the fuzzer drives [`Protocol`] directly.
//!
//! The wire format is documented for client authors in `docs/server.md`.

use serde_json::{json, Map, Value};

/// Longest prompt accepted, in bytes of UTF-8 (the text encoder keeps at most the model's
/// `text_len` tokens anyway; this bounds the work a message can ask for).
pub const MAX_PROMPT_BYTES: usize = 4096;

/// Longest client message accepted by the socket, in bytes (a start message with the longest
/// prompt, JSON-escaped, fits many times over).
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

/// Longest `message` of an error reply, in characters: a reply never echoes a large input back.
pub const MAX_ERROR_CHARS: usize = 300;

/// A message a client sends (JSON text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    /// `{"type":"start","prompt":"...","seed":0}`: start a stream (replacing this connection's
    /// running one, if any). `seed` is optional (default 0).
    Start {
        /// The text prompt.
        prompt: String,
        /// Seed of the noise.
        seed: u64,
    },
    /// `{"type":"prompt","prompt":"..."}`: switch the running stream to a new prompt.
    Prompt {
        /// The new text prompt.
        prompt: String,
    },
    /// `{"type":"stop"}`: end the running stream.
    Stop,
}

impl ClientMessage {
    /// The message as the JSON text a client sends (what [`parse_client`] reads back).
    pub fn to_json(&self) -> String {
        match self {
            ClientMessage::Start { prompt, seed } => {
                json!({"type": "start", "prompt": prompt, "seed": seed})
            }
            ClientMessage::Prompt { prompt } => json!({"type": "prompt", "prompt": prompt}),
            ClientMessage::Stop => json!({"type": "stop"}),
        }
        .to_string()
    }
}

/// A JSON message the server sends. (Frames go as binary messages, one JPEG each, right after
/// their [`ServerMessage::Block`] header.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// The stream asked for by `start` is running.
    Started,
    /// A block's header: `frames` binary messages (JPEG, `width` x `height`) follow it with
    /// nothing in between.
    Block {
        /// Block index, from 0, increasing by one.
        index: u64,
        /// Frames (binary messages) that follow.
        frames: usize,
        /// Frame width in pixels.
        width: usize,
        /// Frame height in pixels.
        height: usize,
    },
    /// A prompt switch was accepted: blocks from `applies_from` on use the new prompt.
    PromptAck {
        /// First block index generated with the new prompt.
        applies_from: u64,
    },
    /// The server already runs `--max-streams` streams; it closes the connection after this.
    Busy,
    /// A malformed or unknown message, or a failure of the requested action. The connection
    /// stays usable.
    Error {
        /// What went wrong, for a person (at most [`MAX_ERROR_CHARS`] characters).
        message: String,
    },
}

impl ServerMessage {
    /// An [`ServerMessage::Error`] whose message is cut to [`MAX_ERROR_CHARS`] characters.
    pub fn error(message: impl Into<String>) -> Self {
        let m: String = message.into();
        let message = if m.chars().count() > MAX_ERROR_CHARS {
            let mut s: String = m.chars().take(MAX_ERROR_CHARS - 3).collect();
            s.push_str("...");
            s
        } else {
            m
        };
        ServerMessage::Error { message }
    }

    /// The message's JSON text.
    pub fn to_json(&self) -> String {
        match self {
            ServerMessage::Started => json!({"type": "started"}),
            ServerMessage::Block {
                index,
                frames,
                width,
                height,
            } => json!({"type": "block", "index": index, "frames": frames,
                        "width": width, "height": height}),
            ServerMessage::PromptAck { applies_from } => {
                json!({"type": "prompt_ack", "applies_from": applies_from})
            }
            ServerMessage::Busy => json!({"type": "busy"}),
            ServerMessage::Error { message } => json!({"type": "error", "message": message}),
        }
        .to_string()
    }

    /// Reads a server message back from its JSON text (for clients and tests). `None` for
    /// anything [`ServerMessage::to_json`] does not produce.
    pub fn parse(text: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(text).ok()?;
        let o = v.as_object()?;
        let u = |k: &str| o.get(k).and_then(Value::as_u64);
        let n = |k: &str| u(k).and_then(|x| usize::try_from(x).ok());
        Some(match o.get("type")?.as_str()? {
            "started" => ServerMessage::Started,
            "block" => ServerMessage::Block {
                index: u("index")?,
                frames: n("frames")?,
                width: n("width")?,
                height: n("height")?,
            },
            "prompt_ack" => ServerMessage::PromptAck {
                applies_from: u("applies_from")?,
            },
            "busy" => ServerMessage::Busy,
            "error" => ServerMessage::Error {
                message: o.get("message")?.as_str()?.to_string(),
            },
            _ => return None,
        })
    }
}

/// One WebSocket message as received: text or binary.
#[derive(Clone, Copy, Debug)]
pub enum Incoming<'a> {
    /// A text message (already valid UTF-8, as WebSocket requires).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

/// Parses a client's text message. The `Err` is the reply's message: what is wrong, short.
/// Unknown fields are ignored (a newer client may send more); unknown types are refused.
pub fn parse_client(text: &str) -> Result<ClientMessage, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    let Value::Object(o) = v else {
        return Err("a message must be a JSON object with a \"type\"".into());
    };
    let ty = match o.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err("\"type\" must be a string".into()),
        None => return Err("the message has no \"type\"".into()),
    };
    match ty {
        "start" => Ok(ClientMessage::Start {
            prompt: prompt_field(&o)?,
            seed: match o.get("seed") {
                None | Some(Value::Null) => 0,
                Some(s) => s
                    .as_u64()
                    .ok_or_else(|| format!("\"seed\" must be an integer in 0..={}", u64::MAX))?,
            },
        }),
        "prompt" => Ok(ClientMessage::Prompt {
            prompt: prompt_field(&o)?,
        }),
        "stop" => Ok(ClientMessage::Stop),
        other => Err(format!(
            "unknown message type \"{}\" (known: start, prompt, stop)",
            short(other)
        )),
    }
}

/// The `prompt` field: a string of at most [`MAX_PROMPT_BYTES`] bytes.
fn prompt_field(o: &Map<String, Value>) -> Result<String, String> {
    match o.get("prompt") {
        Some(Value::String(p)) if p.len() <= MAX_PROMPT_BYTES => Ok(p.clone()),
        Some(Value::String(p)) => Err(format!(
            "the prompt has {} bytes; at most {MAX_PROMPT_BYTES} are accepted",
            p.len()
        )),
        Some(_) => Err("\"prompt\" must be a string".into()),
        None => Err("the message needs a \"prompt\"".into()),
    }
}

/// At most 40 characters of `s`, for quoting user input in a reply.
fn short(s: &str) -> String {
    if s.chars().count() <= 40 {
        s.to_string()
    } else {
        s.chars().take(37).chain("...".chars()).collect()
    }
}

/// What a message asks the session to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this reply; nothing else changes.
    Reply(ServerMessage),
    /// Start a stream (after ending this connection's running one): send `started` once it
    /// runs, [`ServerMessage::Busy`] and close when the server is full, an error when it
    /// cannot start.
    Start {
        /// The text prompt.
        prompt: String,
        /// Noise seed.
        seed: u64,
    },
    /// Switch the running stream's prompt and send `prompt_ack` (or an error).
    Switch {
        /// The new text prompt.
        prompt: String,
    },
    /// End the running stream (no reply).
    Stop,
    /// Nothing to do (e.g. `stop` with no stream running).
    Nothing,
}

/// The per-connection protocol state: whether a stream runs. [`Protocol::on_message`] decides
/// what a message does; the session reports outcomes back with [`Protocol::started`] and
/// [`Protocol::stopped`].
#[derive(Clone, Debug, Default)]
pub struct Protocol {
    streaming: bool,
}

impl Protocol {
    /// A connection with no stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a stream runs.
    pub fn streaming(&self) -> bool {
        self.streaming
    }

    /// Decides what `msg` does. Never fails: a bad message gives an error reply.
    pub fn on_message(&mut self, msg: Incoming<'_>) -> Action {
        let text = match msg {
            Incoming::Text(t) => t,
            Incoming::Binary(_) => {
                return Action::Reply(ServerMessage::error(
                    "binary messages are not part of the protocol; send JSON text",
                ))
            }
        };
        match parse_client(text) {
            Err(e) => Action::Reply(ServerMessage::error(e)),
            Ok(ClientMessage::Start { prompt, seed }) => {
                // The old stream (if any) ends before the new one starts.
                self.streaming = false;
                Action::Start { prompt, seed }
            }
            Ok(ClientMessage::Prompt { prompt }) if self.streaming => Action::Switch { prompt },
            Ok(ClientMessage::Prompt { .. }) => Action::Reply(ServerMessage::error(
                "no stream is running: send start first",
            )),
            Ok(ClientMessage::Stop) if self.streaming => {
                self.streaming = false;
                Action::Stop
            }
            Ok(ClientMessage::Stop) => Action::Nothing,
        }
    }

    /// The stream asked for by [`Action::Start`] runs.
    pub fn started(&mut self) {
        self.streaming = true;
    }

    /// The stream ended (stopped, failed or could not start).
    pub fn stopped(&mut self) {
        self.streaming = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        parse_client(text).unwrap_err()
    }

    #[test]
    fn good_messages_parse() {
        assert_eq!(
            parse_client(r#"{"type":"start","prompt":"a cat","seed":7}"#),
            Ok(ClientMessage::Start {
                prompt: "a cat".into(),
                seed: 7
            })
        );
        // The seed is optional; unknown fields are ignored.
        assert_eq!(
            parse_client(r#"{"prompt":"x","type":"start","extra":[1,2]}"#),
            Ok(ClientMessage::Start {
                prompt: "x".into(),
                seed: 0
            })
        );
        assert_eq!(
            parse_client(&format!(
                r#"{{"type":"start","prompt":"","seed":{}}}"#,
                u64::MAX
            )),
            Ok(ClientMessage::Start {
                prompt: String::new(),
                seed: u64::MAX
            })
        );
        assert_eq!(
            parse_client(r#"{"type":"prompt","prompt":"a dog \u00e9"}"#),
            Ok(ClientMessage::Prompt {
                prompt: "a dog é".into()
            })
        );
        assert_eq!(
            parse_client(r#" {"type":"stop"} "#),
            Ok(ClientMessage::Stop)
        );
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        assert!(err_of("").contains("malformed JSON"));
        assert!(err_of("{\"type\":").contains("malformed JSON"));
        assert!(err_of("[1]").contains("JSON object"));
        assert!(err_of("{}").contains("no \"type\""));
        assert!(err_of(r#"{"type":3}"#).contains("must be a string"));
        assert!(err_of(r#"{"type":"start"}"#).contains("needs a \"prompt\""));
        assert!(err_of(r#"{"type":"start","prompt":5}"#).contains("\"prompt\" must be"));
        for seed in ["-1", "1.5", "\"7\"", "18446744073709551616"] {
            let m = err_of(&format!(r#"{{"type":"start","prompt":"p","seed":{seed}}}"#));
            assert!(m.contains("\"seed\" must be an integer"), "{seed}: {m}");
        }
        assert!(err_of(r#"{"type":"prompt"}"#).contains("needs a \"prompt\""));
        let long = "x".repeat(MAX_PROMPT_BYTES + 1);
        let m = err_of(&format!(r#"{{"type":"prompt","prompt":"{long}"}}"#));
        assert!(m.contains("at most 4096"), "{m}");
        // The longest accepted prompt is accepted.
        let ok = "x".repeat(MAX_PROMPT_BYTES);
        assert!(parse_client(&format!(r#"{{"type":"prompt","prompt":"{ok}"}}"#)).is_ok());
    }

    #[test]
    fn unknown_types_are_refused_without_echoing_much() {
        let m = err_of(r#"{"type":"rewind"}"#);
        assert!(m.contains("unknown message type \"rewind\""), "{m}");
        let long = "y".repeat(10_000);
        let reply = Protocol::new().on_message(Incoming::Text(&format!(r#"{{"type":"{long}"}}"#)));
        let Action::Reply(ServerMessage::Error { message }) = reply else {
            panic!("{reply:?}")
        };
        assert!(message.len() < 200, "{}", message.len());
        // Errors from the JSON parser are cut too.
        let e = ServerMessage::error("z".repeat(5000));
        let ServerMessage::Error { message } = &e else {
            unreachable!()
        };
        assert_eq!(message.chars().count(), MAX_ERROR_CHARS);
    }

    #[test]
    fn client_messages_round_trip() {
        for m in [
            ClientMessage::Start {
                prompt: "quote \" and \\ and \n".into(),
                seed: 42,
            },
            ClientMessage::Prompt {
                prompt: "ünïcødé 🎥".into(),
            },
            ClientMessage::Stop,
        ] {
            assert_eq!(parse_client(&m.to_json()), Ok(m.clone()));
        }
    }

    #[test]
    fn server_messages_have_the_documented_json() {
        let v = |m: ServerMessage| serde_json::from_str::<Value>(&m.to_json()).unwrap();
        assert_eq!(v(ServerMessage::Started), json!({"type": "started"}));
        assert_eq!(
            v(ServerMessage::Block {
                index: 3,
                frames: 12,
                width: 96,
                height: 64
            }),
            json!({"type": "block", "index": 3, "frames": 12, "width": 96, "height": 64})
        );
        assert_eq!(
            v(ServerMessage::PromptAck { applies_from: 5 }),
            json!({"type": "prompt_ack", "applies_from": 5})
        );
        assert_eq!(v(ServerMessage::Busy), json!({"type": "busy"}));
        assert_eq!(
            v(ServerMessage::error("bad")),
            json!({"type": "error", "message": "bad"})
        );
        for m in [
            ServerMessage::Started,
            ServerMessage::Busy,
            ServerMessage::PromptAck { applies_from: 9 },
            ServerMessage::error("e"),
        ] {
            assert_eq!(ServerMessage::parse(&m.to_json()), Some(m));
        }
        assert_eq!(ServerMessage::parse(r#"{"type":"start"}"#), None);
    }

    #[test]
    fn the_state_machine_follows_the_stream() {
        let mut p = Protocol::new();
        // Before start: prompt is an error, stop does nothing, binary is an error.
        assert!(matches!(
            p.on_message(Incoming::Text(r#"{"type":"prompt","prompt":"a"}"#)),
            Action::Reply(ServerMessage::Error { .. })
        ));
        assert_eq!(
            p.on_message(Incoming::Text(r#"{"type":"stop"}"#)),
            Action::Nothing
        );
        assert!(matches!(
            p.on_message(Incoming::Binary(b"\xff\xd8")),
            Action::Reply(ServerMessage::Error { .. })
        ));
        assert_eq!(
            p.on_message(Incoming::Text(r#"{"type":"start","prompt":"a","seed":1}"#)),
            Action::Start {
                prompt: "a".into(),
                seed: 1
            }
        );
        assert!(!p.streaming());
        p.started();
        assert_eq!(
            p.on_message(Incoming::Text(r#"{"type":"prompt","prompt":"b"}"#)),
            Action::Switch { prompt: "b".into() }
        );
        // Garbage while streaming: an error, and the stream goes on.
        assert!(matches!(
            p.on_message(Incoming::Text("garbage")),
            Action::Reply(ServerMessage::Error { .. })
        ));
        assert!(p.streaming());
        // A second start replaces the stream.
        assert!(matches!(
            p.on_message(Incoming::Text(r#"{"type":"start","prompt":"c"}"#)),
            Action::Start { .. }
        ));
        p.started();
        assert_eq!(
            p.on_message(Incoming::Text(r#"{"type":"stop"}"#)),
            Action::Stop
        );
        assert!(!p.streaming());
    }
}
