//! The Llama decoder (HF `LlamaForCausalLM`), read top to bottom as the paper draws it:
//! MLP → decoder layer → model → language-model head and loss.
//! Letters: B batch, T positions, N = B·T rows, C hidden, F intermediate, V vocabulary.
//!
//!   h₀ = embed(ids)                                          [N, C]
//!   for each layer:  h += attn(rms_norm(h))                   (llama-attn)
//!                    h += down(act(gate(rms_norm(h))) · up(rms_norm(h)))
//!   logits = rms_norm(h) · lm_headᵀ                           [N, V]
//!
//! Activations are f32; weights are [`Weight`]s (dense or quantised, dequantised inside the
//! products). Decoding runs the same layers over per-layer [`KvCache`]s.

use std::fmt;

use llama_attn::{KvCache, LlamaAttention};
use llama_core::Device;
use llama_ops::kernel::{cross_entropy, linear, rms_norm};
use llama_ops::{Activations, CrossEntropyOptions, Weight};
use llama_patch::{patch_peft_model, pre_patch, LayerPlan, ModelFacts, PatchPlan, PatchReport};
use llama_peft::{LoraAdapter, LoraPair, ModelDims, Target};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::layer::{AttnInput, DecoderLayer, Keep, LayerAdapter, LlamaMlp};
use crate::source::TensorSource;

/// How activations are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations, quantised weights dequantised exactly: HF transformers' numbers.
    Exact,
    /// Free to trade exactness for speed within a stated bound (mean KL ≤ 0.01 from `exact`
    /// on SmolLM2, same top-1 token): decoding quantises the layers' activations to 8 bits
    /// for integer dot products with Q4_0/Q4_1/Q8_0 weights, as llama.cpp does. The lm_head
    /// reads f32 activations: its logits pick the token, and 8 bits there flip near-ties
    /// (SmolLM2's first token answering "What is the capital of France?" is one; ~5% of a
    /// decode step). CPU training on a CPU with AVX512-BF16 multiplies the frozen weights in
    /// bf16 ([`LlamaModel::prepare_for_training`]); the GPU trains in bf16 either way.
    #[default]
    Fast,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "exact" => Ok(Precision::Exact),
            "fast" => Ok(Precision::Fast),
            other => Err(ModelError::input(
                "precision",
                format!("{other:?} is not one of exact, fast"),
            )),
        }
    }
}

/// The KV caches of every layer for one batch of sequences.
pub struct ModelCache {
    pub layers: Vec<KvCache>,
}

impl ModelCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by all layers' keys and values.
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(KvCache::memory_bytes).sum()
    }

    /// Forgets everything (keeps the memory).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|c| c.reset());
    }

    /// Forgets positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|c| c.truncate(len));
    }

    fn padding(&self) -> Option<&[usize]> {
        self.layers.first().and_then(|c| c.padding())
    }
}

/// Hidden states of a forward pass.
pub struct Hidden {
    /// After the final norm, [N, C].
    pub last: Vec<f32>,
    /// When asked for, HF's `hidden_states`: the embeddings, each layer's output, and the last
    /// layer's after the final norm (L + 1 entries of [N, C]).
    pub states: Vec<Vec<f32>>,
}

/// A Llama model with its language-model head.
pub struct LlamaModel {
    pub config: LlamaConfig,
    pub embed_tokens: Weight,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
    /// None when tied to the embeddings.
    pub lm_head: Option<Weight>,
    /// The longest sequence accepted (the model's context unless set otherwise).
    pub max_seq_length: usize,
    /// The LoRA adapter every forward applies, if any (see [`LlamaModel::set_adapter`]).
    pub(crate) adapter: Option<LoraAdapter>,
    precision: Precision,
    /// Which implementation every op runs (llama-patch); the layers hold their part.
    plan: PatchPlan,
}

/// The KV cache grows by this many positions at a time.
const CACHE_INCREMENT: usize = 256;

