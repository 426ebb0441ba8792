//! The attention layer against HF transformers' `LlamaAttention` (`$LLAMA_FIXTURES/attention`):
//! output, dx and weight gradients of Σ out · dout, and decoding token by token after a prefill,
//! which must reproduce the output row by row and leave HF's post-RoPE keys and values in the
//! cache. Sizes come from the fixture's config.

use llama_attn::{AttentionConfig, LlamaAttention};
use llama_fixtures::{assert_close, Fixture};
use llama_rope::RopeConfig;

/// The layer agrees with HF to f32 rounding (~1e-7); held to the single-op tolerance.
const TOL: f64 = 1e-5;

struct Case {
    layer: LlamaAttention,
    fixture: Fixture,
    batch: usize,
    seq: usize,
    hidden: usize,
}

fn case() -> Case {
    let fixture = Fixture::open("attention/attention");
    let config = &fixture.json()["config"];
    let attn = AttentionConfig::from_hf_config(config).unwrap();
    let rope = RopeConfig::from_hf_config(config).unwrap();
    let w = |name: &str| fixture.f32(&format!("{name}.weight")).0;
    let layer = LlamaAttention::new(
        attn,
        w("q_proj"),
        w("k_proj"),
        w("v_proj"),
        w("o_proj"),
        rope,
    )
    .unwrap();
    let (_, shape) = fixture.f32("x");
    Case {
        layer,
        batch: shape[0],
        seq: shape[1],
        hidden: shape[2],
        fixture,
    }
}

/// Positions a..b of every sequence of a [B, T, C] buffer.
fn positions(v: &[f32], c: &Case, range: std::ops::Range<usize>) -> Vec<f32> {
    (0..c.batch)
        .flat_map(|b| {
            v[(b * c.seq + range.start) * c.hidden..(b * c.seq + range.end) * c.hidden].to_vec()
        })
        .collect()
}

#[test]
fn forward_and_backward_match_hf() {
    let mut c = case();
    let (x, shape) = c.fixture.f32("x");
    let ids: Vec<u32> = (0..c.seq as u32).collect();
    let (out, saved) = c.layer.forward(&x, c.batch, &ids, None).unwrap();
    assert_close("out", &out, &c.fixture.f32("out").0, &shape, TOL);
    let (dx, grads) = c.layer.backward(&saved, &c.fixture.f32("dout").0).unwrap();
    assert_close("dx", &dx, &c.fixture.f32("dx").0, &shape, TOL);
    for (name, got) in [
        ("q_proj", &grads.q_proj),
        ("k_proj", &grads.k_proj),
        ("v_proj", &grads.v_proj),
        ("o_proj", &grads.o_proj),
    ] {
        let (expected, wshape) = c.fixture.f32(&format!("grad.{name}.weight"));
        assert_close(&format!("grad.{name}"), got, &expected, &wshape, TOL);
    }
}

#[test]
fn decoding_after_a_prefill_reproduces_the_output_and_the_caches() {
    let mut c = case();
    let (x, _) = c.fixture.f32("x");
    let (out, _) = c.fixture.f32("out");
    let prefill = c.fixture.json()["decode_prefill_len"].as_u64().unwrap() as usize;
    let max_len = c.fixture.json()["config"]["max_position_embeddings"]
        .as_u64()
        .unwrap() as usize;
    // A small first allocation and increment, so that decoding grows the cache.
    let mut cache = c.layer.new_cache(c.batch, 2, 3, max_len).unwrap();
    let ids: Vec<u32> = (0..prefill as u32).collect();
    let got = c
        .layer
        .forward_cached(&positions(&x, &c, 0..prefill), c.batch, &ids, &mut cache)
        .unwrap();
    assert_close(
        "prefill",
        &got,
        &positions(&out, &c, 0..prefill),
        &[c.batch, prefill, c.hidden],
        TOL,
    );
    for t in prefill..c.seq {
        let got = c
            .layer
            .forward_cached(
                &positions(&x, &c, t..t + 1),
                c.batch,
                &[t as u32],
                &mut cache,
            )
            .unwrap();
        assert_close(
            &format!("decode step {t}"),
            &got,
            &positions(&out, &c, t..t + 1),
            &[c.batch, 1, c.hidden],
            TOL,
        );
    }
    assert_eq!(cache.len(), c.seq);
    // From 2 positions in steps of 3: one copy each time the fill crosses a multiple of 3 past
    // the allocation, never one per token.
    let mut capacities: Vec<usize> = (prefill..=c.seq)
        .map(|n| n.div_ceil(3) * 3)
        .filter(|&n| n > 2)
        .collect();
    capacities.dedup();
    assert_eq!(
        cache.grows(),
        capacities.len(),
        "copies for {} positions",
        c.seq
    );
    for (name, held) in [
        ("decode_k_cache", cache.keys()),
        ("decode_v_cache", cache.values()),
    ] {
        let (expected, shape) = c.fixture.f32(name);
        let (slabs, d) = (shape[0] * shape[1], shape[3]);
        let filled: Vec<f32> = (0..slabs)
            .flat_map(|s| {
                held[s * cache.capacity() * d..(s * cache.capacity() + c.seq) * d].to_vec()
            })
            .collect();
        assert_close(name, &filled, &expected, &shape, TOL);
    }
}
