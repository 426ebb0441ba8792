//! # llama-model
//!
//! The assembled model (SPEC.md parts 3–5): [`LlamaConfig`] from HF `config.json` or GGUF
//! metadata, weights from safetensors directories or GGUF files ([`load`]), the [`Tokenizer`]
//! and chat template, the decoder ([`LlamaModel`]: forward, logits, loss, cached decoding),
//! [`generate`], LoRA training ([`Trainer`], [`CudaTrainer`]) and, over all of it, Unsloth's
//! API: [`FastLlamaModel`].
//!
//! ```text
//! config.rs     LlamaConfig                    gguf.rs      GGUF v2/v3 reader and writer
//! source.rs     tensors by HF name             loader.rs    a path → LoadedModel
//! tokenizer.rs  tokenizers + chat templates    model.rs     MLP → layer → model → loss
//! generate.rs   sampling and generation        fetch.rs     the default model, via pip
//! export.rs     a model → GGUF / HF dir       cuda_model.rs  the model on a GPU, in bf16
//! train.rs      loss and LoRA gradients       trainer.rs     optimizer steps, checkpoints
//! cuda_train.rs LoRA training on a GPU        data.rs        JSONL → batches
//! chat.rs       multi-turn chat over one KV cache
//! fast.rs       FastLlamaModel (Unsloth's API over all of the above)
//! ```

mod chat;
mod config;
mod cuda_model;
mod cuda_train;
pub mod data;
mod engine;
mod error;
mod export;
mod fast;
mod fetch;
pub mod generate;
pub mod gguf;
mod layer;
mod loader;
mod mmap;
mod model;
mod source;
mod tokenizer;
mod train;
mod trainer;

pub use chat::{ChatSession, TurnReport};
pub use config::{LlamaConfig, ModelShape};
pub use cuda_model::{CudaLlamaModel, CudaModelCache};
pub use cuda_train::CudaTrainer;
pub use engine::{Engine, EngineCache};
pub use error::{ModelError, Result};
pub use export::{save_gguf, save_hf};
pub use fast::{FastLlamaModel, FastTrainer, LoadOptions, Mode};
pub use fetch::{resolve_model, DEFAULT_MODEL};
pub use generate::{
    generate, generate_after, Decoder, FinishReason, Generation, GenerationConfig, SamplingConfig,
    TextStream,
};
pub use layer::{DecoderLayer, LlamaMlp};
pub use loader::{load, LoadedModel, ModelFormat};
pub use model::{shift_labels, Hidden, LlamaModel, ModelCache, Precision};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use train::StepOptions;
pub use trainer::{Batch, OptimizerState, RunPlan, StepReport, TrainConfig, Trainer};
