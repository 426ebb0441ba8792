//! Experiment 4, quantisation: SmolLM2 with its weights as loaded (Q4_1), dequantised to f32
//! and bf16, and requantised to Q8_0, Q4_0 and NF4 — weight memory, prefill and decode
//! tokens/s, perplexity on a fixed English text and the KL divergence of each variant's
//! next-token distribution from the f32 one's.

use llama_core::DType;
use llama_model::{Decoder, Engine, LlamaModel, Precision};
use serde_json::{json, Value};

use crate::report::{fmt, Corner, Plot, Section, Series, Table};
use crate::setup::{timed, Context};
use crate::{Error, Experiment};

pub const TITLE: &str = "quantisation";
pub const ABOUT: &str = "SmolLM2-135M-Instruct as the file stores it (Q4_1 projections, Q8_0 \
tied embeddings/head), with every weight matrix dequantised exactly to f32 or rounded to bf16, \
or with the seven projections of each layer requantised to Q8_0, Q4_0 or NF4 (the embeddings \
kept in Q8_0, as llama.cpp's quantiser keeps them above 4 bits). f32 is the reference: it holds \
exactly the file's values, so Q4_1's KL from it is zero in a prefill (its decode differs by \
the 8-bit activations), and each other variant's projection error (‖W − W_f32‖ / ‖W_f32‖), KL and perplexity show what its rounding \
adds — the requantised ones start from the Q4_1 values, the only ones at hand. For each: the weights' memory; prefill of 512 tokens and 64 greedy decode steps \
(tokens/s, best of two, `fast` precision — 8-bit activations in the Q4_0/Q4_1/Q8_0 decode \
products); the perplexity of the first 1,024 tokens of the repository's LICENSE (the \
Apache-2.0 text) in one forward pass; and the mean over those positions of the KL divergence \
KL(p_f32 ‖ p_variant) of the next-token distribution from the f32 variant's.";

/// (name, the dtype every matrix is converted to; None keeps the file's).
const VARIANTS: [(&str, Option<DType>); 6] = [
    ("f32", Some(DType::F32)),
    ("bf16", Some(DType::BF16)),
    ("Q8_0", Some(DType::Q8_0)),
    ("Q4_1 (as loaded)", None),
    ("Q4_0", Some(DType::Q4_0)),
    ("NF4", Some(DType::Nf4)),
];

struct Run {
    name: &'static str,
    weight_bytes: usize,
    /// ‖W − W_f32‖ / ‖W_f32‖ over every projection.
    weight_error: f64,
    prefill_per_s: f64,
    decode_per_s: f64,
    perplexity: f64,
    mean_kl: f64,
}

pub fn run(ctx: &Context) -> Result<Section, Error> {
    let eval_tokens = ctx.pick(1024, 128);
    let prompt_tokens = ctx.pick(512, 64);
    let decode_steps = ctx.pick(64, 8);
    let progress = ctx.progress(Experiment::Quantization, VARIANTS.len());
    let mut reference: Option<Vec<f32>> = None;
    let mut reference_weights: Option<Vec<f32>> = None;
    let mut runs = Vec::new();
    for (name, dtype) in VARIANTS {
        let _run = progress.run(name.to_string());
        let (mut model, tokenizer) = ctx.smollm2(Precision::Fast)?;
        if let Some(dtype) = dtype {
            model.convert_projections(dtype)?;
            if matches!(dtype, DType::F32 | DType::BF16) {
                model.convert_embeddings(dtype)?;
            }
        }
        let text = ctx.licence_ids(&tokenizer, eval_tokens)?;
        let weight_bytes = model.memory_bytes();
        let weights = projections(&model)?;
        let weight_error = relative_error(
            reference_weights.get_or_insert_with(|| weights.clone()),
            &weights,
        );
        let log_probs = log_probs(&mut model, &text)?;
        let perplexity = perplexity(&log_probs, &text);
        let reference = reference.get_or_insert_with(|| log_probs.clone());
        let mean_kl = mean_kl(reference, &log_probs, model.config.vocab_size);
        let mut engine = Engine::Cpu(Box::new(model));
        let (prefill_per_s, decode_per_s) = speed(
            &mut engine,
            &text[..prompt_tokens.min(text.len())],
            decode_steps,
        )?;
        runs.push(Run {
            name,
            weight_bytes,
            weight_error,
            prefill_per_s,
            decode_per_s,
            perplexity,
            mean_kl,
        });
    }
    progress.finish();
    Ok(report(ctx, &runs, eval_tokens, prompt_tokens, decode_steps))
}

