//! Generation (`unsloth_fast_generate`): one prefill of the (left-padded) prompts over fresh KV
//! caches, then one decode step per new token, each choosing the next token with HF's logits
//! processors in HF's order — repetition penalty, temperature, top-k, top-p, min-p — and
//! sampling (or taking the arg max when the temperature is 0).

use std::time::Instant;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// A model generation can drive: prefill and decode steps over caches of its own kind (the
/// CPU [`crate::LlamaModel`], the GPU [`crate::CudaLlamaModel`]).
pub trait Decoder {
    type Cache;
    fn config(&self) -> &LlamaConfig;
    /// The longest sequence accepted.
    fn max_seq_length(&self) -> usize;
    /// Empty caches for `batch` sequences with room for `capacity` positions, each sequence
    /// left-padded by `padding[b]` positions (None: no padding).
    fn new_cache(
        &self,
        batch: usize,
        capacity: usize,
        padding: Option<Vec<usize>>,
    ) -> Result<Self::Cache>;
    /// Appends `ids` [B, T] to the caches and returns the logits [B, V] of each sequence's
    /// last new position.
    fn forward_cached(
        &mut self,
        ids: &[u32],
        batch: usize,
        cache: &mut Self::Cache,
    ) -> Result<Vec<f32>>;
    /// Positions the caches hold.
    fn cache_len(cache: &Self::Cache) -> usize;
    /// Forgets cached positions from `len` on.
    fn truncate_cache(cache: &mut Self::Cache, len: usize);
}

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the top token's probability (0: off).
    pub min_p: f32,
    /// HF's repetition penalty over the prompt and generated ids (1: off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Checks every setting, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &'static str, value: f32, allowed: &str| {
            Err(ModelError::input(
                arg,
                format!("{value} is outside {allowed}"),
            ))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, "[0, ∞)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "(0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "[0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty", self.repetition_penalty, "(0, ∞)");
        }
        Ok(())
    }
}

/// Generation settings.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Ids that end a sequence (kept as its last id).
    pub eos_token_ids: Vec<u32>,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end-of-sequence id.
    Eos,
    /// It reached max_new_tokens.
    Length,
    /// The token callback asked it to stop (a stop string).
    Stopped,
}

/// What a generation produced, with its timing.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// New ids per sequence (an EOS id that ended it included).
    pub ids: Vec<Vec<u32>>,
    pub finish: Vec<FinishReason>,
    /// Prompt tokens processed (all sequences, padding excluded) and the seconds taken.
    pub prefill_tokens: usize,
    pub prefill_seconds: f64,
    /// Tokens produced by decode steps and the seconds taken.
    pub decode_tokens: usize,
    pub decode_seconds: f64,
}

/// The seedable generator of sampling (the same seed gives the same samples).
pub use llama_core::SplitMix64 as Rng;

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Chooses the next token from `logits` [V] (modified in place) after `history` (prompt and
/// generated ids, for the repetition penalty).
pub fn sample(logits: &mut [f32], history: &[u32], config: &SamplingConfig, rng: &mut Rng) -> u32 {
    if config.repetition_penalty != 1.0 {
        // HF: a seen token's logit is divided by the penalty when positive, multiplied when
        // negative — once per distinct token.
        let vocab = logits.len();
        let mut seen = vec![false; vocab];
        for &id in history.iter().filter(|&&id| (id as usize) < vocab) {
            if !std::mem::replace(&mut seen[id as usize], true) {
                let l = &mut logits[id as usize];
                *l = if *l < 0.0 {
                    *l * config.repetition_penalty
                } else {
                    *l / config.repetition_penalty
                };
            }
        }
    }
    if config.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    logits.iter_mut().for_each(|l| *l /= config.temperature);
    if config.top_k > 0 && config.top_k < logits.len() {
        // Keep every token at least as likely as the k-th (ties at the boundary stay, as HF).
        let mut sorted = logits.to_vec();
        let kth = *sorted
            .select_nth_unstable_by(config.top_k - 1, |a, b| b.total_cmp(a))
            .1;
        logits
            .iter_mut()
            .filter(|l| **l < kth)
            .for_each(|l| *l = f32::NEG_INFINITY);
    }
    let mut probs = softmax(logits);
    if config.top_p < 1.0 {
        // HF: sort ascending, drop the tokens whose cumulative probability stays ≤ 1 − p,
        // never the most likely one.
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        let mut cumulative = 0f64;
        for &i in &order[..order.len() - 1] {
            cumulative += probs[i] as f64;
            if cumulative <= (1.0 - config.top_p) as f64 {
                probs[i] = 0.0;
            }
        }
    }
    if config.min_p > 0.0 {
        let top = probs.iter().copied().fold(0f32, f32::max);
        probs
            .iter_mut()
            .filter(|p| **p < config.min_p * top)
            .for_each(|p| *p = 0.0);
    }
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let mut target = rng.next_f64() * total;
    for (i, &p) in probs.iter().enumerate() {
        target -= p as f64;
        if target < 0.0 && p > 0.0 {
            return i as u32;
        }
    }
    argmax(&probs) as u32
}

/// softmax(x) in f32 (f64 sum).
fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let sum: f64 = exp.iter().map(|&v| v as f64).sum();
    exp.iter().map(|&v| (v as f64 / sum) as f32).collect()
}

