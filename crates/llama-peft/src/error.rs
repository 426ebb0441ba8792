//! The errors of `llama-peft`.

use std::path::PathBuf;

/// What can go wrong in LoRA configuration, arithmetic and adapter files.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// An invalid LoRA or optimizer setting.
    #[error("invalid {arg} = {value}: {allowed}")]
    Config {
        arg: &'static str,
        value: String,
        allowed: String,
    },

    /// Buffers whose sizes do not fit the shapes they were given with.
    #[error("{op}: {reason}")]
    Shape { op: &'static str, reason: String },

    /// An adapter directory or file that cannot be read as peft writes them.
    #[error("adapter {}: {reason}", path.display())]
    Adapter { path: PathBuf, reason: String },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(transparent)]
    Ops(#[from] llama_ops::OpsError),

    #[error(transparent)]
    Core(#[from] llama_core::Error),
}

/// `Result` with [`PeftError`].
pub type Result<T> = std::result::Result<T, PeftError>;

pub(crate) fn config_error<T>(
    arg: &'static str,
    value: impl std::fmt::Display,
    allowed: impl Into<String>,
) -> Result<T> {
    Err(PeftError::Config {
        arg,
        value: value.to_string(),
        allowed: allowed.into(),
    })
}

pub(crate) fn shape_error<T>(op: &'static str, reason: impl Into<String>) -> Result<T> {
    Err(PeftError::Shape {
        op,
        reason: reason.into(),
    })
}
