//! # llama-patch
//!
//! Patching (SPEC.md part 6): every op of a Llama layer has a reference implementation (the
//! formula in f64 loops) and fast ones (SIMD + threads on the CPU, CUDA kernels); this crate
//! holds the [`registry`] of them and the policy that picks one per layer and op:
//! - [`pre_patch`]: from the model's facts and the device, the fast implementation of every op
//!   that can take one, and why any cannot;
//! - [`patch_peft_model`]: once LoRA is attached, each layer's QKV, O and MLP groups through
//!   the fused LoRA path where the settings allow it (dropout 0, bias "none"), the plain path
//!   elsewhere;
//! - [`PatchPlan::reference`]: the unpatched model, everything on the reference, to compare.
//!
//! Each returns a [`PatchReport`] that says what was patched and why anything was not. The
//! model (llama-model) runs whatever the plan says; this crate decides, it computes nothing.

mod plan;
mod policy;
pub mod registry;

pub use llama_core::{Device, Kernel};
pub use plan::{LayerPlan, LoraGroup, LoraPath, PatchPlan};
pub use policy::{patch_peft_model, pre_patch, ModelFacts, PatchReport};
pub use registry::{Impl, Op};
