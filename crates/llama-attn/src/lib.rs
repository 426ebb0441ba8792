//! # llama-attn
//!
//! Attention (SPEC.md part 2):
//! - [`forward`] / [`backward`]: tiled causal grouped-query attention for training and prefill,
//!   FlashAttention-2 style (online softmax, O(seq) memory, the backward recomputing the
//!   probabilities from the saved logsumexp), with an optional left-padding mask;
//! - [`KvCache`]: per-layer keys and values, preallocated and grown in fixed increments;
//! - [`LlamaAttention`]: the layer — Q/K/V/O projections, RoPE, attention — forward and
//!   backward (`LlamaAttention_fast_forward`) and one decode step against the cache
//!   (`LlamaAttention_fast_forward_inference`);
//! - [`cuda`]: the forward (with split-K decoding) and backward as CUDA kernels;
//! - [`reference`]: the same in f64 with the whole score matrix, for tests.
//!
//! Shapes and letters are set out in [`AttnShape`].

pub mod cuda;
mod cuda_layer;
mod error;
mod flash;
mod kv_cache;
mod layer;
pub mod reference;
mod shape;

pub use cuda_layer::{AttendBuffers, CudaAttendSaved, CudaLlamaAttention};
pub use error::{AttnError, Result};
pub use flash::{backward, forward, K_TILE, Q_TILE};
pub use kv_cache::{CacheLayout, KvCache};
pub use layer::{AttendSaved, AttentionConfig, AttentionGrads, LlamaAttention, Saved};
pub use shape::{AttnShape, Mask};
