//! Errors of `llama-rope`.

/// What can go wrong configuring or applying rotary embeddings. Messages name the config field
/// or the argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum RopeError {
    /// A field the RoPE kind needs is absent.
    #[error("RoPE config: rope_type {rope_type:?} needs the field {field:?}")]
    MissingField {
        rope_type: String,
        field: &'static str,
    },

    /// A field has the wrong type or an impossible value.
    #[error("RoPE config: field {field:?} {reason}")]
    InvalidField { field: String, reason: String },

    /// The `rope_type` is none of the six fastllama knows.
    #[error("RoPE config: unknown rope_type {0:?}; known: default, linear, dynamic, llama3, longrope, yarn")]
    UnknownType(String),

    /// Buffers, positions or shapes that do not fit together.
    #[error("rope {op}: {reason}")]
    Shape { op: &'static str, reason: String },

    /// An error from `llama-core` (CUDA, tensors).
    #[error(transparent)]
    Core(#[from] llama_core::Error),
}

/// `Result` with [`RopeError`].
pub type Result<T> = std::result::Result<T, RopeError>;
