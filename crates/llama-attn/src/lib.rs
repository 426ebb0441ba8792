//! # llama-attn
//!
//! Attention (SPEC.md part 2): tiled causal grouped-query attention for training and prefill with
//! its backward (FlashAttention-2 style, O(seq) memory), a preallocated KV cache grown in fixed
//! increments, and decode attention of one new token per sequence against it.
//!
//! Depends on `llama-core`, `llama-rope` and `llama-ops`. Built in step 4 (issue "Step 4 — llama-attn").
