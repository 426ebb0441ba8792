//! Experiment 3, LoRA: ranks 4, 8, 16, 64 × target sets (attention, MLP, all seven
//! projections) on SmolLM2, a fixed number of AdamW steps on the repository's small
//! instruction set: trainable parameters, step time, peak memory and the loss curves.

use llama_core::Device;
use llama_model::data::{batches, read_jsonl, tokenize};
use llama_model::{Batch, FastLlamaModel, LoadOptions, Precision, TrainConfig};
use llama_peft::{LoraConfig, Target};
use serde_json::{json, Value};

use crate::report::{fmt, Corner, Plot, Section, Series, Table};
use crate::setup::{timed, Context};
use crate::{Error, Experiment};

pub const TITLE: &str = "LoRA ranks and target modules";
pub const ABOUT: &str = "SmolLM2-135M-Instruct (Q4_1 file, dequantised to f32 for training as \
`fastllama finetune` does) gets a LoRA adapter of rank r ∈ {4, 8, 16, 64} (lora_alpha = r, so \
the scale is 1; B starts at zero, A from peft's default) on the attention projections (q, k, \
v, o), the MLP's (gate, up, down) or all seven, and trains on `data/tiny-instructions.jsonl` \
(24 short questions, each answered \"In short: …\"; loss on the answers only) with AdamW \
(lr 1e-3, linear decay after 2 warm-up steps, gradient norm clipped at 1), batches of 4 \
padded to their longest, the same batches in the same order for every run, on the CPU in \
`fast` precision. Thirty steps are five passes over the 24 examples: the last losses show how \
fast each adapter fits (memorises) this small set, not how well it generalises. Step time is \
the mean over the steps after the first; peak memory is the heap's peak from the trainer's \
creation on above the loaded model — 513 MiB of it the f32 copy of the weights that training \
on a quantised file makes (projections and the tied embeddings), the rest activations, \
gradients and optimizer state.";

const TARGET_SETS: [(&str, &[Target]); 3] = [
    (
        "attention",
        &[Target::QProj, Target::KProj, Target::VProj, Target::OProj],
    ),
    ("MLP", &[Target::GateProj, Target::UpProj, Target::DownProj]),
    ("all seven", &Target::ALL),
];

struct Run {
    rank: usize,
    targets: &'static str,
    trainable: usize,
    step_secs: f64,
    tokens_per_s: f64,
    peak_bytes: usize,
    losses: Vec<f32>,
}

pub fn run(ctx: &Context) -> Result<Section, Error> {
    let ranks = ctx.pick(vec![4, 8, 16, 64], vec![4, 16]);
    let steps = ctx.pick(30, 3);
    let batch_size = ctx.pick(4, 2);
    let sets: Vec<_> = if ctx.quick {
        vec![TARGET_SETS[0], TARGET_SETS[2]]
    } else {
        TARGET_SETS.to_vec()
    };
    let progress = ctx.progress(Experiment::Lora, ranks.len() * sets.len());
    let mut runs = Vec::new();
    for &(name, targets) in &sets {
        for &rank in &ranks {
            let _run = progress.run(format!("r = {rank}, {name}"));
            runs.push(train(ctx, rank, name, targets, steps, batch_size)?);
        }
    }
    progress.finish();
    Ok(report(ctx, &runs, steps, batch_size))
}

fn data(
    ctx: &Context,
    model: &FastLlamaModel,
    tokenizer: &llama_model::Tokenizer,
    batch_size: usize,
) -> Result<Vec<Batch>, Error> {
    let config = &model.model().config;
    let eos = config.eos_token_ids.first().copied();
    let pad = config.pad_token_id.or(eos).unwrap_or(0);
    let records = read_jsonl(&ctx.root.join("data/tiny-instructions.jsonl"))?;
    let examples = records
        .iter()
        .map(|r| tokenize(r, Some(tokenizer), eos, 256))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(batches(&examples, batch_size, 256, false, pad)?)
}

