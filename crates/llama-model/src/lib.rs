//! # llama-model
//!
//! The assembled model (SPEC.md parts 3–5): `LlamaConfig`, safetensors and GGUF loading, the
//! tokenizer and chat template, the decoder layers, `CausalLM_fast_forward`, generation,
//! training, and the `FastLlamaModel` API.
//!
//! Depends on every library crate below it. Built in step 5 (issue "Step 5 — llama-model").
