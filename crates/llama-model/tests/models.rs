//! Every model directory under `$LLAMA_FIXTURES/models` against HF transformers: logits, loss,
//! hidden states and the greedy continuation; cached decoding against the full forward.

use llama_fixtures::{assert_close, fixtures_dir, Fixture};
use llama_model::{generate, load, GenerationConfig, LoadedModel, Precision};

/// (name, loaded model, its reference fixture) for every fixture model.
fn models() -> Vec<(String, LoadedModel, Fixture)> {
    let dir = fixtures_dir().join("models");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no models under {}", dir.display());
    names
        .into_iter()
        .map(|name| {
            let loaded = load(&dir.join(&name), Precision::Exact, &mut |_, _| {})
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let fixture = Fixture::open(&format!("models/{name}/reference"));
            (name, loaded, fixture)
        })
        .collect()
}

fn ids_of(fixture: &Fixture, name: &str) -> (Vec<u32>, Vec<usize>) {
    let (ids, shape) = fixture.i64(name);
    (ids.iter().map(|&i| i as u32).collect(), shape)
}

#[test]
fn logits_loss_and_hidden_states_match_hf() {
    for (name, mut loaded, fixture) in models() {
        let model = &mut loaded.model;
        let (ids, shape) = ids_of(&fixture, "input_ids");
        let batch = shape[0];
        let hidden = model.forward_hidden(&ids, batch, None, true).unwrap();
        assert_eq!(
            hidden.states.len(),
            model.config.num_hidden_layers + 1,
            "{name}"
        );
        for (i, state) in hidden.states.iter().enumerate() {
            let (expected, shape) = fixture.f32(&format!("hidden_states.{i}"));
            assert_close(
                &format!("{name} hidden_states.{i}"),
                state,
                &expected,
                &shape,
                1e-4,
            );
        }
        let (expected, logits_shape) = fixture.f32("logits");
        let logits = model.logits(&hidden.last).unwrap();
        assert_close(
            &format!("{name} logits"),
            &logits,
            &expected,
            &logits_shape,
            1e-4,
        );
        let (labels, _) = fixture.i64("labels");
        let loss = model.loss(&ids, &labels, batch).unwrap();
        let (expected_loss, _) = fixture.f32("loss");
        assert_close(&format!("{name} loss"), &[loss], &expected_loss, &[1], 1e-4);
    }
}

#[test]
fn greedy_continuation_matches_hf() {
    for (name, mut loaded, fixture) in models() {
        let (prompt, _) = ids_of(&fixture, "greedy_prompt");
        let (expected, _) = ids_of(&fixture, "greedy_output");
        let config = GenerationConfig {
            max_new_tokens: expected.len() - prompt.len(),
            ..Default::default()
        };
        let out = generate(
            &mut loaded.model,
            std::slice::from_ref(&prompt),
            &config,
            &mut |_, _| true,
        )
        .unwrap();
        assert_eq!(out.ids[0], expected[prompt.len()..], "{name}: greedy ids");
    }
}

#[test]
fn cached_decoding_reproduces_the_full_forward() {
    for (name, mut loaded, fixture) in models() {
        let model = &mut loaded.model;
        let (ids, shape) = ids_of(&fixture, "input_ids");
        let (batch, seq, vocab) = (shape[0], shape[1], model.config.vocab_size);
        let full = model.forward(&ids, batch).unwrap();
        let prefill = (seq / 2).max(1);
        let mut cache = model.new_cache(batch, 1).unwrap();
        let take = |t0: usize, t1: usize| -> Vec<u32> {
            ids.chunks_exact(seq)
                .flat_map(|s| s[t0..t1].iter().copied())
                .collect()
        };
        let mut step_logits = vec![model
            .forward_cached(&take(0, prefill), batch, &mut cache)
            .unwrap()];
        for t in prefill..seq {
            step_logits.push(
                model
                    .forward_cached(&take(t, t + 1), batch, &mut cache)
                    .unwrap(),
            );
        }
        for (k, logits) in step_logits.iter().enumerate() {
            let t = prefill - 1 + k;
            let expected: Vec<f32> = (0..batch)
                .flat_map(|b| {
                    full[(b * seq + t) * vocab..(b * seq + t + 1) * vocab]
                        .iter()
                        .copied()
                })
                .collect();
            assert_close(
                &format!("{name} position {t}"),
                logits,
                &expected,
                &[batch, vocab],
                1e-5,
            );
        }
    }
}

#[test]
fn left_padded_batch_generates_each_prompt_alone() {
    for (name, mut loaded, fixture) in models() {
        let (ids, shape) = ids_of(&fixture, "input_ids");
        let seq = shape[1];
        // The first sequence and a shorter suffix of it: padded by a quarter of its length.
        let cut = (seq / 4).max(1).min(seq - 1);
        let prompts = vec![ids[..seq].to_vec(), ids[cut..seq].to_vec()];
        let config = GenerationConfig {
            max_new_tokens: 5,
            ..Default::default()
        };
        let together = generate(&mut loaded.model, &prompts, &config, &mut |_, _| true).unwrap();
        for (b, prompt) in prompts.iter().enumerate() {
            let alone = generate(
                &mut loaded.model,
                std::slice::from_ref(prompt),
                &config,
                &mut |_, _| true,
            )
            .unwrap();
            assert_eq!(together.ids[b], alone.ids[0], "{name}: sequence {b}");
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let (_, mut loaded, _) = models().remove(0);
    let model = &mut loaded.model;
    let vocab = model.config.vocab_size as u32;
    let err = model.forward(&[1, vocab], 1).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let err = model.forward(&[1, 2, 3], 2).unwrap_err().to_string();
    assert!(err.contains("sequences"), "{err}");
    let too_long = vec![1u32; model.max_seq_length + 1];
    let err = model.forward(&too_long, 1).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    let config = GenerationConfig {
        max_new_tokens: model.max_seq_length,
        ..Default::default()
    };
    let err = generate(model, &[vec![1, 2]], &config, &mut |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("context"), "{err}");
}
