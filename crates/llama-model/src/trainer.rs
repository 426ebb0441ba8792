//! The LoRA training loop's step: gradient accumulation over micro-batches, clipping, the
//! schedule's learning rate and the optimizer update — the one path `fastllama finetune` and
//! the tests take — and its state on disk for exact resumption.

use std::path::Path;

use llama_core::Tensor;
use llama_peft::{clip_grad_norm, AdapterGrads, Optimizer, OptimizerKind, Schedule};
use safetensors::SafeTensors;

use crate::error::{ModelError, Result};
use crate::model::LlamaModel;
use crate::train::StepOptions;

/// One micro-batch: `ids` and `labels` [batch, T] (labels unshifted, −100 ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub batch: usize,
}

impl Batch {
    /// Tokens whose next token is scored.
    pub fn scored_tokens(&self) -> usize {
        let seq = self.ids.len() / self.batch.max(1);
        crate::model::shift_labels(&self.labels, seq)
            .iter()
            .filter(|&&t| t != -100)
            .count()
    }
}

/// The settings of a training run's steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub schedule: Schedule,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the joint gradient norm to this.
    pub max_grad_norm: Option<f32>,
    pub gradient_checkpointing: bool,
    /// Seeds LoRA dropout.
    pub seed: u64,
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Optimizer steps done, this one included.
    pub step: usize,
    /// The mean of the micro-batches' losses, before the update.
    pub loss: f32,
    /// The learning rate used.
    pub lr: f32,
    /// The gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens run through the model.
    pub tokens: usize,
}

/// The optimizer and its position in the schedule.
pub struct Trainer {
    pub config: TrainConfig,
    pub optimizer: Optimizer,
    grads: AdapterGrads,
}

const STATE_FILE: &str = "optimizer.safetensors";

/// How a run walks its micro-batches and where it leaves checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPlan {
    /// Optimizer steps to reach (counting any done before a resume).
    pub total_steps: usize,
    /// Visit each epoch's batches in a seeded random order (else file order).
    pub shuffle: bool,
    pub seed: u64,
    /// Write a checkpoint every this many steps, under `out_dir/checkpoint-{step}`.
    pub save_every: Option<usize>,
    pub out_dir: Option<std::path::PathBuf>,
}

impl RunPlan {
    /// The index of the `k`-th micro-batch of the run among `count` batches: epoch k / count,
    /// in file order or in that epoch's seeded permutation. Resuming at a step finds the same
    /// batches an uninterrupted run would have used.
    pub fn batch_index(&self, k: usize, count: usize) -> usize {
        let (epoch, within) = (k / count, k % count);
        if !self.shuffle {
            return within;
        }
        let mut order: Vec<usize> = (0..count).collect();
        let mut rng = llama_core::SplitMix64::new(
            self.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        // Fisher–Yates
        for i in (1..count).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order[within]
    }
}

/// trainer_state.json beside a checkpoint's adapter and optimizer state.
const TRAINER_STATE: &str = "trainer_state.json";

impl Trainer {
    /// A trainer for the adapter on `model` (which must have one).
    pub fn new(model: &LlamaModel, config: TrainConfig) -> Result<Trainer> {
        let adapter = model.adapter().ok_or_else(|| {
            ModelError::input("adapter", "training needs a LoRA adapter".to_string())
        })?;
        if config.grad_accum == 0 {
            return Err(ModelError::input(
                "grad_accum",
                "must be at least 1".to_string(),
            ));
        }
        if let Some(n) = config.max_grad_norm.filter(|n| n.is_nan() || *n <= 0.0) {
            return Err(ModelError::input(
                "max_grad_norm",
                format!("{n} must be positive"),
            ));
        }
        if !(config.schedule.lr >= 0.0 && config.schedule.lr.is_finite()) {
            return Err(ModelError::input(
                "lr",
                format!("{} must be a finite number ≥ 0", config.schedule.lr),
            ));
        }
        let grads = adapter.zero_grads();
        let sizes: Vec<usize> = grads.slices().iter().map(|g| g.len()).collect();
        let optimizer = Optimizer::new(config.optimizer, &sizes)?;
        Ok(Trainer {
            config,
            optimizer,
            grads,
        })
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> usize {
        self.optimizer.step as usize
    }

    /// One optimizer step: the gradients of every micro-batch (each weighted 1/count),
    /// clipped, then the update at the schedule's learning rate.
    pub fn step(&mut self, model: &mut LlamaModel, micro_batches: &[Batch]) -> Result<StepReport> {
        if micro_batches.is_empty() {
            return Err(ModelError::input(
                "micro_batches",
                "a step needs at least one batch".to_string(),
            ));
        }
        self.grads.zero();
        let step = self.steps_done();
        let (mut loss, mut tokens) = (0f32, 0usize);
        for (i, b) in micro_batches.iter().enumerate() {
            let options = StepOptions {
                gradient_checkpointing: self.config.gradient_checkpointing,
                grad_scale: 1.0 / micro_batches.len() as f32,
                dropout_seed: Some(
                    self.config.seed
                        ^ ((step * micro_batches.len() + i) as u64)
                            .wrapping_mul(0xD1B5_4A32_D192_ED03),
                ),
            };
            loss +=
                model.loss_and_grads(b, &mut self.grads, &options)? / micro_batches.len() as f32;
            tokens += b.ids.len();
        }
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(self.grads.slices_mut(), max),
            None => clip_grad_norm(self.grads.slices_mut(), f32::INFINITY),
        };
        let lr = self.config.schedule.lr_at(step);
        let adapter = model.adapter_mut().ok_or_else(|| {
            ModelError::input(
                "adapter",
                "the model's adapter was removed during training".to_string(),
            )
        })?;
        self.optimizer
            .step(adapter.parameters_mut(), &self.grads.slices(), lr)?;
        Ok(StepReport {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens,
        })
    }

