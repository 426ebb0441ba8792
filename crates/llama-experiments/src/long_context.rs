//! Experiment 1, long context: RoPE tables (linear, llama3, LongRoPE scaling) built and applied,
//! and causal attention prefill, at 4K to 128K positions — time and peak memory against
//! length — and one whole-model forward pass at 16K positions with the context stretched by
//! `from_pretrained(max_seq_length = 16384)`.

use std::sync::Arc;

use llama_attn::{AttnShape, Mask};
use llama_core::bf16;
use llama_core::cuda::CudaDevice;
use llama_core::Device;
use llama_model::{
    Decoder, Engine, FastLlamaModel, LoadOptions, ModelShape, Precision, DEFAULT_MODEL,
};
use llama_rope::{QkShape, RopeConfig, RopeScaling, RotaryEmbedding};
use serde_json::{json, Value};

use crate::report::{fmt, Corner, Plot, Section, Series, Table};
use crate::setup::{timed, Context};
use crate::{Error, Experiment};

pub const TITLE: &str = "long context";
pub const ABOUT: &str = "RoPE with linear, llama3 and LongRoPE scaling (the cos/sin tables built, \
then applied to Q) and causal attention prefill, at 4K to 128K positions: time and peak memory \
against length. Then one forward pass of a whole model at 16K positions, twice its trained \
context, with linear RoPE scaling set as `from_pretrained(max_seq_length = 16384)` sets it. \
On the CPU the shapes are SmolLM2-135M's (RoPE on 9 heads × 64; attention over one of its \
key/value groups: 3 query heads, 1 key/value head, head_dim 64, f32) and the model is SmolLM2 \
itself on the repository's LICENSE text repeated to 16K tokens; on the GPU they are \
Llama-3-8B's (RoPE on 32 heads × 128; attention with 32 query and 8 key/value heads, bf16) \
and the model is a random-weight Llama-3.2-1B. LongRoPE's per-frequency factors are synthetic \
(1 rising to 16): the experiment measures cost, not quality. Memory is the peak above the run's \
start of the heap on the CPU and of the device memory pool on the GPU: inputs, outputs and \
every buffer the run allocates.";

/// The trained context every scaling stretches.
const ORIGINAL: usize = 8192;

/// The three scalings at a head of `head_dim`, each reaching `longest` positions.
fn scalings(theta: f64, head_dim: usize, longest: usize) -> Result<Vec<RopeConfig>, Error> {
    let longest = longest.max(ORIGINAL);
    let factor = longest as f64 / ORIGINAL as f64;
    let half = head_dim / 2;
    let kinds = [
        RopeScaling::Linear { factor },
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: ORIGINAL,
        },
        RopeScaling::LongRope {
            short_factor: vec![1.0; half],
            long_factor: (0..half)
                .map(|i| 1.0 + 15.0 * i as f64 / (half - 1).max(1) as f64)
                .collect(),
            factor: None,
            attention_factor: None,
            original_max_position_embeddings: ORIGINAL,
        },
    ];
    kinds
        .into_iter()
        .map(|scaling| {
            let mut config = RopeConfig::new(theta, head_dim, longest)?;
            config.scaling = scaling;
            Ok(config)
        })
        .collect()
}

/// The sizes of one device's runs.
struct Shapes {
    lengths: Vec<usize>,
    theta: f64,
    rope_heads: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    model_len: usize,
}