impl LlamaModel {
    /// Reads every weight from `source`; `progress(done, total)` is called after each layer.
    pub(crate) fn load(
        config: LlamaConfig,
        source: &dyn TensorSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<LlamaModel> {
        let (c, f, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let attn = config.attention()?;
        let (q, kv) = (
            attn.num_heads * attn.head_dim,
            attn.num_kv_heads * attn.head_dim,
        );
        let total = config.num_hidden_layers + 1;
        let embed_tokens = source.matrix("model.embed_tokens.weight", v, c)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let name = |part: &str| format!("model.layers.{i}.{part}.weight");
            let matrix = |part: &str, rows, cols| source.matrix(&name(part), rows, cols);
            let self_attn = LlamaAttention::with_weights(
                attn,
                [
                    matrix("self_attn.q_proj", q, c)?,
                    matrix("self_attn.k_proj", kv, c)?,
                    matrix("self_attn.v_proj", kv, c)?,
                    matrix("self_attn.o_proj", c, q)?,
                ],
                config.rope.clone(),
            )?;
            layers.push(DecoderLayer {
                input_layernorm: source.vector(&name("input_layernorm"), c)?,
                self_attn,
                post_attention_layernorm: source.vector(&name("post_attention_layernorm"), c)?,
                mlp: LlamaMlp {
                    gate_proj: matrix("mlp.gate_proj", f, c)?,
                    up_proj: matrix("mlp.up_proj", f, c)?,
                    down_proj: matrix("mlp.down_proj", c, f)?,
                    act: config.hidden_act,
                    activations: Activations::F32,
                },
                plan: LayerPlan::uniform(llama_patch::Impl::CpuFast),
            });
            progress(i + 1, total);
        }
        let norm = source.vector("model.norm.weight", c)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(source.matrix("lm_head.weight", v, c)?)
        };
        progress(total, total);
        let mut model = LlamaModel {
            max_seq_length: config.max_position_embeddings,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            adapter: None,
            precision: Precision::Exact,
            plan: PatchPlan::reference(0),
        };
        model.pre_patch(Device::Cpu);
        Ok(model)
    }

    /// What llama-patch's policy needs to know about this model.
    pub fn facts(&self) -> ModelFacts {
        ModelFacts {
            num_layers: self.layers.len(),
            head_dim: self.config.head_dim,
            rope_type: self.config.rope.scaling.rope_type().to_string(),
            hidden_act: self.config.hidden_act,
            weight_dtype: self
                .layers
                .first()
                .map_or(llama_core::DType::F32, |l| l.self_attn.q_proj.dtype()),
        }
    }

    /// Unsloth's `pre_patch`: every op on its fastest implementation for `device` (a model
    /// loaded here starts so for the CPU). Returns what was patched; an attached adapter is
    /// patched again ([`Self::patch_peft_model`]).
    pub fn pre_patch(&mut self, device: Device) -> PatchReport {
        let (plan, report) = pre_patch(&self.facts(), device);
        self.install(plan);
        report
    }

    /// Every op back on its reference implementation (LoRA on the plain path): the
    /// unpatched model, slow, to compare the patched one with.
    pub fn unpatch(&mut self) -> PatchReport {
        self.install(PatchPlan::reference(self.layers.len()));
        PatchReport {
            summary: format!(
                "unpatched: {} layers, every op on its reference implementation",
                self.layers.len()
            ),
            ..PatchReport::default()
        }
    }

    /// The plan every forward follows.
    pub fn patch_plan(&self) -> &PatchPlan {
        &self.plan
    }

    /// Follows `plan` from now on (e.g. [`PatchPlan::set`] one op back to its reference). A
    /// plan for another number of layers is an error.
    pub fn set_patch_plan(&mut self, plan: PatchPlan) -> Result<()> {
        if plan.layers.len() != self.layers.len() {
            return Err(ModelError::input(
                "patch plan",
                format!(
                    "{} layer plans for {} layers",
                    plan.layers.len(),
                    self.layers.len()
                ),
            ));
        }
        self.install(plan);
        Ok(())
    }

