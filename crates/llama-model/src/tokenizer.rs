//! Text ↔ token ids through the `tokenizers` crate, and chat templates through `minijinja`.
//!
//! HF directories bring `tokenizer.json` (+ `tokenizer_config.json` for the chat template and
//! special tokens). A GGUF file brings its vocabulary, merges or scores, token types and
//! pre-tokenizer name; [`Tokenizer::from_gguf`] turns them into the `tokenizer.json` HF
//! transformers builds from the same file: byte-level BPE with the pre-tokenizer llama.cpp names
//! (`tokenizer.ggml.model = gpt2`), or SentencePiece's BPE (`llama`: "▁" for spaces, byte
//! fallback, merges recovered from the pieces' scores); control tokens as special added tokens.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with the model's special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend the BOS id when encoding with special tokens (GGUF's `add_bos_token`; HF
    /// tokenizers do this in their post-processor instead).
    add_bos: Option<u32>,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

fn tok_error(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// From an HF model directory: `tokenizer.json`, and `tokenizer_config.json` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::format(&path, "tokenizer.json", e.to_string()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&config_path, "JSON", e.to_string()))?,
            Err(_) => Value::Null,
        };
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        };
        let chat_template = match config.get("chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Tokenizer {
            inner,
            add_bos: None,
            chat_template,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// From a GGUF file's `tokenizer.ggml.*` metadata: byte-level BPE (`model = gpt2`) or
    /// SentencePiece BPE (`model = llama`).
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let get = |k: &str| file.get(&format!("tokenizer.ggml.{k}"));
        let model = get("model").and_then(GgufValue::as_str).unwrap_or("");
        if model != "gpt2" && model != "llama" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not supported (byte-level BPE, \"gpt2\", and \
                 SentencePiece BPE, \"llama\", are); pass token ids instead"
            )));
        }
        let strings = |k: &str| -> Result<Vec<&str>> {
            get(k)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| ModelError::Tokenizer(format!("tokenizer.ggml.{k} is missing")))?
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        ModelError::Tokenizer(format!("tokenizer.ggml.{k} holds a non-string"))
                    })
                })
                .collect()
        };
        let tokens = strings("tokens")?;
        let types: Vec<u64> = match get("token_type").and_then(GgufValue::as_array) {
            Some(t) => t.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let json = if model == "gpt2" {
            let pre = get("pre").and_then(GgufValue::as_str).unwrap_or("default");
            gpt2_tokenizer_json(&tokens, &strings("merges")?, &types, pre)
        } else {
            let merges = match get("merges") {
                Some(_) => strings("merges")?
                    .iter()
                    .map(|m| m.split_once(' ').unwrap_or((m, "")))
                    .collect(),
                None => merges_from_scores(&tokens, &scores(file, tokens.len())?),
            };
            spm_tokenizer_json(&tokens, &merges, &types)
        };
        let inner: tokenizers::Tokenizer = json.to_string().parse().map_err(tok_error)?;
        let id = |k: &str| get(k).and_then(GgufValue::as_u64).map(|v| v as u32);
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .map_or(String::new(), |t| t.to_string())
        };
        // llama.cpp and HF's LlamaTokenizer put BOS before SentencePiece text unless told not to.
        let add_bos = get("add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(model == "llama");
        Ok(Tokenizer {
            inner,
            add_bos: id("bos_token_id").filter(|_| add_bos),
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
            bos_token: text_of(id("bos_token_id")),
            eos_token: text_of(id("eos_token_id")),
        })
    }

    /// Token ids of `text`; with `add_special_tokens`, the BOS (or whatever the tokenizer's
    /// post-processor adds).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_error)?;
        let bos = self.add_bos.filter(|_| add_special_tokens);
        Ok(bos
            .into_iter()
            .chain(encoding.get_ids().iter().copied())
            .collect())
    }

    /// The text of `ids`, special tokens left out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(tok_error)
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes tokenizer.json and tokenizer_config.json (special tokens, chat template) into
    /// an HF directory.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let json = self.inner.to_string(true).map_err(tok_error)?;
        llama_core::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let config = serde_json::json!({
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos.is_some(),
            "chat_template": self.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        let text = serde_json::to_string_pretty(&config).expect("a JSON value always serialises");
        llama_core::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())?;
        Ok(())
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the chat template over `messages` as HF's `apply_chat_template` does (Jinja
    /// with trim_blocks and lstrip_blocks, Python string methods, `raise_exception`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let template_error = |e: minijinja::Error| ModelError::Template(e.to_string());
        env.add_template("chat", template).map_err(template_error)?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        env.get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(template_error)
    }
}

