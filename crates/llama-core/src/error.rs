//! The one error type of `llama-core`; higher crates wrap it in theirs.

use std::path::PathBuf;

use crate::DType;

/// Everything that can go wrong in `llama-core`. Messages name the tensor, file, shape or
/// argument at fault, so that a caller can show them to a user unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data length does not match the product of the shape's dimensions.
    #[error("shape {shape:?} holds {expected} elements, but {got} were given")]
    ElementCount {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },

    /// Two operands of an element-wise op differ in shape.
    #[error("{op}: shapes differ: {lhs:?} and {rhs:?}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
    },

    /// A shape whose element count overflows `usize` or is not a whole number of blocks.
    #[error("invalid shape {shape:?} for {dtype}: {reason}")]
    InvalidShape {
        shape: Vec<usize>,
        dtype: DType,
        reason: String,
    },

    /// An operation was asked for a dtype it does not handle.
    #[error("{op}: dtype {dtype} is not supported here")]
    UnsupportedDType { op: &'static str, dtype: DType },

    /// The requested element type differs from the tensor's dtype.
    #[error("tensor holds {actual}, but {requested} was requested")]
    DTypeMismatch { requested: DType, actual: DType },

    /// Two operands live on different devices.
    #[error("{op}: operands are on different devices: {lhs} and {rhs}")]
    DeviceMismatch {
        op: &'static str,
        lhs: crate::Device,
        rhs: crate::Device,
    },

    /// The operation needs host memory but the tensor is on a GPU (or the reverse).
    #[error("{op}: needs a tensor on {needed}, this one is on {actual}")]
    WrongDevice {
        op: &'static str,
        needed: &'static str,
        actual: crate::Device,
    },

    /// A device name that does not parse (`cpu`, `cuda`, `cuda:N`).
    #[error("unknown device {0:?}: expected cpu, cuda or cuda:N")]
    UnknownDevice(String),

    /// No usable CUDA driver or device: the reason says which.
    #[error("no CUDA device: {0}")]
    CudaUnavailable(String),

    /// A host stash was asked for a slot that nothing was put into.
    #[error("host stash: slot {0} holds no buffer")]
    EmptyStashSlot(usize),

    /// A CUDA driver call failed.
    #[error("CUDA error in {context}: {message}")]
    Cuda { context: String, message: String },

    /// NVRTC could not compile a kernel source; `log` is NVRTC's compiler log.
    #[error("NVRTC failed to compile kernels/{kernel}.cu for {arch}: {message}\n{log}")]
    KernelCompile {
        kernel: String,
        arch: String,
        message: String,
        log: String,
    },

    /// A safetensors file or view could not be read.
    #[error("safetensors: {0}")]
    Safetensors(String),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps a CUDA driver error with what was being done.
    pub fn cuda(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        Error::Cuda {
            context: context.into(),
            message: err.to_string(),
        }
    }
}
