//! Experiment 2, the KV cache: a model generating 32 … 1,024 new tokens greedily, with the
//! cache (prefill once, then one position per step) and without it (every step recomputes
//! the whole prefix) — tokens/s and memory against length, and the cache's bytes per token.

use llama_model::{Decoder, Engine, EngineCache, ModelShape, Precision};
use serde_json::{json, Value};

use crate::report::{fmt, Corner, Plot, Section, Series, Table};
use crate::setup::{timed, Context};
use crate::{Error, Experiment};

pub const TITLE: &str = "KV cache";
pub const ABOUT: &str = "A model continues a 32-token prompt greedily for N new tokens, N from 32 \
to 1,024: with the KV cache (the prompt prefilled once, then each step runs one position over \
the cached keys and values) and without it (each step runs the whole sequence so far through \
the model, as a model without a cache must). Both take the argmax of the last position's \
logits, so both should produce the same tokens; the table says whether they did. On the CPU \
the model is SmolLM2-135M-Instruct (Q4_1, `exact` precision so that both paths compute the \
same function) on the start of the repository's LICENSE; on the GPU a random-weight \
Llama-3.2-1B in bf16. Memory is the peak above the run's start of the heap on the CPU and of \
the device memory pool on the GPU.";

const PROMPT: usize = 32;

/// One generation of `new_tokens` tokens.
struct Run {
    cached: bool,
    new_tokens: usize,
    secs: f64,
    peak_bytes: usize,
    /// The cache's bytes and the positions it holds room for (with the cache only).
    cache: Option<(usize, usize)>,
    ids: Vec<u32>,
}

pub fn run(ctx: &Context) -> Result<Section, Error> {
    let (mut engine, prompt, model) = match &ctx.cuda {
        None => {
            let (model, tokenizer) = ctx.smollm2(Precision::Exact)?;
            let prompt = ctx.licence_ids(&tokenizer, PROMPT)?;
            let name = "SmolLM2-135M-Instruct (Q4_1, exact)";
            (Engine::Cpu(Box::new(model)), prompt, name)
        }
        Some(device) => {
            let config = ModelShape::Llama32_1b.config()?;
            let model = llama_model::CudaLlamaModel::random(device, &config, 7)?;
            let prompt = (0..PROMPT as u32).map(|i| 100 + i * 37).collect();
            let name = "random-weight Llama-3.2-1B (bf16)";
            (Engine::Cuda(Box::new(model)), prompt, name)
        }
    };
    let cached_lengths = ctx.pick(vec![32, 64, 128, 256, 512, 1024], vec![8, 16]);
    // Without the cache the CPU's work grows with N²: 1,024 would take half an hour there.
    let uncached_lengths = match (&ctx.cuda, ctx.quick) {
        (_, true) => vec![8, 16],
        (None, false) => vec![32, 64, 128, 256, 512],
        (Some(_), false) => cached_lengths.clone(),
    };
    let progress = ctx.progress(
        Experiment::KvCache,
        cached_lengths.len() + uncached_lengths.len() + 1,
    );
    {
        let _run = progress.run("warm-up".into());
        generate(ctx, &mut engine, &prompt, 4, true)?;
    }
    let mut runs = Vec::new();
    for (cached, lengths) in [(true, &cached_lengths), (false, &uncached_lengths)] {
        for &n in lengths {
            let what = if cached { "with" } else { "without" };
            let _run = progress.run(format!("{n} tokens {what} the cache"));
            runs.push(generate(ctx, &mut engine, &prompt, n, cached)?);
        }
    }
    progress.finish();
    Ok(report(ctx, model, &runs))
}

/// Greedy continuation of `prompt` by `n` tokens, timed from the first forward pass to the
/// last token.
fn generate(
    ctx: &Context,
    engine: &mut Engine,
    prompt: &[u32],
    n: usize,
    cached: bool,
) -> Result<Run, Error> {
    let meter = ctx.meter()?;
    let mut ids = prompt.to_vec();
    let mut cache_size = None;
    let (secs, done) = timed(|| -> Result<(), Error> {
        if cached {
            let mut cache = engine.new_cache(1, prompt.len() + n, None)?;
            let mut logits = engine.forward_cached(prompt, 1, &mut cache)?;
            for step in 0..n {
                let next = llama_model::generate::argmax(&logits) as u32;
                ids.push(next);
                if step + 1 < n {
                    logits = engine.forward_cached(&[next], 1, &mut cache)?;
                }
            }
            cache_size = Some((cache_bytes(&cache), prompt.len() + n));
        } else {
            for _ in 0..n {
                let mut cache = engine.new_cache(1, ids.len(), None)?;
                let logits = engine.forward_cached(&ids, 1, &mut cache)?;
                ids.push(llama_model::generate::argmax(&logits) as u32);
            }
        }
        Ok(())
    });
    done?;
    let peak_bytes = meter.above_start()?;
    Ok(Run {
        cached,
        new_tokens: n,
        secs,
        peak_bytes,
        cache: cache_size,
        ids: ids.split_off(prompt.len()),
    })
}

fn cache_bytes(cache: &EngineCache) -> usize {
    match cache {
        EngineCache::Cpu(c) => c.memory_bytes(),
        EngineCache::Cuda(c) => c.memory_bytes(),
    }
}