/// Generates up to `config.max_new_tokens` ids after each prompt. Prompts of different lengths
/// are left-padded into one batch. `on_token(sequence, id)` sees each new id as it is chosen
/// and returns false to stop that sequence (stop strings).
///
/// On the CPU, call it from a rayon worker (inside `ThreadPool::install`, as `fastllama` does):
/// a decode step has ~150 parallel sections, and a caller outside the pool sleeps through each.
pub fn generate<D: Decoder + ?Sized>(
    model: &mut D,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Generation> {
    config.sampling.validate()?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::input(
            "prompt",
            "every prompt needs at least one token",
        ));
    }
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let total = longest + config.max_new_tokens;
    if total > model.max_seq_length() {
        return Err(ModelError::input(
            "max_new_tokens",
            format!(
                "a prompt of {longest} tokens and {} new tokens pass the context of {}",
                config.max_new_tokens,
                model.max_seq_length()
            ),
        ));
    }
    let pad_id = model
        .config()
        .pad_token_id
        .or(config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let padding: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut ids = Vec::with_capacity(batch * longest);
    for (p, &pad) in prompts.iter().zip(&padding) {
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
    }
    let padded = padding.iter().any(|&p| p > 0).then_some(padding);
    let mut cache = model.new_cache(batch, total, padded)?;
    let pads = batch * longest - prompts.iter().map(Vec::len).sum::<usize>();
    decode(
        model,
        &mut cache,
        &ids,
        pads,
        prompts.to_vec(),
        config,
        on_token,
    )
}

