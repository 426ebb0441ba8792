//! [`FastLlamaModel`]: the Rust counterpart of Unsloth's `FastLlamaModel` — load a model with
//! the options Unsloth takes, switch between inference and training, attach LoRA, generate,
//! train, and save or merge the adapter. It owns a [`LlamaModel`] (the weights, on the host)
//! and, on a GPU, the device copies it needs: a bf16 copy with the adapter merged for
//! generation, or the trainer's copy with the adapter beside it.
//!
//!   let (mut model, tokenizer) = FastLlamaModel::from_pretrained("smollm2-135m-instruct", opts)?;
//!   model.get_peft_model(LoraConfig::new(16, 16.0))?;   // → "patched 30 layers: 30 QKV, …"
//!   model.for_training(true);
//!   let mut trainer = model.trainer(config)?;
//!   model.train_step(&mut trainer, &batches)?;
//!   model.generate(&[prompt], &generation, &mut |_, _| true)?;   // inference, then back

use std::path::Path;

use llama_core::cuda::CudaDevice;
use llama_core::{DType, Device};
use llama_patch::PatchReport;
use llama_peft::{LoraAdapter, LoraConfig};
use llama_rope::RopeScaling;

use crate::cuda_model::CudaLlamaModel;
use crate::cuda_train::CudaTrainer;
use crate::error::{ModelError, Result};
use crate::fetch::resolve_model;
use crate::generate::{generate, Generation, GenerationConfig};
use crate::loader::load;
use crate::model::{LlamaModel, Precision};
use crate::tokenizer::Tokenizer;
use crate::trainer::{run_steps, Batch, RunPlan, StepReport, Steps, TrainConfig, Trainer};

/// `from_pretrained`'s options (Unsloth's arguments, plus where and how exactly to compute).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// The longest sequence to accept; past the model's trained context, linear RoPE scaling
    /// is set (factor max_seq_length / max_position_embeddings) unless `rope_scaling` is given
    /// or the model has a scaling of its own. None: the model's context.
    pub max_seq_length: Option<usize>,
    /// The compute dtype: F32 on the CPU, BF16 on CUDA (None picks the device's).
    pub dtype: Option<DType>,
    /// Quantise the seven projections of every layer to NF4 on load (QLoRA).
    pub load_in_4bit: bool,
    /// Overrides the config's RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    pub device: Device,
    pub precision: Precision,
    /// Pick the fast implementations ([`LlamaModel::pre_patch`]); false keeps every op on
    /// its reference implementation (slow: for comparison).
    pub patch: bool,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            max_seq_length: None,
            dtype: None,
            load_in_4bit: false,
            rope_scaling: None,
            device: Device::cuda_if_available(),
            precision: Precision::default(),
            patch: true,
        }
    }
}

/// What the model is set up for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// KV-cache decoding, left padding, no gradients.
    Inference,
    /// Gradients for the adapter, right padding, optionally recomputing each layer.
    Training { gradient_checkpointing: bool },
}

/// A training run's state on the device the model runs on.
pub enum FastTrainer {
    Cpu(Box<Trainer>),
    Cuda(Box<CudaTrainer>),
}

impl FastTrainer {
    /// Optimizer steps done.
    pub fn steps_done(&self) -> usize {
        match self {
            FastTrainer::Cpu(t) => t.steps_done(),
            FastTrainer::Cuda(t) => t.steps_done(),
        }
    }
}

/// A Llama model set up the way Unsloth's `FastLlamaModel` sets one up.
pub struct FastLlamaModel {
    model: LlamaModel,
    device: Device,
    mode: Mode,
    /// The GPU's bf16 copy for generation (adapter merged), made on first use and dropped
    /// whenever the weights or the adapter change.
    generation_copy: Option<CudaLlamaModel>,
    reports: Vec<PatchReport>,
    notes: Vec<String>,
}

