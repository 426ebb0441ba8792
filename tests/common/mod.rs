//! What the integration tests share: the fixture models, scratch directories, small
//! learnable batches, and adapters with non-zero matrices.
#![allow(dead_code)] // each test target uses its own part

use std::path::{Path, PathBuf};

use llama_core::SplitMix64;
use llama_fixtures::{fixture_names, fixtures_dir};
use llama_model::data::{batches, tokenize, Record};
use llama_model::TrainConfig;
use llama_model::{load, Batch, LlamaModel, Precision, StepOptions};
use llama_peft::{LoraAdapter, LoraConfig, OptimizerKind, Schedule, ScheduleKind};

pub fn model_dirs() -> Vec<PathBuf> {
    let root = fixtures_dir().join("models");
    fixture_names("models", "config.json")
        .iter()
        .map(|n| root.join(n))
        .collect()
}

pub fn load_model(dir: &Path) -> LlamaModel {
    load(dir, Precision::Exact, &mut |_, _| {}).unwrap().model
}

pub fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("fastllama-finetune-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

/// Pre-tokenised records that repeat a short random pattern: learnable in a few steps.
pub fn pattern_batches(
    model: &LlamaModel,
    seed: u64,
    records: usize,
    batch_size: usize,
) -> Vec<Batch> {
    let vocab = model.config.vocab_size as u64;
    let mut rng = SplitMix64::new(seed);
    let pattern: Vec<u32> = (0..5).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let examples: Vec<_> = (0..records)
        .map(|i| {
            let ids: Vec<u32> = pattern
                .iter()
                .cycle()
                .skip(i % 5)
                .take(12 + i % 4)
                .copied()
                .collect();
            tokenize(
                &Record::Tokens {
                    input_ids: ids,
                    labels: None,
                },
                None,
                None,
                64,
            )
            .unwrap()
        })
        .collect();
    batches(&examples, batch_size, 64, false, 0).unwrap()
}

pub fn fresh_adapter(model: &mut LlamaModel, dropout: f32) {
    let mut config = LoraConfig::new(4, 8.0);
    config.lora_dropout = dropout;
    model
        .set_adapter(Some(LoraAdapter::new(config, model.dims()).unwrap()))
        .unwrap();
}

/// Gradients of one batch with the model's current weights.
pub fn grads_of(model: &mut LlamaModel, b: &Batch) -> Vec<f32> {
    let mut grads = model.adapter().unwrap().zero_grads();
    let options = StepOptions {
        gradient_checkpointing: false,
        grad_scale: 1.0,
        dropout_seed: None,
    };
    model.loss_and_grads(b, &mut grads, &options).unwrap();
    grads.slices().concat()
}

/// Puts a random non-zero B on every pair (a fresh adapter's B = 0 hides half the paths).
pub fn randomise(model: &mut LlamaModel) {
    let mut rng = SplitMix64::new(9);
    let mut adapter = model.adapter().unwrap().clone();
    for p in adapter.parameters_mut() {
        p.iter_mut()
            .for_each(|v| *v = (rng.next_f64() as f32 - 0.5) * 0.2);
    }
    model.set_adapter(Some(adapter)).unwrap();
}

/// AdamW with a cosine schedule over `total` steps, clipping at 1.
pub fn train_config(total: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerKind::AdamW {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        },
        schedule: Schedule {
            kind: ScheduleKind::Cosine,
            lr: 2e-2,
            warmup: 1,
            total,
        },
        grad_accum: accum,
        max_grad_norm: Some(1.0),
        gradient_checkpointing: false,
        seed: 11,
    }
}