    /// Unsloth's `patch_peft_model`: routes each layer's QKV, O and MLP through the fused
    /// LoRA path where the adapter's settings allow it (see [`llama_patch::patch_peft_model`]).
    /// Runs by itself whenever an adapter is attached; an error without one.
    pub fn patch_peft_model(&mut self) -> Result<PatchReport> {
        let Some(adapter) = &self.adapter else {
            return Err(ModelError::input(
                "adapter",
                "patch_peft_model needs a LoRA adapter (get_peft_model first)".to_string(),
            ));
        };
        let report = patch_peft_model(&mut self.plan, adapter);
        self.install(self.plan.clone());
        Ok(report)
    }

    /// Sets the plan, with the adapter's LoRA paths, and hands each layer its part.
    fn install(&mut self, mut plan: PatchPlan) {
        match &self.adapter {
            Some(adapter) => {
                patch_peft_model(&mut plan, adapter);
            }
            None => plan
                .layers
                .iter_mut()
                .for_each(|l| l.lora = Default::default()),
        }
        for (layer, layer_plan) in self.layers.iter_mut().zip(&plan.layers) {
            layer.set_plan(*layer_plan);
        }
        self.plan = plan;
    }

    /// The sizes LoRA matrices are shaped by.
    pub fn dims(&self) -> ModelDims {
        self.config.lora_dims()
    }