fn report(ctx: &Context, model: &str, runs: &[Run]) -> Section {
    let with: Vec<&Run> = runs.iter().filter(|r| r.cached).collect();
    let without: Vec<&Run> = runs.iter().filter(|r| !r.cached).collect();
    let twin = |r: &Run| {
        without
            .iter()
            .find(|w| w.new_tokens == r.new_tokens)
            .copied()
    };
    let mut table = Table::new(
        &format!("{model}: {PROMPT}-token prompt, N new tokens"),
        &[
            "N",
            "with cache: tokens/s",
            "peak MiB",
            "cache MiB",
            "without: tokens/s",
            "peak MiB",
            "speed-up",
            "same tokens",
        ],
    );
    for r in &with {
        let (rate, peak, speedup, same) = match twin(r) {
            Some(w) => (
                fmt::rate(w.new_tokens as f64 / w.secs),
                fmt::mib(w.peak_bytes),
                format!("{:.1}×", w.secs / r.secs),
                agreement(&r.ids, &w.ids),
            ),
            None => ("not run".into(), "—".into(), "—".into(), "—".into()),
        };
        table.row(vec![
            fmt::count(r.new_tokens),
            fmt::rate(r.new_tokens as f64 / r.secs),
            fmt::mib(r.peak_bytes),
            r.cache.map_or("—".into(), |(b, _)| fmt::mib(b)),
            rate,
            peak,
            speedup,
            same,
        ]);
    }
    let per_token = with
        .last()
        .and_then(|r| r.cache)
        .map(|(bytes, positions)| bytes / positions.max(1));
    let rate = |runs: &[&Run]| -> Vec<(f64, f64)> {
        runs.iter()
            .map(|r| (r.new_tokens as f64, r.new_tokens as f64 / r.secs))
            .collect()
    };
    let memory = |runs: &[&Run]| -> Vec<(f64, f64)> {
        runs.iter()
            .map(|r| {
                (
                    r.new_tokens as f64,
                    r.peak_bytes as f64 / (1u64 << 20) as f64,
                )
            })
            .collect()
    };
    let plots = vec![
        Plot {
            title: "generation speed".into(),
            x_label: "new tokens N".into(),
            y_label: "tokens/s".into(),
            log_x: true,
            log_y: true,
            series: vec![
                Series {
                    name: "with the KV cache".into(),
                    points: rate(&with),
                },
                Series {
                    name: "without (recompute the prefix)".into(),
                    points: rate(&without),
                },
            ],
            legend: Corner::LowerLeft,
        },
        Plot {
            title: "peak memory".into(),
            x_label: "new tokens N".into(),
            y_label: "MiB".into(),
            log_x: true,
            log_y: false,
            series: vec![
                Series {
                    name: "with the KV cache".into(),
                    points: memory(&with),
                },
                Series {
                    name: "without".into(),
                    points: memory(&without),
                },
            ],
            legend: Corner::UpperLeft,
        },
    ];
    let mut findings = Vec::new();
    if let Some(bytes) = per_token {
        findings.push(format!(
            "The cache holds {} bytes per token ({} KiB: keys and values of every layer), \
             allocated for the whole generation up front.",
            fmt::count(bytes),
            bytes / 1024
        ));
    }
    if let Some(w) = without.last() {
        if let Some(r) = with.iter().find(|r| r.new_tokens == w.new_tokens) {
            findings.push(format!(
                "At N = {} the cache made generation {:.0}× faster ({} against {} tokens/s): \
                 without it step t runs all 32 + t positions, so the total work grows with N².",
                fmt::count(w.new_tokens),
                w.secs / r.secs,
                fmt::rate(r.new_tokens as f64 / r.secs),
                fmt::rate(w.new_tokens as f64 / w.secs),
            ));
        }
    }
    if let (Some(a), Some(b)) = (with.first(), with.last()) {
        findings.push(format!(
            "With the cache the speed went from {} tokens/s at N = {} to {} at N = {}: each \
             step reads a longer cache, but the cost per step stays nearly flat.",
            fmt::rate(a.new_tokens as f64 / a.secs),
            a.new_tokens,
            fmt::rate(b.new_tokens as f64 / b.secs),
            fmt::count(b.new_tokens),
        ));
    }
    let differing: Vec<usize> = with
        .iter()
        .filter(|r| twin(r).is_some_and(|w| w.ids != r.ids))
        .map(|r| r.new_tokens)
        .collect();
    if differing.is_empty() {
        findings.push("Both paths chose the same tokens at every length.".into());
    } else {
        findings.push(format!(
            "The two paths chose different tokens from some step on at N = {differing:?}: the \
             prefill's matrix products and the decode's matrix-vector products sum in different \
             orders, and once two candidates are within that rounding of each other the greedy \
             choice can flip (more often in bf16 than in f32)."
        ));
    }
    let raw = json!({
        "model": model,
        "prompt_tokens": PROMPT,
        "runs": runs.iter().map(|r| json!({
            "cached": r.cached, "new_tokens": r.new_tokens, "seconds": r.secs,
            "peak_bytes": r.peak_bytes, "cache_bytes": r.cache.map(|c| c.0),
            "cache_positions": r.cache.map(|c| c.1), "ids": r.ids,
        })).collect::<Vec<Value>>(),
    });
    ctx.section(Experiment::KvCache, vec![table], plots, findings, raw)
}

/// "yes", or the first step at which the two generations differ.
fn agreement(a: &[u32], b: &[u32]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => "yes".into(),
        Some(step) => format!("to step {step}"),
    }
}