pub fn run(ctx: &Context) -> Result<Section, Error> {
    let shapes = match &ctx.cuda {
        None => Shapes {
            lengths: ctx.pick(vec![4096, 16384, 32768, 131072], vec![1024, 4096]),
            theta: 100_000.0,
            rope_heads: 9,
            heads: 3,
            kv_heads: 1,
            head_dim: 64,
            model_len: ctx.pick(16384, 512),
        },
        Some(_) => Shapes {
            lengths: ctx.pick(vec![4096, 16384, 32768, 131072], vec![1024, 4096]),
            theta: 500_000.0,
            rope_heads: 32,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            model_len: ctx.pick(16384, 2048),
        },
    };
    let longest = *shapes.lengths.last().unwrap_or(&ORIGINAL);
    let configs = scalings(shapes.theta, shapes.head_dim, longest)?;
    let progress = ctx.progress(
        Experiment::LongContext,
        shapes.lengths.len() * (configs.len() + 1) + 2,
    );
    let mut rope_runs = Vec::new();
    for config in &configs {
        for &len in &shapes.lengths {
            let _run = progress.run(format!("RoPE {} at {len}", config.scaling.rope_type()));
            rope_runs.push(rope_run(ctx, config, len, shapes.rope_heads)?);
        }
    }
    let mut attention_runs = Vec::new();
    for &len in &shapes.lengths {
        let _run = progress.run(format!("attention at {len}"));
        attention_runs.push(attention_run(ctx, &shapes, len)?);
    }
    let mut model_runs = Vec::new();
    match &ctx.cuda {
        None => {
            // As from_pretrained(max_seq_length = 16384) sets it, then RoPE as trained.
            for scaling in [None, Some(RopeScaling::Default)] {
                let _run = progress.run(format!("SmolLM2 at {}, {scaling:?}", shapes.model_len));
                model_runs.push(smollm2_forward(ctx, shapes.model_len, scaling)?);
            }
        }
        Some(device) => {
            let _run = progress.run(format!("model forward at {}", shapes.model_len));
            model_runs.push(random_model_forward(ctx, device, shapes.model_len)?);
        }
    }
    progress.finish();
    Ok(report(
        ctx,
        &shapes,
        &rope_runs,
        &attention_runs,
        &model_runs,
    ))
}

/// "linear ×2", "none (as trained)", or the kind's name.
fn describe(scaling: &RopeScaling) -> String {
    match scaling {
        RopeScaling::Default => "none (as trained)".into(),
        RopeScaling::Linear { factor } => format!("linear ×{factor}"),
        other => other.rope_type().into(),
    }
}

/// One RoPE measurement.
struct RopeRun {
    kind: &'static str,
    len: usize,
    build_s: f64,
    table_bytes: usize,
    apply_s: f64,
}

fn rope_run(
    ctx: &Context,
    config: &RopeConfig,
    len: usize,
    heads: usize,
) -> Result<RopeRun, Error> {
    let mut rope = RotaryEmbedding::new(config.clone());
    let (build_s, built) = timed(|| rope.tables(len).map(|_| ()));
    built?;
    let table_bytes = rope.memory_bytes();
    let tables = rope.tables(len)?;
    let shape = QkShape {
        batch: 1,
        heads,
        seq: len,
        head_dim: config.head_dim,
    };
    let positions: Vec<u32> = (0..len as u32).collect();
    let apply_s = match &ctx.cuda {
        None => {
            let mut x = vec![0.5f32; shape.len()];
            let (s, done) = timed(|| llama_rope::apply(&mut x, shape, &tables, &positions));
            done?;
            s
        }
        Some(device) => {
            let on_device = llama_rope::cuda::DeviceTables::upload(device, &tables)?;
            let mut x = device.htod(&vec![bf16::from_f32(0.5); shape.len()])?;
            // The first launch compiles the kernel: warm up, then time.
            llama_rope::cuda::apply(&mut x, shape, &on_device, &positions, false)?;
            device.synchronize()?;
            let (s, done) = timed(|| {
                llama_rope::cuda::apply(&mut x, shape, &on_device, &positions, false)?;
                device.synchronize().map_err(Error::from)
            });
            done?;
            s
        }
    };
    Ok(RopeRun {
        kind: config.scaling.rope_type(),
        len,
        build_s,
        table_bytes,
        apply_s,
    })
}

/// One attention prefill measurement.
struct AttentionRun {
    len: usize,
    secs: f64,
    /// Peak heap above the start (CPU) or device memory in use after the call (GPU).
    peak_bytes: usize,
    /// Q, K, V, O and the logsumexps.
    io_bytes: usize,
}

/// A fixed, varied pattern in [−1, 1] (the values do not change the cost).
fn pattern(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 2654435761 + salt * 40503) % 2001) as f32 / 1000.0) - 1.0)
        .collect()
}

