//! Training data: JSONL records (`{"text"}`, `{"messages"}` or `{"input_ids", "labels"}`),
//! tokenised into examples and grouped into padded or packed micro-batches.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::trainer::Batch;

/// The label that is not scored.
pub const IGNORE: i64 = -100;

/// One record of a JSONL file.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Plain text: every token is scored.
    Text(String),
    /// A conversation rendered through the chat template: only assistant turns are scored.
    Messages(Vec<ChatMessage>),
    /// Pre-tokenised ids with optional labels (the ids themselves when absent).
    Tokens {
        input_ids: Vec<u32>,
        labels: Option<Vec<i64>>,
    },
}

/// One tokenised example: ids and labels of the same length.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Reads every record of a JSONL file (blank lines skipped); a line that is not one of the
/// three forms is an error naming the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let records = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_record(line).map_err(|reason| {
                ModelError::format(path, "JSONL", format!("line {}: {reason}", i + 1))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if records.is_empty() {
        return Err(ModelError::format(path, "JSONL", "no records"));
    }
    Ok(records)
}

fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if let Some(text) = v.get("text") {
        return text
            .as_str()
            .map(|t| Record::Text(t.to_string()))
            .ok_or_else(|| "\"text\" must be a string".into());
    }
    if let Some(messages) = v.get("messages") {
        let list = messages.as_array().ok_or("\"messages\" must be a list")?;
        let parsed = list
            .iter()
            .map(|m| {
                match (
                    m.get("role").and_then(Value::as_str),
                    m.get("content").and_then(Value::as_str),
                ) {
                    (Some(role), Some(content)) => Ok(ChatMessage::new(role, content)),
                    _ => Err("each message needs string \"role\" and \"content\"".to_string()),
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        return Ok(Record::Messages(parsed));
    }
    if let Some(ids) = v.get("input_ids") {
        let input_ids = ids
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or("\"input_ids\" must be a list of token ids")?;
        let labels = match v.get("labels") {
            None | Some(Value::Null) => None,
            Some(l) => Some(
                l.as_array()
                    .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                    .ok_or("\"labels\" must be a list of integers")?,
            ),
        };
        if labels.as_ref().is_some_and(|l| l.len() != input_ids.len()) {
            return Err("\"labels\" and \"input_ids\" differ in length".into());
        }
        return Ok(Record::Tokens { input_ids, labels });
    }
    Err("a record needs \"text\", \"messages\" or \"input_ids\"".into())
}

/// Tokenises `record`: text with the tokenizer's special tokens and `eos` appended; messages
/// through the chat template, scoring only the assistant turns' tokens (found by rendering the
/// conversation up to each turn); ids as given. Truncated to `max_len`.
pub fn tokenize(
    record: &Record,
    tokenizer: Option<&Tokenizer>,
    eos: Option<u32>,
    max_len: usize,
) -> Result<Example> {
    let need = || {
        tokenizer.ok_or_else(|| {
            ModelError::input(
                "data",
                "text records need the model's tokenizer".to_string(),
            )
        })
    };
    let mut example = match record {
        Record::Tokens { input_ids, labels } => Example {
            ids: input_ids.clone(),
            labels: labels
                .clone()
                .unwrap_or_else(|| input_ids.iter().map(|&i| i as i64).collect()),
        },
        Record::Text(text) => {
            let mut ids = need()?.encode(text, true)?;
            ids.extend(eos.filter(|e| ids.last() != Some(e)));
            Example {
                labels: ids.iter().map(|&i| i as i64).collect(),
                ids,
            }
        }
        Record::Messages(messages) => chat_example(need()?, messages)?,
    };
    example.ids.truncate(max_len);
    example.labels.truncate(max_len);
    Ok(example)
}

fn chat_example(tokenizer: &Tokenizer, messages: &[ChatMessage]) -> Result<Example> {
    let encode = |msgs: &[ChatMessage], prompt: bool| -> Result<Vec<u32>> {
        // The template writes any BOS itself.
        tokenizer.encode(&tokenizer.apply_chat_template(msgs, prompt)?, false)
    };
    let ids = encode(messages, false)?;
    let mut labels = vec![IGNORE; ids.len()];
    let assistant_turns = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant");
    for (i, _) in assistant_turns {
        let start = encode(&messages[..i], true)?.len().min(ids.len());
        let end = encode(&messages[..=i], false)?.len().min(ids.len());
        for t in start..end {
            labels[t] = ids[t] as i64;
        }
    }
    Ok(Example { ids, labels })
}

/// Groups examples into micro-batches of `batch_size` rows. Padding: each row one example,
/// right-padded with `pad` to the longest of its batch (pads are not scored; causal attention
/// keeps real tokens from seeing them). Packing: all examples joined into one stream cut
/// into rows of `max_len` (documents may share a row and attend across their boundary, as
/// HF's simple packing does).
pub fn batches(
    examples: &[Example],
    batch_size: usize,
    max_len: usize,
    packing: bool,
    pad: u32,
) -> Result<Vec<Batch>> {
    if batch_size == 0 || max_len == 0 {
        return Err(ModelError::input(
            "batch_size",
            "batch size and max_seq_length must be at least 1".to_string(),
        ));
    }
    let rows: Vec<Example> = if packing {
        let ids: Vec<u32> = examples
            .iter()
            .flat_map(|e| e.ids.iter().copied())
            .collect();
        let labels: Vec<i64> = examples
            .iter()
            .flat_map(|e| e.labels.iter().copied())
            .collect();
        ids.chunks(max_len)
            .zip(labels.chunks(max_len))
            .map(|(i, l)| Example {
                ids: i.to_vec(),
                labels: l.to_vec(),
            })
            .collect()
    } else {
        examples
            .iter()
            .filter(|e| !e.ids.is_empty())
            .cloned()
            .collect()
    };
    Ok(rows
        .chunks(batch_size)
        .map(|group| {
            let len = group.iter().map(|e| e.ids.len()).max().unwrap_or(1);
            let mut batch = Batch {
                ids: Vec::with_capacity(len * group.len()),
                labels: Vec::with_capacity(len * group.len()),
                batch: group.len(),
            };
            for e in group {
                batch.ids.extend(
                    e.ids
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(pad))
                        .take(len),
                );
                batch.labels.extend(
                    e.labels
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(IGNORE))
                        .take(len),
                );
            }
            batch
        })
        .filter(|b| b.scored_tokens() > 0)
        .collect())
}
