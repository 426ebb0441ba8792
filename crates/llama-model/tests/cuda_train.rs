//! LoRA training on the GPU (bf16 base, f32 LoRA) against peft's f32 numbers for every adapter
//! under `$LLAMA_FIXTURES/peft`: the loss, every LoRA gradient, the losses of three AdamW steps
//! and the matrices after one SGD step, within bf16 tolerance; QLoRA's gradients against the
//! CPU's NF4 model; modules_to_save's gradients and step against the CPU's; the gradient norm
//! and a clipped step against the CPU's gradients; the kept mid against its recompute; a
//! checkpoint's moments and resume. Skipped, and counted, without a CUDA device.

mod common;

use std::sync::Arc;

use common::{adapter_matrices, check_matrices, constant_config, grad_matrices, Case};
use llama_core::cuda::CudaDevice;
use llama_fixtures::{assert_close, cuda_or_skip, fixture_names};
use llama_model::{CudaLlamaModel, CudaTrainer, StepOptions};
use llama_ops::quant::Nf4DoubleQuant;
use llama_peft::{AdapterGrads, LoraConfig, OptimizerKind};

/// A GPU trainer for the case's model and adapter: `optimizer` at a constant `lr`.
fn trainer(gpu: &Arc<CudaDevice>, c: &Case, optimizer: OptimizerKind, lr: f32) -> CudaTrainer {
    let config = constant_config(optimizer, lr, true);
    let model = CudaLlamaModel::upload(gpu, &c.model).unwrap();
    CudaTrainer::new(model, &c.adapter, config).unwrap()
}

const SGD: OptimizerKind = OptimizerKind::Sgd { weight_decay: 0.0 };

/// The CPU's gradients (f32, no checkpointing) of the case's adapter on its batch.
fn cpu_grads(c: &mut Case) -> AdapterGrads {
    c.model.set_adapter(Some(c.adapter.clone())).unwrap();
    let mut grads = c.adapter.zero_grads();
    let options = StepOptions {
        gradient_checkpointing: false,
        grad_scale: 1.0,
        dropout_seed: None,
    };
    c.model
        .loss_and_grads(&c.batch, &mut grads, &options)
        .unwrap();
    grads
}

#[test]
fn gpu_lora_training_matches_peft_in_bf16() {
    let Some(gpu) = cuda_or_skip!() else { return };
    for c in common::cases() {
        let label = format!("{} gpu", c.name);
        let adamw = OptimizerKind::AdamW {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut t = trainer(&gpu, &c, adamw, 1e-2);
        let loss = t.loss_and_grads(&c.batch, 1.0).unwrap();
        let (expected, _) = c.fixture.f32("loss");
        assert_close(&format!("{label} loss"), &[loss], &expected, &[1], 1e-2);
        let grads = grad_matrices(&c.adapter, &t.grads().unwrap());
        check_matrices(&label, &c.fixture, "grad", &grads, 5e-2);
        let batches = std::slice::from_ref(&c.batch);
        let losses: Vec<f32> = (0..3).map(|_| t.step(batches).unwrap().loss).collect();
        let (expected, shape) = c.fixture.f32("adamw_losses");
        assert_close(
            &format!("{label} adamw losses"),
            &losses,
            &expected,
            &shape,
            1e-2,
        );
        // One plain SGD step (lr 0.1) from the adapter as loaded: peft's sgd1 matrices. (After
        // AdamW steps the matrices are not compared: Adam divides each update by the gradient's
        // running RMS, so entries whose gradient is near zero move by bf16 noise; the losses
        // above check its updates.)
        let mut t = trainer(&gpu, &c, SGD, 0.1);
        t.step(batches).unwrap();
        let trained = adapter_matrices(&t.adapter().unwrap());
        check_matrices(&label, &c.fixture, "sgd1", &trained, 2e-2);
    }
}

/// The head in chunks of a few rows gives the loss and gradients of the head in one chunk:
/// each chunk's rows, targets and gradient rows line up.
#[test]
fn gpu_head_chunks_change_nothing() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let c = common::case(fixture_names("peft", "adapter_config.json").remove(0));
    let rows = c.batch.ids.len();
    let vocab = c.model.config.vocab_size;
    let mut whole = trainer(&gpu, &c, SGD, 0.1);
    whole.set_head_chunk_logits(rows * vocab);
    let loss = whole.loss_and_grads(&c.batch, 1.0).unwrap();
    let mut chunked = trainer(&gpu, &c, SGD, 0.1);
    // at most the fewest rows (2 or more) that do not divide the rows: several chunks, most
    // often with a short last one (the fixture's 24 rows: 5, 5, 5, 5, 4)
    let per_chunk = (2..=rows)
        .find(|k| !rows.is_multiple_of(*k))
        .unwrap_or(rows);
    chunked.set_head_chunk_logits(per_chunk * vocab);
    let chunked_loss = chunked.loss_and_grads(&c.batch, 1.0).unwrap();
    let label = format!("{} gpu head chunks", c.name);
    assert_close(
        &format!("{label} loss"),
        &[chunked_loss],
        &[loss],
        &[1],
        1e-3,
    );
    let want = grad_matrices(&c.adapter, &whole.grads().unwrap());
    let got = grad_matrices(&c.adapter, &chunked.grads().unwrap());
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        assert_close(&format!("{label} {name}"), got, want, &[want.len()], 1e-2);
    }
}

