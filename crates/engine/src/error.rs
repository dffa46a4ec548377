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

    #[error(
        "cannot reach the Hugging Face Hub at {endpoint} (offline?): {message}. \
         Models already in the cache still work; connect and try again to download"
    )]
    HubOffline { endpoint: String, message: String },

    #[error(
        "{repo}: access denied (HTTP {status}): the repository is gated or private{}. \
         Accept its licence on its Hugging Face page while logged in, create a read token at \
         https://huggingface.co/settings/tokens, then set it in the HF_TOKEN environment variable \
         or run `huggingface-cli login` (it saves the token where Easel finds it)",
        if *token_set { " and the token given has no access to it" } else { ", and no token is set" }
    )]
    HubGated { repo: String, status: u16, token_set: bool },

    #[error("{repo}: not found on the Hugging Face Hub: {what}")]
    HubNotFound { repo: String, what: String },

    #[error(
        "{file}: download size mismatch: expected {expected} bytes, received {received}; \
         the partial file was deleted, try again"
    )]
    HubSizeMismatch { file: String, expected: u64, received: u64 },

    #[error("{file}: download interrupted ({message}); the partial file is kept: download again to resume")]
    HubInterrupted { file: String, message: String },

    #[error("{url}: {message}")]
    HubHttp { url: String, message: String },

    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Tensor(candle_core::Error),
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set (many desktops set
/// it), and prints it as part of the message: a user is shown the message alone, and the
/// backtrace goes to the log (`easel --verbose`, or `EASEL_LOG=debug`).
pub(crate) fn without_backtrace(error: candle_core::Error) -> candle_core::Error {
    match error {
        candle_core::Error::WithBacktrace { inner, backtrace } => {
            log::debug!("backtrace of \"{inner}\":\n{backtrace}");
            without_backtrace(*inner)
        }
        other => other,
    }
}

/// The message of a candle error for the user, its backtrace logged (see [`without_backtrace`]).
pub(crate) fn candle_message(error: candle_core::Error) -> String {
    without_backtrace(error).to_string()
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Error::Tensor(without_backtrace(error))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    #[test]
    fn candle_errors_reach_the_user_without_a_backtrace() {
        let with_backtrace = candle_core::Error::Msg("shapes differ".into()).bt();
        let forced = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shapes differ".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        for error in [with_backtrace, forced] {
            let message = super::Error::from(error).to_string();
            assert_eq!(message, "shapes differ");
        }
        let forced = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shapes differ".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(super::candle_message(forced), "shapes differ");
    }
}
