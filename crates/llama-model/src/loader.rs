//! Loading a model from a path: an HF directory (config.json, safetensors, tokenizer.json) or a
//! GGUF file, with its tokenizer when it has one.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::model::{LlamaModel, Precision};
use crate::source::{GgufSource, SafetensorsSource};
use crate::tokenizer::Tokenizer;

/// The file format a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

/// A loaded model with what came beside it.
pub struct LoadedModel {
    pub model: LlamaModel,
    /// The tokenizer, or why there is none (a directory without tokenizer.json, an
    /// unsupported GGUF vocabulary).
    pub tokenizer: std::result::Result<Tokenizer, String>,
    pub path: PathBuf,
    pub format: ModelFormat,
}

impl LoadedModel {
    /// The tokenizer, or an error saying why there is none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .map_err(|e| ModelError::Tokenizer(e.clone()))
    }
}

/// Loads the model at `path`; `progress(done, total)` follows the layers as they load.
pub fn load(
    path: &Path,
    precision: Precision,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    if path.is_dir() {
        load_hf_dir(path, precision, progress)
    } else {
        load_gguf(path, precision, progress)
    }
}

fn load_gguf(
    path: &Path,
    precision: Precision,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = LlamaConfig::from_gguf(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| e.to_string());
    let source = GgufSource::new(file, config.num_attention_heads, config.num_key_value_heads);
    let mut model = LlamaModel::load(config, &source, progress)?;
    model.set_precision(precision);
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.to_path_buf(),
        format: ModelFormat::Gguf,
    })
}

fn load_hf_dir(
    dir: &Path,
    precision: Precision,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    let mut config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
    add_generation_eos(&mut config, &dir.join("generation_config.json"))?;
    let source = SafetensorsSource::open(dir)?;
    let mut model = LlamaModel::load(config, &source, progress)?;
    model.set_precision(precision);
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Tokenizer::from_hf_dir(dir).map_err(|e| e.to_string())
    } else {
        Err(format!(
            "{} has no tokenizer.json; pass token ids instead",
            dir.display()
        ))
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        path: dir.to_path_buf(),
        format: ModelFormat::Safetensors,
    })
}

/// `generation_config.json` may name more end-of-sequence ids than config.json.
fn add_generation_eos(config: &mut LlamaConfig, path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let json: Value =
        serde_json::from_str(&text).map_err(|e| ModelError::format(path, "JSON", e.to_string()))?;
    let ids: Vec<u32> = match json.get("eos_token_id") {
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(Value::as_u64)
            .map(|v| v as u32)
            .collect(),
        Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
        None => Vec::new(),
    };
    for id in ids {
        if !config.eos_token_ids.contains(&id) {
            config.eos_token_ids.push(id);
        }
    }
    Ok(())
}
