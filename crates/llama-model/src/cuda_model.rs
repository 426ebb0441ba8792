//! The model on one CUDA device, in bf16: weights dequantised from whatever the file holds and
//! rounded to bf16, activations in bf16 between kernels, f32 inside them (cuBLAS GemmEx with f32
//! compute, f32 norms and softmax) — the numerics of HF transformers running in bf16.
//! The same layer order as [`crate::LlamaModel`]; per layer:
//!   h += attn(rms_norm(h))                  CudaLlamaAttention (cuBLAS, RoPE, flash kernels)
//!   h += down(silu(gate(n)) ⊙ up(n)),  n = rms_norm(h)
//! Token embeddings are looked up on the host (one row per token) and uploaded.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use llama_attn::cuda::CudaKvCache;
use llama_attn::{AttentionConfig, CudaLlamaAttention};
use llama_core::bf16;
use llama_core::cuda::CudaDevice;
use llama_ops::cuda::{add_in_place, fill_uniform, gated_forward_in_place, linear, rms_norm};
use llama_ops::{GatedAct, Weight};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::generate::Decoder;
use crate::model::{positions, LlamaModel};

/// One decoder layer's device weights.
struct CudaLayer {
    input_layernorm: CudaSlice<bf16>,
    self_attn: CudaLlamaAttention<bf16>,
    post_attention_layernorm: CudaSlice<bf16>,
    gate_proj: CudaSlice<bf16>,
    up_proj: CudaSlice<bf16>,
    down_proj: CudaSlice<bf16>,
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
}

/// A Llama model on a CUDA device.
pub struct CudaLlamaModel {
    pub config: LlamaConfig,
    device: Arc<CudaDevice>,
    /// Token embeddings stay on the host for the lookup: [V, C].
    embed_tokens: Weight,
    layers: Vec<CudaLayer>,
    norm: CudaSlice<bf16>,
    /// [V, C] (a copy of the embeddings when tied).
    lm_head: CudaSlice<bf16>,
    pub max_seq_length: usize,
}

/// The KV cache grows by this many positions at a time.
const CACHE_INCREMENT: usize = 256;

fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

