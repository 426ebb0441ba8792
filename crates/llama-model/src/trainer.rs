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

impl TrainConfig {
    /// The usual LoRA run, as Unsloth's notebooks set it up: AdamW (torch's defaults, no weight
    /// decay), `lr` warmed up over `warmup` steps then decayed linearly to 0 at `total`, one
    /// micro-batch per step, the gradient norm clipped at 1, seed 3407.
    pub fn adamw_linear(lr: f32, warmup: usize, total: usize) -> TrainConfig {
        TrainConfig {
            optimizer: OptimizerKind::AdamW {
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
            schedule: Schedule {
                kind: llama_peft::ScheduleKind::Linear,
                lr,
                warmup,
                total,
            },
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            gradient_checkpointing: false,
            seed: 3407,
        }
    }
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
        let mut steps = CpuSteps {
            trainer: self,
            model,
        };
        run_steps(&mut steps, batches, plan, on_step)
    }

    /// Writes the adapter (peft's format), the optimizer state and trainer_state.json to `dir`.
    pub fn save_checkpoint(&self, model: &LlamaModel, dir: &Path) -> Result<()> {
        let adapter = model
            .adapter()
            .ok_or_else(|| ModelError::input("adapter", "no adapter to save".to_string()))?;
        write_checkpoint(dir, adapter, &self.optimizer_state())
    }

    /// The optimizer's step and moments, as a checkpoint holds them.
    pub fn optimizer_state(&self) -> OptimizerState {
        OptimizerState {
            step: self.optimizer.step,
            exp_avg: self.optimizer.exp_avg.clone(),
            exp_avg_sq: self.optimizer.exp_avg_sq.clone(),
        }
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
        self.optimizer_state().save(dir)
    }

    /// Restores the state [`Self::save_state`] wrote; it must fit this trainer's adapter.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let sizes: Vec<usize> = self.optimizer.exp_avg.iter().map(Vec::len).collect();
        let state = OptimizerState::load(dir, &sizes)?;
        self.optimizer.step = state.step;
        self.optimizer.exp_avg = state.exp_avg;
        self.optimizer.exp_avg_sq = state.exp_avg_sq;
        Ok(())
    }
}

/// An optimizer's state as a checkpoint holds it (`optimizer.safetensors`): the steps taken
/// and, for AdamW, both moments of every trainable matrix in [`AdapterGrads::slices`] order
/// (A then B of each pair, then the saved modules). The CPU and GPU trainers write the same
/// file, so either can resume the other's run.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl OptimizerState {
    /// Writes `dir/optimizer.safetensors` (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors = vec![(
            "step".to_string(),
            Tensor::from_slice(&[self.step as f32], vec![1])?,
        )];
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
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

    /// Reads `dir/optimizer.safetensors` for moments of `sizes` (none for SGD); a missing
    /// tensor or one of another size is an error naming it.
    pub fn load(dir: &Path, sizes: &[usize]) -> Result<OptimizerState> {
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
        let moments = |kind: &str| -> Result<Vec<Vec<f32>>> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| read(&format!("{kind}.{i}"), n))
                .collect()
        };
        Ok(OptimizerState {
            step: read("step", 1)?[0] as u64,
            exp_avg: moments("exp_avg")?,
            exp_avg_sq: moments("exp_avg_sq")?,
        })
    }
}

/// Writes a checkpoint to `dir`: the adapter in peft's format, the optimizer state and
/// trainer_state.json, each file to a temporary name first.
pub(crate) fn write_checkpoint(
    dir: &Path,
    adapter: &llama_peft::LoraAdapter,
    state: &OptimizerState,
) -> Result<()> {
    adapter.save(dir, None)?;
    state.save(dir)?;
    let json = serde_json::json!({"global_step": state.step});
    llama_core::write_atomic(&dir.join(TRAINER_STATE), json.to_string().as_bytes())?;
    Ok(())
}

/// A training run's stepper, on whichever device: what [`run_steps`] drives.
pub(crate) trait Steps {
    fn steps_done(&self) -> usize;
    fn grad_accum(&self) -> usize;
    fn step(&mut self, micro_batches: &[Batch]) -> Result<StepReport>;
    fn save_checkpoint(&self, dir: &Path) -> Result<()>;
}

/// The CPU trainer with the model it trains.
struct CpuSteps<'a> {
    trainer: &'a mut Trainer,
    model: &'a mut LlamaModel,
}

impl Steps for CpuSteps<'_> {
    fn steps_done(&self) -> usize {
        self.trainer.steps_done()
    }

    fn grad_accum(&self) -> usize {
        self.trainer.config.grad_accum
    }

    fn step(&mut self, micro_batches: &[Batch]) -> Result<StepReport> {
        self.trainer.step(self.model, micro_batches)
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.trainer.save_checkpoint(self.model, dir)
    }
}

/// Optimizer steps until `plan.total_steps`, each over `grad_accum` micro-batches in the
/// plan's order (so a resumed run takes the batches an uninterrupted one would); `on_step`
/// sees each report; checkpoints as the plan says.
pub(crate) fn run_steps(
    steps: &mut dyn Steps,
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
    let accum = steps.grad_accum();
    while steps.steps_done() < plan.total_steps {
        let first = steps.steps_done() * accum;
        let micro: Vec<Batch> = (first..first + accum)
            .map(|k| batches[plan.batch_index(k, batches.len())].clone())
            .collect();
        let report = steps.step(&micro)?;
        on_step(&report)?;
        if let (Some(every), Some(out)) = (plan.save_every, &plan.out_dir) {
            if report.step % every == 0 && report.step < plan.total_steps {
                steps.save_checkpoint(&out.join(format!("checkpoint-{}", report.step)))?;
            }
        }
    }
    Ok(())
}
