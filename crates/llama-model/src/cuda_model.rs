//! The model on one CUDA device, in bf16: weights dequantised from whatever the file holds and
//! rounded to bf16, activations in bf16 between kernels, f32 inside them (cuBLAS GemmEx with f32
//! compute, f32 norms and softmax) — the numerics of HF transformers running in bf16.
//! The same layer order as [`crate::LlamaModel`]; per layer:
//!   h += attn(rms_norm(h))                  CudaLlamaAttention (cuBLAS, RoPE, flash kernels)
//!   h += down(silu(gate(n)) ⊙ up(n)),  n = rms_norm(h)
//! Token embeddings are looked up on the device (a row gather from the bf16 table, which is the
//! lm_head's matrix when the two are tied; a trainer moves an untied one to mapped host memory,
//! which the gather reads in place).

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use llama_attn::cuda::CudaKvCache;
use llama_attn::CudaLlamaAttention;
use llama_core::bf16;
use llama_core::cuda::{CudaDevice, HostTable};
use llama_ops::cuda::{
    add_in_place, fill_uniform, gated_forward_in_place, gather_rows, linear, rms_norm, RowTable,
};
use llama_ops::Weight;
use llama_peft::Target;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::generate::Decoder;
use crate::model::{positions, LlamaModel};

/// One decoder layer's device weights.
pub(crate) struct CudaLayer {
    pub(crate) input_layernorm: CudaSlice<bf16>,
    pub(crate) self_attn: CudaLlamaAttention<bf16>,
    pub(crate) post_attention_layernorm: CudaSlice<bf16>,
    pub(crate) gate_proj: CudaSlice<bf16>,
    pub(crate) up_proj: CudaSlice<bf16>,
    pub(crate) down_proj: CudaSlice<bf16>,
}

/// The activations of one forward over `rows` = B·T tokens, kept from one decode step to the
/// next so that a step allocates nothing.
struct Buffers {
    rows: usize,
    batch: usize,
    /// The residual stream h [N, C].
    h: CudaSlice<bf16>,
    normed: CudaSlice<bf16>,
    /// The attention's and then the MLP's output [N, C], added into h.
    delta: CudaSlice<bf16>,
    gate: CudaSlice<bf16>,
    up: CudaSlice<bf16>,
    /// Each sequence's last row [B, C], normed, and its logits [B, V].
    last: CudaSlice<bf16>,
    last_normed: CudaSlice<bf16>,
    logits: CudaSlice<bf16>,
}

impl Buffers {
    fn new(
        device: &CudaDevice,
        config: &LlamaConfig,
        batch: usize,
        rows: usize,
    ) -> Result<Buffers> {
        let (c, f, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        Ok(Buffers {
            rows,
            batch,
            h: device.zeros(rows * c)?,
            normed: device.zeros(rows * c)?,
            delta: device.zeros(rows * c)?,
            gate: device.zeros(rows * f)?,
            up: device.zeros(rows * f)?,
            last: device.zeros(batch * c)?,
            last_normed: device.zeros(batch * c)?,
            logits: device.zeros(batch * v)?,
        })
    }
}

/// Per-layer device KV caches.
pub struct CudaModelCache {
    layers: Vec<CudaKvCache<bf16>>,
}

impl CudaModelCache {
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device bytes of keys and values.
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(CudaKvCache::memory_bytes).sum()
    }

    /// Forgets positions from `len` on (keeps the memory).
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|c| c.truncate(len));
    }
}

/// A Llama model on a CUDA device.
pub struct CudaLlamaModel {
    pub config: LlamaConfig,
    pub(crate) device: Arc<CudaDevice>,
    /// Token embeddings [V, C].
    embed_tokens: Embeddings,
    pub(crate) layers: Vec<CudaLayer>,
    pub(crate) norm: CudaSlice<bf16>,
    /// [V, C] (a copy of the embeddings when tied).
    pub(crate) lm_head: CudaSlice<bf16>,
    pub max_seq_length: usize,
    /// Activations reused while the token count stays the same.
    buffers: Option<Buffers>,
}

/// Where a model's token embeddings live.
enum Embeddings {
    /// They are the lm_head's matrix (tied).
    Tied,
    /// A [V, C] table of their own in device memory.
    Device(CudaSlice<bf16>),
    /// A [V, C] table of their own in mapped pinned host memory, which the lookup kernel reads
    /// in place ([`CudaLlamaModel::embeddings_to_host`]).
    Host(HostTable<bf16>),
}

/// The KV cache grows by this many positions at a time.
const CACHE_INCREMENT: usize = 256;

pub(crate) fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

impl CudaLlamaModel {
    /// Copies `model`'s weights to `device` in bf16, its LoRA adapter (if any) merged into
    /// the copies and its trained modules in place of the base's; `model` is unchanged.
    pub fn upload(device: &Arc<CudaDevice>, model: &LlamaModel) -> Result<CudaLlamaModel> {
        CudaLlamaModel::upload_with(device, model, true)
    }

