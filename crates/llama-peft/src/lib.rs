//! # llama-peft
//!
//! LoRA (SPEC.md part 4):
//! - [`LoraConfig`]: Unsloth's `get_peft_model` arguments, every invalid value an error naming
//!   the argument; peft's adapter_config.json both ways;
//! - [`LoraPair`]: one projection's A [r, in] and B [out, r], forward and backward
//!   (y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ; dA, dB, dx without W's gradient);
//! - [`fused`]: Unsloth's fast LoRA — QKV together, O alone, the gated MLP together;
//! - [`LoraAdapter`]: all pairs of a model, saved and loaded in peft's format;
//! - [`Optimizer`] (AdamW, SGD with torch's arithmetic), [`Schedule`] (constant, linear,
//!   cosine with warm-up), [`clip_grad_norm`];
//! - [`reference`]: the LoRA product as plain f64 loops, for tests.
//!
//! Letters: M rows, K in_features, N out_features, r rank, s scaling.

mod adapter;
mod config;
pub mod cuda;
mod error;
pub mod fused;
mod lora;
mod optim;
pub mod reference;

pub use adapter::{
    module_name, peft_name, AdapterGrads, LayerLora, LoraAdapter, SavedModules, CONFIG_FILE,
    WEIGHTS_FILE,
};
pub use config::{LoraConfig, LoraInit, ModelDims, SavedModule, Target};
pub use error::{PeftError, Result};
pub use lora::{Dropout, LoraGrads, LoraPair, LoraSaved};
pub use optim::{clip_grad_norm, Optimizer, OptimizerKind, Schedule, ScheduleKind};
