//! Errors of `llama-attn`.

/// What can go wrong in attention. Messages name the argument or buffer at fault.
#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    /// Buffers or sizes that do not fit together.
    #[error("attention {op}: {reason}")]
    Shape { op: &'static str, reason: String },

    /// A configuration value that cannot work (heads not divisible, zero sizes).
    #[error("attention config: {field} = {value}: {reason}")]
    Config {
        field: &'static str,
        value: String,
        reason: String,
    },

    /// The KV cache cannot take the tokens (past its maximum length).
    #[error("KV cache: {0}")]
    Cache(String),

    #[error(transparent)]
    Ops(#[from] llama_ops::OpsError),

    #[error(transparent)]
    Rope(#[from] llama_rope::RopeError),

    #[error(transparent)]
    Core(#[from] llama_core::Error),
}

/// `Result` with [`AttnError`].
pub type Result<T> = std::result::Result<T, AttnError>;

pub(crate) fn shape_error<T>(op: &'static str, reason: impl Into<String>) -> Result<T> {
    Err(AttnError::Shape {
        op,
        reason: reason.into(),
    })
}