    /// Copies `model`'s base weights to `device` in bf16, without its adapter (the frozen
    /// model a [`crate::CudaTrainer`] trains the adapter beside).
    pub fn upload_base(device: &Arc<CudaDevice>, model: &LlamaModel) -> Result<CudaLlamaModel> {
        CudaLlamaModel::upload_with(device, model, false)
    }

    fn upload_with(
        device: &Arc<CudaDevice>,
        model: &LlamaModel,
        merged: bool,
    ) -> Result<CudaLlamaModel> {
        let up_vec = |v: &[f32]| -> Result<CudaSlice<bf16>> { Ok(device.htod(&to_bf16(v))?) };
        let up = |w: &Weight| -> Result<CudaSlice<bf16>> { up_vec(&w.to_f32()?) };
        let layers = model
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let [q, k, v, o, gate, up, down] = Target::ALL
                    .map(|t| model.projection_f32(i, t, merged).and_then(|w| up_vec(&w)));
                let attn = &l.self_attn;
                Ok(CudaLayer {
                    input_layernorm: up_vec(&l.input_layernorm)?,
                    self_attn: CudaLlamaAttention::from_device(
                        device,
                        attn.config,
                        [q?, k?, v?, o?],
                        attn.rope_config().clone(),
                    )?,
                    post_attention_layernorm: up_vec(&l.post_attention_layernorm)?,
                    gate_proj: gate?,
                    up_proj: up?,
                    down_proj: down?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (embeddings, head) = if merged {
            (model.embeddings(), model.lm_head())
        } else {
            (&model.embed_tokens, model.base_lm_head())
        };
        let embed_tokens = if std::ptr::eq(embeddings, head) {
            Embeddings::Tied
        } else {
            Embeddings::Device(up(embeddings)?)
        };
        Ok(CudaLlamaModel {
            config: model.config.clone(),
            device: device.clone(),
            embed_tokens,
            layers,
            norm: up_vec(&model.norm)?,
            lm_head: up(head)?,
            max_seq_length: model.max_seq_length,
            buffers: None,
        })
    }

    /// A model of `config`'s shape with uniform random weights made on the device (for
    /// benchmarks of shapes whose weights are not at hand): scale 1/√fan-in, norms 1.
    pub fn random(
        device: &Arc<CudaDevice>,
        config: &LlamaConfig,
        seed: u64,
    ) -> Result<CudaLlamaModel> {
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
        let mut next_seed = seed;
        let mut random = |rows: usize, cols: usize| -> Result<CudaSlice<bf16>> {
            let mut w = device.zeros::<bf16>(rows * cols)?;
            next_seed = next_seed.wrapping_add(1);
            fill_uniform(device, &mut w, next_seed, 1.0 / (cols as f32).sqrt())?;
            Ok(w)
        };
        let ones = |n: usize| -> Result<CudaSlice<bf16>> { Ok(device.htod(&vec![bf16::ONE; n])?) };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let weights = [random(q, c)?, random(kv, c)?, random(kv, c)?, random(c, q)?];
            layers.push(CudaLayer {
                input_layernorm: ones(c)?,
                self_attn: CudaLlamaAttention::from_device(
                    device,
                    attn,
                    weights,
                    config.rope.clone(),
                )?,
                post_attention_layernorm: ones(c)?,
                gate_proj: random(f, c)?,
                up_proj: random(f, c)?,
                down_proj: random(c, f)?,
            });
        }
        let embed_tokens = if config.tie_word_embeddings {
            Embeddings::Tied
        } else {
            Embeddings::Device(random(v, c)?)
        };
        Ok(CudaLlamaModel {
            config: config.clone(),
            device: device.clone(),
            embed_tokens,
            lm_head: random(v, c)?,
            layers,
            norm: ones(c)?,
            max_seq_length: config.max_position_embeddings,
            buffers: None,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// One layer over the residual stream in `b`: h += attn(norm(h)); h += mlp(norm(h)).
    fn layer(
        &self,
        layer: &mut CudaLayer,
        b: &mut Buffers,
        positions: &[u32],
        cache: &mut CudaKvCache<bf16>,
    ) -> Result<()> {
        let cfg = &self.config;
        let (c, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let d = &self.device;
        rms_norm(d, &b.h, &layer.input_layernorm, eps, &mut b.normed)?;
        layer
            .self_attn
            .forward_cached_into(&b.normed, b.batch, positions, cache, &mut b.delta)?;
        add_in_place(d, &mut b.h, &b.delta)?;
        rms_norm(d, &b.h, &layer.post_attention_layernorm, eps, &mut b.normed)?;
        linear(d, &b.normed, &layer.gate_proj, c, &mut b.gate)?;
        linear(d, &b.normed, &layer.up_proj, c, &mut b.up)?;
        gated_forward_in_place(d, cfg.hidden_act, &mut b.gate, &b.up)?;
        linear(d, &b.gate, &layer.down_proj, f, &mut b.delta)?;
        add_in_place(d, &mut b.h, &b.delta)?;
        Ok(())
    }

    /// The embeddings of `ids` into h [N, C], from `table` (a trained copy, [V, C]) or the
    /// model's own.
    pub(crate) fn embed_into(
        &self,
        table: Option<&CudaSlice<bf16>>,
        ids: &[u32],
        h: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::input(
                "input_ids",
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        let table: RowTable<bf16> = match (table, &self.embed_tokens) {
            (Some(trained), _) => trained.into(),
            (None, Embeddings::Tied) => (&self.lm_head).into(),
            (None, Embeddings::Device(own)) => own.into(),
            (None, Embeddings::Host(own)) => own.into(),
        };
        gather_rows(&self.device, table, self.config.hidden_size, ids, h)?;
        Ok(())
    }

    /// Moves an untied embedding table from device memory to mapped pinned host memory, which
    /// the lookup reads in place over the bus: training looks up N rows a step, so this frees
    /// [V, C] of device memory (1 GiB at Llama-3-8B) for an [N, C] read (32 MiB at 2 × 2048
    /// tokens). A tied table is the lm_head's and stays.
    pub fn embeddings_to_host(&mut self) -> Result<()> {
        if let Embeddings::Device(table) = &self.embed_tokens {
            let values = self.device.dtoh(table)?;
            self.embed_tokens = Embeddings::Host(HostTable::new(&self.device, &values)?);
        }
        Ok(())
    }

    /// Bytes of pinned host memory the embedding table takes (0 unless moved there).
    pub fn embeddings_host_bytes(&self) -> usize {
        match &self.embed_tokens {
            Embeddings::Host(table) => table.host_bytes(),
            _ => 0,
        }
    }

    /// The logits [B, V] of each sequence's last row of h, on the host in f32.
    fn head(&self, b: &mut Buffers, seq: usize) -> Result<Vec<f32>> {
        let c = self.config.hidden_size;
        for s in 0..b.batch {
            let row = (s * seq + seq - 1) * c;
            self.device
                .stream()
                .memcpy_dtod(
                    &b.h.slice(row..row + c),
                    &mut b.last.slice_mut(s * c..(s + 1) * c),
                )
                .map_err(|e| llama_core::Error::cuda("memcpy_dtod", e))?;
        }
        let eps = self.config.rms_norm_eps;
        rms_norm(&self.device, &b.last, &self.norm, eps, &mut b.last_normed)?;
        linear(
            &self.device,
            &b.last_normed,
            &self.lm_head,
            c,
            &mut b.logits,
        )?;
        Ok(self
            .device
            .dtoh(&b.logits)?
            .iter()
            .map(|v| v.to_f32())
            .collect())
    }
}

impl Decoder for CudaLlamaModel {
    type Cache = CudaModelCache;

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
    ) -> Result<CudaModelCache> {
        let attn = self.config.attention()?;
        let capacity = capacity.clamp(1, self.max_seq_length);
        let layers = (0..self.layers.len())
            .map(|_| {
                let mut cache = CudaKvCache::new(
                    &self.device,
                    batch,
                    attn.num_kv_heads,
                    attn.head_dim,
                    capacity,
                    CACHE_INCREMENT,
                    self.max_seq_length,
                )?;
                if let Some(p) = &padding {
                    cache.set_padding(p.clone())?;
                }
                Ok(cache)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaModelCache { layers })
    }

    fn forward_cached(
        &mut self,
        ids: &[u32],
        batch: usize,
        cache: &mut CudaModelCache,
    ) -> Result<Vec<f32>> {
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(ModelError::input(
                "input_ids",
                format!("{} ids do not form {batch} sequences", ids.len()),
            ));
        }
        let seq = ids.len() / batch;
        let start = cache.len();
        if start + seq > self.max_seq_length {
            return Err(ModelError::input(
                "input_ids",
                format!(
                    "{} positions do not fit the context of {} (max_seq_length)",
                    start + seq,
                    self.max_seq_length
                ),
            ));
        }
        let positions = positions(
            batch,
            seq,
            start,
            cache.layers.first().and_then(|c| c.padding()),
        );
        let mut b = match self.buffers.take() {
            Some(b) if b.rows == ids.len() && b.batch == batch => b,
            _ => Buffers::new(&self.device, &self.config, batch, ids.len())?,
        };
        let mut layers = std::mem::take(&mut self.layers);
        let result = (|| {
            self.embed_into(None, ids, &mut b.h)?;
            for (layer, layer_cache) in layers.iter_mut().zip(&mut cache.layers) {
                self.layer(layer, &mut b, &positions, layer_cache)?;
            }
            self.head(&mut b, seq)
        })();
        self.layers = layers;
        self.buffers = Some(b);
        result
    }

    fn cache_len(cache: &CudaModelCache) -> usize {
        cache.len()
    }

    fn truncate_cache(cache: &mut CudaModelCache, len: usize) {
        cache.truncate(len);
    }
}
