//! # llama-ops
//!
//! The per-token operations of a Llama layer (SPEC.md part 3), each as a pair of plain
//! functions — forward and backward — over flat row-major slices:
//! - [`rms_norm`] / [`rms_norm_backward`] (Llama), [`gemma_rms_norm`], [`layer_norm`] /
//!   [`layer_norm_backward`];
//! - [`gated_forward`] / [`gated_forward_in_place`] / [`gated_backward`]: SwiGLU and GeGLU
//!   (exact and tanh);
//! - [`cross_entropy`] / [`cross_entropy_backward`]: chunked logsumexp over large vocabularies,
//!   ignore index, softcapping and logit scaling;
//! - [`linear`], [`linear_backward_input`], [`linear_backward_weight`], [`matvec`]: dense
//!   products, f32 accumulation for f32/f16/bf16;
//! - [`quant`]: GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K and NF4 (with double quantisation):
//!   quantise, dequantise, fused dequantise-and-dot matrix-vector products.
//!
//! Three implementations of each: [`reference`] (the spec as simple loops in f64, for tests),
//! the functions at the crate root (the fast CPU path: rayon and SIMD with run-time feature
//! detection) and [`cuda`] (kernels in `kernels/*.cu`, cuBLAS for dense products). [`kernel`]
//! runs a layer's ops by the [`llama_core::Kernel`] that llama-patch chose for each.
//!
//! Letters used in shapes: N rows (batch × tokens), C channels, I intermediate size, V
//! vocabulary, K input and N output features of a linear layer, M activation rows.

mod activation;
pub mod bf16_gemm;
pub mod cuda;
mod error;
mod gemm_ffi;
pub mod kernel;
mod loss;
mod matmul;
mod norm;
pub mod quant;
pub mod reference;
mod rows;
mod simd;
mod weight;

pub use activation::{gated_backward, gated_forward, gated_forward_in_place, GatedAct, Gelu};
pub use error::{OpsError, Result};
pub use loss::{cross_entropy, cross_entropy_backward, CrossEntropy, CrossEntropyOptions};
pub use matmul::{linear, linear_backward_input, linear_backward_weight, matvec};
pub use norm::{gemma_rms_norm, layer_norm, layer_norm_backward, rms_norm, rms_norm_backward};
pub use quant::{quantize, supports_q8, Q8Vector, QuantMatrix};
pub use weight::{Activations, Weight};

/// Helpers that other crates' hot loops share: a SIMD dot product (AVX2/FMA at run time), a
/// branch-free `exp` that vectorises, and a small dense f32 product on the `gemm` crate.
pub mod math {
    pub use crate::gemm_ffi::{gemm, Operand};
    pub use crate::simd::{add_weighted_rows, dot, dot_rows, exp, exp_shifted_sum};
}
