//! LoRA training on the GPU (bf16 base, f32 LoRA) against peft's f32 numbers for every adapter
//! under `$LLAMA_FIXTURES/peft`: the loss, every LoRA gradient, the losses of three AdamW steps
//! and the matrices after one SGD step, within bf16 tolerance. Skipped, and counted, without a CUDA device.

mod common;

use common::{adapter_matrices, check_matrices, grad_matrices};
use llama_fixtures::{assert_close, cuda_or_skip, fixture_names, fixtures_dir, Fixture};
use llama_model::{load, Batch, CudaLlamaModel, CudaTrainer, Precision, TrainConfig};
use llama_peft::{LoraAdapter, OptimizerKind, Schedule, ScheduleKind};

#[test]
fn gpu_lora_training_matches_peft_in_bf16() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let root = fixtures_dir().join("peft");
    for name in fixture_names("peft", "adapter_config.json") {
        let fixture = Fixture::open(&format!("peft/{name}/reference"));
        let base = fixture.json()["base_model"].as_str().unwrap();
        let cpu = load(&fixtures_dir().join(base), Precision::Exact, &mut |_, _| {})
            .unwrap()
            .model;
        let adapter = LoraAdapter::load(&root.join(&name), cpu.dims()).unwrap();
        let config = TrainConfig {
            optimizer: OptimizerKind::AdamW {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.01,
            },
            schedule: Schedule {
                kind: ScheduleKind::Constant,
                lr: 1e-2,
                warmup: 0,
                total: 3,
            },
            grad_accum: 1,
            max_grad_norm: None,
            gradient_checkpointing: true,
            seed: 0,
        };
        let mut trainer = CudaTrainer::new(
            CudaLlamaModel::upload(&gpu, &cpu).unwrap(),
            &adapter,
            config,
        )
        .unwrap();
        let (ids, shape) = fixture.i64("input_ids");
        let (labels, _) = fixture.i64("labels");
        let batch = Batch {
            ids: ids.iter().map(|&i| i as u32).collect(),
            labels,
            batch: shape[0],
        };
        let loss = trainer.loss_and_grads(&batch, 1.0).unwrap();
        let (expected, _) = fixture.f32("loss");
        assert_close(&format!("{name} gpu loss"), &[loss], &expected, &[1], 1e-2);
        let grads = trainer.grads().unwrap();
        let label = format!("{name} gpu");
        check_matrices(
            &label,
            &fixture,
            "grad",
            &grad_matrices(&adapter, &grads),
            5e-2,
        );
        let losses: Vec<f32> = (0..3)
            .map(|_| trainer.step(std::slice::from_ref(&batch)).unwrap().loss)
            .collect();
        let (expected, shape) = fixture.f32("adamw_losses");
        assert_close(
            &format!("{name} gpu adamw losses"),
            &losses,
            &expected,
            &shape,
            1e-2,
        );
        // One plain SGD step (lr 0.1) from the adapter as loaded: peft's sgd1 matrices. (After
        // AdamW steps the matrices are not compared: Adam divides each update by the gradient's
        // running RMS, so entries whose gradient is near zero move by bf16 noise; the losses
        // above check its updates.)
        let sgd = TrainConfig {
            optimizer: OptimizerKind::Sgd { weight_decay: 0.0 },
            schedule: Schedule {
                kind: ScheduleKind::Constant,
                lr: 0.1,
                warmup: 0,
                total: 1,
            },
            ..config
        };
        let mut trainer =
            CudaTrainer::new(CudaLlamaModel::upload(&gpu, &cpu).unwrap(), &adapter, sgd).unwrap();
        trainer.step(std::slice::from_ref(&batch)).unwrap();
        let trained = adapter_matrices(&trainer.adapter().unwrap());
        check_matrices(&label, &fixture, "sgd1", &trained, 2e-2);
    }
}

/// QLoRA on the GPU (NF4 projections dequantised before each product) against the CPU's
/// QLoRA (the same NF4 codes from the same values, f32 arithmetic): the LoRA gradients agree
/// within bf16 tolerance.
#[test]
fn gpu_qlora_gradients_match_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let name = fixture_names("peft", "adapter_config.json").remove(0);
    let fixture = Fixture::open(&format!("peft/{name}/reference"));
    let base = fixture.json()["base_model"].as_str().unwrap();
    let mut cpu = load(&fixtures_dir().join(base), Precision::Exact, &mut |_, _| {})
        .unwrap()
        .model;
    let adapter = LoraAdapter::load(&fixtures_dir().join("peft").join(&name), cpu.dims()).unwrap();
    // The GPU quantises bf16 weights: give the CPU the same bf16-rounded values.
    for layer in &mut cpu.layers {
        let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
        for w in [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ] {
            let (rows, cols) = w.shape();
            let rounded = w
                .to_f32()
                .unwrap()
                .iter()
                .map(|&v| llama_core::bf16::from_f32(v).to_f32())
                .collect();
            *w = llama_ops::Weight::dense(rounded, rows, cols).unwrap();
        }
    }
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd { weight_decay: 0.0 },
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            lr: 0.1,
            warmup: 0,
            total: 1,
        },
        grad_accum: 1,
        max_grad_norm: None,
        gradient_checkpointing: true,
        seed: 0,
    };
    let mut trainer = CudaTrainer::new(
        CudaLlamaModel::upload(&gpu, &cpu).unwrap(),
        &adapter,
        config,
    )
    .unwrap();
    trainer.quantize_base_nf4().unwrap();
    let (ids, shape) = fixture.i64("input_ids");
    let (labels, _) = fixture.i64("labels");
    let batch = Batch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        labels,
        batch: shape[0],
    };
    trainer.loss_and_grads(&batch, 1.0).unwrap();
    let gpu_grads = grad_matrices(&adapter, &trainer.grads().unwrap());
    cpu.convert_projections(llama_core::DType::Nf4).unwrap();
    cpu.set_adapter(Some(adapter.clone())).unwrap();
    let mut grads = adapter.zero_grads();
    let options = llama_model::StepOptions {
        gradient_checkpointing: false,
        grad_scale: 1.0,
        dropout_seed: None,
    };
    cpu.loss_and_grads(&batch, &mut grads, &options).unwrap();
    for ((label, got), (_, want)) in gpu_grads.iter().zip(grad_matrices(&adapter, &grads)) {
        assert_close(
            &format!("{name} gpu qlora {label}"),
            got,
            &want,
            &[want.len()],
            5e-2,
        );
    }
}