/// Generates after what `cache` already holds (one sequence): `new_ids` are prefilled onto it
/// and the continuation decoded, leaving every id but the last generated one in the cache (a
/// chat's history, so that the next turn prefills only itself). `history` is the ids the
/// cache holds (for the repetition penalty). The new ids and max_new_tokens must fit the
/// context after what is cached.
pub fn generate_after<D: Decoder + ?Sized>(
    model: &mut D,
    cache: &mut D::Cache,
    history: &[u32],
    new_ids: &[u32],
    config: &GenerationConfig,
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Generation> {
    config.sampling.validate()?;
    if new_ids.is_empty() {
        return Err(ModelError::input(
            "prompt",
            "a turn needs at least one new token",
        ));
    }
    let cached = D::cache_len(cache);
    let total = cached + new_ids.len() + config.max_new_tokens;
    if total > model.max_seq_length() {
        return Err(ModelError::input(
            "max_new_tokens",
            format!(
                "{cached} cached, {} new and {} generated tokens pass the context of {}",
                new_ids.len(),
                config.max_new_tokens,
                model.max_seq_length()
            ),
        ));
    }
    let history = [history, new_ids].concat();
    decode(model, cache, new_ids, 0, vec![history], config, on_token)
}

/// Prefills `ids` [B, T] (of which `padding` are pads) onto `cache`, then decodes up to
/// max_new_tokens per sequence. `histories` hold each sequence's ids so far (the repetition
/// penalty reads them).
fn decode<D: Decoder + ?Sized>(
    model: &mut D,
    cache: &mut D::Cache,
    ids: &[u32],
    padding: usize,
    mut histories: Vec<Vec<u32>>,
    config: &GenerationConfig,
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Generation> {
    let batch = histories.len();
    let pad_id = model
        .config()
        .pad_token_id
        .or(config.eos_token_ids.first().copied())
        .unwrap_or(0);
    let mut rngs: Vec<Rng> = (0..batch as u64)
        .map(|b| Rng::new(config.sampling.seed.wrapping_add(b)))
        .collect();
    let mut out = Generation {
        ids: vec![Vec::new(); batch],
        finish: vec![FinishReason::Length; batch],
        prefill_tokens: ids.len() - padding,
        prefill_seconds: 0.0,
        decode_tokens: 0,
        decode_seconds: 0.0,
    };
    let mut running = vec![config.max_new_tokens > 0; batch];
    let vocab = model.config().vocab_size;
    let start = Instant::now();
    let mut logits = if config.max_new_tokens > 0 {
        model.forward_cached(ids, batch, cache)?
    } else {
        Vec::new()
    };
    out.prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    for step in 0..config.max_new_tokens {
        let mut next = vec![pad_id; batch];
        for b in 0..batch {
            if !running[b] {
                continue;
            }
            let row = &mut logits[b * vocab..(b + 1) * vocab];
            let id = sample(row, &histories[b], &config.sampling, &mut rngs[b]);
            next[b] = id;
            histories[b].push(id);
            out.ids[b].push(id);
            if config.eos_token_ids.contains(&id) {
                out.finish[b] = FinishReason::Eos;
                running[b] = false;
            }
            if !on_token(b, id) && running[b] {
                out.finish[b] = FinishReason::Stopped;
                running[b] = false;
            }
        }
        if step + 1 == config.max_new_tokens || !running.iter().any(|&r| r) {
            break;
        }
        logits = model.forward_cached(&next, batch, cache)?;
    }
    out.decode_seconds = decode_start.elapsed().as_secs_f64();
    // The first id of each sequence came from the prefill's logits.
    out.decode_tokens = out.ids.iter().map(|ids| ids.len().saturating_sub(1)).sum();
    Ok(out)
}

/// Turns ids into text as they arrive: each [`TextStream::push`] returns the new text, held
/// back while it ends inside a multi-byte character, and cut at the first stop string.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    stop_strings: &'a [String],
    ids: Vec<u32>,
    emitted: usize,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stop_strings: &'a [String]) -> TextStream<'a> {
        TextStream {
            tokenizer,
            stop_strings,
            ids: Vec::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds `id`; returns the text it completes (special tokens left out). Text that could be
    /// the start of a stop string is held back until it is known not to be one.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // Nothing emitted can hold a stop string (it would have stopped), so search from the
        // first byte not yet emitted.
        let end = match self
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text[self.emitted..].find(s.as_str()))
            .min()
        {
            Some(pos) => {
                self.stopped = true;
                self.emitted + pos
            }
            None => text.len() - self.held_back(&text),
        };
        Ok(self.emit(&text, end))
    }

    /// The longest tail of `text` that is a proper prefix of a stop string.
    fn held_back(&self, text: &str) -> usize {
        let pending = &text[self.emitted..];
        self.stop_strings
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|prefix| pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    fn emit(&mut self, text: &str, end: usize) -> String {
        let piece = text.get(self.emitted..end).unwrap_or("").to_string();
        self.emitted = end.max(self.emitted);
        piece
    }

    /// Ends the stream: returns any text held back (the generation ended without a stop
    /// string completing).
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids, true)?;
        let end = text.len();
        Ok(self.emit(&text, end))
    }

    /// True once a stop string appeared.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text emitted so far.
    pub fn text(&self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids, true)?;
        Ok(text.get(..self.emitted).unwrap_or(&text).to_string())
    }
}
