//! Errors of `llama-ops`.

use llama_core::DType;

/// What can go wrong in an op. Messages name the op and the argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Buffers whose lengths do not fit the shape they were given with.
    #[error("{op}: {reason}")]
    Shape { op: &'static str, reason: String },

    /// A label that is neither a token id of the vocabulary nor the ignore index.
    #[error("{op}: label {label} at row {row} is outside the vocabulary 0..{vocab} and is not the ignore index {ignore_index}")]
    LabelOutOfRange {
        op: &'static str,
        row: usize,
        label: i64,
        vocab: usize,
        ignore_index: i64,
    },

    /// An argument with an impossible value (a zero chunk size, a negative softcap, …).
    #[error("{op}: argument {arg} = {value}: {reason}")]
    InvalidArgument {
        op: &'static str,
        arg: &'static str,
        value: String,
        reason: &'static str,
    },

    /// The op has no implementation for this dtype.
    #[error("{op}: dtype {dtype} is not supported; supported: {supported}")]
    UnsupportedDType {
        op: &'static str,
        dtype: DType,
        supported: &'static str,
    },

    /// An error from `llama-core` (CUDA, tensors).
    #[error(transparent)]
    Core(#[from] llama_core::Error),
}

/// `Result` with [`OpsError`].
pub type Result<T> = std::result::Result<T, OpsError>;

/// Fails with [`OpsError::Shape`] unless `got == expected`; `what` names the buffer.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(OpsError::Shape {
            op,
            reason: format!("{what} holds {got} elements, expected {expected}"),
        })
    }
}

/// The number of rows of a `[rows, dim]` buffer of `len` elements, or a shape error.
pub(crate) fn rows_of(op: &'static str, what: &str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 || !len.is_multiple_of(dim) {
        return Err(OpsError::Shape {
            op,
            reason: format!("{what} holds {len} elements, not a whole number of rows of {dim}"),
        });
    }
    Ok(len / dim)
}
