//! Where weights come from: HF safetensors directories (one file or shards listed by
//! `model.safetensors.index.json`) and GGUF files. Both answer by HF tensor name
//! (`model.layers.0.self_attn.q_proj.weight`) with shapes checked; dense tensors arrive as f32,
//! quantised GGUF tensors stay quantised.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llama_core::{bf16, f16, DType};
use llama_ops::Weight;
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufTensorInfo};
use crate::mmap::map_file;

/// A set of named weights.
pub(crate) trait TensorSource {
    /// Names the files, for error messages.
    fn describe(&self) -> String;
    /// The [rows, cols] matrix `name`.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight>;
    /// The vector `name` of `len` values, in f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>>;
}

fn missing(name: &str, source: &dyn TensorSource) -> ModelError {
    ModelError::MissingTensor {
        name: name.into(),
        source_desc: source.describe(),
    }
}

fn mismatch(name: &str, expected: &[usize], found: &[usize]) -> ModelError {
    ModelError::TensorMismatch {
        name: name.into(),
        expected: format!("shape {expected:?}"),
        found: format!("shape {found:?}"),
    }
}

/// One mapped safetensors file with its parsed header.
struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// The safetensors files of an HF model directory.
pub(crate) struct SafetensorsSource {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<SafetensorsSource> {
        let index_path = dir.join("model.safetensors.index.json");
        let names = if index_path.exists() {
            shard_names(&index_path)?
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::with_capacity(names.len());
        let mut index = HashMap::new();
        for name in names {
            let path = dir.join(&name);
            let map = map_file(&path)?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::format(&path, "safetensors", e.to_string()))?;
            for tensor in metadata.tensors().keys() {
                index.insert(tensor.clone(), files.len());
            }
            files.push(SafetensorsFile {
                path,
                map,
                header_len,
                metadata,
            });
        }
        Ok(SafetensorsSource {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    /// The f32 values and shape of `name`.
    fn read(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let file = self
            .index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| missing(name, self))?;
        let info = file
            .metadata
            .info(name)
            .ok_or_else(|| missing(name, self))?;
        let (start, end) = info.data_offsets;
        let base = 8 + file.header_len;
        let bytes = &file.map[base + start..base + end];
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::TensorMismatch {
                    name: name.into(),
                    expected: "F32, F16 or BF16".into(),
                    found: format!("{other:?} in {}", file.path.display()),
                })
            }
        };
        let values = floats(dtype, bytes).expect("dtype is F32, F16 or BF16 (matched above)");
        Ok((values, info.shape.clone()))
    }
}

/// The shard file names of a `model.safetensors.index.json`, each once, in first-use order.
fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| ModelError::io(index_path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(index_path, "JSON", e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            ModelError::format(index_path, "safetensors index", "no weight_map object")
        })?;
    let mut names: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains(".."))
            .ok_or_else(|| {
                ModelError::format(
                    index_path,
                    "safetensors index",
                    format!("bad shard name {file}"),
                )
            })?;
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    Ok(names)
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        format!("the safetensors files of {}", self.dir.display())
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let (values, shape) = self.read(name)?;
        if shape != [rows, cols] {
            return Err(mismatch(name, &[rows, cols], &shape));
        }
        Ok(Weight::dense(values, rows, cols)?)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (values, shape) = self.read(name)?;
        if shape != [len] {
            return Err(mismatch(name, &[len], &shape));
        }
        Ok(values)
    }
}

/// A GGUF file, answering by HF names. llama.cpp's converter permuted the rows of q_proj and
/// k_proj for its interleaved RoPE; they are put back in HF's rotate-half order here.
pub(crate) struct GgufSource {
    file: GgufFile,
    num_heads: usize,
    num_kv_heads: usize,
}

impl GgufSource {
    pub fn new(file: GgufFile, num_heads: usize, num_kv_heads: usize) -> GgufSource {
        GgufSource {
            file,
            num_heads,
            num_kv_heads,
        }
    }

    fn info(&self, hf_name: &str) -> Result<&GgufTensorInfo> {
        gguf_name(hf_name)
            .and_then(|n| self.file.tensor(&n))
            .ok_or_else(|| missing(hf_name, self))
    }
}

/// llama.cpp's name for an HF tensor name.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// llama.cpp's converter `permute`s q/k rows for its interleaved RoPE: within each of `heads`
/// heads of D rows, GGUF row 2i + j holds HF's row j·D/2 + i (i < D/2, j ∈ {0, 1}). Rows move
/// whole, so this works on quantised rows of `row_bytes` bytes as well. `to_hf` undoes the
/// permutation; otherwise it is applied.
pub(crate) fn permute_rows(
    bytes: &[u8],
    rows: usize,
    heads: usize,
    row_bytes: usize,
    to_hf: bool,
) -> Vec<u8> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = (h * d + 2 * i + j) * row_bytes;
                let hf = (h * d + j * half + i) * row_bytes;
                let (src, dst) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[dst..dst + row_bytes].copy_from_slice(&bytes[src..src + row_bytes]);
            }
        }
    }
    out
}

/// Stored bytes of a float tensor widened to f32.
fn floats(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

impl TensorSource for GgufSource {
    fn describe(&self) -> String {
        format!("{}", self.file.path().display())
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let info = self.info(name)?;
        if info.shape != [rows, cols] {
            return Err(mismatch(name, &[rows, cols], &info.shape));
        }
        let stored = self.file.tensor_bytes(info);
        let heads = if name.ends_with("q_proj.weight") {
            Some(self.num_heads)
        } else if name.ends_with("k_proj.weight") {
            Some(self.num_kv_heads)
        } else {
            None
        };
        let bytes = match heads {
            Some(h) if rows.is_multiple_of(2 * h) => {
                permute_rows(stored, rows, h, stored.len() / rows.max(1), true)
            }
            Some(h) => {
                return Err(ModelError::TensorMismatch {
                    name: name.into(),
                    expected: format!("rows a multiple of 2 × {h} heads"),
                    found: format!("shape {:?}", info.shape),
                })
            }
            None => stored.to_vec(),
        };
        Ok(match floats(info.dtype, &bytes) {
            Some(values) => Weight::dense(values, rows, cols)?,
            None => Weight::quantized(info.dtype, rows, cols, bytes)?,
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        if info.shape != [len] {
            return Err(mismatch(name, &[len], &info.shape));
        }
        floats(info.dtype, self.file.tensor_bytes(info)).ok_or_else(|| ModelError::TensorMismatch {
            name: name.into(),
            expected: "a float vector".into(),
            found: info.dtype.to_string(),
        })
    }
}
