//! # llama-rope
//!
//! Rotary position embeddings (SPEC.md part 1), as HF transformers computes them:
//! - [`RopeConfig`] from a `config.json`'s `rope_parameters` (or the legacy `rope_theta` +
//!   `rope_scaling`): default, linear, dynamic NTK, llama3, LongRoPE and YaRN, with
//!   `partial_rotary_factor`;
//! - [`RopeConfig::frequencies`]: inverse frequencies and attention scaling, bit for bit HF's;
//! - [`RotaryEmbedding`]: cos/sin tables grown in blocks of [`CACHE_BLOCK`] positions;
//! - [`apply`] / [`apply_backward`]: the rotate-half rotation in place on Q and K
//!   ([batch, heads, seq, head_dim]) and its backward, CPU (rayon, vectorised), with
//!   [`reference`] beside it and a CUDA kernel in [`cuda`].
//!
//! Letters: d = rotary_dim (≤ head_dim), i indexes the d/2 frequencies, p a position.

mod apply;
mod cache;
mod config;
pub mod cuda;
mod error;
mod freqs;
pub mod reference;
mod shape;
mod torch_pow;

pub use apply::{apply, apply_backward};
pub use cache::{RopeTables, RotaryEmbedding, CACHE_BLOCK, MAX_POSITIONS};
pub use config::{RopeConfig, RopeScaling};
pub use error::{Result, RopeError};
pub use freqs::Frequencies;
pub use shape::QkShape;