impl FastLlamaModel {
    /// Loads `model` (an HF directory, a .gguf file or the default model's name, fetched on
    /// first use) and its tokenizer, set up by `options`. A model without a tokenizer is an
    /// error (load it with [`crate::load`] and use [`Self::new`] to go without).
    pub fn from_pretrained(
        model: &str,
        options: LoadOptions,
    ) -> Result<(FastLlamaModel, Tokenizer)> {
        let path = resolve_model(model, &mut |_| {})?;
        let loaded = load(&path, options.precision, &mut |_, _| {})?;
        let tokenizer = loaded.tokenizer.map_err(ModelError::Tokenizer)?;
        Ok((FastLlamaModel::new(loaded.model, options)?, tokenizer))
    }

    /// Sets up a loaded model as `options` say (see [`LoadOptions`]).
    pub fn new(mut model: LlamaModel, options: LoadOptions) -> Result<FastLlamaModel> {
        check_dtype(options.dtype, options.device)?;
        if options.device.is_cuda() && options.precision == Precision::Exact {
            return Err(ModelError::input(
                "precision",
                "exact (f32) runs on the CPU; the GPU computes in bf16".to_string(),
            ));
        }
        let mut notes = Vec::new();
        let trained = model.config.max_position_embeddings;
        let max_seq_length = options.max_seq_length.unwrap_or(trained);
        let scaling = match options.rope_scaling {
            Some(scaling) => Some(scaling),
            None if max_seq_length > trained
                && model.config.rope.scaling == RopeScaling::Default =>
            {
                let factor = max_seq_length as f64 / trained as f64;
                notes.push(format!(
                    "max_seq_length {max_seq_length} > the trained context {trained}: \
                     linear RoPE scaling with factor {factor}"
                ));
                Some(RopeScaling::Linear { factor })
            }
            None => None,
        };
        if let Some(scaling) = scaling {
            model.set_rope_scaling(scaling);
        }
        model.max_seq_length = max_seq_length;
        if options.load_in_4bit {
            model.convert_projections(DType::Nf4)?;
            notes.push("load_in_4bit: the projections are stored in NF4".to_string());
        }
        let report = if options.patch {
            model.pre_patch(options.device)
        } else {
            model.unpatch()
        };
        let device = model.patch_plan().device;
        if device != options.device {
            let why = match report.not_patched.is_empty() {
                true => "the reference implementations run on the CPU only".to_string(),
                false => report.not_patched.join("; "),
            };
            notes.push(format!(
                "runs on the {device}, not {}: {why}",
                options.device
            ));
        }
        Ok(FastLlamaModel {
            model,
            device,
            mode: Mode::Inference,
            generation_copy: None,
            reports: vec![report],
            notes,
        })
    }

    /// The model (weights, adapter, plan).
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// The model, to change: the GPU's copy is made again on next use.
    pub fn model_mut(&mut self) -> &mut LlamaModel {
        self.generation_copy = None;
        &mut self.model
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// What was set up on the way (RoPE scaling, NF4, a device fallback), for the user.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// llama-patch's reports: pre_patch's, then patch_peft_model's for each adapter.
    pub fn patch_reports(&self) -> &[PatchReport] {
        &self.reports
    }

    /// Unsloth's `for_inference`: KV-cache decoding, no gradients.
    pub fn for_inference(&mut self) {
        self.mode = Mode::Inference;
    }

    /// Unsloth's `for_training`: gradients for the adapter, with gradient checkpointing when
    /// asked. The weights are not touched either way.
    pub fn for_training(&mut self, use_gradient_checkpointing: bool) {
        self.mode = Mode::Training {
            gradient_checkpointing: use_gradient_checkpointing,
        };
    }

    /// Unsloth's `get_peft_model`: a fresh adapter with `config`'s settings (invalid values
    /// are errors naming the argument), then `patch_peft_model`; returns its report.
    pub fn get_peft_model(&mut self, config: LoraConfig) -> Result<PatchReport> {
        self.model_mut().get_peft_model(config)?;
        self.patch_peft_model()
    }

    /// Loads a peft-format adapter directory onto the model and patches it.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<PatchReport> {
        let adapter = LoraAdapter::load(dir, self.model.dims())?;
        self.model_mut().set_adapter(Some(adapter))?;
        self.patch_peft_model()
    }

