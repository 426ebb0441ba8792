//! # llama-ops
//!
//! The per-token operations of a Llama layer (SPEC.md part 3): RMSNorm (and Gemma's), LayerNorm,
//! SwiGLU/GeGLU, chunked cross entropy with softcapping, dense matmul, and 4-bit weights (NF4,
//! GGUF Q4_0/Q4_1/Q8_0 and K-quants) with fused dequantising matrix-vector products; forward and
//! backward, reference, CPU-fast and CUDA paths.
//!
//! Depends on `llama-core` only. Built in step 3 (issue "Step 3 — llama-ops").
