//! Attention inside the decoder (suite `integration`, the guide's first flow): HF's
//! `LlamaAttention` layer from `$LLAMA_FIXTURES/attention` run with the fast kernels and with
//! the reference ones (RoPE from llama-rope, products from llama-ops) — output, gradients and
//! token-by-token decoding — and then the decoder layers of every fixture model, whose
//! outputs compose to HF's hidden states on both plans and through the KV cache.

mod common;

use common::{load_model, model_dirs};
use llama_attn::{AttentionConfig, LlamaAttention};
use llama_core::Kernel;
use llama_fixtures::{assert_close, Fixture};
use llama_model::LlamaModel;
use llama_rope::RopeConfig;

/// Single-op tolerance of the fixtures' README.
const OP_TOL: f64 = 1e-5;
/// Whole-model tolerance of the fixtures' README.
const MODEL_TOL: f64 = 1e-4;

fn attention_layer(fixture: &Fixture, kernel: Kernel) -> LlamaAttention {
    let config = &fixture.json()["config"];
    let w = |name: &str| fixture.f32(&format!("{name}.weight")).0;
    let mut layer = LlamaAttention::new(
        AttentionConfig::from_hf_config(config).unwrap(),
        w("q_proj"),
        w("k_proj"),
        w("v_proj"),
        w("o_proj"),
        RopeConfig::from_hf_config(config).unwrap(),
    )
    .unwrap();
    (layer.kernel, layer.rope_kernel) = (kernel, kernel);
    layer
}

#[test]
fn the_attention_layer_on_either_kernel_matches_hf_and_decodes_the_same_rows() {
    let fixture = Fixture::open("attention/attention");
    let (x, shape) = fixture.f32("x");
    let (batch, seq, hidden) = (shape[0], shape[1], shape[2]);
    let (out, _) = fixture.f32("out");
    let max_len = fixture.json()["config"]["max_position_embeddings"]
        .as_u64()
        .unwrap() as usize;
    for kernel in [Kernel::Fast, Kernel::Reference] {
        let mut layer = attention_layer(&fixture, kernel);
        let positions: Vec<u32> = (0..seq as u32).collect();
        let (got, saved) = layer.forward(&x, batch, &positions, None).unwrap();
        assert_close(&format!("{kernel} out"), &got, &out, &shape, OP_TOL);
        let (dx, _) = layer.backward(&saved, &fixture.f32("dout").0).unwrap();
        assert_close(
            &format!("{kernel} dx"),
            &dx,
            &fixture.f32("dx").0,
            &shape,
            OP_TOL,
        );
        // one token at a time over the cache: each step is that position's row
        let mut cache = layer.new_cache(batch, 4, 4, max_len).unwrap();
        for t in 0..seq {
            let row = |v: &[f32]| -> Vec<f32> {
                (0..batch)
                    .flat_map(|b| v[(b * seq + t) * hidden..][..hidden].to_vec())
                    .collect()
            };
            let step = layer
                .forward_cached(&row(&x), batch, &[t as u32], &mut cache)
                .unwrap();
            assert_close(
                &format!("{kernel} decode {t}"),
                &step,
                &row(&out),
                &[batch, 1, hidden],
                OP_TOL,
            );
        }
    }
}

/// The hidden states of every layer (HF's `hidden_states`) for the fixture's batch.
fn hidden_states(model: &mut LlamaModel, fixture: &Fixture) -> Vec<Vec<f32>> {
    let (ids, shape) = fixture.i64("input_ids");
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    model
        .forward_hidden(&ids, shape[0], None, true)
        .unwrap()
        .states
}

#[test]
fn decoder_layers_compose_to_hf_hidden_states_on_both_plans() {
    for dir in model_dirs() {
        let fixture = Fixture::open(&format!("models/{}/reference", name_of(&dir)));
        let mut patched = load_model(&dir);
        let mut unpatched = load_model(&dir);
        unpatched.unpatch();
        for (plan, model) in [("patched", &mut patched), ("unpatched", &mut unpatched)] {
            for (i, state) in hidden_states(model, &fixture).iter().enumerate() {
                let (expected, shape) = fixture.f32(&format!("hidden_states.{i}"));
                let what = format!("{} {plan} hidden_states.{i}", dir.display());
                assert_close(&what, state, &expected, &shape, MODEL_TOL);
            }
        }
    }
}

#[test]
fn the_cache_path_gives_the_full_forwards_last_logits_on_both_plans() {
    for dir in model_dirs() {
        for unpatch in [false, true] {
            let mut model = load_model(&dir);
            if unpatch {
                model.unpatch();
            }
            let v = model.config.vocab_size;
            let ids: Vec<u32> = (0..9).map(|i| (i * 5 + 3) as u32 % v as u32).collect();
            let full = model.forward(&ids, 1).unwrap();
            let mut cache = model.new_cache(1, 4).unwrap();
            model.forward_cached(&ids[..6], 1, &mut cache).unwrap();
            let mut last = Vec::new();
            for &id in &ids[6..] {
                last = model.forward_cached(&[id], 1, &mut cache).unwrap();
            }
            let what = format!("{} unpatched={unpatch} last logits", dir.display());
            assert_close(&what, &last, &full[8 * v..], &[1, v], OP_TOL);
        }
    }
}

fn name_of(dir: &std::path::Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}
