//! LoRA through `FastLlamaModel` (suite `integration`): every peft fixture adapter loaded onto
//! its base model gives peft's logits and loss and, after one SGD step through
//! `FastLlamaModel::train_step`, peft's weights; and the whole life of a fresh adapter —
//! get_peft_model, for_training, steps that lower the loss, generate (which switches to
//! inference and back), save, load into a fresh model, merge — on every fixture model.

mod common;

use common::{load_model, model_dirs, pattern_batches, scratch, train_config};
use llama_core::Device;
use llama_fixtures::{assert_close, fixture_names, fixtures_dir, Fixture};
use llama_model::{
    Batch, FastLlamaModel, FastTrainer, GenerationConfig, LoadOptions, Mode, Precision, RunPlan,
    TrainConfig,
};
use llama_peft::{peft_name, LoraConfig, OptimizerKind, Schedule, ScheduleKind};

fn cpu_exact() -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        precision: Precision::Exact,
        ..LoadOptions::default()
    }
}

/// A fixture adapter loaded onto its base model through `load_adapter`, and its batch.
fn peft_case(name: &str) -> (Fixture, FastLlamaModel, Batch) {
    let fixture = Fixture::open(&format!("peft/{name}/reference"));
    let base = fixture.json()["base_model"].as_str().unwrap().to_string();
    let mut fast =
        FastLlamaModel::new(load_model(&fixtures_dir().join(base)), cpu_exact()).unwrap();
    fast.load_adapter(&fixtures_dir().join("peft").join(name))
        .unwrap();
    let (ids, shape) = fixture.i64("input_ids");
    let batch = Batch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        labels: fixture.i64("labels").0,
        batch: shape[0],
    };
    (fixture, fast, batch)
}

fn sgd(lr: f32) -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerKind::Sgd { weight_decay: 0.0 },
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            lr,
            warmup: 0,
            total: 1,
        },
        grad_accum: 1,
        max_grad_norm: None,
        gradient_checkpointing: false,
        seed: 0,
    }
}

/// The losses of `count` train_steps over `data` in order.
fn steps(
    fast: &mut FastLlamaModel,
    trainer: &mut FastTrainer,
    data: &[Batch],
    count: usize,
) -> Vec<f32> {
    (0..count)
        .map(|step| {
            let b = &data[step % data.len()];
            fast.train_step(trainer, std::slice::from_ref(b))
                .unwrap()
                .loss
        })
        .collect()
}

/// The losses of a run as `plan` drives it.
fn run_losses(
    fast: &mut FastLlamaModel,
    trainer: &mut FastTrainer,
    data: &[Batch],
    plan: &RunPlan,
) -> Vec<f32> {
    let mut losses = Vec::new();
    fast.run(trainer, data, plan, &mut |r| {
        losses.push(r.loss);
        Ok(())
    })
    .unwrap();
    losses
}

#[test]
fn peft_adapters_through_fast_llama_model_match_peft() {
    for name in fixture_names("peft", "adapter_config.json") {
        let (fixture, mut fast, b) = peft_case(&name);
        let layers = fast.model().layers.len();
        let report = fast.patch_reports().last().unwrap().to_string();
        assert!(report.contains("patched"), "{name}: {report}");
        let model = fast.model_mut();
        let logits = model.forward(&b.ids, b.batch).unwrap();
        let (expected, shape) = fixture.f32("logits");
        assert_close(&format!("{name} logits"), &logits, &expected, &shape, 1e-4);
        let loss = model.loss(&b.ids, &b.labels, b.batch).unwrap();
        assert_close(
            &format!("{name} loss"),
            &[loss],
            &fixture.f32("loss").0,
            &[1],
            1e-4,
        );
        // one SGD step (lr 0.1), the fixture's: every matrix as peft has it after
        fast.for_training(false);
        let mut trainer = fast.trainer(sgd(0.1)).unwrap();
        assert!(matches!(trainer, FastTrainer::Cpu(_)));
        fast.train_step(&mut trainer, std::slice::from_ref(&b))
            .unwrap();
        let adapter = fast.model().adapter().unwrap();
        assert_eq!(adapter.layers.len(), layers);
        for (i, t, p) in adapter.pairs() {
            for (which, values) in [("A", &p.a), ("B", &p.b)] {
                let key = format!("sgd1.{}", peft_name(i, t, which, true));
                let (expected, shape) = fixture.f32(&key);
                assert_close(&format!("{name} {key}"), values, &expected, &shape, 1e-3);
            }
        }
    }
}

