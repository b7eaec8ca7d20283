//! The library's error type: every variant names the file, key or value at fault,
//! so the CLI can print one clear line and exit non-zero.

use std::path::PathBuf;

/// Errors from loading, running and inspecting models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: file not found ({what})")]
    MissingFile { path: PathBuf, what: &'static str },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: key `{key}`: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error("{path}: unknown model_type `{value}` (supported: {supported})")]
    UnknownModelType {
        path: PathBuf,
        value: String,
        supported: String,
    },

    #[error("{path}: Parquet: {message}")]
    Parquet { path: PathBuf, message: String },

    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{dir}: tensor `{key}` not found in its safetensors files")]
    MissingTensor { dir: PathBuf, key: String },

    #[error("{path}: tensor `{key}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("{path}: tokenizer error: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("unknown hook `{name}`; valid hooks: {valid}")]
    UnknownHook { name: String, valid: String },

    #[error("hook pattern `{pattern}` matches no hook point; valid hooks: {valid}")]
    HookPatternMatchesNothing { pattern: String, valid: String },

    #[error("invalid hook pattern `{pattern}`: {message}")]
    BadHookPattern { pattern: String, message: String },

    #[error("the prompt is empty")]
    EmptyPrompt,

    #[error(
        "the prompt is {tokens} tokens, longer than the model's context window of {max} tokens"
    )]
    PromptTooLong { tokens: usize, max: usize },

    #[error("invalid value for {what}: `{value}` ({message})")]
    InvalidArgument {
        what: &'static str,
        value: String,
        message: String,
    },

    #[error("{path}, line {line}: {message}")]
    DataFile {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("non-finite values (NaN or Inf) in {what}, at {at}")]
    NonFinite { what: String, at: String },

    #[error("device `{0}`: {1}")]
    Device(String, String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}