    /// Applies `adapter` in every forward from now on (replacing any other); None removes it.
    /// An adapter shaped for another model is an error.
    pub fn set_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        let mut adapter = adapter;
        if let Some(a) = &mut adapter {
            let dims = self.dims();
            let fits = a.layers.len() == dims.num_layers
                && a.pairs()
                    .all(|(_, t, p)| (p.out_features, p.in_features) == t.shape(&dims));
            if !fits {
                return Err(ModelError::input(
                    "adapter",
                    "its matrices do not fit this model's layers".to_string(),
                ));
            }
            // The modules it trains start as copies of this model's.
            a.init_modules(&self.embed_tokens, self.lm_head())?;
            let module_fits = [&a.modules.embed_tokens, &a.modules.lm_head]
                .into_iter()
                .flatten()
                .all(|w| w.shape() == (dims.vocab, dims.hidden));
            if !module_fits {
                return Err(ModelError::input(
                    "modules_to_save",
                    format!(
                        "embed_tokens / lm_head copies must be [{}, {}]",
                        dims.vocab, dims.hidden
                    ),
                ));
            }
        }
        self.adapter = adapter;
        self.install(self.plan.clone());
        Ok(())
    }

    /// Puts a fresh adapter with `config`'s settings on the model (Unsloth's
    /// `get_peft_model`): A random, B zero, saved modules copied from the model.
    pub fn get_peft_model(&mut self, config: llama_peft::LoraConfig) -> Result<()> {
        let adapter = LoraAdapter::new(config, self.dims())?;
        self.set_adapter(Some(adapter))
    }

    /// Adds s·B·A of every pair into its base weight (which becomes dense f32) and returns the
    /// adapter, no longer applied by the forward (peft's `merge_and_unload`).
    /// Trained modules (modules_to_save) replace the model's own, which the returned adapter
    /// holds in their place for [`Self::unmerge_adapter`].
    pub fn merge_adapter(&mut self) -> Result<Option<LoraAdapter>> {
        let Some(mut adapter) = self.adapter.take() else {
            return Ok(None);
        };
        self.add_adapter_deltas(&adapter, 1.0)?;
        self.swap_modules(&mut adapter);
        self.install(self.plan.clone());
        Ok(Some(adapter))
    }

    /// Exchanges the model's embed_tokens / lm_head with the adapter's trained copies.
    fn swap_modules(&mut self, adapter: &mut LoraAdapter) {
        if let Some(head) = &mut adapter.modules.lm_head {
            // A tied model gets an lm_head of its own (and gives it back on unmerge).
            let mut own = self
                .lm_head
                .take()
                .unwrap_or_else(|| self.embed_tokens.clone());
            std::mem::swap(&mut own, head);
            self.lm_head = Some(own);
        }
        if let Some(embed) = &mut adapter.modules.embed_tokens {
            std::mem::swap(&mut self.embed_tokens, embed);
        }
    }

    /// Subtracts a merged adapter's s·B·A again and applies it unmerged from now on (peft's
    /// `unmerge_adapter`); the base weights stay dense f32.
    pub fn unmerge_adapter(&mut self, mut adapter: LoraAdapter) -> Result<()> {
        self.add_adapter_deltas(&adapter, -1.0)?;
        self.swap_modules(&mut adapter);
        if adapter.modules.lm_head.is_some() && self.config.tie_word_embeddings {
            self.lm_head = None;
        }
        self.set_adapter(Some(adapter))
    }

    /// W ← W + sign·s·B·A for every pair of `adapter`.
    fn add_adapter_deltas(&mut self, adapter: &LoraAdapter, sign: f32) -> Result<()> {
        for (i, target, pair) in adapter.pairs() {
            let layer = self.layers.get_mut(i).ok_or_else(|| {
                ModelError::input("adapter", format!("layer {i} is past the model's layers"))
            })?;
            let projections = layer.projections_mut();
            let w = &mut *projections[target as usize];
            let (rows, cols) = w.shape();
            *w = Weight::dense(with_delta(w, Some(pair), sign)?, rows, cols)?;
        }
        Ok(())
    }

    /// Projection `target` of layer `i` in f32, with the adapter's s·B·A added when `merged`
    /// (and it has a pair there), the model itself unchanged: what a GPU copy holds.
    pub fn projection_f32(&self, i: usize, target: Target, merged: bool) -> Result<Vec<f32>> {
        let layer = self
            .layers
            .get(i)
            .ok_or_else(|| ModelError::input("layer", format!("{i} is past the model's layers")))?;
        let w = layer.weights()[target as usize];
        let pair = self.adapter.as_ref().filter(|_| merged);
        with_delta(w, pair.and_then(|a| a.layers[i].get(target)), 1.0)
    }

    /// Stores the seven projections of every layer as `dtype`: NF4 for QLoRA (dequantised on
    /// the fly by every product), F32 to dequantise them once (LoRA training on a quantised
    /// file: the products then run at the dense GEMM's speed).
    pub fn convert_projections(&mut self, dtype: llama_core::DType) -> Result<()> {
        for layer in &mut self.layers {
            for w in layer.projections_mut() {
                *w = w.convert(dtype)?;
            }
        }
        Ok(())
    }

    /// Readies the weights for LoRA training on the CPU and says what it changed, if anything.
    /// `exact` precision (and `fast` on a CPU without AVX512-BF16): projections in a GGUF block
    /// type are dequantised to f32 once (the same values; the products then run at the dense
    /// GEMM's speed), and the embeddings (the tied head) become f32 too. `fast` on a CPU with
    /// AVX512-BF16: the projections and embeddings are packed as bf16 for its dot-product
    /// instructions ([`Weight::pack_bf16`]: weights and activations rounded to bf16, sums in
    /// f32; the frozen products ran ~1.8× faster on the development machine). NF4, QLoRA's
    /// storage, stays either way.
    pub fn prepare_for_training(&mut self) -> Result<Option<String>> {
        let dtype = self.facts().weight_dtype;
        if self.precision == Precision::Fast && llama_core::CpuFeatures::get().avx512bf16 {
            self.pack_bf16_for_training(dtype != llama_core::DType::Nf4)?;
            return Ok(Some(
                "training: weights packed as bf16 for AVX512-BF16 products (fast precision)"
                    .to_string(),
            ));
        }
        let embeddings = self.embed_tokens.dtype();
        if dtype != llama_core::DType::Nf4 && dtype != llama_core::DType::F32 {
            self.convert_projections(llama_core::DType::F32)?;
        }
        self.convert_embeddings(llama_core::DType::F32)?;
        let changed = self.facts().weight_dtype != dtype || embeddings != llama_core::DType::F32;
        Ok(changed.then(|| "training: the quantised weights are dequantised to f32".to_string()))
    }

    /// Packs the embeddings (and an untied lm_head), and the projections when `projections`,
    /// as [`Weight::Bf16Panels`].
    fn pack_bf16_for_training(&mut self, projections: bool) -> Result<()> {
        if projections {
            for w in self.layers.iter_mut().flat_map(|l| l.projections_mut()) {
                *w = w.pack_bf16()?;
            }
        }
        self.embed_tokens = self.embed_tokens.pack_bf16()?;
        if let Some(head) = &mut self.lm_head {
            *head = head.pack_bf16()?;
        }
        Ok(())
    }

    /// Stores the embeddings (and an untied lm_head) as `dtype`.
    pub fn convert_embeddings(&mut self, dtype: llama_core::DType) -> Result<()> {
        self.embed_tokens = self.embed_tokens.convert(dtype)?;
        if let Some(head) = &mut self.lm_head {
            *head = head.convert(dtype)?;
        }
        Ok(())
    }

    /// The adapter in use, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// The adapter in use, mutable (the optimizer updates it in place).
    pub fn adapter_mut(&mut self) -> Option<&mut LoraAdapter> {
        self.adapter.as_mut()
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Switches every product to `precision`'s arithmetic.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        let activations = self.activations();
        for layer in &mut self.layers {
            layer.self_attn.activations = activations;
            layer.mlp.activations = activations;
        }
    }

    pub(crate) fn activations(&self) -> Activations {
        match self.precision {
            Precision::Exact => Activations::F32,
            Precision::Fast => Activations::Q8,
        }
    }

    /// The lm_head matrix, [V, C]: the adapter's trained copy when it has one, else the
    /// model's (the embeddings when tied).
    pub fn lm_head(&self) -> &Weight {
        self.adapter
            .as_ref()
            .and_then(|a| a.modules.lm_head.as_ref())
            .or(self.lm_head.as_ref())
            .unwrap_or(&self.embed_tokens)
    }

    /// The model's own lm_head matrix (the embeddings when tied), whatever the adapter trains.
    pub fn base_lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The embedding matrix the forward reads: the adapter's trained copy when it has one.
    pub fn embeddings(&self) -> &Weight {
        self.adapter
            .as_ref()
            .and_then(|a| a.modules.embed_tokens.as_ref())
            .unwrap_or(&self.embed_tokens)
    }

    /// Rotates with `scaling` from now on in every layer (the config says so too).
    pub fn set_rope_scaling(&mut self, scaling: llama_rope::RopeScaling) {
        self.config.rope.scaling = scaling;
        for layer in &mut self.layers {
            layer.self_attn.set_rope(self.config.rope.clone());
        }
    }

    /// Bytes held by the weights.
    pub fn memory_bytes(&self) -> usize {
        let vec_bytes = |v: &[f32]| std::mem::size_of_val(v);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.weights().iter().map(|w| w.memory_bytes()).sum::<usize>()
                    + vec_bytes(&l.input_layernorm)
                    + vec_bytes(&l.post_attention_layernorm)
            })
            .sum();
        layers
            + self.embed_tokens.memory_bytes()
            + vec_bytes(&self.norm)
            + self.lm_head.as_ref().map_or(0, Weight::memory_bytes)
    }

    /// Embeddings of `ids`, [N, C]; an id outside the vocabulary is an error.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let c = self.config.hidden_size;
        let mut h = vec![0f32; ids.len() * c];
        for (row, &id) in h.chunks_exact_mut(c).zip(ids) {
            if id as usize >= self.config.vocab_size {
                return Err(ModelError::input(
                    "input_ids",
                    format!(
                        "token id {id} is outside the vocabulary of {}",
                        self.config.vocab_size
                    ),
                ));
            }
            self.embeddings().row(id as usize, row)?;
        }
        Ok(h)
    }

    /// [`positions`] after checking that they fit the context.
    pub(crate) fn positions(
        &self,
        batch: usize,
        seq: usize,
        start: usize,
        padding: Option<&[usize]>,
    ) -> Result<Vec<u32>> {
        let end = start + seq;
        if end > self.max_seq_length {
            return Err(ModelError::input(
                "input_ids",
                format!(
                    "{end} positions do not fit the context of {} (max_seq_length)",
                    self.max_seq_length
                ),
            ));
        }
        Ok(positions(batch, seq, start, padding))
    }

    /// The batch's sequence length T for `ids` [B, T].
    pub(crate) fn seq_len(&self, ids: &[u32], batch: usize) -> Result<usize> {
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(ModelError::input(
                "input_ids",
                format!(
                    "{} ids do not form {batch} sequences of equal length ≥ 1",
                    ids.len()
                ),
            ));
        }
        Ok(ids.len() / batch)
    }

    /// Training/prefill forward of `ids` [B, T] (causal; keys before `padding[b]` masked):
    /// the hidden states after the final norm, and every layer's when `keep_states`.
    pub fn forward_hidden(
        &mut self,
        ids: &[u32],
        batch: usize,
        padding: Option<&[usize]>,
        keep_states: bool,
    ) -> Result<Hidden> {
        let seq = self.seq_len(ids, batch)?;
        if let Some(p) = padding.filter(|p| p.len() != batch) {
            return Err(ModelError::input(
                "padding",
                format!("{} lengths for {batch} sequences", p.len()),
            ));
        }
        let positions = self.positions(batch, seq, 0, padding)?;
        let mut h = self.embed(ids)?;
        let mut states = Vec::new();
        let eps = self.config.rms_norm_eps;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if keep_states {
                states.push(h.clone());
            }
            let adapter = LayerAdapter {
                lora: self.adapter.as_ref().map(|a| &a.layers[i]),
                dropout: None,
            };
            let input = AttnInput::Sequence {
                padding,
                keep: Keep::Output,
            };
            layer.forward(&mut h, batch, &positions, eps, input, adapter)?;
        }
        let last = self.final_norm(&h)?;
        if keep_states {
            states.push(last.clone());
        }
        Ok(Hidden { last, states })
    }

    pub(crate) fn final_norm(&self, h: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; h.len()];
        let kernel = self.plan.final_norm.kernel();
        rms_norm(kernel, h, &self.norm, self.config.rms_norm_eps, &mut out)?;
        Ok(out)
    }

    /// Logits of normed hidden states [N, C] → [N, V].
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let n = hidden.len() / self.config.hidden_size;
        let mut logits = vec![0f32; n * self.config.vocab_size];
        // f32 activations in either precision (see Precision::Fast).
        let kernel = self.plan.lm_head.kernel();
        linear(
            kernel,
            self.lm_head(),
            hidden,
            &mut logits,
            Activations::F32,
        )?;
        Ok(logits)
    }

    /// Logits of every position of `ids` [B, T]: [B, T, V].
    pub fn forward(&mut self, ids: &[u32], batch: usize) -> Result<Vec<f32>> {
        let hidden = self.forward_hidden(ids, batch, None, false)?;
        self.logits(&hidden.last)
    }

    /// HF's causal-LM loss: logits[:, :-1] against labels[:, 1:], mean over the labels that
    /// are not −100 in the whole batch.
    pub fn loss(&mut self, ids: &[u32], labels: &[i64], batch: usize) -> Result<f32> {
        if labels.len() != ids.len() {
            return Err(ModelError::input(
                "labels",
                format!("{} labels for {} ids", labels.len(), ids.len()),
            ));
        }
        let logits = self.forward(ids, batch)?;
        let targets = shift_labels(labels, ids.len() / batch);
        let kernel = self.plan.cross_entropy.kernel();
        let opts = CrossEntropyOptions::default();
        Ok(cross_entropy(kernel, &logits, &targets, &opts)?.loss)
    }

    /// Empty caches for `batch` sequences, with room for `capacity` positions to start.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<ModelCache> {
        let capacity = capacity.clamp(1, self.max_seq_length);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.self_attn
                    .new_cache(batch, capacity, CACHE_INCREMENT, self.max_seq_length)
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(ModelCache { layers })
    }

    /// Runs `ids` [B, T] — the next T tokens of each sequence — through every layer over the
    /// caches (appending their keys and values), and returns the logits of the last position
    /// of each sequence, [B, V]. With an empty cache this is the prefill; T = 1 is a decode
    /// step (`LlamaModel_fast_forward_inference`).
    pub fn forward_cached(
        &mut self,
        ids: &[u32],
        batch: usize,
        cache: &mut ModelCache,
    ) -> Result<Vec<f32>> {
        let seq = self.seq_len(ids, batch)?;
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::input(
                "cache",
                format!(
                    "{} layer caches for {} layers",
                    cache.layers.len(),
                    self.layers.len()
                ),
            ));
        }
        let padding = cache.padding().map(<[usize]>::to_vec);
        let positions = self.positions(batch, seq, cache.len(), padding.as_deref())?;
        let mut h = self.embed(ids)?;
        let eps = self.config.rms_norm_eps;
        for (i, (layer, layer_cache)) in self.layers.iter_mut().zip(&mut cache.layers).enumerate() {
            let adapter = LayerAdapter {
                lora: self.adapter.as_ref().map(|a| &a.layers[i]),
                dropout: None,
            };
            let input = AttnInput::Cached(layer_cache);
            layer.forward(&mut h, batch, &positions, eps, input, adapter)?;
        }
        let c = self.config.hidden_size;
        let last_rows: Vec<f32> = h
            .chunks_exact(seq * c)
            .flat_map(|s| &s[(seq - 1) * c..])
            .copied()
            .collect();
        self.logits(&self.final_norm(&last_rows)?)
    }
}

