//! The engine's error type: one enum, each variant a thing a user can be told about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid setting: {0}")]
    InvalidSetting(String),

    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("scheduler: {0}")]
    Scheduler(String),

    #[error("metadata: {0}")]
    Metadata(String),

    #[error("{path}: already exists; not overwriting it")]
    FileExists { path: PathBuf },

    #[error("{path}: PNG: {message}")]
    Png { path: PathBuf, message: String },

    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