/// The forward keeping each layer's residual after the attention on the host (the recompute
/// then skips the o projection) gives the loss and gradients of recomputing it, bit for bit.
#[test]
fn gpu_kept_mid_changes_nothing() {
    let Some(gpu) = cuda_or_skip!() else { return };
    for c in common::cases() {
        assert!(
            c.model.config.num_hidden_layers > 1,
            "{}: one layer is never recomputed",
            c.name
        );
        let run = |keep: bool| {
            let mut t = trainer(&gpu, &c, SGD, 0.1);
            t.set_keep_mid(Some(keep));
            let loss = t.loss_and_grads(&c.batch, 1.0).unwrap();
            (loss, grad_matrices(&c.adapter, &t.grads().unwrap()))
        };
        let (loss, want) = run(false);
        let (kept_loss, got) = run(true);
        assert_eq!(kept_loss, loss, "{} loss", c.name);
        for ((name, got), (_, want)) in got.iter().zip(&want) {
            assert!(got == want, "{} {name} differs with mid kept", c.name);
        }
    }
}

/// A GPU checkpoint lists the AdamW moments in the CPU trainer's order (A then B of each pair,
/// layer by layer: after one step without weight decay each m is (1 − β₁)·g, against the
/// CPU's gradient g), and a trainer resumed from it continues as the uninterrupted one, bit
/// for bit.
#[test]
fn gpu_checkpoints_resume_exactly() {
    let Some(gpu) = cuda_or_skip!() else { return };
    for mut c in common::cases() {
        let adamw = OptimizerKind::AdamW {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let batches = vec![c.batch.clone()];
        let resumed_model = CudaLlamaModel::upload(&gpu, &c.model).unwrap();
        let mut t = trainer(&gpu, &c, adamw, 1e-2);
        t.step(&batches).unwrap();
        let state = t.optimizer_state().unwrap();
        let cpu = cpu_grads(&mut c);
        let grads = grad_matrices(&c.adapter, &cpu);
        assert_eq!(state.exp_avg.len(), grads.len(), "{} moments", c.name);
        for ((name, g), m) in grads.iter().zip(&state.exp_avg) {
            let want: Vec<f32> = g.iter().map(|g| 0.1 * g).collect();
            let label = format!("{} gpu checkpoint exp_avg {name}", c.name);
            assert_close(&label, m, &want, &[want.len()], 5e-2);
        }
        let dir = std::env::temp_dir().join(format!(
            "fastllama-gpu-checkpoint-{}-{}",
            c.name,
            std::process::id()
        ));
        t.save_checkpoint(&dir).unwrap();
        let dims = c.model.config.lora_dims();
        let adapter = llama_peft::LoraAdapter::load(&dir, dims).unwrap();
        let config = constant_config(adamw, 1e-2, true);
        let mut resumed = CudaTrainer::new(resumed_model, &adapter, config).unwrap();
        resumed.load_state(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let want = t.step(&batches).unwrap().loss;
        assert_eq!(
            resumed.step(&batches).unwrap().loss,
            want,
            "{} loss",
            c.name
        );
        let (got, want) = (resumed.adapter().unwrap(), t.adapter().unwrap());
        let matrices = adapter_matrices(&got)
            .into_iter()
            .zip(adapter_matrices(&want));
        for ((name, got), (_, want)) in matrices {
            assert!(got == want, "{} {name} differs after resuming", c.name);
        }
    }
}

/// QLoRA on the GPU (NF4 projections, absmaxes double-quantised, dequantised before each
/// product) against the CPU's QLoRA (the same NF4 codes and absmaxes from the same values, f32
/// arithmetic): the LoRA gradients agree
/// within bf16 tolerance.
#[test]
fn gpu_qlora_gradients_match_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut c = common::case(fixture_names("peft", "adapter_config.json").remove(0));
    // The GPU quantises bf16 weights: give the CPU the same bf16-rounded values.
    for layer in &mut c.model.layers {
        for w in layer.projections_mut() {
            let (rows, cols) = w.shape();
            let values = w.to_f32().unwrap();
            let rounded = values
                .iter()
                .map(|&v| llama_core::bf16::from_f32(v).to_f32())
                .collect();
            *w = llama_ops::Weight::dense(rounded, rows, cols).unwrap();
        }
    }
    let mut t = trainer(&gpu, &c, SGD, 0.1);
    t.quantize_base_nf4().unwrap();
    t.loss_and_grads(&c.batch, 1.0).unwrap();
    let gpu_grads = grad_matrices(&c.adapter, &t.grads().unwrap());
    c.model.convert_projections(llama_core::DType::Nf4).unwrap();
    // ... and the GPU's double-quantised absmaxes (bitsandbytes' compress_statistics).
    for layer in &mut c.model.layers {
        for w in layer.projections_mut() {
            let (rows, cols) = w.shape();
            let q = w.as_quant().expect("an NF4 projection");
            let blocks = Nf4DoubleQuant::compress(&q).unwrap().expand();
            *w = llama_ops::Weight::quantized(llama_core::DType::Nf4, rows, cols, blocks).unwrap();
        }
    }
    let grads = cpu_grads(&mut c);
    for ((label, got), (_, want)) in gpu_grads.iter().zip(grad_matrices(&c.adapter, &grads)) {
        let name = format!("{} gpu qlora {label}", c.name);
        assert_close(&name, got, &want, &[want.len()], 5e-2);
    }
}

/// The GPU step's gradient norm is the CPU gradients' (within bf16 tolerance), and with
/// max_grad_norm below it, one SGD step (lr 0.1) moves every matrix by −0.1 · (max / norm) · its
/// gradient: the table kernels' norm, clipping and update over every matrix at once.
#[test]
fn gpu_grad_norm_and_clipping_match_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut c = common::case(fixture_names("peft", "adapter_config.json").remove(0));
    let max_norm = 1e-3;
    let mut config = constant_config(SGD, 0.1, true);
    config.max_grad_norm = Some(max_norm);
    let model = CudaLlamaModel::upload(&gpu, &c.model).unwrap();
    let mut t = CudaTrainer::new(model, &c.adapter, config).unwrap();
    let report = t.step(std::slice::from_ref(&c.batch)).unwrap();
    let cpu = cpu_grads(&mut c);
    let grads = grad_matrices(&c.adapter, &cpu);
    let squares = grads
        .iter()
        .flat_map(|(_, g)| g)
        .map(|&g| (g as f64).powi(2));
    let norm = squares.sum::<f64>().sqrt() as f32;
    assert!(
        norm > 10.0 * max_norm,
        "the gradient norm {norm} would not be clipped"
    );
    let label = format!("{} gpu grad norm", c.name);
    assert_close(&label, &[report.grad_norm], &[norm], &[1], 5e-2);
    let factor = max_norm / (norm + 1e-6);
    let after = adapter_matrices(&t.adapter().unwrap());
    let before = adapter_matrices(&c.adapter);
    for ((label, a), ((_, b), (_, g))) in after.iter().zip(before.iter().zip(&grads)) {
        let moved: Vec<f32> = a.iter().zip(b).map(|(a, b)| a - b).collect();
        let step: Vec<f32> = g.iter().map(|g| -0.1 * factor * g).collect();
        let label = format!("{} gpu clipped step {label}", c.name);
        assert_close(&label, &moved, &step, &[step.len()], 5e-2);
    }
}

