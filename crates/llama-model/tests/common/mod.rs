//! What the LoRA fixture tests share: the peft fixture cases, and checking every pair's
//! matrices against peft's numbers.

use std::path::PathBuf;

use llama_fixtures::{assert_close, fixture_names, fixtures_dir, Fixture};
use llama_model::{load, Batch, LlamaModel, Precision, TrainConfig};
use llama_peft::{peft_name, AdapterGrads, LoraAdapter, OptimizerKind, Schedule, ScheduleKind};

/// One `$LLAMA_FIXTURES/peft` adapter: its reference numbers, its base model (f32, without
/// the adapter), the adapter as peft saved it, and the fixture's batch.
pub struct Case {
    pub name: String,
    pub fixture: Fixture,
    pub model: LlamaModel,
    pub adapter: LoraAdapter,
    pub batch: Batch,
}

/// The directory of the peft fixture `name` (adapter_config.json, adapter_model.safetensors).
pub fn adapter_dir(name: &str) -> PathBuf {
    fixtures_dir().join("peft").join(name)
}

/// Every peft fixture, in name order.
pub fn cases() -> Vec<Case> {
    fixture_names("peft", "adapter_config.json")
        .into_iter()
        .map(case)
        .collect()
}

pub fn case(name: String) -> Case {
    let fixture = Fixture::open(&format!("peft/{name}/reference"));
    let base = fixture.json()["base_model"]
        .as_str()
        .expect("reference.json names base_model");
    let model = load(&fixtures_dir().join(base), Precision::Exact, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .model;
    let adapter = LoraAdapter::load(&adapter_dir(&name), model.dims())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (ids, shape) = fixture.i64("input_ids");
    let (labels, _) = fixture.i64("labels");
    let batch = Batch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        labels,
        batch: shape[0],
    };
    Case {
        name,
        fixture,
        model,
        adapter,
        batch,
    }
}

/// The A and B matrices of every pair of `adapter`, by (layer, target).
pub fn adapter_matrices(adapter: &LoraAdapter) -> Vec<(String, Vec<f32>)> {
    adapter
        .pairs()
        .flat_map(|(i, t, p)| {
            [
                (peft_name(i, t, "A", true), p.a.clone()),
                (peft_name(i, t, "B", true), p.b.clone()),
            ]
        })
        .collect()
}

/// The gradients of every pair of `adapter`, named like its matrices.
pub fn grad_matrices(adapter: &LoraAdapter, grads: &AdapterGrads) -> Vec<(String, Vec<f32>)> {
    adapter
        .pairs()
        .flat_map(|(i, t, _)| {
            let g = grads.get(i, t).expect("a gradient for every pair");
            [
                (peft_name(i, t, "A", true), g.a.clone()),
                (peft_name(i, t, "B", true), g.b.clone()),
            ]
        })
        .collect()
}

/// Each named matrix against the fixture's `{prefix}.{name}` within `tol`.
pub fn check_matrices(
    label: &str,
    fixture: &Fixture,
    prefix: &str,
    matrices: &[(String, Vec<f32>)],
    tol: f64,
) {
    for (name, values) in matrices {
        let key = format!("{prefix}.{name}");
        let (expected, shape) = fixture.f32(&key);
        assert_close(&format!("{label} {key}"), values, &expected, &shape, tol);
    }
}

/// The fixture's training settings: `optimizer` at a constant `lr` for three steps, no
/// accumulation or clipping.
pub fn constant_config(
    optimizer: OptimizerKind,
    lr: f32,
    gradient_checkpointing: bool,
) -> TrainConfig {
    TrainConfig {
        optimizer,
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            lr,
            warmup: 0,
            total: 3,
        },
        grad_accum: 1,
        max_grad_norm: None,
        gradient_checkpointing,
        seed: 0,
    }
}
