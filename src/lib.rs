//! blockcascade: an inference engine for block-causal video diffusion (the Wan2.1 causal DiT
//! behind CausVid, Self-Forcing and LongLive) with Block Cascading.
//!
//! Start with [`Engine`] (a model), make a [`Generator`] with [`GenerateOptions`], a
//! [`NoiseSource`] and [`PromptEmbeds`], then [`Generator::run`] to stream blocks. For a live,
//! open-ended generation whose prompt changes while it runs, open a [`Stream`].
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod cascade;
pub mod config;
pub mod decode;
pub mod engine;
pub mod error;
pub mod executor;
pub mod ffi;
pub mod files;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod host_memory;
pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod noise;
pub mod prompt;
pub mod rng;
pub mod scaling;
pub mod schedule;
#[cfg(feature = "serve")]
pub mod serve;
pub mod stream;
pub mod tensorfile;
pub mod text;
pub mod tune;
pub mod video;
pub mod weights;
pub mod window;

pub use config::{AttentionMode, GenerateOptions, ModelConfig, Recache, Schedule};
pub use engine::Engine;
pub use error::{Error, Result};
pub use executor::{FinishedBlock, Generator, PromptMailbox, RunReport};
pub use noise::NoiseSource;
pub use prompt::PromptEmbeds;
pub use stream::{Stream, StreamBlock, StreamControl, StreamOptions};
pub use text::TextEncoder;

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