fn attention_run(ctx: &Context, s: &Shapes, len: usize) -> Result<AttentionRun, Error> {
    let shape = AttnShape::self_attention(1, s.heads, s.kv_heads, len, s.head_dim);
    let (q_len, kv_len, rows) = (shape.q_len(), shape.kv_len(), s.heads * len);
    match &ctx.cuda {
        None => {
            let meter = ctx.meter()?;
            let (q, k, v) = (pattern(q_len, 1), pattern(kv_len, 2), pattern(kv_len, 3));
            let (mut out, mut lse) = (vec![0f32; q_len], vec![0f32; rows]);
            let (secs, done) = timed(|| {
                llama_attn::forward(&q, &k, &v, &shape, &Mask::causal(), &mut out, &mut lse)
            });
            done?;
            Ok(AttentionRun {
                len,
                secs,
                peak_bytes: meter.above_start()?,
                io_bytes: 4 * (2 * q_len + 2 * kv_len + rows),
            })
        }
        Some(device) => {
            warm_up_attention(device, s)?;
            let meter = ctx.meter()?;
            let q = device.zeros::<bf16>(q_len)?;
            let k = device.htod(
                &pattern(kv_len, 2)
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect::<Vec<_>>(),
            )?;
            let v = device.zeros::<bf16>(kv_len)?;
            let mut out = device.zeros::<bf16>(q_len)?;
            let mut lse = device.zeros::<f32>(rows)?;
            let (secs, done) = timed(|| {
                llama_attn::cuda::forward(
                    device,
                    &q,
                    &k,
                    &v,
                    &shape,
                    &Mask::causal(),
                    &mut out,
                    &mut lse,
                )?;
                device.synchronize().map_err(Error::from)
            });
            done?;
            Ok(AttentionRun {
                len,
                secs,
                peak_bytes: meter.above_start()?,
                io_bytes: 2 * (2 * q_len + 2 * kv_len) + 4 * rows,
            })
        }
    }
}

/// One small call, so that the timed ones do not include compiling the kernels.
fn warm_up_attention(device: &Arc<CudaDevice>, s: &Shapes) -> Result<(), Error> {
    let shape = AttnShape::self_attention(1, s.heads, s.kv_heads, 256, s.head_dim);
    let q = device.zeros::<bf16>(shape.q_len())?;
    let kv = device.zeros::<bf16>(shape.kv_len())?;
    let mut out = device.zeros::<bf16>(shape.q_len())?;
    let mut lse = device.zeros::<f32>(s.heads * 256)?;
    llama_attn::cuda::forward(
        device,
        &q,
        &kv,
        &kv,
        &shape,
        &Mask::causal(),
        &mut out,
        &mut lse,
    )?;
    device.synchronize()?;
    Ok(())
}

/// The whole-model forward pass at a stretched context.
struct ModelRun {
    model: String,
    len: usize,
    scaling: String,
    secs: f64,
    peak_bytes: usize,
    /// Mean next-token loss over stretches of the text: (what, from, to, loss) (CPU: the
    /// real model only).
    segment_losses: Vec<(String, usize, usize, f64)>,
}

/// SmolLM2 (trained on 8,192 positions) loaded for 16,384 — with the scaling that sets, or
/// `rope_scaling` when given — and run over `len` tokens of the licence text repeated.
fn smollm2_forward(
    ctx: &Context,
    len: usize,
    rope_scaling: Option<RopeScaling>,
) -> Result<ModelRun, Error> {
    let options = LoadOptions {
        max_seq_length: Some(16384),
        rope_scaling,
        device: Device::Cpu,
        precision: Precision::Fast,
        ..LoadOptions::default()
    };
    let (mut fast, tokenizer) = FastLlamaModel::from_pretrained(DEFAULT_MODEL, options)?;
    let scaling = fast.model().config.rope.scaling.clone();
    let period = ctx.licence_tokens(&tokenizer)?.len();
    let ids = ctx.licence_ids(&tokenizer, len)?;
    let model = fast.model_mut();
    let meter = ctx.meter()?;
    let (secs, hidden) = timed(|| model.forward_hidden(&ids, 1, None, false));
    let hidden = hidden?;
    let peak_bytes = meter.above_start()?;
    let losses = next_token_losses(model, &hidden.last, &ids)?;
    // The first reading of the text, its repeats inside the trained context, and past it.
    let stretches = [
        ("first reading of the text", 0, period),
        ("repeats inside the trained context", period, ORIGINAL),
        ("repeats past the trained context", ORIGINAL, len),
    ];
    let segment_losses = stretches
        .into_iter()
        .filter_map(|(what, from, to)| {
            let part = losses
                .get(from..to.min(losses.len()))
                .filter(|p| !p.is_empty())?;
            let mean = part.iter().sum::<f64>() / part.len() as f64;
            Some((what.to_string(), from, from + part.len(), mean))
        })
        .collect();
    Ok(ModelRun {
        model: "SmolLM2-135M-Instruct (Q4_1)".into(),
        len,
        scaling: describe(&scaling),
        secs,
        peak_bytes,
        segment_losses,
    })
}

