//! The guide's tunable attention test (suite `attention`): `batch_size`, `seq_len`,
//! `hidden_size`, `num_heads` from `cargo xtask test --set …` (defaults 2, 64, 32, 4), with
//! half as many kv heads when the head count is even. Checks the tiled attention against the
//! f64 reference forward and backward at those sizes, and that decoding with the cache after a
//! half-length prefill reproduces the layer's output row by row.

mod common;

use llama_attn::{reference, AttnShape, Mask};
use llama_fixtures::{assert_close, param, to_f32, to_f64, Suite, TestRng};

#[test]
fn attention_at_the_tuned_sizes() {
    let (batch, seq) = (
        param("batch_size", Suite::Attention),
        param("seq_len", Suite::Attention),
    );
    let (hidden, heads) = (
        param("hidden_size", Suite::Attention),
        param("num_heads", Suite::Attention),
    );
    assert!(
        heads > 0 && hidden % heads == 0,
        "num_heads {heads} must divide hidden_size {hidden}"
    );
    let kv_heads = if heads % 2 == 0 { heads / 2 } else { heads };
    let d = hidden / heads;
    let mut rng = TestRng::new(7);

    let s = AttnShape::self_attention(batch, heads, kv_heads, seq, d);
    let (q, k, v, dout) = (
        rng.vec(s.q_len(), 2.0),
        rng.vec(s.kv_len(), 2.0),
        rng.vec(s.kv_len(), 1.0),
        rng.vec(s.q_len(), 1.0),
    );
    let mask = Mask::causal();
    let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
    llama_attn::forward(&q, &k, &v, &s, &mask, &mut out, &mut lse).unwrap();
    let dims = [batch, heads, seq, d];
    let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
    assert_close(
        "out",
        &out,
        &to_f32(&reference::forward(&q64, &k64, &v64, &s, &mask)),
        &dims,
        1e-5,
    );
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; s.q_len()],
        vec![0f32; s.kv_len()],
        vec![0f32; s.kv_len()],
    );
    llama_attn::backward(
        &q, &k, &v, &out, &lse, &dout, &s, &mask, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    let (rq, rk, rv) = reference::backward(&q64, &k64, &v64, &to_f64(&dout), &s, &mask);
    assert_close("dq", &dq, &to_f32(&rq), &dims, 1e-4);
    assert_close("dk", &dk, &to_f32(&rk), &[batch, kv_heads, seq, d], 1e-4);
    assert_close("dv", &dv, &to_f32(&rv), &[batch, kv_heads, seq, d], 1e-4);

    let mut layer = common::random_layer(&mut rng, hidden, heads, kv_heads, seq.max(1) * 2);
    let x = rng.vec(batch * seq * hidden, 1.0);
    let ids: Vec<u32> = (0..seq as u32).collect();
    let (full, _) = layer.forward(&x, batch, &ids, None).unwrap();
    let rows = |v: &[f32], r: std::ops::Range<usize>| -> Vec<f32> {
        (0..batch)
            .flat_map(|b| v[(b * seq + r.start) * hidden..(b * seq + r.end) * hidden].to_vec())
            .collect()
    };
    let prefill = seq / 2;
    let mut cache = layer.new_cache(batch, 16, 16, seq.max(1)).unwrap();
    if prefill > 0 {
        let got = layer
            .forward_cached(&rows(&x, 0..prefill), batch, &ids[..prefill], &mut cache)
            .unwrap();
        assert_close(
            "prefill",
            &got,
            &rows(&full, 0..prefill),
            &[batch, prefill, hidden],
            1e-5,
        );
    }
    for t in prefill..seq {
        let got = layer
            .forward_cached(&rows(&x, t..t + 1), batch, &[t as u32], &mut cache)
            .unwrap();
        assert_close(
            &format!("decode step {t}"),
            &got,
            &rows(&full, t..t + 1),
            &[batch, 1, hidden],
            1e-5,
        );
    }
}