fn train(
    ctx: &Context,
    rank: usize,
    targets_name: &'static str,
    targets: &[Target],
    steps: usize,
    batch_size: usize,
) -> Result<Run, Error> {
    let (base, tokenizer) = ctx.smollm2(Precision::Fast)?;
    let options = LoadOptions {
        device: Device::Cpu,
        max_seq_length: Some(256),
        ..LoadOptions::default()
    };
    let mut model = FastLlamaModel::new(base, options)?;
    let batches = data(ctx, &model, &tokenizer, batch_size)?;
    let mut lora = LoraConfig::new(rank, rank as f32);
    lora.target_modules = targets.to_vec();
    lora.random_state = 3407;
    model.get_peft_model(lora)?;
    model.for_training(false);
    let trainable = model.model().adapter().map_or(0, |a| a.parameter_count());
    let config = TrainConfig::adamw_linear(1e-3, 2, steps);
    let meter = ctx.meter()?;
    let mut trainer = model.trainer(config)?;
    let (mut losses, mut later_secs, mut later_tokens) = (Vec::new(), 0.0, 0usize);
    for step in 0..steps {
        let batch = &batches[step % batches.len()];
        let (secs, report) = timed(|| model.train_step(&mut trainer, std::slice::from_ref(batch)));
        let report = report?;
        losses.push(report.loss);
        if step > 0 || steps == 1 {
            later_secs += secs;
            later_tokens += report.tokens;
        }
    }
    let timed_steps = steps.saturating_sub(1).max(1);
    Ok(Run {
        rank,
        targets: targets_name,
        trainable,
        step_secs: later_secs / timed_steps as f64,
        tokens_per_s: later_tokens as f64 / later_secs,
        peak_bytes: meter.above_start()?,
        losses,
    })
}

fn report(ctx: &Context, runs: &[Run], steps: usize, batch_size: usize) -> Section {
    let mut table = Table::new(
        &format!("{steps} AdamW steps, batches of {batch_size}"),
        &[
            "targets",
            "r",
            "trainable parameters",
            "step time",
            "tokens/s",
            "peak MiB above the model",
            "first loss",
            "last loss",
        ],
    );
    for r in runs {
        table.row(vec![
            r.targets.into(),
            r.rank.to_string(),
            fmt::count(r.trainable),
            fmt::secs(r.step_secs),
            fmt::rate(r.tokens_per_s),
            fmt::mib(r.peak_bytes),
            format!("{:.3}", r.losses.first().copied().unwrap_or(f32::NAN)),
            format!("{:.3}", r.losses.last().copied().unwrap_or(f32::NAN)),
        ]);
    }
    // One panel per target set, a line per rank.
    let plots = TARGET_SETS
        .iter()
        .filter(|(name, _)| runs.iter().any(|r| r.targets == *name))
        .map(|(name, _)| Plot {
            title: format!("training loss, {name}"),
            x_label: "step".into(),
            y_label: "loss (nats per answer token)".into(),
            log_x: false,
            log_y: true,
            series: runs
                .iter()
                .filter(|r| r.targets == *name)
                .map(|r| Series {
                    name: format!("r = {}", r.rank),
                    points: r
                        .losses
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| ((i + 1) as f64, l as f64))
                        .collect(),
                })
                .collect(),
            legend: Corner::LowerLeft,
        })
        .collect();
    let raw = json!({
        "steps": steps,
        "batch_size": batch_size,
        "runs": runs.iter().map(|r| json!({
            "rank": r.rank, "targets": r.targets, "trainable": r.trainable,
            "step_seconds": r.step_secs, "tokens_per_s": r.tokens_per_s,
            "peak_bytes": r.peak_bytes, "losses": r.losses,
        })).collect::<Vec<Value>>(),
    });
    ctx.section(Experiment::Lora, vec![table], plots, findings(runs), raw)
}

fn findings(runs: &[Run]) -> Vec<String> {
    let mut out = Vec::new();
    let last = |r: &Run| r.losses.last().copied().unwrap_or(f32::NAN);
    if let Some(best) = runs.iter().min_by(|a, b| last(a).total_cmp(&last(b))) {
        out.push(format!(
            "Lowest final loss: {} at r = {} ({:.3}).",
            best.targets,
            best.rank,
            last(best)
        ));
    }
    for (name, _) in TARGET_SETS {
        let set: Vec<&Run> = runs.iter().filter(|r| r.targets == name).collect();
        if let (Some(a), Some(b)) = (set.first(), set.last()) {
            if a.rank != b.rank {
                out.push(format!(
                    "{name}: from r = {} to r = {} the trainable parameters grew {:.0}×, the step \
                     time {:.2}× and the memory above the model {:.2}×; the final loss went from \
                     {:.3} to {:.3}.",
                    a.rank,
                    b.rank,
                    b.trainable as f64 / a.trainable.max(1) as f64,
                    b.step_secs / a.step_secs,
                    b.peak_bytes as f64 / a.peak_bytes.max(1) as f64,
                    last(a),
                    last(b),
                ));
            }
        }
    }
    out
}
