//! Writing a model as a GGUF file, in llama.cpp's names and row order, with its matrices
//! stored as they are or converted to one dtype (F32, Q8_0, Q4_0, Q4_1, …).

use std::collections::BTreeMap;
use std::path::Path;

use llama_core::DType;
use llama_ops::Weight;
use llama_rope::RopeScaling;

use crate::error::Result;
use crate::gguf::{write_gguf, GgufTensor, GgufValue};
use crate::model::LlamaModel;
use crate::source::{gguf_name, permute_rows};

/// The `llama.*` and special-token metadata of `model`'s config.
fn metadata(model: &LlamaModel) -> BTreeMap<String, GgufValue> {
    let c = &model.config;
    let u32_of = |v: usize| GgufValue::U32(v as u32);
    let mut m: BTreeMap<String, GgufValue> = [
        ("general.architecture", GgufValue::String("llama".into())),
        ("llama.block_count", u32_of(c.num_hidden_layers)),
        ("llama.context_length", u32_of(c.max_position_embeddings)),
        ("llama.embedding_length", u32_of(c.hidden_size)),
        ("llama.feed_forward_length", u32_of(c.intermediate_size)),
        ("llama.attention.head_count", u32_of(c.num_attention_heads)),
        (
            "llama.attention.head_count_kv",
            u32_of(c.num_key_value_heads),
        ),
        ("llama.attention.key_length", u32_of(c.head_dim)),
        ("llama.attention.value_length", u32_of(c.head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(c.rms_norm_eps),
        ),
        ("llama.rope.freq_base", GgufValue::F32(c.rope.theta as f32)),
        ("llama.rope.dimension_count", u32_of(c.rope.rotary_dim)),
        ("llama.vocab_size", u32_of(c.vocab_size)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut put = |k: &str, v: GgufValue| {
        m.insert(k.to_string(), v);
    };
    match &c.rope.scaling {
        RopeScaling::Linear { factor } => {
            put(
                "llama.rope.scaling.type",
                GgufValue::String("linear".into()),
            );
            put("llama.rope.scaling.factor", GgufValue::F32(*factor as f32));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            put(
                "llama.rope.scaling.type",
                GgufValue::String("llama3".into()),
            );
            put("llama.rope.scaling.factor", GgufValue::F32(*factor as f32));
            put(
                "llama.rope.scaling.low_freq_factor",
                GgufValue::F32(*low_freq_factor as f32),
            );
            put(
                "llama.rope.scaling.high_freq_factor",
                GgufValue::F32(*high_freq_factor as f32),
            );
            put(
                "llama.rope.scaling.original_context_length",
                u32_of(*original_max_position_embeddings),
            );
        }
        _ => {}
    }
    for (key, id) in [
        ("bos_token_id", c.bos_token_id),
        ("eos_token_id", c.eos_token_ids.first().copied()),
        ("padding_token_id", c.pad_token_id),
    ] {
        if let Some(id) = id {
            put(&format!("tokenizer.ggml.{key}"), GgufValue::U32(id));
        }
    }
    m
}

/// One tensor's bytes as GGUF stores them.
struct Stored {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    bytes: Vec<u8>,
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A matrix converted to `dtype` (when given), q/k rows permuted into llama.cpp's order.
fn stored_matrix(
    hf_name: &str,
    weight: &Weight,
    dtype: Option<DType>,
    heads: Option<usize>,
) -> Result<Stored> {
    let weight = match dtype {
        Some(d) => weight.convert(d)?,
        None => weight.clone(),
    };
    let (rows, cols) = weight.shape();
    let bytes = match &weight {
        Weight::Dense { data, .. } => f32_bytes(data),
        Weight::Quant { bytes, .. } => bytes.clone(),
    };
    let bytes = match heads {
        Some(h) => permute_rows(&bytes, rows, h, bytes.len() / rows.max(1), false),
        None => bytes,
    };
    Ok(Stored {
        name: gguf_name(hf_name).expect("names come from the model's own layers, all mapped"),
        shape: vec![rows, cols],
        dtype: weight.dtype(),
        bytes,
    })
}

/// Writes `model` to `path` as GGUF v3; matrices are converted to `dtype` when given (norms
/// stay F32). Reading the file back gives the same model.
pub fn save_gguf(model: &LlamaModel, path: &Path, dtype: Option<DType>) -> Result<()> {
    let c = &model.config;
    let vector = |hf_name: &str, values: &[f32]| Stored {
        name: gguf_name(hf_name).expect("names come from the model's own layers, all mapped"),
        shape: vec![values.len()],
        dtype: DType::F32,
        bytes: f32_bytes(values),
    };
    let mut tensors = vec![stored_matrix(
        "model.embed_tokens.weight",
        &model.embed_tokens,
        dtype,
        None,
    )?];
    for (i, layer) in model.layers.iter().enumerate() {
        let name = |part: &str| format!("model.layers.{i}.{part}.weight");
        let a = &layer.self_attn;
        tensors.push(vector(&name("input_layernorm"), &layer.input_layernorm));
        tensors.push(vector(
            &name("post_attention_layernorm"),
            &layer.post_attention_layernorm,
        ));
        for (part, w, heads) in [
            ("self_attn.q_proj", &a.q_proj, Some(c.num_attention_heads)),
            ("self_attn.k_proj", &a.k_proj, Some(c.num_key_value_heads)),
            ("self_attn.v_proj", &a.v_proj, None),
            ("self_attn.o_proj", &a.o_proj, None),
            ("mlp.gate_proj", &layer.mlp.gate_proj, None),
            ("mlp.up_proj", &layer.mlp.up_proj, None),
            ("mlp.down_proj", &layer.mlp.down_proj, None),
        ] {
            tensors.push(stored_matrix(&name(part), w, dtype, heads)?);
        }
    }
    tensors.push(vector("model.norm.weight", &model.norm));
    if let Some(head) = &model.lm_head {
        tensors.push(stored_matrix("lm_head.weight", head, dtype, None)?);
    }
    let views: Vec<GgufTensor> = tensors
        .iter()
        .map(|t| GgufTensor {
            name: &t.name,
            shape: &t.shape,
            dtype: t.dtype,
            bytes: &t.bytes,
        })
        .collect();
    write_gguf(path, &metadata(model), &views)
}