impl CudaLlamaModel {
    /// Copies `model`'s weights to `device` in bf16.
    pub fn upload(device: &Arc<CudaDevice>, model: &LlamaModel) -> Result<CudaLlamaModel> {
        let up_vec = |v: &[f32]| -> Result<CudaSlice<bf16>> { Ok(device.htod(&to_bf16(v))?) };
        let up = |w: &Weight| -> Result<CudaSlice<bf16>> { up_vec(&w.to_f32()?) };
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(CudaLayer {
                    input_layernorm: up_vec(&l.input_layernorm)?,
                    self_attn: CudaLlamaAttention::upload(device, &l.self_attn)?,
                    post_attention_layernorm: up_vec(&l.post_attention_layernorm)?,
                    gate_proj: up(&l.mlp.gate_proj)?,
                    up_proj: up(&l.mlp.up_proj)?,
                    down_proj: up(&l.mlp.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaLlamaModel {
            config: model.config.clone(),
            device: device.clone(),
            embed_tokens: model.embed_tokens.clone(),
            layers,
            norm: up_vec(&model.norm)?,
            lm_head: up(model.lm_head())?,
            max_seq_length: model.max_seq_length,
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
        let attn = config.attention();
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
        // Embeddings on the host: small random rows from a hash, like the device fill.
        let mut rng = crate::generate::Rng::new(seed);
        let embed: Vec<f32> = (0..v * c)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 0.1)
            .collect();
        Ok(CudaLlamaModel {
            config: config.clone(),
            device: device.clone(),
            embed_tokens: Weight::dense(embed, v, c)?,
            lm_head: random(v, c)?,
            layers,
            norm: ones(c)?,
            max_seq_length: config.max_position_embeddings,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// Device bytes of the weights (the host embeddings not counted).
    pub fn memory_bytes(&self) -> usize {
        let size = |s: &CudaSlice<bf16>| s.len() * 2;
        let attn = self.config.attention();
        let attn_elems =
            2 * attn.hidden_size * (attn.num_heads + attn.num_kv_heads) * attn.head_dim;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                size(&l.input_layernorm)
                    + size(&l.post_attention_layernorm)
                    + size(&l.gate_proj)
                    + size(&l.up_proj)
                    + size(&l.down_proj)
                    + attn_elems * 2
            })
            .sum();
        layers + size(&self.norm) + size(&self.lm_head)
    }

    fn attention(&self) -> AttentionConfig {
        self.config.attention()
    }

    /// y [N, C] = rms_norm(x) into a new buffer.
    fn normed(&self, x: &CudaSlice<bf16>, weight: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
        let mut y = self.device.zeros::<bf16>(x.len())?;
        rms_norm(&self.device, x, weight, self.config.rms_norm_eps, &mut y)?;
        Ok(y)
    }

    /// The MLP of one layer on normed input n [N, C].
    fn mlp(&self, layer: &CudaLayer, n: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
        let (c, f) = (self.config.hidden_size, self.config.intermediate_size);
        let rows = n.len() / c;
        let mut gate = self.device.zeros::<bf16>(rows * f)?;
        let mut up = self.device.zeros::<bf16>(rows * f)?;
        linear(&self.device, n, &layer.gate_proj, c, &mut gate)?;
        linear(&self.device, n, &layer.up_proj, c, &mut up)?;
        let act: GatedAct = self.config.hidden_act;
        gated_forward_in_place(&self.device, act, &mut gate, &up)?;
        let mut out = self.device.zeros::<bf16>(rows * c)?;
        linear(&self.device, &gate, &layer.down_proj, f, &mut out)?;
        Ok(out)
    }

    /// The embeddings of `ids` on the device, [N, C].
    fn embed(&self, ids: &[u32]) -> Result<CudaSlice<bf16>> {
        let c = self.config.hidden_size;
        let mut rows = vec![0f32; ids.len() * c];
        for (row, &id) in rows.chunks_exact_mut(c).zip(ids) {
            if id as usize >= self.config.vocab_size {
                return Err(ModelError::input(
                    "input_ids",
                    format!(
                        "token id {id} is outside the vocabulary of {}",
                        self.config.vocab_size
                    ),
                ));
            }
            self.embed_tokens.row(id as usize, row)?;
        }
        Ok(self.device.htod(&to_bf16(&rows))?)
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
        let attn = self.attention();
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
        if batch == 0 || ids.is_empty() || ids.len() % batch != 0 {
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
        let mut h = self.embed(ids)?;
        let mut layers = std::mem::take(&mut self.layers);
        let result = (|| {
            for (layer, layer_cache) in layers.iter_mut().zip(&mut cache.layers) {
                let n = self.normed(&h, &layer.input_layernorm)?;
                let attn = layer
                    .self_attn
                    .forward_cached(&n, batch, &positions, layer_cache)?;
                add_in_place(&self.device, &mut h, &attn)?;
                let n = self.normed(&h, &layer.post_attention_layernorm)?;
                add_in_place(&self.device, &mut h, &self.mlp(layer, &n)?)?;
            }
            Ok::<_, ModelError>(())
        })();
        self.layers = layers;
        result?;
        // The last position of each sequence, normed, through lm_head.
        let c = self.config.hidden_size;
        let mut last = self.device.zeros::<bf16>(batch * c)?;
        for b in 0..batch {
            let row = (b * seq + seq - 1) * c;
            self.device
                .stream()
                .memcpy_dtod(
                    &h.slice(row..row + c),
                    &mut last.slice_mut(b * c..(b + 1) * c),
                )
                .map_err(|e| llama_core::Error::cuda("memcpy_dtod", e))?;
        }
        let last = self.normed(&last, &self.norm)?;
        let mut logits = self.device.zeros::<bf16>(batch * self.config.vocab_size)?;
        linear(&self.device, &last, &self.lm_head, c, &mut logits)?;
        Ok(self
            .device
            .dtoh(&logits)?
            .iter()
            .map(|v| v.to_f32())
            .collect())
    }
}