/// −log p(ids[t+1] | ..t) for every position but the last, from the final hidden states,
/// the logits made a few hundred rows at a time.
fn next_token_losses(
    model: &llama_model::LlamaModel,
    hidden: &[f32],
    ids: &[u32],
) -> Result<Vec<f64>, Error> {
    let (c, vocab) = (model.config.hidden_size, model.config.vocab_size);
    let mut losses = Vec::with_capacity(ids.len());
    for (chunk, rows) in hidden.chunks(256 * c).enumerate() {
        let logits = model.logits(rows)?;
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            let t = chunk * 256 + r;
            if let Some(&next) = ids.get(t + 1) {
                losses.push(crate::quantization::log_softmax_at(row, next as usize));
            }
        }
    }
    Ok(losses)
}

/// A random-weight Llama-3.2-1B with linear scaling ×2 (16K positions) prefilling `len`
/// positions on the GPU.
fn random_model_forward(
    ctx: &Context,
    device: &Arc<CudaDevice>,
    len: usize,
) -> Result<ModelRun, Error> {
    let mut config = ModelShape::Llama32_1b.config()?;
    config.max_position_embeddings = 16384;
    config.rope.max_position_embeddings = 16384;
    config.rope.scaling = RopeScaling::Linear { factor: 2.0 };
    let scaling = describe(&config.rope.scaling);
    let mut engine = Engine::Cuda(Box::new(llama_model::CudaLlamaModel::random(
        device, &config, 7,
    )?));
    let ids: Vec<u32> = (0..len as u32)
        .map(|i| 100 + (i * 7919) % 100_000)
        .collect();
    // Warm-up: compiles the kernels.
    let mut cache = engine.new_cache(1, 64, None)?;
    engine.forward_cached(&ids[..64.min(len)], 1, &mut cache)?;
    drop(cache);
    let meter = ctx.meter()?;
    let mut cache = engine.new_cache(1, len, None)?;
    let (secs, logits) = timed(|| engine.forward_cached(&ids, 1, &mut cache));
    logits?;
    Ok(ModelRun {
        model: "random-weight Llama-3.2-1B (bf16)".into(),
        len,
        scaling,
        secs,
        peak_bytes: meter.above_start()?,
        segment_losses: Vec::new(),
    })
}

