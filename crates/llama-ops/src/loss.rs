//! Cross entropy over large vocabularies (Unsloth's `fast_cross_entropy_loss`), the fast CPU
//! path. Letters: N rows (tokens), V vocabulary. logits [N, V], labels [N].
//!
//! Each row's logsumexp is taken over chunks of the vocabulary — a max and a sum of exponentials
//! per chunk, merged as logaddexp — so no softmax copy of the logits is ever made. The logits
//! may first be scaled (z = s·x) and softcapped (z = cap · tanh(z / cap)), as Gemma 2 and
//! Cohere do. The loss is the mean over rows whose label is not the ignore index:
//!   loss = Σ_valid (logsumexp(z) − z[label]) / n_valid
//! and its gradient, written over the logits where the caller allows it, is
//!   dx_j = dloss / n_valid · (softmax(z)_j − [j = label]) · dz_j/dx_j.

use llama_core::Element;
use rayon::prelude::*;

use crate::error::{OpsError, Result};
use crate::rows::for_each_row;
use crate::simd::{self, simd_fn, LANES};

/// Settings of the cross entropy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows with this label do not count (PyTorch's default −100).
    pub ignore_index: i64,
    /// z = cap · tanh(z / cap) when set (after scaling).
    pub softcap: Option<f32>,
    /// z = s · x when set.
    pub logit_scale: Option<f32>,
    /// Vocabulary entries per logsumexp chunk.
    pub chunk: usize,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: -100,
            softcap: None,
            logit_scale: None,
            chunk: 65_536,
        }
    }
}

impl CrossEntropyOptions {
    /// The logit transform z(x).
    #[inline]
    pub fn transform(&self, x: f32) -> f32 {
        let z = self.logit_scale.map_or(x, |s| s * x);
        self.softcap.map_or(z, |cap| cap * (z / cap).tanh())
    }

    /// z(x) and dz/dx.
    #[inline]
    pub fn transform_and_slope(&self, x: f32) -> (f32, f32) {
        let (z, slope) = self.logit_scale.map_or((x, 1.0), |s| (s * x, s));
        match self.softcap {
            Some(cap) => {
                let t = (z / cap).tanh();
                (cap * t, slope * (1.0 - t * t))
            }
            None => (z, slope),
        }
    }

    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        let invalid = |arg, value: f32, reason| OpsError::InvalidArgument {
            op,
            arg,
            value: value.to_string(),
            reason,
        };
        if self.chunk == 0 {
            return Err(invalid("chunk", 0.0, "must be at least 1"));
        }
        if let Some(cap) = self.softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(invalid("softcap", cap, "must be finite and positive"));
            }
        }
        if let Some(s) = self.logit_scale {
            if !s.is_finite() {
                return Err(invalid("logit_scale", s, "must be finite"));
            }
        }
        Ok(())
    }
}

/// The forward's results, kept for the backward.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropy {
    /// Mean loss over the counted rows; 0 when no row counts.
    pub loss: f32,
    /// Rows whose label is not the ignore index.
    pub n_valid: usize,
    /// logsumexp of each row's transformed logits; 0 for ignored rows.
    pub logsumexp: Vec<f32>,
}

/// Checks the labels against the vocabulary; returns V.
pub(crate) fn check_labels(
    op: &'static str,
    logits: usize,
    labels: &[i64],
    opts: &CrossEntropyOptions,
) -> Result<usize> {
    opts.validate(op)?;
    let rows = labels.len();
    if (rows == 0) != (logits == 0) || (rows > 0 && !logits.is_multiple_of(rows)) {
        return Err(OpsError::Shape {
            op,
            reason: format!("logits hold {logits} elements, not {rows} rows of a vocabulary"),
        });
    }
    let vocab = logits.checked_div(rows).unwrap_or(0);
    for (row, &label) in labels.iter().enumerate() {
        if label != opts.ignore_index && !(0..vocab as i64).contains(&label) {
            return Err(OpsError::LabelOutOfRange {
                op,
                row,
                label,
                vocab,
                ignore_index: opts.ignore_index,
            });
        }
    }
    Ok(vocab)
}

/// Cross entropy of logits [N, V] against labels [N].
pub fn cross_entropy<T: Element>(
    logits: &[T],
    labels: &[i64],
    opts: &CrossEntropyOptions,
) -> Result<CrossEntropy> {
    let vocab = check_labels("cross_entropy", logits.len(), labels, opts)?;
    let mut logsumexp = vec![0f32; labels.len()];
    let row_loss = |(row, lse): (usize, &mut f32)| -> (f64, usize) {
        let label = labels[row];
        if label == opts.ignore_index {
            return (0.0, 0);
        }
        let x = &logits[row * vocab..(row + 1) * vocab];
        *lse = row_logsumexp(x, opts);
        let target = opts.transform(x[label as usize].to_f32());
        ((*lse - target) as f64, 1)
    };
    let add = |a: (f64, usize), b: (f64, usize)| (a.0 + b.0, a.1 + b.1);
    let (sum, n_valid) = if logits.len() <= crate::rows::TASK_ELEMS {
        logsumexp
            .iter_mut()
            .enumerate()
            .map(row_loss)
            .fold((0.0, 0), add)
    } else {
        logsumexp
            .par_iter_mut()
            .enumerate()
            .map(row_loss)
            .reduce(|| (0.0, 0), add)
    };
    let loss = if n_valid == 0 {
        0.0
    } else {
        (sum / n_valid as f64) as f32
    };
    Ok(CrossEntropy {
        loss,
        n_valid,
        logsumexp,
    })
}