/// Every projection's values in f32, layer after layer.
fn projections(model: &LlamaModel) -> Result<Vec<f32>, Error> {
    let mut out = Vec::new();
    for layer in &model.layers {
        for w in layer.weights() {
            out.extend_from_slice(&w.to_f32()?);
        }
    }
    Ok(out)
}

/// ‖b − a‖ / ‖a‖.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let (diff, norm) = a.iter().zip(b).fold((0f64, 0f64), |(d, n), (&x, &y)| {
        (d + (x as f64 - y as f64).powi(2), n + (x as f64).powi(2))
    });
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// log p of every vocabulary entry at every position of `ids`, [T, V].
fn log_probs(model: &mut LlamaModel, ids: &[u32]) -> Result<Vec<f32>, Error> {
    let mut logits = model.forward(ids, 1)?;
    for row in logits.chunks_exact_mut(model.config.vocab_size) {
        let lse = log_sum_exp(row);
        row.iter_mut().for_each(|v| *v = (*v as f64 - lse) as f32);
    }
    Ok(logits)
}

/// log Σ exp(row), in f64 from the largest entry.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// −log softmax(row)[index]: the loss of predicting `index` from these logits.
pub fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    log_sum_exp(row) - row[index] as f64
}

/// exp of the mean next-token loss over every position but the last.
fn perplexity(log_probs: &[f32], ids: &[u32]) -> f64 {
    let vocab = log_probs.len() / ids.len();
    let losses: Vec<f64> = log_probs
        .chunks_exact(vocab)
        .zip(&ids[1..])
        .map(|(row, &next)| -(row[next as usize] as f64))
        .collect();
    (losses.iter().sum::<f64>() / losses.len() as f64).exp()
}

/// Mean over positions of KL(p ‖ q) = Σ p (log p − log q).
fn mean_kl(p: &[f32], q: &[f32], vocab: usize) -> f64 {
    let rows = p.len() / vocab;
    let total: f64 = p
        .chunks_exact(vocab)
        .zip(q.chunks_exact(vocab))
        .map(|(lp, lq)| {
            lp.iter()
                .zip(lq)
                .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
                .sum::<f64>()
        })
        .sum();
    total / rows as f64
}

/// Best-of-two (prefill tokens/s, decode tokens/s).
fn speed(engine: &mut Engine, prompt: &[u32], steps: usize) -> Result<(f64, f64), Error> {
    let (mut prefill, mut decode) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        let mut cache = engine.new_cache(1, prompt.len() + steps, None)?;
        let (secs, logits) = timed(|| engine.forward_cached(prompt, 1, &mut cache));
        prefill = prefill.min(secs);
        let mut logits = logits?;
        let (secs, done) = timed(|| -> Result<(), Error> {
            for _ in 0..steps {
                let next = llama_model::generate::argmax(&logits) as u32;
                logits = engine.forward_cached(&[next], 1, &mut cache)?;
            }
            Ok(())
        });
        done?;
        decode = decode.min(secs);
    }
    Ok((prompt.len() as f64 / prefill, steps as f64 / decode))
}

