//! Writing a model as a GGUF file, in llama.cpp's names and row order, with its matrices
//! stored as they are or converted to one dtype (F32, Q8_0, Q4_0, Q4_1, …).

use std::collections::BTreeMap;
use std::path::Path;

use llama_core::{bf16, write_atomic, DType, Tensor};
use llama_ops::Weight;
use llama_rope::RopeScaling;

use crate::error::{ModelError, Result};
use crate::gguf::{write_gguf, GgufTensor, GgufValue};
use crate::model::LlamaModel;
use crate::source::{gguf_name, permute_rows};
use crate::tokenizer::Tokenizer;

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
        Weight::Bf16 { data, .. } => data
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        // Values already bf16: rounding them again changes nothing.
        Weight::Bf16Panels { .. } => weight
            .to_f32()?
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
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

/// A weight of the model by its HF name: a matrix (with its head count when llama.cpp permutes
/// its rows) or a norm vector.
enum Named<'a> {
    Matrix(&'a Weight, Option<usize>),
    Vector(&'a [f32]),
}

/// Every weight of `model` with its HF name, in HF's order.
fn named_weights(model: &LlamaModel) -> Vec<(String, Named<'_>)> {
    let c = &model.config;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        Named::Matrix(&model.embed_tokens, None),
    )];
    for (i, layer) in model.layers.iter().enumerate() {
        let name = |part: &str| format!("model.layers.{i}.{part}.weight");
        let a = &layer.self_attn;
        out.push((
            name("input_layernorm"),
            Named::Vector(&layer.input_layernorm),
        ));
        out.push((
            name("post_attention_layernorm"),
            Named::Vector(&layer.post_attention_layernorm),
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
            out.push((name(part), Named::Matrix(w, heads)));
        }
    }
    out.push(("model.norm.weight".to_string(), Named::Vector(&model.norm)));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".to_string(), Named::Matrix(head, None)));
    }
    out
}

/// Writes `model` to `path` as GGUF v3; matrices are converted to `dtype` when given (norms
/// stay F32). Reading the file back gives the same model.
pub fn save_gguf(model: &LlamaModel, path: &Path, dtype: Option<DType>) -> Result<()> {
    let tensors = named_weights(model)
        .into_iter()
        .map(|(name, w)| match w {
            Named::Matrix(w, heads) => stored_matrix(&name, w, dtype, heads),
            Named::Vector(values) => Ok(Stored {
                name: gguf_name(&name).expect("names come from the model's own layers, all mapped"),
                shape: vec![values.len()],
                dtype: DType::F32,
                bytes: f32_bytes(values),
            }),
        })
        .collect::<Result<Vec<_>>>()?;
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

/// Writes `model` as an HF directory: config.json, model.safetensors (every weight
/// dequantised, stored as `dtype`: F32 or BF16) and, when given, the tokenizer's files.
/// Each file goes to a temporary name first and is then renamed.
pub fn save_hf(
    model: &LlamaModel,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
    dtype: DType,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(ModelError::input(
            "dtype",
            format!("{dtype} cannot be written to safetensors here (F32, BF16 can)"),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = named_weights(model)
        .into_iter()
        .map(|(name, w)| {
            let (values, shape) = match w {
                Named::Matrix(w, _) => (w.to_f32()?.into_owned(), vec![w.shape().0, w.shape().1]),
                Named::Vector(v) => (v.to_vec(), vec![v.len()]),
            };
            Ok((name, Tensor::from_vec(values, shape)?.to_dtype(dtype)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::save_safetensors(&refs, &dir.join("model.safetensors"))?;
    let config = serde_json::to_string_pretty(&model.config.to_hf_json(dtype))
        .expect("a JSON value always serialises");
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    if let Some(t) = tokenizer {
        t.save_hf(dir)?;
    }
    Ok(())
}