fn report(
    ctx: &Context,
    shapes: &Shapes,
    rope_runs: &[RopeRun],
    attention_runs: &[AttentionRun],
    models: &[ModelRun],
) -> Section {
    let mut rope = Table::new(
        &format!(
            "RoPE: tables built for the positions, then applied to Q ({} heads × {})",
            shapes.rope_heads, shapes.head_dim
        ),
        &[
            "scaling",
            "positions",
            "build",
            "tables MiB",
            "apply",
            "apply GB/s",
        ],
    );
    for r in rope_runs {
        let bytes = (r.len * shapes.rope_heads * shapes.head_dim * 2 * elem_bytes(ctx)) as f64;
        rope.row(vec![
            r.kind.into(),
            fmt::count(r.len),
            fmt::secs(r.build_s),
            fmt::mib(r.table_bytes),
            fmt::secs(r.apply_s),
            format!("{:.1}", bytes / r.apply_s / 1e9),
        ]);
    }
    let mut attention = Table::new(
        &format!(
            "Causal attention prefill ({} query heads, {} key/value heads, head_dim {})",
            shapes.heads, shapes.kv_heads, shapes.head_dim
        ),
        &[
            "positions",
            "time",
            "TFLOP/s",
            "peak MiB",
            "of which Q, K, V, O MiB",
            "peak bytes per position",
        ],
    );
    for a in attention_runs {
        attention.row(vec![
            fmt::count(a.len),
            fmt::secs(a.secs),
            format!("{:.3}", attention_flops(shapes, a.len) / a.secs / 1e12),
            fmt::mib(a.peak_bytes),
            fmt::mib(a.io_bytes),
            fmt::count(a.peak_bytes / a.len),
        ]);
    }
    let len = models.first().map_or(0, |m| m.len);
    let mut forward = Table::new(
        &format!("Whole-model forward at {} positions", fmt::count(len)),
        &["model", "RoPE scaling", "time", "tokens/s", "peak MiB"],
    );
    for model in models {
        forward.row(vec![
            model.model.clone(),
            model.scaling.clone(),
            fmt::secs(model.secs),
            fmt::rate(model.len as f64 / model.secs),
            fmt::mib(model.peak_bytes),
        ]);
    }
    let mut tables = vec![rope, attention, forward];
    if let Some(first) = models.first().filter(|m| !m.segment_losses.is_empty()) {
        let mut columns = vec!["positions".to_string(), "stretch".to_string()];
        columns.extend(models.iter().map(|m| format!("loss, RoPE {}", m.scaling)));
        let mut losses = Table {
            title: "Mean next-token loss (nats) over stretches of the text".into(),
            columns,
            rows: Vec::new(),
        };
        for (i, (what, from, to, _)) in first.segment_losses.iter().enumerate() {
            let mut row = vec![
                format!("{}–{}", fmt::count(*from), fmt::count(*to)),
                what.clone(),
            ];
            row.extend(models.iter().map(|m| {
                m.segment_losses
                    .get(i)
                    .map_or("—".into(), |s| format!("{:.3}", s.3))
            }));
            losses.row(row);
        }
        tables.push(losses);
    }
    let plots = plots(rope_runs, attention_runs);
    let findings = findings(attention_runs, rope_runs, models);
    let raw = json!({
        "rope": rope_runs.iter().map(|r| json!({"scaling": r.kind, "positions": r.len, "build_s": r.build_s, "table_bytes": r.table_bytes, "apply_s": r.apply_s})).collect::<Vec<Value>>(),
        "attention": attention_runs.iter().map(|a| json!({"positions": a.len, "seconds": a.secs, "peak_bytes": a.peak_bytes, "io_bytes": a.io_bytes})).collect::<Vec<Value>>(),
        "models": models.iter().map(|m| json!({"name": m.model, "positions": m.len, "scaling": m.scaling, "seconds": m.secs, "peak_bytes": m.peak_bytes, "segment_losses": m.segment_losses})).collect::<Vec<Value>>(),
        "shape": {"heads": shapes.heads, "kv_heads": shapes.kv_heads, "head_dim": shapes.head_dim, "rope_heads": shapes.rope_heads},
    });
    ctx.section(Experiment::LongContext, tables, plots, findings, raw)
}

fn elem_bytes(ctx: &Context) -> usize {
    if ctx.cuda.is_some() {
        2
    } else {
        4
    }
}

/// 2·T²·H·D: QKᵀ and PV over the causal half.
fn attention_flops(s: &Shapes, len: usize) -> f64 {
    2.0 * (len as f64).powi(2) * (s.heads * s.head_dim) as f64
}

