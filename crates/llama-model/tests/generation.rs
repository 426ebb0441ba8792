//! Sampling (HF's logits processors and their order), seeded reproducibility, streaming text
//! with stop strings, and chat templates on a small hand-written tokenizer.

use llama_model::generate::{argmax, sample, Rng};
use llama_model::{ChatMessage, SamplingConfig, TextStream, Tokenizer};

fn config(temperature: f32) -> SamplingConfig {
    SamplingConfig {
        temperature,
        ..Default::default()
    }
}

#[test]
fn greedy_takes_the_first_largest_logit() {
    let mut rng = Rng::new(1);
    assert_eq!(
        sample(&mut [0.5, 3.0, 3.0, -1.0], &[], &config(0.0), &mut rng),
        1
    );
    assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), 1);
}

#[test]
fn repetition_penalty_follows_hf() {
    // HF: a seen token's logit is divided by the penalty when positive, multiplied when not.
    let mut logits = [2.0, -2.0, 1.5, 0.0];
    let cfg = SamplingConfig {
        repetition_penalty: 2.0,
        ..config(0.0)
    };
    let id = sample(&mut logits, &[0, 1, 0], &cfg, &mut Rng::new(1));
    assert_eq!(logits, [1.0, -4.0, 1.5, 0.0]);
    assert_eq!(id, 2);
}

#[test]
fn truncation_leaves_only_the_top_token_when_it_must() {
    let logits = [1.0, 4.0, 2.0, 3.9];
    for cfg in [
        SamplingConfig {
            top_k: 1,
            ..config(1.0)
        },
        SamplingConfig {
            top_p: 0.01,
            ..config(1.0)
        },
        SamplingConfig {
            min_p: 1.0,
            ..config(1.0)
        },
    ] {
        for seed in 0..50 {
            assert_eq!(
                sample(&mut logits.clone(), &[], &cfg, &mut Rng::new(seed)),
                1,
                "{cfg:?}"
            );
        }
    }
    // top-k 2 keeps tokens 1 and 3 only.
    let cfg = SamplingConfig {
        top_k: 2,
        ..config(1.0)
    };
    for seed in 0..200 {
        let id = sample(&mut logits.clone(), &[], &cfg, &mut Rng::new(seed));
        assert!(id == 1 || id == 3, "{id}");
    }
}

#[test]
fn sampling_is_seeded_and_follows_the_softmax() {
    let logits = [0.0f32, 1.0, 2.0];
    let cfg = config(1.0);
    let draw = |seed: u64| -> Vec<u32> {
        let mut rng = Rng::new(seed);
        (0..3000)
            .map(|_| sample(&mut logits.clone(), &[], &cfg, &mut rng))
            .collect()
    };
    assert_eq!(draw(5), draw(5));
    assert_ne!(draw(5), draw(6));
    let counts = draw(9).iter().fold([0usize; 3], |mut c, &i| {
        c[i as usize] += 1;
        c
    });
    let z: f32 = logits.iter().map(|l| l.exp()).sum();
    for (i, &count) in counts.iter().enumerate() {
        let expected = 3000.0 * logits[i].exp() / z;
        // Within five standard deviations of a binomial count.
        let sd = (expected * (1.0 - expected / 3000.0)).sqrt();
        assert!(
            (count as f32 - expected).abs() < 5.0 * sd,
            "token {i}: {count} vs {expected}"
        );
    }
}

#[test]
fn invalid_settings_are_named() {
    for (cfg, name) in [
        (
            SamplingConfig {
                temperature: -1.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingConfig {
                top_p: 0.0,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingConfig {
                min_p: 2.0,
                ..Default::default()
            },
            "min_p",
        ),
        (
            SamplingConfig {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            "repetition_penalty",
        ),
    ] {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with(name), "{err}");
    }
}

/// A byte-level BPE tokenizer over single letters and a space-letter merge, with a chat
/// template and two special tokens, written as an HF model directory.
fn tiny_tokenizer() -> Tokenizer {
    let dir = std::env::temp_dir().join(format!("fastllama-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<s>", "</s>", "a", "b", "c", "Ġ", "Ġa", "!", "é"]
        .iter()
        .enumerate()
    {
        vocab.insert(t.to_string(), i.into());
    }
    // é is two bytes in UTF-8: Ã and © in byte-level form.
    vocab.insert("Ã".into(), 9.into());
    vocab.insert("©".into(), 10.into());
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["Ġ a"]},
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
    let config = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = Tokenizer::from_hf_dir(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    tokenizer
}

#[test]
fn text_streams_whole_characters_and_stops_at_stop_strings() {
    let tok = tiny_tokenizer();
    assert_eq!(tok.encode("ab a", false).unwrap(), vec![2, 3, 6]);
    let stops = vec!["b!".to_string()];
    let mut stream = TextStream::new(&tok, &stops);
    // "a", then é in two byte tokens (nothing until the character is whole), " a", "b", "!".
    let pieces: Vec<String> = [2, 9, 10, 6, 3, 7, 4]
        .iter()
        .map(|&id| stream.push(id).unwrap())
        .collect();
    assert_eq!(pieces, ["a", "", "é", " a", "", "", ""]);
    assert!(stream.stopped());
    assert_eq!(stream.text().unwrap(), "aé a");
    // Held-back text that never became a stop string comes out at the end.
    let mut stream = TextStream::new(&tok, &stops);
    let pieces: Vec<String> = [2, 3].iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(pieces, ["a", ""]);
    assert_eq!(stream.finish().unwrap(), "b");
    assert!(!stream.stopped());
    assert_eq!(stream.text().unwrap(), "ab");
}

#[test]
fn chat_templates_render_like_jinja() {
    let tok = tiny_tokenizer();
    let messages = [
        ChatMessage::new("user", "  ab  "),
        ChatMessage::new("bot", "c"),
    ];
    let text = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, "<s>user: ab\n<s>bot: c\nassistant:");
    // Special tokens in the text are recognised as such.
    assert_eq!(tok.encode("<s>a", false).unwrap(), vec![0, 2]);
}
