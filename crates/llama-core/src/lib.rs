//! # llama-core
//!
//! The ground every other fastllama crate stands on: [`Tensor`] (a contiguous row-major buffer
//! with a [`Shape`], a [`DType`] and a [`Device`]), the crate-wide [`Error`], and the CUDA side —
//! one context and stream per device, host/device copies, and a kernel cache that compiles
//! `kernels/*.cu` with NVRTC for the device's architecture on first use and keeps the result on
//! disk ([`cache_dir`]).
//!
//! What it deliberately is not: a general tensor library. There are no strides, broadcasting or
//! autograd; model code in the higher crates works on slices with explicit forward and backward
//! functions. The only ops here are the ones every layer needs to move data around
//! ([`Tensor::to_dtype`], [`Tensor::to_device`]) and an element-wise [`Tensor::add`], each with a
//! CPU path and a CUDA kernel that agree bit for bit.
//!
//! CUDA is loaded dynamically: the crate builds without a toolkit, and on a machine without a
//! driver every CUDA entry point returns [`Error::CudaUnavailable`] instead of panicking.

mod cache;
mod cpu;
mod cpu_features;
pub mod cuda;
mod device;
mod dtype;
mod error;
mod kernel;
mod rng;
mod shape;
mod storage;
mod tensor;

pub use cache::{cache_dir, fnv1a64, write_atomic, CACHE_ENV};
pub use cpu_features::CpuFeatures;
pub use device::{Device, DEVICE_ENV};
pub use dtype::DType;
pub use error::{Error, Result};
pub use kernel::Kernel;
pub use rng::SplitMix64;
pub use shape::Shape;
pub use storage::{CpuStorage, CudaStorage, Element, Storage};
pub use tensor::{SafetensorsView, Tensor};

/// Re-exported so that callers name the same `half` types as the tensors hold.
pub use half::{bf16, f16};
