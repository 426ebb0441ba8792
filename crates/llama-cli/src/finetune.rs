//! `fastllama finetune` (LoRA / QLoRA on the CPU or a GPU, through `FastLlamaModel`),
//! `fastllama merge` and `fastllama bench-train`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llama_core::{DType, Device};
use llama_model::data::{batches, read_jsonl, tokenize};
use llama_model::{
    save_gguf, save_hf, Batch, FastLlamaModel, LoadOptions, LoadedModel, RunPlan, StepReport,
    TrainConfig, Trainer,
};
use llama_peft::{LoraAdapter, LoraConfig, OptimizerKind, Schedule, ScheduleKind};
use serde_json::json;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL records: {"text"}, {"messages": [{"role", "content"}…]} or {"input_ids", "labels"}.
    #[arg(long)]
    data: PathBuf,
    /// Where the adapter, the loss log (train_log.jsonl) and checkpoints go.
    #[arg(long)]
    out: PathBuf,
    /// Start from this adapter instead of a fresh one.
    #[arg(long, conflicts_with = "resume")]
    init_adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Comma-separated projections, or all-linear.
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    target_modules: Vec<String>,
    #[arg(long)]
    use_rslora: bool,
    /// Layer indices to adapt (default: all).
    #[arg(long, value_delimiter = ',')]
    layers_to_transform: Option<Vec<usize>>,
    /// Whole modules trained beside the adapter, in f32: embed_tokens, lm_head.
    #[arg(long, value_delimiter = ',')]
    modules_to_save: Vec<String>,
    /// lora_A's initialisation: kaiming (peft's default) or gaussian.
    #[arg(long, default_value = "kaiming")]
    init_lora_weights: String,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.999")]
    betas: Vec<f32>,
    #[arg(long, default_value_t = 1e-8)]
    eps: f32,
    /// constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    lr_scheduler: String,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// Optimizer steps.
    #[arg(long, required_unless_present = "epochs", conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<f32>,
    #[arg(long, default_value_t = 2048)]
    max_seq_length: usize,
    /// Join all records into rows of max_seq_length instead of padding each.
    #[arg(long)]
    packing: bool,
    /// Recompute each layer's forward in the backward (less memory, about a third more time).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// QLoRA: base projections quantised to NF4 and dequantised on the fly.
    #[arg(long)]
    load_in_4bit: bool,
    #[arg(long, default_value_t = 3407)]
    seed: u64,
    #[arg(long)]
    shuffle: bool,
    /// Write a checkpoint every N steps (out/checkpoint-N).
    #[arg(long)]
    save_every: Option<usize>,
    /// Continue from a checkpoint directory: the same losses as an uninterrupted run.
    #[arg(long)]
    resume: Option<PathBuf>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl FinetuneArgs {
    fn lora_config(&self) -> Result<LoraConfig, String> {
        let mut c = LoraConfig::new(self.lora_r, self.lora_alpha);
        c.lora_dropout = self.lora_dropout;
        c.target_modules = LoraConfig::parse_targets(&self.target_modules).map_err(err)?;
        c.use_rslora = self.use_rslora;
        c.layers_to_transform = self.layers_to_transform.clone();
        c.init_lora_weights = LoraConfig::parse_init(&self.init_lora_weights).map_err(err)?;
        c.random_state = self.seed;
        c.modules_to_save =
            LoraConfig::parse_modules_to_save(&self.modules_to_save).map_err(err)?;
        Ok(c)
    }

    fn optimizer(&self) -> Result<OptimizerKind, String> {
        match self.optimizer.as_str() {
            "adamw" => {
                let [b1, b2] = self.betas[..] else {
                    return Err(format!(
                        "--betas {:?}: give two values, e.g. 0.9,0.999",
                        self.betas
                    ));
                };
                Ok(OptimizerKind::AdamW {
                    betas: (b1, b2),
                    eps: self.eps,
                    weight_decay: self.weight_decay,
                })
            }
            "sgd" => Ok(OptimizerKind::Sgd {
                weight_decay: self.weight_decay,
            }),
            other => Err(format!("--optimizer {other:?}: must be adamw or sgd")),
        }
    }
}

