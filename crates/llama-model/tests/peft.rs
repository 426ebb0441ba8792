//! Every adapter under `$LLAMA_FIXTURES/peft` against peft: logits and loss with the adapter,
//! every LoRA gradient, the merged weight, one SGD step and three AdamW steps — the steps
//! through [`Trainer`], the path `fastllama finetune` takes.

mod common;

use std::path::PathBuf;

use common::{adapter_matrices, check_matrices, grad_matrices};

use llama_fixtures::{assert_close, fixture_names, fixtures_dir, Fixture};
use llama_model::{load, Batch, LoadedModel, Precision, StepOptions, TrainConfig, Trainer};
use llama_peft::{LoraAdapter, OptimizerKind, Schedule, ScheduleKind, Target};

struct Case {
    name: String,
    dir: PathBuf,
    loaded: LoadedModel,
    fixture: Fixture,
    batch: Batch,
}

fn cases() -> Vec<Case> {
    let root = fixtures_dir().join("peft");
    fixture_names("peft", "adapter_config.json")
        .into_iter()
        .map(|name| {
            let fixture = Fixture::open(&format!("peft/{name}/reference"));
            let base = fixture.json()["base_model"]
                .as_str()
                .expect("reference.json names base_model");
            let mut loaded = load(&fixtures_dir().join(base), Precision::Exact, &mut |_, _| {})
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let dir = root.join(&name);
            let adapter = LoraAdapter::load(&dir, loaded.model.dims())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            loaded.model.set_adapter(Some(adapter)).unwrap();
            let (ids, shape) = fixture.i64("input_ids");
            let (labels, _) = fixture.i64("labels");
            let batch = Batch {
                ids: ids.iter().map(|&i| i as u32).collect(),
                labels,
                batch: shape[0],
            };
            Case {
                name,
                dir,
                loaded,
                fixture,
                batch,
            }
        })
        .collect()
}

fn trainer(case: &Case, optimizer: OptimizerKind, lr: f32) -> Trainer {
    let config = TrainConfig {
        optimizer,
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            lr,
            warmup: 0,
            total: 3,
        },
        grad_accum: 1,
        max_grad_norm: None,
        gradient_checkpointing: false,
        seed: 0,
    };
    Trainer::new(&case.loaded.model, config).unwrap()
}

#[test]
fn logits_and_loss_with_adapter_match_peft() {
    for mut case in cases() {
        let b = case.batch.clone();
        let logits = case.loaded.model.forward(&b.ids, b.batch).unwrap();
        let (expected, shape) = case.fixture.f32("logits");
        assert_close(
            &format!("{} logits", case.name),
            &logits,
            &expected,
            &shape,
            1e-4,
        );
        let loss = case.loaded.model.loss(&b.ids, &b.labels, b.batch).unwrap();
        let (expected, _) = case.fixture.f32("loss");
        assert_close(
            &format!("{} loss", case.name),
            &[loss],
            &expected,
            &[1],
            1e-4,
        );
        let scaling = case.fixture.json()["scaling"].as_f64().unwrap() as f32;
        let adapter = case.loaded.model.adapter().unwrap();
        assert!(
            adapter
                .pairs()
                .all(|(_, _, p)| (p.scaling - scaling).abs() < 1e-6),
            "{}: scaling {scaling}",
            case.name
        );
    }
}

#[test]
fn lora_gradients_match_peft_with_and_without_checkpointing() {
    for mut case in cases() {
        let b = case.batch.clone();
        for checkpointing in [false, true] {
            let model = &mut case.loaded.model;
            let mut grads = model.adapter().unwrap().zero_grads();
            let options = StepOptions {
                gradient_checkpointing: checkpointing,
                grad_scale: 1.0,
                dropout_seed: None,
            };
            let loss = model.loss_and_grads(&b, &mut grads, &options).unwrap();
            let (expected, _) = case.fixture.f32("loss");
            assert_close(
                &format!("{} training loss", case.name),
                &[loss],
                &expected,
                &[1],
                1e-4,
            );
            let label = format!("{} (checkpointing {checkpointing})", case.name);
            let matrices = grad_matrices(model.adapter().unwrap(), &grads);
            check_matrices(&label, &case.fixture, "grad", &matrices, 1e-4);
        }
    }
}

#[test]
fn merged_weight_matches_peft() {
    for case in cases() {
        let adapter = case.loaded.model.adapter().unwrap();
        let pair = adapter.pair(0, Target::QProj).unwrap();
        let base = case.loaded.model.layers[0]
            .self_attn
            .q_proj
            .to_f32()
            .unwrap();
        let merged: Vec<f32> = base
            .iter()
            .zip(pair.delta_weight())
            .map(|(w, d)| w + d)
            .collect();
        let (expected, shape) = case.fixture.f32("merged.layers.0.q_proj");
        assert_close(
            &format!("{} merged q_proj", case.name),
            &merged,
            &expected,
            &shape,
            1e-5,
        );
    }
}

#[test]
fn one_sgd_step_matches_torch() {
    for mut case in cases() {
        let mut trainer = trainer(&case, OptimizerKind::Sgd { weight_decay: 0.0 }, 0.1);
        let b = case.batch.clone();
        trainer.step(&mut case.loaded.model, &[b]).unwrap();
        let adapter = case.loaded.model.adapter().unwrap().clone();
        check_matrices(
            &case.name,
            &case.fixture,
            "sgd1",
            &adapter_matrices(&adapter),
            1e-3,
        );
    }
}

#[test]
fn three_adamw_steps_match_torch() {
    for mut case in cases() {
        let kind = OptimizerKind::AdamW {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut trainer = trainer(&case, kind, 1e-2);
        let b = case.batch.clone();
        let losses: Vec<f32> = (0..3)
            .map(|_| {
                trainer
                    .step(&mut case.loaded.model, std::slice::from_ref(&b))
                    .unwrap()
                    .loss
            })
            .collect();
        let (expected, shape) = case.fixture.f32("adamw_losses");
        assert_close(
            &format!("{} adamw losses", case.name),
            &losses,
            &expected,
            &shape,
            1e-4,
        );
        let adapter = case.loaded.model.adapter().unwrap().clone();
        check_matrices(
            &case.name,
            &case.fixture,
            "after3",
            &adapter_matrices(&adapter),
            1e-3,
        );
    }
}

#[test]
fn saved_adapter_round_trips_in_peft_names() {
    for case in cases() {
        let adapter = case.loaded.model.adapter().unwrap();
        let out = std::env::temp_dir().join(format!(
            "fastllama-peft-{}-{}",
            case.name,
            std::process::id()
        ));
        adapter.save(&out, None).unwrap();
        let again = LoraAdapter::load(&out, case.loaded.model.dims()).unwrap();
        assert_eq!(&again, adapter, "{}", case.name);
        // peft's own file names every tensor we wrote
        let ours = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let theirs = std::fs::read(case.dir.join("adapter_model.safetensors")).unwrap();
        let names = |b: &[u8]| {
            let mut n: Vec<String> = safetensors::SafeTensors::deserialize(b)
                .unwrap()
                .names()
                .into_iter()
                .map(str::to_string)
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&ours), names(&theirs), "{}", case.name);
        std::fs::remove_dir_all(&out).ok();
    }
}