fn report(
    ctx: &Context,
    runs: &[Run],
    eval_tokens: usize,
    prompt_tokens: usize,
    decode_steps: usize,
) -> Section {
    let f32_run = runs.iter().find(|r| r.name == "f32");
    let mut table = Table::new(
        &format!(
            "Perplexity over {} tokens; prefill {prompt_tokens}, decode {decode_steps} tokens",
            fmt::count(eval_tokens)
        ),
        &[
            "weights",
            "weight MiB",
            "× f32 size",
            "projection error",
            "prefill tokens/s",
            "decode tokens/s",
            "perplexity",
            "mean KL from f32 (nats)",
        ],
    );
    for r in runs {
        table.row(vec![
            r.name.into(),
            fmt::mib(r.weight_bytes),
            f32_run.map_or("—".into(), |f| {
                format!("{:.3}", r.weight_bytes as f64 / f.weight_bytes as f64)
            }),
            format!("{:.4}", r.weight_error),
            fmt::rate(r.prefill_per_s),
            fmt::rate(r.decode_per_s),
            format!("{:.3}", r.perplexity),
            format!("{:.5}", r.mean_kl),
        ]);
    }
    let mib = |r: &Run| r.weight_bytes as f64 / (1u64 << 20) as f64;
    let plots = vec![
        Plot {
            title: "accuracy against size (zero KL not drawn)".into(),
            x_label: "weight memory (MiB)".into(),
            y_label: "mean KL from f32 (nats)".into(),
            log_x: true,
            log_y: true,
            series: runs
                .iter()
                .map(|r| Series {
                    name: r.name.into(),
                    // The log axis has no 0: f32 (and Q4_1 in a prefill) are left out.
                    points: [(mib(r), r.mean_kl)]
                        .into_iter()
                        .filter(|p| p.1 > 0.0)
                        .collect(),
                })
                .collect(),
            legend: Corner::UpperRight,
        },
        Plot {
            title: "decode speed against size".into(),
            x_label: "weight memory (MiB)".into(),
            y_label: "decode tokens/s".into(),
            log_x: true,
            log_y: false,
            series: runs
                .iter()
                .map(|r| Series {
                    name: r.name.into(),
                    points: vec![(mib(r), r.decode_per_s)],
                })
                .collect(),
            legend: Corner::UpperRight,
        },
    ];
    let raw = json!({
        "eval_tokens": eval_tokens, "prompt_tokens": prompt_tokens, "decode_steps": decode_steps,
        "runs": runs.iter().map(|r| json!({
            "weights": r.name, "weight_bytes": r.weight_bytes, "weight_error": r.weight_error, "prefill_tokens_per_s": r.prefill_per_s,
            "decode_tokens_per_s": r.decode_per_s, "perplexity": r.perplexity, "mean_kl": r.mean_kl,
        })).collect::<Vec<Value>>(),
    });
    ctx.section(
        Experiment::Quantization,
        vec![table],
        plots,
        findings(runs),
        raw,
    )
}

fn findings(runs: &[Run]) -> Vec<String> {
    let Some(f) = runs.iter().find(|r| r.name == "f32") else {
        return Vec::new();
    };
    runs.iter()
        .filter(|r| r.name != "f32")
        .map(|r| {
            format!(
                "{}: {:.0}% of f32's memory, decode {:.2}× f32's speed, perplexity {:+.3} \
                 ({:+.2}%), mean KL {:.4} nats.",
                r.name,
                100.0 * r.weight_bytes as f64 / f.weight_bytes as f64,
                r.decode_per_s / f.decode_per_s,
                r.perplexity - f.perplexity,
                100.0 * (r.perplexity / f.perplexity - 1.0),
                r.mean_kl,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_for_different_distributions() {
        let p: Vec<f32> = [0.7f64, 0.2, 0.1].iter().map(|v| v.ln() as f32).collect();
        let q: Vec<f32> = [0.4f64, 0.4, 0.2].iter().map(|v| v.ln() as f32).collect();
        assert_eq!(mean_kl(&p, &p, 3), 0.0);
        let expected =
            0.7 * (0.7f64 / 0.4).ln() + 0.2 * (0.2f64 / 0.4).ln() + 0.1 * (0.1f64 / 0.2).ln();
        assert!((mean_kl(&p, &q, 3) - expected).abs() < 1e-6);
    }

    #[test]
    fn perplexity_of_a_uniform_model_is_the_vocabulary() {
        let log_probs = vec![(0.25f64).ln() as f32; 3 * 4];
        assert!((perplexity(&log_probs, &[0, 1, 2]) - 4.0).abs() < 1e-5);
        assert!((log_softmax_at(&[0.0; 4], 2) - 4f64.ln()).abs() < 1e-12);
    }
}