/// Micro-batches of the data file, tokenised with the model's tokenizer.
fn load_batches(
    args: &FinetuneArgs,
    loaded: &LoadedModel,
    max_len: usize,
) -> Result<Vec<Batch>, String> {
    let records = read_jsonl(&args.data).map_err(err)?;
    let tokenizer = loaded.tokenizer().ok();
    let config = &loaded.model.config;
    let eos = config.eos_token_ids.first().copied();
    let examples = records
        .iter()
        .map(|r| tokenize(r, tokenizer, eos, max_len))
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let pad = config.pad_token_id.or(eos).unwrap_or(0);
    batches(&examples, args.batch_size, max_len, args.packing, pad).map_err(err)
}

pub fn finetune_cmd(args: &FinetuneArgs) -> Result<(), String> {
    let device = args
        .model
        .cuda_device()?
        .map_or(Device::Cpu, |d| Device::Cuda(d.ordinal()));
    let loaded = args.model.load()?;
    let max_len = args.max_seq_length.min(loaded.model.max_seq_length);
    let data = load_batches(args, &loaded, max_len)?;
    let options = LoadOptions {
        load_in_4bit: args.load_in_4bit,
        device,
        precision: loaded.model.precision(),
        patch: !args.model.unpatched,
        ..LoadOptions::default()
    };
    let mut model = FastLlamaModel::new(loaded.model, options).map_err(err)?;
    let steps_per_epoch = data.len().div_ceil(args.grad_accum.max(1));
    let total_steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * steps_per_epoch as f32).ceil() as usize).max(1),
        (None, None) => unreachable!("clap requires --steps or --epochs"),
    };
    let config = TrainConfig {
        optimizer: args.optimizer()?,
        schedule: Schedule {
            kind: args.lr_scheduler.parse::<ScheduleKind>().map_err(err)?,
            lr: args.lr,
            warmup: args.warmup_steps,
            total: total_steps,
        },
        grad_accum: args.grad_accum,
        max_grad_norm: args.max_grad_norm,
        gradient_checkpointing: args.gradient_checkpointing,
        seed: args.seed,
    };
    model.for_training(args.gradient_checkpointing);
    let mut trainer = match (&args.resume, &args.init_adapter) {
        (Some(dir), _) => model.resume(dir, config),
        (None, init) => match init {
            Some(dir) => model.load_adapter(dir),
            None => model.get_peft_model(args.lora_config()?),
        }
        .and_then(|_| model.trainer(config)),
    }
    .map_err(err)?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let adapter = model.model().adapter().expect("set above");
    eprintln!(
        "{} micro-batches of ≤{} × {max_len} tokens; {} trainable values (r={}, {} pairs); {} steps from step {} on the {}",
        data.len(),
        args.batch_size,
        adapter.parameter_count(),
        adapter.config.r,
        adapter.pairs().count(),
        total_steps,
        trainer.steps_done(),
        model.device(),
    );
    eprint!("{}", model.patch_reports().last().expect("patched above"));
    let plan = RunPlan {
        total_steps,
        shuffle: args.shuffle,
        seed: args.seed,
        save_every: args.save_every,
        out_dir: Some(args.out.clone()),
    };
    let mut log = StepLog::open(
        &args.out.join("train_log.jsonl"),
        total_steps,
        trainer.steps_done(),
    )?;
    model
        .run(&mut trainer, &data, &plan, &mut |r| log.record(r))
        .map_err(err)?;
    log.bar.finish();
    model.save_checkpoint(&trainer, &args.out).map_err(err)?;
    eprintln!("adapter written to {}", args.out.display());
    Ok(())
}

/// The progress bar and the JSONL loss log.
struct StepLog {
    file: std::fs::File,
    bar: ProgressBar,
    start: Instant,
    tokens: usize,
}