/// modules_to_save on the GPU (embed_tokens and lm_head trained whole: f32 masters, bf16
/// copies for the products) against the CPU's f32 gradients of the same adapter: both modules'
/// gradients and the LoRA ones within bf16 tolerance, and one SGD step (lr 0.1) moves each
/// module by −0.1 × its gradient.
#[test]
fn gpu_modules_to_save_match_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut c = common::case(fixture_names("peft", "adapter_config.json").remove(0));
    c.adapter.config.modules_to_save =
        LoraConfig::parse_modules_to_save(&["embed_tokens", "lm_head"]).unwrap();
    let (embed, head) = (c.model.embed_tokens.clone(), c.model.base_lm_head().clone());
    c.adapter.init_modules(&embed, &head).unwrap();
    let mut t = trainer(&gpu, &c, SGD, 0.1);
    t.loss_and_grads(&c.batch, 1.0).unwrap();
    let gpu_grads = t.grads().unwrap();
    let grads = cpu_grads(&mut c);
    let pairs = grad_matrices(&c.adapter, &gpu_grads);
    for ((label, got), (_, want)) in pairs.iter().zip(grad_matrices(&c.adapter, &grads)) {
        let name = format!("{} gpu modules_to_save {label}", c.name);
        assert_close(&name, got, &want, &[want.len()], 5e-2);
    }
    t.zero_grads().unwrap();
    t.step(std::slice::from_ref(&c.batch)).unwrap();
    let trained = t.adapter().unwrap();
    for (m, name) in ["embed_tokens", "lm_head"].iter().enumerate() {
        let want = grads.modules[m].as_ref().expect("trained on the CPU");
        let got = gpu_grads.modules[m].as_ref().expect("trained on the GPU");
        assert_close(
            &format!("{} gpu {name} grad", c.name),
            got,
            want,
            &[want.len()],
            5e-2,
        );
        let module = |a: &llama_peft::LoraAdapter| {
            let w = [&a.modules.embed_tokens, &a.modules.lm_head][m];
            w.as_ref()
                .expect("a saved module")
                .to_f32()
                .unwrap()
                .to_vec()
        };
        let moved: Vec<f32> = module(&trained)
            .iter()
            .zip(module(&c.adapter))
            .map(|(after, before)| after - before)
            .collect();
        let step: Vec<f32> = want.iter().map(|g| -0.1 * g).collect();
        let label = format!("{} gpu {name} after an SGD step", c.name);
        assert_close(&label, &moved, &step, &[step.len()], 5e-2);
    }
}
