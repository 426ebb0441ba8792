//! The training step's arithmetic: the whole model's forward with each layer's tape (or only
//! its input, with gradient checkpointing), the language-model head and chunked cross entropy,
//! and the backward by hand down to the embeddings, with gradients for the LoRA pairs only.
//! Letters: B batch, T positions, N = B·T rows, C hidden, V vocabulary.
//!
//!   forward:   h₀ = embed(ids); hᵢ₊₁ = layerᵢ(hᵢ); n = rms_norm(h_L); logits = n·lm_headᵀ
//!   loss:      mean over the non-ignored shifted labels of −log softmax(logits)[label]
//!   backward:  dlogits = (softmax − onehot)/count, a chunk of rows at a time (the [N, V]
//!              logits never exist whole); dn = dlogits·lm_head; dh_L = rms_norm_backward;
//!              each layer's backward in reverse; the embeddings are frozen.

use llama_ops::kernel::{
    cross_entropy, cross_entropy_backward, linear, linear_backward_input, rms_norm_backward,
};
use llama_ops::{linear_backward_weight, Activations, CrossEntropyOptions};
use llama_peft::AdapterGrads;

use crate::error::{ModelError, Result};
use crate::layer::{layer_dropout, AttnInput, Keep, LayerAdapter, LayerTape};
use crate::model::{shift_labels, LlamaModel};
use crate::trainer::Batch;

/// How a training step runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepOptions {
    /// Keep only each layer's input and recompute its forward in the backward.
    pub gradient_checkpointing: bool,
    /// The gradients are multiplied by this (1 / gradient-accumulation steps).
    pub grad_scale: f32,
    /// Seeds the LoRA dropout masks of this step (ignored when lora_dropout is 0).
    pub dropout_seed: Option<u64>,
}

/// The most logits one chunk of the CPU's head holds: 16 M values (64 MB) whatever the
/// vocabulary (the head's products run fastest on many rows at once: 256 rows of SmolLM2 at
/// ~150 GFLOP/s, 85 at ~100 on two AVX2 cores).
const CPU_HEAD_CHUNK_LOGITS: usize = 1 << 24;

/// Logit rows per chunk of the head over `n` rows: at most `most_logits` values a chunk, in
/// chunks of equal size, a whole multiple of `align` rows where the budget holds that many (a
/// GPU product's row tiles).
pub(crate) fn head_chunk_rows(vocab: usize, n: usize, most_logits: usize, align: usize) -> usize {
    let mut most = (most_logits / vocab.max(1)).max(1);
    if most >= align {
        most -= most % align;
    }
    let chunks = n.div_ceil(most).max(1);
    n.div_ceil(chunks).next_multiple_of(align).min(most).max(1)
}

impl LlamaModel {
    /// The loss of the batch's `ids` [B, T] against its `labels` [B, T] (HF's shift; −100 ignored; mean over
    /// the batch's scored tokens) and its gradient for every LoRA pair, added to `grads`
    /// (times `options.grad_scale`). Needs an adapter ([`LlamaModel::set_adapter`]).
    pub fn loss_and_grads(
        &mut self,
        b: &Batch,
        grads: &mut AdapterGrads,
        options: &StepOptions,
    ) -> Result<f32> {
        let (ids, labels) = (&b.ids, &b.labels);
        let seq = self.seq_len(ids, b.batch)?;
        if labels.len() != ids.len() {
            return Err(ModelError::input(
                "labels",
                format!("{} labels for {} ids", labels.len(), ids.len()),
            ));
        }
        let Some(adapter) = self.adapter.as_ref() else {
            return Err(ModelError::input(
                "adapter",
                "training needs a LoRA adapter (get_peft_model or --init-adapter)".to_string(),
            ));
        };
        if !grads.fits(adapter) {
            return Err(ModelError::input(
                "grads",
                "gradients shaped for another adapter".to_string(),
            ));
        }
        let batch = b.batch;
        let positions = self.positions(batch, seq, 0, None)?;
        let eps = self.config.rms_norm_eps;
        // Layer i's pairs, with dropout masks drawn from a seed of its own, so that a
        // recomputed forward draws the same ones.
        let layer_adapter = |i: usize| LayerAdapter {
            lora: Some(&adapter.layers[i]),
            dropout: layer_dropout(
                adapter.config.lora_dropout,
                options
                    .dropout_seed
                    .map(|s| s ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ),
        };
        // forward, keeping each layer's tape (or its input when checkpointing, but the last
        // layer's tape, whose backward comes next)
        let mut h = self.embed(&b.ids)?;
        let mut tapes: Vec<LayerTape> = Vec::new();
        let mut inputs: Vec<Vec<f32>> = Vec::new();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let keep = if options.gradient_checkpointing && i < last {
                inputs.push(h.clone());
                Keep::Output
            } else {
                Keep::OutputAndTape
            };
            let input = AttnInput::Sequence {
                padding: None,
                keep,
            };
            let tape = layer.forward(&mut h, batch, &positions, eps, input, layer_adapter(i))?;
            tapes.extend(tape);
        }
        let normed = self.final_norm(&h)?;
        let targets = shift_labels(&b.labels, seq);
        let head_grad = grads.modules[1].as_deref_mut();
        let (loss, d_normed) =
            self.head_backward(&normed, &targets, options.grad_scale, head_grad)?;
        let mut dh = vec![0f32; h.len()];
        let mut dw = vec![0f32; self.norm.len()];
        let norm = self.patch_plan().final_norm.kernel();
        rms_norm_backward(norm, &h, &self.norm, &d_normed, eps, &mut dh, &mut dw)?;
        drop((normed, d_normed, h));
        // backward through the layers, last first
        for i in (0..self.layers.len()).rev() {
            let layer = &mut self.layers[i];
            let tape = match tapes.pop() {
                Some(tape) => tape,
                None => {
                    let mut h = std::mem::take(&mut inputs[i]);
                    let input = AttnInput::Sequence {
                        padding: None,
                        keep: Keep::Tape,
                    };
                    layer
                        .forward(&mut h, batch, &positions, eps, input, layer_adapter(i))?
                        .expect("a forward asked to keep its tape returns it")
                }
            };
            layer.backward(
                &tape,
                &mut dh,
                eps,
                Some(&adapter.layers[i]),
                &mut grads.layers[i],
            )?;
        }
        // h₀ = embed(ids): each row's gradient goes to its token's row.
        if let Some(g) = grads.modules[0].as_mut() {
            let c = self.config.hidden_size;
            for (row, &id) in dh.chunks_exact(c).zip(&b.ids) {
                let at = id as usize * c;
                g[at..at + c].iter_mut().zip(row).for_each(|(g, d)| *g += d);
            }
        }
        Ok(loss)
    }

