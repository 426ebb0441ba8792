//! # llama-rope
//!
//! Rotary position embeddings (SPEC.md part 1): `RopeConfig` from HF's `rope_parameters` (and the
//! legacy `rope_scaling`) for the default, linear, dynamic NTK, llama3, LongRoPE and YaRN kinds; a
//! cos/sin cache that grows in whole blocks; the rotate-half rotation applied in place to Q and K,
//! and its backward (the rotation by the negative angle). Reference, CPU-fast and CUDA paths.
//!
//! Depends on `llama-core` only. Built in step 2 (issue "Step 2 — llama-rope").