#[test]
fn a_fresh_adapter_trains_saves_loads_and_merges() {
    for dir in model_dirs() {
        let label = dir.display().to_string();
        let mut fast = FastLlamaModel::new(load_model(&dir), cpu_exact()).unwrap();
        let report = fast.get_peft_model(LoraConfig::new(4, 8.0)).unwrap();
        let layers = fast.model().layers.len();
        assert_eq!(
            report.summary,
            format!("patched {layers} layers: {layers} QKV, {layers} O, {layers} MLP")
        );
        let data = pattern_batches(fast.model(), 21, 8, 2);
        assert!(fast.trainer(train_config(20, 1)).is_err(), "inference mode");
        fast.for_training(true);
        let mut trainer = fast.trainer(train_config(20, 1)).unwrap();
        let losses = steps(&mut fast, &mut trainer, &data, 20);
        assert_eq!(trainer.steps_done(), 20);
        assert!(losses[19] < 0.5 * losses[0], "{label}: {losses:?}");
        // generate switches to inference and back
        let prompt = data[0].ids[..4].to_vec();
        let config = GenerationConfig {
            max_new_tokens: 3,
            ..GenerationConfig::default()
        };
        fast.generate(&[prompt], &config, &mut |_, _| true).unwrap();
        assert_eq!(
            fast.mode(),
            Mode::Training {
                gradient_checkpointing: true
            }
        );
        // saved, loaded onto a fresh model, merged: the same logits every way
        let ids = data[0].ids.clone();
        let trained = fast.model_mut().forward(&ids, data[0].batch).unwrap();
        let out = scratch("fast-adapter");
        fast.save_adapter(&out).unwrap();
        let mut fresh = FastLlamaModel::new(load_model(&dir), cpu_exact()).unwrap();
        fresh.load_adapter(&out).unwrap();
        let reloaded = fresh.model_mut().forward(&ids, data[0].batch).unwrap();
        assert_close(
            &format!("{label} reloaded"),
            &reloaded,
            &trained,
            &[trained.len()],
            1e-6,
        );
        fresh.merge_adapter().unwrap();
        assert!(fresh.model().adapter().is_none());
        let merged = fresh.model_mut().forward(&ids, data[0].batch).unwrap();
        assert_close(
            &format!("{label} merged"),
            &merged,
            &trained,
            &[trained.len()],
            1e-5,
        );
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn fast_llama_model_trains_and_generates_on_the_gpu() {
    let Some(gpu) = llama_fixtures::cuda_or_skip!() else {
        return;
    };
    let on_gpu = LoadOptions {
        device: Device::Cuda(gpu.ordinal()),
        precision: Precision::Fast,
        ..LoadOptions::default()
    };
    for dir in model_dirs() {
        let label = dir.display().to_string();
        let mut fast = FastLlamaModel::new(load_model(&dir), on_gpu.clone()).unwrap();
        assert!(fast.device().is_cuda(), "{label}");
        // dropout needs the CPU's plain path: the GPU trainer says so
        let mut dropout = LoraConfig::new(4, 8.0);
        dropout.lora_dropout = 0.1;
        fast.get_peft_model(dropout).unwrap();
        fast.for_training(true);
        let err = fast.trainer(train_config(20, 1)).err().unwrap().to_string();
        assert!(err.starts_with("lora_dropout"), "{err}");
        fast.get_peft_model(LoraConfig::new(4, 8.0)).unwrap();
        let mut trainer = fast.trainer(train_config(20, 1)).unwrap();
        assert!(matches!(trainer, FastTrainer::Cuda(_)));
        let data = pattern_batches(fast.model(), 21, 8, 2);
        let losses = steps(&mut fast, &mut trainer, &data, 20);
        assert!(losses[19] < 0.5 * losses[0], "{label}: {losses:?}");
        // the host model holds the trained adapter: its loss on the CPU agrees (bf16 on the GPU)
        let b = &data[0];
        let cpu_loss = fast.model_mut().loss(&b.ids, &b.labels, b.batch).unwrap();
        let gpu_loss = fast
            .train_step(&mut trainer, std::slice::from_ref(b))
            .unwrap()
            .loss;
        assert!(
            (cpu_loss - gpu_loss).abs() < 0.05 * cpu_loss.max(0.1),
            "{label}: {cpu_loss} vs {gpu_loss}"
        );
        let config = GenerationConfig {
            max_new_tokens: 4,
            ..GenerationConfig::default()
        };
        let out = fast
            .generate(&[b.ids[..4].to_vec()], &config, &mut |_, _| true)
            .unwrap();
        assert_eq!(out.ids[0].len(), 4);
        // a run resumed from a GPU checkpoint repeats the whole run, and the CPU reads the
        // same checkpoint (its next loss within bf16 of the GPU's)
        let out = scratch("gpu-resume");
        let (whole, tail, _, _) = run_and_resume(&dir, &on_gpu, &out);
        assert_close(&format!("{label} resumed"), &tail, &whole[3..], &[3], 1e-5);
        let mut cpu = FastLlamaModel::new(load_model(&dir), cpu_exact()).unwrap();
        cpu.for_training(true);
        let checkpoint = out.join("checkpoint-3");
        let mut trainer = cpu.resume(&checkpoint, train_config(6, 2)).unwrap();
        assert_eq!(trainer.steps_done(), 3);
        let data = pattern_batches(cpu.model(), 2, 7, 2);
        let plan = RunPlan {
            total_steps: 4,
            ..resume_plan(&out)
        };
        let next = run_losses(&mut cpu, &mut trainer, &data, &plan);
        let close = (next[0] - whole[3]).abs() < 0.05 * whole[3].max(0.1);
        assert!(close, "{label}: {next:?} vs {whole:?}");
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Six shuffled steps with a checkpoint after three, into `out`.
fn resume_plan(out: &std::path::Path) -> RunPlan {
    RunPlan {
        total_steps: 6,
        shuffle: true,
        seed: 3,
        save_every: Some(3),
        out_dir: Some(out.to_path_buf()),
    }
}

/// Runs six steps of a fresh r=4 adapter from step 0 (writing checkpoint-3 into `out`),
/// then resumes a second model from that checkpoint; the losses of both, and the models.
fn run_and_resume(
    dir: &std::path::Path,
    options: &LoadOptions,
    out: &std::path::Path,
) -> (Vec<f32>, Vec<f32>, FastLlamaModel, FastLlamaModel) {
    let plan = resume_plan(out);
    let mut whole = FastLlamaModel::new(load_model(dir), options.clone()).unwrap();
    whole.get_peft_model(LoraConfig::new(4, 8.0)).unwrap();
    whole.for_training(true);
    let data = pattern_batches(whole.model(), 2, 7, 2);
    let mut trainer = whole.trainer(train_config(6, 2)).unwrap();
    let losses = run_losses(&mut whole, &mut trainer, &data, &plan);
    let mut resumed = FastLlamaModel::new(load_model(dir), options.clone()).unwrap();
    resumed.for_training(true);
    let mut trainer = resumed
        .resume(&out.join("checkpoint-3"), train_config(6, 2))
        .unwrap();
    assert_eq!(trainer.steps_done(), 3);
    let tail = run_losses(&mut resumed, &mut trainer, &data, &plan);
    (losses, tail, whole, resumed)
}

#[test]
fn a_run_resumed_from_its_checkpoint_repeats_the_whole_run() {
    for dir in model_dirs() {
        let out = scratch("fast-resume");
        let (whole, tail, a, b) = run_and_resume(&dir, &cpu_exact(), &out);
        assert_eq!(tail, whole[3..], "{}", dir.display());
        assert_eq!(a.model().adapter(), b.model().adapter());
        std::fs::remove_dir_all(&out).ok();
    }
}