impl StepLog {
    fn open(path: &Path, total: usize, done: usize) -> Result<StepLog, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bar = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_position(done as u64);
        Ok(StepLog {
            file,
            bar,
            start: Instant::now(),
            tokens: 0,
        })
    }

    fn record(&mut self, r: &StepReport) -> llama_model::Result<()> {
        self.tokens += r.tokens;
        let tps = self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let line = json!({"step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": r.tokens, "tokens_per_s": tps});
        writeln!(self.file, "{line}").map_err(|e| llama_model::ModelError::Io {
            path: "train_log.jsonl".into(),
            source: e,
        })?;
        self.bar
            .set_message(format!("loss {:.4} · {tps:.0} tok/s", r.loss));
        self.bar.set_position(r.step as u64);
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An HF directory to write (config.json, model.safetensors, tokenizer files), or a path
    /// ending in .gguf for a GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// Stored dtype: f32 or bf16 (HF directory); f32, q8_0, q4_0, q4_1 (GGUF).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn merge_cmd(args: &MergeArgs) -> Result<(), String> {
    if args.model.adapter.is_none() {
        return Err("merge needs --adapter DIR".into());
    }
    let mut loaded = args.model.load()?;
    loaded.model.merge_adapter().map_err(err)?;
    let dtype = match args.dtype.to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "q8_0" => DType::Q8_0,
        "q4_0" => DType::Q4_0,
        "q4_1" => DType::Q4_1,
        other => {
            return Err(format!(
                "--dtype {other:?}: must be f32, bf16, q8_0, q4_0 or q4_1"
            ))
        }
    };
    if args.out.extension().is_some_and(|e| e == "gguf") {
        save_gguf(&loaded.model, &args.out, Some(dtype)).map_err(err)?;
    } else {
        save_hf(
            &loaded.model,
            loaded.tokenizer.as_ref().ok(),
            &args.out,
            dtype,
        )
        .map_err(err)?;
    }
    eprintln!("merged model written to {}", args.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rows per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// Optimizer steps; the first is a warm-up, the best of the rest is reported.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long)]
    gradient_checkpointing: bool,
    /// QLoRA: projections in NF4.
    #[arg(long)]
    load_in_4bit: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Random weights of a known shape instead of --model (GPU only).
    #[arg(long)]
    random_weights: bool,
    #[arg(long, value_enum, default_value_t = crate::commands::Shape::Llama32_1b)]
    shape: crate::commands::Shape,
}

/// The bench's training settings: AdamW at a constant 1e-4, no clipping.
fn bench_config(args: &BenchTrainArgs) -> TrainConfig {
    TrainConfig {
        schedule: Schedule {
            kind: ScheduleKind::Constant,
            lr: 1e-4,
            warmup: 0,
            total: args.steps,
        },
        max_grad_norm: None,
        gradient_checkpointing: args.gradient_checkpointing,
        seed: 0,
        ..TrainConfig::adamw_linear(1e-4, 0, args.steps)
    }
}

/// Random ids in 100..30000 (as HF's CPU anchor draws them), labels the same.
fn bench_batch(args: &BenchTrainArgs, vocab: usize) -> Batch {
    let mut rng = llama_core::SplitMix64::new(7);
    let vocab = vocab as u64;
    let (lo, hi) = (100.min(vocab - 1), 30000.min(vocab));
    let ids: Vec<u32> = (0..args.batch_size * args.seq_len)
        .map(|_| (lo + rng.next_u64() % (hi - lo)) as u32)
        .collect();
    Batch {
        labels: ids.iter().map(|&i| i as i64).collect(),
        ids,
        batch: args.batch_size,
    }
}

