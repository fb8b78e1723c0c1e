//! The engine's error type: every failure names what was being loaded or computed, so that a
//! user with a wrong checkpoint learns which tensor or config field is at fault.

use std::path::PathBuf;

/// Errors of the diffusion engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A tensor the model needs is absent from the weight files.
    #[error("{model}: missing tensor `{name}` (expected shape {expected:?}); is this the right checkpoint for this config?")]
    MissingTensor {
        model: String,
        name: String,
        expected: Vec<usize>,
    },
    /// A tensor exists but its shape disagrees with the config.
    #[error("{model}: tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    ShapeMismatch {
        model: String,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// The weight files hold tensors that the model never read (a config/checkpoint mismatch).
    #[error("{model}: {} unexpected tensor(s) in the weight file(s), e.g. `{}`", names.len(), names.first().map(String::as_str).unwrap_or(""))]
    UnexpectedTensors { model: String, names: Vec<String> },
    /// A config file is missing, unreadable or describes something this engine does not build.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// An unsupported setting or a wrong argument (shape, dtype) passed by a caller.
    #[error("{0}")]
    Invalid(String),
    /// The noise source could not supply a draw (e.g. a replay ran out of recorded noise).
    #[error("noise source: {0}")]
    Noise(String),
    /// Tokenizer files could not be read or the text could not be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// File system errors, with the path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An error raised inside candle while computing.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