/// `tokenizer.ggml.scores`: one f32 per token.
fn scores(file: &GgufFile, count: usize) -> Result<Vec<f64>> {
    let list = file
        .get("tokenizer.ggml.scores")
        .and_then(GgufValue::as_array)
        .ok_or_else(|| {
            ModelError::Tokenizer(
                "tokenizer.ggml.scores is missing (a SentencePiece vocabulary without merges \
                 needs its pieces' scores)"
                    .into(),
            )
        })?;
    let scores: Option<Vec<f64>> = list.iter().map(GgufValue::as_f64).collect();
    match scores {
        Some(s) if s.len() == count => Ok(s),
        _ => Err(ModelError::Tokenizer(format!(
            "tokenizer.ggml.scores holds {} values for {count} tokens, or a non-number",
            list.len()
        ))),
    }
}

/// The merges a SentencePiece BPE vocabulary implies, as transformers' `generate_merges`
/// recovers them: every split of a piece into two pieces of the vocabulary is a merge ranked by
/// the whole piece's score (best first; ties: longer left, then longer right part, then the
/// order found), the splits of one piece found in the order of their parts' ids. A piece seen
/// twice counts at its first place with its last score, as a Python dict keeps it.
fn merges_from_scores<'a>(tokens: &[&'a str], scores: &[f64]) -> Vec<(&'a str, &'a str)> {
    let mut id_of: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, (&t, &score)) in tokens.iter().zip(scores).enumerate() {
        if id_of.insert(t, i).is_none() {
            order.push(t);
        }
        score_of.insert(t, score);
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for piece in order {
        let mut local: Vec<(&str, &str, f64)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| id_of.contains_key(l) && id_of.contains_key(r))
            .map(|(l, r)| (l, r, score_of[piece]))
            .collect();
        local.sort_by_key(|(l, r, _)| (id_of[l], id_of[r]));
        merges.extend(local);
    }
    // Python's sort(reverse=True) is stable: equal keys keep the order found.
    let key = |(l, r, score): &(&str, &str, f64)| (*score, l.chars().count(), r.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// The `tokenizer.json` of a SentencePiece BPE vocabulary as transformers' `LlamaTokenizer`
/// builds it: "▁" for spaces and before the text (`Metaspace`, prepend "first"), BPE with byte
/// fallback (`<0x..>` pieces for what the vocabulary lacks); GGUF token types 2 (unknown) and 3
/// (control) special added tokens, 4 (user-defined) added ones.
fn spm_tokenizer_json(tokens: &[&str], merges: &[(&str, &str)], types: &[u64]) -> Value {
    let added = added_json(tokens, types, |ty| match ty {
        2 | 3 => Some((true, false)),
        4 => Some((false, false)),
        _ => None,
    });
    let merges: Vec<[&str; 2]> = merges.iter().map(|&(l, r)| [l, r]).collect();
    let parts = BpeJson {
        added,
        pre_tokenizer: json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
        post_processor: Value::Null,
        decoder: json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        byte_fallback: true,
        merges: json!(merges),
    };
    bpe_tokenizer_json(tokens, parts)
}

/// llama.cpp's pre-tokenizer names → HF pre-tokenizer JSON.
fn pre_tokenizer(pre: &str) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    match pre {
        // SmolLM: every digit alone, then GPT-2's split.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        // Llama 3: up to three digits per piece, case-insensitive contractions.
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        _ => byte_level(true),
    }
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What a GGUF tokenizer kind sets in its `tokenizer.json`; the rest is common.
struct BpeJson {
    added: Vec<Value>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    /// SentencePiece's: characters the vocabulary lacks become `<0x..>` byte pieces, and
    /// unknown runs fuse.
    byte_fallback: bool,
    merges: Value,
}

/// The `tokenizer.json` of a BPE vocabulary: `tokens` (ids in order) with `parts`.
fn bpe_tokenizer_json(tokens: &[&str], parts: BpeJson) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": parts.added,
        "normalizer": null,
        "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": parts.post_processor,
        "decoder": parts.decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": parts.byte_fallback,
                  "byte_fallback": parts.byte_fallback, "ignore_merges": false, "vocab": vocab,
                  "merges": parts.merges},
    })
}

/// `tokenizer.json`'s added tokens: each token whose GGUF type `kind` maps to (special,
/// normalized).
fn added_json(
    tokens: &[&str],
    types: &[u64],
    kind: impl Fn(u64) -> Option<(bool, bool)>,
) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter_map(|(id, (content, &ty))| {
            let (special, normalized) = kind(ty)?;
            Some(
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": normalized, "special": special}),
            )
        })
        .collect()
}

/// The `tokenizer.json` of a byte-level BPE vocabulary. GGUF token types: 1 normal, 3 control
/// (special added tokens), 4 user-defined (added, not special).
fn gpt2_tokenizer_json(tokens: &[&str], merges: &[&str], types: &[u64], pre: &str) -> Value {
    let added = added_json(tokens, types, |ty| match ty {
        3 => Some((true, false)),
        4 => Some((false, true)),
        _ => None,
    });
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    let parts = BpeJson {
        added,
        pre_tokenizer: pre_tokenizer(pre),
        post_processor: byte_level,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        byte_fallback: false,
        merges: json!(merges),
    };
    bpe_tokenizer_json(tokens, parts)
}