fn plots(rope_runs: &[RopeRun], attention_runs: &[AttentionRun]) -> Vec<Plot> {
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let mut time = vec![Series {
        name: "attention prefill".into(),
        points: attention_runs
            .iter()
            .map(|a| (a.len as f64, a.secs))
            .collect(),
    }];
    let mut memory = vec![Series {
        name: "attention peak".into(),
        points: attention_runs
            .iter()
            .map(|a| (a.len as f64, mib(a.peak_bytes)))
            .collect(),
    }];
    let mut kinds: Vec<&str> = rope_runs.iter().map(|r| r.kind).collect();
    kinds.dedup();
    for kind in kinds {
        let runs = || rope_runs.iter().filter(move |r| r.kind == kind);
        time.push(Series {
            name: format!("RoPE {kind}: build + apply"),
            points: runs()
                .map(|r| (r.len as f64, r.build_s + r.apply_s))
                .collect(),
        });
        memory.push(Series {
            name: format!("RoPE {kind} tables"),
            points: runs().map(|r| (r.len as f64, mib(r.table_bytes))).collect(),
        });
    }
    vec![
        Plot {
            title: "time against length".into(),
            x_label: "positions".into(),
            y_label: "seconds".into(),
            log_x: true,
            log_y: true,
            series: time,
            legend: Corner::UpperLeft,
        },
        Plot {
            title: "peak memory against length".into(),
            x_label: "positions".into(),
            y_label: "MiB".into(),
            log_x: true,
            log_y: true,
            series: memory,
            legend: Corner::UpperLeft,
        },
    ]
}

fn findings(attention: &[AttentionRun], rope: &[RopeRun], models: &[ModelRun]) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (attention.first(), attention.last()) {
        let grow = b.len as f64 / a.len as f64;
        out.push(format!(
            "From {} to {} positions ({grow:.0}× longer) the attention's peak memory grew {:.1}× \
             (linear would be {grow:.0}×, a materialised score matrix {:.0}×) and its time {:.0}× \
             (the causal work grows {:.0}×).",
            fmt::count(a.len),
            fmt::count(b.len),
            b.peak_bytes as f64 / a.peak_bytes.max(1) as f64,
            grow * grow,
            b.secs / a.secs,
            grow * grow,
        ));
    }
    let per_position: Vec<f64> = rope
        .iter()
        .map(|r| r.table_bytes as f64 / r.len as f64)
        .collect();
    if let (Some(lo), Some(hi)) = (
        per_position.iter().cloned().reduce(f64::min),
        per_position.iter().cloned().reduce(f64::max),
    ) {
        out.push(format!(
            "The RoPE tables take {lo:.0}–{hi:.0} bytes per position for every scaling (cos and sin \
             rows, grown in blocks of 8,192 positions): linear in length; building them is a one-off \
             cost per length."
        ));
    }
    for model in models {
        out.push(format!(
            "{} with RoPE {} ran {} positions in {} ({} tokens/s) with {} MiB at peak.",
            model.model,
            model.scaling,
            fmt::count(model.len),
            fmt::secs(model.secs),
            fmt::rate(model.len as f64 / model.secs),
            fmt::mib(model.peak_bytes),
        ));
    }
    // Each run's loss on the first reading, on the repeats inside and past the context.
    let losses = |m: &ModelRun| -> Option<[f64; 3]> {
        let s = &m.segment_losses;
        Some([s.first()?.3, s.get(1)?.3, s.get(2)?.3])
    };
    if let [scaled, plain] = models {
        if let (Some(a), Some(b)) = (losses(scaled), losses(plain)) {
            let past = if a[2] < b[2] {
                format!(
                    "past position 8,192 the scaled model does better ({:.2} against {:.2})",
                    a[2], b[2]
                )
            } else {
                format!(
                    "past position 8,192 it does no better ({:.2} against {:.2})",
                    a[2], b[2]
                )
            };
            out.push(format!(
                "The text repeats every {} tokens, so a model that reads its context copies the \
                 repeats. With RoPE as trained SmolLM2 copies almost perfectly inside its \
                 context (loss {:.2} on the repeats before position 8,192, {:.2} on the first \
                 reading) and loses the thread past it ({:.2}). Linear ×2 scaling on unchanged \
                 weights blurs positions everywhere: inside the context it copies far worse \
                 ({:.2}); {past}. Linear interpolation is meant to be followed by fine-tuning at \
                 the longer length, as Unsloth's max_seq_length is used before training.",
                fmt::count(scaled.segment_losses[0].2),
                b[1],
                b[0],
                b[2],
                a[1],
            ));
        }
    }
    out
}
