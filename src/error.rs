//! Typed errors of the library. Every failure a user can cause maps to one variant, and each
//! variant maps to one `bc_status` code of the C ABI.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, with a message meant for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument or option value (shape, range, NaN, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file exists but its content is malformed or does not match what is expected.
    #[error("{0}")]
    Format(String),
    /// A valid request this build or model cannot serve.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Not enough memory for the requested session.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A device (GPU, worker) failed.
    #[error("device error: {0}")]
    Device(String),
    /// The caller asked to stop (a streaming callback returned "stop").
    #[error("cancelled by the caller")]
    Cancelled,
    /// A bug: an invariant of the engine did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for [`Error::Format`].
    pub fn format(msg: impl Into<String>) -> Self {
        Error::Format(msg.into())
    }
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