/// Best seconds per step of `steps` runs of `step` after the first (a warm-up).
fn best_step(steps: usize, mut step: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let mut best = f64::INFINITY;
    for i in 0..steps.max(2) {
        let start = Instant::now();
        step()?;
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

/// LoRA training on the GPU: bf16 base (the model's weights, or random ones of a shape),
/// f32 LoRA and AdamW state, gradient checkpointing; device memory as the most the memory pool
/// had handed out during the steps minus what it had out before the model was made (as torch's
/// `max_memory_allocated` counts).
fn bench_train_cuda(
    args: &BenchTrainArgs,
    device: &std::sync::Arc<llama_core::cuda::CudaDevice>,
) -> Result<(), String> {
    let baseline = device.pool_in_use().map_err(err)?;
    let (model, name) = if args.random_weights {
        let config = args.shape.config().map_err(err)?;
        (
            llama_model::CudaLlamaModel::random(device, &config, 7).map_err(err)?,
            format!("random {:?}", args.shape),
        )
    } else {
        let loaded = args.model.load()?;
        (
            llama_model::CudaLlamaModel::upload(device, &loaded.model).map_err(err)?,
            loaded.path.display().to_string(),
        )
    };
    let config = model.config.clone();
    let mut lora = LoraConfig::new(args.lora_r, args.lora_r as f32);
    lora.random_state = 0;
    let adapter = LoraAdapter::new(lora, config.lora_dims()).map_err(err)?;
    let mut trainer =
        llama_model::CudaTrainer::new(model, &adapter, bench_config(args)).map_err(err)?;
    if args.load_in_4bit {
        trainer.quantize_base_nf4().map_err(err)?;
    }
    let batch = bench_batch(args, config.vocab_size);
    device.reset_peak().map_err(err)?;
    let best = best_step(args.steps, || {
        trainer
            .step(std::slice::from_ref(&batch))
            .map(|_| ())
            .map_err(err)
    })?;
    let tokens = (args.batch_size * args.seq_len) as f64;
    let peak_mib = match (baseline, device.pool_peak().map_err(err)?) {
        (Some(before), Some(peak)) => Some(mib(peak.saturating_sub(before))),
        _ => None,
    };
    report_train(
        args,
        &name,
        device.name(),
        tokens,
        best,
        &[
            ("device_peak_mib", peak_mib),
            ("host_pinned_mib", Some(mib(trainer.host_pinned_bytes()))),
        ],
    )
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Prints one bench result (a JSON object with --json).
fn report_train(
    args: &BenchTrainArgs,
    model: &str,
    device: &str,
    tokens: f64,
    best: f64,
    memory: &[(&str, Option<f64>)],
) -> Result<(), String> {
    let mut object = json!({
        "engine": "fastllama",
        "model": model,
        "device": device,
        "threads": rayon::current_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "gradient_checkpointing": args.gradient_checkpointing || device != "cpu",
        "load_in_4bit": args.load_in_4bit,
        "step_s": best,
        "tokens_per_s": tokens / best,
    });
    for (key, mib) in memory {
        object[*key] = json!(mib);
    }
    if args.json {
        println!("{object}");
    } else {
        let memory: Vec<String> = memory
            .iter()
            .map(|(key, mib)| format!("{key} {:.0}", mib.unwrap_or(f64::NAN)))
            .collect();
        println!(
            "training {}×{} tokens on {device}, r={}: {:.1} tok/s ({best:.3} s/step), {}",
            args.batch_size,
            args.seq_len,
            args.lora_r,
            tokens / best,
            memory.join(", ")
        );
    }
    Ok(())
}

/// LoRA training speed: r on all seven projections, AdamW, random ids (as HF's CPU anchor
/// draws them), best step time after a warm-up, and the peak resident memory.
pub fn bench_train_cmd(args: &BenchTrainArgs) -> Result<(), String> {
    if let Some(device) = args.model.cuda_device()? {
        return bench_train_cuda(args, &device);
    }
    if args.random_weights {
        return Err("--random-weights runs on a CUDA device (--device cuda)".into());
    }
    let mut loaded = args.model.load()?;
    let model = &mut loaded.model;
    if args.load_in_4bit {
        model.convert_projections(DType::Nf4).map_err(err)?;
    }
    model.prepare_for_training().map_err(err)?;
    let mut lora = LoraConfig::new(args.lora_r, args.lora_r as f32);
    lora.random_state = 0;
    model
        .set_adapter(Some(LoraAdapter::new(lora, model.dims()).map_err(err)?))
        .map_err(err)?;
    let mut trainer = Trainer::new(model, bench_config(args)).map_err(err)?;
    let batch = bench_batch(args, model.config.vocab_size);
    let best = best_step(args.steps, || {
        trainer
            .step(model, std::slice::from_ref(&batch))
            .map(|_| ())
            .map_err(err)
    })?;
    let tokens = (args.batch_size * args.seq_len) as f64;
    let peak_mib = crate::commands::peak_rss().map(|b| mib(b as usize));
    report_train(
        args,
        &loaded.path.display().to_string(),
        "cpu",
        tokens,
        best,
        &[("peak_rss_mib", peak_mib)],
    )
}
