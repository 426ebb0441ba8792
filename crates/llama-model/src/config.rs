//! [`LlamaConfig`]: a Llama-family model's sizes and settings, from HF's `config.json` or from a
//! GGUF file's metadata.

use std::path::Path;

use llama_attn::AttentionConfig;
use llama_ops::{GatedAct, Gelu};
use llama_rope::{RopeConfig, RopeScaling};
use serde_json::{json, Value};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// HF architectures (`architectures[0]`) this crate runs.
const ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "LlamaModel"];

/// A Llama model's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `LlamaForCausalLM`, or `llama` for a GGUF file.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub rope: RopeConfig,
    /// The MLP's activation (`hidden_act`): SiLU for Llama.
    pub hidden_act: GatedAct,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (`eos_token_id` may be a list).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Reads `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, "JSON", e.to_string()))?;
        LlamaConfig::from_hf_json(&json)
    }

    /// From a parsed HF `config.json`.
    pub fn from_hf_json(json: &Value) -> Result<LlamaConfig> {
        let architecture = match json.get("architectures").and_then(|a| a.get(0)) {
            Some(Value::String(a)) => a.clone(),
            _ => match json.get("model_type").and_then(Value::as_str) {
                Some("llama") | None => "LlamaForCausalLM".into(),
                Some(other) => other.into(),
            },
        };
        if !ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(architecture));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if json.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(ModelError::config(
                    flag,
                    "biases in the projections are not supported",
                ));
            }
        }
        let attn = AttentionConfig::from_hf_config(json)?;
        let size = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::config(key, "missing or not a non-negative integer"))
        };
        let id = |key: &str| json.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let eos_token_ids = match json.get("eos_token_id") {
            Some(Value::Array(ids)) => ids
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => id("eos_token_id").into_iter().collect(),
        };
        let act = json
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        let config = LlamaConfig {
            architecture,
            vocab_size: size("vocab_size")?,
            hidden_size: attn.hidden_size,
            intermediate_size: size("intermediate_size")?,
            num_hidden_layers: size("num_hidden_layers")?,
            num_attention_heads: attn.num_heads,
            num_key_value_heads: attn.num_kv_heads,
            head_dim: attn.head_dim,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            max_position_embeddings: size("max_position_embeddings")?,
            rope: RopeConfig::from_hf_config(json)?,
            hidden_act: activation(act)?,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: id("bos_token_id"),
            eos_token_ids,
            pad_token_id: id("pad_token_id"),
        };
        config.validate()
    }

    /// From a GGUF file's metadata (`general.architecture` must be `llama`); `tied` says whether
    /// the file lacks `output.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
        let arch = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                ModelError::config("general.architecture", "missing from the GGUF file")
            })?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.into()));
        }
        let key = |k: &str| format!("llama.{k}");
        let get = |k: &str| file.get(&key(k));
        let size = |k: &str| -> Result<usize> {
            get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::config(key(k), "missing or not an integer"))
        };
        let hidden = size("embedding_length")?;
        let heads = size("attention.head_count")?;
        let kv_heads = get("attention.head_count_kv")
            .and_then(|v| v.as_u64())
            .map_or(heads, |v| v as usize);
        let head_dim = match get("attention.key_length").and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None => hidden / heads.max(1),
        };
        let attn = AttentionConfig::new(hidden, heads, kv_heads, head_dim)?;
        let context = size("context_length")?;
        let vocab_size = match get("vocab_size").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(<[_]>::len)
                .ok_or_else(|| {
                    ModelError::config(key("vocab_size"), "missing, and no token list")
                })?,
        };
        let theta = get("rope.freq_base")
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0);
        let mut rope = RopeConfig::new(theta, head_dim, context)?;
        let scaling = |k: &str| get(&format!("rope.scaling.{k}")).and_then(|v| v.as_f64());
        let factor = scaling("factor").unwrap_or(1.0);
        rope.scaling = match get("rope.scaling.type").and_then(|v| v.as_str()) {
            Some("linear") => RopeScaling::Linear { factor },
            // Written by fastllama's exporter (llama.cpp keeps llama3 factors in a tensor).
            Some("llama3") => RopeScaling::Llama3 {
                factor,
                low_freq_factor: scaling("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: scaling("high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: scaling("original_context_length")
                    .map_or(context, |v| v as usize),
            },
            _ => RopeScaling::Default,
        };
        let token = |k: &str| {
            file.get(&format!("tokenizer.ggml.{k}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
        };
        let config = LlamaConfig {
            architecture: "llama".into(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: size("feed_forward_length")?,
            num_hidden_layers: size("block_count")?,
            num_attention_heads: attn.num_heads,
            num_key_value_heads: attn.num_kv_heads,
            head_dim,
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5) as f32,
            max_position_embeddings: context,
            rope,
            hidden_act: GatedAct::Silu,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            bos_token_id: token("bos_token_id"),
            eos_token_ids: token("eos_token_id").into_iter().collect(),
            pad_token_id: token("padding_token_id"),
        };
        config.validate()
    }

    /// The sizes LoRA matrices take their shapes from.
    pub fn lora_dims(&self) -> llama_peft::ModelDims {
        llama_peft::ModelDims {
            num_layers: self.num_hidden_layers,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            q_width: self.num_attention_heads * self.head_dim,
            kv_width: self.num_key_value_heads * self.head_dim,
            vocab: self.vocab_size,
        }
    }

    /// HF's config.json for this model (`torch_dtype` as given), readable by
    /// [`LlamaConfig::from_hf_json`] and by transformers.
    pub fn to_hf_json(&self, dtype: llama_core::DType) -> Value {
        let act = match self.hidden_act {
            GatedAct::Silu => "silu",
            GatedAct::Gelu(Gelu::Exact) => "gelu",
            GatedAct::Gelu(Gelu::Tanh) => "gelu_pytorch_tanh",
        };
        let rope_scaling = match &self.rope.scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                json!({"rope_type": self.rope.scaling.rope_type(), "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            other => json!({"rope_type": other.rope_type()}),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope.theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": match dtype { llama_core::DType::BF16 => "bfloat16", _ => "float32" },
        })
    }

    /// The attention layers' sizes.
    /// The attention layers' sizes (an error when the heads do not fit together: the fields
    /// are public, so a config may have been changed since it was read).
    pub fn attention(&self) -> Result<AttentionConfig> {
        Ok(AttentionConfig::new(
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )?)
    }

    /// Parameters in the weights (embeddings counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let (c, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = c * (q + 2 * kv) + q * c + 3 * c * f + 2 * c;
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + self.num_hidden_layers * layer + c + head
    }

    fn validate(self) -> Result<LlamaConfig> {
        self.attention()?;
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(ModelError::config(field, "must be at least 1"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(ModelError::config(
                "rms_norm_eps",
                format!("{} is not a positive number", self.rms_norm_eps),
            ));
        }
        Ok(self)
    }
}

/// The gated MLP activation named by HF's `hidden_act`.
fn activation(name: &str) -> Result<GatedAct> {
    Ok(match name {
        "silu" | "swish" => GatedAct::Silu,
        "gelu" => GatedAct::Gelu(Gelu::Exact),
        "gelu_pytorch_tanh" | "gelu_new" => GatedAct::Gelu(Gelu::Tanh),
        other => {
            return Err(ModelError::config(
                "hidden_act",
                format!("{other:?} is not supported (silu, gelu, gelu_pytorch_tanh are)"),
            ))
        }
    })
}

/// Shapes of well-known Llama models, for benchmarks and experiments with random weights
/// (their real weights cannot be fetched here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelShape {
    /// SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152.
    Smollm2_135m,
    /// Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256.
    Llama32_1b,
    /// Llama-3-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256.
    Llama3_8b,
}

impl ModelShape {
    /// The model's name.
    pub fn name(self) -> &'static str {
        match self {
            ModelShape::Smollm2_135m => "SmolLM2-135M",
            ModelShape::Llama32_1b => "Llama-3.2-1B",
            ModelShape::Llama3_8b => "Llama-3-8B",
        }
    }

    /// The config of the shape (context 8,192, no RoPE scaling).
    pub fn config(self) -> Result<LlamaConfig> {
        let (hidden, layers, heads, kv_heads, inter, vocab, theta, tied) = match self {
            ModelShape::Smollm2_135m => (576, 30, 9, 3, 1536, 49152, 100000.0, true),
            ModelShape::Llama32_1b => (2048, 16, 32, 8, 8192, 128256, 500000.0, true),
            ModelShape::Llama3_8b => (4096, 32, 32, 8, 14336, 128256, 500000.0, false),
        };
        LlamaConfig::from_hf_json(&json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": inter,
            "vocab_size": vocab, "max_position_embeddings": 8192, "rope_theta": theta,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
        }))
    }
}
