//! # llama-peft
//!
//! LoRA (SPEC.md part 4): `LoraConfig` with Unsloth's arguments, the fused LoRA forward and
//! backward for the QKV, O and MLP projections, adapters in peft's format, merging, and the
//! optimizers (AdamW, SGD) with their schedules.
//!
//! Depends on `llama-core`, `llama-ops` and `llama-attn`. Built in step 6 (issue "Step 6 — llama-peft").