/// w's values in f32 plus sign·s·B·A of `pair`.
fn with_delta(w: &Weight, pair: Option<&LoraPair>, sign: f32) -> Result<Vec<f32>> {
    let mut values = w.to_f32()?.into_owned();
    if let Some(pair) = pair {
        values
            .iter_mut()
            .zip(pair.delta_weight())
            .for_each(|(w, d)| *w += sign * d);
    }
    Ok(values)
}

/// labels [B, T] → targets [B, T]: position t is scored against label t + 1, the last position
/// of each sequence against nothing (−100).
pub fn shift_labels(labels: &[i64], seq: usize) -> Vec<i64> {
    labels
        .chunks_exact(seq.max(1))
        .flat_map(|row| row[1..].iter().copied().chain(std::iter::once(-100)))
        .collect()
}

impl crate::generate::Decoder for LlamaModel {
    type Cache = ModelCache;

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    fn new_cache(
        &self,
        batch: usize,
        capacity: usize,
        padding: Option<Vec<usize>>,
    ) -> Result<ModelCache> {
        let mut cache = LlamaModel::new_cache(self, batch, capacity)?;
        if let Some(padding) = padding {
            for layer in &mut cache.layers {
                layer.set_padding(padding.clone())?;
            }
        }
        Ok(cache)
    }

    fn forward_cached(
        &mut self,
        ids: &[u32],
        batch: usize,
        cache: &mut ModelCache,
    ) -> Result<Vec<f32>> {
        LlamaModel::forward_cached(self, ids, batch, cache)
    }

    fn cache_len(cache: &ModelCache) -> usize {
        cache.len()
    }

    fn truncate_cache(cache: &mut ModelCache, len: usize) {
        cache.truncate(len);
    }
}

/// The positions of T new tokens per sequence after `start` cached ones: T ids, or B·T when
/// sequences are left-padded (HF's cumsum(attention_mask) − 1, padding at 1).
pub(crate) fn positions(
    batch: usize,
    seq: usize,
    start: usize,
    padding: Option<&[usize]>,
) -> Vec<u32> {
    match padding {
        None => (start..start + seq).map(|p| p as u32).collect(),
        Some(pads) => (0..batch)
            .flat_map(|b| {
                (start..start + seq).map(move |p| p.checked_sub(pads[b]).map_or(1, |p| p as u32))
            })
            .collect(),
    }
}