    fn patch_peft_model(&mut self) -> Result<PatchReport> {
        let report = self.model.patch_peft_model()?;
        self.reports.push(report.clone());
        Ok(report)
    }

    /// Writes the adapter in peft's format (adapter_config.json + adapter_model.safetensors).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let adapter = self.model.adapter().ok_or_else(no_adapter)?;
        Ok(adapter.save(dir, None)?)
    }

    /// Merges the adapter into the base weights (peft's `merge_and_unload`) and returns it.
    pub fn merge_adapter(&mut self) -> Result<LoraAdapter> {
        self.model_mut().merge_adapter()?.ok_or_else(no_adapter)
    }

    /// Unsloth's fast generate: switches to inference, generates (the KV-cache path, prompts
    /// left-padded into one batch), and restores the previous mode. See [`generate`].
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        on_token: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Result<Generation> {
        let previous = self.mode;
        self.for_inference();
        let result = match self.device {
            Device::Cpu => generate(&mut self.model, prompts, config, on_token),
            Device::Cuda(ordinal) => {
                let copy = match self.generation_copy.take() {
                    Some(copy) => copy,
                    None => CudaLlamaModel::upload(&CudaDevice::get(ordinal)?, &self.model)?,
                };
                let copy = self.generation_copy.insert(copy);
                generate(copy, prompts, config, on_token)
            }
        };
        self.mode = previous;
        result
    }

    /// A training run for the adapter with `config` (its gradient checkpointing as
    /// [`Self::for_training`] set it), on the model's device. Needs training mode and an
    /// adapter. On the CPU the weights are readied first
    /// ([`LlamaModel::prepare_for_training`]: f32, or bf16 panels in `fast` precision on CPUs
    /// with AVX512-BF16).
    pub fn trainer(&mut self, mut config: TrainConfig) -> Result<FastTrainer> {
        let Mode::Training {
            gradient_checkpointing,
        } = self.mode
        else {
            return Err(ModelError::input(
                "mode",
                "training needs for_training() first".to_string(),
            ));
        };
        config.gradient_checkpointing = gradient_checkpointing;
        if self.model.adapter().is_none() {
            return Err(no_adapter());
        }
        Ok(match self.device {
            Device::Cpu => {
                if let Some(note) = self.model.prepare_for_training()? {
                    self.notes.push(note);
                }
                FastTrainer::Cpu(Box::new(Trainer::new(&self.model, config)?))
            }
            Device::Cuda(ordinal) => {
                let device = CudaDevice::get(ordinal)?;
                let base = CudaLlamaModel::upload_base(&device, &self.model)?;
                let adapter = self.model.adapter().ok_or_else(no_adapter)?;
                let mut trainer = CudaTrainer::new(base, adapter, config)?;
                if self.model.facts().weight_dtype == DType::Nf4 {
                    trainer.quantize_base_nf4()?;
                }
                FastTrainer::Cuda(Box::new(trainer))
            }
        })
    }

    /// One optimizer step over `micro_batches` (gradient accumulation); the model's adapter
    /// holds the updated weights afterwards, on either device.
    pub fn train_step(
        &mut self,
        trainer: &mut FastTrainer,
        micro_batches: &[Batch],
    ) -> Result<StepReport> {
        let report = self.step_on_device(trainer, micro_batches)?;
        self.sync_adapter(trainer)?;
        Ok(report)
    }

    /// One step; on the GPU the host's adapter is left behind (see [`Self::sync_adapter`]).
    fn step_on_device(
        &mut self,
        trainer: &mut FastTrainer,
        micro_batches: &[Batch],
    ) -> Result<StepReport> {
        if self.mode == Mode::Inference {
            return Err(ModelError::input(
                "mode",
                "train_step needs for_training() first".to_string(),
            ));
        }
        self.generation_copy = None;
        match trainer {
            FastTrainer::Cpu(t) => t.step(&mut self.model, micro_batches),
            FastTrainer::Cuda(t) => t.step(micro_batches),
        }
    }

    /// Copies a GPU trainer's adapter to the host model (nothing to do on the CPU, where the
    /// trainer updates the model's own adapter).
    fn sync_adapter(&mut self, trainer: &FastTrainer) -> Result<()> {
        if let FastTrainer::Cuda(t) = trainer {
            self.model.set_adapter(Some(t.adapter()?))?;
        }
        Ok(())
    }
}