/// logsumexp of one row's transformed logits, merged over vocabulary chunks:
/// each chunk's (max, Σ exp(z − max)), combined as logaddexp.
fn row_logsumexp<T: Element>(x: &[T], opts: &CrossEntropyOptions) -> f32 {
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for chunk in x.chunks(opts.chunk) {
        let (chunk_max, chunk_sum) = match opts.softcap {
            None => scaled_chunk_stats(chunk, opts.logit_scale.unwrap_or(1.0)),
            Some(_) => chunk_stats(chunk.iter().map(|v| opts.transform(v.to_f32()))),
        };
        let merged = max.max(chunk_max);
        sum = sum * simd::exp(max - merged) + chunk_sum * simd::exp(chunk_max - merged);
        max = merged;
    }
    max + sum.ln()
}

simd_fn! {
    /// (max, Σ exp(z − max)) of z = scale · x over a chunk, in LANES running lanes.
    fn scaled_chunk_stats<T>(chunk: &[T], scale: f32) -> (f32, f32) {
        let body = chunk.chunks_exact(LANES);
        let tail = body.remainder();
        let mut lane_max = [f32::NEG_INFINITY; LANES];
        for lanes in body.clone() {
            for l in 0..LANES {
                let z = scale * lanes[l].to_f32();
                lane_max[l] = if z > lane_max[l] { z } else { lane_max[l] };
            }
        }
        let max = tail
            .iter()
            .map(|v| scale * v.to_f32())
            .chain(lane_max)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut lane_sum = [0f32; LANES];
        for lanes in body {
            for l in 0..LANES {
                lane_sum[l] += simd::exp(scale * lanes[l].to_f32() - max);
            }
        }
        let tail_sum: f32 = tail.iter().map(|v| simd::exp(scale * v.to_f32() - max)).sum();
        (max, lane_sum.iter().sum::<f32>() + tail_sum)
    }
}

/// (max, Σ exp(z − max)) of any transformed chunk (the softcapped path).
fn chunk_stats(z: impl Iterator<Item = f32> + Clone) -> (f32, f32) {
    let max = z.clone().fold(f32::NEG_INFINITY, f32::max);
    (max, z.map(|z| simd::exp(z - max)).sum())
}

simd_fn! {
    /// dx_j = coef · s · (softmax_j − [j = label]) for a row without softcap, in place.
    fn scaled_row_grad<T>(x: &mut [T], label: usize, lse: f32, scale: f32, coef: f32) {
        let label_x = x[label].to_f32();
        for v in x.iter_mut() {
            *v = T::from_f32(coef * simd::exp(scale * v.to_f32() - lse) * scale);
        }
        x[label] = T::from_f32(coef * (simd::exp(scale * label_x - lse) - 1.0) * scale);
    }
}

/// The gradient d(dloss · loss)/d(logits), written over `logits` [N, V] (in place, as the
/// training loop wants: the logits are not needed afterwards). Ignored rows get 0.
pub fn cross_entropy_backward<T: Element>(
    logits: &mut [T],
    labels: &[i64],
    forward: &CrossEntropy,
    dloss: f32,
    opts: &CrossEntropyOptions,
) -> Result<()> {
    let op = "cross_entropy_backward";
    let vocab = check_labels(op, logits.len(), labels, opts)?;
    if forward.logsumexp.len() != labels.len() {
        return Err(OpsError::Shape {
            op,
            reason: format!(
                "the forward saved {} logsumexp values for {} labels",
                forward.logsumexp.len(),
                labels.len()
            ),
        });
    }
    if vocab == 0 {
        return Ok(());
    }
    let coef = if forward.n_valid == 0 {
        0.0
    } else {
        dloss / forward.n_valid as f32
    };
    for_each_row(logits, vocab, |row, x, _| {
        let label = labels[row];
        if label == opts.ignore_index {
            x.fill(T::from_f32(0.0));
            return;
        }
        let lse = forward.logsumexp[row];
        match opts.softcap {
            None => {
                let scale = opts.logit_scale.unwrap_or(1.0);
                scaled_row_grad(x, label as usize, lse, scale, coef);
            }
            Some(_) => {
                for (j, v) in x.iter_mut().enumerate() {
                    let (z, slope) = opts.transform_and_slope(v.to_f32());
                    let target = if j as i64 == label { 1.0 } else { 0.0 };
                    *v = T::from_f32(coef * (simd::exp(z - lse) - target) * slope);
                }
            }
        }
    });
    Ok(())
}
