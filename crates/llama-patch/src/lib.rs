//! # llama-patch
//!
//! Patching (SPEC.md part 6): a registry of implementations per op (reference, CPU-fast, CUDA)
//! and the policy that picks them per layer — `pre_patch` and `patch_peft_model` — returning a
//! `PatchReport` of what was patched and why anything was not.
//!
//! Depends on the crates below it. Built in step 7 (issue "Step 7 — llama-patch").