impl FastLlamaModel {
    /// Writes a checkpoint of `trainer`'s run to `dir`: the adapter (peft's format), the
    /// optimizer state and trainer_state.json — the same files from either device.
    pub fn save_checkpoint(&self, trainer: &FastTrainer, dir: &Path) -> Result<()> {
        match trainer {
            FastTrainer::Cpu(t) => t.save_checkpoint(&self.model, dir),
            FastTrainer::Cuda(t) => t.save_checkpoint(dir),
        }
    }

    /// Continues a run from a checkpoint [`Self::save_checkpoint`] wrote (on either device):
    /// its adapter onto the model, then a trainer with `config` at its step and moments, so
    /// the run goes on exactly as if it had not stopped. Needs training mode.
    pub fn resume(&mut self, dir: &Path, config: TrainConfig) -> Result<FastTrainer> {
        self.load_adapter(dir)?;
        let mut trainer = self.trainer(config)?;
        match &mut trainer {
            FastTrainer::Cpu(t) => t.load_state(dir)?,
            FastTrainer::Cuda(t) => t.load_state(dir)?,
        }
        Ok(trainer)
    }

    /// Optimizer steps until `plan.total_steps`, the micro-batches in the plan's order
    /// (see [`RunPlan`]), checkpoints as it says; `on_step` sees each step's report.
    pub fn run(
        &mut self,
        trainer: &mut FastTrainer,
        batches: &[Batch],
        plan: &RunPlan,
        on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
    ) -> Result<()> {
        let mut steps = FastSteps {
            model: self,
            trainer,
        };
        // The adapter comes back from a GPU once, at the end, not after every step.
        run_steps(&mut steps, batches, plan, on_step)?;
        self.sync_adapter(trainer)
    }
}

/// A FastLlamaModel with its trainer, as [`run_steps`] drives them.
struct FastSteps<'a> {
    model: &'a mut FastLlamaModel,
    trainer: &'a mut FastTrainer,
}

impl Steps for FastSteps<'_> {
    fn steps_done(&self) -> usize {
        self.trainer.steps_done()
    }

    fn grad_accum(&self) -> usize {
        match &*self.trainer {
            FastTrainer::Cpu(t) => t.config.grad_accum,
            FastTrainer::Cuda(t) => t.config().grad_accum,
        }
    }

    fn step(&mut self, micro_batches: &[Batch]) -> Result<StepReport> {
        self.model.step_on_device(self.trainer, micro_batches)
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.model.save_checkpoint(self.trainer, dir)
    }
}

fn no_adapter() -> ModelError {
    ModelError::input(
        "adapter",
        "the model has no LoRA adapter (get_peft_model or load_adapter first)".to_string(),
    )
}

/// The compute dtype must be the device's: f32 on the CPU, bf16 on CUDA.
fn check_dtype(dtype: Option<DType>, device: Device) -> Result<()> {
    let native = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    match dtype {
        Some(d) if d != native => Err(ModelError::input(
            "dtype",
            format!("{d} is not a compute dtype on the {device}: it computes in {native}"),
        )),
        _ => Ok(()),
    }
}