    /// Cross entropy of normed hidden states [N, C] against `targets` [N] and its gradient
    /// [N, C] times `scale`, a chunk of rows at a time (each chunk's logits are made, turned
    /// into their gradient in place and multiplied back through lm_head).
    /// When lm_head is trained (modules_to_save), its gradient is added to `head_grad`.
    fn head_backward(
        &self,
        normed: &[f32],
        targets: &[i64],
        scale: f32,
        mut head_grad: Option<&mut [f32]>,
    ) -> Result<(f32, Vec<f32>)> {
        let (c, v) = (self.config.hidden_size, self.config.vocab_size);
        let opts = CrossEntropyOptions::default();
        let scored = targets.iter().filter(|&&t| t != opts.ignore_index).count();
        let mut d_normed = vec![0f32; normed.len()];
        let mut loss_sum = 0f64;
        let rows = head_chunk_rows(v, targets.len(), CPU_HEAD_CHUNK_LOGITS, 1);
        let mut logits = vec![0f32; rows.min(targets.len()) * v];
        let (head, ce_kernel) = (
            self.patch_plan().lm_head.kernel(),
            self.patch_plan().cross_entropy.kernel(),
        );
        for ((x, t), dx) in normed
            .chunks(rows * c)
            .zip(targets.chunks(rows))
            .zip(d_normed.chunks_mut(rows * c))
        {
            if t.iter().all(|&t| t == opts.ignore_index) {
                continue;
            }
            let logits = &mut logits[..t.len() * v];
            linear(head, self.lm_head(), x, logits, Activations::F32)?;
            let ce = cross_entropy(ce_kernel, logits, t, &opts)?;
            loss_sum += ce.loss as f64 * ce.n_valid as f64;
            // d(chunk mean)/d(batch mean) = n_chunk / n_batch
            let dloss = scale * ce.n_valid as f32 / scored as f32;
            cross_entropy_backward(ce_kernel, logits, t, &ce, dloss, &opts)?;
            // logits = x · Wᵀ: dW += dlogitsᵀ · x
            if let Some(g) = head_grad.as_deref_mut() {
                linear_backward_weight(logits, x, c, g)?;
            }
            linear_backward_input(head, self.lm_head(), logits, dx)?;
        }
        let loss = if scored == 0 {
            0.0
        } else {
            (loss_sum / scored as f64) as f32
        };
        Ok((loss, d_normed))
    }
}

#[cfg(test)]
mod tests {
    use super::head_chunk_rows;
    use proptest::prelude::*;

    proptest! {
        /// The chunks cover the rows in as few chunks as the budget allows, each within it
        /// (a single row may exceed it), in whole `align`s where the budget holds one.
        #[test]
        fn head_chunks_keep_to_the_budget(
            vocab in 1usize..300_000,
            n in 0usize..40_000,
            most_logits in 1usize..(1 << 26),
            align in prop::sample::select(vec![1usize, 64, 128]),
        ) {
            let rows = head_chunk_rows(vocab, n, most_logits, align);
            let most_rows = (most_logits / vocab).max(1);
            prop_assert!(rows >= 1 && rows <= most_rows);
            if most_rows >= align {
                prop_assert_eq!(rows % align, 0);
                let fewest = n.div_ceil(most_rows - most_rows % align);
                prop_assert_eq!(n.div_ceil(rows), fewest);
            }
        }
    }

    #[test]
    fn llama_vocabulary_on_the_gpu_takes_512_rows_a_chunk() {
        assert_eq!(head_chunk_rows(128_256, 8192, 1 << 26, 128), 512);
        assert_eq!(head_chunk_rows(128_256, 4096, 1 << 26, 128), 512);
        // unaligned: equal parts of at most 16 M logits (SmolLM2's 49,152 words: 341 rows)
        assert_eq!(head_chunk_rows(49_152, 512, 1 << 24, 1), 256);
    }
}
