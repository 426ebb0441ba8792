//! A multi-turn chat over one KV cache. Each turn renders the whole conversation through the
//! chat template, keeps the cached positions it shares with what the cache already holds (the
//! earlier turns), prefills only the rest and generates the answer. When the conversation and
//! the answer would pass the context, the oldest exchanges are dropped (the system message
//! stays) and the report says how many.

use crate::error::{ModelError, Result};
use crate::generate::{generate_after, Decoder, Generation, GenerationConfig};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// A conversation and the cache that holds it.
pub struct ChatSession<D: Decoder> {
    system: Option<String>,
    /// User and assistant messages, oldest first.
    messages: Vec<ChatMessage>,
    cache: D::Cache,
    /// The ids the cache holds, position by position.
    cached: Vec<u32>,
}

/// What one turn did.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnReport {
    pub generation: Generation,
    /// The answer as the conversation keeps it (special tokens left out).
    pub answer: String,
    /// Cached positions the turn kept; the rest of the conversation was prefilled.
    pub reused: usize,
    /// Oldest exchanges (a user message and its answer) dropped to fit the context.
    pub dropped: usize,
}

/// The first index where `a` and `b` differ.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<D: Decoder> ChatSession<D> {
    /// An empty conversation, with `system` as its first message when given.
    pub fn new(model: &D, system: Option<String>) -> Result<ChatSession<D>> {
        Ok(ChatSession {
            system,
            messages: Vec::new(),
            cache: model.new_cache(1, 256, None)?,
            cached: Vec::new(),
        })
    }

    /// The conversation so far, the system message first.
    pub fn messages(&self) -> Vec<ChatMessage> {
        [self.system_message(), self.messages.clone()].concat()
    }

    fn system_message(&self) -> Vec<ChatMessage> {
        self.system
            .iter()
            .map(|s| ChatMessage::new("system", s))
            .collect()
    }

    /// Positions the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Forgets the conversation (the system message stays) and empties the cache.
    pub fn reset(&mut self) {
        self.messages.clear();
        self.cached.clear();
        D::truncate_cache(&mut self.cache, 0);
    }

    /// Answers `user`: the turn's new tokens prefilled after the cached ones, the answer
    /// generated with `config` (`on_token` sees each id, as in [`crate::generate`]) and kept
    /// in the conversation. A message that cannot fit the context even alone is an error, and
    /// the conversation is left as it was.
    pub fn turn(
        &mut self,
        model: &mut D,
        tokenizer: &Tokenizer,
        user: &str,
        config: &GenerationConfig,
        on_token: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Result<TurnReport> {
        self.messages.push(ChatMessage::new("user", user));
        let (ids, dropped) = match self.fit(model, tokenizer, config.max_new_tokens) {
            Ok(fitted) => fitted,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        // Keep what the cache shares with the conversation; at least one token is new.
        let reused = common_prefix(&self.cached, &ids).min(ids.len() - 1);
        D::truncate_cache(&mut self.cache, reused);
        self.cached.truncate(reused);
        let generation = generate_after(
            model,
            &mut self.cache,
            &ids[..reused],
            &ids[reused..],
            config,
            on_token,
        )?;
        let produced = &generation.ids[0];
        // The cache holds the prompt and every generated id but the last (never fed back).
        self.cached = ids;
        self.cached
            .extend_from_slice(&produced[..produced.len().saturating_sub(1)]);
        let spoken: Vec<u32> = produced
            .iter()
            .copied()
            .filter(|id| !config.eos_token_ids.contains(id))
            .collect();
        let answer = tokenizer.decode(&spoken, true)?;
        self.messages
            .push(ChatMessage::new("assistant", answer.trim()));
        Ok(TurnReport {
            generation,
            answer,
            reused,
            dropped,
        })
    }

    /// The rendered conversation's ids, after dropping the oldest exchanges until they and
    /// `max_new_tokens` fit the context; and how many were dropped.
    fn fit(
        &mut self,
        model: &D,
        tokenizer: &Tokenizer,
        max_new_tokens: usize,
    ) -> Result<(Vec<u32>, usize)> {
        let system = self.system_message();
        let render = |skip: usize| -> Result<Vec<u32>> {
            let kept = [&system[..], &self.messages[skip..]].concat();
            // The template writes any BOS itself.
            tokenizer.encode(&tokenizer.apply_chat_template(&kept, true)?, false)
        };
        let fits = |ids: &[u32]| ids.len() + max_new_tokens <= model.max_seq_length();
        // Drop whole exchanges (two messages) while there is an older one than the new turn.
        let mut skip = 0;
        let mut ids = render(skip)?;
        while !fits(&ids) && skip + 2 < self.messages.len() {
            skip += 2;
            ids = render(skip)?;
        }
        if !fits(&ids) {
            return Err(ModelError::input(
                "message",
                format!(
                    "{} tokens and max_new_tokens {max_new_tokens} pass the context of {}",
                    ids.len(),
                    model.max_seq_length()
                ),
            ));
        }
        self.messages.drain(..skip);
        Ok((ids, skip / 2))
    }
}