    /// Runs optimizer steps until `plan.total_steps`, each over `grad_accum` micro-batches
    /// taken in the plan's order; `on_step` sees each report (and may stop the run with an
    /// error); checkpoints are written as the plan says.
    pub fn run(
        &mut self,
        model: &mut LlamaModel,
        batches: &[Batch],
        plan: &RunPlan,
        on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
    ) -> Result<()> {
        if batches.is_empty() {
            return Err(ModelError::input(
                "data",
                "no batch has a token to score".to_string(),
            ));
        }
        let accum = self.config.grad_accum;
        while self.steps_done() < plan.total_steps {
            let first = self.steps_done() * accum;
            let micro: Vec<Batch> = (first..first + accum)
                .map(|k| batches[plan.batch_index(k, batches.len())].clone())
                .collect();
            let report = self.step(model, &micro)?;
            on_step(&report)?;
            if let (Some(every), Some(out)) = (plan.save_every, &plan.out_dir) {
                if report.step % every == 0 && report.step < plan.total_steps {
                    self.save_checkpoint(model, &out.join(format!("checkpoint-{}", report.step)))?;
                }
            }
        }
        Ok(())
    }

    /// Writes the adapter (peft's format), the optimizer state and trainer_state.json to `dir`.
    pub fn save_checkpoint(&self, model: &LlamaModel, dir: &Path) -> Result<()> {
        let adapter = model
            .adapter()
            .ok_or_else(|| ModelError::input("adapter", "no adapter to save".to_string()))?;
        adapter.save(dir, None)?;
        self.save_state(dir)?;
        let state = serde_json::json!({"global_step": self.steps_done()});
        llama_core::write_atomic(&dir.join(TRAINER_STATE), state.to_string().as_bytes())?;
        Ok(())
    }

    /// Restores a checkpoint written by [`Self::save_checkpoint`]: the adapter onto `model`
    /// and the optimizer state into a new trainer with `config`.
    pub fn resume(model: &mut LlamaModel, dir: &Path, config: TrainConfig) -> Result<Trainer> {
        let adapter = llama_peft::LoraAdapter::load(dir, model.dims())?;
        model.set_adapter(Some(adapter))?;
        let mut trainer = Trainer::new(model, config)?;
        trainer.load_state(dir)?;
        Ok(trainer)
    }

    /// Writes the optimizer's state to `dir/optimizer.safetensors` (atomically).
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        tensors.push((
            "step".to_string(),
            Tensor::from_slice(&[self.optimizer.step as f32], vec![1])?,
        ));
        for (i, (m, v)) in self
            .optimizer
            .exp_avg
            .iter()
            .zip(&self.optimizer.exp_avg_sq)
            .enumerate()
        {
            tensors.push((
                format!("exp_avg.{i}"),
                Tensor::from_slice(m, vec![m.len()])?,
            ));
            tensors.push((
                format!("exp_avg_sq.{i}"),
                Tensor::from_slice(v, vec![v.len()])?,
            ));
        }
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::save_safetensors(&refs, &dir.join(STATE_FILE))?;
        Ok(())
    }

    /// Restores the state [`Self::save_state`] wrote; it must fit this trainer's adapter.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let bad = |reason: String| ModelError::format(&path, "optimizer state", reason);
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str, len: usize| -> Result<Vec<f32>> {
            let view = file
                .tensor(name)
                .map_err(|_| bad(format!("{name} is missing")))?;
            let values = Tensor::from_safetensors(&view)?.to_vec_f32()?;
            if values.len() != len {
                return Err(bad(format!(
                    "{name} holds {} values, the adapter needs {len}",
                    values.len()
                )));
            }
            Ok(values)
        };
        let step = read("step", 1)?[0] as u64;
        let mut optimizer = self.optimizer.clone();
        optimizer.step = step;
        for (i, m) in optimizer.exp_avg.iter_mut().enumerate() {
            *m = read(&format!("exp_avg.{i}"), m.len())?;
        }
        for (i, v) in optimizer.exp_avg_sq.iter_mut().enumerate() {
            *v = read(&format!("exp_avg_sq.{i}"), v.len())?;
        }
        self.optimizer = optimizer;
        Ok(())
    }
}
