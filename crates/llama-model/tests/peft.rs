//! Every adapter under `$LLAMA_FIXTURES/peft` against peft: logits and loss with the adapter,
//! every LoRA gradient, the merged weight, one SGD step and three AdamW steps — the steps
//! through [`Trainer`], the path `fastllama finetune` takes.

mod common;

use common::{adapter_matrices, check_matrices, constant_config, grad_matrices, Case};
use llama_core::DType;
use llama_fixtures::assert_close;
use llama_model::{Precision, StepOptions, Trainer};
use llama_peft::{LoraAdapter, OptimizerKind, Target};

/// The cases with their adapters on the models.
fn cases() -> Vec<Case> {
    common::cases()
        .into_iter()
        .map(|mut c| {
            c.model.set_adapter(Some(c.adapter.clone())).unwrap();
            c
        })
        .collect()
}

/// The fixtures' AdamW settings (their steps run at lr 1e-2).
const ADAMW: OptimizerKind = OptimizerKind::AdamW {
    betas: (0.9, 0.999),
    eps: 1e-8,
    weight_decay: 0.01,
};

fn trainer(case: &Case, optimizer: OptimizerKind, lr: f32) -> Trainer {
    let config = constant_config(optimizer, lr, false);
    Trainer::new(&case.model, config).unwrap()
}

#[test]
fn logits_and_loss_with_adapter_match_peft() {
    for mut case in cases() {
        let b = case.batch.clone();
        let logits = case.model.forward(&b.ids, b.batch).unwrap();
        let (expected, shape) = case.fixture.f32("logits");
        assert_close(
            &format!("{} logits", case.name),
            &logits,
            &expected,
            &shape,
            1e-4,
        );
        let loss = case.model.loss(&b.ids, &b.labels, b.batch).unwrap();
        let (expected, _) = case.fixture.f32("loss");
        assert_close(
            &format!("{} loss", case.name),
            &[loss],
            &expected,
            &[1],
            1e-4,
        );
        let scaling = case.fixture.json()["scaling"].as_f64().unwrap() as f32;
        let adapter = case.model.adapter().unwrap();
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
            let model = &mut case.model;
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

/// `fast` precision on the CPU: on a CPU with AVX512-BF16 the frozen weights are packed as bf16
/// and their products round the activations to bf16 (elsewhere it trains in f32 as `exact`
/// does); the loss, every LoRA gradient and three AdamW steps' losses stay within the bf16
/// tolerances the GPU trainer is held to, with and without checkpointing.
#[test]
fn fast_precision_training_matches_peft_in_bf16() {
    for mut case in cases() {
        let b = case.batch.clone();
        case.model.set_precision(Precision::Fast);
        let note = case.model.prepare_for_training().unwrap();
        let packed = llama_core::CpuFeatures::get().avx512bf16;
        assert_eq!(
            note.as_deref().is_some_and(|n| n.contains("bf16")),
            packed,
            "{note:?}"
        );
        let embed_dtype = case.model.lm_head().dtype();
        assert_eq!(
            embed_dtype == DType::BF16,
            packed,
            "the head is {embed_dtype}"
        );
        for checkpointing in [false, true] {
            let label = format!("{} fast (checkpointing {checkpointing})", case.name);
            let mut grads = case.model.adapter().unwrap().zero_grads();
            let options = StepOptions {
                gradient_checkpointing: checkpointing,
                grad_scale: 1.0,
                dropout_seed: None,
            };
            let loss = case.model.loss_and_grads(&b, &mut grads, &options).unwrap();
            let (expected, _) = case.fixture.f32("loss");
            assert_close(&format!("{label} loss"), &[loss], &expected, &[1], 1e-2);
            let matrices = grad_matrices(case.model.adapter().unwrap(), &grads);
            check_matrices(&label, &case.fixture, "grad", &matrices, 5e-2);
        }
        let mut t = trainer(&case, ADAMW, 1e-2);
        let batches = std::slice::from_ref(&b);
        let losses: Vec<f32> = (0..3)
            .map(|_| t.step(&mut case.model, batches).unwrap().loss)
            .collect();
        let (expected, shape) = case.fixture.f32("adamw_losses");
        let label = format!("{} fast adamw losses", case.name);
        assert_close(&label, &losses, &expected, &shape, 1e-2);
    }
}

#[test]
fn merged_weight_matches_peft() {
    for case in cases() {
        let adapter = case.model.adapter().unwrap();
        let pair = adapter.pair(0, Target::QProj).unwrap();
        let base = case.model.layers[0].self_attn.q_proj.to_f32().unwrap();
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
        trainer.step(&mut case.model, &[b]).unwrap();
        let adapter = case.model.adapter().unwrap().clone();
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
        let mut trainer = trainer(&case, ADAMW, 1e-2);
        let b = case.batch.clone();
        let losses: Vec<f32> = (0..3)
            .map(|_| {
                trainer
                    .step(&mut case.model, std::slice::from_ref(&b))
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
        let adapter = case.model.adapter().unwrap().clone();
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
        let adapter = case.model.adapter().unwrap();
        let out = std::env::temp_dir().join(format!(
            "fastllama-peft-{}-{}",
            case.name,
            std::process::id()
        ));
        adapter.save(&out, None).unwrap();
        let again = LoraAdapter::load(&out, case.model.dims()).unwrap();
        assert_eq!(&again, adapter, "{}", case.name);
        // peft's own file names every tensor we wrote
        let ours = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let theirs =
            std::fs::read(common::adapter_dir(&case.name).join("adapter_model.safetensors"))
                .unwrap();
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
