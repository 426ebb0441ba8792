//! Errors of `llama-model`.

use std::path::{Path, PathBuf};

/// What can go wrong loading or running a model. Messages name the file, tensor, argument or
/// shape at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file that cannot be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A file whose bytes do not follow its format (GGUF, safetensors, JSON).
    #[error("{path}: not a valid {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },

    /// A configuration value that is missing or cannot work.
    #[error("config {field}: {reason}")]
    Config { field: String, reason: String },

    /// A model family this crate does not run.
    #[error("unsupported architecture {0:?}: fastllama runs the Llama family (LlamaForCausalLM, GGUF \"llama\")")]
    UnsupportedArchitecture(String),

    /// A weight the model needs that the files lack.
    #[error("tensor {name} is missing from {source_desc}")]
    MissingTensor { name: String, source_desc: String },

    /// A weight of the wrong shape or dtype.
    #[error("tensor {name}: expected {expected}, the file holds {found}")]
    TensorMismatch {
        name: String,
        expected: String,
        found: String,
    },

    /// Tokenizer building, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template that does not render.
    #[error("chat template: {0}")]
    Template(String),

    /// Bad input to the model or generation: ids out of range, too many positions, bad
    /// sampling settings.
    #[error("{arg}: {reason}")]
    InvalidInput { arg: &'static str, reason: String },

    /// The default model could not be fetched.
    #[error("fetching {model}: {reason}")]
    Fetch { model: String, reason: String },

    #[error(transparent)]
    Attn(#[from] llama_attn::AttnError),

    #[error(transparent)]
    Ops(#[from] llama_ops::OpsError),

    #[error(transparent)]
    Peft(#[from] llama_peft::PeftError),

    #[error(transparent)]
    Rope(#[from] llama_rope::RopeError),

    #[error(transparent)]
    Core(#[from] llama_core::Error),
}

/// `Result` with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ModelError {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(
        path: &Path,
        format: &'static str,
        reason: impl Into<String>,
    ) -> ModelError {
        ModelError::Format {
            path: path.to_path_buf(),
            format,
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> ModelError {
        ModelError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn input(arg: &'static str, reason: impl Into<String>) -> ModelError {
        ModelError::InvalidInput {
            arg,
            reason: reason.into(),
        }
    }
}
